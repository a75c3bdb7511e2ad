import json
import logging
import stat
from datetime import datetime, timezone

from budgets.ledger import JsonlLedger, LedgerEntry


def entry(i: int, **kw) -> LedgerEntry:
    base = dict(round_id=f"r{i}", started=datetime(2024, 1, 1, 1, i, tzinfo=timezone.utc),
                predicted_seconds=100.0 + i, spent_seconds=95.5 + i, items=10 + i, view_items=i, gates="open",
                budget_seconds=120.0)
    return LedgerEntry(**{**base, **kw})


def test_appends_survive_reopening_in_order(tmp_path):
    path = tmp_path / "home" / "ledger.jsonl"
    JsonlLedger(path).append(entry(0))
    JsonlLedger(path).append(entry(1, stopped_reason="gate closed: power: on battery at 40% (AC required)"))
    got = JsonlLedger(path).entries()
    assert got == [entry(0), entry(1, stopped_reason="gate closed: power: on battery at 40% (AC required)")]
    assert JsonlLedger(path).last().round_id == "r1"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_missing_ledger_is_empty(tmp_path):
    ledger = JsonlLedger(tmp_path / "nope.jsonl")
    assert ledger.entries() == [] and ledger.last() is None


def test_a_torn_last_line_is_skipped_and_the_next_append_is_not_glued_to_it(tmp_path, caplog):
    path = tmp_path / "ledger.jsonl"
    ledger = JsonlLedger(path)
    ledger.append(entry(0))
    with open(path, "a") as f:
        f.write('{"round_id": "r-crashed", "start')  # power cut mid-append
    ledger.append(entry(2))
    with caplog.at_level(logging.WARNING):
        got = ledger.entries()
    assert [e.round_id for e in got] == ["r0", "r2"]
    assert "ledger.jsonl:2" in caplog.text


def test_unknown_fields_from_a_newer_writer_are_ignored(tmp_path):
    path = tmp_path / "ledger.jsonl"
    row = entry(3).to_dict() | {"future_field": 1}
    path.write_text(json.dumps(row) + "\n")
    assert JsonlLedger(path).entries() == [entry(3)]
