"""Prompts for the student and every teacher view, rendered with the model's own chat template.

One function, `render_prompt`, renders them all: a view's context is placed as a block before the
last user message, so student and teacher prompts differ only by that context (no system-prompt
swap, which some templates would turn into a different default preamble).

Views (METHOD.md): primary c_0 (profile, item context, reference answer), auxiliary c_1..c_K
without the item's own reference (retrieval: nearest past items; random: other past items;
induced: a guideline from the profile), and the negative c⁻ (a rejected answer shown as a model).
Everything is deterministic given the seed.
"""

from __future__ import annotations

import math
import random
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from edge_unisd.items import Item


def render_prompt(tokenizer, messages: Sequence[dict[str, str]], context: str | None = None) -> list[int]:
    """Token ids of the chat prompt ending in the assistant turn's opening, with `context` injected."""
    msgs = [dict(m) for m in messages]
    if context:
        last_user = max(i for i, m in enumerate(msgs) if m["role"] == "user")
        msgs[last_user]["content"] = f"{context.strip()}\n\n---\n\n{msgs[last_user]['content']}"
    ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # transformers 5 may return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def _solved_example(item: Item) -> str:
    return f"Q: {item.prompt_text.strip()}\nA: {(item.reference or '').strip()}"


def primary_context(item: Item, profile: str | None) -> str | None:
    """c_0: what the student never sees: the user's notes, the item's documents, its reference answer."""
    parts = []
    if profile and profile.strip():
        parts.append(f"Notes about the user you are assisting:\n{profile.strip()}")
    if item.context and item.context.strip():
        parts.append(f"Relevant material:\n{item.context.strip()}")
    if item.reference and item.reference.strip():
        parts.append(f"A good answer to this request would be:\n{item.reference.strip()}")
    return "\n\n".join(parts) or None


def negative_context(item: Item) -> str | None:
    """c⁻: a plausible-but-wrong demonstration (the answer the user rejected)."""
    if not (item.rejected and item.rejected.strip()):
        return None
    return f"A good answer to this request would be:\n{item.rejected.strip()}"


def induced_guideline(profile: str | None, max_lines: int = 12) -> str:
    """A short task guideline: the first lines of the user's notes plus a style instruction."""
    lines = [ln.strip() for ln in (profile or "").splitlines() if ln.strip() and not ln.startswith("#")]
    summary = "\n".join(lines[:max_lines])
    head = "Guideline: you are this user's personal assistant; answer briefly and specifically for them."
    return f"{head}\n{summary}" if summary else head


def embed_texts(tokenizer, texts: Sequence[str], idf: dict[int, float] | None = None,
                dim: int = 4096) -> torch.Tensor:
    """Hashed TF-IDF vectors of the texts' tokens, L2-normalised: a free, local retrieval embedding. -> (N, dim)

    A user's related requests share content words ("dog", "Heron", "lunch"); on short prompts a
    small model's input or hidden embeddings rank by phrasing ("What is my ...") instead.
    """
    emb_N_D = torch.zeros(len(texts), dim)
    for row, text in enumerate(texts):
        for i in tokenizer(text, add_special_tokens=False)["input_ids"]:
            emb_N_D[row, i % dim] += idf.get(i, 1.0) if idf else 1.0
    return torch.nn.functional.normalize(emb_N_D, dim=-1)


def token_idf(tokenizer, texts: Sequence[str]) -> dict[int, float]:
    """Smoothed inverse document frequency of each token over `texts` (the user's past prompts)."""
    df: dict[int, int] = {}
    for text in texts:
        for i in set(tokenizer(text, add_special_tokens=False)["input_ids"]):
            df[i] = df.get(i, 0) + 1
    n = len(texts)
    return {i: math.log((1 + n) / (1 + d)) + 1.0 for i, d in df.items()}


@dataclass
class ViewBuilder:
    """Builds the auxiliary contexts for items from a pool of solved past items.

    `pool_embeddings` rows align with `pool`; pass None to fall back to random neighbours.
    """

    pool: list[Item]
    profile: str | None
    kinds: Sequence[str]
    num_views: int
    examples_per_view: int
    seed: int
    pool_embeddings: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.solved = [i for i, it in enumerate(self.pool) if it.reference and it.reference.strip()]

    def _rng(self, item: Item, k: int) -> random.Random:
        return random.Random(zlib.crc32(f"{self.seed}:{item.id}:{k}".encode()))

    def _others(self, item: Item) -> list[int]:
        return [i for i in self.solved if self.pool[i].id != item.id]

    def _retrieval(self, item: Item, query_emb: torch.Tensor | None, k: int) -> str:
        others = self._others(item)
        if not others:
            return induced_guideline(self.profile)
        if self.pool_embeddings is None or query_emb is None:
            chosen = self._rng(item, k).sample(others, min(self.examples_per_view, len(others)))
        else:
            sims = self.pool_embeddings[others] @ query_emb  # (N_others,)
            # the k-th retrieval view skips the neighbours earlier retrieval views used
            order = torch.argsort(sims, descending=True).tolist()
            start = (k // max(1, len(self.kinds))) * self.examples_per_view
            chosen = [others[j] for j in order[start:start + self.examples_per_view]] or [others[order[0]]]
        shots = "\n\n".join(_solved_example(self.pool[i]) for i in chosen)
        return f"Examples of earlier requests from this user, with good answers:\n{shots}"

    def _random(self, item: Item, k: int) -> str:
        others = self._others(item)
        if not others:
            return induced_guideline(self.profile)
        chosen = self._rng(item, k).sample(others, min(self.examples_per_view, len(others)))
        shots = "\n\n".join(_solved_example(self.pool[i]) for i in chosen)
        return f"Examples of other requests from this user, with good answers:\n{shots}"

    def auxiliary_contexts(self, item: Item, query_emb: torch.Tensor | None = None) -> list[str]:
        """c_1..c_K for one item, never containing the item's own reference."""
        contexts = []
        for k in range(self.num_views):
            kind = self.kinds[k % len(self.kinds)]
            if kind == "retrieval":
                contexts.append(self._retrieval(item, query_emb, k))
            elif kind == "random":
                contexts.append(self._random(item, k))
            else:
                contexts.append(induced_guideline(self.profile, max_lines=8 + 4 * (k // len(self.kinds))))
        return contexts
