"""Padding-free rows: the index maths by hand, and the packed decoder equal to the padded one in float64."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.testing import assert_close

from edge_unisd.attention import Segments, gqa_sdpa_forward, use_gqa_attention
from edge_unisd.packing import completion_lengths, pack_completion_rows, packed_length, unpack_rows
from edge_unisd.rollout import Rollout
from edge_unisd.scoring import completion_hidden, completion_hidden_shared_prefix, forward_tokens, packs_rows
from tests.conftest import make_tiny_llama

VOCAB = 300


def test_pack_hand_example():
    prompts = [[5, 6, 7], [8, 9], [4]]
    completion = torch.tensor([[20, 21, 22], [30, 31, 32], [40, 41, 42]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])  # row 2 never answered: left out
    packed = pack_completion_rows(prompts, completion, mask, position_offset=10)
    assert packed.input_ids.tolist() == [[5, 6, 7, 20, 21, 8, 9]]
    assert packed.position_ids.tolist() == [[10, 11, 12, 13, 14, 10, 11]]
    assert packed.bounds == ((0, 5), (5, 7))
    # row 0: outputs at 2, 3, 4 predict 20, 21, 22; row 1: output at 6 predicts 30; 7 = "no token"
    assert packed.gather_B_L.tolist() == [[2, 3, 4], [6, 7, 7], [7, 7, 7]]
    assert packed.num_tokens == 7


@pytest.mark.parametrize("mask, prompts", [
    ([[1, 0, 1]], [[5]]),  # a hole in the mask: not a rollout's shape
    ([[1, 1, 0]], [[]]),  # an empty prompt has no position to predict the first token from
])
def test_pack_refuses_what_it_cannot_represent(mask, prompts):
    assert pack_completion_rows(prompts, torch.tensor([[3, 4, 5]]), torch.tensor(mask)) is None
    assert packed_length(prompts, torch.tensor(mask)) is None


def test_packed_length_is_the_packed_sequence_length():
    prompts = [[5, 6, 7], [8, 9], [4], [1, 2, 3, 4]]
    completion = torch.arange(16).reshape(4, 4)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    assert packed_length(prompts, mask) == pack_completion_rows(prompts, completion, mask).num_tokens == 5 + 2 + 7


def test_completion_lengths():
    assert completion_lengths(torch.tensor([[1., 1., 0.], [0., 0., 0.], [1., 1., 1.]])) == [2, 0, 3]
    assert completion_lengths(torch.tensor([[0., 1.]])) is None


def test_unpack_scatters_gradient_back_to_packed_rows():
    h = torch.arange(6.0).view(3, 2).requires_grad_(True)
    out = unpack_rows(h, torch.tensor([[0, 2], [3, 3]]))  # index 3 = N: zeros
    assert out.tolist() == [[[0, 1], [4, 5]], [[0, 0], [0, 0]]]
    out.sum().backward()
    assert h.grad.tolist() == [[1, 1], [0, 0], [1, 1]]


def _pair(seed: int):
    reference = make_tiny_llama(VOCAB, seed=seed).double()
    packed = copy.deepcopy(reference)
    assert use_gqa_attention(packed) and packs_rows(packed) and not packs_rows(reference)
    return reference, packed


def _rollout():
    torch.manual_seed(0)
    ids = torch.randint(3, VOCAB, (3, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.float64)
    return Rollout(ids, mask)


def test_packed_training_forward_and_backward_equal_padded():
    """Hidden states at every real completion position and every parameter's gradient, to float64 rounding."""
    reference, packed = _pair(seed=1)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14]]
    rollout = _rollout()
    keep = rollout.completion_mask.bool()
    results = []
    for model in (reference, packed):
        model.train()
        for p in model.parameters():
            p.requires_grad_(True)
        hidden = completion_hidden(model, prompts, rollout, pad_id=2)
        (hidden * rollout.completion_mask[..., None]).pow(2).sum().backward()
        results.append((hidden.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (want, want_grads), (got, got_grads) = results
    assert_close(got[keep], want[keep], atol=1e-12, rtol=1e-10)
    assert not got[~keep].any()  # no token there: zeros, never read
    for name, g in want_grads.items():
        assert_close(got_grads[name], g, atol=1e-12, rtol=1e-10, msg=name)


def test_packed_rows_over_a_shared_prefix_equal_whole_prompts():
    """The teacher's path: every packed row attends to the prefix cache, which stays as it was."""
    reference, packed = _pair(seed=2)
    prefix = list(range(10, 40))
    prompts = [prefix + [50, 51], prefix + [60, 61, 62, 63, 64], prefix + [70]]
    rollout = _rollout()
    memo: dict = {}
    with torch.no_grad():
        want = completion_hidden(reference, prompts, rollout, pad_id=2)
        got = completion_hidden_shared_prefix(packed, prompts, rollout, pad_id=2, min_prefix=8, memo=memo)
        again = completion_hidden_shared_prefix(packed, prompts, rollout, pad_id=2, min_prefix=8, memo=memo)
    keep = rollout.completion_mask.bool()
    assert_close(got[keep], want[keep], atol=1e-12, rtol=1e-10)
    assert memo["cache"].get_seq_length() == len(prefix)  # read, never extended by the rows
    assert torch.equal(again, got)  # the memoised prefix was read, not extended


def test_forward_tokens_counts_real_tokens_when_packed():
    reference, packed = _pair(seed=3)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14]]
    rollout = _rollout()
    assert forward_tokens(packed, prompts, rollout) == (3 + 4) + (6 + 1) + (1 + 3)
    assert forward_tokens(reference, prompts, rollout) == 3 * (6 + 5 - 1)


def test_segments_on_a_path_that_cannot_run_them_fail_loudly():
    class OneGroup(torch.nn.Module):
        num_key_value_groups = 1  # no grouped heads: the sdpa fallback would ignore the segments
        layer_idx = 0

    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(ValueError, match="packed rows"):
        gqa_sdpa_forward(OneGroup(), q, q, q, None, segments=Segments(((0, 2), (2, 4))))
