"""Ablations: every method preset against the untrained base, same weights, data, seeds and step budget.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/ablate.py [--presets sd unisd-star ...] [--steps 12] [--out DIR]
    HF_HUB_OFFLINE=1 .venv/bin/python bench/ablate.py --tiny --steps 2 --presets sd edge   # smoke run

Loads the bundled SmolLM2-135M once and, per preset: seeds, attaches a fresh LoRA adapter, trains the
same items for the same number of steps, evaluates (held-out fit, retention vs the base, task
accuracy), then unloads the adapter so the next preset starts from the very same base weights.
`edge` gets the K auxiliary views only for the most uncertain quarter of each batch, ranked by the
uncertainty the cheap path measured on earlier steps with the daemon planner's own ranking
(`budgets.planner.most_uncertain`: unmeasured items last, ties in batch order).

Data: the bundled sample user's items with a reference answer, split once and for all by a hash
of the item id into training items and held-out items (other prompts about the same facts, never
trained on). Writes `ablation.json`, `ablation.md` (the table and a computed verdict on the paper's
claim) and `fit_vs_cost.png` into --out, and prints the JSON object and the table. Progress goes
to stderr. On 2 CPU cores the full run takes tens of minutes.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import io
import json
import math
import os
import random
import shlex
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402 - after the offline switches

from budgets.planner import most_uncertain  # noqa: E402
from daemon.evaluation import (  # noqa: E402
    DEFAULT_FIT_TOLERANCE,
    DEFAULT_MAX_RETENTION_JSD,
    EvalSettings,
    evaluate,
    gate,
)
from edge_unisd.atomic_io import atomic_write_bytes, atomic_write_json, atomic_write_text  # noqa: E402
from edge_unisd.config import PRESETS, load_method_config  # noqa: E402
from edge_unisd.items import Item  # noqa: E402

BASE = "base"  # the untrained base model: evaluated, never trained
ALL_PRESETS = (BASE, *PRESETS)
CANDIDATES = ("unisd-star", "edge")  # the paper's claim: these beat ...
RIVALS = ("sd", "sft", BASE)  # ... these, on held-out fit, with retention within the bound
EDGE_VIEW_FRACTION = 0.25  # share of each batch that gets the K views in the budgeted preset
HELDOUT_FRACTION = 0.25
RSS_NOTE = ("peak RSS is process-wide: it includes the base model, loaded once and shared by every preset, "
            "and memory the allocator kept from earlier presets")


# --- settings ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunSettings:
    """The knobs every preset shares: one step budget, one optimiser, one seed."""

    steps: int
    batch_size: int
    lr: float
    lora_rank: int
    rollout_tokens: int  # completion length of on-policy rollouts during training
    eval_new_tokens: int  # greedy answer length for retention and task accuracy
    general_prompts: int
    max_heldout_items: int
    num_views: int
    seed: int
    gradient_checkpointing: bool
    max_retention_jsd: float

    def overrides(self) -> dict[str, Any]:
        """MethodConfig overrides applied on top of every preset (only the preset's own keys differ)."""
        return {"seed": self.seed, "num_views": self.num_views,
                "gradient_checkpointing": self.gradient_checkpointing,
                "rollout": {"max_new_tokens": self.rollout_tokens},
                "optim": {"lr": self.lr, "batch_size": self.batch_size, "micro_batch_size": self.batch_size},
                "lora": {"rank": self.lora_rank, "alpha": 2.0 * self.lora_rank}}

    def eval_settings(self) -> EvalSettings:
        return EvalSettings(general_prompts=self.general_prompts, max_heldout_items=self.max_heldout_items,
                            retention_new_tokens=self.eval_new_tokens,
                            accuracy_new_tokens=self.eval_new_tokens,
                            max_retention_jsd=self.max_retention_jsd)


# (bundled model, --tiny): defaults for flags left unset. The tiny ones only make the smoke run fast.
DEFAULTS = {
    False: dict(steps=12, batch_size=8, lr=5e-4, lora_rank=16, rollout_tokens=32, eval_new_tokens=24,
                general_prompts=8, max_heldout_items=32, num_views=3, gradient_checkpointing=True),
    True: dict(steps=2, batch_size=2, lr=1e-3, lora_rank=4, rollout_tokens=4, eval_new_tokens=4,
               general_prompts=2, max_heldout_items=4, num_views=2, gradient_checkpointing=False),
}


# --- data ----------------------------------------------------------------------------------------

def is_held_out(item_id: str, fraction: float = HELDOUT_FRACTION) -> bool:
    """Fixed for ever by the id alone: adding items to the sample set never moves an old one across."""
    return int(hashlib.sha256(item_id.encode()).hexdigest()[:8], 16) / 0x1_0000_0000 < fraction


def split_items(items: Sequence[Item], fraction: float = HELDOUT_FRACTION,
                train_unreferenced: bool = False) -> tuple[list[Item], list[Item]]:
    """(train, held-out), in file order. Held-out items are drawn from those with a reference answer (fit needs
    one); `train_unreferenced` also trains on the items without one, as the daemon does with a user's prompts."""
    with_ref = [it for it in items if it.reference]
    heldout = [it for it in with_ref if is_held_out(it.id, fraction)]
    train = [it for it in items if (not is_held_out(it.id, fraction) if it.reference else train_unreferenced)]
    return train, heldout


# --- model ---------------------------------------------------------------------------------------

def load_tiny(seed: int = 0):
    """A tiny random llama with the bundled tokenizer (from the converted-model cache): the smoke base."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from edge_unisd.modeling import BaseSource, LoadedModel, gguf_to_hf_folder, resolve_base

    tok = AutoTokenizer.from_pretrained(gguf_to_hf_folder(resolve_base(None)))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
                      pad_token_id=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedModel(model, tok, BaseSource("hf", Path("/tiny-random-llama"), f"tiny-seed{seed}"),
                       torch.device("cpu"), torch.float32)


def weights_checksum(model: torch.nn.Module) -> float:
    """Sum of every base weight in float64: equal before and after means no preset touched the base."""
    with torch.no_grad():
        return float(sum(p.detach().double().sum() for p in model.parameters()))


def restore_base(peft_model) -> torch.nn.Module:
    """Remove every LoRA layer (student and EMA) and the training hooks: the clean base comes back."""
    base = peft_model.unload()
    # the trainer enabled activation checkpointing and PEFT an input-grad hook on the shared base: undo both
    checkpointing_off = (getattr(base, "activation_checkpointing_disable", None)
                         or getattr(base, "gradient_checkpointing_disable", None))
    if checkpointing_off is not None and getattr(base, "supports_gradient_checkpointing", False):
        checkpointing_off()
    if hasattr(base, "disable_input_require_grads"):
        base.disable_input_require_grads()
    for p in base.parameters():
        p.requires_grad_(False)
    return base.eval()


class PeakRss:
    """Samples this process's RSS in a thread while the block runs; `.peak_mib` is the highest seen."""

    def __init__(self, interval: float = 0.02) -> None:
        import psutil

        self._proc, self._interval = psutil.Process(), interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self.peak = 0

    def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, self._proc.memory_info().rss)
            if self._stop.wait(self._interval):
                return

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def peak_mib(self) -> float:
        return self.peak / 2**20


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- one preset ----------------------------------------------------------------------------------

def _finite(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and math.isfinite(x) else None


def _metrics_row(preset: str, metrics: Mapping[str, Any]) -> dict[str, Any]:
    return {"preset": preset, "fit_nll": _finite(metrics.get("fit_nll")),
            "retention_jsd": _finite(metrics.get("retention_jsd")),
            "retention_base_logp": _finite(metrics.get("retention_base_logp")),
            "accuracy": _finite(metrics.get("accuracy")), "accuracy_items": metrics.get("accuracy_items", 0)}


def route_views(batch: Sequence[Item], known: Mapping[str, float],
                fraction: float = EDGE_VIEW_FRACTION) -> set[str]:
    """The ids of the batch's most uncertain `fraction` (at least one), by uncertainty measured on earlier
    steps; the planner's ranking, so unmeasured items come last and ties keep batch order."""
    ids = list(dict.fromkeys(it.id for it in batch))
    return set(most_uncertain(ids, known, max(1, round(fraction * len(ids)))))


def train_preset(base_model, tok, preset: str, train: Sequence[Item], heldout: Sequence[Item],
                 general: Sequence[str], checks: Mapping[str, list[str]], profile: str, run: RunSettings):
    """Attach a fresh adapter, train `run.steps` steps, evaluate. Returns (row, the PeftModel to unload)."""
    from edge_unisd.modeling import attach_lora
    from edge_unisd.trainer import UniSDTrainer, batch_for_step

    cfg = load_method_config(preset, run.overrides())
    torch.manual_seed(run.seed)  # the same initial adapter for every preset
    random.seed(run.seed)
    model = attach_lora(base_model, rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                        target_modules=cfg.lora.target_modules)
    trainer = UniSDTrainer(model, tok, cfg, total_steps=run.steps, profile=profile, pool=train)
    budgeted = cfg.uses_views and cfg.agreement_routing == "given"
    known: dict[str, float] = {}  # item id -> last measured uncertainty (mean clipped divergence)
    reports = []
    t0 = time.perf_counter()
    for step in range(run.steps):
        batch = batch_for_step(train, step, cfg.optim.batch_size, cfg.seed)
        routed = route_views(batch, known) if budgeted else set()
        report = trainer.step(batch, routed)
        known.update(report.item_uncertainty)
        reports.append(report)
        progress(f"  {preset} step {step + 1}/{run.steps}  loss {report.loss:.3f}  "
                 f"w_min {report.weights['min']:.2f}  views {report.tokens['view_items']}  "
                 f"{sum(report.stage_seconds.values()):.1f}s")
    train_seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    metrics = evaluate(model, tok, heldout, general, checks, settings=run.eval_settings())
    row = _metrics_row(preset, metrics)
    row.update({
        "train_seconds": train_seconds, "eval_seconds": time.perf_counter() - t1, "steps": len(reports),
        # over the tokens that got K views; presets without agreement weighting have none
        "weight_mean": (sum(r.weights["mean"] for r in reports) / len(reports)) if cfg.uses_views else None,
        "weight_min": min(r.weights["min"] for r in reports) if cfg.uses_views else None,
        "kd_kept": (sum(r.weights["kd_kept"] for r in reports) / len(reports)) if cfg.uses_views else None,
        "clip_fraction": sum(r.clip_fraction for r in reports) / len(reports),
        "view_items": sum(r.tokens["view_items"] for r in reports),
        "completion_tokens": sum(r.tokens["completion"] for r in reports),
        "final_loss": reports[-1].loss,
        "terms_mean": {k: sum(r.terms[k] for r in reports) / len(reports) for k in reports[-1].terms},
    })
    return row, model


def evaluate_base(base_model, tok, heldout, general, checks, run: RunSettings) -> dict[str, Any]:
    t0 = time.perf_counter()
    metrics = evaluate(base_model, tok, heldout, general, checks, settings=run.eval_settings())
    row = _metrics_row(BASE, metrics)
    row.update({"train_seconds": 0.0, "eval_seconds": time.perf_counter() - t0, "steps": 0,
                "weight_mean": None, "weight_min": None, "clip_fraction": None, "view_items": 0,
                "completion_tokens": 0, "final_loss": None, "terms_mean": {}})
    return row


# --- the verdict on the paper's claim ------------------------------------------------------------

def claim_verdict(rows: Mapping[str, Mapping[str, Any]], *, bound: float,
                  candidates: Sequence[str] = CANDIDATES, rivals: Sequence[str] = RIVALS) -> dict[str, Any]:
    """Do all `candidates` have a lower held-out NLL than every rival, with retention JSD <= `bound`?

    `rows` maps preset -> row (needs "fit_nll", "retention_jsd"). Returns {"holds": True | False | None
    (not checkable: a preset is missing), "line": one sentence for the table, "failures": [...]}.
    """
    claim = (f"{' and '.join(candidates)} beat {', '.join(rivals)} on held-out fit "
             f"with retention JSD <= {bound:g}")
    missing = [p for p in (*candidates, *rivals) if p not in rows]
    if missing:
        return {"holds": None, "failures": [], "claim": claim,
                "line": f"Not checked whether {claim}: this run lacks {', '.join(missing)}."}
    failures = []
    for c in candidates:
        fit, jsd = rows[c].get("fit_nll"), rows[c].get("retention_jsd")
        if fit is None or not math.isfinite(fit):
            failures.append(f"{c} has no held-out fit")
            continue
        for r in rivals:
            other = rows[r].get("fit_nll")
            if other is not None and math.isfinite(other) and not fit < other:
                failures.append(f"{c} fit {fit:.3f} is not below {r} {other:.3f}")
        if jsd is None or not math.isfinite(jsd) or jsd > bound:
            failures.append(f"{c} retention JSD {'n/a' if jsd is None else f'{jsd:.4f}'} exceeds {bound:g}")
    if failures:
        return {"holds": False, "failures": failures, "claim": claim,
                "line": f"No: not all of {claim}: " + "; ".join(failures) + "."}
    margins = ", ".join(f"{c} {rows[c]['fit_nll']:.3f}" for c in candidates)
    best_rival = min((rows[r]["fit_nll"] for r in rivals if rows[r].get("fit_nll") is not None), default=None)
    tail = f" (held-out NLL {margins} vs best rival {best_rival:.3f})" if best_rival is not None else ""
    return {"holds": True, "failures": [], "claim": claim, "line": f"Yes: {claim}{tail}."}


def gate_rows(rows: Sequence[dict[str, Any]], *, bound: float, fit_tolerance: float = DEFAULT_FIT_TOLERANCE) -> None:
    """Add to each trained row what the daemon's gate would do with that adapter against the base:
    `gate_promote` and `gate_reason`. A rejected version never reaches the user, whatever its fit."""
    base = next((r for r in rows if r["preset"] == BASE), None)
    for r in rows:
        if r["preset"] == BASE or base is None:
            continue
        verdict = gate(base, r, max_retention_jsd=bound, fit_tolerance=fit_tolerance)
        r["gate_promote"], r["gate_reason"] = verdict.promote, verdict.reason


def best_promoted(rows: Sequence[Mapping[str, Any]]) -> str | None:
    """The preset with the best held-out fit among those the gate would promote."""
    return best_fit([r for r in rows if r.get("gate_promote")])


# --- outputs -------------------------------------------------------------------------------------

def best_fit(rows: Sequence[Mapping[str, Any]]) -> str | None:
    scored = [r for r in rows if r.get("fit_nll") is not None]
    return min(scored, key=lambda r: r["fit_nll"])["preset"] if scored else None


def _fmt(x: Any, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def markdown_table(result: Mapping[str, Any]) -> str:
    rows, s, split = result["rows"], result["settings"], result["split"]
    base_fit = next((r["fit_nll"] for r in rows if r["preset"] == BASE), None)
    best = result["best_fit"]
    lines = [
        f"# Ablation: {result['model']}",
        "",
        f"`{result['command']}`",
        "",
        f"{s['steps']} steps of batch {s['batch_size']} (LoRA r={s['lora_rank']}, lr {s['lr']:g}, "
        f"seed {s['seed']}, {s['rollout_tokens']}-token rollouts) on {split['train']} training items"
        + (f" ({split['train_unreferenced']} without a reference answer: their teacher sees only the profile)"
           if split.get("train_unreferenced") else "") + "; "
        f"metrics on {split['heldout_evaluated']} held-out items about the same facts "
        f"({split['heldout_checked']} with an answer check) and {s['general_prompts']} general prompts. "
        "Lower NLL and JSD are better; "
        f"**bold** marks the best held-out fit. `edge` gives the K={s['num_views']} views to the most "
        f"uncertain {EDGE_VIEW_FRACTION:.0%} of each batch.",
        "",
        "| preset | held-out NLL | Δ vs base | retention JSD | gate | accuracy | train s | peak RSS MiB "
        "| w mean | w min | KD kept | K-view items |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        fit = _fmt(r["fit_nll"], ".3f")
        name = r["preset"]
        if name == best:
            fit, name = f"**{fit}**", f"**{name}**"
        delta = (r["fit_nll"] - base_fit) if r["fit_nll"] is not None and base_fit is not None else None
        acc = None if r["accuracy"] is None else 100 * r["accuracy"]
        promote = r.get("gate_promote")
        verdict = "–" if promote is None else "promoted" if promote else "rejected"
        lines.append(f"| {name} | {fit} | {_fmt(delta, '+.3f')} | {_fmt(r['retention_jsd'], '.4f')} | {verdict} | "
                     f"{_fmt(acc, '.0f')}{'%' if acc is not None else ''} | {r['train_seconds']:.1f} | "
                     f"{_fmt(r['peak_rss_mib'], '.0f')} | {_fmt(r['weight_mean'], '.3f')} | "
                     f"{_fmt(r['weight_min'], '.3f')} | {_fmt(r.get('kd_kept'), '.3f')} | {r['view_items']} |")
    promoted = best_promoted(rows)
    lines += ["", f"**Verdict.** {result['verdict']['line']}", "",
              "Gate: what the daemon would do with each adapter against the base (fit may not worsen by more "
              f"than {DEFAULT_FIT_TOLERANCE:g}, retention JSD <= {s['max_retention_jsd']:g}). Best held-out fit "
              f"among the versions it would promote: {promoted or 'none'}.", "",
              f"Retention bound: JSD vs base <= {s['max_retention_jsd']:g} nats/token (the gate's default). "
              f"Weights are the agreement weights over the tokens that got K views (– : no agreement "
              "weighting); KD kept: the weighted distillation loss over the unweighted one, mean over steps. "
              f"Note: {RSS_NOTE}.",
              "Base weights unchanged after every preset: "
              f"{'yes' if result['base_weights_unchanged'] else 'NO'}."]
    return "\n".join(lines) + "\n"


def fit_vs_cost_png(rows: Sequence[Mapping[str, Any]], best: str | None) -> bytes:
    """Held-out NLL against training seconds, one labelled point per preset, as PNG bytes (Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    pts = [r for r in rows if r.get("fit_nll") is not None]
    for r in pts:
        is_best = r["preset"] == best
        color = "tab:red" if is_best else ("tab:gray" if r["preset"] == BASE else "tab:blue")
        xy = (r["train_seconds"], r["fit_nll"])
        ax.scatter(*xy, s=70 if is_best else 36, marker="*" if is_best else "o", color=color, zorder=3)
        ax.annotate(r["preset"], xy, textcoords="offset points", xytext=(5, 4), fontsize=8)
    base = next((r for r in pts if r["preset"] == BASE), None)
    if base is not None:
        ax.axhline(base["fit_nll"], color="tab:gray", linestyle="--", linewidth=0.8, label="base (untrained)")
        ax.legend(loc="best", fontsize=8)
    ax.set_xlabel("training seconds (same step budget)")
    ax.set_ylabel("held-out reference NLL (nats/token, lower is better)")
    ax.set_title("Fit vs cost per preset")
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# --- the run -------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", choices=ALL_PRESETS, default=None, metavar="PRESET",
                   help=f"presets to train (default: all of {', '.join(ALL_PRESETS)}); base is always "
                        "measured")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per preset (default 12; tiny 2)")
    p.add_argument("--out", type=Path, default=Path("out/ablation"),
                   help="output folder (default out/ablation)")
    p.add_argument("--tiny", action="store_true",
                   help="a tiny random llama with the bundled tokenizer (tests)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 5e-4)")
    p.add_argument("--batch-size", type=int, default=None, help="items per optimizer step (default 8)")
    p.add_argument("--lora-rank", type=int, default=None, help="LoRA rank, alpha = 2 x rank (default 16)")
    p.add_argument("--rollout-tokens", type=int, default=None,
                   help="on-policy completion length (default 32)")
    p.add_argument("--max-new-tokens", type=int, default=None, dest="eval_new_tokens",
                   help="greedy answer length for accuracy and retention (default 24)")
    p.add_argument("--general-prompts", type=int, default=None, help="retention prompts (default 8)")
    p.add_argument("--max-heldout", type=int, default=None, dest="max_heldout_items",
                   help="held-out items evaluated (default 32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None, help="float32 | bfloat16: what the bundled model trains and is evaluated "
                                                 "in (default: edge_unisd.modeling.pick_device_dtype's choice)")
    p.add_argument("--train-items", choices=("referenced", "all"), default="referenced",
                   help="referenced: train on the items with a reference answer (the teacher sees it); all: also "
                        "on those without one, whose teacher sees only the profile (default referenced)")
    p.add_argument("--max-retention-jsd", type=float, default=DEFAULT_MAX_RETENTION_JSD,
                   help=f"retention bound of the verdict (default: the gate's {DEFAULT_MAX_RETENTION_JSD:g})")
    return p


def run_settings(args: argparse.Namespace) -> RunSettings:
    chosen = {k: getattr(args, k) for k in DEFAULTS[False] if getattr(args, k, None) is not None}
    values = {**DEFAULTS[bool(args.tiny)], **chosen}
    for key in ("steps", "batch_size", "lora_rank", "rollout_tokens", "eval_new_tokens", "max_heldout_items"):
        if values[key] < 1:
            raise SystemExit(f"ablate.py: --{key.replace('_', '-')} must be >= 1 (got {values[key]})")
    return RunSettings(seed=args.seed, max_retention_jsd=args.max_retention_jsd, **values)


def run_ablation(args: argparse.Namespace) -> dict[str, Any]:
    from edge_unisd.modeling import load_base
    from edge_unisd.sample_data import load_checks, load_general_prompts, load_profile, load_sample_items

    run = run_settings(args)
    presets = [BASE] + [p for p in dict.fromkeys(args.presets or ALL_PRESETS) if p != BASE]
    progress("loading the base model..." if not args.tiny else "building a tiny random llama...")
    loaded = load_tiny(run.seed) if args.tiny else load_base(dtype=args.dtype)
    base_model, tok = loaded.model, loaded.tokenizer
    train, heldout_all = split_items(load_sample_items(), train_unreferenced=args.train_items == "all")
    heldout = heldout_all[:run.max_heldout_items]
    checks, profile = load_checks(), load_profile()
    general = load_general_prompts()[:run.general_prompts]
    checksum = weights_checksum(base_model)
    rows = []
    for i, preset in enumerate(presets, 1):
        progress(f"[{i}/{len(presets)}] {preset}: " + ("evaluating the untrained base" if preset == BASE
                                                        else f"training {run.steps} steps, then evaluating"))
        gc.collect()
        with PeakRss() as rss:
            if preset == BASE:
                row = evaluate_base(base_model, tok, heldout, general, checks, run)
            else:
                row, model = train_preset(base_model, tok, preset, train, heldout, general, checks, profile,
                                          run)
                base_model = restore_base(model)
                del model
        row["peak_rss_mib"] = rss.peak_mib
        rows.append(row)
        progress(f"[{i}/{len(presets)}] {preset}: fit {_fmt(row['fit_nll'], '.3f')}  retention "
                 f"{_fmt(row['retention_jsd'], '.4f')}  accuracy {_fmt(row['accuracy'], '.2f')}  "
                 f"train {row['train_seconds']:.1f}s  peak RSS {row['peak_rss_mib']:.0f} MiB")
    by_preset = {r["preset"]: r for r in rows}
    base_fit = by_preset[BASE]["fit_nll"]
    for r in rows:
        r["fit_delta_vs_base"] = (r["fit_nll"] - base_fit) if None not in (r["fit_nll"], base_fit) else None
    gate_rows(rows, bound=run.max_retention_jsd)
    argv = getattr(args, "argv", None)
    argv = sys.argv[1:] if argv is None else argv
    return {
        "command": "python bench/ablate.py " + " ".join(shlex.quote(a) for a in argv),
        "model": ("tiny random llama (bundled tokenizer)" if args.tiny
                  else "SmolLM2-135M-Instruct (bundled, Q4_1 dequantised)")
                 + f", {loaded.device} {loaded.dtype}",
        "tiny": bool(args.tiny), "torch_threads": torch.get_num_threads(),
        "settings": {**asdict(run), "heldout_fraction": HELDOUT_FRACTION,
                     "edge_view_fraction": EDGE_VIEW_FRACTION},
        "split": {"train": len(train), "train_items": args.train_items,
                  "train_unreferenced": sum(1 for it in train if not it.reference),
                  "heldout": len(heldout_all), "heldout_evaluated": len(heldout),
                  "heldout_checked": sum(1 for it in heldout if checks.get(it.id)),
                  "heldout_ids": [it.id for it in heldout]},
        "rows": rows, "best_fit": best_fit(rows), "best_promoted": best_promoted(rows),
        "verdict": claim_verdict(by_preset, bound=run.max_retention_jsd),
        "base_weights_unchanged": weights_checksum(base_model) == checksum,
        "rss_note": RSS_NOTE,
    }


def write_outputs(result: Mapping[str, Any], out: Path) -> dict[str, Path]:
    from edge_unisd.atomic_io import ensure_private_dir

    ensure_private_dir(out)
    paths = {"json": out / "ablation.json", "markdown": out / "ablation.md", "plot": out / "fit_vs_cost.png"}
    atomic_write_json(paths["json"], result)
    atomic_write_text(paths["markdown"], markdown_table(result))
    atomic_write_bytes(paths["plot"], fit_vs_cost_png(result["rows"], result["best_fit"]))
    return paths


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = argv
    result = run_ablation(args)
    paths = write_outputs(result, args.out)
    print(json.dumps({k: v for k, v in result.items() if k != "split"} | {"files": {k: str(v) for k, v in
                                                                                  paths.items()}}))
    print()
    print(markdown_table(result))
    progress(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
