"""Activation checkpointing under a memory budget: recompute only the decoder layers that do not fit.

Why: checkpointing every layer runs the student's decoder forward twice, a third of its FLOPs;
keeping every layer's activations costs ~42 KB per token per layer for SmolLM2-135M (1.1 GB for a
batch of 8 x 108 tokens). Between the two, the activations of the last k layers are kept, k as many
as `activation_budget_mb` covers for this batch's token count, and only the others are recomputed.
The last layers are the ones kept because backward frees them first, before any recompute starts.
Measured on 2 AVX2 cores, `sd` at batch 8 x 64 (alternating in one process): 512 MB kept 14 of 30
layers and took the student stage from 6.10 to 5.71 s for a step peak of 2.45 GB against 2.00 GB;
every layer kept, 5.93 -> 4.82 s for 3.08 GB (above TRL's 2.70-2.89 GB on the same work,
bench/vs_trl.py). The default is 256 MB: on a Zen 4 with llama.cpp rollouts (medians of 4,
alternating) the `sd` student stage took 5.82 / 5.62 / 5.50 s at 0 / 256 / 512 MB in fp32 and
3.35 / 3.23 / 3.20 s in bf16, while each 256 MB of budget added ~0.35 GB to the step's peak; in bf16,
whose smaller weights and logits bring TRL's peak down to ~2.0 GB, 512 MB put both presets above it
(sd 2.23, edge 2.34 GB) and 256 MB below (1.89, 1.97).

The estimate counts what autograd saves in a LLaMA-style layer with LoRA on every linear layer:
seven hidden-size tensors (the layer input, both RMSNorm outputs, the rotated queries, attention's
output and its contiguous copy, the mid-layer residual), the rotated keys and the values, and four
intermediate-size tensors of the gated MLP (gate, up, SiLU(gate), their product). LoRA's rank-r
activations are a rounding error. A model of another shape gets the same count of its own sizes.
"""

from __future__ import annotations

import torch

from edge_unisd.scoring import causal_lm

HIDDEN_TENSORS, KV_TENSORS, INTERMEDIATE_TENSORS = 7, 2, 4


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def activation_bytes_per_token_layer(config, dtype: torch.dtype) -> int:
    """Bytes autograd keeps per token in one decoder layer run without checkpointing (estimate above)."""
    cfg = _text_config(config)
    hidden = cfg.hidden_size
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    kv_dim = (getattr(cfg, "num_key_value_heads", None) or heads) * head_dim
    intermediate = getattr(cfg, "intermediate_size", None) or 4 * hidden
    floats = HIDDEN_TENSORS * max(hidden, heads * head_dim) + KV_TENSORS * kv_dim + INTERMEDIATE_TENSORS * intermediate
    return floats * torch.finfo(dtype).bits // 8


def layers_to_keep(budget_bytes: int, tokens: int, bytes_per_token_layer: int, num_layers: int) -> int:
    """How many layers' activations fit the budget for a batch of `tokens` decoder positions, 0..num_layers."""
    if budget_bytes <= 0 or tokens <= 0 or num_layers <= 0:
        return 0
    per_layer = max(1, tokens * bytes_per_token_layer)
    return min(num_layers, budget_bytes // per_layer)


def enable_checkpointing(model) -> None:
    """Give every decoder layer transformers' non-reentrant checkpoint function, under either API name.

    transformers 5 renamed `gradient_checkpointing_enable` to `activation_checkpointing_enable` and warns on
    the old name, which goes in v6; 4.x has only the old one, and pyproject admits both (>=4.56).
    """
    base = causal_lm(model)
    enable = getattr(base, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def checkpointable_layers(model) -> list[torch.nn.Module]:
    """The decoder layers transformers checkpoints (GradientCheckpointingLayer), in order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def apply_activation_budget(model, tokens: int, budget_bytes: int) -> int:
    """Checkpoint all but the last k decoder layers, k from the budget for `tokens`; returns k.

    For a model whose checkpointing was enabled (`enable_checkpointing`); call before each
    training forward, as the token count changes per batch. A model whose layers were never given a
    checkpoint function is left alone and reports every layer kept.
    """
    layers = checkpointable_layers(model)
    if not layers or not all(hasattr(layer, "_gradient_checkpointing_func") for layer in layers):
        return len(layers)
    base = causal_lm(model)
    dtype = next(p.dtype for p in base.parameters() if p.is_floating_point())
    keep = layers_to_keep(budget_bytes, tokens, activation_bytes_per_token_layer(base.config, dtype), len(layers))
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i < len(layers) - keep
    return keep
