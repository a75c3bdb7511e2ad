"""The vocabulary of an HF folder as llama.cpp wants it, so llama.cpp tokenises exactly as transformers does.

GPT-2-style byte-level BPE, written the way llama.cpp's convert_hf_to_gguf.py does it
(`_set_vocab_gpt2`): tokenizer.ggml.model="gpt2", a pre-tokenizer type, tokens, token types,
merges, special ids, BOS/EOS flags and the chat template (gguf.SpecialVocab). The pre-tokenizer
is read from the pipeline transformers really runs, not from tokenizer.json alone: in
transformers 5 a tokenizer class (Qwen2Tokenizer) replaces the file's pre-tokenizer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from .gguf_export import ExportError

# Hugging Face pre-tokenizer -> llama.cpp tokenizer.ggml.pre. Recognised by structure rather than by
# convert_hf_to_gguf's hash of a probe text; the export's verification then checks real tokenisation.
QWEN2_PRE_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                   r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_PRE_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                    r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def detect_bpe_pre(tokenizer_json: Mapping[str, Any], where: str) -> str:
    """The llama.cpp pre-tokenizer type equivalent to this tokenizer.json's pre_tokenizer."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]

    def byte_level(p: Mapping[str, Any], use_regex: bool) -> bool:
        return (p.get("type") == "ByteLevel" and not p.get("add_prefix_space", False)
                and bool(p.get("use_regex", True)) == use_regex)

    if kinds == ["ByteLevel"] and byte_level(parts[0], True):
        return "gpt-2"
    if (kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits")
            and byte_level(parts[1], True)):
        return "smollm"  # \p{N} then the GPT-2 regex: llama.cpp's smollm/starcoder pre-tokenizer
    if kinds == ["Split", "ByteLevel"] and byte_level(parts[1], False):
        regex = (parts[0].get("pattern") or {}).get("Regex")
        if regex == QWEN2_PRE_REGEX:
            return "qwen2"
        if regex == LLAMA3_PRE_REGEX:
            return "llama-bpe"
    raise ExportError(f"{where}: pre_tokenizer {json.dumps(pre)[:300]} has no known llama.cpp equivalent; "
                      "llama.cpp would tokenise differently from transformers, so the export is refused")


@dataclass
class BpeVocab:
    """A GPT-2-style BPE vocabulary as llama.cpp wants it."""

    tokens: list[str]
    toktypes: list[int]
    pre: str
    special: gguf.SpecialVocab

    def add_to(self, w: gguf.GGUFWriter) -> None:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        w.add_token_types(self.toktypes)
        self.special.add_to_gguf(w, quiet=True)


def _looks_special(token: str) -> bool:
    return (token.startswith("<|") and token.endswith("|>")) or token in ("<pad>", "<mask>", "<unk>", "<s>", "</s>")


def build_bpe_vocab(folder: Path, vocab_size: int) -> BpeVocab:
    """Tokens, types, merges, special ids and chat template, as convert_hf_to_gguf.py's gpt2 path builds them."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(f"{folder}: the tokenizer is not a fast (tokenizers) tokenizer; only GPT-2-style BPE "
                          "tokenizers are exported")
    # the pipeline transformers really runs: a tokenizer class (e.g. Qwen2Tokenizer in transformers 5) may
    # replace the pre-tokenizer written in tokenizer.json
    tok_json = json.loads(backend.to_str())
    model = tok_json.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ExportError(f"{folder}: tokenizer model {model.get('type')!r} (byte_fallback="
                          f"{model.get('byte_fallback')}) is not GPT-2-style BPE; not supported yet")
    normalizer = (tok_json.get("normalizer") or {}).get("type")
    if normalizer not in (None, "NFC"):
        raise ExportError(f"{folder}: tokenizer normalizer {normalizer!r} has no llama.cpp equivalent")
    pre = detect_bpe_pre(tok_json, str(folder))
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ExportError(f"{folder}: tokenizer has ids up to {max(vocab.values())} but config vocab_size is "
                          f"{vocab_size}; the tokenizer does not belong to this model")
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            if not decoder[i].normalized:  # llama.cpp assumes added tokens are pre-normalised
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            types.append(gguf.TokenType.CONTROL if decoder[i].special or _looks_special(token)
                         else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)

    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise ExportError(f"{folder}: no BPE merges found; llama.cpp cannot tokenise without them")
    # say explicitly whether BOS/EOS are added, measured on transformers itself: llama.cpp's defaults
    # differ per pre-tokenizer type
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    special.add_special_token["bos"] = bos is not None and len(full) > len(plain) and full[0] == bos
    special.add_special_token["eos"] = eos is not None and len(full) > len(plain) and full[-1] == eos
    return BpeVocab(tokens, [int(t) for t in types], pre, special)
