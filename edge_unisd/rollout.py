"""On-policy rollouts: the student (with its current adapter) completes each prompt.

Batched HF generate on left-padded prompts; returns completion ids and a mask that is 1 up to
and including the first EOS, so teacher and student score exactly the tokens the student wrote.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class Rollout:
    completion_ids: torch.Tensor  # (B, L) long, pad after EOS
    completion_mask: torch.Tensor  # (B, L) float, 1 on real completion tokens (EOS included)

    @property
    def num_tokens(self) -> int:
        return int(self.completion_mask.sum())


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists so every prompt ends at the same column. -> ids (B, P), attention mask (B, P)"""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(sequences), width), dtype=torch.long)
    for b, seq in enumerate(sequences):
        if len(seq):
            ids[b, width - len(seq):] = torch.tensor(list(seq), dtype=torch.long)
            attn[b, width - len(seq):] = 1
    return ids.to(device), attn.to(device)


def completion_mask_from_ids(completion_ids: torch.Tensor, eos_ids: Sequence[int]) -> torch.Tensor:
    """1 up to and including the first EOS in each row, 0 after it. (B, L) -> (B, L) float"""
    is_eos = torch.zeros_like(completion_ids, dtype=torch.bool)
    for e in eos_ids:
        is_eos |= completion_ids == e
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()  # EOS strictly before t
    return (eos_before == 0).float()


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends an assistant turn (generation config may list several)."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def warp_logits(logits_R_V: torch.Tensor, *, temperature: float, top_p: float = 1.0,
                banned: Sequence[int] = ()) -> torch.Tensor:
    """Next-token logits as HF generate's processors leave them: banned ids (EOS before
    min_new_tokens) at -inf, divided by the temperature, then top-p (HF's TopPLogitsWarper: the low
    tail whose cumulative mass is <= 1 - top_p at -inf; the most likely token always stays).
    (R, V) -> (R, V) float
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 to sample (0 means greedy), not {temperature}")
    logits_R_V = logits_R_V.float() / temperature  # a new tensor: the ban below writes in place
    if banned:
        logits_R_V.index_fill_(-1, torch.tensor(list(banned), device=logits_R_V.device), float("-inf"))
    if top_p < 1.0:
        sorted_R_V, order_R_V = logits_R_V.sort(-1)
        tail_R_V = sorted_R_V.softmax(-1).cumsum(-1) <= 1.0 - top_p
        tail_R_V[:, -1] = False
        logits_R_V = logits_R_V.masked_fill(tail_R_V.scatter(-1, order_R_V, tail_R_V), float("-inf"))
    return logits_R_V


def sample_next_tokens(logits_R_V: torch.Tensor, *, temperature: float, top_p: float = 1.0,
                       banned: Sequence[int] = (), generator: torch.Generator | None = None) -> torch.Tensor:
    """One next token per row, drawn from `warp_logits`' softmax (temperature 0: the best allowed id).
    Every row in one call: a backend that hands over all rows' logits at once samples a step in a few
    tensor ops. The draw inverts each row's cumulative distribution at one uniform number, as
    llama.cpp's sampler does (`torch.multinomial` draws an exponential variate per vocabulary entry:
    10 ms for 8 x 49k on 2 cores, longer than the decode step it follows). (R, V) float -> (R,) long
    """
    if temperature <= 0:
        return warp_logits(logits_R_V, temperature=1.0, banned=banned).argmax(-1)  # the ban, and nothing else
    weights_R_V = warp_logits(logits_R_V, temperature=temperature, top_p=top_p, banned=banned)
    weights_R_V = weights_R_V.sub_(weights_R_V.amax(-1, keepdim=True)).exp_()  # softmax up to its sum
    u_R = torch.rand(weights_R_V.shape[0], generator=generator, dtype=torch.float64, device=weights_R_V.device)
    return inverse_cdf_draw(weights_R_V, u_R)


def inverse_cdf_draw(weights_R_V: torch.Tensor, u_R: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """Per row, the first entry whose running sum of `weights` exceeds u * their total (u in [0, 1)):
    a draw from weights / total, never an entry of weight 0. Two levels, so no scan runs over the whole
    vocabulary: block sums (a vectorised reduction) find the block, a scan of that one block finds the
    entry; running sums in float64. (R, V) >= 0, (R,) -> (R,) long
    """
    rows, vocab = weights_R_V.shape
    block = min(block, vocab)
    pad = -vocab % block
    padded_R_V = torch.nn.functional.pad(weights_R_V, (0, pad)) if pad else weights_R_V
    blocks_R_N_K = padded_R_V.view(rows, -1, block)
    ends_R_N = blocks_R_N_K.sum(-1).double().cumsum(-1)  # 1024 terms in float32: rounding ~1e-6 of a block
    broken = ~(torch.isfinite(ends_R_N[:, -1]) & (ends_R_N[:, -1] > 0))
    if broken.any():  # HF's multinomial refuses these too: a NaN model or every token banned
        raise ValueError(f"rows {broken.nonzero().flatten().tolist()} have no finite, positive next-token mass "
                         "to sample from (NaN or infinite logits, or every token banned)")
    target_R_1 = (u_R.to(torch.float64) * ends_R_N[:, -1]).unsqueeze(-1)
    # the block holding the target; rounding can put a target at the very end: take the last non-empty block
    last_R = (ends_R_N < ends_R_N[:, -1:]).sum(-1)
    n_R = torch.minimum(torch.searchsorted(ends_R_N, target_R_1, right=True).squeeze(-1), last_R)
    before_R_1 = torch.where(n_R > 0, ends_R_N.gather(-1, (n_R - 1).clamp(min=0).unsqueeze(-1)).squeeze(-1),
                             0.0).unsqueeze(-1)
    chosen_R_K = blocks_R_N_K[torch.arange(rows, device=n_R.device), n_R]
    within_R_K = chosen_R_K.double().cumsum(-1)
    # last entry of weight > 0 in the block: the answer when rounding leaves the target past the block's sum
    last_k_R = block - 1 - (chosen_R_K > 0).flip(-1).int().argmax(-1)
    k_R = torch.searchsorted(within_R_K, target_R_1 - before_R_1, right=True).squeeze(-1)
    return n_R * block + torch.minimum(k_R, last_k_R)


@torch.no_grad()
def generate_completions(model, tokenizer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                         temperature: float = 0.7, top_p: float = 1.0, seed: int | None = None,
                         min_new_tokens: int = 0) -> Rollout:
    """Sample one completion per prompt from `model` as it is now (adapter on): on-policy data."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids_B_P, attn_B_P = left_pad(prompts, pad_id, device)
    eos = eos_token_ids(model, tokenizer)
    if seed is not None:
        torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    sample = temperature > 0
    out = model.generate(
        input_ids=ids_B_P, attention_mask=attn_B_P, max_new_tokens=max_new_tokens,
        min_new_tokens=min(min_new_tokens, max_new_tokens) or None,
        do_sample=sample, temperature=temperature if sample else None, top_p=top_p if sample else None,
        top_k=None, eos_token_id=eos, pad_token_id=pad_id,
    )
    model.train(was_training)
    completion_B_L = out[:, ids_B_P.shape[1]:]
    if completion_B_L.shape[1] == 0:  # nothing generated at all: keep one EOS so shapes stay valid
        completion_B_L = torch.full((len(prompts), 1), eos[0], dtype=torch.long, device=device)
    mask_B_L = completion_mask_from_ids(completion_B_L, eos)
    return Rollout(completion_B_L.masked_fill(mask_B_L == 0, pad_id), mask_B_L)


def pack_completions(texts_or_ids: Sequence[Sequence[int]], pad_id: int, eos_id: int,
                     device: torch.device | str = "cpu") -> Rollout:
    """Right-pad fixed completions (e.g. reference answers for SFT or eval), appending EOS. -> Rollout"""
    seqs = [list(s) + [eos_id] for s in texts_or_ids]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.float32)
    for b, s in enumerate(seqs):
        ids[b, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[b, :len(s)] = 1.0
    return Rollout(ids.to(device), mask.to(device))
