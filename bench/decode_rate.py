"""What bounds the llama.cpp rollout stage: milliseconds per decode step by rows decoded together and weight type.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/decode_rate.py [--rows 1,4,8,16] [--weights f16,q8_0,base]
    HF_HUB_OFFLINE=1 .venv/bin/python bench/decode_rate.py --tiny     # smoke run (seconds)

The rollout backend (`LlamaCppRollout`, no LoRA: merged weights cost the same per step) samples the first
rows of the sample items, EOS suppressed, `--tokens` new tokens each, and again 1 token each; the
difference over tokens - 1 is the cost of one decode step, free of the prefill (sampling in torch
included, as in a round). A least-squares line over the rows splits a step into a fixed part (graph
set-up, thread sync, sampling) and a part per row; the effective rate is the model's forward FLOPs
(bench/limit.py's count, at the mean attended context) for all rows over the step's time. A per-row part
that does not move with the weight type says the step is bound by compute in llama.cpp's small-batch
kernels rather than by reading the weights. One JSON object, then a table; never asserts on time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))  # bench.siblings, and the repository's own packages

from bench.siblings import load  # noqa: E402  (after the path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default=None, help="comma-separated rows per decode step (default 1,4,8,16)")
    p.add_argument("--weights", default=None, help="comma-separated rollout weights: f16, bf16, q8_0, base "
                                                   "(default all three)")
    p.add_argument("--tokens", type=int, default=None, help="new tokens per row (default 64)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per point, median kept (default 3)")
    p.add_argument("--tiny", action="store_true", help="smoke run: tiny random llama, rows 1,2, 4 tokens")
    return p


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line through (xs, ys); slope 0 for a single point."""
    if len(xs) < 2:
        return float(ys[0]), 0.0
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def _median_seconds(backend, model, prompts, tokens: int, repeats: int) -> float:
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        backend.generate(model, prompts, max_new_tokens=tokens, min_new_tokens=tokens, seed=r)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    rows = [int(x) for x in (args.rows or ("1,2" if args.tiny else "1,4,8,16")).split(",")]
    weights = (args.weights or ("f16,base" if args.tiny else "f16,q8_0,base")).split(",")
    tokens = args.tokens or (4 if args.tiny else 64)
    repeats = args.repeats or (1 if args.tiny else 3)
    if tokens < 2:
        raise SystemExit("--tokens must be at least 2 (one decode step beyond the first token)")

    from edge_unisd.views import render_prompt

    tp = load("throughput")
    limit = load("limit")
    load_start = limit.load_average()
    loaded = tp.load_model("tiny" if args.tiny else "bundled")
    items, _ = tp.bench_items(max(rows))
    prompts = [render_prompt(loaded.tokenizer, it.messages, None) for it in items]
    mean_context = statistics.fmean(len(p) for p in prompts) + tokens / 2.0
    flops = limit.model_flops_per_token(loaded.model.config, context=2.0 * mean_context)
    forward_flops = flops["forward"] + flops["lm_head_forward"]  # per row and step
    points = []
    for w in weights:
        backend = tp.build_rollout_backend("llamacpp", loaded, tiny=args.tiny, weights=w)
        try:
            backend.generate(loaded.model, prompts, max_new_tokens=2, min_new_tokens=2, seed=0)  # context, warm-up
            for n in rows:
                full = _median_seconds(backend, loaded.model, prompts[:n], tokens, repeats)
                first = _median_seconds(backend, loaded.model, prompts[:n], 1, repeats)
                step = max(full - first, 0.0) / (tokens - 1)
                points.append({"weights": w, "file": backend.base_gguf.name, "rows": n, "seconds": full,
                               "first_token_seconds": first, "step_ms": 1e3 * step,
                               "tokens_per_s": n / step if step else None,
                               "effective_gflops": n * forward_flops / step / 1e9 if step else None})
                tp.progress(f"{w}, {n} rows: {1e3 * step:.1f} ms a decode step")
        finally:
            backend.close()
    fits = {}
    for w in weights:
        mine = [p for p in points if p["weights"] == w]
        fixed, per_row = fit_line([p["rows"] for p in mine], [p["step_ms"] for p in mine])
        fits[w] = {"fixed_ms": fixed, "per_row_ms": per_row}
    return {"bench": "decode_rate", "model": "tiny" if args.tiny else "bundled",
            "machine": {**limit.machine_info("cpu"), "load_avg_start": load_start,
                        "load_avg_end": limit.load_average()},
            "settings": {"rows": rows, "weights": weights, "tokens": tokens, "repeats": repeats,
                         "forward_flops_per_row_step": forward_flops, "mean_context": mean_context},
            "points": points, "fits": fits}


def print_table(r: dict[str, Any]) -> None:
    m = r["machine"]
    print(f"\n{r['model']} | {r['settings']['tokens']} tokens a row | {m['processor']} x{m['cpus']} | "
          f"load {m['load_avg_start']} -> {m['load_avg_end']}")
    print(f"{'weights':8} {'rows':>4} {'ms/step':>8} {'tokens/s':>9} {'GFLOP/s':>8}")
    for p in r["points"]:
        rate = "-" if p["effective_gflops"] is None else f"{p['effective_gflops']:.1f}"
        tps = "-" if p["tokens_per_s"] is None else f"{p['tokens_per_s']:.0f}"
        print(f"{p['weights']:8} {p['rows']:4d} {p['step_ms']:8.1f} {tps:>9} {rate:>8}")
    for w, f in r["fits"].items():
        print(f"{w}: a step = {f['fixed_ms']:.1f} ms + {f['per_row_ms']:.2f} ms per row")


def main(argv: Sequence[str] | None = None) -> int:
    result = run(argv)
    print(json.dumps(result))
    print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
