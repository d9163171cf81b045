"""Results that arrive from another member: into the local FHIR store, linked to the referral.

Runs as the dispatcher hook for ``result.*`` kinds, before the packet is handed to the local
handler (the HIS adapter, or the spool), so by the time the HIS gets the Bundle the results are
also readable through the local FHIR API. The result packets of one dispatcher round are stored
in ONE write transaction (:meth:`ResultsInbox.apply_many`), each still idempotent by packet id.
The sender's Patient is replaced by this side's own record of the patient: the referral's patient
when the packet is on a referral thread known here, else the patient with the same keyed hash
(every Patient reference and hash-only subject mapped to it, bridge/referral/naming.py), else the
sender's Patient is registered (with the hash, never an ID number: none travels). Before that, a
reference that names another entry's ``fullUrl`` (``urn:uuid:``, or an absolute URL) is made that
entry's ``Type/id``, as a transaction's are: stored as sent, an ``urn:uuid`` subject would be found
by no patient search (``Observation?patient=``) and no report's ``result`` by the results view.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, insert, select

from bridge.audit.events import AuditEntry
from bridge.context import NodeContext
from bridge.delivery.handlers import Delivery
from bridge.errors import HutongError, InvalidResource, NotThreadParty, StoreError
from bridge.fhirstore import store
from bridge.local.contract import ResultEvent, decode_bundle
from bridge.referral import naming
from bridge.referral import resources as R
from bridge.referral.tables import REFERRAL
from bridge.referral.workflow import foreign_row, thread_view
from bridge.results.tables import RESULT_PACKET

log = logging.getLogger(__name__)

#: how long one transaction of ``apply_many`` goes on taking packets: the intake, SQLite's other
#: writer, waits behind it about this long at most (a packet takes 5-15 ms on the 2-core VM;
#: 0.05 s made the intake wait 3-5x longer per write than one packet a transaction did,
#: bench/README.md "B's local delivery")
HOLD_S = 0.02
#: the same on PostgreSQL, where the intake does not wait for the delivery's transaction (row
#: locks, and the audit chain's lock is taken at the commit only: ``append_at_commit``): a
#: round's packets in one transaction, one commit (a durable one is a WAL flush each)
HOLD_PG_S = 0.5
#: packets whose reads are made together (``_Ahead``), at first; doubled each time up to
#: ``AHEAD_MAX``, so a short SQLite transaction reads little ahead for nothing
AHEAD_FIRST, AHEAD_MAX = 4, 64
#: ... and at most this many body bytes (at least one packet): the window's bundles are held
#: decoded until applied, 5-10 times their JSON's size as Python objects (64 windows of 64 KiB
#: bundles raised B's peak RSS on PostgreSQL from 155 to 169 MiB, bench/README.md "Peak RSS")
AHEAD_MAX_BYTES = 1 << 20

#: what :meth:`ResultsInbox.apply_many` answers per packet: the event as stored, the packet's
#: error, or None (not applied: an earlier packet of its thread in the same call failed)
Outcome = ResultEvent | Exception | None


@dataclass(slots=True)
class _Planned:
    """One packet's writes, worked out by reads and checks alone (nothing written yet)."""

    item: Delivery
    bundle: dict[str, Any]
    row: Any  # the referral row of the packet's thread, or None
    phash: str | None
    mine: str | None  # this node's Patient reference, if known before the packet's writes
    items: list[tuple[dict[str, Any], str | None, str | None]]
    stored: bool  # applied before (RESULT_PACKET): nothing to write, only the event


class _Ahead:
    """What one transaction of ``apply_many`` read for several packets in one statement each
    (their threads' referrals, which of them were applied before, the current owners of their
    resources, their patients), instead of a statement per packet and per resource: on
    PostgreSQL each is a round trip to the server. Kept up to date with the transaction's own
    writes, so a packet sees what the packets before it in the same transaction wrote."""

    def __init__(self) -> None:
        self.upto = 0  # packets of the part read ahead so far
        self.width = AHEAD_FIRST
        self.referrals: dict[str, Any] = {}
        self.stored: set[str] = set()
        self.owners: dict[tuple[str, str], tuple[str | None, str | None]] = {}
        self.patients: dict[str, str] = {}  # keyed hash -> this node's Patient reference
        self.decoded: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = {}

    def read(self, conn: Connection, items: Sequence[Delivery], k: int) -> None:
        """Read ahead for ``items[k:]`` (the next window) unless packet ``k`` is read already."""
        if k < self.upto:
            return
        window: list[Delivery] = []
        size = 0
        for item in items[k : k + self.width]:
            if window and size + len(item.body) > AHEAD_MAX_BYTES:
                break
            window.append(item)
            size += len(item.body)
        self.upto, self.width = k + len(window), min(self.width * 2, AHEAD_MAX)
        keys: list[tuple[str, str]] = []
        for item in window:
            try:
                self.decoded[item.packet_id] = decoded = _decoded(item)
            except Exception:  # noqa: BLE001 - ``_plan`` decodes it again and fails it alone
                continue
            keys += [(r["resourceType"], str(r.get("id"))) for r in decoded[1]]
        threads = sorted({i.thread for i in window})
        self.referrals.update(
            (r.thread, r)
            for r in conn.execute(select(REFERRAL).where(REFERRAL.c.thread.in_(threads)))
        )
        ids = sorted({i.packet_id for i in window})
        self.stored.update(
            conn.execute(
                select(RESULT_PACKET.c.packet_id).where(RESULT_PACKET.c.packet_id.in_(ids))
            ).scalars()
        )
        self.owners.update(store.owners(conn, keys))

    def owned(self, resource: dict[str, Any]) -> tuple[str | None, str | None] | None:
        """(thread, origin) of the resource's current row here, or None (none yet)."""
        return self.owners.get((resource["resourceType"], str(resource.get("id"))))

    def patient(self, conn: Connection, phash: str) -> str | None:
        """This node's Patient with the keyed hash (a reference), remembered once found."""
        mine = self.patients.get(phash)
        if mine is None:
            local = store.find_patient_by_hash(conn, phash)
            if local is not None:
                mine = self.patients[phash] = R.ref(local)
        return mine

    def wrote(self, plan: _Planned) -> None:
        """The packet's writes, as the rows they leave (put_many: the thread given, or the
        row's own; the sender's making)."""
        self.stored.add(plan.item.packet_id)
        for r, thread, _ in plan.items:
            key = (r["resourceType"], str(r.get("id")))
            before = self.owners.get(key)
            self.owners[key] = (thread or (before[0] if before else None), plan.item.sender)


class ResultsInbox:
    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx

    def apply_many(self, items: Sequence[Delivery]) -> list[Outcome]:
        """Store result packets, in the dispatcher's order, in write transactions that hold
        the writer about ``HOLD_S`` each (a few packets each, instead of a transaction and a
        read per packet); per packet the event as stored (this node's patient and referral),
        or its error. A packet that a check refuses writes nothing and fails
        alone; the packets after it on its thread are not applied (None): a thread's results
        are stored in order, never past a failed one. If a statement fails (a constraint, the
        disk), the transaction is rolled back, the packets before the one that broke it are
        applied again together and that one alone, so only it fails (``Store.write_grouped``
        does the same for the LIS intake); a store that is unavailable fails the rest.
        Idempotent by packet id (``RESULT_PACKET``, written with the packet's resources): a
        crash after a commit and before the dispatcher marks the packets delivered stores
        nothing twice."""
        out: list[Outcome] = []
        failed: set[str] = set()  # threads with a failed packet: the rest of each waits
        todo = list(items)
        upto: int | None = None  # after a rollback: the packets before the one that broke it
        while todo:
            part, upto = todo[:upto] if upto else todo, None
            marked, reached = set(failed), [0]
            try:
                with self.ctx.store.write() as conn:
                    done = self._apply_in(conn, part, marked, reached)
            except Exception as exc:  # noqa: BLE001 - rolled back; whose it is, below
                k = reached[0]
                if isinstance(exc, StoreError):  # the store, not a packet: all wait
                    for i in todo:  # the error for each thread's first, None behind it
                        out.append(None if i.thread in failed else exc)
                        failed.add(i.thread)
                    return out
                if k:  # applied again without it, then it runs first, alone
                    upto = k
                    log.debug("result packet %d of %d broke its transaction", k + 1, len(part))
                else:  # it was the first: its own error
                    failed.add(todo[0].thread)
                    out.append(exc)
                    todo = todo[1:]
                continue
            out += done
            failed = marked
            todo = todo[len(done) :]
        return out

    def _apply_in(
        self, conn: Connection, items: Sequence[Delivery], failed: set[str], reached: list[int]
    ) -> list[Outcome]:
        """Packets in ``conn``'s transaction, from the first, until ``HOLD_S`` has passed; a
        check's refusal is that packet's answer (its thread added to ``failed``), any other
        error propagates with ``reached[0]`` = the index of the packet it broke."""
        out: list[Outcome] = []
        until = time.monotonic() + (HOLD_S if self.ctx.store.is_sqlite else HOLD_PG_S)
        ahead = _Ahead()
        marks: list[dict[str, Any]] = []  # the RESULT_PACKET rows, inserted at the end
        for k, item in enumerate(items):
            if k and time.monotonic() > until:
                break
            reached[0] = k
            if item.thread in failed:
                out.append(None)
                continue
            ahead.read(conn, items, k)
            try:
                plan = self._plan(conn, item, ahead)
            except HutongError as exc:  # refused before any write of its own
                failed.add(item.thread)
                out.append(exc)
                continue
            if not plan.stored:
                self._write(conn, plan, marks)
                ahead.wrote(plan)
            out.append(self._event(conn, plan, ahead))
        if marks:  # one statement; if it breaks, the last packet is taken as the one
            reached[0] = len(out) - 1
            conn.execute(insert(RESULT_PACKET), marks)
        return out

    def _plan(self, conn: Connection, item: Delivery, ahead: _Ahead) -> _Planned:
        """Reads (most of them made ahead, ``ahead``) and checks only: what the packet will
        write (refusals raise HutongError)."""
        found = ahead.decoded.pop(item.packet_id, None)
        bundle, resources = found if found is not None else _decoded(item)
        row = ahead.referrals.get(item.thread)
        phash = row.patient_hash if row is not None else item.patient_hash
        if item.packet_id in ahead.stored:
            return _Planned(item, bundle, row, phash, None, [], stored=True)
        if row is not None and item.sender != (
            row.receiver if row.side == "referrer" else row.referrer
        ):
            # the dispatcher's gate refuses these first; kept as a guard
            raise NotThreadParty(
                f"result on referral thread {row.thread} from "
                f"'{item.sender}', which is not a party of that referral"
            )
        mine: str | None = None
        if row is not None:
            mine = store.get(conn, "Task", row.task_id)["for"]["reference"]
        elif phash:
            mine = ahead.patient(conn, phash)
        if mine:  # named our way; our own record of the patient stays as it is (naming)
            resources = naming.incoming(mine, phash, resources)
        thread = row.thread if row is not None else None
        items: list[tuple[dict[str, Any], str | None, str | None]] = []
        for r in resources:
            owned = ahead.owned(r)
            if r.get("resourceType") == "Organization":
                if owned is not None and owned[1] != item.sender:
                    continue  # another member's (or our own) record of an organisation
                items.append((r, None, None))
            else:
                if owned is not None and isinstance(r.get("id"), str):
                    foreign_row(r, owned, item.thread, item.sender)
                items.append((r, thread, phash))
        return _Planned(item, bundle, row, phash, mine, items, stored=False)

    def _write(self, conn: Connection, plan: _Planned, marks: list[dict[str, Any]]) -> None:
        """The packet's resources and its audit row (chained at the commit); its RESULT_PACKET
        row goes to ``marks``, inserted with the transaction's others at its end."""
        item, row, now = plan.item, plan.row, self.ctx.now()
        # one statement per table for the packet's resources (bench/README.md, lis.py)
        store.put_many(conn, plan.items, at=now, origin=item.sender)
        count = len(plan.items)
        marks.append(
            {
                "packet_id": item.packet_id,
                "sender": item.sender,
                "kind": item.kind,
                "thread": row.thread if row is not None else None,
                "patient_hash": plan.phash,
                "resources": count,
                "at": now,
            }
        )
        entry = AuditEntry(
            action="results",
            packet_id=item.packet_id,
            kind=item.kind,
            peer=item.sender,
            thread=item.thread,
            patient_hash=plan.phash,
            at=now,
            message=f"{count} result resource(s) stored"
            + ("" if row is not None else " (no referral known for the thread)"),
            extra={"linked": row is not None},
        )
        self.ctx.audit.append_at_commit(conn, [entry])

    def _event(self, conn: Connection, plan: _Planned, ahead: _Ahead) -> ResultEvent:
        """The packet as stored, read in the same transaction right after its writes (a later
        packet of the same call is not in it yet)."""
        item = plan.item
        view = thread_view(conn, item.thread) if plan.row is not None else None
        mine: str | None = None
        if view is not None:
            mine = store.get(conn, "Task", view["referral"]["task_id"])["for"]["reference"]
        elif plan.mine is not None:
            mine = plan.mine  # the packet registered no Patient of its own
        elif item.patient_hash:
            mine = ahead.patient(conn, item.patient_hash)
        return ResultEvent(item, plan.bundle, mine, view)


def _decoded(item: Delivery) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The packet's Bundle (decoded once, for the hook and the sink alike) and its resources
    as stored; a packet without a result resource is refused."""
    bundle = decode_bundle(item)
    resources = _by_type_and_id(bundle, item.packet_id)
    if not any(
        r.get("resourceType") in ("DiagnosticReport", "Observation", "ImagingStudy")
        for r in resources
    ):
        raise InvalidResource(
            "a result packet needs a DiagnosticReport, Observation or ImagingStudy"
        )
    return bundle, resources


def _by_type_and_id(bundle: dict[str, Any], packet_id: str) -> list[dict[str, Any]]:
    """The Bundle's resources, every reference to an entry's ``fullUrl`` made that entry's
    ``Type/id`` (``R.rewrite_refs``, as ``fhir_transaction.store_plain`` does); any other
    reference stays as sent. The Bundle handed to the local side gets the same: an entry
    without an id is given one, derived from the packet so that a packet applied again (after
    a rollback, or a crash before it was marked delivered) names the same resources, and the
    references are those stored, so a HIS adapter that looks a report's results up by
    ``Type/id`` finds them. Copies: the store's meta does not reach the Bundle handed over."""
    entries = [e for e in bundle.get("entry") or () if "resourceType" in (e.get("resource") or {})]
    mapping: dict[str, str] = {}
    for k, e in enumerate(bundle.get("entry") or ()):
        r = e.get("resource") or {}
        if "resourceType" in r:
            r.setdefault("id", str(uuid.uuid5(uuid.NAMESPACE_URL, f"{packet_id}/{k}")))
            if isinstance(e.get("fullUrl"), str):
                mapping[e["fullUrl"]] = R.ref(r)
    if mapping:
        for e in entries:
            e["resource"] = R.rewrite_refs(e["resource"], mapping)
    return [dict(e["resource"]) for e in entries]
