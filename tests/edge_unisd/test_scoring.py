"""The chunked vocabulary path equals the plain full-logits computation, values and gradients."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from edge_unisd.losses import sampled_token_logps, token_divergence, token_entropy
from edge_unisd.rollout import Rollout
from edge_unisd.scoring import chunked_distill_terms, chunked_token_logps, completion_hidden, view_token_logps
from edge_unisd.vocab_grad import VocabScratch, frozen_linear_head, fused_distill_chunk


def _head_and_hidden(B=3, L=7, H=16, V=50, seed=0, frozen=True, bias=False):
    """A frozen head takes the forward-gradient path (edge_unisd.vocab_grad); a trained one is checkpointed."""
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(H, V, bias=bias)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g))
        if bias:
            head.bias.copy_(torch.randn(V, generator=g))
    head.requires_grad_(not frozen)
    s_h = torch.randn(B, L, H, generator=g).requires_grad_(True)
    t_h = torch.randn(B, L, H, generator=g)
    tokens = torch.randint(0, V, (B, L), generator=g)
    return head, s_h, t_h, tokens


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd"])
@pytest.mark.parametrize("chunk_tokens", [1, 4, 9, 1000])
@pytest.mark.parametrize("temperature", [0.7, 1.0])  # at τ = 1 one log-softmax per side serves every term
@pytest.mark.parametrize("frozen", [True, False])
def test_chunked_terms_match_unchunked_values_and_grads(kind, chunk_tokens, temperature, frozen):
    head, s_h, t_h, tokens = _head_and_hidden(frozen=frozen, bias=not frozen or chunk_tokens == 4)
    terms = chunked_distill_terms(s_h, t_h, head, tokens, kind=kind, beta=0.3, temperature=temperature,
                                  chunk_tokens=chunk_tokens)
    (terms.divergence.sum() + terms.student_logps.sum()).backward()
    grad_chunked = s_h.grad.clone()
    s_h.grad = None

    s_logits, t_logits = head(s_h), head(t_h).detach()  # full (B, L, V): the thing chunking avoids
    div = token_divergence(s_logits, t_logits, kind=kind, beta=0.3, temperature=temperature)
    s_logp = sampled_token_logps(s_logits, tokens)
    (div.sum() + s_logp.sum()).backward()

    assert_close(terms.divergence, div, atol=1e-5, rtol=1e-5)
    assert_close(terms.student_logps, s_logp, atol=1e-5, rtol=1e-5)
    assert_close(terms.teacher_logps, sampled_token_logps(t_logits, tokens), atol=1e-5, rtol=1e-5)
    assert_close(terms.student_entropy, token_entropy(s_logits.detach()), atol=1e-5, rtol=1e-5)
    assert_close(grad_chunked, s_h.grad, atol=1e-5, rtol=1e-5)
    assert not terms.teacher_logps.requires_grad and not terms.student_entropy.requires_grad


@pytest.mark.parametrize("kind", ["fkl", "jsd"])  # closed form and autograd-on-the-chunk
def test_forward_gradient_is_scaled_by_what_the_loss_does_downstream(kind):
    """Clipping, reliability weights and means act on the per-token values after the chunk: the saved
    d value / d h must be scaled by each token's incoming gradient, whatever it is."""
    head, s_h, t_h, tokens = _head_and_hidden(B=2, L=9, seed=5)
    g = torch.Generator().manual_seed(6)
    w_div, w_logp = torch.rand(2, 9, generator=g), torch.randn(2, 9, generator=g)
    terms = chunked_distill_terms(s_h, t_h, head, tokens, kind=kind, beta=0.4, chunk_tokens=4)
    ranked = terms.divergence.detach().flatten().sort().values
    cap = (ranked[8] + ranked[9]) / 2  # half the tokens clipped, none at the cap (where rounding picks the side)
    ((terms.divergence.clamp(max=cap) * w_div).sum() + (terms.student_logps * w_logp).sum()).backward()
    got = s_h.grad.clone()
    s_h.grad = None
    s_logits, t_logits = head(s_h), head(t_h)
    div = token_divergence(s_logits, t_logits, kind=kind, beta=0.4)
    ((div.clamp(max=cap) * w_div).sum() + (sampled_token_logps(s_logits, tokens) * w_logp).sum()).backward()
    assert_close(got, s_h.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["fkl", "rkl"])
def test_without_logps_grad_the_divergence_gradient_is_unchanged(kind):
    head, s_h, t_h, tokens = _head_and_hidden(seed=7)
    full = chunked_distill_terms(s_h, t_h, head, tokens, kind=kind, chunk_tokens=5)
    full.divergence.sum().backward()
    want = s_h.grad.clone()
    s_h.grad = None
    lean = chunked_distill_terms(s_h, t_h, head, tokens, kind=kind, chunk_tokens=5, logps_grad=False)
    lean.divergence.sum().backward()
    assert_close(s_h.grad, want)
    assert_close(lean.student_logps, full.student_logps.detach())
    assert not lean.student_logps.requires_grad


def test_frozen_linear_head_takes_the_forward_gradient_path(monkeypatch):
    """The fast path must really be taken for the usual head (the value tests pass either way)."""
    import edge_unisd.scoring as scoring

    def no_checkpoint(*args, **kwargs):
        raise AssertionError("a frozen linear head must not be checkpointed")

    monkeypatch.setattr(scoring, "checkpoint", no_checkpoint)
    head, s_h, t_h, tokens = _head_and_hidden(seed=8)
    chunked_distill_terms(s_h, t_h, head, tokens, chunk_tokens=4).divergence.sum().backward()
    chunked_token_logps(s_h, head, tokens, chunk_tokens=4).sum().backward()
    assert s_h.grad is not None
    assert not frozen_linear_head(torch.nn.Linear(4, 5))  # trained weights: checkpointed path
    assert not frozen_linear_head(torch.nn.Embedding(5, 4))


def test_teacher_hidden_gets_no_gradient():
    head, s_h, t_h, tokens = _head_and_hidden()
    t_h.requires_grad_(True)
    chunked_distill_terms(s_h, t_h, head, tokens, chunk_tokens=4).divergence.sum().backward()
    assert t_h.grad is None and s_h.grad is not None


@pytest.mark.parametrize("frozen", [True, False])
@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_chunked_token_logps_match_and_differentiate(frozen, temperature):
    head, s_h, _, tokens = _head_and_hidden(seed=3, frozen=frozen)
    got = chunked_token_logps(s_h, head, tokens, temperature=temperature, chunk_tokens=5)
    got.sum().backward()
    g = s_h.grad.clone()
    s_h.grad = None
    want = sampled_token_logps(head(s_h), tokens, temperature)
    want.sum().backward()
    assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert_close(g, s_h.grad, atol=1e-5, rtol=1e-5)


def test_completion_hidden_is_padding_invariant(tiny_model):
    """Left padding a short prompt next to a long one must not change its hidden states (positions from mask)."""
    completion = torch.tensor([[5, 6, 7, 2]])
    one = Rollout(completion, torch.ones(1, 4))
    with torch.no_grad():
        alone = completion_hidden(tiny_model, [[1, 10, 11]], one, pad_id=2)
        two = Rollout(completion.repeat(2, 1), torch.ones(2, 4))
        batched = completion_hidden(tiny_model, [[1, 10, 11], [1, 20, 21, 22, 23, 24]], two, pad_id=2)
    assert_close(batched[0], alone[0], atol=1e-5, rtol=1e-5)


def test_view_logps_batch_the_views_and_match_single_forwards(tiny_model):
    completion = torch.tensor([[5, 6, 7, 2], [8, 9, 2, 2]])
    rollout = Rollout(completion, torch.tensor([[1.0, 1, 1, 1], [1, 1, 1, 0]]))
    views = [[[1, 10, 11], [1, 12]], [[1, 30, 31, 32], [1, 40]]]  # K=2 views x B=2 prompts
    got_K_B_L = view_token_logps(tiny_model, views, rollout, pad_id=2, chunk_tokens=3)
    assert got_K_B_L.shape == (2, 2, 4)
    for k in range(2):
        with torch.no_grad():
            h = completion_hidden(tiny_model, views[k], rollout, pad_id=2)
            want = sampled_token_logps(tiny_model.get_output_embeddings()(h), completion)
        assert_close(got_K_B_L[k], want, atol=1e-5, rtol=1e-5)


def test_sub_batched_no_grad_forward_matches_one_batch(tiny_model):
    completion = torch.tensor([[5, 6, 7, 2], [8, 9, 2, 2], [3, 4, 5, 6]])
    rollout = Rollout(completion, torch.tensor([[1.0, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]]))
    prompts = [[1, 10, 11], [1, 12], [1, 30, 31, 32, 33]]
    with torch.no_grad():
        whole = completion_hidden(tiny_model, prompts, rollout, pad_id=2)
        split = completion_hidden(tiny_model, prompts, rollout, pad_id=2, max_batch=2)
    assert_close(split, whole, atol=1e-5, rtol=1e-5)


def test_shared_prefix_forward_matches_the_full_forward(tiny_model):
    from edge_unisd.scoring import common_prefix_length, completion_hidden_shared_prefix

    prefix = list(range(100, 180))  # a long shared system prompt + profile
    prompts = [prefix + [5, 6], prefix + [7], prefix + [8, 9, 10, 11]]
    completion = torch.tensor([[5, 6, 7, 2], [8, 9, 2, 2], [3, 4, 5, 6]])
    rollout = Rollout(completion, torch.tensor([[1.0, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]]))
    assert common_prefix_length(prompts) == 80
    memo: dict = {}
    with torch.no_grad():
        whole = completion_hidden(tiny_model, prompts, rollout, pad_id=2)
        shared = completion_hidden_shared_prefix(tiny_model, prompts, rollout, pad_id=2, max_batch=2,
                                                 min_prefix=16, memo=memo)
        again = completion_hidden_shared_prefix(tiny_model, prompts, rollout, pad_id=2, min_prefix=16, memo=memo)
    assert memo["key"] == tuple(prefix)
    mask = rollout.completion_mask.bool()
    assert_close(shared[mask], whole[mask], atol=1e-4, rtol=1e-4)
    assert_close(again[mask], whole[mask], atol=1e-4, rtol=1e-4)


def test_one_odd_prompt_runs_whole_and_the_others_still_share_their_prefix(tiny_model, monkeypatch):
    import edge_unisd.scoring as scoring

    prefix = list(range(100, 180))
    odd = [100, 101] + list(range(300, 380))  # e.g. an item with its own system message
    prompts = [prefix + [5, 6], odd, prefix + [7], prefix + [8, 9, 10, 11]]
    completion = torch.tensor([[5, 6, 7, 2], [4, 4, 2, 2], [8, 9, 2, 2], [3, 4, 5, 6]])
    rollout = Rollout(completion, torch.tensor([[1.0, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1]]))
    assert scoring.prefix_group(prompts, 16) == [0, 2, 3]
    assert scoring.prefix_group([prefix + [1], odd], 16) == [0]  # nothing to share
    prefixes = []
    real_cache = scoring._prefix_cache

    def counting_cache(model, prefix, device, memo):
        prefixes.append(len(prefix))
        return real_cache(model, prefix, device, memo)

    monkeypatch.setattr(scoring, "_prefix_cache", counting_cache)
    with torch.no_grad():
        whole = scoring.completion_hidden(tiny_model, prompts, rollout, pad_id=2)
        mixed = scoring.completion_hidden_shared_prefix(tiny_model, prompts, rollout, pad_id=2, min_prefix=16)
    assert prefixes == [80]  # the three that share ran their 80-token prefix once
    mask = rollout.completion_mask.bool()
    assert mixed.shape == whole.shape
    assert_close(mixed[mask], whole[mask], atol=1e-4, rtol=1e-4)


def test_closed_form_chunk_in_a_float64_head_matches_float32_and_scratch_refuses_bigger_chunks():
    """The vocabulary-major buffers are float32 whatever the head's dtype (a bf16 head on a GPU)."""
    head, s_h, t_h, tokens = _head_and_hidden(B=1, L=6, bias=True, seed=3)
    N = 6
    s_N_H, t_N_H, tokens_N = s_h.reshape(N, -1), t_h.reshape(N, -1), tokens.reshape(N)
    ref = fused_distill_chunk(s_N_H, t_N_H, tokens_N, head, kind="fkl", beta=0.5, temperature=1.0)
    wide = torch.nn.Linear(head.in_features, head.out_features, dtype=torch.float64).requires_grad_(False)
    wide.load_state_dict({k: v.double() for k, v in head.state_dict().items()})
    scratch = VocabScratch(head.out_features, N, "cpu")
    got = fused_distill_chunk(s_N_H, t_N_H, tokens_N, wide, kind="fkl", beta=0.5, temperature=1.0, scratch=scratch)
    for a, b in zip(got, ref, strict=True):
        assert a.dtype == torch.float32
        assert_close(a, b, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="7 rows"):
        scratch.take(N + 1)
