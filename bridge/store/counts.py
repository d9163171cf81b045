"""Rows per queue and state for IT (the dashboard, ``/metrics``, ``/local/v1/queues``), read
from index entries: nothing here reads an outbox or inbox row of a finished packet.

A ``GROUP BY next_hop, state`` with ``min(created_at)`` over the whole outbox read every row
from the table (2.3 s at 1 M packets, bench/README.md ``growth``). The waiting and dead rows
come from the partial index ``ix_outbox_open`` (only those rows); the finished ones
(acknowledged, refused) are counted in ``ix_outbox_due`` without touching the table (a
covering index count: it still grows with the store, at a few tens of ms a million, and
without it the queues lose their acknowledged count, which IT and the tests wait on); the
inbox's counts likewise in ``ix_inbox_pending (state, id)``, each state's oldest row being its
first id there (ids are handed out in arrival order).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Connection, bindparam, func, select, text

from bridge.store.tables import INBOX, OPEN_WHERE, OUTBOX

DONE = ("acknowledged", "refused")
DONE_WHERE = "state IN ('acknowledged', 'refused')"
#: per hop and open state: rows, and the oldest's creation (ix_outbox_open)
OPEN_COUNTS = (
    select(OUTBOX.c.next_hop, OUTBOX.c.state, func.count(), func.min(OUTBOX.c.created_at))
    .where(text(OPEN_WHERE))
    .group_by(OUTBOX.c.next_hop, OUTBOX.c.state)
)
#: per hop and finished state: rows (a covering count of ix_outbox_due)
DONE_COUNTS = (
    select(OUTBOX.c.next_hop, OUTBOX.c.state, func.count())
    .where(text(DONE_WHERE))
    .group_by(OUTBOX.c.next_hop, OUTBOX.c.state)
)
#: inbox rows per state (a covering count of ix_inbox_pending)
INBOX_COUNTS = select(INBOX.c.state, func.count(), func.min(INBOX.c.id)).group_by(INBOX.c.state)
INBOX_AT = select(INBOX.c.received_at).where(INBOX.c.id == bindparam("id"))


def outbox(conn: Connection) -> list[tuple[str, str, int, datetime | None]]:
    """(hop, state, rows, oldest created) for every hop and state present; oldest is None for
    the finished states."""
    rows: list[tuple[str, str, int, datetime | None]] = [
        (hop, st, n, oldest) for hop, st, n, oldest in conn.execute(OPEN_COUNTS)
    ]
    rows += [(hop, st, n, None) for hop, st, n in conn.execute(DONE_COUNTS)]
    return rows


def inbox(conn: Connection) -> list[tuple[str, int, datetime]]:
    """(state, rows, received at of its oldest row) per state present."""
    return [
        (st, n, conn.execute(INBOX_AT, {"id": first}).scalar_one())
        for st, n, first in conn.execute(INBOX_COUNTS).all()
    ]
