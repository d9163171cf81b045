"""Alerts for IT: rules over the node's own tables, shown on the IT page and POSTed to a webhook.

Rules (thresholds from ``[alerts]`` in the node file, ``AlertsConfig``):

- ``queue-depth:<peer>``: more packets waiting for a next hop than ``queue_depth``;
- ``queue-age:<peer>`` / ``queue-age:inbox``: the oldest packet waiting to leave for a peer, or
  waiting to be handed to the local side, is older than ``queue_age_s``;
- ``queue-age:results-journal`` / ``queue-depth:results-journal``: the oldest lab message
  acknowledged and not yet expanded into the FHIR store (bridge/results/journal.py) is older
  than ``queue_age_s``, or the journal is at its bound (``[limits] max_results_journal``: new
  messages are answered AE, resend later); ``quarantine:adapter:<name>`` also covers a message
  whose expansion failed;
- ``peer-silent:<peer>``: no receipt, packet or health answer from a next hop for
  ``peer_silent_s`` (the job probes each hop's ``/exchange/v1/health``, so an idle but healthy
  peer is not silent);
- ``adapter-silent:<name>``: an adapter's ``status()['last_ok_at']`` (or the node's start, if it
  never succeeded) is older than ``adapter_silent_s``;
- ``audit-chain``: the audit chain fails to verify (checked every ``chain_every_s``);
- ``peer-unreachable:<peer>``: the health probe of a next hop has failed without a success
  since, for ``peer_unreachable_grace_s`` (default 60 s after the first failed probe);
- ``quarantine:<source>``: more than ``quarantine_held`` items held from one source (default:
  any); ``dead-letters:<peer>``: more than ``dead_letters`` dead packets for a peer (any);
- ``consult-overdue``: consultations waiting at one step past ``[consult] wait_timeout_s``
  (the consultation workflow's reminder flagged them; bridge/consult);
- ``disk``: the data folder's file system has less than ``disk_free_pct`` free;
- ``key-expiry``: ``keys_rotate_by`` is less than ``key_expiry_warn_days`` away (Ed25519 keys
  carry no date of their own; the alliance's key policy gives the day).

Rules named in ``off`` are not evaluated. Each raise/clear also goes to e-mail (``smtp_*``,
``email_to``); the webhook body is generic JSON or a WeCom / DingTalk robot message
(``webhook_format``). See docs/it/operations.md.

:func:`evaluate` is a pure function of :class:`Facts`; :class:`Alerter` collects the facts, keeps
the active set in ``node_state`` (so a restart does not raise again), audits each raise and
each clear exactly once, and POSTs one JSON document per raise/clear to ``webhook_url``. A POST
that fails is kept and retried on the next round (at most ``MAX_PENDING`` are kept). Nothing
here carries patient data: subjects are member ids, adapter names and counts.
"""

from __future__ import annotations

import json
import logging
import shutil
import smtplib
import threading
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import bindparam, func, select, text

from bridge.audit.events import AuditEntry
from bridge.config.models import AlertsConfig
from bridge.config.secrets import is_secret_ref, resolve_secret
from bridge.results.journal import counts as journal_counts
from bridge.store import state
from bridge.store.tables import INBOX, OPEN_WHERE, OUTBOX, QUARANTINE

if TYPE_CHECKING:
    from bridge.node import Node

log = logging.getLogger("hutong.alerts")

ACTIVE_KEY = "alerts_active"
PENDING_KEY = "alerts_webhook_pending"
EMAIL_PENDING_KEY = "alerts_email_pending"
MAX_PENDING = 200
WAITING = ("queued", "sent")
#: the alerts' reads of the outbox and inbox, each answered from an index range that does not
#: grow with the store (bridge/store/tables.py: ix_outbox_open, ix_outbox_hop_acked,
#: ix_inbox_sender_time, ix_inbox_relay_time); the open rows' condition is written out as the
#: partial index has it, so the planner can take that index
_OPEN = (
    select(OUTBOX.c.next_hop, OUTBOX.c.state, func.count(), func.min(OUTBOX.c.created_at))
    .where(text(OPEN_WHERE))
    .group_by(OUTBOX.c.next_hop, OUTBOX.c.state)
)
_LAST_ACK = select(func.max(OUTBOX.c.acked_at)).where(
    OUTBOX.c.next_hop == bindparam("hop"), OUTBOX.c.acked_at.is_not(None)
)
_LAST_IN = (
    select(func.max(INBOX.c.received_at)).where(INBOX.c.sender == bindparam("peer")),
    select(func.max(INBOX.c.received_at)).where(INBOX.c.relay == bindparam("peer")),
)


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
    failing_since: datetime | None = None  # first failed probe with no success after it

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
    inbox_bound: int = 0  # [limits] max_inbox_backlog (0: none)
    journal_waiting: int = 0  # lab messages acknowledged, not yet in the FHIR store
    journal_oldest_s: float | None = None
    journal_bound: int = 0  # [limits] max_results_journal (0: none)
    adapters: dict[str, dict[str, Any]] = field(default_factory=dict)
    chain_ok: bool | None = None  # None: not verified yet
    chain_problem: str | None = None
    quarantined: dict[str, int] = field(default_factory=dict)  # held items by source
    disk_free_pct: float | None = None
    key_days_left: float | None = None
    cert_days_left: dict[str, float] = field(default_factory=dict)  # adapter -> TLS cert
    consults_overdue: int = 0  # consultations reminded about, still at the same step


def _inbox_bound(node: Any) -> int:
    limits = getattr(getattr(node, "plan", None), "limits", None)
    return int(getattr(limits, "max_inbox_backlog", 0) or 0)


def _journal_bound(node: Any) -> int:
    limits = getattr(getattr(node, "plan", None), "limits", None)
    return int(getattr(limits, "max_results_journal", 0) or 0)


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
            out.append(
                Alert(
                    f"queue-depth:{p.peer}",
                    "queue-depth",
                    p.peer,
                    p.waiting,
                    cfg.queue_depth,
                    f"{p.waiting} packets waiting for {p.peer} (threshold {cfg.queue_depth})",
                )
            )
        if p.oldest_waiting_s is not None and p.oldest_waiting_s > cfg.queue_age_s:
            out.append(
                Alert(
                    f"queue-age:{p.peer}",
                    "queue-age",
                    p.peer,
                    round(p.oldest_waiting_s, 1),
                    cfg.queue_age_s,
                    f"oldest packet for {p.peer} has waited {p.oldest_waiting_s:.0f} s "
                    f"(threshold {cfg.queue_age_s:.0f} s)",
                )
            )
        since = p.last_contact or facts.started_at
        silent = (facts.now - since).total_seconds()
        if silent > cfg.peer_silent_s:
            seen = "never" if p.last_contact is None else f"{silent:.0f} s ago"
            out.append(
                Alert(
                    f"peer-silent:{p.peer}",
                    "peer-silent",
                    p.peer,
                    round(silent, 1),
                    cfg.peer_silent_s,
                    f"no answer from {p.peer} (last contact "
                    f"{seen}, threshold {cfg.peer_silent_s:.0f} s)"
                    + (f": {p.last_probe_error}" if p.last_probe_error else ""),
                )
            )
    if facts.inbox_bound and facts.inbox_waiting >= facts.inbox_bound:
        out.append(
            Alert(
                "queue-depth:inbox",
                "queue-depth",
                "inbox",
                facts.inbox_waiting,
                facts.inbox_bound,
                f"{facts.inbox_waiting} received packets wait for local delivery, at the "
                f"bound of {facts.inbox_bound} ([limits] max_inbox_backlog): peers' batches "
                "are refused (HT-PKT-BACKLOG) and wait at the senders until it drains",
            )
        )
    if facts.inbox_oldest_s is not None and facts.inbox_oldest_s > cfg.queue_age_s:
        out.append(
            Alert(
                "queue-age:inbox",
                "queue-age",
                "inbox",
                round(facts.inbox_oldest_s, 1),
                cfg.queue_age_s,
                f"{facts.inbox_waiting} received packets not handed "
                f"to the local side, oldest {facts.inbox_oldest_s:.0f} s "
                f"(threshold {cfg.queue_age_s:.0f} s)",
            )
        )
    if facts.journal_bound and facts.journal_waiting >= facts.journal_bound:
        out.append(
            Alert(
                "queue-depth:results-journal",
                "queue-depth",
                "results-journal",
                facts.journal_waiting,
                facts.journal_bound,
                f"{facts.journal_waiting} lab messages wait to be stored in the FHIR store, at "
                f"the bound of {facts.journal_bound} ([limits] max_results_journal): new "
                "messages are answered AE (resend later) until it drains",
            )
        )
    if facts.journal_oldest_s is not None and facts.journal_oldest_s > cfg.queue_age_s:
        out.append(
            Alert(
                "queue-age:results-journal",
                "queue-age",
                "results-journal",
                round(facts.journal_oldest_s, 1),
                cfg.queue_age_s,
                f"{facts.journal_waiting} acknowledged lab messages not yet in the FHIR store, "
                f"oldest {facts.journal_oldest_s:.0f} s (threshold {cfg.queue_age_s:.0f} s)",
            )
        )
    for name in sorted(facts.adapters):
        st = facts.adapters[name]
        last_ok = _parse(st.get("last_ok_at"))
        quiet = (facts.now - (last_ok or facts.started_at)).total_seconds()
        if quiet > cfg.adapter_silent_s:
            seen = "never" if last_ok is None else f"{quiet:.0f} s ago"
            err = st.get("last_error")
            out.append(
                Alert(
                    f"adapter-silent:{name}",
                    "adapter-silent",
                    name,
                    round(quiet, 1),
                    cfg.adapter_silent_s,
                    f"adapter {name} has not succeeded "
                    f"({seen}, threshold {cfg.adapter_silent_s:.0f} s)"
                    + (f": {err}" if err else ""),
                )
            )
    if facts.chain_ok is False:
        out.append(
            Alert(
                "audit-chain",
                "audit-chain",
                "audit",
                None,
                None,
                f"audit chain fails to verify: {facts.chain_problem}",
            )
        )
    out += _more_rules(facts, cfg)
    off = set(getattr(cfg, "off", ()) or ())
    return [a for a in out if a.rule not in off]


def _more_rules(facts: Facts, cfg: AlertsConfig) -> list[Alert]:
    """The rules that fire early (issue 15): unreachable peer, quarantine, dead letters, disk,
    key rotation."""
    out: list[Alert] = []
    for p in sorted(facts.peers.values(), key=lambda p: p.peer):
        if p.failing_since is not None:
            down = (facts.now - p.failing_since).total_seconds()
            if down >= cfg.peer_unreachable_grace_s:
                out.append(
                    Alert(
                        f"peer-unreachable:{p.peer}",
                        "peer-unreachable",
                        p.peer,
                        round(down, 1),
                        cfg.peer_unreachable_grace_s,
                        f"{p.peer} unreachable for {down:.0f} s "
                        f"(grace {cfg.peer_unreachable_grace_s:.0f} s)"
                        + (f": {p.last_probe_error}" if p.last_probe_error else ""),
                    )
                )
        if p.dead > cfg.dead_letters:
            out.append(
                Alert(
                    f"dead-letters:{p.peer}",
                    "dead-letters",
                    p.peer,
                    p.dead,
                    cfg.dead_letters,
                    f"{p.dead} dead packets for {p.peer} "
                    f"(threshold {cfg.dead_letters}); retry them on the IT page",
                )
            )
    for source in sorted(facts.quarantined):
        n = facts.quarantined[source]
        if n > cfg.quarantine_held:
            out.append(
                Alert(
                    f"quarantine:{source}",
                    "quarantine",
                    source,
                    n,
                    cfg.quarantine_held,
                    f"{n} items held in quarantine from {source} (threshold {cfg.quarantine_held})",
                )
            )
    if facts.disk_free_pct is not None and facts.disk_free_pct < cfg.disk_free_pct:
        out.append(
            Alert(
                "disk",
                "disk",
                "data",
                round(facts.disk_free_pct, 1),
                cfg.disk_free_pct,
                f"data folder has {facts.disk_free_pct:.1f}% free "
                f"(threshold {cfg.disk_free_pct:.0f}%)",
            )
        )
    for name in sorted(facts.cert_days_left):
        days = facts.cert_days_left[name]
        if days < cfg.key_expiry_warn_days:
            out.append(
                Alert(
                    f"cert-expiry:{name}",
                    "cert-expiry",
                    name,
                    round(days, 1),
                    cfg.key_expiry_warn_days,
                    f"TLS certificate of adapter {name} "
                    + (
                        f"expired {-days:.0f} days ago"
                        if days < 0
                        else f"expires in {days:.0f} days"
                    )
                    + f" (warn at {cfg.key_expiry_warn_days})",
                )
            )
    if facts.consults_overdue > 0:
        out.append(
            Alert(
                "consult-overdue",
                "consult-overdue",
                "consultations",
                facts.consults_overdue,
                0,
                f"{facts.consults_overdue} consultations "
                "waiting past [consult] wait_timeout_s at one step (see the audit "
                "log's reminders)",
            )
        )
    if facts.key_days_left is not None and facts.key_days_left < cfg.key_expiry_warn_days:
        out.append(
            Alert(
                "key-expiry",
                "key-expiry",
                "keys",
                round(facts.key_days_left, 1),
                cfg.key_expiry_warn_days,
                f"site keys are due for renewal in "
                f"{facts.key_days_left:.0f} days (warn at {cfg.key_expiry_warn_days})",
            )
        )
    return out


class Alerter:
    """The node job: collect facts, evaluate, audit raise/clear once, notify the webhook."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.ctx = node.ctx
        self.cfg: AlertsConfig = getattr(node.plan, "alerts", None) or AlertsConfig()
        self.started_at = self.ctx.now()
        self.probes: dict[str, tuple[datetime | None, str | None]] = {}
        self.failing_since: dict[str, datetime] = {}  # peer -> first failed probe since success
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
                    self.failing_since.pop(peer, None)
                    return
                error = f"health answered HTTP {r.status}"
        except urllib.error.HTTPError as exc:
            exc.close()
            error = f"health answered HTTP {exc.code}"
        except (OSError, ValueError) as exc:
            error = f"health probe failed: {type(exc).__name__}"
        self.probes[peer] = (ok_at, error)
        self.failing_since.setdefault(peer, self.ctx.now())

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
            for hop, st, n, oldest in conn.execute(_OPEN):
                p = peers.setdefault(hop, PeerFacts(hop))
                if st in WAITING:
                    p.waiting += n
                    age = (now - _aware(oldest)).total_seconds()  # type: ignore[operator]
                    p.oldest_waiting_s = max(p.oldest_waiting_s or 0.0, age)
                elif st == "dead":
                    p.dead += n
            for p in peers.values():  # each the newest entry of the peer's index range
                p.last_ack = _aware(conn.execute(_LAST_ACK, {"hop": p.peer}).scalar())
                last_in = [conn.execute(q, {"peer": p.peer}).scalar() for q in _LAST_IN]
                p.last_packet_in = _aware(max((t for t in last_in if t is not None), default=None))
            n_in, oldest_in = conn.execute(
                select(func.count(), func.min(INBOX.c.received_at)).where(
                    INBOX.c.state == "received"
                )
            ).one()
            n_journal, oldest_journal = journal_counts(conn).get("queued", (0, None))
            quarantined = {
                src: n
                for src, n in conn.execute(
                    select(QUARANTINE.c.source, func.count())
                    .where(QUARANTINE.c.state == "held")
                    .group_by(QUARANTINE.c.source)
                )
            }
        for peer, (ok_at, err) in self.probes.items():
            if peer in peers:
                peers[peer].last_probe_ok, peers[peer].last_probe_error = ok_at, err
                peers[peer].failing_since = self.failing_since.get(peer)
        adapters: dict[str, dict[str, Any]] = {}
        for name, adapter in (getattr(self.node, "adapters", {}) or {}).items():
            try:
                adapters[name] = dict(adapter.status())
            except Exception as exc:  # noqa: BLE001 - a broken status() is itself news
                adapters[name] = {
                    "last_ok_at": None,
                    "last_error": f"status() failed: {type(exc).__name__}",
                }
        assert self.chain is not None
        facts = Facts(
            now=now,
            started_at=self.started_at,
            peers=peers,
            inbox_waiting=n_in,
            inbox_bound=_inbox_bound(self.node),
            inbox_oldest_s=(now - _aware(oldest_in)).total_seconds()  # type: ignore[operator]
            if oldest_in is not None
            else None,
            journal_waiting=n_journal,
            journal_bound=_journal_bound(self.node),
            journal_oldest_s=(now - _aware(oldest_journal)).total_seconds()  # type: ignore[operator]
            if oldest_journal is not None
            else None,
            adapters=adapters,
            chain_ok=self.chain[1],
            chain_problem=self.chain[2],
            quarantined=quarantined,
            disk_free_pct=self._disk_free_pct(),
            key_days_left=_days_left(self.cfg.keys_rotate_by, now),
            cert_days_left=self._cert_days(now),
            consults_overdue=self._consults_overdue(),
        )
        self.last_facts = facts
        return facts

    def _consults_overdue(self) -> int:
        consult = getattr(self.node, "consult", None)
        return int(consult.overdue()) if consult is not None else 0

    def _cert_days(self, now: datetime) -> dict[str, float]:
        """Days until each adapter's TLS certificate (``options.tls.cert``) expires."""
        out: dict[str, float] = {}
        for a in getattr(self.node.plan, "adapters", ()) or ():
            tls = a.options.get("tls") if hasattr(a.options, "get") else None
            cert = tls.get("cert") if isinstance(tls, dict) else None
            if not isinstance(cert, str):
                continue
            try:
                from cryptography import x509

                path = Path(cert) if Path(cert).is_absolute() else a.base_dir / cert
                c = x509.load_pem_x509_certificate(path.read_bytes())
                out[a.name] = (c.not_valid_after_utc - now).total_seconds() / 86400.0
            except (OSError, ValueError):
                out[a.name] = -1.0  # unreadable: as good as expired, and said so
        return out

    def _disk_free_pct(self) -> float | None:
        try:
            folder = self.node.plan.data_dir
            while not folder.exists() and folder != folder.parent:
                folder = folder.parent
            use = shutil.disk_usage(folder)
        except (OSError, AttributeError, TypeError):
            return None
        return 100.0 * use.free / use.total if use.total else None

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
            before = len(pending)
            raised = [k for k in found if k not in active]
            cleared = [k for k in active if k not in found]
            entries: list[AuditEntry] = []
            for k in raised:
                a = found[k]
                active[k] = {
                    **asdict(a),
                    "raised_at": now.isoformat(),
                    "updated_at": now.isoformat(),
                }
                entries.append(
                    AuditEntry(
                        action="alert",
                        outcome="4",
                        at=now,
                        actor=node_id,
                        code=a.rule,
                        message=f"raised {k}: {a.message}",
                        extra={"alert": k, "state": "raised"},
                    )
                )
                pending.append(self._event("raised", active[k], now))
            for k, a in found.items():
                if k not in raised:  # still on: refresh the value shown, no audit, no POST
                    active[k].update(value=a.value, message=a.message, updated_at=now.isoformat())
            for k in cleared:
                gone = active.pop(k)
                entries.append(
                    AuditEntry(
                        action="alert",
                        outcome="0",
                        at=now,
                        actor=node_id,
                        code=gone["rule"],
                        message=f"cleared {k}",
                        extra={"alert": k, "state": "cleared"},
                    )
                )
                pending.append(self._event("cleared", {**gone, "cleared_at": now.isoformat()}, now))
            if entries:
                self.ctx.audit.append(conn, entries)
            if self.cfg.smtp_host and self.cfg.email_to and len(pending) > before:
                mails = json.loads(state.get(conn, EMAIL_PENDING_KEY) or "[]")
                mails = (mails + pending[before:])[-MAX_PENDING:]
                state.put(conn, EMAIL_PENDING_KEY, json.dumps(mails, ensure_ascii=False), now)
            if len(pending) > MAX_PENDING:
                log.warning(
                    "alert webhook: dropping %d oldest undelivered notifications",
                    len(pending) - MAX_PENDING,
                )
                pending = pending[-MAX_PENDING:]
            state.put(conn, ACTIVE_KEY, json.dumps(active, ensure_ascii=False), now)
            state.put(conn, PENDING_KEY, json.dumps(pending, ensure_ascii=False), now)
        for k in raised:
            log.warning("alert raised: %s", k)
        for k in cleared:
            log.info("alert cleared: %s", k)
        self._notify()
        self._notify_email()
        return {"raised": raised, "cleared": cleared}

    def _event(self, what: str, alert: dict[str, Any], now: datetime) -> dict[str, Any]:
        plan = self.node.plan
        return {
            "source": "hutong",
            "node": plan.node_id,
            "node_name": plan.names.zh,
            "alliance": plan.alliance.id,
            "event": what,
            "at": now.isoformat(),
            "alert": alert,
        }

    def _notify(self) -> None:
        url = self.cfg.webhook_url
        if not url:
            return
        with self.ctx.store.read() as conn:
            pending: list[dict[str, Any]] = json.loads(state.get(conn, PENDING_KEY) or "[]")
        sent = 0
        for doc in pending:
            req = urllib.request.Request(
                url,
                data=json.dumps(
                    webhook_body(doc, self.cfg.webhook_format), ensure_ascii=False
                ).encode(),
                method="POST",
                headers={"Content-Type": "application/json; charset=utf-8"},
            )
            try:
                with urllib.request.urlopen(req, timeout=self.cfg.webhook_timeout_s) as r:
                    answer = r.read()
                if self.cfg.webhook_format != "json" and not _robot_ok(answer):
                    log.warning("alert robot refused the message; will retry")
                    break
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
                state.put(
                    conn,
                    PENDING_KEY,
                    json.dumps(now_pending[sent:], ensure_ascii=False),
                    self.ctx.now(),
                )

    def _notify_email(self) -> None:
        """Each pending raise/clear as one e-mail; a failed send is kept for the next round."""
        cfg = self.cfg
        if not (cfg.smtp_host and cfg.email_to):
            return
        with self.ctx.store.read() as conn:
            mails: list[dict[str, Any]] = json.loads(state.get(conn, EMAIL_PENDING_KEY) or "[]")
        if not mails:
            return
        sent = 0
        try:
            with smtplib.SMTP(cfg.smtp_host, cfg.smtp_port, timeout=cfg.webhook_timeout_s) as smtp:
                if cfg.smtp_starttls:
                    smtp.starttls()
                if cfg.smtp_user:
                    smtp.login(cfg.smtp_user, self._smtp_password())
                for doc in mails:
                    smtp.send_message(email_message(doc, cfg.email_from, cfg.email_to))
                    sent += 1
        except (OSError, smtplib.SMTPException, ValueError) as exc:
            log.warning("alert e-mail failed (%s); will retry", type(exc).__name__)
        if sent:
            with self.ctx.store.write() as conn:
                now_mails = json.loads(state.get(conn, EMAIL_PENDING_KEY) or "[]")
                state.put(
                    conn,
                    EMAIL_PENDING_KEY,
                    json.dumps(now_mails[sent:], ensure_ascii=False),
                    self.ctx.now(),
                )

    def _smtp_password(self) -> str:
        ref = self.cfg.smtp_password or ""
        if not is_secret_ref(ref):
            return ref
        base = self.node.plan.source_files[1].parent  # the node file's folder
        return resolve_secret(ref, base).strip()


# -- notification formats ------------------------------------------------------------------

RULE_ZH = {
    "queue-depth": "队列积压",
    "queue-age": "队列等待过久",
    "peer-silent": "对方机构无响应",
    "adapter-silent": "接口长时间未成功",
    "audit-chain": "审计链校验失败",
    "peer-unreachable": "对方机构不可达",
    "quarantine": "有数据被隔离",
    "dead-letters": "有无法投递的数据包",
    "disk": "磁盘空间不足",
    "key-expiry": "密钥即将到期",
    "cert-expiry": "证书即将到期",
    "consult-overdue": "会诊申请等待超时",
}


def alert_text(doc: dict[str, Any]) -> tuple[str, str]:
    """(one-line title, body) of a raise/clear, Chinese first, for robots and e-mail."""
    a = doc["alert"]
    what = "告警" if doc["event"] == "raised" else "告警解除"
    title = (
        f"[互通{what}] {RULE_ZH.get(a['rule'], a['rule'])} · {a['subject']} · "
        f"{doc.get('node_name') or doc['node']}"
    )
    body = "\n".join(
        [
            title,
            f"机构 node: {doc['node']} ({doc.get('alliance', '')})",
            f"规则 rule: {a['rule']}  对象 subject: {a['subject']}",
            f"事件 event: {doc['event']}  时间 at: {doc['at']}",
            f"说明 message: {a['message']}",
        ]
    )
    return title, body


def webhook_body(doc: dict[str, Any], fmt: str) -> dict[str, Any]:
    """The POSTed document: ours as is, or a WeCom (企业微信) / DingTalk (钉钉) robot message.
    Robot texts start with "互通" so a DingTalk keyword rule can allow them."""
    if fmt == "json":
        return doc
    _title, body = alert_text(doc)
    if fmt == "wecom":
        return {"msgtype": "text", "text": {"content": body}}
    if fmt == "dingtalk":
        return {"msgtype": "text", "text": {"content": body}}
    raise ValueError(f"unknown webhook format {fmt}")


def _robot_ok(answer: bytes) -> bool:
    """WeCom and DingTalk answer HTTP 200 with ``{"errcode": 0}`` on success."""
    try:
        return bool(json.loads(answer or b"{}").get("errcode", 0) == 0)
    except (ValueError, AttributeError):
        return False


def email_message(doc: dict[str, Any], sender: str, to: tuple[str, ...]) -> EmailMessage:
    title, body = alert_text(doc)
    msg = EmailMessage()
    msg["Subject"] = title
    msg["From"] = sender
    msg["To"] = ", ".join(to)
    msg["X-Hutong-Alert"] = f"{doc['event']} {doc['alert']['key']}"
    msg.set_content(body)
    return msg


def _days_left(day: str | None, now: datetime) -> float | None:
    if not day:
        return None
    try:
        due = datetime.fromisoformat(day)
    except ValueError:
        return None
    due = due if due.tzinfo else due.replace(tzinfo=UTC)
    return (due - now).total_seconds() / 86400.0
