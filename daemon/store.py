"""The daemon's memory: one SQLite file in the home, through SQLAlchemy 2's typed ORM.

Why these settings: WAL lets an `edge-unisd ingest` in another process write while a round reads
and writes; every write transaction starts with BEGIN IMMEDIATE so two writers queue on the busy
timeout instead of failing with "database is locked" when one upgrades a read lock; foreign keys
make `forget` cascade to everything derived from an item; synchronous=FULL so an acknowledged
prompt survives a crash or power cut. The schema carries a version and upgrades step by step.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Connection,
    DateTime,
    Engine,
    Float,
    ForeignKey,
    Integer,
    Select,
    String,
    Text,
    TypeDecorator,
    create_engine,
    delete,
    event,
    func,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.exc import DatabaseError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from edge_unisd.items import IngestRow, Item, content_hash

BUSY_TIMEOUT_MS = 30_000
TRAINED_STATUSES = ("done",)  # a round with this status has trained on its items


class StoreError(RuntimeError):
    """The database cannot be opened or upgraded; the message names the file and what to do."""


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class UTCDateTime(TypeDecorator):
    """Aware UTC datetimes in, aware UTC datetimes out (SQLite has no time zones)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; pass an aware one (UTC)")
        return value.astimezone(dt.timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        return None if value is None else value.replace(tzinfo=dt.timezone.utc)


# --- schema

class Base(DeclarativeBase):
    pass


class SchemaVersion(Base):
    __tablename__ = "schema_version"
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    applied_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class Meta(Base):
    """Small facts about this home (e.g. the base model recorded by `init`)."""

    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(String(100), primary_key=True)
    value: Mapped[Any] = mapped_column(JSON)


class ItemRow(Base):
    __tablename__ = "items"
    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, unique=True)  # arrival order, also within one batch
    messages: Mapped[list] = mapped_column(JSON)
    context: Mapped[str | None] = mapped_column(Text)
    reference: Mapped[str | None] = mapped_column(Text)
    rejected: Mapped[str | None] = mapped_column(Text)
    source: Mapped[str | None] = mapped_column(String(200))
    content_hash: Mapped[str] = mapped_column(String(64), unique=True)
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True)
    held_out: Mapped[bool] = mapped_column(Boolean, default=False)


class Profile(Base):
    __tablename__ = "profile"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)  # always 1: a single row
    text: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class Rollout(Base):
    __tablename__ = "rollouts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    item_id: Mapped[str] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), index=True)
    completion: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    adapter_version: Mapped[str | None] = mapped_column(String(100))


class Round(Base):
    __tablename__ = "rounds"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    ended_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    status: Mapped[str] = mapped_column(String(20), index=True)  # running | done | failed | interrupted
    preset: Mapped[str | None] = mapped_column(String(64))
    n_items: Mapped[int] = mapped_column(Integer, default=0)
    metrics: Mapped[dict | None] = mapped_column(JSON)
    cost: Mapped[dict | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    adapter_version: Mapped[str | None] = mapped_column(String(100))  # the version this round produced


class RoundItem(Base):
    __tablename__ = "round_items"
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id", ondelete="CASCADE"), primary_key=True)
    item_id: Mapped[str] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), primary_key=True,
                                         index=True)


class AdapterVersionRow(Base):
    __tablename__ = "adapter_versions"
    version: Mapped[str] = mapped_column(String(100), primary_key=True)
    path: Mapped[str] = mapped_column(Text)
    parent: Mapped[str | None] = mapped_column(String(100))
    status: Mapped[str] = mapped_column(String(20))
    created: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    metrics: Mapped[dict | None] = mapped_column(JSON)
    trained_on_forgotten: Mapped[bool] = mapped_column(Boolean, default=False)


class LedgerEntry(Base):
    __tablename__ = "ledger"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    round_id: Mapped[int | None] = mapped_column(ForeignKey("rounds.id", ondelete="CASCADE"), index=True)
    predicted: Mapped[float | None] = mapped_column(Float)
    spent: Mapped[float | None] = mapped_column(Float)
    gates: Mapped[dict | None] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


# --- migrations: MIGRATIONS[v] takes a database at version v-1 to version v. Append, never edit.

def _v1_baseline(conn: Connection) -> None:
    Base.metadata.create_all(conn)


MIGRATIONS: dict[int, Callable[[Connection], None]] = {1: _v1_baseline}


def schema_version(conn: Connection) -> int:
    if not inspect(conn).has_table("schema_version"):
        return 0
    return conn.execute(select(func.max(SchemaVersion.version))).scalar() or 0


def migrate(engine: Engine, migrations: dict[int, Callable[[Connection], None]] = MIGRATIONS,
            where: str = "the database") -> int:
    """Bring the schema up to the newest version, one step per transaction. Returns the version."""
    latest = max(migrations)
    with engine.connect().execution_options(begin="IMMEDIATE") as conn:
        with conn.begin():
            current = schema_version(conn)
            if current > latest:
                raise StoreError(f"{where} has schema version {current}, newer than this edge-unisd knows "
                                 f"({latest}); upgrade edge-unisd")
            if current == 0 and not inspect(conn).has_table("items"):
                Base.metadata.create_all(conn)  # fresh: the current schema in one go
                conn.execute(SchemaVersion.__table__.insert().values(version=latest, applied_at=utcnow()))
                return latest
        for version in range(current + 1, latest + 1):
            with conn.begin():
                if schema_version(conn) >= version:  # another process upgraded meanwhile
                    continue
                migrations[version](conn)
                conn.execute(SchemaVersion.__table__.insert().values(version=version, applied_at=utcnow()))
    return latest


# --- records handed out (plain data, no session attached)

@dataclass(frozen=True)
class AddResult:
    """What `add_items` did with each row, in order: "added", "duplicate", or an error message."""

    added: int
    duplicates: int
    outcomes: list[str]
    item_ids: list[str | None]


@dataclass(frozen=True)
class ItemCounts:
    total: int
    pending: int
    held_out: int


@dataclass(frozen=True)
class RoundRecord:
    id: int
    started_at: dt.datetime
    ended_at: dt.datetime | None
    status: str
    preset: str | None
    n_items: int
    metrics: dict | None
    cost: dict | None
    error: str | None
    adapter_version: str | None

    def to_dict(self) -> dict[str, Any]:
        d = self.__dict__.copy()
        d["started_at"] = self.started_at.isoformat()
        d["ended_at"] = self.ended_at.isoformat() if self.ended_at else None
        return d


@dataclass(frozen=True)
class AdapterVersionRecord:
    version: str
    path: str
    parent: str | None
    status: str
    created: dt.datetime
    metrics: dict | None
    trained_on_forgotten: bool

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "created": self.created.isoformat()}


@dataclass(frozen=True)
class RolloutRecord:
    id: int
    item_id: str
    completion: str
    created_at: dt.datetime
    adapter_version: str | None


@dataclass(frozen=True)
class ForgetReport:
    items: int
    rollouts: int
    marked_versions: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"items": self.items, "rollouts": self.rollouts, "marked_versions": self.marked_versions}


def _record(cls: type, row: Base) -> Any:
    return cls(**{f: getattr(row, f) for f in cls.__dataclass_fields__})


def _item(row: ItemRow) -> Item:
    return Item(id=row.id, messages=tuple(row.messages), context=row.context, reference=row.reference,
                rejected=row.rejected, source=row.source,
                extra={"received_at": row.received_at, "held_out": row.held_out,
                       "content_hash": row.content_hash})


def _held_out(row: IngestRow, digest: str, fraction: float) -> bool:
    """Deterministic by content hash; only items with a reference can measure fit on the gate."""
    return row.reference is not None and int(digest[:8], 16) / 0x1_0000_0000 < fraction


# --- the store

class Store:
    """All reads and writes of the daemon's database. Several processes may each open their own Store on
    the same file at once; a Store is not carried across fork (a round's child process opens its own)."""

    def __init__(self, db_path: str | os.PathLike, *, busy_timeout_ms: int = BUSY_TIMEOUT_MS):
        self.path = Path(db_path)
        if not self.path.parent.is_dir():
            raise StoreError(f"cannot open the database {self.path}: its directory does not exist; "
                             "run `edge-unisd init` first")
        # Create the file 0600 before SQLite does (it would use the umask); -wal/-shm copy its mode.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        os.chmod(self.path, 0o600)
        self.engine = create_engine(f"sqlite:///{self.path}",
                                    connect_args={"timeout": busy_timeout_ms / 1000})
        _install_pragmas(self.engine, busy_timeout_ms)
        self._writer = self.engine.execution_options(begin="IMMEDIATE")
        try:
            self.schema_version = migrate(self.engine, where=str(self.path))
        except DatabaseError as e:  # locked past the timeout, not a database, read-only, ...
            self.engine.dispose()
            raise StoreError(f"cannot open the database {self.path}: {e.orig}") from e
        except BaseException:
            self.engine.dispose()
            raise

    @classmethod
    def open(cls, home: Any) -> Store:
        """The store of a `daemon.home.Home`."""
        return cls(home.db)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[Session]:
        """One write transaction (BEGIN IMMEDIATE): committed on success, rolled back on error."""
        with Session(self._writer, expire_on_commit=False) as s, s.begin():
            yield s

    @contextlib.contextmanager
    def _read(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as s, s.begin():
            yield s

    # --- meta
    def set_meta(self, key: str, value: Any) -> None:
        with self._write() as s:
            s.merge(Meta(key=key, value=value))

    def get_meta(self, key: str, default: Any = None) -> Any:
        with self._read() as s:
            row = s.get(Meta, key)
            return default if row is None else row.value

    # --- items
    def add_items(self, rows: Iterable[IngestRow], *, source: str | None = None,
                  held_out_fraction: float = 0.0, received_at: dt.datetime | None = None) -> AddResult:
        """Store validated rows in one transaction. Same content hash -> a duplicate, counted, not stored.

        A row whose explicit `id` already names a different item is refused (its outcome says so);
        nothing already stored is ever changed. `source` is used for rows that do not name one.
        """
        received_at = received_at or utcnow()
        outcomes: list[str] = []
        ids: list[str | None] = []
        added = duplicates = 0
        with self._write() as s:  # BEGIN IMMEDIATE: no other writer can take the same seq
            seq = s.scalar(select(func.max(ItemRow.seq))) or 0
            for row in rows:
                digest = content_hash(row)
                existing = s.scalar(select(ItemRow.id).where(ItemRow.content_hash == digest))
                if existing is not None:
                    duplicates += 1
                    outcomes.append("duplicate")
                    ids.append(existing)
                    continue
                item_id = row.id or digest[:16]
                if s.get(ItemRow, item_id) is not None:
                    outcomes.append(f"id {item_id!r} is already used by a different item; "
                                    "give this row another id (or none)")
                    ids.append(None)
                    continue
                seq += 1
                s.add(ItemRow(id=item_id, seq=seq, messages=row.messages(), context=row.context,
                              reference=row.reference, rejected=row.rejected, source=row.source or source,
                              content_hash=digest, received_at=received_at,
                              held_out=_held_out(row, digest, held_out_fraction)))
                s.flush()  # so a later row of the same batch sees this one
                added += 1
                outcomes.append("added")
                ids.append(item_id)
        return AddResult(added=added, duplicates=duplicates, outcomes=outcomes, item_ids=ids)

    def get_items(self, ids: Sequence[str] | None = None, *, limit: int | None = None,
                  newest_first: bool = False) -> list[Item]:
        """Items by id (missing ids are skipped) or all, oldest first. `extra` has received_at, held_out."""
        q = select(ItemRow)
        if ids is not None:
            q = q.where(ItemRow.id.in_(list(ids)))
        q = q.order_by(ItemRow.seq.desc() if newest_first else ItemRow.seq)
        if limit is not None:
            q = q.limit(limit)
        with self._read() as s:
            return [_item(r) for r in s.scalars(q)]

    def _trained_ids(self) -> Select:  # subquery: items some finished round trained on
        return (select(RoundItem.item_id).join(Round, Round.id == RoundItem.round_id)
                .where(Round.status.in_(TRAINED_STATUSES)))

    def pending_items(self, limit: int | None = None) -> list[Item]:
        """Training items no finished round has used yet, oldest first."""
        q = (select(ItemRow).where(ItemRow.held_out.is_(False), ItemRow.id.not_in(self._trained_ids()))
             .order_by(ItemRow.seq).limit(limit))
        with self._read() as s:
            return [_item(r) for r in s.scalars(q)]

    def held_out_items(self) -> list[Item]:
        with self._read() as s:
            return [_item(r) for r in s.scalars(select(ItemRow).where(ItemRow.held_out.is_(True))
                                               .order_by(ItemRow.seq))]

    def count_items(self) -> ItemCounts:
        with self._read() as s:
            total = s.scalar(select(func.count()).select_from(ItemRow)) or 0
            held = s.scalar(select(func.count()).where(ItemRow.held_out.is_(True))) or 0
            pending = s.scalar(select(func.count()).where(
                ItemRow.held_out.is_(False), ItemRow.id.not_in(self._trained_ids()))) or 0
        return ItemCounts(total=total, pending=pending, held_out=held)

    def items_for_training(self, max_items: int, *, replay_fraction: float = 0.0,
                           seed: int = 0) -> list[Item]:
        """Up to `max_items`: pending items first (oldest first), then a seeded random replay of trained ones.

        `replay_fraction` of the slots is reserved for replay when enough pending items exist.
        Held-out items are never returned.
        """
        n_replay = int(round(max_items * replay_fraction))
        fresh = self.pending_items(limit=max_items - n_replay if n_replay else max_items)
        slots = max_items - len(fresh)
        if slots <= 0:
            return fresh
        with self._read() as s:
            trained = list(s.scalars(select(ItemRow).where(ItemRow.held_out.is_(False),
                                                           ItemRow.id.in_(self._trained_ids()))
                                     .order_by(ItemRow.seq)))
        replay = random.Random(seed).sample(trained, min(slots, len(trained)))
        return fresh + [_item(r) for r in replay]

    def set_held_out(self, ids: Sequence[str], held_out: bool = True) -> int:
        with self._write() as s:
            q = update(ItemRow).where(ItemRow.id.in_(list(ids))).values(held_out=held_out)
            return s.execute(q).rowcount

    def set_item_reference(self, item_id: str, text_: str) -> None:
        """The user's own answer to an item (e.g. a correction sent to `serve`). Raises KeyError if unknown."""
        with self._write() as s:
            if not s.execute(update(ItemRow).where(ItemRow.id == item_id).values(reference=text_)).rowcount:
                raise KeyError(f"no item {item_id!r} (forgotten?)")

    def set_item_rejected(self, item_id: str, text_: str) -> None:
        """An answer the user rejected (the contrastive negative view). Raises KeyError if unknown."""
        with self._write() as s:
            if not s.execute(update(ItemRow).where(ItemRow.id == item_id).values(rejected=text_)).rowcount:
                raise KeyError(f"no item {item_id!r} (forgotten?)")

    # --- profile
    def set_profile(self, text_: str) -> None:
        with self._write() as s:
            s.merge(Profile(id=1, text=text_, updated_at=utcnow()))

    def clear_profile(self) -> None:
        with self._write() as s:
            s.execute(delete(Profile))

    def get_profile(self) -> str | None:
        with self._read() as s:
            row = s.get(Profile, 1)
            return None if row is None else row.text

    def profile_updated_at(self) -> dt.datetime | None:
        with self._read() as s:
            row = s.get(Profile, 1)
            return None if row is None else row.updated_at

    # --- rollouts
    def record_rollout(self, item_id: str, completion: str, adapter_version: str | None = None) -> int:
        """Keep a completion of an item (deleted with the item). Raises KeyError for an unknown item."""
        with self._write() as s:
            if s.get(ItemRow, item_id) is None:
                raise KeyError(f"no item {item_id!r} (forgotten?)")
            r = Rollout(item_id=item_id, completion=completion, created_at=utcnow(),
                        adapter_version=adapter_version)
            s.add(r)
            s.flush()
            return r.id

    def rollouts_for(self, item_id: str) -> list[RolloutRecord]:
        with self._read() as s:
            rows = s.scalars(select(Rollout).where(Rollout.item_id == item_id).order_by(Rollout.id))
            return [_record(RolloutRecord, r) for r in rows]

    def count_rollouts(self) -> int:
        with self._read() as s:
            return s.scalar(select(func.count()).select_from(Rollout)) or 0

    # --- rounds
    def start_round(self, item_ids: Sequence[str], *, preset: str | None = None) -> int:
        """Record a round as running with the items it will train on (ids no longer stored are skipped)."""
        with self._write() as s:
            present = list(s.scalars(select(ItemRow.id).where(ItemRow.id.in_(list(item_ids)))))
            r = Round(started_at=utcnow(), status="running", preset=preset, n_items=len(present))
            s.add(r)
            s.flush()
            s.add_all(RoundItem(round_id=r.id, item_id=i) for i in present)
            return r.id

    def finish_round(self, round_id: int, status: str, *, metrics: dict | None = None,
                     cost: dict | None = None, error: str | None = None,
                     adapter_version: str | None = None) -> None:
        """Close a round: status "done" (its items count as trained), "failed" or "interrupted"."""
        with self._write() as s:
            r = s.get(Round, round_id)
            if r is None:
                raise KeyError(f"no round {round_id}")
            r.status, r.ended_at, r.metrics, r.cost, r.error = status, utcnow(), metrics, cost, error
            r.adapter_version = adapter_version
            # if forgotten items were used mid-round, the version carries them: mark it
            if adapter_version and r.n_items > _count_round_items(s, round_id):
                _mark_versions(s, {adapter_version})

    def last_round(self) -> RoundRecord | None:
        with self._read() as s:
            r = s.scalars(select(Round).order_by(Round.id.desc()).limit(1)).first()
            return None if r is None else _record(RoundRecord, r)

    def unfinished_rounds(self) -> list[RoundRecord]:
        """Rounds still "running": after a crash, the daemon resumes or closes them."""
        with self._read() as s:
            rows = s.scalars(select(Round).where(Round.status == "running").order_by(Round.id))
            return [_record(RoundRecord, r) for r in rows]

    def round_item_ids(self, round_id: int) -> list[str]:
        with self._read() as s:
            return list(s.scalars(select(RoundItem.item_id).where(RoundItem.round_id == round_id)
                                  .order_by(RoundItem.item_id)))

    # --- adapter versions and the ledger
    def add_adapter_version(self, version: str, path: str | os.PathLike, *, parent: str | None = None,
                            status: str = "candidate", metrics: dict | None = None,
                            created: dt.datetime | None = None) -> None:
        with self._write() as s:
            s.add(AdapterVersionRow(version=version, path=str(path), parent=parent, status=status,
                                    created=created or utcnow(), metrics=metrics,
                                    trained_on_forgotten=_is_tainted(s, version, parent)))

    def set_adapter_status(self, version: str, status: str, metrics: dict | None = None) -> None:
        with self._write() as s:
            row = s.get(AdapterVersionRow, version)
            if row is None:
                raise KeyError(f"no adapter version {version!r}")
            row.status = status
            if metrics is not None:
                row.metrics = metrics

    def adapter_versions(self) -> list[AdapterVersionRecord]:
        with self._read() as s:
            rows = s.scalars(select(AdapterVersionRow).order_by(AdapterVersionRow.created,
                                                                AdapterVersionRow.version))
            return [_record(AdapterVersionRecord, r) for r in rows]

    def record_ledger(self, round_id: int | None, *, predicted: float | None, spent: float | None,
                      gates: dict | None = None) -> int:
        with self._write() as s:
            e = LedgerEntry(round_id=round_id, predicted=predicted, spent=spent, gates=gates,
                            created_at=utcnow())
            s.add(e)
            s.flush()
            return e.id

    # --- forgetting
    def forget(self, *, ids: Sequence[str] | None = None, before: dt.datetime | None = None,
               all: bool = False) -> ForgetReport:
        """Delete items (by id, received before a time, or all) and their rollouts; mark adapter versions
        trained on them (and their descendants) `trained_on_forgotten`, so they can be retrained without."""
        if sum(x is not None and x is not False for x in (ids, before, all)) != 1:
            raise ValueError("forget takes exactly one of ids=, before=, all=True")
        if before is not None and before.tzinfo is None:
            raise ValueError("forget(before=) needs an aware datetime")
        where = (ItemRow.id.in_(list(ids)) if ids is not None
                 else ItemRow.received_at < before if before is not None else text("1=1"))
        with self._write() as s:
            doomed = select(ItemRow.id).where(where)
            versions = set(s.scalars(
                select(Round.adapter_version).join(RoundItem, RoundItem.round_id == Round.id)
                .where(RoundItem.item_id.in_(doomed), Round.adapter_version.is_not(None))))
            n_rollouts = s.scalar(select(func.count()).where(Rollout.item_id.in_(doomed))) or 0
            n_items = s.execute(delete(ItemRow).where(where)).rowcount  # rollouts, round_items cascade
            marked = _mark_versions(s, versions)
        return ForgetReport(items=n_items, rollouts=n_rollouts, marked_versions=marked)


def _count_round_items(s: Session, round_id: int) -> int:
    return s.scalar(select(func.count()).where(RoundItem.round_id == round_id)) or 0


def _is_tainted(s: Session, version: str, parent: str | None) -> bool:
    """A new version carries forgotten data if its parent does or its round lost items while running."""
    parent_row = s.get(AdapterVersionRow, parent) if parent else None
    if parent_row is not None and parent_row.trained_on_forgotten:
        return True
    for r in s.scalars(select(Round).where(Round.adapter_version == version)):
        if r.n_items > _count_round_items(s, r.id):
            return True
    return False


def _mark_versions(s: Session, versions: set[str]) -> list[str]:
    """Mark `versions` and every descendant (a child inherits its parent's training). Returns all marked."""
    marked: set[str] = set()
    frontier = set(versions)
    while frontier:
        marked |= frontier
        frontier = set(s.scalars(select(AdapterVersionRow.version)
                                 .where(AdapterVersionRow.parent.in_(frontier)))) - marked
    if marked:
        s.execute(update(AdapterVersionRow).where(AdapterVersionRow.version.in_(marked))
                  .values(trained_on_forgotten=True))
    return sorted(marked)


def _install_pragmas(engine: Engine, busy_timeout_ms: int) -> None:
    """Per-connection pragmas, and our own BEGIN (pysqlite's implicit one cannot be IMMEDIATE)."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves, below
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = FULL")
        cur.execute("PRAGMA foreign_keys = ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get("begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")
