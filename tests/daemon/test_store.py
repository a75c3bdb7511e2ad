"""The SQLite store: pragmas, privacy, dedup, pending, forget, schema upgrades, concurrent writers."""

from __future__ import annotations

import datetime as dt
import os
import stat
import subprocess
import sys
import textwrap

import pytest
from sqlalchemy import create_engine, inspect, text

from daemon.store import MIGRATIONS, Store, StoreError, migrate, schema_version
from edge_unisd.items import IngestRow, Item


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "db.sqlite") as s:
        yield s


def rows(*prompts, **kw):
    return [IngestRow(prompt=p, **kw) for p in prompts]


def test_pragmas_and_private_files(store):
    with store.engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert c.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert c.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000
        assert c.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    store.add_items(rows("a"))
    files = [p for p in store.path.parent.iterdir() if p.name.startswith(store.path.name)]
    assert {p.name for p in files} >= {"db.sqlite", "db.sqlite-wal"}
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p


def test_duplicates_counted_not_stored_and_ids_never_overwritten(store):
    first = store.add_items(rows("hello", "hello", "bye"))
    assert (first.added, first.duplicates) == (2, 1)
    assert first.item_ids[0] == first.item_ids[1]
    again = store.add_items(rows("hello") + [IngestRow(prompt="other", id=first.item_ids[2])])
    assert (again.added, again.duplicates) == (0, 1)
    assert "already used by a different item" in again.outcomes[1]
    assert [i.prompt_text for i in store.get_items()] == ["hello", "bye"]
    assert store.count_items().total == 2


def test_items_round_trip_as_method_items(store):
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q"}]
    store.add_items([IngestRow(prompt=chat, context="ctx", reference="ref", rejected="bad", id="x1")],
                    source="cli")
    (item,) = store.get_items(["x1"])
    assert isinstance(item, Item)
    assert item.messages == ({"role": "system", "content": "be brief"}, {"role": "user", "content": "q"})
    assert (item.context, item.reference, item.rejected, item.source) == ("ctx", "ref", "bad", "cli")
    assert item.extra["received_at"].tzinfo is not None


def test_pending_means_not_trained_by_a_finished_round(store):
    ids = store.add_items(rows("a", "b", "c")).item_ids
    failed = store.start_round([ids[0]], preset="edge")
    store.finish_round(failed, "failed", error="oom")
    assert store.count_items().pending == 3
    done = store.start_round(ids[:2], preset="edge")
    assert store.count_items().pending == 3  # still running: not trained yet
    store.finish_round(done, "done", metrics={"loss": 1.0}, adapter_version="v1")
    assert [i.id for i in store.pending_items()] == [ids[2]]
    assert store.count_items().pending == 1
    last = store.last_round()
    assert (last.id, last.status, last.n_items, last.metrics, last.adapter_version) == (done, "done", 2,
                                                                                         {"loss": 1.0}, "v1")


def test_held_out_items_are_deterministic_and_never_trained(store):
    with_ref = [IngestRow(prompt=f"q{i}", reference=f"a{i}") for i in range(40)]
    res = store.add_items(with_ref + rows("no reference"), held_out_fraction=0.5)
    held = {i.id for i in store.held_out_items()}
    assert 5 < len(held) < 35 and res.item_ids[-1] not in held
    assert not held & {i.id for i in store.items_for_training(100)}
    counts = store.count_items()
    assert counts.pending == counts.total - counts.held_out == 41 - len(held)


def test_items_for_training_new_first_then_seeded_replay(store):
    old = store.add_items(rows("o1", "o2", "o3")).item_ids
    r = store.start_round(old)
    store.finish_round(r, "done")
    new = store.add_items(rows("n1", "n2", "n3")).item_ids
    picked = store.items_for_training(4, replay_fraction=0.25, seed=1)
    assert [i.id for i in picked[:3]] == new and picked[3].id in old
    assert picked == store.items_for_training(4, replay_fraction=0.25, seed=1)
    assert [i.id for i in store.items_for_training(2)] == new[:2]


def test_profile(store):
    assert store.get_profile() is None
    store.set_profile("I write Rust.")
    store.set_profile("I write Rust and Go.")
    assert store.get_profile() == "I write Rust and Go."
    store.clear_profile()
    assert store.get_profile() is None


def test_forget_deletes_derived_rows_and_marks_versions(store):
    a, b, c = store.add_items(rows("a", "b", "c")).item_ids
    for i in (a, a, b):
        store.record_rollout(i, "completion")
    r1 = store.start_round([a, b])
    store.finish_round(r1, "done", adapter_version="v1")
    store.add_adapter_version("v1", "/ad/v1", status="promoted")
    store.add_adapter_version("v2", "/ad/v2", parent="v1")
    r3 = store.start_round([c])
    store.finish_round(r3, "done", adapter_version="v3")
    store.add_adapter_version("v3", "/ad/v3")

    report = store.forget(ids=[a])
    assert (report.items, report.rollouts, report.marked_versions) == (1, 2, ["v1", "v2"])
    assert store.rollouts_for(a) == [] and len(store.rollouts_for(b)) == 1
    assert store.round_item_ids(r1) == [b]
    marks = {v.version: v.trained_on_forgotten for v in store.adapter_versions()}
    assert marks == {"v1": True, "v2": True, "v3": False}
    with pytest.raises(KeyError):
        store.record_rollout(a, "late")  # a round still holding the item cannot resurrect it

    report = store.forget(all=True)
    assert (report.items, report.rollouts) == (2, 1)
    assert store.count_items().total == 0 and store.count_rollouts() == 0
    assert {v.trained_on_forgotten for v in store.adapter_versions()} == {True}


def test_forget_before_a_time(store):
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    store.add_items(rows("old"), received_at=t0)
    store.add_items(rows("new"), received_at=t0 + dt.timedelta(days=2))
    assert store.forget(before=t0 + dt.timedelta(days=1)).items == 1
    assert [i.prompt_text for i in store.get_items()] == ["new"]
    with pytest.raises(ValueError):
        store.forget(ids=["x"], all=True)


def test_item_forgotten_while_its_round_runs_marks_the_new_version(store):
    a, b = store.add_items(rows("a", "b")).item_ids
    r = store.start_round([a, b])
    store.forget(ids=[a])  # the running round already read it
    store.finish_round(r, "done", adapter_version="v1")
    store.add_adapter_version("v1", "/ad/v1")
    assert store.adapter_versions()[0].trained_on_forgotten


def test_ledger(store):
    r = store.start_round([])
    assert store.record_ledger(r, predicted=60.0, spent=58.5, gates={"ac_power": True}) == 1


# --- schema versions

def test_fresh_database_is_at_the_latest_version(store):
    with store.engine.connect() as c:
        assert schema_version(c) == max(MIGRATIONS) == store.schema_version


def test_upgrade_path_runs_each_new_migration_once(tmp_path):
    path = tmp_path / "db.sqlite"
    Store(path).close()  # version 1

    calls = []

    def v2(conn):
        calls.append(2)
        conn.execute(text("ALTER TABLE items ADD COLUMN lang VARCHAR(8)"))

    engine = create_engine(f"sqlite:///{path}")
    assert migrate(engine, {**MIGRATIONS, 2: v2}) == 2
    assert migrate(engine, {**MIGRATIONS, 2: v2}) == 2
    assert calls == [2]
    assert "lang" in {c["name"] for c in inspect(engine).get_columns("items")}
    engine.dispose()
    with pytest.raises(StoreError, match="schema version 2, newer than this edge-unisd knows"):
        Store(path)


def test_a_file_that_is_not_a_database_is_a_clear_error(tmp_path):
    (tmp_path / "db.sqlite").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="cannot open the database .*db.sqlite: file is not a database"):
        Store(tmp_path / "db.sqlite")


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(StoreError, match="run `edge-unisd init`"):
        Store(tmp_path / "nope" / "db.sqlite")


# --- concurrency: an ingest in another process while a round writes

CHILD = textwrap.dedent("""
    import sys
    from daemon.ingest import ingest_lines
    from daemon.store import Store
    store = Store(sys.argv[1])
    for batch in range(60):
        lines = ['{"prompt": "p%d-%d"}' % (batch, i) for i in range(5)]
        report = ingest_lines(store, lines, "child")
        assert report.added == 5, report
    print("ok")
""")


def test_ingestion_in_another_process_while_a_round_writes(tmp_path):
    path = tmp_path / "db.sqlite"
    store = Store(path)
    seed = store.add_items(rows(*[f"s{i}" for i in range(10)])).item_ids
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    rounds = 0
    while child.poll() is None or rounds < 20:
        r = store.start_round(seed, preset="edge")
        for i in seed:
            store.record_rollout(i, f"completion {rounds}", adapter_version=f"v{rounds}")
        store.count_items()
        store.pending_items()
        store.finish_round(r, "done", metrics={"loss": 0.5}, adapter_version=f"v{rounds}")
        store.add_adapter_version(f"v{rounds}", f"/ad/v{rounds}")
        rounds += 1
    out, err = child.communicate()
    assert child.returncode == 0, err
    assert out.strip() == "ok"
    assert store.count_items().total == 10 + 300
    assert store.count_rollouts() == 10 * rounds
    store.close()
