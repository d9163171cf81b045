"""Quarantine rows: every refused input is kept with its reason and raw bytes."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, select, update

from bridge.errors import HutongError, NotFound
from bridge.store.tables import QUARANTINE


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
) -> dict[str, Any]:
    return {
        "at": at, "source": source, "code": exc.code, "message": exc.message,
        "sender": sender, "recipient": recipient, "packet_id": packet_id, "kind": kind,
        "thread": thread, "state": "held", "raw": raw, "body": body,
    }


def list_items(
    conn: Connection, *, state: str | None = "held", limit: int = 100
) -> list[dict[str, Any]]:
    q = QUARANTINE
    stmt = select(
        q.c.id, q.c.at, q.c.source, q.c.code, q.c.message, q.c.sender, q.c.recipient,
        q.c.packet_id, q.c.kind, q.c.state, q.c.replayed_at, q.c.replay_result,
    ).order_by(q.c.id.desc()).limit(limit)
    if state:
        stmt = stmt.where(q.c.state == state)
    return [dict(r._mapping) for r in conn.execute(stmt)]


def get_item(conn: Connection, item_id: int) -> dict[str, Any]:
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

    rows = conn.execute(
        select(QUARANTINE.c.state, func.count()).group_by(QUARANTINE.c.state)
    ).all()
    return {state: n for state, n in rows}
