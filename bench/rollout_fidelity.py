"""What llama.cpp rollouts sample from: how on-policy and how fast each `rollout.llama_weights` choice is.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/rollout_fidelity.py [--weights f16,q8_0,base] [--batch 8] [--tokens 64]

The trainer computes its loss with the torch model (the bundled Q4_1 file dequantised to fp32); the
rollouts should come from the same distribution. For each choice this prints the next-token KL of
llama.cpp against that torch model and their top-1 agreement over adapters/verify.py's probes (chat
prompts with answers, plain texts), and the rollout speed of `LlamaCppRollout` at batch x tokens with a
fresh LoRA (EOS suppressed). One JSON object, then a table; never asserts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default="f16,q8_0,base", help="comma-separated rollout.llama_weights choices")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="timed generate calls per choice")
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16: the torch model's compute dtype (default: "
                                                  "edge_unisd.modeling.pick_device_dtype's choice)")
    args = ap.parse_args()

    import torch

    from adapters.llama_rollout import LlamaCppRollout
    from adapters.verify import _probe_divergence, open_llama, probe_ids
    from edge_unisd.modeling import attach_lora, load_base
    from edge_unisd.sample_data import load_sample_items
    from edge_unisd.views import render_prompt

    base = load_base(None, dtype=args.dtype)
    probes = probe_ids(base.tokenizer)
    n_ctx = max(len(p) for p in probes) + 8
    torch.manual_seed(0)
    model = attach_lora(base.model, rank=16, alpha=32.0, dropout=0.0, target_modules="all-linear")
    items = load_sample_items()[:args.batch]
    prompts = [render_prompt(base.tokenizer, it.messages, None) for it in items]
    threads = torch.get_num_threads()

    rows = []
    for weights in args.weights.split(","):
        backend = LlamaCppRollout(base.source.path, base.tokenizer, n_threads=threads, weights=weights)
        try:
            llm = open_llama(backend.base_gguf, n_ctx=n_ctx, n_threads=threads)
            with model.disable_adapter():
                kl, top = _probe_divergence(model, llm, probes)
            del llm
            backend.generate(model, prompts, max_new_tokens=8, min_new_tokens=8, seed=0)  # warm-up
            seconds = []
            for r in range(args.repeats):
                t0 = time.perf_counter()
                backend.generate(model, prompts, max_new_tokens=args.tokens, min_new_tokens=args.tokens, seed=r)
                seconds.append(time.perf_counter() - t0)
        finally:
            backend.close()
        rows.append({"weights": weights, "file": backend.base_gguf.name, "mean_kl": float(kl.mean()),
                     "p95_kl": float(sorted(kl)[int(0.95 * (len(kl) - 1))]), "top1": float(top.mean()),
                     "positions": int(len(kl)), "tokens_per_s": args.batch * args.tokens / min(seconds),
                     "seconds": seconds})

    print(json.dumps({"model": base.source.path.name, "dtype": str(base.dtype).removeprefix("torch."),
                      "batch": args.batch, "tokens": args.tokens,
                      "threads": threads, "rows": rows}))
    print(f"\n{'weights':8} {'mean KL':>9} {'p95 KL':>9} {'top-1':>6} {'tokens/s':>9}  file")
    for r in rows:
        print(f"{r['weights']:8} {r['mean_kl']:9.5f} {r['p95_kl']:9.5f} {r['top1']:6.3f} {r['tokens_per_s']:9.1f}  "
              f"{r['file']}")


if __name__ == "__main__":
    main()
