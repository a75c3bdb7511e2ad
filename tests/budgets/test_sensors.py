from collections import namedtuple

import psutil

from budgets import sensors
from budgets.sensors import SensorReadings, read_sensors


def test_read_sensors_returns_plausible_values_here():
    r = read_sensors(cpu_sample_seconds=0.05)
    assert r.taken_at is not None and r.taken_at.tzinfo is not None
    assert r.cpu_count and r.cpu_count >= 1
    assert r.memory_total_bytes and 0 < r.memory_available_bytes <= r.memory_total_bytes
    assert r.cpu_percent is None or 0 <= r.cpu_percent <= 100
    assert r.self_cpu_percent is None or 0 <= r.self_cpu_percent <= 100
    assert r.user_idle in (True, False, None)


def test_failing_sensors_read_as_unknown_not_errors(monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("driver fell over")

    for name in ("sensors_battery", "sensors_temperatures", "getloadavg", "virtual_memory"):
        monkeypatch.setattr(psutil, name, boom, raising=False)
    monkeypatch.setattr(sensors, "_linux_mains_online", lambda: None)
    monkeypatch.setattr(sensors.shutil, "which", lambda name: None)  # no loginctl, no busctl
    r = read_sensors(cpu_sample_seconds=0.01)
    assert (r.on_ac, r.has_battery, r.battery_percent) == (None, None, None)
    assert r.load_avg_1m is None and r.load_per_core is None
    assert r.memory_available_bytes is None and r.max_temperature_c is None
    assert r.user_idle is None


def test_hottest_plausible_temperature_wins(monkeypatch):
    T = namedtuple("shwtemp", "label current high critical")
    monkeypatch.setattr(psutil, "sensors_temperatures", lambda: {
        "acpitz": [T("", 255.0, None, None)],  # firmware placeholder, ignored
        "coretemp": [T("Core 0", 61.0, 90.0, 100.0), T("Core 1", 67.5, 90.0, 100.0)],
    }, raising=False)
    assert sensors._temperature() == (67.5, "coretemp/Core 1")


def test_battery_from_psutil(monkeypatch):
    B = namedtuple("sbattery", "percent secsleft power_plugged")
    monkeypatch.setattr(psutil, "sensors_battery", lambda: B(42.0, 3600, False), raising=False)
    assert sensors._power() == (False, True, 42.0)


def test_logind_idle_hint_is_parsed(monkeypatch):
    monkeypatch.setenv("XDG_SESSION_ID", "7")
    monkeypatch.setattr(sensors.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(sensors, "_run", lambda cmd: "yes" if cmd[0] == "loginctl" else None)
    assert sensors._user_idle() == (True, "logind session 7")
    monkeypatch.delenv("XDG_SESSION_ID")
    monkeypatch.setattr(sensors, "_run", lambda cmd: "b false")
    assert sensors._user_idle() == (False, "logind manager")


def test_cpu_without_sampling_is_unknown_until_primed(monkeypatch):
    monkeypatch.setattr(sensors, "_self_proc", None)
    assert sensors._cpu(0) == (None, None)
    machine, own = sensors._cpu(0)
    assert machine is not None and own is not None


def test_load_per_core():
    assert SensorReadings(load_avg_1m=3.0, cpu_count=4).load_per_core == 0.75
    assert SensorReadings(load_avg_1m=3.0).load_per_core is None
