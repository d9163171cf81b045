"""Quarantine rows: every refused input is kept with its reason and raw bytes.

Input refused before its signature verified (``trusted`` false) is anybody's: of it only a
prefix is kept, with the digest and length of what arrived and the source address, so a
refusal costs the node a few KiB whatever its size. All kept bytes together stay under
``[retention] quarantine_max_bytes``: past it the oldest unauthenticated rows are dropped
first (the drop audited as a count), then the oldest members' items lose their bytes.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import Connection, and_, delete, func, inspect, select, text, update

from bridge.errors import HutongError, NotFound
from bridge.store.tables import QUARANTINE

#: what a row costs besides its bytes (columns, index entries), counted against the quota so
#: empty refusals cannot pile up for free
ROW_OVERHEAD = 512


def quarantine_row(
    at: datetime,
    source: str,
    exc: HutongError,
    *,
    raw: bytes,
    body: bytes | None = None,
    sender: str | None = None,
    recipient: str | None = None,
    packet_id: str | None = None,
    kind: str | None = None,
    thread: str | None = None,
    patient_hash: str | None = None,
) -> dict[str, Any]:
    return {
        "at": at,
        "source": source,
        "code": exc.code,
        "message": exc.message,
        "sender": sender,
        "recipient": recipient,
        "packet_id": packet_id,
        "kind": kind,
        "thread": thread,
        "state": "held",
        "raw": raw,
        "body": body,
        "raw_digest": None,
        "raw_size": len(raw),
        "remote": None,
        "trusted": True,
        "patient_hash": patient_hash,
    }


def known_patient(
    conn: Connection, *, thread: str | None = None, packet_id: str | None = None
) -> str | None:
    """The keyed patient hash this node already holds for a thread or packet (the referral of
    the thread, a packet of it in the outbox, the packet itself in the inbox), or None.

    Only for input whose thread is vouched for (a member's signed packet, a local adapter's
    record): an unauthenticated claim of a thread must not put input under a patient."""
    from bridge.referral.tables import REFERRAL
    from bridge.store.tables import INBOX, OUTBOX

    lookups = []
    if thread:
        lookups += [
            select(REFERRAL.c.patient_hash).where(REFERRAL.c.thread == thread),
            select(OUTBOX.c.patient_hash).where(
                OUTBOX.c.thread == thread, OUTBOX.c.patient_hash.is_not(None)
            ),
        ]
    if packet_id:
        lookups.append(select(INBOX.c.patient_hash).where(INBOX.c.packet_id == packet_id))
    for stmt in lookups:
        found = conn.execute(stmt.limit(1)).scalar()
        if found:
            return str(found)
    return None


def bundle_patient(body: bytes | None, key: bytes, system: str) -> str | None:
    """The keyed hash of the patient a (possibly invalid) FHIR bundle names, or None: refused
    input is often a bundle that failed validation but still carries its Patient."""
    from bridge.privacy import bundle_patient_hash

    if not body:
        return None
    try:
        bundle = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(bundle, dict):
        return None
    try:
        return bundle_patient_hash(key, bundle, system)
    except (AttributeError, TypeError):  # a hostile shape (entry not a list of objects)
        return None


def untrusted_row(
    at: datetime,
    exc: HutongError,
    received: bytes | bytearray | memoryview,
    *,
    prefix: int,
    remote: str | None,
    size: int | None = None,
    digest: str | None = None,
    **header: Any,
) -> dict[str, Any]:
    """A refusal of input nobody authenticated: ``prefix`` bytes of it, the SHA-256 and length
    of all that arrived (``size``/``digest`` when the caller hashed it while reading), the
    source address; never a body."""
    row = quarantine_row(at, "peer", exc, raw=bytes(received[:prefix]), **header)
    row.update(
        raw_digest=digest or hashlib.sha256(received).hexdigest(),
        raw_size=len(received) if size is None else size,
        remote=remote,
        trusted=False,
    )
    return row


def _kept() -> Any:
    return (
        func.length(QUARANTINE.c.raw)
        + func.coalesce(func.length(QUARANTINE.c.body), 0)
        + ROW_OVERHEAD
    )


def kept_bytes(conn: Connection) -> int:
    """Bytes the quarantine holds, as the quota counts them."""
    return int(conn.execute(select(func.coalesce(func.sum(_kept()), 0))).scalar_one())


def enforce_quota(conn: Connection, max_bytes: int) -> dict[str, int]:
    """Bring the quarantine under ``max_bytes``: drop the oldest unauthenticated rows, then
    (if still over) empty the bytes of the oldest members' items. Counts of each."""
    done = {"dropped": 0, "emptied": 0}
    over = kept_bytes(conn) - max_bytes
    if over <= 0:
        return done
    q = QUARANTINE
    for trusted in (False, True):
        ids, freed = [], 0
        stmt = select(q.c.id, _kept().label("kept")).where(q.c.trusted == trusted)
        if trusted:
            stmt = stmt.where(func.length(q.c.raw) + func.coalesce(func.length(q.c.body), 0) > 0)
        for r in conn.execute(stmt.order_by(q.c.id)):
            if freed >= over:
                break
            ids.append(r.id)
            freed += r.kept if not trusted else r.kept - ROW_OVERHEAD
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            if trusted:
                conn.execute(update(q).where(q.c.id.in_(chunk)).values(raw=b"", body=None))
            else:
                conn.execute(delete(q).where(q.c.id.in_(chunk)))
        done["emptied" if trusted else "dropped"] = len(ids)
        over -= freed
        if over <= 0:
            break
    return done


def purge_old(conn: Connection, cutoff: datetime) -> dict[str, int]:
    """Retention: unauthenticated rows older than ``cutoff`` go; members' items keep their
    row (code, ids, digest) but lose their bytes."""
    q = QUARANTINE
    gone = conn.execute(delete(q).where(q.c.trusted == False, q.c.at < cutoff))  # noqa: E712
    emptied = conn.execute(
        update(q)
        .where(
            and_(
                q.c.trusted == True,  # noqa: E712
                q.c.at < cutoff,
                func.length(q.c.raw) + func.coalesce(func.length(q.c.body), 0) > 0,
            )
        )
        .values(raw=b"", body=None)
    )
    return {"dropped": gone.rowcount or 0, "emptied": emptied.rowcount or 0}


#: node_state marker of the quarantine's schema; 2: ``patient_hash`` and its index, backfilled
MARKER = "schema.quarantine"
SCHEMA_VERSION = "2"


def upgrade_schema(conn: Connection) -> int:
    """Bring an older quarantine table up to date (once, on open, under the schema lock):
    the unauthenticated-refusal columns; schema 2: ``patient_hash`` with its index, filled
    for held items whose packet or thread the node knows. Rows given a hash (0 if none)."""
    from bridge.store import state

    have = {c["name"] for c in inspect(conn).get_columns("quarantine")}
    for name, ddl in (
        ("raw_digest", "VARCHAR(64)"),
        ("raw_size", "INTEGER"),
        ("remote", "VARCHAR(64)"),
        ("trusted", "BOOLEAN NOT NULL DEFAULT TRUE"),
        ("patient_hash", "VARCHAR(64)"),
    ):
        if name not in have:
            conn.execute(text(f"ALTER TABLE quarantine ADD COLUMN {name} {ddl}"))
    if state.get(conn, MARKER) == SCHEMA_VERSION:
        return 0
    conn.execute(
        text(
            "CREATE INDEX IF NOT EXISTS ix_quarantine_patient ON quarantine (patient_hash, at, id)"
        )
    )
    q = QUARANTINE
    filled = 0
    rows = conn.execute(
        select(q.c.id, q.c.thread, q.c.packet_id).where(
            q.c.trusted == True,  # noqa: E712
            q.c.patient_hash.is_(None),
            (q.c.thread.is_not(None)) | (q.c.packet_id.is_not(None)),
        )
    ).all()
    for r in rows:
        found = known_patient(conn, thread=r.thread, packet_id=r.packet_id)
        if found:
            conn.execute(update(q).where(q.c.id == r.id).values(patient_hash=found))
            filled += 1
    state.put(conn, MARKER, SCHEMA_VERSION, datetime.now(UTC))
    return filled


def list_query(*, state: str | None = "held") -> tuple[Any, list[Any]]:
    """(SELECT of the headers IT sees, conditions): no bytes, no body."""
    q = QUARANTINE
    stmt = select(
        q.c.id,
        q.c.at,
        q.c.source,
        q.c.code,
        q.c.message,
        q.c.sender,
        q.c.recipient,
        q.c.packet_id,
        q.c.kind,
        q.c.state,
        q.c.replayed_at,
        q.c.replay_result,
        q.c.raw_digest,
        q.c.raw_size,
        q.c.remote,
        q.c.trusted,
        q.c.patient_hash,
    )
    return stmt, [q.c.state == state] if state else []


def list_items(
    conn: Connection, *, state: str | None = "held", limit: int = 100
) -> list[dict[str, Any]]:
    """The newest ``limit`` items (the CLI, the IT page's first rows)."""
    stmt, where = list_query(state=state)
    return [
        dict(r._mapping)
        for r in conn.execute(stmt.where(*where).order_by(QUARANTINE.c.id.desc()).limit(limit))
    ]


def get_item(conn: Connection, item_id: int) -> dict[str, Any]:
    if not 0 < item_id < 2**63:  # ids are positive 64-bit integers: anything else names nothing
        raise NotFound(f"no quarantine item {item_id}")
    row = conn.execute(select(QUARANTINE).where(QUARANTINE.c.id == item_id)).first()
    if row is None:
        raise NotFound(f"no quarantine item {item_id}")
    return dict(row._mapping)


def mark_replayed(conn: Connection, item_id: int, at: datetime, result: str, ok: bool) -> None:
    conn.execute(
        update(QUARANTINE)
        .where(QUARANTINE.c.id == item_id)
        .values(state="replayed" if ok else "held", replayed_at=at, replay_result=result)
    )


def counts(conn: Connection) -> dict[str, int]:
    from sqlalchemy import func

    rows = conn.execute(select(QUARANTINE.c.state, func.count()).group_by(QUARANTINE.c.state)).all()
    return {state: n for state, n in rows}
