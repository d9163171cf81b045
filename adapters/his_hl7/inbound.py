"""HIS -> node: one MLLP block in, its effect committed, then the ACK out.

Keyed by ``<MSH-4>:<MSH-10>#<content digest>`` (MSH-7 left out of the digest): a true re-send
gets the same ACK and changes nothing; a different message under a used control id is a new
message (taken or refused on its own, audited as ``RECORD_ID_REUSED`` like the LIS and
listed for IT), never answered with the other's ACK or NAK. ADT -> Patient + Encounter in the
node's store through ``host.record_encounter`` (:mod:`.adt`), linked to a referral only through
the field the ``referral_id_field`` option names (an admission of an accepted referral is its
"arrive" step); the HIS's patient index here is refreshed after it (a referral's PID fields left
empty are filled from it, so an A08 phone change shows in the next referral's Patient). A REF^I14
from the referring HIS (RF1-6 its slip number, NTE 1R the reason) takes the "cancel" step: the
workflow asks the receiver, who confirms it unless the patient has arrived. A REF^I12 whose
RF1-3 is a consultation kind (table HTCONSULT) is a consultation request
(``submit_consultation``) and a REF^I13 the records a returned one was completed with
(``resubmit``), :mod:`.consult`. Every kind commits through the host in one transaction with its
key (``submit_referral`` / ``referral_step`` / ``record_encounter``). Bad data -> AE/AR with an
ERR segment naming the field, quarantine (raw bytes, record MSH-10, field) and audit, the answer
kept here for a re-send of the same message; a transient failure (database busy) -> AE without
quarantine, so the HIS resends.
"""

from __future__ import annotations

import hashlib
import logging
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from adapters import consult_slips, slips_fhir
from adapters.his_hl7 import adt, messages
from adapters.his_hl7 import consult as hz
from adapters.his_hl7.errors import Hl7ControlReused, Hl7DataError, Hl7Duplicate, Hl7Rejected
from adapters.his_hl7.state import PATIENT_FIELDS
from adapters.hl7v2 import ack
from adapters.hl7v2.charset import Charset
from bridge.errors import (
    HutongError,
    IllegalTransition,
    InvalidResource,
    MissingConsent,
    Retry,
    UnknownReference,
    VisitConflict,
)
from bridge.local import encounters
from bridge.local.intake import RECORD_ID_REUSED

if TYPE_CHECKING:
    from adapters.his_hl7.adapter import HisHl7Adapter

log = logging.getLogger("hutong.adapters.his_hl7")

#: slip field (adapters.slips_fhir errors) -> where it travels in our messages
SLIP_FIELDS = {
    "slip_no": "RF1-6",
    "kind": "RF1-3",
    "to_member": "PRD-7",
    "patient_name": "PID-5",
    "gender": "PID-8",
    "birth_date": "PID-7",
    "id_number": "PID-3",
    "phone": "PID-13",
    "mrn": "PID-3",
    "diagnosis_code": "DG1-3",
    "written_at": "RF1-7",
    "appointment_at": "RF1-7",
    "department_code": "PRD-4",
    "reason": "NTE-3",
    "consent_by": "NTE-4",
}
SLIP_LIST_FIELDS = {"prescriptions": "RXE", "results": "OBX"}
ITEM_FIELDS = {
    "drug_code": "RXE-2",
    "dose": "RXE-3",
    "frequency": "TQ1-3",
    "days": "TQ1-6",
    "item_code": "OBX-3",
    "value": "OBX-5",
    "flag": "OBX-8",
}


def hl7_field(slip_field: str) -> str:
    head, _, rest = slip_field.partition("[")
    if head in SLIP_LIST_FIELDS:
        item = rest.partition("].")[2]
        return ITEM_FIELDS.get(item, SLIP_LIST_FIELDS[head])
    return SLIP_FIELDS.get(slip_field, slip_field)


def content_digest(text: str) -> str:
    """What makes two messages "the same": every segment as sent, MSH-7 (the time of sending,
    which a re-send may renew) left out, segment ends normalised."""
    segs = [
        seg for seg in text.replace("\r\n", "\r").replace("\n", "\r").split("\r") if seg.strip()
    ]
    if segs and segs[0].startswith("MSH") and len(segs[0]) > 3:
        fields = segs[0].split(segs[0][3])
        if len(fields) > 6:
            fields[6] = ""
        segs[0] = segs[0][3].join(fields)
    return hashlib.sha256("\r".join(segs).encode("utf-8")).hexdigest()


def control_key(inbound: messages.Inbound) -> str:
    """The sender's control id: MSH-3 / MSH-4 / MSH-10."""
    return f"{inbound.application[:60]}|{inbound.facility[:60]}|{inbound.control_id[:70]}"


def source_key(inbound: messages.Inbound, digest: str) -> str:
    """The exactly-once key of one message: its sender's facility and control id AND its
    content, so a true re-send (MSH-7 may differ) is recognised and a different message under
    a used control id is not mistaken for it (nor given its answer)."""
    return f"{inbound.facility[:60]}:{inbound.control_id[:70]}#{digest[:24]}"


def _record_of(raw: bytes) -> str:
    """MSH-10 read without trusting the charset (for naming a message we cannot decode)."""
    return ack.Answering.from_raw(raw).control_id.strip() or "?"


class Inbound:
    def __init__(self, adapter: HisHl7Adapter) -> None:
        self.a = adapter
        self.host = adapter.host
        self.state = adapter.state
        self.offset: timedelta = adapter.utc_offset

    def handle(self, raw: bytes) -> bytes:
        """The listener's callback: never raises, always answers."""
        try:
            return self._handle(raw)
        except Exception as exc:  # noqa: BLE001 - answer AE rather than drop the connection
            # type only: a traceback's values could hold patient data
            log.error("his-hl7 %s: internal error (%s)", self.a.name, type(exc).__name__)
            self.a.failed(f"internal error: {type(exc).__name__}")
            return self._ack(
                "AE",
                _record_of(raw),
                None,
                None,
                Hl7DataError("internal error, resend later", hl7_error="207"),
                raw=raw,
            )

    def _ack(
        self,
        code: str,
        control: str,
        cs: Charset | None,
        inbound: messages.Inbound | None,
        error: Hl7DataError | None = None,
        raw: bytes = b"",
    ) -> bytes:
        return self.a.answer(code, control, cs, inbound.msg if inbound else None, error, raw)

    def _handle(self, raw: bytes) -> bytes:
        self.a.count("received")
        inbound: messages.Inbound | None = None
        codec: Charset | None = None
        try:
            text, codec = self.a.decode(raw)
            inbound = messages.read(text, codec)
        except Hl7DataError as exc:
            # unreadable: keyed by its bytes, so the same bytes resent get the same answer
            record = inbound.control_id if inbound else _record_of(raw)
            key = f"sha256:{hashlib.sha256(raw).hexdigest()}"
            prior = self.state.answer(key)
            if prior is not None:
                self.a.count("resent")
                return self._ack(prior["ack_code"], record, codec, inbound, exc, raw=raw)
            return self._refuse(exc, raw, record, key, codec, inbound)
        digest = content_digest(text)
        key = source_key(inbound, digest)
        prior = self.state.answer(key)
        if prior is not None:  # this very message was refused before: the same answer again
            self.a.count("resent")
            error = (
                None
                if prior["ack_code"] == "AA"
                else Hl7DataError(prior["message"] or "", field=None, hl7_error=prior["error_code"])
            )
            if error is not None:
                error.message = prior["message"] or ""
                error.field = prior["field"]
            return self._ack(prior["ack_code"], inbound.control_id, codec, inbound, error)
        if self.host.seen(key) is not None:  # taken before: the same ACK, nothing new
            self.a.count("resent")
            return self._ack("AA", inbound.control_id, codec, inbound)
        self._check_control(inbound, digest, key)
        try:
            self._take(inbound, key)
        except Hl7DataError as exc:
            return self._refuse(exc, raw, inbound.control_id, key, codec, inbound)
        except HutongError as exc:  # busy database: let the HIS resend
            self.a.failed(f"{exc.code} (transient)")
            return self._ack(
                "AE",
                inbound.control_id,
                codec,
                inbound,
                Hl7DataError(f"{exc.code}: try again later", hl7_error="207"),
            )
        self.a.count(f"taken:{inbound.what}")
        self.a.ok()
        return self._ack("AA", inbound.control_id, codec, inbound)

    def _check_control(self, inbound: messages.Inbound, digest: str, key: str) -> None:
        """A control id (MSH-3/MSH-4/MSH-10) used before by a *different* message: the new
        message is taken as the new message it is, and IT is told (audit + counter)."""
        control = control_key(inbound)
        before = self.state.swap_control(control, digest, key, self.host.now().isoformat())
        if before is not None and before != digest:
            self.a.count("control-id-reused")
            self.host.audit(
                RECORD_ID_REUSED,
                outcome="4",
                kind=f"hl7:{inbound.mtype}^{inbound.event}",
                code=Hl7ControlReused.code,
                message=f"MSH-10 {inbound.control_id} from {inbound.application}/"
                f"{inbound.facility} reused by a different message: taken as a "
                "new message",
            )

    def _take(self, inbound: messages.Inbound, key: str) -> None:
        """Act on one readable message. Bad data raises :class:`Hl7DataError` naming the
        field; a transient failure raises the node's (non-permanent) ``HutongError``."""
        try:
            getattr(self, f"_{inbound.what}")(inbound, key)
        except Hl7DataError:
            raise
        except slips_fhir.SlipError as exc:
            field = (
                hz.FIELDS.get(exc.field, exc.field)
                if inbound.what.startswith("consult")
                else hl7_field(exc.field)
            )
            raise Hl7DataError(
                exc.message,
                field=field,
                hl7_error="103"
                if isinstance(exc, slips_fhir.UnknownCode)
                else "102"
                if isinstance(exc, slips_fhir.BadDate)
                else "207",
            ) from None
        except HutongError as exc:
            if exc.retry is not Retry.PERMANENT:
                raise
            field = (
                "PRD-7"
                if isinstance(exc, UnknownReference) and inbound.what == "referral"
                else "NTE-4"
                if isinstance(exc, UnknownReference) and inbound.what == "consult"
                else "RF1-6"
                if inbound.what == "cancel"
                else "NTE-4"
                if isinstance(exc, MissingConsent)
                else "RF1-1"
                if isinstance(exc, IllegalTransition)
                else None
            )
            error = Hl7DataError(exc.message, field=field)
            error.code = exc.code
            raise error from None

    def replay(self, raw: bytes) -> str:
        """A quarantined message through intake again, after IT fixed a mapping or the config.

        Still refused: the error is raised (the item stays held; nothing is quarantined or
        NAKed again). Taken: the stored refusal is dropped, so a resend of the same message
        by the HIS is answered AA and changes nothing. Returns a line for IT (no patient data).
        """
        text, cs = self.a.decode(raw)
        inbound = messages.read(text, cs)
        key = source_key(inbound, content_digest(text))
        done = self.host.seen(key) is not None
        if not done:
            self._take(inbound, key)
        self.state.forget_refusal(key)
        self.a.count("replayed")
        self.a.count(f"taken:{inbound.what}")
        return f"MSH-10 {inbound.control_id} ({inbound.mtype}^{inbound.event}) " + (
            "was already taken" if done else "taken"
        )

    def _refuse(
        self,
        exc: Hl7DataError,
        raw: bytes,
        record: str,
        key: str,
        codec: Charset | None,
        inbound: messages.Inbound | None,
    ) -> bytes:
        """Quarantine (raw bytes, record, field) + audit, remember the answer, NAK."""
        reason = exc.message
        qid = self.host.quarantine(
            exc,
            raw=raw,
            record=f"MSH-10 {record}",
            field=exc.field,
            kind=f"hl7:{inbound.mtype}^{inbound.event}" if inbound else "hl7",
            thread=inbound.thread or None if inbound else None,
            national_id=_national_id(inbound),
        )
        exc.message = reason  # the ACK names the field in ERR-2; keep its text short
        self.state.remember_answer(
            key,
            ack_code=exc.ack_code,
            field=exc.field,
            error_code=exc.hl7_error,
            message=exc.message,
            quarantine_id=qid,
            at=self.host.now().isoformat(),
        )
        self.a.count("refused")
        self.a.failed(f"{exc.code} {exc.field or ''} (quarantine {qid})")
        return self._ack(exc.ack_code, record, codec, inbound, exc, raw=raw)

    # -- the message kinds ------------------------------------------------------------------

    def _referral(self, inbound: messages.Inbound, key: str) -> None:
        mrn = messages.read_patient(inbound.msg).get("mrn", "")
        known = self.state.patient(mrn) if mrn else {}
        slip = messages.referral_slip(inbound.msg, known, self.offset)
        taken = self.state.slip(slip.slip_no, "referrer")
        if (
            taken is not None
            and taken["source_key"] != key
            and self.host.seen(taken["source_key"]) is not None
        ):
            raise Hl7Duplicate(
                f"slip {slip.slip_no} was already referred by message {taken['source_key']}",
                field="RF1-6",
            )
        self.state.put_slip(slip.slip_no, "referrer", thread=None, source_key=key, mrn=slip.mrn)
        gaps: list[Any] = []
        bundle = slips_fhir.referral_bundle(
            slip,
            self.host.maps,
            self.host.node_id,
            gaps=gaps,
            national_id_system=self.host.plan.alliance.national_id_system,
        )
        self.host.submit_referral(bundle, source_key=key)
        thread = self.host.thread_for(key)
        self.state.set_slip_thread(slip.slip_no, "referrer", thread)
        self._gaps(gaps)

    def _thread(self, inbound: messages.Inbound, slip_no: str) -> str:
        thread = inbound.thread
        if not thread:
            row = self.state.slip(slip_no, "receiver")
            thread = row["thread"] if row is not None else ""
        if not thread or self.host.referral(thread) is None:
            raise Hl7DataError(
                f"no referral here for slip {slip_no} / referral id {thread or '-'}",
                field="RF1-11" if thread else "RF1-6",
                hl7_error="204",
            )
        return thread

    def _acceptance(self, inbound: messages.Inbound, key: str) -> None:
        slip = messages.acceptance_slip(inbound.msg, self.offset)
        thread = self._thread(inbound, slip.slip_no)
        if slip.accepted:
            gaps: list[Any] = []
            outputs = slips_fhir.acceptance_outputs(
                slip, self.host.maps, me=self.host.node_id, gaps=gaps
            )
            self.host.referral_step(thread, "accept", source_key=key, outputs=outputs)
            self._gaps(gaps)
        else:
            self.host.referral_step(thread, "reject", source_key=key, reason=slip.reason)

    def _return(self, inbound: messages.Inbound, key: str) -> None:
        slip = messages.return_slip(inbound.msg, self.offset)
        thread = self._thread(inbound, slip.slip_no)
        view = self.host.referral(thread)
        assert view is not None
        row = view["referral"]
        task = self.host.resource("Task", row["task_id"])
        gaps: list[Any] = []
        bundle = slips_fhir.return_bundle(
            slip,
            row["sr_id"],
            task["for"]["reference"],
            self.host.maps,
            me=self.host.node_id,
            gaps=gaps,
        )
        self.host.submit_referral(bundle, source_key=key)
        self._gaps(gaps)

    def _cancel(self, inbound: messages.Inbound, key: str) -> None:
        """REF^I14: the referring doctor withdrew the referral (患者/家属撤回) in the HIS.

        The referral is the one this HIS sent under RF1-6 (RF1-11, when given, must name the
        same thread). Only the referrer cancels, and only before the patient arrives
        (:mod:`bridge.referral.states`): anything else is refused naming RF1-6."""
        note = messages.cancel_note(inbound.msg, self.offset)
        row = self.state.slip(note.slip_no, "referrer")
        consult = self.state.slip(note.slip_no, "inviter")
        if row is None and consult is not None:  # a consultation this HIS asked for
            self._consult_cancel(inbound, note, consult, key)
            return
        thread = row["thread"] if row is not None and row["thread"] else ""
        if note.thread and thread and note.thread != thread:
            raise Hl7DataError(
                f"referral id does not belong to slip {note.slip_no}",
                field="RF1-11",
                hl7_error="204",
            )
        view = self.host.referral(thread) if thread else None
        if view is None or view["referral"]["side"] != "referrer":
            raise Hl7DataError(
                f"no referral sent from here with slip {note.slip_no}",
                field="RF1-6",
                hl7_error="204",
            )
        if view["referral"]["step"] == "cancel-requested":
            raise Hl7Duplicate(
                f"the cancellation of slip {note.slip_no} was already sent (another message)",
                field="RF1-6",
            )
        self.host.referral_step(thread, "cancel", source_key=key, reason=note.reason)

    def _adt(self, inbound: messages.Inbound, key: str) -> None:
        """ADT -> Patient (+ Encounter) in the node's FHIR store through the host, exactly once
        by ``key``; the adapter's patient index is refreshed after (it fills later referrals).
        A referral is linked only through the ``referral_id_field`` option."""
        head = inbound.msg.segment("MSH")
        sent = messages._get(inbound.msg, head, 7).strip()
        data = adt.read(
            inbound.msg,
            inbound.event,
            self.offset,
            member=self.host.node_id,
            national_id_system=self.host.plan.alliance.national_id_system,
            referral_field=self.a.opts.referral_id_field,
            sent_at=messages.read_dtm(sent, "MSH-7", self.offset)
            if sent
            else self.host.now().isoformat(),
        )
        visit = data.visit
        thread = data.referral_id if visit is not None else ""
        try:
            self.host.record_encounter(
                (lambda cur: encounters.apply(cur, visit)) if visit is not None else None,
                source_key=key,
                patient=data.patient,
                visit=(visit.visit_system, visit.visit_number)
                if visit is not None and visit.visit_number
                else None,
                referral_thread=thread or None,
                kind=f"hl7:ADT^{inbound.event}",
                without_visit="open"
                if visit is not None and visit.event in adt.EXISTING
                else "new",
                must_exist=visit is not None and visit.event in adt.CANCELS,
            )
        except UnknownReference as exc:
            field = (
                self.a.opts.referral_id_field if thread and "referral" in exc.message else "PV1-19"
            )
            raise Hl7DataError(exc.message, field=field, hl7_error="204") from None
        except VisitConflict as exc:
            raise Hl7DataError(exc.message, field="PV1-19", hl7_error="205") from None
        except InvalidResource as exc:
            raise Hl7DataError(
                exc.message, field="PID" if "Patient" in exc.message else "PV1", hl7_error="207"
            ) from None
        now = self.host.now().isoformat()
        with self.state.kv.tx() as kv:
            row = kv.get("patients", data.mrn)
            merged = {
                k: (data.index.get(k) or (row.get(k) if row is not None else None))
                for k in PATIENT_FIELDS
            }
            if (
                visit is not None
                and visit.event in ("admit", "register")
                and not data.index.get("discharged_at")
            ):
                merged["discharged_at"] = None  # a new visit
            kv.put(
                "patients",
                data.mrn,
                {
                    "mrn": data.mrn,
                    **merged,
                    "last_event": inbound.event,
                    "source_key": key,
                    "updated_at": now,
                },
            )
            if thread:  # the HIS's id for the referral's patient (results into the HIS)
                kv.put(
                    "referral_visits",
                    thread,
                    {"thread": thread, "mrn": data.mrn, "source_key": key},
                    thread=thread,
                )

    # -- consultations (adapters.his_hl7.consult) ----------------------------------------------

    def _consult(self, inbound: messages.Inbound, key: str) -> None:
        """REF^I12 with a consultation kind: a new consultation (会诊申请)."""
        mrn = messages.read_patient(inbound.msg).get("mrn", "")
        known = self.state.patient(mrn) if mrn else {}
        slip = hz.request_slip(inbound.msg, known, self.offset)
        taken = self.state.slip(slip.slip_no, "inviter")
        if (
            taken is not None
            and taken["source_key"] != key
            and self.host.seen(taken["source_key"]) is not None
        ):
            raise Hl7Duplicate(
                f"consultation {slip.slip_no} was already sent by message {taken['source_key']}",
                field="RF1-6",
            )
        for rid in consult_slips._split(slip.shared_results):
            if self.host.resource_info("DiagnosticReport", rid) is None:
                raise Hl7DataError(
                    f"shared report {rid} is not held by this node", field="NTE-4", hl7_error="204"
                )
        study = (
            self.host.find(
                "ImagingStudy", identifier=(consult_slips.DICOM_UID, f"urn:oid:{slip.study_uid}")
            )
            if slip.study_uid
            else None
        )
        self.state.put_slip(slip.slip_no, "inviter", thread=None, source_key=key, mrn=slip.mrn)
        gaps: list[Any] = []
        bundle = consult_slips.consult_bundle(
            slip,
            self.host.maps,
            self.host.node_id,
            gaps=gaps,
            study=study,
            national_id_system=self.host.plan.alliance.national_id_system,
        )
        self.host.submit_consultation(bundle, source_key=key)
        self.state.set_slip_thread(slip.slip_no, "inviter", self.host.thread_for(key))
        self._gaps(gaps)

    def _consult_resubmit(self, inbound: messages.Inbound, key: str) -> None:
        """REF^I13: the records the centre asked for (补充资料)."""
        slip = hz.resubmit_slip(inbound.msg, self.offset)
        row = self.state.slip(slip.slip_no, "inviter")
        thread = row["thread"] if row is not None and row["thread"] else ""
        if inbound.thread and thread and inbound.thread != thread:
            raise Hl7DataError(
                f"consultation id does not belong to {slip.slip_no}",
                field="RF1-11",
                hl7_error="204",
            )
        view = self.host.consultation(thread) if thread else None
        if view is None:
            raise Hl7DataError(
                f"no consultation sent from here with number {slip.slip_no}",
                field="RF1-6",
                hl7_error="204",
            )
        task = self.host.resource("Task", view["consultation"]["task_id"])
        bundle = consult_slips.resubmit_bundle(slip, task["for"]["reference"])
        self.host.consultation_step(thread, "resubmit", source_key=key, bundle=bundle)

    def _consult_cancel(
        self, inbound: messages.Inbound, note: messages.CancelNote, row: dict[str, Any], key: str
    ) -> None:
        """REF^I14 naming a consultation number this HIS sent: the inviter's cancel, which
        the centre answers (the RRI^I12 ``cancelled`` comes back); after the meeting began it
        is refused naming RF1-6."""
        thread = str(row["thread"] or "")
        if note.thread and thread and note.thread != thread:
            raise Hl7DataError(
                f"consultation id does not belong to {note.slip_no}",
                field="RF1-11",
                hl7_error="204",
            )
        if not thread or self.host.consultation(thread) is None:
            raise Hl7DataError(
                f"no consultation sent from here with number {note.slip_no}",
                field="RF1-6",
                hl7_error="204",
            )
        self.host.consultation_step(thread, "cancel", source_key=key, reason=note.reason)

    def _consult_status(self, inbound: messages.Inbound, key: str) -> None:
        raise Hl7Rejected(
            "a consultation status (RRI^I12, RF1-1 HTCSTEP) goes to the HIS, not from it",
            field="RF1-1",
            hl7_error="200",
        )

    def _gaps(self, gaps: list[Any]) -> None:
        if gaps:
            self.host.record_gaps(gaps)
            self.a.count("unmapped-codes", len(gaps))


def _national_id(inbound: messages.Inbound | None) -> str | None:
    """The PID's national ID (PID-3 typed NN*) as intake reads it, for the quarantined item's
    patient hash; None when the message has none or its PID cannot be read."""
    if inbound is None:
        return None
    try:
        return messages.national_id(inbound.msg)
    except HutongError:
        return None
