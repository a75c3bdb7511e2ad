"""Turn JSON Lines from a file, stdin, the spool or an embedding app into stored items, row by row.

Every path uses `edge_unisd.items.IngestRow`, so the rules are the same everywhere. A bad row
never stops the others: it is reported with its line number and why. Input is read as bytes,
one bounded line at a time (a 10 GB file or a 1 GB line cannot exhaust memory), decoded per
line (one bad byte costs one row). The good rows of a file are stored in one transaction:
either all of them are acknowledged or none, and nothing already stored is changed.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pydantic import ValidationError

from daemon.home import Home
from daemon.store import Store
from edge_unisd.items import IngestRow

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 64 * 1024 * 1024
MAX_LINE_BYTES = 4 * 1024 * 1024  # a 64-message chat at the per-message limit still fits
MAX_REPORTED_ERRORS = 1000  # beyond this only the count grows
ALLOWED_KEYS = tuple(IngestRow.model_fields)


class IngestError(RuntimeError):
    """A whole input cannot be ingested (missing, too large, unreadable); nothing from it was stored."""


@dataclass(frozen=True)
class RowError:
    line: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


@dataclass
class IngestReport:
    """What happened to one input. `rejected` counts every bad row; `errors` lists the first 1000."""

    source: str
    rows: int = 0
    added: int = 0
    duplicates: int = 0
    rejected: int = 0
    errors: list[RowError] = field(default_factory=list)

    def reject(self, line: int, reason: str) -> None:
        self.rejected += 1
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append(RowError(line, reason))

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "rows": self.rows, "added": self.added, "duplicates": self.duplicates,
                "rejected": self.rejected,
                "errors": [{"line": e.line, "reason": e.reason} for e in self.errors]}

    def summary(self) -> str:
        more = f" (first {len(self.errors)} listed)" if self.rejected > len(self.errors) else ""
        return (f"{self.source}: {self.added} added, {self.duplicates} duplicates, "
                f"{self.rejected} rejected{more}")


# --- why a row is bad, in words a user can act on

def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _loc(parts: Iterable[Any]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def explain_validation_error(err: ValidationError, data: dict[str, Any]) -> str:
    """One line for a row that failed IngestRow: key names and what was expected, never the row's text."""
    reasons: list[str] = []
    prompt = data.get("prompt")
    for e in err.errors(include_url=False):
        loc = list(e["loc"])
        if loc and loc[0] == "prompt" and len(loc) > 1 and isinstance(loc[1], str):
            # a branch of `str | list[ChatMessage]`: keep only the branch the input took
            if not isinstance(prompt, (str, list)):
                reason = ("prompt must be a string or a list of {role, content} messages, "
                          f"got {_type_name(prompt)}")
                if reason not in reasons:
                    reasons.append(reason)
                continue
            if (loc[1] == "str") != isinstance(prompt, str):
                continue
            loc = loc[:1] + loc[2:]
        where = _loc(loc)
        kind = e["type"]
        if kind == "extra_forbidden":
            reasons.append(f"unknown key {where!r} (allowed: {', '.join(ALLOWED_KEYS)})")
        elif kind == "missing":
            reasons.append(f"missing required key {where!r}")
        elif kind == "value_error":
            reasons.append(e["msg"].removeprefix("Value error, "))
        elif kind.endswith("_type"):
            reasons.append(f"{where}: {e['msg'].lower().removeprefix('input should be ')} expected, "
                           f"got {_type_name(e['input'])}")
        elif kind == "string_too_long":
            reasons.append(f"{where} is {len(e['input'])} characters; the limit is {e['ctx']['max_length']}")
        else:
            reasons.append(f"{where}: {e['msg']}")
    return "; ".join(reasons) or "invalid row"


def parse_row(raw: bytes | str) -> IngestRow:
    """Decode, parse and validate one line. Raises ValueError with the reason."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"invalid UTF-8 at byte {e.start + 1} of the line") from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON: {e.msg} at column {e.colno}") from None
    except RecursionError:
        raise ValueError("invalid JSON: nested too deeply") from None
    return validate_row(data)


def validate_row(data: Any) -> IngestRow:
    """Validate one parsed row. Raises ValueError with the reason."""
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {_type_name(data)}")
    try:
        return IngestRow.model_validate(data)
    except ValidationError as e:
        raise ValueError(explain_validation_error(e, data)) from None


# --- bounded line reading

class _TooLong:
    """Marker yielded instead of a line that exceeded the limit (its bytes were skipped, not kept)."""


def _bounded_lines(stream: IO[bytes], max_line_bytes: int, max_total_bytes: int,
                   name: str) -> Iterator[tuple[int, bytes | _TooLong]]:
    total = 0
    lineno = 0
    while True:
        chunk = stream.readline(max_line_bytes + 1)
        if not chunk:
            return
        lineno += 1
        total += len(chunk)
        too_long = len(chunk) > max_line_bytes and not chunk.endswith(b"\n")
        while too_long and chunk and not chunk.endswith(b"\n"):  # skip the rest of the long line
            chunk = stream.readline(1 << 20)
            total += len(chunk)
            if total > max_total_bytes:
                break
        if total > max_total_bytes:
            raise IngestError(f"{name} is larger than the {_size(max_total_bytes)} limit; nothing was "
                              "stored. Split it (e.g. `split -l 10000 FILE part-`) and ingest the parts")
        yield lineno, (_TooLong() if too_long else chunk)


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 and n % (1 << 20) == 0 else f"{n} bytes"


def _validated(numbered: Iterable[tuple[int, bytes | str | _TooLong]], report: IngestReport,
               max_line_bytes: int) -> list[tuple[int, IngestRow]]:
    good: list[tuple[int, IngestRow]] = []
    for lineno, raw in numbered:
        if isinstance(raw, _TooLong):
            report.rows += 1
            report.reject(lineno, f"line is longer than the {_size(max_line_bytes)} limit")
            continue
        if lineno == 1:
            raw = raw.removeprefix(b"\xef\xbb\xbf" if isinstance(raw, bytes) else "\ufeff")  # a BOM
        if not raw.strip():
            continue  # blank lines are not rows
        report.rows += 1
        try:
            good.append((lineno, parse_row(raw)))
        except ValueError as e:
            report.reject(lineno, str(e))
    return good


def _store(store: Store, good: list[tuple[int, IngestRow]], report: IngestReport, *, source: str,
           held_out_fraction: float) -> IngestReport:
    if good:
        result = store.add_items([row for _, row in good], source=source, held_out_fraction=held_out_fraction)
        report.added, report.duplicates = result.added, result.duplicates
        for (lineno, _), outcome in zip(good, result.outcomes, strict=True):
            if outcome not in ("added", "duplicate"):
                report.reject(lineno, outcome)
        report.errors.sort(key=lambda e: e.line)
    log.info("ingested %s: %d added, %d duplicates, %d rejected", report.source, report.added,
             report.duplicates, report.rejected)
    return report


# --- public entry points

def ingest_lines(store: Store, lines: Iterable[bytes | str], source_name: str, *,
                 held_out_fraction: float = 0.0, max_line_bytes: int = MAX_LINE_BYTES) -> IngestReport:
    """Ingest an iterable of lines (bytes or str, numbered from 1); the good rows in one transaction."""
    report = IngestReport(source=source_name)

    def numbered() -> Iterator[tuple[int, bytes | str | _TooLong]]:
        for i, line in enumerate(lines, start=1):
            size = len(line) if isinstance(line, bytes) else len(line.encode("utf-8", "surrogatepass"))
            yield i, (_TooLong() if size > max_line_bytes else line)

    good = _validated(numbered(), report, max_line_bytes)
    return _store(store, good, report, source=source_name, held_out_fraction=held_out_fraction)


def ingest_stream(store: Store, stream: IO[bytes], source_name: str, *, held_out_fraction: float = 0.0,
                  max_file_bytes: int = MAX_FILE_BYTES, max_line_bytes: int = MAX_LINE_BYTES) -> IngestReport:
    """Ingest a binary stream one bounded line at a time. Raises IngestError past `max_file_bytes`."""
    report = IngestReport(source=source_name)
    try:
        good = _validated(_bounded_lines(stream, max_line_bytes, max_file_bytes, source_name), report,
                          max_line_bytes)
    except OSError as e:
        raise IngestError(f"cannot read {source_name}: {e.strerror or e}; nothing was stored") from e
    return _store(store, good, report, source=source_name, held_out_fraction=held_out_fraction)


def ingest_file(store: Store, path_or_dash: str | os.PathLike, *, held_out_fraction: float = 0.0,
                max_file_bytes: int = MAX_FILE_BYTES, max_line_bytes: int = MAX_LINE_BYTES) -> IngestReport:
    """Ingest a JSON Lines file, or stdin for "-". Raises IngestError when the file as a whole is unusable."""
    limits = dict(held_out_fraction=held_out_fraction, max_file_bytes=max_file_bytes,
                  max_line_bytes=max_line_bytes)
    if str(path_or_dash) == "-":
        return ingest_stream(store, sys.stdin.buffer, "stdin", **limits)
    path = Path(path_or_dash)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise IngestError(f"{path}: no such file") from None
    except OSError as e:
        raise IngestError(f"cannot read {path}: {e.strerror or e}") from e
    if path.is_dir():
        raise IngestError(f"{path} is a directory; give a JSON Lines file (or - for stdin)")
    if path.is_file() and st.st_size > max_file_bytes:
        raise IngestError(f"{path} is {st.st_size / 2**20:.1f} MiB, over the {_size(max_file_bytes)} limit; "
                          "nothing was stored. Split it (e.g. `split -l 10000 FILE part-`) "
                          "and ingest the parts")
    try:
        with open(path, "rb") as f:
            return ingest_stream(store, f, path.name, **limits)
    except PermissionError as e:
        raise IngestError(f"cannot read {path}: permission denied") from e


# --- for applications that embed the collector

class InvalidItem(ValueError):
    """An item given to `Collector.add` failed validation; the message says which key and why."""


class Collector:
    """Store prompts from an application, with the same validation as `edge-unisd ingest`.

        with Collector() as c:              # the default home; or Collector("/path/to/home")
            item_id = c.add(prompt="...", reference="...")
    """

    def __init__(self, home: Home | str | os.PathLike | None = None, *, source: str = "api",
                 held_out_fraction: float | None = None):
        self.home = (home if isinstance(home, Home) else Home.resolve(home)).require()
        if held_out_fraction is None:
            from daemon.settings import load_settings

            held_out_fraction = load_settings(self.home.settings).held_out_fraction
        self.held_out_fraction = held_out_fraction
        self.source = source
        self._store: Store | None = None

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = Store.open(self.home)
        return self._store

    def add(self, prompt: str | list[dict[str, str]], *, context: str | None = None,
            reference: str | None = None, rejected: str | None = None, source: str | None = None,
            id: str | None = None) -> str:
        """Validate and store one item; returns its id (the existing one for a duplicate)."""
        data = {k: v for k, v in dict(prompt=prompt, context=context, reference=reference, rejected=rejected,
                                      source=source, id=id).items() if v is not None}
        try:
            row = validate_row(data)
        except ValueError as e:
            raise InvalidItem(str(e)) from None
        result = self.store.add_items([row], source=self.source, held_out_fraction=self.held_out_fraction)
        if result.item_ids[0] is None:
            raise InvalidItem(result.outcomes[0])
        return result.item_ids[0]

    def add_many(self, rows: Iterable[dict[str, Any]]) -> IngestReport:
        """Validate and store many items in one transaction; bad ones are reported by position (from 1)."""
        report = IngestReport(source=self.source)
        good: list[tuple[int, IngestRow]] = []
        for i, data in enumerate(rows, start=1):
            report.rows += 1
            try:
                good.append((i, validate_row(data)))
            except ValueError as e:
                report.reject(i, str(e))
        return _store(self.store, good, report, source=self.source, held_out_fraction=self.held_out_fraction)

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    def __enter__(self) -> Collector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
