import json
import stat
from datetime import datetime, timezone

import pytest

from budgets.cost_model import CostModel, CostModelError, calibrate, cost_fingerprint

RATES = {"rollout": 0.02, "teacher": 0.004, "student": 0.012, "view": 0.005}
FIXED = {"optimizer": 0.3, "ema": 0.05}


def step(items=4, tokens_per_item=50, view_items=2, K=3, scale=1.0):
    """A measurement as the trainer logs it, generated from RATES and FIXED."""
    completion = items * tokens_per_item
    view_tokens = view_items * tokens_per_item * K
    seconds = {s: RATES[s] * completion * scale for s in ("rollout", "teacher", "student")}
    seconds["views"] = RATES["view"] * view_tokens * scale
    seconds.update({s: v * scale for s, v in FIXED.items()})
    return {"stage_seconds": seconds,
            "tokens": {"completion": completion, "items": items, "view_items": view_items, "K": K}}


def total(m):
    return sum(m["stage_seconds"].values())


def test_recovers_rates_and_predicts_its_own_measurements():
    ms = [step(), step(items=8, tokens_per_item=30, view_items=1), step(view_items=0)]
    cm = CostModel.from_measurements(ms)
    for s, r in RATES.items():
        assert cm.per_token[s] == pytest.approx(r)
    assert cm.per_step == pytest.approx(FIXED)
    assert cm.estimated == ()
    for m in ms:
        assert cm.relative_error(m) < 1e-9
    p = cm.predict(n_items=4, completion_tokens_per_item=50, n_view_items=2, K=3, steps=1)
    assert p.seconds == pytest.approx(total(step()))
    assert sum(p.breakdown.values()) == pytest.approx(p.seconds)
    assert p.breakdown["view"] == pytest.approx(RATES["view"] * 2 * 50 * 3)


def test_more_views_cost_more_and_no_views_cost_nothing_extra():
    cm = CostModel.from_measurements([step()])
    base = cm.predict(10, 40, 0, 3, 3)
    assert base.breakdown["view"] == 0
    assert cm.predict(10, 40, 5, 3, 3).seconds > base.seconds


def test_view_rate_is_estimated_from_the_teacher_when_never_measured():
    cm = CostModel.from_measurements([step(view_items=0)])
    assert cm.per_token["view"] == pytest.approx(RATES["teacher"]) and "view" in cm.estimated


def test_unknown_stages_fold_into_other_and_view_tokens_can_be_given():
    m = step()
    m["stage_seconds"]["negative"] = 0.8
    m["tokens"] = {"completion": 200, "view_tokens": 300}
    cm = CostModel.from_measurements([m])
    assert cm.per_token["other"] == pytest.approx(0.8 / 200)
    assert cm.relative_error(m) < 1e-9


def test_drift_is_detected_beyond_tolerance():
    cm = CostModel.from_measurements([step()])
    # The error is relative to the measured cost: 1.2x slower is 17% off, 1.4x is 29% off.
    assert not cm.drifted(step(scale=1.2))
    assert cm.drifted(step(scale=1.4))
    assert cm.drifted(step(scale=0.7))
    assert not cm.drifted(step(scale=1.4), tolerance=0.5)
    assert cm.relative_error(step(scale=2.0)) == pytest.approx(0.5)


def test_round_trips_to_disk_privately(tmp_path):
    when = datetime(2024, 5, 1, 3, 0, tzinfo=timezone.utc)
    fp = cost_fingerprint("SmolLM2-135M-Instruct q8_0", "cpu", lora_rank=8)
    cm = CostModel.from_measurements([step(), step(view_items=1)], fingerprint=fp, measured_at=when)
    path = cm.save(tmp_path / "state" / "cost_model.json")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    back = CostModel.load(path)
    assert back == cm
    assert back.matches(fp) and not back.matches({**fp, "lora_rank": 16})
    assert "cpu_count" in back.fingerprint and not {"node", "hostname"} & set(back.fingerprint)


def test_bad_files_name_the_path_and_the_fix(tmp_path):
    p = tmp_path / "cost_model.json"
    p.write_text("{not json")
    with pytest.raises(CostModelError, match=r"cost_model.json.*delete"):
        CostModel.load(p)
    p.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CostModelError, match="not a edge-unisd-cost-model"):
        CostModel.load(p)
    with pytest.raises(FileNotFoundError):
        CostModel.load(tmp_path / "missing.json")


@pytest.mark.parametrize(("m", "match"), [
    ({"tokens": {"completion": 1}}, "measurement 0: expected"),
    ({"stage_seconds": {"rollout": 1}, "tokens": {}}, "no 'completion'"),
    ({"stage_seconds": {"rollout": -1, "teacher": 1, "student": 1}, "tokens": {"completion": 5}}, "rollout"),
    ({"stage_seconds": {"rollout": 1, "teacher": 1, "student": 1, "views": 2},
      "tokens": {"completion": 5, "view_items": 1}}, "no items or K"),
    ({"stage_seconds": {"rollout": 1}, "tokens": {"completion": 5}}, "lack teacher, student"),
])
def test_bad_measurements_are_explained(m, match):
    with pytest.raises(CostModelError, match=match):
        CostModel.from_measurements([m])


def test_calibrate_drops_warmup_runs():
    runs = iter([step(scale=5.0), step(), step(), step()])  # the first run is slow (warm-up)
    calls = []

    def probe():
        calls.append(1)
        return next(runs)

    cm = calibrate(probe, runs=3, warmup=1, fingerprint={"model": "tiny"})
    assert len(calls) == 4 and cm.n_measurements == 3
    assert cm.per_token["rollout"] == pytest.approx(RATES["rollout"])
    assert cm.fingerprint == {"model": "tiny"}
