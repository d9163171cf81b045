"""The message browser's store side: a patient search reads outbox, inbox and quarantine by
their ``(patient_hash, time)`` indexes (EXPLAIN on SQLite and PostgreSQL), quarantined items
carry the hash of the patient their input names, and an older quarantine table is upgraded
once on open (the column, its index, the hashes of held items whose thread is known).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from sqlalchemy import Connection, insert, select, text

from bridge import messages as mb
from bridge.errors import RouteDenied
from bridge.privacy import NATIONAL_ID_SYSTEM, patient_hash
from bridge.referral.tables import REFERRAL
from bridge.store import quarantine as qmod
from bridge.store.db import Store
from bridge.store.tables import INBOX, NODE_STATE, OUTBOX, QUARANTINE

KEY = b"k" * 32
WANG = "110102195003151234"
T0 = datetime(2026, 11, 1, 8, 0, tzinfo=UTC)


@pytest.fixture
def db(dsn: str) -> Iterator[Store]:
    s = Store(dsn)
    s.create_all()
    yield s
    s.dispose()


def _bundle(nid: str | None) -> bytes:
    patient: dict[str, Any] = {"resourceType": "Patient"}
    if nid:
        patient["identifier"] = [{"system": NATIONAL_ID_SYSTEM, "value": nid}]
    return orjson.dumps(
        {"resourceType": "Bundle", "type": "transaction", "entry": [{"resource": patient}]}
    )


def seed(s: Store, n: int = 60) -> str:
    """``n`` packets out and in for 6 patients, a referral on thread t-0 for WANG, a few
    quarantined items; the hash of WANG."""
    wang = patient_hash(KEY, WANG)
    hashes = [wang] + [patient_hash(KEY, f"11010219500315{i:04d}") for i in range(5)]
    with s.write() as conn:
        conn.execute(
            insert(REFERRAL),
            [
                {
                    "thread": "t-0",
                    "side": "referrer",
                    "kind": "up-exam",
                    "referrer": "chc",
                    "receiver": "core",
                    "status": "requested",
                    "step": "requested",
                    "patient_hash": wang,
                    "task_id": "task-0",
                    "sr_id": "sr-0",
                    "created_at": T0,
                    "updated_at": T0,
                }
            ],
        )
        for i in range(n):
            at = T0 + timedelta(minutes=i)
            ph, thread = hashes[i % 6], f"t-{i % 6}"
            conn.execute(
                insert(OUTBOX).values(
                    packet_id=f"out-{i}",
                    sender="chc",
                    recipient="core",
                    next_hop="core",
                    kind="referral.request",
                    thread=thread,
                    seq=i,
                    digest="0" * 64,
                    size=9,
                    patient_hash=ph,
                    state="acknowledged",
                    created_at=at,
                    next_try_at=at,
                    body=b"{}",
                )
            )
            conn.execute(
                insert(INBOX).values(
                    packet_id=f"in-{i}",
                    sender="core",
                    kind="referral.status",
                    thread=thread,
                    seq=i,
                    digest="0" * 64,
                    size=9,
                    patient_hash=ph,
                    state="delivered",
                    created_at=at,
                    received_at=at,
                    next_try_at=at,
                    body=b"{}",
                    receipt=b"{}",
                )
            )
        exc = RouteDenied("no rule allows it")
        conn.execute(
            insert(QUARANTINE),
            [
                qmod.quarantine_row(
                    T0 + timedelta(hours=2),
                    "local",
                    exc,
                    raw=_bundle(WANG),
                    kind="referral.request",
                    patient_hash=qmod.bundle_patient(_bundle(WANG), KEY, NATIONAL_ID_SYSTEM),
                ),
                qmod.quarantine_row(
                    T0 + timedelta(hours=3),
                    "local",
                    exc,
                    raw=b"{}",
                    kind="referral.status",
                    thread="t-0",
                    patient_hash=qmod.known_patient(conn, thread="t-0"),
                ),
                qmod.quarantine_row(
                    T0 + timedelta(hours=4),
                    "local",
                    exc,
                    raw=_bundle(None),
                    kind="referral.request",
                ),
            ],
        )
    return wang


def test_a_patient_search_finds_their_packets_in_every_box(db: Store) -> None:
    wang = seed(db)
    with db.read() as conn:
        rows, nxt = mb.search(conn, patient_hash=wang)
    assert nxt is None
    assert [(r["box"], r.get("packet_id"), r.get("kind")) for r in rows] == [
        ("quarantine", None, "referral.status"),
        ("quarantine", None, "referral.request"),
        *[
            (box, f"{p}-{i}", k)
            for i in range(54, -1, -6)
            for box, p, k in (
                ("outbox", "out", "referral.request"),
                ("inbox", "in", "referral.status"),
            )
        ],
    ]
    assert all(r["patient_hash"] == wang for r in rows)
    # paged two at a time: the same rows, each once
    seen: list[tuple[str, int]] = []
    after = None
    with db.read() as conn:
        while True:
            page, after = mb.search(conn, patient_hash=wang, after=after, limit=2)
            seen += [(r["box_table"], r["id"]) for r in page]
            if after is None:
                break
    assert seen == [(r["box_table"], r["id"]) for r in rows]


def _plan(conn: Connection, stmt: Any) -> str:
    sql = str(stmt.compile(conn, compile_kwargs={"literal_binds": True}))
    if conn.dialect.name == "sqlite":
        return "\n".join(r[-1] for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql))
    conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
    return "\n".join(r[0] for r in conn.exec_driver_sql("EXPLAIN " + sql))


@pytest.mark.parametrize("paged", [False, True])
def test_the_patient_search_reads_each_box_by_its_patient_index(db: Store, paged: bool) -> None:
    wang = seed(db)
    after = (
        mb.encode_cursor({"at": T0 + timedelta(minutes=30), "box_table": "inbox", "id": 7})
        if paged
        else None
    )
    want = {
        "outbox": "ix_outbox_patient_time",
        "inbox": "ix_inbox_patient_time",
        "quarantine": "ix_quarantine_patient",
    }
    with db.read() as conn:
        for box, stmt in mb.statements(patient_hash=wang, after=after):
            plan = _plan(conn, stmt)
            what = f"{box}:\n{plan}"
            assert want[box] in plan, what
            if db.is_sqlite:
                assert f"SEARCH {box} USING INDEX {want[box]} (patient_hash=?" in plan, what
                assert "TEMP B-TREE" not in plan, what  # the index gives the order
            else:
                assert "Seq Scan" not in plan and "Sort" not in plan, what


def test_bundle_patient_takes_what_a_refused_bundle_names_and_survives_hostile_shapes() -> None:
    assert qmod.bundle_patient(_bundle(WANG), KEY, NATIONAL_ID_SYSTEM) == patient_hash(KEY, WANG)
    for body in (
        None,
        b"",
        b"not json",
        b"[1, 2]",
        b'{"entry": 7}',
        b'{"entry": [7]}',
        b'{"entry": [{"resource": [1]}]}',
        _bundle(None),
    ):
        assert qmod.bundle_patient(body, KEY, NATIONAL_ID_SYSTEM) is None, body


def test_an_older_quarantine_is_upgraded_once_on_open(dsn: str) -> None:
    s = Store(dsn)
    try:
        s.create_all()
        wang = seed(s)
        with s.write() as conn:  # as a store made before schema 2 was
            conn.execute(text("DROP INDEX ix_quarantine_patient"))
            conn.execute(text("ALTER TABLE quarantine DROP COLUMN patient_hash"))
            conn.execute(NODE_STATE.delete().where(NODE_STATE.c.key == qmod.MARKER))
    finally:
        s.dispose()
    reopened = Store(dsn)  # what a node does on start
    try:
        reopened.create_all()
        with reopened.read() as conn:
            got = conn.execute(
                select(QUARANTINE.c.kind, QUARANTINE.c.thread, QUARANTINE.c.patient_hash).order_by(
                    QUARANTINE.c.id
                )
            ).all()
            marker = conn.execute(
                select(NODE_STATE.c.value).where(NODE_STATE.c.key == qmod.MARKER)
            ).scalar()
        # the thread's item is found again; the bundle's needs the key (new items get it)
        assert [tuple(r) for r in got] == [
            ("referral.request", None, None),
            ("referral.status", "t-0", wang),
            ("referral.request", None, None),
        ]
        assert marker == qmod.SCHEMA_VERSION
        with reopened.write() as conn:  # once: a second open changes nothing
            assert qmod.upgrade_schema(conn) == 0
        with reopened.read() as conn:
            plan = _plan(conn, mb.statements(boxes=["quarantine"], patient_hash=wang)[0][1])
        assert "ix_quarantine_patient" in plan, plan
    finally:
        reopened.dispose()
