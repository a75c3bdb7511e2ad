"""The evaluation gate: metrics on a tiny random model with the bundled tokenizer; the promote/reject rule."""

from __future__ import annotations

import math

import pytest
import torch

from daemon.evaluation import EvalSettings, evaluate, gate, retention, task_accuracy
from edge_unisd import eval as method_eval
from edge_unisd.items import Item
from edge_unisd.rollout import generate_completions
from edge_unisd.views import render_prompt

FAST = EvalSettings(general_prompts=3, retention_new_tokens=6, accuracy_new_tokens=6)
PROMPTS = ["What is the capital of France?", "Name a prime number.", "How many legs does a spider have?"]


@pytest.fixture(scope="module")
def tok():
    """The bundled tokenizer from the converted-model cache (no model weights loaded)."""
    from transformers import AutoTokenizer

    from edge_unisd.modeling import gguf_to_hf_folder, resolve_base

    t = AutoTokenizer.from_pretrained(gguf_to_hf_folder(resolve_base(None)))
    if t.pad_token_id is None:
        t.pad_token = t.eos_token
    return t


def tiny_lora(tok, seed: int = 0):
    """A tiny random llama (frozen, like a base) with a fresh LoRA adapter: identical to its base.

    initializer_range 0.5, not HF's 0.02: with 0.02 a 32-wide model's next-token distributions are
    near-uniform whatever its weights, so no adapter could move them measurably."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from edge_unisd.modeling import attach_lora

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
                      pad_token_id=2, tie_word_embeddings=True, initializer_range=0.5)
    base = LlamaForCausalLM(cfg).eval()
    for p in base.parameters():
        p.requires_grad_(False)
    return attach_lora(base, rank=4, alpha=8, dropout=0.0, target_modules="all-linear")


@torch.no_grad()
def harm(model, adapter: str = "default", std: float = 2.0) -> None:
    """A deliberately harmful adapter: large random LoRA B (and A) matrices."""
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if f".{adapter}." in name and "lora_" in name:
            p.copy_(torch.randn(p.shape, generator=g) * std)


def items() -> list[Item]:
    return [Item(id="h1", messages=({"role": "user", "content": "What breed is my dog?"},),
                 reference="Biscuit is a beagle."),
            Item(id="h2", messages=({"role": "user", "content": "Who do I report to?"},),
                 reference="You report to Priya."),
            Item(id="h3", messages=({"role": "user", "content": "Any plans?"},))]  # no reference: not scored


# --- the gate rule (pure) ------------------------------------------------------------------------

def test_gate_promotes_when_fit_improves_or_holds_within_tolerance():
    before = {"fit_nll": 2.0, "retention_jsd": 0.0}
    better = gate(before, {"fit_nll": 1.5, "retention_jsd": 0.01}, max_retention_jsd=0.1, fit_tolerance=0.0)
    assert better.promote and "-0.500" in better.reason
    held = gate(before, {"fit_nll": 2.01, "retention_jsd": 0.01}, max_retention_jsd=0.1, fit_tolerance=0.02)
    assert held.promote and "+0.010" in held.reason


def test_gate_rejects_worse_fit_or_lost_retention_and_says_why():
    before = {"fit_nll": 2.0, "retention_jsd": 0.0}
    worse = gate(before, {"fit_nll": 2.5, "retention_jsd": 0.01}, max_retention_jsd=0.1, fit_tolerance=0.02)
    assert not worse.promote and "held-out fit 2.000 -> 2.500" in worse.reason
    drifted = gate(before, {"fit_nll": 1.0, "retention_jsd": 0.3}, max_retention_jsd=0.1, fit_tolerance=0.02)
    assert not drifted.promote and "retention JSD vs base 0.3000 > bound 0.1" in drifted.reason
    both = gate(before, {"fit_nll": 9.0, "retention_jsd": 0.3}, max_retention_jsd=0.1, fit_tolerance=0.02)
    assert "fit" in both.reason and "retention" in both.reason


def test_gate_without_held_out_references_rests_on_retention_and_rejects_non_finite():
    no_fit = gate({"fit_nll": None, "retention_jsd": 0.0}, {"fit_nll": None, "retention_jsd": 0.05},
                  max_retention_jsd=0.1, fit_tolerance=0.0)
    assert no_fit.promote and "fit not measured" in no_fit.reason
    nan = gate({"fit_nll": 2.0}, {"fit_nll": math.nan, "retention_jsd": 0.0}, max_retention_jsd=0.1,
               fit_tolerance=0.0)
    assert not nan.promote and "not a finite number" in nan.reason


# --- metrics on a model --------------------------------------------------------------------------

def test_a_fresh_adapter_measures_as_the_base(tok):
    model = tiny_lora(tok)
    m = evaluate(model, tok, items(), PROMPTS, settings=FAST)
    with model.disable_adapter():
        base_nll = method_eval.reference_nll(model, tok, items())["nll"]
    assert m["fit_items"] == 2 and m["fit_nll"] == pytest.approx(base_nll, rel=1e-5)
    assert m["retention_jsd"] == pytest.approx(0.0, abs=1e-6) and m["retention_tokens"] > 0
    assert m["accuracy"] is None and m["drift_jsd"] is None


def test_retention_agrees_with_the_method_metric_and_measures_drift_from_the_previous_adapter(tok):
    model = tiny_lora(tok)
    model.add_adapter("previous", model.peft_config["default"])  # a copy of the fresh adapter: the base
    harm(model, "default", std=0.3)
    model.set_adapter("default")
    ours = retention(model, tok, PROMPTS, compare_adapter="previous", max_new_tokens=6)
    ref = method_eval.retention(model, tok, PROMPTS, max_new_tokens=6)
    assert ours["jsd"] == pytest.approx(ref["jsd"], rel=1e-4) and ours["jsd"] > 1e-3
    # "previous" equals the base here, so drift from it is the JSD vs base
    assert ours["drift_jsd"] == pytest.approx(ours["jsd"], rel=1e-4)
    assert model.active_adapter == "default"


def test_the_gate_rejects_a_harmful_adapter(tok):
    model = tiny_lora(tok)
    before = evaluate(model, tok, items(), PROMPTS, settings=FAST)
    harm(model)
    after = evaluate(model, tok, items(), PROMPTS, settings=FAST)
    assert after["retention_jsd"] > 0.1
    verdict = gate(before, after, max_retention_jsd=0.1, fit_tolerance=0.02)
    assert not verdict.promote and "retention JSD" in verdict.reason


def test_task_accuracy_checks_greedy_answers_of_items_with_a_check(tok):
    model = tiny_lora(tok)
    heldout = items()
    greedy = generate_completions(model, tok, [render_prompt(tok, heldout[0].messages)], max_new_tokens=6,
                                  temperature=0.0)
    n = int(greedy.completion_mask[0].sum())
    answer = tok.decode(greedy.completion_ids[0, :n].tolist(), skip_special_tokens=True)
    keyword = answer.strip()[:8]
    assert keyword, "the tiny model wrote nothing checkable"
    checks = {"h1": [keyword], "h2": ["a word this model never writes: zqxj"]}
    acc = task_accuracy(model, tok, heldout, checks, max_new_tokens=6)
    assert acc == {"accuracy": 0.5, "items": 2}
