"""Node -> HIS: an arrived referral packet becomes one HL7 message sent to the HIS's listener.

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
either                 received, arrive, cancel,     nothing (counted ``skipped:<event>``)
                       cancelled, return-received
=====================  ============================  ========================================
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from adapters import slips_fhir
from adapters.his_hl7 import ack, charset, messages
from adapters.his_hl7.errors import HisNak

if TYPE_CHECKING:
    from adapters.his_hl7.adapter import HisHl7Adapter
    from bridge.delivery.handlers import Delivery


def event_of(body: bytes) -> str:
    bundle = orjson.loads(body)
    for e in bundle.get("entry") or []:
        r = e.get("resource") or {}
        if r.get("resourceType") == "MessageHeader":
            return str((r.get("eventCoding") or {}).get("code", ""))
    return ""


class Outbound:
    def __init__(self, adapter: HisHl7Adapter) -> None:
        self.a = adapter
        self.host = adapter.host
        self.state = adapter.state

    def deliver(self, item: Delivery) -> None:
        event = event_of(item.body)
        view = self.host.referral(item.thread)
        if view is None:
            self.a.count(f"skipped:{event or 'unknown'}")
            return
        row = view["referral"]
        text = self.build(item, event, view, row)
        if text is None:
            self.a.count(f"skipped:{event}")
            return
        raw = charset.encode(text, self.a.codec)
        answer = self.a.listener.send(self.a.his_host, self.a.his_port, raw)
        code, acked, why = ack.read(answer)
        if code not in ("AA", "CA") or acked != item.packet_id:
            self.a.count("his-nak")
            self.a.failed(f"HIS answered {code} for {item.packet_id}")
            raise HisNak(f"HIS answered {code or 'no MSA'} to {item.packet_id}"
                         + (f" ({why[:80]})" if why else ""))
        with self.state.tx() as c:
            c.execute("INSERT OR IGNORE INTO sent VALUES (?, ?, ?, ?)",
                      (item.packet_id, item.thread, event, self.host.now().isoformat()))
        self.a.count(f"sent:{event}")
        self.a.ok()

    def build(self, item: Delivery, event: str, view: dict[str, Any],
              row: dict[str, Any]) -> str | None:
        h = self.a.header()
        now = self.host.now()
        me, maps = self.host.node_id, self.host.maps
        if row["side"] == "receiver" and event == "request":
            task = next((r for r in view["resources"] if r["resourceType"] == "Task"
                         and r["id"] == row["task_id"]), None)
            patient = None
            if task is not None:
                rtype, _, rid = task["for"]["reference"].partition("/")
                if not any(r["resourceType"] == rtype and r["id"] == rid
                           for r in view["resources"]):
                    patient = self.host.resource(rtype, rid)
            slip = slips_fhir.referral_from_fhir(view, maps, patient=patient, me=me)
            with self.state.tx() as c:
                c.execute("INSERT OR REPLACE INTO slips VALUES (?, 'receiver', ?, NULL, ?)",
                          (slip.slip_no, item.thread, slip.mrn))
            return messages.referral_message(h, slip, item.packet_id, now, thread=item.thread,
                                             mrn_authority=row["referrer"])
        if row["side"] == "referrer" and event in ("accept", "reject"):
            sr = self.host.resource("ServiceRequest", row["sr_id"])
            task = self.host.resource("Task", row["task_id"])
            slip_no = slips_fhir.slip_no_of(sr)
            accepted = slips_fhir.acceptance_from_task(task, slip_no, maps, me=me)
            if event == "reject":
                accepted.accepted = False
                accepted.reason = accepted.reason or (row.get("reason") or "")
            return messages.acceptance_message(h, accepted, item.packet_id, now,
                                               thread=item.thread, mrn=self._mrn(slip_no),
                                               inpatient=row["kind"] == "up-inpatient")
        if row["side"] == "referrer" and event == "return":
            slip = slips_fhir.return_from_fhir(view, maps, me=me)
            return messages.return_message(h, slip, item.packet_id, now, thread=item.thread,
                                           mrn=self._mrn(slip.slip_no))
        return None

    def _mrn(self, slip_no: str) -> str:
        row = self.state.slip(slip_no, "referrer")
        return str(row["mrn"] or "") if row is not None else ""
