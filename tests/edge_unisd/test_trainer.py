"""The trainer on a tiny random model: it learns what the context teaches, resumes exactly, and stops on time."""

from __future__ import annotations

import threading

import pytest
import torch

from budgets.gates import GateDecision, GateState
from budgets.preemption import PreemptionMonitor
from edge_unisd.config import PRESETS, load_method_config
from edge_unisd.eval import distillation_gap, sample_completions
from edge_unisd.items import Item
from edge_unisd.modeling import attach_lora
from edge_unisd.scoring import chunked_distill_terms, completion_hidden, lm_head_of
from edge_unisd.teacher import lora_parameters
from edge_unisd.trainer import UniSDTrainer, batch_for_step, run_round
from edge_unisd.views import render_prompt
from tests.conftest import make_tiny_llama

PROFILE = "The user's dog is called Biscuit. The user lives in Gothenburg and is vegetarian."
TRAIN = [Item(id=f"t{i}", messages=({"role": "user", "content": q},), reference=r) for i, (q, r) in enumerate([
    ("What is my dog's name?", "Biscuit."), ("Where do I live?", "Gothenburg."),
    ("Suggest a lunch for me.", "A lentil salad."), ("Which city am I in?", "Gothenburg."),
])]
UNRELATED = [Item(id=f"u{i}", messages=({"role": "user", "content": q},))
             for i, q in enumerate(["What is two plus two?", "Name a colour.", "How do bees fly?"])]


def _cfg(preset: str, **over):
    base = {"rollout": {"max_new_tokens": 10, "temperature": 1.0}, "gradient_checkpointing": False,
            "optim": {"lr": 3e-3, "batch_size": 4, "micro_batch_size": 2, "warmup_ratio": 0.0,
                      "schedule": "constant"}, "lora": {"rank": 8, "alpha": 16}}
    base.update(over)
    return load_method_config(preset, base)


def _peft(tokenizer, init_std=0.1, seed=0):
    model = make_tiny_llama(len(tokenizer), seed=seed, init_std=init_std)
    return attach_lora(model, rank=8, alpha=16, dropout=0.0, target_modules="all-linear")


def context_gap_before_after(model, tokenizer, preset: str = "sd", **over) -> tuple[float, float]:
    """The context gap on TRAIN's fixed completions before and after a completed round of 20 steps of `preset`
    (`_cfg` with `over`): what a base held another way (4-bit, bf16) must close as the fp32 one does."""
    fixed = sample_completions(model, tokenizer, TRAIN, max_new_tokens=10, temperature=1.0, seed=1)
    gap_before = distillation_gap(model, tokenizer, TRAIN, fixed, profile=PROFILE, teacher="base")
    trainer = UniSDTrainer(model, tokenizer, _cfg(preset, **over), total_steps=20, profile=PROFILE, pool=TRAIN)
    result = run_round(trainer, TRAIN, steps=20)
    assert result.status == "completed" and result.steps_done == 20
    return gap_before, distillation_gap(model, tokenizer, TRAIN, fixed, profile=PROFILE, teacher="base")


def _drift_from_base(model, tokenizer, items, rollout) -> float:
    prompts = [render_prompt(tokenizer, it.messages) for it in items]
    with torch.no_grad():
        adapted = completion_hidden(model, prompts, rollout, tokenizer.pad_token_id)
        with model.disable_adapter():
            base = completion_hidden(model, prompts, rollout, tokenizer.pad_token_id)
        div = chunked_distill_terms(adapted, base, lm_head_of(model), rollout.completion_ids).divergence
    m = rollout.completion_mask
    return float((div * m).sum() / m.sum())


@pytest.mark.parametrize("preset", ["sd", "unisd-star"])
def test_self_distillation_closes_the_context_gap(tokenizer, preset):
    model = _peft(tokenizer)
    fixed = sample_completions(model, tokenizer, TRAIN, max_new_tokens=10, temperature=1.0, seed=1)
    fixed_unrelated = sample_completions(model, tokenizer, UNRELATED, max_new_tokens=10, temperature=1.0, seed=2)
    gap_before = distillation_gap(model, tokenizer, TRAIN, fixed, profile=PROFILE, teacher="base")
    trainer = UniSDTrainer(model, tokenizer, _cfg(preset), total_steps=20, profile=PROFILE, pool=TRAIN)
    result = run_round(trainer, TRAIN, steps=20)
    gap_after = distillation_gap(model, tokenizer, TRAIN, fixed, profile=PROFILE, teacher="base")
    drift = _drift_from_base(model, tokenizer, UNRELATED, fixed_unrelated)
    assert result.status == "completed" and result.steps_done == 20
    assert gap_before > 0.05, "the context must matter for the test to mean anything"
    assert gap_after <= 0.5 * gap_before, (gap_before, gap_after)
    if preset == "sd":
        # a tiny random model has no semantics to keep the update local; still, against the fixed base
        # teacher it must drift less on unrelated prompts than the gap it had on the trained ones.
        # (Retention on a real model is measured by the slow SmolLM2 test and `eval`.)
        assert drift < gap_before, (drift, gap_before)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_takes_a_step_and_logs_its_terms(tokenizer, preset):
    model = _peft(tokenizer)
    items = [Item(id=f"n{i}", messages=it.messages, reference=it.reference,
                  rejected="A poodle called Rex." if i % 2 else None) for i, it in enumerate(TRAIN)]
    trainer = UniSDTrainer(model, tokenizer, _cfg(preset), total_steps=2, profile=PROFILE, pool=items)
    before = {k: v.detach().clone() for k, v in lora_parameters(model, "default").items()}
    report = trainer.step(items, view_item_ids={"n0", "n2"})
    after = lora_parameters(model, "default")
    assert any(not torch.equal(before[k], after[k]) for k in before), "LoRA weights must change"
    assert report.loss == report.loss and report.grad_norm >= 0  # not NaN
    assert set(report.stage_seconds) == {"rollout", "teacher", "views", "student", "optimizer", "ema"}
    assert set(report.item_uncertainty) == {it.id for it in items}
    cfg = trainer.cfg
    if cfg.uses_views:
        expected = len(items) if cfg.agreement_routing == "all" else 2
        assert report.tokens["view_items"] == expected and report.tokens["view_tokens"] > 0
        assert 0 < report.weights["min"] <= report.weights["mean"] <= 1
        assert 0 < report.weights["kd_kept"] <= 1
    else:
        assert report.tokens["view_items"] == 0
        assert report.weights == {"mean": 1.0, "min": 1.0, "kd_kept": 1.0}
    if cfg.contrastive_weight and cfg.mode == "distill":
        assert report.tokens["negative_items"] == 2
    if cfg.feature_weight:
        assert report.terms["feature"] > 0


def test_gamma_changes_the_logged_weights(tokenizer):
    """Reference defect 3: with γ=0.001 the weights sit at ~1; with γ=1 the agreement term acts."""
    mins, kept = {}, {}
    for gamma in (0.001, 1.0):
        model = _peft(tokenizer)
        trainer = UniSDTrainer(model, tokenizer, _cfg("agreement-token", agreement_gamma=gamma), total_steps=1,
                               profile=PROFILE, pool=TRAIN)
        weights = trainer.step(TRAIN).weights
        mins[gamma], kept[gamma] = weights["min"], weights["kd_kept"]
    assert mins[0.001] > 0.99 and mins[1.0] < 0.9
    assert kept[0.001] > 0.99 and kept[1.0] < kept[0.001]  # down-weighting costs distillation signal


def test_checkpoint_resume_reproduces_the_uninterrupted_round(tokenizer, tmp_path):
    def fresh():
        model = _peft(tokenizer)
        return model, UniSDTrainer(model, tokenizer, _cfg("edge"), total_steps=4, profile=PROFILE, pool=TRAIN)

    torch.manual_seed(123)
    model_a, trainer_a = fresh()
    run_round(trainer_a, TRAIN, steps=4, view_item_ids={"t1"})
    straight = {k: v.detach().clone() for k, v in lora_parameters(model_a, "default").items()}

    torch.manual_seed(123)
    model_b, trainer_b = fresh()
    ckpt = tmp_path / "round.pt"
    calls = {"n": 0}

    def stop_after_two():
        calls["n"] += 1
        return calls["n"] > 2

    first = run_round(trainer_b, TRAIN, steps=4, view_item_ids={"t1"}, should_stop=stop_after_two,
                      checkpoint_path=ckpt)
    assert first.status == "preempted" and first.steps_done == 2 and ckpt.exists()
    model_c, trainer_c = fresh()  # a new process would start from scratch like this
    second = run_round(trainer_c, TRAIN, steps=4, view_item_ids={"t1"}, checkpoint_path=ckpt)
    assert second.status == "completed" and second.steps_done == 4 and len(second.reports) == 2
    assert second.reports[0].step == 3 and not ckpt.exists()
    resumed = lora_parameters(model_c, "default")
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], atol=1e-5, rtol=1e-4)


def test_a_closing_gate_stops_a_real_round_within_one_step(tokenizer, tmp_path):
    gate_open = threading.Event()
    gate_open.set()

    def check() -> GateDecision:
        state = "open" if gate_open.is_set() else "closed"
        return GateDecision(open=gate_open.is_set(), gates=[GateState("power", state, "on AC" if
                                                                     gate_open.is_set() else "on battery")])

    model = _peft(tokenizer)
    trainer = UniSDTrainer(model, tokenizer, _cfg("edge"), total_steps=50, profile=PROFILE, pool=TRAIN)
    steps_when_closed = []

    def on_step(report):
        if report.step == 2:
            gate_open.clear()  # the user unplugs the laptop during step 3's run-up
            steps_when_closed.append(report.step)

    with PreemptionMonitor(check, poll_seconds=0.01) as monitor:
        result = run_round(trainer, TRAIN, steps=50, should_stop=monitor.should_stop,
                           checkpoint_path=tmp_path / "round.pt", on_step=on_step)
        assert "power" in (monitor.reason or "")
    assert result.status == "preempted"
    assert result.steps_done <= steps_when_closed[0] + 1  # at most the step already under way
    assert (tmp_path / "round.pt").exists()


def test_batches_are_a_deterministic_function_of_the_step():
    items = [Item(id=str(i), messages=({"role": "user", "content": str(i)},)) for i in range(5)]
    epoch = [it.id for s in range(5) for it in batch_for_step(items, s, 1, seed=3)]
    assert sorted(epoch) == [str(i) for i in range(5)]  # one epoch visits every item once
    assert batch_for_step(items, 7, 2, seed=3) == batch_for_step(items, 7, 2, seed=3)


@pytest.mark.parametrize("preset", ["edge", "sft"])
def test_a_packed_step_equals_a_padded_one(tokenizer, preset, monkeypatch):
    """Padding-free rows change the arithmetic's order only: loss, terms, gradient norm, uncertainty agree.

    `edge` runs every forward (EMA teacher over the shared profile, K views, negatives, feature term);
    `sft` trains on right-padded reference answers of different lengths.
    """
    items = [Item(id=f"n{i}", messages=it.messages, reference=it.reference,
                  rejected="A poodle called Rex." if i % 2 else None) for i, it in enumerate(TRAIN)]
    reports = []
    for pack in (True, False):
        trainer = UniSDTrainer(_peft(tokenizer), tokenizer, _cfg(preset), total_steps=2, profile=PROFILE, pool=items)
        with monkeypatch.context() as patch:
            if not pack:
                patch.setattr("edge_unisd.scoring.packs_rows", lambda model: False)
            reports.append(trainer.step(items, view_item_ids={"n0", "n2"}))
    packed, padded = reports
    assert packed.loss == pytest.approx(padded.loss, rel=1e-4, abs=1e-6)
    assert packed.grad_norm == pytest.approx(padded.grad_norm, rel=1e-3)
    assert packed.terms == pytest.approx(padded.terms, rel=1e-4, abs=1e-6)
    assert packed.item_uncertainty == pytest.approx(padded.item_uncertainty, rel=1e-4, abs=1e-6)
