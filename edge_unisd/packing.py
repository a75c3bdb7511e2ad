"""Padding-free batches: every row's real tokens end to end in one (1, N) sequence.

Why: a batch of prompt + completion rows is left-padded to its longest prompt and carries every
position up to the longest completion, so the decoder spends as many FLOPs on a padding column as
on a token. Sampled completions stop at EOS (16 to 256 tokens in one batch is common) and prompts
differ by tens of tokens, so in a daemon's batch a third of the positions can be padding; even the
benchmark's batches of forced 64-token completions carry 3-22% (student prompts of 35-71 tokens).
Packed, the matmuls run over real tokens only; attention runs per row (edge_unisd.attention), and
RoPE positions restart at each row, so every row sees exactly what it saw padded.

These are the pure index builders; edge_unisd.scoring runs the decoder over them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PackedRows:
    input_ids: torch.Tensor  # (1, N) every row's prompt + completion[:-1], end to end
    position_ids: torch.Tensor  # (1, N) restarting at `position_offset` for each row
    bounds: tuple[tuple[int, int], ...]  # [start, end) of each packed row in the sequence
    gather_B_L: torch.Tensor  # (B, L) long: packed position whose output predicts completion[b, j]; N = none

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])


def completion_lengths(completion_mask: torch.Tensor) -> list[int] | None:
    """Real tokens per row when each row's mask is 1s then 0s (a rollout's shape), else None."""
    lengths = completion_mask.gt(0).sum(dim=1)
    columns = torch.arange(completion_mask.shape[1], device=completion_mask.device)
    if not torch.equal(completion_mask.gt(0), columns.unsqueeze(0) < lengths.unsqueeze(1)):
        return None
    return lengths.tolist()


def _packable_lengths(prompts: Sequence[Sequence[int]], completion_mask: torch.Tensor) -> list[int] | None:
    """Each row's real completion tokens, or None where the rows cannot be packed (a mask with holes, an
    empty prompt): the one rule `pack_completion_rows` and `packed_length` share."""
    lengths = completion_lengths(completion_mask)
    if lengths is None or any(len(p) == 0 for p in prompts):
        return None
    return lengths


def packed_length(prompts: Sequence[Sequence[int]], completion_mask: torch.Tensor) -> int | None:
    """N of the (1, N) sequence `pack_completion_rows` would build, without building it (None: it would not).

    The activation budget needs this count before the forward; packing the ids twice would be wasted work.
    """
    lengths = _packable_lengths(prompts, completion_mask)
    if lengths is None:
        return None
    return sum(len(prompt) + n - 1 for prompt, n in zip(prompts, lengths, strict=True) if n > 0)


def pack_completion_rows(prompts: Sequence[Sequence[int]], completion_ids: torch.Tensor,
                         completion_mask: torch.Tensor, position_offset: int = 0) -> PackedRows | None:
    """Pack each row's prompt and the completion tokens that predict its real completion tokens.

    Row b of n real completion tokens runs prompt_b + completion_b[:n-1]; its outputs at offsets
    len(prompt_b) - 1 + j predict completion_b[j] (the padded path's hidden[:, P-1+j]). A row with no
    real completion token is left out (its outputs are never read). None when a mask has holes or a
    prompt is empty: the caller then runs the padded batch.
    """
    lengths = _packable_lengths(prompts, completion_mask)
    if lengths is None:
        return None
    B, L = completion_ids.shape
    device = completion_ids.device
    completions = completion_ids.tolist()
    ids: list[int] = []
    positions: list[int] = []
    bounds: list[tuple[int, int]] = []
    gather = torch.empty(B, L, dtype=torch.long)
    heads: list[int] = []  # packed index of each row's first output, or -1
    for prompt, completion, n in zip(prompts, completions, lengths, strict=True):
        if n == 0:
            heads.append(-1)
            continue
        start = len(ids)
        row = list(prompt) + completion[:n - 1]
        ids.extend(row)
        positions.extend(range(position_offset, position_offset + len(row)))
        bounds.append((start, len(ids)))
        heads.append(start + len(prompt) - 1)
    N = len(ids)
    columns = torch.arange(L)
    for b, (head, n) in enumerate(zip(heads, lengths, strict=True)):
        gather[b] = torch.where(columns < n, head + columns, N) if head >= 0 else N
    return PackedRows(torch.tensor([ids], dtype=torch.long, device=device),
                      torch.tensor([positions], dtype=torch.long, device=device),
                      tuple(bounds), gather.to(device))


def unpack_rows(hidden_N_H: torch.Tensor, gather_B_L: torch.Tensor) -> torch.Tensor:
    """Packed outputs back to the padded layout, zeros where a row has no token. (N, H), (B, L) -> (B, L, H)

    Differentiable: the backward scatters each position's gradient to its packed row.
    """
    N, H = hidden_N_H.shape
    padded = torch.cat([hidden_N_H, hidden_N_H.new_zeros(1, H)])
    B, L = gather_B_L.shape
    return padded.index_select(0, gather_B_L.reshape(-1)).view(B, L, H)
