"""The data commands of `edge-unisd`: init, ingest, profile, status, forget (and `demo` still dispatched)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from daemon.cli import build_parser, main
from daemon.home import Home


@pytest.fixture
def base(tmp_path) -> Path:
    """A stand-in HF model folder: init only checks it, never loads it."""
    folder = tmp_path / "tiny-model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    return folder


@pytest.fixture
def home(tmp_path, base, capsys) -> Path:
    h = tmp_path / "home"
    assert main(["init", "--home", str(h), "--base", str(base)]) == 0
    capsys.readouterr()
    return h


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def write_jsonl(path: Path, *lines: str) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_init_creates_a_private_home_and_records_the_base(tmp_path, base, capsys):
    h = tmp_path / "h"
    rc, out, _ = run(capsys, "init", "--home", str(h), "--base", str(base), "--json")
    assert rc == 0
    info = json.loads(out)
    assert info["base"]["kind"] == "hf" and info["base"]["path"] == str(base)
    home = Home(h)
    assert home.is_initialised()
    assert (home.settings.stat().st_mode & 0o777, home.db.stat().st_mode & 0o777, h.stat().st_mode & 0o777) \
        == (0o600, 0o600, 0o700)
    assert f'base_model = "{base}"' in home.settings.read_text()
    home.settings.write_text(home.settings.read_text() + "\n# my edit\n")
    assert run(capsys, "init", "--home", str(h))[0] == 0  # again: keeps the user's settings
    assert "# my edit" in home.settings.read_text()
    rc, _, err = run(capsys, "init", "--home", str(h), "--base", str(tmp_path))
    assert rc == 2 and "already sets the base model" in err


def test_init_with_the_bundled_model(tmp_path, capsys):
    rc, out, _ = run(capsys, "init", "--home", str(tmp_path / "h"), "--json")
    assert rc == 0 and json.loads(out)["base"]["kind"] == "gguf"
    assert "# base_model =" in (tmp_path / "h" / "settings.toml").read_text()  # unset: bundled


def test_init_with_a_missing_base_is_one_line_exit_2(tmp_path, capsys):
    rc, out, err = run(capsys, "init", "--home", str(tmp_path / "h"), "--base", str(tmp_path / "nope.gguf"))
    assert rc == 2 and out == ""
    assert err.startswith("edge-unisd: error: base model not found:") and err.count("\n") == 1


def test_ingest_reports_bad_rows_and_exit_codes(home, tmp_path, capsys):
    f = write_jsonl(tmp_path / "in.jsonl", '{"prompt": "hello"}', '{"prompt": 3}', "oops",
                    '{"prompt": "hello"}')
    rc, out, err = run(capsys, "ingest", "--home", str(home), str(f))
    assert rc == 1
    assert out.strip() == "in.jsonl: 1 added, 1 duplicates, 2 rejected"
    assert err.splitlines() == [
        "line 2: prompt must be a string or a list of {role, content} messages, got a number",
        "line 3: invalid JSON: Expecting value at column 1"]
    good = write_jsonl(tmp_path / "good.jsonl", '{"prompt": "hello"}', '{"prompt": "new"}')
    rc, out, _ = run(capsys, "ingest", "--home", str(home), str(good), "--json")
    assert rc == 0
    assert json.loads(out) == {"source": "good.jsonl", "rows": 2, "added": 1, "duplicates": 1,
                               "rejected": 0, "errors": []}


def test_ingest_from_stdin(home, capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b'{"prompt": "piped"}\n')))
    rc, out, _ = run(capsys, "ingest", "--home", str(home), "-")
    assert rc == 0 and out.startswith("stdin: 1 added")


def test_user_errors_are_one_line_and_exit_2(home, tmp_path, capsys):
    cases = [
        (["status", "--home", str(tmp_path / "none")], "no edge-unisd home at"),
        (["ingest", "--home", str(home), str(tmp_path / "missing.jsonl")], "missing.jsonl: no such file"),
        (["ingest", "--home", str(home), str(tmp_path)], "is a directory"),
        (["forget", "--home", str(home), "--before", "last tuesday"], "is not a date"),
    ]
    for argv, fragment in cases:
        rc, out, err = run(capsys, *argv)
        assert rc == 2 and err.startswith("edge-unisd: error: ") and fragment in err, (argv, err)
        assert err.count("\n") == 1 and "Traceback" not in err


def test_bad_settings_name_the_key_and_file(home, tmp_path, capsys):
    settings = Path(home) / "settings.toml"
    settings.write_text(settings.read_text().replace("keep_versions = 5", "keep_versions = -1"))
    f = write_jsonl(tmp_path / "in.jsonl", '{"prompt": "x"}')
    rc, _, err = run(capsys, "ingest", "--home", str(home), str(f))
    assert rc == 2 and str(settings) in err and "'keep_versions'" in err


def test_profile_set_show_clear(home, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("I am a Rust developer. Prefer short answers.\n")
    assert run(capsys, "profile", "set", "--home", str(home), str(notes))[0] == 0
    rc, out, _ = run(capsys, "profile", "show", "--home", str(home), "--json")
    assert json.loads(out)["text"] == notes.read_text()
    assert run(capsys, "profile", "clear", "--home", str(home))[0] == 0
    assert run(capsys, "profile", "show", "--home", str(home))[1].strip() == "(no profile set)"
    notes.write_bytes(b"caf\xe9")
    rc, _, err = run(capsys, "profile", "set", "--home", str(home), str(notes))
    assert rc == 2 and "not valid UTF-8" in err
    notes.write_text("  \n")
    assert "is empty" in run(capsys, "profile", "set", "--home", str(home), str(notes))[2]


def test_status_json(home, tmp_path, capsys):
    f = write_jsonl(tmp_path / "in.jsonl", '{"prompt": "a"}', '{"prompt": "b"}')
    run(capsys, "ingest", "--home", str(home), str(f))
    rc, out, _ = run(capsys, "status", "--home", str(home), "--json")
    s = json.loads(out)
    assert rc == 0
    assert s["items"] == {"total": 2, "pending": 2, "held_out": 0}
    assert {"adapter", "gates", "last_round", "export", "daemon"} <= set(s)
    assert s["adapter"]["current"] is None and s["last_round"] is None and s["settings"]["collect"] is False
    assert s["export"] is None and s["daemon"] == {"pid": None}
    # real gates from this machine's sensors and the settings' [budget] table
    assert isinstance(s["gates"]["open"], bool) and {"power", "load", "memory"} <= set(s["gates"]["gates"])
    assert all(g["state"] in ("open", "closed", "unknown") for g in s["gates"]["gates"].values())
    assert s["settings"]["base_quantization"] == "none"
    rc, out, _ = run(capsys, "status", "--home", str(home))
    assert rc == 0 and "2 stored, 2 waiting" in out and "daemon:      not running" in out
    assert "QLoRA" not in out


def test_status_gates_follow_the_budget_settings(home, capsys):
    settings = Path(home) / "settings.toml"
    settings.write_text(settings.read_text() + 'max_cpu_percent = 0\nwindows = ["00:00-00:01"]\n')
    s = json.loads(run(capsys, "status", "--home", str(home), "--json")[1])
    assert s["gates"]["gates"]["window"]["state"] in ("open", "closed") and s["gates"]["next_window"]
    settings.write_text(settings.read_text() + "max_load_per_core = -3\n")
    rc, _, err = run(capsys, "status", "--home", str(home))
    assert rc == 2 and "max_load_per_core" in err


def test_forget(home, tmp_path, capsys):
    f = write_jsonl(tmp_path / "in.jsonl", '{"prompt": "a", "id": "a"}', '{"prompt": "b", "id": "b"}',
                    '{"prompt": "c", "id": "c"}')
    run(capsys, "ingest", "--home", str(home), str(f))
    (Home(home).done / "old.jsonl").write_text('{"prompt": "a"}\n')
    rc, out, _ = run(capsys, "forget", "--home", str(home), "--id", "a", "--id", "zz", "--json")
    assert rc == 0 and json.loads(out)["items"] == 1
    rc, out, _ = run(capsys, "forget", "--home", str(home), "--before", "2000-01-01")
    assert rc == 0 and "forgot 0 item(s)" in out
    rc, out, _ = run(capsys, "forget", "--home", str(home), "--all", "--json")
    assert json.loads(out) == {"items": 2, "rollouts": 0, "marked_versions": [], "registry_marked": [],
                               "current_trained_on_forgotten": None, "spool_files_removed": 1}
    assert json.loads(run(capsys, "status", "--home", str(home), "--json")[1])["items"]["total"] == 0
    with pytest.raises(SystemExit):  # exactly one of --id/--before/--all
        main(["forget", "--home", str(home)])


def make_adapter(folder: Path, seed: int = 0) -> Path:
    """A real (tiny) PEFT adapter folder: the registry checks the files, not the base."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1))
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(folder)
    return folder


def test_adapters_list_and_rollback(home, tmp_path, capsys):
    from adapters.registry import AdapterRegistry

    reg = AdapterRegistry(Home(home).adapters)
    assert run(capsys, "adapters", "list", "--home", str(home))[1].startswith("no adapter versions yet")
    folder = make_adapter(tmp_path / "a")
    for i in range(3):
        v = reg.add(folder, metrics={"after": {"fit_nll": 1.0 + i, "retention_jsd": 0.01}}, item_ids=[f"i{i}"])
        reg.promote(v.version) if i < 2 else reg.reject(v.version, "rejected: retention JSD vs base 0.2 > bound")
    rc, out, _ = run(capsys, "adapters", "list", "--home", str(home), "--json")
    listed = json.loads(out)
    assert rc == 0 and [(v["version"], v["status"]) for v in listed] == [
        ("v0001", "retired"), ("v0002", "promoted"), ("v0003", "rejected")]
    assert all(set(v) == {"version", "path", "status", "created", "metrics"} for v in listed)
    assert (Path(listed[0]["path"]) / "adapter_config.json").is_file()
    text = run(capsys, "adapters", "list", "--home", str(home))[1]
    assert "* v0002" in text and "retention JSD vs base 0.2" in text

    rc, out, _ = run(capsys, "rollback", "v1", "--home", str(home), "--no-export")
    assert rc == 0 and out.startswith("current adapter: v0001")
    assert reg.current().version == "v0001"
    rc, _, err = run(capsys, "rollback", "v0003", "--home", str(home), "--no-export")
    assert rc == 2 and "only with --force" in err
    rc, out, _ = run(capsys, "rollback", "base", "--home", str(home), "--no-export", "--json")
    assert rc == 0 and json.loads(out)["current"] is None and reg.current() is None
    rc, _, err = run(capsys, "rollback", "v0009", "--home", str(home), "--no-export")
    assert rc == 2 and "v0009 not found" in err
    s = json.loads(run(capsys, "status", "--home", str(home), "--json")[1])
    assert s["adapter"]["current"] is None and s["adapter"]["versions"] == 3
    run(capsys, "rollback", "v0002", "--home", str(home), "--no-export")
    s = json.loads(run(capsys, "status", "--home", str(home), "--json")[1])
    assert s["adapter"]["current"]["version"] == "v0002" and s["adapter"]["current"]["status"] == "promoted"
    from daemon.store import Store

    with Store.open(Home(home)) as store:  # the store's rows follow the registry
        assert {v.version: v.status for v in store.adapter_versions()} == {
            "v0001": "retired", "v0002": "promoted", "v0003": "rejected"}


def test_serve_and_report_are_dispatched_lazily(home, monkeypatch, capsys):
    seen = {}
    for name in ("serve", "report"):
        fake = types.ModuleType(f"daemon.{name}")
        fake.main = lambda args, name=name: seen.setdefault(name, args) and 0
        monkeypatch.setitem(sys.modules, f"daemon.{name}", fake)
    assert main(["serve", "--home", str(home), "--port", "9000", "--collect"]) == 0
    a = seen["serve"]
    assert (a.home, a.host, a.port, a.collect, a.json) == (str(home), None, 9000, True, False)
    assert build_parser().parse_args(["serve"]).collect is None  # unset: the settings decide
    assert main(["report", "--home", str(home), "--out", "/tmp/r", "--json"]) == 0
    assert (seen["report"].out, seen["report"].json) == ("/tmp/r", True)
    monkeypatch.setitem(sys.modules, "daemon.serve", None)  # not installed: a clear error, not a traceback
    rc, _, err = run(capsys, "serve", "--home", str(home))
    assert rc == 2 and "`edge-unisd serve` is not available" in err


def test_demo_keeps_its_flags_and_dispatch(monkeypatch):
    seen = {}
    fake = types.ModuleType("daemon.demo")
    fake.main = lambda args: seen.setdefault("args", args) and 0
    monkeypatch.setitem(sys.modules, "daemon.demo", fake)
    assert main(["demo", "--home", "/tmp/x", "--json", "--steps", "3"]) == 0
    a = seen["args"]
    assert (a.command, a.home, a.json, a.steps) == ("demo", "/tmp/x", True, 3)
    assert build_parser().parse_args(["demo"]).steps is None


def console_script() -> list[str]:
    script = Path(sys.executable).parent / "edge-unisd"
    return [str(script)] if script.exists() else [sys.executable, "-m", "daemon.cli"]


def test_console_script_exit_codes(home, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGE_UNISD_", "HF_HUB_OFFLINE"))}
    good = write_jsonl(tmp_path / "good.jsonl", '{"prompt": "x"}')
    bad = write_jsonl(tmp_path / "bad.jsonl", '{"prompt": "y"}', "[]")

    def rc(*argv):
        p = subprocess.run(console_script() + list(argv), env=env, capture_output=True, text=True, timeout=60)
        return p.returncode, p.stderr

    assert rc("ingest", "--home", str(home), str(good)) == (0, "")
    code, err = rc("ingest", "--home", str(home), str(bad))
    assert code == 1 and err.strip() == "line 2: expected a JSON object, got a list"
    code, err = rc("status", "--home", str(tmp_path / "nowhere"))
    assert code == 2 and err.startswith("edge-unisd: error: no edge-unisd home") and "Traceback" not in err
    code = "import os, daemon.cli; print(os.environ['HF_HUB_OFFLINE'])"
    probe = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == "1"


def test_a_bad_heap_policy_is_a_usage_error_naming_the_variable(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("EDGE_UNISD_HEAP", "huge")
    rc, out, err = run(capsys, "status", "--home", str(tmp_path / "h"))
    assert rc == 2 and out == ""
    assert "EDGE_UNISD_HEAP='huge'" in err and "'fast'" in err and "Traceback" not in err


def test_status_names_the_base_quantization_setting_but_claims_no_qlora_adapter_without_one(home, capsys,
                                                                                            monkeypatch):
    monkeypatch.setenv("EDGE_UNISD_BASE_QUANTIZATION", "nf4")
    rc, out, _ = run(capsys, "status", "--home", str(home), "--json")
    assert rc == 0 and json.loads(out)["settings"]["base_quantization"] == "nf4"
    rc, out, _ = run(capsys, "status", "--home", str(home))
    assert rc == 0 and "none yet (base model)" in out and "QLoRA" not in out


def test_the_cli_silences_bitsandbytes_offline_kernel_warnings(tmp_path, capsys):
    """On AVX512-BF16 CPUs bitsandbytes warns on every load that it cannot fetch a hub kernel (offline by design)."""
    import logging

    from daemon.cli import QUIET_LOGGERS

    main(["status", "--home", str(tmp_path / "home"), "--json"])
    capsys.readouterr()
    for name in QUIET_LOGGERS:
        logger = logging.getLogger(name)
        assert not logger.isEnabledFor(logging.WARNING), name
        assert logger.isEnabledFor(logging.ERROR), name  # real failures still show
