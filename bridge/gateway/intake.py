"""The receive pipeline: every frame that crosses the peer port goes through ``Intake.receive``.

Checks run cheapest first and each refusal has its own error code: frame, size, sender,
signature, relay stamp, recipient, clock, rules and topology, replay, decryption, digest, FHIR.
A whole batch commits in one transaction (inbox rows, relay rows, quarantine rows, audit), and
only then are the signed receipts returned: a receipt is never given for something not stored.
The batches of several requests that queue behind a running commit share the next transaction
(``Store.write_grouped``, SQLite and PostgreSQL: one commit for all of them; if one fails, each
runs again alone). So the commit is re-runnable: it works on copies of what the checks prepared, and it
looks the batch's packet ids up again inside the transaction, which makes replay detection
exact across the requests of a group and across requests that raced past the first look-up.

A signed receipt is given only for a frame whose sender's signature verified (and its relay
stamp, and the hop it must arrive by): the node signs nothing about bytes anybody could have
made. Any other frame gets an unsigned error in its place (``unsigned_error``: JSON with a
stable code, retry ``transient``), its refusal keeps only a prefix and digest in quarantine,
and a sender treats such an answer as "not delivered, try again", never as a refusal.

Receipts are signed last, over the batch's final answers: each ``HTR1`` alone, or, for a sender
that asked for batch-signed receipts (v2) and packets that came straight from it, all ``HTR2``
receipts of the batch under one signature (``env.sign_receipts``). They are signed before the
commit, outside the write lock; if the commit changes an answer (a packet id taken meanwhile)
the batch's v2 receipts are signed again inside it, so no root the node signed ever covers a
receipt it did not give (docs/envelope.md, "Batch-signed receipts").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import Connection, insert, select, update
from sqlalchemy.exc import IntegrityError

from bridge import faults
from bridge.audit.events import AuditEntry
from bridge.context import NodeContext
from bridge.crypto import envelope as env
from bridge.errors import (
    ClockSkew,
    HutongError,
    PacketRefused,
    ReplayedPacket,
    RouteDenied,
    StoreError,
    UnknownSender,
    WrongRecipient,
)
from bridge.fhir.validate import parse_and_validate_bundle
from bridge.privacy import bundle_patient_hash
from bridge.store.quarantine import (
    bundle_patient,
    enforce_quota,
    known_patient,
    quarantine_row,
    untrusted_row,
)
from bridge.store.tables import INBOX, OUTBOX, QUARANTINE

#: the first byte of an unsigned error answer (a receipt starts with ``HTR1``)
UNSIGNED = b"{"


def unsigned_error(exc: HutongError) -> bytes:
    """The answer to a frame nobody authenticated: no signature, nothing anyone can hold up
    as this node's word about a packet. A sender keeps the packet and tries again."""
    return orjson.dumps({"code": exc.code, "message": exc.message, "retry": "transient"})


@dataclass(eq=False)
class _Pending:
    """A receipt decided but not yet signed: ``v2`` joins the batch's one root signature."""

    fields: dict[str, Any]
    v2: bool


#: an answer before signing: a receipt to sign, bytes as they go, or None (filled in later)
_Answer = bytes | _Pending | None


@dataclass(frozen=True)
class _New:
    """A packet the checks found new: stored by the commit unless the look-up inside the
    transaction finds its id taken meanwhile (then a duplicate or a replay)."""

    index: int  # its answer's position
    audit: int  # its audit entry's position
    header: env.Header
    frame: bytes
    relay_id: str | None
    identity: tuple[Any, ...]
    relayed: bool  # an outbox relay row, else an inbox row
    row: dict[str, Any]
    v2: bool  # its receipts may be batch-signed


@dataclass
class _Batch:
    """Everything one batch will write, collected before the commit; the commit only reads
    it (it may run twice: grouped with other requests, then alone)."""

    now: datetime
    source: str
    keep: bool
    new: list[_New] = field(default_factory=list)
    quarantine: list[dict[str, Any]] = field(default_factory=list)
    audit: list[AuditEntry] = field(default_factory=list)
    acks: list[tuple[dict[str, Any], bytes]] = field(default_factory=list)
    #: (answer, first answer): a packet id repeated within the batch gets its first's answer
    alias: list[tuple[int, int]] = field(default_factory=list)


class Intake:
    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx
        self.plan = ctx.plan
        self.me = ctx.plan.directory[ctx.plan.node_id]
        self.window = timedelta(seconds=ctx.plan.limits.clock_window_s)
        #: a platform's hook: called after the commit with the next hops of the relayed packets
        self.on_relayed: Callable[[set[str]], None] | None = None

    # -- public -------------------------------------------------------------------------------

    def receive(
        self,
        frames: list[bytes],
        *,
        now: datetime | None = None,
        source: str = "peer",
        requarantine: bool = True,
        remote: str | None = None,
        admit_refusal: Callable[[], bool] | None = None,
        receipts_v2: bool = False,
    ) -> list[bytes]:
        """Process a batch; returns one answer per frame (a signed receipt, b"" for a
        forwarded receipt we took, or an ``unsigned_error`` for a frame that did not
        authenticate). ``remote``: the source address; ``admit_refusal()`` says whether one
        more unauthenticated refusal of it may be kept (its rate), else it is only answered.
        ``receipts_v2``: the requester takes ``HTR2`` receipts; they are given for the frames
        that came straight from it (a receipt for a relayed packet goes back to its sender
        through the platform, and that sender may know only ``HTR1``).
        Raises StoreError if the batch could not be committed."""
        now = now or self.ctx.now()
        batch = _Batch(now=now, source=source, keep=requarantine)
        answers: list[_Answer] = []
        seen: dict[str, tuple[tuple[Any, ...], int]] = {}
        decoded: list[env.Packet | PacketRefused | None] = []
        roots: set[tuple[str, bytes, bytes]] = set()
        for frame in frames:  # decode once; the replay lookup needs every id up front
            try:
                is_packet = env.frame_kind(frame) == "packet"
                decoded.append(
                    env.decode(frame, max_body=self.plan.limits.max_body_bytes)
                    if is_packet
                    else None
                )
            except PacketRefused as exc:
                decoded.append(exc)
        ids = [p.header.id for p in decoded if isinstance(p, env.Packet)]
        with self.ctx.store.read() as conn:  # spares the work on a resent packet; not final
            existing = self._existing(conn, ids) if ids else {}
        for frame, pkt in zip(frames, decoded, strict=True):
            try:  # who made it, and by which hop it came: nothing is signed before this holds
                if isinstance(pkt, PacketRefused):
                    raise pkt
                if pkt is None:
                    fields = env.verify_receipt(frame, self._keys_for, roots=roots)
                else:
                    relay_id = self._authenticate(pkt)
            except PacketRefused as exc:
                answers.append(
                    self._refuse_unauthenticated(
                        frame, pkt, exc, now, batch, remote, admit_refusal, requarantine
                    )
                )
                continue
            v2 = receipts_v2 and (pkt is None or pkt.relay is None)
            try:
                if pkt is None:
                    answers.append(self._take_receipt(fields, frame, batch))
                    continue
                answers.append(
                    self._take_packet(pkt, frame, now, batch, existing, seen, answers, relay_id, v2)
                )
            except PacketRefused as exc:
                answers.append(self._refuse(frame, exc, now, source, batch, requarantine, v2))
        signed = self._sign(answers, {})  # outside the write lock: the commit rarely adds any
        try:
            final, hops = self.ctx.store.write_grouped(
                lambda conn: self._commit(conn, batch, answers, signed)
            )
        except IntegrityError as exc:  # PostgreSQL: a request with one of these ids won a race
            raise StoreError("packet id taken meanwhile: try again") from exc
        faults.point("intake.after_commit")
        if hops and self.on_relayed is not None:
            self.on_relayed(hops)
        return final

    # -- packets ------------------------------------------------------------------------------

    def _take_packet(
        self,
        pkt: env.Packet,
        frame: bytes,
        now: datetime,
        batch: _Batch,
        existing: dict[str, dict[str, Any]],
        seen: dict[str, tuple[tuple[Any, ...], int]],
        answers: list[_Answer],
        relay_id: str | None,
        v2: bool,
    ) -> _Answer:
        """A packet whose sender (and relay) ``_authenticate`` verified: every refusal from
        here on is signed."""
        plan = self.plan
        h = pkt.header
        clock_ref = pkt.relay.relayed_at if pkt.relay is not None else h.created_at
        relaying = h.recipient != plan.node_id
        if relaying and not (self.me.role == "platform" and h.recipient in plan.directory):
            raise WrongRecipient(f"packet is for '{h.recipient}', this node is '{plan.node_id}'")
        if abs(now - clock_ref) > self.window:
            what = "relayed-at" if relay_id else "created-at"
            raise ClockSkew(
                f"{what} {clock_ref.isoformat()} is outside ±{int(self.window.total_seconds())} s"
                f" of this node's clock"
            )
        self._check_route(h.sender, h.recipient, h.kind, relay_id, relaying)
        identity = (h.sender, h.recipient, h.kind, h.thread, h.seq, h.digest)
        if h.id in seen:
            first_identity, index = seen[h.id]
            if first_identity != identity:
                raise ReplayedPacket(f"packet id {h.id} already taken with other content")
            batch.alias.append((len(answers), index))
            return answers[index]
        prior = existing.get(h.id)
        if prior is not None:
            if prior["identity"] != identity:
                raise ReplayedPacket(f"packet id {h.id} already taken with other content")
            batch.audit.append(
                self._entry("duplicate", h, now, relay_id, prior.get("patient_hash"))
            )
            seen[h.id] = (identity, len(answers))
            return _prior_answer(prior, v2)
        seen[h.id] = (identity, len(answers))
        if relaying:
            return self._relay(h, frame, now, batch, len(answers), identity, v2)
        body = env.open_body(pkt, self.ctx.encryption_keys)
        try:
            bundle = parse_and_validate_bundle(body)
        except PacketRefused as exc:
            exc.body = body  # type: ignore[attr-defined]  # kept for IT in quarantine
            raise
        phash = bundle_patient_hash(plan.patient_hash_key, bundle, plan.alliance.national_id_system)
        receipt = self._receipt(h.id, h.sender, h.recipient, h.digest, "accepted", now, v2)
        row = {
            "packet_id": h.id,
            "sender": h.sender,
            "relay": relay_id,
            "kind": h.kind,
            "thread": h.thread,
            "seq": h.seq,
            "digest": h.digest,
            "size": h.size,
            "patient_hash": phash,
            "state": "received",
            "attempts": 0,
            "created_at": h.created_at,
            "received_at": now,
            "next_try_at": now,
            "body": body,
            "receipt": receipt,  # the signed frame, filled in by the commit
        }
        batch.new.append(
            _New(len(answers), len(batch.audit), h, frame, relay_id, identity, False, row, v2)
        )
        batch.audit.append(self._entry("received", h, now, relay_id, phash))
        return receipt

    def _authenticate(self, pkt: env.Packet) -> str | None:
        """The sender's signature, the relay stamp if any, and the hop a packet for this node
        must come by (a member behind the platform only through it: a frame of it sent
        around the platform proves nothing about who sent it now). The relay's id, or None."""
        plan = self.plan
        h = pkt.header
        sender = plan.directory.get(h.sender)
        if sender is None:
            raise UnknownSender(f"sender '{h.sender}' is not in the alliance directory")
        env.verify(pkt, sender.signing_keys)
        relay_id = None
        if pkt.relay is not None:
            relay = plan.directory.get(pkt.relay.relay)
            if relay is None or relay.role != "platform":
                raise UnknownSender(f"relay '{pkt.relay.relay}' is not a platform member")
            env.verify_relay(pkt, relay.signing_keys)
            relay_id = relay.id
        if h.recipient == plan.node_id:
            hub = sender.via or self.me.via
            if hub is not None and relay_id != hub:
                raise RouteDenied(f"{h.sender} -> {h.recipient} must arrive through '{hub}'")
        return relay_id

    def _check_route(
        self, sender: str, recipient: str, kind: str, relay_id: str | None, relaying: bool
    ) -> None:
        plan = self.plan
        if not plan.rules.allows(sender, recipient, kind):
            raise RouteDenied(f"no rule allows {sender} -> {recipient} kind {kind}")
        hub = plan.directory[sender].via or plan.directory[recipient].via
        if relaying:
            if hub != plan.node_id:
                raise RouteDenied(f"{sender} -> {recipient} is not routed through {plan.node_id}")
        elif hub is not None and relay_id != hub:
            raise RouteDenied(f"{sender} -> {recipient} must arrive through '{hub}'")

    def _relay(
        self,
        h: env.Header,
        frame: bytes,
        now: datetime,
        batch: _Batch,
        index: int,
        identity: tuple[Any, ...],
        v2: bool,
    ) -> _Pending:
        """Store and forward: the platform keeps the sealed frame, never a readable body.
        (A stamp of an earlier relay, if any, is replaced when this platform forwards it.)"""
        row = {
            "packet_id": h.id,
            "origin": "relay",
            "sender": h.sender,
            "recipient": h.recipient,
            "next_hop": h.recipient,
            "kind": h.kind,
            "thread": h.thread,
            "seq": h.seq,
            "digest": h.digest,
            "size": h.size,
            "patient_hash": None,
            "state": "queued",
            "attempts": 0,
            "created_at": now,
            "next_try_at": now,
            "body": None,
            "frame": frame,
        }
        batch.new.append(_New(index, len(batch.audit), h, frame, None, identity, True, row, v2))
        batch.audit.append(self._entry("relay-queued", h, now, None, None))
        return self._receipt(h.id, h.sender, h.recipient, h.digest, "relayed", now, v2)

    # -- receipts forwarded back through a platform ---------------------------------------------

    def _take_receipt(self, fields: dict[str, Any], frame: bytes, batch: _Batch) -> bytes:
        if fields.get("sender") != self.plan.node_id:
            raise WrongRecipient(f"receipt for a packet sent by '{fields.get('sender')}'")
        batch.acks.append((fields, frame))
        return b""

    def _keys_for(self, node: str) -> tuple[Any, ...]:
        member = self.plan.directory.get(node)
        if member is None:
            raise UnknownSender(f"receipt signer '{node}' is not in the alliance directory")
        return member.signing_keys

    # -- refusals ---------------------------------------------------------------------------

    def _refuse_unauthenticated(
        self,
        frame: bytes,
        pkt: env.Packet | PacketRefused | None,
        exc: PacketRefused,
        now: datetime,
        batch: _Batch,
        remote: str | None,
        admit: Callable[[], bool] | None,
        keep: bool,
    ) -> bytes:
        """Unsigned answer; quarantine keeps a prefix, digest, length and source (if this
        source is within its refusal rate), and the audit says so once per kept refusal."""
        if keep and (admit is None or admit()):
            h = pkt.header if isinstance(pkt, env.Packet) else None
            claimed: dict[str, Any] = (
                {}
                if h is None
                else {
                    "sender": h.sender[:64],
                    "recipient": h.recipient[:64],
                    "packet_id": h.id,
                    "kind": h.kind[:48],
                    "thread": h.thread[:64],
                }
            )
            batch.quarantine.append(
                untrusted_row(
                    now,
                    exc,
                    frame,
                    prefix=self.plan.retention.quarantine_prefix_bytes,
                    remote=remote,
                    **claimed,
                )
            )
            batch.audit.append(
                AuditEntry(
                    action="refused",
                    outcome="4",
                    packet_id=claimed.get("packet_id"),
                    kind=claimed.get("kind"),
                    peer=claimed.get("sender"),
                    thread=claimed.get("thread"),
                    code=exc.code,
                    message=exc.message,
                    at=now,
                    extra={"authenticated": False, "remote": remote, "size": len(frame)},
                )
            )
        return unsigned_error(exc)

    def _refuse(
        self,
        frame: bytes,
        exc: PacketRefused,
        now: datetime,
        source: str,
        batch: _Batch,
        keep: bool = True,
        v2: bool = False,
    ) -> _Pending:
        header = _peek_header(frame)
        if not keep:  # a replay from quarantine: the original item records the outcome
            return self._refusal(header, exc, now, v2)
        body = getattr(exc, "body", None)  # the opened body, when it failed validation
        phash = bundle_patient(
            body, self.plan.patient_hash_key, self.plan.alliance.national_id_system
        )
        batch.quarantine.append(
            quarantine_row(
                now,
                source,
                exc,
                raw=frame,
                body=body,
                sender=header.get("sender"),
                recipient=header.get("recipient"),
                packet_id=header.get("id"),
                kind=header.get("kind"),
                thread=header.get("thread"),
                patient_hash=phash,
            )
        )
        batch.audit.append(
            AuditEntry(
                action="refused",
                outcome="4",
                packet_id=header.get("id"),
                kind=header.get("kind"),
                peer=header.get("sender"),
                thread=header.get("thread"),
                patient_hash=phash,
                code=exc.code,
                message=exc.message,
                at=now,
            )
        )
        return self._refusal(header, exc, now, v2)

    def _refusal(
        self, header: dict[str, Any], exc: PacketRefused, now: datetime, v2: bool
    ) -> _Pending:
        return _Pending(
            {
                "packet": header.get("id"),
                "sender": header.get("sender"),
                "recipient": header.get("recipient"),
                "receiver": self.plan.node_id,
                "status": "refused",
                "code": exc.code,
                "message": exc.message,
                "at": _iso(now),
                "digest": header.get("digest"),
            },
            v2,
        )

    # -- helpers ------------------------------------------------------------------------------

    def _receipt(
        self,
        packet: str,
        sender: str,
        recipient: str,
        digest: str,
        status: str,
        now: datetime,
        v2: bool,
    ) -> _Pending:
        return _Pending(
            {
                "packet": packet,
                "sender": sender,
                "recipient": recipient,
                "receiver": self.plan.node_id,
                "status": status,
                "code": None,
                "message": None,
                "at": _iso(now),
                "digest": digest,
                **self.ctx.audit.receipt_fields(),  # additive: our latest signed checkpoint
            },
            v2,
        )

    def _sign(self, answers: list[_Answer], presigned: dict[int, bytes]) -> dict[int, bytes]:
        """The frame of every receipt in ``answers`` (by ``id`` of its ``_Pending``): each
        ``HTR1`` signed alone, the ``HTR2`` ones under one root. ``presigned``: frames signed
        earlier for these answers; an ``HTR1`` is reused, the ``HTR2`` ones only if the batch's
        v2 receipts are still exactly those (else the root would cover a receipt not given)."""
        pending = list({id(a): a for a in answers if isinstance(a, _Pending)}.values())
        key = self.ctx.signing_key
        done = {
            id(p): presigned.get(id(p)) or env.sign_receipt(p.fields, key)
            for p in pending
            if not p.v2
        }
        v2 = [p for p in pending if p.v2]
        before = {i for i, f in presigned.items() if f[:4] == env.MAGIC_RECEIPT_BATCH}
        if v2 and before == {id(p) for p in v2}:
            done.update((id(p), presigned[id(p)]) for p in v2)
        elif v2:
            frames = env.sign_receipts([p.fields for p in v2], key)
            done.update(zip((id(p) for p in v2), frames, strict=True))
        return done

    def _entry(
        self, action: str, h: env.Header, now: datetime, relay: str | None, phash: str | None
    ) -> AuditEntry:
        return AuditEntry(
            action=action,
            packet_id=h.id,
            kind=h.kind,
            peer=h.sender,
            thread=h.thread,
            patient_hash=phash,
            at=now,
            extra={"relay": relay} if relay else None,
        )

    def _existing(self, conn: Connection, ids: list[str]) -> dict[str, dict[str, Any]]:
        """Packet ids of this batch already taken (one query a table for the whole batch): by
        a packet received or relayed, or by one of this node's own (never a duplicate)."""
        found: dict[str, dict[str, Any]] = {}
        for r in conn.execute(
            select(
                INBOX.c.packet_id,
                INBOX.c.sender,
                INBOX.c.kind,
                INBOX.c.thread,
                INBOX.c.seq,
                INBOX.c.digest,
                INBOX.c.receipt,
                INBOX.c.patient_hash,
            ).where(INBOX.c.packet_id.in_(ids))
        ):
            found[r.packet_id] = {
                "identity": (r.sender, self.plan.node_id, r.kind, r.thread, r.seq, r.digest),
                "receipt": r.receipt,
                "patient_hash": r.patient_hash,
            }
        for o in conn.execute(
            select(
                OUTBOX.c.packet_id,
                OUTBOX.c.sender,
                OUTBOX.c.recipient,
                OUTBOX.c.kind,
                OUTBOX.c.thread,
                OUTBOX.c.seq,
                OUTBOX.c.digest,
                OUTBOX.c.created_at,
                OUTBOX.c.origin,
            ).where(OUTBOX.c.packet_id.in_(ids))
        ):
            if o.origin != "relay":
                # this node's own packet (a peer may have read its id on it): taken by content
                # no peer's packet has, refused as a replay here rather than by the outbox's
                # unique key at commit (a 503 on every try) if it was to be relayed
                found.setdefault(o.packet_id, {"identity": None})
                continue
            identity = (o.sender, o.recipient, o.kind, o.thread, o.seq, o.digest)
            # its 'relayed' receipt is signed again (only if it is given: ``_prior_answer``)
            fields = self._receipt(
                o.packet_id, o.sender, o.recipient, o.digest, "relayed", o.created_at, False
            ).fields
            found[o.packet_id] = {"identity": identity, "fields": fields}
        return found

    def _commit(
        self,
        conn: Connection,
        batch: _Batch,
        provisional: list[_Answer],
        presigned: dict[int, bytes],
    ) -> tuple[list[bytes], set[str]]:
        """Write the batch in ``conn``'s transaction: its answers and the next hops of what it
        queued for relay. Reads ``batch`` and changes nothing of it, so it can run again after
        a rollback (a group that failed, each request then alone)."""
        answers = list(provisional)
        audit: list[AuditEntry | None] = list(batch.audit)
        quarantine = [dict(row) for row in batch.quarantine]
        inbox: list[dict[str, Any]] = []
        relay: list[dict[str, Any]] = []
        # the exact look-up: under the write lock (SQLite), so it also sees the packets of the
        # requests committed since the first look-up and of those earlier in this group
        taken = self._existing(conn, [n.header.id for n in batch.new]) if batch.new else {}
        for new in batch.new:
            prior = taken.get(new.header.id)
            if prior is None:
                (relay if new.relayed else inbox).append(dict(new.row))
            elif prior["identity"] == new.identity:
                answers[new.index] = _prior_answer(prior, new.v2)
                audit[new.audit] = self._entry(
                    "duplicate", new.header, batch.now, new.relay_id, prior.get("patient_hash")
                )
            else:
                refused = _Batch(now=batch.now, source=batch.source, keep=batch.keep)
                exc = ReplayedPacket(f"packet id {new.header.id} already taken with other content")
                answers[new.index] = self._refuse(
                    new.frame, exc, batch.now, batch.source, refused, batch.keep, new.v2
                )
                quarantine += refused.quarantine
                audit[new.audit] = refused.audit[0] if refused.audit else None
        for index, first in batch.alias:
            answers[index] = answers[first]
        signed = self._sign(answers, presigned)
        for row in inbox:
            row["receipt"] = signed[id(row["receipt"])]
        if inbox:
            # a signed packet whose bundle names no patient (a status, a result) on a thread
            # this node knows is that thread's patient's, in the browser and the audit
            found: dict[str, str] = {}
            for row in inbox:
                if row["patient_hash"] is None:
                    row["patient_hash"] = known_patient(conn, thread=row["thread"])
                    if row["patient_hash"]:
                        found[row["packet_id"]] = row["patient_hash"]
            if found:
                audit = [
                    replace(e, patient_hash=found[e.packet_id])
                    if e is not None and e.action == "received" and e.packet_id in found
                    else e
                    for e in audit
                ]
            conn.execute(insert(INBOX), inbox)
        if relay:
            conn.execute(insert(OUTBOX), relay)
        entries = [e for e in audit if e is not None]
        if quarantine:
            for row in quarantine:  # a signed packet of a thread this node knows
                if row["trusted"] and row["patient_hash"] is None and row["thread"]:
                    row["patient_hash"] = known_patient(conn, thread=row["thread"])
            conn.execute(insert(QUARANTINE), quarantine)
            entries += quota_entries(
                enforce_quota(conn, self.plan.retention.quarantine_max_bytes),
                self.plan.retention.quarantine_max_bytes,
                self.ctx.now(),
            )
        for fields, frame in batch.acks:
            entries += apply_receipt(self.ctx, conn, fields, frame)
        if entries:
            self.ctx.audit.append_at_commit(conn, entries)
        faults.point("intake.before_commit")
        final = [
            signed[id(a)] if isinstance(a, _Pending) else a if a is not None else b""
            for a in answers
        ]
        return final, {r["next_hop"] for r in relay}


def _prior_answer(prior: dict[str, Any], v2: bool) -> bytes | _Pending:
    """The answer to a packet taken before: its stored receipt as it was given (an ``HTR2``
    one signed again as ``HTR1`` for a sender that did not ask for v2, which may know only
    ``HTR1``), or, for a relayed one, its 'relayed' receipt to sign."""
    if "fields" in prior:
        return _Pending(prior["fields"], v2)
    stored: bytes = prior["receipt"]
    if not v2 and stored[:4] == env.MAGIC_RECEIPT_BATCH:
        return _Pending(env.receipt_fields(stored), False)
    return stored


def apply_receipt(
    ctx: NodeContext, conn: Connection, fields: dict[str, Any], frame: bytes
) -> list[AuditEntry]:
    """Record an end-to-end receipt on the outbox row it answers (idempotent)."""
    now = ctx.now()
    row = conn.execute(
        select(
            OUTBOX.c.id,
            OUTBOX.c.state,
            OUTBOX.c.recipient,
            OUTBOX.c.kind,
            OUTBOX.c.thread,
            OUTBOX.c.patient_hash,
            OUTBOX.c.origin,
        ).where(OUTBOX.c.packet_id == fields.get("packet"))
    ).first()
    if row is None or row.state in ("acknowledged", "refused"):
        return []
    if fields.get("receiver") != row.recipient:
        return []
    accepted = fields.get("status") == "accepted"
    conn.execute(
        update(OUTBOX)
        .where(OUTBOX.c.id == row.id)
        .values(
            state="acknowledged" if accepted else "refused",
            acked_at=now,
            receipt=frame,
            last_error=None if accepted else f"{fields.get('code')}: {fields.get('message')}",
        )
    )
    return [
        AuditEntry(
            action="acknowledged" if accepted else "rejected",
            outcome="0" if accepted else "8",
            packet_id=fields.get("packet"),
            kind=row.kind,
            peer=row.recipient,
            thread=row.thread,
            patient_hash=row.patient_hash,
            code=fields.get("code"),
            message=fields.get("message"),
            at=now,
        )
    ]


def quota_entries(done: dict[str, int], quota: int, now: datetime) -> list[AuditEntry]:
    """The audit of a quota enforcement: one entry with the counts, none if nothing went."""
    if not (done["dropped"] or done["emptied"]):
        return []
    return [
        AuditEntry(
            action="quarantine-dropped",
            outcome="4",
            at=now,
            message=(
                f"{done['dropped']} unauthenticated refusal(s) dropped and "
                f"{done['emptied']} member item(s) emptied: quarantine over its quota of "
                f"{quota} bytes"
            ),
            extra=dict(done, quota=quota),
        )
    ]


def _iso(t: datetime) -> str:
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _peek_header(frame: bytes) -> dict[str, Any]:
    """Best-effort header fields of a refused frame, for quarantine and audit only."""
    try:
        pkt = env.decode(frame, max_body=1 << 62)
    except HutongError:
        return {}
    h = pkt.header
    return {
        "id": h.id,
        "sender": h.sender,
        "recipient": h.recipient,
        "kind": h.kind,
        "thread": h.thread,
        "digest": h.digest,
    }
