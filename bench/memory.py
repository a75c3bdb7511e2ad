"""Peak memory of one UniSD training step on the bundled SmolLM2-135M (CPU).

    .venv/bin/python bench/memory.py [--batch 8] [--tokens 256] [--preset edge] [--dtype float32|bfloat16]

Prints one JSON object and a short table. The chunked vocabulary path and activation
checkpointing are what keep this low: a naive step that materialises full (B, T, V) logits for
student and teacher measured 10.8 GB RSS here at batch 8 x 256.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench.siblings, and the repository's packages

from bench.siblings import load  # noqa: E402  (after the path)

# one definition of RSS and of ru_maxrss's KiB for every benchmark (bench/throughput.py)
rss_gb = load("throughput").rss_gb
peak_rss_gb = load("throughput").peak_rss_gb


class StagePeaks:
    """Samples RSS every few ms and charges the peak to the trainer stage running at the time."""

    def __init__(self) -> None:
        import threading

        self.stage, self.peaks, self._stop = "setup", {}, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            gb = rss_gb()
            self.peaks[self.stage] = max(self.peaks.get(self.stage, 0.0), gb)

    def watch_trainer_stages(self) -> None:
        from edge_unisd import trainer

        original = trainer._StageTimer.run
        sampler = self

        def run(timer, stage):
            ctx = original(timer, stage)
            enter, exit_ = ctx.__enter__, ctx.__exit__

            class Wrapped:
                def __enter__(self):
                    sampler.stage = stage
                    return enter()

                def __exit__(self, *exc):
                    sampler.stage = "between"
                    return exit_(*exc)

            return Wrapped()

        trainer._StageTimer.run = run
        self._thread.start()

    def close(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return {k: round(v, 3) for k, v in self.peaks.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256, help="completion tokens per item (EOS suppressed)")
    parser.add_argument("--preset", default="edge")
    parser.add_argument("--chunk-tokens", type=int, default=None, help="rows per vocabulary chunk (default: config)")
    parser.add_argument("--no-checkpointing", action="store_true", help="keep decoder activations (more memory)")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: what the daemon's auto picks)")
    args = parser.parse_args()

    import torch

    from edge_unisd.config import load_method_config
    from edge_unisd.modeling import attach_lora, load_base
    from edge_unisd.sample_data import load_profile, load_sample_items
    from edge_unisd.trainer import UniSDTrainer

    base = load_base(dtype=args.dtype)
    rss_loaded = rss_gb()
    cfg = load_method_config(args.preset, {
        "rollout": {"max_new_tokens": args.tokens, "min_new_tokens": args.tokens},
        "optim": {"batch_size": args.batch, "micro_batch_size": args.batch},
        "gradient_checkpointing": not args.no_checkpointing,
        **({"chunk_tokens": args.chunk_tokens} if args.chunk_tokens else {}),
    })
    model = attach_lora(base.model, rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=0.0,
                        target_modules=cfg.lora.target_modules)
    items = [it for it in load_sample_items() if it.reference][: args.batch]
    trainer = UniSDTrainer(model, base.tokenizer, cfg, total_steps=1, profile=load_profile(), pool=items)
    torch.set_num_threads(os.cpu_count() or 1)
    peaks = StagePeaks()
    peaks.watch_trainer_stages()
    t0 = time.perf_counter()
    # route a quarter of the batch to the K-view path, as the daemon's planner would
    report = trainer.step(items, view_item_ids={it.id for it in items[: max(1, args.batch // 4)]})
    seconds = time.perf_counter() - t0
    stage_peaks = peaks.close()
    result = {
        "model": f"SmolLM2-135M-Instruct ({str(base.dtype).removeprefix('torch.')}, CPU)", "preset": args.preset,
        "batch": args.batch,
        "completion_tokens": report.tokens["completion"], "view_items": report.tokens["view_items"],
        "gradient_checkpointing": not args.no_checkpointing, "activation_budget_mb": cfg.activation_budget_mb,
        "kept_layers": trainer.kept_layers, "chunk_tokens": cfg.chunk_tokens,
        "rss_after_load_gb": round(rss_loaded, 3), "peak_rss_gb": round(peak_rss_gb(), 3),
        "peak_rss_gb_by_stage": stage_peaks, "step_seconds": round(seconds, 2),
        "stage_seconds": {k: round(v, 2) for k, v in report.stage_seconds.items()},
    }
    print(json.dumps(result))
    print(f"\n{'peak RSS of one step':28s} {result['peak_rss_gb']:.2f} GB   (after load {rss_loaded:.2f} GB)")
    print(f"{'batch x completion tokens':28s} {args.batch} x {args.tokens} = {report.tokens['completion']}")
    print(f"{'peak RSS by stage (GB)':28s} " + "  ".join(f"{k} {v:.2f}" for k, v in stage_peaks.items()))
    stages = "  ".join(f"{k} {v:.1f}" for k, v in result["stage_seconds"].items())
    print(f"{'step time':28s} {seconds:.1f} s   {stages}")


if __name__ == "__main__":
    main()
