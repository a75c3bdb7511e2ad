"""The tensor table of a GGUF file (name, type, shape, where its data sits), read without the metadata.

Why not gguf's GGUFReader: it builds a numpy view for every value of every metadata array, and a
vocabulary is ~100 k strings (49 k tokens and 48 k merges for SmolLM2): 3.4-6 s a parse on 2 cores,
paid twice whenever a process builds its first llama.cpp rollout backend (the base's quantisation
check, the rollout copy's tensor offsets). Metadata is skipped here by walking its lengths, ~0.1 s.
Everything that needs the metadata itself (export, retyping) keeps using GGUFReader.

Layout (GGUF v2/v3, little-endian; https://github.com/ggml-org/ggml/blob/master/docs/gguf.md):
magic "GGUF", u32 version, u64 tensor count, u64 metadata count, the metadata (key string, u32
value type, value), then per tensor: name string, u32 n_dims, u64 dims (fastest first), u32 ggml
type, u64 offset into the data section, which starts at the next multiple of `general.alignment`
(default 32) after the table. Strings are a u64 byte count and UTF-8 bytes.
"""

from __future__ import annotations

import functools
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
_STRING, _ARRAY = 8, 9  # GGUFValueType codes that have no fixed size
_FIXED_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # the other value types
_UINT32 = 4
UNQUANTISED = frozenset({QT.F32, QT.F16, QT.BF16})


class GGUFTableError(ValueError):
    """The file is not a GGUF whose tensor table can be read; the message names the file and the byte offset."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the table: `shape` in numpy order (slowest first), `offset` absolute in the file."""

    name: str
    ggml_type: int
    shape: tuple[int, ...]
    offset: int


class _Cursor:
    """Little-endian reads from a byte buffer, each checked against its end."""

    def __init__(self, buf, where: str) -> None:
        self.buf, self.pos, self.where = buf, 0, where

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise GGUFTableError(f"{self.where}: ends at byte {len(self.buf)} inside its header (truncated?)")
        values = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return values if len(values) > 1 else values[0]

    def skip(self, size: int) -> None:
        if self.pos + size > len(self.buf):
            raise GGUFTableError(f"{self.where}: ends at byte {len(self.buf)} inside its header (truncated?)")
        self.pos += size

    def string(self) -> bytes:
        n = self.take("<Q")
        start = self.pos
        self.skip(n)
        return bytes(self.buf[start:self.pos])

    def skip_value(self, value_type: int) -> None:
        """Step over one metadata value; arrays of fixed-size values in one jump, strings one by one."""
        if value_type == _STRING:
            self.skip(self.take("<Q"))
        elif value_type == _ARRAY:
            item_type, count = self.take("<IQ")
            if item_type in _FIXED_SIZE:
                self.skip(_FIXED_SIZE[item_type] * count)
            else:
                for _ in range(count):
                    self.skip_value(item_type)
        elif value_type in _FIXED_SIZE:
            self.skip(_FIXED_SIZE[value_type])
        else:
            raise GGUFTableError(f"{self.where}: unknown metadata value type {value_type} at byte {self.pos - 4}")


def read_tensor_table(path: str | Path) -> list[TensorEntry]:
    """Every tensor of the GGUF at `path`, in file order. Raises GGUFTableError naming what is wrong."""
    path = Path(path)
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped, \
                memoryview(mapped) as buf:  # released before the map closes, on errors too
            return _parse(buf, str(path))
    except GGUFTableError:
        raise
    except (OSError, ValueError) as e:  # a missing file; an empty one cannot be mapped
        raise GGUFTableError(f"{path}: cannot be read as GGUF ({e})") from e


@functools.lru_cache(maxsize=8)
def cached_tensor_table(path: str, size: int, mtime_ns: int) -> tuple[TensorEntry, ...]:
    """read_tensor_table once per file version per process (size and mtime are part of the key)."""
    return tuple(read_tensor_table(path))


def is_unquantised(table: tuple[TensorEntry, ...] | list[TensorEntry]) -> bool:
    """True when every tensor is stored as F32, F16 or BF16 (nothing to dequantise)."""
    return all(e.ggml_type in UNQUANTISED for e in table)


def _parse(buf: memoryview, where: str) -> list[TensorEntry]:
    cur = _Cursor(buf, where)
    try:
        if bytes(buf[:4]) != GGUF_MAGIC:
            raise GGUFTableError(f"{where}: not a GGUF file (first bytes {bytes(buf[:4])!r}, expected b'GGUF')")
        cur.skip(4)
        version = cur.take("<I")
        if version not in SUPPORTED_VERSIONS:
            raise GGUFTableError(f"{where}: GGUF version {version} (big-endian or unsupported); "
                                 f"readable: {', '.join(map(str, SUPPORTED_VERSIONS))}, little-endian")
        n_tensors, n_kv = cur.take("<QQ")
        alignment = DEFAULT_ALIGNMENT
        for _ in range(n_kv):
            key = cur.string()
            value_type = cur.take("<I")
            if key == b"general.alignment":
                if value_type != _UINT32:
                    raise GGUFTableError(f"{where}: general.alignment has value type {value_type}, not UINT32")
                alignment = cur.take("<I")
            else:
                cur.skip_value(value_type)
        raw = []
        for _ in range(n_tensors):
            name = cur.string().decode("utf-8")
            n_dims = cur.take("<I")
            dims = struct.unpack_from(f"<{n_dims}Q", buf, cur.pos) if n_dims else ()
            cur.skip(8 * n_dims)
            ggml_type, offset = cur.take("<IQ")
            raw.append((name, ggml_type, tuple(int(d) for d in reversed(dims)), offset))
    except (struct.error, UnicodeDecodeError, RecursionError) as e:  # RecursionError: absurdly nested arrays
        raise GGUFTableError(f"{where}: damaged header near byte {cur.pos} ({type(e).__name__}: {e})") from e
    if alignment <= 0 or alignment & (alignment - 1):
        raise GGUFTableError(f"{where}: general.alignment is {alignment}, not a power of two")
    data_start = -(-cur.pos // alignment) * alignment
    table = [TensorEntry(name, t, shape, data_start + off) for name, t, shape, off in raw]
    _check_data(table, alignment, data_start, len(buf), where)
    return table


def _check_data(table: list[TensorEntry], alignment: int, data_start: int, file_size: int, where: str) -> None:
    """Every tensor of a known type, aligned, named once, its bytes inside the file: what GGUFReader and
    llama.cpp check too; the merged-weights writer would otherwise patch bytes that are not the tensor's."""
    seen: set[str] = set()
    for e in table:
        if e.name in seen:
            raise GGUFTableError(f"{where}: tensor {e.name!r} appears twice")
        seen.add(e.name)
        try:
            block, type_size = GGML_QUANT_SIZES[QT(e.ggml_type)]
        except (ValueError, KeyError):
            raise GGUFTableError(f"{where}: tensor {e.name!r} has unknown ggml type {e.ggml_type}") from None
        if (e.offset - data_start) % alignment:
            raise GGUFTableError(f"{where}: tensor {e.name!r} at byte {e.offset} is not {alignment}-byte aligned")
        count = 1
        for d in e.shape:
            count *= d
        end = e.offset + count // block * type_size
        if end > file_size:
            raise GGUFTableError(f"{where}: tensor {e.name!r} ends at byte {end}, past the end of the file "
                                 f"({file_size} bytes; truncated?)")
