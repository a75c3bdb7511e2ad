"""Vocabulary-side terms whose gradient w.r.t. the hidden states is taken in the forward pass.

Why: every per-token term here (divergence ℓ_t, log p_S(y_t)) depends on its own position's hidden
state h_t only, through logits z_t = W h_t (+ b) with a frozen head. So dℓ_t/dh_t = (∂ℓ_t/∂z_t) W is
a vector of size H, known as soon as the forward pass has the logits. Keeping that (rows, H) vector
replaces what checkpointing a chunk costs in backward: re-running both heads' matmuls, both
log-softmaxes and the teacher's terms, then the autograd graph over (rows, V). In backward the
incoming per-token gradient g_t only scales it: dL/dh_t = g_t · dℓ_t/dh_t. Exact for any loss
built from these per-token values afterwards (clipping, weights, means), as the chain rule says.

Forward KL at τ = 1 (every preset's divergence) uses its closed form, ∂ℓ/∂z = p_S − p_T and
∂log p_S(y)/∂z = onehot(y) − p_S, in a few in-place passes over the (rows, V) buffers. Every other
kind and temperature takes ∂ℓ_t/∂z_t from autograd on the chunk's own logits, so all of
`edge_unisd.losses` is covered with no further hand-derived formula.
Rows are a flattened, contiguous (B·L) axis: a (B, c, H) slice of positions would be strided and
push the head's matmul onto a slow batched path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edge_unisd.losses import (
    chunk_divergence,
    entropy_from_logps,
    log_softmax_at,
    pick_token_logps,
)


def frozen_linear_head(head: torch.nn.Module) -> bool:
    """The fast path needs z = W h + b with nothing of the head trained (a LoRA on lm_head is not)."""
    if type(head) is not torch.nn.Linear:
        return False
    return not head.weight.requires_grad and (head.bias is None or not head.bias.requires_grad)


class _RowwiseForwardGrad(torch.autograd.Function):
    """Outputs values_i (N,) with d values_i[n] / d h[n] = dirs_i[n] (N, H), already computed."""

    @staticmethod
    def forward(ctx, h_N_H: torch.Tensor, n_dirs: int, *dirs_and_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.save_for_backward(*dirs_and_values[:n_dirs])
        ctx.h_dtype = h_N_H.dtype
        return tuple(v.clone() for v in dirs_and_values[n_dirs:])

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None):
        grad_h = None
        for g_N, dir_N_H in zip(grads, ctx.saved_tensors, strict=True):
            if g_N is not None:
                part = g_N.to(dir_N_H.dtype)[:, None] * dir_N_H
                grad_h = part if grad_h is None else grad_h + part
        n_inputs = len(ctx.saved_tensors) + len(grads)
        return (None if grad_h is None else grad_h.to(ctx.h_dtype)), None, *([None] * n_inputs)


def with_forward_grads(h_N_H: torch.Tensor, values: list[torch.Tensor], dirs: list[torch.Tensor]) -> list[torch.Tensor]:
    """`values` made differentiable w.r.t. `h_N_H` through the given per-row gradients."""
    return list(_RowwiseForwardGrad.apply(h_N_H, len(dirs), *dirs, *values))


def _rowdot(a_N_V: torch.Tensor, b_N_V: torch.Tensor) -> torch.Tensor:
    """Σ_v a b per row without an (N, V) temporary (a batched matrix product). -> (N,)"""
    return torch.bmm(a_N_V.unsqueeze(1), b_N_V.unsqueeze(2)).view(-1)


def _grad_rows(dz_N_V: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return dz_N_V.to(weight.dtype) @ weight  # (N, V) @ (V, H)


def _token_logp_rows(p_N_V: torch.Tensor, tokens_N: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """d log p(y)/dh per row: ∂/∂z = onehot(y) − p, times W, i.e. W[y] − p W. -> (N, H)"""
    return F.embedding(tokens_N, weight) - _grad_rows(p_N_V, weight)


def _fkl_chunk(s_logp_N_V: torch.Tensor, t_logp_N_V: torch.Tensor, tokens_N: torch.Tensor, weight: torch.Tensor,
               logps_grad: bool) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """KL(p_T || p_S) at τ=1 in closed form; consumes (overwrites) `t_logp_N_V`."""
    s_tok, t_tok = pick_token_logps(s_logp_N_V, tokens_N), pick_token_logps(t_logp_N_V, tokens_N)
    p_t_N_V, p_s_N_V = t_logp_N_V.exp(), s_logp_N_V.exp()
    entropy = -_rowdot(p_s_N_V, s_logp_N_V)
    div = _rowdot(p_t_N_V, t_logp_N_V.sub_(s_logp_N_V))  # Σ p_T (log p_T − log p_S)
    dir_tok = _token_logp_rows(p_s_N_V, tokens_N, weight) if logps_grad else None  # before p_S is overwritten
    dirs = [_grad_rows(p_s_N_V.sub_(p_t_N_V), weight)]  # ∂ℓ/∂z = p_S − p_T
    if dir_tok is not None:
        dirs.append(dir_tok)
    return [div, s_tok], dirs, t_tok, entropy


def _autograd_chunk(z_N_V: torch.Tensor, t_logits_N_V: torch.Tensor, t_logp_N_V: torch.Tensor,
                    tokens_N: torch.Tensor, weight: torch.Tensor, *, kind: str, beta: float, temperature: float,
                    logps_grad: bool) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Any divergence kind and τ: ∂ value/∂z from autograd on this chunk's logits alone."""
    z_N_V = z_N_V.detach().requires_grad_(True)
    with torch.enable_grad():
        s_logp_N_V = log_softmax_at(z_N_V)
        div = chunk_divergence(z_N_V, t_logits_N_V, s_logp_N_V, t_logp_N_V, kind=kind, beta=beta,
                               temperature=temperature)
        s_tok = pick_token_logps(s_logp_N_V, tokens_N)
        wanted = [div, s_tok] if logps_grad else [div]
        dirs = []
        for i, value in enumerate(wanted):
            (dz_N_V,) = torch.autograd.grad(value.sum(), z_N_V, retain_graph=i + 1 < len(wanted))
            dirs.append(_grad_rows(dz_N_V, weight))
            del dz_N_V
    with torch.no_grad():
        entropy = entropy_from_logps(s_logp_N_V.detach())
        t_tok = pick_token_logps(t_logp_N_V, tokens_N)
    return [div.detach(), s_tok.detach()], dirs, t_tok, entropy


def fused_distill_chunk(s_h_N_H: torch.Tensor, t_h_N_H: torch.Tensor, tokens_N: torch.Tensor,
                        head: torch.nn.Linear, *, kind: str, beta: float, temperature: float,
                        logps_grad: bool = True) -> tuple[torch.Tensor, ...]:
    """(divergence, log p_S(y), log p_T(y), student entropy), each (N,), for N contiguous rows.

    Differentiable w.r.t. `s_h_N_H` in the divergence and, if `logps_grad`, in log p_S(y) (the
    contrastive term needs it; plain distillation does not, and skips a matmul and a pass).
    """
    weight, bias = head.weight, head.bias
    with torch.no_grad():
        t_logits_N_V = F.linear(t_h_N_H, weight, bias)
        t_logp_N_V = log_softmax_at(t_logits_N_V)
    if kind == "fkl" and temperature == 1.0:
        del t_logits_N_V
        with torch.no_grad():  # the student's logits are not kept: only their log-softmax is needed
            s_logp_N_V = log_softmax_at(F.linear(s_h_N_H.detach(), weight, bias))
            values, dirs, t_tok, entropy = _fkl_chunk(s_logp_N_V, t_logp_N_V, tokens_N, weight, logps_grad)
    else:
        z_N_V = F.linear(s_h_N_H.detach(), weight, bias)
        values, dirs, t_tok, entropy = _autograd_chunk(z_N_V, t_logits_N_V, t_logp_N_V, tokens_N, weight, kind=kind,
                                                       beta=beta, temperature=temperature, logps_grad=logps_grad)
    div, s_tok = values
    if logps_grad:
        div, s_tok = with_forward_grads(s_h_N_H, [div, s_tok], dirs)
    else:
        (div,) = with_forward_grads(s_h_N_H, [div], dirs)
    return div, s_tok, t_tok, entropy


def fused_token_logps_chunk(h_N_H: torch.Tensor, tokens_N: torch.Tensor, head: torch.nn.Linear,
                            temperature: float = 1.0) -> torch.Tensor:
    """log p(y) at τ for N contiguous rows, differentiable w.r.t. `h_N_H` (the SFT loss). -> (N,)

    ∂ log p(y)/∂z = (onehot(y) − softmax(z/τ)) / τ, so the row gradient is (W[y] − p W) / τ.
    """
    weight = head.weight
    with torch.no_grad():
        logp_N_V = log_softmax_at(F.linear(h_N_H, weight, head.bias), temperature)
        logps = pick_token_logps(logp_N_V, tokens_N)
        dir_N_H = _token_logp_rows(logp_N_V.exp_(), tokens_N, weight) / temperature
        del logp_N_V
    (logps,) = with_forward_grads(h_N_H, [logps], [dir_N_H])
    return logps
