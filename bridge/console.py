"""The operations console's numbers: per peer and per local adapter, what came in, went out,
waits, failed or was quarantined in the last hour and day, and what IT paused.

One source for both the live IT dashboard (``bridge/web/dashboard.py``) and the Prometheus
endpoint (``bridge/metrics.py``), so the page and Grafana never disagree. Everything is read
from the node's own tables at request time: a restart loses no history, and several worker
processes sharing one PostgreSQL store report the same figures. No patient data: members,
adapter names, counts and error texts (which never quote values).

Pauses (``node_state`` key ``console_paused``): ``peer:<id>`` holds the sender job for that
next hop (packets stay queued), ``adapter:<name>`` holds the adapter's jobs and the delivery
of packets to it (they stay received, no attempt is counted). Each pause and resume is audited.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import bindparam, func, select, text

from bridge.audit.events import AuditEntry
from bridge.errors import NotFound
from bridge.results.journal import counts as journal_counts
from bridge.store import counts, state
from bridge.store.tables import INBOX, OPEN_WHERE, OUTBOX, QUARANTINE

if TYPE_CHECKING:
    from bridge.context import NodeContext
    from bridge.node import Node

PAUSED_KEY = "console_paused"
WAITING = ("queued", "sent")
FAILED = ("dead", "refused")
HOURS = 24


class Pauses:
    """What IT paused, kept in the store (a restart keeps it) and cached for ``ttl_s`` (checked
    on every send/deliver round; other processes on a shared store see a change that soon)."""

    def __init__(self, ctx: NodeContext, ttl_s: float = 2.0) -> None:
        self.ctx = ctx
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._cache: set[str] | None = None
        self._read_at = 0.0

    def all(self) -> set[str]:
        if self._cache is None or time.monotonic() - self._read_at > self.ttl_s:
            with self.ctx.store.read() as conn:
                self._cache = set(json.loads(state.get(conn, PAUSED_KEY) or "[]"))
            self._read_at = time.monotonic()
        return set(self._cache)

    def has(self, what: str) -> bool:
        return what in self.all()

    def set(self, what: str, paused: bool, actor: str) -> bool:
        """Pause or resume ``peer:<id>`` / ``adapter:<name>``; audited when it changes.
        Returns whether anything changed."""
        with self._lock, self.ctx.store.write() as conn:
            now = self.ctx.now()
            current = set(json.loads(state.get(conn, PAUSED_KEY) or "[]"))
            if (what in current) == paused:
                self._cache = current
                return False
            current = current | {what} if paused else current - {what}
            state.put(conn, PAUSED_KEY, json.dumps(sorted(current)), now)
            kind, _, name = what.partition(":")
            self.ctx.audit.append(
                conn,
                [
                    AuditEntry(
                        action="paused" if paused else "resumed",
                        outcome="0",
                        at=now,
                        actor=actor,
                        peer=name if kind == "peer" else None,
                        message=f"{'paused' if paused else 'resumed'} {what}",
                        extra={"target": what},
                    )
                ],
            )
            self._cache = current
            return True


@dataclass
class Channel:
    """One row of the dashboard: a peer (next hop) or a local adapter."""

    kind: str  # peer | adapter
    name: str
    paused: bool = False
    received: dict[str, int] = field(default_factory=lambda: {"1h": 0, "24h": 0})
    sent: dict[str, int] = field(default_factory=lambda: {"1h": 0, "24h": 0})
    failed: dict[str, int] = field(default_factory=lambda: {"1h": 0, "24h": 0})
    quarantined: dict[str, int] = field(default_factory=lambda: {"1h": 0, "24h": 0})
    queued: int = 0
    oldest_waiting_s: float | None = None
    last_error: str | None = None
    counters: dict[str, int] = field(default_factory=dict)  # adapter counters since start
    last_ok_at: str | None = None


@dataclass
class Snapshot:
    now: datetime
    peers: list[Channel]
    adapters: list[Channel]
    hours: list[datetime]  # start of each of the last 24 hours, oldest first
    per_hour: dict[str, list[int]]  # received / sent / failed / quarantined per hour
    totals: dict[str, int]  # lifetime totals by outbox/inbox/quarantine state (for counters)
    #: lab messages acknowledged and not yet in the FHIR store (bridge/results/journal.py):
    #: waiting, failed (kept, quarantined), the oldest waiting one's age in seconds
    journal_waiting: int = 0
    journal_failed: int = 0
    journal_oldest_s: float | None = None


_ROW = (
    OUTBOX.c.id,
    OUTBOX.c.next_hop,
    OUTBOX.c.state,
    OUTBOX.c.created_at,
    OUTBOX.c.acked_at,
    OUTBOX.c.last_error,
)
_CREATED_SINCE = select(*_ROW).where(OUTBOX.c.created_at >= bindparam("since"))
_ACKED_SINCE = select(*_ROW).where(
    OUTBOX.c.next_hop == bindparam("hop"),
    OUTBOX.c.acked_at >= bindparam("since"),
    OUTBOX.c.created_at < bindparam("since"),
)
#: the last errors of the packets still open (ix_outbox_open: the backlog, not the store)
_OPEN_ERRORS = select(OUTBOX.c.id, OUTBOX.c.next_hop, OUTBOX.c.last_error).where(
    text(OPEN_WHERE), OUTBOX.c.last_error.is_not(None)
)


def _windows(t: datetime, now: datetime) -> list[str]:
    age = now - t
    return [w for w, d in (("1h", timedelta(hours=1)), ("24h", timedelta(hours=24))) if age <= d]


def _aware(t: datetime, like: datetime) -> datetime:
    return t if t.tzinfo else t.replace(tzinfo=like.tzinfo)


def snapshot(node: Node) -> Snapshot:
    """The figures of the dashboard and /metrics, read now."""
    ctx = node.ctx
    now = ctx.now()
    since = now - timedelta(hours=HOURS)
    first_hour = now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=HOURS - 1)
    hours = [first_hour + timedelta(hours=i) for i in range(HOURS)]
    per_hour = {k: [0] * HOURS for k in ("received", "sent", "failed", "quarantined")}

    def bucket(series: str, t: datetime) -> None:
        i = int((t - first_hour).total_seconds() // 3600)
        if 0 <= i < HOURS:
            per_hour[series][i] += 1

    paused = node.pauses.all() if hasattr(node, "pauses") else set()
    hops = sorted(getattr(node, "senders", {}) or {})
    peers: dict[str, Channel] = {p: Channel("peer", p, paused=f"peer:{p}" in paused) for p in hops}
    adapters: dict[str, Channel] = {}
    for name, adapter in sorted((getattr(node, "adapters", {}) or {}).items()):
        chan = Channel("adapter", name, paused=f"adapter:{name}" in paused)
        try:
            st = dict(adapter.status())
        except Exception as exc:  # noqa: BLE001 - a broken status() is itself news
            st = {"last_error": f"status() failed: {type(exc).__name__}"}
        chan.counters = {
            str(k): int(v)
            for k, v in (st.get("counters") or {}).items()
            if isinstance(v, int | float)
        }
        chan.last_error = st.get("last_error")
        chan.last_ok_at = st.get("last_ok_at")
        adapters[name] = chan
    totals: dict[str, int] = {}

    def peer(name: str | None) -> Channel | None:
        if not name:
            return None
        if name not in peers:
            peers[name] = Channel("peer", name, paused=f"peer:{name}" in paused)
        return peers[name]

    with ctx.store.read() as conn:
        for hop, state_, n, oldest in counts.outbox(conn):
            totals[f"outbox:{hop}:{state_}"] = n
            ch = peer(hop)
            if ch is not None and state_ in WAITING:
                ch.queued += n
                if oldest is not None:
                    age = (now - _aware(oldest, now)).total_seconds()
                    ch.oldest_waiting_s = max(ch.oldest_waiting_s or 0.0, age)
        # the last 24 hours' rows: those created since (ix_outbox_time), and per hop those
        # acknowledged since but created before (ix_outbox_hop_acked); an OR of the two
        # conditions read every outbox row
        recent = list(conn.execute(_CREATED_SINCE, {"since": since}))
        for hop in sorted(peers):
            recent += conn.execute(_ACKED_SINCE, {"hop": hop, "since": since}).all()
        for _, hop, st, created, acked, _ in recent:
            ch = peer(hop)
            if ch is None:
                continue
            if acked is not None and _aware(acked, now) >= since:
                for w in _windows(_aware(acked, now), now):
                    ch.sent[w] += 1
                bucket("sent", _aware(acked, now))
            if st in FAILED and _aware(created, now) >= since:
                for w in _windows(_aware(created, now), now):
                    ch.failed[w] += 1
                bucket("failed", _aware(created, now))
        # a hop's last error: the newest among its open packets and those of the last 24 h
        # (walking the whole outbox back by id read every row of a healthy node)
        errors = [(i, hop, err) for i, hop, _, _, _, err in recent if err is not None]
        errors += conn.execute(_OPEN_ERRORS).all()
        for _, hop, err in sorted(errors, key=lambda e: e[0], reverse=True):
            ch = peer(hop)
            if ch is not None and ch.last_error is None:
                ch.last_error = err
        for sender, relay, st, received in conn.execute(
            select(INBOX.c.sender, INBOX.c.relay, INBOX.c.state, INBOX.c.received_at).where(
                INBOX.c.received_at >= since
            )
        ):
            t = _aware(received, now)
            ch = peer(relay if relay in peers else sender)
            bucket("received", t)
            if st == "failed":
                bucket("failed", t)
            if ch is None:
                continue
            for w in _windows(t, now):
                ch.received[w] += 1
                if st == "failed":
                    ch.failed[w] += 1
        for state_, n, _ in counts.inbox(conn):
            totals[f"inbox:{state_}"] = n
        for source, sender, at in conn.execute(
            select(QUARANTINE.c.source, QUARANTINE.c.sender, QUARANTINE.c.at).where(
                QUARANTINE.c.at >= since
            )
        ):
            t = _aware(at, now)
            bucket("quarantined", t)
            name = source.removeprefix("adapter:") if source.startswith("adapter:") else None
            ch = adapters.get(name) if name else (peers.get(sender) if sender else None)
            if ch is not None:
                for w in _windows(t, now):
                    ch.quarantined[w] += 1
        for source, st, n in conn.execute(
            select(QUARANTINE.c.source, QUARANTINE.c.state, func.count()).group_by(
                QUARANTINE.c.source, QUARANTINE.c.state
            )
        ):
            totals[f"quarantine:{source}:{st}"] = n
        staged = journal_counts(conn)
        for jstate, (n, _oldest) in staged.items():
            totals[f"results_journal:{jstate}"] = n
        if adapters:
            _adapter_windows(node, conn, adapters, since, now)
    return Snapshot(
        now=now,
        peers=[peers[p] for p in sorted(peers)],
        adapters=list(adapters.values()),
        hours=hours,
        per_hour=per_hour,
        totals=totals,
        journal_waiting=staged.get("queued", (0, None))[0],
        journal_failed=staged.get("failed", (0, None))[0],
        journal_oldest_s=_age(staged.get("queued", (0, None))[1], now),
    )


def _age(t: datetime | None, now: datetime) -> float | None:
    return None if t is None else (now - _aware(t, now)).total_seconds()


def pause_target(node: Node, kind: str, name: str) -> str:
    """``peer:<id>`` or ``adapter:<name>`` if this node has it, else NotFound (the name comes
    from a URL: only known names are accepted)."""
    if kind == "peer" and name in (getattr(node, "senders", {}) or {}):
        return f"peer:{name}"
    if kind == "adapter" and name in (getattr(node, "adapters", {}) or {}):
        return f"adapter:{name}"
    raise NotFound(f"no {kind} of that name on this node")


def _adapter_windows(
    node: Node, conn: Any, adapters: dict[str, Channel], since: datetime, now: datetime
) -> None:
    """Per adapter, last hour/day: packets it handed on (audited ``queued`` with the adapter as
    actor) count as received from the local system; packets delivered to it (the dispatcher's
    handler for their kind) as sent; deliveries to it that failed as failed."""
    import orjson

    from bridge.audit.events import event_fields
    from bridge.audit.tables import AuditRecord

    audit = AuditRecord.__table__  # type: ignore[attr-defined]
    for at, resource in conn.execute(
        select(audit.c.at, audit.c.resource).where(audit.c.action == "queued", audit.c.at >= since)
    ):
        actor = str(event_fields(orjson.loads(resource)).get("actor") or "")
        ch = adapters.get(actor.removeprefix("adapter:")) if actor.startswith("adapter:") else None
        if ch is not None:
            for w in _windows(_aware(at, now), now):
                ch.received[w] += 1
    dispatcher = getattr(node, "dispatcher", None)
    if dispatcher is None:
        return
    by_handler = {
        id(a): ch for name, ch in adapters.items() if (a := node.adapters.get(name)) is not None
    }
    for kind, st, delivered, received in conn.execute(
        select(INBOX.c.kind, INBOX.c.state, INBOX.c.delivered_at, INBOX.c.received_at).where(
            (INBOX.c.delivered_at >= since)
            | ((INBOX.c.state == "failed") & (INBOX.c.received_at >= since))
        )
    ):
        ch = by_handler.get(id(dispatcher.handler_for(kind)))
        if ch is None:
            continue
        if delivered is not None:
            for w in _windows(_aware(delivered, now), now):
                ch.sent[w] += 1
        elif st == "failed":
            for w in _windows(_aware(received, now), now):
                ch.failed[w] += 1
    ch_waiting = conn.execute(
        select(INBOX.c.kind, func.count()).where(INBOX.c.state == "received").group_by(INBOX.c.kind)
    )
    for kind, n in ch_waiting:
        ch = by_handler.get(id(dispatcher.handler_for(kind)))
        if ch is not None:
            ch.queued += n
