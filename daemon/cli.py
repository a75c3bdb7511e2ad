"""`edge-unisd` command line. Errors a user can meet are printed without a traceback, exit code 2.

Every command takes `--home DIR` (default: $EDGE_UNISD_HOME, else $XDG_DATA_HOME/edge-unisd);
every command that reports takes `--json`. `ingest` exits 1 when some rows were rejected.
Long commands (adapt, eval, export, demo) show a one-line live status on stderr when it is a terminal.
Commands that need torch import it lazily, so `status`, `ingest` and friends stay quick.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from daemon.home import Home, HomeError
from daemon.ingest import IngestError, ingest_file
from daemon.lifecycle import AlreadyRunning, lock_holder
from daemon.settings import SettingsError, load_settings, write_default_settings
from daemon.store import Store, StoreError

# Before anything can import huggingface_hub (the imports above do not): never reach a hub at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

MAX_PROFILE_CHARS = 32_000  # the profile is in every primary teacher prompt


class CliError(RuntimeError):
    """A problem the user can fix; printed as one line, exit code 2."""


USER_ERRORS = (CliError, HomeError, SettingsError, IngestError, StoreError, AlreadyRunning)


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


def _gates(settings) -> dict[str, Any]:
    """Each gate's state now, from this machine's sensors and the settings' [budget] table."""
    from budgets.gates import BudgetConfigError, evaluate_gates, load_budget_config
    from budgets.sensors import now, read_sensors
    from budgets.windows import next_start_any

    try:
        cfg = load_budget_config(settings.budget)
    except BudgetConfigError as e:
        raise CliError(f"settings.toml [budget]: {e}") from None
    decision = evaluate_gates(read_sensors(), cfg)
    nxt = next_start_any(cfg.time_windows(), now())
    return {**decision.to_dict(), "summary": decision.summary(),
            "next_window": nxt.isoformat(timespec="minutes") if nxt else None}


def status_dict(home: Home, store: Store) -> dict[str, Any]:
    """What `status --json` prints; the daemon's own status line reads the same sources."""
    from daemon.exporting import last_export, registry_of, version_summary

    settings = load_settings(home.settings)
    counts = store.count_items()
    registry = registry_of(home)
    versions = registry.list()
    last = store.last_round()
    profile = store.get_profile() or ""
    incoming = sum(1 for p in home.incoming.iterdir() if p.is_file()) if home.incoming.is_dir() else 0
    return {
        "home": str(home.root),
        "base": store.get_meta("base"),
        "items": {"total": counts.total, "pending": counts.pending, "held_out": counts.held_out},
        "profile": {"chars": len(profile)},
        "adapter": {"current": version_summary(registry.current()), "versions": len(versions),
                    "trained_on_forgotten": [v.version for v in versions if v.trained_on_forgotten]},
        "gates": _gates(settings),
        "last_round": last.to_dict() if last else None,
        "export": last_export(store),
        "daemon": {"pid": lock_holder(home.root)},
        "spool": {"incoming": incoming},
        "settings": {"preset": settings.preset, "collect": settings.collect, "export_quant": settings.export_quant,
                     "round_budget_seconds": settings.round_budget_seconds,
                     "base_quantization": settings.base_quantization, "compute_dtype": settings.compute_dtype},
    }


def _fmt(x: Any, spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def cmd_status(args: argparse.Namespace) -> int:
    home, store = _open(args)
    with store:
        s = status_dict(home, store)
    if args.json:
        _print_json(s)
        return 0
    last, cur, exp, gates = s["last_round"], s["adapter"]["current"], s["export"], s["gates"]
    print(f"home:        {s['home']}")
    pid = s["daemon"]["pid"]
    print(f"daemon:      {'not running' if pid is None else f'running, pid {pid}'}")
    print(f"items:       {s['items']['total']} stored, {s['items']['pending']} waiting, "
          f"{s['items']['held_out']} held out for evaluation")
    print(f"profile:     {s['profile']['chars']} characters")
    now = f"{cur['version']} ({cur['reason'] or cur['status']})" if cur else "none yet (base model)"
    # what this version was trained on and in, not the settings
    quantized, dtype = (cur["base_quantization"], cur["compute_dtype"]) if cur else ("none", "float32")
    print(f"adapter:     {now}; {s['adapter']['versions']} version(s) on disk"
          + ("" if quantized == "none" else f"; trained on an {quantized} base (QLoRA)")
          + ("" if dtype == "float32" else f"; trained in {dtype}"))
    if last:
        m = last.get("metrics") or {}
        fit = (m.get("before") or {}).get("fit_nll"), (m.get("after") or {}).get("fit_nll")
        cost = last.get("cost") or {}
        started = dt.datetime.fromisoformat(last["started_at"]).astimezone().strftime("%Y-%m-%d %H:%M")
        print(f"last round:  #{last['id']} {last['status']}, started {started}, {last['n_items']} items"
              + (f", held-out fit {_fmt(fit[0])} -> {_fmt(fit[1])}" if fit[1] is not None else "")
              + (f", {cost['spent_seconds']:.0f} s" if cost.get("spent_seconds") is not None else ""))
    else:
        print("last round:  none yet")
    window = f"; next window {gates['next_window']}" if gates["next_window"] else ""
    print(f"gates:       {gates['summary']}{window}")
    if exp:
        state = "ok" if exp["ok"] else ("refused" if exp.get("refused") else "failed")
        print(f"export:      {exp['version']} {exp['quant']} {state}: {exp['gguf'] or exp['error']}")
    else:
        print("export:      none yet")
    print(f"spool:       {s['spool']['incoming']} file(s) waiting in {home.incoming}")
    print(f"collect:     {'on' if s['settings']['collect'] else 'off'}")
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    from daemon.exporting import forget_items
    from daemon.spool import purge_processed

    before = _parse_when(args.before) if args.before else None
    home, store = _open(args)
    with store:
        result = forget_items(home, store, ids=args.id, before=before, all=args.all)
    # the processed spool files are copies of the prompts: they go too (by id they cannot be told apart)
    purged = purge_processed(home, before.timestamp() if before else None) if (args.all or before) else 0
    result["spool_files_removed"] = purged
    if args.json:
        _print_json(result)
        return 0
    print(f"forgot {result['items']} item(s) and {result['rollouts']} rollout(s)"
          + (f"; removed {purged} processed spool file(s)" if purged else ""))
    if args.id and result["items"] < len(set(args.id)):
        print(f"{len(set(args.id)) - result['items']} of the given ids were not stored")
    marked = sorted(set(result["marked_versions"]) | set(result["registry_marked"]))
    if marked:
        print("adapter versions trained on them, now marked (no longer promoted or rolled back to): "
              + ", ".join(marked))
    if result["current_trained_on_forgotten"]:
        print(f"the current adapter {result['current_trained_on_forgotten']} was trained on them: retrain without "
              "them (edge-unisd adapt --once --force) or serve the base model (edge-unisd rollback base)")
    return 0


class LiveStatus:
    """A one-line live status on stderr when it is a terminal: the latest message and the seconds since it
    came, redrawn twice a second (a model load or an export gives no messages for a minute). Off a terminal
    it prints nothing: the logs say the rest. Use as a context manager; call it with each message."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self._msg, self._since = "", time.monotonic()
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def __call__(self, msg: str) -> None:
        with self._lock:
            self._msg, self._since = msg, time.monotonic()
        self._draw()

    def _draw(self) -> None:
        if not self.enabled:
            return
        with self._lock:
            elapsed = time.monotonic() - self._since
            text = self._msg[:160] + (f"  ({elapsed:.0f} s)" if elapsed >= 2 else "")
        self.stream.write("\r\033[K" + text)
        self.stream.flush()

    def _tick(self) -> None:
        while not self._done.wait(0.5):
            self._draw()

    def __enter__(self) -> LiveStatus:
        if self.enabled:
            self._thread = threading.Thread(target=self._tick, name="edge-unisd-status", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join(1.0)
            self.stream.write("\r\033[K")
            self.stream.flush()


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

    try:
        with _graceful_stop() as stop_requested, LiveStatus() as progress:
            result = adapt_once(home, max_seconds=args.max_seconds, max_items=args.max_items,
                                preset=args.preset, force=args.force, should_stop=stop_requested,
                                progress=progress)
    except AdaptError as e:
        raise CliError(str(e)) from None
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
        export = r.get("export")
        if export and export.get("error"):
            lines.append(f"  export:  not published: {export['error']}")
        elif export:
            lines.append(f"  export:  {export['gguf']} ({export['quant']}, verified)")
    return "\n".join(lines)


def cmd_eval(args: argparse.Namespace) -> int:
    home = Home.resolve(args.home).require()
    from daemon.jobs import AdaptError, evaluate_current  # imports torch: only here

    try:
        with LiveStatus() as progress:
            result = evaluate_current(home, progress=progress)
    except AdaptError as e:
        raise CliError(str(e)) from None
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


def _registry(home: Home):
    from daemon.exporting import registry_of

    return registry_of(home)


def cmd_export(args: argparse.Namespace) -> int:
    home = Home.resolve(args.home).require()
    settings = load_settings(home.settings)
    from adapters.gguf_export import ExportError
    from adapters.merge import MergeError
    from adapters.registry import RegistryError
    from daemon.exporting import export_adapter_dir
    from daemon.jobs import AdaptError

    registry = _registry(home)
    if args.adapter:
        adapter = Path(args.adapter).expanduser()
        if not adapter.is_dir():
            raise CliError(f"--adapter {adapter}: no such folder; give a PEFT adapter folder "
                           "(see `edge-unisd adapters list` for this home's versions)")
        version = adapter.name if adapter.resolve().parent == registry.root.resolve() else None
    else:
        current = registry.current()
        adapter, version = (current.path, current.version) if current else (None, None)
    out = Path(args.out).expanduser() if args.out else None
    quant = args.quant or ("f16" if args.format == "lora" else settings.export_quant)  # a LoRA GGUF: f16/f32
    what = version or (str(adapter) if adapter else "the base model (no adapter yet)")
    try:
        with LiveStatus() as progress:
            progress(f"exporting {what}: merge, write {quant} GGUF, verify with llama.cpp...")
            result = export_adapter_dir(home, settings, adapter, quant=quant, fmt=args.format, out=out,
                                        registry=registry, version=version)
    except (ExportError, MergeError, RegistryError, AdaptError) as e:
        raise CliError(str(e)) from None
    if args.json:
        _print_json(result)
        return 0
    v = result["verify"]
    print(f"exported {what} -> {result['gguf']} ({result['quant']}, {result['format']})")
    print(f"  verified with llama.cpp: top-1 agreement {v['top1']:.3f}, mean KL {v['mean_kl']:.5f} "
          f"over {v['n_positions']} positions; chat template {'ok' if v['template_ok'] else 'MISMATCH'}")
    if result.get("modelfile"):
        print(f"  Ollama: ollama create my-model -f {result['modelfile']}")
    return 0


def cmd_adapters(args: argparse.Namespace) -> int:
    home = Home.resolve(args.home).require()
    registry = _registry(home)
    versions = registry.list()
    current = registry.current()
    if args.json:
        _print_json([v.to_json() for v in versions])
        return 0
    if not versions:
        print("no adapter versions yet (edge-unisd adapt --once makes one)")
        return 0
    print(f"{'':2s}{'version':8s} {'status':9s} {'created':25s} {'fit before':>10s} {'after':>7s} "
          f"{'ret. JSD':>8s}  reason")
    for v in versions:
        m = v.metrics
        before, after = m.get("before") or {}, m.get("after") or {}
        mark = "* " if current is not None and v.version == current.version else "  "
        flag = " [trained on forgotten items]" if v.trained_on_forgotten else ""
        print(f"{mark}{v.version:8s} {v.status:9s} {v.created:25s} {_fmt(before.get('fit_nll')):>10s} "
              f"{_fmt(after.get('fit_nll')):>7s} {_fmt(after.get('retention_jsd'), '.4f'):>8s}  "
              f"{(v.reason or '')[:80]}{flag}")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    home = Home.resolve(args.home).require()
    from adapters.registry import RegistryError
    from daemon.exporting import sync_store

    registry = _registry(home)
    try:
        v = registry.rollback(args.version, force=args.force)
    except RegistryError as e:
        raise CliError(str(e)) from None
    with Store.open(home) as store:
        sync_store(store, registry)
    now = v.version if v else "the base model"
    result: dict[str, Any] = {"current": v.to_json() if v else None, "export": None}
    note = ""
    if args.export:
        from daemon.exporting import export_adapter_dir, export_after_promotion, export_needed

        settings = load_settings(home.settings)
        todo = export_needed(home, settings)
        if todo is not None:
            with LiveStatus() as progress:
                progress(f"exporting {now} to {home.exports / 'current.gguf'}...")
                if v is None:
                    try:
                        result["export"] = export_adapter_dir(home, settings, None)
                    except Exception as e:  # noqa: BLE001 - reported; the daemon's export job retries
                        result["export"] = {"error": f"{type(e).__name__}: {e}"}
                else:
                    result["export"] = export_after_promotion(home, settings, v.version, v.path)
    elif lock_holder(home.root) is None:
        note = f" ({home.exports / 'current.gguf'} is unchanged: the daemon's export job, or `edge-unisd export`, " \
               "updates it)"
    if args.json:
        _print_json(result)
        return 0
    print(f"current adapter: {now}{note}")
    export = result["export"]
    if export:
        print(f"  export: {export.get('error') or export['gguf']}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from daemon.service import main as run_main

    if args.first_round_after is not None and args.first_round_after < 0:
        raise CliError(f"--first-round-after must be >= 0 seconds (got {args.first_round_after:g})")
    return run_main(args)


def _optional(module: str, what: str, extra: str):
    """The `main` of a command module that may be absent (or lack its optional dependencies)."""
    import importlib

    try:
        return importlib.import_module(module).main
    except ImportError as e:
        raise CliError(f"`edge-unisd {what}` is not available: {e}; install it with "
                       f"pip install 'edge-unisd[{extra}]'") from None


def cmd_serve(args: argparse.Namespace) -> int:
    return _optional("daemon.serve", "serve", "serve")(args)


def cmd_report(args: argparse.Namespace) -> int:
    return _optional("daemon.report", "report", "report")(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from daemon.demo import main as demo_main

    return demo_main(args)


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

    p = sub.add_parser("export", parents=[home, as_json],
                       help="merge an adapter into the base, write GGUF, verify it with llama.cpp, publish it")
    p.add_argument("--adapter", metavar="DIR", default=None,
                   help="a PEFT adapter folder for this home's base (default: the current version)")
    p.add_argument("--quant", default=None,
                   help="f32, f16, bf16, q8_0, or a llama.cpp K-quant such as q4_k_m (default: export_quant "
                        "of the settings)")
    p.add_argument("--format", choices=("merged", "lora"), default="merged",
                   help="merged: the whole model; lora: the adapter alone as a llama.cpp LoRA GGUF")
    p.add_argument("--out", metavar="PATH", default=None,
                   help="a folder to publish current.gguf in (default: the home's exports/), or a .gguf file")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("adapters", help="the adapter versions of this home")
    asub = p.add_subparsers(dest="action", required=True)
    asub.add_parser("list", parents=[home, as_json], help="every version, its status and metrics")
    p.set_defaults(func=cmd_adapters)

    p = sub.add_parser("rollback", parents=[home, as_json],
                       help="make an earlier adapter version current again ('base': no adapter)")
    p.add_argument("version", metavar="VERSION", help="e.g. v0003 (see `edge-unisd adapters list`), or base")
    p.add_argument("--force", action="store_true", help="allow a version the evaluation gate rejected")
    p.add_argument("--export", action=argparse.BooleanOptionalAction, default=True,
                   help="export it to exports/current.gguf now (default: yes)")
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("run", parents=[home],
                       help="the daemon in the foreground (for systemd): intake, rounds, export, cleanup")
    p.add_argument("--first-round-after", type=float, default=None, metavar="S",
                   help="seconds before the first round may start (default: 60, so a boot is not slowed)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("serve", parents=[home, as_json],
                       help="local OpenAI-compatible endpoint on the current GGUF (llama.cpp)")
    p.add_argument("--host", default=None, help="address to bind (default: serve_host of the settings)")
    p.add_argument("--port", type=int, default=None, help="TCP port (default: serve_port of the settings)")
    p.add_argument("--collect", action=argparse.BooleanOptionalAction, default=None,
                   help="store each exchange as an item (default: collect of the settings)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("report", parents=[home, as_json],
                       help="an HTML report with plots of every round and adapter version")
    p.add_argument("--out", metavar="DIR", default=None, help="where to write it (default: inside the home)")
    p.set_defaults(func=cmd_report)

    demo = sub.add_parser("demo", help="end to end on the bundled model: ingest, one round, evaluate, export, "
                                       "answer with llama.cpp (under 10 minutes on 2 CPU cores)")
    demo.add_argument("--home", default=None, help="home directory (default: a temporary one)")
    demo.add_argument("--json", action="store_true", help="print the result as JSON")
    demo.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the demo's own)")
    demo.set_defaults(func=cmd_demo)
    return parser


# peft asks transformers 5 for `is_gradient_checkpointing` on every adapter load, which warns each time
# about a rename the user can do nothing about.
QUIET_WARNINGS = (r".*`is_gradient_checkpointing` is deprecated.*",)
# bitsandbytes (imported by peft) looks for a hub kernel for its 4-bit CPU path on AVX512-BF16 CPUs and, offline
# by design here, warns twice on every model load before using its own code: nothing the user can act on.
QUIET_LOGGERS = ("kernels", "bitsandbytes.backends.cpu.ops")


def _check_heap_policy() -> None:
    """A typo in EDGE_UNISD_HEAP is a usage error up front, not a traceback when the model loads."""
    from edge_unisd.heap import heap_policy

    try:
        heap_policy()
    except ValueError as e:
        raise CliError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    args = build_parser().parse_args(argv)
    try:
        _check_heap_policy()
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
