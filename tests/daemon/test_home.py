"""Home resolution order and a private layout."""

from __future__ import annotations

import os
import stat

import pytest

from daemon.home import Home, HomeError, resolve_home


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_resolution_order(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.delenv("EDGE_UNISD_HOME", raising=False)
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    assert resolve_home() == tmp_path / "user" / ".local" / "share" / "edge-unisd"
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert resolve_home() == tmp_path / "xdg" / "edge-unisd"
    monkeypatch.setenv("EDGE_UNISD_HOME", str(tmp_path / "env"))
    assert resolve_home() == tmp_path / "env"
    assert resolve_home(tmp_path / "arg") == tmp_path / "arg"


def test_create_is_private_even_with_a_loose_umask(tmp_path):
    (tmp_path / "h").mkdir(mode=0o755)
    old = os.umask(0o022)
    try:
        home = Home(tmp_path / "h").create()
    finally:
        os.umask(old)
    for d in home.directories():
        assert d.is_dir() and mode(d) == 0o700, d
    assert {home.incoming, home.done, home.rejected} <= set(home.directories())
    assert home.create() == home  # idempotent


def test_require_says_what_to_run(tmp_path):
    home = Home(tmp_path / "h")
    with pytest.raises(HomeError, match=r"run `edge-unisd init --home .*h` first"):
        home.require()


def test_home_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(HomeError, match="not a directory"):
        Home(tmp_path / "f").create()
