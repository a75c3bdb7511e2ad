"""bench/ablate.py: a --tiny run writes table, JSON and plot per preset; the verdict follows the numbers."""

from __future__ import annotations

import importlib.util
import json
import math
import stat
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def ablate():
    spec = importlib.util.spec_from_file_location("bench_ablate", ROOT / "bench" / "ablate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def tiny_run(ablate, tmp_path_factory):
    out = tmp_path_factory.mktemp("ablation")
    assert ablate.main(["--tiny", "--steps", "2", "--presets", "sd", "edge", "--out", str(out)]) == 0
    return out


def test_tiny_run_writes_every_preset_with_finite_numbers(tiny_run):
    result = json.loads((tiny_run / "ablation.json").read_text())
    rows = {r["preset"]: r for r in result["rows"]}
    assert list(rows) == ["base", "sd", "edge"]  # base is always measured, first
    for r in rows.values():
        for key in ("fit_nll", "retention_jsd", "accuracy", "train_seconds", "peak_rss_mib",
                    "fit_delta_vs_base"):
            assert isinstance(r[key], float) and math.isfinite(r[key]), (r["preset"], key, r[key])
    assert rows["base"]["train_seconds"] == 0.0 and rows["base"]["retention_jsd"] == 0.0
    assert rows["sd"]["steps"] == rows["edge"]["steps"] == 2  # the same step budget
    assert rows["sd"]["weight_mean"] is None  # no agreement weighting in plain SD
    assert 0.0 < rows["edge"]["weight_min"] <= rows["edge"]["weight_mean"] <= 1.0
    assert result["base_weights_unchanged"] is True  # every preset started from the same base
    assert result["split"]["heldout_ids"] and result["split"]["train"] > 0
    assert result["verdict"]["holds"] is None  # unisd-star and sft were not run: not checkable


def test_edge_gives_views_to_a_quarter_of_each_batch(tiny_run):
    rows = {r["preset"]: r for r in json.loads((tiny_run / "ablation.json").read_text())["rows"]}
    # batch 2 (tiny): max(1, round(0.25 * 2)) = 1 routed item per step, 2 steps
    assert rows["edge"]["view_items"] == 2
    assert rows["sd"]["view_items"] == 0


def test_views_go_to_the_items_measured_most_uncertain(ablate):
    from edge_unisd.items import Item

    batch = [Item(id=i, messages=({"role": "user", "content": i},)) for i in "abcdefgh"]
    known = {"a": 0.1, "c": 2.0, "e": 0.5, "h": 3.0}
    assert ablate.route_views(batch, known) == {"h", "c"}  # a quarter of 8
    assert ablate.route_views(batch[:2], {}) == {"a"}  # nothing measured: at least one, batch order
    assert ablate.route_views(batch[:4], {"d": 0.2}) == {"d"}  # measured beats unmeasured


def test_markdown_and_plot(tiny_run):
    md = (tiny_run / "ablation.md").read_text()
    for preset in ("base", "sd", "edge"):
        assert any(line.startswith(f"| {preset} |") or line.startswith(f"| **{preset}** |")
                   for line in md.splitlines()), preset
    assert md.count("**") >= 4  # the best fit is marked (name and number)
    assert "**Verdict.** Not checked" in md
    assert "| gate |" in md and "Best held-out fit among the versions it would promote" in md
    rows = json.loads((tiny_run / "ablation.json").read_text())["rows"]
    assert all(isinstance(r["gate_promote"], bool) and r["gate_reason"] for r in rows if r["preset"] != "base")
    png = tiny_run / "fit_vs_cost.png"
    assert png.read_bytes().startswith(PNG_MAGIC)
    for f in ("ablation.json", "ablation.md", "fit_vs_cost.png"):
        assert stat.S_IMODE((tiny_run / f).stat().st_mode) == 0o600


def _rows(**fits_and_jsd) -> dict:
    return {name.replace("_", "-"): {"preset": name, "fit_nll": fit, "retention_jsd": jsd}
            for name, (fit, jsd) in fits_and_jsd.items()}


def test_verdict_is_computed_from_the_numbers(ablate):
    good = _rows(base=(3.0, 0.0), sd=(2.8, 0.01), sft=(2.7, 0.05), unisd_star=(2.5, 0.02), edge=(2.6, 0.02))
    v = ablate.claim_verdict(good, bound=0.1)
    assert v["holds"] is True and v["line"].startswith("Yes")

    edge_loses = {**good, "edge": {"fit_nll": 2.75, "retention_jsd": 0.02}}
    v = ablate.claim_verdict(edge_loses, bound=0.1)
    assert v["holds"] is False
    assert v["failures"] == ["edge fit 2.750 is not below sft 2.700"]

    tie = {**good, "unisd-star": {"fit_nll": 2.7, "retention_jsd": 0.02}}
    assert ablate.claim_verdict(tie, bound=0.1)["holds"] is False  # a tie is not a win

    drifts = {**good, "unisd-star": {"fit_nll": 2.5, "retention_jsd": 0.2}}
    v = ablate.claim_verdict(drifts, bound=0.1)
    assert v["holds"] is False and "unisd-star retention JSD 0.2000 exceeds 0.1" in v["line"]
    assert ablate.claim_verdict(drifts, bound=0.25)["holds"] is True  # the bound is a parameter

    no_fit = {**good, "edge": {"fit_nll": None, "retention_jsd": 0.0}}
    assert ablate.claim_verdict(no_fit, bound=0.1)["holds"] is False

    partial = {k: v for k, v in good.items() if k != "sft"}
    v = ablate.claim_verdict(partial, bound=0.1)
    assert v["holds"] is None and "lacks sft" in v["line"]


def test_markdown_shows_the_computed_verdict_and_best_fit(ablate):
    rows = []
    for name, fit in (("base", 3.0), ("sd", 2.8), ("sft", 2.7), ("unisd-star", 2.9), ("edge", 2.6)):
        rows.append({"preset": name, "fit_nll": fit, "retention_jsd": 0.01, "accuracy": 0.5,
                     "train_seconds": 1.0, "peak_rss_mib": 100.0, "weight_mean": None, "weight_min": None,
                     "view_items": 0})
    by = {r["preset"]: r for r in rows}
    result = {"model": "m", "command": "c", "rows": rows, "best_fit": ablate.best_fit(rows),
              "verdict": ablate.claim_verdict(by, bound=0.1), "base_weights_unchanged": True,
              "settings": {"steps": 1, "batch_size": 1, "lora_rank": 1, "lr": 1e-3, "seed": 0,
                           "rollout_tokens": 1, "general_prompts": 1, "num_views": 3,
                           "max_retention_jsd": 0.1},
              "split": {"train": 1, "heldout_evaluated": 1, "heldout_checked": 1}}
    md = ablate.markdown_table(result)
    assert result["best_fit"] == "edge"
    assert "| **edge** | **2.600** |" in md
    assert "**Verdict.** No:" in md and "unisd-star fit 2.900 is not below sd 2.800" in md


def test_split_is_fixed_disjoint_and_keeps_only_referenced_items(ablate):
    from edge_unisd.sample_data import load_sample_items

    items = load_sample_items()
    train, heldout = ablate.split_items(items)
    # membership depends on the id alone, not on the order or the other items
    assert {i.id for i in train} == {i.id for i in ablate.split_items(list(reversed(items)))[0]}
    assert {i.id for i in heldout} == {i.id for i in ablate.split_items(items[::2])[1]} | {
        i.id for i in ablate.split_items(items[1::2])[1]}
    assert not {i.id for i in train} & {i.id for i in heldout}
    assert all(i.reference for i in train + heldout)
    assert len(train) + len(heldout) == sum(1 for i in items if i.reference)
    assert 0.15 < len(heldout) / (len(train) + len(heldout)) < 0.35


def test_split_can_train_on_unreferenced_items_without_touching_the_held_out_set(ablate):
    from edge_unisd.sample_data import load_sample_items

    items = load_sample_items()
    train_ref, heldout = ablate.split_items(items)
    train_all, heldout_all = ablate.split_items(items, train_unreferenced=True)
    assert [i.id for i in heldout_all] == [i.id for i in heldout]  # the same held-out set either way
    unreferenced = [i for i in items if not i.reference]
    assert {i.id for i in train_all} == {i.id for i in train_ref} | {i.id for i in unreferenced}
    assert not {i.id for i in train_all} & {i.id for i in heldout}


def test_gate_column_says_what_the_daemon_would_promote(ablate):
    rows = [{"preset": "base", "fit_nll": 3.0, "retention_jsd": 0.0},
            {"preset": "sd", "fit_nll": 2.8, "retention_jsd": 0.05},
            {"preset": "sft", "fit_nll": 2.5, "retention_jsd": 0.2},  # best fit, but drifts past the bound
            {"preset": "ema", "fit_nll": 3.1, "retention_jsd": 0.01}]  # worse than the base beyond tolerance
    ablate.gate_rows(rows, bound=0.1)
    by = {r["preset"]: r for r in rows}
    assert "gate_promote" not in by["base"]
    assert by["sd"]["gate_promote"] is True
    assert by["sft"]["gate_promote"] is False
    assert "retention JSD vs base 0.2000 > bound 0.1" in by["sft"]["gate_reason"]
    assert by["ema"]["gate_promote"] is False and "held-out fit" in by["ema"]["gate_reason"]
    assert ablate.best_fit(rows) == "sft"
    assert ablate.best_promoted(rows) == "sd"
