"""Operations IT runs on a node, shared by the CLI and the local API: list what waits and why,
retry the outbox, inspect and replay quarantine. They work on the store directly, so they work
whether or not the node process is running."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import select, update

from bridge.audit.events import AuditEntry
from bridge.context import NodeContext
from bridge.delivery.queue import Outgoing, queue_packets
from bridge.errors import HutongError, NotFound
from bridge.store import counts, quarantine
from bridge.store.tables import INBOX, OUTBOX

WAITING = ("queued", "sent")


def outbox_query(*, state: str | None = None, peer: str | None = None) -> tuple[Any, list[Any]]:
    """(SELECT of the outbox columns IT sees, conditions) for ``state`` (default: what waits,
    the dead and the refused) and ``peer`` (the next hop)."""
    stmt = select(
        OUTBOX.c.id,
        OUTBOX.c.packet_id,
        OUTBOX.c.origin,
        OUTBOX.c.recipient,
        OUTBOX.c.next_hop,
        OUTBOX.c.kind,
        OUTBOX.c.thread,
        OUTBOX.c.seq,
        OUTBOX.c.state,
        OUTBOX.c.attempts,
        OUTBOX.c.created_at,
        OUTBOX.c.next_try_at,
        OUTBOX.c.last_error,
    )
    where = [
        OUTBOX.c.state == state if state else OUTBOX.c.state.in_(WAITING + ("dead", "refused"))
    ]
    if peer:
        where.append(OUTBOX.c.next_hop == peer)
    return stmt, where


def with_age(ctx: NodeContext, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    now = ctx.now()
    for r in rows:
        r["age_s"] = round((now - r["created_at"]).total_seconds(), 1)
    return rows


def outbox_list(
    ctx: NodeContext, *, state: str | None = None, peer: str | None = None, limit: int = 100
) -> list[dict[str, Any]]:
    """Rows with their age and last error: what waits, for how long and why (oldest first)."""
    stmt, where = outbox_query(state=state, peer=peer)
    with ctx.store.read() as conn:
        rows = [
            dict(r._mapping)
            for r in conn.execute(stmt.where(*where).order_by(OUTBOX.c.id).limit(limit))
        ]
    return with_age(ctx, rows)


def queue_summary(ctx: NodeContext) -> dict[str, Any]:
    """Counts per queue and state, and the oldest waiting item per peer (for IT and alerts)."""
    now = ctx.now()
    with ctx.store.read() as conn:
        out = counts.outbox(conn)
        inbox = counts.inbox(conn)
        held = quarantine.counts(conn)
    peers: dict[str, dict[str, Any]] = {}
    for hop, st, n, oldest in out:
        p = peers.setdefault(hop, {"peer": hop, "oldest_waiting_s": None})
        p[st] = n
        if st in WAITING and oldest is not None:
            age = (now - _aware(oldest)).total_seconds()
            p["oldest_waiting_s"] = max(p["oldest_waiting_s"] or 0, round(age, 1))
    return {
        "outbox": sorted(peers.values(), key=lambda p: p["peer"]),
        "inbox": {
            st: {"count": n, "oldest_s": round((now - _aware(o)).total_seconds(), 1)}
            for st, n, o in inbox
        },
        "quarantine": held,
    }


def outbox_retry(
    ctx: NodeContext,
    *,
    ids: list[int] | None = None,
    peer: str | None = None,
    states: tuple[str, ...] = ("dead",),
    actor: str | None = None,
) -> int:
    """Put dead (or backing-off) packets back in the queue now; each retry is audited."""
    now = ctx.now()
    cond = [OUTBOX.c.state.in_(states)]
    if ids:
        cond.append(OUTBOX.c.id.in_(ids))
    if peer:
        cond.append(OUTBOX.c.next_hop == peer)
    with ctx.store.write() as conn:
        rows = conn.execute(
            select(
                OUTBOX.c.id,
                OUTBOX.c.packet_id,
                OUTBOX.c.kind,
                OUTBOX.c.recipient,
                OUTBOX.c.thread,
                OUTBOX.c.patient_hash,
                OUTBOX.c.body,
                OUTBOX.c.frame,
                OUTBOX.c.origin,
            ).where(*cond)
        ).all()
        usable = [r for r in rows if r.body is not None or r.frame is not None]
        if usable:
            conn.execute(
                update(OUTBOX)
                .where(OUTBOX.c.id.in_([r.id for r in usable]))
                .values(state="queued", next_try_at=now, attempts=0, last_error=None)
            )
            ctx.audit.append(
                conn,
                [
                    AuditEntry(
                        action="replayed",
                        packet_id=r.packet_id,
                        kind=r.kind,
                        peer=r.recipient,
                        thread=r.thread,
                        patient_hash=r.patient_hash,
                        actor=actor,
                        at=now,
                        message="outbox retry",
                    )
                    for r in usable
                ],
            )
    return len(usable)


def quarantine_replay(
    ctx: NodeContext,
    intake: Any,
    item_id: int,
    *,
    actor: str | None = None,
    adapters: Mapping[str, Any] | None = None,
) -> tuple[bool, str]:
    """Run a held item through intake again (after IT fixed a rule, a key or a mapping).

    Peer packets are re-checked as of the moment they first arrived, so the clock window is
    judged against their original arrival, not against today. Items an adapter quarantined
    (``source = "adapter:<name>"``) go back to that adapter's optional ``replay(raw) -> str``
    (see ``bridge/local/contract.py``); that needs the running node's adapters (``adapters``),
    so the CLI hands them to the node's local API.
    """
    from bridge.crypto import envelope as env

    with ctx.store.read() as conn:
        item = quarantine.get_item(conn, item_id)
    if item["state"] != "held":
        return False, f"item {item_id} is {item['state']}, not held"
    now = ctx.now()
    if item["source"] == "local":
        with ctx.store.write() as conn:
            res = queue_packets(
                ctx,
                conn,
                [
                    Outgoing(
                        item["recipient"] or "", item["kind"] or "", item["raw"], item["thread"]
                    )
                ],
                actor=actor,
            )
            ok = res[0].error is None
            result = f"queued as {res[0].packet_id}" if ok else str(res[0].error)
            _finish(ctx, conn, item, ok, result, actor, now)
        return ok, result
    if item["source"].startswith("adapter:"):
        return _replay_by_adapter(ctx, item, adapters, actor, now)
    if item["source"] == "delivery":
        return _redeliver(ctx, item, actor, now)
    if item["source"] != "peer":
        return False, f"items from '{item['source']}' cannot be replayed"
    if not item.get("trusted", True):
        return False, (
            f"item {item_id} was refused before its signature verified: only a "
            f"prefix of it was kept, it cannot be replayed (its sender sends again)"
        )
    answers = intake.receive([item["raw"]], now=item["at"], requarantine=False)
    if answers[0][:1] == b"{":  # an unsigned error: the frame did not authenticate
        fields = {"status": "refused"} | orjson.loads(answers[0])
    else:
        fields = (
            env.verify_receipt(answers[0], lambda n: ctx.plan.directory[n].signing_keys)
            if answers[0]
            else {"status": "accepted"}
        )
    ok = fields.get("status") in ("accepted", "relayed")
    result = fields.get("status") if ok else f"{fields.get('code')}: {fields.get('message')}"
    with ctx.store.write() as conn:
        _finish(ctx, conn, item, ok, str(result), actor, now)
    return ok, str(result)


def _redeliver(
    ctx: NodeContext, item: dict[str, Any], actor: str | None, now: datetime
) -> tuple[bool, str]:
    """A delivery dead letter (the local side refused it for good, or it failed too often):
    its inbox row goes back to the dispatcher, marked so the thread gate lets it pass once
    more (its turn was used when it was dead-lettered); audited. For after IT fixed the local
    side (a mapping, the HIS's interface)."""
    from bridge.delivery.dispatcher import REDELIVER

    with ctx.store.write() as conn:
        row = conn.execute(
            select(INBOX.c.id, INBOX.c.state, INBOX.c.body).where(
                INBOX.c.packet_id == item["packet_id"]
            )
        ).first()
        if row is None or row.state != "failed":
            ok, result = (
                False,
                (
                    f"packet {item['packet_id']} is "
                    f"{row.state if row else 'not in the inbox'}, not failed"
                ),
            )
        elif row.body is None:
            ok, result = False, f"packet {item['packet_id']}'s body was purged (retention)"
        else:
            conn.execute(
                update(INBOX)
                .where(INBOX.c.id == row.id)
                .values(
                    state="received",
                    attempts=0,
                    next_try_at=now,
                    last_error=f"{REDELIVER} quarantine item {item['id']}",
                )
            )
            ok, result = True, "queued for delivery again"
        _finish(ctx, conn, item, ok, result, actor, now)
    return ok, result


def _replay_by_adapter(
    ctx: NodeContext,
    item: dict[str, Any],
    adapters: Mapping[str, Any] | None,
    actor: str | None,
    now: datetime,
) -> tuple[bool, str]:
    name = item["source"].partition(":")[2]
    if adapters is None:
        return False, (
            f"items from adapter '{name}' are replayed by the running node "
            f"(POST /local/v1/quarantine/{item['id']}/replay)"
        )
    adapter = adapters.get(name)
    if adapter is None or not callable(getattr(adapter, "replay", None)):
        return False, f"adapter '{name}' is not configured here or cannot replay"
    try:
        ok, result = True, str(adapter.replay(bytes(item["raw"])))
    except HutongError as exc:  # still refused (its message names record and field)
        ok, result = False, f"{exc.code}: {exc.message}"
    with ctx.store.write() as conn:
        _finish(ctx, conn, item, ok, result, actor, now)
    return ok, result


def _finish(
    ctx: NodeContext,
    conn: Any,
    item: dict[str, Any],
    ok: bool,
    result: str,
    actor: str | None,
    now: datetime,
) -> None:
    quarantine.mark_replayed(conn, item["id"], now, result, ok)
    ctx.audit.append(
        conn,
        [
            AuditEntry(
                action="replayed",
                outcome="0" if ok else "4",
                packet_id=item["packet_id"],
                kind=item["kind"],
                peer=item["sender"],
                thread=item["thread"],
                actor=actor,
                at=now,
                message=f"quarantine item {item['id']}: {result}"[:300],
            )
        ],
    )


def find_packet(ctx: NodeContext, packet_id: str) -> dict[str, Any]:
    """Packets by id: the header (and state) whichever way it went, even after the body purge."""
    with ctx.store.read() as conn:
        for table, direction in ((OUTBOX, "out"), (INBOX, "in")):
            cols = [c for c in table.c if c.name not in ("body", "frame", "receipt")]
            row = conn.execute(select(*cols).where(table.c.packet_id == packet_id)).first()
            if row is not None:
                return {"direction": direction, **dict(row._mapping)}
    raise NotFound(f"no packet {packet_id}")


def _aware(t: datetime) -> datetime:
    from datetime import UTC

    return t if t.tzinfo else t.replace(tzinfo=UTC)
