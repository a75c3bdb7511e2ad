"""The fused LoRA forward computes what PEFT computes (values and gradients) and steps aside when it must."""

from __future__ import annotations

import copy

import pytest
import torch

from edge_unisd.lora_fused import fuse_lora_layers, fused_lora_forward
from edge_unisd.modeling import attach_lora
from edge_unisd.teacher import EmaAdapter
from tests.conftest import make_tiny_llama

IDS = torch.tensor([[1, 5, 9, 12, 40, 7], [3, 3, 8, 60, 2, 11]])


def _peft_model(alpha: float = 8.0, dropout: float = 0.0):
    model = attach_lora(make_tiny_llama(vocab_size=96, hidden=32), rank=4, alpha=alpha, dropout=dropout,
                        target_modules="all-linear")
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # a fresh B is zero: give the LoRA path something to compute
            torch.nn.init.normal_(p, std=0.05)
    return model


def _loss_and_grads(model):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=IDS).logits
    logits.logsumexp(-1).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads


@pytest.mark.parametrize("alpha", [8.0, 6.0])  # scale 2 (exact in floating point) and 1.5
def test_values_and_gradients_equal_peft(alpha):
    reference = _peft_model(alpha)
    fused = copy.deepcopy(reference)
    assert fuse_lora_layers(fused) == 14  # 2 layers x 7 linear layers (q, k, v, o, gate, up, down)
    ref_logits, ref_grads = _loss_and_grads(reference)
    logits, grads = _loss_and_grads(fused)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_disabled_adapter_and_other_active_adapter_follow_peft():
    reference = _peft_model()
    ema_ref = EmaAdapter(reference, decay=0.5)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if ".ema." in name and "lora_B" in name:
                p.add_(0.1)  # the EMA adapter differs from the student
    fused = copy.deepcopy(reference)
    fuse_lora_layers(fused)
    ema_fused = copy.copy(ema_ref)
    ema_fused.model = fused
    with torch.no_grad():
        with reference.disable_adapter():
            base_ref = reference(input_ids=IDS).logits
        with fused.disable_adapter():
            torch.testing.assert_close(fused(input_ids=IDS).logits, base_ref)
        reference.set_adapter("ema")
        fused.set_adapter("ema")
        ema_logits = fused(input_ids=IDS).logits
        torch.testing.assert_close(ema_logits, reference(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)
        fused.set_adapter("default")
        assert not torch.allclose(fused(input_ids=IDS).logits, ema_logits)  # the student is another adapter


def test_dropout_is_applied_in_training_and_not_in_eval():
    model = _peft_model(dropout=0.5)
    fuse_lora_layers(model)
    model.train()
    torch.manual_seed(0)
    a = model(input_ids=IDS).logits
    torch.manual_seed(1)
    b = model(input_ids=IDS).logits
    assert not torch.allclose(a, b)  # different dropout masks
    model.eval()
    reference = _peft_model(dropout=0.5).eval()
    torch.testing.assert_close(model(input_ids=IDS).logits, reference(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)


def test_is_idempotent_and_leaves_other_modules_alone():
    model = _peft_model()
    assert fuse_lora_layers(model) == fuse_lora_layers(model) == 14
    patched = [m for m in model.modules() if getattr(m.forward, "__func__", None) is fused_lora_forward]
    assert len(patched) == 14
    assert all(type(m).__name__ == "Linear" and hasattr(m, "lora_A") for m in patched)


def test_under_autocast_the_base_output_dtype_is_kept_as_peft_keeps_it():
    reference = _peft_model()
    fused = copy.deepcopy(reference)
    fuse_lora_layers(fused)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref_logits, logits = reference(input_ids=IDS).logits, fused(input_ids=IDS).logits
    assert logits.dtype == ref_logits.dtype
    torch.testing.assert_close(logits.float(), ref_logits.float(), rtol=2e-2, atol=2e-2)


def test_a_bf16_base_under_an_fp32_adapter_takes_the_fused_path_and_trains_the_fp32_weights(monkeypatch):
    """The CPU bf16 model (edge_unisd.precision): PEFT keeps the LoRA in fp32 and would copy every input to
    fp32; the fused path multiplies in bf16 instead, and the gradients land on the fp32 LoRA weights."""
    reference = _peft_model()
    reference.to(torch.bfloat16)
    for name, p in reference.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()  # as PEFT's autocast_adapter_dtype leaves them on a bf16 base
    fused = copy.deepcopy(reference)
    fuse_lora_layers(fused)
    ref_logits, ref_grads = _loss_and_grads(reference)
    lora_linear = type(next(m for m in fused.modules() if hasattr(m, "lora_A")))
    peft_forward, calls = lora_linear.forward, []
    monkeypatch.setattr(lora_linear, "forward", lambda *a, **k: calls.append(1) or peft_forward(*a, **k))
    logits, grads = _loss_and_grads(fused)
    assert not calls, "a bf16 base under an fp32 adapter must not fall back to PEFT's forward"
    assert logits.dtype == ref_logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), ref_logits.float(), rtol=2e-2, atol=2e-2)
    assert grads.keys() == ref_grads.keys() and grads
    for name in grads:
        assert grads[name].dtype == torch.float32, name
        g, r = grads[name], ref_grads[name]
        assert torch.linalg.vector_norm(g - r) <= 0.05 * torch.linalg.vector_norm(r), name
