"""The bundled fictional user (`data/sample_user/`): profile, prompts, answer checks, general prompts.

One small, fixed data set serves the demo, the tests and the ablations, so that every run
is comparable and none needs a real user's data. Answers are one short sentence each: the
bundled model is tiny, and a few LoRA steps must move the NLL of the references visibly.

Files (JSON Lines, one object a line):
- `profile.md`: the user's notes, the privileged context c_0 every primary teacher sees.
- `items.jsonl`: ingest rows (`edge_unisd.items.IngestRow`), each with an `id` ("s001", ...).
- `checks.jsonl`: `{"id", "must_contain": [keyword, ...]}` for items with a checkable answer.
  Every keyword must appear (case-insensitive); `"a|b"` accepts either alternative.
- `general.jsonl`: `{"prompt"}` prompts unrelated to the user, for measuring retention.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge_unisd.items import IngestRow, Item, item_from_row

SAMPLE_DIR = Path(__file__).resolve().parent / "data" / "sample_user"
PROFILE_FILE = "profile.md"
ITEMS_FILE = "items.jsonl"
CHECKS_FILE = "checks.jsonl"
GENERAL_FILE = "general.jsonl"


class SampleDataError(ValueError):
    """A bundled sample file is missing or has a bad row; the message names the file and line."""


class CheckRow(BaseModel):
    """One line of checks.jsonl: keywords a correct answer to item `id` contains."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, description="the id of an item in items.jsonl")
    must_contain: list[str] = Field(min_length=1, description="keywords, each 'a|b' for alternatives")


class GeneralPrompt(BaseModel):
    """One line of general.jsonl: a prompt unrelated to the user."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1)


# --- reading -------------------------------------------------------------------------------------

def _path(name: str, directory: Path | None) -> Path:
    path = (directory or SAMPLE_DIR) / name
    if not path.is_file():
        raise SampleDataError(f"{path}: sample data file not found (is the package installed with its data?)")
    return path


def _json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield (line number, parsed object) for each non-blank line; a bad line names file:line."""
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                reason = f"{e.msg} at column {e.colno}"
                raise SampleDataError(f"{path}:{lineno}: not valid JSON ({reason})") from None


def _validate(model: type[BaseModel], obj: Any, path: Path, lineno: int) -> Any:
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        reasons = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'row'}: {err['msg']}" for err in e.errors()
        )
        raise SampleDataError(f"{path}:{lineno}: invalid {model.__name__} ({reasons})") from None


def load_profile(directory: Path | None = None) -> str:
    """The user's profile notes (markdown), used verbatim as the primary teacher's context."""
    return _path(PROFILE_FILE, directory).read_text(encoding="utf-8")


def load_sample_rows(directory: Path | None = None) -> list[IngestRow]:
    """Every row of items.jsonl, validated; each must carry a unique `id` (checks refer to it)."""
    path = _path(ITEMS_FILE, directory)
    rows: list[IngestRow] = []
    seen: dict[str, int] = {}
    for lineno, obj in _json_lines(path):
        row = _validate(IngestRow, obj, path, lineno)
        if row.id is None:
            raise SampleDataError(f"{path}:{lineno}: sample rows need an 'id' (checks.jsonl refers to it)")
        if row.id in seen:
            raise SampleDataError(f"{path}:{lineno}: id {row.id!r} already used on line {seen[row.id]}")
        seen[row.id] = lineno
        rows.append(row)
    return rows


def load_sample_items(directory: Path | None = None) -> list[Item]:
    """The sample rows as the trainer's `Item`s, in file order."""
    return [item_from_row(row) for row in load_sample_rows(directory)]


def load_checks(directory: Path | None = None) -> dict[str, list[str]]:
    """Item id -> keywords a correct answer contains (see `answer_is_correct`)."""
    path = _path(CHECKS_FILE, directory)
    checks: dict[str, list[str]] = {}
    for lineno, obj in _json_lines(path):
        row: CheckRow = _validate(CheckRow, obj, path, lineno)
        if row.id in checks:
            raise SampleDataError(f"{path}:{lineno}: a check for id {row.id!r} is already defined")
        if any(not alt.strip() for kw in row.must_contain for alt in kw.split("|")):
            raise SampleDataError(f"{path}:{lineno}: empty keyword or alternative in {row.must_contain!r}")
        checks[row.id] = list(row.must_contain)
    return checks


def load_general_prompts(directory: Path | None = None) -> list[str]:
    """Prompts unrelated to the user: retention is measured on these."""
    path = _path(GENERAL_FILE, directory)
    return [_validate(GeneralPrompt, obj, path, lineno).prompt for lineno, obj in _json_lines(path)]


# --- checking answers ----------------------------------------------------------------------------

_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"',
                         "\u2013": "-", "\u2014": "-", "\u00a0": " "})


def _normalise(text: str) -> str:
    """Case-fold, unify quotes/dashes, collapse whitespace: spelling noise must not decide accuracy."""
    text = unicodedata.normalize("NFKC", text).translate(_QUOTES).casefold()
    return re.sub(r"\s+", " ", text).strip()


def answer_is_correct(text: str, keywords: list[str]) -> bool:
    """True if `text` contains every keyword (case-insensitive); a keyword "a|b" is met by either.

    An empty keyword list is never correct: an item without a check has no accuracy to score.
    """
    if not keywords:
        return False
    haystack = _normalise(text)
    return all(any(_normalise(alt) in haystack for alt in kw.split("|")) for kw in keywords)
