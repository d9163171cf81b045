"""Hand received packets to local handlers in arrival order (sequence order within a thread).

Delivery and the ``delivered`` mark commit together for handlers that write in the node's own
transaction; external handlers are idempotent by packet id, so a crash in between redelivers
the same packet and the local side still sees it once. On PostgreSQL several processes may
deliver: each takes only the threads of the lanes it holds (``lanes.py``), so a thread is
delivered by one process at a time, in order.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update

from bridge import faults
from bridge.audit.events import AuditEntry
from bridge.context import NodeContext
from bridge.delivery.handlers import Delivery, Handler
from bridge.delivery.lanes import Lanes, lane_of
from bridge.delivery.sender import backoff
from bridge.delivery.threads import HOLD, ThreadGate
from bridge.errors import HutongError, Retry, ThreadRefused
from bridge.local.contract import (
    ConsultEvent,
    ConsultSink,
    PacketEvent,
    PacketSink,
    ReferralEvent,
    ReferralSink,
    ResultEvent,
    ResultSink,
    as_failure,
    decode_bundle,
)
from bridge.store.quarantine import quarantine_row
from bridge.store.tables import INBOX, QUARANTINE

#: ``last_error`` of an inbox row a dead letter went back to (``hutong quarantine replay``): the
#: thread gate lets it pass though its turn was used when it was dead-lettered
REDELIVER = "redeliver:"


class Dispatcher:
    def __init__(
        self,
        ctx: NodeContext,
        handlers: dict[str, Handler],
        hooks: dict[str, Any] | None = None,
        lanes: Lanes | None = None,
    ) -> None:
        """``hooks`` maps a kind prefix (e.g. ``referral.``) to an in-node step that runs before
        the local handler (the referral workflow applies its packets there)."""
        self.ctx = ctx
        self.handlers = handlers
        self.hooks = hooks or {}
        self.lanes = lanes
        self.held: Callable[[Any], bool] = lambda handler: False  # node: paused adapters
        self.batch = ctx.plan.delivery.batch_size

    def handler_for(self, kind: str) -> Handler | None:
        """Exact kind first, then the longest ``prefix.*`` pattern, then ``*``."""
        found = self.handlers.get(kind)
        if found is not None:
            return found
        best = max(
            (p for p in self.handlers if p.endswith(".*") and kind.startswith(p[:-1])),
            key=len,
            default=None,
        )
        return self.handlers[best] if best else self.handlers.get("*")

    def run_once(self) -> int:
        """Deliver one batch; returns how many were handed over."""
        now = self.ctx.now()
        stmt = (
            select(
                INBOX.c.id,
                INBOX.c.packet_id,
                INBOX.c.sender,
                INBOX.c.kind,
                INBOX.c.thread,
                INBOX.c.seq,
                INBOX.c.patient_hash,
                INBOX.c.received_at,
                INBOX.c.body,
                INBOX.c.attempts,
                INBOX.c.next_try_at,
                INBOX.c.last_error,
            )
            .where(INBOX.c.state == "received")
            .order_by(INBOX.c.id)
            .limit(self.batch)
        )
        if self.lanes is not None:
            lanes = self.lanes.hold("deliver")
            if lanes is not None:
                if not lanes:
                    return 0
                stmt = stmt.where(lane_of(INBOX.c.thread).in_(sorted(lanes)))
        gate = ThreadGate(self.ctx.node_id)
        with self.ctx.store.read() as conn:
            rows = conn.execute(stmt).all()
            if rows:
                gate.load(conn, (r.thread for r in rows))
        if not rows:
            return 0
        # hand over outside any transaction: handlers may do slow I/O (sockets, fsync)
        blocked: set[str] = set()
        delivered: list[Any] = []
        failed: list[tuple[Any, HutongError]] = []
        held: list[tuple[Any, int]] = []
        refused: list[tuple[Any, ThreadRefused]] = []
        for r in rows:
            if r.thread in blocked:  # keep order: nothing passes an earlier packet waiting
                continue
            if r.next_try_at > now:  # backing off: later packets of its thread wait behind it
                blocked.add(r.thread)
                continue
            redo = _redelivery(r)  # a dead letter IT sent again: its turn was used already
            try:  # only the thread's party, only its next seq (threads.py)
                if not redo and gate.judge(r) == HOLD:
                    held.append((r, gate.due(r)))
                    continue
            except ThreadRefused as exc:
                refused.append((r, exc))
                continue
            handler = self.handler_for(r.kind)
            if handler is not None and self.held(handler):  # paused by IT: wait, no attempt
                blocked.add(r.thread)
                continue
            try:
                if handler is None:
                    raise HutongError(f"no local handler for kind '{r.kind}'")
                item = _delivery(r)
                event: Any = None
                for prefix, hook in self.hooks.items():
                    if r.kind.startswith(prefix):
                        event = hook(item)
                # one handler per event, already decoded; the engine's own handlers: the bytes
                if isinstance(event, ReferralEvent) and isinstance(handler, ReferralSink):
                    handler.on_referral(event)
                elif isinstance(event, ResultEvent) and isinstance(handler, ResultSink):
                    handler.on_result(event)
                elif isinstance(event, ConsultEvent) and isinstance(handler, ConsultSink):
                    handler.on_consult(event)
                elif isinstance(event, ConsultEvent) and isinstance(
                    handler, (ReferralSink, ResultSink)
                ):
                    pass  # an adapter from before consultations: the step is applied already
                elif event is None and isinstance(handler, PacketSink):
                    handler.on_packet(PacketEvent(item, decode_bundle(item)))
                else:
                    handler.deliver(item)
            except Exception as exc:  # noqa: BLE001 - an adapter's bug must not stop delivery
                blocked.add(r.thread)
                err = as_failure(exc)  # OSError: transient; anything else: ambiguous
                failed.append((r, err))
                if not redo:
                    self._turn(gate, r, err)
                continue
            if not redo:
                gate.taken(r)
            delivered.append(r)
            faults.point("dispatcher.during_delivery")
        for h in {id(h): h for h in self.handlers.values()}.values():
            flush = getattr(h, "flush", None)
            if flush is not None:
                flush()
        now = self.ctx.now()
        with self.ctx.store.write() as conn:
            audit: list[AuditEntry] = []
            if delivered:
                conn.execute(
                    update(INBOX)
                    .where(INBOX.c.id.in_([r.id for r in delivered]))
                    .values(state="delivered", delivered_at=now, attempts=INBOX.c.attempts + 1)
                )
            for r in delivered:
                audit.append(
                    AuditEntry(
                        action="delivered",
                        packet_id=r.packet_id,
                        kind=r.kind,
                        peer=r.sender,
                        thread=r.thread,
                        patient_hash=r.patient_hash,
                        at=now,
                    )
                )
            for r, failure in failed:
                audit.extend(self._failed(conn, r, failure))
            audit.extend(self._hold(conn, held, now))
            audit.extend(self._refuse(conn, refused, now))
            gate.commit(conn, now)  # after the holds: a packet now due goes back to the queue
            if audit:
                self.ctx.audit.append(conn, audit)
        return len(delivered)

    def _turn(self, gate: ThreadGate, r: Any, exc: HutongError) -> None:
        """A packet refused for good has had its turn (the next one is due); one that will be
        retried keeps it."""
        if exc.retry is Retry.PERMANENT or r.attempts + 1 >= self.ctx.plan.delivery.max_attempts:
            gate.taken(r)
        else:
            gate.forget(r)

    def _hold(self, conn: Any, held: list[tuple[Any, int]], now: Any) -> list[AuditEntry]:
        """Packets ahead of their turn wait (state ``held``), audited when first held."""
        out: list[AuditEntry] = []
        for r, due in held:
            note = f"held: seq {r.seq} waits for seq {due} from {r.sender} on its thread"
            conn.execute(
                update(INBOX).where(INBOX.c.id == r.id).values(state="held", last_error=note)
            )
            if not (r.last_error or "").startswith("held:"):
                out.append(
                    AuditEntry(
                        action="held",
                        outcome="4",
                        packet_id=r.packet_id,
                        kind=r.kind,
                        peer=r.sender,
                        thread=r.thread,
                        patient_hash=r.patient_hash,
                        message=note,
                        at=now,
                    )
                )
        return out

    def _refuse(
        self, conn: Any, refused: list[tuple[Any, ThreadRefused]], now: Any
    ) -> list[AuditEntry]:
        """A packet from outside its thread, or behind its turn: refused, kept, audited."""
        out: list[AuditEntry] = []
        for r, exc in refused:
            conn.execute(
                update(INBOX)
                .where(INBOX.c.id == r.id)
                .values(state="refused", last_error=str(exc)[:500])
            )
            conn.execute(
                QUARANTINE.insert(),
                [
                    quarantine_row(
                        now,
                        "thread",
                        exc,
                        raw=r.body or b"",
                        sender=r.sender,
                        packet_id=r.packet_id,
                        kind=r.kind,
                        thread=r.thread,
                        patient_hash=r.patient_hash,
                    )
                ],
            )
            out.append(
                AuditEntry(
                    action="refused",
                    outcome="4",
                    packet_id=r.packet_id,
                    kind=r.kind,
                    peer=r.sender,
                    thread=r.thread,
                    patient_hash=r.patient_hash,
                    code=exc.code,
                    message=exc.message,
                    at=now,
                )
            )
        return out

    def _failed(self, conn: Any, r: Any, exc: HutongError) -> list[AuditEntry]:
        now = self.ctx.now()
        attempts = r.attempts + 1
        cfg = self.ctx.plan.delivery
        if exc.retry is Retry.PERMANENT or attempts >= cfg.max_attempts:
            conn.execute(
                update(INBOX)
                .where(INBOX.c.id == r.id)
                .values(state="failed", attempts=attempts, last_error=str(exc)[:500])
            )
            conn.execute(
                QUARANTINE.insert(),
                [
                    quarantine_row(
                        now,
                        "delivery",
                        exc,
                        raw=r.body or b"",
                        sender=r.sender,
                        packet_id=r.packet_id,
                        kind=r.kind,
                        thread=r.thread,
                        patient_hash=r.patient_hash,
                    )
                ],
            )
            return [
                AuditEntry(
                    action="dead-lettered",
                    outcome="8",
                    packet_id=r.packet_id,
                    kind=r.kind,
                    peer=r.sender,
                    thread=r.thread,
                    patient_hash=r.patient_hash,
                    code=exc.code,
                    message=exc.message,
                    at=now,
                )
            ]
        mark = f"{REDELIVER} " if _redelivery(r) else ""  # still passes the gate next time
        conn.execute(
            update(INBOX)
            .where(INBOX.c.id == r.id)
            .values(
                attempts=attempts,
                last_error=(mark + str(exc))[:500],
                next_try_at=now + timedelta(seconds=backoff(attempts, cfg)),
            )
        )
        return []


def _redelivery(r: Any) -> bool:
    return (r.last_error or "").startswith(REDELIVER)


def _delivery(r: Any) -> Delivery:
    return Delivery(
        r.packet_id,
        r.sender,
        r.kind,
        r.thread,
        r.seq,
        r.patient_hash,
        r.received_at,
        bytes(r.body or b""),
    )
