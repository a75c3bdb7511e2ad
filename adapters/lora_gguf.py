"""A PEFT LoRA adapter as a llama.cpp adapter GGUF, for hot-swapping on the unchanged base.

llama.cpp's format (convert_lora_to_gguf.py): general.type=adapter, adapter.type=lora,
adapter.lora.alpha, and per adapted weight `<gguf name>.lora_a` (r, in) and `<gguf name>.lora_b`
(out, r). lora_b of q/k gets the same row permutation as the merged q/k weights (llama family).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT

from .gguf_export import (
    ExportError,
    ModelShape,
    PlannedTensor,
    arch_rules,
    encode_tensor,
    gguf_name_of,
    gguf_order,
    permute_qk,
    write_gguf,
)


def write_lora(adapter_dir: Path, shape: ModelShape, out: Path, dtype: str = "f32") -> Path:
    """PEFT adapter -> llama.cpp LoRA GGUF for `shape`'s architecture.

    llama.cpp applies `scale = alpha / rank` (rank from lora_a); PEFT's per-module scaling (rslora,
    rank/alpha patterns) is folded into lora_b so the product matches exactly with the stored alpha.
    """
    from safetensors.numpy import load_file

    adapter_dir = Path(adapter_dir)
    cfg_path = adapter_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    check_lora_config(cfg, str(cfg_path))  # named by the config file; the dtype is checked where it is used
    weights_path = adapter_dir / "adapter_model.safetensors"
    if not weights_path.is_file():
        raise ExportError(f"{adapter_dir}: adapter_model.safetensors missing")
    return write_lora_weights(cfg, load_file(str(weights_path)), shape, out, dtype, where=str(weights_path),
                              name=adapter_dir.name)


def check_lora_config(cfg: Mapping[str, Any], where: str) -> None:
    """Refuse what a llama.cpp adapter cannot hold (DoRA, biases, full modules), naming `where`."""
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ExportError(f"{where}: peft_type {cfg.get('peft_type')!r} is not LoRA")
    for key in ("use_dora", "fan_in_fan_out"):
        if cfg.get(key):
            raise ExportError(f"{where}: {key}=true is not supported by llama.cpp adapters; export merged")
    if cfg.get("lora_bias") or cfg.get("bias", "none") != "none":
        raise ExportError(f"{where}: LoRA biases are not supported by llama.cpp adapters; export merged")
    if cfg.get("modules_to_save"):
        raise ExportError(f"{where}: modules_to_save={cfg['modules_to_save']} (full weights) cannot go in a "
                          "llama.cpp adapter; export merged")


def write_lora_weights(cfg: Mapping[str, Any], weights: Mapping[str, np.ndarray], shape: ModelShape, out: Path,
                       dtype: str = "f32", *, where: str, name: str) -> Path:
    """`write_lora` from a PEFT config and its lora_A/lora_B arrays already in memory (PEFT's key names).

    The rollout backend writes the live adapter this way on every call: no safetensors round trip.
    """
    check_lora_config(cfg, where)
    if dtype not in ("f32", "f16"):
        raise ExportError(f"LoRA GGUF dtype {dtype!r}: use f32 or f16")
    rules = arch_rules(shape.arch, where)
    name_map = gguf.get_tensor_name_map(rules.gguf_arch, shape.n_blocks)
    alpha = float(cfg.get("lora_alpha", 8))
    pairs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for key in weights:
        if ".lora_A." not in key:
            if ".lora_B." not in key:
                raise ExportError(f"{where}: tensor {key!r} is not a LoRA A/B matrix (embedding LoRA "
                                  "or extra weights); export merged instead")
            continue
        module = key.split(".lora_A.")[0]
        b_key = key.replace(".lora_A.", ".lora_B.")
        hf_module = module.removeprefix("base_model.model.")
        found = gguf_name_of(hf_module + ".weight", name_map)
        if found is None:
            raise ExportError(f"{where}: LoRA on {hf_module!r} has no GGUF tensor name")
        kind, name = found
        a = weights[key].astype(np.float32)  # (r, in)
        b = weights[b_key].astype(np.float32)  # (out, r)
        r = a.shape[0]
        scale = peft_scaling(cfg, hf_module, r)
        b = b * (scale * r / alpha)  # llama.cpp multiplies by alpha / r
        if rules.permute_qk and kind == gguf.MODEL_TENSOR.ATTN_Q:
            b = permute_qk(b, shape.n_head, shape.n_head)
        elif rules.permute_qk and kind == gguf.MODEL_TENSOR.ATTN_K:
            b = permute_qk(b, shape.n_head, shape.n_head_kv)
        pairs[name] = (np.ascontiguousarray(a), np.ascontiguousarray(b))
    if not pairs:
        raise ExportError(f"{where}: no LoRA matrices found")

    qtype = QT.F32 if dtype == "f32" else QT.F16
    planned = []
    for name in gguf_order(pairs):
        a, b = pairs[name]
        planned.append(PlannedTensor(f"{name}.lora_a", a.shape, qtype, lambda x=a: encode_tensor(x, qtype)))
        planned.append(PlannedTensor(f"{name}.lora_b", b.shape, qtype, lambda x=b: encode_tensor(x, qtype)))

    def add_metadata(w: gguf.GGUFWriter) -> None:
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        w.add_name(name)

    return write_gguf(Path(out), shape.arch, add_metadata, planned)


def peft_scaling(cfg: Mapping[str, Any], module: str, r: int) -> float:
    """PEFT's LoRA scaling for one module: alpha/r, or alpha/sqrt(r) with rslora; patterns by suffix."""
    alpha = float(cfg.get("lora_alpha", 8))
    for pattern, value in (cfg.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):  # PEFT's get_pattern_key rule
            alpha = float(value)
            break
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
