"""GGUF writers: names, the Q/K permutation, tensor types, vocabulary, LoRA files, K-quant subprocess."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch

from adapters import gguf_export as ge
from adapters import gguf_vocab as gv
from adapters import lora_gguf as lg
from adapters.merge import merge_adapter
from adapters.quantize import quantize_gguf


def test_permutation_is_the_inverse_of_transformers_gguf_loader():
    """transformers undoes llama.cpp's Q/K order when it loads a GGUF; our permute must be its inverse."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    rng = np.random.default_rng(0)
    undo = LlamaTensorProcessor()._reverse_permute_weights
    for n_head, n_kv, rows_per_head in ((9, 3, 64), (4, 2, 16), (4, 4, 8)):
        q = rng.standard_normal((n_head * rows_per_head, 12)).astype(np.float32)
        k = rng.standard_normal((n_kv * rows_per_head, 12)).astype(np.float32)
        np.testing.assert_array_equal(undo(ge.permute_qk(q, n_head, n_head), n_head, n_head), q)
        np.testing.assert_array_equal(undo(ge.permute_qk(k, n_head, n_kv), n_head, n_kv), k)
        assert not np.array_equal(ge.permute_qk(q, n_head, n_head), q)
    lora_b = rng.standard_normal((4 * 16, 3)).astype(np.float32)  # rows are output features, any rank
    np.testing.assert_array_equal(undo(ge.permute_qk(lora_b, 4, 2), 4, 2), lora_b)


def test_names_come_from_ggufs_tables_and_tied_output_is_dropped():
    shape = ge.ModelShape("llama", n_blocks=2, n_head=4, n_head_kv=2)
    state = {"model.embed_tokens.weight": torch.zeros(10, 64), "lm_head.weight": torch.zeros(10, 64),
             "model.layers.1.self_attn.k_proj.weight": torch.zeros(32, 64), "model.norm.weight": torch.ones(64),
             "model.layers.0.mlp.down_proj.weight": torch.zeros(64, 128)}
    names = ge.to_gguf_tensors(state, shape, drop_output=True, where="t")
    assert set(names) == {"token_embd.weight", "blk.1.attn_k.weight", "output_norm.weight", "blk.0.ffn_down.weight"}
    assert "output.weight" in ge.to_gguf_tensors(state, shape, drop_output=False, where="t")
    with pytest.raises(ge.ExportError, match="no GGUF name"):
        ge.to_gguf_tensors({"model.vision.proj.weight": torch.zeros(2, 2)}, shape, drop_output=True, where="t")
    with pytest.raises(ge.ExportError, match="not supported"):
        ge.arch_rules("gpt_neox", "t")


def test_tensor_types_keep_norms_f32_and_fall_back_for_odd_rows():
    assert ge.tensor_type_for("blk.0.attn_norm.weight", (64,), "q8_0") == gguf.GGMLQuantizationType.F32
    assert ge.tensor_type_for("blk.0.attn_q.bias", (64,), "f16") == gguf.GGMLQuantizationType.F32
    assert ge.tensor_type_for("blk.0.attn_q.weight", (64, 64), "q8_0") == gguf.GGMLQuantizationType.Q8_0
    assert ge.tensor_type_for("blk.0.attn_q.weight", (64, 48), "q8_0") == gguf.GGMLQuantizationType.F16
    assert ge.tensor_type_for("token_embd.weight", (10, 64), "bf16") == gguf.GGMLQuantizationType.BF16


@pytest.mark.parametrize("pre, expected", [
    ({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}, "gpt-2"),
    ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                            {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}]},
     "smollm"),
    ({"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": gv.QWEN2_PRE_REGEX}},
                                            {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]},
     "qwen2"),
    ({"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": gv.LLAMA3_PRE_REGEX}},
                                            {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]},
     "llama-bpe"),
])
def test_pre_tokenizer_detection(pre, expected):
    assert gv.detect_bpe_pre({"pre_tokenizer": pre}, "tok") == expected


def test_unknown_pre_tokenizer_is_refused():
    with pytest.raises(ge.ExportError, match="no known llama.cpp equivalent"):
        gv.detect_bpe_pre({"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": True}}, "tok")
    with pytest.raises(ge.ExportError, match="no known llama.cpp equivalent"):
        gv.detect_bpe_pre({"pre_tokenizer": {"type": "Metaspace"}}, "tok")


def test_qwen2_vocab_follows_what_transformers_runs(tiny_qwen2):
    """transformers 5 gives a qwen2 folder Qwen2Tokenizer, which replaces tokenizer.json's pre-tokenizer:
    the GGUF must describe the tokenizer transformers really uses, padded to the model's vocab size."""
    config = json.loads((tiny_qwen2 / "config.json").read_text())
    vocab = gv.build_bpe_vocab(tiny_qwen2, config["vocab_size"])
    assert vocab.pre == "qwen2"
    assert len(vocab.tokens) == config["vocab_size"]
    assert vocab.tokens[-1].startswith("[PAD") and vocab.toktypes[-1] == gguf.TokenType.UNUSED
    assert vocab.toktypes[:3] == [gguf.TokenType.CONTROL] * 3  # the ChatML specials
    assert vocab.special.merges and vocab.special.chat_template
    assert vocab.special.add_special_token["bos"] is False


def test_hf_export_writes_hparams_vocab_and_tied_output(tiny_llama, tmp_path):
    merged = merge_adapter(tiny_llama, None)
    out = ge.write_merged_from_hf(tiny_llama, merged.state_dict(), tmp_path / "m.gguf", "f16")
    r = gguf.GGUFReader(out)
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("tokenizer.ggml.merges")}
    assert f["general.architecture"] == "llama" and f["llama.block_count"] == 2
    assert f["llama.attention.head_count"] == 4 and f["llama.attention.head_count_kv"] == 2
    assert f["llama.rope.dimension_count"] == 16 and f["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    assert f["tokenizer.chat_template"] == merged.tokenizer.chat_template
    assert f["tokenizer.ggml.eos_token_id"] == merged.tokenizer.eos_token_id
    names = {t.name: t for t in r.tensors}
    assert "output.weight" not in names  # tied, as in the HF config
    assert names["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert names["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert not list(tmp_path.glob(".*.tmp"))


def test_an_exception_mid_write_leaves_no_file(tiny_llama, tmp_path, monkeypatch):
    merged = merge_adapter(tiny_llama, None)
    calls = {"n": 0}
    real = ge.encode_tensor

    def failing(arr, qtype):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("disk full (injected)")
        return real(arr, qtype)

    monkeypatch.setattr(ge, "encode_tensor", failing)
    with pytest.raises(RuntimeError, match="injected"):
        ge.write_merged_from_hf(tiny_llama, merged.state_dict(), tmp_path / "m.gguf", "f16")
    assert list(tmp_path.iterdir()) == []


def test_lora_gguf_has_llama_cpp_adapter_layout(tiny_llama, tiny_llama_adapter, tmp_path):
    cfg = json.loads((tiny_llama / "config.json").read_text())
    out = lg.write_lora(tiny_llama_adapter, ge.shape_from_hf_config(cfg, "c"), tmp_path / "a.gguf")
    r = gguf.GGUFReader(out)
    assert r.get_field("general.type").contents() == "adapter"
    assert r.get_field("adapter.type").contents() == "lora"
    assert r.get_field("adapter.lora.alpha").contents() == pytest.approx(8.0)
    t = {x.name: x for x in r.tensors}
    a, b = t["blk.0.attn_q.weight.lora_a"], t["blk.0.attn_q.weight.lora_b"]
    assert list(a.shape) == [64, 4] and list(b.shape) == [4, 64]  # GGUF ne order: (in, r) and (r, out)
    assert len(t) == 2 * 2 * 7  # 7 linear layers per block, 2 blocks, a and b each


def test_lora_gguf_from_the_live_adapters_tensors_equals_the_one_from_its_folder(tiny_llama, tiny_llama_adapter,
                                                                                   tmp_path):
    """The rollout backend writes the adapter from memory; it must be the file `write_lora` makes."""
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    shape = ge.shape_from_hf_config(json.loads((tiny_llama / "config.json").read_text()), "c")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), tiny_llama_adapter)
    weights = {k: v.detach().numpy() for k, v in get_peft_model_state_dict(model).items()}
    live = lg.write_lora_weights(model.peft_config["default"].to_dict(), weights, shape, tmp_path / "live.gguf",
                                 where="live", name=tiny_llama_adapter.name)
    saved = lg.write_lora(tiny_llama_adapter, shape, tmp_path / "saved.gguf")
    assert live.read_bytes() == saved.read_bytes()


def test_peft_scaling_folds_rslora_and_alpha_patterns():
    assert lg.peft_scaling({"lora_alpha": 16}, "model.layers.0.self_attn.q_proj", 8) == 2.0
    assert lg.peft_scaling({"lora_alpha": 16, "use_rslora": True}, "x.q_proj", 16) == 4.0
    cfg = {"lora_alpha": 16, "alpha_pattern": {"v_proj": 32}}
    assert lg.peft_scaling(cfg, "model.layers.0.self_attn.v_proj", 8) == 4.0
    assert lg.peft_scaling(cfg, "model.layers.0.self_attn.q_proj", 8) == 2.0


def test_dora_adapters_are_refused_for_lora_gguf(tiny_llama_adapter, tmp_path):
    bad = tmp_path / "dora"
    bad.mkdir()
    cfg = json.loads((tiny_llama_adapter / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    (bad / "adapter_model.safetensors").write_bytes((tiny_llama_adapter / "adapter_model.safetensors").read_bytes())
    with pytest.raises(ge.ExportError, match="use_dora"):
        lg.write_lora(bad, ge.ModelShape("llama", 2, 4, 2), tmp_path / "x.gguf")


def test_lora_gguf_refuses_a_quantised_dtype_and_writes_nothing(tiny_llama_adapter, tmp_path):
    with pytest.raises(ge.ExportError, match="dtype 'q8_0'.*f32 or f16"):
        lg.write_lora(tiny_llama_adapter, ge.ModelShape("llama", 2, 4, 2), tmp_path / "x.gguf", dtype="q8_0")
    assert list(tmp_path.iterdir()) == []


def test_k_quant_runs_in_a_child_process_and_a_timeout_leaves_nothing(tmp_path, tiny_llama):
    src = ge.write_merged_from_hf(tiny_llama, merge_adapter(tiny_llama, None).state_dict(), tmp_path / "f16.gguf",
                                  "f16")
    out = quantize_gguf(src, tmp_path / "q.gguf", "q4_k_m", nthread=1, nice=5)
    assert gguf.GGUFReader(out).get_field("general.file_type").contents() == gguf.LlamaFileType.MOSTLY_Q4_K_M
    with pytest.raises(ge.ExportError, match="longer than"):
        quantize_gguf(src, tmp_path / "slow.gguf", "q6_k", timeout=0.001)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f16.gguf", "q.gguf"]
    with pytest.raises(ge.ExportError, match="not a llama.cpp K-quant"):
        quantize_gguf(src, tmp_path / "x.gguf", "f16")
