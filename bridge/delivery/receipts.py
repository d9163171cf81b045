"""A platform returns end-to-end receipts to their senders: every member in one round, one commit.

When a recipient accepts (or refuses) a packet the platform relayed, the platform queues the
recipient's signed receipt for the packet's sender (an outbox row of origin ``receipt``, see
``PeerSender._receipt_row``). Sent by each member's own send job, every member's returned
receipts were a durable commit of their own, every poll interval: with 50 members, 50 commits
a round, and the relay's own send jobs waited behind them for SQLite's one writer. Here one job
(``receipts``) claims the queued receipts of every hop in one read, posts each hop's batch at
once (a pool, one keep-alive connection per hop, apart from the hop's send job's connection),
and records every answer in one write transaction. The members' send jobs no longer take
receipt rows (``sender._HEAD``).

Nothing changes for the guarantees: a receipt row leaves ``queued`` only when the member's
answer to it is recorded; a crash between the post and that commit posts the receipt again,
and a member records a receipt once (``apply_receipt`` is idempotent). Receipts have no order
to keep, so a hop that fails backs off on its own rows only (``PeerSender.failed``) and the
other hops go on. On PostgreSQL with several processes, each returns the receipts of the
lanes it holds (``lanes.py``, job ``receipts``).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, select, text

from bridge import faults
from bridge.audit.events import AuditEntry
from bridge.context import NodeContext
from bridge.delivery.lanes import Lanes, lane_of
from bridge.delivery.sender import HEAD_COLUMNS, MAX_BATCH_BYTES, PeerSender, SendReport
from bridge.errors import HutongError
from bridge.store.tables import OUTBOX, RECEIPTS_WHERE

#: the condition of the partial index ``ix_outbox_receipts`` written out literally: a planner
#: uses a partial index only when the query's WHERE implies the index's, which bound
#: parameters cannot show
_DUE = (
    select(*HEAD_COLUMNS, OUTBOX.c.next_hop)
    .where(text(RECEIPTS_WHERE), OUTBOX.c.next_try_at <= bindparam("_now"))
    .order_by(OUTBOX.c.id)
    .limit(bindparam("_limit"))
)
#: hops posted to at once
MAX_POSTS = 16


class ReceiptReturn:
    """The platform's ``receipts`` job: ``run_once`` is one claim-post-record round."""

    def __init__(
        self,
        ctx: NodeContext,
        hops: list[str],
        lanes: Lanes | None = None,
        paused: Callable[[str], bool] | None = None,
    ) -> None:
        self.ctx = ctx
        self.lanes = lanes
        self.paused = paused or (lambda hop: False)
        #: per hop, a sender of its own (its connection and its record and backoff steps)
        self.senders = {hop: PeerSender(ctx, hop) for hop in hops}
        self.batch = ctx.plan.delivery.batch_size
        self._pool: ThreadPoolExecutor | None = None

    def claim(self, now: datetime) -> dict[str, list[Any]]:
        """The due receipts of every hop, oldest first, at most a batch (and 8 MiB) per hop."""
        stmt = _DUE
        if self.lanes is not None:
            held = self.lanes.hold("receipts")
            if held is not None:
                if not held:
                    return {}
                stmt = stmt.where(lane_of(OUTBOX.c.thread).in_(sorted(held)))
        limit = self.batch * max(1, min(len(self.senders), MAX_POSTS))
        with self.ctx.store.read() as conn:
            rows = conn.execute(stmt, {"_now": now, "_limit": limit}).all()
        per_hop: dict[str, list[Any]] = {}
        size: dict[str, int] = {}
        for r in rows:
            if r.next_hop not in self.senders or self.paused(r.next_hop):
                continue
            part = per_hop.setdefault(r.next_hop, [])
            n = len(r.frame or b"")
            if len(part) >= self.batch or (part and size[r.next_hop] + n > MAX_BATCH_BYTES):
                continue
            part.append(r)
            size[r.next_hop] = size.get(r.next_hop, 0) + n
        return per_hop

    def run_once(self) -> SendReport:
        now = self.ctx.now()
        per_hop = self.claim(now)
        if not per_hop:
            return SendReport()
        faults.point("sender.after_commit_before_send")
        hops = sorted(per_hop)
        if len(hops) == 1:
            outcomes = [self._post(hops[0], per_hop[hops[0]])]
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(MAX_POSTS, thread_name_prefix="receipts")
            outcomes = list(self._pool.map(lambda h: self._post(h, per_hop[h]), hops))
        report = SendReport()
        with self.ctx.store.write() as conn:  # every hop's answers: one commit
            entries: list[AuditEntry] = []
            for hop, outcome in zip(hops, outcomes, strict=True):
                sender, rows = self.senders[hop], per_hop[hop]
                if isinstance(outcome, HutongError):
                    sender.failed(rows, outcome, conn=conn)
                    report.failed += len(rows)
                    report.error = report.error or str(outcome)
                else:
                    entries += sender.record_answers(conn, outcome)
                    report.sent += len(rows)
            if entries:
                self.ctx.audit.append_at_commit(conn, entries)
        return report

    def _post(self, hop: str, rows: list[Any]) -> Any:
        """One hop's batch on that hop's connection: the checked answers, or the error."""
        sender = self.senders[hop]
        frames = [bytes(r.frame) for r in rows]
        try:
            return sender.exchange(sender.conn, rows, frames)
        except HutongError as exc:
            return exc

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        for sender in self.senders.values():
            sender.close()
