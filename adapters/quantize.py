"""K-quants (q4_k_m etc.) with llama.cpp's own quantiser, in a child process.

A child process because quantising a big model takes minutes of CPU: the daemon can nice it,
kill it when the user comes back (a budget gate closes) or on timeout, and a crash inside
llama.cpp cannot take the daemon down. The output goes through `atomic_path`, so a killed
quantisation leaves no file under the target name, only a hidden temp that the next export cleans.

Run as `python -m adapters.quantize SRC DST FTYPE NTHREAD` (the worker entry point).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path

from edge_unisd.atomic_io import atomic_path

from .gguf_export import LLAMA_CPP_QUANTS, ExportError, file_type_name

PR_SET_PDEATHSIG = 1


def _child_setup(nice: int) -> None:  # pragma: no cover - runs in the child
    """Lower priority, and die with the parent (Linux) so no orphan keeps writing."""
    if nice:
        os.nice(nice)
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


def quantize_gguf(src: str | os.PathLike, dst: str | os.PathLike, quant: str, *, nthread: int = 0,
                  nice: int = 10, timeout: float | None = None) -> Path:
    """Quantise an f16/f32 GGUF `src` to `dst` with llama.cpp (`quant` one of LLAMA_CPP_QUANTS)."""
    if quant not in LLAMA_CPP_QUANTS:
        raise ExportError(f"quant {quant!r} is not a llama.cpp K-quant; choose one of {', '.join(LLAMA_CPP_QUANTS)}")
    ftype = int(file_type_name(quant))
    dst = Path(dst)
    with atomic_path(dst) as tmp:
        cmd = [sys.executable, "-m", "adapters.quantize", str(src), str(tmp), str(ftype), str(nthread)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  preexec_fn=lambda: _child_setup(nice))
        except subprocess.TimeoutExpired as e:
            raise ExportError(f"quantising {src} to {quant} took longer than {timeout} s; stopped") from e
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout or "")[-800:]
            raise ExportError(f"llama.cpp could not quantise {src} to {quant} (exit {proc.returncode}): {tail}")
    return dst


def _main(argv: list[str]) -> int:  # pragma: no cover - runs in the child
    import llama_cpp

    src, dst, ftype, nthread = argv[0], argv[1], int(argv[2]), int(argv[3])
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = nthread
    return int(llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(_main(sys.argv[1:]))
