"""bench/limit.py, throughput.py, vs_trl.py, packing.py, rollout_lora.py, decode_rate.py: each --tiny run
gives the documented keys, finite."""

from __future__ import annotations

import math

import pytest


def _load(name: str):
    """bench/<name>.py under the key the scripts use for each other, so they share one module."""
    from bench.siblings import load

    return load(name)


@pytest.fixture(scope="module")
def limit():
    return _load("limit")


@pytest.fixture(scope="module")
def throughput():
    return _load("throughput")


@pytest.fixture(scope="module")
def vs_trl():
    return _load("vs_trl")


def finite(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def assert_load_avg(machine: dict) -> None:
    for key in ("load_avg_start", "load_avg_end"):
        assert len(machine[key]) == 3 and all(finite(v) and v >= 0 for v in machine[key]), key


# --- limit ---------------------------------------------------------------------------------------

def test_flops_per_token_counts_the_decoder_matmuls(limit):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    linear = sum(m.weight.numel() for m in model.model.layers.modules() if m.__class__.__name__ == "Linear")
    f = limit.model_flops_per_token(cfg)
    assert f["params_nonembedding"] == linear
    assert f["forward"] == 2 * linear and f["train_6n"] == 3 * f["forward"]  # no context: no attention term
    assert f["train_lora"] == 2 * f["forward"]  # frozen base, rank 0: no weight gradients at all
    assert f["lm_head_forward"] == 2 * 64 * 1000
    with_ctx = limit.model_flops_per_token(cfg, context=100, lora_rank=8)
    attention = 4 * 3 * 4 * 16 * 50  # layers x heads x head_dim x mean attended context (100 / 2)
    assert with_ctx["forward"] == f["forward"] + attention
    assert with_ctx["train_lora"] > f["train_lora"] + 3 * attention  # plus the LoRA matrices' own work
    smol = limit.model_flops_per_token(limit.SMOLLM2_135M)
    assert smol["params_nonembedding"] == 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536)


def test_limit_tiny_run(limit):
    r = limit.run(["--tiny"])
    assert_load_avg(r["machine"])
    assert all(finite(v) and v >= 0 for v in r["flops_per_token"].values())
    mm = r["matmul"]["float32"]
    assert finite(mm["best_flops"]) and mm["best_flops"] >= mm["median_flops"] > 0
    assert len(mm["shapes"]) == 5  # q, k/v, o, gate/up, down, LM head chunk: k/v and gate/up merged
    for ceiling in (mm["ceiling_best"], mm["ceiling_median"]):
        assert set(ceiling) == {"forward_tokens_per_s", "train_6n_tokens_per_s", "train_lora_tokens_per_s"}
        assert all(finite(v) and v > 0 for v in ceiling.values())
        assert ceiling["forward_tokens_per_s"] > ceiling["train_6n_tokens_per_s"]


# --- throughput ----------------------------------------------------------------------------------

def test_views_per_batch(throughput):
    assert throughput.views_per_batch(8, 0.25) == 2
    assert throughput.views_per_batch(2, 0.25) == 1  # a positive share always routes one item
    assert throughput.views_per_batch(8, 0.0) == 0
    assert throughput.views_per_batch(4, 1.0) == 4


def test_throughput_tiny_run_with_view_comparison(throughput):
    from edge_unisd.trainer import STAGES

    r = throughput.run(["--tiny", "--compare-views"])
    assert_load_avg(r["machine"])
    s = r["settings"]
    assert (s["preset"], s["batch"], s["tokens"], s["steps"], s["view_items_per_step"]) == ("edge", 2, 4, 1, 1)
    assert r["completion_tokens"] == 2 * 4  # min = max new tokens: every completion has exactly --tokens
    assert r["view_tokens"] == 1 * 4 * s["num_views"]  # one routed item, rescored by K views
    for key in ("tokens_per_s", "seconds_per_step", "round_seconds", "peak_rss_gb", "rss_after_load_gb"):
        assert finite(r[key]) and r[key] > 0, key
    assert set(r["stage_seconds"]) == set(STAGES) and all(finite(v) for v in r["stage_seconds"].values())
    assert sum(r["stage_seconds"].values()) <= r["round_seconds"] * 1.01
    for stage in ("rollout", "teacher", "views", "student"):
        assert finite(r["stage_tokens_per_s"][stage]), stage
    assert r["peak_cuda_gb"] is None  # CPU
    assert finite(r["limit"]["matmul_best_flops"]) and r["limit"]["matmul_best_flops"] > 0
    for key in ("student_lora", "student_6n", "rollout"):
        assert finite(r["mfu"][key]) and 0 < r["mfu"][key] < 1, key
    assert r["mfu"]["student_6n"] > r["mfu"]["student_lora"]  # 6N counts weight gradients LoRA does not need
    c = r["compare_views"]
    assert finite(c["ratio"]) and c["ratio"] > 0 and c["target_max_ratio"] == 1.6
    assert c["stage_seconds_without"]["views"] < r["stage_seconds"]["views"]  # no routed items: no view forwards


def test_linux_kib_figures_come_out_in_psutils_gigabytes(throughput):
    """ru_maxrss and /proc count KiB: read as kB, every peak RSS came out 2.4% low against psutil's RSS."""
    from pathlib import Path

    status = Path("/proc/self/status")
    if not status.is_file():
        pytest.skip("no /proc on this system")
    vm_rss_kib = next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmRSS:"))
    assert throughput.kib_to_gb(vm_rss_kib) == pytest.approx(throughput.rss_gb(), rel=0.005)


def test_compare_views_needs_a_budgeted_preset(throughput):
    with pytest.raises(SystemExit, match="edge"):
        throughput.run(["--tiny", "--compare-views", "--preset", "sd"])


# --- packing -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def packing():
    return _load("packing")


def test_varied_completion_masks_are_seeded_prefixes(packing):
    import torch

    mask = packing.completion_masks(6, 16, "varied", seed=3)
    lengths = mask.sum(1)
    assert torch.equal(mask, packing.completion_masks(6, 16, "varied", seed=3))
    assert ((lengths >= 2) & (lengths <= 16)).all() and len(set(lengths.tolist())) > 1
    assert (mask[:, 1:] <= mask[:, :-1]).all()  # 1s then 0s, a rollout's shape
    assert packing.completion_masks(2, 5, "fixed").sum() == 10


def test_packing_tiny_run(packing):
    r = packing.run(["--tiny"])
    assert_load_avg(r["machine"])
    fixed, varied = r["modes"]
    assert (fixed["lengths"], varied["lengths"]) == ("fixed", "varied")
    for row in (fixed, varied):
        pos = row["student_positions"]
        assert pos["packed"] <= pos["padded"]
        for key in ("student_seconds", "teacher_seconds"):
            assert all(finite(v) and v > 0 for v in row[key].values()), key
        assert finite(row["student_speedup"]) and finite(row["teacher_speedup"])
    # shorter completions leave padding that packing does not run
    assert varied["completion_tokens"] < fixed["completion_tokens"]
    assert varied["student_positions"]["packed"] < varied["student_positions"]["padded"]
    assert varied["student_positions"]["padded"] == fixed["student_positions"]["padded"]


def test_packing_refuses_unknown_length_modes(packing):
    with pytest.raises(SystemExit, match="bogus"):
        packing.run(["--tiny", "--lengths", "fixed,bogus"])


# --- vs_trl --------------------------------------------------------------------------------------

def test_aggregate_takes_medians_and_ratios_ours_over_trl(vs_trl):
    def run(system, sps, tps, rss):
        return {"system": system, "seconds_per_step": sps, "tokens_per_s": tps, "rollout_seconds_per_step": sps / 2,
                "peak_rss_gb": rss, "rss_after_load_gb": 0.5, "completion_tokens": 16, "step_seconds": [sps, sps]}

    runs = [run("trl", 4.0, 10.0, 2.0), run("sd", 1.0, 40.0, 1.0), run("trl", 6.0, 8.0, 2.5),
            run("sd", 2.0, 20.0, 1.2), run("trl", 5.0, 9.0, 2.2), run("sd", 3.0, 30.0, 0.9)]
    out = vs_trl.aggregate(runs, ["trl", "sd"])
    assert out["systems"]["trl"]["seconds_per_step"] == 5.0 and out["systems"]["sd"]["tokens_per_s"] == 30.0
    assert out["systems"]["trl"]["peak_rss_gb"] == 2.5  # the worst run
    assert out["systems"]["sd"]["completion_tokens_per_step"] == 8
    r = out["ratios_vs_trl"]["sd"]
    assert r["tokens_per_s"] == pytest.approx(30 / 9) and r["seconds_per_step"] == pytest.approx(2 / 5)
    assert r["peak_rss"] == pytest.approx(1.2 / 2.5)
    assert "trl" not in out["ratios_vs_trl"]


def test_vs_trl_tiny_run(vs_trl):
    systems = ["trl", "sd"] if vs_trl.trl_available() else ["sd"]
    r = vs_trl.run(["--tiny", "--systems", *systems])
    assert_load_avg(r["machine"])
    assert [x["system"] for x in r["runs"]] == systems  # one round, in the alternation order
    for system in systems:
        v = r["systems"][system]
        for key in ("seconds_per_step", "tokens_per_s", "rollout_seconds_per_step", "peak_rss_gb"):
            assert finite(v[key]) and v[key] > 0, (system, key)
        assert v["completion_tokens_per_step"] == 2 * 4  # the same completion tokens on both sides
    for x in r["runs"]:
        assert x["peak_rss_gb"] >= x["rss_after_load_gb"] * 0.99  # wait4's ru_maxrss is this child's own peak
        assert_load_avg(x)
    if "trl" not in systems:
        pytest.skip("trl is not installed: only our side was run")
    (trl_run,) = [x for x in r["runs"] if x["system"] == "trl"]
    assert trl_run["prompts_match"] is True  # TRL saw the very token ids our student and teacher see
    ratios = r["ratios_vs_trl"]["sd"]
    assert all(finite(ratios[k]) and ratios[k] > 0 for k in ("tokens_per_s", "seconds_per_step", "peak_rss"))


# --- rollout_lora ----------------------------------------------------------------------------------

def test_rollout_lora_tiny_run():
    pytest.importorskip("llama_cpp")
    r = _load("rollout_lora").run(["--tiny"])
    assert_load_avg(r["machine"])
    rows = {row["mode"]: row for row in r["rows"]}
    assert set(rows) == {"merged", "adapter"}
    for row in rows.values():
        assert finite(row["median_seconds"]) and row["median_seconds"] > 0 and finite(row["tokens_per_s"])
        assert 0.0 <= row["greedy_agreement"] <= 1.0
    assert rows["adapter"]["speedup_vs_adapter"] == 1.0
    # each mode really ran its own way: merged writes, the adapter path writes LoRA GGUFs
    totals = r["backend_totals"]
    assert totals["merged"]["merged_write"] > 0 and totals["merged"]["adapter_write"] == 0
    assert totals["adapter"]["adapter_write"] > 0 and totals["adapter"]["merged_write"] == 0


def test_throughput_tiny_run_on_an_nf4_base(throughput):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    r = throughput.run(["--tiny", "--quantize", "nf4", "--preset", "sd"])
    assert r["settings"]["quantization"] == "nf4" and r["settings"]["rollout_backend"] == "hf"
    assert finite(r["tokens_per_s"]) and r["tokens_per_s"] > 0
    loaded = throughput.load_model("tiny", quantization="nf4")
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in loaded.model.modules())
    with pytest.raises(SystemExit, match="llama.cpp would sample from the GGUF's weights"):
        throughput.run(["--tiny", "--quantize", "nf4", "--rollout-backend", "llamacpp"])


def test_throughput_tiny_run_in_bf16(throughput):
    import torch

    r = throughput.run(["--tiny", "--dtype", "bfloat16", "--preset", "sd"])
    assert r["model"]["dtype"] == "bfloat16" and r["limit"]["dtype"] == "bfloat16"
    assert finite(r["tokens_per_s"]) and r["tokens_per_s"] > 0
    loaded = throughput.load_model("tiny", dtype="bfloat16")  # random weights in the asked dtype
    assert all(p.dtype == torch.bfloat16 for p in loaded.model.parameters())


# --- decode_rate -----------------------------------------------------------------------------------

def test_decode_rate_tiny_run():
    pytest.importorskip("llama_cpp")
    bench = _load("decode_rate")
    r = bench.run(["--tiny"])
    assert_load_avg(r["machine"])
    assert {(p["weights"], p["rows"]) for p in r["points"]} == {(w, n) for w in ("f16", "base") for n in (1, 2)}
    for p in r["points"]:
        assert finite(p["step_ms"]) and p["step_ms"] >= 0 and p["seconds"] >= p["first_token_seconds"] > 0
    assert set(r["fits"]) == {"f16", "base"} and all(finite(v) for f in r["fits"].values() for v in f.values())
    assert r["settings"]["forward_flops_per_row_step"] > 0


def test_decode_rate_line_fit_recovers_fixed_and_per_row_cost():
    from bench.siblings import load

    fit_line = load("decode_rate").fit_line
    assert fit_line([1, 4, 8, 16], [8.0 + 6.0 * n for n in (1, 4, 8, 16)]) == pytest.approx((8.0, 6.0))
    assert fit_line([8], [50.0]) == (50.0, 0.0)


# --- gpu_check.sh ----------------------------------------------------------------------------------

def test_gpu_check_script_smoke_run_writes_each_runs_json(tmp_path):
    """bench/gpu_check.sh runs on a device machine no test reaches: its `smoke` mode runs the same steps
    with tiny shapes on CPU, so a renamed flag or a broken bench breaks here first."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("bitsandbytes")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OUT": str(tmp_path), "PY": sys.executable}
    done = subprocess.run(["bash", str(root / "bench" / "gpu_check.sh"), "smoke"], env=env, capture_output=True,
                          text=True, timeout=600)
    log = (tmp_path / "log.txt").read_text()
    assert done.returncode == 0, log[-3000:]
    assert log.count("exit 0") == 5, log[-2000:]
    runs = {name: json.loads((tmp_path / f"{name}.json").read_text())
            for name in ("limit", "135m-edge-64", "1.7b-edge-64-nf4", "1.7b-edge-64", "135m-sd-256")}
    assert runs["135m-edge-64"]["compare_views"] is not None
    assert runs["1.7b-edge-64-nf4"]["settings"]["quantization"] == "nf4"
    assert runs["135m-sd-256"]["settings"]["tokens"] == 6 and runs["135m-sd-256"]["settings"]["preset"] == "sd"


def test_gpu_check_script_fails_when_a_run_fails_or_the_deadline_passes(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OUT": str(tmp_path), "PY": sys.executable, "DEADLINE": "20"}  # < 30 s: every run skipped
    done = subprocess.run(["bash", str(root / "bench" / "gpu_check.sh"), "smoke"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1
    assert (tmp_path / "log.txt").read_text().count("skipped") == 5
