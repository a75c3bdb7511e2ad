"""The systemd notify protocol (sd_notify(3)) in a few lines of stdlib, so the daemon needs no libsystemd.

systemd starts a `Type=notify` service with $NOTIFY_SOCKET set to an AF_UNIX datagram socket (a path,
or an abstract name written with a leading '@'). The service sends newline-separated `KEY=VALUE`
lines: `READY=1` when it serves, `STATUS=...` for `systemctl status`, `WATCHDOG=1` at least every
$WATCHDOG_USEC, `STOPPING=1` when it begins to shut down. Without $NOTIFY_SOCKET (a terminal, a
test, another supervisor) every call is a no-op, so callers never need to check.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"


def _address(raw: str) -> str | bytes | None:
    """The socket address from $NOTIFY_SOCKET: a filesystem path, or b'\\0name' for '@name'."""
    if raw.startswith("@"):
        return b"\0" + raw[1:].encode()  # Linux abstract namespace
    if raw.startswith("/"):
        return raw
    return None  # e.g. 'vsock:CID:PORT' (VMs): not supported here


def notify(state: str, env: Mapping[str, str] | None = None) -> bool:
    """Send `state` (one or more `KEY=VALUE` lines) to the service manager.

    Returns True when a datagram was sent, False when there is no manager to tell or sending
    failed. Never raises: losing a status line must not take the daemon down. `env` defaults
    to os.environ (tests pass their own).
    """
    raw = (os.environ if env is None else env).get(NOTIFY_SOCKET_ENV)
    if not raw:
        return False
    address = _address(raw)
    if address is None:
        log.debug("unsupported %s address %r; not notifying", NOTIFY_SOCKET_ENV, raw)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode("utf-8"), address)
    except OSError as e:
        log.warning("could not notify the service manager at %s: %s", raw, e)
        return False
    return True


def _one_line(text: str) -> str:
    """STATUS= takes one line; a newline would start a new (bogus) assignment."""
    return " ".join(text.split())


def ready(status: str | None = None, env: Mapping[str, str] | None = None) -> bool:
    """Tell systemd start-up is over (`systemctl start` returns, dependants start)."""
    return notify("READY=1" + (f"\nSTATUS={_one_line(status)}" if status else ""), env)


def status(text: str, env: Mapping[str, str] | None = None) -> bool:
    """One line shown by `systemctl status`. Never put prompt text here: it ends up in the journal."""
    return notify(f"STATUS={_one_line(text)}", env)


def watchdog(env: Mapping[str, str] | None = None) -> bool:
    """Keep-alive ping; without one every WatchdogSec= systemd kills and restarts the service."""
    return notify("WATCHDOG=1", env)


def stopping(status: str | None = None, env: Mapping[str, str] | None = None) -> bool:
    """Tell systemd shutdown has begun (so a slow stop is shown as such, not as a hang)."""
    return notify("STOPPING=1" + (f"\nSTATUS={_one_line(status)}" if status else ""), env)


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """The watchdog timeout in seconds, or None when no watchdog is armed for this process.

    systemd sets $WATCHDOG_USEC and $WATCHDOG_PID; the pid check keeps a child that inherited
    the environment from believing it must ping. Ping at about half this interval.
    """
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid.strip() != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not an integer", usec)
        return None
    return value / 1e6 if value > 0 else None
