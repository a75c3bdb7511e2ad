"""`adapt_once` and `edge-unisd adapt/eval` end to end on a tiny random llama with the bundled tokenizer."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest
import torch
from sqlalchemy import select
from sqlalchemy.orm import Session

from budgets.sensors import SensorReadings
from daemon import jobs
from daemon.cli import _describe_round, main
from daemon.evaluation import EvalSettings
from daemon.home import Home
from daemon.settings import write_default_settings
from daemon.store import LedgerEntry, Store
from edge_unisd.items import IngestRow

# Small and fast: 4-token rollouts, batches of 4 (8 training items: 2 steps), rank-4 LoRA, K=2 views.
OVERRIDES = {"rollout": {"max_new_tokens": 4}, "optim": {"batch_size": 4, "micro_batch_size": 4, "lr": 1e-3},
             "lora": {"rank": 4, "alpha": 8}, "num_views": 2, "gradient_checkpointing": False}
# A small round moves the random model's held-out NLL unpredictably; these tests are about the flow, so
# fit may vary, and the retention bound is what a harmful adapter breaks.
EVAL = EvalSettings(general_prompts=2, retention_new_tokens=4, accuracy_new_tokens=4, max_retention_jsd=0.1,
                    fit_tolerance=10.0)


REAL_EXPORT = jobs.export_promoted


@pytest.fixture(scope="session")
def tiny_folder() -> Path:
    """The daemon's test-hook model: a tiny random llama with the bundled tokenizer, as an HF folder (so the
    round's export really merges, writes and verifies a GGUF)."""
    return jobs.tiny_test_model_folder()


@pytest.fixture
def loader(tiny_folder):
    """Stands in for load_base: the same tiny random base on every call (adapters are saved apart), held as the
    settings say (quantization, compute dtype) when it stands in for the default loader."""
    from edge_unisd.modeling import load_base

    return lambda spec, **how: load_base(tiny_folder, **how)


@pytest.fixture(autouse=True)
def exports(monkeypatch) -> list[str]:
    """Rounds skip the GGUF export (seconds each) unless a test puts REAL_EXPORT back."""
    called: list[str] = []
    monkeypatch.setattr(jobs, "export_promoted", lambda home, settings, version, *a, **kw: called.append(version))
    return called


def readings(on_ac: bool = True) -> SensorReadings:
    return SensorReadings(taken_at=datetime.now().astimezone(), on_ac=on_ac, has_battery=True,
                          battery_percent=80.0 if on_ac else 20.0, load_avg_1m=0.1, cpu_count=2,
                          cpu_percent=5.0, self_cpu_percent=0.0, memory_available_bytes=8 << 30,
                          memory_total_bytes=16 << 30, max_temperature_c=45.0)


def ingest(home: Home, n: int, start: int = 0, held_out: int = 0) -> list[str]:
    rows = [IngestRow(prompt=f"Question {i}: what is my favourite number?", reference=f"It is {i}.",
                      id=f"q{i}") for i in range(start, start + n)]
    with Store.open(home) as store:
        ids = store.add_items(rows).item_ids
        store.set_held_out(ids[:held_out])
    return ids


def write_settings(home: Home, **keys: object) -> None:
    """The default settings.toml with `keys` set (values as TOML literals), export_quant f16 by default."""
    write_default_settings(home.settings)
    keys = {"export_quant": '"f16"', **keys}
    lines = [f"{line.split(' =')[0]} = {keys[line.split(' =')[0]]}" if line.split(" =")[0] in keys else line
             for line in home.settings.read_text().splitlines()]
    home.settings.write_text("\n".join(lines) + "\n")


@pytest.fixture
def home(tmp_path) -> Home:
    h = Home(tmp_path / "home").create()
    write_settings(h)
    with Store.open(h) as store:
        store.set_profile("My favourite number is 7. I like short answers.")
    ingest(h, 10, held_out=2)
    return h


def adapt(home: Home, loader, **kw) -> dict:
    kw.setdefault("sensors", readings)
    return jobs.adapt_once(home, model_loader=loader, overrides=OVERRIDES, eval_settings=EVAL, **kw)


def ledger_rows(home: Home) -> list[LedgerEntry]:
    with Store.open(home) as store, Session(store.engine) as s:
        return list(s.scalars(select(LedgerEntry)))


# --- a round -------------------------------------------------------------------------------------

def test_a_round_trains_stores_a_version_and_records_everything(home, loader):
    seen: list[str] = []
    r = adapt(home, loader, progress=seen.append)
    json.dumps(r)  # what --json prints
    assert r["status"] == "promoted", r["reason"]
    assert (r["items"], r["new_items"], r["steps"]["planned"], r["steps"]["done"]) == (8, 8, 2, 2)
    assert r["metrics"]["before"]["fit_items"] == 2 and r["metrics"]["after"]["fit_nll"] is not None
    assert r["metrics"]["after"]["retention_jsd"] > 0 and r["loss"]["last"] >= 0
    assert r["seconds"]["predicted_seconds"] > 0 and r["seconds"]["spent_seconds"] > 0
    assert any(m.startswith("step 2/2") for m in seen)
    with Store.open(home) as store:
        assert store.count_items().pending == 0  # the 8 training items count as trained
        (version,) = store.adapter_versions()
        assert (version.version, version.status) == (r["adapter"]["version"], "promoted")
        assert version.metrics["verdict"]["promote"] and version.metrics["after"] == r["metrics"]["after"]
        last = store.last_round()
        assert (last.status, last.adapter_version, last.n_items) == ("done", version.version, 8)
        assert set(store.get_meta(jobs.UNCERTAINTY_META)) <= {f"q{i}" for i in range(2, 10)}
    adapter_dir = Path(r["adapter"]["path"])
    assert (adapter_dir / "adapter_config.json").is_file()
    assert adapter_dir.stat().st_mode & 0o777 == 0o700
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in adapter_dir.iterdir())
    (row,) = ledger_rows(home)
    assert row.round_id == r["round"] and row.spent == pytest.approx(r["seconds"]["spent_seconds"])
    assert row.gates["open"] and row.gates["forced"] is False
    assert (home.root / jobs.COST_MODEL_FILE).is_file()  # refit from the step timings
    assert not any((home.checkpoints / f).exists() for f in (jobs.PLAN_FILE, jobs.CHECKPOINT_FILE))
    text = _describe_round(r)  # what `adapt --once` prints without --json
    assert text.startswith(f"round {r['round']} (edge): promoted: ") and r["adapter"]["path"] in text
    again = adapt(home, loader)
    assert again["status"] == "skipped" and "no new items" in again["reason"]
    assert _describe_round(again).startswith("skipped: no new items")


def test_closed_gates_skip_the_round_unless_forced(home, loader):
    r = adapt(home, loader, sensors=lambda: readings(on_ac=False))
    assert r["status"] == "skipped" and "power: on battery at 20%" in r["reason"]
    with Store.open(home) as store:
        assert store.last_round() is None and store.count_items().pending == 8
    forced = adapt(home, loader, sensors=lambda: readings(on_ac=False), force=True, max_items=4)
    assert forced["status"] in ("promoted", "rejected") and forced["items"] == 4  # the budget still holds
    (row,) = ledger_rows(home)
    assert row.gates["forced"] is True and row.gates["open"] is False


def test_the_next_round_continues_from_the_current_version_and_replays(home, loader):
    first = adapt(home, loader)
    ingest(home, 4, start=100)
    second = adapt(home, loader, max_items=4)
    assert second["status"] == "promoted", second["reason"]
    assert second["adapter"]["parent"] == first["adapter"]["version"]
    assert (second["new_items"], second["replay_items"]) == (3, 1)  # a replay share against forgetting
    # the first version's "after" is the second round's "before" (served from the cache)
    assert second["metrics"]["before"] == first["metrics"]["after"]
    assert second["metrics"]["after"]["drift_jsd"] is not None  # measured against the first version
    with Store.open(home) as store:
        assert jobs.current_adapter(home).version == second["adapter"]["version"]
        assert store.count_items().pending == 1


def test_the_gate_rejects_a_harmful_adapter_and_keeps_the_previous_version(home, loader, monkeypatch):
    first = adapt(home, loader)
    assert first["status"] == "promoted", first["reason"]
    ingest(home, 4, start=100)
    import edge_unisd.trainer as trainer_mod

    real_run_round = trainer_mod.run_round

    def harmful_run_round(trainer, *args, **kw):
        result = real_run_round(trainer, *args, **kw)
        with torch.no_grad():  # a deliberately harmful update: large random LoRA matrices
            for name, p in trainer.model.named_parameters():
                if ".default." in name and "lora_" in name:
                    p.copy_(torch.randn_like(p) * 2.0)
        return result

    monkeypatch.setattr(trainer_mod, "run_round", harmful_run_round)
    r = adapt(home, loader)
    assert r["status"] == "rejected" and "retention JSD vs base" in r["reason"]
    assert r["metrics"]["after"]["retention_jsd"] > EVAL.max_retention_jsd
    with Store.open(home) as store:
        assert jobs.current_adapter(home).version == first["adapter"]["version"]
        rejected = next(v for v in store.adapter_versions() if v.version == r["adapter"]["version"])
        assert rejected.status == "rejected" and "retention" in rejected.metrics["verdict"]["reason"]


def test_a_preempted_round_checkpoints_and_the_next_call_resumes_it(home, loader):
    polls = []

    def stop_after_first_step() -> bool:
        polls.append(1)
        return len(polls) > 1  # polled before each step: the first step runs, the second does not

    r = adapt(home, loader, should_stop=stop_after_first_step)
    assert r["status"] == "preempted" and r["reason"] == "stop requested"
    assert r["steps"] == {"planned": 2, "done": 1, "this_run": 1}
    assert (home.checkpoints / jobs.CHECKPOINT_FILE).is_file()
    assert "resume:  edge-unisd adapt --once" in _describe_round(r)
    with Store.open(home) as store:
        assert store.last_round().status == "interrupted"
        assert store.count_items().pending == 8 and store.adapter_versions() == []
    resumed = adapt(home, loader)
    assert resumed["status"] == "promoted", resumed["reason"]
    assert resumed["resumed_from_step"] == 1
    assert resumed["steps"] == {"planned": 2, "done": 2, "this_run": 1}
    assert resumed["items"] == 8 and resumed["round"] != r["round"]
    assert not (home.checkpoints / jobs.CHECKPOINT_FILE).exists()
    with Store.open(home) as store:
        assert store.count_items().pending == 0
    assert [row.round_id for row in ledger_rows(home)] == [r["round"], resumed["round"]]


def test_a_killed_round_resumes_from_its_periodic_checkpoint_in_the_same_round(home, loader, monkeypatch):
    monkeypatch.setattr(jobs, "CHECKPOINT_EVERY_SECONDS", -1.0)  # checkpoint after every step

    def killed_after_step_1(msg: str) -> None:
        if msg.startswith("step 1/"):
            raise SystemExit(137)

    # as if the process were killed right after step 1: nothing after the kill runs, nothing is recorded
    monkeypatch.setattr(Store, "finish_round", lambda *a, **kw: None)
    with pytest.raises(SystemExit):
        adapt(home, loader, progress=killed_after_step_1)
    monkeypatch.undo()
    with Store.open(home) as store:
        (running,) = store.unfinished_rounds()
    assert all((home.checkpoints / f).is_file() for f in (jobs.PLAN_FILE, jobs.CHECKPOINT_FILE))
    r = adapt(home, loader)
    assert r["status"] == "promoted" and r["round"] == running.id  # the same round, finished
    assert r["resumed_from_step"] == 1 and r["steps"] == {"planned": 2, "done": 2, "this_run": 1}
    with Store.open(home) as store:
        assert store.unfinished_rounds() == [] and store.last_round().status == "done"


def test_a_second_round_on_the_same_home_is_refused(home, loader):
    import fcntl

    with open(home.checkpoints / jobs.LOCK_FILE, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        with pytest.raises(jobs.AdaptError, match="another adaptation round is running"):
            adapt(home, loader)


def test_an_unknown_preset_is_a_clear_error(home, loader):
    with pytest.raises(jobs.AdaptError, match="unknown preset 'nope'"):
        adapt(home, loader, preset="nope")


# --- the CLI -------------------------------------------------------------------------------------

def test_cli_adapt_and_eval(home, loader, monkeypatch, capsys):
    monkeypatch.setattr(jobs, "default_model_loader", loader)
    monkeypatch.setattr(jobs, "read_sensors", lambda: readings(on_ac=False))
    rc = main(["adapt", "--once", "--json", "--home", str(home.root)])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["status"] == "skipped" and "power" in out["reason"]

    assert main(["adapt", "--home", str(home.root)]) == 2
    assert "--once" in capsys.readouterr().err
    assert main(["adapt", "--once", "--preset", "nope", "--home", str(home.root)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("edge-unisd: error: unknown preset 'nope'") and err.count("\n") == 1

    rc = main(["eval", "--json", "--home", str(home.root)])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["adapter"] is None and out["held_out_items"] == 2
    assert out["metrics"]["fit_items"] == 2 and out["metrics"]["retention_jsd"] == pytest.approx(0, abs=1e-6)


# --- the registry and the export -----------------------------------------------------------------

@pytest.fixture
def tiny_bars(monkeypatch):
    """Looser export bars for the tiny random model: its 49k-token vocabulary has near-ties in every position,
    and llama.cpp's f16 KV cache flips a few of them (top-1 0.986-0.996 even at f32). The issue's bars hold
    for real models (tests/adapters); here the point is the flow."""
    import adapters.export
    from adapters.verify import Bar

    monkeypatch.setattr(adapters.export, "bar_for", lambda quant: Bar(0.9, 0.05))


def registry(home: Home):
    from daemon.exporting import registry_of

    return registry_of(home)


def test_versions_go_through_the_registry_and_the_store_follows(home, loader, exports):
    first = adapt(home, loader)
    ingest(home, 4, start=100)
    second = adapt(home, loader, max_items=4)
    reg = registry(home)
    v1, v2 = reg.list()
    assert (v1.version, v2.version) == (first["adapter"]["version"], second["adapter"]["version"]) == ("v0001", "v0002")
    assert (v1.status, v2.status, reg.current().version) == ("retired", "promoted", "v0002")
    assert v2.parent == "v0001" and v2.config["round"] == second["round"] and v2.metrics["verdict"]["promote"]
    assert sorted(v1.item_ids) == sorted(f"q{i}" for i in range(2, 10))  # what `forget` needs to flag it
    with Store.open(home) as store:
        rows = {r.version: r for r in store.adapter_versions()}
    assert {k: (r.status, r.parent) for k, r in rows.items()} == {"v0001": ("retired", None),
                                                                  "v0002": ("promoted", "v0001")}
    assert rows["v0002"].metrics["after"] == second["metrics"]["after"]
    assert exports == ["v0001", "v0002"]  # export_promoted after each promotion


def test_a_promoted_version_is_exported_and_a_refused_export_keeps_the_previous_file(home, loader, monkeypatch,
                                                                                     tiny_bars):
    import adapters.export
    from adapters.verify import Bar
    from daemon.exporting import last_export

    monkeypatch.setattr(jobs, "export_promoted", REAL_EXPORT)
    first = adapt(home, loader)
    export = first["export"]
    current = home.exports / "current.gguf"
    assert export["gguf"] == str(current) and export["quant"] == "f16" and export["verify"]["passed"]
    assert export["adapter"] == first["adapter"]["path"]
    assert registry(home).get("v0001").metrics["export"]["passed"]  # the verification, kept with the version
    before = current.read_bytes()

    ingest(home, 4, start=100)
    monkeypatch.setattr(adapters.export, "bar_for", lambda quant: Bar(1.01, 0.0))  # nothing can pass
    second = adapt(home, loader, max_items=4)
    assert second["status"] == "promoted"  # the promotion stands
    assert second["export"]["refused"] and "export refused" in second["export"]["error"]
    assert second["export"]["kept"] == str(current) and current.read_bytes() == before
    assert "does not match" in _describe_round(second)
    with Store.open(home) as store:
        last = last_export(store)
    assert (last["version"], last["ok"], last["refused"]) == ("v0002", False, True)
    assert not list((home.exports / "builds").glob("v0002*"))  # the refused build is deleted


def test_cli_export_json_and_to_a_file(home, loader, monkeypatch, capsys, tmp_path, tiny_bars):
    monkeypatch.setattr(jobs, "default_model_loader", loader)
    monkeypatch.setenv(jobs.TEST_TINY_MODEL_ENV, "1")  # the export's base: the tiny folder, as the round's
    adapt(home, loader)
    assert main(["export", "--json", "--home", str(home.root)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"gguf", "adapter", "quant", "verify"} <= set(out)
    assert out["adapter"].endswith("/v0001") and out["quant"] == "f16" and out["verify"]["passed"]
    target = tmp_path / "mine.gguf"
    assert main(["export", "--home", str(home.root), "--quant", "f32", "--out", str(target)]) == 0
    assert "verified with llama.cpp: top-1 agreement" in capsys.readouterr().out
    assert target.read_bytes()[:4] == b"GGUF" and sorted(p.name for p in tmp_path.iterdir()) == ["home", "mine.gguf"]
    assert main(["export", "--home", str(home.root), "--adapter", str(tmp_path / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["export", "--home", str(home.root), "--quant", "q9"]) == 2
    assert "unknown quant 'q9'" in capsys.readouterr().err


def test_a_kill_before_the_gate_decided_leaves_a_candidate_that_is_rejected_and_the_round_reruns(
        home, loader, monkeypatch):
    def killed(*a, **kw):
        raise SystemExit(137)

    monkeypatch.setattr(jobs, "_judge", killed)
    monkeypatch.setattr(Store, "finish_round", lambda *a, **kw: None)  # a kill records nothing more
    with pytest.raises(SystemExit):
        adapt(home, loader)
    monkeypatch.undo()
    monkeypatch.setattr(jobs, "export_promoted", lambda *a, **kw: None)
    assert [(v.version, v.status) for v in registry(home).list()] == [("v0001", "candidate")]
    r = adapt(home, loader)
    assert r["status"] == "promoted" and r["adapter"]["version"] == "v0002"
    v1 = registry(home).get("v0001")
    assert v1.status == "rejected" and v1.reason.startswith("interrupted")
    with Store.open(home) as store:
        assert {v.version: v.status for v in store.adapter_versions()} == {"v0001": "rejected", "v0002": "promoted"}
        assert store.unfinished_rounds() == [] and store.count_items().pending == 0


def test_a_kill_after_the_promotion_closes_the_round_on_the_next_call(home, loader, monkeypatch):
    real_finish = Store.finish_round

    def finish(self, round_id, status, **kw):  # killed right before the round is closed: nothing recorded
        if status == "done":
            raise SystemExit(137)

    monkeypatch.setattr(Store, "finish_round", finish)
    with pytest.raises(SystemExit):
        adapt(home, loader)
    monkeypatch.setattr(Store, "finish_round", real_finish)
    assert registry(home).current().version == "v0001"
    r = adapt(home, loader)
    assert r["status"] == "skipped" and "no new items" in r["reason"]  # the round was closed, not rerun
    with Store.open(home) as store:
        last = store.last_round()
        assert (last.status, last.adapter_version) == ("done", "v0001") and store.unfinished_rounds() == []
    assert not (home.checkpoints / jobs.PLAN_FILE).exists()


def test_forget_flags_the_versions_in_the_registry_and_the_next_round_starts_fresh(home, loader, capsys):
    adapt(home, loader)
    assert main(["forget", "--home", str(home.root), "--id", "q5"]) == 0
    out = capsys.readouterr().out
    assert "v0001" in out and "edge-unisd rollback base" in out
    v1 = registry(home).get("v0001")
    assert v1.trained_on_forgotten and "q5" not in v1.item_ids
    assert jobs.training_parent(registry(home)) is None  # retrain without them, from the base
    with Store.open(home) as store:
        assert store.adapter_versions()[0].trained_on_forgotten
    ingest(home, 4, start=100)
    r = adapt(home, loader)
    assert r["status"] == "promoted" and r["adapter"]["parent"] is None, r["reason"]
    assert registry(home).current().version == "v0002"


def test_the_llama_cpp_rollout_backend_needs_a_gguf_base(home, loader):
    overrides = {**OVERRIDES, "rollout": {**OVERRIDES["rollout"], "backend": "llamacpp"}}
    with pytest.raises(jobs.AdaptError, match="rollout.backend llamacpp samples from the base GGUF"):
        jobs.adapt_once(home, model_loader=loader, overrides=overrides, eval_settings=EVAL, sensors=readings)
    with Store.open(home) as store:
        assert store.last_round().status == "failed" and store.unfinished_rounds() == []
    assert not (home.checkpoints / jobs.PLAN_FILE).exists()


def _loaded(kind: str, path: Path, device: str = "cpu"):
    from types import SimpleNamespace

    return SimpleNamespace(source=SimpleNamespace(kind=kind, path=path), tokenizer=None, device=torch.device(device),
                           dtype=torch.float32)


def _method(backend: str):
    from edge_unisd.config import load_method_config

    return load_method_config("edge", {"rollout": {"backend": backend}})


def test_auto_rollouts_use_llama_cpp_for_a_gguf_base_on_cpu_and_hf_otherwise(tmp_path, caplog):
    from adapters.llama_rollout import LlamaCppRollout
    from edge_unisd.modeling import bundled_model_path

    assert _method("auto").rollout.backend == "auto" == jobs.MethodConfig().rollout.backend  # the default
    backend = jobs._rollout_backend(_method("auto"), _loaded("gguf", bundled_model_path()))
    try:
        assert isinstance(backend, LlamaCppRollout)
    finally:
        backend.close()
    assert jobs._rollout_backend(_method("auto"), _loaded("hf", tmp_path)) is None
    assert jobs._rollout_backend(_method("auto"), _loaded("gguf", bundled_model_path(), "cuda")) is None
    assert jobs._rollout_backend(_method("hf"), _loaded("gguf", bundled_model_path())) is None
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    with caplog.at_level("WARNING", logger="daemon.jobs"):
        assert jobs._rollout_backend(_method("auto"), _loaded("gguf", broken)) is None  # falls back to HF
    assert "llama.cpp rollouts unavailable, using HF generate" in caplog.text and str(broken) in caplog.text
    with pytest.raises(jobs.AdaptError, match="broken.gguf"):  # asked for explicitly: an error, not a fallback
        jobs._rollout_backend(_method("llamacpp"), _loaded("gguf", broken))


def test_a_multi_pass_plan_says_its_line_is_per_pass_and_gives_the_round_total():
    one = jobs._plan_summary("16 items; predicted 48.2s of 50.0s budget", 1, 48.2, 50.0, "measured")
    assert one == "16 items; predicted 48.2s of 50.0s budget (cost model: measured)"
    six = jobs._plan_summary("16 items; predicted 48.2s of 50.0s budget", 6, 48.2, 300.0, "given")
    assert six.startswith("per pass: 16 items") and "6 passes: predicted 289s of 300s" in six


def test_cost_model_fingerprint_names_the_rollout_engine(tmp_path):
    """llama.cpp and HF generate sample at different rates: a switch must not plan with the other's rates."""
    from types import SimpleNamespace

    def loaded(kind: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
        return SimpleNamespace(source=SimpleNamespace(kind=kind, path=tmp_path, fingerprint="f" * 64),
                               device=torch.device(device), dtype=dtype)

    def engine(overrides, kind="gguf", device="cpu", used=None, dtype=torch.float32):
        return jobs._fingerprint_fn(loaded(kind, device, dtype), overrides, used)("edge")["rollout"]

    assert engine({}) == "llamacpp-f16"  # auto, GGUF base on CPU
    assert engine({}, dtype=torch.bfloat16) == "llamacpp-bf16"  # auto weights follow a bf16 model
    assert engine({}, kind="hf") == "hf" and engine({}, device="cuda") == "hf"
    assert engine({"rollout": {"backend": "hf"}}) == "hf"
    assert engine({"rollout": {"llama_weights": "q8_0"}}) == "llamacpp-q8_0"
    assert engine({}, used="hf") == "hf"  # a round that fell back to HF generate is recorded as such
    planned = jobs._fingerprint_fn(loaded("gguf"), {})("edge")
    assert planned != jobs._fingerprint_fn(loaded("gguf"), {"rollout": {"backend": "hf"}})("edge")


# --- QLoRA: base_quantization ----------------------------------------------------------------------

def test_an_nf4_base_is_sampled_by_hf_generate_and_planned_apart(tmp_path):
    """llama.cpp would sample from the GGUF's weights, not the 4-bit ones the adapter trains on."""
    from types import SimpleNamespace

    from edge_unisd.modeling import bundled_model_path

    def loaded(quantization: str):
        return SimpleNamespace(source=SimpleNamespace(kind="gguf", path=bundled_model_path(), fingerprint="f" * 64),
                               tokenizer=None, device=torch.device("cpu"), dtype=torch.float32,
                               quantization=quantization)

    assert jobs._rollout_backend(_method("auto"), loaded("nf4")) is None  # HF generate, no llama.cpp loaded
    with pytest.raises(jobs.AdaptError, match="base_quantization is 'nf4'.*rollout_backend = \"auto\" or \"hf\""):
        jobs._rollout_backend(_method("llamacpp"), loaded("nf4"))
    nf4 = jobs._fingerprint_fn(loaded("nf4"), {})("edge")
    full = jobs._fingerprint_fn(loaded("none"), {})("edge")
    assert nf4["rollout"] == "hf" and nf4["quantization"] == "nf4"
    assert "quantization" not in full  # unchanged for full-precision bases: their stored cost models still match
    assert jobs._base_key(loaded("nf4")) != jobs._base_key(loaded("none")) == "f" * 64  # eval caches apart


def test_base_quantization_setting_reaches_the_model_loader(home, monkeypatch):
    from daemon.settings import load_settings

    seen = {}

    def fake_load_base(source, *, quantization="none", dtype=None, **_):
        seen["quantization"], seen["dtype"] = quantization, dtype
        return "loaded"

    monkeypatch.setattr("edge_unisd.modeling.load_base", fake_load_base)
    monkeypatch.setenv("EDGE_UNISD_BASE_QUANTIZATION", "nf4")
    settings = load_settings(home.settings)
    assert settings.base_quantization == "nf4"
    assert jobs.settings_model_loader(settings)(None) == "loaded" and seen["quantization"] == "nf4"
    assert seen["dtype"] == "float32"  # the tests' compute dtype (tests/daemon/conftest.py) reaches it too
    monkeypatch.setenv("EDGE_UNISD_COMPUTE_DTYPE", "bfloat16")
    jobs.settings_model_loader(load_settings(home.settings))(None)
    assert seen["dtype"] == "bfloat16"
    monkeypatch.setenv("EDGE_UNISD_COMPUTE_DTYPE", "auto")  # the loader's own default: measured at load
    jobs.settings_model_loader(load_settings(home.settings))(None)
    assert seen["dtype"] is None
    injected = object()
    assert jobs.settings_model_loader(settings, injected) is injected  # a caller's loader (tests) wins
    monkeypatch.setenv("EDGE_UNISD_BASE_QUANTIZATION", "int3")
    with pytest.raises(Exception, match="EDGE_UNISD_BASE_QUANTIZATION.*'none' or 'nf4'"):
        load_settings(home.settings)


def test_a_qlora_round_promotes_and_exports_from_the_full_precision_base(home, tiny_folder, monkeypatch, tiny_bars,
                                                                         capsys):
    pytest.importorskip("bitsandbytes")
    from adapters.merge import is_quantized
    from edge_unisd.modeling import load_base

    monkeypatch.setattr(jobs, "export_promoted", REAL_EXPORT)
    models = []

    def nf4_loader(spec):
        models.append(load_base(tiny_folder, quantization="nf4"))
        return models[-1]

    r = adapt(home, nf4_loader)
    assert r["status"] == "promoted", r.get("reason")
    assert models and all(is_quantized(m.model) for m in models)  # the round trained on the 4-bit base
    assert r["export"]["quant"] == "f16" and r["export"]["verify"]["passed"]  # merged into fp32, verified
    assert (home.exports / "current.gguf").is_file()
    assert registry(home).current().config["base_quantization"] == "nf4"  # recorded with the version
    assert main(["status", "--home", str(home.root)]) == 0
    assert "trained on an nf4 base (QLoRA)" in capsys.readouterr().out


def test_eval_and_adapt_load_the_base_as_the_setting_says(home, tiny_folder, monkeypatch):
    from edge_unisd.modeling import load_base

    asked = []

    def default_loader(spec, quantization="none", dtype=None):
        asked.append(quantization)
        return load_base(tiny_folder, dtype=dtype)

    monkeypatch.setattr(jobs, "default_model_loader", default_loader)
    monkeypatch.setenv("EDGE_UNISD_BASE_QUANTIZATION", "nf4")
    jobs.evaluate_current(home, eval_settings=EVAL)
    jobs.adapt_once(home, overrides=OVERRIDES, eval_settings=EVAL, sensors=readings)
    assert asked == ["nf4", "nf4"]


# --- compute dtype: compute_dtype --------------------------------------------------------------------

def test_a_bf16_round_is_gated_on_its_own_measurements_and_exports_from_the_fp32_base(home, tiny_folder,
                                                                                      monkeypatch, tiny_bars,
                                                                                      capsys):
    """compute_dtype = "bfloat16" (what "auto" takes on a CPU with native bf16): the round trains and evaluates
    the bf16 model, keeps its eval cache apart from the fp32 base's, and exports merged into the fp32 base."""
    from edge_unisd.modeling import load_base

    monkeypatch.setattr(jobs, "export_promoted", REAL_EXPORT)
    monkeypatch.setenv("EDGE_UNISD_COMPUTE_DTYPE", "bfloat16")
    models = []

    def default_loader(spec, quantization="none", dtype=None):
        models.append(load_base(tiny_folder, quantization=quantization, dtype=dtype))
        return models[-1]

    monkeypatch.setattr(jobs, "default_model_loader", default_loader)
    r = jobs.adapt_once(home, overrides=OVERRIDES, eval_settings=EVAL, sensors=readings)
    assert r["status"] == "promoted", r.get("reason")
    assert models and all(m.dtype == torch.bfloat16 for m in models)
    assert registry(home).current().config["compute_dtype"] == "bfloat16"  # recorded with the version
    assert jobs._base_key(models[0]) == models[0].source.fingerprint + "+bfloat16"  # its eval cache apart
    assert r["export"]["quant"] == "f16" and r["export"]["verify"]["passed"]  # merged into fp32, verified
    assert (home.exports / "current.gguf").is_file()
    assert main(["status", "--home", str(home.root)]) == 0
    assert "trained in bfloat16" in capsys.readouterr().out
