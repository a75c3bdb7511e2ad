"""Completion tokens per second of UniSD adaptation steps, whole and per stage, with peak memory and MFU.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/throughput.py [--preset edge] [--batch 8] [--tokens 64] [--steps 3]
    HF_HUB_OFFLINE=1 .venv/bin/python bench/throughput.py --compare-views     # edge: K views for 1/4 vs none
    HF_HUB_OFFLINE=1 .venv/bin/python bench/throughput.py --model llama-1b    # random weights, larger shape
    HF_HUB_OFFLINE=1 .venv/bin/python bench/throughput.py --tiny              # smoke run (seconds)
    HF_HUB_OFFLINE=1 .venv/bin/python bench/throughput.py --rollout-backend llamacpp  # rollouts in llama.cpp

Runs `--warmup` untimed steps, then `--steps` timed ones of `UniSDTrainer.step` on the bundled sample
user's items (each completion forced to exactly `--tokens` tokens: EOS is suppressed until then), and
reports the trainer's own stage clocks (rollout, teacher, views, student fwd+bwd, optimizer, EMA).
`--view-fraction` routes that share of each batch to the K auxiliary views, as the daemon's planner does.
`--rollout-backend llamacpp` samples the rollouts in llama.cpp from the base GGUF with the live LoRA swapped in
each step (adapters/llama_rollout.py): an f16 copy of the bundled Q4_1 file (`--rollout-weights`: f16, q8_0
or the base file itself), or, for random weights, an f32 (--tiny) or f16 GGUF of them written to a temp dir
first; "rollout_backend_totals" splits its adapter-swap seconds out.

MFU: the student stage's model FLOPs (bench/limit.py conventions: LoRA training 4N + attention + LoRA
terms over every prompt and completion position, LM head on the completion positions) divided by its
seconds and by this process's measured matmul rate at the model's shapes. Also given with the 6N
full-fine-tuning convention, which overstates a LoRA step's work by ~1.5x.

`--compare-views` alternates steps with and without the K views on the same batches (edge preset), so
load from other jobs hits both alike, and prints the cost ratio (issue 7 target: <= 1.6x).

Prints one JSON object and a short table, with the load average at start and end. Never asserts on time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))  # bench.siblings, and the repository's own packages

from bench.siblings import load as sibling  # noqa: E402  (after the path)

VIEW_TARGET_RATIO = 1.6  # issue 7: the K-view path for a quarter of the items costs at most 1.6x the cheap path

# random-weight shapes for throughput on larger models (no download: the bundled tokenizer is used)
TOKENIZER_ENV = "EDGE_UNISD_BENCH_TOKENIZER"
NAMED_CONFIGS: dict[str, dict[str, Any]] = {
    "smollm2-135m": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,  # the bundled shape
                     "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
                     "tie_word_embeddings": True},
    "smollm2-360m": {"hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32,
                     "num_attention_heads": 15, "num_key_value_heads": 5, "vocab_size": 49152,
                     "tie_word_embeddings": True},
    "smollm2-1.7b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
                     "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 49152,
                     "tie_word_embeddings": True},
    "llama-1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256, "tie_word_embeddings": True},
    "tiny": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "tie_word_embeddings": True},
}

# (normal, --tiny) defaults for flags left unset
DEFAULTS = {
    False: {"model": "bundled", "batch": 8, "tokens": 64, "steps": 3, "warmup": 1, "repeats": 5},
    True: {"model": "tiny", "batch": 2, "tokens": 4, "steps": 1, "warmup": 0, "repeats": 2},
}


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- memory --------------------------------------------------------------------------------------

def rss_gb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 1e9


def kib_to_gb(kib: float) -> float:
    """Linux's "kB" (ru_maxrss, /proc/*/status) are KiB: in GB of 10^9 bytes, as psutil's RSS is given here."""
    return kib * 1024 / 1e9


def peak_rss_gb() -> float:
    """This process's peak RSS so far. On Linux a child's ru_maxrss starts at its parent's peak at fork
    (kept across exec), so a small process started from a large one reports the large one's peak."""
    return kib_to_gb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


# --- model ---------------------------------------------------------------------------------------

def bundled_tokenizer():
    """The bundled SmolLM2 tokenizer, from the converted-model cache (converted once if missing), or from the
    folder $EDGE_UNISD_BENCH_TOKENIZER names: a machine without the bundled model (bench/gpu_check.sh)."""
    from transformers import AutoTokenizer

    from edge_unisd.modeling import gguf_to_hf_folder, resolve_base

    folder = os.environ.get(TOKENIZER_ENV) or gguf_to_hf_folder(resolve_base(None))
    tok = AutoTokenizer.from_pretrained(folder)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def random_model_config(spec: str, tokenizer):
    """A transformers config for random weights: a NAMED_CONFIGS key, a config.json (or folder), or a cached hub id."""
    from transformers import AutoConfig, LlamaConfig

    if spec in NAMED_CONFIGS:
        fields = {"vocab_size": len(tokenizer), **NAMED_CONFIGS[spec]}
        config = LlamaConfig(**fields)
    else:
        path = spec[:-len("config.json")] if spec.endswith("config.json") else spec
        try:
            config = AutoConfig.from_pretrained(path or ".")
        except Exception as e:  # OSError, ValueError, hub errors
            raise SystemExit(f"--model {spec!r}: not bundled, tiny, one of {', '.join(NAMED_CONFIGS)}, nor a "
                             f"readable config ({e}); offline, give a local config.json") from e
    if config.vocab_size < len(tokenizer):
        raise SystemExit(f"--model {spec!r}: vocab_size {config.vocab_size} is smaller than the bundled "
                         f"tokenizer's {len(tokenizer)}; random weights need the tokenizer's ids to fit")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # the bundled tokenizer's special ids
        setattr(config, key, getattr(tokenizer, key))
    return config


def load_model(spec: str, *, device: str | None = None, dtype: str | None = None, seed: int = 0,
               quantization: str = "none"):
    """`bundled` (SmolLM2-135M via edge_unisd.modeling.load_base) or random weights of another shape.

    Returns edge_unisd.modeling.LoadedModel: frozen base in eval mode, like load_base. `quantization="nf4"`:
    a QLoRA base; random weights then go through a temporary folder, as load_base quantises on load.
    """
    import torch

    from edge_unisd.modeling import BaseSource, LoadedModel, load_base, pick_device_dtype

    if spec == "bundled":
        return load_base(device=device, dtype=dtype, quantization=quantization)
    from transformers import AutoModelForCausalLM

    from edge_unisd.heap import configure_heap

    configure_heap()  # as load_base does
    tok = bundled_tokenizer()
    config = random_model_config(spec, tok)
    dev, dt = pick_device_dtype(device, dtype)
    torch.manual_seed(seed)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(config, dtype=dt)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    source = BaseSource("hf", Path(f"/random/{spec}"), f"random-{spec}-{seed}")
    if quantization != "none":
        import dataclasses
        import tempfile

        with tempfile.TemporaryDirectory(prefix="bench-qlora-") as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            del model
            loaded = load_base(Path(tmp), device=device, dtype=dtype, quantization=quantization)
        return dataclasses.replace(loaded, source=source)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedModel(model, tok, source, dev, dt)


def model_summary(name: str, loaded) -> dict[str, Any]:
    limit = sibling("limit")
    config = loaded.model.config
    flops = limit.model_flops_per_token(config)
    return {"name": name, "params_total": sum(p.numel() for p in loaded.model.parameters()),
            "params_nonembedding": int(flops["params_nonembedding"]), "vocab_size": int(config.vocab_size),
            "hidden_size": int(config.hidden_size), "layers": int(config.num_hidden_layers),
            "device": str(loaded.device), "dtype": str(loaded.dtype).replace("torch.", "")}


# --- workload ------------------------------------------------------------------------------------

def bench_items(count: int):
    """`count` sample items with a reference answer (c_0 = profile + reference), cycled if needed."""
    from edge_unisd.sample_data import load_sample_items

    pool = [it for it in load_sample_items() if it.reference]
    return [pool[i % len(pool)] for i in range(count)], pool


def step_batches(items: Sequence, batch: int, steps: int) -> list[list]:
    """Consecutive batches: step s trains items[s*batch:(s+1)*batch] (TRL's unshuffled sampler does the same)."""
    return [list(items[s * batch:(s + 1) * batch]) for s in range(steps)]


def views_per_batch(batch: int, fraction: float) -> int:
    """Items of a batch routed to the K views: a share, at least one when the share is positive."""
    return 0 if fraction <= 0 else min(batch, max(1, round(fraction * batch)))


def method_overrides(*, batch: int, tokens: int, lora_rank: int, lr: float = 1e-4, seed: int = 0,
                     gradient_checkpointing: bool = True, temperature: float = 1.0,
                     rollout_backend: str = "hf", activation_budget_mb: int | None = None) -> dict[str, Any]:
    """MethodConfig overrides shared by every bench run: exactly `tokens` completion tokens per item,
    one micro-batch per step, sampling at `temperature` with no top-p (as TRL's SDFT defaults).
    `activation_budget_mb` None keeps the config's default."""
    budget = {} if activation_budget_mb is None else {"activation_budget_mb": activation_budget_mb}
    return {"seed": seed, "gradient_checkpointing": gradient_checkpointing, **budget,
            "rollout": {"max_new_tokens": tokens, "min_new_tokens": tokens, "temperature": temperature, "top_p": 1.0,
                        "backend": rollout_backend},
            "optim": {"batch_size": batch, "micro_batch_size": batch, "lr": lr, "weight_decay": 0.0,
                      "max_grad_norm": 1.0},
            "lora": {"rank": lora_rank, "alpha": 2.0 * lora_rank, "dropout": 0.0, "target_modules": "all-linear"}}


def build_rollout_backend(kind: str, loaded, *, tiny: bool, weights: str = "auto", lora: str = "auto"):
    """None for HF generate; else LlamaCppRollout on the base GGUF (random weights: exported to one first),
    holding `weights` (auto: as the daemon resolves it for this model's dtype), the LoRA applied as `lora`
    says (auto, merged, adapter)."""
    if kind == "hf":
        return None
    import tempfile

    import torch

    from adapters.llama_rollout import LlamaCppRollout, RolloutBackendError, resolve_rollout_weights

    try:
        weights = resolve_rollout_weights(weights, loaded.dtype)
        if loaded.source.kind == "gguf":
            return LlamaCppRollout(loaded.source.path, loaded.tokenizer, n_threads=torch.get_num_threads(),
                                   weights=weights, lora=lora)
        # the base GGUF is mapped by llama.cpp, so its temp dir can go as soon as it is loaded
        with tempfile.TemporaryDirectory(prefix="bench-rollout-") as tmp:
            path = random_weights_gguf(loaded, Path(tmp), "f32" if tiny else "f16")
            return LlamaCppRollout(path, loaded.tokenizer, n_threads=torch.get_num_threads(), weights=weights,
                                   lora=lora)
    except RolloutBackendError as e:
        raise SystemExit(f"--rollout-backend llamacpp: {e}") from e


def random_weights_gguf(loaded, folder: Path, quant: str) -> Path:
    """Random-weight models have no file: write their config, tokenizer and weights as one GGUF."""
    from adapters.gguf_export import ExportError, write_merged_from_hf

    hf = folder / "hf"
    loaded.model.config.save_pretrained(hf)
    loaded.tokenizer.save_pretrained(hf)
    try:
        return write_merged_from_hf(hf, loaded.model.state_dict(), folder / f"base-{quant}.gguf", quant)
    except ExportError as e:
        raise SystemExit(f"--rollout-backend llamacpp: this random model cannot be written as GGUF: {e}") from e


def build_trainer(loaded, cfg, pool: Sequence, total_steps: int, seed: int = 0, rollout_backend=None):
    """A fresh LoRA adapter on the frozen base and a UniSDTrainer for it (profile = the sample user's)."""
    import torch

    from edge_unisd.modeling import attach_lora
    from edge_unisd.sample_data import load_profile
    from edge_unisd.trainer import UniSDTrainer

    torch.manual_seed(seed)  # the same initial adapter every run
    model = attach_lora(loaded.model, rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                        target_modules=cfg.lora.target_modules)
    return UniSDTrainer(model, loaded.tokenizer, cfg, total_steps=total_steps, profile=load_profile(), pool=pool,
                        rollout_backend=rollout_backend)


def timed_step(trainer, batch: Sequence, view_fraction: float) -> tuple[Any, float]:
    routed = {it.id for it in batch[:views_per_batch(len(batch), view_fraction)]}
    t0 = time.perf_counter()
    report = trainer.step(batch, routed)
    return report, time.perf_counter() - t0


def student_prompt_lengths(tokenizer, batch: Sequence) -> list[int]:
    from edge_unisd.views import render_prompt

    return [len(render_prompt(tokenizer, it.messages, None)) for it in batch]


# --- figures -------------------------------------------------------------------------------------

def _rate(tokens: float, seconds: float) -> float | None:
    return tokens / seconds if seconds > 1e-9 else None


def summarise_steps(runs: Sequence[tuple[Any, float]]) -> dict[str, Any]:
    """Totals over timed steps: completion tokens/s of the whole step and of each stage."""
    from edge_unisd.trainer import STAGES

    tokens = sum(r.tokens["completion"] for r, _ in runs)
    view_tokens = sum(r.tokens["view_tokens"] for r, _ in runs)
    seconds = sum(s for _, s in runs)
    stages = {k: sum(r.stage_seconds.get(k, 0.0) for r, _ in runs) for k in STAGES}
    return {
        "steps": len(runs), "completion_tokens": tokens, "view_items": sum(r.tokens["view_items"] for r, _ in runs),
        "view_tokens": view_tokens, "round_seconds": seconds, "seconds_per_step": seconds / max(1, len(runs)),
        "step_seconds": [s for _, s in runs], "tokens_per_s": _rate(tokens, seconds),
        "stage_seconds": stages, "stage_tokens_per_s": {k: _rate(tokens, v) for k, v in stages.items()},
        "stage_share": {k: (v / seconds if seconds > 0 else 0.0) for k, v in stages.items()},
        "views_rescored_tokens_per_s": _rate(view_tokens, stages["views"]),
    }


def model_flop_utilisation(config, tokenizer, batches: Sequence[Sequence], summary: Mapping[str, Any],
                           lora_rank: int, matmul_flops: float) -> dict[str, float | None]:
    """Useful model FLOPs of the student fwd+bwd and of the rollout over their seconds, / measured FLOP/s."""
    limit = sibling("limit")
    prompt = [n for b in batches for n in student_prompt_lengths(tokenizer, b)]
    completion = summary["completion_tokens"]
    items = len(prompt)
    mean_len = completion / max(1, items)
    context = sum(prompt) / max(1, items) + mean_len  # sequence length; limit halves it for causal attention
    f = limit.model_flops_per_token(config, context=int(context), lora_rank=lora_rank)
    decoder_tokens = sum(prompt) + completion - items  # the last completion token predicts nothing
    student_lora = decoder_tokens * f["train_lora"] + completion * f["lm_head_train"]
    student_6n = decoder_tokens * f["train_6n"] + completion * 3.0 * f["lm_head_forward"]
    rollout = (sum(prompt) + completion) * f["forward"] + completion * f["lm_head_forward"]  # prefill + decode
    st, ro = summary["stage_seconds"]["student"], summary["stage_seconds"]["rollout"]

    def mfu(flops: float, seconds: float) -> float | None:
        return flops / seconds / matmul_flops if seconds > 1e-9 and matmul_flops > 0 else None

    return {"student_lora": mfu(student_lora, st), "student_6n": mfu(student_6n, st), "rollout": mfu(rollout, ro),
            "student_model_flops": student_lora, "student_decoder_tokens": decoder_tokens,
            "mean_prompt_tokens": sum(prompt) / max(1, items)}


def compare_views(with_views: Mapping[str, Any], without: Mapping[str, Any], fraction: float) -> dict[str, Any]:
    """Cost of the K-view path: seconds per step with `fraction` of each batch routed vs none."""
    stage_ratio = {k: (v / without["stage_seconds"][k] if without["stage_seconds"][k] > 1e-9 else None)
                   for k, v in with_views["stage_seconds"].items()}
    return {"view_fraction": fraction, "seconds_per_step_with": with_views["seconds_per_step"],
            "seconds_per_step_without": without["seconds_per_step"],
            "ratio": with_views["seconds_per_step"] / without["seconds_per_step"],
            "median_step_ratio": (statistics.median(with_views["step_seconds"])
                                  / statistics.median(without["step_seconds"])),
            "stage_seconds_without": without["stage_seconds"], "stage_ratio": stage_ratio,
            "target_max_ratio": VIEW_TARGET_RATIO}


# --- main ----------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None,
                   help=f"bundled (default) | {' | '.join(NAMED_CONFIGS)} | a config.json (random weights)")
    p.add_argument("--preset", default="edge")
    p.add_argument("--batch", type=int, default=None, help="items per step (default 8)")
    p.add_argument("--tokens", type=int, default=None, help="completion tokens per item, min = max (default 64)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 1)")
    p.add_argument("--view-fraction", type=float, default=0.25, help="share of each batch given the K views")
    p.add_argument("--compare-views", action="store_true",
                   help="alternate steps with --view-fraction and with none (edge) and print the cost ratio")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--no-checkpointing", action="store_true", help="keep decoder activations (more memory)")
    p.add_argument("--activation-budget-mb", type=int, default=None,
                   help="MB of decoder activations kept instead of recomputed (default: the config's)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--quantize", choices=("none", "nf4"), default="none",
                   help="nf4: QLoRA, the base's linear weights in 4-bit (bitsandbytes), computed in --dtype")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: every CPU)")
    p.add_argument("--repeats", type=int, default=None, help="matmul timing repeats for the MFU ceiling")
    p.add_argument("--tiny", action="store_true", help="smoke run: tiny random llama, 1 step, 4 tokens")
    from adapters.llama_rollout import LORA_MODES, WEIGHTS_SETTINGS

    p.add_argument("--rollout-weights", choices=WEIGHTS_SETTINGS, default="auto",
                   help="llamacpp: what llama.cpp samples from (adapters.llama_rollout.rollout_weights_file)")
    p.add_argument("--rollout-lora", choices=LORA_MODES, default="auto",
                   help="llamacpp: the live LoRA merged into a private copy of the weights, or applied as an adapter")
    p.add_argument("--rollout-backend", choices=("hf", "llamacpp"), default="hf",
                   help="rollout engine: hf generate (default) or llama.cpp on the base GGUF with the live LoRA")
    return p


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    for key, value in DEFAULTS[args.tiny].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    import torch

    from edge_unisd.config import load_method_config

    limit = sibling("limit")
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    load_start = limit.load_average()
    cfg = load_method_config(args.preset, method_overrides(
        batch=args.batch, tokens=args.tokens, lora_rank=args.lora_rank,
        gradient_checkpointing=not args.no_checkpointing, rollout_backend=args.rollout_backend,
        activation_budget_mb=args.activation_budget_mb))
    if args.compare_views and not (cfg.uses_views and cfg.agreement_routing == "given"):
        raise SystemExit(f"--compare-views needs a preset that routes K views to given items (edge), "
                         f"not {args.preset!r}")
    if args.quantize != "none" and args.rollout_backend == "llamacpp":
        raise SystemExit("--quantize nf4 with --rollout-backend llamacpp: llama.cpp would sample from the GGUF's "
                         "weights, not the 4-bit ones trained on (the daemon uses HF generate then)")
    loaded = load_model(args.model, device=args.device, dtype=args.dtype, quantization=args.quantize)
    rss_loaded, peak_at_load = rss_gb(), peak_rss_gb()
    per_step = 2 if args.compare_views else 1
    items, pool = bench_items(args.batch * (args.warmup + args.steps))
    batches = step_batches(items, args.batch, args.warmup + args.steps)
    backend = build_rollout_backend(args.rollout_backend, loaded, tiny=args.tiny, weights=args.rollout_weights,
                                    lora=args.rollout_lora)
    trainer = build_trainer(loaded, cfg, pool, total_steps=(args.warmup + args.steps) * per_step,
                            rollout_backend=backend)

    # matmul rate at this model's shapes and dtype, measured in this process before the steps
    prompt_len = statistics.mean(student_prompt_lengths(loaded.tokenizer, batches[0]))
    shapes = limit.model_matmul_shapes(loaded.model.config, rows=int(args.batch * (prompt_len + args.tokens)))
    matmul = limit.measure_matmul_flops(shapes, dtype=loaded.dtype, device=str(loaded.device), repeats=args.repeats,
                                        min_seconds=0.005 if args.tiny else 0.05)

    cuda = loaded.device.type == "cuda"
    for i in range(args.warmup):
        progress(f"warm-up step {i + 1}/{args.warmup}")
        trainer.step(batches[i], {it.id for it in batches[i][:views_per_batch(args.batch, args.view_fraction)]})
    if cuda:
        torch.cuda.reset_peak_memory_stats(loaded.device)
    runs, cheap = [], []
    for i, batch in enumerate(batches[args.warmup:]):
        if args.compare_views and i % 2:  # alternate which goes first, so drift in load hits both alike
            cheap.append(timed_step(trainer, batch, 0.0))
        runs.append(timed_step(trainer, batch, args.view_fraction))
        if args.compare_views and not i % 2:
            cheap.append(timed_step(trainer, batch, 0.0))
        progress(f"step {i + 1}/{args.steps}: {runs[-1][1]:.1f} s"
                 + (f" (without views {cheap[-1][1]:.1f} s)" if cheap else ""))
    summary = summarise_steps(runs)
    timed_batches = batches[args.warmup:]
    mfu = model_flop_utilisation(loaded.model.config, loaded.tokenizer, timed_batches, summary, args.lora_rank,
                                 matmul["best_flops"])
    return {
        "bench": "throughput",
        "machine": {**limit.machine_info(str(loaded.device)), "load_avg_start": load_start,
                    "load_avg_end": limit.load_average()},
        "model": model_summary(args.model, loaded),
        "settings": {"preset": args.preset, "batch": args.batch, "tokens": args.tokens, "steps": args.steps,
                     "warmup_steps": args.warmup, "view_fraction": args.view_fraction,
                     "view_items_per_step": views_per_batch(args.batch, args.view_fraction)
                     if cfg.agreement_routing == "given" else (args.batch if cfg.uses_views else 0),
                     "num_views": cfg.num_views, "lora_rank": args.lora_rank,
                     "gradient_checkpointing": cfg.gradient_checkpointing,
                     "activation_budget_mb": cfg.activation_budget_mb, "kept_layers": trainer.kept_layers,
                     "chunk_tokens": cfg.chunk_tokens, "rollout_backend": args.rollout_backend,
                     "quantization": loaded.quantization,
                     "rollout_lora": backend.lora_mode if backend else None},
        "rollout_backend_totals": dict(backend.totals) if backend else None,
        **summary,
        "peak_rss_gb": peak_rss_gb(), "rss_after_load_gb": rss_loaded, "peak_rss_at_load_gb": peak_at_load,
        "peak_cuda_gb": torch.cuda.max_memory_allocated(loaded.device) / 1e9 if cuda else None,
        "limit": {"dtype": matmul["dtype"], "matmul_best_flops": matmul["best_flops"],
                  "matmul_median_flops": matmul["median_flops"], "matmul_shapes": matmul["shapes"]},
        "mfu": mfu,
        "compare_views": compare_views(summary, summarise_steps(cheap), args.view_fraction) if cheap else None,
    }


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None or not math.isfinite(x) else format(x, spec)


def print_table(r: Mapping[str, Any]) -> None:
    m, s = r["machine"], r["settings"]
    print(f"\n{'machine':24s} {m['processor']} x{m['cpus']} ({m['torch_threads']} threads, {m['device']})   "
          f"load {m['load_avg_start']} -> {m['load_avg_end']}")
    quantized = "" if s.get("quantization", "none") == "none" else f", {s['quantization']} base"
    print(f"{'model / preset':24s} {r['model']['name']} ({r['model']['dtype']}{quantized}) / {s['preset']}   "
          f"batch {s['batch']} x {s['tokens']} tokens, {s['steps']} steps, "
          f"{s['view_items_per_step']} items/step get K={s['num_views']} views, rollouts: {s['rollout_backend']}")
    print(f"{'whole step':24s} {_fmt(r['tokens_per_s'])} completion tokens/s   {r['seconds_per_step']:.2f} s/step")
    for stage, sec in r["stage_seconds"].items():
        print(f"{'  ' + stage:24s} {sec / max(1, r['steps']):7.2f} s/step  {r['stage_share'][stage]:5.1%}  "
              f"{_fmt(r['stage_tokens_per_s'][stage], '.0f'):>7s} tokens/s")
    mem = f"peak RSS {r['peak_rss_gb']:.2f} GB (after load {r['rss_after_load_gb']:.2f})"
    if s.get("gradient_checkpointing"):
        mem += (f"   activations of {s['kept_layers']}/{r['model']['layers']} layers kept"
                f" ({s['activation_budget_mb']} MB budget)")
    if r["peak_cuda_gb"] is not None:
        mem += f"   peak CUDA {r['peak_cuda_gb']:.2f} GB"
    print(f"{'memory':24s} {mem}")
    mfu = r["mfu"]
    print(f"{'MFU (student fwd+bwd)':24s} {_fmt(100 * (mfu['student_lora'] or math.nan))}% LoRA FLOPs, "
          f"{_fmt(100 * (mfu['student_6n'] or math.nan))}% 6N   rollout {_fmt(100 * (mfu['rollout'] or math.nan))}%"
          f"   of {r['limit']['matmul_best_flops'] / 1e9:.1f} GFLOP/s measured")
    c = r["compare_views"]
    if c:
        print(f"{'K views vs none':24s} {c['seconds_per_step_with']:.2f} / {c['seconds_per_step_without']:.2f} s/step "
              f"= {c['ratio']:.2f}x (target <= {c['target_max_ratio']}x)")


def main(argv: Sequence[str] | None = None) -> int:
    result = run(argv)
    print(json.dumps(result))
    print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
