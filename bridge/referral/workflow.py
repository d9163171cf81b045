"""Two-way referral (双向转诊) as a closed FHIR loop, the same code on both sides.

Local steps (``submit``, ``move``, ``step``) check the state machine, update the Task and the
store, and queue the message packet in ONE transaction. Arriving packets are applied by
``apply_packet`` (idempotent by packet id), so duplicates leave both sides in the same state.
The dispatcher hands a thread's packets over only from the referral's other party and in that
party's sequence order (``bridge/delivery/threads.py``); here a step from the other side is
checked again (party, then the same state machine as a local step) before anything is stored.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import orjson
from sqlalchemy import Connection, insert, select, update

from bridge.audit.events import AuditEntry
from bridge.context import NodeContext
from bridge.delivery.handlers import Delivery
from bridge.delivery.queue import Outgoing, queue_packets
from bridge.errors import (
    IllegalTransition,
    InvalidResource,
    MissingConsent,
    NotFound,
    NotThreadParty,
    UnknownReference,
    VersionConflict,
)
from bridge.fhirstore import store
from bridge.local import intake
from bridge.local.contract import ReferralEvent, decode_bundle
from bridge.referral import naming
from bridge.referral import resources as R
from bridge.referral.carried import Carried
from bridge.referral.codes import (
    EVENTS,
    ICD10,
    KINDS,
    PLACER,
    RETURN_KIND,
    kind_of,
    pilot_disease,
    step_codeable,
    step_of,
)
from bridge.referral.states import MOVES, check, target_for_status
from bridge.referral.tables import REFERRAL, REFERRAL_STEP

#: resource types a referral or return may carry besides Patient/ServiceRequest/Task
CARRIED = (
    "Consent",
    "Composition",
    "DocumentReference",
    "DiagnosticReport",
    "Observation",
    "ImagingStudy",
    "MedicationRequest",
    "MedicationStatement",
    "Coverage",
    "Encounter",
    "Practitioner",
    "Condition",
    "Specimen",
    "Appointment",
)


class Workflow:
    def __init__(self, ctx: NodeContext, wake: Callable[[], None] | None = None) -> None:
        self.ctx = ctx
        self.plan = ctx.plan
        self.me = ctx.plan.node_id
        self.carried = Carried(ctx.plan)
        self.wake = wake or (lambda: None)

    # -- API entry points ---------------------------------------------------------------------

    def submit(
        self,
        bundle: dict[str, Any],
        actor: str,
        *,
        once: tuple[str, str] | None = None,
        prepare: Callable[
            [Connection, dict[str, Any]], tuple[dict[str, Any], dict[int, dict[str, Any]]]
        ]
        | None = None,
    ) -> dict[str, Any]:
        """POST /fhir transaction: a new referral, or the return of one we received.

        ``once`` = (adapter, source key): the local record that caused this call. The key
        commits with the referral, and a repeated call returns the first answer unchanged.
        ``prepare(conn, bundle)``, inside the write transaction before anything is stored, may
        refuse (``ifMatch``) or answer entries itself (``ifNoneExist`` matches): it returns the
        bundle left to store and the response entries it answered, by entry index. The answer
        has one entry per request entry, in order, each with the stored version's real status,
        location, etag and lastModified.
        """
        if bundle.get("type") != "transaction":
            raise InvalidResource("POST /fhir takes a Bundle of type 'transaction'")
        with self.ctx.store.write() as conn:
            if once is not None and (prior := intake.seen(conn, *once)) is not None:
                return prior
            answered: dict[int, dict[str, Any]] = {}
            if prepare is not None:
                bundle, answered = prepare(conn, bundle)
            resources, created = self.carried.unpack(bundle)
            srs = [r for r in resources if r["resourceType"] == "ServiceRequest"]
            if len(srs) != 1:
                raise InvalidResource(
                    f"a referral bundle holds exactly one ServiceRequest, found {len(srs)}"
                )
            based = self._returned_referral(conn, srs[0])
            if based is not None:
                thread = self._return(conn, based, resources, actor)
            else:
                thread = self._request(conn, srs[0], resources, actor)
            made = iter(created)
            entries = [
                answered[i] if i in answered else {"response": response_of(next(made))}
                for i in range(len(answered) + len(created))
            ]
            answer = {"resourceType": "Bundle", "type": "transaction-response", "entry": entries}
            if once is not None:
                intake.remember(conn, *once, answer, self.ctx.now(), thread=thread)
        self.wake()
        return answer

    def move(
        self, task_id: str, task: dict[str, Any], actor: str, *, if_match: int | None = None
    ) -> dict[str, Any]:
        """PUT /fhir/Task/{id}: a status change asks for the matching step. ``if_match``: the
        version the client changed; another current version refuses it (VersionConflict)."""
        with self.ctx.store.read() as conn:
            row = self._row_by_task(conn, task_id)
        wanted = task.get("status")
        if wanted == row.status:
            with self.ctx.store.read() as conn:
                current = store.get(conn, "Task", task_id)
            check_version(current, if_match)
            return current
        event = target_for_status(str(wanted))
        if wanted == "cancelled":
            event = "cancel" if row.side == "referrer" else "cancelled"
        if event is None:
            raise IllegalTransition(f"cannot set a referral Task to '{wanted}'")
        if event == "return":
            raise IllegalTransition(
                "a referral is completed by POSTing its return bundle (a "
                "down-referral ServiceRequest basedOn it) to /fhir"
            )
        details: dict[str, Any] = {}
        if event == "accept":
            details["outputs"] = [o for o in task.get("output") or []]
        if event in ("reject", "cancel", "cancelled"):
            reason = (task.get("statusReason") or {}).get("text")
            if not reason:
                raise InvalidResource(f"'{event}' needs Task.statusReason.text")
            details["reason"] = reason
        return self.step(row.thread, event, actor, if_match=if_match, **details)

    def step(
        self,
        thread: str,
        event: str,
        actor: str,
        *,
        reason: str | None = None,
        outputs: list[dict[str, Any]] | None = None,
        once: tuple[str, str] | None = None,
        if_match: int | None = None,
    ) -> dict[str, Any]:
        """Take a local step (accept, reject, arrive, cancel) and send it to the other side.

        ``once`` as in :meth:`submit`: a repeated call returns the Task as first answered."""
        with self.ctx.store.write() as conn:
            if once is not None and (prior := intake.seen(conn, *once)) is not None:
                return prior
            task = self.step_in(
                conn, thread, event, actor, reason=reason, outputs=outputs, if_match=if_match
            )
            if once is not None:
                intake.remember(conn, *once, task, self.ctx.now(), thread=thread)
        self.wake()
        return task

    def step_in(
        self,
        conn: Connection,
        thread: str,
        event: str,
        actor: str,
        *,
        reason: str | None = None,
        outputs: list[dict[str, Any]] | None = None,
        if_match: int | None = None,
    ) -> dict[str, Any]:
        """:meth:`step` inside the caller's transaction (e.g. with an Encounter from the HIS);
        the caller wakes the senders after its commit."""
        row = self._row(conn, thread)
        if if_match is not None:  # in this transaction, the Task row locked: no lost update
            check_version(
                {"meta": {"versionId": str(store.lock_version(conn, "Task", row.task_id))}},
                if_match,
            )
        check(event, row.status, row.side)
        task = store.get(conn, "Task", row.task_id)
        self._advance(conn, row, task, event, reason=reason, outputs=outputs, actor=actor)
        extra = [self._revoke(conn, row)] if event == "cancelled" else []
        self._send(conn, row, event, task, extra)
        return task

    def _revoke(self, conn: Connection, row: Any) -> dict[str, Any]:
        sr = store.get(conn, "ServiceRequest", row.sr_id)
        sr["status"] = "revoked"
        return store.put(conn, sr, at=self.ctx.now(), thread=row.thread, origin=self.me)

    # -- new referral ----------------------------------------------------------------------

    def _request(
        self, conn: Connection, sr: dict[str, Any], resources: list[dict[str, Any]], actor: str
    ) -> str:
        now = self.ctx.now()
        kind = kind_of(sr)
        if kind is None:
            raise InvalidResource(
                f"ServiceRequest.code needs a referral kind coding ({', '.join(KINDS)})"
            )
        receiver = self.carried.performer(sr)
        patient = self.carried.patient(conn, sr, resources)
        consent = [
            r
            for r in resources
            if r["resourceType"] == "Consent"
            and r.get("status") == "active"
            and (r.get("patient") or {}).get("reference") == R.ref(patient)
        ]
        if not consent:
            raise MissingConsent(
                "a referral cannot be sent without the patient's or family's "
                "consent: add an active Consent for the patient"
            )
        sr.setdefault("status", "active")
        sr["status"] = "active"
        sr["intent"] = sr.get("intent", "order")
        sr["category"] = sr.get("category") or R.referral_category()
        sr.setdefault("requester", {"reference": f"Organization/{self.me}"})
        sr.setdefault("authoredOn", R.iso(now))
        idents = sr.setdefault("identifier", [])
        if not any(_is_placer(i) for i in idents):
            idents.append(
                {
                    "type": {"coding": [{"system": PLACER, "code": "PLAC"}]},
                    "system": f"urn:hutong:referral-slip:{self.me}",
                    "value": f"ZZ{now:%Y%m%d}-{sr['id'][:8].upper()}",
                }
            )
        support = {s.get("reference") for s in sr.get("supportingInfo") or []}
        for r in resources:
            if (
                r["resourceType"] in CARRIED
                and R.ref(r) not in support
                and r["resourceType"] not in ("Practitioner", "Observation")
            ):
                sr.setdefault("supportingInfo", []).append({"reference": R.ref(r)})
        self.carried.check_refs(conn, resources)
        self.carried.validate(resources)
        thread = str(uuid.uuid4())
        _note_consultation(conn, sr, thread)
        task = R.new_task(
            sr,
            referrer=self.me,
            receiver=receiver,
            patient_ref=R.ref(patient),
            at=now,
            task_id=thread,
        )
        phash = self.carried.hash(patient)
        for r in resources:
            store.put(conn, r, at=now, thread=thread, origin=self.me, patient_hash=phash)
        green = sr.get("priority") in ("urgent", "asap", "stat")
        codes = [
            c.get("code", "")
            for rc in sr.get("reasonCode") or []
            for c in rc.get("coding") or []
            if c.get("system") == ICD10
        ]
        pilot = next((p for p in map(pilot_disease, codes) if p), None)
        conn.execute(
            insert(REFERRAL).values(
                thread=thread,
                side="referrer",
                kind=kind,
                referrer=self.me,
                receiver=receiver,
                status="draft",
                step="draft",
                green_channel=green,
                pilot=pilot,
                patient_hash=phash,
                patient_match="local",
                task_id=task["id"],
                sr_id=sr["id"],
                created_at=now,
                updated_at=now,
            )
        )
        row = self._row(conn, thread)
        self._advance(conn, row, task, "request", actor=actor)
        self._send(conn, row, "request", task, [r for r in resources if r is not sr] + [sr])
        return thread

    # -- return (转回单) -----------------------------------------------------------------------

    def _returned_referral(self, conn: Connection, sr: dict[str, Any]) -> Any | None:
        """The referral a ServiceRequest returns (``basedOn`` a referral's), or None for a new
        referral; a new one may be ``basedOn`` a consultation whose released report recommends
        referral (bridge/consult), and keeps that ``basedOn``."""
        for b in sr.get("basedOn") or []:
            reference = b.get("reference", "")
            if reference.startswith("ServiceRequest/"):
                sr_id = reference.split("/", 1)[1]
                row = conn.execute(select(REFERRAL).where(REFERRAL.c.sr_id == sr_id)).first()
                if row is None and _recommending_consultation(conn, sr_id):
                    continue
                if row is None:
                    raise UnknownReference(
                        f"basedOn {reference} is not a referral known here "
                        "(nor a consultation that recommends referral)"
                    )
                return row
        return None

    def _return(
        self, conn: Connection, row: Any, resources: list[dict[str, Any]], actor: str
    ) -> str:
        check("return", row.status, row.side)
        now = self.ctx.now()
        down = next(r for r in resources if r["resourceType"] == "ServiceRequest")
        if kind_of(down) is None:
            k = RETURN_KIND.get(row.kind, "down-outpatient")
            down.setdefault("code", {}).setdefault("coding", []).append(
                {
                    "system": "http://hutong.dev/CodeSystem/referral-kind",
                    "code": k,
                    "display": KINDS[k].zh,
                }
            )
        down["status"] = "active"
        down.setdefault("intent", "order")
        down["category"] = down.get("category") or R.referral_category()
        task = store.get(conn, "Task", row.task_id)
        down.setdefault("subject", task["for"])
        down.setdefault("requester", {"reference": f"Organization/{self.me}"})
        down.setdefault("performer", [{"reference": f"Organization/{row.referrer}"}])
        self.carried.check_refs(conn, resources)
        self.carried.validate(resources)
        for r in resources:
            store.put(
                conn, r, at=now, thread=row.thread, origin=self.me, patient_hash=row.patient_hash
            )
        outputs = [
            R.output(
                "return-" + r["resourceType"].lower(),
                r["resourceType"],
                valueReference={"reference": R.ref(r)},
            )
            for r in resources
            if r["resourceType"]
            in (
                "ServiceRequest",
                "Encounter",
                "Composition",
                "DiagnosticReport",
                "ImagingStudy",
                "MedicationRequest",
            )
        ]
        self._advance(conn, row, task, "return", outputs=outputs, actor=actor)
        sr = store.get(conn, "ServiceRequest", row.sr_id)
        sr["status"] = "completed"
        store.put(conn, sr, at=now, thread=row.thread, origin=self.me)
        self._send(conn, row, "return", task, [sr, *resources])
        return str(row.thread)

    # -- arriving packets ---------------------------------------------------------------------

    def apply_packet(self, item: Delivery) -> ReferralEvent:
        """Apply one referral message from the other side (dispatcher hook, idempotent); the
        event as applied, for the local sink (bridge.local.contract)."""
        event, task = self._apply(item)
        with self.ctx.store.read() as conn:
            view = thread_view(conn, item.thread)
        if view is None:  # _apply raises before this for a thread not known here
            raise UnknownReference(f"referral step '{event}' for an unknown referral")
        return ReferralEvent(item, event, view["referral"]["side"], item.thread, view, task)

    def _apply(self, item: Delivery) -> tuple[str, dict[str, Any]]:
        bundle = decode_bundle(item)  # decoded once, for the hook and the sink alike
        entries = [e["resource"] for e in bundle.get("entry") or []]
        header = next((r for r in entries if r["resourceType"] == "MessageHeader"), None)
        task = next((r for r in entries if r["resourceType"] == "Task"), None)
        if header is None or task is None:
            raise InvalidResource("a referral message needs a MessageHeader and a Task")
        event = header["eventCoding"]["code"]
        carried = [r for r in entries if r["resourceType"] not in ("MessageHeader",)]
        with self.ctx.store.write() as conn:
            if conn.execute(
                select(REFERRAL_STEP.c.id).where(REFERRAL_STEP.c.packet_id == item.packet_id)
            ).first():
                return event, task  # applied before a crash; the local hand-over is idempotent
            if event == "request":
                self._take_request(conn, item, task, carried)
            else:
                self._take_step(conn, item, event, task, carried)
        self.wake()
        return event, task

    def _take_request(
        self, conn: Connection, item: Delivery, task: dict[str, Any], carried: list[dict[str, Any]]
    ) -> None:
        now = self.ctx.now()
        if conn.execute(select(REFERRAL.c.thread).where(REFERRAL.c.thread == item.thread)).first():
            return
        sr = next(
            r
            for r in carried
            if r["resourceType"] == "ServiceRequest" and R.ref(r) == task["focus"]["reference"]
        )
        peer = peer_patient(carried)
        carried, match, phash = self.carried.match_patient(conn, carried)
        _note_consultation(conn, sr, item.thread, item.sender)
        for r in carried:
            if r["resourceType"] == "Organization" and store.exists(conn, "Organization", r["id"]):
                continue
            foreign_resource(conn, r, item.thread, item.sender)
            store.put(conn, r, at=now, thread=item.thread, origin=item.sender, patient_hash=phash)
        task = next(r for r in carried if r["resourceType"] == "Task")
        conn.execute(
            insert(REFERRAL).values(
                thread=item.thread,
                side="receiver",
                kind=kind_of(sr) or "up-outpatient",
                referrer=item.sender,
                receiver=self.me,
                status="requested",
                step="requested",
                green_channel=sr.get("priority") in ("urgent", "asap", "stat"),
                patient_hash=phash,
                patient_match=match,
                peer_patient=peer,
                task_id=task["id"],
                sr_id=sr["id"],
                created_at=now,
                updated_at=now,
                last_seq_in=item.seq,
            )
        )
        self._log_step(
            conn, item.thread, "request", "draft", "requested", item.packet_id, item.sender
        )
        row = self._row(conn, item.thread)
        self._audit(conn, row, "request", item.sender)
        # "received" is automatic on delivery, and tells the referrer at once
        self._advance(conn, row, task, "received", actor=f"node:{self.me}")
        self._send(conn, row, "received", task, [])

    def _take_step(
        self,
        conn: Connection,
        item: Delivery,
        event: str,
        task: dict[str, Any],
        carried: list[dict[str, Any]],
    ) -> None:
        now = self.ctx.now()
        row = conn.execute(select(REFERRAL).where(REFERRAL.c.thread == item.thread)).first()
        if row is None:
            raise UnknownReference(f"referral step '{event}' for an unknown referral")
        other = row.receiver if row.side == "referrer" else row.referrer
        if item.sender != other:  # the dispatcher's gate refuses these first; kept as a guard
            raise NotThreadParty(
                f"referral step '{event}' on thread {row.thread} from "
                f"'{item.sender}', which is not a party of that referral"
            )
        if task.get("id") != row.task_id:
            raise InvalidResource(
                f"referral step '{event}' carries Task/{task.get('id')}, not this referral's Task"
            )
        # a peer's step takes the same state machine as a local one, before anything is stored
        self._peer_move(row, event, task)
        if item.seq <= row.last_seq_in:
            self._log_step(
                conn, row.thread, event, row.status, row.status, item.packet_id, item.sender
            )
            return  # older than what we already applied from that side
        # named our way: our own record of the patient stays as it is (naming.incoming)
        for r in self.carried.ours(conn, row, carried):
            if r["resourceType"] == "Organization" and store.exists(conn, "Organization", r["id"]):
                continue  # our own records of members stay as they are
            if r["resourceType"] == "Task" and row.side == "receiver":
                continue  # the receiver owns the Task; the referrer's copy never overwrites it
            foreign_resource(conn, r, row.thread, item.sender)
            store.put(
                conn,
                r,
                at=now,
                thread=row.thread,
                origin=item.sender,
                patient_hash=row.patient_hash,
            )
        conn.execute(
            update(REFERRAL).where(REFERRAL.c.thread == row.thread).values(last_seq_in=item.seq)
        )
        if row.side == "referrer":
            self._mirror(conn, row, event, task, item)
        else:
            self._answer(conn, row, event, task, item)

    def _mirror(
        self, conn: Connection, row: Any, event: str, task: dict[str, Any], item: Delivery
    ) -> None:
        """The referrer adopts the receiver's Task: its status is the one truth."""
        now = self.ctx.now()
        values: dict[str, Any] = {
            "status": task["status"],
            "step": step_of(task) or row.step,
            "updated_at": now,
        }
        if event == "accept":
            values["accepted_at"] = now
        if event == "return":
            values["completed_at"] = now
        if task.get("statusReason"):
            values["reason"] = task["statusReason"].get("text")
        conn.execute(update(REFERRAL).where(REFERRAL.c.thread == row.thread).values(**values))
        self._log_step(
            conn, row.thread, event, row.status, task["status"], item.packet_id, item.sender
        )
        row = self._row(conn, row.thread)
        self._audit(conn, row, event, item.sender)
        if event == "return":  # close the loop: the referrer records the return as received
            mine = store.get(conn, "Task", row.task_id)
            self._advance(conn, row, mine, "return-received", actor=f"node:{self.me}")
            self._send(conn, row, "return-received", mine, [])

    def _peer_move(self, row: Any, event: str, task: dict[str, Any]) -> None:
        """Check a step arriving from the other side against the state machine, as a local
        step is checked: the move must be the other side's to take, from the status this side
        holds now, and (from the receiver) the Task it sends must be in the move's target."""
        theirs = "receiver" if row.side == "referrer" else "referrer"
        if event == "cancel" and theirs == "referrer":
            return  # always taken: answered with "cancelled" or "cancel-refused" (_answer)
        if event == "cancel-refused" and theirs == "receiver":
            if task.get("status") != row.status:  # a refusal changes nothing
                raise IllegalTransition(
                    f"'cancel-refused' with Task.status '{task.get('status')}', not '{row.status}'"
                )
            return
        move = check(event, row.status, theirs)
        if theirs == "receiver" and task.get("status") != (move.target or row.status):
            raise IllegalTransition(
                f"'{event}' from '{row.status}' leads to "
                f"'{move.target or row.status}', the Task sent says "
                f"'{task.get('status')}'"
            )

    def _answer(
        self, conn: Connection, row: Any, event: str, task: dict[str, Any], item: Delivery
    ) -> None:
        """The receiver takes the referrer's cancel request or its return-received note."""
        mine = store.get(conn, "Task", row.task_id)
        actor = f"node:{item.sender}"
        if event == "return-received":
            check("return-received", row.status, "referrer")
            self._advance(conn, row, mine, "return-received", actor=actor)
            return
        if event != "cancel":
            raise IllegalTransition(f"the referrer cannot send '{event}'")
        reason = (task.get("statusReason") or {}).get("text") or "withdrawn by the referrer"
        try:
            check("cancelled", row.status, "receiver")
        except IllegalTransition as exc:  # too late (patient arrived): say so, change nothing
            self._log_step(
                conn, row.thread, event, row.status, row.status, item.packet_id, item.sender
            )
            self.ctx.audit.append(
                conn,
                [
                    AuditEntry(
                        action="referral",
                        outcome="4",
                        thread=row.thread,
                        peer=item.sender,
                        patient_hash=row.patient_hash,
                        code=exc.code,
                        message=exc.message,
                        at=self.ctx.now(),
                        extra={"event": "cancel-refused"},
                    )
                ],
            )
            self._send(conn, row, "cancel-refused", mine, [])
            return
        self._log_step(conn, row.thread, event, row.status, row.status, item.packet_id, item.sender)
        self._advance(conn, row, mine, "cancelled", actor=actor, reason=reason)
        self._send(conn, row, "cancelled", mine, [self._revoke(conn, row)])

    # -- shared steps -------------------------------------------------------------------------

    def _advance(
        self,
        conn: Connection,
        row: Any,
        task: dict[str, Any],
        event: str,
        *,
        actor: str,
        reason: str | None = None,
        outputs: list[dict[str, Any]] | None = None,
    ) -> None:
        now = self.ctx.now()
        move = MOVES[event]
        target = move.target or row.status
        task["status"] = target
        task["businessStatus"] = step_codeable(move.step)
        task["lastModified"] = R.iso(now)
        if reason:
            task["statusReason"] = {"text": reason}
        if outputs:
            task["output"] = [*(task.get("output") or []), *outputs]
        if event == "accept":
            idents = task.setdefault("identifier", [])
            idents.append(
                {
                    "type": {"coding": [{"system": PLACER, "code": "FILL"}]},
                    "system": f"urn:hutong:acceptance-slip:{self.me}",
                    "value": f"JZ{now:%Y%m%d}-{row.thread[:8].upper()}",
                }
            )
        store.put(
            conn, task, at=now, thread=row.thread, origin=self.me, patient_hash=row.patient_hash
        )
        values: dict[str, Any] = {"status": target, "step": move.step, "updated_at": now}
        if event == "accept":
            values["accepted_at"] = now
        if event == "return":
            values["completed_at"] = now
        if reason:
            values["reason"] = reason
        conn.execute(update(REFERRAL).where(REFERRAL.c.thread == row.thread).values(**values))
        self._log_step(conn, row.thread, event, row.status, target, None, actor)
        self._audit(conn, self._row(conn, row.thread), event, actor)

    def _send(
        self,
        conn: Connection,
        row: Any,
        event: str,
        task: dict[str, Any],
        extra: list[dict[str, Any]],
    ) -> None:
        other = row.receiver if row.side == "referrer" else row.referrer
        now = self.ctx.now()
        mine = task["for"]["reference"]
        patient = None
        if event in ("request", "return") or any(r["resourceType"] == "Patient" for r in extra):
            patient = store.get(conn, "Patient", mine.split("/", 1)[1])
        orgs = [R.organization(self.plan.directory[m]) for m in (row.referrer, row.receiver)]
        # this side's own visits (host.record_encounter) stay here: not the other's to resolve
        sent = {R.ref(r) for r in extra}
        wire = [_without_local_visits(r, sent) for r in [task, *extra]]
        # the patient as the other side knows her, never by this node's own id (naming)
        wire = naming.outgoing(
            naming.of_row(row, mine, opener=row.side == "referrer"),
            wire,
            me=self.me,
            peer=other,
            members=self.plan.directory,
            national_id_system=self.plan.alliance.national_id_system,
            patient=patient,
        )
        msg = R.message(
            event,
            sender=self.me,
            receiver=other,
            task=wire[0],
            resources=[*wire[1:], *orgs],
            at=now,
        )
        result = queue_packets(
            self.ctx,
            conn,
            [Outgoing(other, EVENTS[event], orjson.dumps(msg), row.thread)],
            actor=f"node:{self.me}",
        )[0]
        if result.error is not None:
            raise result.error  # rolls the whole step back: nothing changes

    # -- helpers ------------------------------------------------------------------------------

    def _row(self, conn: Connection, thread: str) -> Any:
        row = conn.execute(select(REFERRAL).where(REFERRAL.c.thread == thread)).first()
        if row is None:
            raise NotFound(f"no referral {thread}")
        return row

    def _row_by_task(self, conn: Connection, task_id: str) -> Any:
        row = conn.execute(select(REFERRAL).where(REFERRAL.c.task_id == task_id)).first()
        if row is None:
            raise NotFound(f"Task/{task_id} is not a referral known here")
        return row

    def _log_step(
        self,
        conn: Connection,
        thread: str,
        event: str,
        before: str,
        after: str,
        packet_id: str | None,
        actor: str | None,
    ) -> None:
        conn.execute(
            insert(REFERRAL_STEP).values(
                thread=thread,
                event=event,
                packet_id=packet_id,
                from_status=before,
                to_status=after,
                actor=actor,
                at=self.ctx.now(),
            )
        )

    def _audit(self, conn: Connection, row: Any, event: str, actor: str | None) -> None:
        self.ctx.audit.append(
            conn,
            [
                AuditEntry(
                    action="referral",
                    thread=row.thread,
                    patient_hash=row.patient_hash,
                    peer=row.receiver if row.side == "referrer" else row.referrer,
                    actor=actor,
                    kind=EVENTS.get(event),
                    at=self.ctx.now(),
                    extra={"event": event, "status": row.status, "step": row.step},
                )
            ],
        )

    # -- reminders ----------------------------------------------------------------------------

    def remind(self) -> int:
        """Referrals not accepted in time: flag once, audit, and show IT (job every minute)."""
        cfg = self.plan.referral
        now = self.ctx.now()
        with self.ctx.store.write() as conn:
            rows = conn.execute(
                select(REFERRAL).where(
                    REFERRAL.c.status.in_(["requested", "received"]),
                    REFERRAL.c.reminded_at.is_(None),
                )
            ).all()
            due = [
                r
                for r in rows
                if now - r.created_at
                > timedelta(
                    seconds=cfg.green_channel_timeout_s if r.green_channel else cfg.accept_timeout_s
                )
            ]
            for r in due:
                conn.execute(
                    update(REFERRAL).where(REFERRAL.c.thread == r.thread).values(reminded_at=now)
                )
            if due:
                self.ctx.audit.append(
                    conn,
                    [
                        AuditEntry(
                            action="reminder",
                            outcome="4",
                            thread=r.thread,
                            patient_hash=r.patient_hash,
                            peer=r.receiver if r.side == "referrer" else r.referrer,
                            at=now,
                            message=f"referral not accepted after "
                            f"{int((now - r.created_at).total_seconds() // 60)} min",
                        )
                        for r in due
                    ],
                )
        return len(due)

    def list(self, *, status: str | None = None) -> list[dict[str, Any]]:
        """Every referral on this side, the latest change first, for tests and scripts: no
        cap, so nothing is left out silently. Pages and the API count and page instead
        (``/local/v1/referrals``, ``bridge/web/referral_list.py``), in the same order."""
        stmt = select(REFERRAL).order_by(REFERRAL.c.updated_at.desc(), REFERRAL.c.thread.desc())
        if status:
            stmt = stmt.where(REFERRAL.c.status == status)
        with self.ctx.store.read() as conn:
            return [dict(r._mapping) for r in conn.execute(stmt)]


def peer_patient(carried: list[dict[str, Any]]) -> str | None:
    """The sender's Patient reference in a request: how packets back name the patient."""
    return naming.peer_ref(carried)


def _without_local_visits(r: dict[str, Any], sent: set[str]) -> dict[str, Any]:
    """A Task or ServiceRequest as it leaves: references to Encounters of this node that the
    message does not carry (``Task.encounter``, ``ServiceRequest.supportingInfo``) left out."""

    def local(ref: Any) -> bool:
        target = (ref or {}).get("reference", "") if isinstance(ref, dict) else ""
        return target.startswith("Encounter/") and target not in sent

    if r.get("resourceType") == "Task" and local(r.get("encounter")):
        return {k: v for k, v in r.items() if k != "encounter"}
    if r.get("resourceType") == "ServiceRequest" and any(map(local, r.get("supportingInfo") or [])):
        out = dict(r)
        out["supportingInfo"] = [i for i in r["supportingInfo"] if not local(i)]
        if not out["supportingInfo"]:
            del out["supportingInfo"]
        return out
    return r


def _recommending_consultation(conn: Connection, sr_id: str) -> bool:
    """A consultation of this (inviting) side whose released report recommends referral."""
    from bridge.consult.tables import CONSULTATION

    row = conn.execute(select(CONSULTATION).where(CONSULTATION.c.sr_id == sr_id)).first()
    if row is None:
        return False
    if row.side != "inviter" or not row.released_at or not row.recommends_referral:
        raise IllegalTransition(
            "a referral is based on a consultation only once its released "
            "report recommends referral (on the inviting side)"
        )
    return True


def _note_consultation(
    conn: Connection, sr: dict[str, Any], thread: str, inviter: str | None = None
) -> None:
    """A referral basedOn a consultation: the consultation row names it (statistics). On the
    receiving side only a consultation that the referring member itself asked for."""
    from bridge.consult.tables import CONSULTATION

    for b in sr.get("basedOn") or []:
        reference = b.get("reference", "")
        if reference.startswith("ServiceRequest/"):
            where = [
                CONSULTATION.c.sr_id == reference.split("/", 1)[1],
                CONSULTATION.c.referral_thread.is_(None),
            ]
            if inviter is not None:
                where.append(CONSULTATION.c.inviter == inviter)
            conn.execute(update(CONSULTATION).where(*where).values(referral_thread=thread))


def foreign_resource(conn: Connection, resource: dict[str, Any], thread: str, sender: str) -> None:
    """A peer's packet may create resources, and update those of its own thread or its own
    making; one that would overwrite another thread's or this node's record is refused."""
    rid = resource.get("id")
    if not isinstance(rid, str):
        return
    try:
        row = store.get_row(conn, resource["resourceType"], rid)
    except NotFound:
        return
    foreign_row(resource, (row.thread, row.origin), thread, sender)


def foreign_row(
    resource: dict[str, Any], owned: tuple[str | None, str | None], thread: str, sender: str
) -> None:
    """``foreign_resource`` on the (thread, origin) of the resource's row, read already."""
    rid = resource.get("id")
    if owned[0] != thread and owned[1] != sender:
        raise NotThreadParty(
            f"{resource['resourceType']}/{rid} belongs to another thread "
            f"here; '{sender}' may not change it from thread {thread}"
        )


def response_of(resource: dict[str, Any]) -> dict[str, Any]:
    """A transaction response entry's ``response`` for a resource just stored: 201 for a first
    version, 200 for a new version of one that was here; the versioned location."""
    meta = resource.get("meta") or {}
    version = str(meta.get("versionId", "1"))
    out = {
        "status": "201 Created" if version == "1" else "200 OK",
        "location": f"{R.ref(resource)}/_history/{version}",
        "etag": f'W/"{version}"',
    }
    if meta.get("lastUpdated"):
        out["lastModified"] = meta["lastUpdated"]
    return out


def check_version(task: dict[str, Any], if_match: int | None) -> None:
    """Refuse (412) a change made to another version than ``task``'s current one."""
    if if_match is None:
        return
    have = str((task.get("meta") or {}).get("versionId"))
    if have != str(if_match):
        raise VersionConflict(
            f"If-Match names version {if_match}, the current version is "
            f"{have}: read it again and reapply the change"
        )


def _is_placer(ident: dict[str, Any]) -> bool:
    return any(c.get("code") == "PLAC" for c in (ident.get("type") or {}).get("coding") or [])


def thread_view(conn: Connection, thread: str) -> dict[str, Any] | None:
    """This side's referral row and every FHIR resource of the thread, or None."""
    row = conn.execute(select(REFERRAL).where(REFERRAL.c.thread == thread)).first()
    if row is None:
        return None
    return {"referral": dict(row._mapping), "resources": store.by_thread(conn, thread)}
