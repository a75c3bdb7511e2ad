"""`edge-unisd run`: the daemon in the foreground, for systemd (Type=notify) or a terminal.

    edge-unisd run [--home DIR] [--first-round-after SECONDS]

One process per home (`SingleInstanceLock`; a second one exits at once, naming the first). An
APScheduler timetable rebuilt from settings.toml at every start runs four jobs, each a module-level
function of the home path:
- spool intake: files dropped in spool/incoming are ingested (every `spool_poll_seconds`);
- adaptation round: when the gates open and there is something to train on, one `adapt_once` in a
  `spawn` child (`run_in_child`), so SIGTERM reaches it as a stop request that checkpoints the round
  and its memory goes back to the system when it ends (every `schedule_interval_minutes`);
- export: the current adapter version merged to exports/current.gguf if that is not done yet (after a
  promotion, a rollback, or an export a crash interrupted), also in a child;
- retention cleanup (daily): items older than `retention_days` are forgotten, old versions pruned.
The main process never loads a model: it checks gates and counts in the store, and starts children.

SIGTERM/SIGINT: the running child is asked to stop (it checkpoints), the scheduler shuts down, and
`ServiceRunner` guarantees the process is gone within 30 s. systemd hears READY, STATUS lines (no
prompt text, ever), WATCHDOG pings while the scheduler lives, and STOPPING.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import logging
import threading
from pathlib import Path
from typing import Any

from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_EXECUTED, JobExecutionEvent

from daemon import sdnotify
from daemon.home import Home
from daemon.lifecycle import (
    ServiceRunner,
    SingleInstanceLock,
    current_stop_event,
    install_child_stop_handler,
    run_in_child,
)
from daemon.scheduler import JOB_ADAPTATION_ROUND, JOB_EXPORT, JOB_RETENTION, JOB_SPOOL_INTAKE, build_scheduler
from daemon.settings import DaemonSettings, load_settings
from daemon.store import Store

log = logging.getLogger(__name__)

DEFAULT_FIRST_ROUND_AFTER_S = 60.0  # a boot is not slowed down by a round starting at once
EXPORT_INTERVAL_S = 3600.0
CHILD_GRACE_S = 20.0  # SIGTERM -> SIGKILL for a child: time to write a checkpoint, inside the 30 s bound

_spool_seen: dict[str, dict] = {}  # home -> the spool's size/mtime signatures of the previous poll
_spool_lock = threading.Lock()


# --- jobs (module-level functions of simple arguments: APScheduler and `spawn` find them by name) --------

def spool_job(home: str) -> int:
    """Ingest the finished files in spool/incoming. Returns the number of items added."""
    from daemon.spool import process_spool

    h = Home(Path(home))
    settings = load_settings(h.settings)
    with _spool_lock, Store.open(h) as store:
        reports = process_spool(h, store, _spool_seen.setdefault(home, {}),
                                held_out_fraction=settings.held_out_fraction)
    return sum(r.report.added for r in reports if r.report is not None)


def _round_wanted(h: Home, settings: DaemonSettings) -> str | None:
    """Why a round should start now, or None: gates open, and new items or an interrupted round to resume.
    Checked here, cheaply, so a child (which loads torch and the model) starts only when it has work."""
    from budgets.gates import evaluate_gates, load_budget_config
    from budgets.sensors import read_sensors

    decision = evaluate_gates(read_sensors(), load_budget_config(settings.budget))
    if not decision.open:
        log.info("no round now: %s", decision.summary())
        return None
    if (h.checkpoints / "round.json").is_file():
        return "resume the interrupted round"
    with Store.open(h) as store:
        pending = store.count_items().pending
    return f"{pending} new item(s)" if pending else None


def round_job(home: str) -> dict[str, Any]:
    """One adaptation round in a child process, when the gates are open and there is work.

    Returns {"promoted": bool, ...}: the scheduler wakes the export job on a promotion."""
    h = Home(Path(home))
    settings = load_settings(h.settings)
    why = _round_wanted(h, settings)
    if why is None:
        return {"promoted": False, "status": "idle"}
    log.info("starting an adaptation round (%s)", why)
    sdnotify.status(f"adapting ({why})")
    outcome = run_in_child(round_child, home, stop_event=current_stop_event(), grace_seconds=CHILD_GRACE_S)
    result = outcome.value if outcome.ok and isinstance(outcome.value, dict) else {}
    if outcome.stopped:
        log.info("the round was stopped (the daemon is stopping); it resumes at the next start")
    elif not outcome.ok:
        log.warning("the round's process ended with exit code %s%s", outcome.exitcode,
                    " (killed)" if outcome.killed else "")
    else:
        log.info("round %s: %s: %s", result.get("round"), result.get("status"), result.get("reason"))
    return {"promoted": result.get("status") == "promoted", **result, "exitcode": outcome.exitcode}


def round_child(home: str) -> dict[str, Any]:
    """In the child: SIGTERM becomes a stop request that checkpoints the round; then `adapt_once`."""
    stop = install_child_stop_handler()
    from daemon.jobs import AdaptError, adapt_once

    try:
        r = adapt_once(Home(Path(home)), should_stop=stop.is_set)
    except AdaptError as e:
        log.warning("round not run: %s", e)
        return {"status": "error", "reason": str(e)}
    export = r.get("export") or {}
    return {"status": r["status"], "reason": r.get("reason"), "round": r.get("round"),
            "adapter": (r.get("adapter") or {}).get("version"),
            "export": {k: export.get(k) for k in ("gguf", "quant", "error") if k in export} or None}


def export_job(home: str) -> dict[str, Any] | None:
    """Export the current version to exports/current.gguf in a child, if that is not done yet."""
    from daemon.exporting import export_needed

    h = Home(Path(home))
    settings = load_settings(h.settings)
    if export_needed(h, settings) is None:
        return None
    sdnotify.status("exporting the current adapter to GGUF")
    outcome = run_in_child(export_child, home, stop_event=current_stop_event(), grace_seconds=CHILD_GRACE_S)
    if not outcome.ok:
        log.warning("the export's process ended with exit code %s", outcome.exitcode)
    return outcome.value if outcome.ok else None


def export_child(home: str) -> dict[str, Any] | None:
    from daemon.exporting import export_adapter_dir, export_after_promotion, export_needed

    h = Home(Path(home))
    settings = load_settings(h.settings)
    todo = export_needed(h, settings)
    if todo is None:
        return None
    label, adapter_dir = todo
    log.info("exporting %s to %s", label, h.exports / "current.gguf")
    if adapter_dir is None:  # rolled back to the base model
        try:
            return export_adapter_dir(h, settings, None)
        except Exception as e:  # noqa: BLE001 - recorded for status; the next interval tries again
            log.warning("export of the base model failed: %s", e)
            return {"error": str(e)}
    return export_after_promotion(h, settings, label, adapter_dir)


def retention_job(home: str) -> dict[str, Any]:
    """Forget items older than retention_days (and processed spool files), prune old adapter versions."""
    from daemon.exporting import forget_items, registry_of, sync_store
    from daemon.spool import purge_processed
    from daemon.store import utcnow

    h = Home(Path(home))
    settings = load_settings(h.settings)
    out: dict[str, Any] = {}
    with Store.open(h) as store:
        if settings.retention_days > 0:
            cutoff = utcnow() - dt.timedelta(days=settings.retention_days)
            out = forget_items(h, store, before=cutoff)
            out["spool_files_removed"] = purge_processed(h, cutoff.timestamp())
        registry = registry_of(h)
        out["pruned"] = registry.prune(settings.keep_versions)
        sync_store(store, registry)
    if out.get("items"):
        log.info("retention: forgot %d item(s) older than %d days", out["items"], settings.retention_days)
    return out


# --- the service -----------------------------------------------------------------------------------------

def status_line(home: Home) -> str:
    """One line for `systemctl status`: counts and versions only, never prompt text."""
    from daemon.exporting import registry_of

    try:
        with Store.open(home) as store:
            counts = store.count_items()
            last = store.last_round()
        current = registry_of(home).current()
    except Exception as e:  # noqa: BLE001 - a status line must not take the daemon down
        return f"idle (status unavailable: {type(e).__name__})"
    parts = [f"idle; {counts.pending} item(s) waiting of {counts.total}",
             f"adapter {current.version if current else 'none (base)'}"]
    if last is not None:
        parts.append(f"last round #{last.id} {last.status}")
    return "; ".join(parts)


def _after_job(home: Home):
    """After each job: log a failure, and tell systemd the status line when it changed (spool intake runs
    every few seconds; a line per run would only flood the manager's socket)."""
    last: list[str] = [""]

    def listener(event: JobExecutionEvent) -> None:
        if event.exception is not None:
            log.error("job %s failed: %s: %s", event.job_id, type(event.exception).__name__, event.exception)
        line = status_line(home)
        if line != last[0] or event.job_id in (JOB_ADAPTATION_ROUND, JOB_EXPORT):
            last[0] = line
            sdnotify.status(line)

    return listener


def _pause(scheduler) -> None:
    from apscheduler.schedulers import SchedulerNotRunningError

    with contextlib.suppress(SchedulerNotRunningError):  # the main thread may have shut it down already
        scheduler.pause()


def run(home: Home, settings: DaemonSettings, *, first_round_after_s: float = DEFAULT_FIRST_ROUND_AFTER_S) -> int:
    """Hold the home's lock and run the scheduler until SIGTERM/SIGINT. Raises AlreadyRunning."""
    with SingleInstanceLock(home.root):
        scheduler = build_scheduler(
            {JOB_SPOOL_INTAKE: spool_job, JOB_ADAPTATION_ROUND: round_job, JOB_EXPORT: export_job,
             JOB_RETENTION: retention_job},
            job_kwargs={"home": str(home.root)},
            spool_interval_s=settings.spool_poll_seconds,
            round_interval_s=settings.schedule_interval_minutes * 60.0,
            round_first_delay_s=first_round_after_s,
            export_interval_s=EXPORT_INTERVAL_S,
        )
        scheduler.add_listener(_after_job(home), EVENT_JOB_EXECUTED | EVENT_JOB_ERROR)
        with ServiceRunner() as runner:
            scheduler.start()
            runner.on_stop(lambda: _pause(scheduler))  # no new runs; a running round sees the stop event
            log.info("edge-unisd daemon on %s (pid lock %s)", home.root, home.lock)
            runner.ready(status_line(home))
            reason = runner.run_until_stopped(health=lambda: scheduler.running)
            scheduler.shutdown(wait=True)
        log.info("daemon stopped (%s)", reason)
    return 0


def main(args: argparse.Namespace) -> int:
    """`edge-unisd run`: args.home, args.first_round_after (seconds, None: default)."""
    home = Home.resolve(args.home).require()
    settings = load_settings(home.settings)
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.log_level != "debug":  # a line per job run every 30 s says nothing; failures still show
        logging.getLogger("apscheduler").setLevel(logging.WARNING)
    first = DEFAULT_FIRST_ROUND_AFTER_S if args.first_round_after is None else args.first_round_after
    return run(home, settings, first_round_after_s=first)
