"""Padding-free rows against padded batches: the student's fwd+bwd and the teacher's forward, A/B on one batch.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/packing.py [--batch 8] [--tokens 64] [--lengths fixed,varied]
    HF_HUB_OFFLINE=1 .venv/bin/python bench/packing.py --tiny       # smoke run (seconds)

Completion lengths: `fixed` gives every row `--tokens` tokens (what bench/throughput.py forces); `varied`
draws each row's length uniformly from [tokens/8, tokens] (seeded), as sampled completions that stop at EOS.
On the sample user's items with a reference answer: the student runs `completion_hidden` through the
trainer's LoRA model and a loss of its hidden states backward, with the activation budget applied for
each path's own token count (as the trainer does); the vocabulary chunks, which cost the same either way,
are left out. The teacher runs `completion_hidden_shared_prefix` on the base weights with the prefix
cached (the `sd` preset's teacher). Packed and padded alternate `--repeats` times on the same batch;
medians are printed as one JSON object and a table. Never asserts on time.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULTS = {False: {"model": "bundled", "batch": 8, "tokens": 64, "repeats": 4},
            True: {"model": "tiny", "batch": 3, "tokens": 6, "repeats": 1}}


def completion_masks(batch: int, tokens: int, mode: str, seed: int = 0):
    """(B, L) masks: every row full (`fixed`) or each row 1 for a length drawn from [tokens/8, tokens] (`varied`)."""
    import torch

    if mode == "fixed":
        return torch.ones(batch, tokens)
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(1, tokens // 8), tokens + 1, (batch,), generator=g)
    return (torch.arange(tokens).unsqueeze(0) < lengths.unsqueeze(1)).float()


def _student_seconds(trainer, prompts: Sequence[Sequence[int]], rollout, pack: bool) -> tuple[float, int, int]:
    """One student fwd+bwd as the trainer runs it; -> (seconds, decoder positions, layers kept)."""
    from edge_unisd.checkpointing import apply_activation_budget
    from edge_unisd.scoring import completion_hidden, forward_tokens

    model, cfg = trainer.model, trainer.cfg
    model.train()
    t0 = time.perf_counter()
    tokens = forward_tokens(model, prompts, rollout, pack=pack)
    kept = apply_activation_budget(model, tokens, cfg.activation_budget_mb << 20)
    hidden = completion_hidden(model, prompts, rollout, trainer.pad_id, pack=pack)
    mask = rollout.completion_mask
    loss = (hidden.pow(2).mean(-1) * mask).sum() / mask.sum()
    loss.backward()
    seconds = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    return seconds, tokens, kept


def _teacher_seconds(trainer, prompts: Sequence[Sequence[int]], rollout, pack: bool, memo: dict) -> float:
    import torch

    from edge_unisd.scoring import completion_hidden_shared_prefix

    model = trainer.model
    model.eval()
    t0 = time.perf_counter()
    with torch.no_grad(), model.disable_adapter():
        completion_hidden_shared_prefix(model, prompts, rollout, trainer.pad_id, trainer.cfg.score_batch_size,
                                        memo=memo, pack=pack)
    return time.perf_counter() - t0


def measure_mode(trainer, items: Sequence, tokens: int, mode: str, repeats: int, profile: str) -> dict[str, Any]:
    """Packed vs padded medians for one completion-length mode, alternating which goes first."""
    import torch

    from edge_unisd.rollout import Rollout
    from edge_unisd.views import primary_context, render_prompt

    tok = trainer.tokenizer
    student = [render_prompt(tok, it.messages, None) for it in items]
    teacher = [render_prompt(tok, it.messages, primary_context(it, profile)) for it in items]
    mask = completion_masks(len(items), tokens, mode)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(100, len(tok), (len(items), tokens), generator=g)
    rollout = Rollout(ids, mask)
    memo: dict = {}
    _teacher_seconds(trainer, teacher, rollout, True, memo)  # fills the prefix cache, warms both paths up
    _student_seconds(trainer, student, rollout, True)
    seconds: dict[bool, dict[str, list[float]]] = {p: {"student": [], "teacher": []} for p in (True, False)}
    positions, kept = {}, {}
    for r in range(repeats):
        for pack in ((True, False) if r % 2 == 0 else (False, True)):
            s, positions[pack], kept[pack] = _student_seconds(trainer, student, rollout, pack)
            seconds[pack]["student"].append(s)
            seconds[pack]["teacher"].append(_teacher_seconds(trainer, teacher, rollout, pack, memo))
    med = {p: {k: statistics.median(v) for k, v in seconds[p].items()} for p in seconds}
    real = int(mask.sum())
    return {"lengths": mode, "completion_tokens": real, "mean_completion_tokens": real / len(items),
            "student_positions": {"packed": positions[True], "padded": positions[False]},
            "kept_layers": {"packed": kept[True], "padded": kept[False]},
            "student_seconds": {"packed": med[True]["student"], "padded": med[False]["student"]},
            "teacher_seconds": {"packed": med[True]["teacher"], "padded": med[False]["teacher"]},
            "student_speedup": med[False]["student"] / med[True]["student"],
            "teacher_speedup": med[False]["teacher"] / med[True]["teacher"],
            "seconds": {"packed": seconds[True], "padded": seconds[False]}}


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--tokens", type=int, default=None, help="longest completion (every row's, for `fixed`)")
    ap.add_argument("--lengths", default="fixed,varied", help="comma-separated: fixed, varied")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs of each path per mode")
    ap.add_argument("--tiny", action="store_true", help="tiny random llama, one repeat")
    args = ap.parse_args(argv)
    for key, value in DEFAULTS[args.tiny].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    modes = args.lengths.split(",")
    if unknown := [m for m in modes if m not in ("fixed", "varied")]:
        raise SystemExit(f"--lengths: unknown mode(s) {', '.join(unknown)}; choose from fixed, varied")
    import torch

    from edge_unisd.config import load_method_config
    from edge_unisd.sample_data import load_profile
    from edge_unisd.scoring import packs_rows

    throughput = _throughput()
    limit = throughput.sibling("limit")
    torch.set_num_threads(os.cpu_count() or 1)
    load_start = limit.load_average()
    cfg = load_method_config("sd", throughput.method_overrides(batch=args.batch, tokens=args.tokens, lora_rank=16))
    loaded = throughput.load_model(args.model)
    items, pool = throughput.bench_items(args.batch)
    trainer = throughput.build_trainer(loaded, cfg, pool, total_steps=1)
    if not packs_rows(trainer.model):
        raise SystemExit("this model does not run packed rows (needs edge_unisd's CPU attention path: grouped "
                         "KV heads, on the CPU)")
    rows = []
    for mode in modes:
        throughput.progress(f"{mode} lengths: {args.repeats} x packed and padded")
        rows.append(measure_mode(trainer, items, args.tokens, mode, args.repeats, load_profile()))
    return {"bench": "packing",
            "machine": {**limit.machine_info(str(loaded.device)), "load_avg_start": load_start,
                        "load_avg_end": limit.load_average()},
            "model": throughput.model_summary(args.model, loaded),
            "settings": {"batch": args.batch, "tokens": args.tokens, "repeats": args.repeats,
                         "activation_budget_mb": cfg.activation_budget_mb,
                         "score_batch_size": cfg.score_batch_size},
            "modes": rows}


def _throughput():
    from bench.siblings import load

    return load("throughput")


def print_table(r: dict[str, Any]) -> None:
    m = r["machine"]
    print(f"\n{r['model']['name']} | batch {r['settings']['batch']} x up to {r['settings']['tokens']} tokens | "
          f"{m['processor']} x{m['cpus']} | load {m['load_avg_start']} -> {m['load_avg_end']}")
    print(f"{'lengths':8} {'tokens':>6} {'positions packed/padded':>24} {'kept':>6} "
          f"{'student s packed/padded':>24} {'x':>5} {'teacher s packed/padded':>24} {'x':>5}")
    for row in r["modes"]:
        pos, kept = row["student_positions"], row["kept_layers"]
        st, te = row["student_seconds"], row["teacher_seconds"]
        print(f"{row['lengths']:8} {row['completion_tokens']:6d} {pos['packed']:>11d} / {pos['padded']:<10d} "
              f"{kept['packed']:>2d}/{kept['padded']:<3d} {st['packed']:>11.2f} / {st['padded']:<10.2f} "
              f"{row['student_speedup']:5.2f} {te['packed']:>11.2f} / {te['padded']:<10.2f} "
              f"{row['teacher_speedup']:5.2f}")


def main(argv: Sequence[str] | None = None) -> int:
    r = run(argv)
    print(json.dumps(r))
    print_table(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
