"""What each round was predicted to cost, what it spent, and what the gates said: an append-only record.

One JSON object per line, fsynced on every append, file 0600. A crash mid-append can leave a
torn last line: the next append starts on a fresh line and `entries()` skips the torn one
with a warning naming the file and line, so one bad write never hides the rest.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import Any

from edge_unisd.atomic_io import PRIVATE_FILE_MODE, ensure_private_dir, fsync_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LedgerEntry:
    round_id: str
    started: datetime
    predicted_seconds: float
    spent_seconds: float
    items: int  # items trained on
    view_items: int  # of them, items that got the K auxiliary views
    gates: str  # GateDecision.summary() when the round started, e.g. "open" or "closed: power: ..."
    budget_seconds: float | None = None
    stopped_reason: str | None = None  # set when the round was preempted

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["started"] = self.started.isoformat()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LedgerEntry:
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}  # newer writers may add fields
        kwargs["started"] = datetime.fromisoformat(kwargs["started"])
        return cls(**kwargs)


class JsonlLedger:
    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def append(self, entry: LedgerEntry) -> None:
        """Append one line and fsync it before returning."""
        line = json.dumps(entry.to_dict(), sort_keys=True, ensure_ascii=False) + "\n"
        created = not self.path.exists()
        if not self.path.parent.exists():
            ensure_private_dir(self.path.parent)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, PRIVATE_FILE_MODE)
        try:
            os.fchmod(fd, PRIVATE_FILE_MODE)
            if not created and not _ends_with_newline(self.path):
                line = "\n" + line  # a torn last line from a crash: do not glue this entry to it
            os.write(fd, line.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            fsync_dir(self.path.parent)

    def entries(self) -> list[LedgerEntry]:
        """Every readable entry, oldest first; [] when the ledger does not exist yet."""
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return []
        out = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                out.append(LedgerEntry.from_dict(json.loads(line)))
            except (ValueError, TypeError, KeyError) as e:
                log.warning("%s:%d: skipping unreadable ledger line (%s)", self.path, lineno,
                            type(e).__name__)
        return out

    def last(self) -> LedgerEntry | None:
        entries = self.entries()
        return entries[-1] if entries else None


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return True
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"
