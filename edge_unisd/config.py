"""Every knob of METHOD.md as a validated pydantic model, and the named presets (data, not code).

Validate at the edge, pass flat values inward: components take floats and strings, not this object.
Unknown keys and out-of-range values fail with a message naming the key path (e.g. `lora.rank`).
"""

from __future__ import annotations

import copy
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration value is unknown or out of range; the message names the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraSettings(_Strict):
    rank: int = Field(16, ge=1, le=1024, description="LoRA rank r (paper: 64; small models on a device: 8-32)")
    alpha: float = Field(32.0, gt=0, le=4096, description="LoRA alpha; the update is scaled by alpha / rank")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA input (0: deterministic steps)")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="module names to adapt, or 'all-linear' (every linear layer but the head)")


RolloutBackendName = Literal["auto", "hf", "llamacpp"]


class RolloutSettings(_Strict):
    temperature: float = Field(0.7, ge=0, le=5, description="sampling temperature of on-policy rollouts (0: greedy)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass")
    max_new_tokens: int = Field(64, ge=1, le=4096, description="completion length cap; stops early at EOS")
    min_new_tokens: int = Field(0, ge=0, le=4096, description="suppress EOS before this many tokens (benchmarks)")
    backend: RolloutBackendName = Field(
        "auto", description="rollout engine: llamacpp (llama.cpp on the base GGUF with the live LoRA swapped in each "
        "step, every row in one decode: 135-140 vs ~64 tokens/s for HF generate at batch 8 x 64 on 2 CPU cores), "
        "hf (transformers generate, batched), or auto: llamacpp for a GGUF base on CPU where llama.cpp loads, else hf")
    llama_weights: Literal["auto", "f16", "bf16", "q8_0", "base"] = Field(
        "auto", description="what llama.cpp samples from: auto (bf16 when the model trains in bf16, where llama.cpp's "
        "bf16 dot products are the faster, else f16; adapters.llama_rollout.resolve_rollout_weights), a bf16 copy, "
        "an f16 copy of a quantised base (on-policy to f16 rounding; "
        "SmolLM2 Q4_1: next-token KL 1e-5, 157 tokens/s), a q8_0 copy (KL 0.0065, 192 tokens/s), or the base file "
        "(KL 0.0044, 162 tokens/s: llama.cpp quantises activations for quantised weights); copies are made once "
        "(bench/rollout_fidelity.py)")
    llama_lora: Literal["auto", "merged", "adapter"] = Field(
        "auto", description="how the live LoRA reaches llama.cpp: merged (written into a private in-RAM copy of "
        "f16/bf16/f32 rollout weights each call; no LoRA matmuls per decode step: SmolLM2-135M batch 8 on 2 cores "
        "1.21x at 64 tokens, 1.08x at 256), adapter (a LoRA GGUF loaded each call; any weights), or auto: "
        "merged where the weights are f16/bf16/f32 and llama.cpp reads them from the file mapping, else adapter")


class OptimSettings(_Strict):
    lr: float = Field(1e-4, gt=0, le=1, description="AdamW peak learning rate (paper 2e-5; small models 1e-4)")
    weight_decay: float = Field(0.0, ge=0, le=1, description="AdamW weight decay on LoRA weights")
    warmup_ratio: float = Field(0.1, ge=0, le=1, description="fraction of steps with linear warm-up")
    schedule: Literal["cosine", "constant"] = Field("cosine", description="LR schedule after warm-up")
    max_grad_norm: float = Field(1.0, gt=0, description="global gradient-norm clip")
    batch_size: int = Field(4, ge=1, le=1024, description="items per optimizer step")
    micro_batch_size: int = Field(4, ge=1, le=1024,
                                  description="items per forward/backward; batch_size / micro = grad accumulation")


class MethodConfig(_Strict):
    """One UniSD configuration (METHOD.md). Presets below are overrides of these defaults."""

    mode: Literal["distill", "sft"] = Field(
        "distill", description="distill: on-policy self-distillation; sft: imitate references (baseline)")
    divergence: Literal["fkl", "rkl", "jsd"] = Field("fkl", description="per-token divergence D(p_T || p_S)")
    jsd_beta: float = Field(0.5, ge=0, le=1, description="β of generalized JSD (0: forward KL, 1: reverse KL)")
    temperature: float = Field(1.0, gt=0, le=10, description="τ applied to student and teacher logits in D")
    teacher: Literal["base", "live", "ema"] = Field(
        "live", description="teacher weights: base (adapter off), live adapter, or EMA adapter")
    ema_decay: float = Field(0.99, ge=0, lt=1, description="EMA β: φ_ema ← β φ_ema + (1-β) φ_student")
    ema_every: int = Field(1, ge=1, le=10_000, description="EMA update every n optimizer steps")
    clip: bool = Field(False, description="clip per-token divergences (stability)")
    clip_cap: float | None = Field(10.0, gt=0, description="static cap C on ℓ_t (None: quantile only)")
    clip_quantile: float | None = Field(None, gt=0, lt=1, description="per-batch quantile cap, e.g. 0.99")
    agreement: Literal["none", "token", "sequence"] = Field(
        "none", description="multi-view agreement weighting (reliability): off, per token, per sequence")
    agreement_routing: Literal["all", "given"] = Field(
        "all", description="all: every item gets K views; given: only the items the caller routes (budgeted)")
    agreement_gamma: float = Field(1.0, ge=0, le=1e4, description="γ: sharpness of the agreement weights")
    agreement_statistic: Literal["var", "range"] = Field("var", description="spread of view log-probs")
    agreement_quantile: float = Field(0.95, gt=0, le=1, description="δ is normalised by this batch quantile")
    agreement_cap: float = Field(10.0, gt=0, description="cap on the normalised token disagreement δ̃")
    token_weight_floor: float = Field(0.01, ge=0, le=1, description="lowest token weight")
    sequence_weight_floor: float = Field(1e-6, ge=0, le=1, description="lowest sequence weight")
    num_views: int = Field(3, ge=2, le=16, description="K auxiliary teacher views")
    view_kinds: list[Literal["retrieval", "random", "induced"]] = Field(
        ["retrieval", "random", "induced"], min_length=1, description="auxiliary view kinds, cycled to K")
    view_examples: int = Field(2, ge=1, le=8, description="solved past items shown in retrieval/random views")
    contrastive_weight: float = Field(0.0, ge=0, le=10, description="λ_c of the token contrastive term")
    contrastive_margin: float = Field(0.5, ge=0, le=100, description="margin of the contrastive term")
    feature_weight: float = Field(0.0, ge=0, le=10, description="λ_f of last-hidden-state feature matching")
    score_batch_size: int = Field(4, ge=1, le=1024,
                                  description="sequences per no-grad teacher/view forward: bounds attention memory")
    chunk_tokens: int = Field(256, ge=16, le=1 << 20,
                              description="rows (batch x positions) per vocabulary chunk: bounds logits memory "
                                          "(256 x 49k fp32 = 50 MB per buffer); 256 rows keep the head's "
                                          "matmul near the machine's rate (128: ~0.4 s slower per 8 x 64 step)")
    gradient_checkpointing: bool = Field(True, description="recompute decoder activations in backward (memory)")
    activation_budget_mb: int = Field(
        256, ge=0, le=1 << 20, description="with gradient_checkpointing: MB of decoder activations kept per step "
                                           "instead of recomputed, last layers first (0: recompute every layer; "
                                           "edge_unisd.checkpointing says why 256)")
    seed: int = Field(0, ge=0, description="seed for rollouts, views and data order")
    lora: LoraSettings = Field(default_factory=LoraSettings)
    rollout: RolloutSettings = Field(default_factory=RolloutSettings)
    optim: OptimSettings = Field(default_factory=OptimSettings)

    @model_validator(mode="after")
    def _check_consistency(self) -> MethodConfig:
        # micro_batch_size > batch_size is allowed: the step then runs one micro-batch of batch_size
        if self.optim.micro_batch_size < self.optim.batch_size and self.optim.batch_size % self.optim.micro_batch_size:
            raise ValueError(f"optim.batch_size ({self.optim.batch_size}) must be a multiple of "
                             f"optim.micro_batch_size ({self.optim.micro_batch_size})")
        if self.clip and self.clip_cap is None and self.clip_quantile is None:
            raise ValueError("clip is on but clip_cap and clip_quantile are both unset; set clip_cap (e.g. 10)")
        return self

    @property
    def uses_views(self) -> bool:
        return self.mode == "distill" and self.agreement != "none"


_SD: dict[str, Any] = {"mode": "distill", "teacher": "base"}

PRESETS: dict[str, dict[str, Any]] = {
    # plain on-policy self-distillation: live weights + privileged context teach the student
    "sd": dict(_SD),  # frozen base + context as teacher: the fixed target TRL's SDFT comparison uses
    # static imitation baseline: NLL of references (or of the teacher's own completion where none)
    "sft": {"mode": "sft"},
    "ema": {**_SD, "teacher": "ema"},
    # the student's own live adapter teaches: a moving teacher without the EMA's guard (what `ema` protects against)
    "live": {**_SD, "teacher": "live"},
    "clip": {**_SD, "clip": True, "clip_cap": 10.0},
    "agreement-token": {**_SD, "agreement": "token"},
    "agreement-seq": {**_SD, "agreement": "sequence"},
    "contrastive": {**_SD, "contrastive_weight": 0.1},
    "feature": {**_SD, "feature_weight": 0.1},
    # the integrated pipeline; γ=1 (not the reference code's 0.001, which leaves every w_t in [0.99, 1])
    "unisd-star": {**_SD, "teacher": "ema", "clip": True, "agreement": "token", "contrastive_weight": 0.01,
                   "feature_weight": 0.01},
    # the daemon's default: cheap path (EMA + clipping) for all, K views only for the items it is told
    "edge": {**_SD, "teacher": "ema", "clip": True, "agreement": "token", "agreement_routing": "given",
             "contrastive_weight": 0.01, "feature_weight": 0.01},
}


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def format_validation_error(err: ValidationError, where: str = "") -> str:
    """One line per problem, naming the key path: `lora.rank: Input should be greater than or equal to 1 (got 0)`."""
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(root)"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        value = e.get("input")
        got = "" if e["type"] == "extra_forbidden" or isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"{where}{key}: {msg}{got}")
    return "; ".join(lines)


def load_method_config(preset: str = "edge", overrides: dict[str, Any] | None = None) -> MethodConfig:
    """A preset plus user overrides (nested dicts), validated; ConfigError names the bad key."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    data = _deep_merge(PRESETS[preset], overrides or {})
    try:
        return MethodConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"preset {preset!r}: {format_validation_error(e)}") from None
