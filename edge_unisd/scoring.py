"""Forward passes and the chunked vocabulary path.

The decoder runs once per view and returns hidden states (B, T, H): small. Logits (B, T, V) are
never built whole, for student or teacher: the LM head, softmax, divergence and sampled-token
log-probs run over chunks of `chunk_tokens` rows. In training a chunk keeps only its gradient
w.r.t. the hidden states, taken in the forward pass (edge_unisd.vocab_grad), or, when the head is
trained, is recomputed in the backward pass (activation checkpointing) instead of being kept.
With V=49152 a full fp32 logits tensor for 8 x 356 positions is 560 MB, and the naive loss keeps
several of them. On the CPU's per-row attention path the decoder runs the rows packed end to end,
padding-free (edge_unisd.packing), and returns them in the padded (B, T, H) layout.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from edge_unisd.attention import NAME as PER_ROW_ATTENTION
from edge_unisd.attention import Segments
from edge_unisd.losses import (
    chunk_divergence,
    entropy_from_logps,
    log_softmax_at,
    pick_token_logps,
    sampled_token_logps,
)
from edge_unisd.packing import pack_completion_rows, packed_length, unpack_rows
from edge_unisd.rollout import Rollout, left_pad
from edge_unisd.vocab_grad import (
    VocabScratch,
    frozen_linear_head,
    fused_distill_chunk,
    fused_token_logps_chunk,
    uses_closed_form,
)


def causal_lm(model) -> torch.nn.Module:
    """The *ForCausalLM module under a PeftModel (LoRA layers are injected in place, so it runs them)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def lm_head_of(model) -> torch.nn.Module:
    return causal_lm(model).get_output_embeddings()


def decoder_of(model) -> torch.nn.Module:
    lm = causal_lm(model)
    return lm.get_decoder() if hasattr(lm, "get_decoder") else lm.model


def packs_rows(model) -> bool:
    """Whether `model` runs padding-free batches: its attention is edge_unisd's per-row CPU path."""
    lm = causal_lm(model)
    config = getattr(lm, "config", None)
    if getattr(config, "_attn_implementation", None) != PER_ROW_ATTENTION:
        return False
    return next(lm.parameters()).device.type == "cpu"


def forward_tokens(model, prompts: Sequence[Sequence[int]], rollout: Rollout, pack: bool | None = None) -> int:
    """Positions `completion_hidden` runs through the decoder for this batch: real tokens when packed."""
    B, L = rollout.completion_ids.shape
    if pack is not False and packs_rows(model):
        n = packed_length(prompts, rollout.completion_mask)
        if n is not None:
            return n
    return B * (max(map(len, prompts)) + L - 1)


def _packed_completion_hidden(model, prompts: Sequence[Sequence[int]], rollout: Rollout, *,
                              prefix=None, prefix_len: int = 0) -> torch.Tensor | None:
    """`completion_hidden` over a padding-free (1, N) batch (edge_unisd.packing); None if it cannot pack.

    With `prefix` (a batch-1 KV cache of `prefix_len` tokens) the prompts are the suffixes after it:
    every row attends to the prefix, which is read and never copied or extended.
    """
    packed = pack_completion_rows(prompts, rollout.completion_ids, rollout.completion_mask, prefix_len)
    if packed is None:
        return None
    B, L = rollout.completion_ids.shape
    if not packed.bounds:  # no row has a completion token: nothing is read
        lm = causal_lm(model)
        return torch.zeros(B, L, lm.config.hidden_size, dtype=next(lm.parameters()).dtype,
                           device=rollout.completion_ids.device)
    out = decoder_of(model)(input_ids=packed.input_ids, position_ids=packed.position_ids, attention_mask=None,
                            use_cache=False, segments=Segments(packed.bounds, prefix))
    return unpack_rows(out.last_hidden_state[0], packed.gather_B_L)


def completion_hidden(model, prompts: Sequence[Sequence[int]], rollout: Rollout, pad_id: int,
                      max_batch: int | None = None, pack: bool | None = None) -> torch.Tensor:
    """Final-norm hidden states at the positions that predict each completion token. -> (B, L, H)

    Prompts are left-padded so they all end at column P; hidden[:, P-1+j] predicts completion[j].
    Position ids come from the attention mask so padding never shifts RoPE positions. A model on
    the per-row attention path runs the rows packed instead, padding-free (edge_unisd.packing);
    positions with no completion token then hold zeros (every reader masks them out). `pack=False`
    forces the padded batch (for A/B benchmarks); None packs whenever the model can.
    Without gradient, `max_batch` runs the rows in sub-batches: teacher prompts carry long contexts
    and attention over them is the peak of a step's memory on CPU.
    """
    B = len(prompts)
    if max_batch and B > max_batch and not torch.is_grad_enabled():
        parts = [completion_hidden(model, prompts[i:i + max_batch],
                                   Rollout(rollout.completion_ids[i:i + max_batch],
                                           rollout.completion_mask[i:i + max_batch]), pad_id, pack=pack)
                 for i in range(0, B, max_batch)]
        return torch.cat(parts, dim=0)
    if pack is not False and packs_rows(model):
        hidden = _packed_completion_hidden(model, prompts, rollout)
        if hidden is not None:
            return hidden
    device = rollout.completion_ids.device
    prompt_B_P, prompt_attn_B_P = left_pad(prompts, pad_id, device)
    P, L = prompt_B_P.shape[1], rollout.completion_ids.shape[1]
    input_ids = torch.cat([prompt_B_P, rollout.completion_ids[:, :-1]], dim=1)  # last token predicts nothing
    attn = torch.cat([prompt_attn_B_P, rollout.completion_mask[:, :-1].long()], dim=1)
    position_ids = (attn.cumsum(-1) - 1).clamp_min(0)
    out = decoder_of(model)(input_ids=input_ids, attention_mask=attn, position_ids=position_ids, use_cache=False)
    return out.last_hidden_state[:, P - 1:P - 1 + L]  # (B, L, H)


@dataclass
class DistillTerms:
    divergence: torch.Tensor  # (B, L) ℓ_t, differentiable w.r.t. the student hidden states
    student_logps: torch.Tensor  # (B, L) log p_S(y_t), τ=1, differentiable
    teacher_logps: torch.Tensor  # (B, L) log p_T(y_t), τ=1
    student_entropy: torch.Tensor  # (B, L) entropy of p_S, τ=1, detached


def _chunk_terms(s_h: torch.Tensor, t_h: torch.Tensor, tokens: torch.Tensor, head: torch.nn.Module,
                 kind: str, beta: float, temperature: float) -> tuple[torch.Tensor, ...]:
    """One chunk's terms from one log-softmax per side (plus one per side at τ != 1 for the divergence):
    over the full vocabulary these passes, not the head matmul, are what the chunk costs."""
    s_logits = head(s_h)  # (B, c, V)
    with torch.no_grad():
        t_logits = head(t_h)  # (B, c, V)
        t_logp = log_softmax_at(t_logits)
    s_logp = log_softmax_at(s_logits)
    div = chunk_divergence(s_logits, t_logits, s_logp, t_logp, kind=kind, beta=beta, temperature=temperature)
    with torch.no_grad():
        t_tok = pick_token_logps(t_logp, tokens)
        ent = entropy_from_logps(s_logp.detach())
    return div, pick_token_logps(s_logp, tokens), t_tok, ent


def _positions_per_chunk(batch: int, chunk_tokens: int) -> int:
    return max(1, chunk_tokens // max(1, batch))


def chunked_distill_terms(student_h: torch.Tensor, teacher_h: torch.Tensor, head: torch.nn.Module,
                          tokens: torch.Tensor, *, kind: str = "fkl", beta: float = 0.5,
                          temperature: float = 1.0, chunk_tokens: int = 128, logps_grad: bool = True
                          ) -> DistillTerms:
    """Per-token divergence and sampled-token log-probs, chunk by chunk over positions. (B,L,H) x2 -> (B,L)

    In training with a frozen linear head each chunk's gradient is taken in the forward pass
    (edge_unisd.vocab_grad); `logps_grad=False` says nothing will differentiate `student_logps`,
    which saves a pass. Otherwise each chunk is checkpointed and recomputed in backward.
    """
    B, L, H = student_h.shape
    train = torch.is_grad_enabled() and student_h.requires_grad
    if train and frozen_linear_head(head):
        # flattened rows: contiguous chunks keep the head on one plain matmul
        s_N_H, t_N_H = student_h.reshape(B * L, H), teacher_h.detach().reshape(B * L, H)
        tokens_N = tokens.reshape(B * L)
        scratch = (VocabScratch(head.weight.shape[0], min(chunk_tokens, B * L), student_h.device)
                   if uses_closed_form(kind, temperature) else None)  # one set of (V, chunk) buffers per call
        parts = [fused_distill_chunk(s_N_H[i:i + chunk_tokens], t_N_H[i:i + chunk_tokens],
                                     tokens_N[i:i + chunk_tokens], head, kind=kind, beta=beta,
                                     temperature=temperature, logps_grad=logps_grad, scratch=scratch)
                 for i in range(0, B * L, chunk_tokens)]
        div, s_logp, t_logp, ent = (torch.cat([p[i] for p in parts]).view(B, L) for i in range(4))
        return DistillTerms(div, s_logp, t_logp, ent)
    step = _positions_per_chunk(B, chunk_tokens)
    parts = []
    for start in range(0, L, step):
        args = (student_h[:, start:start + step], teacher_h[:, start:start + step].detach(),
                tokens[:, start:start + step], head, kind, beta, temperature)
        parts.append(checkpoint(_chunk_terms, *args, use_reentrant=False) if train else _chunk_terms(*args))
    div, s_logp, t_logp, ent = (torch.cat([p[i] for p in parts], dim=1) for i in range(4))
    return DistillTerms(div, s_logp, t_logp.detach(), ent.detach())


def _chunk_logps(h: torch.Tensor, tokens: torch.Tensor, head: torch.nn.Module, temperature: float) -> torch.Tensor:
    return sampled_token_logps(head(h), tokens, temperature)


def chunked_token_logps(hidden: torch.Tensor, head: torch.nn.Module, tokens: torch.Tensor, *,
                        temperature: float = 1.0, chunk_tokens: int = 128) -> torch.Tensor:
    """log p(y_t) from hidden states, chunked (differentiable when `hidden` is). (B,L,H),(B,L) -> (B,L)"""
    B, L, H = hidden.shape
    train = torch.is_grad_enabled() and hidden.requires_grad
    if train and frozen_linear_head(head):
        h_N_H, tokens_N = hidden.reshape(B * L, H), tokens.reshape(B * L)
        parts = [fused_token_logps_chunk(h_N_H[i:i + chunk_tokens], tokens_N[i:i + chunk_tokens], head, temperature)
                 for i in range(0, B * L, chunk_tokens)]
        return torch.cat(parts).view(B, L)
    step = _positions_per_chunk(B, chunk_tokens)
    parts = []
    for start in range(0, L, step):
        args = (hidden[:, start:start + step], tokens[:, start:start + step], head, temperature)
        parts.append(checkpoint(_chunk_logps, *args, use_reentrant=False) if train else _chunk_logps(*args))
    return torch.cat(parts, dim=1)


@torch.no_grad()
def view_token_logps(model, view_prompts_K: Sequence[Sequence[Sequence[int]]], rollout: Rollout, pad_id: int,
                     chunk_tokens: int = 128, max_batch: int | None = None) -> torch.Tensor:
    """log p(y_t | c_k, x, y<t) for K views, all K batched into one forward, τ=1, no grad. -> (K, B, L)"""
    K, B = len(view_prompts_K), rollout.completion_ids.shape[0]
    flat_prompts = [p for view in view_prompts_K for p in view]
    stacked = Rollout(rollout.completion_ids.repeat(K, 1), rollout.completion_mask.repeat(K, 1))
    h_KB_L_H = completion_hidden(model, flat_prompts, stacked, pad_id, max_batch)
    logps_KB_L = chunked_token_logps(h_KB_L_H, lm_head_of(model), stacked.completion_ids, chunk_tokens=chunk_tokens)
    return logps_KB_L.view(K, B, -1)


def common_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix shared by every prompt."""
    first, n = prompts[0], min(len(p) for p in prompts)
    for i in range(n):
        tok = first[i]
        if any(p[i] != tok for p in prompts):
            return i
    return n


def shared_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
    """Leading tokens every prompt shares, short of each one's last token (whose output its row needs)."""
    return min(common_prefix_length(prompts), min(len(p) for p in prompts) - 1)


def prefix_group(prompts: Sequence[Sequence[int]], min_prefix: int) -> list[int]:
    """Rows of the largest group whose prompts share at least `min_prefix` tokens (each prompt keeping at
    least one token of its own), in order. One odd prompt must not cost the whole batch its shared prefix."""
    best: list[int] = []
    for anchor in range(len(prompts)):
        rows = [i for i in range(len(prompts))
                if min(common_prefix_length([prompts[anchor], prompts[i]]), len(prompts[i]) - 1,
                       len(prompts[anchor]) - 1) >= min_prefix]
        if len(rows) > len(best):
            best = rows
        if len(best) == len(prompts):
            break
    return best


def _prefix_cache(model, prefix: Sequence[int], device: torch.device, memo: dict | None):
    """KV cache of the shared prefix (batch 1); reused from `memo` when the weights cannot have changed."""
    key = tuple(prefix)
    if memo is not None and memo.get("key") == key:
        return memo["cache"]
    ids = torch.tensor([list(prefix)], device=device)
    out = decoder_of(model)(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
    if memo is not None:
        memo.clear()
        memo.update(key=key, cache=out.past_key_values)
    return out.past_key_values


@torch.no_grad()
def completion_hidden_shared_prefix(model, prompts: Sequence[Sequence[int]], rollout: Rollout, pad_id: int,
                                    max_batch: int | None = None, min_prefix: int = 64,
                                    memo: dict | None = None, pack: bool | None = None) -> torch.Tensor:
    """`completion_hidden` for no-grad teacher forwards whose prompts share a long prefix. -> (B, L, H)

    Teacher prompts all start with the same system prompt and user profile (hundreds of tokens)
    and differ only after it. The prefix is run once (batch 1) and its KV cache shared, so each
    row only pays for its own suffix + completion. Pass `memo` (a dict) to keep the prefix cache
    across calls while the weights are fixed (the base teacher); never for a moving teacher.
    `pack` as for `completion_hidden`.
    """
    B = len(prompts)
    group = prefix_group(prompts, min_prefix) if B >= 2 else []
    if len(group) < 2:
        return completion_hidden(model, prompts, rollout, pad_id, max_batch, pack=pack)
    if len(group) < B:  # e.g. an item with its own system message: it runs whole, the others share
        others = [i for i in range(B) if i not in set(group)]
        parts = {}
        for rows in (group, others):
            sub = Rollout(rollout.completion_ids[rows], rollout.completion_mask[rows])
            fn = completion_hidden_shared_prefix if rows is group else completion_hidden
            kw = {"min_prefix": min_prefix, "memo": memo} if rows is group else {}
            hidden = fn(model, [prompts[i] for i in rows], sub, pad_id, max_batch, pack=pack, **kw)
            parts.update({i: hidden[j] for j, i in enumerate(rows)})
        return torch.stack([parts[i] for i in range(B)])
    shared = shared_prefix_length(prompts)
    device = rollout.completion_ids.device
    prefix_kv = _prefix_cache(model, prompts[0][:shared], device, memo)
    step = max_batch or B
    packed = pack is not False and packs_rows(model)
    parts = []
    for i in range(0, B, step):
        rows = slice(i, i + step)
        suffixes = [p[shared:] for p in prompts[rows]]
        completion, completion_mask = rollout.completion_ids[rows], rollout.completion_mask[rows]
        hidden = (_packed_completion_hidden(model, suffixes, Rollout(completion, completion_mask), prefix=prefix_kv,
                                            prefix_len=shared) if packed else None)
        if hidden is not None:
            parts.append(hidden)
            continue
        b = len(suffixes)
        suffix_b_S, suffix_attn_b_S = left_pad(suffixes, pad_id, device)
        S = suffix_b_S.shape[1]
        input_ids = torch.cat([suffix_b_S, completion[:, :-1]], dim=1)
        attn = torch.cat([torch.ones(b, shared, dtype=torch.long, device=device), suffix_attn_b_S,
                          completion_mask[:, :-1].long()], dim=1)  # (b, shared + S + L - 1)
        position_ids = (attn.cumsum(-1) - 1).clamp_min(0)[:, shared:]
        kv = copy.deepcopy(prefix_kv)
        kv.batch_repeat_interleave(b)
        out = decoder_of(model)(input_ids=input_ids, attention_mask=attn, position_ids=position_ids,
                                past_key_values=kv, use_cache=True)
        L = completion.shape[1]
        parts.append(out.last_hidden_state[:, S - 1:S - 1 + L])
    return torch.cat(parts, dim=0)
