"""The one place `budgets/` reads the machine: power, load, CPU, memory, temperature, user idle, clock.

Everything else in the package takes a `SensorReadings` as plain data, so tests inject fakes and
the gates never touch psutil. A sensor that this machine lacks, or that fails, reads as None
("unknown"); the gates turn unknown into allow or deny by policy. Reading never raises.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

# Temperatures outside this range are placeholders some firmwares report (0, -273, 255), not readings.
_PLAUSIBLE_TEMP_C = (1.0, 150.0)
_SUBPROCESS_TIMEOUT_S = 2.0
_POWER_SUPPLY_DIR = Path("/sys/class/power_supply")


@dataclass(frozen=True)
class SensorReadings:
    """One snapshot of the machine. None means unknown (no such sensor here, or it failed)."""

    taken_at: datetime | None = None  # local wall-clock time, timezone-aware
    on_ac: bool | None = None  # mains power connected
    has_battery: bool | None = None  # False: a mains-only machine (desktop, server)
    battery_percent: float | None = None  # 0..100
    load_avg_1m: float | None = None  # 1-minute load average (runnable tasks)
    cpu_count: int | None = None  # logical cores
    cpu_percent: float | None = None  # whole machine, 0..100
    self_cpu_percent: float | None = None  # this process's share of the whole machine, 0..100
    memory_available_bytes: int | None = None
    memory_total_bytes: int | None = None
    max_temperature_c: float | None = None  # hottest plausible sensor
    hottest_sensor: str | None = None  # e.g. "coretemp/Package id 0"
    user_idle: bool | None = None  # logind IdleHint
    idle_source: str | None = None  # where user_idle came from, e.g. "logind session 3"

    @property
    def load_per_core(self) -> float | None:
        if self.load_avg_1m is None or not self.cpu_count:
            return None
        return self.load_avg_1m / self.cpu_count


def now() -> datetime:
    """The local wall-clock time, timezone-aware: the clock every budgets module reads through."""
    return datetime.now().astimezone()


def read_sensors(cpu_sample_seconds: float = 0.25) -> SensorReadings:
    """Read every sensor once. Blocks `cpu_sample_seconds` to measure CPU use over that interval.

    With `cpu_sample_seconds=0` CPU use is measured since the previous call in this process, and
    reads as None on the first call (psutil has nothing to compare with yet).
    """
    on_ac, has_battery, battery = _power()
    load, cores = _load()
    cpu, self_cpu = _cpu(cpu_sample_seconds)
    avail, total = _memory()
    temp, hottest = _temperature()
    idle, idle_source = _user_idle()
    return SensorReadings(
        taken_at=now(), on_ac=on_ac, has_battery=has_battery, battery_percent=battery,
        load_avg_1m=load, cpu_count=cores, cpu_percent=cpu, self_cpu_percent=self_cpu,
        memory_available_bytes=avail, memory_total_bytes=total, max_temperature_c=temp,
        hottest_sensor=hottest, user_idle=idle, idle_source=idle_source,
    )


def machine_fingerprint() -> dict[str, str | int | None]:
    """What a measured cost model depends on: CPU, core count, memory, OS, Python. No hostname."""
    try:
        total_mem = int(psutil.virtual_memory().total)
    except Exception:  # noqa: BLE001 - a fingerprint field may be unknown
        total_mem = None
    return {
        "machine": platform.machine(),
        "processor": platform.processor() or _cpu_model_name(),
        "cpu_count": os.cpu_count(),
        "memory_total_bytes": total_mem,
        "system": platform.system(),
        "python": platform.python_version(),
    }


# --- power

def _power() -> tuple[bool | None, bool | None, float | None]:
    """(on_ac, has_battery, battery_percent) from psutil, completed from sysfs on Linux."""
    on_ac: bool | None = None
    has_battery: bool | None = None
    percent: float | None = None
    if hasattr(psutil, "sensors_battery"):
        try:
            bat = psutil.sensors_battery()
        except Exception as e:  # noqa: BLE001 - a broken driver must not stop the daemon
            log.debug("battery sensor failed: %s", e)
            bat = None
        else:
            if bat is None:
                has_battery = False  # psutil supports batteries here and found none
            else:
                has_battery, percent = True, float(bat.percent)
                on_ac = None if bat.power_plugged is None else bool(bat.power_plugged)
    if on_ac is None and sys.platform.startswith("linux"):
        on_ac = _linux_mains_online()
    return on_ac, has_battery, percent


def _linux_mains_online() -> bool | None:
    """True/False if sysfs lists a mains supply, None if it lists none (typical of desktops)."""
    if not _POWER_SUPPLY_DIR.is_dir():
        return None
    seen = None
    try:
        for dev in _POWER_SUPPLY_DIR.iterdir():
            try:
                if (dev / "type").read_text().strip() != "Mains":
                    continue
                online = (dev / "online").read_text().strip() == "1"
            except OSError:
                continue
            seen = bool(seen) or online
    except OSError as e:
        log.debug("reading %s failed: %s", _POWER_SUPPLY_DIR, e)
    return seen


# --- load, CPU, memory

def _load() -> tuple[float | None, int | None]:
    try:
        load = float(psutil.getloadavg()[0])
    except Exception as e:  # noqa: BLE001
        log.debug("load average unavailable: %s", e)
        load = None
    return load, (psutil.cpu_count(logical=True) or None)


_cpu_lock = threading.Lock()
_self_proc: psutil.Process | None = None
_cpu_primed = False


def _cpu(sample_seconds: float) -> tuple[float | None, float | None]:
    """(machine cpu %, this process's share of the machine %), over the same interval."""
    global _self_proc, _cpu_primed
    with _cpu_lock:
        try:
            if _self_proc is None or _self_proc.pid != os.getpid():
                _self_proc, _cpu_primed = psutil.Process(), False
            if sample_seconds > 0 or not _cpu_primed:
                psutil.cpu_percent(interval=None)
                _self_proc.cpu_percent(interval=None)
                if sample_seconds <= 0:
                    _cpu_primed = True
                    return None, None
                time.sleep(sample_seconds)
            machine = float(psutil.cpu_percent(interval=None))
            # Process.cpu_percent is per core (up to 100 * cores); normalise to the whole machine.
            own = float(_self_proc.cpu_percent(interval=None)) / (psutil.cpu_count() or 1)
            _cpu_primed = True
            return machine, min(own, 100.0)
        except Exception as e:  # noqa: BLE001
            log.debug("cpu percent unavailable: %s", e)
            return None, None


def _memory() -> tuple[int | None, int | None]:
    try:
        vm = psutil.virtual_memory()
        return int(vm.available), int(vm.total)
    except Exception as e:  # noqa: BLE001
        log.debug("virtual memory unavailable: %s", e)
        return None, None


# --- temperature

def _temperature() -> tuple[float | None, str | None]:
    if not hasattr(psutil, "sensors_temperatures"):
        return None, None
    try:
        groups = psutil.sensors_temperatures()
    except Exception as e:  # noqa: BLE001
        log.debug("temperature sensors failed: %s", e)
        return None, None
    best: tuple[float, str] | None = None
    lo, hi = _PLAUSIBLE_TEMP_C
    for chip, entries in (groups or {}).items():
        for entry in entries:
            t = entry.current
            if t is None or not lo <= t <= hi:
                continue
            if best is None or t > best[0]:
                best = (float(t), f"{chip}/{entry.label or 'temp'}")
    return (best[0], best[1]) if best else (None, None)


# --- user idle (logind)

def _user_idle() -> tuple[bool | None, str | None]:
    """logind's IdleHint: of this session when we run inside one, else of the whole machine.

    The manager's IdleHint is true only when every session is idle, which is what a system
    service wants ("the user came back" in any session). None where logind is not running.
    """
    session = os.environ.get("XDG_SESSION_ID")
    if session and shutil.which("loginctl"):
        out = _run(["loginctl", "show-session", session, "-p", "IdleHint", "--value"])
        if out in ("yes", "no"):
            return out == "yes", f"logind session {session}"
    if shutil.which("busctl"):
        out = _run(["busctl", "get-property", "org.freedesktop.login1", "/org/freedesktop/login1",
                    "org.freedesktop.login1.Manager", "IdleHint"])
        if out in ("b true", "b false"):
            return out == "b true", "logind manager"
    return None, None


def _run(cmd: list[str]) -> str | None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_SUBPROCESS_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError) as e:
        log.debug("%s failed: %s", cmd[0], e)
        return None
    if proc.returncode != 0:
        log.debug("%s exited %s: %s", cmd[0], proc.returncode, proc.stderr.strip()[:200])
        return None
    return proc.stdout.strip()


def _cpu_model_name() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None
