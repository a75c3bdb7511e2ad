"""Privacy: a whole round (train, evaluate, export, verify with llama.cpp) opens no network socket, and every
directory of the home is 0700 and every file 0600 after init, ingest, a round and an export."""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
from pathlib import Path

import pytest

from daemon import jobs
from daemon.cli import main
from daemon.home import Home
from tests.daemon.test_jobs import EVAL, OVERRIDES, readings

INET_TABLES = ("tcp", "tcp6", "udp", "udp6", "raw", "raw6")


@pytest.fixture(autouse=True)
def tiny_model_env(monkeypatch):
    monkeypatch.setenv(jobs.TEST_TINY_MODEL_ENV, "1")  # the round and the export use the tiny test model


@pytest.fixture
def tiny_bars(monkeypatch):
    """See tests/daemon/test_jobs.py: the tiny random model's near-ties need looser export bars."""
    import adapters.export
    from adapters.verify import Bar

    monkeypatch.setattr(adapters.export, "bar_for", lambda quant: Bar(0.9, 0.05))


@pytest.fixture
def home(tmp_path, capsys) -> Home:
    """A home made the way a user makes one: init, settings (f16 export), a profile and prompts."""
    root = tmp_path / "home"
    assert main(["init", "--home", str(root)]) == 0
    h = Home(root)
    assert 'export_quant = "f16"' in h.settings.read_text()  # the default: q8_0 misses its bar on tiny models
    notes = tmp_path / "notes.md"
    notes.write_text("My favourite number is 7.\n")
    assert main(["profile", "set", "--home", str(root), str(notes)]) == 0
    rows = tmp_path / "in.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"Question {i}: my favourite number?", "reference": f"It is {i}.",
                                        "id": f"q{i}"}) + "\n" for i in range(10)))
    assert main(["ingest", "--home", str(root), str(rows)]) == 0
    capsys.readouterr()
    return h


# --- no network ----------------------------------------------------------------------------------

def _inet_inodes() -> set[str]:
    """Inodes of every IPv4/IPv6 socket in this network namespace (any state)."""
    inodes = set()
    for table in INET_TABLES:
        try:
            lines = Path(f"/proc/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        inodes.update(line.split()[9] for line in lines if len(line.split()) > 9)
    return inodes


def _my_inet_sockets() -> list[str]:
    """This process's open file descriptors that are IPv4/IPv6 sockets (catches C code too: llama.cpp)."""
    mine = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            mine.append(target[8:-1])
    return sorted(set(mine) & _inet_inodes())


class NetworkWatch:
    """Records every non-AF_UNIX connect/sendto and name lookup made through Python's socket module, and
    polls /proc for IP sockets held by this process (any language) while the round runs."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.calls: list[str] = []
        self.seen_fds: set[str] = set()
        self._stop = threading.Event()
        real_connect, real_connect_ex, real_sendto = socket.socket.connect, socket.socket.connect_ex, \
            socket.socket.sendto
        real_create, real_getaddrinfo = socket.create_connection, socket.getaddrinfo

        def guard(name, real):
            def wrapper(sock, *args, **kw):
                if sock.family != socket.AF_UNIX:
                    self.calls.append(f"{name}{args!r}")
                return real(sock, *args, **kw)
            return wrapper

        def create_connection(address, *args, **kw):
            self.calls.append(f"create_connection({address!r})")
            return real_create(address, *args, **kw)

        def getaddrinfo(host, *args, **kw):
            self.calls.append(f"getaddrinfo({host!r})")
            return real_getaddrinfo(host, *args, **kw)

        monkeypatch.setattr(socket.socket, "connect", guard("connect", real_connect))
        monkeypatch.setattr(socket.socket, "connect_ex", guard("connect_ex", real_connect_ex))
        monkeypatch.setattr(socket.socket, "sendto", guard("sendto", real_sendto))
        monkeypatch.setattr(socket, "create_connection", create_connection)
        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.wait(0.05):
            self.seen_fds.update(_my_inet_sockets())

    def __enter__(self) -> NetworkWatch:
        self.seen_fds.update(_my_inet_sockets())
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.seen_fds.update(_my_inet_sockets())


def test_a_whole_round_with_its_export_opens_no_network_socket(home, monkeypatch, tiny_bars):
    before = set(_my_inet_sockets())  # whatever pytest or a plugin holds already is not the round's
    with NetworkWatch(monkeypatch) as net:
        r = jobs.adapt_once(home, sensors=readings, overrides=OVERRIDES, eval_settings=EVAL)
    assert r["status"] == "promoted", r["reason"]
    assert r["export"]["verify"]["passed"]  # llama.cpp loaded and ran the exported file inside the watch
    assert net.calls == []
    assert net.seen_fds - before == set()


def test_the_watch_sees_a_connection(monkeypatch):
    """The guard itself works: an attempted TCP connect is recorded (to a closed local port)."""
    with NetworkWatch(monkeypatch) as net, socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.connect_ex(("127.0.0.1", 9))
    assert net.calls and net.calls[0].startswith("connect_ex")


# --- permissions ---------------------------------------------------------------------------------

def _modes(root: Path) -> dict[str, int]:
    out = {".": stat.S_IMODE(root.stat().st_mode)}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = stat.S_IMODE(st.st_mode) | (0o1000000 if stat.S_ISLNK(st.st_mode) else 0)
    return out


def test_home_is_0700_and_every_file_0600_after_init_ingest_round_and_export(home, monkeypatch, capsys, tiny_bars):
    def check(stage: str) -> dict[str, int]:
        modes = _modes(home.root)
        wrong = {p: oct(m) for p, m in modes.items()
                 if m != (0o700 if (home.root / p).is_dir() else 0o600)}
        assert wrong == {}, f"after {stage}: {wrong}"
        return modes

    check("init, profile and ingest")
    monkeypatch.setattr(jobs, "read_sensors", readings)
    r = jobs.adapt_once(home, overrides=OVERRIDES, eval_settings=EVAL)
    assert r["status"] == "promoted" and r["export"]["verify"]["passed"]
    modes = check("a round and its export")
    assert {"adapters/v0001/adapter_model.safetensors", "exports/current.gguf", "exports/Modelfile",
            "checkpoints/round.lock"} <= set(modes)
    assert main(["export", "--home", str(home.root), "--format", "lora", "--quant", "f16"]) == 0
    (home.incoming / "late.jsonl").write_text('{"prompt": "dropped in the spool"}\n')
    os.chmod(home.incoming / "late.jsonl", 0o644)  # another program wrote it world-readable
    from daemon.service import spool_job

    spool_job(str(home.root))
    spool_job(str(home.root))  # taken once stable across two polls, then filed away 0600
    assert (home.done / "late.jsonl").is_file()
    modes = check("a LoRA export and a spool file")
    assert "exports/current-lora.gguf" in modes
