"""What one private prompt is: the ingest row schema (validated) and the Item the method trains on.

The same `IngestRow` validates every way a prompt arrives (CLI, spool, Python API, proxy),
so the rules live in one place. Limits keep a single bad row from exhausting memory.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_PROMPT_CHARS = 32_000
MAX_FIELD_CHARS = 32_000
MAX_MESSAGES = 64


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_PROMPT_CHARS)


class IngestRow(BaseModel):
    """One JSON Lines row: `{"prompt", "context"?, "reference"?, "rejected"?, "source"?, "id"?}`."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)

    prompt: str | list[ChatMessage] = Field(description="the user's prompt, or a chat ending in a user turn")
    context: str | None = Field(None, max_length=MAX_FIELD_CHARS, description="item-specific privileged context")
    reference: str | None = Field(None, max_length=MAX_FIELD_CHARS, description="a good answer the user gave")
    rejected: str | None = Field(None, max_length=MAX_FIELD_CHARS, description="an answer the user rejected")
    source: str | None = Field(None, max_length=200)
    id: str | None = Field(None, min_length=1, max_length=200)

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, v: str | list[ChatMessage]) -> str | list[ChatMessage]:
        if isinstance(v, str):
            if not v.strip():
                raise ValueError("prompt is empty")
            if len(v) > MAX_PROMPT_CHARS:
                raise ValueError(f"prompt is {len(v)} characters; the limit is {MAX_PROMPT_CHARS}")
            return v
        if not v:
            raise ValueError("prompt is an empty list of messages")
        if len(v) > MAX_MESSAGES:
            raise ValueError(f"prompt has {len(v)} messages; the limit is {MAX_MESSAGES}")
        if v[-1].role != "user":
            raise ValueError("the last message of a chat prompt must have role 'user'")
        if not any(m.content.strip() for m in v if m.role == "user"):
            raise ValueError("prompt has no non-empty user message")
        return v

    def messages(self) -> list[dict[str, str]]:
        if isinstance(self.prompt, str):
            return [{"role": "user", "content": self.prompt}]
        return [m.model_dump() for m in self.prompt]


@dataclass(frozen=True)
class Item:
    """A prompt as the trainer sees it. `messages` ends with the user turn to answer."""

    id: str
    messages: tuple[dict[str, str], ...]
    context: str | None = None
    reference: str | None = None
    rejected: str | None = None
    source: str | None = None
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def prompt_text(self) -> str:
        return "\n".join(m["content"] for m in self.messages if m["role"] == "user")


def content_hash(row: IngestRow) -> str:
    """Stable hash of what makes an item the same item (duplicates are counted, not stored twice)."""
    payload = {"m": row.messages(), "c": row.context, "r": row.reference, "x": row.rejected}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def item_from_row(row: IngestRow, default_id: str | None = None) -> Item:
    item_id = row.id or default_id or content_hash(row)[:16]
    return Item(id=item_id, messages=tuple(row.messages()), context=row.context, reference=row.reference,
                rejected=row.rejected, source=row.source)
