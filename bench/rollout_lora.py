"""llama.cpp rollouts with the live LoRA merged into the weights vs applied as an adapter, alternating.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/rollout_lora.py [--tokens 64,256] [--batch 8] [--repeats 3]
    HF_HUB_OFFLINE=1 .venv/bin/python bench/rollout_lora.py --tiny      # smoke run (seconds)

Two `LlamaCppRollout`s on the same base (the bundled model's f16 rollout copy; --tiny: a tiny random llama
as f32 GGUF), one with `lora="merged"`, one with `lora="adapter"`, sample the same prompts (the first
`--batch` sample items, EOS suppressed so every row is `--tokens` long) from the same LoRA (rank 16 on every
linear layer, lora_B drawn at --b-std so the adapter changes the output, as a trained one does). Calls
alternate merged/adapter, the order flipping every repeat, so load from other jobs hits both alike.
Per mode and length: median seconds per call (the adapter write or merged write included), tokens/s, and
the share of greedy tokens both modes agree on (they differ by where f32/f16 rounding falls). One JSON
object, then a table; never asserts on time.
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

MODES = ("merged", "adapter")


def throughput():
    """bench/throughput.py: model loading, items and the rollout backend set-up are shared with it."""
    return load("throughput")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default=None, help="comma-separated completion lengths (default 64,256)")
    p.add_argument("--batch", type=int, default=None, help="prompts per call (default 8)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per mode and length (default 3)")
    p.add_argument("--b-std", type=float, default=0.02, help="std of the random lora_B")
    p.add_argument("--tiny", action="store_true", help="smoke run: tiny random llama, 4 tokens, 1 repeat")
    return p


def _agreement(a, b) -> float:
    return float((a.completion_ids == b.completion_ids).float().mean())


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    lengths = [int(t) for t in (args.tokens or ("4" if args.tiny else "64,256")).split(",")]
    batch = args.batch or (2 if args.tiny else 8)
    repeats = args.repeats or (1 if args.tiny else 3)

    import torch

    from edge_unisd.modeling import attach_lora
    from edge_unisd.views import render_prompt

    tp = throughput()
    limit = tp.sibling("limit")
    load_start = limit.load_average()
    loaded = tp.load_model("tiny" if args.tiny else "bundled")
    # before the LoRA: random weights are exported to a GGUF from the plain model's state dict
    backends = {mode: tp.build_rollout_backend("llamacpp", loaded, tiny=args.tiny, lora=mode) for mode in MODES}
    torch.manual_seed(0)
    model = attach_lora(loaded.model, rank=4 if args.tiny else 16, alpha=8.0 if args.tiny else 32.0, dropout=0.0,
                        target_modules="all-linear")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, args.b_std)
    items, _ = tp.bench_items(batch)
    prompts = [render_prompt(loaded.tokenizer, it.messages, None) for it in items]
    seconds: dict[str, dict[int, list[float]]] = {mode: {n: [] for n in lengths} for mode in MODES}
    agreement = {}
    try:
        for backend in backends.values():
            backend.generate(model, prompts, max_new_tokens=4, min_new_tokens=4, seed=0)  # contexts, first write
        for n in lengths:
            for r in range(repeats):
                order = MODES if r % 2 == 0 else MODES[::-1]
                for mode in order:
                    t0 = time.perf_counter()
                    backends[mode].generate(model, prompts, max_new_tokens=n, min_new_tokens=n, seed=r)
                    seconds[mode][n].append(time.perf_counter() - t0)
                tp.progress(f"{n} tokens, repeat {r + 1}/{repeats}: "
                            + ", ".join(f"{m} {seconds[m][n][-1]:.2f} s" for m in MODES))
            greedy = {m: backends[m].generate(model, prompts, max_new_tokens=n, min_new_tokens=n, temperature=0.0)
                      for m in MODES}
            agreement[n] = _agreement(greedy["merged"], greedy["adapter"])
        totals = {mode: dict(b.totals) for mode, b in backends.items()}
    finally:
        for backend in backends.values():
            backend.close()

    rows = []
    for n in lengths:
        median = {m: statistics.median(seconds[m][n]) for m in MODES}
        for m in MODES:
            rows.append({"mode": m, "tokens": n, "seconds": seconds[m][n], "median_seconds": median[m],
                         "tokens_per_s": batch * n / median[m], "speedup_vs_adapter": median["adapter"] / median[m],
                         "greedy_agreement": agreement[n]})
    return {"bench": "rollout_lora", "model": "tiny" if args.tiny else "bundled",
            "machine": {**limit.machine_info("cpu"), "load_avg_start": load_start,
                        "load_avg_end": limit.load_average()},
            "settings": {"batch": batch, "tokens": lengths, "repeats": repeats, "b_std": args.b_std,
                         "rollout_weights": backends["merged"].base_gguf.name},
            "rows": rows, "backend_totals": totals}


def print_table(r: dict[str, Any]) -> None:
    m = r["machine"]
    print(f"\n{r['model']} | batch {r['settings']['batch']} | {m['processor']} x{m['cpus']} | "
          f"load {m['load_avg_start']} -> {m['load_avg_end']}")
    print(f"{'mode':8} {'tokens':>6} {'s/call':>7} {'tokens/s':>9} {'x adapter':>9} {'greedy agree':>12}")
    for row in r["rows"]:
        print(f"{row['mode']:8} {row['tokens']:6d} {row['median_seconds']:7.2f} {row['tokens_per_s']:9.1f} "
              f"{row['speedup_vs_adapter']:9.2f} {row['greedy_agreement']:12.3f}")


def main(argv: Sequence[str] | None = None) -> int:
    result = run(argv)
    print(json.dumps(result))
    print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
