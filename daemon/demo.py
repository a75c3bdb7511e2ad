"""`edge-unisd demo`: a real, short UniSD adaptation of the bundled SmolLM2-135M on the sample user.

    make demo            # or: .venv/bin/edge-unisd demo [--steps N] [--json] [--home DIR]

Loads the bundled model, takes sample items whose good answers depend on the user's profile,
measures the reference-answer NLL (without the profile) before, runs the `edge` preset (EMA
teacher + clipping for every item, K views for the most uncertain quarter), measures again and
saves the adapter. It prints what changed in numbers.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from pathlib import Path

from edge_unisd.atomic_io import atomic_dir, ensure_private_dir

DEMO_TRAIN_ITEMS = 24
DEMO_HELDOUT_ITEMS = 16
DEMO_STEPS = 16


def _progress(msg: str) -> None:
    """One live status line on a terminal, plain lines otherwise."""
    if sys.stderr.isatty():
        sys.stderr.write("\r\033[K" + msg)
        sys.stderr.flush()
    else:
        print(msg, file=sys.stderr, flush=True)


def route_most_uncertain(uncertainty: dict[str, float], fraction: float) -> set[str]:
    """The ids of the most uncertain `fraction` of items: the ones that earn the K views."""
    ranked = sorted(uncertainty, key=uncertainty.get, reverse=True)
    return set(ranked[: max(1, round(fraction * len(ranked)))]) if ranked else set()


def run_demo(home: Path, steps: int = DEMO_STEPS, preset: str = "edge") -> dict:
    from edge_unisd.config import load_method_config
    from edge_unisd.eval import reference_nll, retention
    from edge_unisd.modeling import attach_lora, load_base
    from edge_unisd.sample_data import load_general_prompts, load_profile, load_sample_items
    from edge_unisd.trainer import UniSDTrainer, batch_for_step

    t_start = time.perf_counter()
    _progress("loading the bundled SmolLM2-135M-Instruct (first run converts it once, ~1 min)...")
    base = load_base()
    profile = load_profile()
    with_ref = [it for it in load_sample_items() if it.reference]
    train, heldout = with_ref[:DEMO_TRAIN_ITEMS], with_ref[DEMO_TRAIN_ITEMS:DEMO_TRAIN_ITEMS + DEMO_HELDOUT_ITEMS]
    general = load_general_prompts()[:8]
    cfg = load_method_config(preset, {"rollout": {"max_new_tokens": 40},
                                      "optim": {"lr": 5e-4, "batch_size": 8, "micro_batch_size": 8},
                                      "lora": {"rank": 16, "alpha": 32}})
    model = attach_lora(base.model, rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                        target_modules=cfg.lora.target_modules)
    tok = base.tokenizer

    _progress("measuring the base model...")
    before = {"train_nll": reference_nll(model, tok, train)["nll"],
              "heldout_nll": reference_nll(model, tok, heldout)["nll"]}

    trainer = UniSDTrainer(model, tok, cfg, total_steps=steps, profile=profile, pool=train)
    routed: set[str] = set()
    history = []
    for step in range(steps):
        batch = batch_for_step(train, step, cfg.optim.batch_size, cfg.seed)
        report = trainer.step(batch, routed)
        # the cheap path's own divergence says which items are uncertain: they get K views next time
        routed = route_most_uncertain(report.item_uncertainty, 0.25)
        history.append(report.as_dict())
        secs = sum(report.stage_seconds.values())
        _progress(f"step {step + 1}/{steps}  loss {report.loss:.3f}  kd {report.terms['kd']:.3f}  "
                  f"w_min {report.weights['min']:.2f}  clipped {report.clip_fraction:.2f}  {secs:.1f}s")
    if sys.stderr.isatty():
        sys.stderr.write("\n")

    _progress("measuring the adapted model...")
    after = {"train_nll": reference_nll(model, tok, train)["nll"],
             "heldout_nll": reference_nll(model, tok, heldout)["nll"]}
    ret = retention(model, tok, general, max_new_tokens=24)

    adapter_dir = ensure_private_dir(home / "adapters") / time.strftime("demo-%Y%m%d-%H%M%S")
    with atomic_dir(adapter_dir) as tmp:
        model.save_pretrained(str(tmp), selected_adapters=["default"])
    return {
        "preset": preset, "steps": steps, "train_items": len(train), "heldout_items": len(heldout),
        "before": before, "after": after, "retention_jsd": ret["jsd"],
        "seconds": time.perf_counter() - t_start, "adapter": str(adapter_dir),
        "history": history,
    }


def _table(result: dict) -> str:
    b, a = result["before"], result["after"]
    rows = [
        ("reference NLL, trained items (no profile)", b["train_nll"], a["train_nll"]),
        ("reference NLL, held-out items (no profile)", b["heldout_nll"], a["heldout_nll"]),
    ]
    lines = [f"{'metric':46s} {'before':>8s} {'after':>8s} {'change':>8s}"]
    lines += [f"{name:46s} {x:8.3f} {y:8.3f} {y - x:+8.3f}" for name, x, y in rows]
    lines.append(f"{'retention JSD vs base, general prompts':46s} {0.0:8.3f} {result['retention_jsd']:8.4f}")
    lines.append(f"preset {result['preset']}, {result['steps']} steps in {result['seconds']:.0f} s; "
                 f"adapter saved to {result['adapter']}")
    return "\n".join(lines)


def main(args) -> int:
    logging.basicConfig(level=logging.WARNING)
    home = Path(args.home) if args.home else Path(tempfile.mkdtemp(prefix="edge-unisd-demo-"))
    ensure_private_dir(home)
    result = run_demo(home, steps=args.steps or DEMO_STEPS)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "history"}, indent=2))
    else:
        print(_table(result))
    return 0
