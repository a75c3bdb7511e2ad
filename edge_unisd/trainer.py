"""One UniSD step and a round of steps, with checkpoint/resume.

A step reads as the method (METHOD.md): rollout -> primary teacher -> K views for the routed items
-> loss (clipped divergence x reliability weights + contrastive + feature) -> AdamW step on LoRA ->
EMA update. The planner decides which items get the K views; the trainer only takes their ids and
returns each item's uncertainty so the planner can route the next round.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from edge_unisd.atomic_io import atomic_path
from edge_unisd.attention import use_gqa_attention
from edge_unisd.checkpointing import apply_activation_budget, checkpointable_layers, enable_checkpointing
from edge_unisd.config import MethodConfig
from edge_unisd.heap import configure_heap, release_free_memory
from edge_unisd.items import Item
from edge_unisd.lora_fused import fuse_lora_layers
from edge_unisd.losses import (
    clip_cap,
    contrastive_margin_loss,
    feature_matching_loss,
    kept_signal_share,
    sequence_agreement_weights,
    token_agreement_weights,
    weighted_token_mean,
)
from edge_unisd.rollout import Rollout, eos_token_ids, generate_completions, pack_completions
from edge_unisd.scoring import (
    chunked_distill_terms,
    chunked_token_logps,
    completion_hidden,
    completion_hidden_shared_prefix,
    forward_tokens,
    lm_head_of,
    view_token_logps,
)
from edge_unisd.teacher import STUDENT_ADAPTER, EmaAdapter, lora_parameters, teacher_weights
from edge_unisd.views import (
    ViewBuilder,
    embed_texts,
    negative_context,
    primary_context,
    render_prompt,
    token_idf,
)

log = logging.getLogger(__name__)

STAGES = ("rollout", "teacher", "views", "student", "optimizer", "ema")


class RolloutBackend(Protocol):
    """Another engine for the rollout stage (e.g. adapters.llama_rollout.LlamaCppRollout): same contract
    as `generate_completions`, sampling from `model` as it is now (active adapter, or none when disabled)."""

    def generate(self, model, prompts: list[list[int]], *, max_new_tokens: int, temperature: float, top_p: float,
                 min_new_tokens: int, seed: int | None) -> Rollout: ...


@dataclass
class StepReport:
    """What one optimizer step did: logged, stored with the round, fed to the cost model and planner."""

    step: int
    lr: float
    loss: float
    terms: dict[str, float]
    weights: dict[str, float]
    clip_fraction: float
    grad_norm: float
    tokens: dict[str, int]
    stage_seconds: dict[str, float]
    item_uncertainty: dict[str, float] = field(default_factory=dict)
    item_entropy: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


class _StageTimer:
    """Wall seconds per stage of a step (CUDA synchronised, so GPU time lands in the right stage)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.seconds = device, dict.fromkeys(STAGES, 0.0)

    @contextlib.contextmanager
    def run(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds[stage] += time.perf_counter() - t0


def lr_lambda(warmup_steps: int, total_steps: int, schedule: str) -> Callable[[int], float]:
    """Linear warm-up, then cosine to zero (or constant). Step counts from 0."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


class UniSDTrainer:
    """Owns the optimizer, the schedule and the EMA adapter of one PEFT model (adapter "default")."""

    def __init__(self, model, tokenizer, cfg: MethodConfig, *, total_steps: int, profile: str | None = None,
                 pool: Sequence[Item] = (), rollout_backend: RolloutBackend | None = None) -> None:
        if cfg.rollout.backend == "llamacpp" and rollout_backend is None:
            raise ValueError("rollout.backend is 'llamacpp' but no rollout_backend was given: pass "
                             "rollout_backend=LlamaCppRollout(base_gguf, tokenizer) (adapters.llama_rollout), "
                             "built from the base GGUF this model was loaded from, or set rollout.backend to 'hf'")
        self.rollout_backend = rollout_backend
        configure_heap()  # how freed activations go back to the OS (see edge_unisd.heap)
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.profile = profile
        self.device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_id = eos_token_ids(model, tokenizer)[0]
        self.step_count = 0
        self.total_steps = max(1, total_steps)
        if cfg.gradient_checkpointing:
            enable_checkpointing(model)
        # decoder layers whose activations the last student forward kept instead of recomputing them
        self.kept_layers = 0 if cfg.gradient_checkpointing else len(checkpointable_layers(model))
        self.ema = EmaAdapter(model, cfg.ema_decay, cfg.ema_every) if cfg.teacher == "ema" else None
        fuse_lora_layers(model)  # one addmm per LoRA layer instead of matmul, scale and add (edge_unisd.lora_fused)
        use_gqa_attention(model)  # CPU attention on the grouped KV heads, no per-head K/V copies (edge_unisd.attention)
        params = list(lora_parameters(model, STUDENT_ADAPTER).values())
        self.optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
        warmup = math.ceil(cfg.optim.warmup_ratio * self.total_steps) if cfg.optim.warmup_ratio > 0 else 0
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(warmup, self.total_steps, cfg.optim.schedule))
        self.views = self._build_views(list(pool)) if cfg.uses_views else None
        self._base_prefix_memo: dict = {}  # KV cache of the teacher prompts' shared prefix (base weights only)

    # --- views -----------------------------------------------------------------------------------
    def _embed(self, texts: Sequence[str]) -> torch.Tensor:
        return embed_texts(self.tokenizer, texts, self._idf)

    def _build_views(self, pool: list[Item]) -> ViewBuilder:
        texts = [it.prompt_text for it in pool]
        self._idf = token_idf(self.tokenizer, texts)
        emb = self._embed(texts) if texts else None
        return ViewBuilder(pool=pool, profile=self.profile, kinds=self.cfg.view_kinds, num_views=self.cfg.num_views,
                           examples_per_view=self.cfg.view_examples, seed=self.cfg.seed, pool_embeddings=emb)

    def _routed(self, items: Sequence[Item], view_item_ids: Collection[str]) -> list[int]:
        if not self.cfg.uses_views:
            return []
        if self.cfg.agreement_routing == "all":
            return list(range(len(items)))
        wanted = set(view_item_ids)
        return [i for i, it in enumerate(items) if it.id in wanted]

    # --- one optimizer step ----------------------------------------------------------------------
    def step(self, items: Sequence[Item], view_item_ids: Collection[str] = ()) -> StepReport:
        """One optimizer step over `items` (split into micro-batches; gradients accumulate)."""
        if not items:
            raise ValueError("a training step needs at least one item")
        timer = _StageTimer(self.device)
        micro = self.cfg.optim.micro_batch_size
        sums: dict[str, float] = {}
        uncertainty, entropy = {}, {}
        tokens = {"completion": 0, "view_items": 0, "view_tokens": 0, "negative_items": 0, "K": self.cfg.num_views}
        self.optimizer.zero_grad(set_to_none=True)
        for start in range(0, len(items), micro):
            chunk = items[start:start + micro]
            scale = len(chunk) / len(items)
            if self.cfg.mode == "sft":
                stats = self._sft_micro_step(chunk, scale, timer)
            else:
                stats = self._distill_micro_step(chunk, view_item_ids, scale, timer)
            for k, v in stats.pop("sums").items():
                sums[k] = sums.get(k, 0.0) + v * scale
            for k in ("completion", "view_items", "view_tokens", "negative_items"):
                tokens[k] += stats["tokens"].get(k, 0)
            uncertainty.update(stats["uncertainty"])
            entropy.update(stats["entropy"])
            sums["weight_min"] = min(sums.get("weight_min", 1.0), stats["weight_min"])
        with timer.run("optimizer"):
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.optim.max_grad_norm))
            lr = self.scheduler.get_last_lr()[0]
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        with timer.run("ema"):
            if self.ema is not None:
                self.ema.update(self.step_count)
        release_free_memory()  # the step's activations are gone: hand their pages back between steps
        terms = {k: sums.get(k, 0.0) for k in ("kd", "contrastive", "feature", "sft")}
        report = StepReport(
            step=self.step_count, lr=lr, loss=sums.get("loss", 0.0), terms=terms,
            weights={"mean": sums.get("weight_mean", 1.0), "min": sums.get("weight_min", 1.0),
                     "kd_kept": sums.get("kd_kept", 1.0)},
            clip_fraction=sums.get("clip_fraction", 0.0), grad_norm=grad_norm, tokens=tokens,
            stage_seconds=timer.seconds, item_uncertainty=uncertainty, item_entropy=entropy)
        log.info("step %d loss %.4f kd %.4f w_mean %.3f w_min %.3f kd_kept %.3f clipped %.3f tokens %d",
                 report.step, report.loss, terms["kd"], report.weights["mean"], report.weights["min"],
                 report.weights["kd_kept"], report.clip_fraction, tokens["completion"])
        return report

    def _prompts(self, items: Sequence[Item], contexts: Sequence[str | None]) -> list[list[int]]:
        return [render_prompt(self.tokenizer, it.messages, ctx) for it, ctx in zip(items, contexts, strict=True)]

    def _rollout(self, prompts: list[list[int]]) -> Rollout:
        """Completions from the model as it is now: the given backend (llama.cpp), else batched HF generate."""
        r = self.cfg.rollout
        kw = dict(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                  min_new_tokens=r.min_new_tokens, seed=self.cfg.seed * 1_000_003 + self.step_count)
        if self.rollout_backend is not None:
            return self.rollout_backend.generate(self.model, prompts, **kw)
        return generate_completions(self.model, self.tokenizer, prompts, **kw)

    def _student_hidden(self, prompts: list[list[int]], rollout: Rollout) -> torch.Tensor:
        """The student's training forward, recomputing only the layers the activation budget does not cover."""
        if self.cfg.gradient_checkpointing:
            tokens = forward_tokens(self.model, prompts, rollout)
            self.kept_layers = apply_activation_budget(self.model, tokens, self.cfg.activation_budget_mb << 20)
        return completion_hidden(self.model, prompts, rollout, self.pad_id)

    def _distill_micro_step(self, items: Sequence[Item], view_item_ids: Collection[str], scale: float,
                            timer: _StageTimer) -> dict:
        cfg, model = self.cfg, self.model
        student_prompts = self._prompts(items, [None] * len(items))
        # --- rollout: the student answers the bare prompt (on-policy) ---
        with timer.run("rollout"):
            rollout = self._rollout(student_prompts)
        tokens_B_L, mask_B_L = rollout.completion_ids, rollout.completion_mask
        # --- primary teacher: same weights (base/live/EMA) + privileged context c_0 ---
        with timer.run("teacher"), torch.no_grad():
            model.eval()
            teacher_prompts = self._prompts(items, [primary_context(it, self.profile) for it in items])
            with teacher_weights(model, cfg.teacher, self.ema):
                # the profile is a prefix shared by every teacher prompt: run it once, share its KV cache
                memo = self._base_prefix_memo if cfg.teacher == "base" else None
                teacher_h_B_L_H = completion_hidden_shared_prefix(model, teacher_prompts, rollout, self.pad_id,
                                                                  cfg.score_batch_size, memo=memo)
        # --- K auxiliary views for the routed items only (the expensive part) ---
        weights = None
        weight_mean, weight_min = 1.0, 1.0
        routed = self._routed(items, view_item_ids)
        with timer.run("views"), torch.no_grad():
            if routed:
                weights, weight_mean, weight_min = self._agreement_weights(items, routed, rollout)
            neg_idx = [i for i, it in enumerate(items) if negative_context(it)] if cfg.contrastive_weight else []
            neg_logps = self._negative_logps(items, neg_idx, rollout) if neg_idx else None
        # --- student forward + loss + backward ---
        with timer.run("student"):
            model.train()
            student_h_B_L_H = self._student_hidden(student_prompts, rollout)
            terms = chunked_distill_terms(student_h_B_L_H, teacher_h_B_L_H, lm_head_of(model), tokens_B_L,
                                          kind=cfg.divergence, beta=cfg.jsd_beta, temperature=cfg.temperature,
                                          chunk_tokens=cfg.chunk_tokens, logps_grad=neg_logps is not None)
            div_B_L = terms.divergence
            clip_fraction = 0.0
            if cfg.clip:
                cap = clip_cap(div_B_L, mask_B_L, cfg.clip_cap, cfg.clip_quantile)
                if cap is not None:
                    clipped = (div_B_L.detach() > cap) & mask_B_L.bool()
                    clip_fraction = float(clipped.sum() / mask_B_L.sum().clamp_min(1))
                    div_B_L = div_B_L.clamp(max=cap)
            kd = weighted_token_mean(div_B_L, mask_B_L, weights)
            kd_kept = kept_signal_share(div_B_L.detach(), mask_B_L, weights)
            loss = kd
            con = torch.zeros((), device=self.device)
            if neg_logps is not None:
                idx = torch.tensor(neg_idx, device=self.device)
                con = contrastive_margin_loss(terms.student_logps[idx], terms.teacher_logps[idx], neg_logps,
                                              mask_B_L[idx], margin=cfg.contrastive_margin)
                loss = loss + cfg.contrastive_weight * con
            feat = torch.zeros((), device=self.device)
            if cfg.feature_weight:
                feat = feature_matching_loss(student_h_B_L_H, teacher_h_B_L_H, mask_B_L)
                loss = loss + cfg.feature_weight * feat
            (loss * scale).backward()
        model.eval()
        # --- per-item uncertainty for the planner: mean clipped divergence and student entropy ---
        m = mask_B_L
        per_item_div = ((div_B_L.detach() * m).sum(-1) / m.sum(-1).clamp_min(1)).tolist()
        per_item_ent = ((terms.student_entropy * m).sum(-1) / m.sum(-1).clamp_min(1)).tolist()
        return {
            "sums": {"loss": loss.item(), "kd": kd.item(), "contrastive": con.item(), "feature": feat.item(),
                     "weight_mean": weight_mean, "kd_kept": kd_kept, "clip_fraction": clip_fraction},
            "weight_min": weight_min,
            "tokens": {"completion": rollout.num_tokens, "view_items": len(routed), "negative_items": len(neg_idx),
                       # completion tokens rescored by the K views: what the cost model charges views for
                       "view_tokens": int(mask_B_L[routed].sum()) * cfg.num_views if routed else 0},
            "uncertainty": {it.id: d for it, d in zip(items, per_item_div, strict=True)},
            "entropy": {it.id: e for it, e in zip(items, per_item_ent, strict=True)},
        }

    def _agreement_weights(self, items: Sequence[Item], routed: list[int], rollout: Rollout
                           ) -> tuple[torch.Tensor, float, float]:
        """Reliability weights from K views: token (B, L) or sequence (B,); non-routed items keep 1."""
        cfg = self.cfg
        sub_items = [items[i] for i in routed]
        sub = Rollout(rollout.completion_ids[routed], rollout.completion_mask[routed])
        emb = self._embed([it.prompt_text for it in sub_items])
        contexts_B_K = [self.views.auxiliary_contexts(it, emb[j]) for j, it in enumerate(sub_items)]
        view_prompts_K = [self._prompts(sub_items, [c[k] for c in contexts_B_K]) for k in range(cfg.num_views)]
        with teacher_weights(self.model, cfg.teacher, self.ema):
            view_logps_K_b_L = view_token_logps(self.model, view_prompts_K, sub, self.pad_id, cfg.chunk_tokens,
                                                cfg.score_batch_size)
        mask = rollout.completion_mask
        if cfg.agreement == "token":
            w_b_L = token_agreement_weights(view_logps_K_b_L, sub.completion_mask, cfg.agreement_gamma,
                                            cfg.agreement_statistic, cfg.agreement_quantile, cfg.agreement_cap,
                                            cfg.token_weight_floor)
            weights = torch.ones_like(mask)
            weights[routed] = w_b_L
            selected = w_b_L[sub.completion_mask.bool()]
            if selected.numel() == 0:
                return weights, 1.0, 1.0
            return weights, float(selected.mean()), float(selected.min())
        w_b = sequence_agreement_weights(view_logps_K_b_L, sub.completion_mask, cfg.agreement_gamma,
                                         cfg.agreement_statistic, cfg.sequence_weight_floor)
        weights = torch.ones(mask.shape[0], device=mask.device)
        weights[routed] = w_b
        return weights, float(w_b.mean()), float(w_b.min())

    def _negative_logps(self, items: Sequence[Item], neg_idx: list[int], rollout: Rollout) -> torch.Tensor:
        """log p_T-(y_t): the teacher conditioned on the rejected answer. -> (b, L)"""
        sub = Rollout(rollout.completion_ids[neg_idx], rollout.completion_mask[neg_idx])
        prompts = self._prompts([items[i] for i in neg_idx], [negative_context(items[i]) for i in neg_idx])
        with teacher_weights(self.model, self.cfg.teacher, self.ema):
            return view_token_logps(self.model, [prompts], sub, self.pad_id, self.cfg.chunk_tokens,
                                    self.cfg.score_batch_size)[0]

    def _sft_micro_step(self, items: Sequence[Item], scale: float, timer: _StageTimer) -> dict:
        """Static imitation: NLL of the reference, or of the base teacher's own completion where none."""
        cfg, model = self.cfg, self.model
        with timer.run("rollout"), torch.no_grad():
            targets: list[list[int] | None] = [
                self.tokenizer(it.reference, add_special_tokens=False)["input_ids"] if it.reference else None
                for it in items]
            missing = [i for i, t in enumerate(targets) if t is None]
            if missing:
                prompts = self._prompts([items[i] for i in missing],
                                        [primary_context(items[i], self.profile) for i in missing])
                with model.disable_adapter():
                    gen = self._rollout(prompts)
                for j, i in enumerate(missing):
                    n = int(gen.completion_mask[j].sum())
                    targets[i] = [t for t in gen.completion_ids[j, :n].tolist() if t != self.eos_id]
            packed = pack_completions(targets, self.pad_id, self.eos_id, self.device)
        with timer.run("student"):
            model.train()
            h = self._student_hidden(self._prompts(items, [None] * len(items)), packed)
            logps = chunked_token_logps(h, lm_head_of(model), packed.completion_ids, chunk_tokens=cfg.chunk_tokens)
            nll = weighted_token_mean(-logps, packed.completion_mask)
            (nll * scale).backward()
        model.eval()
        per_item = ((-logps.detach() * packed.completion_mask).sum(-1)
                    / packed.completion_mask.sum(-1).clamp_min(1)).tolist()
        return {"sums": {"loss": nll.item(), "sft": nll.item()}, "weight_min": 1.0,
                "tokens": {"completion": packed.num_tokens},
                "uncertainty": dict(zip([i.id for i in items], per_item, strict=True)), "entropy": {}}

    # --- checkpoint / resume ---------------------------------------------------------------------
    def save_checkpoint(self, path: str | Path, extra: dict | None = None) -> Path:
        """Adapter + EMA + optimizer + schedule + step + RNG, written atomically to one file."""
        state = {
            "step": self.step_count,
            "student": {k: p.detach().cpu().clone() for k, p in lora_parameters(self.model, STUDENT_ADAPTER).items()},
            "ema": self.ema.state_dict() if self.ema else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
            "extra": extra or {},
        }
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
        return Path(path)

    def load_checkpoint(self, path: str | Path) -> dict:
        state = torch.load(path, map_location="cpu", weights_only=False)
        with torch.no_grad():
            params = lora_parameters(self.model, STUDENT_ADAPTER)
            if set(params) != set(state["student"]):
                raise ValueError(f"checkpoint {path} does not match this model's adapter")
            for k, p in params.items():
                p.copy_(state["student"][k].to(p.device, p.dtype))
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        self.step_count = int(state["step"])
        return state.get("extra", {})


# --- a round: many steps, preemptible ------------------------------------------------------------
def batch_for_step(items: Sequence[Item], step: int, batch_size: int, seed: int) -> list[Item]:
    """The items of optimizer step `step` (0-based): a seeded shuffle per epoch, so a resumed round
    sees exactly the batches the interrupted one would have."""
    n = len(items)
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(pos, n)
        order = list(range(n))
        random.Random(seed * 7919 + epoch).shuffle(order)
        out.append(items[order[offset]])
    return out


@dataclass
class RoundResult:
    status: str  # "completed" | "preempted"
    steps_done: int
    reports: list[StepReport]
    uncertainty: dict[str, float]
    seconds: float


def run_round(trainer: UniSDTrainer, items: Sequence[Item], *, steps: int, view_item_ids: Collection[str] = (),
              should_stop: Callable[[], bool] = lambda: False, checkpoint_path: str | Path | None = None,
              on_step: Callable[[StepReport], None] | None = None) -> RoundResult:
    """Run optimizer steps until `steps` are done (counting a resumed checkpoint's) or `should_stop()`.

    `should_stop` is polled before every step, so a closing gate stops the round within one step;
    the checkpoint is then saved and the next call with the same path resumes from it.
    """
    t0 = time.perf_counter()
    if checkpoint_path and Path(checkpoint_path).exists():
        trainer.load_checkpoint(checkpoint_path)
        log.info("resumed round at step %d from %s", trainer.step_count, checkpoint_path)
    reports, uncertainty = [], {}
    status = "completed"
    while trainer.step_count < steps:
        if should_stop():
            status = "preempted"
            break
        batch = batch_for_step(items, trainer.step_count, trainer.cfg.optim.batch_size, trainer.cfg.seed)
        report = trainer.step(batch, view_item_ids)
        reports.append(report)
        uncertainty.update(report.item_uncertainty)
        if on_step:
            on_step(report)
    if checkpoint_path and status == "preempted":
        trainer.save_checkpoint(checkpoint_path)
    elif checkpoint_path:
        Path(checkpoint_path).unlink(missing_ok=True)
    return RoundResult(status, trainer.step_count, reports, uncertainty, time.perf_counter() - t0)
