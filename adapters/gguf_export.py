"""Write merged weights (or a LoRA adapter) as GGUF that llama.cpp loads and tokenises like transformers.

Two writers here, one tensor-naming rule (shared with adapters/lora_gguf.py):
- `write_merged_from_gguf_base`: the default case. Every metadata key of the base file
  (tokenizer, merges, special tokens, chat template, hyperparameters) is copied; only the
  tensors are replaced, in the requested type. A tied output (no `output.weight`) stays tied.
- `write_merged_from_hf`: an HF folder base (llama and qwen2 families): hyperparameters from
  config.json, and the vocabulary from adapters/gguf_vocab.py.

HF -> GGUF names come from gguf's TensorNameMap for the architecture. The llama family stores
Q/K rows permuted for llama.cpp's rotary layout (convert_hf_to_gguf.py, LlamaModel.permute);
transformers undoes it when it loads a GGUF, so we redo it here, on lora_B too. Qwen2 has none.
Norms and biases stay F32. Every file goes through `atomic_path`: a reader sees a whole file or none.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT

from edge_unisd.atomic_io import atomic_path

log = logging.getLogger(__name__)

# Types written in Python with gguf.quants; K-quants go through llama.cpp (adapters/quantize.py).
PY_QUANTS: dict[str, QT] = {"f32": QT.F32, "f16": QT.F16, "bf16": QT.BF16, "q8_0": QT.Q8_0}
PY_FILE_TYPES: dict[str, gguf.LlamaFileType] = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}
LLAMA_CPP_QUANTS = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")
ALL_QUANTS = tuple(PY_QUANTS) + LLAMA_CPP_QUANTS


class ExportError(RuntimeError):
    """The export cannot be written; the message names the file, key or tensor and what to do."""


@dataclass(frozen=True)
class ArchRules:
    """What differs between supported families: the gguf arch enum and the Q/K row permutation."""

    gguf_arch: gguf.MODEL_ARCH
    permute_qk: bool


# HF model_type / GGUF general.architecture -> rules. Only families whose export is tested.
ARCHS: dict[str, ArchRules] = {
    "llama": ArchRules(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "qwen2": ArchRules(gguf.MODEL_ARCH.QWEN2, permute_qk=False),
}


@dataclass(frozen=True)
class ModelShape:
    """The few hyperparameters name mapping and permutation need."""

    arch: str  # GGUF architecture name ("llama", "qwen2")
    n_blocks: int
    n_head: int
    n_head_kv: int


def arch_rules(arch: str, where: str) -> ArchRules:
    rules = ARCHS.get(arch)
    if rules is None:
        raise ExportError(f"{where}: architecture {arch!r} is not supported for GGUF export "
                          f"(supported: {', '.join(sorted(ARCHS))})")
    return rules


def file_type_name(quant: str) -> gguf.LlamaFileType:
    """GGUF general.file_type for a quant name (`q4_k_m` -> MOSTLY_Q4_K_M)."""
    if quant in PY_FILE_TYPES:
        return PY_FILE_TYPES[quant]
    try:
        return gguf.LlamaFileType[f"MOSTLY_{quant.upper()}"]
    except KeyError:
        raise ExportError(f"unknown quant {quant!r}; choose one of {', '.join(ALL_QUANTS)}") from None


# --- names and permutation ---------------------------------------------------------------------

def permute_qk(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp's Q/K row order (convert_hf_to_gguf.py LlamaModel.permute): per head, interleave halves.

    Rows are the output dimension: works for weights (out, in), biases (out,) and lora_B (out, r).
    """
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2)
            .reshape(w.shape))


def gguf_name_of(hf_name: str, name_map: gguf.TensorNameMap) -> tuple[gguf.MODEL_TENSOR, str] | None:
    """HF state-dict name -> (tensor kind, GGUF name), or None when gguf does not know it."""
    return name_map.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))


def to_gguf_tensors(state: Mapping[str, Any], shape: ModelShape, *, drop_output: bool,
                    where: str) -> dict[str, np.ndarray]:
    """Merged HF state dict -> {GGUF name: fp32 array in GGUF row order}.

    `drop_output`: the model is tied, llama.cpp reuses token_embd; `lm_head.weight` is not written.
    """
    rules = arch_rules(shape.arch, where)
    name_map = gguf.get_tensor_name_map(rules.gguf_arch, shape.n_blocks)
    out: dict[str, np.ndarray] = {}
    for hf_name, tensor in state.items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue  # recomputed by llama.cpp from rope.freq_base
        found = gguf_name_of(hf_name, name_map)
        if found is None:
            raise ExportError(f"{where}: no GGUF name for tensor {hf_name!r} of a {shape.arch} model; "
                              "this model has layers the exporter does not know")
        kind, name = found
        if kind == gguf.MODEL_TENSOR.OUTPUT and drop_output:
            continue
        arr = _to_numpy_f32(tensor)
        if rules.permute_qk and kind == gguf.MODEL_TENSOR.ATTN_Q:
            arr = permute_qk(arr, shape.n_head, shape.n_head)
        elif rules.permute_qk and kind == gguf.MODEL_TENSOR.ATTN_K:
            arr = permute_qk(arr, shape.n_head, shape.n_head_kv)
        out[name] = arr
    return out


def _to_numpy_f32(tensor: Any) -> np.ndarray:
    if hasattr(tensor, "detach"):
        tensor = tensor.detach().to("cpu").float().numpy()
    return np.ascontiguousarray(tensor, dtype=np.float32)


def tensor_type_for(name: str, np_shape: tuple[int, ...], quant: str) -> QT:
    """Storage type of one tensor: 1-D tensors (norms, biases) F32; rows that do not fit the block size F16."""
    if len(np_shape) == 1 or name.endswith((".bias", "_norm.weight")):
        return QT.F32
    target = PY_QUANTS[quant]
    block, _ = gguf.GGML_QUANT_SIZES[target]
    if np_shape[-1] % block != 0:
        return QT.F16  # convert_hf_to_gguf's fallback for rows that do not split into blocks
    return target


def _nbytes(np_shape: tuple[int, ...], qtype: QT) -> int:
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(np_shape[:-1]) * (np_shape[-1] // block) * type_size


def encode_tensor(arr: np.ndarray, qtype: QT) -> np.ndarray:
    return gguf.quants.quantize(arr, qtype)


# --- streaming writer ---------------------------------------------------------------------------

@dataclass
class PlannedTensor:
    name: str
    np_shape: tuple[int, ...]
    qtype: QT
    produce: Callable[[], np.ndarray]  # called once, at write time: one tensor in memory at a time


def write_gguf(out: Path, arch: str, add_metadata: Callable[[gguf.GGUFWriter], None],
                tensors: Iterable[PlannedTensor]) -> Path:
    """Header and tensor infos first, then tensor data one by one, through `atomic_path`."""
    tensors = list(tensors)
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(path=None, arch=arch)
        try:
            add_metadata(writer)
            for t in tensors:
                if t.qtype in (QT.F32, QT.F16):
                    dtype = np.float32 if t.qtype == QT.F32 else np.float16
                    writer.add_tensor_info(t.name, t.np_shape, np.dtype(dtype), _nbytes(t.np_shape, t.qtype),
                                           raw_dtype=t.qtype)
                else:
                    byte_shape = gguf.quant_shape_to_byte_shape(t.np_shape, t.qtype)
                    writer.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8),
                                           _nbytes(t.np_shape, t.qtype), raw_dtype=t.qtype)
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for t in tensors:
                data = t.produce()
                if data.nbytes != _nbytes(t.np_shape, t.qtype):
                    raise ExportError(f"{out}: tensor {t.name} has {data.nbytes} bytes, expected "
                                      f"{_nbytes(t.np_shape, t.qtype)} ({t.qtype.name} {t.np_shape})")
                writer.write_tensor_data(data)
        finally:
            writer.close()
    return out


# --- merged model from a GGUF base --------------------------------------------------------------

def read_shape_from_gguf(reader: gguf.GGUFReader, where: str) -> ModelShape:
    arch = _field(reader, "general.architecture", where)
    arch_rules(arch, where)
    return ModelShape(arch=arch,
                      n_blocks=int(_field(reader, f"{arch}.block_count", where)),
                      n_head=int(_field(reader, f"{arch}.attention.head_count", where)),
                      n_head_kv=int(_field(reader, f"{arch}.attention.head_count_kv", where, default=None)
                                    or _field(reader, f"{arch}.attention.head_count", where)))


def _field(reader: gguf.GGUFReader, key: str, where: str, default: Any = ...) -> Any:
    f = reader.get_field(key)
    if f is None:
        if default is not ...:
            return default
        raise ExportError(f"{where}: metadata key {key!r} is missing; the file is not a complete model GGUF")
    return f.contents()


def _copy_metadata(reader: gguf.GGUFReader, writer: gguf.GGUFWriter, replace: Mapping[str, tuple[Any, Any]]):
    """Copy every key/value of `reader` into `writer` (strings as raw bytes), except those in `replace`."""
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == gguf.Keys.General.ARCHITECTURE:
            continue  # header fields and the architecture are written by GGUFWriter itself
        if field.name in replace:
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            sub = field.types[-1]
            if sub == gguf.GGUFValueType.STRING:
                value: Any = [bytes(field.parts[i]) for i in field.data]
            else:
                value = field.contents()
            if len(value) == 0:
                log.warning("metadata key %s is an empty array; GGUFWriter cannot write it, left out", field.name)
                continue
            writer.add_key_value(field.name, value, vtype, sub_type=sub)
        elif vtype == gguf.GGUFValueType.STRING:
            writer.add_key_value(field.name, bytes(field.parts[field.data[0]]), vtype)
        else:
            writer.add_key_value(field.name, field.contents(), vtype)
    for key, (value, vtype) in replace.items():
        writer.add_key_value(key, value, vtype)


def write_merged_from_gguf_base(base_gguf: Path, state: Mapping[str, Any], out: Path, quant: str) -> Path:
    """Copy the base file's metadata, replace its tensors by `state` (HF names, merged, fp32) in `quant`."""
    if quant not in PY_QUANTS:
        raise ExportError(f"quant {quant!r} is not written in Python; use one of {', '.join(PY_QUANTS)} "
                          "(K-quants are made from an f16 file by adapters.quantize)")
    base_gguf = Path(base_gguf)
    reader = gguf.GGUFReader(base_gguf)
    shape = read_shape_from_gguf(reader, str(base_gguf))
    base_names = [t.name for t in reader.tensors]
    new = to_gguf_tensors(state, shape, drop_output="output.weight" not in base_names, where=str(base_gguf))

    planned: list[PlannedTensor] = []
    for t in reader.tensors:
        np_shape = tuple(int(x) for x in reversed(t.shape.tolist()))  # GGUF ne order -> numpy order
        if t.name in new:
            arr = new.pop(t.name)
            if arr.shape != np_shape:
                raise ExportError(f"{base_gguf}: tensor {t.name} is {np_shape} in the base but {arr.shape} in "
                                  "the merged weights; the adapter was trained on a different base model")
            qtype = tensor_type_for(t.name, np_shape, quant)
            planned.append(PlannedTensor(t.name, np_shape, qtype, lambda a=arr, q=qtype: encode_tensor(a, q)))
        else:
            # a tensor the HF model does not have (e.g. rope_freqs): keep the base's bytes and type
            log.info("tensor %s has no merged counterpart; copied from the base as %s", t.name, t.tensor_type.name)
            planned.append(PlannedTensor(t.name, np_shape, QT(t.tensor_type), lambda d=t.data: np.asarray(d)))
    if new:
        raise ExportError(f"{base_gguf}: merged weights have tensors the base file lacks: {sorted(new)[:5]}; "
                          "the adapter was trained on a different base model")

    def add_metadata(w: gguf.GGUFWriter) -> None:
        _copy_metadata(reader, w, {gguf.Keys.General.FILE_TYPE: (int(file_type_name(quant)),
                                                                 gguf.GGUFValueType.UINT32)})

    return write_gguf(Path(out), shape.arch, add_metadata, planned)


def retype_gguf(src: Path, out: Path, quant: str) -> Path:
    """`src` with every tensor dequantised and stored as `quant` (f32, f16, bf16, q8_0); metadata copied.

    The rollout backend's copy of a quantised base: f16 of Q4_1 values keeps them to f16 rounding,
    which llama.cpp then computes with without quantising activations (adapters/llama_rollout.py).
    """
    if quant not in PY_QUANTS:
        raise ExportError(f"quant {quant!r} cannot be written in Python; use one of {', '.join(PY_QUANTS)}")
    src = Path(src)
    reader = gguf.GGUFReader(src)
    arch = _field(reader, "general.architecture", str(src))
    planned = []
    for t in reader.tensors:
        np_shape = tuple(int(x) for x in reversed(t.shape.tolist()))  # GGUF ne order -> numpy order
        qtype = tensor_type_for(t.name, np_shape, quant)

        def produce(t=t, np_shape=np_shape, qtype=qtype) -> np.ndarray:
            values = gguf.quants.dequantize(t.data, QT(t.tensor_type)).reshape(np_shape).astype(np.float32)
            return encode_tensor(values, qtype)

        planned.append(PlannedTensor(t.name, np_shape, qtype, produce))

    def add_metadata(w: gguf.GGUFWriter) -> None:
        _copy_metadata(reader, w, {gguf.Keys.General.FILE_TYPE: (int(file_type_name(quant)),
                                                                 gguf.GGUFValueType.UINT32)})

    return write_gguf(Path(out), arch, add_metadata, planned)


# --- merged model from an HF folder -------------------------------------------------------------

def _rope_settings(config: Mapping[str, Any], where: str) -> tuple[float, dict | None]:
    """(rope theta, scaling) from a transformers 4 (`rope_theta`, `rope_scaling`) or 5 (`rope_parameters`) config."""
    params = config.get("rope_parameters") or {}
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    scaling = config.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    if scaling:
        kind = scaling.get("rope_type") or scaling.get("type")
        if kind not in ("default", "linear"):
            raise ExportError(f"{where}: rope scaling {kind!r} is not supported by this exporter "
                              "(supported: none, linear)")
        if kind == "default":
            scaling = None
    return float(theta), scaling


def shape_from_hf_config(config: Mapping[str, Any], where: str) -> ModelShape:
    arch = config.get("model_type")
    arch_rules(str(arch), where)
    n_head = int(config["num_attention_heads"])
    return ModelShape(arch=str(arch), n_blocks=int(config["num_hidden_layers"]), n_head=n_head,
                      n_head_kv=int(config.get("num_key_value_heads") or n_head))


def _add_hf_hparams(w: gguf.GGUFWriter, config: Mapping[str, Any], name: str, quant: str, where: str) -> None:
    hidden, n_head = int(config["hidden_size"]), int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or hidden // n_head)
    theta, scaling = _rope_settings(config, where)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_context_length(int(config["max_position_embeddings"]))
    w.add_embedding_length(hidden)
    w.add_block_count(int(config["num_hidden_layers"]))
    w.add_feed_forward_length(int(config["intermediate_size"]))
    w.add_head_count(n_head)
    w.add_head_count_kv(int(config.get("num_key_value_heads") or n_head))
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    w.add_rope_dimension_count(head_dim)
    if head_dim != hidden // n_head:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if scaling:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(scaling["factor"]))
    w.add_vocab_size(int(config["vocab_size"]))
    w.add_file_type(int(file_type_name(quant)))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def write_merged_from_hf(folder: Path, state: Mapping[str, Any], out: Path, quant: str) -> Path:
    """An HF folder base (llama, qwen2): hyperparameters, vocabulary and merged tensors."""
    if quant not in PY_QUANTS:
        raise ExportError(f"quant {quant!r} is not written in Python; use one of {', '.join(PY_QUANTS)}")
    folder = Path(folder)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    shape = shape_from_hf_config(config, str(config_path))
    from .gguf_vocab import build_bpe_vocab  # here: gguf_vocab imports ExportError from this module

    vocab = build_bpe_vocab(folder, int(config["vocab_size"]))
    tensors = to_gguf_tensors(state, shape, drop_output=bool(config.get("tie_word_embeddings", False)),
                              where=str(folder))
    planned = []
    for name in gguf_order(tensors):
        arr = tensors[name]
        qtype = tensor_type_for(name, arr.shape, quant)
        planned.append(PlannedTensor(name, arr.shape, qtype, lambda a=arr, q=qtype: encode_tensor(a, q)))

    def add_metadata(w: gguf.GGUFWriter) -> None:
        _add_hf_hparams(w, config, folder.name, quant, str(config_path))
        vocab.add_to(w)

    return write_gguf(Path(out), shape.arch, add_metadata, planned)


def gguf_order(tensors: Mapping[str, np.ndarray]) -> list[str]:
    """token_embd first, then blocks in numeric order, then output norm/output (llama.cpp does not care)."""
    def key(name: str) -> tuple:
        if name.startswith("blk."):
            return (1, int(name.split(".")[1]), name)
        return (0 if name.startswith("token_embd") else 2, 0, name)
    return sorted(tensors, key=key)
