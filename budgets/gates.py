"""Whether the machine may adapt right now: one gate per concern, each open, closed or unknown, with a reason.

The laptop rule is "never be felt": mains power (or a full battery), an unloaded CPU, memory to
spare, a cool machine, optionally an idle user, inside the allowed windows. A sensor this machine
lacks makes its gate "unknown", and `unknown_policy` decides whether unknown lets a round start.
Readings arrive as data (`sensors.SensorReadings`); nothing here reads the system.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from budgets.sensors import SensorReadings
from budgets.windows import (
    WEEKDAY_NAMES,
    TimeWindow,
    inside_any,
    next_start_any,
    parse_days,
    seconds_left_any,
)
from edge_unisd.config import ConfigError, format_validation_error

GateStateName = Literal["open", "closed", "unknown"]


class BudgetConfigError(ConfigError):
    """The [budget] settings are invalid; the message names the key."""


class WindowSpec(BaseModel):
    """One allowed window: `"01:00-06:00"` alone (daily), or `{time = "22:00-07:00", days = "weekdays"}`."""

    model_config = ConfigDict(extra="forbid")

    time: str = Field(max_length=32,
                      description="HH:MM-HH:MM in local time; may cross midnight; 24:00 as an end")
    days: str | list[str] = Field(
        "daily",
        description="'daily', 'weekdays', 'weekends' or weekday names; the day an occurrence starts on")

    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"time": value} if isinstance(value, str) else value

    @field_validator("time")
    @classmethod
    def _valid_time(cls, v: str) -> str:
        TimeWindow.parse(v)
        return v

    @field_validator("days")
    @classmethod
    def _valid_days(cls, v: str | list[str]) -> str | list[str]:
        parse_days(v)
        return v

    def to_window(self) -> TimeWindow:
        return TimeWindow.parse(self.time, self.days)


class BudgetConfig(BaseModel):
    """The `[budget]` table: which gates must be open before a round starts. None switches a gate off."""

    model_config = ConfigDict(extra="forbid")

    check_power: bool = Field(True, description="close the power gate on battery (see min_battery_percent)")
    min_battery_percent: float | None = Field(
        None, ge=0, le=100,
        description="on battery, still allow rounds at or above this charge; unset: AC only")
    max_load_per_core: float | None = Field(
        0.7, ge=0, le=64, description="highest 1-minute load average per logical core; unset: not checked")
    max_cpu_percent: float | None = Field(
        50.0, ge=0, le=100, description="highest machine-wide CPU use in percent; unset: not checked")
    exclude_own_usage: bool = Field(
        True, description="subtract this daemon's own CPU use from load and CPU, so a running round "
                          "does not preempt itself (load is approximated from our CPU share)")
    min_free_memory_bytes: int | None = Field(
        1 << 30, ge=0, le=1 << 50,
        description="least available memory; a round's own estimate raises it; unset: only the round's need")
    max_temperature_c: float | None = Field(
        85.0, ge=20, le=130, description="highest temperature of any sensor, Celsius; unset: not checked")
    require_user_idle: bool = Field(
        False, description="only adapt while logind says the user is idle (IdleHint); off by default because "
                           "many desktops never set IdleHint and the gate would then never open")
    windows: list[WindowSpec] = Field(
        default_factory=list, max_length=64, description="allowed local-time windows; empty: any time")
    unknown_policy: Literal["allow", "deny"] = Field(
        "allow", description="what a gate whose sensor is missing does: allow the round or deny it")

    @field_validator("windows", mode="before")
    @classmethod
    def _strings_are_windows(cls, v: Any) -> Any:
        return [WindowSpec._from_string(x) for x in v] if isinstance(v, list) else v

    def time_windows(self) -> list[TimeWindow]:
        return [w.to_window() for w in self.windows]


def load_budget_config(data: dict[str, Any] | None, where: str = "budget.") -> BudgetConfig:
    """Validate the [budget] table; BudgetConfigError names the key (`budget.windows.0.time: ...`)."""
    try:
        return BudgetConfig.model_validate(data or {})
    except ValidationError as e:
        raise BudgetConfigError(format_validation_error(e, where)) from None


@dataclass(frozen=True)
class GateState:
    name: str
    state: GateStateName
    reason: str


@dataclass(frozen=True)
class GateDecision:
    """All gates checked at one moment. `open` is True when every gate is open (or unknown under 'allow')."""

    open: bool
    gates: list[GateState] = field(default_factory=list)
    unknown_policy: Literal["allow", "deny"] = "allow"

    def blocking(self) -> list[GateState]:
        return [g for g in self.gates
                if g.state == "closed" or (g.state == "unknown" and self.unknown_policy == "deny")]

    def closed_reasons(self) -> list[str]:
        """One line per gate that keeps the round from running: 'power: on battery at 45% (AC required)'."""
        out = []
        for g in self.blocking():
            suffix = " (unknown_policy is deny)" if g.state == "unknown" else ""
            out.append(f"{g.name}: {g.reason}{suffix}")
        return out

    def summary(self) -> str:
        if self.open:
            unknown = [g.name for g in self.gates if g.state == "unknown"]
            return "open" + (f" (unknown, allowed: {', '.join(unknown)})" if unknown else "")
        return "closed: " + "; ".join(self.closed_reasons())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, for `status --json` and the ledger."""
        return {"open": self.open, "unknown_policy": self.unknown_policy,
                "gates": {g.name: {"state": g.state, "reason": g.reason} for g in self.gates}}


def evaluate_gates(readings: SensorReadings, config: BudgetConfig, now: datetime | None = None,
                   needed_memory_bytes: int | None = None) -> GateDecision:
    """Check every enabled gate against `readings`. `now` defaults to `readings.taken_at`.

    `needed_memory_bytes` is what the next round expects to allocate; the memory gate requires
    the larger of it and `min_free_memory_bytes`. Mid-round (preemption checks) pass None: the
    round's memory is already in use. Disabled gates are left out of the decision.
    """
    now = now if now is not None else readings.taken_at
    own = readings.self_cpu_percent if config.exclude_own_usage else None
    gates = [
        _power_gate(readings, config.min_battery_percent) if config.check_power else None,
        _load_gate(readings, config.max_load_per_core, own),
        _cpu_gate(readings, config.max_cpu_percent, own),
        _memory_gate(readings, config.min_free_memory_bytes, needed_memory_bytes),
        _temperature_gate(readings, config.max_temperature_c),
        _idle_gate(readings) if config.require_user_idle else None,
        _window_gate(config.time_windows(), now),
    ]
    kept = [g for g in gates if g is not None]
    allow_unknown = config.unknown_policy == "allow"
    is_open = all(g.state == "open" or (g.state == "unknown" and allow_unknown) for g in kept)
    return GateDecision(open=is_open, gates=kept, unknown_policy=config.unknown_policy)


def window_seconds_left(config: BudgetConfig, now: datetime) -> float | None:
    """Allowed seconds from `now` under the configured windows; None when no windows (no time limit)."""
    return seconds_left_any(config.time_windows(), now)


# --- one function per gate: (readings, threshold) -> GateState | None (None: gate switched off)

def _power_gate(r: SensorReadings, min_battery: float | None) -> GateState:
    name = "power"
    if r.on_ac:
        return GateState(name, "open", "on AC power")
    if r.has_battery is False:
        return GateState(name, "open", "no battery: mains-powered machine")
    need = "AC required" if min_battery is None else f"needs AC or battery >= {min_battery:g}%"
    charge = "" if r.battery_percent is None else f" at {r.battery_percent:.0f}%"
    enough = min_battery is not None and r.battery_percent is not None and r.battery_percent >= min_battery
    if r.on_ac is False:
        if enough:
            return GateState(name, "open", f"on battery{charge} (>= {min_battery:g}%)")
        if min_battery is not None and r.battery_percent is None:
            return GateState(name, "unknown", f"on battery, charge unknown ({need})")
        return GateState(name, "closed", f"on battery{charge} ({need})")
    if enough:
        return GateState(name, "open", f"AC state unknown, battery{charge} (>= {min_battery:g}%)")
    return GateState(name, "unknown", f"AC state unknown{', battery' + charge if charge else ''} ({need})")


def _load_gate(r: SensorReadings, max_per_core: float | None, own_percent: float | None) -> GateState | None:
    if max_per_core is None:
        return None
    per_core = r.load_per_core
    if per_core is None:
        return GateState("load", "unknown", "load average unavailable")
    note = ""
    if own_percent is not None:
        # Our busy cores show up in the load average; take them out, approximately.
        per_core, note = max(0.0, per_core - own_percent / 100.0), " excluding this daemon"
    state = "open" if per_core <= max_per_core else "closed"
    return GateState("load", state, f"load {per_core:.2f} per core{note} ({_cmp(state)} {max_per_core:g})")


def _cpu_gate(r: SensorReadings, max_percent: float | None, own_percent: float | None) -> GateState | None:
    if max_percent is None:
        return None
    if r.cpu_percent is None:
        return GateState("cpu", "unknown", "CPU use unavailable")
    cpu, note = r.cpu_percent, ""
    if own_percent is not None:
        cpu, note = max(0.0, cpu - own_percent), " excluding this daemon"
    state = "open" if cpu <= max_percent else "closed"
    return GateState("cpu", state, f"CPU {cpu:.0f}%{note} ({_cmp(state)} {max_percent:g}%)")


def _memory_gate(r: SensorReadings, min_free: int | None, needed: int | None) -> GateState | None:
    if min_free is None and needed is None:
        return None
    need = max(min_free or 0, needed or 0)
    if r.memory_available_bytes is None:
        return GateState("memory", "unknown", "available memory unknown")
    state = "open" if r.memory_available_bytes >= need else "closed"
    what = "the round needs" if needed is not None and needed >= (min_free or 0) else "minimum"
    op = ">=" if state == "open" else "<"
    avail = format_bytes(r.memory_available_bytes)
    return GateState("memory", state, f"{avail} available ({op} {format_bytes(need)}, {what})")


def _temperature_gate(r: SensorReadings, max_c: float | None) -> GateState | None:
    if max_c is None:
        return None
    if r.max_temperature_c is None:
        return GateState("temperature", "unknown", "no temperature sensors")
    where = f" at {r.hottest_sensor}" if r.hottest_sensor else ""
    state = "open" if r.max_temperature_c <= max_c else "closed"
    return GateState("temperature", state, f"{r.max_temperature_c:.0f}°C{where} ({_cmp(state)} {max_c:g}°C)")


def _idle_gate(r: SensorReadings) -> GateState:
    if r.user_idle is None:
        return GateState("user_idle", "unknown", "logind IdleHint unavailable")
    src = r.idle_source or "logind"
    if r.user_idle:
        return GateState("user_idle", "open", f"user idle ({src})")
    return GateState("user_idle", "closed", f"user active ({src} IdleHint=no)")


def _window_gate(windows: list[TimeWindow], now: datetime | None) -> GateState | None:
    if not windows:
        return None
    if now is None:
        return GateState("window", "unknown", "no clock reading")
    inside = inside_any(windows, now)
    if inside is not None:
        left = seconds_left_any(windows, now) or 0.0
        return GateState("window", "open", f"inside {inside.describe()} ({format_duration(left)} left)")
    nxt = next_start_any(windows, now)
    when = f"{WEEKDAY_NAMES[nxt.weekday()][:3].title()} {nxt:%H:%M}" if nxt else "never"  # locale-free
    names = ", ".join(w.describe() for w in windows)
    return GateState("window", "closed", f"outside {names}; next opens {when}")


def _cmp(state: str) -> str:
    return "<=" if state == "open" else ">"


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def format_duration(seconds: float) -> str:
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h {m:02d}m" if h else (f"{m}m {sec:02d}s" if m else f"{sec}s")
