"""Hand received packets to local handlers in arrival order (sequence order within a thread).

Delivery and the ``delivered`` mark commit together for handlers that write in the node's own
transaction; external handlers are idempotent by packet id, so a crash in between redelivers
the same packet and the local side still sees it once. On PostgreSQL several processes may
deliver: each takes only the threads of the lanes it holds (``lanes.py``), so a thread is
delivered by one process at a time, in order.

A round: claim a batch (``_claim``), apply the in-node steps of batched kinds together
(``_apply_batched``: the results inbox, a few packets a write transaction), hand each packet
over in order (``_admit``, its hook, ``_hand_over``), flush the handlers, then commit the
round's outcome in one write transaction (``_close``). So a batch of N result packets no
longer costs N + 1 write commits and N reads, each queued with the intake's on SQLite's one
writer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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
#: the received rows, oldest first: a range of ``ix_inbox_pending (state, id)``, in its order
#: (no sort), however many rows were delivered before (tests/test_store_growth_plans.py)
RECEIVED = (
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
)
#: what ``Dispatcher._admit`` answers for a packet of a kind no handler takes (it fails)
_NO_HANDLER = object()


@dataclass(frozen=True, slots=True)
class BatchHook:
    """A hook whose in-node step is applied for all of a round's packets of its kinds at once.

    ``apply_many(items)`` stores them in order, several a write transaction, and answers per
    packet its event, its error, or None (not applied: an earlier packet of its thread
    failed); ``then(item, event)`` runs per packet when the round hands it over, after that
    commit (the parts of the step that reach outside the node: the PACS)."""

    apply_many: Callable[[Sequence[Delivery]], Sequence[Any]]
    then: Callable[[Delivery, Any], Any] | None = None


@dataclass(slots=True)
class _Round:
    """What one dispatcher round decided, committed together at its end."""

    blocked: set[str] = field(default_factory=set)  # threads that wait until the next round
    delivered: list[Any] = field(default_factory=list)
    failed: list[tuple[Any, HutongError]] = field(default_factory=list)
    held: list[tuple[Any, int]] = field(default_factory=list)
    refused: list[tuple[Any, ThreadRefused]] = field(default_factory=list)


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
        rows, gate = self._claim()
        if not rows:
            return 0
        now = self.ctx.now()
        applied = self._apply_batched(rows, gate, now)
        # hand over outside any transaction: handlers may do slow I/O (sockets, fsync)
        rnd = _Round()
        for r in rows:
            handler = self._admit(gate, r, now, rnd)
            if handler is None:
                continue
            redo = _redelivery(r)  # a dead letter IT sent again: its turn was used already
            try:
                if handler is _NO_HANDLER:
                    raise HutongError(f"no local handler for kind '{r.kind}'")
                item = _delivery(r)
                event: Any = None
                for prefix, hook in self.hooks.items():
                    if r.kind.startswith(prefix):
                        event = _run_hook(hook, item, applied)
                _hand_over(handler, item, event)
            except Exception as exc:  # noqa: BLE001 - an adapter's bug must not stop delivery
                rnd.blocked.add(r.thread)
                err = as_failure(exc)  # OSError: transient; anything else: ambiguous
                rnd.failed.append((r, err))
                if not redo:
                    self._turn(gate, r, err)
                continue
            if not redo:
                gate.taken(r)
            rnd.delivered.append(r)
            faults.point("dispatcher.during_delivery")
        for h in {id(h): h for h in self.handlers.values()}.values():
            flush = getattr(h, "flush", None)
            if flush is not None:
                flush()
        self._close(rnd, gate)
        return len(rnd.delivered)

    def _claim(self) -> tuple[list[Any], ThreadGate]:
        """The next batch of received rows (of the lanes this process holds), oldest first, and
        the thread gate loaded for their threads."""
        stmt = RECEIVED.limit(self.batch)
        gate = ThreadGate(self.ctx.node_id)
        if self.lanes is not None:
            lanes = self.lanes.hold("deliver")
            if lanes is not None:
                if not lanes:
                    return [], gate
                stmt = stmt.where(lane_of(INBOX.c.thread).in_(sorted(lanes)))
        with self.ctx.store.read() as conn:
            rows = list(conn.execute(stmt).all())
            if rows:
                gate.load(conn, (r.thread for r in rows))
        return rows, gate

    def _admit(self, gate: ThreadGate, r: Any, now: Any, rnd: _Round) -> Any:
        """May the round hand ``r`` over now? Its handler (``_NO_HANDLER``: none is configured),
        or None: it waits behind an earlier packet of its thread, is held for its turn or
        refused (noted in ``rnd``), or its adapter is paused."""
        if r.thread in rnd.blocked:  # keep order: nothing passes an earlier packet waiting
            return None
        if r.next_try_at > now:  # backing off: later packets of its thread wait behind it
            rnd.blocked.add(r.thread)
            return None
        try:  # only the thread's party, only its next seq (threads.py)
            if not _redelivery(r) and gate.judge(r) == HOLD:
                rnd.held.append((r, gate.due(r)))
                return None
        except ThreadRefused as exc:
            rnd.refused.append((r, exc))
            return None
        handler = self.handler_for(r.kind)
        if handler is not None and self.held(handler):  # paused by IT: wait, no attempt
            rnd.blocked.add(r.thread)
            return None
        return _NO_HANDLER if handler is None else handler

    def _apply_batched(self, rows: list[Any], gate: ThreadGate, now: Any) -> dict[str, Any]:
        """The in-node step of every packet the round will hand over whose hook is a
        :class:`BatchHook` (the results inbox), all at once before anything is handed over
        (a few packets a write transaction), instead of a transaction per packet while the
        intake waits for the same single writer (SQLite). The batch is walked as the round
        will walk it (the same admission, on a copy of the gate, each packet assumed to
        pass); a thread's packets are taken up to its first packet of another kind, whose own
        step runs (and may fail) in the round first. What each packet's step answered (its
        event, or its error) is used when the round reaches it. A packet whose step was
        applied here but which the round then does not hand over (an earlier packet's handler
        failed) is handed over in a later round, in its thread's order; the step is
        idempotent by packet id."""
        batched = [(p, h) for p, h in self.hooks.items() if isinstance(h, BatchHook)]
        if not batched:
            return {}
        scratch, rnd = gate.copy(), _Round()
        picked: dict[int, list[Delivery]] = {}
        for r in rows:
            handler = self._admit(scratch, r, now, rnd)
            if handler is None:
                continue
            if handler is _NO_HANDLER:  # the round fails it: its thread waits
                rnd.blocked.add(r.thread)
                continue
            hooks = [h for p, h in self.hooks.items() if r.kind.startswith(p)]
            if len(hooks) != 1 or not isinstance(hooks[0], BatchHook):
                rnd.blocked.add(r.thread)  # applied by the round first; may fail
                continue
            picked.setdefault(id(hooks[0]), []).append(_delivery(r))
            if not _redelivery(r):
                scratch.taken(r)
        applied: dict[str, Any] = {}
        for _, hook in batched:
            items = picked.get(id(hook), [])
            if items:
                outcomes = hook.apply_many(items)
                applied.update(
                    (i.packet_id, o)
                    for i, o in zip(items, outcomes, strict=True)
                    if o is not None  # not applied: behind a failed packet of its thread
                )
        if applied:
            faults.point("dispatcher.after_batch_applied")
        return applied

    def _close(self, rnd: _Round, gate: ThreadGate) -> None:
        """One write transaction for the round's outcome: the delivered marks, failures,
        holds and refusals, the thread gate's new turns, and their audit rows."""
        now = self.ctx.now()
        with self.ctx.store.write() as conn:
            audit: list[AuditEntry] = []
            if rnd.delivered:
                conn.execute(
                    update(INBOX)
                    .where(INBOX.c.id.in_([r.id for r in rnd.delivered]))
                    .values(state="delivered", delivered_at=now, attempts=INBOX.c.attempts + 1)
                )
            for r in rnd.delivered:
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
            for r, failure in rnd.failed:
                audit.extend(self._failed(conn, r, failure))
            audit.extend(self._hold(conn, rnd.held, now))
            audit.extend(self._refuse(conn, rnd.refused, now))
            gate.commit(conn, now)  # after the holds: a packet now due goes back to the queue
            if audit:
                self.ctx.audit.append_at_commit(conn, audit)

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


def _run_hook(hook: Any, item: Delivery, applied: dict[str, Any]) -> Any:
    """The packet's in-node step: a plain hook runs now; a BatchHook's stored part was applied
    with the round's batch (``applied``), or is applied now, alone."""
    if not isinstance(hook, BatchHook):
        return hook(item)
    out = applied.pop(item.packet_id, None)
    if out is None:
        out = hook.apply_many([item])[0]
    if isinstance(out, Exception):
        raise out
    return hook.then(item, out) if hook.then is not None else out


def _hand_over(handler: Any, item: Delivery, event: Any) -> None:
    """One handler per event, already decoded; the engine's own handlers take the bytes."""
    if isinstance(event, ReferralEvent) and isinstance(handler, ReferralSink):
        handler.on_referral(event)
    elif isinstance(event, ResultEvent) and isinstance(handler, ResultSink):
        handler.on_result(event)
    elif isinstance(event, ConsultEvent) and isinstance(handler, ConsultSink):
        handler.on_consult(event)
    elif isinstance(event, ConsultEvent) and isinstance(handler, (ReferralSink, ResultSink)):
        pass  # an adapter from before consultations: the step is applied already
    elif event is None and isinstance(handler, PacketSink):
        handler.on_packet(PacketEvent(item, decode_bundle(item)))
    else:
        handler.deliver(item)


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
