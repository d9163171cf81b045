"""Node -> HIS: an arrived referral packet becomes one HL7 message sent to the HIS's listener;
so does an arrived ``result.lab`` or ``result.imaging`` packet (one ORU^R01,
:mod:`~adapters.his_hl7.results`).

The referral workflow has already applied the packet (dispatcher hook), so the slip is read
from the node's view of the thread (:mod:`adapters.slips_fhir`). MSH-10 is the packet id: a
redelivery after a crash or a lost ACK is the same message, which the HIS recognises. A NAK or
an unreachable HIS raises a transient error and the dispatcher retries with backoff, keeping
the thread's order.

=====================  ============================  ========================================
side                   event (MessageHeader)         message to the HIS
=====================  ============================  ========================================
receiver               request                       REF^I12 (new referral, RF1-11 = thread)
referrer               accept / reject               RRI^I12 (RF1-1 A / R)
referrer               return                        REF^I12 with RF1-4 = RP, OBX, RXE + TQ1
receiver               cancel (confirmed here)       REF^I14 (RF1-6 slip, RF1-11 thread, NTE 1R
                                                     reason, RF1-7 when); a cancel refused
                                                     (patient arrived) sends nothing
either (result.lab)    -                             ORU^R01 v2.5.1 (adapters.his_hl7.results)
either (result.imag.)  -                             ORU^R01 v2.5.1: the imaging report,
                                                     ZDS the study UID, the PDF as OBX ED
inviter (consult.*)    the centre's steps            RRI^I12 (RF1-1 the step ^HTCSTEP, ZHZ the
                                                     meeting); release: + ORU^R01 (the report,
                                                     or the imaging ORU), MSH-10 <packet>-R
                                                     (adapters.his_hl7.consult)
either                 received, arrive, cancelled,  nothing (counted ``skipped:<event>``)
                       cancel-refused,
                       return-received
=====================  ============================  ========================================
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from adapters import consult_slips, slips_fhir
from adapters.his_hl7 import consult as hz
from adapters.his_hl7 import messages, results
from adapters.his_hl7.errors import HisNak, HisNoAck, HisUnreachable
from adapters.hl7v2 import charset
from adapters.hl7v2.ack import read_ack
from adapters.hl7v2.errors import V2Error
from adapters.hl7v2.mllp import NoAck, PeerUnreachable
from adapters.imaging import with_local_studies

if TYPE_CHECKING:
    from adapters.his_hl7.adapter import HisHl7Adapter
    from bridge.delivery.handlers import Delivery
    from bridge.local.contract import ConsultEvent, ReferralEvent, ResultEvent

#: the centre's steps the inviting HIS is told about (RRI^I12)
CONSULT_SHOWN = (
    "received",
    "return",
    "schedule",
    "start",
    "report",
    "release",
    "cancelled",
    "cancel-refused",
)


class Outbound:
    def __init__(self, adapter: HisHl7Adapter) -> None:
        self.a = adapter
        self.host = adapter.host
        self.state = adapter.state

    def on_referral(self, ev: ReferralEvent) -> None:
        """A referral step the workflow applied: one HL7 message to the HIS (or none)."""
        item, event, view = ev.packet, ev.event, ev.view
        row = view["referral"]
        text = self.build(item, event, view, row)
        if text is None:
            self.a.count(f"skipped:{event}")
            return
        self._send(item, text, event)

    def _send(self, item: Delivery, text: str, what: str, control: str | None = None) -> bool:
        """Send until the HIS ACKs (a NAK raises; the dispatcher retries the same MSH-10).
        True the first time this packet is ACKed. ``control``: MSH-10 when it is not the
        packet id (a second message of one packet)."""
        control = control or item.packet_id
        raw = charset.encode(text, self.a.charset)
        try:
            answer = self.a.listener.send(self.a.his_host, self.a.his_port, raw, self.a.timeouts)
        except PeerUnreachable as exc:
            raise HisUnreachable(f"HIS listener {exc}") from None
        except NoAck as exc:
            raise HisNoAck(str(exc)) from None
        try:
            code, acked, why = read_ack(answer, self.a.opts.default_charset)
        except V2Error as exc:
            code, acked, why = "", "", f"unreadable ACK ({exc.message})"
        if code not in ("AA", "CA") or acked != control:
            self.a.count("his-nak")
            self.a.failed(f"HIS answered {code} for {control}")
            raise HisNak(
                f"HIS answered {code or 'no MSA'} to {control}" + (f" ({why[:80]})" if why else "")
            )
        first = self.state.mark_sent(control, item.thread, what, self.host.now().isoformat())
        self.a.count(f"sent:{what}")
        self.a.ok()
        return first

    def on_result(self, ev: ResultEvent) -> None:
        """``result.lab`` / ``result.imaging`` -> ORU^R01 (:mod:`~adapters.his_hl7.results`);
        other result kinds are not written into the HIS."""
        item = ev.packet
        if item.kind not in ("result.lab", "result.imaging"):
            self.a.count(f"skipped:{item.kind}")
            return
        if self.state.sent(item.packet_id):
            self.a.count("redelivered")  # ACKed before a crash: the HIS has it
            return
        to = self._addressee(item.thread)
        if to is None:
            # no patient id this HIS knows: the results stay in the node's FHIR store and
            # the recognition view (counted for IT, no patient data)
            self.a.count("skipped:result-no-patient")
            self.a.failed(f"result {item.packet_id}: no patient id known to the HIS")
            return
        gaps: list[Any] = []
        build = results.oru_message if item.kind == "result.lab" else results.imaging_oru_message
        bundle = (
            ev.bundle if item.kind == "result.lab" else with_local_studies(ev.bundle, self.host)
        )
        text = build(
            self.a.header(),
            bundle,
            to,
            slips_fhir.Codes(self.host.maps, self.host.node_id, gaps),
            item.packet_id,
            self.host.now(),
        )
        if text is None:
            self.a.count("skipped:result-no-report")
            return
        if self._send(item, text, item.kind) and gaps:
            self.host.record_gaps(gaps)
            self.a.count("unmapped-codes", len(gaps))

    def on_consult(self, ev: ConsultEvent) -> None:
        """A step the consultation centre took: RRI^I12 to the inviting HIS; with the released
        report, an ORU^R01 after it (:mod:`~adapters.his_hl7.consult`)."""
        item, view = ev.packet, ev.view
        if ev.side != "inviter" or ev.event not in CONSULT_SHOWN:
            self.a.count(f"skipped:consult-{ev.event}")
            return
        to = self._addressee(item.thread)
        status = consult_slips.status_of(ev.event, view, ev.task)
        h, now = self.a.header(), self.host.now()
        kind = view["consultation"]["kind"]
        if not self.state.sent(item.packet_id):
            self._send(
                item,
                hz.status_message(
                    h, status, kind, item.packet_id, now, item.thread, to.mrn if to else ""
                ),
                f"consult-{ev.event}",
            )
        if ev.event != "release":
            return
        control = f"{item.packet_id}-R"
        if self.state.sent(control):
            self.a.count("redelivered")
            return
        if to is None:
            self.a.count("skipped:result-no-patient")
            return
        gaps: list[Any] = []
        codes = slips_fhir.Codes(self.host.maps, self.host.node_id, gaps)
        text: str | None
        if kind == "imaging-reading":
            text = results.imaging_oru_message(
                h,
                with_local_studies(consult_slips.imaging_bundle(view), self.host),
                to,
                codes,
                control,
                now,
            )
        else:
            reports = consult_slips.reports_of(view, codes)
            text = (
                hz.report_message(h, reports[0], control, now, item.thread, to.mrn, to.authority)
                if reports
                else None
            )
        if text is not None and self._send(item, text, "consult-report", control) and gaps:
            self.host.record_gaps(gaps)
            self.a.count("unmapped-codes", len(gaps))

    def _addressee(self, thread: str) -> results.Addressee | None:
        """The patient's id in this HIS for a referral thread: the HIS's own MRN (from its REF^I12
        on the referring side, from the ADT naming the referral on the receiving side), else the
        referrer's MRN under the referrer's id (as the HIS got it in the REF^I12). For a
        consultation thread: the MRN of the HIS's own REF^I12 (会诊申请)."""
        view = self.host.referral(thread)
        if view is None:
            consult = self.host.consultation(thread)
            if consult is None:
                return None
            number = consult_slips.slip_no_of(consult_slips.request_of(consult))
            mine = self.state.slip(number, "inviter")
            if mine is None or not mine["mrn"]:
                return None
            return results.Addressee(str(mine["mrn"]), self.a.opts.his_application, number, thread)
        row = view["referral"]
        sr = next(
            (
                r
                for r in view["resources"]
                if r["resourceType"] == "ServiceRequest" and r["id"] == row["sr_id"]
            ),
            {},
        )
        slip_no = slips_fhir.slip_no_of(sr)
        own = self.a.opts.his_application  # the HIS assigned its own patient ids
        visit = self.state.referral_visit(thread)
        if visit is not None and visit["mrn"]:
            return results.Addressee(str(visit["mrn"]), own, slip_no, thread)
        slip = self.state.thread_slip(thread)
        if slip is None or not slip["mrn"]:
            return None
        authority = own if slip["side"] == "referrer" else str(row["referrer"])
        return results.Addressee(
            str(slip["mrn"]), authority, slip_no or str(slip["slip_no"]), thread
        )

    def build(
        self, item: Delivery, event: str, view: dict[str, Any], row: dict[str, Any]
    ) -> str | None:
        h = self.a.header()
        now = self.host.now()
        me, maps = self.host.node_id, self.host.maps
        if row["side"] == "receiver" and event == "request":
            task = next(
                (
                    r
                    for r in view["resources"]
                    if r["resourceType"] == "Task" and r["id"] == row["task_id"]
                ),
                None,
            )
            patient = None
            if task is not None:
                rtype, _, rid = task["for"]["reference"].partition("/")
                if not any(
                    r["resourceType"] == rtype and r["id"] == rid for r in view["resources"]
                ):
                    patient = self.host.resource(rtype, rid)
            slip = slips_fhir.referral_from_fhir(view, maps, patient=patient, me=me)
            self.state.put_slip(
                slip.slip_no, "receiver", thread=item.thread, source_key=None, mrn=slip.mrn
            )
            return messages.referral_message(
                h, slip, item.packet_id, now, thread=item.thread, mrn_authority=row["referrer"]
            )
        if row["side"] == "referrer" and event in ("accept", "reject"):
            sr = self.host.resource("ServiceRequest", row["sr_id"])
            task = self.host.resource("Task", row["task_id"])
            slip_no = slips_fhir.slip_no_of(sr)
            accepted = slips_fhir.acceptance_from_task(task, slip_no, maps, me=me)
            if event == "reject":
                accepted.accepted = False
                accepted.reason = accepted.reason or (row.get("reason") or "")
            return messages.acceptance_message(
                h,
                accepted,
                item.packet_id,
                now,
                thread=item.thread,
                mrn=self._mrn(slip_no),
                inpatient=row["kind"] == "up-inpatient",
            )
        if row["side"] == "receiver" and event == "cancel":
            if row["status"] != "cancelled":  # refused (the patient arrived): nothing to undo
                return None
            sr = self.host.resource("ServiceRequest", row["sr_id"])
            slip_no = slips_fhir.slip_no_of(sr)
            known = self.state.slip(slip_no, "receiver")
            note = messages.CancelNote(
                slip_no=slip_no,
                reason=str(row.get("reason") or ""),
                cancelled_at=row["updated_at"].isoformat() if row.get("updated_at") else "",
                thread=item.thread,
            )
            return messages.cancel_message(
                h,
                note,
                item.packet_id,
                now,
                mrn=str(known["mrn"] or "") if known else "",
                mrn_authority=row["referrer"],
            )
        if row["side"] == "referrer" and event == "return":
            slip = slips_fhir.return_from_fhir(view, maps, me=me)
            return messages.return_message(
                h, slip, item.packet_id, now, thread=item.thread, mrn=self._mrn(slip.slip_no)
            )
        return None

    def _mrn(self, slip_no: str) -> str:
        row = self.state.slip(slip_no, "referrer")
        return str(row["mrn"] or "") if row is not None else ""
