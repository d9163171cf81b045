"""One keyed store for adapters' own state, inside the node's database (``adapter_state``).

What an adapter must remember beyond the node's exactly-once intake (the answer it gave a
refused message, which local slip number belongs to which thread, the local system's patient
index) lives here rather than in a private file beside the node: so the node's backups, its
PostgreSQL workers and its rules for patient data cover it. Values are JSON objects, keyed by
(adapter, namespace, key); a record may name its referral thread, to be found by it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import Connection, delete, insert, select, update

from bridge.local.tables import ADAPTER_STATE

T = ADAPTER_STATE

#: ``rows(table)``: the rows of one table of an old state file, as dicts ([] if it has no such
#: table); what :meth:`AdapterState.take_file` hands the adapter's ``move``
Rows = Callable[[str], list[dict[str, Any]]]


class AdapterState:
    """``host.state``: get / put / add / delete by (namespace, key), find by thread; ``tx()``
    gives the same methods inside one transaction of the node's store."""

    def __init__(
        self, store: Any, adapter: str, now: Callable[[], datetime], conn: Connection | None = None
    ) -> None:
        self._store = store
        self.adapter = adapter
        self._now = now
        self._conn = conn

    @contextmanager
    def tx(self) -> Iterator[AdapterState]:
        if self._conn is not None:
            yield self
            return
        with self._store.write() as conn:
            yield AdapterState(self._store, self.adapter, self._now, conn)

    def _read(self) -> AbstractContextManager[Connection]:
        return nullcontext(self._conn) if self._conn is not None else self._store.read()

    def _write(self) -> AbstractContextManager[Connection]:
        return nullcontext(self._conn) if self._conn is not None else self._store.write()

    def _where(self, ns: str, key: str) -> Any:
        return (T.c.adapter == self.adapter, T.c.ns == ns, T.c.key == key)

    def get(self, ns: str, key: str) -> dict[str, Any] | None:
        with self._read() as conn:
            row = conn.execute(select(T.c.value).where(*self._where(ns, key))).first()
        return None if row is None else orjson.loads(row.value)

    def put(self, ns: str, key: str, value: dict[str, Any], *, thread: str | None = None) -> None:
        """Insert or replace."""
        data = orjson.dumps(value).decode()
        with self._write() as conn:
            done = conn.execute(
                update(T)
                .where(*self._where(ns, key))
                .values(value=data, thread=thread, at=self._now())
            ).rowcount
            if not done:
                conn.execute(
                    insert(T).values(
                        adapter=self.adapter,
                        ns=ns,
                        key=key,
                        thread=thread,
                        value=data,
                        at=self._now(),
                    )
                )

    def add(self, ns: str, key: str, value: dict[str, Any], *, thread: str | None = None) -> bool:
        """Insert unless the key is there; True if it was inserted."""
        with self._write() as conn:
            if conn.execute(select(T.c.id).where(*self._where(ns, key))).first():
                return False
            conn.execute(
                insert(T).values(
                    adapter=self.adapter,
                    ns=ns,
                    key=key,
                    thread=thread,
                    value=orjson.dumps(value).decode(),
                    at=self._now(),
                )
            )
            return True

    def delete(self, ns: str, key: str) -> None:
        with self._write() as conn:
            conn.execute(delete(T).where(*self._where(ns, key)))

    def by_thread_keys(self, ns: str, thread: str) -> list[tuple[str, dict[str, Any]]]:
        """(key, value) of the records in ``ns`` that name ``thread``, oldest first."""
        with self._read() as conn:
            rows = conn.execute(
                select(T.c.key, T.c.value)
                .where(T.c.adapter == self.adapter, T.c.ns == ns, T.c.thread == thread)
                .order_by(T.c.id)
            ).all()
        return [(r.key, orjson.loads(r.value)) for r in rows]

    def by_thread(self, ns: str, thread: str) -> list[dict[str, Any]]:
        """The values in ``ns`` that name ``thread``, oldest first."""
        with self._read() as conn:
            rows = conn.execute(
                select(T.c.value)
                .where(T.c.adapter == self.adapter, T.c.ns == ns, T.c.thread == thread)
                .order_by(T.c.id)
            ).all()
        return [orjson.loads(r.value) for r in rows]

    def take_node_state(self, name: str) -> str | None:
        """A value an earlier version of this adapter kept in the node's ``node_state`` under
        ``adapter:<this adapter>:<name>``: returned once and removed (only this adapter's own
        prefix can be read)."""
        from bridge.store import state as node_state
        from bridge.store.tables import NODE_STATE

        key = f"adapter:{self.adapter}:{name}"
        with self._write() as conn:
            value = node_state.get(conn, key)
            if value is not None:
                conn.execute(delete(NODE_STATE).where(NODE_STATE.c.key == key))
        return value

    def take_file(self, path: Path, move: Callable[[AdapterState, Rows], None]) -> int:
        """Move the rows of a private SQLite file an earlier version of this adapter kept beside
        the node into this store, once: ``move(kv, rows)`` puts them (``kv`` is this store in
        ONE transaction of the node's database, ``rows(table)`` reads a table of the file); the
        file and its ``-wal``/``-shm`` are deleted only after that commit. The number of rows
        ``move`` read; 0 when there is no file. (Files with names, ID numbers and phone numbers
        must not outlive the move: the node's backups and retention do not cover them.)"""
        if not path.exists():
            return 0
        conn = sqlite3.connect(path)
        conn.row_factory = sqlite3.Row
        n = 0
        try:
            tables = {
                str(r[0])
                for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            }

            def rows(table: str) -> list[dict[str, Any]]:
                nonlocal n
                if table not in tables:
                    return []
                found = [dict(r) for r in conn.execute(f'SELECT * FROM "{table}"')]
                n += len(found)
                return found

            with self.tx() as kv:
                move(kv, rows)
        finally:
            conn.close()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        return n
