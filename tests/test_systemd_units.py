"""The shipped systemd files: required directives, a reason for each, agreement with the code, and
`systemd-analyze verify` / `systemd-sysusers` where those binaries exist (skipped otherwise)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from daemon import lifecycle
from daemon.home import default_home

SYSTEMD = Path(__file__).resolve().parents[1] / "systemd"
USER_UNIT = SYSTEMD / "edge-unisd.service"
SYSTEM_UNIT = SYSTEMD / "edge-unisd-system.service"
SYSUSERS = SYSTEMD / "edge-unisd.sysusers.conf"
UNITS = [USER_UNIT, SYSTEM_UNIT]


# --- a small unit-file parser: keys may repeat (Environment=, ReadWritePaths=), so no configparser ----------


@dataclass(frozen=True)
class Directive:
    section: str
    key: str
    value: str
    line: int
    comment: list[str]  # the comment lines directly above it


def parse_unit(path: Path) -> list[Directive]:
    directives: list[Directive] = []
    section, comment, pending = "", [], ""
    for lineno, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if pending:  # a continuation line of the previous directive
            line, raw = pending + " " + line, ""
            pending = ""
        if line.endswith("\\"):
            pending = line[:-1].rstrip()
            continue
        if not line:
            comment = []
        elif line[0] in "#;":
            comment.append(line[1:].strip())
        elif line.startswith("[") and line.endswith("]"):
            section, comment = line[1:-1], []
        else:
            assert "=" in line, f"{path.name}:{lineno}: not a KEY=VALUE line: {raw!r}"
            key, value = line.split("=", 1)
            directives.append(Directive(section, key.strip(), value.strip(), lineno, comment))
            comment = []
    assert not pending, f"{path.name}: file ends inside a continued line"
    return directives


def values(path: Path, key: str, section: str = "Service") -> list[str]:
    return [d.value for d in parse_unit(path) if d.key == key and d.section == section]


def value(path: Path, key: str, section: str = "Service") -> str:
    found = values(path, key, section)
    assert len(found) == 1, f"{path.name}: expected one {key}= in [{section}], found {found}"
    return found[0]


def seconds(span: str) -> float:
    """systemd time span ("45", "30s", "3min", "1h 5min") in seconds."""
    units = {"": 1, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "ms": 1e-3}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", span):
        total += float(number) * units[unit]
    return total


# --- both units ---------------------------------------------------------------------------------------------

REQUIRED = {
    "Type": "notify", "NotifyAccess": "main", "Restart": "on-failure", "TimeoutStopSec": "45",
    "KillMode": "mixed", "Nice": "19", "CPUWeight": "idle", "IOSchedulingClass": "idle", "UMask": "0077",
    "NoNewPrivileges": "yes", "PrivateTmp": "yes", "ProtectSystem": "strict",
    "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes", "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes", "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    "LockPersonality": "yes", "RestrictRealtime": "yes", "RestrictSUIDSGID": "yes",
    "SystemCallFilter": "@system-service", "SystemCallArchitectures": "native",
}
PRESENT = ["WatchdogSec", "RestartSec", "MemoryHigh", "MemoryMax", "ExecStart"]


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_required_directives(unit: Path) -> None:
    for key, expected in REQUIRED.items():
        assert value(unit, key) == expected, f"{unit.name}: {key}"
    for key in PRESENT:
        assert value(unit, key), f"{unit.name}: {key}= is empty"
    env = values(unit, "Environment")
    assert "HF_HUB_OFFLINE=1" in env and "TRANSFORMERS_OFFLINE=1" in env
    assert values(unit, "WantedBy", "Install")


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_every_directive_says_why(unit: Path) -> None:
    bare = [f"{d.line}: {d.key}" for d in parse_unit(unit) if not d.comment]
    assert not bare, f"{unit.name}: directives without a comment above them: {bare}"


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_time_limits_fit_the_code(unit: Path) -> None:
    stop = seconds(value(unit, "TimeoutStopSec"))
    assert stop >= lifecycle.DEFAULT_STOP_TIMEOUT_S + 10, "systemd would SIGKILL before the daemon's own bound"
    # the daemon pings at half the interval from a loop ticking every second, at idle CPU priority
    assert seconds(value(unit, "WatchdogSec")) >= 60
    assert seconds(value(unit, "RestartSec")) >= 5


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_memory_high_is_below_memory_max(unit: Path) -> None:
    high, top = value(unit, "MemoryHigh"), value(unit, "MemoryMax")
    assert high.endswith("%") and top.endswith("%")
    assert 0 < float(high[:-1]) < float(top[:-1]) <= 90


# --- each unit ----------------------------------------------------------------------------------------------


def test_user_unit(monkeypatch: pytest.MonkeyPatch) -> None:
    assert value(USER_UNIT, "ExecStart") == "%h/.local/bin/edge-unisd run"
    assert value(USER_UNIT, "ProtectHome") == "read-only"
    assert value(USER_UNIT, "PrivateUsers") == "yes"  # the namespace options above need it in a user manager
    env = dict(e.split("=", 1) for e in values(USER_UNIT, "Environment"))
    home = env["EDGE_UNISD_HOME"]
    writable = values(USER_UNIT, "ReadWritePaths")
    assert home in writable and "%C/edge-unisd" in writable
    assert all(path in value(USER_UNIT, "ExecStartPre") for path in writable)  # created before the sandbox
    # the pinned home is the one `edge-unisd init` picks by default, so init-then-enable just works
    monkeypatch.setenv("HOME", "/u")
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    monkeypatch.delenv("EDGE_UNISD_HOME", raising=False)
    assert str(default_home()) == home.replace("%h", "/u")
    assert values(USER_UNIT, "WantedBy", "Install") == ["default.target"]


def test_user_cache_path_matches_the_code(monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_unisd.modeling import default_cache_dir

    monkeypatch.delenv("EDGE_UNISD_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", "/c")  # what %C expands to in a user manager
    assert str(default_cache_dir()) == "/c/edge-unisd"


def test_system_unit() -> None:
    assert value(SYSTEM_UNIT, "ExecStart") == "/usr/local/bin/edge-unisd run --home /var/lib/edge-unisd"
    assert value(SYSTEM_UNIT, "User") == "edge-unisd"
    assert value(SYSTEM_UNIT, "StateDirectory") == "edge-unisd"
    assert value(SYSTEM_UNIT, "StateDirectoryMode") == "0700"
    assert "/var/lib/edge-unisd" in values(SYSTEM_UNIT, "ReadWritePaths")
    assert value(SYSTEM_UNIT, "ProtectHome") == "yes"
    assert value(SYSTEM_UNIT, "IPAddressDeny") == "any"
    assert value(SYSTEM_UNIT, "IPAddressAllow") == "localhost"
    assert value(SYSTEM_UNIT, "CapabilityBoundingSet") == ""
    env = dict(e.split("=", 1) for e in values(SYSTEM_UNIT, "Environment"))
    assert env["XDG_CACHE_HOME"] == "/var/cache/edge-unisd" and value(SYSTEM_UNIT, "CacheDirectory") == "edge-unisd"
    assert values(SYSTEM_UNIT, "WantedBy", "Install") == ["multi-user.target"]


def test_sysusers_creates_the_units_user() -> None:
    rows = [line.split() for line in SYSUSERS.read_text().splitlines() if line and not line.startswith("#")]
    assert len(rows) == 1
    kind, name = rows[0][:2]
    assert (kind, name) == ("u", value(SYSTEM_UNIT, "User"))
    assert "/var/lib/edge-unisd" in rows[0]


# --- the real tools, where installed ------------------------------------------------------------------------


def _verify(unit: Path, tmp_path: Path, user: bool) -> None:
    """`systemd-analyze verify` on a copy whose ExecStart points at an executable that exists here."""
    fake = tmp_path / "edge-unisd"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    text = unit.read_text().replace("%h/.local/bin/edge-unisd", str(fake)).replace(
        "/usr/local/bin/edge-unisd", str(fake))
    copy = tmp_path / "edge-unisd.service"  # the name it is installed under
    copy.write_text(text)
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    cmd = ["systemd-analyze", "verify", *(["--user"] if user else []), str(copy)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "XDG_RUNTIME_DIR": str(runtime), "SYSTEMD_LOG_COLOR": "0"})
    if "Failed to initialize manager" in proc.stderr:
        pytest.skip(f"systemd-analyze cannot run a manager here: {proc.stderr.strip()}")
    # verify exits 0 on unknown keys and bad values; it only logs them, naming the file
    problems = [line for line in proc.stderr.splitlines() if str(copy) in line or "edge-unisd.service" in line]
    assert proc.returncode == 0 and not problems, proc.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
@pytest.mark.parametrize(("unit", "user"), [(USER_UNIT, True), (SYSTEM_UNIT, False)], ids=["user", "system"])
def test_systemd_analyze_verify(unit: Path, user: bool, tmp_path: Path) -> None:
    _verify(unit, tmp_path, user)


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="systemd-sysusers not installed")
def test_systemd_sysusers_accepts_the_file(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    proc = subprocess.run(["systemd-sysusers", f"--root={tmp_path}", str(SYSUSERS)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    passwd = (tmp_path / "etc" / "passwd").read_text()
    assert re.search(r"^edge-unisd:x:\d+:\d+:[^:]*:/var/lib/edge-unisd:", passwd, re.M), passwd
