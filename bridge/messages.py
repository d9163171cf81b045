"""The message browser (IT): outbox, inbox, quarantine and dead letters searched together,
one message opened with its path, and a resend with a reason. Shared by ``/ui/messages`` and
``hutong messages search|show|resend``.

Search is by time range, peer, kind, state, thread, patient hash and packet id, newest first,
paged by keyset ``(time, box, id)`` so page 1000 costs what page 1 costs. The patient filter
runs on ``(patient_hash, time)`` indexes of all three tables (``ensure_indexes``; a
quarantined item carries the hash of the patient its input names, or of its known thread,
``bridge.store.quarantine.known_patient``; input that names none is found by packet id, kind,
peer or time). Headers carry no patient data; the
FHIR body and the raw input are patient data: opening them is an audited read.
"""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import Connection, and_, func, literal, or_, select, text, update

from bridge.audit.events import AuditEntry
from bridge.delivery.dispatcher import REDELIVER
from bridge.errors import InvalidResource, NotFound
from bridge.local.tables import ADAPTER_INTAKE
from bridge.store.tables import INBOX, OUTBOX, QUARANTINE

BOXES = ("outbox", "inbox", "quarantine", "dead")
#: order of boxes inside one instant (the keyset's middle term)
_ORDER = {"outbox": 0, "inbox": 1, "quarantine": 2}
PAGE = 50
MAX_PAGE = 500
#: the browser's indexes: each table by (patient, time, id) and by (time, id), so a page in
#: keyset order is an index range on SQLite and PostgreSQL alike (no sort)
INDEXES = (
    "CREATE INDEX IF NOT EXISTS ix_outbox_patient_time ON outbox (patient_hash, created_at, id)",
    "CREATE INDEX IF NOT EXISTS ix_inbox_patient_time ON inbox (patient_hash, received_at, id)",
    "CREATE INDEX IF NOT EXISTS ix_quarantine_patient ON quarantine (patient_hash, at, id)",
    "CREATE INDEX IF NOT EXISTS ix_outbox_time ON outbox (created_at, id)",
    "CREATE INDEX IF NOT EXISTS ix_inbox_time ON inbox (received_at, id)",
)
#: the first version's indexes (without id: PostgreSQL sorted each page), replaced
OLD_INDEXES = ("ix_outbox_patient", "ix_inbox_patient", "ix_outbox_created", "ix_inbox_received")
_HEADER_SKIP = ("body", "frame", "receipt", "raw")


def ensure_indexes(conn: Connection) -> None:
    for stmt in INDEXES:
        conn.execute(text(stmt))
    for name in OLD_INDEXES:
        conn.execute(text(f"DROP INDEX IF EXISTS {name}"))


def _spec(box: str) -> tuple[Any, Any, Any, Any]:
    """(table, time column, peer condition builder, state column) of one box."""
    if box == "outbox":
        return OUTBOX, OUTBOX.c.created_at, (OUTBOX.c.recipient, OUTBOX.c.next_hop), OUTBOX.c.state
    if box == "inbox":
        return INBOX, INBOX.c.received_at, (INBOX.c.sender, INBOX.c.relay), INBOX.c.state
    return (
        QUARANTINE,
        QUARANTINE.c.at,
        (QUARANTINE.c.sender, QUARANTINE.c.recipient),
        QUARANTINE.c.state,
    )


def encode_cursor(row: dict[str, Any]) -> str:
    raw = f"{row['at'].isoformat()}|{row['box_table']}|{row['id']}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(token: str) -> tuple[datetime, str, int]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        at, box, rid = raw.split("|")
        if box not in _ORDER:
            raise ValueError
        return datetime.fromisoformat(at), box, int(rid)
    except (ValueError, UnicodeDecodeError):
        raise InvalidResource("after: not a page token this browser gave out") from None


def statements(
    *,
    boxes: tuple[str, ...] | list[str] | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    peer: str | None = None,
    kind: str | None = None,
    state: str | None = None,
    thread: str | None = None,
    patient_hash: str | None = None,
    packet_id: str | None = None,
    after: str | None = None,
    limit: int = PAGE,
) -> list[tuple[str, Any]]:
    """(box table, SELECT) for each table a search reads: its newest ``limit + 1`` headers
    past the keyset cursor (one per table; :func:`search` merges them)."""
    wanted = [b for b in (boxes or BOXES) if b in BOXES] or list(BOXES)
    cursor = decode_cursor(after) if after else None
    tables: dict[str, str | None] = {}
    for b in wanted:  # "dead" is the outbox's dead letters
        if b == "dead":
            if "outbox" not in tables:
                tables["outbox"] = "dead"
        else:
            tables[b] = None
    out = []
    for box, only_state in tables.items():
        table, at, peers, st = _spec(box)
        cols = [c for c in table.c if c.name not in _HEADER_SKIP]
        where: list[Any] = []
        if since is not None:
            where.append(at >= since)
        if until is not None:
            where.append(at < until)
        if peer:
            where.append(or_(*(c == peer for c in peers)))
        if kind:
            where.append(table.c.kind == kind)
        if state or only_state:
            where.append(st == (state or only_state))
        if thread:
            where.append(table.c.thread == thread)
        if packet_id:
            where.append(table.c.packet_id == packet_id)
        if patient_hash:
            where.append(table.c.patient_hash == patient_hash)
        if cursor is not None:
            # newest first; within one instant outbox, inbox, quarantine (then id down): a
            # box before the cursor's was shown up to and including the cursor's instant
            c_at, c_box, c_id = cursor
            if _ORDER[box] < _ORDER[c_box]:
                where.append(at < c_at)
            elif _ORDER[box] == _ORDER[c_box]:
                where.append(or_(at < c_at, and_(at == c_at, table.c.id < c_id)))
            else:
                where.append(at <= c_at)
        out.append(
            (
                box,
                select(*cols, at.label("at_"))
                .where(and_(True, *where))
                .order_by(at.desc(), table.c.id.desc())
                .limit(limit + 1),
            )
        )
    return out


def search(
    conn: Connection, *, limit: int = PAGE, **filters: Any
) -> tuple[list[dict[str, Any]], str | None]:
    """One page of headers across the boxes, newest first, and the next page's token.
    ``filters``: those of :func:`statements` (boxes, since, until, peer, kind, state, thread,
    patient_hash, packet_id, after)."""
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidResource(f"limit: 1..{MAX_PAGE}")
    rows: list[dict[str, Any]] = []
    for box, stmt in statements(limit=limit, **filters):
        for r in conn.execute(stmt):
            d = dict(r._mapping)
            d["at"] = d.pop("at_")
            d["box_table"] = box
            d["box"] = "dead" if box == "outbox" and d.get("state") == "dead" else box
            rows.append(d)
    rows.sort(key=lambda d: (d["at"], -_ORDER[d["box_table"]], d["id"]), reverse=True)
    nxt = encode_cursor(rows[limit - 1]) if len(rows) > limit else None
    return rows[:limit], nxt


#: a count of matches stops here per table (so an unfiltered count on 1 M rows stays cheap)
COUNT_UP_TO = 10_000


def count(conn: Connection, *, up_to: int = COUNT_UP_TO, **filters: Any) -> tuple[int, bool]:
    """(how many headers match ``filters`` across the boxes, exact?): exact up to ``up_to``
    per table, else a lower bound (the page shows "10,000+"). Without ``after``."""
    filters.pop("after", None)
    total, exact = 0, True
    for _box, stmt in statements(limit=up_to, **filters):
        inner = stmt.with_only_columns(literal(1)).order_by(None).limit(up_to + 1).subquery()
        n = int(conn.execute(select(func.count()).select_from(inner)).scalar_one())
        if n > up_to:
            n, exact = up_to, False
        total += n
    return total, exact


def _table(box: str) -> Any:
    return {"outbox": OUTBOX, "dead": OUTBOX, "inbox": INBOX, "quarantine": QUARANTINE}[box]


def show(conn: Connection, box: str, rid: int) -> dict[str, Any]:
    """One message: ``headers``, ``body`` (parsed FHIR or None), ``raw`` (quarantined input as
    text, or None), ``path`` (time-ordered steps from the audit chain) and ``intake`` (the local
    records an adapter took in for its thread)."""
    from bridge.audit.tables import AuditRecord

    if box not in BOXES:
        raise NotFound("no such box")
    table = _table(box)
    row = conn.execute(select(table).where(table.c.id == rid)).first()
    if row is None:
        raise NotFound("no such message in that box")
    d = dict(row._mapping)
    headers = {k: v for k, v in d.items() if k not in _HEADER_SKIP}
    body = None
    if d.get("body") is not None:
        try:
            body = orjson.loads(d["body"])
        except orjson.JSONDecodeError:
            body = None
    raw = d["raw"].decode("utf-8", "replace") if d.get("raw") is not None else None
    path: list[dict[str, Any]] = []
    audit = AuditRecord.__table__  # type: ignore[attr-defined]
    if d.get("packet_id"):
        for a in conn.execute(
            select(
                audit.c.seq,
                audit.c.at,
                audit.c.action,
                audit.c.outcome,
                audit.c.peer,
                audit.c.actor,
            )
            .where(audit.c.packet_id == d["packet_id"])
            .order_by(audit.c.seq)
        ):
            path.append(dict(a._mapping))
    receipt = d.get("receipt")
    intake = []
    if d.get("thread"):
        intake = [
            dict(r._mapping)
            for r in conn.execute(
                select(ADAPTER_INTAKE.c.adapter, ADAPTER_INTAKE.c.source_key, ADAPTER_INTAKE.c.at)
                .where(ADAPTER_INTAKE.c.thread == d["thread"])
                .order_by(ADAPTER_INTAKE.c.id)
            )
        ]
    return {
        "box": box,
        "id": rid,
        "headers": headers,
        "body": body,
        "raw": raw,
        "path": path,
        "receipt": receipt is not None,
        "intake": intake,
        "patient_hash": d.get("patient_hash"),
    }


def audit_body_read(
    ctx: Any,
    conn: Connection,
    msg: dict[str, Any],
    *,
    actor: str,
    role: str,
    address: str | None,
    via: str,
) -> None:
    """Opening a message's body or raw input is a read of patient data: one entry."""
    h = msg["headers"]
    ctx.audit.append(
        conn,
        [
            AuditEntry(
                action="read",
                actor=actor,
                actor_role=role,
                address=address,
                interaction="read",
                packet_id=h.get("packet_id"),
                kind=h.get("kind"),
                thread=h.get("thread"),
                patient_hash=msg.get("patient_hash"),
                at=ctx.now(),
                message="message body read",
                extra={"shown": f"{via} {msg['box']}/{msg['id']} body"},
            )
        ],
    )


def resend(
    ctx: Any,
    box: str,
    rid: int,
    *,
    reason: str,
    actor: str,
    role: str | None = None,
    address: str | None = None,
    node: Any = None,
) -> str:
    """Send an outbox packet (or dead letter) again, hand an inbox packet to its local system
    again, or replay a quarantined input; audited ``replayed`` with the reason. The receiver
    keeps packets by id, so a resend of a delivered packet is not delivered twice."""
    reason = (reason or "").strip()
    if not reason:
        raise InvalidResource("reason: a resend needs a reason (it is audited)")
    now = ctx.now()
    if box == "quarantine":
        from bridge import ops

        if node is None:
            raise InvalidResource("a quarantined input is replayed by the running node")
        ok, result = ops.quarantine_replay(
            ctx, node.intake, rid, actor=actor, adapters=node.adapters
        )
        with ctx.store.write() as conn:
            ctx.audit.append(
                conn,
                [
                    AuditEntry(
                        action="replayed",
                        actor=actor,
                        actor_role=role,
                        address=address,
                        at=now,
                        message=f"quarantine {rid} resent: {reason}"[:480],
                    )
                ],
            )
        return f"{'OK' if ok else 'FAILED'} {result}"
    table = _table(box)
    with ctx.store.write() as conn:
        row = conn.execute(select(table).where(table.c.id == rid)).first()
        if row is None:
            raise NotFound("no such message in that box")
        if table is OUTBOX:
            if row.body is None and row.frame is None:
                raise InvalidResource("the body was purged (retention): nothing to resend")
            conn.execute(
                update(OUTBOX)
                .where(OUTBOX.c.id == rid)
                .values(state="queued", next_try_at=now, attempts=0, last_error=None)
            )
            peer = row.recipient
        else:
            if row.body is None:
                raise InvalidResource("the body was purged (retention): nothing to resend")
            # its turn on the thread was used when it was first handed over: marked as a
            # redelivery, the thread gate lets it pass once more (else it is a stale seq)
            conn.execute(
                update(INBOX)
                .where(INBOX.c.id == rid)
                .values(
                    state="received",
                    next_try_at=now,
                    attempts=0,
                    last_error=f"{REDELIVER} resent by {actor}"[:500],
                )
            )
            peer = row.sender
        ctx.audit.append(
            conn,
            [
                AuditEntry(
                    action="replayed",
                    actor=actor,
                    actor_role=role,
                    address=address,
                    packet_id=row.packet_id,
                    kind=row.kind,
                    thread=row.thread,
                    peer=peer,
                    patient_hash=row.patient_hash,
                    at=now,
                    message=f"resent from {box}: {reason}"[:480],
                )
            ],
        )
    if node is not None:
        node.wake_all_senders()
        node.wake("deliver")
    return "queued"
