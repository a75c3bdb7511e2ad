"""Loading bases (GGUF, HF folder) with clear errors, and the evaluation metrics."""

from __future__ import annotations

import math

import pytest
import torch

from edge_unisd.eval import reference_nll, retention
from edge_unisd.items import Item
from edge_unisd.losses import masked_nll
from edge_unisd.modeling import ModelLoadError, attach_lora, load_base, pick_device_dtype, resolve_base
from edge_unisd.rollout import pack_completions
from edge_unisd.scoring import completion_hidden
from edge_unisd.teacher import lora_parameters
from edge_unisd.views import render_prompt
from tests.conftest import make_tiny_llama


def test_bad_base_paths_are_named(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        resolve_base(tmp_path / "missing.gguf")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        resolve_base(tmp_path / "weights.bin")
    with pytest.raises(ModelLoadError, match="without config.json"):
        resolve_base(tmp_path)


def test_cpu_dtype_follows_the_setting_then_the_measured_bf16_speed(monkeypatch):
    from edge_unisd import precision

    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: 4.3)  # a CPU with native bf16 (AVX512-BF16)
    monkeypatch.setenv(precision.DTYPE_ENV, "float32")
    assert pick_device_dtype("cpu") == (torch.device("cpu"), torch.float32)
    monkeypatch.setenv(precision.DTYPE_ENV, "auto")
    assert pick_device_dtype("cpu")[1] == torch.bfloat16
    assert pick_device_dtype("cpu", "float32")[1] == torch.float32  # the caller's choice wins over the variable
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: 0.2)  # an AVX2 CPU: oneDNN emulates bf16
    assert pick_device_dtype("cpu")[1] == torch.float32
    assert pick_device_dtype("cpu", "auto")[1] == torch.float32
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        pick_device_dtype("cpu", "fp8")
    monkeypatch.setenv(precision.DTYPE_ENV, "half")
    with pytest.raises(ModelLoadError, match="EDGE_UNISD_COMPUTE_DTYPE='half': use one of auto, float32, bfloat16"):
        pick_device_dtype("cpu")


def test_bundled_gguf_resolves_with_a_fingerprint():
    source = resolve_base(None)
    assert source.kind == "gguf" and source.path.name.endswith(".gguf") and len(source.fingerprint) == 64


def test_hf_folder_base_loads_frozen(tmp_path, tokenizer):
    model = make_tiny_llama(len(tokenizer))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = load_base(tmp_path)
    assert loaded.source.kind == "hf" and loaded.dtype == torch.float32
    assert not any(p.requires_grad for p in loaded.model.parameters())
    peft = attach_lora(loaded.model, rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    params = lora_parameters(peft, "default")
    assert params and all(p.requires_grad for p in params.values())
    assert all(("q_proj" in k or "v_proj" in k) for k in params)


def test_reference_nll_is_the_mean_token_nll_of_the_answer(tokenizer, tiny_model):
    items = [Item(id="a", messages=({"role": "user", "content": "Dog?"},), reference="Biscuit."),
             Item(id="b", messages=({"role": "user", "content": "City?"},), reference="Gothenburg, Sweden."),
             Item(id="c", messages=({"role": "user", "content": "No reference"},))]
    got = reference_nll(tiny_model, tokenizer, items, batch_size=1)
    total, count = 0.0, 0
    for it in items[:2]:
        packed = pack_completions([tokenizer(it.reference, add_special_tokens=False)["input_ids"]], 2, 2)
        with torch.no_grad():
            h = completion_hidden(tiny_model, [render_prompt(tokenizer, it.messages)], packed, 2)
            nll = masked_nll(tiny_model.get_output_embeddings()(h), packed.completion_ids, packed.completion_mask)
        n = int(packed.completion_mask.sum())
        total, count = total + float(nll) * n, count + n
    assert got["items"] == 2 and got["tokens"] == count
    assert got["nll"] == pytest.approx(total / count, rel=1e-5)


def test_retention_is_zero_for_an_untouched_adapter_and_grows_with_a_harmful_one(tokenizer):
    model = attach_lora(make_tiny_llama(len(tokenizer), init_std=0.1), rank=4, alpha=8, dropout=0.0,
                        target_modules="all-linear")
    prompts = ["What is two plus two?", "Name a colour."]
    assert retention(model, tokenizer, prompts, max_new_tokens=6)["jsd"] == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        for p in lora_parameters(model, "default").values():
            p.normal_(0, 0.5)
    harmed = retention(model, tokenizer, prompts, max_new_tokens=6)
    assert 0.01 < harmed["jsd"] <= math.log(2) + 1e-6
