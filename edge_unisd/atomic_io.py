"""Crash-safe file writes: the one place every writer of adapters, GGUF, settings and spool files goes.

A reader (llama.cpp server, the registry, the next daemon start) must only ever see a whole
file or the previous one, never half of a new one. So: write to a temp name in the same
directory, fsync it, rename over the target, fsync the directory. Private data: files 0600,
directories 0700.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700


def ensure_private_dir(path: str | os.PathLike) -> Path:
    """Create `path` (and parents) if missing and make it 0700."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
    os.chmod(path, PRIVATE_DIR_MODE)
    return path


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so a rename inside it survives a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, mode: int = PRIVATE_FILE_MODE) -> Iterator[Path]:
    """Yield a temp path next to `target`; on success fsync it and rename it onto `target`.

    For writers that need a path rather than bytes (e.g. a GGUF writer). On any exception the
    temp file is removed and `target` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(target: str | os.PathLike, data: bytes, mode: int = PRIVATE_FILE_MODE) -> Path:
    """Write `data` to `target` atomically (temp, fsync, rename)."""
    with atomic_path(target, mode) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def atomic_write_text(target: str | os.PathLike, text: str, mode: int = PRIVATE_FILE_MODE) -> Path:
    return atomic_write_bytes(target, text.encode("utf-8"), mode)


def atomic_write_json(target: str | os.PathLike, obj: Any, mode: int = PRIVATE_FILE_MODE) -> Path:
    return atomic_write_text(target, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", mode)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp directory next to `target`; on success fsync its files and rename it to `target`.

    `target` must not exist yet (versions are immutable). A crash leaves only a hidden
    `.name.*.tmp` directory, which `remove_stale_temps` cleans and no loader ever reads.
    """
    target = Path(target)
    if target.exists():
        raise FileExistsError(f"{target} already exists; adapter versions are never overwritten")
    ensure_private_dir(target.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        for root, _dirs, files in os.walk(tmp):
            for name in files:
                p = Path(root) / name
                os.chmod(p, PRIVATE_FILE_MODE)
                with open(p, "rb+") as f:
                    os.fsync(f.fileno())
            os.chmod(root, PRIVATE_DIR_MODE)
            fsync_dir(root)
        os.rename(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temps(directory: str | os.PathLike) -> list[Path]:
    """Delete leftovers of interrupted atomic writes (`.name.*.tmp`) in `directory`."""
    removed = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    for p in directory.glob(".*.tmp"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed
