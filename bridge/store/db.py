"""Engines and transactions for SQLite (embedded default) and PostgreSQL (by DSN).

SQLite write transactions start with BEGIN IMMEDIATE so that concurrent writers queue on the
database lock instead of failing mid-transaction with a stale snapshot (the audit chain reads its
head and appends in one transaction). Reads use a second engine with plain deferred transactions.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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
from bridge.store import tables as _tables  # noqa: F401
from bridge.store.hooks import drop_after_commit, run_after_commit

#: session advisory lock held while a process creates or upgrades the schema (the audit chain
#: uses 727274; the delivery lanes use the two-int4 key space, which does not overlap)
SCHEMA_LOCK_ID = 727275


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
            self._writer = self._sqlite_engine(dsn, immediate=True, synchronous=synchronous)
            self._reader = self._sqlite_engine(dsn, immediate=False, synchronous=synchronous)
        else:
            # hide_parameters: a failed statement's error must not carry bodies into the log
            self._writer = create_engine(dsn, pool_pre_ping=True, pool_size=8, max_overflow=8,
                                         hide_parameters=True)
            self._reader = self._writer

    @staticmethod
    def _sqlite_engine(dsn: str, *, immediate: bool, synchronous: str) -> Engine:
        engine = create_engine(
            dsn, connect_args={"check_same_thread": False, "timeout": 30}, pool_size=8,
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
                from bridge.messages import ensure_indexes  # the message browser's searches

                ensure_indexes(conn)

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
            try:
                with self._writer.begin() as conn:
                    yield conn
            except BaseException:
                if conn is not None:
                    drop_after_commit(conn)
                raise
            run_after_commit(conn)  # e.g. the audit anchor file, once the checkpoint is durable

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
        self._writer.dispose()
        if self._reader is not self._writer:
            self._reader.dispose()
