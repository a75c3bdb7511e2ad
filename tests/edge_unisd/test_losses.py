"""Properties and hand-computed values of the UniSD loss terms (edge_unisd/losses.py, METHOD.md)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from edge_unisd.losses import (
    DIVERGENCE_KINDS,
    clip_cap,
    clip_divergence,
    contrastive_margin_loss,
    feature_matching_loss,
    kept_signal_share,
    masked_mean,
    masked_nll,
    sampled_token_logps,
    sequence_agreement_weights,
    token_agreement_weights,
    token_divergence,
    token_entropy,
    weighted_token_mean,
)

D = torch.float64


def _logits(*shape: int, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=D) * scale


def _kl_div_ref(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) summed over V, via torch's kl_div (input = log q, target = log p)."""
    log_p, log_q = F.log_softmax(p_logits, -1), F.log_softmax(q_logits, -1)
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)


def _trl_generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float,
                         temperature: float = 1.0) -> torch.Tensor:
    """Re-implementation of TRL `GKDTrainer.generalized_jsd_loss` (reduction none, summed over V).

    Written from its convention, not copied: mixture m = (1-β) p_S + β p_T;
    loss β KL(p_T||m) + (1-β) KL(p_S||m); β=0 is special-cased to forward KL(p_T||p_S) and β=1 to
    reverse KL(p_S||p_T). torch's kl_div(input, target) is KL(target || input), hence the swapped order.
    """
    s = F.log_softmax(student_logits / temperature, -1)
    t = F.log_softmax(teacher_logits / temperature, -1)
    if beta == 0:
        return F.kl_div(s, t, reduction="none", log_target=True).sum(-1)
    if beta == 1:
        return F.kl_div(t, s, reduction="none", log_target=True).sum(-1)
    m = torch.log((1 - beta) * s.exp() + beta * t.exp())
    kl_t = F.kl_div(m, t, reduction="none", log_target=True).sum(-1)
    kl_s = F.kl_div(m, s, reduction="none", log_target=True).sum(-1)
    return beta * kl_t + (1 - beta) * kl_s


def _kl_probs(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return (p * (p / q).log()).sum(-1)


# --- token_divergence ------------------------------------------------------------------------------

def test_fkl_and_rkl_equal_kl_div_definitions():
    s, t = _logits(2, 3, 7, seed=1), _logits(2, 3, 7, seed=2)
    assert_close(token_divergence(s, t, "fkl"), _kl_div_ref(t, s).float())
    assert_close(token_divergence(s, t, "rkl"), _kl_div_ref(s, t).float())
    assert token_divergence(s, t, "fkl").shape == (2, 3)
    assert not torch.allclose(token_divergence(s, t, "fkl"), token_divergence(s, t, "rkl"))  # order matters


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_equals_its_definition(beta):
    s, t = _logits(2, 3, 5, seed=3), _logits(2, 3, 5, seed=4)
    p_s, p_t = F.softmax(s, -1), F.softmax(t, -1)
    m = beta * p_t + (1 - beta) * p_s
    expected = beta * _kl_probs(p_t, m) + (1 - beta) * _kl_probs(p_s, m)
    assert_close(token_divergence(s, t, "jsd", beta=beta), expected.float())


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_jsd_matches_trl_generalized_jsd_convention(beta):
    s, t = _logits(3, 4, 6, seed=5), _logits(3, 4, 6, seed=6)
    assert_close(token_divergence(s, t, "jsd", beta=beta, temperature=0.7),
                 _trl_generalized_jsd(s, t, beta, temperature=0.7).float())


def test_jsd_endpoints_are_forward_and_reverse_kl():
    s, t = _logits(2, 3, 5, seed=7), _logits(2, 3, 5, seed=8)
    assert_close(token_divergence(s, t, "jsd", beta=0.0), token_divergence(s, t, "fkl"))
    assert_close(token_divergence(s, t, "jsd", beta=1.0), token_divergence(s, t, "rkl"))


def test_jsd_approaches_the_kls_only_after_dividing_by_beta():
    """The weighted sum itself tends to 0 at both ends; JSD(β)/β -> fKL and JSD(β)/(1-β) -> rKL.

    So β=0 / β=1 are special cases (TRL's convention), and jsd(1e-4) is ~1e4x smaller than jsd(0).
    """
    s, t = _logits(2, 3, 5, seed=9), _logits(2, 3, 5, seed=10)
    fkl, rkl = token_divergence(s, t, "fkl"), token_divergence(s, t, "rkl")
    eps = 1e-4  # the O(β) remainder and fp32 rounding set the tolerance
    assert_close(token_divergence(s, t, "jsd", beta=eps) / eps, fkl, rtol=3e-2, atol=1e-4)
    assert_close(token_divergence(s, t, "jsd", beta=1 - eps) / eps, rkl, rtol=3e-2, atol=1e-4)
    assert (token_divergence(s, t, "jsd", beta=eps) < 0.01 * fkl).all()  # the jump at β=0


@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
def test_identical_logits_give_zero(kind):
    x = _logits(2, 4, 9, seed=11, scale=5.0)
    assert_close(token_divergence(x, x.clone(), kind), torch.zeros(2, 4), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
def test_divergences_are_nonnegative(kind):
    s, t = _logits(4, 8, 11, seed=12, scale=4.0), _logits(4, 8, 11, seed=13, scale=4.0)
    assert (token_divergence(s, t, kind) >= -1e-6).all()


def test_jsd_half_is_bounded_by_log_two():
    s, t = _logits(4, 8, 11, seed=14, scale=6.0), _logits(4, 8, 11, seed=15, scale=6.0)
    div = token_divergence(s, t, "jsd", beta=0.5)
    assert (div >= 0).all() and (div <= math.log(2) + 1e-6).all()
    # nearly disjoint supports reach the bound
    s_far = torch.tensor([[[40.0, 0.0, -40.0]]])
    t_far = torch.tensor([[[-40.0, 0.0, 40.0]]])
    assert_close(token_divergence(s_far, t_far, "jsd", beta=0.5), torch.tensor([[math.log(2)]]),
                 atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
def test_temperature_divides_logits(kind):
    s, t = _logits(2, 3, 5, seed=16), _logits(2, 3, 5, seed=17)
    at_tau = token_divergence(s, t, kind, temperature=2.5)
    assert_close(at_tau, token_divergence(s / 2.5, t / 2.5, kind))
    assert not torch.allclose(at_tau, token_divergence(s, t, kind))


def test_hand_computed_two_tokens_three_vocab():
    # token 0: p_T = (1/2, 1/4, 1/4), p_S uniform (1/3, 1/3, 1/3); token 1: student == teacher.
    teacher = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.2, 0.3, 0.5]]], dtype=D))
    student = torch.log(torch.tensor([[[1 / 3, 1 / 3, 1 / 3], [0.2, 0.3, 0.5]]], dtype=D))
    # KL(T||S) = 1/2 log(3/2) + 2 * 1/4 log(3/4) = 1/2 log(9/8)
    fkl0 = 0.5 * math.log(9 / 8)
    # KL(S||T) = 1/3 log(2/3) + 2 * 1/3 log(4/3) = 1/3 log(32/27)
    rkl0 = math.log(32 / 27) / 3
    # β = 1/2: m = (5/12, 7/24, 7/24)
    # KL(T||m) = 1/2 log(6/5) + 1/2 log(6/7);  KL(S||m) = 1/3 log(4/5) + 2/3 log(8/7)
    kl_t_m = 0.5 * math.log(6 / 5) + 0.5 * math.log(6 / 7)
    kl_s_m = math.log(4 / 5) / 3 + 2 * math.log(8 / 7) / 3
    jsd0 = 0.5 * kl_t_m + 0.5 * kl_s_m
    assert_close(token_divergence(student, teacher, "fkl"), torch.tensor([[fkl0, 0.0]]), atol=1e-6, rtol=1e-5)
    assert_close(token_divergence(student, teacher, "rkl"), torch.tensor([[rkl0, 0.0]]), atol=1e-6, rtol=1e-5)
    assert_close(token_divergence(student, teacher, "jsd", beta=0.5), torch.tensor([[jsd0, 0.0]]),
                 atol=1e-6, rtol=1e-5)


def test_bad_kind_or_beta_raise_value_error():
    x = _logits(1, 2, 3)
    with pytest.raises(ValueError, match="kind"):
        token_divergence(x, x, "kl")
    for beta in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="beta"):
            token_divergence(x, x, "jsd", beta=beta)


@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
def test_student_gets_gradient(kind):
    s = _logits(2, 3, 5, seed=18).float().requires_grad_(True)
    t = _logits(2, 3, 5, seed=19).float()
    token_divergence(s, t, kind).sum().backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
def test_detached_teacher_gets_no_gradient(kind):
    """The contract the trainer relies on: scoring.py computes teacher logits under no_grad (detached)."""
    s = _logits(2, 3, 5, seed=20).float().requires_grad_(True)
    t = _logits(2, 3, 5, seed=21).float().requires_grad_(True)
    token_divergence(s, t.detach(), kind).sum().backward()
    assert t.grad is None


@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
def test_teacher_logits_get_no_gradient_even_if_caller_forgets(kind):
    s = _logits(2, 3, 5, seed=22).float().requires_grad_(True)
    t = _logits(2, 3, 5, seed=23).float().requires_grad_(True)
    token_divergence(s, t, kind).sum().backward()
    assert t.grad is None or t.grad.abs().sum() == 0


# --- clipping -------------------------------------------------------------------------------------

def test_static_cap():
    div, mask = torch.tensor([[1.0, 5.0, 12.0]]), torch.ones(1, 3)
    assert_close(clip_divergence(div, mask, cap=10.0), torch.tensor([[1.0, 5.0, 10.0]]))


def test_quantile_cap_uses_masked_tokens_only():
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    div = torch.tensor([[1.0, 2.0, 4.0, 1000.0]])
    # median of the masked (1, 2, 4) is 2; with the padding value it would be 3
    assert clip_cap(div, mask, quantile=0.5) == pytest.approx(2.0)
    assert_close(clip_divergence(div, mask, quantile=0.5), torch.tensor([[1.0, 2.0, 2.0, 2.0]]))
    for pad_value in (-1000.0, 0.0, 3.0, 1e9):
        moved = div.clone()
        moved[0, 3] = pad_value
        assert clip_cap(moved, mask, quantile=0.5) == pytest.approx(2.0)


def test_static_and_quantile_cap_take_the_smaller():
    div, mask = torch.tensor([[1.0, 2.0, 4.0]]), torch.ones(1, 3)
    assert clip_cap(div, mask, cap=1.5, quantile=0.5) == pytest.approx(1.5)
    assert clip_cap(div, mask, cap=10.0, quantile=0.5) == pytest.approx(2.0)
    # nothing masked: the quantile has no data, the static cap remains
    assert clip_cap(div, torch.zeros(1, 3), cap=3.0, quantile=0.5) == pytest.approx(3.0)


def test_no_cap_leaves_divergence_unchanged():
    div = torch.tensor([[1.0, 50.0, 1e6]])
    assert clip_cap(div, torch.ones(1, 3)) is None
    assert_close(clip_divergence(div, torch.ones(1, 3)), div)


def test_clipped_tokens_pass_no_gradient():
    div = torch.tensor([[1.0, 5.0, 12.0, 30.0]], requires_grad=True)
    clip_divergence(div, torch.ones(1, 4), cap=10.0).sum().backward()
    assert_close(div.grad, torch.tensor([[1.0, 1.0, 0.0, 0.0]]))


def test_quantile_cap_is_a_constant():
    div = torch.tensor([[1.0, 2.0, 3.0, 4.0, 100.0]], requires_grad=True)
    clip_divergence(div, torch.ones(1, 5), quantile=0.5).sum().backward()  # cap 3: tokens 4 and 100 clipped
    assert_close(div.grad, torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0]]))


# --- agreement weights ----------------------------------------------------------------------------

def _two_views() -> tuple[torch.Tensor, torch.Tensor]:
    """K=2 views, B=1, T=4; per-token view gaps 0, 2, 4 and a padded position with gap 10."""
    view0 = torch.tensor([[-1.0, -1.0, -2.0, -1.0]])
    view1 = torch.tensor([[-1.0, -3.0, -6.0, -11.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    return torch.stack([view0, view1]), mask  # (K, B, T)


def test_token_weights_are_one_when_views_agree():
    x = _logits(2, 5, seed=30).float()
    w = token_agreement_weights(torch.stack([x, x, x]), torch.ones(2, 5), gamma=100.0)
    assert torch.equal(w, torch.ones(2, 5))


def test_disagreeing_token_gets_lower_weight():
    views, mask = _two_views()
    w = token_agreement_weights(views, mask)
    assert w[0, 0] == 1.0 and w[0, 1] < w[0, 0] and w[0, 2] < w[0, 1]


def test_token_weights_hand_computed_var():
    views, mask = _two_views()
    # population variance of two values = (gap / 2)^2: (0, 1, 4); median 1 -> δ/q = (0, 1, 4);
    # cap 3 -> (0, 1, 3)
    # γ = 2: 1 / (1 + 2 δ̃) = (1, 1/3, 1/7); floor 0.01 keeps them; padding -> 1
    w = token_agreement_weights(views, mask, gamma=2.0, statistic="var", quantile=0.5, cap=3.0, floor=0.01)
    assert_close(w, torch.tensor([[1.0, 1 / 3, 1 / 7, 1.0]]))


def test_token_weights_hand_computed_default_quantile():
    views, mask = _two_views()
    # q_0.95 of (0, 1, 4) by linear interpolation: 1 + 0.9 * 3 = 3.7; δ̃ = (0, 1/3.7, 4/3.7); γ = 1
    w = token_agreement_weights(views, mask, gamma=1.0)
    assert_close(w, torch.tensor([[1.0, 1 / (1 + 1 / 3.7), 1 / (1 + 4 / 3.7), 1.0]]))


def test_token_weights_hand_computed_range():
    views, mask = _two_views()
    # range (0, 2, 4); median 2 -> δ̃ (0, 1, 2); γ = 1 -> (1, 1/2, 1/3)
    w = token_agreement_weights(views, mask, gamma=1.0, statistic="range", quantile=0.5)
    assert_close(w, torch.tensor([[1.0, 0.5, 1 / 3, 1.0]]))


def test_token_weight_floor_is_respected():
    views, mask = _two_views()
    w = token_agreement_weights(views, mask, gamma=2.0, quantile=0.5, cap=3.0, floor=0.2)
    assert_close(w, torch.tensor([[1.0, 1 / 3, 0.2, 1.0]]))
    huge_gamma = token_agreement_weights(views, mask, gamma=1e4, floor=0.01)
    assert (huge_gamma[mask.bool()][1:] == 0.01).all()


def test_token_weights_padding_is_one_and_does_not_move_quantile():
    views, mask = _two_views()
    w = token_agreement_weights(views, mask, quantile=0.5)
    moved = views.clone()
    moved[1, 0, 3] = -1e4  # a huge gap on the padded position
    assert w[0, 3] == 1.0
    assert_close(token_agreement_weights(moved, mask, quantile=0.5), w)


def test_token_weights_are_detached():
    views, mask = _two_views()
    views = views.requires_grad_(True)
    w = token_agreement_weights(views, mask)
    assert not w.requires_grad and w.grad_fn is None


def test_unknown_statistic_raises():
    views, mask = _two_views()
    with pytest.raises(ValueError, match="statistic"):
        token_agreement_weights(views, mask, statistic="std")


def test_sequence_weights_one_when_views_agree():
    x = _logits(3, 4, seed=31).float()
    w = sequence_agreement_weights(torch.stack([x, x, x]), torch.ones(3, 4), gamma=100.0)
    assert torch.equal(w, torch.ones(3))


def test_sequence_weights_hand_computed():
    # seq 0: view means -1 and -3 -> Δ_var = 1, Δ_range = 2; seq 1: only token 0 is real, equal in both views
    view0 = torch.tensor([[-1.0, -1.0], [-2.0, -100.0]])
    view1 = torch.tensor([[-3.0, -3.0], [-2.0, 50.0]])
    views, mask = torch.stack([view0, view1]), torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    assert_close(sequence_agreement_weights(views, mask, gamma=0.5), torch.tensor([math.exp(-0.5), 1.0]))
    assert_close(sequence_agreement_weights(views, mask, gamma=0.5, statistic="range"),
                 torch.tensor([math.exp(-1.0), 1.0]))
    w = sequence_agreement_weights(views.requires_grad_(True), mask, gamma=100.0, floor=1e-3)
    assert_close(w, torch.tensor([1e-3, 1.0]))  # exp(-100) is under the floor
    assert not w.requires_grad


# --- weighted mean --------------------------------------------------------------------------------

PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 99.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


def _sum_w_normalised(per_token, mask, w_B):
    """Reference defect 2: Σ m w ℓ / Σ m w per sequence; a sequence-level weight cancels out."""
    m_w = mask * w_B[:, None]
    return ((per_token * m_w).sum(-1) / m_w.sum(-1)).mean()


def test_weighted_token_mean_hand_value():
    # sequence means 2 and 4.5 (the padded 99 ignored) -> 3.25
    assert_close(weighted_token_mean(PER_TOKEN, MASK), torch.tensor(3.25))
    token_w = torch.tensor([[1.0, 0.5, 0.0], [2.0, 1.0, 7.0]])
    # (1 + 1 + 0) / 3 and (8 + 5) / 2 -> mean of 2/3 and 6.5
    assert_close(weighted_token_mean(PER_TOKEN, MASK, token_w), torch.tensor((2 / 3 + 6.5) / 2))


def test_sequence_weight_halves_contribution_and_does_not_cancel():
    w_B = torch.tensor([0.5, 1.0])
    assert_close(weighted_token_mean(PER_TOKEN, MASK, w_B), torch.tensor((0.5 * 2.0 + 4.5) / 2))
    # a Σw-normalised mean would ignore the weight entirely
    assert_close(_sum_w_normalised(PER_TOKEN, MASK, w_B), weighted_token_mean(PER_TOKEN, MASK))
    half_everywhere = weighted_token_mean(PER_TOKEN, MASK, torch.tensor([0.5, 0.5]))
    assert_close(half_everywhere, 0.5 * weighted_token_mean(PER_TOKEN, MASK))


def test_kept_signal_share_tells_where_the_weights_fall():
    assert kept_signal_share(PER_TOKEN, MASK, None) == 1.0
    # the same weight mean (0.5 over the 5 real tokens), put on the low or on the high divergences
    on_low = torch.tensor([[1.0, 1.0, 0.0], [0.5, 0.0, 0.0]])
    on_high = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.5, 9.0]])
    low, high = kept_signal_share(PER_TOKEN, MASK, on_low), kept_signal_share(PER_TOKEN, MASK, on_high)
    assert low == pytest.approx(((1 + 2) / 3 + 2 / 2) / 2 / 3.25)
    assert high == pytest.approx((3 / 3 + 7.5 / 2) / 2 / 3.25)
    assert low < 0.5 < high
    assert kept_signal_share(PER_TOKEN, torch.zeros_like(MASK), on_low) == 1.0  # nothing to keep or lose


def test_weighted_token_mean_all_masked_is_zero():
    out = weighted_token_mean(PER_TOKEN, torch.zeros_like(MASK), torch.tensor([0.5, 1.0]))
    assert torch.isfinite(out) and out.item() == 0.0


def test_sequences_without_tokens_are_skipped():
    per_token = torch.cat([PER_TOKEN, torch.tensor([[7.0, 7.0, 7.0]])])
    mask = torch.cat([MASK, torch.zeros(1, 3)])
    assert_close(weighted_token_mean(per_token, mask), torch.tensor(3.25))  # not (2 + 4.5 + 0) / 3


# --- contrastive and feature terms ----------------------------------------------------------------

def test_contrastive_margin_hand_value_and_gradient():
    student = torch.tensor([[-1.0, -2.0, -5.0]], requires_grad=True)
    pos = torch.tensor([[-0.5, -2.0, 0.0]], requires_grad=True)
    neg = torch.tensor([[-1.2, -4.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    # token 0: 0.5 + |-1 + 0.5| - |-1 + 1.2| = 0.8; token 1: 0.5 + 0 - 2 < 0 -> 0; token 2 masked
    loss = contrastive_margin_loss(student, pos, neg, mask, margin=0.5)
    assert_close(loss, torch.tensor(0.4))
    loss.backward()
    # d/dS token 0: sign(S - pos) - sign(S - neg) = -1 - 1 = -2, over 2 tokens -> -1
    assert_close(student.grad, torch.tensor([[-1.0, 0.0, 0.0]]))
    assert pos.grad is None and neg.grad is None


def test_contrastive_zero_when_student_much_closer_to_positive():
    student = torch.tensor([[-1.0, -2.0]])
    loss = contrastive_margin_loss(student, student + 0.01, student - 5.0, torch.ones(1, 2), margin=0.5)
    assert loss.item() == 0.0


def test_feature_matching_hand_value_mask_and_stopgrad():
    student = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [9.0, 9.0]]], requires_grad=True)
    teacher = torch.tensor([[[0.0, 0.0], [3.0, 2.0], [0.0, 0.0]]], requires_grad=True)
    # per-position MSE over H: 2.5, 2.0, (masked)
    loss = feature_matching_loss(student, teacher, torch.tensor([[1.0, 1.0, 0.0]]))
    assert_close(loss, torch.tensor(2.25))
    loss.backward()
    assert teacher.grad is None
    # d/dh_S = 2 (h_S - h_T) / H / n_tokens; zero at the masked position
    assert_close(student.grad, torch.tensor([[[0.5, 1.0], [0.0, 1.0], [0.0, 0.0]]]))
    assert_close(feature_matching_loss(student, teacher, torch.tensor([[1.0, 0.0, 0.0]])), torch.tensor(2.5))


# --- small helpers --------------------------------------------------------------------------------

def test_masked_mean_values_and_all_masked():
    values = torch.tensor([[1.0, 2.0, 100.0]])
    assert_close(masked_mean(values, torch.tensor([[1.0, 1.0, 0.0]])), torch.tensor(1.5))
    out = masked_mean(values, torch.zeros(1, 3))
    assert torch.isfinite(out) and out.item() == 0.0


def test_sampled_token_logps_hand_values():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]]))
    tokens = torch.tensor([[1, 2]])
    assert_close(sampled_token_logps(logits, tokens), torch.log(torch.tensor([[0.25, 0.8]])))
    # τ = 2 gives p ∝ sqrt(p): token 1 of (1/2, 1/4, 1/4) -> 0.5 / (sqrt(0.5) + 0.5 + 0.5)
    at_two = sampled_token_logps(logits, tokens, temperature=2.0)
    assert_close(at_two[0, 0], torch.tensor(math.log(0.5 / (math.sqrt(0.5) + 1.0))))


def test_token_entropy_hand_values():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [50.0, 0.0, 0.0, 0.0]]])
    assert_close(token_entropy(logits), torch.tensor([[math.log(4), 0.0]]), atol=1e-6, rtol=0)
    halves = torch.log(torch.tensor([[[0.5, 0.5, 1e-30]]]))
    assert_close(token_entropy(halves), torch.tensor([[math.log(2)]]), atol=1e-6, rtol=0)


def test_masked_nll_hand_value():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8], [0.9, 0.05, 0.05]]]))
    tokens = torch.tensor([[1, 2, 1]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert_close(masked_nll(logits, tokens, mask), torch.tensor(-(math.log(0.25) + math.log(0.8)) / 2))
