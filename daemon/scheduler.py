"""The daemon's timetable: APScheduler 3.x jobs rebuilt from plain arguments at every start.

Four jobs, each a module-level function that takes only simple keyword arguments (e.g. `home=str`)
and finds everything else itself, so a job can be called by hand, from a test, or from a child:

- `spool-intake` (interval): ingest files dropped in the spool directory.
- `adaptation-round` (interval): the job checks the gates and windows itself and usually returns
  at once; when it promotes a new adapter version it returns a true `promoted` flag (a bool, or a
  mapping / object with a `promoted` field) and the export job is woken at once.
- `export-after-promotion` (interval + woken): export the current version if its GGUF is missing.
  Being state-driven, it also finishes an export that a crash interrupted.
- `retention-cleanup` (daily, local time): drop what the retention settings say is too old.

Every job: explicit `id=` with `replace_existing=True` (a rebuild never duplicates), `coalesce=True`
(after a suspend, many missed runs become one), `max_instances=1` (a round still going when the
next tick comes is not started twice; APScheduler logs the skip). The store is memory: the
settings are the source of truth, so nothing is persisted that could disagree with them.

Shutdown with `lifecycle.ServiceRunner`: `runner.on_stop(scheduler.pause)` (no new runs), then after
`run_until_stopped()` call `scheduler.shutdown(wait=True)`; a running round sees the runner's stop
event through `run_in_child` and is checkpointed within the bound.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta, tzinfo
from typing import Any

from apscheduler.events import EVENT_JOB_EXECUTED, JobExecutionEvent
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

log = logging.getLogger(__name__)

JOB_SPOOL_INTAKE = "spool-intake"
JOB_ADAPTATION_ROUND = "adaptation-round"
JOB_EXPORT = "export-after-promotion"
JOB_RETENTION = "retention-cleanup"
JOB_IDS = (JOB_SPOOL_INTAKE, JOB_ADAPTATION_ROUND, JOB_EXPORT, JOB_RETENTION)

_SIMPLE = (str, int, float, bool, type(None))


def _check_job(job_id: str, fn: Callable[..., Any], kwargs: Mapping[str, Any]) -> None:
    """A job must be a module-level function (referable by name) that accepts `kwargs`."""
    if job_id not in JOB_IDS:
        raise ValueError(f"unknown job id {job_id!r}; known ids: {', '.join(JOB_IDS)}")
    if not inspect.isfunction(fn) or "<" in fn.__qualname__:
        raise ValueError(
            f"job {job_id!r} must be a module-level function, got {fn!r}; "
            "pass its data through job_kwargs instead of a closure, lambda or partial"
        )
    try:
        inspect.signature(fn).bind(**kwargs)
    except TypeError as e:
        raise ValueError(
            f"job {job_id!r} ({fn.__module__}.{fn.__qualname__}) does not accept the job arguments "
            f"{sorted(kwargs)}: {e}"
        ) from None


def _check_kwargs(kwargs: Mapping[str, Any]) -> None:
    for key, value in kwargs.items():
        items = value if isinstance(value, (list, tuple)) else (value,)
        if not all(isinstance(v, _SIMPLE) for v in items):
            raise TypeError(
                f"job argument {key}={value!r} is not a simple value (str, int, float, bool, None, or a "
                "list of those); pass e.g. str(path) and let the job open what it needs"
            )


def _promoted(retval: Any) -> bool:
    """Did the round job report a promotion? Accepts a bool, a mapping or an object with `promoted`."""
    if isinstance(retval, bool):
        return retval
    if isinstance(retval, Mapping):
        return bool(retval.get("promoted"))
    return bool(getattr(retval, "promoted", False))


def _grace(seconds: float) -> int:
    """APScheduler 3 wants a positive int number of seconds."""
    return max(1, round(seconds))


def wake_job(scheduler: BackgroundScheduler, job_id: str) -> None:
    """Run `job_id` as soon as possible (it keeps its regular trigger afterwards)."""
    scheduler.modify_job(job_id, next_run_time=datetime.now(scheduler.timezone))


def next_runs(scheduler: BackgroundScheduler) -> dict[str, datetime | None]:
    """Next run time per job id, for `edge-unisd status` (None: paused)."""
    return {job.id: job.next_run_time for job in scheduler.get_jobs()}


def build_scheduler(
    jobs: Mapping[str, Callable[..., Any]],
    *,
    job_kwargs: Mapping[str, Any] | None = None,
    spool_interval_s: float = 30.0,
    round_interval_s: float = 900.0,
    round_first_delay_s: float = 60.0,
    export_interval_s: float = 3600.0,
    retention_hour: int = 3,
    retention_minute: int = 17,
    timezone: str | tzinfo | None = None,
) -> BackgroundScheduler:
    """A not-yet-started BackgroundScheduler with the given subset of `JOB_IDS` scheduled.

    `jobs` maps job ids to module-level functions; each gets `job_kwargs` (simple values only).
    Intake and export first run at start (files that arrived while we were down, an export a
    crash interrupted); the first round waits `round_first_delay_s` so a boot is not slowed down.
    """
    kwargs = dict(job_kwargs or {})
    _check_kwargs(kwargs)
    for job_id, fn in jobs.items():
        _check_job(job_id, fn, kwargs)
    if not 0 <= retention_hour <= 23 or not 0 <= retention_minute <= 59:
        raise ValueError(f"retention time {retention_hour}:{retention_minute:02d} is not a time of day")

    scheduler = BackgroundScheduler(
        # One thread per job: a long round must not hold up spool intake.
        executors={"default": ThreadPoolExecutor(max_workers=max(1, len(jobs)))},
        job_defaults={"coalesce": True, "max_instances": 1},
        **({"timezone": timezone} if timezone is not None else {}),
    )
    now = datetime.now(scheduler.timezone)
    daily = CronTrigger(hour=retention_hour, minute=retention_minute, timezone=scheduler.timezone)

    # misfire_grace_time: how late a run may start and still happen. A machine that was busy or
    # asleep wakes with runs owed. Interval jobs: up to one interval late still runs (later than
    # that, the next tick is due anyway and coalescing makes it one run). Export and retention:
    # None (never skip): a promoted version must reach its GGUF, and data past its retention date
    # must go even if the machine slept through 03:17.
    plan = {
        JOB_SPOOL_INTAKE: (IntervalTrigger(seconds=spool_interval_s), _grace(spool_interval_s), now),
        JOB_ADAPTATION_ROUND: (IntervalTrigger(seconds=round_interval_s), _grace(round_interval_s),
                               now + timedelta(seconds=round_first_delay_s)),
        JOB_EXPORT: (IntervalTrigger(seconds=export_interval_s), None, now),
        JOB_RETENTION: (daily, None, None),
    }
    for job_id, fn in jobs.items():
        trigger, grace, first = plan[job_id]
        options: dict[str, Any] = {"next_run_time": first} if first is not None else {}
        scheduler.add_job(
            fn, trigger, id=job_id, name=job_id, kwargs=kwargs,
            replace_existing=True, coalesce=True, max_instances=1, misfire_grace_time=grace,
            **options,
        )

    if JOB_ADAPTATION_ROUND in jobs and JOB_EXPORT in jobs:
        def _export_after_promotion(event: JobExecutionEvent) -> None:
            if event.job_id == JOB_ADAPTATION_ROUND and _promoted(event.retval):
                log.info("a new adapter version was promoted; exporting now")
                wake_job(scheduler, JOB_EXPORT)

        scheduler.add_listener(_export_after_promotion, EVENT_JOB_EXECUTED)
    return scheduler
