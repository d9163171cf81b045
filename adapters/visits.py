"""A HIS's visit events (就诊事件: admission, transfer, discharge, update, cancels) as one neutral
record, checked, and handed to the node as the FHIR ``Encounter`` and ``Patient`` they describe.

The intermediate-database HIS (``ZZ_JZJL`` rows, :mod:`adapters.his_db.visits`) and the XML
web-service HIS (admission/transfer/discharge documents, :mod:`adapters.his_ws.visit_doc`) read
their vendor's format into :class:`Visit`; :func:`check` refuses a bad one naming the field
(a :class:`~adapters.slips_fhir.SlipError`, so each adapter names its own column or XPath);
:func:`record` hands it to ``host.record_encounter``, which keeps one Encounter per visit number
(identifier ``urn:hutong:visit:<member>``) and moves it through its life with
:func:`bridge.local.encounters.apply` (status with ``statusHistory``, class with
``classHistory``, period, location history). Here the Encounter also gets its service type (the
department, through the site's department map: shared and local codings) and its attending
doctor.

=================  ===========================================================================
event              what the HIS did (Encounter status after it)
=================  ===========================================================================
admit              入院登记 (in-progress); period.start = admitted_at, the first ward/bed
register           门诊/急诊挂号, the patient checked in (arrived)
transfer           转科/转床 (in-progress): the current location ends at transferred_at, the new
                   one starts there
discharge          出院 / 结束就诊 (finished): period.end = discharged_at, the location ends
update             信息修改: patient and visit details corrected in place (status kept; a class
                   change goes to classHistory)
cancel-admit       取消入院 / 退号 (cancelled)
cancel-transfer    取消转科: the last location is dropped, the one before is current again
cancel-discharge   取消出院 / 召回 (in-progress again; period.end removed)
=================  ===========================================================================

``status`` is the visit's state as the HIS shows it after the event (在院, 出院, 作废); it must
agree with the event (a discharge that leaves the patient 在院 is contradictory: quarantined).
The Encounter's status follows the event (a registration shown 就诊中 is in-progress); an
update's status is used only when the update is the first the node hears of the visit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from adapters.slips_fhir import (
    GENDERS,
    MRN_SYSTEM,
    BadDate,
    BadValue,
    Codes,
    SlipError,
    _date,
    _datetime,
    _need,
)
from bridge.errors import HutongError, UnknownReference, VisitConflict
from bridge.local import encounters as enc
from bridge.mapping import mark_unmapped
from bridge.privacy import NATIONAL_ID_SYSTEM

Resource = dict[str, Any]

EVENTS = (
    "admit",
    "register",
    "transfer",
    "discharge",
    "update",
    "cancel-admit",
    "cancel-transfer",
    "cancel-discharge",
)
#: visit class -> HL7 v2 table 0004 patient class (bridge.local.encounters maps it to v3 ActCode)
CLASSES = {"outpatient": "O", "emergency": "E", "inpatient": "I"}
STATUSES = ("planned", "arrived", "in-progress", "finished", "cancelled")
#: statuses the HIS may show after each event ("update": any but cancelled)
AGREES = {
    "admit": ("in-progress",),
    "register": ("arrived", "in-progress"),
    "transfer": ("in-progress",),
    "discharge": ("finished",),
    "update": ("planned", "arrived", "in-progress", "finished"),
    "cancel-admit": ("cancelled",),
    "cancel-transfer": ("in-progress",),
    "cancel-discharge": ("in-progress",),
}
#: the status an event leaves the visit in when the record does not say (an update must say)
IMPLIED_STATUS = {e: s[0] for e, s in AGREES.items() if e != "update"}


@dataclass
class Visit:
    """One visit event as the HIS recorded it (codes local, times ISO 8601 with offset)."""

    visit_no: str  # 就诊号 / 住院号: the HIS's own number of the visit (one Encounter each)
    event: str  # one of EVENTS
    visit_class: str  # outpatient 门诊 | emergency 急诊 | inpatient 住院
    mrn: str  # 病历号: the patient's record number in this HIS
    patient_name: str
    gender: str  # male | female | other | unknown
    birth_date: str  # YYYY-MM-DD
    admitted_at: str  # 入院/挂号时间: when the visit started
    status: str = ""  # the visit's state after the event (STATUSES); "" = the event's own
    id_number: str = ""  # 居民身份证号 (optional; hashed by the node, never sent)
    phone: str = ""
    department_code: str = ""  # the HIS's own department code (service type)
    ward: str = ""  # 病区 as the HIS names it
    bed: str = ""  # 床位号
    transferred_at: str = ""  # transfer: when the patient moved
    discharged_at: str = ""  # discharge: when the visit ended
    recorded_at: str = ""  # when the HIS recorded the event (updates and cancels happen then)
    referral_no: str = ""  # the referral this visit fulfils (read only where an option says)
    doctor: str = ""  # 主治/接诊医生


def check(v: Visit) -> Visit:
    """The visit with its values normalised; a :class:`SlipError` naming the field if bad."""
    v.visit_no = _need("visit_no", v.visit_no)
    if v.event not in EVENTS:
        raise BadValue("event", f"visit event is not one of {', '.join(EVENTS)}")
    if v.visit_class not in CLASSES:
        raise BadValue("visit_class", f"visit class is not one of {', '.join(CLASSES)}")
    v.mrn = _need("mrn", v.mrn)
    v.patient_name = _need("patient_name", v.patient_name)
    if v.gender not in GENDERS:
        raise BadValue("gender", f"gender is not one of {', '.join(GENDERS)}")
    v.birth_date = _date("birth_date", v.birth_date)
    v.admitted_at = _datetime("admitted_at", v.admitted_at)
    if v.id_number.strip():
        v.id_number = v.id_number.strip().upper()
        if not re.fullmatch(r"\d{17}[\dX]", v.id_number):
            raise BadValue("id_number", "'id_number' is not an 18-character resident ID number")
    else:
        v.id_number = ""
    for name, needed in (
        ("transferred_at", v.event == "transfer"),
        ("discharged_at", v.event == "discharge"),
        ("recorded_at", False),
    ):
        value = str(getattr(v, name) or "").strip()
        if needed or value:
            value = _datetime(name, value)
            if name != "recorded_at":
                _not_before(name, value, v.admitted_at)
        setattr(v, name, value)
    if v.event == "cancel-discharge":
        v.discharged_at = ""  # the HIS may leave the old time in the row: it no longer holds
    status = v.status.strip() or IMPLIED_STATUS.get(v.event, "")
    if not status:
        raise BadValue("status", f"a {v.event} record must say the visit's status")
    if status not in STATUSES:
        raise BadValue("status", f"visit status is not one of {', '.join(STATUSES)}")
    if status not in AGREES[v.event]:
        raise BadValue(
            "status",
            f"a {v.event} event leaves the visit "
            f"{' or '.join(AGREES[v.event])}; the record says otherwise",
        )
    v.status = status
    for name in ("department_code", "ward", "bed", "referral_no", "doctor", "phone"):
        setattr(v, name, str(getattr(v, name) or "").strip())
    return v


def _not_before(field: str, value: str, start: str) -> None:
    if datetime.fromisoformat(value) < datetime.fromisoformat(start):
        raise BadDate(field, f"'{field}' is before the visit started (admitted_at)")


# -- FHIR ----------------------------------------------------------------------------------------


def patient_of(v: Visit, me: str, national_id_system: str = NATIONAL_ID_SYSTEM) -> Resource:
    """The patient as the HIS describes them at this event (record number, ID number if any)."""
    idents = [{"system": MRN_SYSTEM.format(member=me), "value": v.mrn}]
    if v.id_number:
        idents.insert(0, {"system": national_id_system, "value": v.id_number})
    patient: Resource = {
        "resourceType": "Patient",
        "identifier": idents,
        "name": [{"text": v.patient_name}],
        "gender": v.gender,
        "birthDate": v.birth_date,
    }
    if v.phone:
        patient["telecom"] = [{"system": "phone", "value": v.phone, "use": "mobile"}]
    return patient


def location_text(v: Visit) -> str:
    """Where the patient is, as the HIS shows it: ward and bed (病区 床位)."""
    return " ".join(p for p in (v.ward, v.bed) if p)


def event_of(v: Visit, me: str) -> enc.VisitEvent:
    """The engine's neutral visit event for a checked :class:`Visit`."""
    at = (
        {
            "admit": v.admitted_at,
            "register": v.admitted_at,
            "transfer": v.transferred_at,
            "discharge": v.discharged_at,
        }.get(v.event)
        or v.recorded_at
        or v.admitted_at
    )
    # a cancel puts the patient back where they were: the row's ward and bed are that place,
    # not a move (given, apply() would open a new location period instead of reopening it)
    where = "" if v.event in ("cancel-transfer", "cancel-discharge") else location_text(v)
    # a registration the HIS already shows as 就诊中 is the visit under way, as an admission
    event = "admit" if v.event == "register" and v.status == "in-progress" else v.event
    return enc.VisitEvent(
        event=event,
        at=at,
        visit_system=enc.VISIT_SYSTEM.format(member=me),
        visit_number=v.visit_no,
        class_code=CLASSES[v.visit_class],
        start=v.admitted_at,
        end=v.discharged_at,
        location=where,
        location_system=enc.LOCATION_SYSTEM.format(member=me),
        status_hint=v.status,
    )


def builder(v: Visit, codes: Codes, me: str) -> Any:
    """``build`` for ``host.record_encounter``: the stored Encounter (or None) after ``v``,
    with the department as service type (shared + local codings; an unmapped code is a gap and
    tags the Encounter) and the attending doctor."""
    event = event_of(v, me)
    service = codes.concept("department", v.department_code) if v.department_code else None
    unmapped, codes.unmapped = codes.unmapped, False

    def build(current: Resource | None) -> Resource:
        out = enc.apply(current, event)
        if service is not None:
            out["serviceType"] = service
            if unmapped:
                mark_unmapped(out)
        if v.doctor:
            out["participant"] = [
                {
                    "type": [
                        {
                            "coding": [
                                {
                                    "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                                    "code": "ATND",
                                    "display": "attender",
                                }
                            ]
                        }
                    ],
                    "individual": {"display": v.doctor},
                }
            ]
        return out

    return build


class VisitRefused(SlipError):
    """The node refused the event for a reason that is one field of the record (the visit
    number names another patient's visit, or a cancel names a visit never seen); keeps the
    node's stable code and names the field, so the adapter names its column or XPath."""

    def __init__(self, field: str, error: HutongError) -> None:
        super().__init__(field, error.message)
        self.code = error.code


def record(
    host: Any,
    v: Visit,
    *,
    source_key: str,
    codes: Codes,
    referral_thread: str | None = None,
    kind: str,
) -> dict[str, Any]:
    """A checked visit event into the node: Patient and Encounter, once per ``source_key``.

    A cancel must find its visit (a cancel of a visit never seen is refused, not stored as a
    new cancelled visit) and does not touch the referral (the workflow has no "un-arrive")."""
    me = host.node_id
    cancel = v.event.startswith("cancel-")
    thread = None if cancel else referral_thread
    try:
        return host.record_encounter(
            builder(v, codes, me),
            source_key=source_key,
            visit=(enc.VISIT_SYSTEM.format(member=me), v.visit_no),
            patient=patient_of(v, me, host.plan.alliance.national_id_system),
            referral_thread=thread,
            kind=kind,
            must_exist=cancel,
        )
    except VisitConflict as exc:
        raise VisitRefused("visit_no", exc) from None
    except UnknownReference as exc:
        if thread is not None:  # the referral, named through the site's option
            raise
        raise VisitRefused("visit_no", exc) from None
