"""ADT from the HIS -> the visit event and the Patient (for ``host.record_encounter``).

=============  ==================================================================================
Event          What it does to the Encounter (bridge.local.encounters)
=============  ==================================================================================
A01 / A06      admit: in-progress, period.start = PV1-44 (else the event time)
A04            register (outpatient checked in): arrived
A05 / A14      pre-admit / pending admit: planned
A02            transfer: the location PV1-3 becomes active, the one before completed
A03            discharge: finished, period.end = PV1-45 (else the event time)
A07 / A08      update: what the message carries (class change, location, times)
A11            cancel admit/visit: cancelled
A12            cancel transfer: the prior location active again
A13            cancel discharge: in-progress again, period.end removed
A28 / A31      person added/updated: the Patient only
=============  ==================================================================================

Fields: PID-3 identifiers (the record number: type MR, else PI/PT, else the first untyped
repetition; NNCHN = the national ID), PID-5 name, PID-7 birth date (any precision), PID-8 sex
(table 0001), PID-13 phone; PV1-2 class (table 0004; empty -> unknown), PV1-3 location
(point of care / room / bed), PV1-5 preadmit number (never a referral id), PV1-10 hospital
service, PV1-19 visit number (the Encounter's identifier), PV1-44 / PV1-45 admit / discharge
time; EVN-6 (else EVN-2, else MSH-7) is when the event happened. The HL7 null ``""`` is "no
value". The referral a visit belongs to is read only from the field the adapter's
``referral_id_field`` option names (e.g. ``PV1-50``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from adapters.his_hl7 import v2
from adapters.his_hl7.errors import Hl7DataError
from adapters.his_hl7.messages import _get, read_dtm
from adapters.hl7v2.fields import Message
from bridge.local import encounters
from bridge.local.encounters import CLASS_FROM_V2, VisitEvent

#: ADT trigger -> visit event (None: the Patient only)
EVENT_KIND: dict[str, str | None] = {
    "A01": "admit",
    "A06": "admit",
    "A04": "register",
    "A05": "preadmit",
    "A14": "preadmit",
    "A02": "transfer",
    "A03": "discharge",
    "A07": "update",
    "A08": "update",
    "A11": "cancel-admit",
    "A12": "cancel-transfer",
    "A13": "cancel-discharge",
    "A28": None,
    "A31": None,
}
#: events that refer to a visit already known (no visit number: the patient's one open visit)
EXISTING = ("transfer", "discharge", "cancel-admit", "cancel-transfer", "cancel-discharge")
CANCELS = ("cancel-admit", "cancel-transfer", "cancel-discharge")
#: v2 table 0001 -> FHIR administrative gender
GENDER = {"M": "male", "F": "female", "O": "other", "U": "unknown", "A": "other", "N": "unknown"}
MRN_TYPES = ("MR", "PI", "PT", "MRN")
SERVICE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v2-0069"
FIELD = re.compile(r"^([A-Z][A-Z0-9]{2})-(\d{1,3})(?:\.(\d{1,2}))?$")


def parse_field(value: str) -> tuple[str, int, int]:
    """``PV1-50`` / ``PV1-50.1`` -> (segment, field, component); ValueError otherwise."""
    m = FIELD.match(value.strip())
    if not m:
        raise ValueError("expected SEG-n or SEG-n.c, e.g. PV1-50")
    return m[1], int(m[2]), int(m[3] or 1)


@dataclass
class Adt:
    event: str  # A01 ...
    kind: str | None  # the visit event, None for a person-only message
    mrn: str
    patient: dict[str, Any]  # R4 Patient (no id)
    index: dict[str, str]  # for the adapter's patient index (fills later referrals)
    visit: VisitEvent | None
    referral_id: str = ""


def _pid_identifiers(msg: Message, pid: Any) -> tuple[str, str]:
    """(record number, national ID) from PID-3's repetitions."""
    reps = []
    for r in range(1, v2.count_reps(pid, 3) + 1):
        value, kind = _get(msg, pid, 3, 1, r).strip(), _get(msg, pid, 3, 5, r).strip()
        if value:
            reps.append((value, kind.upper()))
    national = next((v for v, k in reps if k.startswith("NN")), "")
    typed = {k: v for v, k in reversed(reps)}
    mrs = {v for v, k in reps if k == "MR"}
    if len(mrs) > 1:
        raise Hl7DataError(
            "PID-3 holds two different MR identifiers", field="PID-3", hl7_error="205"
        )
    mrn = next((typed[k] for k in MRN_TYPES if k in typed), "") or next(
        (v for v, k in reps if not k), ""
    )
    if not mrn:
        raise Hl7DataError(
            "no patient record number (PID-3 with type MR, PI or PT, or without a type)",
            field="PID-3",
            hl7_error="101",
        )
    return mrn, national


def read(
    msg: Message,
    event: str,
    offset: timedelta,
    *,
    member: str,
    national_id_system: str,
    referral_field: str = "",
    sent_at: str = "",
) -> Adt:
    """Read one ADT message; bad or missing required data raises naming segment and field."""
    kind = EVENT_KIND[event]
    pid = v2.one(msg, "PID")
    mrn, national = _pid_identifiers(msg, pid)
    idents: list[dict[str, Any]] = [
        {
            "type": {"coding": [{"system": encounters.V2_0203, "code": "MR"}]},
            "system": f"urn:hutong:mrn:{member}",
            "value": mrn,
        }
    ]
    if national:
        idents.insert(0, {"system": national_id_system, "value": national.upper()})
    patient: dict[str, Any] = {"resourceType": "Patient", "identifier": idents}
    index: dict[str, str] = {"mrn": mrn}
    if national:
        index["id_number"] = national.upper()
    family, given = _get(msg, pid, 5, 1).strip(), _get(msg, pid, 5, 2).strip()
    if family or given:
        text = family + (
            "" if not given else given if not (family + given).isascii() else f" {given}"
        )
        name: dict[str, Any] = {"text": text.strip()}
        if family:
            name["family"] = family
        if given:
            name["given"] = [given]
        patient["name"] = [name]
        index["name"] = text.strip()
    birth = _get(msg, pid, 7).strip()
    if birth:
        patient["birthDate"] = read_dtm(birth, "PID-7", offset)[:10]
        if len(patient["birthDate"]) == 10:
            index["birth_date"] = patient["birthDate"]
    sex = _get(msg, pid, 8).strip()
    if sex:
        if sex.upper() not in GENDER:
            raise Hl7DataError(
                "unknown administrative sex code (table 0001: M F O U A N)",
                field="PID-8",
                hl7_error="103",
            )
        patient["gender"] = index["gender"] = GENDER[sex.upper()]
    phone = _get(msg, pid, 13, 1).strip() or _get(msg, pid, 13, 12).strip()
    if phone:
        patient["telecom"] = [{"system": "phone", "value": phone}]
        index["phone"] = phone
    evn = v2.one(msg, "EVN", required=False)
    at = ""
    for seg, n, where in ((evn, 6, "EVN-6"), (evn, 2, "EVN-2")):
        value = _get(msg, seg, n).strip() if seg is not None else ""
        if value:
            at = read_dtm(value, where, offset)
            break
    at = at or sent_at
    referral_id = ""
    if referral_field:
        seg_name, n, c = parse_field(referral_field)
        seg = v2.one(msg, seg_name, required=False)
        referral_id = _get(msg, seg, n, c).strip() if seg is not None else ""
    if kind is None:
        return Adt(event, None, mrn, patient, index, None, referral_id)
    pv1 = v2.one(msg, "PV1", required=False)
    if pv1 is None:
        if kind == "update":  # A08 without a visit: the person only
            return Adt(event, None, mrn, patient, index, None, referral_id)
        raise Hl7DataError("segment PV1 is missing (the visit)", field="PV1", hl7_error="100")
    klass = _get(msg, pv1, 2, 1).strip().upper()
    if klass and klass not in CLASS_FROM_V2:
        raise Hl7DataError(
            "unknown patient class (table 0004: E I O P R B C N U)", field="PV1-2", hl7_error="103"
        )
    visit_number = _get(msg, pv1, 19, 1).strip()
    if not visit_number and kind == "update":  # which visit? the person only
        return Adt(event, None, mrn, patient, index, None, referral_id)
    times = {}
    for key, n in (("start", 44), ("end", 45)):
        value = _get(msg, pv1, n).strip()
        if value:
            times[key] = read_dtm(value, f"PV1-{n}", offset)
    if not at:
        raise Hl7DataError("no event time (EVN-6, EVN-2 or MSH-7)", field="EVN-2", hl7_error="101")
    where = [_get(msg, pv1, 3, c).strip() for c in (1, 2, 3)]
    service = _get(msg, pv1, 10, 1).strip()
    visit = VisitEvent(
        event=kind,
        at=at,
        visit_system=encounters.VISIT_SYSTEM.format(member=member),
        visit_number=visit_number,
        class_code=klass,
        start=times.get("start", ""),
        end=times.get("end", ""),
        location=" ".join(w for w in where if w),
        location_system=encounters.LOCATION_SYSTEM.format(member=member),
        service_code=service,
        service_system=SERVICE_SYSTEM if service else "",
        service_display=_get(msg, pv1, 10, 2).strip(),
        preadmit_number=_get(msg, pv1, 5, 1).strip(),
    )
    index.update(
        {
            "patient_class": klass,
            "visit_number": visit_number,
            "admitted_at": times.get("start", ""),
            "discharged_at": times.get("end", ""),
        }
    )
    return Adt(event, kind, mrn, patient, index, visit, referral_id)
