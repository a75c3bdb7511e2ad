"""settings.toml: the commented default round-trips; errors name the key and where it came from."""

from __future__ import annotations

import stat

import pytest

from daemon.settings import (
    DaemonSettings,
    SettingsError,
    default_settings_text,
    load_settings,
    write_default_settings,
)


def test_default_file_loads_back_to_the_defaults(tmp_path):
    path = write_default_settings(tmp_path / "settings.toml")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_settings(path, environ={}) == DaemonSettings()  # the file alone: no EDGE_UNISD_* overrides
    text = path.read_text()
    for name, field in DaemonSettings.model_fields.items():
        assert name in text and (name == "budget" or field.description in text)


def test_default_file_records_the_base_model(tmp_path):
    path = write_default_settings(tmp_path / "s.toml", base_model='/models/my "odd" name.gguf')
    assert load_settings(path).base_model == '/models/my "odd" name.gguf'


def write(tmp_path, body: str):
    p = tmp_path / "settings.toml"
    p.write_text(body)
    return p


def test_unknown_key_names_key_and_file(tmp_path):
    p = write(tmp_path, 'preset = "edge"\nround_budget = 5\n')
    with pytest.raises(SettingsError) as e:
        load_settings(p)
    assert str(p) in str(e.value) and "unknown key 'round_budget'" in str(e.value)


def test_out_of_range_names_key_file_and_value(tmp_path):
    p = write(tmp_path, "serve_port = 70000\n")
    with pytest.raises(SettingsError) as e:
        load_settings(p)
    msg = str(e.value)
    assert str(p) in msg and "'serve_port'" in msg and "70000" in msg and "65535" in msg


def test_wrong_type_names_key(tmp_path):
    p = write(tmp_path, 'collect = "maybe"\n')
    with pytest.raises(SettingsError, match=r"'collect'.*valid boolean"):
        load_settings(p)


def test_invalid_toml_names_file_and_line(tmp_path):
    p = write(tmp_path, 'preset = "edge"\nkeep_versions = \n')
    with pytest.raises(SettingsError, match=rf"{p}: invalid TOML: .*line 2"):
        load_settings(p)


def test_missing_file_says_run_init(tmp_path):
    with pytest.raises(SettingsError, match="edge-unisd init"):
        load_settings(tmp_path / "nope.toml")


def test_env_overrides_the_file_and_errors_name_the_variable(tmp_path, monkeypatch):
    p = write(tmp_path, 'spool_poll_seconds = 5\nbase_model = "/m.gguf"\n')
    monkeypatch.setenv("EDGE_UNISD_SPOOL_POLL_SECONDS", "12.5")
    monkeypatch.setenv("EDGE_UNISD_COLLECT", "true")
    monkeypatch.setenv("EDGE_UNISD_BASE_MODEL", "")  # empty: back to the bundled model
    monkeypatch.setenv("EDGE_UNISD_HOME", "/somewhere")  # not a setting: ignored
    s = load_settings(p)
    assert (s.spool_poll_seconds, s.collect, s.base_model) == (12.5, True, None)
    monkeypatch.setenv("EDGE_UNISD_KEEP_VERSIONS", "0")
    with pytest.raises(SettingsError,
                       match="environment variable EDGE_UNISD_KEEP_VERSIONS: key 'keep_versions'"):
        load_settings(p)


def test_remote_serving_needs_a_key(tmp_path):
    with pytest.raises(SettingsError, match="serve_api_key"):
        load_settings(write(tmp_path, 'serve_host = "0.0.0.0"\n'))
    s = load_settings(write(tmp_path, 'serve_host = "0.0.0.0"\nserve_api_key = "0123456789abcdef"\n'))
    assert s.serve_host == "0.0.0.0"
    assert load_settings(write(tmp_path, 'serve_host = "::1"\n')).serve_api_key is None


def test_budget_table_passes_through(tmp_path):
    body = default_settings_text().replace("[budget]", '[budget]\nmax_watts = 15\nwindows = ["22-06"]')
    p = write(tmp_path, body)
    assert load_settings(p).budget == {"max_watts": 15, "windows": ["22-06"]}


def test_rollout_backend_setting_reaches_the_method_config_and_a_caller_override_wins(tmp_path, monkeypatch):
    from daemon.jobs import _method_config, with_settings_defaults

    s = load_settings(write(tmp_path, 'rollout_backend = "hf"\n'))
    assert _method_config("edge", with_settings_defaults(s, {})).rollout.backend == "hf"
    mine = {"rollout": {"backend": "llamacpp", "max_new_tokens": 8}, "seed": 3}
    assert with_settings_defaults(s, mine) == mine  # the caller's own keys win, nothing dropped
    assert with_settings_defaults(DaemonSettings(), {})["rollout"]["backend"] == "auto"
    monkeypatch.setenv("EDGE_UNISD_ROLLOUT_BACKEND", "vllm")
    with pytest.raises(SettingsError, match="EDGE_UNISD_ROLLOUT_BACKEND: key 'rollout_backend'"):
        load_settings(write(tmp_path, ""))
