"""Remote consultation (远程会诊), MDT and remote imaging reading as a closed FHIR loop.

The inviting member (a community centre or partner hospital) asks the consultation centre (the
core hospital) for its experts' opinion without moving the patient. It follows the referral
loop (``bridge/referral/workflow.py``) step for step: a local step checks the state machine
(``states.py``), updates the Task and the store, and queues the message packet in ONE
transaction; an arriving packet is applied idempotently by packet id, after the thread gate
(``bridge/delivery/threads.py``) let it through and after the same state machine checked it.

Python API (what the hospital-facing FHIR API, the web pages and the demo call; ``actor`` is who
acts, e.g. ``user:dr.li``)::

    cw = node.consult                                   # ConsultWorkflow
    cw.submit(transaction_bundle, actor)                # inviter: a new consultation
    cw.step(thread, "return", actor, reason="缺胸部CT报告")          # centre: return for completion
    cw.step(thread, "resubmit", actor, bundle=records)  # inviter: completed records
    cw.step(thread, "schedule", actor, bundle=appointment_bundle)     # centre: experts + time
    cw.step(thread, "start", actor)                     # centre: the meeting has begun
    cw.step(thread, "report", actor, bundle=report_bundle)            # centre: draft report
    cw.step(thread, "release", actor)                   # centre: QC passed, report sent
    cw.step(thread, "follow-up", actor, bundle=careplan_bundle)       # inviter
    cw.step(thread, "close", actor)                     # inviter
    cw.step(thread, "cancel", actor, reason="...")      # inviter asks; centre: "cancelled"
    cw.referral_draft(thread)                           # inviter: a referral Bundle pre-filled
    cw.list(step=..., side=...); cw.view(thread); cw.by_task(task_id)

The steps and who takes them are ``states.MOVES``; packets: ``consult.request``, ``consult.report``
(the released report, the only packet that carries it) and ``consult.status`` (every other
step). The steps' table, the FHIR resources of each step (ServiceRequest of category SNOMED
11429006, the centre-owned Task, Consent, Appointment with the experts and the video link, the
Consult note or imaging DiagnosticReport, the follow-up CarePlan) and the HTTP API are in
docs/contributors/consultation.md; the resources are built and checked in ``resources.py``.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Callable
from typing import Any

import orjson
from sqlalchemy import Connection, insert, select, update

from bridge.audit.events import AuditEntry
from bridge.consult import codes as C
from bridge.consult import resources as CR
from bridge.consult.queries import ConsultQueries
from bridge.consult.states import CENTRE, INVITER, MOVES, TERMINAL, check
from bridge.consult.tables import CONSULTATION, CONSULTATION_STEP
from bridge.context import NodeContext
from bridge.delivery.handlers import Delivery
from bridge.delivery.queue import Outgoing, queue_packets
from bridge.errors import (
    IllegalTransition,
    InvalidResource,
    MissingConsent,
    NotThreadParty,
    UnknownReference,
)
from bridge.fhirstore import store
from bridge.local import intake
from bridge.local.contract import ConsultEvent
from bridge.referral import naming
from bridge.referral import resources as R
from bridge.referral.carried import Carried
from bridge.referral.codes import KINDS as REFERRAL_KINDS
from bridge.referral.codes import PLACER
from bridge.referral.workflow import (
    check_version,
    foreign_resource,
    peer_patient,
    response_of,
)

Resource = dict[str, Any]

#: resource types a consultation's packets may carry besides Patient/ServiceRequest/Task
CARRIED = (
    "Consent",
    "Composition",
    "DocumentReference",
    "DiagnosticReport",
    "Observation",
    "ImagingStudy",
    "Condition",
    "Practitioner",
    "PractitionerRole",
    "Appointment",
    "CarePlan",
    "Coverage",
    "MedicationStatement",
    "MedicationRequest",
    "Specimen",
    "ServiceRequest",
    "Task",
)
#: what the request's supportingInfo may name from this node's store (shared records)
SHARED = ("Composition", "DocumentReference", "DiagnosticReport", "ImagingStudy", "Condition")
#: steps with a report the inviting side may turn into a referral
REPORTED = ("released", "report-received", "follow-up-planned", "closed")


class ConsultWorkflow(ConsultQueries):
    """The consultation loop on one node (both sides: inviter and centre)."""

    def __init__(
        self,
        ctx: NodeContext,
        wake: Callable[[], None] | None = None,
    ) -> None:
        self.ctx = ctx
        self.plan = ctx.plan
        self.me = ctx.plan.node_id
        # read as the referral workflow reads them (unpack, references, validation, patient match)
        self.carried = Carried(ctx.plan)
        self.wake = wake or (lambda: None)

    # -- API entry points ---------------------------------------------------------------------

    def submit(
        self,
        bundle: Resource,
        actor: str,
        *,
        once: tuple[str, str] | None = None,
        prepare: Callable[[Connection, Resource], tuple[Resource, dict[int, Resource]]]
        | None = None,
    ) -> Resource:
        """A new consultation from a transaction Bundle (POST /fhir): the answer is the
        transaction-response, one entry per request entry. ``once`` and ``prepare`` as in the
        referral workflow's ``submit``."""
        if bundle.get("type") != "transaction":
            raise InvalidResource("a consultation is POSTed as a Bundle of type 'transaction'")
        with self.ctx.store.write() as conn:
            if once is not None and (prior := intake.seen(conn, *once)) is not None:
                return prior
            answered: dict[int, Resource] = {}
            if prepare is not None:
                bundle, answered = prepare(conn, bundle)
            resources, created = self.carried.unpack(bundle)
            srs = [r for r in resources if r["resourceType"] == "ServiceRequest"]
            if len(srs) != 1:
                raise InvalidResource(
                    f"a consultation bundle holds exactly one ServiceRequest, found {len(srs)}"
                )
            thread = self._request(conn, srs[0], resources, actor)
            made = iter(created)
            entries = [
                answered[i] if i in answered else {"response": response_of(next(made))}
                for i in range(len(answered) + len(created))
            ]
            answer: Resource = {
                "resourceType": "Bundle",
                "type": "transaction-response",
                "entry": entries,
            }
            if once is not None:
                intake.remember(conn, *once, answer, self.ctx.now(), thread=thread)
        self.wake()
        return answer

    def step(
        self,
        thread: str,
        event: str,
        actor: str,
        *,
        reason: str | None = None,
        bundle: Resource | None = None,
        once: tuple[str, str] | None = None,
        if_match: int | None = None,
    ) -> Resource:
        """Take a local step and send it to the other side; the Task as it is after it.

        ``reason``: what is missing (return), why cancelled (cancel, cancelled). ``bundle``: a
        Bundle (collection or transaction; ``urn:uuid`` fullUrls resolved) with the resources
        the step brings: the records (resubmit), the Appointment and the experts' PractitionerRoles
        (schedule), the report (report), the CarePlan or Task (follow-up)."""
        with self.ctx.store.write() as conn:
            if once is not None and (prior := intake.seen(conn, *once)) is not None:
                return prior
            row = self._row(conn, thread)
            if if_match is not None:
                check_version(
                    {"meta": {"versionId": str(store.lock_version(conn, "Task", row.task_id))}},
                    if_match,
                )
            if event == "request":
                raise IllegalTransition("a consultation is requested by POSTing its bundle")
            check(event, row.step, row.side)
            resources = self.carried.unpack(bundle)[0] if bundle else []
            task = self._local(conn, row, event, resources, actor, reason)
            if once is not None:
                intake.remember(conn, *once, task, self.ctx.now(), thread=thread)
        self.wake()
        return task

    def move(
        self, task_id: str, task: Resource, actor: str, *, if_match: int | None = None
    ) -> Resource:
        """PUT /fhir/Task/{id} of a consultation Task: the status asks for the matching step
        (on-hold = return for completion, in-progress = start, cancelled = cancel); steps that
        bring resources are operations (``POST /fhir/Task/{id}/$<step>``)."""
        with self.ctx.store.read() as conn:
            row = self._row_by_task(conn, task_id)
            current = store.get(conn, "Task", task_id)
        wanted = task.get("status")
        if wanted == row.status:
            check_version(current, if_match)
            return current
        event = {"on-hold": "return", "in-progress": "start"}.get(str(wanted))
        if wanted == "cancelled":
            event = "cancel" if row.side == INVITER else "cancelled"
        if event is None:
            raise IllegalTransition(
                f"cannot set a consultation Task to '{wanted}' with PUT: "
                "use POST /fhir/Task/{id}/$<step>"
            )
        reason = (task.get("statusReason") or {}).get("text")
        if event in ("return", "cancel", "cancelled") and not reason:
            raise InvalidResource(f"'{event}' needs Task.statusReason.text")
        return self.step(row.thread, event, actor, reason=reason, if_match=if_match)

    def referral_draft(
        self, thread: str, kind: str = "up-outpatient", receiver: str | None = None
    ) -> Resource:
        """A referral transaction Bundle pre-filled from a released report that recommends
        referral: the ServiceRequest ``basedOn`` the consultation's, reason codes from the
        report's diagnoses, the report as supporting information. The clinician adds the
        patient's Consent to the referral and POSTs it to /fhir (the referral workflow)."""
        if kind not in REFERRAL_KINDS:
            raise InvalidResource(f"unknown referral kind '{kind}'")
        with self.ctx.store.read() as conn:
            row = self._row(conn, thread)
            if row.side != INVITER or row.step not in REPORTED:
                raise IllegalTransition(
                    "a referral is drafted from a released report, on the inviting side"
                )
            if not row.recommends_referral:
                raise IllegalTransition("this consultation's report does not recommend referral")
            sr = store.get(conn, "ServiceRequest", row.sr_id)
            report = [store.get(conn, *r.split("/", 1)) for r in (row.report_refs or "").split()]
        return CR.referral_draft(sr, report, kind, receiver or None, row.centre)

    # -- the request ----------------------------------------------------------------------------

    def _request(
        self, conn: Connection, sr: Resource, resources: list[Resource], actor: str
    ) -> str:
        now = self.ctx.now()
        kind = C.kind_of(sr)
        if kind is None:
            raise InvalidResource(
                "ServiceRequest.code needs a consultation kind coding "
                f"({C.KIND_SYSTEM}: {', '.join(C.KINDS)})"
            )
        centre = self.carried.performer(sr)
        patient = self.carried.patient(conn, sr, resources)
        if not any(
            r["resourceType"] == "Consent"
            and r.get("status") == "active"
            and (r.get("patient") or {}).get("reference") == R.ref(patient)
            for r in resources
        ):
            raise MissingConsent(
                "a consultation cannot be sent without the patient's signed "
                "consent (远程会诊知情同意书): add an active Consent for the "
                "patient"
            )
        if not sr.get("reasonCode") and not sr.get("reasonReference"):
            raise InvalidResource(
                "ServiceRequest.reasonCode or reasonReference: why the consultation is asked for"
            )
        if not any((n.get("text") or "").strip() for n in sr.get("note") or []):
            raise InvalidResource("ServiceRequest.note: the question to the experts")
        requester = (sr.get("requester") or {}).get("reference", "")
        if not requester.startswith(("Practitioner/", "PractitionerRole/")):
            raise InvalidResource(
                "ServiceRequest.requester must name the inviting doctor "
                "(Practitioner or PractitionerRole)"
            )
        sr["status"] = "active"
        sr["intent"] = sr.get("intent") or "order"
        cats = sr.setdefault("category", [])
        if not any(
            c.get("code") == C.CATEGORY["code"] for cat in cats for c in cat.get("coding") or []
        ):
            cats.append({"coding": [C.CATEGORY]})
        sr.setdefault("authoredOn", R.iso(now))
        sr.setdefault("priority", "routine")
        idents = sr.setdefault("identifier", [])
        if not any(
            c.get("code") == "PLAC"
            for i in idents
            for c in (i.get("type") or {}).get("coding") or []
        ):
            idents.append(
                {
                    "type": {"coding": [{"system": PLACER, "code": "PLAC"}]},
                    "system": f"urn:hutong:consult-slip:{self.me}",
                    "value": f"HZ{now:%Y%m%d}-{sr['id'][:8].upper()}",
                }
            )
        support = {s.get("reference") for s in sr.get("supportingInfo") or []}
        for r in resources:
            if r["resourceType"] in ("Consent", *SHARED) and R.ref(r) not in support:
                sr.setdefault("supportingInfo", []).append({"reference": R.ref(r)})
        self.carried.check_refs(conn, resources)
        shared = self._shared(conn, sr, resources, patient)
        if kind == "imaging-reading" and not any(
            r["resourceType"] == "ImagingStudy" for r in [*resources, *shared]
        ):
            raise InvalidResource(
                "an imaging reading names the ImagingStudy to read (ServiceRequest.supportingInfo)"
            )
        self.carried.validate(resources)
        thread = str(uuid.uuid4())
        task = CR.new_task(
            sr, thread, kind, inviter=self.me, centre=centre, patient_ref=R.ref(patient), at=now
        )
        phash = self.carried.hash(patient)
        for r in resources:
            store.put(conn, r, at=now, thread=thread, origin=self.me, patient_hash=phash)
        conn.execute(
            insert(CONSULTATION).values(
                thread=thread,
                side=INVITER,
                kind=kind,
                inviter=self.me,
                centre=centre,
                status="draft",
                step="draft",
                priority=sr["priority"],
                patient_hash=phash,
                patient_match="local",
                task_id=thread,
                sr_id=sr["id"],
                created_at=now,
                updated_at=now,
                step_at=now,
            )
        )
        row = self._row(conn, thread)
        self._advance(conn, row, task, "request", actor=actor)
        self._send(
            conn, row, "request", task, [*[r for r in resources if r is not sr], *shared, sr]
        )
        return thread

    def _shared(
        self,
        conn: Connection,
        sr: Resource,
        resources: list[Resource],
        patient: Resource | None = None,
    ) -> list[Resource]:
        """Records the request names but does not hold (earlier results, studies, the
        inviting doctor): read from this node's store to travel with it. A record kept under
        another local Patient of the same person (the PACS adapter's Patient of a study, by
        keyed hash) travels about the request's patient, so the centre files it with the
        consultation's patient (its own copy here is left as it is)."""
        here = {R.ref(r) for r in resources}
        wanted = [s.get("reference", "") for s in sr.get("supportingInfo") or []]
        wanted.append((sr.get("requester") or {}).get("reference", ""))
        out: list[Resource] = []
        for reference in wanted:
            if reference in here or "/" not in reference:
                continue
            rtype, rid = reference.split("/", 1)
            if rtype not in (*SHARED, "Practitioner", "PractitionerRole") or not store.exists(
                conn, rtype, rid
            ):
                continue
            r = store.get(conn, rtype, rid)
            if patient is not None:
                r = self._about(conn, r, patient)
            out.append(r)
            here.add(reference)
            for extra in (r.get("result") or []) + [r.get("practitioner") or {}]:
                target = extra.get("reference", "")
                if (
                    target.startswith(("Observation/", "Practitioner/"))
                    and target not in here
                    and store.exists(conn, *target.split("/", 1))
                ):
                    out.append(store.get(conn, *target.split("/", 1)))
                    here.add(target)
        return out

    def _about(self, conn: Connection, r: Resource, patient: Resource) -> Resource:
        """``r`` with its subject set to ``patient`` when it names another Patient record of
        the same person (keyed hash); unchanged otherwise."""
        mine = R.ref(patient)
        key = "subject" if "subject" in r else "patient" if "patient" in r else None
        other = str(((r.get(key) or {}) if key else {}).get("reference", ""))
        if (
            key is None
            or other == mine
            or not other.startswith("Patient/")
            or not store.exists(conn, "Patient", other.split("/", 1)[1])
        ):
            return r
        theirs = store.get(conn, "Patient", other.split("/", 1)[1])
        if self.carried.hash(theirs) != self.carried.hash(patient):
            return r
        return {**r, key: {**r[key], "reference": mine}}

    # -- local steps ------------------------------------------------------------------------------

    def _local(
        self,
        conn: Connection,
        row: Any,
        event: str,
        resources: list[Resource],
        actor: str,
        reason: str | None,
    ) -> Resource:
        task = store.get(conn, "Task", row.task_id)
        now = self.ctx.now()
        keep: list[Resource] = []  # stored here with the thread
        extra: list[Resource] = []  # sent to the other side
        outputs: list[Resource] = []
        if event in ("return", "cancel", "cancelled") and not (reason or "").strip():
            raise InvalidResource(f"'{event}' needs a reason (what is missing, why cancelled)")
        if event == "resubmit":
            if not resources:
                raise InvalidResource("'resubmit' brings the completed records (a Bundle)")
            sr = store.get(conn, "ServiceRequest", row.sr_id)
            self._own_patient(row, task, resources)
            support = {s.get("reference") for s in sr.get("supportingInfo") or []}
            for r in resources:
                if R.ref(r) not in support and r["resourceType"] in ("Consent", *SHARED):
                    sr.setdefault("supportingInfo", []).append({"reference": R.ref(r)})
            self.carried.check_refs(conn, resources)
            self.carried.validate([*resources, sr])
            keep = extra = [*resources, sr]
        elif event == "schedule":
            keep, extra = self._schedule(conn, row, task, resources)
            outputs = [CR.output("appointment", "会诊预约", {"reference": R.ref(keep[0])})]
        elif event == "report":
            keep = self._report(conn, row, task, resources)  # a draft: it stays here
        elif event == "release":
            keep, extra, outputs = self._release(conn, row)
        elif event == "follow-up":
            plans = [r for r in resources if r["resourceType"] in ("CarePlan", "Task")]
            if len(plans) != 1:
                raise InvalidResource("'follow-up' brings one CarePlan or Task")
            plan = plans[0]
            plan.setdefault(
                "basedOn" if plan["resourceType"] == "Task" else "supportingInfo", []
            ).append({"reference": f"ServiceRequest/{row.sr_id}"})
            self._own_patient(row, task, resources)
            self.carried.check_refs(conn, resources)
            self.carried.validate(resources)
            keep = extra = resources
            outputs = [CR.output("follow-up", "随访计划", {"reference": R.ref(plan)})]
        elif resources:
            raise InvalidResource(f"'{event}' takes no resources")
        for r in keep:
            store.put(
                conn, r, at=now, thread=row.thread, origin=self.me, patient_hash=row.patient_hash
            )
        if event == "cancel":  # asked, not yet taken: the centre confirms or refuses
            conn.execute(
                update(CONSULTATION)
                .where(CONSULTATION.c.thread == row.thread)
                .values(pending="cancel", reason=reason, updated_at=now)
            )
            self._log_step(conn, row.thread, event, row.step, row.step, None, actor)
            self._audit(conn, row, event, actor)
            asked = copy.deepcopy(task)
            asked["statusReason"] = {"text": reason}
            self._send(conn, row, "cancel", asked, [])
            return task
        if event == "cancelled":
            extra = [self._set_sr_status(conn, row, "revoked")]
        self._advance(conn, row, task, event, actor=actor, reason=reason, outputs=outputs)
        self._send(conn, row, event, task, extra)
        return task

    def _own_patient(self, row: Any, task: Resource, resources: list[Resource]) -> None:
        """Resources a step brings are about this consultation's patient."""
        mine = task["for"]["reference"]
        for r in resources:
            subject = (r.get("subject") or r.get("patient") or {}).get("reference")
            if subject and subject != mine:
                raise InvalidResource(
                    f"{R.ref(r)} is about {subject}, not this consultation's patient"
                )

    def _schedule(
        self, conn: Connection, row: Any, task: Resource, resources: list[Resource]
    ) -> tuple[list[Resource], list[Resource]]:
        """The Appointment checked (experts, inviting doctor, times): what to store, what to
        send (the experts' PractitionerRoles known here travel with it)."""
        appts = [r for r in resources if r["resourceType"] == "Appointment"]
        if len(appts) != 1:
            raise InvalidResource("'schedule' brings one Appointment")
        appt = appts[0]
        if not appt.get("start") or not appt.get("end"):
            raise InvalidResource("Appointment.start and end: when the experts meet")
        sr = store.get(conn, "ServiceRequest", row.sr_id)
        here = {R.ref(r): r for r in resources}
        experts = CR.book(appt, sr, row.kind)
        carried: list[Resource] = []
        for reference in experts:
            role = here.get(reference) or self._known(conn, reference)
            if role is None:
                raise UnknownReference(
                    f"expert {reference} is neither in the bundle nor known here"
                )
            if reference not in here:
                carried.append(role)
            doctor = (role.get("practitioner") or {}).get("reference", "")
            if doctor and doctor not in here and (d := self._known(conn, doctor)) is not None:
                carried.append(d)
        self.carried.check_refs(conn, resources)
        sr["performer"] = [
            {"reference": f"Organization/{row.centre}"},
            *({"reference": e} for e in experts),
        ]
        self.carried.validate([*resources, sr])
        start = CR.instant(appt["start"])
        conn.execute(
            update(CONSULTATION)
            .where(CONSULTATION.c.thread == row.thread)
            .values(appointment_id=appt["id"], experts=" ".join(experts), scheduled_start=start)
        )
        keep = [appt, *[r for r in resources if r is not appt], sr]
        return keep, [*keep, *carried]

    def _report(
        self, conn: Connection, row: Any, task: Resource, resources: list[Resource]
    ) -> list[Resource]:
        CR.check_report(resources, row.kind, f"ServiceRequest/{row.sr_id}")
        self._own_patient(row, task, resources)
        self.carried.check_refs(conn, resources)
        self.carried.validate(resources)
        conn.execute(
            update(CONSULTATION)
            .where(CONSULTATION.c.thread == row.thread)
            .values(
                report_refs=" ".join(R.ref(r) for r in resources),
                recommends_referral=any(CR.recommends(r) for r in resources),
            )
        )
        return resources

    def _release(
        self, conn: Connection, row: Any
    ) -> tuple[list[Resource], list[Resource], list[Resource]]:
        """Quality control passed: the report becomes final and goes to the inviting side."""
        report = [store.get(conn, *r.split("/", 1)) for r in (row.report_refs or "").split()]
        outputs = []
        for r in report:
            if r["resourceType"] in ("Composition", "DiagnosticReport"):
                r["status"] = "final"
                outputs.append(CR.output("report", "会诊报告", {"reference": R.ref(r)}))
            elif CR.recommends(r):
                r["status"] = "active"
                outputs.append(
                    CR.output("referral-recommended", "建议转诊", {"reference": R.ref(r)})
                )
        carried: list[Resource] = []
        here = {R.ref(r) for r in report}
        for r in report:  # the results and the authors the report names, if known here
            for target in R.references(r):
                if target in here or "/" not in target:
                    continue
                rtype = target.split("/", 1)[0]
                if (
                    rtype
                    in (
                        "Observation",
                        "ImagingStudy",
                        "Practitioner",
                        "PractitionerRole",
                        "Condition",
                    )
                    and (k := self._known(conn, target)) is not None
                ):
                    carried.append(k)
                    here.add(target)
        sr = self._set_sr_status(conn, row, "completed")
        return report, [*report, *carried, sr], outputs

    def _set_sr_status(self, conn: Connection, row: Any, status: str) -> Resource:
        sr = store.get(conn, "ServiceRequest", row.sr_id)
        sr["status"] = status
        return store.put(conn, sr, at=self.ctx.now(), thread=row.thread, origin=self.me)

    def _known(self, conn: Connection, reference: str) -> Resource | None:
        rtype, rid = reference.split("/", 1)
        return store.get(conn, rtype, rid) if store.exists(conn, rtype, rid) else None

    # -- arriving packets ---------------------------------------------------------------------

    def apply_packet(self, item: Delivery) -> ConsultEvent:
        """Apply one consultation message from the other side (dispatcher hook, idempotent);
        the event as applied, for the local sink (bridge.local.contract)."""
        event, task = self._apply(item)
        with self.ctx.store.read() as conn:
            view = self._view(conn, item.thread)
        if view is None:
            raise UnknownReference(f"consultation step '{event}' for an unknown consultation")
        return ConsultEvent(item, event, view["consultation"]["side"], item.thread, view, task)

    def _apply(self, item: Delivery) -> tuple[str, Resource]:
        bundle = orjson.loads(item.body)
        entries = [e["resource"] for e in bundle.get("entry") or []]
        header = next((r for r in entries if r["resourceType"] == "MessageHeader"), None)
        task = next((r for r in entries if r["resourceType"] == "Task"), None)
        if header is None or task is None:
            raise InvalidResource("a consultation message needs a MessageHeader and a Task")
        event = str(header["eventCoding"]["code"])
        if C.EVENTS.get(event) != item.kind:
            raise InvalidResource(f"consultation step '{event}' does not travel as {item.kind}")
        focus = (header.get("focus") or [{}])[0].get("reference")
        task = next((r for r in entries if r["resourceType"] == "Task" and R.ref(r) == focus), task)
        carried = [r for r in entries if r["resourceType"] != "MessageHeader"]
        with self.ctx.store.write() as conn:
            if conn.execute(
                select(CONSULTATION_STEP.c.id).where(
                    CONSULTATION_STEP.c.packet_id == item.packet_id
                )
            ).first():
                return event, task  # applied before a crash; the hand-over is idempotent
            if event == "request":
                self._take_request(conn, item, task, carried)
            else:
                self._take_step(conn, item, event, task, carried)
        self.wake()
        return event, task

    def _take_request(
        self, conn: Connection, item: Delivery, task: Resource, carried: list[Resource]
    ) -> None:
        now = self.ctx.now()
        if conn.execute(
            select(CONSULTATION.c.thread).where(CONSULTATION.c.thread == item.thread)
        ).first():
            return
        if task.get("id") != item.thread or task.get("status") != "requested":
            raise InvalidResource(
                "a consultation request carries its Task (id = the thread) in status 'requested'"
            )
        owner = (task.get("owner") or {}).get("reference")
        if owner != f"Organization/{self.me}":
            raise NotThreadParty(f"a consultation for {owner} was sent to '{self.me}'")
        sr = next(
            (
                r
                for r in carried
                if r["resourceType"] == "ServiceRequest" and R.ref(r) == task["focus"]["reference"]
            ),
            None,
        )
        if sr is None or C.kind_of(sr) is None:
            raise InvalidResource(
                "a consultation request carries its ServiceRequest with a consultation kind"
            )
        peer = peer_patient(carried)
        carried, match, phash = self.carried.match_patient(conn, carried)
        for r in carried:
            if r["resourceType"] == "Organization" and store.exists(conn, "Organization", r["id"]):
                continue
            foreign_resource(conn, r, item.thread, item.sender)
            store.put(conn, r, at=now, thread=item.thread, origin=item.sender, patient_hash=phash)
        task = next(r for r in carried if r["resourceType"] == "Task")
        conn.execute(
            insert(CONSULTATION).values(
                thread=item.thread,
                side=CENTRE,
                kind=C.kind_of(sr),
                inviter=item.sender,
                centre=self.me,
                status="requested",
                step="requested",
                priority=sr.get("priority", "routine"),
                patient_hash=phash,
                patient_match=match,
                peer_patient=peer,
                task_id=task["id"],
                sr_id=sr["id"],
                created_at=now,
                updated_at=now,
                step_at=now,
                last_seq_in=item.seq,
            )
        )
        self._log_step(
            conn, item.thread, "request", "draft", "requested", item.packet_id, item.sender
        )
        row = self._row(conn, item.thread)
        self._audit(conn, row, "request", item.sender)
        # "received" is automatic on delivery, and tells the inviting side at once
        self._advance(conn, row, task, "received", actor=f"node:{self.me}")
        self._send(conn, row, "received", task, [])

    def _take_step(
        self, conn: Connection, item: Delivery, event: str, task: Resource, carried: list[Resource]
    ) -> None:
        now = self.ctx.now()
        row = conn.execute(select(CONSULTATION).where(CONSULTATION.c.thread == item.thread)).first()
        if row is None:
            raise UnknownReference(f"consultation step '{event}' for an unknown consultation")
        other = row.centre if row.side == INVITER else row.inviter
        if item.sender != other:  # the dispatcher's gate refuses these first; kept as a guard
            raise NotThreadParty(
                f"consultation step '{event}' on thread {row.thread} from "
                f"'{item.sender}', which is not a party of that consultation"
            )
        if task.get("id") != row.task_id:
            raise InvalidResource(
                f"consultation step '{event}' carries Task/{task.get('id')}, "
                "not this consultation's Task"
            )
        if item.seq <= row.last_seq_in:
            self._log_step(conn, row.thread, event, row.step, row.step, item.packet_id, item.sender)
            return  # older than what we already applied from that side
        if row.step in TERMINAL and event in ("resubmit", "cancel"):
            # crossed a cancellation: the consultation is over here; say so, change nothing
            self._log_step(conn, row.thread, event, row.step, row.step, item.packet_id, item.sender)
            self.ctx.audit.append(
                conn,
                [
                    AuditEntry(
                        action="consultation",
                        outcome="4",
                        thread=row.thread,
                        peer=item.sender,
                        patient_hash=row.patient_hash,
                        kind=C.EVENTS[event],
                        at=now,
                        message=f"'{event}' arrived after the consultation was {row.step}",
                        extra={"event": event, "step": row.step},
                    )
                ],
            )
            conn.execute(
                update(CONSULTATION)
                .where(CONSULTATION.c.thread == row.thread)
                .values(last_seq_in=item.seq)
            )
            return
        self._peer_move(row, event, task)  # the same state machine as a local step
        # named our way: our own record of the patient stays as it is (naming.incoming)
        for r in self.carried.ours(conn, row, carried):
            if r["resourceType"] == "Organization" and store.exists(conn, "Organization", r["id"]):
                continue  # our own records of members stay as they are
            if r["resourceType"] == "Task" and r.get("id") == row.task_id:
                continue  # each side writes its own Task (below)
            if self._ours_elsewhere(conn, r, row.thread):
                continue  # our record the report names (the study our PACS holds): ours stays
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
            update(CONSULTATION)
            .where(CONSULTATION.c.thread == row.thread)
            .values(last_seq_in=item.seq)
        )
        row = self._row(conn, row.thread)
        actor = f"node:{item.sender}"
        if row.side == INVITER:
            self._mirror(conn, row, event, task, item, carried)
        elif event == "cancel":
            self._answer_cancel(conn, row, task, item)
        else:  # the inviter's own step: the centre takes the same move on its Task
            mine = store.get(conn, "Task", row.task_id)
            outputs = [o for o in task.get("output") or [] if o not in (mine.get("output") or [])]
            self._advance(
                conn, row, mine, event, actor=actor, outputs=outputs, packet_id=item.packet_id
            )

    def _ours_elsewhere(self, conn: Connection, r: Resource, thread: str) -> bool:
        """A resource of this node's own making outside the consultation's thread, sent back
        as the context of a step (an imaging reading's study that the request shared from our
        PACS): kept as we have it, neither overwritten nor refused."""
        rid = r.get("id")
        if not isinstance(rid, str) or not store.exists(conn, r["resourceType"], rid):
            return False
        known = store.get_row(conn, r["resourceType"], rid)
        return bool(known.origin == self.me and known.thread != thread)

    def _mirror(
        self,
        conn: Connection,
        row: Any,
        event: str,
        task: Resource,
        item: Delivery,
        carried: list[Resource],
    ) -> None:
        """The inviting side adopts the centre's Task for the centre's steps."""
        now = self.ctx.now()
        if event == "cancel-refused":
            conn.execute(
                update(CONSULTATION)
                .where(CONSULTATION.c.thread == row.thread)
                .values(pending=None, updated_at=now)
            )
            self._log_step(conn, row.thread, event, row.step, row.step, item.packet_id, item.sender)
            self._audit(conn, row, event, item.sender)
            return
        mine = copy.deepcopy(task)
        mine["for"] = store.get(conn, "Task", row.task_id)["for"]  # our record of the patient
        store.put(
            conn, mine, at=now, thread=row.thread, origin=item.sender, patient_hash=row.patient_hash
        )
        target = MOVES[event].target or row.step
        values: dict[str, Any] = {
            "status": mine["status"],
            "step": target,
            "updated_at": now,
            "step_at": now if target != row.step else row.step_at,
        }
        if event == "cancelled":
            values["pending"] = None
        if mine.get("statusReason"):
            values["reason"] = mine["statusReason"].get("text")
        if event == "schedule":
            appt = next((r for r in carried if r["resourceType"] == "Appointment"), None)
            if appt is not None:
                values.update(
                    appointment_id=appt["id"],
                    scheduled_start=CR.instant(appt["start"]),
                    experts=" ".join(
                        p["actor"]["reference"]
                        for p in appt.get("participant") or []
                        if CR.typed(p, C.EXPERT_ROLE) and p.get("actor")
                    ),
                )
        if event == "release":
            values["released_at"] = now
            report = [
                r
                for r in carried
                if r["resourceType"] in ("Composition", "DiagnosticReport", "Condition")
                or CR.recommends(r)
            ]
            values["report_refs"] = " ".join(R.ref(r) for r in report)
            values["recommends_referral"] = any(CR.recommends(r) for r in report)
        conn.execute(
            update(CONSULTATION).where(CONSULTATION.c.thread == row.thread).values(**values)
        )
        self._log_step(conn, row.thread, event, row.step, target, item.packet_id, item.sender)
        row = self._row(conn, row.thread)
        self._audit(conn, row, event, item.sender)
        if event == "release":  # close the loop: the report is acknowledged on arrival
            self._advance(conn, row, mine, "report-received", actor=f"node:{self.me}")
            self._send(conn, row, "report-received", mine, [])

    def _peer_move(self, row: Any, event: str, task: Resource) -> None:
        """Check a step from the other side as a local step is checked: the move must be the
        other side's to take, from the step this side holds now, and lead to the Task sent."""
        theirs = CENTRE if row.side == INVITER else INVITER
        if event == "cancel" and theirs == INVITER:
            return  # always taken: answered with "cancelled" or "cancel-refused"
        if event == "cancel-refused" and theirs == CENTRE:
            if task.get("status") != row.status:  # a refusal changes nothing
                raise IllegalTransition(
                    f"'cancel-refused' with Task.status '{task.get('status')}', not '{row.status}'"
                )
            return
        move = check(event, row.step, theirs)
        expected = C.STEP_STATUS[move.target or row.step]
        if task.get("status") != expected or C.step_of(task) != (move.target or row.step):
            raise IllegalTransition(
                f"'{event}' from '{row.step}' leads to '{expected}', the "
                f"Task sent says '{task.get('status')}'"
            )

    def _answer_cancel(self, conn: Connection, row: Any, task: Resource, item: Delivery) -> None:
        mine = store.get(conn, "Task", row.task_id)
        reason = (task.get("statusReason") or {}).get("text") or "withdrawn by the inviting side"
        try:
            check("cancelled", row.step, CENTRE)
        except IllegalTransition as exc:  # the meeting has begun: say so, change nothing
            self._log_step(
                conn, row.thread, "cancel", row.step, row.step, item.packet_id, item.sender
            )
            self.ctx.audit.append(
                conn,
                [
                    AuditEntry(
                        action="consultation",
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
        self._log_step(conn, row.thread, "cancel", row.step, row.step, item.packet_id, item.sender)
        sr = self._set_sr_status(conn, row, "revoked")
        self._advance(conn, row, mine, "cancelled", actor=f"node:{item.sender}", reason=reason)
        self._send(conn, row, "cancelled", mine, [sr])

    # -- shared steps ---------------------------------------------------------------------------

    def _advance(
        self,
        conn: Connection,
        row: Any,
        task: Resource,
        event: str,
        *,
        actor: str,
        reason: str | None = None,
        outputs: list[Resource] | None = None,
        packet_id: str | None = None,
    ) -> None:
        now = self.ctx.now()
        target = MOVES[event].target or row.step
        task["status"] = C.STEP_STATUS[target]
        task["businessStatus"] = C.step_codeable(target)
        task["lastModified"] = R.iso(now)
        if reason:
            task["statusReason"] = {"text": reason}
        elif event == "resubmit":
            task.pop("statusReason", None)
        if outputs:
            task["output"] = [*(task.get("output") or []), *outputs]
        store.put(
            conn, task, at=now, thread=row.thread, origin=self.me, patient_hash=row.patient_hash
        )
        values: dict[str, Any] = {
            "status": task["status"],
            "step": target,
            "updated_at": now,
            "step_at": now if target != row.step else row.step_at,
        }
        if reason:
            values["reason"] = reason
        if event == "cancelled":
            values["pending"] = None
        if event == "release":
            values["released_at"] = now
        conn.execute(
            update(CONSULTATION).where(CONSULTATION.c.thread == row.thread).values(**values)
        )
        self._log_step(conn, row.thread, event, row.step, target, packet_id, actor)
        self._audit(conn, self._row(conn, row.thread), event, actor)

    def _send(
        self, conn: Connection, row: Any, event: str, task: Resource, extra: list[Resource]
    ) -> None:
        other = row.centre if row.side == INVITER else row.inviter
        now = self.ctx.now()
        mine = task["for"]["reference"]
        # the patient travels with every clinical content, so the other side can map it
        patient = (
            store.get(conn, "Patient", mine.split("/", 1)[1])
            if extra or event == "request"
            else None
        )
        # the patient as the other side knows her, never by this node's own id (naming)
        wire = naming.outgoing(
            naming.of_row(row, mine, opener=row.side == INVITER),
            [task, *extra],
            me=self.me,
            peer=other,
            members=self.plan.directory,
            national_id_system=self.plan.alliance.national_id_system,
            patient=patient,
        )
        orgs = [R.organization(self.plan.directory[m]) for m in (row.inviter, row.centre)]
        msg = R.message(
            event,
            sender=self.me,
            receiver=other,
            task=wire[0],
            resources=[*wire[1:], *orgs],
            at=now,
        )
        msg["entry"][0]["resource"]["eventCoding"]["system"] = C.EVENT_SYSTEM
        result = queue_packets(
            self.ctx,
            conn,
            [Outgoing(other, C.EVENTS[event], orjson.dumps(msg), row.thread)],
            actor=f"node:{self.me}",
        )[0]
        if result.error is not None:
            raise result.error  # rolls the whole step back: nothing changes

    # -- helpers ------------------------------------------------------------------------------

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
            insert(CONSULTATION_STEP).values(
                thread=thread,
                event=event,
                packet_id=packet_id,
                from_step=before,
                to_step=after,
                actor=actor,
                at=self.ctx.now(),
            )
        )

    def _audit(self, conn: Connection, row: Any, event: str, actor: str | None) -> None:
        self.ctx.audit.append(
            conn,
            [
                AuditEntry(
                    action="consultation",
                    thread=row.thread,
                    patient_hash=row.patient_hash,
                    peer=row.centre if row.side == INVITER else row.inviter,
                    actor=actor,
                    kind=C.EVENTS.get(event),
                    at=self.ctx.now(),
                    extra={"event": event, "status": row.status, "step": row.step},
                )
            ],
        )
