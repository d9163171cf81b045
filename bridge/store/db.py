"""Engines and transactions for SQLite (embedded default) and PostgreSQL (by DSN).

SQLite write transactions start with BEGIN IMMEDIATE so that concurrent writers queue on the
database lock instead of failing mid-transaction with a stale snapshot (the audit chain reads its
head and appends in one transaction). Reads use a second engine with plain deferred transactions.
Within one process the writers of a SQLite store also queue on a Python lock before BEGIN
IMMEDIATE: SQLite's busy handler polls with sleeps of up to 100 ms, so threads that found the
database locked woke late (4 MLLP connections took in fewer messages than one); a lock hands
over at once. Other processes still meet the database lock and its busy timeout.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.exc import OperationalError
from sqlmodel import SQLModel

from bridge.accounts import tables as _account_tables  # noqa: F401
from bridge.consult import tables as _consult_tables  # noqa: F401
from bridge.errors import StoreError
from bridge.fhirstore import tables as _fhir_tables  # noqa: F401
from bridge.local import tables as _local_tables  # noqa: F401
from bridge.mapping import tables as _mapping_tables  # noqa: F401
from bridge.referral import tables as _referral_tables  # noqa: F401
from bridge.results import tables as _results_tables  # noqa: F401

# importing registers every table on SQLModel.metadata
from bridge.store import tables as _tables
from bridge.store.checkpoint import JOURNAL_SIZE_LIMIT, Checkpointer
from bridge.store.hooks import (
    drop_after_commit,
    open_before_commit,
    run_after_commit,
    run_before_commit,
)

#: session advisory lock held while a process creates or upgrades the schema (the audit chain
#: uses 727274; the delivery lanes use the two-int4 key space, which does not overlap)
SCHEMA_LOCK_ID = 727275
R = TypeVar("R")
log = logging.getLogger(__name__)


class _Pending:
    """One caller's work in a group commit, and what came of it."""

    __slots__ = ("done", "error", "value", "work")

    def __init__(self, work: Callable[[Connection], Any]) -> None:
        self.work = work
        self.done = False
        self.value: Any = None
        self.error: BaseException | None = None


#: how long a writer waits for the other writers of its process (SQLite's busy timeout is the
#: same 30 s)
WRITE_LOCK_TIMEOUT_S = 30.0
#: callers of ``write_grouped`` in one transaction at most
MAX_GROUP = 64


def _audit_tables() -> None:
    from bridge.audit import tables as _audit  # noqa: F401


class Store:
    """One node's database: ``write()`` and ``read()`` give transactional connections."""

    def __init__(self, dsn: str, *, synchronous: str = "FULL") -> None:
        self.dsn = dsn
        self.is_sqlite = dsn.startswith("sqlite")
        _audit_tables()
        if self.is_sqlite:
            path = dsn.split("///", 1)[1] if "///" in dsn else ""
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._checkpointer: Checkpointer | None = None
            if path and path != ":memory:":
                # WAL checkpoints on a thread of their own, not in the commit that crosses
                # SQLite's threshold (bridge.store.checkpoint)
                self._checkpointer = Checkpointer(path, self._locked)
            self._writer = self._sqlite_engine(
                dsn,
                immediate=True,
                synchronous=synchronous,
                autocheckpoint=self._checkpointer is None,
            )
            self._reader = self._sqlite_engine(dsn, immediate=False, synchronous=synchronous)
            self._write_lock: threading.RLock | None = threading.RLock()
        else:
            self._write_lock = None
            self._checkpointer = None
            # hide_parameters: a failed statement's error must not carry bodies into the log
            self._writer = create_engine(
                dsn, pool_pre_ping=True, pool_size=8, max_overflow=8, hide_parameters=True
            )
            self._reader = self._writer
        #: ``write_grouped``: the callers waiting for the next group, and the lock its leader
        #: holds (SQLite: the writers' lock; PostgreSQL: one of its own, only grouped writers
        #: take it, every other transaction runs beside them as before)
        self._queue: list[_Pending] = []
        self._queue_guard = threading.Lock()
        self._group_lock: threading.RLock = self._write_lock or threading.RLock()

    @staticmethod
    def _sqlite_engine(
        dsn: str, *, immediate: bool, synchronous: str, autocheckpoint: bool = True
    ) -> Engine:
        engine = create_engine(
            dsn,
            connect_args={"check_same_thread": False, "timeout": 30},
            pool_size=8,
            hide_parameters=True,
        )

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: sqlite3.Connection, _rec: object) -> None:
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
            cur = dbapi_conn.cursor()
            # auto_vacuum must be set before the first table exists; harmless afterwards
            cur.execute("PRAGMA auto_vacuum=INCREMENTAL")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA synchronous={synchronous}")
            cur.execute("PRAGMA foreign_keys=ON")
            if not autocheckpoint:
                cur.execute("PRAGMA wal_autocheckpoint=0")
            cur.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT}")
            cur.close()

        begin = "BEGIN IMMEDIATE" if immediate else "BEGIN"

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            conn.exec_driver_sql(begin)

        return engine

    @property
    def engine(self) -> Engine:
        return self._writer

    def create_all(self) -> None:
        from bridge.fhirstore.schema import upgrade  # indexes and backfill of older stores

        with self._translate(), self._schema_lock():
            SQLModel.metadata.create_all(self._writer)
            upgrade(self)
            from bridge.fhirstore.schema import upgrade_history

            upgrade_history(self)
            from bridge.referral.tables import upgrade_schema as upgrade_threads
            from bridge.store.quarantine import upgrade_schema

            with self._writer.begin() as conn:
                upgrade_schema(conn)
                upgrade_threads(conn)
            with self._writer.begin() as conn:  # stores made before the audit's actor index
                conn.execute(text("CREATE INDEX IF NOT EXISTS ix_audit_actor ON audit (actor)"))
                # ... and before the outbox's and inbox's newer indexes (the receipts a
                # platform returns in one round, the alerts' facts): create_all makes the
                # indexes of new tables only
                for table in (_tables.OUTBOX, _tables.INBOX):
                    for index in sorted(table.indexes, key=lambda ix: str(ix.name)):
                        index.create(conn, checkfirst=True)
                from bridge.messages import ensure_indexes  # the message browser's searches

                ensure_indexes(conn)
        if self.is_sqlite and self._reader is not self._writer:
            # pooled readers opened during the upgrade keep the schema they loaded then until
            # a statement of theirs touches a table: an EXPLAIN would plan without the indexes
            self._reader.dispose()

    @contextmanager
    def _schema_lock(self) -> Iterator[None]:
        """PostgreSQL: one process at a time creates or upgrades the schema (two processes that
        open a new or older store together would both CREATE a missing table and one would fail
        with "type already exists"). SQLite: BEGIN IMMEDIATE already serialises the upgrade."""
        if self.is_sqlite:
            yield
            return
        with self._writer.connect() as conn:
            conn.exec_driver_sql(f"SELECT pg_advisory_lock({SCHEMA_LOCK_ID})")
            conn.commit()
            try:
                yield
            finally:
                conn.exec_driver_sql(f"SELECT pg_advisory_unlock({SCHEMA_LOCK_ID})")
                conn.commit()

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction: committed when the block ends, rolled back on error."""
        with self._translate():
            conn: Connection | None = None
            lock = self._write_lock
            if lock is not None and not lock.acquire(timeout=WRITE_LOCK_TIMEOUT_S):
                raise StoreError("database unavailable: write lock timeout")
            try:
                with self._writer.begin() as conn:
                    open_before_commit(conn)
                    yield conn
                    run_before_commit(conn)  # e.g. the audit rows gathered, chained at once
            except BaseException:
                if conn is not None:
                    drop_after_commit(conn)
                raise
            finally:
                if lock is not None:
                    lock.release()
            if self._checkpointer is not None:
                self._checkpointer.committed()
            run_after_commit(conn)  # e.g. the audit anchor file, once the checkpoint is durable

    def write_grouped(self, work: Callable[[Connection], R]) -> R:
        """``work(conn)`` in a write transaction that may be shared: on SQLite, the calls of
        several threads that arrive while another transaction holds the lock are run together,
        one after another, and committed at once; each caller returns only after that commit.
        One fsync (and one write of the pages they share) for several messages of several
        connections. If one ``work`` raises, the whole transaction is rolled back and each
        work of the group runs again in a transaction of its own, so each caller gets its own
        result or error and nothing of a failed one is kept (no SAVEPOINT: in WAL mode SQLite
        copies every page a savepoint touches to a sub-journal, which halved the rate). ``work``
        must therefore be safe to run again after a rollback. Callers that queue while a
        group's transaction runs join it before its commit (up to ``MAX_GROUP``), so a long
        ``work`` (the results journal's filing) costs the others a wait, not a second commit.
        On PostgreSQL the same, among the grouped writers of this process: one commit for
        several short transactions. A long one there (the journal's filing) runs with
        ``write`` instead, beside them: the audit chain's lock, taken just before each commit,
        is all they share."""
        item = _Pending(work)
        with self._queue_guard:
            self._queue.append(item)
        with self._translate():
            if not self._group_lock.acquire(timeout=WRITE_LOCK_TIMEOUT_S):
                raise StoreError("database unavailable: write lock timeout")
            try:
                if not item.done:  # not taken by the group before: lead the next one
                    with self._queue_guard:
                        batch, self._queue = self._queue, []
                    self._run_group(batch)
            finally:
                self._group_lock.release()
        if self._checkpointer is not None:
            self._checkpointer.committed()
        if item.error is not None:
            raise item.error
        return item.value  # type: ignore[no-any-return]

    def _run_group(self, batch: list[_Pending]) -> None:
        """Under the group lock: the batch in one transaction, or each alone if one fails."""
        try:
            late: list[_Pending] = []
            try:
                with self.write() as conn:
                    values = [it.work(conn) for it in batch]
                    # callers that queued while this transaction ran join its commit instead
                    # of waiting for it and then committing again (a long transaction, e.g.
                    # the results journal's filing, would otherwise cost them two)
                    while len(batch) + len(late) < MAX_GROUP:
                        with self._queue_guard:
                            more, self._queue = self._queue, []
                        if not more:
                            break
                        late += more
                        values += [it.work(conn) for it in more]
            except Exception as exc:  # noqa: BLE001 - rolled back: each runs alone below
                batch += late  # done (with their own result) in the finally below
                if len(batch) == 1:  # it ran alone: its own error
                    batch[0].error = exc
                    return
                log.debug(
                    "group of %d rolled back (%s): one by one", len(batch), type(exc).__name__
                )
            else:
                batch += late
                for it, value in zip(batch, values, strict=True):
                    it.value = value
                return
            for it in batch:
                try:
                    with self.write() as conn:
                        it.value = it.work(conn)
                except Exception as exc:  # noqa: BLE001 - that caller's, raised there
                    it.error = exc
        except BaseException as exc:  # given to every caller of the group, then raised
            for it in batch:
                it.error, it.value = it.error or exc, None
            raise
        finally:
            for it in batch:
                it.done = True

    @contextmanager
    def _locked(self) -> Iterator[object]:
        """The writers' lock alone (the checkpointer's RESTART holds it: no commit meanwhile)."""
        assert self._write_lock is not None
        with self._write_lock:
            yield self

    @contextmanager
    def read(self) -> Iterator[Connection]:
        with self._translate(), self._reader.connect() as conn:
            yield conn

    @contextmanager
    def _translate(self) -> Iterator[None]:
        try:
            yield
        except OperationalError as exc:
            # locked, disconnected, disk full: transient for the caller; integrity errors pass
            raise StoreError(f"database unavailable: {type(exc.orig).__name__}") from exc

    def vacuum(self) -> None:
        """Give freed pages back to the file system after bodies are purged."""
        if self.is_sqlite:
            # on the raw connection, outside any transaction (the engine's BEGIN IMMEDIATE would
            # hold both pragmas in a transaction that is rolled back); executescript steps
            # incremental_vacuum to the end, where execute() stops after its first page
            with self._translate(), self._writer.connect() as conn:
                raw = conn.connection.driver_connection
                assert raw is not None
                raw.executescript("PRAGMA incremental_vacuum;")
                raw.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        else:
            with self._writer.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(text("VACUUM outbox"))
                conn.execute(text("VACUUM inbox"))
                conn.execute(text("VACUUM quarantine"))

    def dispose(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.close()
        self._writer.dispose()
        if self._reader is not self._writer:
            self._reader.dispose()
