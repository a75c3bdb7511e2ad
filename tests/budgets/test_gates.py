from datetime import datetime

import pytest

from budgets.gates import (
    BudgetConfig,
    BudgetConfigError,
    evaluate_gates,
    load_budget_config,
    window_seconds_left,
)
from budgets.sensors import SensorReadings

GiB = 1 << 30
NOON = datetime(2024, 1, 1, 12, 0)  # a Monday

# Every sensor present and comfortable: all gates open.
CALM = SensorReadings(
    taken_at=NOON, on_ac=True, has_battery=True, battery_percent=100.0, load_avg_1m=0.4, cpu_count=4,
    cpu_percent=5.0, self_cpu_percent=0.0, memory_available_bytes=8 * GiB, memory_total_bytes=16 * GiB,
    max_temperature_c=50.0, hottest_sensor="coretemp/Package id 0", user_idle=True,
    idle_source="logind manager",
)
ALL_ON = dict(require_user_idle=True, windows=["10:00-14:00"])


def gate(decision, name):
    return next(g for g in decision.gates if g.name == name)


def with_(**changes) -> SensorReadings:
    return SensorReadings(**{**CALM.__dict__, **changes})


def test_all_gates_open_on_calm_readings():
    d = evaluate_gates(CALM, BudgetConfig(**ALL_ON), NOON)
    assert d.open, d.summary()
    names = {g.name for g in d.gates}
    assert names == {"power", "load", "cpu", "memory", "temperature", "user_idle", "window"}
    assert all(g.state == "open" for g in d.gates)
    assert d.closed_reasons() == []


@pytest.mark.parametrize(("name", "changes", "config", "reason_part"), [
    ("power", dict(on_ac=False, battery_percent=45.0), {}, "on battery at 45% (AC required)"),
    ("power", dict(on_ac=False, battery_percent=45.0), dict(min_battery_percent=80), ">= 80%"),
    ("load", dict(load_avg_1m=8.0), {}, "load 2.00 per core"),
    ("cpu", dict(cpu_percent=90.0), {}, "CPU 90%"),
    ("memory", dict(memory_available_bytes=GiB // 2), {}, "512.0 MiB available (< 1.0 GiB"),
    ("temperature", dict(max_temperature_c=97.0), {}, "97°C at coretemp/Package id 0"),
    ("user_idle", dict(user_idle=False), {}, "user active"),
    ("window", dict(), dict(windows=["01:00-06:00"]), "outside 01:00-06:00 daily; next opens Tue 01:00"),
])
def test_each_gate_closes_and_says_why(name, changes, config, reason_part):
    d = evaluate_gates(with_(**changes), BudgetConfig(**{**ALL_ON, **config}), NOON)
    assert not d.open
    closed = [g for g in d.gates if g.state == "closed"]
    assert [g.name for g in closed] == [name]
    assert reason_part in closed[0].reason
    assert d.closed_reasons() == [f"{name}: {closed[0].reason}"]
    assert d.summary().startswith("closed: " + name)


def test_battery_above_threshold_opens_power_and_mains_only_machines_are_open():
    cfg = BudgetConfig(min_battery_percent=80)
    g = gate(evaluate_gates(with_(on_ac=False, battery_percent=93.0), cfg, NOON), "power")
    assert g.state == "open" and "93%" in g.reason
    desktop = with_(on_ac=None, has_battery=False, battery_percent=None)
    assert gate(evaluate_gates(desktop, BudgetConfig(), NOON), "power").state == "open"


def test_thresholds_are_inclusive_and_own_usage_is_excluded():
    busy_with_us = with_(cpu_percent=70.0, self_cpu_percent=40.0, load_avg_1m=3.6)  # 0.9/core, 0.4 ours
    d = evaluate_gates(busy_with_us, BudgetConfig(), NOON)
    assert gate(d, "cpu").state == "open" and "30%" in gate(d, "cpu").reason
    assert gate(d, "load").state == "open"
    d = evaluate_gates(busy_with_us, BudgetConfig(exclude_own_usage=False), NOON)
    assert gate(d, "cpu").state == "closed" and gate(d, "load").state == "closed"
    edge = with_(cpu_percent=50.0)
    assert gate(evaluate_gates(edge, BudgetConfig(), NOON), "cpu").state == "open"


def test_memory_gate_uses_the_rounds_need_when_larger():
    cfg = BudgetConfig(min_free_memory_bytes=GiB)
    assert evaluate_gates(CALM, cfg, NOON, needed_memory_bytes=4 * GiB).open
    d = evaluate_gates(CALM, cfg, NOON, needed_memory_bytes=12 * GiB)
    assert not d.open and "the round needs" in gate(d, "memory").reason
    # Only the round's need, no static minimum.
    d = evaluate_gates(with_(memory_available_bytes=GiB), BudgetConfig(min_free_memory_bytes=None), NOON,
                       needed_memory_bytes=2 * GiB)
    assert not d.open


MISSING = SensorReadings(taken_at=NOON)  # no sensor at all


@pytest.mark.parametrize("policy", ["allow", "deny"])
def test_unknown_sensors_follow_the_policy(policy):
    d = evaluate_gates(MISSING, BudgetConfig(unknown_policy=policy, require_user_idle=True), NOON)
    unknown = {g.name for g in d.gates if g.state == "unknown"}
    assert unknown == {"power", "load", "cpu", "memory", "temperature", "user_idle"}
    assert d.open is (policy == "allow")
    if policy == "deny":
        assert len(d.closed_reasons()) == 6
        assert "user_idle: logind IdleHint unavailable (unknown_policy is deny)" in d.closed_reasons()
    else:
        assert d.closed_reasons() == [] and "unknown, allowed" in d.summary()


def test_unknown_policy_does_not_override_a_closed_gate():
    d = evaluate_gates(with_(on_ac=False, battery_percent=10.0, max_temperature_c=None), BudgetConfig(), NOON)
    assert not d.open
    assert [g.split(":")[0] for g in d.closed_reasons()] == ["power"]


def test_disabled_gates_are_left_out():
    cfg = BudgetConfig(check_power=False, max_load_per_core=None, max_cpu_percent=None,
                       min_free_memory_bytes=None, max_temperature_c=None)
    d = evaluate_gates(MISSING, cfg, NOON)
    assert d.gates == [] and d.open


def test_window_gate_and_seconds_left_use_now_or_the_readings_clock():
    cfg = BudgetConfig(windows=[{"time": "22:00-02:00", "days": "weekdays"}, "11:00-13:00"])
    d = evaluate_gates(CALM, cfg)  # now from readings.taken_at = Monday noon
    assert gate(d, "window").state == "open" and "1h 00m left" in gate(d, "window").reason
    assert window_seconds_left(cfg, NOON) == 3600
    assert window_seconds_left(BudgetConfig(), NOON) is None
    d = evaluate_gates(CALM, cfg, datetime(2024, 1, 6, 23, 0))  # Saturday night: filtered out
    assert not d.open and "next opens Sun 11:00" in gate(d, "window").reason
    assert gate(evaluate_gates(with_(taken_at=None), cfg), "window").state == "unknown"


def test_decision_to_dict_is_json_ready():
    d = evaluate_gates(with_(cpu_percent=99.0), BudgetConfig(), NOON)
    out = d.to_dict()
    assert out["open"] is False and out["gates"]["cpu"]["state"] == "closed"


def test_config_errors_name_the_key_and_value():
    with pytest.raises(BudgetConfigError) as e:
        load_budget_config({"windows": ["01:00-06:00", {"time": "7-9"}], "max_cpu_percent": 120, "typo": 1})
    msg = str(e.value)
    assert "budget.windows.1.time" in msg and "'7-9'" in msg
    assert "budget.max_cpu_percent" in msg and "budget.typo: unknown key" in msg
    with pytest.raises(BudgetConfigError, match="funday"):
        load_budget_config({"windows": [{"time": "01:00-02:00", "days": ["funday"]}]})
    assert load_budget_config(None) == BudgetConfig()
