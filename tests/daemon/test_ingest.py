"""Ingestion: every bad-input case gets its own message, good rows are kept, stored data is untouched."""

from __future__ import annotations

import io
import json

import pytest

import daemon.store
from daemon.home import Home
from daemon.ingest import Collector, IngestError, InvalidItem, ingest_file, ingest_lines, ingest_stream
from daemon.settings import write_default_settings
from daemon.store import Store
from edge_unisd.items import IngestRow


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "db.sqlite") as s:
        yield s


def jl(*objs) -> bytes:
    return b"".join((o if isinstance(o, bytes) else json.dumps(o).encode()) + b"\n" for o in objs)


def snapshot(store):
    return [(i.id, i.messages, i.context, i.reference, i.extra["received_at"]) for i in store.get_items()]


BAD_CASES = [  # (line bytes, expected fragment of the reason)
    (b"not json", "invalid JSON"),
    (b'{"prompt": "unterminated', "invalid JSON"),
    (b"[1, 2]", "expected a JSON object, got a list"),
    (b'"just a string"', "expected a JSON object, got a string"),
    (b'{"prompt": 5}', "prompt must be a string or a list of {role, content} messages, got a number"),
    (b'{"prompt": "x", "context": 7}', "context: a valid string expected, got a number"),
    (b'{"prompt": "x", "tags": ["a"]}', "unknown key 'tags' (allowed: prompt, context, reference"),
    (b'{"context": "x"}', "missing required key 'prompt'"),
    (b'{"prompt": "   "}', "prompt is empty"),
    (b'{"prompt": []}', "prompt is an empty list of messages"),
    (b'{"prompt": [{"role": "bot", "content": "x"}]}', "prompt[0].role: Input should be 'system', 'user'"),
    (b'{"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}',
     "last message of a chat prompt must have role 'user'"),
    (json.dumps({"prompt": "SECRET" * 6000}).encode(), "prompt is 36000 characters; the limit is 32000"),
    (json.dumps({"prompt": "x", "reference": "SECRET" * 6000}).encode(),
     "reference is 36000 characters; the limit is 32000"),
    (b'{"prompt": "caf\xe9"}', "invalid UTF-8 at byte 16 of the line"),
    (b"[" * 100_000, "nested too deeply"),
]


def test_each_bad_row_gets_its_reason_and_good_rows_are_kept(store, tmp_path):
    store.add_items([IngestRow(prompt="earlier", reference="kept as is")])
    store.record_rollout(store.get_items()[0].id, "earlier completion")
    before = snapshot(store)

    lines = [jl({"prompt": "good one"})]
    for bad, _ in BAD_CASES:
        lines.append(bad + b"\n")
    lines.append(jl({"prompt": [{"role": "user", "content": "good chat"}], "context": "c", "id": "chat-1"}))
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"".join(lines))

    report = ingest_file(store, path)
    assert (report.rows, report.added, report.duplicates, report.rejected) == (len(BAD_CASES) + 2, 2, 0,
                                                                               len(BAD_CASES))
    for error, (_, expected) in zip(report.errors, BAD_CASES, strict=True):
        assert expected in error.reason, (error, expected)
    assert [e.line for e in report.errors] == list(range(2, len(BAD_CASES) + 2))
    assert all("SECRET" not in e.reason for e in report.errors)  # no prompt text in messages
    assert snapshot(store)[:1] == before
    assert len(store.rollouts_for(before[0][0])) == 1
    assert [i.prompt_text for i in store.get_items()] == ["earlier", "good one", "good chat"]
    assert store.get_items(["chat-1"])[0].context == "c"


def test_duplicates_against_the_store_and_within_the_file(store):
    ingest_lines(store, [json.dumps({"prompt": "a"})], "first")
    report = ingest_lines(store, [json.dumps({"prompt": "a"}), json.dumps({"prompt": "b"}),
                                  json.dumps({"prompt": "b"})], "second")
    assert (report.added, report.duplicates, report.rejected) == (1, 2, 0)
    assert store.count_items().total == 2


def test_id_taken_by_another_item_is_a_row_error(store):
    ingest_lines(store, [json.dumps({"prompt": "a", "id": "n1"})], "first")
    report = ingest_lines(store, ["", json.dumps({"prompt": "b", "id": "n1"})], "second")
    assert [(e.line, "already used" in e.reason) for e in report.errors] == [(2, True)]
    assert store.get_items(["n1"])[0].prompt_text == "a"


def test_blank_lines_bom_and_crlf(store):
    data = b"\xef\xbb\xbf" + jl({"prompt": "one"}).replace(b"\n", b"\r\n") + b"\n  \n" + jl({"prompt": "two"})
    report = ingest_stream(store, io.BytesIO(data), "s")
    assert (report.rows, report.added, report.rejected) == (2, 2, 0)


def test_a_too_long_line_is_skipped_without_reading_it_into_memory(store):
    data = jl({"prompt": "before"}) + b'{"prompt": "' + b"x" * 5000 + b'"}\n' + jl({"prompt": "after"})
    report = ingest_stream(store, io.BytesIO(data), "s", max_line_bytes=1000)
    assert [str(e) for e in report.errors] == ["line 2: line is longer than the 1000 bytes limit"]
    assert [i.prompt_text for i in store.get_items()] == ["before", "after"]


def test_gigantic_file_is_refused_whole(store, tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_bytes(jl(*[{"prompt": f"p{i}"} for i in range(200)]))
    with pytest.raises(IngestError, match=r"over the 1000 bytes limit; nothing was stored. Split it"):
        ingest_file(store, path, max_file_bytes=1000)
    with pytest.raises(IngestError, match=r"stdin is larger than the 1000 bytes limit"):  # a pipe: no size
        ingest_stream(store, io.BytesIO(path.read_bytes()), "stdin", max_file_bytes=1000)
    assert store.count_items().total == 0


def test_missing_file_and_directory(store, tmp_path):
    with pytest.raises(IngestError, match="no such file"):
        ingest_file(store, tmp_path / "nope.jsonl")
    with pytest.raises(IngestError, match="is a directory"):
        ingest_file(store, tmp_path)


def test_stdin_dash(store, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(jl({"prompt": "from a pipe"}))))
    report = ingest_file(store, "-")
    assert (report.source, report.added) == ("stdin", 1)


def test_a_failure_while_storing_loses_only_that_file(store, tmp_path, monkeypatch):
    (tmp_path / "a.jsonl").write_bytes(jl({"prompt": "a1"}, {"prompt": "a2"}))
    ingest_file(store, tmp_path / "a.jsonl")
    calls = {"n": 0}
    real_hash = daemon.store.content_hash

    def crash_on_third(row):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        return real_hash(row)

    monkeypatch.setattr(daemon.store, "content_hash", crash_on_third)
    (tmp_path / "b.jsonl").write_bytes(jl({"prompt": "b1"}, {"prompt": "b2"}, {"prompt": "b3"}))
    with pytest.raises(OSError):
        ingest_file(store, tmp_path / "b.jsonl")
    assert [i.prompt_text for i in store.get_items()] == ["a1", "a2"]  # all of a, none of b


def test_held_out_fraction_is_passed_through(store):
    lines = [json.dumps({"prompt": f"q{i}", "reference": "r"}) for i in range(30)]
    ingest_lines(store, lines, "s", held_out_fraction=0.5)
    assert 0 < store.count_items().held_out < 30


# --- the Python API

@pytest.fixture
def home(tmp_path):
    home = Home(tmp_path / "home").create()
    write_default_settings(home.settings)
    Store.open(home).close()
    return home


def test_collector_add(home):
    with Collector(home, source="my-editor") as c:
        first = c.add(prompt="rename this variable", reference="done")
        assert c.add(prompt="rename this variable", reference="done") == first  # duplicate: same id
        assert c.add(prompt=[{"role": "user", "content": "hi"}], id="chat") == "chat"
        with pytest.raises(InvalidItem, match="prompt is empty"):
            c.add(prompt="")
        with pytest.raises(InvalidItem, match="context: a valid string expected"):
            c.add(prompt="x", context=3)
        with pytest.raises(InvalidItem, match="already used by a different item"):
            c.add(prompt="different", id="chat")
        report = c.add_many([{"prompt": "m1"}, {"prompt": 1}, {"prompt": "m2", "oops": 1}])
    assert (report.added, report.rejected) == (1, 2)
    assert [e.line for e in report.errors] == [2, 3]
    with Store.open(home) as s:
        items = s.get_items()
    assert [i.source for i in items] == ["my-editor", "my-editor", "my-editor"]


def test_collector_needs_an_initialised_home(tmp_path):
    from daemon.home import HomeError

    with pytest.raises(HomeError, match="edge-unisd init"):
        Collector(tmp_path / "nothing")
