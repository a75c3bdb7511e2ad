"""`edge-unisd` command line. Errors a user can meet are printed without a traceback, exit code 2.

Every command takes `--home DIR` (default: $EDGE_UNISD_HOME, else $XDG_DATA_HOME/edge-unisd);
every command that reports takes `--json`. `ingest` exits 1 when some rows were rejected.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from daemon.home import Home, HomeError
from daemon.ingest import IngestError, ingest_file
from daemon.settings import SettingsError, load_settings, write_default_settings
from daemon.store import Store, StoreError

# Before anything can import huggingface_hub (the imports above do not): never reach a hub at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

MAX_PROFILE_CHARS = 32_000  # the profile is in every primary teacher prompt


class CliError(RuntimeError):
    """A problem the user can fix; printed as one line, exit code 2."""


USER_ERRORS = (CliError, HomeError, SettingsError, IngestError, StoreError)


# --- helpers

def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


def _open(args: argparse.Namespace) -> tuple[Home, Store]:
    home = Home.resolve(args.home).require()
    return home, Store.open(home)


def _describe_base(spec: str | None) -> dict[str, str]:
    """Check the base model exists and say what it is, without loading it (that costs a minute)."""
    from edge_unisd.modeling import ModelLoadError, resolve_base  # imports torch: only here

    try:
        src = resolve_base(spec)
    except ModelLoadError as e:
        raise CliError(str(e)) from None
    return {"kind": src.kind, "path": str(src.path), "fingerprint": src.fingerprint}


def _parse_when(value: str) -> dt.datetime:
    """ISO 8601 date or date-time; without a zone it is local time."""
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        raise CliError(f"--before {value!r} is not a date; use ISO 8601, "
                       "e.g. 2026-01-31 or 2026-01-31T18:00") from None
    return when.astimezone() if when.tzinfo is None else when


# --- commands

def cmd_init(args: argparse.Namespace) -> int:
    home = Home.resolve(args.home).create()
    base_arg = str(Path(args.base).expanduser().resolve()) if args.base else None
    spec = base_arg
    if home.settings.exists():  # re-running init keeps the user's settings
        spec = load_settings(home.settings).base_model
        current = str(Path(spec).expanduser().resolve()) if spec else None
        if base_arg and base_arg != current:
            raise CliError(f"{home.settings} already sets the base model to {spec or 'the bundled one'}; "
                           f"edit base_model there to use {base_arg}")
    base = _describe_base(spec)
    if not home.settings.exists():
        write_default_settings(home.settings, base_model=base_arg)
        load_settings(home.settings)  # what we wrote must load (and env overrides must be valid)
    with Store.open(home) as store:
        store.set_meta("base", {"spec": spec, **base})
    result = {"home": str(home.root), "settings": str(home.settings), "db": str(home.db), "base": base}
    if args.json:
        _print_json(result)
    else:
        print(f"initialised {home.root}\n  base model: {base['kind']} {base['path']}\n"
              f"  settings:   {home.settings}\n  add prompts: edge-unisd ingest FILE.jsonl "
              f"(or drop files into {home.incoming})")
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    home = Home.resolve(args.home).require()
    settings = load_settings(home.settings)
    with Store.open(home) as store:
        report = ingest_file(store, args.file, held_out_fraction=settings.held_out_fraction)
    if args.json:
        _print_json(report.to_dict())
    else:
        print(report.summary())
        for e in report.errors:
            print(str(e), file=sys.stderr)
    return 1 if report.rejected else 0


def _read_profile(path: str) -> str:
    try:
        raw = sys.stdin.buffer.read(MAX_PROFILE_CHARS * 4 + 1) if path == "-" else _read_limited(Path(path))
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CliError(f"{path}: not valid UTF-8 (byte {e.start + 1}); save the notes as UTF-8") from None
    except OSError as e:
        raise CliError(f"cannot read {path}: {e.strerror or e}") from None
    if not text.strip():
        raise CliError(f"{path} is empty; to remove the profile use `edge-unisd profile clear`")
    if len(text) > MAX_PROFILE_CHARS:
        raise CliError(f"{path} has more than {MAX_PROFILE_CHARS} characters; every teacher prompt "
                       "carries the profile, so keep it short")
    return text


def _read_limited(path: Path) -> bytes:
    if path.is_dir():
        raise CliError(f"{path} is a directory; give a text file")
    with open(path, "rb") as f:
        return f.read(MAX_PROFILE_CHARS * 4 + 1)


def cmd_profile(args: argparse.Namespace) -> int:
    text = _read_profile(args.file) if args.action == "set" else None
    _, store = _open(args)
    with store:
        if args.action == "set":
            store.set_profile(text)
        elif args.action == "clear":
            store.clear_profile()
        current = store.get_profile() or ""
        updated = store.profile_updated_at()
    info = {"chars": len(current), "updated_at": updated.isoformat() if updated else None}
    if args.action == "show":
        info["text"] = current
    if args.json:
        _print_json(info)
    elif args.action == "show":
        print(current if current else "(no profile set)")
    else:
        print(f"profile {'set' if args.action == 'set' else 'cleared'} ({info['chars']} characters)")
    return 0


def status_dict(home: Home, store: Store) -> dict[str, Any]:
    """What `status --json` prints; the daemon's own status line reads the same."""
    settings = load_settings(home.settings)
    counts = store.count_items()
    versions = store.adapter_versions()
    promoted = [v for v in versions if v.status == "promoted"]
    last = store.last_round()
    profile = store.get_profile() or ""
    incoming = sum(1 for p in home.incoming.iterdir() if p.is_file()) if home.incoming.is_dir() else 0
    return {
        "home": str(home.root),
        "base": store.get_meta("base"),
        "items": {"total": counts.total, "pending": counts.pending, "held_out": counts.held_out},
        "profile": {"chars": len(profile)},
        "adapter": {"current": promoted[-1].version if promoted else None, "versions": len(versions),
                    "trained_on_forgotten": [v.version for v in versions if v.trained_on_forgotten]},
        "gates": {"open": None},
        "last_round": last.to_dict() if last else None,
        "spool": {"incoming": incoming},
        "settings": {"preset": settings.preset, "collect": settings.collect,
                     "round_budget_seconds": settings.round_budget_seconds},
        "note": "adapter and gates are placeholders until the adapters and budgets packages report here",
    }


def cmd_status(args: argparse.Namespace) -> int:
    home, store = _open(args)
    with store:
        s = status_dict(home, store)
    if args.json:
        _print_json(s)
        return 0
    last = s["last_round"]
    print(f"home:        {s['home']}")
    print(f"items:       {s['items']['total']} stored, {s['items']['pending']} waiting, "
          f"{s['items']['held_out']} held out for evaluation")
    print(f"profile:     {s['profile']['chars']} characters")
    print(f"adapter:     {s['adapter']['current'] or 'none yet (base model)'}")
    print("last round:  " + (f"#{last['id']} {last['status']} at {last['started_at']}, "
                             f"{last['n_items']} items" if last else "none yet"))
    print(f"spool:       {s['spool']['incoming']} file(s) waiting in {home.incoming}")
    print(f"collect:     {'on' if s['settings']['collect'] else 'off'}")
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    from daemon.spool import purge_processed

    before = _parse_when(args.before) if args.before else None
    home, store = _open(args)
    with store:
        report = store.forget(ids=args.id, before=before, all=args.all)
    # the processed spool files are copies of the prompts: they go too (by id they cannot be told apart)
    purged = purge_processed(home, before.timestamp() if before else None) if (args.all or before) else 0
    result = {**report.to_dict(), "spool_files_removed": purged}
    if args.json:
        _print_json(result)
        return 0
    print(f"forgot {report.items} item(s) and {report.rollouts} rollout(s)"
          + (f"; removed {purged} processed spool file(s)" if purged else ""))
    if args.id and report.items < len(set(args.id)):
        print(f"{len(set(args.id)) - report.items} of the given ids were not stored")
    if report.marked_versions:
        print("adapter versions trained on them, now marked: " + ", ".join(report.marked_versions)
              + " (retrain without them: edge-unisd adapt --once)")
    return 0


def _progress_line():
    """A one-line live status on stderr when it is a terminal; nothing otherwise (logs say the rest)."""
    if not sys.stderr.isatty():
        return None

    def write(msg: str) -> None:
        sys.stderr.write("\r\033[K" + msg[:200])
        sys.stderr.flush()

    return write


@contextlib.contextmanager
def _graceful_stop():
    """First Ctrl-C / SIGTERM: stop after the current step and checkpoint; a second one aborts at once."""
    requested: list[int] = []

    def handler(signum: int, _frame: Any) -> None:
        if requested:
            raise KeyboardInterrupt
        requested.append(signum)
        print("\nedge-unisd: stopping after this step (again to abort)...", file=sys.stderr)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: bool(requested)
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


def cmd_adapt(args: argparse.Namespace) -> int:
    if not args.once:
        raise CliError("adapt runs one round now with --once; `edge-unisd run` schedules rounds")
    if args.max_seconds is not None and not args.max_seconds > 0:
        raise CliError(f"--max-seconds must be a positive number of seconds (got {args.max_seconds:g})")
    if args.max_items is not None and args.max_items < 1:
        raise CliError(f"--max-items must be at least 1 (got {args.max_items})")
    home = Home.resolve(args.home).require()
    from daemon.jobs import AdaptError, adapt_once  # imports torch: only here

    progress = _progress_line()
    try:
        with _graceful_stop() as stop_requested:
            result = adapt_once(home, max_seconds=args.max_seconds, max_items=args.max_items,
                                preset=args.preset, force=args.force, should_stop=stop_requested,
                                progress=progress)
    except AdaptError as e:
        raise CliError(str(e)) from None
    finally:
        if progress is not None:
            sys.stderr.write("\n")
    if args.json:
        _print_json(result)
    else:
        print(_describe_round(result))
    return 0


def _describe_round(r: dict[str, Any]) -> str:
    if r["status"] == "skipped":
        return f"skipped: {r['reason']}"
    steps, secs = r["steps"], r["seconds"]
    lines = [f"round {r['round']} ({r['preset']}): {r['status']}: {r['reason']}",
             f"  items:   {r['items']} ({r['new_items']} new, {r['replay_items']} replay), "
             f"K views for {r['view_items']}",
             f"  steps:   {steps['done']}/{steps['planned']}"
             + (f" (resumed at {r['resumed_from_step']})" if r.get("resumed_from_step") else "")]
    if r.get("loss"):
        lines.append(f"  loss:    {r['loss']['first']:.4f} -> {r['loss']['last']:.4f}")
    lines.append(f"  seconds: {secs['spent_seconds']:.1f} spent of {secs['budget_seconds']:.0f} budget "
                 f"(predicted {secs['predicted_seconds']:.1f})")
    if r["status"] == "preempted":
        lines.append(f"  resume:  edge-unisd adapt --once (checkpoint {r['checkpoint']})")
    else:
        lines.append(f"  adapter: {r['adapter']['version']} at {r['adapter']['path']}")
    return "\n".join(lines)


def cmd_eval(args: argparse.Namespace) -> int:
    home = Home.resolve(args.home).require()
    from daemon.jobs import AdaptError, evaluate_current  # imports torch: only here

    progress = _progress_line()
    try:
        result = evaluate_current(home, progress=progress)
    except AdaptError as e:
        raise CliError(str(e)) from None
    finally:
        if progress is not None:
            sys.stderr.write("\n")
    if args.json:
        _print_json(result)
        return 0
    m = result["metrics"]

    def fmt(x: float | None, spec: str = ".4f") -> str:
        return "n/a" if x is None else format(x, spec)

    print(f"adapter:   {result['adapter'] or 'none (base model)'}")
    print(f"fit:       {fmt(m['fit_nll'])} nats/token NLL of {m['fit_items']} held-out reference answers "
          "(lower is better)")
    print(f"retention: {fmt(m['retention_jsd'])} JSD vs base on general prompts "
          f"(bound {result['bounds']['max_retention_jsd']:g})")
    print(f"accuracy:  {fmt(m['accuracy'], '.1%')} of {m['accuracy_items']} checked held-out items")
    return 0


# --- parser

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-unisd", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    home = argparse.ArgumentParser(add_help=False)
    home.add_argument("--home", default=None,
                      help="home directory (default: $EDGE_UNISD_HOME, else $XDG_DATA_HOME/edge-unisd)")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print the result as JSON")

    p = sub.add_parser("init", parents=[home, as_json],
                       help="create the home: settings, database (the model is not loaded)")
    p.add_argument("--base", default=None,
                   help="base model: .gguf file or HF folder (default: the bundled SmolLM2-135M)")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("ingest", parents=[home, as_json],
                       help="add prompts from a JSON Lines file (- for stdin)")
    p.add_argument("file", metavar="FILE|-")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("profile", help="the user's notes every primary teacher view sees")
    psub = p.add_subparsers(dest="action", required=True)
    q = psub.add_parser("set", parents=[home, as_json],
                        help="replace the profile with a UTF-8 text file (- for stdin)")
    q.add_argument("file", metavar="FILE|-")
    psub.add_parser("show", parents=[home, as_json], help="print the profile")
    psub.add_parser("clear", parents=[home, as_json], help="remove the profile")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("status", parents=[home, as_json], help="items, adapter, last round, gates")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("forget", parents=[home, as_json],
                       help="delete items and what was derived from them; mark adapters trained on them")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", action="append", help="an item id (repeatable)")
    which.add_argument("--before", metavar="DATE",
                       help="items received before this ISO date/time (local time)")
    which.add_argument("--all", action="store_true", help="every item")
    p.set_defaults(func=cmd_forget)

    p = sub.add_parser("adapt", parents=[home, as_json],
                       help="run one adaptation round now: train, evaluate, promote or reject")
    p.add_argument("--once", action="store_true", help="run one round and exit (required)")
    p.add_argument("--max-seconds", type=float, default=None, metavar="S",
                   help="training budget of this round (default: round_budget_seconds of the settings)")
    p.add_argument("--max-items", type=int, default=None, metavar="N", help="train on at most N items")
    p.add_argument("--preset", default=None, help="method preset (default: the settings' preset)")
    p.add_argument("--force", action="store_true",
                   help="ignore the gates (power, load, windows), not the budget")
    p.set_defaults(func=cmd_adapt)

    p = sub.add_parser("eval", parents=[home, as_json],
                       help="gate metrics of the current adapter on the held-out items")
    p.set_defaults(func=cmd_eval)

    demo = sub.add_parser("demo", help="end-to-end UniSD adaptation of the bundled model on sample items")
    demo.add_argument("--home", default=None, help="home directory (default: a temporary one)")
    demo.add_argument("--json", action="store_true", help="print the result as JSON")
    demo.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the demo's own)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from daemon.demo import main as demo_main

        return demo_main(args)
    try:
        return args.func(args)
    except USER_ERRORS as e:
        print(f"edge-unisd: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. a home on a read-only or full disk
        where = f"{e.filename}: " if e.filename else ""
        print(f"edge-unisd: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
