"""Alerts for IT: rules over the node's own tables, shown on the IT page and POSTed to a webhook.

Rules (thresholds from ``[alerts]`` in the node file, ``AlertsConfig``):

- ``queue-depth:<peer>``: more packets waiting for a next hop than ``queue_depth``;
- ``queue-age:<peer>`` / ``queue-age:inbox``: the oldest packet waiting to leave for a peer, or
  waiting to be handed to the local side, is older than ``queue_age_s``;
- ``peer-silent:<peer>``: no receipt, packet or health answer from a next hop for
  ``peer_silent_s`` (the job probes each hop's ``/exchange/v1/health``, so an idle but healthy
  peer is not silent);
- ``adapter-silent:<name>``: an adapter's ``status()['last_ok_at']`` (or the node's start, if it
  never succeeded) is older than ``adapter_silent_s``;
- ``audit-chain``: the audit chain fails to verify (checked every ``chain_every_s``).

:func:`evaluate` is a pure function of :class:`Facts`; :class:`Alerter` collects the facts, keeps
the active set in ``node_state`` (so a restart does not raise again), audits each raise and
each clear exactly once, and POSTs one JSON document per raise/clear to ``webhook_url``. A POST
that fails is kept and retried on the next round (at most ``MAX_PENDING`` are kept). Nothing
here carries patient data: subjects are member ids, adapter names and counts.
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, or_, select

from bridge.audit.events import AuditEntry
from bridge.config.models import AlertsConfig
from bridge.store import state
from bridge.store.tables import INBOX, OUTBOX

if TYPE_CHECKING:
    from bridge.node import Node

log = logging.getLogger("hutong.alerts")

ACTIVE_KEY = "alerts_active"
PENDING_KEY = "alerts_webhook_pending"
MAX_PENDING = 200
WAITING = ("queued", "sent")


@dataclass(frozen=True)
class Alert:
    key: str  # rule:subject, stable while the condition lasts
    rule: str  # queue-depth | queue-age | peer-silent | adapter-silent | audit-chain
    subject: str  # a member id, "inbox", an adapter name or "audit"
    value: float | None
    threshold: float | None
    message: str  # one line for IT, never patient data


@dataclass
class PeerFacts:
    peer: str
    waiting: int = 0
    oldest_waiting_s: float | None = None
    dead: int = 0
    last_ack: datetime | None = None
    last_packet_in: datetime | None = None
    last_probe_ok: datetime | None = None
    last_probe_error: str | None = None

    @property
    def last_contact(self) -> datetime | None:
        seen = [t for t in (self.last_ack, self.last_packet_in, self.last_probe_ok) if t]
        return max(seen) if seen else None


@dataclass
class Facts:
    now: datetime
    started_at: datetime
    peers: dict[str, PeerFacts]
    inbox_waiting: int = 0
    inbox_oldest_s: float | None = None
    adapters: dict[str, dict[str, Any]] = field(default_factory=dict)
    chain_ok: bool | None = None  # None: not verified yet
    chain_problem: str | None = None


def _aware(t: datetime | None) -> datetime | None:
    if t is None:
        return None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _parse(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return _aware(value)
    if isinstance(value, str) and value:
        try:
            return _aware(datetime.fromisoformat(value))
        except ValueError:
            return None
    return None


def evaluate(facts: Facts, cfg: AlertsConfig) -> list[Alert]:
    """Every alert the facts call for, in a stable order."""
    out: list[Alert] = []
    for p in sorted(facts.peers.values(), key=lambda p: p.peer):
        if p.waiting > cfg.queue_depth:
            out.append(Alert(f"queue-depth:{p.peer}", "queue-depth", p.peer, p.waiting,
                             cfg.queue_depth, f"{p.waiting} packets waiting for {p.peer} "
                             f"(threshold {cfg.queue_depth})"))
        if p.oldest_waiting_s is not None and p.oldest_waiting_s > cfg.queue_age_s:
            out.append(Alert(f"queue-age:{p.peer}", "queue-age", p.peer,
                             round(p.oldest_waiting_s, 1), cfg.queue_age_s,
                             f"oldest packet for {p.peer} has waited {p.oldest_waiting_s:.0f} s "
                             f"(threshold {cfg.queue_age_s:.0f} s)"))
        since = p.last_contact or facts.started_at
        silent = (facts.now - since).total_seconds()
        if silent > cfg.peer_silent_s:
            seen = "never" if p.last_contact is None else f"{silent:.0f} s ago"
            out.append(Alert(f"peer-silent:{p.peer}", "peer-silent", p.peer, round(silent, 1),
                             cfg.peer_silent_s, f"no answer from {p.peer} (last contact "
                             f"{seen}, threshold {cfg.peer_silent_s:.0f} s)"
                             + (f": {p.last_probe_error}" if p.last_probe_error else "")))
    if facts.inbox_oldest_s is not None and facts.inbox_oldest_s > cfg.queue_age_s:
        out.append(Alert("queue-age:inbox", "queue-age", "inbox", round(facts.inbox_oldest_s, 1),
                         cfg.queue_age_s, f"{facts.inbox_waiting} received packets not handed "
                         f"to the local side, oldest {facts.inbox_oldest_s:.0f} s "
                         f"(threshold {cfg.queue_age_s:.0f} s)"))
    for name in sorted(facts.adapters):
        st = facts.adapters[name]
        last_ok = _parse(st.get("last_ok_at"))
        quiet = (facts.now - (last_ok or facts.started_at)).total_seconds()
        if quiet > cfg.adapter_silent_s:
            seen = "never" if last_ok is None else f"{quiet:.0f} s ago"
            err = st.get("last_error")
            out.append(Alert(f"adapter-silent:{name}", "adapter-silent", name, round(quiet, 1),
                             cfg.adapter_silent_s, f"adapter {name} has not succeeded "
                             f"({seen}, threshold {cfg.adapter_silent_s:.0f} s)"
                             + (f": {err}" if err else "")))
    if facts.chain_ok is False:
        out.append(Alert("audit-chain", "audit-chain", "audit", None, None,
                         f"audit chain fails to verify: {facts.chain_problem}"))
    return out


class Alerter:
    """The node job: collect facts, evaluate, audit raise/clear once, notify the webhook."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.ctx = node.ctx
        self.cfg: AlertsConfig = getattr(node.plan, "alerts", None) or AlertsConfig()
        self.started_at = self.ctx.now()
        self.probes: dict[str, tuple[datetime | None, str | None]] = {}
        self.chain: tuple[datetime, bool, str | None] | None = None
        self.last_facts: Facts | None = None
        self._lock = threading.Lock()

    # -- facts -------------------------------------------------------------------------------

    def hops(self) -> list[str]:
        return sorted(getattr(self.node, "senders", {}) or {})

    def probe(self, peer: str) -> None:
        url = self.node.plan.directory[peer].exchange_url + "/exchange/v1/health"
        ok_at, _err = self.probes.get(peer, (None, None))
        try:
            with urllib.request.urlopen(url, timeout=self.cfg.probe_timeout_s) as r:
                r.read()
                if r.status == 200:
                    self.probes[peer] = (self.ctx.now(), None)
                    return
                error = f"health answered HTTP {r.status}"
        except urllib.error.HTTPError as exc:
            exc.close()
            error = f"health answered HTTP {exc.code}"
        except (OSError, ValueError) as exc:
            error = f"health probe failed: {type(exc).__name__}"
        self.probes[peer] = (ok_at, error)

    def verify_chain(self, now: datetime) -> None:
        """Rows added since the last full run are checked every round; the whole chain every
        ``chain_every_s`` (``bridge/audit/watch.py``)."""
        res = self.node.chain_watch.check()
        problem = None if res.ok else f"record #{res.first_bad_seq}: {res.reason}"
        self.chain = (now, bool(res.ok), problem)

    def collect(self, *, probe: bool = True) -> Facts:
        now = self.ctx.now()
        hops = self.hops()
        if probe:
            for peer in hops:
                self.probe(peer)
        self.verify_chain(now)
        peers = {p: PeerFacts(p) for p in hops}
        with self.ctx.store.read() as conn:
            for hop, st, n, oldest in conn.execute(
                    select(OUTBOX.c.next_hop, OUTBOX.c.state, func.count(),
                           func.min(OUTBOX.c.created_at))
                    .group_by(OUTBOX.c.next_hop, OUTBOX.c.state)):
                p = peers.setdefault(hop, PeerFacts(hop))
                if st in WAITING:
                    p.waiting += n
                    age = (now - _aware(oldest)).total_seconds()  # type: ignore[operator]
                    p.oldest_waiting_s = max(p.oldest_waiting_s or 0.0, age)
                elif st == "dead":
                    p.dead += n
            for hop, last in conn.execute(
                    select(OUTBOX.c.next_hop, func.max(OUTBOX.c.acked_at))
                    .group_by(OUTBOX.c.next_hop)):
                if hop in peers:
                    peers[hop].last_ack = _aware(last)
            for p in peers.values():
                last = conn.execute(select(func.max(INBOX.c.received_at)).where(
                    or_(INBOX.c.sender == p.peer, INBOX.c.relay == p.peer))).scalar()
                p.last_packet_in = _aware(last)
            n_in, oldest_in = conn.execute(
                select(func.count(), func.min(INBOX.c.received_at))
                .where(INBOX.c.state == "received")).one()
        for peer, (ok_at, err) in self.probes.items():
            if peer in peers:
                peers[peer].last_probe_ok, peers[peer].last_probe_error = ok_at, err
        adapters: dict[str, dict[str, Any]] = {}
        for name, adapter in (getattr(self.node, "adapters", {}) or {}).items():
            try:
                adapters[name] = dict(adapter.status())
            except Exception as exc:  # noqa: BLE001 - a broken status() is itself news
                adapters[name] = {"last_ok_at": None,
                                  "last_error": f"status() failed: {type(exc).__name__}"}
        assert self.chain is not None
        facts = Facts(now=now, started_at=self.started_at, peers=peers, inbox_waiting=n_in,
                      inbox_oldest_s=(now - _aware(oldest_in)).total_seconds()  # type: ignore[operator]
                      if oldest_in is not None else None,
                      adapters=adapters, chain_ok=self.chain[1], chain_problem=self.chain[2])
        self.last_facts = facts
        return facts

    # -- state -------------------------------------------------------------------------------

    def active(self) -> dict[str, dict[str, Any]]:
        """The alerts raised and not cleared, by key (what the IT page shows)."""
        with self.ctx.store.read() as conn:
            active: dict[str, dict[str, Any]] = json.loads(state.get(conn, ACTIVE_KEY) or "{}")
        return active

    def pending(self) -> list[dict[str, Any]]:
        with self.ctx.store.read() as conn:
            pending: list[dict[str, Any]] = json.loads(state.get(conn, PENDING_KEY) or "[]")
        return pending

    def run_once(self) -> dict[str, list[str]]:
        """One round; returns the keys raised and cleared (for tests and logs)."""
        with self._lock:
            found = {a.key: a for a in evaluate(self.collect(), self.cfg)}
            return self._apply(found)

    def _apply(self, found: dict[str, Alert]) -> dict[str, list[str]]:
        now = self.ctx.now()
        node_id = self.node.plan.node_id
        with self.ctx.store.write() as conn:
            active: dict[str, dict[str, Any]] = json.loads(state.get(conn, ACTIVE_KEY) or "{}")
            pending: list[dict[str, Any]] = json.loads(state.get(conn, PENDING_KEY) or "[]")
            raised = [k for k in found if k not in active]
            cleared = [k for k in active if k not in found]
            entries: list[AuditEntry] = []
            for k in raised:
                a = found[k]
                active[k] = {**asdict(a), "raised_at": now.isoformat(), "updated_at":
                             now.isoformat()}
                entries.append(AuditEntry(action="alert", outcome="4", at=now, actor=node_id,
                                          code=a.rule, message=f"raised {k}: {a.message}",
                                          extra={"alert": k, "state": "raised"}))
                pending.append(self._event("raised", active[k], now))
            for k, a in found.items():
                if k not in raised:  # still on: refresh the value shown, no audit, no POST
                    active[k].update(value=a.value, message=a.message,
                                     updated_at=now.isoformat())
            for k in cleared:
                gone = active.pop(k)
                entries.append(AuditEntry(action="alert", outcome="0", at=now, actor=node_id,
                                          code=gone["rule"], message=f"cleared {k}",
                                          extra={"alert": k, "state": "cleared"}))
                pending.append(self._event("cleared", {**gone, "cleared_at": now.isoformat()},
                                           now))
            if entries:
                self.ctx.audit.append(conn, entries)
            if len(pending) > MAX_PENDING:
                log.warning("alert webhook: dropping %d oldest undelivered notifications",
                            len(pending) - MAX_PENDING)
                pending = pending[-MAX_PENDING:]
            state.put(conn, ACTIVE_KEY, json.dumps(active, ensure_ascii=False), now)
            state.put(conn, PENDING_KEY, json.dumps(pending, ensure_ascii=False), now)
        for k in raised:
            log.warning("alert raised: %s", k)
        for k in cleared:
            log.info("alert cleared: %s", k)
        self._notify()
        return {"raised": raised, "cleared": cleared}

    def _event(self, what: str, alert: dict[str, Any], now: datetime) -> dict[str, Any]:
        plan = self.node.plan
        return {"source": "hutong", "node": plan.node_id, "node_name": plan.names.zh,
                "alliance": plan.alliance.id, "event": what, "at": now.isoformat(),
                "alert": alert}

    def _notify(self) -> None:
        url = self.cfg.webhook_url
        if not url:
            return
        with self.ctx.store.read() as conn:
            pending: list[dict[str, Any]] = json.loads(state.get(conn, PENDING_KEY) or "[]")
        sent = 0
        for doc in pending:
            req = urllib.request.Request(
                url, data=json.dumps(doc, ensure_ascii=False).encode(), method="POST",
                headers={"Content-Type": "application/json; charset=utf-8"})
            try:
                with urllib.request.urlopen(req, timeout=self.cfg.webhook_timeout_s) as r:
                    r.read()
            except urllib.error.HTTPError as exc:
                exc.close()
                log.warning("alert webhook answered HTTP %s; will retry", exc.code)
                break
            except (OSError, ValueError) as exc:
                log.warning("alert webhook failed (%s); will retry", type(exc).__name__)
                break
            sent += 1
        if sent:
            with self.ctx.store.write() as conn:
                now_pending = json.loads(state.get(conn, PENDING_KEY) or "[]")
                state.put(conn, PENDING_KEY, json.dumps(now_pending[sent:], ensure_ascii=False),
                          self.ctx.now())
