"""Reads that run every round or every 30 s whatever the store holds: each is an index range that
does not grow with the store (EXPLAIN on SQLite and PostgreSQL), answers what the full scans
they replace answered, and an older store gains their indexes when it is opened.

The alerts' facts (``bridge/alerts.py``: waiting and dead rows per hop, a hop's last receipt,
its last packet in) walked every outbox row, 2.3 s each at 1 M packets (bench/README.md,
``growth``); a platform's ``receipts`` job (``bridge/delivery/receipts.py``) polls for queued
receipts of every hop; the dispatcher claims its next batch of received packets every round
(``bridge/delivery/dispatcher.py``), with a backlog behind it and every packet delivered before.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Connection, func, insert, or_, select, text

from bridge.alerts import _LAST_ACK, _LAST_IN, _OPEN
from bridge.delivery.dispatcher import RECEIVED
from bridge.delivery.lanes import lane_of
from bridge.delivery.receipts import _DUE
from bridge.store.db import Store
from bridge.store.tables import INBOX, OUTBOX

T0 = datetime(2026, 11, 1, 8, 0, tzinfo=UTC)
NEW_INDEXES = (
    "ix_outbox_receipts",
    "ix_outbox_open",
    "ix_outbox_hop_acked",
    "ix_inbox_sender_time",
    "ix_inbox_relay_time",
)


@pytest.fixture
def db(dsn: str) -> Iterator[Store]:
    s = Store(dsn)
    s.create_all()
    yield s
    s.dispose()


def _out(i: int, hop: str, state: str, origin: str = "local") -> dict[str, Any]:
    at = T0 + timedelta(minutes=i)
    done = state in ("acknowledged", "refused")
    return {
        "packet_id": f"p-{i}",
        "origin": origin,
        "sender": "hub",
        "recipient": hop,
        "next_hop": hop,
        "kind": "result.lab",
        "thread": f"t-{i % 7}",
        "seq": i,
        "digest": "d",
        "size": 10,
        "state": state,
        "attempts": 1,
        "created_at": at,
        "next_try_at": at,
        "acked_at": at + timedelta(seconds=i % 5) if done else None,
        "frame": b"f" if origin == "receipt" else None,
    }


def _in(i: int, sender: str, relay: str | None) -> dict[str, Any]:
    at = T0 + timedelta(minutes=i)
    return {
        "packet_id": f"q-{i}",
        "sender": sender,
        "relay": relay,
        "kind": "result.lab",
        "thread": f"t-{i}",
        "seq": 1,
        "digest": "d",
        "size": 10,
        "state": "delivered",
        "created_at": at,
        "received_at": at,
        "next_try_at": at,
        "receipt": b"r",
    }


def seed(s: Store) -> None:
    states = ("acknowledged", "acknowledged", "queued", "sent", "dead", "refused")
    hops = ("m-1", "m-2", "m-3")
    with s.write() as conn:
        conn.execute(insert(OUTBOX), [_out(i, hops[i % 3], states[i % 6]) for i in range(120)])
        conn.execute(
            insert(OUTBOX), [_out(200 + i, hops[i % 2], "queued", "receipt") for i in range(6)]
        )
        conn.execute(
            insert(INBOX),
            [_in(i, ("m-1", "m-2")[i % 2], "hub" if i % 3 else None) for i in range(40)],
        )


def _plan(conn: Connection, stmt: Any, params: dict[str, Any]) -> str:
    """The plan of the statement as the node runs it: bound parameters, not literals."""
    compiled = stmt.compile(conn, compile_kwargs={"render_postcompile": True})  # IN lists
    values = compiled.construct_params(params)
    if conn.dialect.name == "sqlite":
        args = tuple(values[k] for k in compiled.positiontup or ())
        return "\n".join(
            r[-1] for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + str(compiled), args)
        )
    conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
    conn.exec_driver_sql("ANALYZE outbox")
    conn.exec_driver_sql("ANALYZE inbox")
    return "\n".join(r[0] for r in conn.exec_driver_sql("EXPLAIN " + str(compiled), values))


def test_each_periodic_read_is_a_range_of_its_own_index(db: Store) -> None:
    seed(db)
    cases: list[tuple[Any, dict[str, Any], str]] = [
        (_OPEN, {}, "ix_outbox_open"),
        (_LAST_ACK, {"hop": "m-1"}, "ix_outbox_hop_acked"),
        (_LAST_IN[0], {"peer": "m-1"}, "ix_inbox_sender_time"),
        (_LAST_IN[1], {"peer": "hub"}, "ix_inbox_relay_time"),
        (_DUE, {"_now": T0 + timedelta(days=1), "_limit": 400}, "ix_outbox_receipts"),
    ]
    with db.read() as conn:
        for stmt, params, index in cases:
            plan = _plan(conn, stmt, params)
            assert index in plan, plan
            if db.is_sqlite:
                assert "SCAN outbox\n" not in plan + "\n" and "SCAN inbox\n" not in plan + "\n"
                assert "TEMP B-TREE" not in plan or index == "ix_outbox_open", plan
            else:
                assert "Seq Scan" not in plan, plan


def test_the_alerts_reads_answer_what_the_full_scans_answered(db: Store) -> None:
    seed(db)
    with db.read() as conn:
        old = {
            (hop, st): (n, oldest)
            for hop, st, n, oldest in conn.execute(
                select(
                    OUTBOX.c.next_hop, OUTBOX.c.state, func.count(), func.min(OUTBOX.c.created_at)
                ).group_by(OUTBOX.c.next_hop, OUTBOX.c.state)
            )
        }
        new = {(hop, st): (n, oldest) for hop, st, n, oldest in conn.execute(_OPEN)}
        assert new == {k: v for k, v in old.items() if k[1] in ("queued", "sent", "dead")}
        # packet i: hop m-(i % 3 + 1), state by i % 6; receipts 200-205 alternate m-1, m-2
        assert (new[("m-3", "queued")][0], new[("m-1", "sent")][0]) == (20, 20)
        assert (new[("m-2", "dead")][0], new[("m-1", "queued")][0]) == (20, 3)
        for hop in ("m-1", "m-2", "m-3", "nobody"):
            want = conn.execute(
                select(func.max(OUTBOX.c.acked_at)).where(OUTBOX.c.next_hop == hop)
            ).scalar()
            assert conn.execute(_LAST_ACK, {"hop": hop}).scalar() == want
        for peer in ("m-1", "m-2", "hub", "nobody"):
            want = conn.execute(
                select(func.max(INBOX.c.received_at)).where(
                    or_(INBOX.c.sender == peer, INBOX.c.relay == peer)
                )
            ).scalar()
            got = [t for q in _LAST_IN if (t := conn.execute(q, {"peer": peer}).scalar())]
            assert max(got, default=None) == want
        assert want is None  # 'nobody': neither query found a row


def test_the_receipts_poll_finds_only_queued_due_receipts_oldest_first(db: Store) -> None:
    seed(db)
    with db.write() as conn:  # one receipt backing off: not due yet
        conn.execute(
            OUTBOX.update()
            .where(OUTBOX.c.packet_id == "p-201")
            .values(next_try_at=T0 + timedelta(days=2))
        )
    with db.read() as conn:
        due = conn.execute(_DUE, {"_now": T0 + timedelta(days=1), "_limit": 400}).all()
    assert [(r.packet_id, r.next_hop) for r in due] == [
        ("p-200", "m-1"),
        ("p-202", "m-1"),
        ("p-203", "m-2"),
        ("p-204", "m-1"),
        ("p-205", "m-2"),
    ]


def test_an_older_store_gains_the_indexes_when_it_is_opened(dsn: str) -> None:
    s = Store(dsn)
    s.create_all()
    seed(s)
    with s.write() as conn:
        for name in NEW_INDEXES:
            conn.execute(text(f"DROP INDEX {name}"))
    s.dispose()
    s = Store(dsn)
    try:
        s.create_all()
        with s.read() as conn:
            if s.is_sqlite:
                names = {
                    r[0]
                    for r in conn.exec_driver_sql(
                        "SELECT name FROM sqlite_master WHERE type = 'index'"
                    )
                }
            else:
                names = {
                    r[0]
                    for r in conn.exec_driver_sql(
                        "SELECT indexname FROM pg_indexes WHERE tablename IN ('outbox', 'inbox')"
                    )
                }
            assert set(NEW_INDEXES) <= names
            assert conn.execute(_OPEN).all()  # and they answer
    finally:
        s.dispose()


def test_the_dispatcher_claims_received_rows_from_its_index_in_order(db: Store) -> None:
    """The next batch: the received rows' range of ``ix_inbox_pending (state, id)`` read in id
    order (no sort, no delivered row read), also with PostgreSQL's lanes condition."""
    seed(db)  # 40 delivered rows
    with db.write() as conn:
        rows = [_in(100 + i, "m-1", None) for i in range(30)]
        for i, r in enumerate(rows):
            r.update(state="received" if i % 3 else "held", thread=f"t-{i % 4}")
        conn.execute(insert(INBOX), rows)
    cases = [RECEIVED.limit(200)]
    if not db.is_sqlite:
        cases.append(RECEIVED.where(lane_of(INBOX.c.thread).in_(list(range(64)))).limit(200))
    with db.read() as conn:
        if not db.is_sqlite:
            # on 30 rows PostgreSQL would rather sort what a bitmap scan of the index found
            # (the received rows only): the index must also give them in order
            conn.exec_driver_sql("SET LOCAL enable_bitmapscan = off")
        for stmt in cases:
            plan = _plan(conn, stmt, {})
            assert "ix_inbox_pending" in plan, plan
            if db.is_sqlite:
                assert "TEMP B-TREE" not in plan and "SCAN inbox" not in plan, plan
            else:
                assert "Index Scan using ix_inbox_pending" in plan, plan
                assert "Seq Scan" not in plan and "Sort" not in plan, plan
        got = [r.packet_id for r in conn.execute(RECEIVED.limit(200))]
    assert got == [r["packet_id"] for i, r in enumerate(rows) if i % 3]
