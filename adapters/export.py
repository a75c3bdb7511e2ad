"""Merge, write, verify, and only then publish: the one entry point for a GGUF export.

    export_adapter(base, adapter_dir, out_dir, quant="f16", fmt="merged"|"lora") -> ExportResult

out_dir layout:
    builds/<adapter>-<quant>-<UTC stamp>.gguf   every verified build (the newest `keep_builds` kept)
    current.gguf        the verified merged model (a hard link to a build), swapped in atomically
    current-lora.gguf   the verified LoRA adapter GGUF, for `fmt="lora"`
    Modelfile, Modelfile.lora   Ollama recipes for the two

A build that fails verification is deleted and `ExportRefused` says which number missed which bar;
current.gguf still is the previous good file. A crash at any point leaves only hidden `.*.tmp`
files, which the next export removes.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import gguf

from edge_unisd.atomic_io import ensure_private_dir, remove_stale_temps
from edge_unisd.modeling import BaseSource, LoadedModel, resolve_base

from . import gguf_export as ge
from .lora_gguf import write_lora
from .merge import MergedModel, merge_adapter
from .publish import CURRENT_LORA, CURRENT_MERGED, swap_in, write_modelfile
from .quantize import quantize_gguf
from .registry import AdapterRegistry, RegistryError
from .verify import LORA_ON_QUANTIZED_BASE, Bar, VerifyReport, bar_for, verify_gguf

log = logging.getLogger(__name__)

Format = Literal["merged", "lora"]


class ExportRefused(ge.ExportError):
    """The written file did not match the merged model closely enough; nothing was published."""

    def __init__(self, message: str, report: VerifyReport):
        super().__init__(message)
        self.report = report


@dataclass
class ExportResult:
    gguf: Path  # the published path (current.gguf / current-lora.gguf)
    build: Path  # the verified build it is the same file as
    adapter: Path | None
    quant: str
    fmt: str
    verify: VerifyReport
    modelfile: Path
    base: str
    seconds: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        """What `edge-unisd export --json` prints."""
        return {"gguf": str(self.gguf), "build": str(self.build),
                "adapter": str(self.adapter) if self.adapter else None, "quant": self.quant,
                "format": self.fmt, "verify": self.verify.to_dict(), "modelfile": str(self.modelfile),
                "base": self.base, "seconds": {k: round(v, 2) for k, v in self.seconds.items()}}


@contextlib.contextmanager
def _export_lock(out_dir: Path) -> Iterator[None]:
    """One export per out_dir at a time; waiting is fine (exports are minutes at most)."""
    fd = os.open(out_dir / ".export.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _stamp() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")


# --- writing one build --------------------------------------------------------------------------

def _write_merged(merged: MergedModel, build: Path, quant: str, *, nice: int, timeout: float | None) -> None:
    """Python-written types directly; K-quants from an f16 stage file through llama.cpp's quantiser."""
    state = merged.state_dict()
    source = merged.source

    def write(out: Path, q: str) -> None:
        if source.kind == "gguf":
            ge.write_merged_from_gguf_base(source.path, state, out, q)
        else:
            ge.write_merged_from_hf(source.path, state, out, q)

    if quant in ge.PY_QUANTS:
        write(build, quant)
        return
    stage = build.with_name(f".{build.stem}.f16-stage.tmp")  # hidden: cleaned if we die before the unlink
    try:
        write(stage, "f16")
        quantize_gguf(stage, build, quant, nice=nice, timeout=timeout)
    finally:
        stage.unlink(missing_ok=True)


def _model_shape(source: BaseSource, reader: gguf.GGUFReader) -> ge.ModelShape:
    """Hyperparameters for names and permutation: from the GGUF base, or from the HF folder's config."""
    if source.kind == "gguf":
        return ge.read_shape_from_gguf(reader, str(source.path))
    config_path = source.path / "config.json"
    return ge.shape_from_hf_config(json.loads(config_path.read_text()), str(config_path))


def _base_gguf(base: LoadedModel | BaseSource, source: BaseSource, builds: Path) -> Path:
    """The GGUF a LoRA GGUF is applied to: the base file itself, or (HF base) an f16 export of the base,
    made once per base fingerprint."""
    if source.kind == "gguf":
        return source.path
    cached = builds / f"base-{source.fingerprint[:16]}-f16.gguf"
    if not cached.is_file():
        ge.write_merged_from_hf(source.path, merge_adapter(base, None).state_dict(), cached, "f16")
    return cached


def _lora_bar(reader: gguf.GGUFReader) -> tuple[str, Bar]:
    """A LoRA GGUF is judged by the precision of the base it runs on in llama.cpp."""
    field = reader.get_field(gguf.Keys.General.FILE_TYPE)
    ftype = gguf.LlamaFileType(int(field.contents())) if field else gguf.LlamaFileType.GUESSED
    by_type = {gguf.LlamaFileType.ALL_F32: "f32", gguf.LlamaFileType.MOSTLY_F16: "f16",
               gguf.LlamaFileType.MOSTLY_BF16: "bf16", gguf.LlamaFileType.MOSTLY_Q8_0: "q8_0"}
    if ftype in by_type:
        return by_type[ftype], bar_for(by_type[ftype])
    name = ftype.name.removeprefix("MOSTLY_").lower()
    return f"{name} base + lora", LORA_ON_QUANTIZED_BASE


def _prune_builds(builds: Path, keep: int, protect: list[Path]) -> None:
    """Keep the newest `keep` builds of each kind; never a file a current.* is, never the base cache."""
    def kind(p: Path) -> str:
        return "lora" if "-lora-" in p.name else "merged"

    files = sorted((p for p in builds.glob("*.gguf") if not p.name.startswith("base-")),
                   key=lambda p: p.stat().st_mtime, reverse=True)
    seen: dict[str, int] = {}
    for p in files:
        seen[kind(p)] = seen.get(kind(p), 0) + 1
        if seen[kind(p)] <= keep:
            continue
        if any(q.exists() and os.path.samefile(p, q) for q in protect):
            continue
        p.unlink(missing_ok=True)


# --- the whole export ---------------------------------------------------------------------------

def export_adapter(base: LoadedModel | BaseSource | str | Path | None, adapter_dir: str | Path | None,
                   out_dir: str | Path, quant: str = "f16", fmt: Format = "merged", *,
                   probes: list[list[int]] | None = None, registry: AdapterRegistry | None = None,
                   keep_builds: int = 2, nice: int = 10, quantize_timeout: float | None = None,
                   n_threads: int | None = None) -> ExportResult:
    """Merge `adapter_dir` (None: the base alone) into the full-precision base, write GGUF, verify it
    against the merged torch model, and publish it only if it meets the bar for `quant`.

    `fmt="lora"` writes the adapter alone (llama.cpp adapter GGUF; `quant` f32 or f16) and verifies
    it applied on top of the base GGUF. `registry`: if `adapter_dir` is one of its versions, the
    verification report is stored in that version's metrics (also when the export is refused).
    """
    t0 = time.monotonic()
    seconds: dict[str, float] = {}
    if fmt not in ("merged", "lora"):
        raise ge.ExportError(f"format {fmt!r}: use 'merged' or 'lora'")
    if quant not in ge.ALL_QUANTS:
        raise ge.ExportError(f"unknown quant {quant!r}; choose one of {', '.join(ge.ALL_QUANTS)}")
    if fmt == "lora":
        if adapter_dir is None:
            raise ge.ExportError("a LoRA GGUF needs an adapter (--adapter DIR); there is none to export")
        if quant not in ("f32", "f16"):
            raise ge.ExportError(f"a LoRA GGUF is written as f32 or f16, not {quant!r}")
    adapter_path = Path(adapter_dir).resolve() if adapter_dir is not None else None
    if isinstance(base, (str, os.PathLike)) or base is None:
        base = resolve_base(base)

    out_dir = ensure_private_dir(out_dir)
    builds = ensure_private_dir(out_dir / "builds")
    with _export_lock(out_dir):
        remove_stale_temps(out_dir)
        remove_stale_temps(builds)

        # --- merge, in full precision ---
        merged = merge_adapter(base, adapter_path)
        seconds["merge"] = time.monotonic() - t0

        # --- write the build ---
        t = time.monotonic()
        label = adapter_path.name if adapter_path else "base"
        if fmt == "merged":
            build = builds / f"{label}-{quant}-{_stamp()}.gguf"
            _write_merged(merged, build, quant, nice=nice, timeout=quantize_timeout)
            llama_model, lora_file, bar_name, bar = build, None, quant, bar_for(quant)
        else:
            build = builds / f"{label}-lora-{quant}-{_stamp()}.gguf"
            base_file = _base_gguf(base, merged.source, builds)
            reader = gguf.GGUFReader(base_file)  # parsing a big vocabulary takes seconds: once
            write_lora(adapter_path, _model_shape(merged.source, reader), build, dtype=quant)
            llama_model, lora_file = base_file, build
            bar_name, bar = _lora_bar(reader)
        seconds["write"] = time.monotonic() - t

        # --- verify against the merged torch model ---
        t = time.monotonic()
        try:
            report = verify_gguf(llama_model, merged.model, merged.tokenizer, bar_name, lora_path=lora_file,
                                 probes=probes, bar=bar, n_threads=n_threads)
        except BaseException:
            build.unlink(missing_ok=True)
            raise
        seconds["verify"] = time.monotonic() - t
        _record(registry, adapter_path, report, quant, fmt)
        current = out_dir / (CURRENT_MERGED if fmt == "merged" else CURRENT_LORA)
        if not report.passed:
            build.unlink(missing_ok=True)
            kept = f"{current} still is the previous good file" if current.exists() else "nothing was published"
            raise ExportRefused(f"export refused: {build.name} does not match the merged model: "
                                f"{'; '.join(report.problems)} ({report.summary()}); {kept}", report)

        # --- publish: one rename each ---
        swap_in(build, current)
        tok = merged.tokenizer
        note = f"{build.name}: {report.summary()}"
        if fmt == "merged":
            modelfile = write_modelfile(out_dir / "Modelfile", f"./{current.name}", tok.chat_template,
                                        tok.eos_token, note=note)
        else:
            modelfile = write_modelfile(out_dir / "Modelfile.lora", str(Path(llama_model).resolve()),
                                        tok.chat_template, tok.eos_token, adapter=f"./{current.name}", note=note)
        _prune_builds(builds, keep_builds, [out_dir / CURRENT_MERGED, out_dir / CURRENT_LORA])
    seconds["total"] = time.monotonic() - t0
    log.info("published %s (%s, %s): %s", current, fmt, quant, report.summary())
    return ExportResult(gguf=current, build=build, adapter=adapter_path, quant=quant, fmt=fmt, verify=report,
                        modelfile=modelfile, base=merged.source.describe(), seconds=seconds)


def _record(registry: AdapterRegistry | None, adapter_path: Path | None, report: VerifyReport,
            quant: str, fmt: str) -> None:
    if registry is None or adapter_path is None or adapter_path.parent != registry.root.resolve():
        return
    with contextlib.suppress(RegistryError):  # a folder that is not a version has nowhere to store it
        registry.record_metrics(adapter_path.name, export={**report.to_dict(), "quant": quant, "format": fmt})

