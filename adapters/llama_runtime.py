"""Import llama-cpp-python with a guard against a crash of its CPU backend on AMX machines.

On CPUs with Intel AMX (Sapphire Rapids and later), a native llama-cpp-python build compiles ggml's
AMX "extra buffer type", and evaluating the bundled SmolLM2-135M Q4_1 file through it segfaults in
`ggml_backend_amx_mul_mat` (llama-cpp-python 0.3.36, seen on a 2-core Xeon VM). A segfault in
`serve` or in export verification would take the whole process down, so on such CPUs every model
is loaded without the extra buffer types (AMX and the weight repacking that shares the switch):
llama.cpp's plain CPU path, which measured ~99 tokens/s for that model on 2 cores.

`EDGE_UNISD_LLAMA_EXTRA_BUFFERS=1` turns the extra buffers back on (e.g. after a llama.cpp
upgrade fixes the AMX path); `=0` turns them off on any CPU.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from types import ModuleType

EXTRA_BUFFERS_ENV = "EDGE_UNISD_LLAMA_EXTRA_BUFFERS"


def cpu_has_amx(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True when the kernel reports AMX tiles for this CPU (Linux); False where it cannot tell."""
    try:
        text = cpuinfo.read_text(encoding="ascii", errors="replace")
    except OSError:
        return False
    return any(line.startswith("flags") and "amx_tile" in line.split() for line in text.splitlines())


def extra_buffers_wanted(env: dict[str, str] | None = None, has_amx: bool | None = None) -> bool:
    """Whether llama.cpp may use its extra buffer types: the environment's choice, else "not on AMX"."""
    value = (os.environ if env is None else env).get(EXTRA_BUFFERS_ENV, "").strip()
    if value in ("0", "1"):
        return value == "1"
    return not (cpu_has_amx() if has_amx is None else has_amx)


@functools.cache
def import_llama_cpp() -> ModuleType:
    """`llama_cpp`, with every later `llama_cpp.Llama(...)` (ours and its server's) guarded as above.

    The guard wraps `llama_model_default_params`, which `Llama.__init__` looks up on each call; it is
    applied once per process and changes nothing else.
    """
    import llama_cpp
    import llama_cpp.llama_cpp as low_level

    if not extra_buffers_wanted():
        original = low_level.llama_model_default_params

        def without_extra_buffers():
            params = original()
            params.use_extra_bufts = False
            return params

        without_extra_buffers.__wrapped__ = original  # type: ignore[attr-defined]
        low_level.llama_model_default_params = without_extra_buffers
    return llama_cpp
