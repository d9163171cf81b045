"""Every version kept and readable in the FHIR store (vread, history paging, the version lock),
on SQLite and PostgreSQL; an older store gets the history index on open, once."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from sqlalchemy import delete, text

from bridge.errors import NotFound
from bridge.fhirstore import schema, store
from bridge.store.db import Store
from bridge.store.tables import NODE_STATE

T0 = datetime(2026, 11, 1, 8, 0, tzinfo=UTC)


@pytest.fixture
def db(dsn: str) -> Iterator[Store]:
    s = Store(dsn)
    s.create_all()
    yield s
    s.dispose()


def patient(pid: str, family: str) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": pid, "name": [{"family": family}]}


def test_every_version_is_kept_read_and_paged(db: Store) -> None:
    names = ["王", "汪", "黄", "望"]
    with db.write() as conn:
        for v, family in enumerate(names):
            store.put(conn, patient("p1", family), at=T0 + timedelta(minutes=v))
        store.put(conn, patient("p2", "李"), at=T0 + timedelta(minutes=10))
    with db.read() as conn:
        for v, family in enumerate(names, start=1):
            row = store.get_version(conn, "Patient", "p1", v)
            body = orjson.loads(row.body)
            assert (row.version, body["name"][0]["family"], body["meta"]["versionId"]) == (
                v,
                family,
                str(v),
            )
            assert row.at == T0 + timedelta(minutes=v - 1)
        with pytest.raises(NotFound):
            store.get_version(conn, "Patient", "p1", 5)
        assert store.current_version(conn, "Patient", "p1") == 4
        assert store.current_version(conn, "Patient", "nobody") is None
        rows, more = store.history(conn, "Patient", "p1", count=3)
        assert [r.version for r in rows] == [4, 3, 2] and more
        rows2, more2 = store.history(conn, "Patient", "p1", count=3, before=rows[-1].seq)
        assert [r.version for r in rows2] == [1] and not more2
        typed, _ = store.history(conn, "Patient", count=10)
        assert [(r.id, r.version) for r in typed] == [
            ("p2", 1),
            ("p1", 4),
            ("p1", 3),
            ("p1", 2),
            ("p1", 1),
        ]
        since, _ = store.history(conn, "Patient", count=10, since=T0 + timedelta(minutes=3))
        assert [(r.id, r.version) for r in since] == [("p2", 1), ("p1", 4)]


def test_version_lock_serialises_two_writers(db: Store) -> None:
    """Two writers that each check the version and then write: the second sees the first's
    version (no lost update), on either database."""
    with db.write() as conn:
        store.put(conn, patient("p1", "王"), at=T0)
    seen: list[int] = []
    go = threading.Barrier(2)

    def writer(family: str) -> None:
        go.wait()
        with db.write() as conn:
            seen.append(store.lock_version(conn, "Patient", "p1"))
            store.put(conn, patient("p1", family), at=T0 + timedelta(minutes=1))

    threads = [threading.Thread(target=writer, args=(f,)) for f in ("李", "张")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(seen) == [1, 2]
    with db.read() as conn:
        assert store.current_version(conn, "Patient", "p1") == 3
        with pytest.raises(NotFound):
            store.lock_version(conn, "Patient", "nobody")


def _history_indexes(s: Store) -> set[str]:
    with s.read() as conn:
        if conn.dialect.name == "sqlite":
            sql = (
                "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'fhir_history'"
            )
        else:
            sql = "SELECT indexname FROM pg_indexes WHERE tablename = 'fhir_history'"
        return {r[0] for r in conn.exec_driver_sql(sql)}


def test_an_older_store_gets_the_history_index_on_open(dsn: str) -> None:
    s = Store(dsn)
    s.create_all()
    assert "ix_fhir_history_type_seq" in _history_indexes(s)
    with s.write() as conn:
        conn.execute(text("DROP INDEX ix_fhir_history_type_seq"))
        conn.execute(delete(NODE_STATE).where(NODE_STATE.c.key == schema.HISTORY_MARKER))
        store.put(conn, patient("p1", "王"), at=T0)
    s.dispose()
    reopened = Store(dsn)  # what a node does on start
    reopened.create_all()
    try:
        assert "ix_fhir_history_type_seq" in _history_indexes(reopened)
        with reopened.read() as conn:
            rows, _ = store.history(conn, "Patient")
            assert [(r.id, r.version) for r in rows] == [("p1", 1)]
    finally:
        reopened.dispose()


def test_an_older_store_loses_the_index_on_rtype_alone_and_no_read_needed_it(dsn: str) -> None:
    """(rtype, seq) covers the old index on rtype alone; each history read is a range of
    ix_fhir_history_type_seq or ix_fhir_history_id (EXPLAIN), never a walk of the table."""
    s = Store(dsn)
    s.create_all()
    assert "ix_fhir_history_rtype" not in _history_indexes(s)
    with s.write() as conn:
        conn.execute(text("CREATE INDEX ix_fhir_history_rtype ON fhir_history (rtype)"))
        state_row = NODE_STATE.c.key == schema.HISTORY_MARKER
        conn.execute(NODE_STATE.update().where(state_row).values(value="1"))
        for i in range(3):
            store.put(conn, patient(f"p{i}", "王"), at=T0 + timedelta(minutes=i))
        store.put(conn, patient("p1", "李"), at=T0 + timedelta(hours=1))
    s.dispose()
    reopened = Store(dsn)
    reopened.create_all()
    try:
        names = _history_indexes(reopened)
        assert "ix_fhir_history_rtype" not in names
        assert {"ix_fhir_history_type_seq", "ix_fhir_history_id"} <= names
        cols = "SELECT seq, rtype, id, version, at, body FROM fhir_history WHERE rtype = 'Patient'"
        reads = [
            (f"{cols} AND id = 'p1' AND version = 2", "ix_fhir_history_id"),
            (f"{cols} ORDER BY seq DESC LIMIT 51", "ix_fhir_history_type_seq"),
            (f"{cols} AND seq < 3 ORDER BY seq DESC LIMIT 51", "ix_fhir_history_type_seq"),
            (f"{cols} AND id = 'p1' ORDER BY seq DESC LIMIT 51", "ix_fhir_history_id"),
        ]
        with reopened.read() as conn:
            if not reopened.is_sqlite:
                conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
            for sql, index in reads:
                if reopened.is_sqlite:
                    rows = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql)
                    plan = "\n".join(r[-1] for r in rows)
                    assert "SCAN fhir_history\n" not in plan + "\n", plan
                else:
                    plan = "\n".join(r[0] for r in conn.exec_driver_sql("EXPLAIN " + sql))
                    assert "Seq Scan" not in plan, plan
                # by (type, id) either index is a range; the planner picks by its statistics
                assert index in plan or "AND id = " in sql, (sql, plan)
                assert "ix_fhir_history_" in plan, (sql, plan)
            rows, _ = store.history(conn, "Patient")
            assert [(r.id, r.version) for r in rows] == [("p1", 2), ("p2", 1), ("p1", 1), ("p0", 1)]
    finally:
        reopened.dispose()
