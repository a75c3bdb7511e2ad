"""This machine's matmul ceiling and the model's FLOPs per token: the tokens/s no implementation can beat.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/limit.py [--config PATH|bundled] [--rows 2048] [--bf16]
    HF_HUB_OFFLINE=1 .venv/bin/python bench/limit.py --tiny          # smoke run (tiny shapes, seconds)

Times torch.mm at the shapes the model's linear layers see (rows = batch x tokens per forward), several
repeats each, and keeps the best and the median rate per shape. The model's own mix of shapes gives one
effective rate (FLOP-weighted: time = sum of flops_i / rate_i), the ceiling's numerator.

FLOPs per token (Kaplan et al. conventions; N = matmul parameters outside the embeddings and LM head):
- forward: 2N + attention (QK^T and AV: 4 * layers * heads * head_dim * mean attended context),
- training fwd+bwd, full fine-tuning: 6N + 3 x attention (the usual "6N"),
- training fwd+bwd with LoRA on a frozen base: 4N + 3 x attention + the LoRA matrices' 6 r (d_in + d_out):
  the base weights need no weight gradients, so this is the work a LoRA step really has to do,
- LM head: 2 H V forward, 4 H V in training (frozen head: input gradient only).
Recomputation by activation checkpointing is not counted (model FLOPs, not hardware FLOPs).

Prints one JSON object and a short table, with the load average at start and end: another job on the
machine lowers every figure. Never asserts on time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# SmolLM2-135M (the bundled model): enough to size the matmuls without loading anything
SMOLLM2_135M = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152, "model_type": "llama"}
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 49152, "model_type": "llama"}
LM_HEAD_ROWS = 128  # rows per vocabulary chunk in edge_unisd.scoring (MethodConfig.chunk_tokens default)


# --- the machine ---------------------------------------------------------------------------------

def load_average() -> list[float]:
    """1, 5 and 15 minute load averages: printed next to every figure, since other jobs share the cores."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # not on every platform
        return []


def machine_info(device: str = "cpu") -> dict[str, Any]:
    import platform

    import torch

    info = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "processor": _cpu_name() or platform.processor(), "device": device}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _cpu_name() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


# --- the model -----------------------------------------------------------------------------------

_REQUIRED = object()


def _field(config: Any, key: str, default: Any = _REQUIRED) -> Any:
    value = config.get(key, default) if isinstance(config, Mapping) else getattr(config, key, default)
    if value is _REQUIRED:
        raise ValueError(f"model config has no {key!r}: give a llama-family config (hidden_size, "
                         f"intermediate_size, num_hidden_layers, num_attention_heads, vocab_size)")
    return value


def layer_linears(config: Any) -> list[tuple[str, int, int]]:
    """(name, d_in, d_out) of the linear layers of one decoder layer (llama family: GQA + gated MLP)."""
    hidden = int(_field(config, "hidden_size"))
    heads = int(_field(config, "num_attention_heads"))
    kv_heads = int(_field(config, "num_key_value_heads", None) or heads)
    head_dim = int(_field(config, "head_dim", None) or hidden // heads)
    inter = int(_field(config, "intermediate_size"))
    q, kv = heads * head_dim, kv_heads * head_dim
    return [("q_proj", hidden, q), ("k_proj", hidden, kv), ("v_proj", hidden, kv), ("o_proj", q, hidden),
            ("gate_proj", hidden, inter), ("up_proj", hidden, inter), ("down_proj", inter, hidden)]


def model_flops_per_token(config: Any, *, context: int = 0, lora_rank: int = 0) -> dict[str, float]:
    """FLOPs per token of the decoder (forward, 6N training, LoRA training) and of the LM head.

    `config`: a transformers config or a dict with llama-style fields. `context`: the sequence length;
    a causal token attends to context/2 positions on average. `lora_rank`: rank of LoRA on every
    linear layer of the decoder (peft "all-linear"), 0 for none.
    """
    layers = int(_field(config, "num_hidden_layers"))
    hidden = int(_field(config, "hidden_size"))
    heads = int(_field(config, "num_attention_heads"))
    head_dim = int(_field(config, "head_dim", None) or hidden // heads)
    vocab = int(_field(config, "vocab_size"))
    linears = layer_linears(config)
    n = layers * sum(d_in * d_out for _, d_in, d_out in linears)  # non-embedding matmul parameters
    attention = 4.0 * layers * heads * head_dim * (context / 2.0)  # QK^T + AV over the mean attended context
    lora = 6.0 * lora_rank * layers * sum(d_in + d_out for _, d_in, d_out in linears)  # A, B: fwd + dX + dW
    head = 2.0 * hidden * vocab
    return {"params_nonembedding": float(n), "context": float(context), "lora_rank": float(lora_rank),
            "forward": 2.0 * n + attention, "train_6n": 6.0 * n + 3.0 * attention,
            "train_lora": 4.0 * n + 3.0 * attention + lora, "lm_head_forward": head, "lm_head_train": 2.0 * head}


def model_matmul_shapes(config: Any, rows: int, head_rows: int = LM_HEAD_ROWS) -> list[tuple[int, int, int, float]]:
    """(m, k, n, weight) of the model's matmuls at `rows` tokens per forward; weight = FLOPs per token share."""
    layers = int(_field(config, "num_hidden_layers"))
    vocab, hidden = int(_field(config, "vocab_size")), int(_field(config, "hidden_size"))
    merged: dict[tuple[int, int], float] = {}
    for _, d_in, d_out in layer_linears(config):
        merged[(d_in, d_out)] = merged.get((d_in, d_out), 0.0) + 2.0 * layers * d_in * d_out
    shapes = [(rows, k, n, w) for (k, n), w in merged.items()]
    shapes.append((min(rows, head_rows), hidden, vocab, 2.0 * hidden * vocab))  # chunked LM head
    return shapes


# --- the measurement -----------------------------------------------------------------------------

def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_mm(m: int, k: int, n: int, dtype, device, repeats: int, min_seconds: float) -> list[float]:
    """FLOP/s of `repeats` timed batches of torch.mm (m,k)x(k,n); each batch runs >= min_seconds."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(k, n, generator=gen).to(device=device, dtype=dtype)
    out = torch.empty(m, n, device=device, dtype=dtype)
    torch.mm(a, b, out=out)  # warm-up: thread pool, kernel selection
    _sync(device)
    t0 = time.perf_counter()
    torch.mm(a, b, out=out)
    _sync(device)
    once = max(time.perf_counter() - t0, 1e-7)
    iters = max(1, math.ceil(min_seconds / once))
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            torch.mm(a, b, out=out)
        _sync(device)
        rates.append(2.0 * m * k * n * iters / max(time.perf_counter() - t0, 1e-9))
    return rates


def _combine(rates: Sequence[float], weights: Sequence[float]) -> float:
    """Effective rate of a FLOP mix: total flops / total time, each part at its own rate."""
    return sum(weights) / sum(w / r for w, r in zip(weights, rates, strict=True))


def measure_matmul_flops(shapes: Sequence[Sequence[float]] | None = None, *, dtype=None, device: str = "cpu",
                         repeats: int = 7, min_seconds: float = 0.05) -> dict[str, Any]:
    """Measured torch.mm FLOP/s, best and median over `repeats`, per shape and for the whole mix.

    `shapes`: (m, k, n) or (m, k, n, weight) tuples; default: SmolLM2-135M's matmuls at 2048 rows.
    The mix's `best_flops`/`median_flops` weight each shape by its FLOP share (time adds up, rates do not).
    """
    import torch

    dtype = dtype or torch.float32
    dev = torch.device(device)
    shapes = shapes if shapes is not None else model_matmul_shapes(SMOLLM2_135M, rows=2048)
    rows, bests, medians, weights = [], [], [], []
    for shape in shapes:
        m, k, n = (int(x) for x in shape[:3])
        weight = float(shape[3]) if len(shape) > 3 else 2.0 * m * k * n
        rates = _time_mm(m, k, n, dtype, dev, repeats, min_seconds)
        best, median = max(rates), statistics.median(rates)
        rows.append({"m": m, "k": k, "n": n, "best_flops": best, "median_flops": median})
        bests.append(best)
        medians.append(median)
        weights.append(weight)
    return {"dtype": str(dtype).replace("torch.", ""), "device": str(dev), "threads": torch.get_num_threads(),
            "repeats": repeats, "shapes": rows, "best_flops": _combine(bests, weights),
            "median_flops": _combine(medians, weights), "peak_shape_flops": max(bests)}


def ceilings(flops: Mapping[str, float], rate: float) -> dict[str, float]:
    """Tokens/s at `rate` FLOP/s if the matmuls were all there was: forward, and fwd+bwd both ways."""
    fwd = flops["forward"] + flops["lm_head_forward"]
    return {"forward_tokens_per_s": rate / fwd,
            "train_6n_tokens_per_s": rate / (flops["train_6n"] + 3.0 * flops["lm_head_forward"]),
            "train_lora_tokens_per_s": rate / (flops["train_lora"] + flops["lm_head_train"])}


# --- main ----------------------------------------------------------------------------------------

def load_config(spec: str) -> Any:
    """`bundled`, `tiny`, a config.json (or its folder), or a hub id already in the local cache."""
    if spec == "bundled":
        return SMOLLM2_135M
    if spec == "tiny":
        return TINY
    from transformers import AutoConfig

    path = spec[:-len("config.json")] if spec.endswith("config.json") else spec
    try:
        return AutoConfig.from_pretrained(path or ".")
    except Exception as e:  # transformers raises OSError/ValueError/HF errors
        raise SystemExit(f"cannot read a model config from {spec!r}: {e} (offline: give a local config.json)") from e


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="bundled", help="bundled | tiny | path to config.json | cached hub id")
    parser.add_argument("--rows", type=int, default=2048, help="tokens per forward (batch x sequence)")
    parser.add_argument("--context", type=int, default=320, help="sequence length for the attention term")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--bf16", action="store_true", help="also measure bfloat16 matmuls")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every CPU)")
    parser.add_argument("--tiny", action="store_true", help="smoke run: tiny shapes, 2 repeats")
    args = parser.parse_args(argv)

    import torch

    if args.tiny:
        args.config, args.rows, args.repeats, args.context = "tiny", 64, 2, 32
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    load_start = load_average()
    config = load_config(args.config)
    flops = model_flops_per_token(config, context=args.context, lora_rank=args.lora_rank)
    shapes = model_matmul_shapes(config, rows=args.rows)
    min_seconds = 0.005 if args.tiny else 0.05
    dtypes = [torch.float32] + ([torch.bfloat16] if args.bf16 or device.startswith("cuda") else [])
    measured = {}
    for dt in dtypes:
        mm = measure_matmul_flops(shapes, dtype=dt, device=device, repeats=args.repeats, min_seconds=min_seconds)
        measured[mm["dtype"]] = {**mm, "ceiling_best": ceilings(flops, mm["best_flops"]),
                                 "ceiling_median": ceilings(flops, mm["median_flops"])}
    return {"machine": {**machine_info(device), "load_avg_start": load_start, "load_avg_end": load_average()},
            "config": args.config, "rows": args.rows, "flops_per_token": flops, "matmul": measured}


def print_table(result: Mapping[str, Any]) -> None:
    f = result["flops_per_token"]
    m = result["machine"]
    print(f"\n{'machine':26s} {m['processor']} x{m['cpus']} ({m['torch_threads']} threads)   "
          f"load {m['load_avg_start']} -> {m['load_avg_end']}")
    print(f"{'non-embedding params N':26s} {f['params_nonembedding'] / 1e6:.1f} M   context {f['context']:.0f}")
    print(f"{'FLOPs/token':26s} fwd {f['forward'] / 1e6:.0f} M  6N-train {f['train_6n'] / 1e6:.0f} M  "
          f"LoRA-train {f['train_lora'] / 1e6:.0f} M  head {f['lm_head_forward'] / 1e6:.0f} M")
    for dt, mm in result["matmul"].items():
        best, med = mm["ceiling_best"], mm["ceiling_median"]
        print(f"{'matmul ' + dt:26s} best {mm['best_flops'] / 1e9:.1f} GFLOP/s  median {mm['median_flops'] / 1e9:.1f}")
        print(f"{'  ceiling tokens/s':26s} fwd {best['forward_tokens_per_s']:.0f} (median "
              f"{med['forward_tokens_per_s']:.0f})  6N-train {best['train_6n_tokens_per_s']:.0f}  "
              f"LoRA-train {best['train_lora_tokens_per_s']:.0f}")


def main(argv: Sequence[str] | None = None) -> int:
    result = run(argv)
    print(json.dumps(result))
    print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
