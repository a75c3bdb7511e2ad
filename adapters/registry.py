"""Versioned adapter folders on disk: `root/v0001/`, `root/v0002/`, ... and a `CURRENT` pointer.

Each version holds PEFT's files (adapter_config.json, adapter_model.safetensors) and `meta.json`
(version, parent, base fingerprint, config, trained item ids, metrics, created, status, reason).
A version appears by one directory rename (`atomic_dir`), so a crash never leaves a half version
that `list()` could show; the weights are never rewritten, only meta.json is replaced atomically
on a status change. `CURRENT` is one small file replaced atomically: the version servers should use.

Statuses: candidate (trained, not judged) -> promoted (current) | rejected; a promoted version
that another one replaces becomes retired. Any promoted/retired version can be rolled back to,
unless it was trained on items the user has since asked to forget.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from edge_unisd.atomic_io import (
    atomic_dir,
    atomic_write_json,
    atomic_write_text,
    ensure_private_dir,
    remove_stale_temps,
)

log = logging.getLogger(__name__)

Status = Literal["candidate", "promoted", "rejected", "retired"]
STATUSES = ("candidate", "promoted", "rejected", "retired")
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
META = "meta.json"
CURRENT = "CURRENT"
_VERSION_RE = re.compile(r"^v(\d{4,})$")


class RegistryError(RuntimeError):
    """A registry operation the user asked for cannot be done; the message says why and what to do."""


@dataclass
class AdapterVersion:
    """One version as stored in its meta.json; `path` is the PEFT adapter folder."""

    version: str
    path: Path
    status: Status
    created: str
    metrics: dict[str, Any] = field(default_factory=dict)
    parent: str | None = None
    base_fingerprint: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    item_ids: list[str] = field(default_factory=list)
    reason: str = ""
    trained_on_forgotten: bool = False

    def to_json(self) -> dict[str, Any]:
        """What `edge-unisd adapters list --json` prints for a version."""
        return {"version": self.version, "path": str(self.path), "status": self.status,
                "created": self.created, "metrics": self.metrics}

    def meta(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("version", "status", "created", "metrics", "parent",
                                            "base_fingerprint", "config", "item_ids", "reason",
                                            "trained_on_forgotten")}
        return d


def normalize_version(v: str | int) -> str:
    """Accept 3, "3", "v3", "v0003" -> "v0003"."""
    s = str(v).strip()
    m = re.fullmatch(r"v?(\d+)", s)
    if not m:
        raise RegistryError(f"{v!r} is not an adapter version; use e.g. v0003 (see `edge-unisd adapters list`)")
    return f"v{int(m.group(1)):04d}"


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class AdapterRegistry:
    """The adapter versions under `root`. Safe across processes: writers take an flock on `root/.lock`."""

    def __init__(self, root: str | os.PathLike):
        self.root = ensure_private_dir(root)
        self._lock_path = self.root / ".lock"
        # clean leftovers of crashed writes, but only when no other process is writing right now
        with self._lock(blocking=False) as held:
            if held:
                for p in remove_stale_temps(self.root):
                    log.info("removed leftover of an interrupted write: %s", p.name)

    # --- locking

    @contextlib.contextmanager
    def _lock(self, blocking: bool = True) -> Iterator[bool]:
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    # --- reading

    def _read(self, folder: Path) -> AdapterVersion | None:
        """A whole version or None (a folder that is not one is ignored, never half-read)."""
        if not _VERSION_RE.match(folder.name) or not folder.is_dir():
            return None
        if not all((folder / f).is_file() for f in (*PEFT_FILES, META)):
            log.warning("ignoring %s: not a complete adapter version", folder)
            return None
        try:
            meta = json.loads((folder / META).read_text())
        except (OSError, json.JSONDecodeError) as e:
            log.warning("ignoring %s: unreadable %s (%s)", folder, META, e)
            return None
        known = {k: meta[k] for k in AdapterVersion.__dataclass_fields__ if k in meta and k != "path"}
        known["version"] = folder.name
        return AdapterVersion(path=folder, **known)

    def list(self) -> list[AdapterVersion]:
        """Every whole version, oldest first."""
        versions = (self._read(p) for p in sorted(self.root.iterdir()) if _VERSION_RE.match(p.name))
        return sorted((v for v in versions if v is not None), key=lambda v: int(v.version[1:]))

    def get(self, version: str | int) -> AdapterVersion:
        name = normalize_version(version)
        v = self._read(self.root / name)
        if v is None:
            known = ", ".join(x.version for x in self.list()) or "none yet"
            raise RegistryError(f"adapter version {name} not found in {self.root} (versions: {known})")
        return v

    def current(self) -> AdapterVersion | None:
        """The version servers should use; None means the base model alone."""
        pointer = self.root / CURRENT
        if not pointer.is_file():
            return None
        name = pointer.read_text().strip()
        if not name:
            return None
        v = self._read(self.root / name)
        if v is None:
            log.warning("%s points to %s, which is not a whole version; treating as no adapter", pointer, name)
        return v

    # --- writing

    def _next_version(self) -> str:
        numbers = [int(m.group(1)) for p in self.root.iterdir() if (m := _VERSION_RE.match(p.name))]
        return f"v{max(numbers, default=0) + 1:04d}"

    def add(self, source: Any, *, parent: str | None = None, base_fingerprint: str | None = None,
            config: dict[str, Any] | None = None, item_ids: Iterable[str] = (),
            metrics: dict[str, Any] | None = None, status: Status = "candidate", reason: str = "",
            adapter_name: str = "default") -> AdapterVersion:
        """Store a new version from a PeftModel (its `adapter_name` adapter) or a PEFT adapter folder."""
        if status not in STATUSES:
            raise RegistryError(f"status {status!r} is not one of {', '.join(STATUSES)}")
        if status == "promoted":
            raise RegistryError("add a version as a candidate, then promote() it (that moves CURRENT)")
        with self._lock():
            name = self._next_version()
            v = AdapterVersion(version=name, path=self.root / name, status=status, created=_now(),
                               metrics=dict(metrics or {}), parent=normalize_version(parent) if parent else None,
                               base_fingerprint=base_fingerprint, config=dict(config or {}),
                               item_ids=list(item_ids), reason=reason)
            with atomic_dir(v.path) as tmp:
                _save_peft(source, tmp, adapter_name)
                atomic_write_json(tmp / META, v.meta())
        log.info("stored adapter %s (%s)", name, status)
        return v

    def _update(self, v: AdapterVersion, **changes: Any) -> AdapterVersion:
        for k, val in changes.items():
            setattr(v, k, val)
        atomic_write_json(v.path / META, v.meta())
        return v

    def _set_current(self, name: str | None) -> None:
        pointer = self.root / CURRENT
        if name is None:
            pointer.unlink(missing_ok=True)
        else:
            atomic_write_text(pointer, name + "\n")

    def promote(self, version: str | int, reason: str = "") -> AdapterVersion:
        """Make a candidate (or retired) version current; the previous current one becomes retired."""
        with self._lock():
            v = self.get(version)
            self._check_usable(v, "promote")
            return self._make_current(v, reason or "promoted")

    def rollback(self, version: str | int, *, force: bool = False) -> AdapterVersion | None:
        """Make `version` current again ("base" or "none": no adapter at all).

        A rejected version needs `force=True`; one trained on forgotten items is never served again.
        """
        with self._lock():
            if str(version).lower() in ("base", "none"):
                cur = self.current()
                if cur is not None:
                    self._update(cur, status="retired", reason="rolled back to the base model")
                self._set_current(None)
                return None
            v = self.get(version)
            if v.status == "rejected" and not force:
                raise RegistryError(f"{v.version} was rejected ({v.reason or 'no reason recorded'}); "
                                    "roll back to it only with --force")
            self._check_usable(v, "roll back to", allow_rejected=True)
            cur = self.current()
            return self._make_current(v, f"rolled back from {cur.version if cur else 'the base model'}")

    def _check_usable(self, v: AdapterVersion, action: str, allow_rejected: bool = False) -> None:
        if v.trained_on_forgotten:
            raise RegistryError(f"cannot {action} {v.version}: it was trained on items you asked to forget")
        if v.status == "rejected" and not allow_rejected:
            raise RegistryError(f"cannot {action} {v.version}: it was rejected ({v.reason}); "
                                "use rollback with --force to serve it anyway")

    def _make_current(self, v: AdapterVersion, reason: str) -> AdapterVersion:
        cur = self.current()
        if cur is not None and cur.version != v.version:
            self._update(cur, status="retired", reason=f"replaced by {v.version}")
        self._update(v, status="promoted", reason=reason)
        self._set_current(v.version)
        return v

    def reject(self, version: str | int, reason: str) -> AdapterVersion:
        """Mark a version as not good enough (kept on disk for inspection until pruned)."""
        with self._lock():
            v = self.get(version)
            cur = self.current()
            if cur is not None and cur.version == v.version:
                raise RegistryError(f"{v.version} is the current adapter; roll back to another version first")
            return self._update(v, status="rejected", reason=reason)

    def record_metrics(self, version: str | int, **metrics: Any) -> AdapterVersion:
        """Merge `metrics` into a version's metrics (e.g. export=verify report)."""
        with self._lock():
            v = self.get(version)
            return self._update(v, metrics={**v.metrics, **metrics})

    def prune(self, keep: int) -> list[str]:
        """Delete all but the `keep` newest versions; the current one is always kept. Returns the removed."""
        if keep < 0:
            raise RegistryError(f"keep must be >= 0 (got {keep})")
        removed = []
        with self._lock():
            versions = self.list()
            cur = self.current()
            doomed = versions[:-keep] if keep else versions
            for v in doomed:
                if cur is not None and v.version == cur.version:
                    continue
                # rename first (atomic: list() never sees a half-deleted version), then delete
                trash = Path(tempfile.mkdtemp(prefix=f".{v.version}.", suffix=".tmp", dir=self.root))
                os.replace(v.path, trash / v.version)
                shutil.rmtree(trash, ignore_errors=True)
                removed.append(v.version)
        if removed:
            log.info("pruned adapter versions %s", ", ".join(removed))
        return removed

    def mark_trained_on_forgotten(self, item_ids: Iterable[str]) -> list[AdapterVersion]:
        """Flag every version trained on any of `item_ids`; the ids themselves are dropped from meta.

        The current version is flagged too; the caller decides what to serve instead (retrain, or
        `rollback("base")`). Flagged versions can no longer be promoted or rolled back to.
        """
        forgotten = set(item_ids)
        hit = []
        with self._lock():
            for v in self.list():
                overlap = forgotten.intersection(v.item_ids)
                if not overlap:
                    continue
                kept = [i for i in v.item_ids if i not in forgotten]
                note = f"trained on {len(overlap)} forgotten item(s)"
                status = v.status if v.status in ("promoted", "rejected") else "retired"
                hit.append(self._update(v, trained_on_forgotten=True, item_ids=kept, status=status,
                                        reason=f"{v.reason}; {note}" if v.reason else note))
        return hit


def _save_peft(source: Any, target: Path, adapter_name: str) -> None:
    """Put exactly PEFT's adapter files into `target` (from a PeftModel or an adapter folder)."""
    if isinstance(source, (str, os.PathLike)):
        src = Path(source)
        missing = [f for f in PEFT_FILES if not (src / f).is_file()]
        if missing:
            raise RegistryError(f"{src} is not a PEFT adapter folder: missing {', '.join(missing)}")
        for f in PEFT_FILES:
            shutil.copyfile(src / f, target / f)
        return
    if not hasattr(source, "save_pretrained") or not hasattr(source, "peft_config"):
        raise RegistryError(f"cannot store a {type(source).__name__}: give a PeftModel or an adapter folder")
    if adapter_name not in source.peft_config:
        raise RegistryError(f"the model has no adapter {adapter_name!r} (has: {', '.join(source.peft_config)})")
    scratch = target / ".peft"
    source.save_pretrained(str(scratch), selected_adapters=[adapter_name])
    # PEFT writes the default adapter at the top and any other one under a subfolder of its name
    found = next(p.parent for p in scratch.rglob("adapter_config.json"))
    for f in PEFT_FILES:
        os.replace(found / f, target / f)
    shutil.rmtree(scratch)
