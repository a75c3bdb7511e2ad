import pytest

from budgets.gates import GateDecision, GateState
from budgets.preemption import PreemptionMonitor

OPEN = GateDecision(open=True, gates=[GateState("power", "open", "on AC power")])
UNPLUGGED = GateDecision(open=False, gates=[GateState("power", "closed", "on battery at 80% (AC required)")])


class FakeGates:
    """Returns the scripted decisions in turn, then repeats the last one; counts calls."""

    def __init__(self, *decisions):
        self.decisions = list(decisions)
        self.calls = 0

    def __call__(self) -> GateDecision:
        self.calls += 1
        return self.decisions[min(self.calls, len(self.decisions)) - 1]


def test_stops_when_a_gate_closes_and_reports_it():
    gates = FakeGates(OPEN, OPEN, UNPLUGGED)
    with PreemptionMonitor(gates, poll_seconds=0.01) as mon:
        assert mon.wait(timeout=5.0)
        assert mon.should_stop()
        assert mon.reason == "gate closed: power: on battery at 80% (AC required)"
    assert gates.calls == 3  # stops polling once it has decided
    assert mon.last_decision is UNPLUGGED


def test_keeps_running_while_gates_stay_open():
    gates = FakeGates(OPEN)
    with PreemptionMonitor(gates, poll_seconds=0.01) as mon:
        assert not mon.wait(timeout=0.1)
        assert not mon.should_stop() and mon.reason is None
    assert gates.calls >= 2


def test_request_stop_wins_and_first_reason_is_kept():
    gates = FakeGates(OPEN)
    with PreemptionMonitor(gates, poll_seconds=0.01) as mon:
        mon.request_stop("SIGTERM")
        mon.request_stop("something later")
        assert mon.should_stop() and mon.reason == "SIGTERM"


def test_a_failing_check_is_retried_not_fatal():
    state = {"n": 0}

    def flaky() -> GateDecision:
        state["n"] += 1
        if state["n"] == 1:
            raise OSError("sensor hiccup")
        return UNPLUGGED

    with PreemptionMonitor(flaky, poll_seconds=0.01) as mon:
        assert mon.wait(timeout=5.0)
    assert state["n"] == 2


def test_close_ends_the_thread_without_a_stop():
    mon = PreemptionMonitor(FakeGates(OPEN), poll_seconds=0.01).start()
    mon.close()
    assert not mon.should_stop()
    assert not mon._thread.is_alive()
    with pytest.raises(RuntimeError):
        mon.start()
    with pytest.raises(ValueError):
        PreemptionMonitor(FakeGates(OPEN), poll_seconds=0)
