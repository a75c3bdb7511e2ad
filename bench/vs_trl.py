"""The same self-distillation work through TRL's SDFTTrainer and through edge-unisd's `sd` and `edge` presets.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/vs_trl.py [--batch 8] [--tokens 64] [--steps 3] [--rounds 2]
    HF_HUB_OFFLINE=1 .venv/bin/python bench/vs_trl.py --tiny          # smoke run: tiny random llama, 1 step

Every run is a child process of this one (so each run's peak RSS is its own: `os.wait4` returns the
child's ru_maxrss), and the runs alternate TRL, sd, edge, TRL, sd, edge, ... for `--rounds`, so load
from other jobs on the machine hits every system alike. Per system: median seconds per step and
completion tokens/s over the rounds, the highest peak RSS; then the ratios ours / TRL.

The same work, on both sides:
- model: `edge_unisd.modeling.load_base()` (the bundled SmolLM2-135M, in `--dtype`: fp32 by default), the
  objects passed to SDFTTrainer (with `bf16=True`, its autocast, under `--dtype bfloat16`); tokenizer
  likewise. Both children get the same glibc heap policy (load_base sets it, edge_unisd.heap), so memory
  compares the trainers, not the allocator setting;
- prompts: the bundled sample user's items with a reference, in file order, unshuffled on both sides
  (step s trains items[s*B:(s+1)*B]);
- teacher: the frozen base (adapter disabled) seeing the privileged context c_0 = the user's profile + the
  item's reference as a demonstration, injected into the last user turn exactly as edge-unisd renders it
  (`teacher_prompt_template="{privileged_context}\\n\\n---\\n\\n{prompt}"`); the child checks the token ids
  of TRL's student and teacher prompts equal ours (`prompts_match`);
- LoRA r (alpha 2r, dropout 0) on every linear layer of the decoder; AdamW, constant LR, grad-norm 1;
- batch B, one generation per prompt, exactly `--tokens` completion tokens (min = max new tokens),
  temperature 1, no top-p/top-k; activation checkpointing on both sides;
- objective: forward KL over the full vocabulary (TRL `distillation_mode="full_logits"`, alpha 0, which is
  our `sd`); `--trl-mode topk_logits` gives TRL's default top-100 objective instead.
TRL's extras are off: no eval, no saving, no logging or hub reporting, no importance-sampling correction
(it only applies when one generation serves several steps), `--dtype` (TRL would default to bf16 autocast).
`edge` does more than TRL: EMA teacher, clipping, feature and contrastive terms, K=3 views for
`--view-fraction` of each batch.

Seconds per step are timed from `on_step_begin` to `on_step_end` for TRL (generation, teacher, student,
optimizer) and around `UniSDTrainer.step` for ours; `--warmup` steps before them are not counted.
Prints one JSON object and a short table, with the load average at start and end. Never asserts on time.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))  # bench.siblings, and the repository's own packages

from bench.siblings import load  # noqa: E402  (after the path)

SYSTEMS = ("trl", "sd", "edge", "sd-llamacpp", "edge-llamacpp")
DEFAULT_SYSTEMS = ("trl", "sd", "edge")
LLAMACPP_SUFFIX = "-llamacpp"  # ours with rollouts sampled by llama.cpp (adapters.llama_rollout)
TEACHER_TEMPLATE = "{privileged_context}\n\n---\n\n{prompt}"  # edge_unisd.views.render_prompt's layout
LOG_TAIL = 3000  # characters of a failed child's log shown in the error

DEFAULTS = {
    False: {"model": "bundled", "batch": 8, "tokens": 64, "steps": 3, "warmup": 1, "rounds": 2},
    True: {"model": "tiny", "batch": 2, "tokens": 4, "steps": 1, "warmup": 0, "rounds": 1},
}


def throughput():
    """bench/throughput.py: model loading, items and our trainer set-up are shared with it."""
    return load("throughput")


def trl_available() -> bool:
    return importlib.util.find_spec("trl") is not None


# --- the child: one run --------------------------------------------------------------------------

def _start_child(args: argparse.Namespace):
    """Common start of a child: threads, load average, model, items (warm-up + timed steps)."""
    import torch

    tp = throughput()
    limit = tp.sibling("limit")
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    load_start = limit.load_average()
    loaded = tp.load_model(args.model, dtype=args.dtype)
    items, pool = tp.bench_items(args.batch * (args.warmup + args.steps))
    return tp, limit, load_start, loaded, items, pool


def _child_result(tp, limit, load_start, rss_loaded: float, peak_at_load: float, step_seconds: Sequence[float],
                  step_tokens: Sequence[int], rollout_seconds: Sequence[float], extra: Mapping[str, Any]) -> dict:
    tokens, seconds = sum(step_tokens), sum(step_seconds)
    return {"step_seconds": list(step_seconds), "step_tokens": list(step_tokens),
            "rollout_seconds": list(rollout_seconds), "completion_tokens": tokens,
            "seconds_per_step": seconds / max(1, len(step_seconds)),
            "tokens_per_s": tokens / seconds if seconds > 0 else None,
            "rollout_seconds_per_step": sum(rollout_seconds) / max(1, len(rollout_seconds)),
            "rss_after_load_gb": rss_loaded, "peak_rss_at_load_gb": peak_at_load, "peak_rss_gb_self": tp.peak_rss_gb(),
            "load_avg_start": load_start, "load_avg_end": limit.load_average(), **extra}


def run_ours(args: argparse.Namespace, system: str) -> dict[str, Any]:
    from edge_unisd.config import load_method_config

    preset = system.removesuffix(LLAMACPP_SUFFIX)
    backend_kind = "llamacpp" if system.endswith(LLAMACPP_SUFFIX) else "hf"
    tp, limit, load_start, loaded, items, pool = _start_child(args)
    rss_loaded, peak_at_load = tp.rss_gb(), tp.peak_rss_gb()  # RSS now, and the loading's own peak
    overrides = tp.method_overrides(batch=args.batch, tokens=args.tokens, lora_rank=args.lora_rank, lr=args.lr,
                                    rollout_backend=backend_kind)
    overrides["optim"].update({"schedule": "constant", "warmup_ratio": 0.0})
    cfg = load_method_config(preset, overrides)
    batches = tp.step_batches(items, args.batch, args.warmup + args.steps)
    backend = tp.build_rollout_backend(backend_kind, loaded, tiny=args.model == "tiny")
    trainer = tp.build_trainer(loaded, cfg, pool, total_steps=args.warmup + args.steps, rollout_backend=backend)
    seconds, tokens, rollout = [], [], []
    for i, batch in enumerate(batches):
        report, sec = tp.timed_step(trainer, batch, args.view_fraction)
        tp.progress(f"  {preset} step {i + 1}/{len(batches)}: {sec:.1f} s" + (" (warm-up)" if i < args.warmup else ""))
        if i >= args.warmup:
            seconds.append(sec)
            tokens.append(report.tokens["completion"])
            rollout.append(report.stage_seconds["rollout"])
    return _child_result(tp, limit, load_start, rss_loaded, peak_at_load, seconds, tokens, rollout,
                         {"view_items_per_step": report.tokens["view_items"], "teacher": cfg.teacher,
                          "rollout_lora": backend.lora_mode if backend is not None else None})


def trl_dataset(items: Sequence, profile: str):
    """SDFTTrainer's dataset: a conversational `prompt` and the teacher's `privileged_context` column."""
    from datasets import Dataset

    from edge_unisd.views import primary_context

    return Dataset.from_list([{"prompt": [dict(m) for m in it.messages],
                               "privileged_context": primary_context(it, profile).strip()} for it in items])


def trl_config(args: argparse.Namespace, output_dir: str, device, dtype):
    """SDFTConfig doing our work: see the module docstring for each choice."""
    import torch
    from trl.experimental.sdft import SDFTConfig

    return SDFTConfig(
        output_dir=output_dir, max_steps=args.warmup + args.steps, per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1, num_generations=1, shuffle_dataset=False, seed=0,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        max_prompt_length=None, max_completion_length=args.tokens, generation_kwargs={"min_new_tokens": args.tokens},
        temperature=1.0, top_p=1.0, top_k=0, teacher_model_kind="base", teacher_prompt_template=TEACHER_TEMPLATE,
        distillation_mode=args.trl_mode, distillation_alpha=0.0, gradient_checkpointing=True,
        bf16=dtype == torch.bfloat16, fp16=False, use_cpu=device.type == "cpu",
        report_to="none", save_strategy="no", eval_strategy="no", logging_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, dataloader_pin_memory=False, remove_unused_columns=False,
    )


def _prompts_match(trainer, tokenizer, items: Sequence, profile: str, dataset) -> bool:
    """TRL's student and teacher prompt token ids equal edge-unisd's for every item."""
    from edge_unisd.views import primary_context, render_prompt

    rows = list(dataset)
    student = trainer._tokenize_prompts([r["prompt"] for r in rows])
    teacher = trainer._tokenize_prompts(trainer.teacher_context_builder.select_generation_prompts(
        [r["prompt"] for r in rows], [r["privileged_context"] for r in rows]))
    ours_s = [render_prompt(tokenizer, it.messages, None) for it in items]
    ours_t = [render_prompt(tokenizer, it.messages, primary_context(it, profile)) for it in items]
    return [list(x) for x in student] == ours_s and [list(x) for x in teacher] == ours_t


def run_trl(args: argparse.Namespace) -> dict[str, Any]:
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl.experimental.sdft import SDFTTrainer

    from edge_unisd.sample_data import load_profile
    from edge_unisd.scoring import causal_lm

    tp, limit, load_start, loaded, items, _ = _start_child(args)
    rss_loaded, peak_at_load = tp.rss_gb(), tp.peak_rss_gb()  # RSS now, and the loading's own peak
    profile = load_profile()
    dataset = trl_dataset(items, profile)
    peft_config = LoraConfig(r=args.lora_rank, lora_alpha=2.0 * args.lora_rank, lora_dropout=0.0,
                             target_modules="all-linear", bias="none", task_type="CAUSAL_LM")

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.seconds: list[float] = []
            self._t0 = 0.0

        def on_step_begin(self, *a, **k):
            self._t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.seconds.append(time.perf_counter() - self._t0)

    clock = StepClock()
    out_dir = tempfile.mkdtemp(prefix="vs-trl-")
    try:  # SDFTTrainer seeds (args.seed) before it attaches the adapter
        trainer = SDFTTrainer(model=loaded.model, args=trl_config(args, out_dir, loaded.device, loaded.dtype),
                              train_dataset=dataset, processing_class=loaded.tokenizer, peft_config=peft_config,
                              callbacks=[clock])
        match = _prompts_match(trainer, loaded.tokenizer, items, profile, dataset)
        generate, gen_seconds, gen_tokens = trainer._generate, [], []

        def timed_generate(prompt_ids):  # rollout time and the completion tokens TRL really generated
            t0 = time.perf_counter()
            out = generate(prompt_ids)
            gen_seconds.append(time.perf_counter() - t0)
            gen_tokens.append(sum(len(c) for c in out[1]))
            tp.progress(f"  trl step {len(gen_seconds)}/{args.warmup + args.steps}: rollout {gen_seconds[-1]:.1f} s")
            return out

        trainer._generate = timed_generate
        trainer.train()
        checkpointing = bool(getattr(causal_lm(trainer.model), "is_gradient_checkpointing", False))
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    w = args.warmup
    return _child_result(tp, limit, load_start, rss_loaded, peak_at_load, clock.seconds[w:], gen_tokens[w:],
                         gen_seconds[w:], {"prompts_match": match, "trl_mode": args.trl_mode, "teacher": "base",
                          "trl_gradient_checkpointing": checkpointing})


def child_main(args: argparse.Namespace) -> int:
    from edge_unisd.atomic_io import atomic_write_json

    result = run_trl(args) if args.child == "trl" else run_ours(args, args.child)
    atomic_write_json(args.result, {"system": args.child, **result})
    return 0


# --- the parent: alternating runs ----------------------------------------------------------------

def child_argv(args: argparse.Namespace, system: str, result: Path) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", system, "--result", str(result),
            "--model", args.model, "--batch", str(args.batch), "--tokens", str(args.tokens), "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--lora-rank", str(args.lora_rank), "--lr", str(args.lr),
            "--view-fraction", str(args.view_fraction), "--trl-mode", args.trl_mode, "--dtype", args.dtype]
    return argv + (["--threads", str(args.threads)] if args.threads else [])


def spawn(args: argparse.Namespace, system: str, workdir: Path, index: int) -> dict[str, Any]:
    """One child run; its peak RSS comes from wait4 (ru_maxrss, KiB on Linux). A child's count starts at this
    parent's peak at fork, which holds no model (~20 MB), so it is each child's own above that."""
    result, log = workdir / f"run{index}-{system}.json", workdir / f"run{index}-{system}.log"
    t0 = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(child_argv(args, system, result), stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
        killer = threading.Timer(args.child_timeout, proc.kill)
        killer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            killer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0 or not result.exists():
        tail = log.read_text(errors="replace")[-LOG_TAIL:]
        raise RuntimeError(f"{system} run {index} exited with {proc.returncode} (log {log}):\n{tail}")
    data = json.loads(result.read_text())
    data.update({"peak_rss_gb": throughput().kib_to_gb(usage.ru_maxrss), "wall_seconds": time.perf_counter() - t0,
                 "order": index})
    return data


def _median(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def aggregate(runs: Sequence[Mapping[str, Any]], systems: Sequence[str]) -> dict[str, Any]:
    """Per system: medians over rounds of s/step and tokens/s, the highest peak RSS; ratios ours / TRL."""
    per: dict[str, dict[str, Any]] = {}
    for system in systems:
        mine = [r for r in runs if r["system"] == system]
        per[system] = {
            "runs": len(mine), "seconds_per_step": _median([r["seconds_per_step"] for r in mine]),
            "tokens_per_s": _median([r["tokens_per_s"] for r in mine]),
            "rollout_seconds_per_step": _median([r["rollout_seconds_per_step"] for r in mine]),
            "peak_rss_gb": max(r["peak_rss_gb"] for r in mine),
            "peak_over_load_gb": max(r["peak_rss_gb"] - r["rss_after_load_gb"] for r in mine),
            "completion_tokens_per_step": _median([r["completion_tokens"] / max(1, len(r["step_seconds"]))
                                                   for r in mine]),
        }
    ratios = {}
    if "trl" in per:
        t = per["trl"]
        for system in (s for s in systems if s != "trl"):
            o = per[system]
            ratios[system] = {
                "tokens_per_s": o["tokens_per_s"] / t["tokens_per_s"] if t["tokens_per_s"] else None,
                "seconds_per_step": o["seconds_per_step"] / t["seconds_per_step"] if t["seconds_per_step"] else None,
                "peak_rss": o["peak_rss_gb"] / t["peak_rss_gb"],
                "rollout_seconds": (o["rollout_seconds_per_step"] / t["rollout_seconds_per_step"]
                                    if t["rollout_seconds_per_step"] else None),
            }
    return {"systems": per, "ratios_vs_trl": ratios}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="bundled (default) | tiny | a bench/throughput.py model name")
    p.add_argument("--batch", type=int, default=None, help="prompts per step (default 8)")
    p.add_argument("--tokens", type=int, default=None, help="completion tokens per prompt, min = max (default 64)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per run (default 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first in each run (default 1)")
    p.add_argument("--rounds", type=int, default=None, help="alternations of every system (default 2)")
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=None,
                   help="default: trl (if installed) sd edge; *-llamacpp: rollouts by llama.cpp")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--view-fraction", type=float, default=0.25, help="edge: share of each batch given K views")
    p.add_argument("--trl-mode", default="full_logits", choices=("full_logits", "topk_logits"),
                   help="TRL objective: full_logits (= ours, forward KL) or topk_logits (TRL's default)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="both sides' compute dtype (default float32; bfloat16: TRL with bf16 autocast, ours as "
                        "edge_unisd.precision holds a bf16 model: fp32 LoRA weights and loss arithmetic)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (default: every CPU)")
    p.add_argument("--child-timeout", type=float, default=3600.0, help="seconds before a run is killed")
    p.add_argument("--tiny", action="store_true", help="smoke run: tiny random llama, 1 step, 4 tokens")
    p.add_argument("--child", choices=SYSTEMS, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return p


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    for key, value in DEFAULTS[args.tiny].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    limit = throughput().sibling("limit")
    systems = args.systems or ([*DEFAULT_SYSTEMS] if trl_available() else ["sd", "edge"])
    if "trl" in systems and not trl_available():
        raise SystemExit("trl is not installed: `pip install 'edge-unisd[bench]'`, or leave trl out of --systems")
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"  # where the children's load_base puts the model
    load_start = limit.load_average()
    workdir = Path(tempfile.mkdtemp(prefix="vs-trl-runs-"))
    runs = []
    try:
        for r in range(args.rounds):
            for system in systems:
                index = len(runs) + 1
                throughput().progress(f"run {index}/{args.rounds * len(systems)}: {system} (round {r + 1})")
                runs.append(spawn(args, system, workdir, index))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "bench": "vs_trl",
        "machine": {**limit.machine_info(device), "load_avg_start": load_start, "load_avg_end": limit.load_average()},
        "settings": {"model": args.model, "batch": args.batch, "tokens": args.tokens, "steps": args.steps,
                     "warmup_steps": args.warmup, "rounds": args.rounds, "lora_rank": args.lora_rank,
                     "lr": args.lr, "view_fraction": args.view_fraction, "trl_mode": args.trl_mode,
                     "dtype": args.dtype, "systems": systems},
        **aggregate(runs, systems),
        "runs": runs,
    }


def _f(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def print_table(r: Mapping[str, Any]) -> None:
    m, s = r["machine"], r["settings"]
    print(f"\n{s['model']} ({s.get('dtype', 'float32')}) | batch {s['batch']} x {s['tokens']} tokens | "
          f"{s['steps']} timed steps x {s['rounds']} "
          f"rounds | {m['processor']} x{m['cpus']} | load {m['load_avg_start']} -> {m['load_avg_end']}")
    print(f"{'system':14s} {'s/step':>8s} {'tokens/s':>9s} {'rollout s':>10s} {'peak RSS GB':>12s}  "
          f"{'x TRL tokens/s':>14s} {'x TRL RSS':>9s}")
    for system, v in r["systems"].items():
        ratio = r["ratios_vs_trl"].get(system, {})
        print(f"{system:14s} {_f(v['seconds_per_step'], '.2f'):>8s} {_f(v['tokens_per_s'], '.1f'):>9s} "
              f"{_f(v['rollout_seconds_per_step'], '.2f'):>10s} {v['peak_rss_gb']:>12.2f}  "
              f"{_f(ratio.get('tokens_per_s'), '.2f'):>14s} {_f(ratio.get('peak_rss'), '.2f'):>9s}")
    trl_runs = [x for x in r["runs"] if x["system"] == "trl"]
    if trl_runs and not all(x["prompts_match"] for x in trl_runs):
        print("WARNING: TRL's prompt token ids differ from ours: the two sides did not do the same work")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    if args.child:
        return child_main(args)
    result = run(argv)
    print(json.dumps(result))
    print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
