"""sd_notify over a real AF_UNIX datagram socket, as systemd sets it up for a Type=notify service."""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon import sdnotify


class Listener:
    """The service manager's end: a bound datagram socket and the env a service would see."""

    def __init__(self, sock: socket.socket, env_value: str):
        self.sock = sock
        self.env = {"NOTIFY_SOCKET": env_value}

    def recv(self) -> str:
        return self.sock.recv(4096).decode()


@pytest.fixture
def listener() -> Iterator[Listener]:
    # A short directory: AF_UNIX paths are limited to 107 bytes and pytest's tmp_path can be long.
    with tempfile.TemporaryDirectory(prefix="sdn-") as d:
        path = str(Path(d) / "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            sock.settimeout(2.0)
            yield Listener(sock, path)


def test_each_message_arrives_as_one_datagram(listener: Listener) -> None:
    assert sdnotify.ready("idle; 3 items waiting", env=listener.env)
    assert listener.recv() == "READY=1\nSTATUS=idle; 3 items waiting"
    assert sdnotify.status("round 4: 120/300 s", env=listener.env)
    assert listener.recv() == "STATUS=round 4: 120/300 s"
    assert sdnotify.watchdog(env=listener.env)
    assert listener.recv() == "WATCHDOG=1"
    assert sdnotify.stopping(env=listener.env)
    assert listener.recv() == "STOPPING=1"


def test_status_is_kept_on_one_line(listener: Listener) -> None:
    """A newline in STATUS= would start a new assignment (e.g. a forged READY=1)."""
    sdnotify.status("line one\nREADY=1", env=listener.env)
    assert listener.recv() == "STATUS=line one READY=1"


def test_abstract_socket_address() -> None:
    name = f"edge-unisd-test-{os.getpid()}-{os.urandom(4).hex()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(2.0)
        assert sdnotify.watchdog(env={"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(100) == b"WATCHDOG=1"


def test_no_manager_means_no_op() -> None:
    assert sdnotify.ready("x", env={}) is False
    assert sdnotify.notify("READY=1", env={"NOTIFY_SOCKET": "vsock:2:1234"}) is False


def test_a_vanished_socket_does_not_raise(tmp_path: Path) -> None:
    assert sdnotify.watchdog(env={"NOTIFY_SOCKET": str(tmp_path / "gone")}) is False


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "180000000"}, 180.0),
        ({"WATCHDOG_USEC": "180000000", "WATCHDOG_PID": str(os.getpid())}, 180.0),
        ({"WATCHDOG_USEC": "180000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert sdnotify.watchdog_interval(env) == expected
