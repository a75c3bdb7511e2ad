"""How glibc hands tensor memory back and forth on Linux CPU training: a choice of speed or leanness.

glibc raises its mmap threshold each time a large mmapped block is freed, so after a few forward
passes multi-MB activation buffers come from the heap, and freed heap memory is not returned: a
step's RSS then grows to several times its live tensors (3.8 GB vs 1.0 GB for one SmolLM2 step at
batch 8 x 256 here). Two fixed policies instead of that drift (`EDGE_UNISD_HEAP`):

- `fast` (default): blocks up to 8 MiB are reused from the heap, larger ones are mmapped, and the
  trainer returns free heap pages to the OS after every step (`release_free_memory`). Reuse avoids
  the kernel zero-filling fresh pages for every activation: a SmolLM2-135M `sd` step at batch 8 x 64
  on 2 cores took 11.8 s instead of 14.7 s (sys time was a quarter of the CPU time), for a higher
  peak inside the step (2.13 vs 1.74 GB). 8 MiB rather than 4 takes in the MLP activations of a
  batch of ~800 tokens (800 x 1536 floats, 5 MB): on 2 AVX2 cores the `sd` student stage took
  6.8-7.0 instead of 7.4-7.7 s at batch 8 x 64 and 24.7 instead of 28.0 s at 8 x 256 (medians, the
  two thresholds alternating on one batch in one process); the peak of an `edge` step at 8 x 256
  (bench/memory.py) rose from 1.62 to 2.00-2.06 GB. glibc's largest threshold, 32 MiB, was tried too:
  the student stage at 8 x 256 took 12.8 instead of 13.9 s on another CPU, but the step peaked at
  2.55 GB (the heap fragments around larger blocks).
  Mid-step, free() must not hand the top of the heap back either: once the mmap threshold is fixed,
  glibc trims the heap whenever more than M_TRIM_THRESHOLD (128 KiB) lies free at its top, so the
  next activation grows it again on fresh, zero-filled pages. `fast` raises that threshold to
  1 GiB and leaves the trimming to `release_free_memory` after the step: the `sd` student stage at
  8 x 64 took 18 K instead of 159 K page faults a step (0.11 instead of 0.53 s of system time;
  its wall time moved less than this 2-core machine's noise).
- `lean`: every block over 64 KiB is mmapped and unmapped on free, as MALLOC_MMAP_THRESHOLD_=65536
  would do: the lowest peak, paid for in page faults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import sys

log = logging.getLogger(__name__)

HEAP_ENV = "EDGE_UNISD_HEAP"
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
THRESHOLD_BYTES = {"fast": 8 << 20, "lean": 64 << 10}
TRIM_THRESHOLD_BYTES = {"fast": 1 << 30}  # others keep glibc's 128 KiB

_policy: str | None = None


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """glibc, looked up once (find_library runs ldconfig): release_free_memory runs after every step."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None  # musl has neither


def heap_policy(env: dict[str, str] | None = None) -> str:
    """The policy `EDGE_UNISD_HEAP` asks for (fast or lean); anything else is an error naming the variable."""
    value = (os.environ if env is None else env).get(HEAP_ENV, "").strip().lower() or "fast"
    if value not in THRESHOLD_BYTES:
        raise ValueError(f"{HEAP_ENV}={value!r}: use 'fast' (reuse heap memory, default) or 'lean' (lowest RSS)")
    return value


def configure_heap(policy: str | None = None) -> str | None:
    """Fix glibc's mmap threshold for `policy` (default: from the environment) once per process.

    Returns the policy applied, or None where there is no glibc. Call before large tensors exist.
    """
    global _policy
    if _policy is not None:
        return _policy
    policy = policy or heap_policy()
    libc = _libc()
    if libc is None or not libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD_BYTES[policy]):
        return None
    if policy in TRIM_THRESHOLD_BYTES:
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES[policy])
    _policy = policy
    log.debug("heap policy %s (mmap threshold %d bytes)", policy, THRESHOLD_BYTES[policy])
    return policy


def release_free_memory() -> None:
    """Give free heap pages back to the OS (after a training step), so idle RSS stays near live tensors."""
    if _policy == "fast":
        libc = _libc()
        if libc is not None:
            libc.malloc_trim(0)
