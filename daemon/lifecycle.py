"""Service lifecycle: one daemon per home, a bounded stop on SIGTERM/SIGINT, jobs in child processes.

The daemon runs for months on a machine that belongs to someone else's day. So:
- `SingleInstanceLock`: two daemons on one home would train on the same store and race on the
  adapter registry; the second one refuses, naming the first one's pid.
- `ServiceRunner`: turns SIGTERM/SIGINT into a stop event plus `on_stop` callbacks (e.g. the
  trainer's preemption flag), talks sd_notify, pings the watchdog only while healthy, and
  guarantees the stop is bounded: after `stop_timeout_s` it terminates the child processes, and
  if the process still has not exited it leaves with `os._exit` (safe: every write is atomic and
  the store is SQLite WAL, so a forced exit is no worse than the `kill -9` we already survive).
- `run_in_child`: an adaptation round in a `spawn` child, so stopping it is a signal and its
  memory (model, optimizer, allocator caches) goes back to the system when it ends.

Typical use in `edge-unisd run`:

    with SingleInstanceLock(home.root), ServiceRunner() as runner:
        scheduler.start()
        runner.ready("idle")
        runner.run_until_stopped(health=lambda: scheduler.running)
        scheduler.shutdown(wait=True)
"""

from __future__ import annotations

import collections
import ctypes
import errno
import fcntl
import logging
import multiprocessing
import os
import pickle
import select
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from daemon import sdnotify
from edge_unisd.atomic_io import PRIVATE_FILE_MODE, atomic_write_bytes

log = logging.getLogger(__name__)

DEFAULT_STOP_TIMEOUT_S = 30.0  # the promise of issue 5; systemd's TimeoutStopSec=45 leaves 15 s on top
DEFAULT_CHILD_GRACE_S = 20.0  # SIGTERM -> SIGKILL for a round: time to write a checkpoint
FORCED_EXIT_CODE = 70  # os.EX_SOFTWARE: the cooperative stop hung and we left with os._exit
LOCK_NAME = "daemon.lock"  # same name as daemon.home.Home.lock


# --- single instance per home --------------------------------------------------------------------------


class AlreadyRunning(RuntimeError):
    """Another process holds the home's lock; the message names its pid and the home."""

    def __init__(self, home: Path, pid: int | None, lock_path: Path):
        self.home, self.pid, self.lock_path = home, pid, lock_path
        who = f"pid {pid}" if pid else "pid unknown"
        hint = f"kill {pid}" if pid else f"see `fuser {lock_path}`"
        super().__init__(
            f"another edge-unisd daemon ({who}) is already running on home {home}; "
            f"stop it first (`systemctl --user stop edge-unisd` or `{hint}`) or use another --home"
        )


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


class SingleInstanceLock:
    """An exclusive `flock` on `<home>/daemon.lock` (0600) that holds the owner's pid.

    The kernel drops a flock when its holder exits in any way (crash, `kill -9`), so there is no
    stale lock to clean up. The file is never deleted and never replaced by an atomic rename:
    either would let two processes each lock a different inode of the "same" file.
    """

    def __init__(self, home_dir: str | os.PathLike, name: str = LOCK_NAME):
        self.home = Path(home_dir)
        self.path = self.home / name
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> SingleInstanceLock:
        """Take the lock or raise `AlreadyRunning`; a second acquire in this process also fails."""
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this SingleInstanceLock")
        if not self.home.is_dir():
            raise FileNotFoundError(
                f"home directory {self.home} does not exist; run `edge-unisd init --home {self.home}` first"
            )
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE_MODE)
        try:
            os.fchmod(fd, PRIVATE_FILE_MODE)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise AlreadyRunning(self.home, _read_pid(fd), self.path) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock (idempotent). The pid is erased first so nobody reads a dead owner."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing the last descriptor releases the flock

    def __enter__(self) -> SingleInstanceLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_holder(home_dir: str | os.PathLike, name: str = LOCK_NAME) -> int | None:
    """The pid of the daemon holding the home's lock (0 if not written yet), or None if no daemon runs.

    For `edge-unisd status` and for commands that must not run beside the daemon. Takes a shared
    lock for a moment, which only succeeds when nobody holds the exclusive one.
    """
    path = Path(home_dir) / name
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            return _read_pid(fd) or 0
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


# --- child processes --------------------------------------------------------------------------------------

_children_lock = threading.Lock()
_children: set[multiprocessing.process.BaseProcess] = set()


def live_children() -> list[multiprocessing.process.BaseProcess]:
    """The children started by `run_in_child` that are still running (any thread)."""
    with _children_lock:
        return [p for p in _children if p.is_alive()]


def terminate_children(grace_s: float = 5.0) -> int:
    """SIGTERM every live `run_in_child` child, SIGKILL those alive after `grace_s`. Returns the count."""
    procs = live_children()
    for p in procs:
        log.warning("terminating child process %s (pid %s)", p.name, p.pid)
        p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            log.error("child process %s (pid %s) ignored SIGTERM; killing it", p.name, p.pid)
            p.kill()
            p.join(1.0)
    return len(procs)


@dataclass(frozen=True)
class ChildOutcome:
    """How a `run_in_child` job ended. `exitcode` < 0: killed by that signal, as in multiprocessing."""

    exitcode: int | None
    value: Any = None  # what fn returned (pickled back), when it returned
    error: str | None = None  # the child's traceback text when fn raised; may quote data, so log it at DEBUG
    stopped: bool = False  # we sent SIGTERM because a stop was requested (or it was never started)
    timed_out: bool = False  # we sent SIGTERM because `timeout_s` ran out
    killed: bool = False  # it outlived `grace_seconds` after SIGTERM and got SIGKILL

    @property
    def ok(self) -> bool:
        return self.exitcode == 0 and self.error is None


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGKILL us when the parent dies (a `kill -9`'d daemon must not leave a round training).

    PR_SET_PDEATHSIG fires when the parent *thread* that started us exits; `run_in_child`
    blocks that thread until we are gone, so it lives at least as long as we do.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _child_main(fn: Callable[..., Any], args: tuple, kwargs: dict, result_path: str, parent_pid: int,
                log_level: int) -> None:
    """Entry point of the child: run fn, leave ('ok', value) or ('error', traceback) in result_path."""
    _die_with_parent(parent_pid)
    # Ctrl-C on a terminal reaches the whole process group; the parent decides and SIGTERMs us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s [child] %(name)s: %(message)s")
    try:
        payload: tuple[str, Any] = ("ok", fn(*args, **kwargs))
        data = pickle.dumps(payload)
    except Exception:
        payload = ("error", traceback.format_exc())
        data = pickle.dumps(payload)
    atomic_write_bytes(result_path, data)
    sys.exit(0 if payload[0] == "ok" else 1)


def install_child_stop_handler() -> threading.Event:
    """For a job running under `run_in_child`: turn SIGTERM into an event it polls, so it can checkpoint.

    Without this call the child keeps the default SIGTERM action (die at once). Call it first thing
    in the job and pass `event.is_set` to the training loop as its preemption check.
    """
    event = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: event.set())
    return event


def run_in_child(
    fn: Callable[..., Any],
    *args: Any,
    stop_event: threading.Event | None = None,
    grace_seconds: float = DEFAULT_CHILD_GRACE_S,
    timeout_s: float | None = None,
    poll_s: float = 0.05,
    **kwargs: Any,
) -> ChildOutcome:
    """Run `fn(*args, **kwargs)` in a fresh 'spawn' process and wait for it.

    `fn` must be a module-level function and its arguments picklable (a home path, ids, numbers).
    When `stop_event` is set (daemon stopping) or `timeout_s` runs out, the child gets SIGTERM,
    then SIGKILL after `grace_seconds`. The return value comes back through a pickle file in a
    private temp directory (not a queue: a queue deadlocks if the parent joins before draining).
    """
    if stop_event is not None and stop_event.is_set():
        return ChildOutcome(exitcode=None, stopped=True)
    ctx = multiprocessing.get_context("spawn")
    workdir = Path(tempfile.mkdtemp(prefix="edge-unisd-child-"))  # 0700
    result_path = workdir / "result.pickle"
    name = f"edge-unisd:{getattr(fn, '__name__', 'job')}"
    proc = ctx.Process(
        target=_child_main,
        args=(fn, args, kwargs, str(result_path), os.getpid(), logging.getLogger().getEffectiveLevel()),
        name=name,
    )
    stopped = timed_out = killed = False
    term_at: float | None = None
    started = time.monotonic()
    try:
        proc.start()
        with _children_lock:
            _children.add(proc)
        log.debug("started %s (pid %s)", name, proc.pid)
        while proc.exitcode is None:
            proc.join(poll_s)
            if proc.exitcode is not None:
                break
            now = time.monotonic()
            if term_at is None:
                stopped = stop_event is not None and stop_event.is_set()
                timed_out = not stopped and timeout_s is not None and now - started >= timeout_s
                if stopped or timed_out:
                    why = "stop requested" if stopped else "timeout"
                    log.info("stopping %s (pid %s): %s", name, proc.pid, why)
                    proc.terminate()
                    term_at = now
            elif not killed and now - term_at >= grace_seconds:
                log.warning("%s (pid %s) still running %.1f s after SIGTERM; sending SIGKILL",
                            name, proc.pid, grace_seconds)
                proc.kill()
                killed = True
    finally:
        if proc.exitcode is None:  # leaving by an exception (KeyboardInterrupt...): take the child along
            proc.kill()
            proc.join()
        with _children_lock:
            _children.discard(proc)
        exitcode = proc.exitcode
        proc.close()
        value, error = None, None
        try:
            kind, obj = pickle.loads(result_path.read_bytes())
            value, error = (obj, None) if kind == "ok" else (None, obj)
        except (OSError, EOFError, pickle.UnpicklingError, ValueError):
            pass  # killed before it wrote a result
        shutil.rmtree(workdir, ignore_errors=True)
    if error is not None:
        log.warning("%s failed (exit code %s); traceback at DEBUG", name, exitcode)
        log.debug("%s traceback:\n%s", name, error)
    return ChildOutcome(exitcode=exitcode, value=value, error=error, stopped=stopped,
                        timed_out=timed_out, killed=killed)


# --- the service ------------------------------------------------------------------------------------------

_active_stop_event: threading.Event | None = None


def current_stop_event() -> threading.Event | None:
    """The stop event of the `ServiceRunner` this process is running under, if any.

    For scheduler jobs (module-level functions with simple arguments): pass it to `run_in_child`
    so a round is stopped when the daemon is.
    """
    return _active_stop_event


class ServiceRunner:
    """SIGTERM/SIGINT -> `stop_event` + `on_stop` callbacks, sd_notify, watchdog, and a bounded stop.

    The signal handler only records the signal and writes a byte to a pipe (work inside a Python
    signal handler can deadlock on a lock the interrupted code holds); a helper thread does the
    rest: sets `stop_event`, sends STOPPING, runs the callbacks, then watches the clock. If the
    `with` block has not exited `stop_timeout_s` after the first signal, it terminates the
    `run_in_child` children; `exit_grace_s` later, if still not out, it calls `os._exit`. A second
    signal terminates the children at once.
    """

    def __init__(
        self,
        *,
        stop_timeout_s: float = DEFAULT_STOP_TIMEOUT_S,
        kill_grace_s: float = 5.0,
        exit_grace_s: float = 5.0,
        hard_exit: bool = True,
        on_stop: Callable[[], None] | None = None,
        signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT),
    ):
        self.stop_timeout_s, self.kill_grace_s, self.exit_grace_s = stop_timeout_s, kill_grace_s, exit_grace_s
        self.hard_exit = hard_exit
        self.signals = signals
        self.stop_event = threading.Event()
        self.stop_reason: str | None = None
        self._callbacks: list[Callable[[], None]] = [on_stop] if on_stop else []
        self._requests: collections.deque[str] = collections.deque()  # appended from the signal handler
        self._exited = False
        self._old_handlers: dict[int, Any] = {}
        self._wake_r = self._wake_w = -1
        self._thread: threading.Thread | None = None

    # --- public API
    def on_stop(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Register a callback run once when the stop begins (quick: set a flag, shut a scheduler down)."""
        self._callbacks.append(callback)
        return callback

    def ready(self, status: str | None = None) -> None:
        sdnotify.ready(status)
        log.info("ready%s", f": {status}" if status else "")

    def status(self, text: str) -> None:
        sdnotify.status(text)

    def request_stop(self, reason: str = "requested") -> None:
        """Begin the stop from code (any thread); same path as a signal."""
        self._wake(reason)

    @property
    def stopping(self) -> bool:
        return self.stop_event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the stop to begin; True if it has."""
        return self.stop_event.wait(timeout)

    def run_until_stopped(self, health: Callable[[], bool] | None = None, tick_s: float = 1.0) -> str | None:
        """Block until a stop begins, pinging the watchdog at half its interval while `health()` is true.

        Withholding pings when unhealthy (scheduler dead, store unusable) is the point: systemd then
        restarts us. Returns the stop reason.
        """
        interval = sdnotify.watchdog_interval()
        ping_every = interval / 2 if interval else None
        next_ping = 0.0
        unhealthy_logged = False
        while not self.stop_event.is_set():
            if ping_every is not None and time.monotonic() >= next_ping:
                if self._healthy(health):
                    sdnotify.watchdog()
                    next_ping = time.monotonic() + ping_every
                    unhealthy_logged = False
                elif not unhealthy_logged:
                    log.error("health check failed; withholding watchdog pings so systemd restarts us")
                    unhealthy_logged = True
            self.stop_event.wait(min(tick_s, ping_every) if ping_every else tick_s)
        return self.stop_reason

    # --- context manager
    def __enter__(self) -> ServiceRunner:
        self._wake_r, self._wake_w = os.pipe()  # not inherited by children (PEP 446)
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        else:
            log.warning("ServiceRunner entered outside the main thread: no signal handlers installed")
        self._thread = threading.Thread(target=self._stopper, name="edge-unisd-stopper", daemon=True)
        self._thread.start()
        global _active_stop_event
        _active_stop_event = self.stop_event
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if not self.stop_event.is_set():  # a normal return, or an exception: still say we are going
            self.stop_reason = self.stop_reason or ("error" if exc_type else "finished")
            self.stop_event.set()
            sdnotify.stopping()
        self._exited = True
        self._wake("exit")
        if self._thread is not None:
            self._thread.join(5.0)
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old)
        self._old_handlers.clear()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        self._wake_r = self._wake_w = -1
        global _active_stop_event
        if _active_stop_event is self.stop_event:
            _active_stop_event = None
        log.info("stopped (%s)", self.stop_reason)

    # --- internals
    @staticmethod
    def _healthy(health: Callable[[], bool] | None) -> bool:
        if health is None:
            return True
        try:
            return bool(health())
        except Exception:
            log.exception("health check raised")
            return False

    def _on_signal(self, signum: int, frame: object) -> None:
        self._wake(signal.Signals(signum).name)

    def _wake(self, reason: str) -> None:
        self._requests.append(reason)  # deque.append is atomic: safe inside a signal handler
        try:
            os.write(self._wake_w, b"!")
        except OSError:  # pipe full (the thread is already awake) or closed (already exited)
            pass

    def _next_request(self, timeout: float | None) -> str | None:
        """Block until a request arrives (or `timeout`); drain the pipe; return the oldest request."""
        try:
            if not self._requests:
                select.select([self._wake_r], [], [], timeout)
            while os.read(self._wake_r, 512):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        except (OSError, ValueError):  # pipe closed under us: __exit__ gave up waiting for this thread
            self._exited = True
        return self._requests.popleft() if self._requests else None

    def _begin_stop(self, reason: str) -> None:
        self.stop_reason = reason
        log.info("stop requested (%s); finishing within %.0f s", reason, self.stop_timeout_s)
        self.stop_event.set()
        sdnotify.stopping(f"stopping ({reason})")
        # In their own thread: a callback that hangs must not keep this one from enforcing the deadline.
        threading.Thread(target=self._run_callbacks, name="edge-unisd-on-stop", daemon=True).start()

    def _run_callbacks(self) -> None:
        for callback in self._callbacks:
            try:
                callback()
            except Exception:
                log.exception("on_stop callback %r failed", callback)

    def _stopper(self) -> None:
        """The helper thread: wait for the first request, stop, then enforce the deadline."""
        reason = None
        while reason is None and not self._exited:
            reason = self._next_request(None)
        if self._exited or reason is None:
            return
        self._begin_stop(reason)
        deadline = time.monotonic() + self.stop_timeout_s
        while not self._exited and time.monotonic() < deadline:
            again = self._next_request(max(0.0, deadline - time.monotonic()))
            if again is not None and not self._exited:
                log.warning("second stop request (%s): terminating child processes now", again)
                terminate_children(self.kill_grace_s)
        if self._exited:
            return
        log.error("cooperative stop did not finish within %.0f s; terminating child processes",
                  self.stop_timeout_s)
        terminate_children(self.kill_grace_s)
        end = time.monotonic() + self.exit_grace_s
        while not self._exited and time.monotonic() < end:
            self._next_request(max(0.0, end - time.monotonic()))
        if not self._exited and self.hard_exit:
            log.critical("still not stopped %.0f s after the deadline; exiting now (code %d)",
                         self.exit_grace_s, FORCED_EXIT_CODE)
            logging.shutdown()
            os._exit(FORCED_EXIT_CODE)
