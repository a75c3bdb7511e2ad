"""The spool: finished files are ingested and filed away; files still being written are left alone."""

from __future__ import annotations

import json
import os
import stat

import pytest

import daemon.spool
from daemon.home import Home
from daemon.spool import process_spool, purge_processed
from daemon.store import Store


@pytest.fixture
def home(tmp_path):
    return Home(tmp_path / "home").create()


@pytest.fixture
def store(home):
    with Store.open(home) as s:
        yield s


def drop(home, name, *rows, raw: bytes = b""):
    path = home.incoming / name
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in rows) + raw)
    return path


def test_good_file_goes_to_done(home, store):
    drop(home, "a.jsonl", {"prompt": "one"}, {"prompt": "two"})
    (r,) = process_spool(home, store, settle_s=0)
    assert r.accepted and r.report.added == 2
    assert r.moved_to == home.done / "a.jsonl" and r.moved_to.is_file()
    assert stat.S_IMODE(r.moved_to.stat().st_mode) == 0o600
    assert list(home.incoming.iterdir()) == []
    assert store.count_items().total == 2


def test_bad_rows_go_to_rejected_with_a_reason_file_and_good_rows_are_kept(home, store):
    drop(home, "b.jsonl", {"prompt": "fine"}, {"prompt": ""}, raw=b"{nope\n")
    (r,) = process_spool(home, store, settle_s=0)
    assert not r.accepted and r.moved_to == home.rejected / "b.jsonl"
    reason = (home.rejected / "b.jsonl.reason.txt").read_text()
    assert "1 added, 0 duplicates, 2 rejected" in reason
    assert "line 2: prompt is empty" in reason and "line 3: invalid JSON" in reason
    assert stat.S_IMODE((home.rejected / "b.jsonl.reason.txt").stat().st_mode) == 0o600
    assert [i.prompt_text for i in store.get_items()] == ["fine"]


def test_a_file_refused_whole_is_rejected_with_why(home, store):
    drop(home, "big.jsonl", *[{"prompt": f"p{i}"} for i in range(100)])
    (r,) = process_spool(home, store, settle_s=0, max_file_bytes=500)
    assert r.error and "limit" in r.error and r.moved_to.parent == home.rejected
    assert "not ingested" in (home.rejected / "big.jsonl.reason.txt").read_text()
    assert store.count_items().total == 0


def test_part_and_hidden_files_are_never_taken(home, store):
    drop(home, "c.jsonl.part", {"prompt": "x"})
    drop(home, ".c.jsonl", {"prompt": "y"})
    (home.incoming / "sub").mkdir()
    seen: dict = {}
    for _ in range(3):
        assert process_spool(home, store, seen) == []
    assert store.count_items().total == 0
    os.rename(home.incoming / "c.jsonl.part", home.incoming / "c.jsonl")  # the writer is done
    assert process_spool(home, store, seen) == []  # first look
    (r,) = process_spool(home, store, seen)
    assert r.report.added == 1


def test_a_growing_file_waits_until_it_is_stable_across_polls(home, store):
    seen: dict = {}
    path = drop(home, "d.jsonl", {"prompt": "first"})
    assert process_spool(home, store, seen) == []  # new: seen once
    with open(path, "ab") as f:
        f.write(b'{"prompt": "sec')  # half a row: the writer is mid-line
    assert process_spool(home, store, seen) == []  # changed since the last poll
    with open(path, "ab") as f:
        f.write(b'ond"}\n')
    assert process_spool(home, store, seen) == []
    (r,) = process_spool(home, store, seen)  # unchanged for a whole poll: taken
    assert (r.report.added, r.report.rejected) == (2, 0)


def test_without_poll_state_it_looks_twice(home, store, monkeypatch):
    path = drop(home, "e.jsonl", {"prompt": "first"})
    monkeypatch.setattr(daemon.spool.time, "sleep", lambda s: path.write_bytes(path.read_bytes() + b"{"))
    assert process_spool(home, store, settle_s=0.5) == []  # the file changed while we waited
    assert path.exists() and store.count_items().total == 0


def test_a_resent_file_does_not_overwrite_and_is_all_duplicates(home, store):
    drop(home, "f.jsonl", {"prompt": "same"})
    process_spool(home, store, settle_s=0)
    drop(home, "f.jsonl", {"prompt": "same"})
    (r,) = process_spool(home, store, settle_s=0)
    assert (r.report.added, r.report.duplicates) == (0, 1)
    assert r.moved_to == home.done / "f.jsonl.1"
    assert (home.done / "f.jsonl").is_file()


def test_purge_processed(home, store):
    drop(home, "g.jsonl", {"prompt": "x"})
    drop(home, "h.jsonl", raw=b"bad\n")
    process_spool(home, store, settle_s=0)
    assert purge_processed(home, before=0) == 0
    assert purge_processed(home) == 3  # g, h and h's reason file
    assert not any(home.done.iterdir()) and not any(home.rejected.iterdir())
