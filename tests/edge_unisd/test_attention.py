"""Grouped-query attention without repeated K/V equals transformers' sdpa, forward, backward and with a cache."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers.integrations.sdpa_attention as hf_sdpa
from torch.testing import assert_close

from edge_unisd.attention import NAME, use_gqa_attention
from edge_unisd.rollout import Rollout
from edge_unisd.scoring import completion_hidden, completion_hidden_shared_prefix
from tests.conftest import make_tiny_llama

VOCAB = 300


def _pair(**kw):
    reference = make_tiny_llama(VOCAB, **kw)
    fast = copy.deepcopy(reference)
    assert use_gqa_attention(fast) and fast.config._attn_implementation == NAME
    assert reference.config._attn_implementation == "sdpa"
    return reference, fast


def _no_repeat_kv(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("K/V were repeated per query head")

    monkeypatch.setattr(hf_sdpa, "repeat_kv", refuse)


def test_padded_batch_forward_and_backward_match_sdpa(monkeypatch):
    reference, fast = _pair(seed=1)
    ids = torch.randint(3, VOCAB, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    mask[2, :7] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    grads = []
    for model in (reference, fast):
        model.train()
        for p in model.parameters():
            p.requires_grad_(True)
        if model is fast:
            _no_repeat_kv(monkeypatch)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
        (logits[mask.bool()].float().pow(2).mean()).backward()
        grads.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (ref_logits, ref_grads), (fast_logits, fast_grads) = grads
    keep = mask.bool()
    assert_close(fast_logits[keep], ref_logits[keep], atol=1e-5, rtol=1e-4)
    for name, g in ref_grads.items():
        assert_close(fast_grads[name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_shared_prefix_cache_path_matches_sdpa(monkeypatch):
    """The teacher's path: a prefix KV cache shared by rows that attend over it with a padding mask."""
    reference, fast = _pair(seed=2)
    prefix = list(range(10, 40))
    prompts = [prefix + [50, 51], prefix + [60, 61, 62, 63, 64], prefix + [70]]
    rollout = Rollout(torch.randint(3, VOCAB, (3, 6)), torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 6]))
    with torch.no_grad():
        want = completion_hidden(reference, prompts, rollout, pad_id=2)
        _no_repeat_kv(monkeypatch)
        got = completion_hidden_shared_prefix(fast, prompts, rollout, pad_id=2, min_prefix=8)
    keep = rollout.completion_mask.bool()
    assert_close(got[keep], want[keep], atol=1e-5, rtol=1e-4)


def test_generate_matches_sdpa():
    reference, fast = _pair(seed=3)
    ids = torch.randint(3, VOCAB, (2, 7))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=2, eos_token_id=None)
    assert torch.equal(fast.generate(ids, **kw), reference.generate(ids, **kw))


@pytest.mark.parametrize("change", ["eager", "no_gqa"])
def test_models_it_does_not_suit_are_left_alone(change):
    model = make_tiny_llama(VOCAB)
    if change == "eager":
        model.set_attn_implementation("eager")
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4))
    before = model.config._attn_implementation
    assert not use_gqa_attention(model)
    assert model.config._attn_implementation == before
