"""Metrics from the paper: reference-completion fit, distributional retention, and the distillation gap.

All of them run with no gradient and through the chunked vocabulary path, so evaluating never
needs more memory than training.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch

from edge_unisd.items import Item
from edge_unisd.rollout import Rollout, eos_token_ids, generate_completions, pack_completions
from edge_unisd.scoring import chunked_distill_terms, chunked_token_logps, completion_hidden, lm_head_of
from edge_unisd.views import primary_context, render_prompt


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _batches(seq: Sequence, size: int):
    for start in range(0, len(seq), size):
        yield seq[start:start + size]


def _adapter_off(model):
    """Context running the base weights: the adapter disabled, or nothing to disable."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()


@torch.no_grad()
def reference_nll(model, tokenizer, items: Sequence[Item], *, batch_size: int = 8,
                  chunk_tokens: int = 128) -> dict[str, float]:
    """Mean NLL per token of each item's reference answer given the bare prompt (no context). Lower is better."""
    scored = [it for it in items if it.reference]
    if not scored:
        return {"nll": float("nan"), "tokens": 0, "items": 0}
    model.eval()
    pad, eos = _pad_id(tokenizer), eos_token_ids(model, tokenizer)[0]
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in _batches(scored, batch_size):
        prompts = [render_prompt(tokenizer, it.messages) for it in batch]
        answers = [tokenizer(it.reference, add_special_tokens=False)["input_ids"] for it in batch]
        packed = pack_completions(answers, pad, eos, device)
        h = completion_hidden(model, prompts, packed, pad)
        logps = chunked_token_logps(h, lm_head_of(model), packed.completion_ids, chunk_tokens=chunk_tokens)
        total += float(-(logps * packed.completion_mask).sum())
        count += int(packed.completion_mask.sum())
    return {"nll": total / max(1, count), "tokens": count, "items": len(scored)}


@torch.no_grad()
def retention(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 32, batch_size: int = 8,
              chunk_tokens: int = 128) -> dict[str, float]:
    """Per-token JSD(β=½) base vs adapted on the adapted model's greedy answers to general prompts
    (in [0, log 2]; 0 = unchanged), and the mean log p_base(y_adapted | x) per token."""
    if not prompts:
        return {"jsd": 0.0, "base_logp": float("nan"), "tokens": 0}
    model.eval()
    pad = _pad_id(tokenizer)
    head = lm_head_of(model)
    jsd_sum, logp_sum, count = 0.0, 0.0, 0
    for batch in _batches(list(prompts), batch_size):
        ids = [render_prompt(tokenizer, [{"role": "user", "content": p}]) for p in batch]
        rollout = generate_completions(model, tokenizer, ids, max_new_tokens=max_new_tokens, temperature=0.0)
        adapted_h = completion_hidden(model, ids, rollout, pad)
        with _adapter_off(model):
            base_h = completion_hidden(model, ids, rollout, pad)
        terms = chunked_distill_terms(adapted_h, base_h, head, rollout.completion_ids, kind="jsd", beta=0.5,
                                      chunk_tokens=chunk_tokens)
        m = rollout.completion_mask
        jsd_sum += float((terms.divergence * m).sum())
        logp_sum += float((terms.teacher_logps * m).sum())
        count += int(m.sum())
    return {"jsd": jsd_sum / max(1, count), "base_logp": logp_sum / max(1, count), "tokens": count}


@torch.no_grad()
def sample_completions(model, tokenizer, items: Sequence[Item], *, max_new_tokens: int = 32,
                       temperature: float = 0.0, seed: int = 0) -> Rollout:
    """The model's own completions of the bare prompts, to score a fixed set of tokens before and after."""
    prompts = [render_prompt(tokenizer, it.messages) for it in items]
    return generate_completions(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                temperature=temperature, seed=seed)


@torch.no_grad()
def distillation_gap(model, tokenizer, items: Sequence[Item], rollout: Rollout, *, profile: str | None = None,
                     teacher: str = "base", chunk_tokens: int = 128) -> float:
    """Mean per-token KL(p_teacher(·|c_0, x, y<t) || p_student(·|x, y<t)) on fixed completions.

    This is what self-distillation minimises: how far the student without context still is from
    the teacher with it. `teacher="base"` compares against the unadapted model with context.
    """
    model.eval()
    pad = _pad_id(tokenizer)
    student_prompts = [render_prompt(tokenizer, it.messages) for it in items]
    teacher_prompts = [render_prompt(tokenizer, it.messages, primary_context(it, profile)) for it in items]
    student_h = completion_hidden(model, student_prompts, rollout, pad)
    ctx = _adapter_off(model) if teacher == "base" else nullcontext()
    with ctx:
        teacher_h = completion_hidden(model, teacher_prompts, rollout, pad)
    terms = chunked_distill_terms(student_h, teacher_h, lm_head_of(model), rollout.completion_ids, kind="fkl",
                                  chunk_tokens=chunk_tokens)
    m = rollout.completion_mask
    return float((terms.divergence * m).sum() / m.sum().clamp_min(1))
