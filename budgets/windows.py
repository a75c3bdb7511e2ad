"""Allowed time windows such as "01:00-06:00" on some days of the week, in local wall-clock time.

A window may cross midnight ("22:00-06:00"). Its day filter names the day an occurrence
*starts* on, as cron does: "22:00-06:00" on weekdays runs Friday night into Saturday morning,
not Sunday night into Monday. Start == end means a whole day. Times are compared with the
wall-clock fields of the `now` you pass (give local time); across a DST change an occurrence
may be an hour longer or shorter than its spec says.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, time, timedelta

WEEKDAY_NAMES = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
DAY_SETS = {
    "daily": frozenset(range(7)),
    "weekdays": frozenset(range(5)),
    "weekends": frozenset({5, 6}),
}
_SPEC = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")
_DAY = timedelta(days=1)
# Chained whole-day windows could run forever; a week of "inside" is as good as always.
_MAX_CHAIN = timedelta(days=8)


def parse_days(days: str | Iterable[str]) -> frozenset[int]:
    """'daily' | 'weekdays' | 'weekends' | a list of weekday names ('mon', 'Tuesday') -> {0..6}, Monday=0."""
    if isinstance(days, str):
        key = days.strip().lower()
        if key in DAY_SETS:
            return DAY_SETS[key]
        raise ValueError(f"day filter {days!r}: use 'daily', 'weekdays', 'weekends' or a list of weekday "
                         "names like ['mon', 'wed']")
    out = set()
    for name in days:
        key = str(name).strip().lower()
        matches = [i for i, full in enumerate(WEEKDAY_NAMES) if len(key) >= 3 and full.startswith(key)]
        if len(matches) != 1:
            raise ValueError(f"weekday {name!r}: use a weekday name like 'mon' or 'monday'")
        out.add(matches[0])
    if not out:
        raise ValueError("day filter []: name at least one weekday, or use 'daily'")
    return frozenset(out)


def _parse_clock(hh: str, mm: str, spec: str, allow_24: bool) -> time:
    h, m = int(hh), int(mm)
    if allow_24 and (h, m) == (24, 0):
        return time(0, 0)
    if not (0 <= h <= 23 and 0 <= m <= 59):
        raise ValueError(f"time window {spec!r}: {hh}:{mm} is not a time of day "
                         "(00:00 to 23:59, or 24:00 as an end)")
    return time(h, m)


@dataclass(frozen=True)
class TimeWindow:
    start: time
    end: time
    days: frozenset[int]
    spec: str  # as the user wrote it, for messages

    @classmethod
    def parse(cls, spec: str, days: str | Iterable[str] = "daily") -> TimeWindow:
        """'HH:MM-HH:MM' (end may be 24:00); ValueError names the offending string."""
        m = _SPEC.match(spec) if isinstance(spec, str) else None
        if m is None:
            raise ValueError(f"time window {spec!r}: expected 'HH:MM-HH:MM', "
                             "e.g. '01:00-06:00' or '22:00-07:00'")
        start = _parse_clock(m[1], m[2], spec, allow_24=False)
        end = _parse_clock(m[3], m[4], spec, allow_24=True)
        return cls(start=start, end=end, days=parse_days(days), spec=spec.strip())

    def describe(self) -> str:
        names = next((k for k, v in DAY_SETS.items() if v == self.days), None)
        if names is None:
            names = ",".join(WEEKDAY_NAMES[d][:3] for d in sorted(self.days))
        return f"{self.spec} {names}"

    # An occurrence is [start, end) beginning on an allowed day; it lasts (end - start) mod 24h, or 24h.
    def _duration(self) -> timedelta:
        d = datetime.combine(datetime.min, self.end) - datetime.combine(datetime.min, self.start)
        return d if d > timedelta(0) else d + _DAY

    def _occurrence_start(self, day: datetime) -> datetime:
        return day.replace(hour=self.start.hour, minute=self.start.minute, second=0, microsecond=0)

    def current_end(self, now: datetime) -> datetime | None:
        """End of the occurrence containing `now`, or None when outside."""
        dur = self._duration()
        for back in (0, 1):  # an occurrence containing now started today or yesterday
            start = self._occurrence_start(now - back * _DAY)
            if start.weekday() in self.days and start <= now < start + dur:
                return start + dur
        return None

    def is_inside(self, now: datetime) -> bool:
        return self.current_end(now) is not None

    def seconds_left(self, now: datetime) -> float:
        """Seconds until the window closes (whole-day occurrences on consecutive days chain); 0 outside."""
        return seconds_left_any([self], now) or 0.0

    def next_start(self, now: datetime) -> datetime:
        """Start of the first occurrence beginning strictly after `now` (the current one does not count)."""
        for ahead in range(0, 8):
            start = self._occurrence_start(now + ahead * _DAY)
            if start > now and start.weekday() in self.days:
                return start
        raise AssertionError("unreachable: a non-empty day set recurs within 8 days")


def parse_window(spec: str, days: str | Sequence[str] = "daily") -> TimeWindow:
    return TimeWindow.parse(spec, days)


def inside_any(windows: Sequence[TimeWindow], now: datetime) -> TimeWindow | None:
    """The window containing `now` that stays open longest, or None."""
    best = None
    for w in windows:
        end = w.current_end(now)
        if end is not None and (best is None or end > best[0]):
            best = (end, w)
    return best[1] if best else None


def seconds_left_any(windows: Sequence[TimeWindow], now: datetime) -> float | None:
    """Seconds of allowed time from `now`, following overlapping or adjacent windows; None: no windows.

    0.0 when `now` is outside every window. Capped at 8 days (a window that never closes).
    """
    if not windows:
        return None
    t = now
    while t - now < _MAX_CHAIN:
        ends = [e for e in (w.current_end(t) for w in windows) if e is not None]
        if not ends:
            break
        t = max(ends)
    return min(t - now, _MAX_CHAIN).total_seconds()


def next_start_any(windows: Sequence[TimeWindow], now: datetime) -> datetime | None:
    """When the next window opens (strictly after `now`); None if there are no windows."""
    if not windows:
        return None
    return min(w.next_start(now) for w in windows)
