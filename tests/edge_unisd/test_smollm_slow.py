"""On the bundled SmolLM2-135M: a few UniSD steps lower the reference NLL without context.

Slow (loads the real model, ~1-2 min on 2 cores), marked, and still run in CI.
"""

from __future__ import annotations

import pytest

from edge_unisd.config import load_method_config
from edge_unisd.eval import reference_nll, retention
from edge_unisd.modeling import attach_lora
from edge_unisd.sample_data import load_general_prompts, load_profile, load_sample_items
from edge_unisd.trainer import UniSDTrainer, run_round

pytestmark = pytest.mark.slow


def test_unisd_lowers_reference_nll_on_smollm2(bundled):
    items = [it for it in load_sample_items() if it.reference][:6]
    cfg = load_method_config("edge", {"rollout": {"max_new_tokens": 24},
                                      "optim": {"lr": 5e-4, "batch_size": 6, "micro_batch_size": 6}})
    model = attach_lora(bundled.model, rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=0.0,
                        target_modules=cfg.lora.target_modules)
    try:
        before = reference_nll(model, bundled.tokenizer, items)["nll"]
        trainer = UniSDTrainer(model, bundled.tokenizer, cfg, total_steps=4, profile=load_profile(), pool=items)
        result = run_round(trainer, items, steps=4, view_item_ids={items[0].id, items[3].id})
        after = reference_nll(model, bundled.tokenizer, items)["nll"]
        drift = retention(model, bundled.tokenizer, load_general_prompts()[:4], max_new_tokens=12)
    finally:
        model.unload()  # give the shared session model back without the adapter
    assert result.status == "completed"
    assert after < before - 0.05, (before, after)
    assert 0.0 <= drift["jsd"] < 0.2, drift  # general prompts barely move (JSD is in [0, log 2])
