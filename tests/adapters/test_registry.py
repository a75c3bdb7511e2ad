"""AdapterRegistry: whole versions only, status transitions, the CURRENT pointer, prune, forget."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
import time

import pytest

from adapters.registry import AdapterRegistry, RegistryError, normalize_version


def fake_adapter(folder, payload: bytes = b"weights") -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (folder / "adapter_model.safetensors").write_bytes(payload)
    return str(folder)


@pytest.fixture
def reg(tmp_path):
    return AdapterRegistry(tmp_path / "adapters")


def test_add_writes_a_whole_private_version_with_meta(reg, tmp_path):
    v = reg.add(fake_adapter(tmp_path / "src"), base_fingerprint="abc", config={"rank": 4},
                item_ids=["i1", "i2"], metrics={"fit": 1.5})
    assert v.version == "v0001" and v.status == "candidate"
    assert sorted(p.name for p in v.path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                         "meta.json"]
    meta = json.loads((v.path / "meta.json").read_text())
    assert meta["base_fingerprint"] == "abc" and meta["item_ids"] == ["i1", "i2"] and meta["parent"] is None
    assert meta["metrics"] == {"fit": 1.5} and meta["config"] == {"rank": 4} and meta["created"]
    assert stat.S_IMODE(os.stat(v.path).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(v.path / "adapter_model.safetensors").st_mode) == 0o600
    v2 = reg.add(fake_adapter(tmp_path / "src2"), parent="v0001")
    assert v2.version == "v0002" and v2.parent == "v0001"
    assert [x.version for x in reg.list()] == ["v0001", "v0002"]
    assert reg.list()[0].to_json().keys() == {"version", "path", "status", "created", "metrics"}


def test_add_refuses_a_folder_that_is_not_an_adapter(reg, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(RegistryError, match="adapter_config.json"):
        reg.add(tmp_path / "empty")
    assert reg.list() == [] and not any(reg.root.glob(".v*"))  # the temp dir was removed


def test_add_from_a_peft_model_keeps_only_the_named_adapter(reg, tiny_llama):
    from peft import LoraConfig, get_peft_model

    from edge_unisd.modeling import load_base

    model = get_peft_model(load_base(tiny_llama).model, LoraConfig(r=2, target_modules=["q_proj"]))
    model.add_adapter("ema", LoraConfig(r=2, target_modules=["q_proj"]))
    v = reg.add(model, adapter_name="ema")
    assert (v.path / "adapter_config.json").is_file() and (v.path / "adapter_model.safetensors").is_file()
    assert not (v.path / "ema").exists() and not (v.path / ".peft").exists()
    with pytest.raises(RegistryError, match="no adapter 'nope'"):
        reg.add(model, adapter_name="nope")


def test_promote_moves_current_and_retires_the_previous(reg, tmp_path):
    a = reg.add(fake_adapter(tmp_path / "a"))
    b = reg.add(fake_adapter(tmp_path / "b"))
    assert reg.current() is None
    reg.promote(a.version)
    assert reg.current().version == "v0001"
    reg.promote("2")
    assert reg.current().version == "v0002"
    assert reg.get(1).status == "retired" and reg.get(b.version).status == "promoted"
    assert (reg.root / "CURRENT").read_text().strip() == "v0002"


def test_reject_and_rollback_rules(reg, tmp_path):
    a = reg.add(fake_adapter(tmp_path / "a"))
    b = reg.add(fake_adapter(tmp_path / "b"))
    reg.promote(a.version)
    with pytest.raises(RegistryError, match="current adapter"):
        reg.reject(a.version, "worse")
    reg.reject(b.version, "retention JSD too high")
    assert reg.get(b.version).reason == "retention JSD too high"
    with pytest.raises(RegistryError, match="rejected"):
        reg.promote(b.version)
    with pytest.raises(RegistryError, match="--force"):
        reg.rollback(b.version)
    reg.rollback(b.version, force=True)
    assert reg.current().version == b.version and reg.get(a.version).status == "retired"
    reg.rollback("v0001")
    assert reg.current().version == "v0001"
    assert reg.rollback("base") is None and reg.current() is None
    with pytest.raises(RegistryError, match="not found"):
        reg.rollback("v0042")
    with pytest.raises(RegistryError, match="not an adapter version"):
        normalize_version("latest")


def test_prune_keeps_newest_and_never_the_current(reg, tmp_path):
    vs = [reg.add(fake_adapter(tmp_path / f"s{i}")) for i in range(5)]
    reg.promote(vs[0].version)
    removed = reg.prune(keep=2)
    assert removed == ["v0002", "v0003"]
    assert [v.version for v in reg.list()] == ["v0001", "v0004", "v0005"]
    assert not any(reg.root.glob(".*.tmp"))
    assert reg.add(fake_adapter(tmp_path / "s9")).version == "v0006"  # numbers are never reused


def test_forgotten_items_flag_versions_and_block_serving_them(reg, tmp_path):
    a = reg.add(fake_adapter(tmp_path / "a"), item_ids=["x", "y"])
    b = reg.add(fake_adapter(tmp_path / "b"), item_ids=["z"], parent="v0001")
    reg.promote(b.version)
    hit = reg.mark_trained_on_forgotten(["y", "nope"])
    assert [v.version for v in hit] == [a.version]
    got = reg.get(a.version)
    assert got.trained_on_forgotten and got.item_ids == ["x"] and "forgotten" in got.reason
    with pytest.raises(RegistryError, match="forget"):
        reg.rollback(a.version, force=True)
    assert not reg.get(b.version).trained_on_forgotten


def test_opening_removes_leftovers_and_ignores_incomplete_folders(tmp_path):
    root = tmp_path / "adapters"
    reg = AdapterRegistry(root)
    reg.add(fake_adapter(tmp_path / "a"))
    (root / ".v0002.abc123.tmp").mkdir()  # what a crash inside atomic_dir leaves
    (root / "v0003").mkdir()  # not made by the registry: no meta.json
    reg2 = AdapterRegistry(root)
    assert not (root / ".v0002.abc123.tmp").exists()
    assert [v.version for v in reg2.list()] == ["v0001"]


def test_current_pointing_at_a_missing_version_means_base(reg, tmp_path):
    (reg.root / "CURRENT").write_text("v0007\n")
    assert reg.current() is None


KILLED_WRITER = textwrap.dedent("""
    import shutil, sys, time
    from pathlib import Path
    import adapters.registry as r

    def slow_save(source, target, adapter_name):
        shutil.copyfile(Path(source) / "adapter_config.json", target / "adapter_config.json")
        Path(sys.argv[2]).write_text("mid-write")
        time.sleep(60)

    r._save_peft = slow_save
    r.AdapterRegistry(sys.argv[1]).add(sys.argv[3])
""")


def test_a_writer_killed_mid_version_leaves_only_whole_versions(tmp_path):
    root = tmp_path / "adapters"
    reg = AdapterRegistry(root)
    reg.add(fake_adapter(tmp_path / "a"))
    marker = tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(root), str(marker),
                             fake_adapter(tmp_path / "b")])
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "writer died before the write"
            time.sleep(0.05)
        proc.kill()  # SIGKILL: no cleanup handler runs
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert list(root.glob(".v0002.*.tmp")), "the half-written version should be a hidden temp"
    assert [v.version for v in reg.list()] == ["v0001"]
    reopened = AdapterRegistry(root)
    assert not list(root.glob(".*.tmp"))
    assert reopened.add(fake_adapter(tmp_path / "c")).version == "v0002"
