"""CPU bf16 (edge_unisd.precision): chosen by measurement, an fp32 LM head, and a model that still learns."""

from __future__ import annotations

import math

import pytest
import torch

from edge_unisd import precision
from edge_unisd.modeling import attach_lora, load_base
from edge_unisd.vocab_grad import fused_distill_chunk, fused_token_logps_chunk
from tests.edge_unisd.test_trainer import context_gap_before_after

IDS = torch.tensor([[1, 5, 9, 12, 40, 7, 300, 2000]])


def test_the_probe_times_both_dtypes_once_a_process():
    speedup = precision.cpu_bf16_speedup()
    assert math.isfinite(speedup) and speedup > 0
    assert precision.cpu_bf16_speedup() == speedup  # cached: measured once


@pytest.mark.parametrize(("speedup", "expected"), [(4.3, torch.bfloat16), (1.9, torch.float32),
                                                   (0.2, torch.float32)])
def test_auto_takes_bf16_only_where_it_runs_well_above_fp32(monkeypatch, speedup, expected):
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: speedup)
    assert precision.cpu_compute_dtype("auto") == expected
    assert precision.cpu_compute_dtype("float32") == torch.float32
    assert precision.cpu_compute_dtype("bfloat16") == torch.bfloat16


def test_the_variable_is_validated_and_names_itself():
    assert precision.compute_dtype_choice({}) == "auto"
    assert precision.compute_dtype_choice({precision.DTYPE_ENV: " bfloat16 "}) == "bfloat16"
    with pytest.raises(ValueError, match="EDGE_UNISD_COMPUTE_DTYPE='fp8': use one of auto, float32, bfloat16"):
        precision.compute_dtype_choice({precision.DTYPE_ENV: "fp8"})


def test_a_bf16_cpu_model_keeps_an_untied_fp32_head_with_the_checkpoints_own_weights(tiny_folder):
    full = load_base(tiny_folder, device="cpu", dtype="float32").model
    half_loaded = load_base(tiny_folder, device="cpu", dtype="bfloat16")
    half = half_loaded.model
    assert half_loaded.dtype == torch.bfloat16
    head = half.get_output_embeddings()
    assert all(p.dtype == torch.bfloat16 for p in half.model.parameters())  # decoder and input embeddings
    assert head.weight.dtype == torch.float32 and head.weight is not half.model.embed_tokens.weight
    assert torch.equal(head.weight, full.get_output_embeddings().weight)  # the fp32 values, not bf16-rounded
    assert not head.weight.requires_grad
    with torch.no_grad():
        hidden = half.model(input_ids=IDS).last_hidden_state
        logits = half(input_ids=IDS).logits
        reference = full(input_ids=IDS).logits
    assert hidden.dtype == torch.bfloat16 and logits.dtype == torch.float32
    # the logits are the fp32 head's product of the bf16 hidden states: no bf16 rounding after the head
    torch.testing.assert_close(logits, hidden.float() @ head.weight.T)
    assert (logits - reference).abs().mean() < 0.05 * reference.std()
    out = half.generate(IDS, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, IDS.shape[1] + 3)


@pytest.mark.parametrize("kind", ["fkl", "jsd"])  # the closed-form chunk and the autograd one
def test_vocabulary_terms_of_bf16_hidden_states_are_computed_from_fp32_logits(kind):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False).requires_grad_(False)
    s_h = torch.randn(6, 16).bfloat16().requires_grad_(True)
    t_h = torch.randn(6, 16).bfloat16()
    tokens = torch.randint(0, 50, (6,))
    s32 = s_h.detach().float().requires_grad_(True)
    got = fused_distill_chunk(s_h, t_h, tokens, head, kind=kind, beta=0.5, temperature=1.0)
    want = fused_distill_chunk(s32, t_h.float(), tokens, head, kind=kind, beta=0.5, temperature=1.0)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w)
    (got[0].sum() + got[1].sum()).backward()
    (want[0].sum() + want[1].sum()).backward()
    assert s_h.grad.dtype == torch.bfloat16
    torch.testing.assert_close(s_h.grad.float(), s32.grad, rtol=1e-2, atol=1e-2)
    logps = fused_token_logps_chunk(s_h.detach(), tokens, head)
    torch.testing.assert_close(logps, fused_token_logps_chunk(s32.detach(), tokens, head))


def test_a_bf16_cpu_model_learns_what_the_context_teaches(tiny_folder, tokenizer):
    loaded = load_base(tiny_folder, device="cpu", dtype="bfloat16")
    model = attach_lora(loaded.model, rank=8, alpha=16, dropout=0.0, target_modules="all-linear")
    lora = [p for n, p in model.named_parameters() if p.requires_grad]
    assert lora and all(p.dtype == torch.float32 for p in lora)  # the adapter trains in fp32
    gap_before, gap_after = context_gap_before_after(model, tokenizer, gradient_checkpointing=True)
    assert all(p.dtype == torch.float32 for p in lora)
    assert gap_before > 0.05, "the context must matter for the test to mean anything"
    assert gap_after <= 0.5 * gap_before, (gap_before, gap_after)
