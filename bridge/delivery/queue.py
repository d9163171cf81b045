"""Queue packets for sending, in the caller's transaction (the business write and the queueing
commit together or not at all). A packet the rules refuse never enters the outbox."""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Connection, func, insert, select

from bridge import faults
from bridge.audit.events import AuditEntry
from bridge.context import NodeContext
from bridge.crypto.envelope import body_digest
from bridge.delivery.egress import check_egress
from bridge.delivery.threads import open_threads
from bridge.errors import PacketRefused, PacketTooLarge, RouteDenied
from bridge.fhir.validate import parse_and_validate_bundle
from bridge.privacy import bundle_patient_hash
from bridge.store.quarantine import bundle_patient, known_patient, quarantine_row
from bridge.store.tables import OUTBOX, QUARANTINE

#: a validator message quotes the offending value (``path: 'value' is not one of [...]``,
#: ``expected number, got string 'value'``); the audit keeps the path and the rule, not the value
_QUOTED_VALUE = re.compile(r"(: |got \w+ )'(?:[^'\\]|\\.)*'(\.\.\.)?")


def audit_safe(message: str) -> str:
    """A refusal message without the offending values, for the audit trail and its exports."""
    return _QUOTED_VALUE.sub(r"\1<value withheld>", message)


@dataclass(slots=True)
class Outgoing:
    recipient: str
    kind: str
    body: bytes
    thread: str | None = None


@dataclass(slots=True)
class Queued:
    packet_id: str | None
    error: PacketRefused | None = None


def check_route(ctx: NodeContext, recipient: str, kind: str) -> None:
    plan = ctx.plan
    if recipient not in plan.directory:
        raise RouteDenied(f"unknown member '{recipient}'")
    if recipient == plan.node_id:
        raise RouteDenied("a node does not send packets to itself")
    if not plan.rules.allows(plan.node_id, recipient, kind):
        raise RouteDenied(f"no rule allows {plan.node_id} -> {recipient} kind {kind}")


def queue_packets(
    ctx: NodeContext, conn: Connection, items: Sequence[Outgoing], *, actor: str | None = None
) -> list[Queued]:
    """Validate, route-check and insert; refusals are quarantined and audited, not raised."""
    plan = ctx.plan
    now = ctx.now()
    rows: list[dict[str, object]] = []
    refused: list[dict[str, object]] = []
    audit: list[AuditEntry] = []
    results: list[Queued] = []
    next_seq: dict[tuple[str, str], int] = {}
    for item in items:
        packet_id = str(uuid.uuid4())
        thread = item.thread or packet_id
        try:
            if len(item.body) > plan.limits.max_body_bytes:
                raise PacketTooLarge(
                    f"body is {len(item.body)} bytes, limit {plan.limits.max_body_bytes}"
                )
            check_route(ctx, item.recipient, item.kind)
            bundle = parse_and_validate_bundle(item.body)
            check_egress(bundle, plan.egress_refused_systems, item.body)
        except PacketRefused as exc:
            refused.append(
                quarantine_row(
                    now,
                    "local",
                    exc,
                    raw=item.body,
                    sender=plan.node_id,
                    recipient=item.recipient,
                    packet_id=packet_id,
                    kind=item.kind,
                    thread=item.thread,
                    patient_hash=bundle_patient(
                        item.body, plan.patient_hash_key, plan.alliance.national_id_system
                    )
                    or (known_patient(conn, thread=item.thread) if item.thread else None),
                )
            )
            audit.append(
                AuditEntry(
                    action="refused",
                    outcome="4",
                    packet_id=packet_id,
                    kind=item.kind,
                    peer=item.recipient,
                    thread=thread,
                    actor=actor,
                    code=exc.code,
                    message=audit_safe(exc.message),
                    at=now,
                )
            )
            results.append(Queued(None, exc))
            continue
        # numbered per thread AND recipient: each recipient takes a thread's packets only at
        # the next seq it expects from us (bridge/delivery/threads.py), so no gaps
        turn = (thread, item.recipient)
        if turn not in next_seq:
            last = conn.execute(
                select(func.max(OUTBOX.c.seq)).where(
                    OUTBOX.c.thread == thread,
                    OUTBOX.c.sender == plan.node_id,
                    OUTBOX.c.recipient == item.recipient,
                )
            ).scalar()
            next_seq[turn] = (last or 0) + 1
        seq = next_seq[turn]
        next_seq[turn] = seq + 1
        phash = bundle_patient_hash(plan.patient_hash_key, bundle, plan.alliance.national_id_system)
        if phash is None and item.thread:  # a status or result on a known patient's thread
            phash = known_patient(conn, thread=item.thread)
        rows.append(
            {
                "packet_id": packet_id,
                "origin": "local",
                "sender": plan.node_id,
                "recipient": item.recipient,
                "next_hop": plan.next_hop(item.recipient),
                "kind": item.kind,
                "thread": thread,
                "seq": seq,
                "digest": body_digest(item.body),
                "size": len(item.body),
                "patient_hash": phash,
                "state": "queued",
                "attempts": 0,
                "created_at": now,
                "next_try_at": now,
                "body": item.body,
            }
        )
        audit.append(
            AuditEntry(
                action="queued",
                packet_id=packet_id,
                kind=item.kind,
                peer=item.recipient,
                thread=thread,
                patient_hash=phash,
                actor=actor,
                at=now,
            )
        )
        results.append(Queued(packet_id))
    if rows:
        conn.execute(insert(OUTBOX), rows)
        open_threads(
            conn, plan.node_id, [(str(r["thread"]), str(r["recipient"])) for r in rows], now
        )
    if refused:
        conn.execute(insert(QUARANTINE), refused)
    if audit:
        ctx.audit.append_at_commit(conn, audit)
    faults.point("queue.before_commit")
    return results
