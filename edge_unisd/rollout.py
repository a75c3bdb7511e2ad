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
