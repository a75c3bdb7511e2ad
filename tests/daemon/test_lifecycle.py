"""Single instance per home, a bounded stop on SIGTERM, and jobs in killable child processes.

Signals are tested on real subprocesses (`python -c` scripts) because a signal sent to the pytest
process itself would hit pytest too. The functions run by `run_in_child` live at module level so
the 'spawn' child can import them by name.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon import lifecycle
from daemon.home import Home
from daemon.lifecycle import AlreadyRunning, SingleInstanceLock, lock_holder, run_in_child

REPO = Path(__file__).resolve().parents[2]


# --- functions run in spawn children (must be importable by name) -------------------------------------


def add(a: int, b: int) -> int:
    return a + b


def fail(message: str) -> None:
    raise ValueError(message)


def ignore_sigterm_forever(marker: str) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    Path(marker).write_text(str(os.getpid()))
    while True:
        time.sleep(0.05)


def checkpoint_on_sigterm(marker: str) -> str:
    stop = lifecycle.install_child_stop_handler()
    Path(marker).write_text(str(os.getpid()))
    while not stop.wait(0.02):
        pass
    return "checkpointed"


def sleep_forever(marker: str) -> None:
    Path(marker).write_text(str(os.getpid()))
    while True:
        time.sleep(0.05)


# --- helpers ------------------------------------------------------------------------------------------------


def wait_for(predicate, timeout: float = 10.0, step: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def python(script: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `python -c script` at the repository root with stdout/stderr captured."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)], cwd=REPO, env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def gone(pid: int) -> bool:
    """True once `pid` has exited (a zombie nobody reaps counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] in "ZX"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True


@pytest.fixture
def notify_socket() -> Iterator[socket.socket]:
    with tempfile.TemporaryDirectory(prefix="lc-") as d:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(str(Path(d) / "notify"))
            sock.settimeout(10.0)
            yield sock


# --- single instance ----------------------------------------------------------------------------------------


def test_lock_file_is_private_and_holds_the_pid(tmp_path: Path) -> None:
    with SingleInstanceLock(tmp_path) as lock:
        assert stat.S_IMODE(lock.path.stat().st_mode) == 0o600
        assert lock.path.read_text().strip() == str(os.getpid())
        assert lock_holder(tmp_path) == os.getpid()
    assert lock_holder(tmp_path) is None
    assert lock.path.exists()  # never deleted: deleting would let two processes lock two inodes


def test_lock_lives_where_the_home_layout_says() -> None:
    assert SingleInstanceLock("/h").path == Home(Path("/h")).lock


def test_second_daemon_in_another_process_is_refused_naming_pid_and_home(tmp_path: Path) -> None:
    with SingleInstanceLock(tmp_path):
        proc = python(f"""
            from daemon.lifecycle import SingleInstanceLock, AlreadyRunning
            try:
                SingleInstanceLock({str(tmp_path)!r}).acquire()
            except AlreadyRunning as e:
                print(e.pid)
                print(e)
                raise SystemExit(3)
        """)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 3, err
    pid_line, message = out.splitlines()
    assert pid_line == str(os.getpid())
    assert f"pid {os.getpid()}" in message and str(tmp_path) in message


def test_second_acquire_in_the_same_process_is_refused(tmp_path: Path) -> None:
    with SingleInstanceLock(tmp_path):
        with pytest.raises(AlreadyRunning, match=str(os.getpid())):
            SingleInstanceLock(tmp_path).acquire()


def test_lock_is_released_when_the_holder_is_killed(tmp_path: Path) -> None:
    proc = python(f"""
        import time
        from daemon.lifecycle import SingleInstanceLock
        SingleInstanceLock({str(tmp_path)!r}).acquire()
        print("locked", flush=True)
        time.sleep(60)
    """)
    try:
        assert proc.stdout.readline().strip() == "locked"
        assert lock_holder(tmp_path) == proc.pid
        with pytest.raises(AlreadyRunning):
            SingleInstanceLock(tmp_path).acquire()
    finally:
        proc.kill()
        proc.communicate()
    with SingleInstanceLock(tmp_path) as lock:  # no stale lock after kill -9
        assert lock.held


def test_missing_home_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="edge-unisd init"):
        SingleInstanceLock(tmp_path / "nope").acquire()


# --- run_in_child -------------------------------------------------------------------------------------------


def test_child_returns_its_value() -> None:
    outcome = run_in_child(add, 2, b=3)
    assert outcome.ok and outcome.value == 5 and outcome.exitcode == 0
    assert lifecycle.live_children() == []


def test_child_exception_comes_back_as_text() -> None:
    outcome = run_in_child(fail, "bad batch")
    assert not outcome.ok and outcome.exitcode == 1
    assert "ValueError: bad batch" in outcome.error


def set_when_file_appears(path: Path, event: threading.Event) -> threading.Thread:
    thread = threading.Thread(target=lambda: wait_for(path.exists) and event.set(), daemon=True)
    thread.start()
    return thread


def test_child_ignoring_sigterm_is_killed_after_the_grace(tmp_path: Path) -> None:
    marker, stop = tmp_path / "started", threading.Event()
    set_when_file_appears(marker, stop)  # SIGTERM only once SIG_IGN is in place
    grace = 0.5
    outcome = run_in_child(ignore_sigterm_forever, str(marker), stop_event=stop, grace_seconds=grace)
    assert outcome.stopped and outcome.killed
    assert outcome.exitcode == -signal.SIGKILL
    assert gone(int(marker.read_text()))


def test_cooperative_child_checkpoints_on_sigterm(tmp_path: Path) -> None:
    marker, stop = tmp_path / "started", threading.Event()
    set_when_file_appears(marker, stop)
    t0 = time.monotonic()
    outcome = run_in_child(checkpoint_on_sigterm, str(marker), stop_event=stop, grace_seconds=30)
    assert outcome.ok and outcome.value == "checkpointed" and outcome.stopped and not outcome.killed
    assert time.monotonic() - t0 < 10  # did not wait for the grace


def test_timeout_terminates_the_child(tmp_path: Path) -> None:
    outcome = run_in_child(sleep_forever, str(tmp_path / "started"), timeout_s=0.5, grace_seconds=5)
    assert outcome.timed_out and not outcome.stopped and not outcome.killed
    assert outcome.exitcode == -signal.SIGTERM


def test_no_child_is_started_once_stopping() -> None:
    stop = threading.Event()
    stop.set()
    outcome = run_in_child(add, 1, 2, stop_event=stop)
    assert outcome.stopped and outcome.exitcode is None and outcome.value is None


def test_child_dies_with_a_killed_parent(tmp_path: Path) -> None:
    marker = tmp_path / "started"
    proc = python(f"""
        from daemon.lifecycle import run_in_child
        from tests.daemon.test_lifecycle import sleep_forever
        run_in_child(sleep_forever, {str(marker)!r})
    """, env={"TMPDIR": str(tmp_path)})  # its result directory is left behind: keep it in tmp_path
    try:
        assert wait_for(marker.exists), proc.stderr.read() if proc.poll() is not None else "no marker"
    finally:
        proc.kill()
        proc.wait()  # not communicate(): a surviving grandchild would hold the pipes open
        proc.stdout.close()
        proc.stderr.close()
    child = int(marker.read_text())
    try:
        assert wait_for(lambda: gone(child), timeout=5)
    finally:
        if not gone(child):
            os.kill(child, signal.SIGKILL)


# --- ServiceRunner ------------------------------------------------------------------------------------------

RUNNER_SCRIPT = """
import sys, time
from daemon.lifecycle import ServiceRunner, run_in_child
from tests.daemon.test_lifecycle import ignore_sigterm_forever
mode, marker = sys.argv[1], sys.argv[2]
with ServiceRunner(stop_timeout_s=0.5, kill_grace_s=0.2, exit_grace_s=0.3) as runner:
    runner.on_stop(lambda: print("on_stop called", flush=True))
    runner.ready("up")
    if mode == "cooperative":
        # one string: on_stop's thread prints at the same moment, and must not land between print's arguments
        print(f"stopped by {runner.run_until_stopped(tick_s=0.05)}", flush=True)
    elif mode == "stuck-child":  # never looks at the stop event: the runner must end the child
        outcome = run_in_child(ignore_sigterm_forever, marker, grace_seconds=100)
        print("child exit", outcome.exitcode, flush=True)
    elif mode == "stuck-main":  # ignores the stop altogether: the runner must exit the process
        while True:
            time.sleep(0.05)
"""


def start_runner(mode: str, marker: Path, sock: socket.socket) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", RUNNER_SCRIPT, mode, str(marker)], cwd=REPO,
        env={**os.environ, "NOTIFY_SOCKET": sock.getsockname()},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert sock.recv(4096).decode() == "READY=1\nSTATUS=up"
    return proc


def stop_and_time(proc: subprocess.Popen, bound_s: float) -> tuple[float, str, str]:
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=bound_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"still running {bound_s} s after SIGTERM; stderr:\n{err}")
    return time.monotonic() - t0, out, err


def test_sigterm_stops_the_service_and_sends_stopping(tmp_path: Path, notify_socket: socket.socket) -> None:
    proc = start_runner("cooperative", tmp_path / "unused", notify_socket)
    elapsed, out, err = stop_and_time(proc, bound_s=5)
    assert proc.returncode == 0, err
    assert "on_stop called" in out and "stopped by SIGTERM" in out
    assert notify_socket.recv(4096).decode() == "STOPPING=1\nSTATUS=stopping (SIGTERM)"


def test_stop_is_bounded_by_terminating_a_stuck_child(tmp_path: Path, notify_socket: socket.socket) -> None:
    marker = tmp_path / "child"
    proc = start_runner("stuck-child", marker, notify_socket)
    assert wait_for(marker.exists)
    elapsed, out, err = stop_and_time(proc, bound_s=8)
    assert proc.returncode == 0, err
    assert f"child exit {-signal.SIGKILL}" in out  # SIGTERM ignored, then SIGKILL after kill_grace_s
    assert elapsed >= 0.5  # the cooperative stop got its stop_timeout_s first
    assert gone(int(marker.read_text()))


def test_stop_is_bounded_even_if_the_main_thread_hangs(tmp_path: Path, notify_socket: socket.socket) -> None:
    proc = start_runner("stuck-main", tmp_path / "unused", notify_socket)
    elapsed, out, err = stop_and_time(proc, bound_s=8)
    assert proc.returncode == lifecycle.FORCED_EXIT_CODE
    assert "did not finish within" in err


def test_current_stop_event_follows_the_runner() -> None:
    assert lifecycle.current_stop_event() is None
    with lifecycle.ServiceRunner(signals=()) as runner:
        assert lifecycle.current_stop_event() is runner.stop_event
        runner.request_stop("test")
        assert runner.wait(5) and runner.stop_reason == "test"
    assert lifecycle.current_stop_event() is None


def test_watchdog_pings_only_while_healthy(monkeypatch: pytest.MonkeyPatch, notify_socket: socket.socket) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.getsockname())
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # pings every 0.05 s
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    healthy = True
    with lifecycle.ServiceRunner(signals=()) as runner:
        loop = threading.Thread(target=runner.run_until_stopped,
                                kwargs={"health": lambda: healthy, "tick_s": 0.01}, daemon=True)
        loop.start()
        assert [notify_socket.recv(100) for _ in range(3)] == [b"WATCHDOG=1"] * 3
        healthy = False
        time.sleep(0.1)  # let a ping already on its way arrive, then drop it
        notify_socket.setblocking(False)
        while True:
            try:
                notify_socket.recv(100)
            except BlockingIOError:
                break
        notify_socket.settimeout(0.3)  # six ping intervals of silence
        with pytest.raises(TimeoutError):
            notify_socket.recv(100)
        runner.request_stop("test")
        loop.join(5)
        assert not loop.is_alive()
    notify_socket.settimeout(5)
    assert notify_socket.recv(100) == b"STOPPING=1\nSTATUS=stopping (test)"
