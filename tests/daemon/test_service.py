"""`edge-unisd run`: READY/STATUS/STOPPING over sd_notify, spool intake, a second daemon refused, SIGTERM during a
round stops within the 30 s bound and checkpoints; the jobs' own decisions, in-process.

The daemon runs as a real subprocess on the test hook's tiny random model (EDGE_UNISD_TEST_TINY_MODEL=1,
see `daemon.jobs.base_source`), with the gates opened in its settings.toml.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from daemon import service
from daemon.cli import main
from daemon.home import Home
from daemon.store import Store
from edge_unisd.items import IngestRow

STOP_BOUND_S = 30.0
OPEN_GATES = "check_power = false\nmax_load_per_core = 64\nmax_cpu_percent = 100\nmin_free_memory_bytes = 0\n"


# --- helpers (test_crash.py uses them too) ---------------------------------------------------------

def make_home(root: Path, n_items: int = 12, **settings: str) -> Home:
    """init + settings for a daemon test (open gates, a big budget for the slow default cost model, f16
    export, quick spool polls) + `n_items` prompts with answers."""
    assert main(["init", "--home", str(root)]) == 0
    home = Home(root)
    keys = {"export_quant": '"f16"', "round_budget_seconds": "3000.0", "spool_poll_seconds": "1.0",
            "held_out_fraction": "0.0", **settings}
    lines = [f"{line.split(' =')[0]} = {keys[line.split(' =')[0]]}" if line.split(" =")[0] in keys else line
             for line in home.settings.read_text().splitlines()]
    home.settings.write_text("\n".join(lines) + "\n" + OPEN_GATES)
    with Store.open(home) as store:
        store.set_profile("My favourite number is 7.")
        store.add_items([IngestRow(prompt=f"Question {i}: what is my favourite number?", reference=f"It is {i}.",
                                   id=f"q{i}") for i in range(n_items)])
    return home


def console_script() -> list[str]:
    script = Path(sys.executable).parent / "edge-unisd"
    return [str(script)] if script.exists() else [sys.executable, "-m", "daemon.cli"]


class Daemon:
    """`edge-unisd run` in a subprocess; its stderr (the log) collected line by line in a thread."""

    def __init__(self, home: Home, *, env: dict[str, str] | None = None, first_round_after: float = 0.0):
        full_env = {**os.environ, "EDGE_UNISD_TEST_TINY_MODEL": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
        self.proc = subprocess.Popen(console_script() + ["run", "--home", str(home.root), "--first-round-after",
                                                         str(first_round_after)],
                                     env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for line in self.lines):
                return
            if self.proc.poll() is not None:
                self._reader.join(5)
                pytest.fail(f"the daemon exited ({self.proc.returncode}) before logging {text!r}:\n{self.log[-3000:]}")
            time.sleep(0.05)
        pytest.fail(f"no {text!r} in the daemon's log within {timeout:.0f} s:\n{self.log[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> float:
        """Send `sig`, wait for the exit; returns the seconds it took."""
        t0 = time.monotonic()
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            self._reader.join(5)
            pytest.fail(f"the daemon did not exit within {timeout:.0f} s of {signal.Signals(sig).name}:\n"
                        f"{self.log[-4000:]}")
        self._reader.join(5)
        return time.monotonic() - t0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def wait_until(predicate, timeout: float, what: str, step: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(step)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


class NotifySocket:
    """Plays systemd's side of sd_notify: a datagram socket read continuously (as the manager does; a full
    queue would block the daemon's sendto)."""

    def __init__(self, path: Path):
        self.path = path
        self.messages: list[str] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._done.is_set():
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except (TimeoutError, BlockingIOError, OSError):
                continue

    def close(self) -> None:
        self._done.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path):
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


# --- the daemon as systemd sees it -----------------------------------------------------------------

def test_run_serves_refuses_a_second_daemon_and_stops_a_round_within_the_bound(tmp_path, notify_socket):
    home = make_home(tmp_path / "home", n_items=24)  # 6 steps: SIGTERM lands mid-round
    daemon = Daemon(home, env={"NOTIFY_SOCKET": str(notify_socket.path)})
    messages = notify_socket.messages
    try:
        wait_until(lambda: any("READY=1" in m for m in messages), 120, "READY=1")
        ready = next(m for m in messages if "READY=1" in m)
        assert "STATUS=idle; 24 item(s) waiting of 24; adapter none (base)" in ready

        # a second daemon on the same home refuses at once, naming the first one's pid
        second = subprocess.run(console_script() + ["run", "--home", str(home.root)], capture_output=True,
                                text=True, timeout=60, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert f"another edge-unisd daemon (pid {daemon.proc.pid}) is already running on home {home.root}" \
            in second.stderr

        # a file dropped into the spool is ingested while the round runs
        (home.incoming / "new.jsonl").write_text('{"prompt": "dropped while running", "id": "spooled"}\n')
        wait_until(lambda: (home.done / "new.jsonl").exists(), 30, "the spool file to be filed away")
        with Store.open(home) as store:
            assert [it.id for it in store.get_items(["spooled"])] == ["spooled"]

        daemon.wait_for("step 1/", 180)  # the round's child is training
        took = daemon.stop(signal.SIGTERM)
    finally:
        daemon.kill()
    assert took < STOP_BOUND_S and daemon.proc.returncode == 0, daemon.log[-2000:]
    time.sleep(0.2)  # the last datagrams
    assert any(m.startswith("STATUS=adapting") for m in messages) and any("STOPPING=1" in m for m in messages)
    assert "ready" in daemon.log and "round was stopped" in daemon.log
    # the round was checkpointed to resume at the next start, not lost
    with Store.open(home) as store:
        last = store.last_round()
        assert last.status == "interrupted" and last.n_items in (24, 25)  # the spooled one may be in it
        assert store.count_items().pending == 25
    assert (home.checkpoints / "round.json").is_file() and (home.checkpoints / "round.pt").is_file()
    assert "Traceback" not in daemon.log


# --- the jobs, in-process ----------------------------------------------------------------------------

@pytest.fixture
def home(tmp_path, capsys) -> Home:
    h = make_home(tmp_path / "home", n_items=4)
    capsys.readouterr()
    return h


def no_child(*a, **kw):
    raise AssertionError("a child process was started")


def test_round_job_starts_no_child_without_work_or_with_closed_gates(home, monkeypatch):
    from budgets.sensors import SensorReadings

    monkeypatch.setattr(service, "run_in_child", no_child)
    on_battery = SensorReadings(taken_at=dt.datetime.now().astimezone(), on_ac=False, has_battery=True,
                                battery_percent=20.0)
    monkeypatch.setattr("budgets.sensors.read_sensors", lambda: on_battery)
    home.settings.write_text(home.settings.read_text().replace("check_power = false", "check_power = true"))
    assert service.round_job(str(home.root)) == {"promoted": False, "status": "idle"}  # on battery
    home.settings.write_text(home.settings.read_text().replace("check_power = true", "check_power = false"))
    with Store.open(home) as store:
        store.finish_round(store.start_round([f"q{i}" for i in range(4)]), "done")  # all trained
    assert service.round_job(str(home.root)) == {"promoted": False, "status": "idle"}  # nothing new


def test_round_job_reports_a_promotion_from_its_child(home, monkeypatch):
    from daemon.lifecycle import ChildOutcome

    calls = []

    def fake_child(fn, home_arg, **kw):
        calls.append((fn, home_arg, kw["stop_event"]))
        return ChildOutcome(exitcode=0, value={"status": "promoted", "round": 1, "adapter": "v0001"})

    monkeypatch.setattr(service, "run_in_child", fake_child)
    r = service.round_job(str(home.root))
    assert r["promoted"] is True and r["adapter"] == "v0001"
    assert calls == [(service.round_child, str(home.root), None)]  # module-level: a spawn child finds it


def test_retention_job_forgets_old_items_and_prunes_versions(home):
    from adapters.registry import AdapterRegistry
    from tests.daemon.test_cli_data import make_adapter

    old = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=40)
    with Store.open(home) as store:
        store.add_items([IngestRow(prompt="an old question", id="old")], received_at=old)
    home.settings.write_text(home.settings.read_text().replace("retention_days = 365", "retention_days = 30")
                             .replace("keep_versions = 5", "keep_versions = 1"))
    reg = AdapterRegistry(home.adapters)
    folder = make_adapter(home.root / "scratch")
    for ids in (["old"], ["q1"]):
        reg.promote(reg.add(folder, item_ids=ids).version)
    out = service.retention_job(str(home.root))
    assert out["items"] == 1 and out["registry_marked"] == ["v0001"] and out["pruned"] == ["v0001"]
    with Store.open(home) as store:
        assert store.get_items(["old"]) == [] and store.count_items().total == 4
        assert {v.version: v.status for v in store.adapter_versions()} == {"v0001": "pruned", "v0002": "promoted"}
    assert [v.version for v in reg.list()] == ["v0002"]


def test_export_needed_follows_the_current_version_and_the_last_attempt(home):
    from adapters.registry import AdapterRegistry
    from daemon.exporting import EXPORT_META, export_needed
    from daemon.settings import load_settings
    from tests.daemon.test_cli_data import make_adapter

    settings = load_settings(home.settings)
    assert export_needed(home, settings) is None  # no adapter, nothing exported: nothing to do
    reg = AdapterRegistry(home.adapters)
    v = reg.promote(reg.add(make_adapter(home.root / "scratch")).version)
    assert export_needed(home, settings) == ("v0001", v.path)
    gguf = home.exports / "current.gguf"
    gguf.write_bytes(b"GGUF")

    def last(**entry):
        with Store.open(home) as store:
            store.set_meta(EXPORT_META, {"version": "v0001", "quant": "f16", "ok": True, "gguf": str(gguf),
                                         "refused": False, **entry})

    last()
    assert export_needed(home, settings) is None  # done
    last(quant="q8_0")
    assert export_needed(home, settings) == ("v0001", v.path)  # the settings changed the quant
    last(ok=False, refused=True, gguf=None)
    assert export_needed(home, settings) is None  # verification refused it: not retried every hour
    last()
    gguf.unlink()
    assert export_needed(home, settings) == ("v0001", v.path)  # the file went missing
    last()
    gguf.write_bytes(b"GGUF")
    reg.rollback("base")
    assert export_needed(home, settings) == ("base", None)  # servers must stop serving the adapter


def test_status_line_never_carries_prompt_text(home):
    line = service.status_line(home)
    assert line == "idle; 4 item(s) waiting of 4; adapter none (base)" and "favourite" not in line
    assert json.dumps(line)
