"""Checkpointing under an activation budget: the estimate matches what autograd keeps, the budget picks
the last layers, and which layers are kept never changes the gradients."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from edge_unisd.attention import use_gqa_attention
from edge_unisd.checkpointing import (
    activation_bytes_per_token_layer,
    apply_activation_budget,
    checkpointable_layers,
    enable_checkpointing,
    layers_to_keep,
)
from edge_unisd.lora_fused import fuse_lora_layers
from edge_unisd.modeling import attach_lora
from tests.conftest import make_tiny_llama

LAYERS = 4


def _student(hidden: int = 128, layers: int = LAYERS):
    """A tiny llama with LoRA on every linear layer, set up as the trainer sets up its student."""
    base = make_tiny_llama(vocab_size=96, hidden=hidden, layers=layers)
    model = attach_lora(base, rank=4, alpha=8, dropout=0.0, target_modules="all-linear")
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # a fresh B is zero: give the LoRA path a gradient to carry
            torch.nn.init.normal_(p, std=0.05)
    fuse_lora_layers(model)
    use_gqa_attention(model)
    enable_checkpointing(model)
    model.train()
    return model


def _ids(batch: int = 3, length: int = 24) -> torch.Tensor:
    return torch.randint(3, 96, (batch, length), generator=torch.Generator().manual_seed(0))


def test_estimate_matches_what_autograd_saves_in_a_layer():
    model = _student()
    for layer in checkpointable_layers(model):
        layer.gradient_checkpointing = False
    ids = _ids()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    def saved_bytes() -> int:
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, use_cache=False)
        return sum(saved.values())

    per_layer = saved_bytes()
    model.get_base_model().model.layers = model.get_base_model().model.layers[:LAYERS - 1]
    per_layer -= saved_bytes()  # one layer's own activations, nothing shared between layers
    measured = per_layer / ids.numel()
    estimate = activation_bytes_per_token_layer(model.get_base_model().config, torch.float32)
    assert 0.85 * measured <= estimate <= 1.15 * measured, (estimate, measured)


def test_budget_counts_whole_layers_for_the_batch():
    assert layers_to_keep(budget_bytes=100 << 20, tokens=1000, bytes_per_token_layer=10_000, num_layers=30) == 10
    assert layers_to_keep(100 << 20, tokens=2000, bytes_per_token_layer=10_000, num_layers=30) == 5
    assert layers_to_keep(1 << 40, tokens=1000, bytes_per_token_layer=10_000, num_layers=30) == 30
    assert layers_to_keep(0, tokens=1000, bytes_per_token_layer=10_000, num_layers=30) == 0
    assert layers_to_keep(1 << 20, tokens=1000, bytes_per_token_layer=10_000, num_layers=30) == 0


def test_the_last_layers_are_kept_and_a_smaller_batch_keeps_more():
    model = _student()
    per_layer = activation_bytes_per_token_layer(model.get_base_model().config, torch.float32)
    budget = 2 * 100 * per_layer  # two layers of 100 tokens
    assert apply_activation_budget(model, tokens=100, budget_bytes=budget) == 2
    assert [layer.gradient_checkpointing for layer in checkpointable_layers(model)] == [True, True, False, False]
    assert apply_activation_budget(model, tokens=50, budget_bytes=budget) == 4
    assert not any(layer.gradient_checkpointing for layer in checkpointable_layers(model))
    assert apply_activation_budget(model, tokens=400, budget_bytes=budget) == 0
    assert all(layer.gradient_checkpointing for layer in checkpointable_layers(model))


def test_checkpointing_is_enabled_without_the_deprecated_name_and_is_not_reentrant():
    model = attach_lora(make_tiny_llama(vocab_size=96, hidden=32, layers=3), rank=4, alpha=8, dropout=0.0,
                        target_modules="all-linear")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # transformers 5 warns on gradient_checkpointing_enable
        enable_checkpointing(model)
    layers = checkpointable_layers(model)
    assert len(layers) == 3 and all(layer.gradient_checkpointing for layer in layers)
    assert all(layer._gradient_checkpointing_func.keywords == {"use_reentrant": False} for layer in layers)


def test_checkpointing_falls_back_to_the_old_name_where_the_new_one_is_missing():
    calls = []

    class OldTransformersModel(torch.nn.Module):  # transformers 4.x: only gradient_checkpointing_enable
        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
            calls.append(gradient_checkpointing_kwargs)

    enable_checkpointing(OldTransformersModel())
    assert calls == [{"use_reentrant": False}]


def test_a_model_never_given_checkpointing_is_left_alone():
    model = attach_lora(make_tiny_llama(vocab_size=96, hidden=32, layers=3), rank=4, alpha=8, dropout=0.0,
                        target_modules="all-linear")
    assert apply_activation_budget(model, tokens=10, budget_bytes=0) == 3
    assert not any(layer.gradient_checkpointing for layer in checkpointable_layers(model))


@pytest.mark.parametrize("budget_layers", [0, 2, LAYERS])
def test_gradients_do_not_depend_on_which_layers_are_recomputed(budget_layers):
    reference = _student()
    for layer in checkpointable_layers(reference):
        layer.gradient_checkpointing = False
    model = copy.deepcopy(reference)
    ids = _ids()
    per_layer = activation_bytes_per_token_layer(model.get_base_model().config, torch.float32) * ids.numel()
    assert apply_activation_budget(model, ids.numel(), budget_layers * per_layer) == budget_layers

    def grads(m):
        m.zero_grad(set_to_none=True)
        m(input_ids=ids, use_cache=False).logits.logsumexp(-1).sum().backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}

    want, got = grads(reference), grads(model)
    assert want.keys() == got.keys() and len(want) == 7 * 2 * LAYERS
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)


def test_the_trainer_keeps_what_its_budget_covers_and_learns_the_same(tokenizer):
    from edge_unisd.config import load_method_config
    from edge_unisd.items import Item
    from edge_unisd.teacher import lora_parameters
    from edge_unisd.trainer import UniSDTrainer

    items = [Item(id=f"i{i}", messages=({"role": "user", "content": q},), reference=r) for i, (q, r) in
             enumerate([("What is my dog's name?", "Biscuit."), ("Where do I live?", "Gothenburg.")])]
    base = attach_lora(make_tiny_llama(len(tokenizer), layers=LAYERS, init_std=0.1), rank=4, alpha=8, dropout=0.0,
                       target_modules="all-linear")
    results = {}
    for budget_mb in (0, 1024):
        cfg = load_method_config("sd", {"rollout": {"max_new_tokens": 6, "temperature": 1.0},
                                        "activation_budget_mb": budget_mb, "optim": {"lr": 1e-2, "batch_size": 2}})
        trainer = UniSDTrainer(copy.deepcopy(base), tokenizer, cfg, total_steps=1, profile="The dog is Biscuit.")
        report = trainer.step(items)
        results[budget_mb] = (trainer.kept_layers, report.loss, lora_parameters(trainer.model, "default"))
    assert results[0][0] == 0 and results[1024][0] == LAYERS
    unchecked = UniSDTrainer(copy.deepcopy(base), tokenizer, cfg.model_copy(update={"gradient_checkpointing": False}),
                             total_steps=1)
    assert unchecked.kept_layers == LAYERS
    assert results[0][1] == pytest.approx(results[1024][1], rel=1e-5)
    moved = [name for name, p in results[0][2].items() if "lora_B" in name and p.abs().max() > 0]
    assert moved, "the step must change the adapter (a fresh B is zero) for the comparison to mean anything"
    for name, p in results[0][2].items():
        torch.testing.assert_close(results[1024][2][name], p, rtol=1e-5, atol=1e-6, msg=name)
