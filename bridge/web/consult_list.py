"""The consultations list: the centre's queue and the inviting side's own consultations, with
filters, search by patient, a total count and keyset paging (no silent cap, like the referral
list in ``referral_list.py``, whose patient search and page tokens it shares)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, and_, func, or_, select

from bridge.consult.tables import CONSULTATION
from bridge.web.referral_list import PAGE, _patient, decode_after, encode_after, hashes_for

C = CONSULTATION


def page(
    conn: Connection,
    key: bytes,
    *,
    side: str | None = None,
    step: str | None = None,
    kind: str | None = None,
    peer: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    q: str | None = None,
    after: str | None = None,
    patient_hash: str | None = None,
    size: int = PAGE,
) -> tuple[list[dict[str, Any]], int, str | None]:
    """(rows with ``patient_name``, ``record_no`` and ``patient_id``, total matching, the next
    page's token). ``side`` is ``centre`` (the queue) or ``inviter``; ``peer`` the other
    member; ``since``/``until`` bound the request time."""
    where: list[Any] = []
    if side in ("centre", "inviter"):
        where.append(C.c.side == side)
    if step:
        where.append(C.c.step == step)
    if kind:
        where.append(C.c.kind == kind)
    if peer:
        where.append(or_(C.c.inviter == peer, C.c.centre == peer))
    if since is not None:
        where.append(C.c.created_at >= since)
    if until is not None:
        where.append(C.c.created_at < until)
    if patient_hash:
        where.append(C.c.patient_hash == patient_hash)
    if q and q.strip():
        hashes = hashes_for(conn, key, q)
        where.append(C.c.patient_hash.in_(hashes) if hashes else C.c.thread.is_(None))
    total = (
        conn.execute(select(func.count()).select_from(C).where(and_(True, *where))).scalar() or 0
    )
    page_where = list(where)
    if after:
        at, thread = decode_after(after)
        page_where.append(or_(C.c.updated_at < at, and_(C.c.updated_at == at, C.c.thread < thread)))
    rows = [
        dict(r._mapping)
        for r in conn.execute(
            select(C)
            .where(and_(True, *page_where))
            .order_by(C.c.updated_at.desc(), C.c.thread.desc())
            .limit(size + 1)
        )
    ]
    nxt = encode_after(rows[size - 1]) if len(rows) > size else None
    rows = rows[:size]
    for r in rows:
        r["patient_name"], r["record_no"], r["patient_id"] = _patient(conn, r)
    return rows, total, nxt
