"""The evaluation gate: measure a candidate adapter on held-out items and decide whether it replaces the last.

Metrics (METHOD.md, "Metrics"), all without gradient and through the chunked vocabulary path:
- reference fit: mean NLL per token of held-out gold answers given the bare prompt (no profile,
  no context). Lower is better. Held-out items are never trained on (the store keeps them out).
- retention: per-token JSD(β=½) between the base and the adapted model on the adapted model's
  greedy answers to general prompts, in [0, log 2]; 0 means unchanged. Also log p_base(y_adapted|x),
  and, when the last promoted adapter is loaded beside the candidate, the JSD against it (drift).
- task accuracy: greedy answers of held-out items that have a check, checked with
  `sample_data.answer_is_correct`. Reported, not gated: few items have checks.

The gate promotes only if fit improves or holds within `fit_tolerance` nats/token and retention
JSD stays within `max_retention_jsd`. Without held-out references fit cannot be measured; the
verdict then rests on retention alone and says so.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from edge_unisd.eval import reference_nll
from edge_unisd.items import Item
from edge_unisd.rollout import generate_completions
from edge_unisd.sample_data import answer_is_correct
from edge_unisd.scoring import chunked_distill_terms, completion_hidden, lm_head_of
from edge_unisd.views import render_prompt

DEFAULT_MAX_RETENTION_JSD = 0.1  # nats/token, of log 2 ≈ 0.693 at most
DEFAULT_FIT_TOLERANCE = 0.02  # nats/token a new version may lose on held-out fit and still pass


@dataclass(frozen=True)
class EvalSettings:
    """What evaluation costs and where the gate's bars sit. Defaults suit the bundled 135M model on CPU."""

    general_prompts: int = 8  # retention prompts used (the first n of the fixed list)
    max_heldout_items: int = 64  # the newest n held-out items: evaluation cost stays flat as data grows
    retention_new_tokens: int = 24  # greedy answer length scored for retention
    accuracy_new_tokens: int = 32  # greedy answer length checked for task accuracy
    max_retention_jsd: float = DEFAULT_MAX_RETENTION_JSD
    fit_tolerance: float = DEFAULT_FIT_TOLERANCE
    batch_size: int = 8

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GateVerdict:
    promote: bool
    reason: str  # one line, shown in `status` and stored with the version

    def to_dict(self) -> dict[str, Any]:
        return {"promote": self.promote, "reason": self.reason}


# --- metrics -------------------------------------------------------------------------------------

def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


@contextlib.contextmanager
def _base_weights(model) -> Iterator[None]:
    """The base: every adapter off (a plain model has none to turn off)."""
    with model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext():
        yield


@contextlib.contextmanager
def _adapter(model, name: str) -> Iterator[None]:
    """Compute with adapter `name` instead of the active one, then switch back."""
    previous = model.active_adapter
    model.set_adapter(name)
    try:
        yield
    finally:
        model.set_adapter(previous)


@torch.no_grad()
def retention(model, tokenizer, prompts: Sequence[str], *, compare_adapter: str | None = None,
              max_new_tokens: int = 24, batch_size: int = 8) -> dict[str, Any]:
    """JSD(½) base vs adapted per token (and vs `compare_adapter`, if given) on the adapted model's greedy
    answers to `prompts`; mean log p_base(answer token). One generation serves every comparison."""
    if not prompts:
        return {"jsd": 0.0, "base_logp": None, "drift_jsd": None, "tokens": 0}
    model.eval()
    pad, head = _pad_id(tokenizer), lm_head_of(model)
    jsd = logp = drift = 0.0
    count = 0
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        ids = [render_prompt(tokenizer, [{"role": "user", "content": p}]) for p in batch]
        rollout = generate_completions(model, tokenizer, ids, max_new_tokens=max_new_tokens, temperature=0.0)
        m_B_L = rollout.completion_mask
        adapted_h = completion_hidden(model, ids, rollout, pad)  # (B, L, H)
        with _base_weights(model):
            base_h = completion_hidden(model, ids, rollout, pad)
        terms = chunked_distill_terms(adapted_h, base_h, head, rollout.completion_ids, kind="jsd", beta=0.5)
        jsd += float((terms.divergence * m_B_L).sum())
        logp += float((terms.teacher_logps * m_B_L).sum())
        if compare_adapter is not None:
            with _adapter(model, compare_adapter):
                other_h = completion_hidden(model, ids, rollout, pad)
            other = chunked_distill_terms(adapted_h, other_h, head, rollout.completion_ids, kind="jsd",
                                          beta=0.5)
            drift += float((other.divergence * m_B_L).sum())
        count += int(m_B_L.sum())
    n = max(1, count)
    # a JSD is >= 0; float rounding can leave -1e-9 for identical distributions
    return {"jsd": max(0.0, jsd / n), "base_logp": logp / n,
            "drift_jsd": max(0.0, drift / n) if compare_adapter else None, "tokens": count}


@torch.no_grad()
def task_accuracy(model, tokenizer, items: Sequence[Item], checks: Mapping[str, list[str]], *,
                  max_new_tokens: int = 32, batch_size: int = 8) -> dict[str, Any]:
    """Share of `items` with a check whose greedy answer (bare prompt) contains every keyword."""
    checked = [it for it in items if checks.get(it.id)]
    if not checked:
        return {"accuracy": None, "items": 0}
    model.eval()
    correct = 0
    for start in range(0, len(checked), batch_size):
        batch = checked[start:start + batch_size]
        ids = [render_prompt(tokenizer, it.messages) for it in batch]
        rollout = generate_completions(model, tokenizer, ids, max_new_tokens=max_new_tokens, temperature=0.0)
        for b, it in enumerate(batch):
            n = int(rollout.completion_mask[b].sum())
            text = tokenizer.decode(rollout.completion_ids[b, :n].tolist(), skip_special_tokens=True)
            correct += answer_is_correct(text, checks[it.id])
    return {"accuracy": correct / len(checked), "items": len(checked)}


def evaluate(model, tokenizer, heldout_items: Sequence[Item], general_prompts: Sequence[str],
             checks: Mapping[str, list[str]] | None = None, *, compare_adapter: str | None = None,
             settings: EvalSettings | None = None) -> dict[str, Any]:
    """Every gate metric of the model as it is now (its active adapter). JSON-ready; unmeasurable -> None."""
    s = settings or EvalSettings()
    fit = reference_nll(model, tokenizer, heldout_items, batch_size=s.batch_size)
    ret = retention(model, tokenizer, list(general_prompts)[:s.general_prompts],
                    compare_adapter=compare_adapter, max_new_tokens=s.retention_new_tokens,
                    batch_size=s.batch_size)
    acc = task_accuracy(model, tokenizer, heldout_items, checks or {}, max_new_tokens=s.accuracy_new_tokens,
                        batch_size=s.batch_size)
    return {
        "fit_nll": _finite_or_none(fit["nll"]) if fit["items"] else None,
        "fit_items": fit["items"], "fit_tokens": fit["tokens"],
        "retention_jsd": ret["jsd"], "retention_base_logp": ret["base_logp"],
        "retention_tokens": ret["tokens"],
        "drift_jsd": ret["drift_jsd"],
        "accuracy": acc["accuracy"], "accuracy_items": acc["items"],
    }


# --- the gate ------------------------------------------------------------------------------------

def gate(before: Mapping[str, Any], after: Mapping[str, Any], *, max_retention_jsd: float,
         fit_tolerance: float) -> GateVerdict:
    """Promote iff held-out fit improves or holds (after <= before + tolerance) and retention JSD <= bound.

    `before` is the current version's metrics (the base's before the first promotion), `after` the
    candidate's, both from `evaluate`. A non-finite metric of the candidate is a rejection.
    """
    failures: list[str] = []
    notes: list[str] = []
    fit_b, fit_a = before.get("fit_nll"), after.get("fit_nll")
    if fit_a is not None and not math.isfinite(fit_a):
        failures.append("held-out fit is not a finite number")
    elif fit_a is None or fit_b is None:
        notes.append("fit not measured (no held-out items with a reference answer)")
    else:
        delta = fit_a - fit_b
        text = f"held-out fit {fit_b:.3f} -> {fit_a:.3f} nats/token ({delta:+.3f})"
        if delta > fit_tolerance:
            failures.append(f"{text} worse than the tolerance {fit_tolerance:g}")
        else:
            notes.append(text)
    jsd = after.get("retention_jsd")
    if jsd is None or not math.isfinite(jsd):
        failures.append("retention JSD is not a finite number")
    elif jsd > max_retention_jsd:
        failures.append(f"retention JSD vs base {jsd:.4f} > bound {max_retention_jsd:g}")
    else:
        notes.append(f"retention JSD vs base {jsd:.4f} <= {max_retention_jsd:g}")
    if failures:
        return GateVerdict(False, "rejected: " + "; ".join(failures))
    return GateVerdict(True, "promoted: " + "; ".join(notes))
