"""What the torch stages compute in: bf16 on a CPU that multiplies it natively, fp32 on one that does not.

Why measured, not read from CPU flags: on 2 cores of an AMD EPYC (Zen 5, AVX512-BF16) a bf16 matmul
at SmolLM2's shapes ran at 886 GFLOP/s against 207 for fp32 (`bench/limit.py --bf16`), while on CPUs
without native bf16 dot products oneDNN emulates it (this project's CI-class machines: ~5x slower than
fp32 on an Intel Xeon, 130x on an AVX2 EPYC: 0.8 against 104 GFLOP/s), and a CPU may list AMX in its
flags without the OS letting a process use it. One probe matmul per dtype (a few ms) tells the kinds
apart; `BF16_MIN_SPEEDUP` leaves a wide margin on both sides.

In bf16 the whole base is bf16, head included; the LoRA weights and their optimizer state stay fp32 (PEFT
upcasts them; edge_unisd.lora_fused multiplies with bf16 copies) and every softmax, divergence and mean of
the loss runs in fp32 on the upcast logits (edge_unisd.losses). An untied fp32 LM head, so that logits
are not rounded to bf16 (up to 0.125 at 16-32), was built and measured, and did not pay: `sd`, 12 steps,
three seeds on the Zen 5, held-out fit -0.401 with it against -0.420 with the bf16 head, whose steps
were 10-15% faster (bench/results/precision holds the fp32-head runs; the bf16-head runs' files were not
kept). Against fp32 on the bundled model (`bench/ablate.py --presets sd edge --dtype D`): per step about
the same (12 steps: sd -0.420 vs -0.438 nats/token), per second of training more, which is what a
round's time budget spends; retention JSD the same.

`EDGE_UNISD_COMPUTE_DTYPE` (auto | float32 | bfloat16) sets the choice for a process; the daemon's
settings key `compute_dtype` is the same variable.
"""

from __future__ import annotations

import functools
import os
import time

import torch

DTYPE_ENV = "EDGE_UNISD_COMPUTE_DTYPE"
COMPUTE_DTYPES = ("auto", "float32", "bfloat16")
BF16_MIN_SPEEDUP = 2.0  # bf16 matmul must run at least this many times fp32's rate to be chosen
PROBE_SHAPE = (512, 576, 1536)  # (m, k, n): one of SmolLM2's MLP matmuls for a 512-token batch


def matmul_seconds(dtype: torch.dtype, shape: tuple[int, int, int] = PROBE_SHAPE, repeats: int = 3) -> float:
    """Best wall seconds of one (m, k) @ (k, n) CPU matmul in `dtype`, after a warm-up call."""
    m, k, n = shape
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    torch.mm(a, b)  # warm-up: oneDNN builds its kernel for the shape on the first call
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return best


@functools.cache
def cpu_bf16_speedup() -> float:
    """fp32 seconds over bf16 seconds for the probe matmul on this CPU: > 1 where bf16 is faster. Once a process."""
    return matmul_seconds(torch.float32) / matmul_seconds(torch.bfloat16)


def compute_dtype_choice(environ: dict[str, str] | None = None) -> str:
    """`EDGE_UNISD_COMPUTE_DTYPE` (default auto), or a ValueError naming the variable and the choices."""
    environ = os.environ if environ is None else environ
    choice = environ.get(DTYPE_ENV, "").strip() or "auto"
    if choice not in COMPUTE_DTYPES:
        raise ValueError(f"{DTYPE_ENV}={choice!r}: use one of {', '.join(COMPUTE_DTYPES)}")
    return choice


def cpu_compute_dtype(choice: str = "auto") -> torch.dtype:
    """float32 or bfloat16 for a CPU model; `auto` measures (`cpu_bf16_speedup`)."""
    if choice == "auto":
        return torch.bfloat16 if cpu_bf16_speedup() >= BF16_MIN_SPEEDUP else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[choice]
