"""Does the planner's predicted cost match what a round really costs on this machine?

    .venv/bin/python bench/cost_model.py [--budget 300] [--batch 4] [--tokens 32]

Calibrates the cost model from a few real steps on the bundled SmolLM2-135M (the daemon does the
same from every round's step log), plans a round for a budget with the planner (cheap path for
all items, K views for the most uncertain as the budget allows), runs exactly that plan, and
prints one JSON object with predicted vs measured seconds and the relative error (target: within
25%), then a short table.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def measurement(report, batch: int) -> dict:
    """A trainer step report in the cost model's measurement format."""
    tokens = dict(report.tokens)
    tokens["items"] = batch
    return {"stage_seconds": report.stage_seconds, "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=300.0, help="seconds the round may spend")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32, help="max new tokens per rollout")
    parser.add_argument("--calibration-steps", type=int, default=3)
    parser.add_argument("--preset", default="edge")
    args = parser.parse_args()

    from budgets.cost_model import CostModel
    from budgets.planner import Candidate, plan_round
    from edge_unisd.config import load_method_config
    from edge_unisd.modeling import attach_lora, load_base
    from edge_unisd.sample_data import load_profile, load_sample_items
    from edge_unisd.trainer import UniSDTrainer, batch_for_step, run_round

    base = load_base()
    cfg = load_method_config(args.preset, {"rollout": {"max_new_tokens": args.tokens},
                                           "optim": {"batch_size": args.batch, "micro_batch_size": args.batch}})
    model = attach_lora(base.model, rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=0.0,
                        target_modules=cfg.lora.target_modules)
    items = load_sample_items()
    calib_items, round_items = items[:16], items[16:80]
    trainer = UniSDTrainer(model, base.tokenizer, cfg, total_steps=1000, profile=load_profile(), pool=items)

    # --- calibrate: real steps, a quarter of each batch on the K-view path ---
    measurements, uncertainty = [], {}
    for step in range(args.calibration_steps):
        batch = batch_for_step(calib_items, step, args.batch, cfg.seed)
        report = trainer.step(batch, view_item_ids={batch[0].id})
        measurements.append(measurement(report, args.batch))
        uncertainty.update(report.item_uncertainty)
    cost_model = CostModel.from_measurements(measurements[1:] or measurements)  # first step warms caches
    tokens_per_item = sum(m["tokens"]["completion"] for m in measurements) / (len(measurements) * args.batch)

    # --- plan a round for the budget, then run exactly that plan ---
    candidates = [Candidate(id=it.id, is_new=True, uncertainty=None) for it in round_items]
    plan = plan_round(candidates, args.budget, cost_model, batch_size=args.batch, K=cfg.num_views,
                      completion_tokens=tokens_per_item)
    by_id = {it.id: it for it in round_items}
    planned = [by_id[i] for i in plan.item_ids]
    trainer.step_count = 0  # the round counts its own steps
    t0 = time.perf_counter()
    result = run_round(trainer, planned, steps=plan.steps, view_item_ids=set(plan.view_item_ids))
    measured = time.perf_counter() - t0
    spent_tokens = sum(r.tokens["completion"] for r in result.reports)
    out = {
        "preset": args.preset, "dtype": str(base.dtype).removeprefix("torch."), "budget_seconds": args.budget,
        "batch": args.batch,
        "plan": {"items": len(plan.item_ids), "view_items": plan.n_view_items, "steps": plan.steps,
                 "predicted_seconds": round(plan.predicted_seconds, 1),
                 "completion_tokens_per_item": round(tokens_per_item, 1)},
        "measured_seconds": round(measured, 1),
        "measured_completion_tokens_per_item": round(spent_tokens / max(1, len(planned)), 1),
        "relative_error": round(abs(plan.predicted_seconds - measured) / measured, 3),
        "within_budget": measured <= args.budget,
        "rates_seconds_per_token": {k: round(v, 4) for k, v in cost_model.per_token.items()},
    }
    print(json.dumps(out))
    print(f"\n{'plan':24s} {plan.summary()}")
    print(f"{'predicted / measured':24s} {plan.predicted_seconds:.1f} s / {measured:.1f} s   "
          f"error {out['relative_error']:.1%}")


if __name__ == "__main__":
    main()
