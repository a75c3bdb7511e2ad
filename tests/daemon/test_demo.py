"""`edge-unisd demo` end to end on the test hook's tiny random model with tiny settings: a fresh home, the
sample user ingested, one round, the gate's before/after, a verified GGUF and an answer from llama.cpp.
(The real demo on the bundled SmolLM2 is run by hand: `make demo`.)"""

from __future__ import annotations

import json
import math

import pytest

from daemon import demo, jobs
from daemon.cli import main
from daemon.evaluation import EvalSettings
from daemon.home import Home
from daemon.store import Store

TINY = {"rollout": {"max_new_tokens": 4}, "optim": {"batch_size": 8, "micro_batch_size": 8, "lr": 1e-3},
        "lora": {"rank": 4, "alpha": 8}, "num_views": 2, "gradient_checkpointing": False}
TINY_EVAL = EvalSettings(general_prompts=2, max_heldout_items=16, retention_new_tokens=4, accuracy_new_tokens=4,
                         max_retention_jsd=0.5, fit_tolerance=10.0)


@pytest.fixture(autouse=True)
def tiny(monkeypatch):
    import adapters.export
    from adapters.verify import Bar

    monkeypatch.setenv(jobs.TEST_TINY_MODEL_ENV, "1")
    monkeypatch.setattr(demo, "DEMO_OVERRIDES", TINY)
    monkeypatch.setattr(demo, "DEMO_EVAL", TINY_EVAL)
    monkeypatch.setattr(adapters.export, "bar_for", lambda quant: Bar(0.9, 0.05))  # see test_jobs.tiny_bars


def test_the_demo_runs_end_to_end_and_prints_what_changed(tmp_path, capsys):
    root = tmp_path / "demo"
    assert main(["demo", "--home", str(root), "--json", "--steps", "2"]) == 0
    captured = capsys.readouterr()
    r = json.loads(captured.out)
    assert "round 1:" in captured.err and "step 2/2" in captured.err  # progress, on stderr

    # the sample user went in: 16 to train, 16 held out, the rest waiting for later rounds
    assert r["sample"]["added"] == r["sample"]["rows"] == 174
    assert (r["sample"]["train"], r["sample"]["held_out"]) == (16, 16)
    assert r["round"]["status"] in ("promoted", "rejected") and r["round"]["items"] == 16
    assert r["round"]["steps"] == {"planned": 2, "done": 2, "this_run": 2}
    # before/after, the old demo's numbers included
    m = r["metrics"]
    for key in ("train_nll", "heldout_nll"):
        assert all(math.isfinite(m[key][k]) for k in ("before", "after"))
    assert m["retention_jsd"]["before"] == 0.0 and m["retention_jsd"]["after"] >= 0.0
    assert m["accuracy"]["items"] == 16  # held-out items with a check
    # a verified GGUF, and llama.cpp answered from it
    assert r["export"]["verify"]["passed"] and r["export"]["quant"] == "f16"
    assert r["export"]["gguf"] == str(root / "exports" / "current.gguf") and r["export"]["bytes"] > 0
    q = r["question"]
    assert q["id"] == "s001" and q["text"] == "What breed is my dog?" and q["must_contain"] == ["beagle"]
    assert isinstance(q["adapted"], str) and q["adapted_correct"] in (True, False)
    assert q["base"] is None  # the tiny base is an HF folder: there is no base GGUF to ask
    assert set(r["seconds"]) == {"setup", "round", "export", "answer", "total"}

    home = Home(root)
    with Store.open(home) as store:
        assert store.get_meta("demo") is True and store.count_items().held_out == 16
        assert store.last_round().status == "done"
    text = demo._table(r)  # what `edge-unisd demo` prints without --json
    for line in ("reference NLL, trained items (no profile)", "reference NLL, held-out items (no profile)",
                 "retention JSD vs base, general prompts", "task accuracy, 16 held-out items with a check",
                 "export:  " + r["export"]["gguf"], "ask:     'What breed is my dog?'", "adapted model: '"):
        assert line in text, line


def test_the_demo_refuses_a_home_with_someone_s_data(tmp_path, capsys):
    root = tmp_path / "real"
    assert main(["init", "--home", str(root)]) == 0
    rc = main(["demo", "--home", str(root)])
    err = capsys.readouterr().err
    assert rc == 2 and "with its own data" in err and "Traceback" not in err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    assert main(["demo", "--home", str(tmp_path / "full")]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert main(["demo", "--steps", "0"]) == 2
