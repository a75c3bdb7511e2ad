from datetime import datetime, timedelta, timezone

import pytest

from budgets.windows import TimeWindow, next_start_any, parse_days, seconds_left_any

# 2024-01-01 is a Monday.
MON, FRI, SAT, SUN = (datetime(2024, 1, d) for d in (1, 5, 6, 7))


def at(day: datetime, hh: int, mm: int = 0) -> datetime:
    return day.replace(hour=hh, minute=mm)


def test_plain_window_inside_outside_and_edges():
    w = TimeWindow.parse("01:00-06:00")
    assert not w.is_inside(at(MON, 0, 59))
    assert w.is_inside(at(MON, 1, 0))  # start is inside
    assert w.is_inside(at(MON, 5, 59))
    assert not w.is_inside(at(MON, 6, 0))  # end is outside
    assert w.seconds_left(at(MON, 5, 0)) == 3600
    assert w.seconds_left(at(MON, 7, 0)) == 0
    assert w.next_start(at(MON, 7, 0)) == at(MON + timedelta(days=1), 1)
    assert w.next_start(at(MON, 0, 30)) == at(MON, 1)


def test_window_crossing_midnight():
    w = TimeWindow.parse("22:00-06:00")
    assert w.is_inside(at(MON, 23))
    assert w.is_inside(at(MON + timedelta(days=1), 3))  # the Monday-night occurrence, on Tuesday
    assert not w.is_inside(at(MON, 12))
    assert w.seconds_left(at(MON, 23)) == 7 * 3600
    assert w.seconds_left(at(MON + timedelta(days=1), 5, 30)) == 1800
    assert w.next_start(at(MON, 23)) == at(MON + timedelta(days=1), 22)


def test_day_filter_names_the_start_day_of_an_occurrence():
    w = TimeWindow.parse("22:00-06:00", "weekdays")
    assert w.is_inside(at(FRI, 23))
    assert w.is_inside(at(SAT, 2))  # Friday night runs into Saturday morning
    assert not w.is_inside(at(SAT, 23))
    assert not w.is_inside(at(MON, 2))  # Sunday night's occurrence is filtered out
    assert w.next_start(at(SAT, 12)) == at(MON, 22) + timedelta(days=7)


def test_weekends_and_weekday_lists():
    weekend = TimeWindow.parse("09:00-17:00", "weekends")
    assert weekend.is_inside(at(SAT, 10)) and weekend.is_inside(at(SUN, 10))
    assert not weekend.is_inside(at(MON, 10))
    some = TimeWindow.parse("09:00-17:00", ["mon", "Wednesday"])
    assert some.is_inside(at(MON, 10))
    assert some.is_inside(at(MON + timedelta(days=2), 10))
    assert not some.is_inside(at(MON + timedelta(days=1), 10))
    assert parse_days(["tue", "TUESDAY"]) == frozenset({1})


def test_whole_day_windows_chain_across_midnight():
    always = TimeWindow.parse("00:00-24:00")
    assert always.is_inside(at(MON, 23, 59))
    assert always.seconds_left(at(MON, 12)) == 8 * 24 * 3600  # capped: it never closes
    weekdays = TimeWindow.parse("00:00-00:00", "weekdays")
    # Thursday noon: Thursday + Friday run back to back, then the weekend closes it.
    assert weekdays.seconds_left(at(FRI - timedelta(days=1), 12)) == (12 + 24) * 3600


def test_adjacent_windows_chain_and_next_start_is_the_earliest():
    ws = [TimeWindow.parse("22:00-24:00"), TimeWindow.parse("00:00-02:00")]
    assert seconds_left_any(ws, at(MON, 23)) == 3 * 3600
    assert seconds_left_any(ws, at(MON, 12)) == 0
    assert seconds_left_any([], at(MON, 12)) is None
    assert next_start_any(ws, at(MON, 12)) == at(MON, 22)


def test_timezone_aware_now_uses_its_wall_clock():
    tz = timezone(timedelta(hours=2))
    w = TimeWindow.parse("01:00-06:00")
    now = datetime(2024, 1, 1, 3, 0, tzinfo=tz)
    assert w.is_inside(now)
    assert w.next_start(now) == datetime(2024, 1, 2, 1, 0, tzinfo=tz)


@pytest.mark.parametrize("spec", ["1-6", "01:00", "25:00-06:00", "01:00-06:61", "0100-0600", "24:00-06:00"])
def test_parse_errors_name_the_string(spec):
    with pytest.raises(ValueError, match=repr(spec).replace("(", r"\(")):
        TimeWindow.parse(spec)


@pytest.mark.parametrize("days", ["weekly", ["mon", "funday"], ["m"], []])
def test_bad_day_filters_are_named(days):
    with pytest.raises(ValueError) as e:
        parse_days(days)
    assert "day" in str(e.value)
    if isinstance(days, list) and days:
        assert repr(days[-1]) in str(e.value)
