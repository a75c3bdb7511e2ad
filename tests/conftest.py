"""Shared fixtures: the bundled tokenizer (cached HF folder, ~1 s once converted) and tiny random models."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# fp32 wherever a test does not choose: "auto" would pick bf16 on a CPU with native bf16 (edge_unisd.precision)
# and make figures depend on the machine; the bf16 path has tests of its own that ask for it
os.environ.setdefault("EDGE_UNISD_COMPUTE_DTYPE", "float32")


@pytest.fixture(scope="session")
def bundled():
    """The bundled SmolLM2-135M (model + tokenizer), loaded once per test session."""
    from edge_unisd.modeling import load_base

    return load_base()


@pytest.fixture(scope="session")
def tokenizer(bundled):
    return bundled.tokenizer


def make_tiny_llama(vocab_size: int, seed: int = 0, hidden: int = 64, layers: int = 2, init_std: float = 0.02):
    """A tiny random llama-family model with the bundled tokenizer's vocabulary, frozen like a base."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True,
                      initializer_range=init_std)
    model = LlamaForCausalLM(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture
def tiny_model(tokenizer):
    return make_tiny_llama(len(tokenizer))
