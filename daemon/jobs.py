"""One adaptation round, start to finish: gates -> plan -> train (resumable) -> evaluate -> gate -> version.

    edge-unisd adapt --once [--max-seconds S] [--max-items N] [--preset NAME] [--force] [--json]
    edge-unisd eval [--json]

`adapt_once` reads as ARCHITECTURE.md's flow: the budgets package says whether and how much, the
method trains a LoRA adapter on the current one, the evaluation gate decides, the store records.
A round is resumable: its plan is written to `checkpoints/round.json` before the first step and the
trainer checkpoints to `checkpoints/round.pt` when stopped (and every minute), so a preempted or
killed round continues where it stopped with the same items, batches and schedule.
The time budget covers the training steps; evaluation before and after comes on top.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from adapters.registry import AdapterRegistry, AdapterVersion, RegistryError
from budgets.cost_model import CostModel, CostModelError, cost_fingerprint
from budgets.gates import (
    BudgetConfig,
    BudgetConfigError,
    GateDecision,
    evaluate_gates,
    load_budget_config,
    window_seconds_left,
)
from budgets.planner import Candidate, RoundPlan, plan_round
from budgets.preemption import PreemptionMonitor
from budgets.sensors import SensorReadings, read_sensors
from budgets.sensors import now as sensors_now
from daemon.evaluation import EvalSettings, evaluate, gate
from daemon.exporting import export_after_promotion, registry_of, sync_store
from daemon.home import Home
from daemon.settings import DaemonSettings, load_settings
from daemon.store import Store
from edge_unisd.atomic_io import atomic_dir, atomic_write_json, remove_stale_temps
from edge_unisd.config import ConfigError, MethodConfig, load_method_config
from edge_unisd.items import Item

log = logging.getLogger(__name__)

COST_MODEL_FILE = "cost_model.json"  # in the home root: this machine's measured seconds per token
PLAN_FILE = "round.json"  # in home.checkpoints: the round being trained (what a resume needs)
CHECKPOINT_FILE = "round.pt"
LOCK_FILE = "round.lock"
REPLAY_SHARE = 0.25  # share of planned items that are replays of trained ones (against forgetting)
CHECKPOINT_EVERY_SECONDS = 60.0  # a killed round loses at most this much training
PREEMPTION_POLL_SECONDS = 5.0
UNCERTAINTY_META = "item_uncertainty"  # item id -> last measured uncertainty, for routing the K views
EVAL_CACHE_META = "eval_cache"
EVAL_CACHE_SIZE = 16
VIEW_POOL_MAX = 1000  # past items the auxiliary views draw solved examples from (embedded once a round)
PREVIOUS_ADAPTER = "previous"  # the last promoted adapter, loaded beside the candidate to measure drift

ModelLoader = Callable[[str | None], Any]  # base_model spec -> edge_unisd.modeling.LoadedModel
Progress = Callable[[str], None]


class AdaptError(RuntimeError):
    """A round cannot run as asked (bad preset, missing base or adapter, a round already running)."""


# --- extension points ----------------------------------------------------------------------------

TEST_TINY_MODEL_ENV = "EDGE_UNISD_TEST_TINY_MODEL"  # test-only hook, see `base_source`
TINY_TEST_MODEL_DIR = "test-tiny-llama-v1"  # in the converted-model cache


def base_source(spec: str | None):
    """The base the settings name (None: the bundled SmolLM2-135M), as an `edge_unisd.modeling.BaseSource`.

    TEST ONLY: with EDGE_UNISD_TEST_TINY_MODEL=1 in the environment the base is instead a tiny random
    llama (2 layers, width 32) with the bundled tokenizer, saved once as an HF folder in the model cache,
    so that a whole daemon (`edge-unisd run` in a subprocess) trains, evaluates and exports in seconds.
    Never set it outside tests: the "model" is noise.
    """
    from edge_unisd.modeling import ModelLoadError, resolve_base

    try:
        if os.environ.get(TEST_TINY_MODEL_ENV) == "1":
            return resolve_base(tiny_test_model_folder())
        return resolve_base(spec)
    except ModelLoadError as e:
        raise AdaptError(str(e)) from None


def tiny_test_model_folder() -> Path:
    """The test hook's tiny random llama (fixed seed) with the bundled tokenizer; built once per cache."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from edge_unisd.modeling import default_cache_dir, gguf_to_hf_folder, resolve_base

    cache = default_cache_dir()
    target = cache / TINY_TEST_MODEL_DIR
    if (target / "config.json").is_file():
        return target
    tok = AutoTokenizer.from_pretrained(gguf_to_hf_folder(resolve_base(None)))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                      tie_word_embeddings=True, initializer_range=0.5)  # peaked outputs: no near-ties
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    try:
        with atomic_dir(target) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
    except FileExistsError:  # another process built it meanwhile
        pass
    return target


def default_model_loader(spec: str | None, quantization: str = "none", dtype: str | None = None):
    """The base model of the settings (None: the bundled SmolLM2-135M); tests inject a tiny one."""
    from edge_unisd.modeling import ModelLoadError, load_base

    try:
        return load_base(base_source(spec), quantization=quantization, dtype=dtype)
    except ModelLoadError as e:
        raise AdaptError(str(e)) from None


def settings_model_loader(settings: DaemonSettings, model_loader: ModelLoader | None = None) -> ModelLoader:
    """The caller's loader (tests: a tiny model), else the default one with the settings' base quantization and
    compute dtype."""
    if model_loader is not None:
        return model_loader
    chosen = {k: v for k, v in (("quantization", settings.base_quantization), ("dtype", settings.compute_dtype))
              if v not in ("none", "auto")}
    return functools.partial(default_model_loader, **chosen) if chosen else default_model_loader


def _quantization(loaded: Any) -> str:
    """How the loaded base is held ("none" or "nf4"); loaders that predate the field (tests, embedders) say none."""
    return getattr(loaded, "quantization", "none")


def _base_key(loaded: Any) -> str:
    """The base weights a measurement was made on: the source's fingerprint, its quantization if any, and its
    compute dtype unless fp32 (so the keys of fp32 measurements stay what they were)."""
    quantization, dtype = _quantization(loaded), _compute_dtype(loaded)
    return (loaded.source.fingerprint + ("" if quantization == "none" else f"+{quantization}")
            + ("" if dtype == "float32" else f"+{dtype}"))


def _compute_dtype(loaded: Any) -> str:
    """"float32", "bfloat16", ...: what the loaded base computes in (loaders without the field: float32)."""
    return str(getattr(loaded, "dtype", "float32")).removeprefix("torch.")


def export_promoted(home: Home, settings: DaemonSettings, version: str, adapter_dir: Path,
                    base: Any = None) -> dict | None:
    """Called right after `version` is promoted: export it merged to `exports/current.gguf` (verified).

    Returns what `adapt --once --json` reports under "export". A refused or failed export keeps the
    previous current.gguf, is reported there, and never undoes the promotion.
    """
    return export_after_promotion(home, settings, version, adapter_dir, base=base)


def default_cost_model() -> CostModel:
    """Before this machine has measured itself: a deliberately slow guess, so the first round plans small
    and the refit after it plans the next one. The bundled 135M model with the `edge` preset measured
    0.19 / 0.22 / 0.15 / 0.07 s per completion token (rollout / teacher / student / each view) and 1.6 s
    per optimizer step on 2 busy CPU cores; a GPU is one to two orders of magnitude faster."""
    per_token = {"rollout": 0.25, "teacher": 0.25, "student": 0.25, "view": 0.1, "other": 0.0}
    return CostModel(per_token=per_token, per_step={"optimizer": 2.0, "ema": 0.1},
                     estimated=tuple(per_token) + ("optimizer", "ema"))


# --- adapters: the registry is the truth, the store mirrors it ------------------------------------

def current_adapter(home: Home) -> AdapterVersion | None:
    """The adapter in use: the registry's current version (None: the base model)."""
    return registry_of(home).current()


def training_parent(registry: AdapterRegistry) -> AdapterVersion | None:
    """What the next round continues from: the current version, unless it was trained on items the user
    asked to forget; then a fresh adapter on the base ("retrain without them")."""
    current = registry.current()
    return None if current is None or current.trained_on_forgotten else current


def _adapter_dir(version: AdapterVersion | None) -> Path | None:
    if version is None:
        return None
    path = Path(version.path)
    if not (path / "adapter_config.json").is_file():
        raise AdaptError(f"the current adapter {version.version} is missing at {path}; roll back to another "
                         "version (edge-unisd rollback VERSION) or restore the folder")
    return path


def _recover(home: Home, store: Store, registry: AdapterRegistry) -> None:
    """Repair what a kill between the writes at the end of a round left: a version that was stored but
    never judged is rejected (its round runs again); a round whose version was judged is closed as done;
    a round still marked running with nothing to resume is closed as interrupted; the store follows."""
    pending = PendingRound.load(home.checkpoints / PLAN_FILE)
    judged: dict[int, str] = {}
    for v in registry.list():
        if v.status == "candidate":  # its round resumes (or restarts) and makes a new one
            registry.reject(v.version, "interrupted before the evaluation gate decided")
            continue
        round_id = v.config.get("round")
        if isinstance(round_id, int) and not v.reason.startswith("interrupted"):
            judged[round_id] = v.version
    sync_store(store, registry)
    for r in store.unfinished_rounds():
        if r.id in judged:
            v = registry.get(judged[r.id])
            log.info("round %d ended with %s before it was closed; closing it", r.id, v.version)
            store.finish_round(r.id, "done", metrics=v.metrics, adapter_version=v.version)
        elif pending is None or pending.round_id != r.id:
            store.finish_round(r.id, "interrupted", error="the process ended during the round")
    if pending is not None and pending.round_id in judged:
        _clear_round_files(home)


# --- the round's plan, kept on disk for a resume --------------------------------------------------

@dataclass
class PendingRound:
    """Everything a resumed round must reuse to see the same items, batches and schedule."""

    round_id: int
    item_ids: list[str]
    view_item_ids: list[str]
    steps: int
    preset: str
    overrides: dict[str, Any]
    parent: str | None
    predicted_seconds: float
    budget_seconds: float
    n_new: int
    n_replay: int
    summary: str
    gates: dict[str, Any] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        atomic_write_json(path, asdict(self))

    @classmethod
    def load(cls, path: Path) -> PendingRound | None:
        try:
            return cls(**json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as e:
            log.warning("%s is unreadable (%s); starting a new round", path, type(e).__name__)
            return None


def _clear_round_files(home: Home) -> None:
    for name in (PLAN_FILE, CHECKPOINT_FILE):
        (home.checkpoints / name).unlink(missing_ok=True)


@contextlib.contextmanager
def _round_lock(home: Home) -> Iterator[None]:
    """One round per home at a time (the daemon's child and a manual `adapt --once` share the files)."""
    path = home.checkpoints / LOCK_FILE
    with os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o600), "r+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AdaptError(f"another adaptation round is running on {home.root} (lock {path}); "
                             "wait for it to finish or stop it") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --- small helpers -------------------------------------------------------------------------------

def _method_config(preset: str, overrides: Mapping[str, Any]) -> MethodConfig:
    try:
        return load_method_config(preset, dict(overrides))
    except ConfigError as e:
        raise AdaptError(str(e)) from None


def _budget_config(settings: DaemonSettings, where: Path) -> BudgetConfig:
    try:
        return load_budget_config(settings.budget)
    except BudgetConfigError as e:
        raise AdaptError(f"{where}: {e}") from None


def _load_checks(home: Home) -> dict[str, list[str]]:
    """Optional `checks.jsonl` in the home ({"id", "must_contain"} per line): held-out items it names get
    a task-accuracy score. The sample user's checks are copied there by the demo."""
    from edge_unisd.sample_data import CHECKS_FILE, SampleDataError, load_checks

    if not (home.root / CHECKS_FILE).is_file():
        return {}
    try:
        return load_checks(home.root)
    except SampleDataError as e:
        raise AdaptError(str(e)) from None


def _eval_settings(settings: DaemonSettings, given: EvalSettings | None) -> EvalSettings:
    """Explicit settings win; else the gate bounds of settings.toml when it has them; else the defaults."""
    if given is not None:
        return given
    base = EvalSettings()
    bound = getattr(settings, "gate_max_retention_jsd", base.max_retention_jsd)
    tolerance = getattr(settings, "gate_fit_tolerance", base.fit_tolerance)
    return EvalSettings(**{**asdict(base), "max_retention_jsd": bound, "fit_tolerance": tolerance})


def _general_prompts() -> list[str]:
    from edge_unisd.sample_data import load_general_prompts

    return load_general_prompts()


def _eval_key(adapter: str | None, base_fingerprint: str, heldout: Sequence[Item], prompts: Sequence[str],
              checks: Mapping[str, list[str]], es: EvalSettings) -> str:
    """Metrics of a version are a function of these; a hash, so no item text or id is stored with it."""
    cost_knobs = {k: v for k, v in asdict(es).items() if k not in ("max_retention_jsd", "fit_tolerance")}
    blob = json.dumps([adapter or "base", base_fingerprint, sorted(it.id for it in heldout), list(prompts),
                       sorted((it.id, checks[it.id]) for it in heldout if it.id in checks), cost_knobs],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _cached_eval(store: Store, key: str) -> dict | None:
    return (store.get_meta(EVAL_CACHE_META) or {}).get(key)


def _cache_eval(store: Store, key: str, metrics: dict) -> None:
    cache = dict(store.get_meta(EVAL_CACHE_META) or {})
    cache.pop(key, None)
    cache[key] = metrics
    store.set_meta(EVAL_CACHE_META, dict(list(cache.items())[-EVAL_CACHE_SIZE:]))


def _cost_model(home: Home, fingerprint: Mapping[str, Any]) -> tuple[CostModel, str]:
    path = home.root / COST_MODEL_FILE
    try:
        model = CostModel.load(path)
    except FileNotFoundError:
        return default_cost_model(), "default (not measured yet)"
    except CostModelError as e:
        log.warning("%s", e)
        return default_cost_model(), "default (stored model unreadable)"
    if not model.matches(fingerprint):
        return default_cost_model(), "default (machine, model or preset changed)"
    return model, f"measured ({model.n_measurements} steps)"


def _refit_cost_model(home: Home, reports: Sequence[Any], fingerprint: Mapping[str, Any]) -> bool:
    """Fit seconds per token on this round's steps and store it for the next plan."""
    if not reports:
        return False
    try:
        CostModel.from_measurements([r.as_dict() for r in reports], fingerprint=fingerprint) \
            .save(home.root / COST_MODEL_FILE)
    except CostModelError as e:
        log.warning("cost model not updated: %s", e)
        return False
    return True


def _remember_uncertainty(store: Store, uncertainty: Mapping[str, float]) -> None:
    """Keep each item's last uncertainty (its id and a float) so the next plan routes the K views;
    ids of forgotten items are dropped here."""
    merged = {**(store.get_meta(UNCERTAINTY_META) or {}),
              **{k: float(v) for k, v in uncertainty.items() if math.isfinite(v)}}
    alive = {it.id for it in store.get_items(list(merged))}
    store.set_meta(UNCERTAINTY_META, {k: v for k, v in merged.items() if k in alive})


def _loss_summary(reports: Sequence[Any]) -> dict[str, Any]:
    if not reports:
        return {}
    terms = {k: sum(r.terms.get(k, 0.0) for r in reports) / len(reports) for k in reports[-1].terms}
    return {"first": reports[0].loss, "last": reports[-1].loss,
            "mean": sum(r.loss for r in reports) / len(reports), "terms_mean": terms,
            "weight_mean": sum(r.weights["mean"] for r in reports) / len(reports),
            "weight_min": min(r.weights["min"] for r in reports),
            "kd_kept": sum(r.weights["kd_kept"] for r in reports) / len(reports),
            "clip_fraction": sum(r.clip_fraction for r in reports) / len(reports)}


def _emit(progress: Progress | None, msg: str) -> None:
    log.info("%s", msg)
    if progress is not None:
        progress(msg)


# --- model ---------------------------------------------------------------------------------------

def _student_model(loaded, cfg: MethodConfig, parent_dir: Path | None):
    """A PeftModel whose trainable adapter "default" starts from the current version (or fresh), with the
    current version also loaded, frozen, as "previous" to measure how far the candidate drifts from it."""
    from peft import PeftModel

    from edge_unisd.modeling import attach_lora

    if parent_dir is None:
        return attach_lora(loaded.model, rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                           target_modules=cfg.lora.target_modules)
    model = PeftModel.from_pretrained(loaded.model, str(parent_dir), is_trainable=True)
    model.load_adapter(str(parent_dir), adapter_name=PREVIOUS_ADAPTER, is_trainable=False)
    model.set_adapter("default")
    return model


# --- gates and plan ------------------------------------------------------------------------------

def _budget_seconds(settings: DaemonSettings, budget_cfg: BudgetConfig, max_seconds: float | None,
                    force: bool, readings: SensorReadings) -> float:
    """--max-seconds, else the settings' round budget; never past an allowed window's end unless forced."""
    budget = float(max_seconds) if max_seconds is not None else settings.round_budget_seconds
    if not force:
        left = window_seconds_left(budget_cfg, readings.taken_at or sensors_now())
        if left is not None:
            budget = min(budget, left)
    return budget


def _plan(store: Store, cfg: MethodConfig, cost_model: CostModel, budget: float, *, epochs: int,
          max_items: int | None, force: bool) -> tuple[RoundPlan | None, str]:
    """New items first, a replay share of trained ones; the planner fits them to the budget."""
    pending = {it.id for it in store.pending_items()}
    if not pending and not force:
        return None, "no new items since the last round (use --force to replay trained items)"
    total = store.count_items().total
    pool = store.items_for_training(max(1, total), replay_fraction=0.0, seed=int(time.time()) // 86_400)
    if not pool:
        return None, "no items to train on (ingest some first)"
    uncertainty = store.get_meta(UNCERTAINTY_META) or {}
    candidates = [Candidate(it.id, it.id in pending, uncertainty.get(it.id)) for it in pool]
    K = cfg.num_views if cfg.uses_views else 0
    plan = plan_round(candidates, budget / epochs, cost_model, batch_size=cfg.optim.batch_size, K=K,
                      completion_tokens=cfg.rollout.max_new_tokens, replay_share=REPLAY_SHARE,
                      max_items=max_items)
    if not plan.item_ids:
        return None, f"nothing fits the budget: {plan.note}"
    return plan, plan.summary()


def _plan_summary(why: str, epochs: int, predicted_per_pass: float, budget: float, cost_source: str) -> str:
    """The planner's line is per pass over the items; with several passes, say so and give the round's total."""
    if epochs == 1:
        return f"{why} (cost model: {cost_source})"
    return (f"per pass: {why}; {epochs} passes: predicted {predicted_per_pass * epochs:.0f}s of {budget:.0f}s "
            f"(cost model: {cost_source})")


def _start_round(home: Home, store: Store, *, preset: str, overrides: dict[str, Any], budget: float,
                 epochs: int, max_items: int | None, force: bool, fingerprint: Callable[[str], dict],
                 decision: GateDecision, cost_model: CostModel | None = None) -> tuple[PendingRound | None, str]:
    """Plan within the budget, record the round as running and write its plan file before any step."""
    cfg = _method_config(preset, overrides)
    if cost_model is not None:
        cost_source = "given"
    else:
        cost_model, cost_source = _cost_model(home, fingerprint(preset))
    plan, why = _plan(store, cfg, cost_model, budget, epochs=epochs, max_items=max_items, force=force)
    if plan is None:
        return None, why
    if plan.batch_size != cfg.optim.batch_size:  # the planner lowered it to fit memory
        micro = min(plan.batch_size, cfg.optim.micro_batch_size)
        overrides = {**overrides, "optim": {**overrides.get("optim", {}), "batch_size": plan.batch_size,
                                            "micro_batch_size": micro}}
    parent = training_parent(registry_of(home))
    round_id = store.start_round(plan.item_ids, preset=preset)
    pending = PendingRound(
        round_id=round_id, item_ids=plan.item_ids, view_item_ids=plan.view_item_ids,
        steps=plan.steps * epochs,
        preset=preset, overrides=overrides, parent=parent.version if parent else None,
        predicted_seconds=plan.predicted_seconds * epochs, budget_seconds=budget, n_new=plan.n_new,
        n_replay=plan.n_replay, summary=_plan_summary(why, epochs, plan.predicted_seconds, budget, cost_source),
        gates={**decision.to_dict(), "forced": force})
    pending.save(home.checkpoints / PLAN_FILE)
    return pending, why


def _resumable(home: Home, store: Store) -> PendingRound | None:
    """The interrupted round's plan, if its parent adapter is still the current one; else clear it."""
    pending = PendingRound.load(home.checkpoints / PLAN_FILE)
    if pending is None:
        (home.checkpoints / CHECKPOINT_FILE).unlink(missing_ok=True)
        return None
    parent = training_parent(registry_of(home))
    if (parent.version if parent else None) != pending.parent:
        log.info("the current adapter changed since round %d was planned; starting over", pending.round_id)
        _clear_round_files(home)
        return None
    if not store.get_items(pending.item_ids):  # every planned item was forgotten meanwhile
        _clear_round_files(home)
        return None
    return pending


# --- the round -----------------------------------------------------------------------------------

def with_settings_defaults(settings: DaemonSettings, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """MethodConfig overrides with the settings file's method keys filled in; the caller's own win."""
    rollout = {"backend": settings.rollout_backend, **overrides.get("rollout", {})}
    return {**overrides, "rollout": rollout}


def adapt_once(home: Home, *, max_seconds: float | None = None, max_items: int | None = None,
               preset: str | None = None, force: bool = False, should_stop: Callable[[], bool] | None = None,
               progress: Progress | None = None, model_loader: ModelLoader | None = None,
               sensors: Callable[[], SensorReadings] | None = None, overrides: dict[str, Any] | None = None,
               epochs: int = 1, eval_settings: EvalSettings | None = None,
               cost_model: CostModel | None = None) -> dict[str, Any]:
    """Run one adaptation round now (or resume the interrupted one) and return what happened, JSON-ready.

    `force` ignores the gates, not the budget. `should_stop` is polled between steps (the daemon's
    signal handler); a stop checkpoints the round for the next call. `overrides` are MethodConfig
    overrides on the preset; `epochs` passes over the planned items (the budget covers all of them).
    `cost_model` plans with these rates instead of this machine's stored ones (the demo's prior).
    """
    if epochs < 1:
        raise AdaptError(f"epochs must be >= 1 (got {epochs})")
    home = home.require()
    settings = load_settings(home.settings)
    budget_cfg = _budget_config(settings, home.settings)
    overrides = with_settings_defaults(settings, overrides or {})
    _method_config(preset or settings.preset, overrides)  # a bad preset fails before any work
    sensors = sensors or read_sensors
    loader = settings_model_loader(settings, model_loader)
    with Store.open(home) as store, _round_lock(home):
        remove_stale_temps(home.adapters)
        remove_stale_temps(home.checkpoints)
        _recover(home, store, registry_of(home))
        # --- gates: may this machine adapt now? ---
        readings = sensors()
        decision = evaluate_gates(readings, budget_cfg)
        if not decision.open and not force:
            return {"status": "skipped", "reason": "gates closed: " + "; ".join(decision.closed_reasons()),
                    "gates": decision.to_dict()}
        budget = _budget_seconds(settings, budget_cfg, max_seconds, force, readings)
        # --- resume the interrupted round, or plan a new one ---
        pending = _resumable(home, store)
        resumed = pending is not None
        loaded = None
        if pending is None:
            counts = store.count_items()
            if counts.pending == 0 and not force:
                return {"status": "skipped", "gates": decision.to_dict(),
                        "reason": "no new items since the last round (--force replays trained items)"}
            if counts.total - counts.held_out == 0:
                return {"status": "skipped", "reason": "no items to train on (ingest some first)",
                        "gates": decision.to_dict()}
            _emit(progress, "loading the base model...")
            loaded = loader(settings.base_model)
            pending, why = _start_round(home, store, preset=preset or settings.preset,
                                        overrides=overrides, budget=budget, epochs=epochs,
                                        max_items=max_items, force=force,
                                        fingerprint=_fingerprint_fn(loaded, overrides),
                                        decision=decision, cost_model=cost_model)
            if pending is None:
                return {"status": "skipped", "reason": why, "gates": decision.to_dict()}
        elif pending.round_id not in {r.id for r in store.unfinished_rounds()}:
            old = pending.round_id  # closed since (stopped, or closed by the daemon after a crash)
            pending.round_id = store.start_round(pending.item_ids, preset=pending.preset)
            pending.save(home.checkpoints / PLAN_FILE)
            log.info("resuming round %d as round %d", old, pending.round_id)
        _emit(progress, f"round {pending.round_id}: {pending.summary}")
        try:
            if loaded is None:
                _emit(progress, "loading the base model...")
                loaded = loader(settings.base_model)
            return _run_round(home, store, settings, pending, loaded, decision=decision, budget=budget,
                              resumed=resumed, force=force, budget_cfg=budget_cfg, sensors=sensors,
                              should_stop=should_stop, progress=progress,
                              eval_settings=_eval_settings(settings, eval_settings))
        except Exception as e:
            store.finish_round(pending.round_id, "failed", error=f"{type(e).__name__}: {e}"[:500])
            _clear_round_files(home)
            raise
        except BaseException:  # KeyboardInterrupt, SystemExit: keep the plan (and any checkpoint) to resume
            store.finish_round(pending.round_id, "interrupted", error="interrupted")
            raise


def _fingerprint_fn(loaded, overrides: Mapping[str, Any], engine: str | None = None) -> Callable[[str], dict]:
    """What the measured cost depends on besides the machine: the base weights, device, dtype, preset and
    the rollout engine (llama.cpp samples about twice as fast as HF generate). `engine` is the one a round
    used; before a round, the one its config would pick (`_planned_rollout_engine`)."""
    def fingerprint(preset: str) -> dict:
        used = engine or _planned_rollout_engine(_method_config(preset, overrides), loaded)
        quantization = _quantization(loaded)
        extra = {} if quantization == "none" else {"quantization": quantization}
        return cost_fingerprint(loaded.source.fingerprint[:16], str(loaded.device), dtype=str(loaded.dtype),
                                preset=preset, rollout=used, **extra)
    return fingerprint


def _planned_rollout_engine(cfg: MethodConfig, loaded: Any) -> str:
    """The rollout engine `_rollout_backend` would build, without loading llama.cpp to find out."""
    return _rollout_engine_name(cfg, _wants_llama_cpp(cfg, loaded), loaded)


def _wants_llama_cpp(cfg: MethodConfig, loaded: Any) -> bool:
    """llama.cpp rollouts asked for: `llamacpp`, or `auto` with a full-precision GGUF base on CPU.

    An nf4 (QLoRA) base is sampled by HF generate: llama.cpp would sample from the GGUF's weights, not
    the 4-bit ones the adapter trains on, so the samples would be off-policy by the nf4 rounding."""
    kind = cfg.rollout.backend
    quantized = _quantization(loaded) != "none"
    if kind == "llamacpp" and quantized:
        raise AdaptError(f"rollout_backend \"llamacpp\" samples from the GGUF's weights, but base_quantization is "
                         f"{_quantization(loaded)!r}: the adapter trains on other weights. Set rollout_backend = "
                         "\"auto\" or \"hf\", or base_quantization = \"none\", in settings.toml")
    return kind == "llamacpp" or (kind == "auto" and not quantized and loaded.source.kind == "gguf"
                                  and loaded.device.type == "cpu")


def _rollout_engine_name(cfg: MethodConfig, llama_cpp: bool, loaded: Any) -> str:
    if not llama_cpp:
        return "hf"
    from adapters.llama_rollout import resolve_rollout_weights

    return f"llamacpp-{resolve_rollout_weights(cfg.rollout.llama_weights, loaded.dtype)}"


def _run_round(home: Home, store: Store, settings: DaemonSettings, pending: PendingRound, loaded, *,
               decision: GateDecision, budget: float, resumed: bool, force: bool, budget_cfg: BudgetConfig,
               sensors: Callable[[], SensorReadings], should_stop: Callable[[], bool] | None,
               progress: Progress | None, eval_settings: EvalSettings) -> dict[str, Any]:
    from edge_unisd.trainer import UniSDTrainer, run_round

    t_round = time.monotonic()
    cfg = _method_config(pending.preset, pending.overrides)
    by_id = {it.id: it for it in store.get_items(pending.item_ids)}
    items = [by_id[i] for i in pending.item_ids if i in by_id]  # forgotten meanwhile: dropped
    pool = store.items_for_training(VIEW_POOL_MAX)  # solved examples for the views; never held-out items
    heldout = store.held_out_items()[-eval_settings.max_heldout_items:]
    checks = _load_checks(home)
    prompts = _general_prompts()[:eval_settings.general_prompts]
    parent = _parent_version(home, pending.parent)
    tok = loaded.tokenizer
    model = _student_model(loaded, cfg, _adapter_dir(parent))

    # --- before: the current version's metrics (cached per version and held-out set) ---
    before_key = _eval_key(pending.parent, _base_key(loaded), heldout, prompts, checks, eval_settings)
    before = _cached_eval(store, before_key)
    if before is None:
        _emit(progress, f"evaluating {pending.parent or 'the base model'} on {len(heldout)} held-out items")
        before = evaluate(model, tok, heldout, prompts, checks, settings=eval_settings)
        _cache_eval(store, before_key, before)

    # --- train: resumable, preemptible, within the budget ---
    trainer = UniSDTrainer(model, tok, cfg, total_steps=pending.steps, profile=store.get_profile(), pool=pool,
                           rollout_backend=_rollout_backend(cfg, loaded))
    ckpt = home.checkpoints / CHECKPOINT_FILE
    resumed_from = _checkpoint_step(ckpt) if resumed else None
    monitor = None if force else PreemptionMonitor(lambda: evaluate_gates(sensors(), budget_cfg),
                                                   PREEMPTION_POLL_SECONDS).start()
    clock = {"deadline": time.monotonic() + budget, "saved": time.monotonic(), "steps": 0}
    reason: list[str] = []

    def stop() -> bool:
        if not reason:
            if should_stop is not None and should_stop():
                reason.append("stop requested")
            elif monitor is not None and monitor.should_stop():
                reason.append(monitor.reason or "gate closed")
            elif clock["steps"] and time.monotonic() > clock["deadline"]:
                reason.append("budget")
        return bool(reason)

    def on_step(report) -> None:
        clock["steps"] += 1
        due = time.monotonic() - clock["saved"] > CHECKPOINT_EVERY_SECONDS
        if due and trainer.step_count < pending.steps:
            trainer.save_checkpoint(ckpt)  # so a kill -9 loses at most a minute
            clock["saved"] = time.monotonic()
        _emit(progress, f"step {report.step}/{pending.steps}  loss {report.loss:.3f}  "
                        f"kd {report.terms['kd']:.3f}  w_min {report.weights['min']:.2f}  "
                        f"clipped {report.clip_fraction:.2f}")

    try:
        result = run_round(trainer, items, steps=pending.steps, view_item_ids=pending.view_item_ids,
                           should_stop=stop, checkpoint_path=ckpt, on_step=on_step)
    finally:
        if monitor is not None:
            monitor.close()
    spent = result.seconds
    engine = _rollout_engine_name(cfg, trainer.rollout_backend is not None, loaded)  # what this round really used
    _refit_cost_model(home, result.reports, _fingerprint_fn(loaded, pending.overrides, engine)(pending.preset))
    _remember_uncertainty(store, result.uncertainty)
    summary = {"round": pending.round_id, "preset": pending.preset, "resumed": resumed,
               "resumed_from_step": resumed_from,
               "items": len(items), "new_items": pending.n_new, "replay_items": pending.n_replay,
               "view_items": len(pending.view_item_ids),
               "steps": {"planned": pending.steps, "done": result.steps_done,
                         "this_run": len(result.reports)},
               "loss": _loss_summary(result.reports), "plan": pending.summary}
    cost = {"predicted_seconds": pending.predicted_seconds, "spent_seconds": spent,
            "budget_seconds": budget, "planned_budget_seconds": pending.budget_seconds}
    gates = {**decision.to_dict(), "forced": force}

    # --- stopped early by a gate or a request: checkpoint kept, the next call resumes ---
    if result.status == "preempted" and reason and reason[0] != "budget":
        store.finish_round(pending.round_id, "interrupted", metrics=summary, cost=cost, error=reason[0])
        store.record_ledger(pending.round_id, predicted=pending.predicted_seconds, spent=spent, gates=gates)
        _emit(progress, f"round {pending.round_id} stopped at step {result.steps_done}: {reason[0]}")
        return {"status": "preempted", "reason": reason[0], **summary, "seconds": cost,
                "checkpoint": str(ckpt)}
    ckpt.unlink(missing_ok=True)  # a budget stop ends the round with the steps done

    # --- after: evaluate the candidate, gate it, keep it as a version either way ---
    _emit(progress, "evaluating the candidate...")
    after = evaluate(model, tok, heldout, prompts, checks, settings=eval_settings,
                     compare_adapter=PREVIOUS_ADAPTER if parent else None)
    verdict = gate(before, after, max_retention_jsd=eval_settings.max_retention_jsd,
                   fit_tolerance=eval_settings.fit_tolerance)
    registry = registry_of(home)
    metrics = {"round": pending.round_id, "preset": pending.preset, "before": before, "after": after,
               "verdict": verdict.to_dict()}
    v = registry.add(model, parent=pending.parent, base_fingerprint=loaded.source.fingerprint,
                     config={"round": pending.round_id, "preset": pending.preset, "overrides": pending.overrides,
                             "base_quantization": _quantization(loaded), "compute_dtype": _compute_dtype(loaded)},
                     item_ids=[it.id for it in items], metrics=metrics)
    version, adapter_dir = v.version, v.path
    store.add_adapter_version(version, adapter_dir, parent=pending.parent, status="candidate", metrics=metrics)
    status, why = _judge(registry, store, v, items, verdict.promote, verdict.reason)
    sync_store(store, registry)
    after_key = _eval_key(version, _base_key(loaded), heldout, prompts, checks, eval_settings)
    _cache_eval(store, after_key, after)  # the next round's "before" when this version is promoted
    if reason == ["budget"]:
        summary["stopped"] = "budget spent"
    store.finish_round(pending.round_id, "done", metrics={**summary, "before": before, "after": after,
                                                          "verdict": verdict.to_dict()},
                       cost=cost, adapter_version=version)
    store.record_ledger(pending.round_id, predicted=pending.predicted_seconds, spent=spent, gates=gates)
    _clear_round_files(home)
    pruned = registry.prune(settings.keep_versions)
    if pruned:
        sync_store(store, registry)
    _emit(progress, f"{version} {why}")
    export = None
    if status == "promoted":
        _emit(progress, f"exporting {version} to {home.exports / 'current.gguf'} ({settings.export_quant}, "
                        "verified with llama.cpp)...")
        export = export_promoted(home, settings, version, adapter_dir, base=loaded.source)
    return {"status": status, "reason": why, **summary,
            "metrics": {"before": before, "after": after}, "verdict": verdict.to_dict(),
            "adapter": {"version": version, "path": str(adapter_dir), "parent": pending.parent,
                        "status": status},
            "pruned": pruned, "export": export, "seconds": {**cost, "total": time.monotonic() - t_round}}


def _judge(registry: AdapterRegistry, store: Store, v: AdapterVersion, items: Sequence[Item], promote: bool,
           reason: str) -> tuple[str, str]:
    """Promote or reject the new version in the registry. Items forgotten while it trained flag it, and a
    flagged version is never served."""
    alive = {it.id for it in store.get_items([it.id for it in items])}
    gone = [it.id for it in items if it.id not in alive]
    if gone:
        registry.mark_trained_on_forgotten(gone)
        promote, reason = False, f"rejected: {len(gone)} of its items were forgotten while it trained"
    try:
        if promote:
            registry.promote(v.version, reason)
            return "promoted", reason
    except RegistryError as e:
        reason = f"rejected: {e}"
    registry.reject(v.version, reason)
    return "rejected", reason


def _parent_version(home: Home, name: str | None) -> AdapterVersion | None:
    if name is None:
        return None
    try:
        return registry_of(home).get(name)
    except RegistryError as e:
        raise AdaptError(f"the round continues from adapter {name}, which is gone ({e}); "
                         "delete checkpoints/round.json to start a new round") from None


def _rollout_backend(cfg: MethodConfig, loaded: Any) -> Any:
    """llama.cpp sampling (about twice HF generate's tokens/s on CPU; needs a GGUF base), or None for HF generate.

    `llamacpp` insists (a clear error when it cannot run); `auto` takes it for a GGUF base on CPU and falls
    back to HF generate, with a warning, when llama.cpp cannot load the base.
    """
    kind = cfg.rollout.backend
    if not _wants_llama_cpp(cfg, loaded):
        return None
    if loaded.source.kind != "gguf":
        raise AdaptError(f"rollout.backend llamacpp samples from the base GGUF, but the base is an HF folder "
                         f"({loaded.source.path}); set rollout_backend = \"hf\" (or \"auto\") in settings.toml")
    from adapters.llama_rollout import LlamaCppRollout, RolloutBackendError, resolve_rollout_weights

    try:
        weights = resolve_rollout_weights(cfg.rollout.llama_weights, loaded.dtype)
        return LlamaCppRollout(loaded.source.path, loaded.tokenizer, weights=weights,
                               lora=cfg.rollout.llama_lora)
    except RolloutBackendError as e:
        if kind == "auto":
            log.warning("llama.cpp rollouts unavailable, using HF generate: %s", e)
            return None
        raise AdaptError(str(e)) from None


def _checkpoint_step(path: Path) -> int | None:
    """The step a checkpoint was saved at (None without one), read the way the trainer reads it."""
    if not path.is_file():
        return None
    import torch

    try:
        return int(torch.load(path, map_location="cpu", weights_only=False)["step"])
    except Exception:  # noqa: BLE001 - the trainer reports a bad checkpoint when it loads it
        return None


# --- `edge-unisd eval` ---------------------------------------------------------------------------

def evaluate_current(home: Home, *, model_loader: ModelLoader | None = None,
                     eval_settings: EvalSettings | None = None,
                     progress: Progress | None = None) -> dict[str, Any]:
    """Gate metrics of the current adapter (or the base) on the held-out items, as the gate sees them."""
    home = home.require()
    settings = load_settings(home.settings)
    es = _eval_settings(settings, eval_settings)
    with Store.open(home) as store:
        version = current_adapter(home)
        heldout = store.held_out_items()[-es.max_heldout_items:]
        checks = _load_checks(home)
        _emit(progress, "loading the base model...")
        loaded = settings_model_loader(settings, model_loader)(settings.base_model)
        model = loaded.model
        adapter_dir = _adapter_dir(version)
        if adapter_dir is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter_dir))
        _emit(progress, f"evaluating {version.version if version else 'the base model'} on "
                        f"{len(heldout)} held-out items...")
        prompts = _general_prompts()[:es.general_prompts]
        metrics = evaluate(model, loaded.tokenizer, heldout, prompts, checks, settings=es)
        _cache_eval(store, _eval_key(version.version if version else None, _base_key(loaded), heldout,
                                     prompts, checks, es), metrics)
    return {"adapter": version.version if version else None, "held_out_items": len(heldout),
            "metrics": metrics, "bounds": {"max_retention_jsd": es.max_retention_jsd,
                                           "fit_tolerance": es.fit_tolerance}}
