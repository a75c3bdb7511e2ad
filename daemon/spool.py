"""The spool: drop a JSON Lines file into `spool/incoming/` and the daemon ingests it, then files it away.

A file is taken only when it looks finished: names starting with "." or ending in ".part" are
skipped (write under such a name, then rename), and a file's size and mtime must be the same on
two looks (two polls of the daemon, or two looks `settle_s` apart). After ingestion the file is
renamed into `done/` (every row good) or `rejected/` (some rows or the whole file bad) with a
`<name>.reason.txt` beside it. The rows are committed before the rename: a crash in between
re-ingests the file next time, and every row is then a duplicate, so nothing is stored twice.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from daemon.home import Home
from daemon.ingest import MAX_FILE_BYTES, IngestError, IngestReport, ingest_file
from daemon.store import Store
from edge_unisd.atomic_io import PRIVATE_FILE_MODE, atomic_write_text, fsync_dir

log = logging.getLogger(__name__)

Signature = tuple[int, int]  # (size, mtime_ns)


@dataclass(frozen=True)
class SpoolReport:
    """One spool file handled: where it went, what ingesting it did (`error`: the file was refused)."""

    name: str
    moved_to: Path
    report: IngestReport | None
    error: str | None = None

    @property
    def accepted(self) -> bool:
        return self.error is None and self.report is not None and self.report.rejected == 0


def _candidates(incoming: Path) -> dict[str, Signature]:
    out: dict[str, Signature] = {}
    for entry in os.scandir(incoming):
        if entry.name.startswith(".") or entry.name.endswith(".part"):
            continue  # still being written, by convention
        if not entry.is_file(follow_symlinks=False):
            continue  # folders and symlinks (which could point anywhere) are not spool files
        st = entry.stat(follow_symlinks=False)
        out[entry.name] = (st.st_size, st.st_mtime_ns)
    return out


def _free_name(directory: Path, name: str) -> Path:
    """`name` in `directory`, or `name.1`, `name.2`, ... if taken (a resent file must not overwrite)."""
    target = directory / name
    n = 0
    while target.exists() or target.with_name(target.name + ".reason.txt").exists():
        n += 1
        target = directory / f"{name}.{n}"
    return target


def _reason_text(name: str, report: IngestReport | None, error: str | None) -> str:
    if error is not None:
        return f"{name}: not ingested: {error}\n"
    assert report is not None
    lines = [report.summary()] + [str(e) for e in report.errors]
    return "\n".join(lines) + "\n"


def _file_away(home: Home, name: str, report: IngestReport | None, error: str | None) -> Path:
    accepted = error is None and report is not None and report.rejected == 0
    target = _free_name(home.done if accepted else home.rejected, name)
    if not accepted:
        atomic_write_text(target.with_name(target.name + ".reason.txt"), _reason_text(name, report, error))
    os.chmod(home.incoming / name, PRIVATE_FILE_MODE)
    os.rename(home.incoming / name, target)  # same file system: atomic
    fsync_dir(home.incoming)
    fsync_dir(target.parent)
    return target


def process_spool(home: Home, store: Store, seen: dict[str, Signature] | None = None, *,
                  settle_s: float = 1.0, held_out_fraction: float = 0.0,
                  max_file_bytes: int = MAX_FILE_BYTES) -> list[SpoolReport]:
    """Ingest and file away every finished file in `spool/incoming`. Returns one report per file handled.

    `seen`: the daemon passes the same dict at every poll; a file is taken when its size and mtime
    equal those of the previous poll (so no waiting here). Without it, this call looks twice,
    `settle_s` apart.
    """
    if seen is None:
        seen = _candidates(home.incoming)
        if seen and settle_s > 0:
            time.sleep(settle_s)
    now = _candidates(home.incoming)
    stable = sorted(name for name, sig in now.items() if seen.get(name) == sig)
    seen.clear()
    seen.update({name: sig for name, sig in now.items() if name not in stable})

    results = []
    for name in stable:
        report: IngestReport | None = None
        error: str | None = None
        try:
            report = ingest_file(store, home.incoming / name, held_out_fraction=held_out_fraction,
                                 max_file_bytes=max_file_bytes)
        except IngestError as e:
            error = str(e)
        if not (home.incoming / name).exists():
            continue  # taken away meanwhile; whatever it held and was read is stored
        try:
            target = _file_away(home, name, report, error)
        except OSError as e:  # left in place: the next poll finds only duplicates in it
            log.warning("spool %s: could not move it out of incoming/: %s", name, e)
            continue
        results.append(SpoolReport(name=name, moved_to=target, report=report, error=error))
        log.info("spool %s -> %s/: %s", name, target.parent.name, error or report.summary())
    return results


def purge_processed(home: Home, before: float | None = None) -> int:
    """Delete files in spool/done and spool/rejected (all, or those last modified before `before`, a
    POSIX time). `forget` uses it: those files still hold the prompts' text. Returns how many were removed."""
    removed = 0
    for directory in (home.done, home.rejected):
        if not directory.is_dir():
            continue
        for entry in os.scandir(directory):
            if entry.is_file(follow_symlinks=False) and (
                    before is None or entry.stat(follow_symlinks=False).st_mtime < before):
                os.unlink(entry.path)
                removed += 1
    return removed
