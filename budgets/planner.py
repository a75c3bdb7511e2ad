"""Spend a round's budget: which items train, how many steps, and which items earn the K auxiliary views.

The rules (METHOD.md, "multi-teacher agreement ... reserved for high-uncertainty items"):
1. New items first, then a replay share of older ones, least recently trained first, against
   forgetting: replay makes up about `replay_share` of the planned items.
2. Every planned item gets the cheap path (rollout, EMA teacher, clipped divergence, student step).
   As many items as the budget covers, after `max_items` and the memory ceiling.
3. What the budget has left buys K auxiliary views for the most uncertain planned items, in
   descending uncertainty, unknown uncertainty last, as many as fit. Nothing left: no views.
The plan's predicted cost never exceeds the budget: every choice is checked with the same
`CostModel.predict` the plan reports.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from budgets.cost_model import CostModel
from budgets.gates import format_bytes


@dataclass(frozen=True)
class Candidate:
    id: str
    is_new: bool  # never trained on
    uncertainty: float | None = None  # from the trainer's cheap path (e.g. mean divergence); None: unknown
    last_trained: datetime | None = None  # None on an old item: treated as the least recently trained


@dataclass(frozen=True)
class RoundPlan:
    item_ids: list[str]  # new items first, then replay
    view_item_ids: list[str]  # subset of item_ids, most uncertain first
    steps: int
    predicted_seconds: float
    breakdown: dict[str, float] = field(default_factory=dict)
    budget_seconds: float = 0.0
    batch_size: int = 1  # items per optimizer step; lower than asked when the memory ceiling requires it
    K: int = 0
    completion_tokens: float = 0.0
    n_new: int = 0
    n_replay: int = 0
    note: str = ""  # why the plan is smaller than the candidates, if it is

    @property
    def n_view_items(self) -> int:
        return len(self.view_item_ids)

    def summary(self) -> str:
        """One line for the log and `status`: what the budget buys."""
        if not self.item_ids:
            return f"empty plan: {self.note or 'no candidates'}"
        parts = ", ".join(f"{k} {v:.1f}s" for k, v in self.breakdown.items() if v > 0)
        text = (f"{len(self.item_ids)} items ({self.n_new} new, {self.n_replay} replay) in "
                f"{self.steps} steps of {self.batch_size}; K={self.K} views for {self.n_view_items}; "
                f"predicted {self.predicted_seconds:.1f}s of {self.budget_seconds:.1f}s budget [{parts}]")
        return f"{text}; {self.note}" if self.note else text


def most_uncertain(item_ids: Sequence[str], uncertainty: Mapping[str, float | None], n: int) -> list[str]:
    """The `n` ids with the highest uncertainty; unknown (None, NaN) last; ties keep `item_ids` order.

    Public so the trainer can re-rank with the uncertainties its cheap pass just measured and
    keep the plan's count (the cost depends on how many items get views, not which).
    """
    def key(pair: tuple[int, str]) -> tuple[int, float, int]:
        i, item_id = pair
        u = uncertainty.get(item_id)
        known = u is not None and not math.isnan(u)
        return (0 if known else 1, -u if known else 0.0, i)

    return [item_id for _, item_id in sorted(enumerate(item_ids), key=key)[:max(0, n)]]


def plan_round(candidates: Sequence[Candidate], budget_seconds: float, cost_model: CostModel, *,
               batch_size: int, K: int, completion_tokens: float, replay_share: float = 0.25,
               max_items: int | None = None, memory_ceiling_bytes: int | None = None,
               bytes_per_item: int | None = None) -> RoundPlan:
    """Plan one round within `budget_seconds` (seconds, e.g. a window's remaining time).

    `completion_tokens` is the expected completion length per item (e.g. max_new_tokens).
    `memory_ceiling_bytes` / `bytes_per_item` bound the items per optimizer step (the batch,
    whose activations dominate peak memory): the plan's `batch_size` may be smaller than asked.
    """
    _check_args(candidates, budget_seconds, batch_size, K, completion_tokens, replay_share, max_items,
                memory_ceiling_bytes, bytes_per_item)
    budget = max(0.0, float(budget_seconds))
    empty = dict(steps=0, predicted_seconds=0.0, budget_seconds=budget, batch_size=batch_size, K=K,
                 completion_tokens=completion_tokens)

    # --- batch size under the memory ceiling
    if memory_ceiling_bytes is not None and bytes_per_item is not None:
        fits = memory_ceiling_bytes // bytes_per_item
        if fits < 1:
            why = (f"one item needs {format_bytes(bytes_per_item)}, more than the memory ceiling "
                   f"{format_bytes(memory_ceiling_bytes)}")
            return RoundPlan([], [], note=why, **empty)
        batch_size = min(batch_size, fits)
        empty["batch_size"] = batch_size

    def cost(n: int, v: int) -> float:
        return cost_model.predict(n, completion_tokens, v, K, math.ceil(n / batch_size)).seconds

    # --- cheap path for as many items as the budget covers
    new = [c for c in candidates if c.is_new]
    old = sorted((c for c in candidates if not c.is_new), key=_least_recent_first)
    cap = len(new) + len(old) if max_items is None else min(max_items, len(new) + len(old))
    n_cheap = n = _largest(cap, lambda k: cost(k, 0) <= budget)
    if n == 0:
        if not candidates or cap == 0:
            why = "no candidates" if not candidates else "max_items is 0"
        else:
            why = f"budget {budget:.1f}s is less than one item ({cost(1, 0):.1f}s)"
        return RoundPlan([], [], note=why, **empty)
    n_new, n_old = _split(n, len(new), len(old), replay_share)
    planned = new[:n_new] + old[:n_old]
    n = len(planned)

    # --- leftover budget buys K views for the most uncertain
    v = 0 if K == 0 else _largest(n, lambda k: cost(n, k) <= budget)
    views = most_uncertain([c.id for c in planned], {c.id: c.uncertainty for c in planned}, v)

    steps = math.ceil(n / batch_size)
    pred = cost_model.predict(n, completion_tokens, v, K, steps)
    notes = []
    if n_cheap < len(candidates):
        limit = "max_items" if n_cheap == cap < len(candidates) else "budget"
        notes.append(f"{limit} allows {n_cheap} of {len(candidates)} candidates")
    if K and v < n:
        notes.append(f"views for {v} of {n} items")
    return RoundPlan(item_ids=[c.id for c in planned], view_item_ids=views, steps=steps,
                     predicted_seconds=pred.seconds, breakdown=pred.breakdown, budget_seconds=budget,
                     batch_size=batch_size, K=K, completion_tokens=completion_tokens, n_new=n_new,
                     n_replay=n_old, note="; ".join(notes))


def _split(n: int, n_new_avail: int, n_old_avail: int, share: float) -> tuple[int, int]:
    """(new, replay) for n slots: all new items if they fit with their replay share, else share of n."""
    want_old = round(n_new_avail * share / (1.0 - share))
    if n_new_avail + min(n_old_avail, want_old) <= n:
        return n_new_avail, min(n_old_avail, want_old)
    n_old = min(n_old_avail, round(share * n))
    return min(n_new_avail, n - n_old), n_old


def _largest(upper: int, ok) -> int:
    """Largest k in [0, upper] with ok(k), for ok monotone (true then false); 0 if only ok(0) or none."""
    lo, hi = 0, upper
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _least_recent_first(c: Candidate) -> tuple[int, float]:
    # timestamp() copes with naive (local) and aware datetimes alike; None sorts first.
    return (0, 0.0) if c.last_trained is None else (1, c.last_trained.timestamp())


def _check_args(candidates: Sequence[Candidate], budget: float, batch_size: int, K: int,
                completion_tokens: float, replay_share: float, max_items: int | None, ceiling: int | None,
                per_item: int | None) -> None:
    if math.isnan(budget):
        raise ValueError("budget_seconds is NaN")
    if batch_size < 1 or K < 0 or max_items is not None and max_items < 0:
        raise ValueError(f"need batch_size >= 1, K >= 0, max_items >= 0 (got {batch_size}, {K}, {max_items})")
    if not (completion_tokens > 0 and math.isfinite(completion_tokens)):
        raise ValueError(f"completion_tokens must be a positive number (got {completion_tokens})")
    if not 0.0 <= replay_share < 1.0:
        raise ValueError(f"replay_share must be in [0, 1) (got {replay_share})")
    if (ceiling is None) != (per_item is None):
        raise ValueError("give both memory_ceiling_bytes and bytes_per_item, or neither")
    if per_item is not None and (per_item <= 0 or ceiling < 0):
        raise ValueError(f"bytes_per_item must be > 0 and memory_ceiling_bytes >= 0 "
                         f"(got {per_item}, {ceiling})")
    ids = [c.id for c in candidates]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"candidate id {dup!r} appears more than once")
