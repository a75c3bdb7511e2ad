"""Merge a PEFT LoRA adapter into a full-precision copy of the base: W' = W + scaling * B @ A.

Always into 16/32-bit weights, never into a 4-bit (QLoRA) base: merging into quantised weights
rounds the small LoRA delta away and then quantises twice. The caller's model is never touched
(we merge into a deep copy), so a daemon can keep training on its live model.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from edge_unisd.modeling import BaseSource, LoadedModel, load_base

log = logging.getLogger(__name__)

FULL_PRECISION = (torch.float32, torch.bfloat16, torch.float16)


class MergeError(RuntimeError):
    """The adapter cannot be merged; the message names the folder or module and what to do."""


@dataclass
class MergedModel:
    """The merged fp32 model (for verification) and the tokenizer that goes with it."""

    model: torch.nn.Module
    tokenizer: object
    source: BaseSource
    adapter_dir: Path | None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Plain fp32 state dict in HF names (tied weights appear under both names)."""
        return {k: v.detach().float() for k, v in self.model.state_dict().items()}


def is_quantized(model: torch.nn.Module) -> bool:
    """True for bitsandbytes 4/8-bit (or any integer-weight) models: not a merge target."""
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        return True
    for p in model.parameters():
        if p.dtype not in FULL_PRECISION or hasattr(p, "quant_state"):
            return True
    return False


def full_precision_base(base: LoadedModel | BaseSource | str | Path | None) -> LoadedModel:
    """A fp32 CPU base to merge into: the caller's if it already is one, else loaded fresh from the source."""
    if isinstance(base, LoadedModel):
        model = base.model
        if not is_quantized(model) and next(model.parameters()).dtype == torch.float32:
            return base
        log.info("base is %s; reloading %s in fp32 for the merge", "quantised" if is_quantized(model)
                 else next(model.parameters()).dtype, base.source.describe())
        base = base.source
    return load_base(base, device="cpu", dtype="float32")


def _plain_copy(model: torch.nn.Module) -> torch.nn.Module:
    """Deep copy without any PEFT layers (a live PeftModel is unwrapped, its LoRA dropped, not merged)."""
    from peft import PeftModel

    dup = copy.deepcopy(model)
    if isinstance(dup, PeftModel):
        dup = dup.unload()
    return dup


def check_adapter_dir(adapter_dir: Path) -> dict:
    """Read adapter_config.json, or say precisely what is missing."""
    cfg_path = adapter_dir / "adapter_config.json"
    if not cfg_path.is_file():
        raise MergeError(f"{adapter_dir} is not a PEFT adapter folder: adapter_config.json missing")
    if not any((adapter_dir / n).is_file() for n in ("adapter_model.safetensors", "adapter_model.bin")):
        raise MergeError(f"{adapter_dir} has no adapter_model.safetensors; the adapter was not saved completely")
    try:
        return json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise MergeError(f"{cfg_path}: invalid JSON at line {e.lineno}: {e.msg}") from e


def merge_adapter(base: LoadedModel | BaseSource | str | Path | None,
                  adapter_dir: str | Path | None) -> MergedModel:
    """Base (any spec `load_base` takes, or a loaded model) + PEFT adapter -> merged fp32 model.

    `adapter_dir=None` gives the base alone (exporting the unadapted model); then a plain fp32 model in
    eval mode is used as it is, not copied: callers only read it.
    """
    from peft import PeftModel

    loaded = full_precision_base(base)
    if adapter_dir is None and not loaded.model.training and not isinstance(loaded.model, PeftModel):
        return MergedModel(loaded.model, loaded.tokenizer, loaded.source, None)  # read-only use: no copy
    model = _plain_copy(loaded.model)
    if is_quantized(model):
        raise MergeError("refusing to merge into a quantised base; load it in 16/32-bit first")
    adapter_path = None
    if adapter_dir is not None:
        adapter_path = Path(adapter_dir)
        check_adapter_dir(adapter_path)
        try:
            peft_model = PeftModel.from_pretrained(model, str(adapter_path), is_trainable=False)
        except Exception as e:  # peft raises many types for a mismatched adapter
            raise MergeError(f"cannot apply adapter {adapter_path} to base {loaded.source.describe()}: {e}") from e
        model = peft_model.merge_and_unload(safe_merge=True)
    model = model.float().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    if tied:
        emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        if emb.data_ptr() != head.data_ptr() and not torch.equal(emb, head):
            raise MergeError(f"{adapter_path}: the adapter changes lm_head of a model with tied embeddings; "
                             "the merged model cannot stay tied (train without lm_head in target_modules)")
    return MergedModel(model, loaded.tokenizer, loaded.source, adapter_path)


def merged_state_dict(base: LoadedModel | BaseSource | str | Path | None,
                      adapter_dir: str | Path | None) -> dict[str, torch.Tensor]:
    """Plain fp32 state dict in HF names of base + adapter."""
    return merge_adapter(base, adapter_dir).state_dict()
