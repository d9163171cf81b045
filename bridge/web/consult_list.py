"""The consultations list: the centre's queue and the inviting side's own consultations, with
filters, search by patient, a total count and keyset paging (no silent cap, like the referral
list in ``referral_list.py``, whose patient search and page tokens it shares)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, or_

from bridge.consult.tables import CONSULTATION
from bridge.web.referral_list import PAGE, thread_page

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
    return thread_page(
        conn, C, where, key=key, q=q, patient_hash=patient_hash, after=after, size=size
    )
