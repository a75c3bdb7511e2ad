"""CPU bf16 (edge_unisd.precision): chosen by measurement, fp32 loss maths on bf16 logits, a model that learns."""

from __future__ import annotations

import math

import pytest
import torch

from edge_unisd import precision
from edge_unisd.losses import divergence_from_logps
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


def test_a_bf16_cpu_model_is_bf16_throughout_and_close_to_the_fp32_one(tiny_folder):
    full = load_base(tiny_folder, device="cpu", dtype="float32").model
    half_loaded = load_base(tiny_folder, device="cpu", dtype="bfloat16")
    half = half_loaded.model
    assert half_loaded.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in half.parameters())
    assert half.get_output_embeddings().weight is half.model.embed_tokens.weight  # still tied
    with torch.no_grad():
        logits, reference = half(input_ids=IDS).logits.float(), full(input_ids=IDS).logits
    assert (logits - reference).abs().mean() < 0.05 * reference.std()
    out = half.generate(IDS, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, IDS.shape[1] + 3)


@pytest.mark.parametrize("kind", ["fkl", "jsd"])  # the closed-form chunk and the autograd one
def test_vocabulary_terms_of_a_bf16_head_equal_the_fp32_maths_on_its_bf16_logits(kind):
    """The chunk upcasts the bf16 logits and takes every softmax and divergence in fp32: the same values and
    gradients as autograd through the full-vocabulary computation on those logits."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False).requires_grad_(False).to(torch.bfloat16)
    s_h = torch.randn(6, 16).bfloat16().requires_grad_(True)
    t_h = torch.randn(6, 16).bfloat16()
    tokens = torch.randint(0, 50, (6,))
    div, s_tok, t_tok, _ = fused_distill_chunk(s_h, t_h, tokens, head, kind=kind, beta=0.5, temperature=1.0)
    assert div.dtype == s_tok.dtype == torch.float32
    (div.sum() + s_tok.sum()).backward()
    ref_h = s_h.detach().clone().requires_grad_(True)
    s_logp = torch.log_softmax(head(ref_h).float(), -1)
    t_logp = torch.log_softmax(head(t_h).float(), -1)
    ref_div = divergence_from_logps(s_logp[None], t_logp[None], kind, 0.5)[0]
    ref_tok = s_logp.gather(-1, tokens[:, None])[:, 0]
    torch.testing.assert_close(div, ref_div)
    torch.testing.assert_close(s_tok, ref_tok)
    torch.testing.assert_close(t_tok, t_logp.gather(-1, tokens[:, None])[:, 0])
    (ref_div.sum() + ref_tok.sum()).backward()
    assert s_h.grad.dtype == torch.bfloat16
    torch.testing.assert_close(s_h.grad.float(), ref_h.grad.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(fused_token_logps_chunk(s_h.detach(), tokens, head), ref_tok.detach())


def test_a_bf16_cpu_model_learns_what_the_context_teaches(tiny_folder, tokenizer):
    loaded = load_base(tiny_folder, device="cpu", dtype="bfloat16")
    model = attach_lora(loaded.model, rank=8, alpha=16, dropout=0.0, target_modules="all-linear")
    lora = [p for n, p in model.named_parameters() if p.requires_grad]
    assert lora and all(p.dtype == torch.float32 for p in lora)  # the adapter trains in fp32
    gap_before, gap_after = context_gap_before_after(model, tokenizer, gradient_checkpointing=True)
    assert all(p.dtype == torch.float32 for p in lora)
    assert gap_before > 0.05, "the context must matter for the test to mean anything"
    assert gap_after <= 0.5 * gap_before, (gap_before, gap_after)
