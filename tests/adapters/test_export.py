"""export_adapter end to end on tiny random llama and qwen2 HF folders: merge, write, verify, publish;
refusal, and exports killed mid-write (exception and SIGKILL)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
import time

import gguf
import numpy as np
import pytest

from adapters import gguf_export as ge
from adapters.export import ExportRefused, export_adapter
from adapters.registry import AdapterRegistry
from adapters.verify import llama_logits, open_llama, probe_ids, verify_gguf
from edge_unisd.modeling import load_base


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def visible_builds(out_dir) -> list[str]:
    return sorted(p.name for p in (out_dir / "builds").glob("*.gguf"))


@pytest.mark.parametrize("arch, quant", [("llama", "f16"), ("qwen2", "f16"), ("llama", "f32"), ("qwen2", "bf16")])
def test_merged_export_matches_torch_and_carries_the_adapter(arch, quant, request, tmp_path):
    base_dir = request.getfixturevalue(f"tiny_{arch}")
    adapter = request.getfixturevalue(f"tiny_{arch}_adapter")
    result = export_adapter(base_dir, adapter, tmp_path / "out", quant)

    d = result.to_dict()
    assert {"gguf", "adapter", "quant", "verify"} <= d.keys() and d["quant"] == quant
    assert d["gguf"] == str(tmp_path / "out" / "current.gguf") and d["verify"]["passed"] is True
    assert result.verify.mean_kl <= result.verify.bar.kl_max and result.verify.top1 >= result.verify.bar.top1_min
    assert result.verify.template_ok and result.verify.tokenizer_ok and result.verify.n_positions > 200
    # the adapter is really in: the same file compared with the unadapted base misses the bar by far
    base = load_base(base_dir)
    vs_base = verify_gguf(result.gguf, base.model, base.tokenizer, quant)
    assert not vs_base.passed and vs_base.mean_kl > 0.1 and vs_base.top1 < 0.5
    assert (tmp_path / "out" / "Modelfile").read_text().startswith("# Written by edge-unisd")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_lora_gguf_on_the_base_gives_the_merged_logits(arch, request, tmp_path):
    base_dir = request.getfixturevalue(f"tiny_{arch}")
    adapter = request.getfixturevalue(f"tiny_{arch}_adapter")
    out = tmp_path / "out"
    merged = export_adapter(base_dir, adapter, out, "f32")
    lora = export_adapter(base_dir, adapter, out, "f32", fmt="lora")
    assert lora.verify.passed and lora.gguf.name == "current-lora.gguf"
    base_gguf = next((out / "builds").glob("base-*-f16.gguf"))
    assert lora.verify.gguf == str(base_gguf) and lora.verify.lora == str(lora.build)

    ids = probe_ids(load_base(base_dir).tokenizer)[0]
    with_lora = llama_logits(open_llama(base_gguf, n_ctx=128, lora_path=lora.gguf), ids)
    without = llama_logits(open_llama(base_gguf, n_ctx=128), ids)
    full = llama_logits(open_llama(merged.gguf, n_ctx=128), ids)
    np.testing.assert_allclose(with_lora, full, atol=2e-2)  # base is f16 here, the merged file f32
    assert np.abs(without - full).max() > 0.5
    assert "ADAPTER ./current-lora.gguf" in (out / "Modelfile.lora").read_text()


def test_a_garbled_export_is_refused_and_current_stays(tiny_llama, tiny_llama_adapter, tmp_path, monkeypatch):
    out = tmp_path / "out"
    good = export_adapter(tiny_llama, tiny_llama_adapter, out, "f16")
    before = digest(good.gguf)
    # the classic converter bug: Q/K rows not permuted for llama.cpp's rotary layout
    monkeypatch.setattr(ge, "permute_qk", lambda w, n_head, n_head_kv=None: w)
    with pytest.raises(ExportRefused) as err:
        export_adapter(tiny_llama, tiny_llama_adapter, out, "f16")
    msg = str(err.value)
    assert "mean KL" in msg and "is above the f16 bar 0.01" in msg and "below the f16 bar 0.98" in msg
    assert "still is the previous good file" in msg
    assert err.value.report.mean_kl > 0.01 and err.value.report.top1 < 0.98
    assert digest(out / "current.gguf") == before
    assert visible_builds(out) == [good.build.name]


def test_an_exception_mid_write_publishes_nothing(tiny_llama, tiny_llama_adapter, tmp_path, monkeypatch):
    out = tmp_path / "out"
    good = export_adapter(tiny_llama, tiny_llama_adapter, out, "f16")
    before = digest(good.gguf)
    calls = {"n": 0}
    real = ge.encode_tensor

    def failing(arr, qtype):
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError("No space left on device (injected)")
        return real(arr, qtype)

    monkeypatch.setattr(ge, "encode_tensor", failing)
    with pytest.raises(OSError, match="injected"):
        export_adapter(tiny_llama, tiny_llama_adapter, out, "q8_0")
    assert digest(out / "current.gguf") == before
    assert visible_builds(out) == [good.build.name]
    assert not list(out.glob(".*.tmp")) and not list((out / "builds").glob(".*.tmp"))


KILLED_EXPORT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import adapters.gguf_export as ge
    from adapters.export import export_adapter

    real, calls = ge.encode_tensor, {"n": 0}
    def slow(arr, qtype):
        calls["n"] += 1
        if calls["n"] == 4:
            Path(sys.argv[4]).write_text("mid-write")
            time.sleep(120)
        return real(arr, qtype)
    ge.encode_tensor = slow
    export_adapter(sys.argv[1], sys.argv[2], sys.argv[3], "f16")
""")


def test_an_export_killed_with_sigkill_leaves_no_partial_file(tiny_llama, tiny_llama_adapter, tmp_path):
    out = tmp_path / "out"
    good = export_adapter(tiny_llama, tiny_llama_adapter, out, "f32")
    before = digest(good.gguf)
    marker = tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_EXPORT, str(tiny_llama), str(tiny_llama_adapter),
                             str(out), str(marker)])
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "export died before writing"
            time.sleep(0.05)
        proc.kill()
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert digest(out / "current.gguf") == before  # what a server watching current.gguf sees
    assert visible_builds(out) == [good.build.name]  # no partial file under a real name
    assert list((out / "builds").glob(".*.tmp")), "the interrupted write should be a hidden temp"
    again = export_adapter(tiny_llama, tiny_llama_adapter, out, "f16")  # the next export cleans up
    assert again.verify.passed and not list((out / "builds").glob(".*.tmp"))


def test_verification_is_stored_in_the_registry_version(tiny_llama, tiny_llama_adapter, tmp_path):
    reg = AdapterRegistry(tmp_path / "adapters")
    v = reg.add(tiny_llama_adapter)
    export_adapter(tiny_llama, v.path, tmp_path / "out", "f16", registry=reg)
    meta = json.loads((v.path / "meta.json").read_text())
    assert meta["metrics"]["export"]["passed"] is True and meta["metrics"]["export"]["quant"] == "f16"


def test_bad_requests_are_refused_before_any_work(tiny_llama, tiny_llama_adapter, tmp_path):
    with pytest.raises(ge.ExportError, match="unknown quant"):
        export_adapter(tiny_llama, tiny_llama_adapter, tmp_path, "q9_z")
    with pytest.raises(ge.ExportError, match="f32 or f16"):
        export_adapter(tiny_llama, tiny_llama_adapter, tmp_path, "q8_0", fmt="lora")
    with pytest.raises(ge.ExportError, match="needs an adapter"):
        export_adapter(tiny_llama, None, tmp_path, "f16", fmt="lora")


def test_old_builds_are_pruned_but_never_the_published_one(tiny_llama, tiny_llama_adapter, tmp_path):
    out = tmp_path / "out"
    results = [export_adapter(tiny_llama, tiny_llama_adapter, out, "f16", keep_builds=1) for _ in range(3)]
    assert visible_builds(out) == [results[-1].build.name]
    assert digest(out / "current.gguf") == digest(results[-1].build)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_gguf_we_wrote_works_as_a_gguf_base(arch, request, tmp_path):
    """HF folder -> our GGUF -> transformers' own GGUF reader -> export from that GGUF base: an independent
    reader agrees with our names, permutation and vocabulary, and the GGUF-base path keeps them."""
    base_dir = request.getfixturevalue(f"tiny_{arch}")
    adapter = request.getfixturevalue(f"tiny_{arch}_adapter")
    plain = export_adapter(base_dir, None, tmp_path / "plain", "f32")
    gguf_base = load_base(plain.build, cache_dir=tmp_path / "cache")
    result = export_adapter(gguf_base, adapter, tmp_path / "out", "f16")
    assert result.verify.passed and result.base.startswith("gguf:")
    names = {t.name for t in gguf.GGUFReader(result.gguf).tensors}
    assert ("output.weight" in names) == (arch == "qwen2")  # tied llama stays tied, untied qwen2 keeps its head
