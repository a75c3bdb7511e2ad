"""What a round costs on *this* machine, measured, not guessed: seconds per completion token per stage.

The trainer logs each optimizer step as a measurement:

    {"stage_seconds": {"rollout": s, "teacher": s, "student": s, "views": s, "optimizer": s, "ema": s},
     "tokens": {"completion": n, "items": b, "view_items": k, "K": K},  # or "view_tokens": m
     "steps": 1}                                                          # optional, default 1

`completion` counts the completion tokens of all b items; a view forward costs per completion
token of its item, once per view, so a step scores `view_tokens = Σ_view items tokens × K`
(given directly, or estimated as completion / items × view_items × K). Rates are ratio
estimates, Σ seconds / Σ tokens, so the model predicts the total of its measurements exactly.
Stages it does not know (e.g. "negative") are folded into "other", per completion token.
A model that never saw a view forward estimates it at the primary teacher's rate and says so.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from budgets import sensors
from edge_unisd.atomic_io import atomic_write_json

TOKEN_STAGES = ("rollout", "teacher", "student", "view", "other")  # seconds per completion token
STEP_STAGES = ("optimizer", "ema")  # seconds per optimizer step
REQUIRED_STAGES = ("rollout", "teacher", "student")
_STAGE_ALIASES = {"views": "view"}
FORMAT = "edge-unisd-cost-model"
FORMAT_VERSION = 1


class CostModelError(ValueError):
    """A measurement or a stored cost model is unusable; the message says which and what to do."""


@dataclass(frozen=True)
class CostPrediction:
    seconds: float
    breakdown: dict[str, float]  # stage -> seconds; sums to `seconds`


@dataclass(frozen=True)
class CostModel:
    per_token: dict[str, float]  # TOKEN_STAGES -> seconds per completion token ("view": per token per view)
    per_step: dict[str, float]  # STEP_STAGES -> seconds per optimizer step
    fingerprint: dict[str, Any] = field(default_factory=dict)
    measured_at: datetime | None = None
    n_measurements: int = 0
    estimated: tuple[str, ...] = ()  # stages not measured, filled by an estimate

    # --- fitting

    @classmethod
    def from_measurements(cls, measurements: Sequence[Mapping[str, Any]], *,
                          fingerprint: Mapping[str, Any] | None = None,
                          measured_at: datetime | None = None) -> CostModel:
        if not measurements:
            raise CostModelError("no measurements: run the calibration probe at least once")
        sec = dict.fromkeys(TOKEN_STAGES + STEP_STAGES, 0.0)
        seen: set[str] = set()
        completion = view_tokens = steps = 0.0
        for i, m in enumerate(measurements):
            stage_seconds, tok, n_steps = _parse_measurement(m, i)
            vt = _view_tokens(tok, stage_seconds.get("view", 0.0), i)
            completion, view_tokens, steps = completion + tok["completion"], view_tokens + vt, steps + n_steps
            for stage, s in stage_seconds.items():
                sec[stage] += s
                seen.add(stage)
        missing = [s for s in REQUIRED_STAGES if s not in seen]
        if missing or completion <= 0:
            lacking = ", ".join(missing) or "completion tokens"
            raise CostModelError(f"measurements lack {lacking}: the probe must time rollout, teacher and "
                                 "student on at least one completion token")
        per_token = {s: sec[s] / completion for s in ("rollout", "teacher", "student", "other")}
        estimated = []
        if view_tokens > 0:
            per_token["view"] = sec["view"] / view_tokens
        else:  # a view forward is a no-grad teacher forward with a different context
            per_token["view"], estimated = per_token["teacher"], ["view"]
        per_step = {s: sec[s] / steps if steps > 0 else 0.0 for s in STEP_STAGES}
        estimated += [s for s in STEP_STAGES if s not in seen]
        return cls(per_token=per_token, per_step=per_step, fingerprint=dict(fingerprint or {}),
                   measured_at=measured_at or sensors.now(), n_measurements=len(measurements),
                   estimated=tuple(estimated))

    # --- prediction

    def predict(self, n_items: int, completion_tokens_per_item: float, n_view_items: int, K: int,
                steps: int) -> CostPrediction:
        """Seconds for a round: every item on the cheap path, `n_view_items` of them also through K views."""
        tokens = n_items * completion_tokens_per_item
        view_tokens = n_view_items * completion_tokens_per_item * K
        return self._predict_tokens(tokens, view_tokens, steps)

    def _predict_tokens(self, tokens: float, view_tokens: float, steps: float) -> CostPrediction:
        breakdown = {s: self.per_token[s] * tokens for s in ("rollout", "teacher", "student", "other")}
        breakdown["view"] = self.per_token["view"] * view_tokens
        breakdown.update({s: self.per_step[s] * steps for s in STEP_STAGES})
        return CostPrediction(seconds=math.fsum(breakdown.values()), breakdown=breakdown)

    def relative_error(self, measurement: Mapping[str, Any]) -> float:
        """|predicted - measured| / measured for one logged measurement (0 when both are 0)."""
        stage_seconds, tok, steps = _parse_measurement(measurement, 0)
        vt = _view_tokens(tok, stage_seconds.get("view", 0.0), 0)
        actual = math.fsum(stage_seconds.values())
        predicted = self._predict_tokens(tok["completion"], vt, steps).seconds
        if actual <= 0:
            return 0.0 if predicted <= 0 else math.inf
        return abs(predicted - actual) / actual

    def drifted(self, measurement: Mapping[str, Any], tolerance: float = 0.25) -> bool:
        """True when the machine no longer runs as measured (throttling, another model, new drivers)."""
        return self.relative_error(measurement) > tolerance

    def matches(self, fingerprint: Mapping[str, Any]) -> bool:
        """Whether this model was measured for the same machine and model; if not, recalibrate."""
        return dict(fingerprint) == self.fingerprint

    # --- storage

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": FORMAT_VERSION, "per_token_seconds": self.per_token,
                "per_step_seconds": self.per_step, "fingerprint": self.fingerprint,
                "measured_at": self.measured_at.isoformat() if self.measured_at else None,
                "n_measurements": self.n_measurements, "estimated": list(self.estimated)}

    def save(self, path: str | Path) -> Path:
        """Write atomically, 0600."""
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> CostModel:
        path = Path(path)
        fix = f"delete {path} and the daemon recalibrates"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CostModelError(f"{path}: not a readable cost model ({e}); {fix}") from None
        header = (data.get("format"), data.get("version")) if isinstance(data, dict) else None
        if header != (FORMAT, FORMAT_VERSION):
            raise CostModelError(f"{path}: not a {FORMAT} v{FORMAT_VERSION} file; {fix}")
        try:
            per_token = {s: float(data["per_token_seconds"][s]) for s in TOKEN_STAGES}
            per_step = {s: float(data["per_step_seconds"][s]) for s in STEP_STAGES}
            when = data.get("measured_at")
            return cls(per_token=per_token, per_step=per_step,
                       fingerprint=dict(data.get("fingerprint") or {}),
                       measured_at=datetime.fromisoformat(when) if when else None,
                       n_measurements=int(data.get("n_measurements", 0)),
                       estimated=tuple(data.get("estimated", ())))
        except (KeyError, TypeError, ValueError) as e:
            raise CostModelError(f"{path}: missing or bad field {e}; {fix}") from None


def cost_fingerprint(model: str, device: str = "cpu", **extra: Any) -> dict[str, Any]:
    """Machine plus what the caller runs on it (model, dtype, LoRA rank...): a change means recalibrate."""
    return {**sensors.machine_fingerprint(), "model": model, "device": device, **extra}


def calibrate(probe: Callable[[], Mapping[str, Any]], *, runs: int = 3, warmup: int = 1,
              fingerprint: Mapping[str, Any] | None = None) -> CostModel:
    """Run `probe` warmup + runs times (each returns one measurement) and fit on the last `runs`.

    The warm-up runs are dropped: first calls pay for allocator growth, kernel selection, caches.
    """
    if runs < 1 or warmup < 0:
        raise ValueError(f"calibrate needs runs >= 1 and warmup >= 0 (got runs={runs}, warmup={warmup})")
    for _ in range(warmup):
        probe()
    return CostModel.from_measurements([probe() for _ in range(runs)], fingerprint=fingerprint)


# --- measurement parsing

def _parse_measurement(m: Mapping[str, Any], index: int) -> tuple[dict[str, float], dict[str, float], float]:
    """-> (stage seconds with unknown stages summed into 'other', token counts, steps)."""
    where = f"measurement {index}"
    try:
        raw_stages, raw_tokens = m["stage_seconds"], m["tokens"]
        steps = float(m.get("steps", 1))
        tokens = {str(k): float(v) for k, v in raw_tokens.items()}
        stages: dict[str, float] = {}
        for name, s in raw_stages.items():
            stage = _STAGE_ALIASES.get(name, name)
            stage = stage if stage in TOKEN_STAGES + STEP_STAGES else "other"
            stages[stage] = stages.get(stage, 0.0) + float(s)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CostModelError(f"{where}: expected {{'stage_seconds': {{stage: s}}, 'tokens': "
                             f"{{'completion': n, ...}}}} ({type(e).__name__}: {e})") from None
    if "completion" not in tokens:
        raise CostModelError(f"{where}: tokens has no 'completion' count")
    bad = [k for k, v in {**stages, **tokens, "steps": steps}.items() if not math.isfinite(v) or v < 0]
    if bad:
        raise CostModelError(f"{where}: negative or non-finite values for {', '.join(bad)}")
    return stages, tokens, steps


def _view_tokens(tokens: Mapping[str, float], view_seconds: float, index: int) -> float:
    if "view_tokens" in tokens:
        return tokens["view_tokens"]
    if tokens.get("view_items", 0) == 0:
        if view_seconds > 0:
            raise CostModelError(f"measurement {index}: views took {view_seconds:.3g}s but tokens has no "
                                 "'view_tokens' and no 'view_items'")
        return 0.0
    missing = [k for k in ("items", "K") if not tokens.get(k)]
    if missing:
        raise CostModelError(f"measurement {index}: tokens has 'view_items' but no {' or '.join(missing)}; "
                             "give 'items' and 'K', or 'view_tokens' directly")
    return tokens["completion"] / tokens["items"] * tokens["view_items"] * tokens["K"]
