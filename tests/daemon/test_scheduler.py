"""The scheduler runs the given jobs under their ids, never twice at once, and exports after a promotion."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator

import pytest
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from daemon import scheduler as sched
from daemon.scheduler import (
    JOB_ADAPTATION_ROUND,
    JOB_EXPORT,
    JOB_IDS,
    JOB_RETENTION,
    JOB_SPOOL_INTAKE,
    build_scheduler,
)

# --- fake jobs: module-level, as the real ones must be; they record into module state ---------------------

calls: Counter[str] = Counter()
seen_homes: list[str] = []
running = 0
max_running = 0
release = threading.Event()
lock = threading.Lock()


def intake(home: str) -> None:
    seen_homes.append(home)
    calls[JOB_SPOOL_INTAKE] += 1


def slow_round(home: str) -> None:
    """Blocks until released, counting how many copies run at the same time."""
    global running, max_running
    with lock:
        running += 1
        max_running = max(max_running, running)
        calls[JOB_ADAPTATION_ROUND] += 1
    release.wait(5)
    with lock:
        running -= 1


def promoting_round(home: str) -> dict:
    calls[JOB_ADAPTATION_ROUND] += 1
    return {"promoted": calls[JOB_ADAPTATION_ROUND] == 1}


def export(home: str) -> None:
    calls[JOB_EXPORT] += 1


def retention(home: str) -> None:
    calls[JOB_RETENTION] += 1


def no_args() -> None:
    pass


@pytest.fixture(autouse=True)
def fresh_state() -> Iterator[None]:
    global running, max_running
    calls.clear()
    seen_homes.clear()
    running = max_running = 0
    release.clear()
    yield
    release.set()


@pytest.fixture
def started() -> Iterator[list[BackgroundScheduler]]:
    """Shut down every scheduler a test started, even when it fails."""
    schedulers: list[BackgroundScheduler] = []
    yield schedulers
    release.set()
    for s in schedulers:
        if s.running:
            s.shutdown(wait=True)


def wait_for(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_jobs_are_added_with_ids_and_the_documented_options() -> None:
    jobs = {JOB_SPOOL_INTAKE: intake, JOB_ADAPTATION_ROUND: slow_round, JOB_EXPORT: export,
            JOB_RETENTION: retention}
    s = build_scheduler(jobs, job_kwargs={"home": "/h"}, spool_interval_s=30, round_interval_s=900,
                        retention_hour=4, retention_minute=5, timezone="UTC")
    by_id = {job.id: job for job in s.get_jobs()}
    assert set(by_id) == set(JOB_IDS)
    for job_id, job in by_id.items():
        assert job.func is jobs[job_id]
        assert job.kwargs == {"home": "/h"}
        assert job.coalesce is True and job.max_instances == 1
    assert by_id[JOB_SPOOL_INTAKE].misfire_grace_time == 30
    assert by_id[JOB_ADAPTATION_ROUND].misfire_grace_time == 900
    assert by_id[JOB_EXPORT].misfire_grace_time is None and by_id[JOB_RETENTION].misfire_grace_time is None
    assert isinstance(by_id[JOB_SPOOL_INTAKE].trigger, IntervalTrigger)
    assert by_id[JOB_SPOOL_INTAKE].trigger.interval.total_seconds() == 30
    retention_trigger = by_id[JOB_RETENTION].trigger
    assert isinstance(retention_trigger, CronTrigger)
    fields = {f.name: str(f) for f in retention_trigger.fields}
    assert (fields["hour"], fields["minute"]) == ("4", "5")


def test_given_jobs_run_on_their_intervals(started: list[BackgroundScheduler]) -> None:
    s = build_scheduler({JOB_SPOOL_INTAKE: intake}, job_kwargs={"home": "/h"}, spool_interval_s=0.05)
    started.append(s)
    s.start()
    assert wait_for(lambda: calls[JOB_SPOOL_INTAKE] >= 3)
    assert set(seen_homes) == {"/h"}


def test_a_long_round_never_runs_twice_at_once(started: list[BackgroundScheduler]) -> None:
    s = build_scheduler({JOB_ADAPTATION_ROUND: slow_round}, job_kwargs={"home": "/h"},
                        round_interval_s=0.02, round_first_delay_s=0)
    started.append(s)
    s.start()
    assert wait_for(lambda: calls[JOB_ADAPTATION_ROUND] == 1)
    time.sleep(0.3)  # ~15 ticks while the first run is still going
    assert calls[JOB_ADAPTATION_ROUND] == 1 and max_running == 1
    release.set()
    assert wait_for(lambda: calls[JOB_ADAPTATION_ROUND] >= 2)  # later ticks run again once it is done
    assert max_running == 1


def test_a_promotion_wakes_the_export_job(started: list[BackgroundScheduler]) -> None:
    s = build_scheduler({JOB_ADAPTATION_ROUND: promoting_round, JOB_EXPORT: export},
                        job_kwargs={"home": "/h"}, round_interval_s=3600, round_first_delay_s=0.2,
                        export_interval_s=3600)
    started.append(s)
    s.start()
    assert wait_for(lambda: calls[JOB_EXPORT] >= 1)  # at start: finishes an export a crash interrupted
    assert wait_for(lambda: calls[JOB_ADAPTATION_ROUND] == 1)
    assert wait_for(lambda: calls[JOB_EXPORT] == 2)  # woken by the promotion, not by its 1 h interval
    assert sched.next_runs(s)[JOB_EXPORT] is not None


@pytest.mark.parametrize(("retval", "promoted"), [
    (True, True), (False, False), (None, False), ({"promoted": True}, True), ({"promoted": False}, False),
    (type("Result", (), {"promoted": True})(), True),
])
def test_promotion_flag_shapes(retval: object, promoted: bool) -> None:
    assert sched._promoted(retval) is promoted


def test_closures_and_lambdas_are_refused() -> None:
    def local(home: str) -> None:
        pass

    for fn in (local, lambda home: None):
        with pytest.raises(ValueError, match="module-level function"):
            build_scheduler({JOB_SPOOL_INTAKE: fn}, job_kwargs={"home": "/h"})


def test_unknown_ids_non_simple_args_and_signature_mismatch_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown job id 'backup'"):
        build_scheduler({"backup": intake}, job_kwargs={"home": "/h"})
    with pytest.raises(TypeError, match="home=.*not a simple value"):
        build_scheduler({JOB_SPOOL_INTAKE: intake}, job_kwargs={"home": object()})
    with pytest.raises(ValueError, match="does not accept the job arguments"):
        build_scheduler({JOB_SPOOL_INTAKE: no_args}, job_kwargs={"home": "/h"})
    with pytest.raises(ValueError, match="not a time of day"):
        build_scheduler({JOB_RETENTION: retention}, job_kwargs={"home": "/h"}, retention_hour=24)
