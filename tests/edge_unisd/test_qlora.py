"""QLoRA (`quantization="nf4"`): a 4-bit base that trains LoRA, teaches with the adapter off, and merges
into the full-precision base for export. Run on CPU with a tiny random llama (bitsandbytes' CPU path)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from adapters.merge import is_quantized, merge_adapter
from edge_unisd.modeling import ModelLoadError, attach_lora, load_base
from tests.edge_unisd.test_trainer import context_gap_before_after

pytest.importorskip("bitsandbytes")


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_nf4_base_holds_4bit_linears_and_stays_close_to_the_full_precision_one(tiny_folder, tokenizer):
    import bitsandbytes as bnb

    full = load_base(tiny_folder, device="cpu", dtype="float32")
    nf4 = load_base(tiny_folder, device="cpu", dtype="float32", quantization="nf4")
    assert nf4.quantization == "nf4" and full.quantization == "none"
    linears = [m for n, m in nf4.model.named_modules() if n.startswith("model.layers.") and
               isinstance(m, torch.nn.Linear)]
    assert len(linears) == 2 * 7 and all(isinstance(m, bnb.nn.Linear4bit) for m in linears)
    assert not isinstance(nf4.model.lm_head, bnb.nn.Linear4bit)  # the head stays full precision
    assert is_quantized(nf4.model) and not is_quantized(full.model)
    assert nf4.model.get_memory_footprint() < full.model.get_memory_footprint()
    assert not any(p.requires_grad for p in nf4.model.parameters())
    ids = torch.tensor([tokenizer.encode("The quick brown fox jumps over the lazy dog.")])
    a, b = _logits(full.model, ids), _logits(nf4.model, ids)
    assert not torch.equal(a, b), "the weights must really be quantised"
    # 4-bit rounding moves the logits a little, far less than their own spread
    assert (a - b).abs().mean() < 0.25 * a.std(), ((a - b).abs().mean(), a.std())


def test_qlora_learns_what_the_context_teaches(tiny_folder, tokenizer):
    loaded = load_base(tiny_folder, device="cpu", dtype="float32", quantization="nf4")
    model = attach_lora(loaded.model, rank=8, alpha=16, dropout=0.0, target_modules="all-linear")
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    gap_before, gap_after = context_gap_before_after(model, tokenizer, gradient_checkpointing=True)
    assert gap_before > 0.05, "the context must matter for the test to mean anything"
    assert gap_after <= 0.5 * gap_before, (gap_before, gap_after)


def test_a_qlora_adapter_merges_into_the_full_precision_base(tiny_folder, tokenizer, tmp_path):
    loaded = load_base(tiny_folder, device="cpu", dtype="float32", quantization="nf4")
    model = attach_lora(loaded.model, rank=8, alpha=16, dropout=0.0, target_modules="all-linear")
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)  # an adapter that clearly changes the output
    model.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([tokenizer.encode("Where do I live? Gothenburg.")])
    qlora = _logits(model, ids)
    merged = merge_adapter(loaded, tmp_path / "adapter")  # the nf4 model is not a merge target: reloaded in fp32
    assert not is_quantized(merged.model)
    assert next(merged.model.parameters()).dtype == torch.float32
    out = _logits(merged.model, ids)
    base = _logits(load_base(tiny_folder, device="cpu", dtype="float32").model, ids)
    # the merged model carries the adapter (far from the base) up to the base's nf4 rounding
    assert (out - qlora).abs().mean() < 0.25 * (out - base).abs().mean()


def test_unknown_or_unavailable_quantization_is_a_clear_error(tiny_folder, monkeypatch):
    with pytest.raises(ModelLoadError, match="base quantization 'int3': use one of none, nf4"):
        load_base(tiny_folder, device="cpu", quantization="int3")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ModelLoadError, match=r"needs bitsandbytes: pip install 'edge-unisd\[gpu\]'"):
        load_base(tiny_folder, device="cpu", quantization="nf4")


def test_a_cpu_nf4_base_lets_go_of_the_checkpoint_file(tiny_folder):
    """Its full-precision parameters are copied out of the safetensors map, so the fp32 pages can go."""
    import psutil

    loaded = load_base(tiny_folder, device="cpu", dtype="float32", quantization="nf4")
    model = loaded.model
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    checkpoint = str(tiny_folder / "model.safetensors")
    assert not [m for m in psutil.Process().memory_maps(grouped=False) if m.path == checkpoint]


def test_a_cpu_nf4_base_computes_the_same_in_eval_and_in_training(tiny_folder, tokenizer):
    """Teacher forwards (eval, no grad) and student forwards (training) must see the same 4-bit weights.

    bitsandbytes repacks a CPU Linear4bit on its first eval no-grad forward where the CPU has AVX512-BF16
    (scales rounded to bf16; a crash below its 64-wide block); load_base pins that off on every layer.
    """
    import bitsandbytes as bnb

    model = load_base(tiny_folder, device="cpu", dtype="float32", quantization="nf4").model
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
    ids = torch.tensor([tokenizer.encode("Where do I live? Gothenburg.")])
    teacher = _logits(model, ids)  # eval, no grad: where the repacking would happen
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    model.train()
    student = model(input_ids=ids).logits.float().detach()
    model.eval()
    torch.testing.assert_close(student, teacher)
