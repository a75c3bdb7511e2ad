"""UniSD loss terms as pure tensor functions (METHOD.md): no model, no config object, no I/O.

Glossary of shapes: B sequences, T completion positions, V vocabulary, K auxiliary views, H hidden size.
`mask` is (B, T), 1 on real completion tokens. Everything is computed in fp32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DIVERGENCE_KINDS = ("fkl", "rkl", "jsd")
AGREEMENT_STATISTICS = ("var", "range")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over positions where `mask` is set; 0 (not NaN) when nothing is."""
    keep = mask.bool()
    return torch.where(keep, values, torch.zeros_like(values)).sum() / keep.sum().clamp_min(1)


def _kl_from_logps(logp_a: torch.Tensor, logp_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) summed over the last axis, from log-probabilities. (..., V) -> (...)"""
    return (logp_a.exp() * (logp_a - logp_b)).sum(-1)


def token_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = "fkl",
                     beta: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """Vocab-summed per-token divergence D(p_T || p_S) at temperature τ. (B, T, V) x2 -> (B, T)

    fkl: KL(p_T || p_S); rkl: KL(p_S || p_T); jsd: β KL(p_T || m) + (1-β) KL(p_S || m) with
    m = β p_T + (1-β) p_S. As TRL's `generalized_jsd_loss`, jsd with β=0 is forward KL and β=1 is
    reverse KL (the limits of the *mixture*, not of the weighted sum).
    """
    s_logp = log_softmax_at(student_logits, temperature)  # (B, T, V)
    t_logp = log_softmax_at(teacher_logits.detach(), temperature)  # (B, T, V), a target only
    return divergence_from_logps(s_logp, t_logp, kind, beta)


def log_softmax_at(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / τ) in fp32; at τ = 1 without the copy a division would make. (..., V)"""
    logits = logits.float()
    return F.log_softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)


def divergence_from_logps(s_logp: torch.Tensor, t_logp: torch.Tensor, kind: str = "fkl",
                          beta: float = 0.5) -> torch.Tensor:
    """`token_divergence` from log-probabilities already computed (one log-softmax per side serves
    the divergence, the sampled-token log-probs and the entropy). (B, T, V) x2 -> (B, T)"""
    if kind not in DIVERGENCE_KINDS:
        raise ValueError(f"unknown divergence kind {kind!r}; use one of {DIVERGENCE_KINDS}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    t_logp = t_logp.detach()
    if kind == "fkl" or (kind == "jsd" and beta == 0.0):
        return _kl_from_logps(t_logp, s_logp)
    if kind == "rkl" or (kind == "jsd" and beta == 1.0):
        return _kl_from_logps(s_logp, t_logp)
    m_logp = torch.logsumexp(torch.stack([t_logp + math.log(beta), s_logp + math.log(1.0 - beta)]), dim=0)
    return beta * _kl_from_logps(t_logp, m_logp) + (1.0 - beta) * _kl_from_logps(s_logp, m_logp)


def chunk_divergence(s_logits: torch.Tensor, t_logits: torch.Tensor, s_logp: torch.Tensor, t_logp: torch.Tensor,
                     kind: str = "fkl", beta: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """`token_divergence` where the τ=1 log-softmaxes are already made (for the sampled-token log-probs
    and the entropy): at τ = 1 they serve the divergence too, otherwise it softens the logits itself."""
    if temperature == 1.0:
        return divergence_from_logps(s_logp, t_logp, kind=kind, beta=beta)
    return token_divergence(s_logits, t_logits, kind=kind, beta=beta, temperature=temperature)


def clip_cap(div: torch.Tensor, mask: torch.Tensor, cap: float | None = None,
             quantile: float | None = None) -> float | None:
    """The effective cap: the static `cap`, the `quantile` of the masked divergences, or the smaller."""
    caps = [] if cap is None else [float(cap)]
    if quantile is not None:
        selected = div.detach()[mask.bool()].float()
        if selected.numel() > 0:
            caps.append(float(torch.quantile(selected, quantile)))
    return min(caps) if caps else None


def clip_divergence(div: torch.Tensor, mask: torch.Tensor, cap: float | None = None,
                    quantile: float | None = None) -> torch.Tensor:
    """ℓ_t ← min(ℓ_t, C): static cap C and/or a per-batch quantile cap (METHOD.md, divergence clipping).

    The cap is a constant (no gradient through the quantile); clipped tokens pass no gradient.
    """
    c = clip_cap(div, mask, cap, quantile)
    return div if c is None else div.clamp(max=c)


def _across_views(view_logps: torch.Tensor, statistic: str) -> torch.Tensor:
    """Disagreement of the K views per position: population variance or range. (K, ...) -> (...)"""
    if statistic == "var":
        return view_logps.float().var(dim=0, unbiased=False)
    if statistic == "range":
        return view_logps.float().amax(0) - view_logps.float().amin(0)
    raise ValueError(f"unknown agreement statistic {statistic!r}; use one of {AGREEMENT_STATISTICS}")


def token_agreement_weights(view_logps: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                            statistic: str = "var", quantile: float = 0.95, cap: float = 10.0,
                            floor: float = 0.01) -> torch.Tensor:
    """w_t = max(floor, 1 / (1 + γ δ̃_t)), δ̃_t = min(δ_t / q_0.95(δ), cap). (K, B, T) -> (B, T)

    δ_t is the spread of log p(y_t | c_k, x, y<t) over the K views. Padding positions get weight 1.
    """
    delta_B_T = _across_views(view_logps, statistic)
    selected = delta_B_T[mask.bool()]
    scale = torch.quantile(selected, quantile) if selected.numel() else delta_B_T.new_tensor(0.0)
    delta_norm = (delta_B_T / scale.clamp_min(1e-12)).clamp(max=cap)
    weights = (1.0 / (1.0 + gamma * delta_norm)).clamp_min(floor)
    return torch.where(mask.bool(), weights, torch.ones_like(weights)).detach()


def sequence_agreement_weights(view_logps: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                               statistic: str = "var", floor: float = 1e-6) -> torch.Tensor:
    """w = max(floor, exp(-γ Δ)), Δ the spread over views of each view's mean token log-prob. (K,B,T) -> (B,)"""
    keep = mask.bool()
    masked_K_B_T = torch.where(keep, view_logps.float(), torch.zeros_like(view_logps, dtype=torch.float32))
    seq_logps_K_B = masked_K_B_T.sum(-1) / keep.sum(-1).clamp_min(1)
    delta_B = _across_views(seq_logps_K_B, statistic)
    return torch.exp(-gamma * delta_B).clamp_min(floor).detach()


def weighted_token_mean(per_token: torch.Tensor, mask: torch.Tensor,
                        weights: torch.Tensor | None = None) -> torch.Tensor:
    """mean over sequences of Σ_t m w ℓ / Σ_t m. Weights (B,T) or (B,) broadcast over T.

    Normalised by the token count, not by Σw: a sequence-level weight must scale that sequence's
    contribution (reference defect 2 divides it out again). Sequences without tokens are skipped.
    """
    keep = mask.bool()
    weighted = per_token
    if weights is not None:
        w = weights.to(per_token.dtype)
        weighted = per_token * (w[:, None] if w.dim() == 1 else w)
    counts_B = keep.sum(-1)
    per_seq_B = torch.where(keep, weighted, torch.zeros_like(weighted)).sum(-1) / counts_B.clamp_min(1)
    has_tokens = counts_B > 0
    return (per_seq_B * has_tokens).sum() / has_tokens.sum().clamp_min(1)


def kept_signal_share(per_token: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor | None) -> float:
    """How much of the distillation signal the reliability weights keep: weighted / unweighted token mean.

    1.0 without weights. Near the weight mean when the weights ignore ℓ_t; far below it when they fall on
    the tokens where the teacher has most to teach (high ℓ_t), which is what slows a short run's learning.
    """
    if weights is None:
        return 1.0
    plain = weighted_token_mean(per_token, mask)
    if float(plain) <= 0.0:
        return 1.0
    return float(weighted_token_mean(per_token, mask, weights) / plain)


def contrastive_margin_loss(student_logps: torch.Tensor, pos_logps: torch.Tensor, neg_logps: torch.Tensor,
                            mask: torch.Tensor, margin: float = 0.5) -> torch.Tensor:
    """masked mean of relu(margin + |log p_S - log p_T+| - |log p_S - log p_T-|) on sampled tokens. (B,T)x3 -> ()"""
    pos = (student_logps.float() - pos_logps.float().detach()).abs()
    neg = (student_logps.float() - neg_logps.float().detach()).abs()
    return masked_mean(F.relu(margin + pos - neg), mask)


def feature_matching_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                          mask: torch.Tensor) -> torch.Tensor:
    """masked mean over positions of MSE(h_S, stopgrad(h_T)) (mean over H). (B,T,H) x2 -> ()"""
    mse_B_T = (student_hidden.float() - teacher_hidden.float().detach()).pow(2).mean(-1)
    return masked_mean(mse_B_T, mask)


def sampled_token_logps(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(y_t) of the given tokens under softmax(logits / τ). (B,T,V), (B,T) -> (B,T)"""
    return pick_token_logps(log_softmax_at(logits, temperature), tokens)


def pick_token_logps(logp: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(y_t) read from full log-probabilities. (B,T,V), (B,T) -> (B,T)"""
    return logp.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / τ) per position: the student's own uncertainty. (B,T,V) -> (B,T)"""
    return entropy_from_logps(log_softmax_at(logits, temperature))


def entropy_from_logps(logp: torch.Tensor) -> torch.Tensor:
    """Entropy per position from full log-probabilities. (..., V) -> (...)"""
    return -(logp.exp() * logp).sum(-1)


def masked_nll(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-mean negative log-likelihood: the SFT loss and the fit metric. (B,T,V),(B,T),(B,T) -> ()"""
    return masked_mean(-sampled_token_logps(logits, tokens), mask)
