"""Adapter versions on the daemon's side: the registry, the store's mirror of it, forgetting, GGUF export.

The adapter registry (`adapters.registry`, under `home.adapters`) is the truth about versions: which
exist whole on disk, which one is current, what each was trained on. The store keeps a row per version
(same version string) for `status`, `report` and lineage queries; `sync_store` brings the rows in step
after every registry change, so a crash between the two writes is repaired by the next sync.

Export: after a promotion, a rollback or on `edge-unisd export`, `adapters.export.export_adapter` merges,
writes, verifies and publishes `exports/current.gguf` atomically. The last attempt on the published
location is kept in the store's meta (`status` shows it), which also lets the daemon's export job
finish an export that a crash interrupted, and not retry one that verification refused.

Nothing here imports torch at module level: the daemon's main process uses these helpers without
loading a model; the export itself runs where it is called (a child process in the daemon).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from adapters.registry import AdapterRegistry, AdapterVersion
from daemon.home import Home
from daemon.settings import DaemonSettings
from daemon.store import Store, utcnow

log = logging.getLogger(__name__)

EXPORT_META = "export"  # store meta: the last export attempt on home.exports (what `status` shows)
BASE_LABEL = "base"  # the "version" of an export without an adapter (after `rollback base`)


def registry_of(home: Home) -> AdapterRegistry:
    return AdapterRegistry(home.adapters)


# --- the store's mirror of the registry ----------------------------------------------------------

def _created(v: AdapterVersion) -> dt.datetime:
    try:
        when = dt.datetime.fromisoformat(v.created)
    except (TypeError, ValueError):
        return utcnow()
    return when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)


def sync_store(store: Store, registry: AdapterRegistry) -> None:
    """Make the store's adapter_versions rows say what the registry says: missing rows added, statuses and
    metrics copied, rows of versions no longer on disk marked "pruned"."""
    rows = {r.version: r for r in store.adapter_versions()}
    for v in registry.list():
        row = rows.pop(v.version, None)
        if row is None:
            store.add_adapter_version(v.version, v.path, parent=v.parent, status=v.status, metrics=v.metrics,
                                      created=_created(v))
        elif row.status != v.status or (row.metrics or {}) != v.metrics:
            store.set_adapter_status(v.version, v.status, metrics=v.metrics)
    for version, row in rows.items():
        if row.status != "pruned":
            store.set_adapter_status(version, "pruned")


def version_summary(v: AdapterVersion | None) -> dict[str, Any] | None:
    """The current adapter as `status --json` shows it."""
    if v is None:
        return None
    verdict = v.metrics.get("verdict") or {}
    return {**v.to_json(), "parent": v.parent, "reason": v.reason or verdict.get("reason"),
            "trained_on_forgotten": v.trained_on_forgotten,
            "base_quantization": (v.config or {}).get("base_quantization", "none"),
            "compute_dtype": (v.config or {}).get("compute_dtype", "float32")}  # versions before the field: fp32


# --- forgetting ----------------------------------------------------------------------------------

def forget_items(home: Home, store: Store, *, ids: Sequence[str] | None = None,
                 before: dt.datetime | None = None, all: bool = False) -> dict[str, Any]:
    """Delete items (and their rollouts) from the store and flag every adapter version trained on them, in
    the store and in the registry. Returns what was done, JSON-ready."""
    if ids is not None:
        doomed = list(dict.fromkeys(ids))
    else:
        doomed = [it.id for it in store.get_items()
                  if all or (before is not None and it.extra["received_at"] < before)]
    report = store.forget(ids=ids, before=before, all=all)
    registry = registry_of(home)
    flagged = [v.version for v in registry.mark_trained_on_forgotten(doomed)] if doomed else []
    sync_store(store, registry)
    current = registry.current()
    return {**report.to_dict(), "registry_marked": flagged,
            "current_trained_on_forgotten": current.version if current and current.trained_on_forgotten else None}


# --- export --------------------------------------------------------------------------------------

def last_export(store: Store) -> dict[str, Any] | None:
    """The last export attempt on home.exports: {version, quant, format, ok, gguf, error, verify, at}."""
    return store.get_meta(EXPORT_META)


def _record(store: Store, version: str, quant: str, fmt: str, *, ok: bool, gguf: str | None = None,
            error: str | None = None, refused: bool = False, verify: dict | None = None) -> dict[str, Any]:
    entry = {"version": version, "quant": quant, "format": fmt, "ok": ok, "gguf": gguf, "error": error,
             "refused": refused, "verify": verify, "at": utcnow().isoformat(timespec="seconds")}
    store.set_meta(EXPORT_META, entry)
    return entry


def _verify_brief(report: Any) -> dict[str, Any]:
    d = report.to_dict()
    return {k: d[k] for k in ("passed", "top1", "kl", "bar") if k in d} or d


def export_adapter_dir(home: Home, settings: DaemonSettings, adapter_dir: Path | None, *, base: Any = None,
                       quant: str | None = None, fmt: str = "merged", out: Path | None = None,
                       registry: AdapterRegistry | None = None, version: str | None = None) -> dict[str, Any]:
    """Export `adapter_dir` (None: the base alone) merged into the base; raises ExportRefused/ExportError.

    `out`: a directory to publish into (default home.exports, whose attempts are recorded for `status`),
    or a path ending in .gguf that receives the verified file (nothing else is left beside it).
    `base`: a BaseSource or spec (default: the settings' base model, or the test hook's tiny model).
    """
    from adapters.export import ExportRefused, export_adapter
    from daemon.jobs import base_source

    quant = quant or settings.export_quant
    base = base if base is not None else base_source(settings.base_model)
    out = Path(out) if out is not None else home.exports
    label = version or (Path(adapter_dir).name if adapter_dir is not None else BASE_LABEL)
    if out.suffix.lower() == ".gguf":
        return _export_to_file(base, adapter_dir, out, quant, fmt, registry)
    published = out.resolve() == home.exports.resolve()
    try:
        result = export_adapter(base, adapter_dir, out, quant=quant, fmt=fmt, registry=registry)
    except ExportRefused as e:
        if published:
            with Store.open(home) as store:
                _record(store, label, quant, fmt, ok=False, error=str(e), refused=True,
                        verify=_verify_brief(e.report))
        raise
    d = result.to_dict()
    if published and fmt == "merged":
        with Store.open(home) as store:
            _record(store, label, quant, fmt, ok=True, gguf=d["gguf"], verify=_verify_brief(result.verify))
    return d


def _export_to_file(base: Any, adapter_dir: Path | None, target: Path, quant: str, fmt: str,
                    registry: AdapterRegistry | None) -> dict[str, Any]:
    """Export into a private scratch folder beside `target`, then move the verified file onto it."""
    from adapters.export import export_adapter

    parent = target.parent.resolve()
    if not parent.is_dir():
        raise FileNotFoundError(f"the folder of --out {target} does not exist; create it first")
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent))
    try:
        result = export_adapter(base, adapter_dir, scratch, quant=quant, fmt=fmt, registry=registry, keep_builds=1)
        os.replace(result.gguf, target)  # same filesystem: the verified file appears whole, or not at all
        d = result.to_dict()
        d.update(gguf=str(target.resolve()), build=None, modelfile=None)
        return d
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def export_after_promotion(home: Home, settings: DaemonSettings, version: str, adapter_dir: Path, *,
                           base: Any = None) -> dict[str, Any]:
    """Export a just-promoted version to home.exports. Never raises: a refused or failed export keeps the
    previous current.gguf and is reported in the returned dict ("error"), not fatal to the round."""
    from adapters.export import ExportRefused

    try:
        return export_adapter_dir(home, settings, adapter_dir, base=base, registry=registry_of(home),
                                  version=version)
    except ExportRefused as e:
        log.warning("export of %s refused: %s", version, e)
        return {"error": str(e), "refused": True, "verify": _verify_brief(e.report),
                "kept": str(home.exports / "current.gguf") if (home.exports / "current.gguf").exists() else None}
    except Exception as e:  # noqa: BLE001 - the promotion stands; status and the export job show this
        log.warning("export of %s failed: %s: %s", version, type(e).__name__, e)
        with Store.open(home) as store:
            _record(store, version, settings.export_quant, "merged", ok=False, error=f"{type(e).__name__}: {e}")
        return {"error": f"{type(e).__name__}: {e}", "refused": False}


def export_needed(home: Home, settings: DaemonSettings) -> tuple[str | None, Path | None] | None:
    """What the export job should export now, as (version label, adapter folder), or None for nothing.

    The current version when the last attempt was another version or quant, or its file is gone; the
    base alone after `rollback base` (only if something was exported before). A refused export of the
    same version and quant is not retried (verification is deterministic; `edge-unisd export` forces it).
    """
    current = registry_of(home).current()
    with Store.open(home) as store:
        last = last_export(store)
    label = current.version if current is not None else BASE_LABEL
    if current is None and (last is None or last.get("version") == BASE_LABEL):
        return None
    if last is not None and last.get("version") == label and last.get("quant") == settings.export_quant:
        if last.get("refused") or (last.get("ok") and last.get("gguf") and Path(last["gguf"]).exists()):
            return None
    return label, (current.path if current is not None else None)
