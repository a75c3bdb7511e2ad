"""Exports of the bundled SmolLM2-135M-Instruct (Q4_1 GGUF base) with a random adapter that clearly changes it.

Slow (the merge, a 270 MB f16 write and llama.cpp runs): about a minute in all on 2 cores.
"""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file

from adapters import gguf_export as ge
from adapters import gguf_vocab as gv
from adapters.export import export_adapter
from adapters.verify import llama_logits, open_llama, probe_ids, verify_gguf

from .conftest import make_random_adapter

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bundled():
    from edge_unisd.modeling import load_base

    return load_base(None)


@pytest.fixture(scope="module")
def adapter(bundled, tmp_path_factory):
    return make_random_adapter(bundled.model, tmp_path_factory.mktemp("bundled") / "a1", rank=8, alpha=16,
                               b_std=0.1)


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("bundled-out")


@pytest.fixture(scope="module")
def f16_export(bundled, adapter, out_dir):
    return export_adapter(bundled, adapter, out_dir, "f16")


@pytest.fixture(scope="module")
def readers(bundled, f16_export):
    """(base, exported) GGUFReaders, parsed once."""
    return gguf.GGUFReader(bundled.source.path), gguf.GGUFReader(f16_export.gguf)


def test_f16_export_matches_torch_and_the_adapter_is_in(f16_export, bundled):
    report = f16_export.verify
    assert report.passed, report.problems
    assert report.top1 >= 0.98 and report.mean_kl <= 0.01 and report.template_ok and report.tokenizer_ok
    vs_base = verify_gguf(f16_export.gguf, bundled.model, bundled.tokenizer, "f16")
    assert not vs_base.passed and vs_base.mean_kl > 0.1 and vs_base.top1 < 0.9


def test_every_metadata_key_of_the_base_is_kept(readers):
    base, out = readers

    def kv(r):
        return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}

    base_kv, out_kv = kv(base), kv(out)
    assert out_kv.pop("general.file_type") == gguf.LlamaFileType.MOSTLY_F16
    base_kv.pop("general.file_type")
    assert out_kv == base_kv  # tokenizer, merges, special ids, chat template, hyperparameters
    assert [t.name for t in out.tensors] == [t.name for t in base.tensors]
    types = {t.name: t.tensor_type for t in out.tensors}
    assert "output.weight" not in types  # tied stays tied
    assert all(types[n] == gguf.GGMLQuantizationType.F32 for n in types if n.endswith("norm.weight"))
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == gguf.GGMLQuantizationType.F16


def test_lora_delta_lands_permuted_on_q_and_k(readers, adapter):
    """exported - base == permute(scaling * B @ A) for q/k, unpermuted for the MLP."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    scaling = cfg["lora_alpha"] / cfg["r"]
    base = {t.name: t for t in readers[0].tensors}
    out = {t.name: t for t in readers[1].tensors}
    for hf, name, n_kv in (("self_attn.q_proj", "attn_q", 9), ("self_attn.k_proj", "attn_k", 3),
                           ("mlp.up_proj", "ffn_up", None)):
        key = f"base_model.model.model.layers.3.{hf}"
        delta = scaling * lora[f"{key}.lora_B.weight"] @ lora[f"{key}.lora_A.weight"]
        if n_kv is not None:
            delta = ge.permute_qk(delta, 9, n_kv)
        b, o = base[f"blk.3.{name}.weight"], out[f"blk.3.{name}.weight"]
        got = o.data.astype(np.float32) - gguf.quants.dequantize(b.data, b.tensor_type)
        np.testing.assert_allclose(got, delta, atol=2e-3)
        assert np.abs(delta).max() > 0.05


def test_lora_gguf_on_the_q4_base_gives_the_merged_logits(bundled, adapter, out_dir, f16_export):
    result = export_adapter(bundled, adapter, out_dir, "f32", fmt="lora")
    assert result.verify.passed, result.verify.problems
    assert result.verify.gguf == str(bundled.source.path)  # applied on the unchanged bundled Q4_1 file
    ids = probe_ids(bundled.tokenizer)[0]
    with_lora = llama_logits(open_llama(bundled.source.path, n_ctx=128, lora_path=result.gguf), ids)
    merged = llama_logits(open_llama(f16_export.gguf, n_ctx=128), ids)
    plain = llama_logits(open_llama(bundled.source.path, n_ctx=128), ids)
    top1 = merged.argmax(-1)
    agree, agree_plain = (with_lora.argmax(-1) == top1).mean(), (plain.argmax(-1) == top1).mean()
    # Q4_1 dot products quantise the activations too (top-1 0.95 against torch for the plain base), and
    # the CPU's kernels round differently: 44 of 49 positions agree on an AVX2 EPYC, more on an AVX-512 Xeon
    assert agree > 0.85
    assert agree_plain < agree - 0.1  # without the LoRA: 0.71 here
    assert np.abs(with_lora - merged).mean() < 0.3 * np.abs(plain - merged).mean()


def test_k_quant_export_through_llama_cpp(bundled, adapter, tmp_path):
    result = export_adapter(bundled, adapter, tmp_path, "q4_k_m", nice=5)
    assert result.verify.passed, result.verify.problems
    r = gguf.GGUFReader(result.gguf)
    assert r.get_field("general.file_type").contents() == gguf.LlamaFileType.MOSTLY_Q4_K_M
    assert r.get_field("tokenizer.chat_template").contents() == bundled.tokenizer.chat_template
    assert not list((tmp_path / "builds").glob(".*"))  # the f16 stage file is gone


def test_hf_vocab_builder_reproduces_the_bundled_vocabulary(bundled, readers):
    """The HF-folder path, run on the cached HF copy of the bundled model, rebuilds the GGUF's own vocab."""
    from edge_unisd.modeling import gguf_to_hf_folder

    folder = gguf_to_hf_folder(bundled.source)
    vocab = gv.build_bpe_vocab(folder, 49152)
    r = readers[0]
    assert vocab.tokens == r.get_field("tokenizer.ggml.tokens").contents()
    assert vocab.toktypes == r.get_field("tokenizer.ggml.token_type").contents()
    assert vocab.special.merges == r.get_field("tokenizer.ggml.merges").contents()
    for typ in ("bos", "eos", "unk", "pad"):
        assert vocab.special.special_token_ids[typ] == r.get_field(f"tokenizer.ggml.{typ}".replace(
            "pad", "padding").replace("unk", "unknown") + "_token_id").contents()
    # transformers' GGUF conversion keeps only the byte-level split (no digit split): "gpt-2", not "smollm"
    assert vocab.pre == "gpt-2"
