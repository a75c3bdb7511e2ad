"""The rollout model as base + the live LoRA merged: a private in-RAM copy of the rollout GGUF, patched in place.

Why: llama.cpp applies a LoRA adapter as two extra small matmuls per adapted tensor in every decode step.
Merged weights cost nothing per step; writing them costs one pass over the adapted weights per call
(delta B @ A, add, round, pwrite: ~0.3 s for SmolLM2-135M with LoRA on all 210 linear layers), about
what writing and loading the adapter GGUF cost. Measured on 2 CPU cores, batch 8, alternating
(bench/rollout_lora.py): 3.50 vs 4.25 s a rollout of 64 tokens (1.21x), 16.2 vs 17.5 s of 256 (1.08x).

The copy lives in a memfd (Linux): RAM private to this process, gone when it exits, so a crash leaves no
scratch file behind and nothing is written to disk on every step. llama.cpp loads the model from
`/proc/self/fd/N` and, for f16/bf16/f32 weights on its CPU backend, reads them from that shared mapping, so a
write is seen by the next decode without reloading. A build that copies weights into buffers of its own
(a repacking CPU backend, GPU offload) would keep sampling the stale ones: the rollout backend checks
once, on the loaded model, that a write changes its logits (`LlamaCppRollout`), and uses the adapter
otherwise. Only f16/bf16/f32 tensors can be patched (the f16 and bf16 rollout copies, an unquantised base);
a quantised rollout file uses the adapter.

The merged values are computed in torch from the training model's own base weights and PEFT's
`get_delta_weight` (what `merge_and_unload` adds), in llama.cpp's Q/K row order, rounded once to the
file's type: for the f16 copy of a quantised base, the values transformers trains on plus the delta,
to f16 rounding.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from adapters.gguf_export import ModelShape

_PATCHABLE = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}  # GGML_TYPE_F32, _F16, _BF16
_COPY_CHUNK = 1 << 30


def _raw_bytes(t: torch.Tensor) -> np.ndarray:
    """A contiguous tensor's bytes as numpy holds them (numpy has no bfloat16: its bits as int16)."""
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


class MergedWeightsError(RuntimeError):
    """Merged rollout weights cannot be kept for this file or adapter; the message says why."""


@dataclass(frozen=True)
class TensorSlot:
    """Where one tensor's data sits in the GGUF file: byte offset, torch dtype, (rows, cols) as stored."""

    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def tensor_slots(path: str, size: int, mtime_ns: int) -> dict[str, TensorSlot]:
    """GGUF name -> slot of every f16/bf16/f32 tensor in `path`, once per file version per process (the table
    is cached by adapters/gguf_tensor_table, which skips the vocabulary: ~0.05 s for SmolLM2)."""
    from adapters.gguf_tensor_table import GGUFTableError, cached_tensor_table

    try:
        table = cached_tensor_table(path, size, mtime_ns)
    except GGUFTableError as e:
        raise MergedWeightsError(str(e)) from e
    return {e.name: TensorSlot(e.offset, _PATCHABLE[e.ggml_type], e.shape) for e in table if e.ggml_type in _PATCHABLE}


def row_order(kind, shape: ModelShape, rows: int, permute: bool) -> torch.Tensor | None:
    """llama.cpp's row order of a Q or K weight as an index into the HF rows (None: same order)."""
    import gguf

    from adapters.gguf_export import permute_qk

    if not permute or kind not in (gguf.MODEL_TENSOR.ATTN_Q, gguf.MODEL_TENSOR.ATTN_K):
        return None
    n_kv = shape.n_head if kind == gguf.MODEL_TENSOR.ATTN_Q else shape.n_head_kv
    return torch.from_numpy(permute_qk(np.arange(rows), shape.n_head, n_kv).copy())


@dataclass(frozen=True)
class _Target:
    """One adapted linear layer: its PEFT module, where its merged weight goes, and in which row order."""

    module: torch.nn.Module
    slot: TensorSlot
    rows: torch.Tensor | None


class MergedWeights:
    """A memfd copy of `source` whose adapted weights `write` sets to base + the live LoRA's delta.

    `path` is what llama.cpp loads. `write(model, None)` puts the base weights back (rollouts with the
    adapter disabled). Close with `close()`; the copy is freed once llama.cpp has unmapped it too.
    """

    def __init__(self, source: Path) -> None:
        if not hasattr(os, "memfd_create") or not Path("/proc/self/fd").is_dir():
            raise MergedWeightsError("merged rollout weights need Linux memfd and /proc/self/fd")
        stat = source.stat()
        self._slots = tensor_slots(str(source.resolve()), stat.st_size, stat.st_mtime_ns)
        self._fd = os.memfd_create("edge-unisd-rollout-weights", os.MFD_CLOEXEC)
        try:
            _copy_file(source, self._fd, stat.st_size)
        except OSError as e:
            os.close(self._fd)
            raise MergedWeightsError(f"cannot copy {source} into memory ({stat.st_size >> 20} MB): {e}") from e
        self.path = Path(f"/proc/self/fd/{self._fd}")
        self._targets: list[_Target] = []  # the adapted layers of the model written last
        self._targets_model: weakref.ref | None = None
        self.holds_base = True

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def write(self, model, adapter: str | None, shape: ModelShape) -> int:
        """Set every adapted tensor to base (+ `adapter`'s delta, unless None); returns the bytes written."""
        if self.closed:
            raise MergedWeightsError("the merged rollout weights were closed")
        if adapter is None and self.holds_base:
            return 0
        targets = self._targets_of(model, shape)
        if adapter is not None:
            _check_mergeable(model, adapter, targets)
        written = 0
        with torch.no_grad():
            for target in targets:
                weight = target.module.base_layer.weight
                if adapter is not None:
                    weight = weight + target.module.get_delta_weight(adapter).to(weight.dtype)
                if target.rows is not None:
                    weight = weight.index_select(0, target.rows)
                data = _raw_bytes(weight.to(target.slot.dtype).contiguous())
                written += os.pwrite(self._fd, memoryview(data).cast("B"), target.slot.offset)
        self.holds_base = adapter is None
        return written

    def patch_raw(self, name: str, data: bytes) -> bytes:
        """Overwrite tensor `name`'s bytes, returning what was there: the backend's one-off visibility check."""
        slot = self._slots[name]
        old = os.pread(self._fd, len(data), slot.offset)
        os.pwrite(self._fd, data, slot.offset)
        return old

    def probe_tensor(self, shape: ModelShape) -> tuple[str, int]:
        """(name, bytes) of a matmul weight whose zeroing changes the logits: the last block's FFN down."""
        name = f"blk.{shape.n_blocks - 1}.ffn_down.weight"
        if name not in self._slots:
            raise MergedWeightsError(f"{name} is not an f16/bf16/f32 tensor of the rollout file")
        slot = self._slots[name]
        return name, int(np.prod(slot.shape)) * torch.finfo(slot.dtype).bits // 8

    def _targets_of(self, model, shape: ModelShape) -> list[_Target]:
        """The adapted layers of `model`, resolved once per model: a weak reference, not id(), tells whether
        the model is the one resolved last (a new model can reuse a freed one's id; its layers are new)."""
        if self._targets_model is None or self._targets_model() is not model:
            self._targets = self._resolve(model, shape)
            self._targets_model = weakref.ref(model)
        return self._targets

    def _resolve(self, model, shape: ModelShape) -> list[_Target]:
        """The PEFT LoRA layers of `model` and their GGUF slots, or an error naming what cannot be merged."""
        import gguf
        from peft.tuners.lora import Linear as LoraLinear
        from peft.tuners.tuners_utils import BaseTunerLayer

        from adapters.gguf_export import arch_rules, gguf_name_of

        rules = arch_rules(shape.arch, "the rollout model")
        name_map = gguf.get_tensor_name_map(rules.gguf_arch, shape.n_blocks)
        targets = []
        for module_name, module in model.named_modules():
            if isinstance(module, BaseTunerLayer) and not isinstance(module, LoraLinear):
                raise MergedWeightsError(f"{module_name}: a {type(module).__name__} adapter layer; only LoRA on "
                                         "linear layers is merged into the rollout weights")
            if not isinstance(module, LoraLinear):
                continue
            hf_name = module_name.removeprefix("base_model.model.") + ".weight"
            found = gguf_name_of(hf_name, name_map)
            if found is None or found[1] not in self._slots:
                raise MergedWeightsError(f"LoRA layer {hf_name!r} has no f16/bf16/f32 tensor in the rollout file")
            kind, name = found
            slot = self._slots[name]
            if any(module.use_dora.values()) or module.fan_in_fan_out:
                raise MergedWeightsError(f"LoRA layer {hf_name!r} uses DoRA or fan_in_fan_out: not merged here")
            if tuple(module.base_layer.weight.shape) != slot.shape:
                raise MergedWeightsError(f"LoRA layer {hf_name!r} has shape {tuple(module.base_layer.weight.shape)}, "
                                         f"the rollout file's {name} {slot.shape}")
            targets.append(_Target(module, slot, row_order(kind, shape, slot.shape[0], rules.permute_qk)))
        if not targets:
            raise MergedWeightsError("the model has no LoRA linear layers to merge")
        return targets


def _check_mergeable(model, adapter: str, targets: list[_Target]) -> None:
    """What the LoRA delta alone does not carry: trained full modules, LoRA biases."""
    saved = getattr(model.peft_config[adapter], "modules_to_save", None)
    if saved:
        raise MergedWeightsError(f"adapter {adapter!r} trains full modules ({saved}): not merged into the "
                                 "rollout weights")
    if any(getattr(t.module, "lora_bias", {}).get(adapter) for t in targets):
        raise MergedWeightsError(f"adapter {adapter!r} has LoRA biases: not merged into the rollout weights")


def _copy_file(source: Path, fd: int, size: int) -> None:
    """`source`'s bytes into `fd` through the kernel (sendfile), without a user-space buffer."""
    with open(source, "rb") as src:
        offset = 0
        while offset < size:
            sent = os.sendfile(fd, src.fileno(), offset, min(_COPY_CHUNK, size - offset))
            if sent == 0:
                raise OSError(f"{source} ended at byte {offset} of {size}")
            offset += sent
