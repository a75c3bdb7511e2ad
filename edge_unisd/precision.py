"""What the torch stages compute in: bf16 on a CPU that multiplies it natively, fp32 on one that does not.

Why measured, not read from CPU flags: on 2 cores of an AMD EPYC (Zen 5, AVX512-BF16) a bf16 matmul
at SmolLM2's shapes ran at 886 GFLOP/s against 207 for fp32 (`bench/limit.py --bf16`), while on CPUs
without native bf16 dot products oneDNN emulates it (this project's CI-class machines: ~5x slower than
fp32), and a CPU may list AMX in its flags without the OS letting a process use it. One probe matmul per
dtype (a few ms) tells the kinds apart; `BF16_MIN_SPEEDUP` leaves a wide margin on both sides.

With bf16 the decoder's weights and activations are bf16 and the LoRA weights stay fp32 (PEFT upcasts
them; edge_unisd.lora_fused multiplies with bf16 copies), but the LM head is kept in fp32
(`cast_keeping_head_float32`): logits of 10-30 rounded to bf16 are off by up to 0.06-0.125, noise in
every divergence and in its gradient p_S - p_T (`sd`, 12 steps, seed 0: held-out fit -0.360 with a bf16
head, -0.392 with an fp32 one). Measured on the bundled model against fp32 (`bench/ablate.py --presets sd
edge --dtype D`, three seeds, bench/results/precision): per step bf16 learns a little less (12 steps: sd
-0.401 vs -0.438 nats/token, edge -0.413 vs -0.441), per second of training more, which is what a
round's time budget spends (19 bf16 steps in the time of 12 fp32 ones: sd -0.496, edge -0.502, better
in all six pairs); retention JSD the same (0.05-0.06).

`EDGE_UNISD_COMPUTE_DTYPE` (auto | float32 | bfloat16) sets the choice for a process; the daemon's
settings key `compute_dtype` is the same variable.
"""

from __future__ import annotations

import functools
import logging
import os
import time

import torch

log = logging.getLogger(__name__)

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


def wants_float32_head(device: torch.device, dtype: torch.dtype) -> bool:
    """A half-precision CPU model gets an fp32 LM head (`cast_keeping_head_float32`); a GPU keeps its own head."""
    return device.type == "cpu" and dtype != torch.float32


def _inputs_to_weight_dtype(module: torch.nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: the head's input (bf16 hidden states) in the head's own dtype (fp32)."""
    return (args[0].to(module.weight.dtype), *args[1:])


def cast_keeping_head_float32(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Linear | None:
    """Cast an fp32 `model` to `dtype` (bf16) but give it an untied fp32 LM head with the fp32 weights.

    The input embeddings go to `dtype` with the rest; logits come out fp32 wherever the head is called
    (generate, eval), and the chunked vocabulary terms (edge_unisd.vocab_grad) multiply in fp32 because the
    weight is fp32. A head that is not a plain nn.Linear is cast with the rest (None is returned).
    """
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        log.warning("the LM head is a %s, not an nn.Linear: it computes in %s with the rest of the model",
                    type(head).__name__, dtype)
        model.to(dtype)
        return None
    weight = head.weight.detach().float().clone()  # before the cast: tied, it is the input embeddings' too
    bias = None if head.bias is None else head.bias.detach().float().clone()
    model.to(dtype)
    head.weight = torch.nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        head.bias = torch.nn.Parameter(bias, requires_grad=False)
    if getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False  # so nothing ties it back to the bf16 input embeddings
    head.register_forward_pre_hook(_inputs_to_weight_dtype)
    return head
