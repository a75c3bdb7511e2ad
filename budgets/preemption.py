"""Stop a running round when a gate closes (power unplugged, user back, window over) or on a signal.

A daemon thread re-checks the gates every `poll_seconds`; the trainer polls the cheap
`should_stop()` between optimizer steps, checkpoints and returns. So a round stops at most
`poll_seconds` + one check + one optimizer step after a gate closes. The first reason wins.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from budgets.gates import GateDecision

log = logging.getLogger(__name__)


class PreemptionMonitor:
    def __init__(self, check: Callable[[], GateDecision], poll_seconds: float = 5.0) -> None:
        if not poll_seconds > 0:
            raise ValueError(f"poll_seconds must be > 0 (got {poll_seconds})")
        self._check = check
        self._poll = float(poll_seconds)
        self._stop = threading.Event()  # the round must stop
        self._closing = threading.Event()  # the monitor itself must end
        self._reason: str | None = None
        self._thread: threading.Thread | None = None
        self.last_decision: GateDecision | None = None

    # --- what the trainer and the daemon call

    def should_stop(self) -> bool:
        return self._stop.is_set()

    @property
    def reason(self) -> str | None:
        return self._reason

    def request_stop(self, reason: str) -> None:
        """Ask the round to stop (e.g. from a SIGTERM handler). Cheap and safe from a signal handler."""
        if self._reason is None:
            self._reason = reason
        self._stop.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until a stop is requested or `timeout` passes; True if stopping."""
        return self._stop.wait(timeout)

    # --- lifecycle

    def start(self) -> PreemptionMonitor:
        if self._thread is not None:
            raise RuntimeError("PreemptionMonitor already started; make a new one per round")
        self._thread = threading.Thread(target=self._run, name="edge-unisd-preemption", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout: float | None = None) -> None:
        """End the polling thread (the round is over). Does not count as a stop request."""
        self._closing.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout if timeout is not None else self._poll + 5.0)

    def __enter__(self) -> PreemptionMonitor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self) -> None:
        while not self._closing.wait(self._poll):
            if self._stop.is_set():
                return
            try:
                decision = self._check()
            except Exception:  # noqa: BLE001 - a failing sensor read must not kill the monitor
                log.warning("gate check failed during a round; will retry", exc_info=True)
                continue
            self.last_decision = decision
            if not decision.open:
                reason = "gate closed: " + "; ".join(decision.closed_reasons())
                log.info("preempting the round: %s", reason)
                self.request_stop(reason)
                return
