"""A local system's visit events (admit, transfer, discharge, cancels) as one FHIR R4 Encounter.

Protocol-neutral: an adapter reads its HIS's event (HL7 v2 ADT, a database row, a web-service
document) into a :class:`VisitEvent`, and :func:`apply` turns the Encounter as stored (or None)
into the Encounter after the event, keeping ``statusHistory``, ``classHistory`` and the
location history (R4 ``Encounter.location[].status`` / ``period``). Pass ``lambda cur:
apply(cur, event)`` as the ``build`` of :meth:`bridge.local.host.AdapterHost.record_encounter`.

Statuses (R4 ``encounter-status``) by event, after the HL7 v2-to-FHIR map (Event[EncounterStatus])
where it fits: admit -> in-progress, register (an outpatient checked in, v2 A04) -> arrived,
preadmit / pending admit -> planned, transfer -> in-progress, discharge -> finished,
cancel-admit -> cancelled ("ended before it has begun": the visit did not happen; not
entered-in-error, which would say the record itself was a mistake and hide it from the
patient's history), cancel-discharge -> in-progress again, cancel-transfer -> the prior location
active again; update changes what it carries and keeps the status.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

Resource = dict[str, Any]

ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
V2_0004 = "http://terminology.hl7.org/CodeSystem/v2-0004"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
#: the HIS's visit number: ``urn:hutong:visit:<member>`` (one HIS per member), value as given
VISIT_SYSTEM = "urn:hutong:visit:{member}"
LOCATION_SYSTEM = "urn:hutong:location:{member}"

#: v2 table 0004 patient class -> Encounter.class (v2-to-FHIR PatientClass[EncounterClass])
CLASS_FROM_V2 = {
    "E": (ACT_CODE, "EMER", "emergency"),
    "I": (ACT_CODE, "IMP", "inpatient encounter"),
    "O": (ACT_CODE, "AMB", "ambulatory"),
    "P": (ACT_CODE, "PRENC", "pre-admission"),
    "R": (V2_0004, "R", "Recurring patient"),
    "B": (V2_0004, "B", "Obstetrics"),
    "C": (V2_0004, "C", "Commercial Account"),
    "N": (V2_0004, "N", "Not Applicable"),
    "U": (V2_0004, "U", "Unknown"),
}

#: event -> Encounter.status after it (None: unchanged)
STATUS_AFTER = {
    "admit": "in-progress",
    "register": "arrived",
    "preadmit": "planned",
    "transfer": "in-progress",
    "discharge": "finished",
    "update": None,
    "cancel-admit": "cancelled",
    "cancel-transfer": None,
    "cancel-discharge": "in-progress",
}
EVENTS = tuple(STATUS_AFTER)
OPEN = ("planned", "arrived", "triaged", "in-progress", "onleave")


@dataclass
class VisitEvent:
    """One visit event as the local system told it; empty strings are "not said"."""

    event: str  # one of EVENTS
    at: str  # ISO 8601 with offset: when it happened (the event time, else the message time)
    visit_system: str  # identifier system of the visit number (VISIT_SYSTEM.format(...))
    visit_number: str
    class_code: str = ""  # v2 table 0004 (I O E P R B C N U)
    start: str = ""  # ISO: admitted / arrived
    end: str = ""  # ISO: discharged
    location: str = ""  # where the patient is now, as text (ward^room^bed)
    location_system: str = ""  # identifier system for location codes (LOCATION_SYSTEM)
    service_code: str = ""  # hospital service (v2 table 0069 or the HIS's own code)
    service_system: str = ""
    service_display: str = ""
    preadmit_number: str = ""  # hospitalization.preAdmissionIdentifier
    status_hint: str = ""  # for 'update' creating a new Encounter: the status to start with

    def __post_init__(self) -> None:
        if self.event not in STATUS_AFTER:
            raise ValueError(f"unknown visit event {self.event!r}")


def encounter_class(code: str) -> Resource:
    system, c, display = CLASS_FROM_V2.get(code, (V2_0004, code, code))
    return {"system": system, "code": c, "display": display}


def _since(enc: Resource, history_key: str) -> str | None:
    """When the current status (or class) began: the end of the last history entry, else the
    period start."""
    hist = enc.get(history_key) or []
    if hist:
        end = (hist[-1].get("period") or {}).get("end")
        if end:
            return str(end)
    start = (enc.get("period") or {}).get("start")
    return str(start) if start else None


def _closed(since: str | None, at: str) -> Resource:
    period: Resource = {"end": at}
    if since and since <= at:
        period = {"start": since, "end": at}
    return period


def _active_index(enc: Resource) -> int | None:
    locs = enc.get("location") or []
    for i in range(len(locs) - 1, -1, -1):
        if locs[i].get("status") in ("active", "planned"):
            return i
    return None


def _location_ref(ev: VisitEvent) -> Resource:
    ref: Resource = {"display": ev.location}
    if ev.location_system:
        ref["identifier"] = {"system": ev.location_system, "value": ev.location}
    return ref


def _move_to(enc: Resource, ev: VisitEvent, planned: bool) -> None:
    locs = enc.setdefault("location", [])
    i = _active_index(enc)
    if i is not None and (locs[i].get("location") or {}).get("display") == ev.location:
        return
    if i is not None:
        locs[i]["status"] = "completed"
        locs[i].setdefault("period", {})["end"] = ev.at
    locs.append(
        {
            "location": _location_ref(ev),
            "status": "planned" if planned else "active",
            "period": {"start": ev.at},
        }
    )


def _close_location(enc: Resource, at: str) -> None:
    i = _active_index(enc)
    if i is not None:
        loc = enc["location"][i]
        loc["status"] = "completed"
        loc.setdefault("period", {})["end"] = at


def _undo_transfer(enc: Resource) -> None:
    """Cancel transfer: the location entered by the transfer goes (the store's history keeps
    it), the one before becomes active again."""
    locs = enc.get("location") or []
    i = _active_index(enc)
    if i is None or i == 0:
        return
    del locs[i]
    prior = locs[i - 1]
    prior["status"] = "active"
    (prior.get("period") or {}).pop("end", None)


def _set_status(enc: Resource, status: str, at: str) -> None:
    old = enc.get("status")
    if old == status:
        return
    if old:
        enc.setdefault("statusHistory", []).append(
            {"status": old, "period": _closed(_since(enc, "statusHistory"), at)}
        )
    enc["status"] = status


def _set_class(enc: Resource, code: str, at: str) -> None:
    new = encounter_class(code)
    old = enc.get("class")
    if old and old.get("code") == new["code"] and old.get("system") == new["system"]:
        return
    if old:
        enc.setdefault("classHistory", []).append(
            {"class": old, "period": _closed(_since(enc, "classHistory"), at)}
        )
    enc["class"] = new


def apply(current: Resource | None, ev: VisitEvent) -> Resource:
    """The Encounter after ``ev``: ``current`` (as stored, or None) is not modified."""
    enc: Resource = copy.deepcopy(current) if current else {"resourceType": "Encounter"}
    if ev.visit_number and not any(
        i.get("system") == ev.visit_system and i.get("value") == ev.visit_number
        for i in enc.get("identifier") or []
    ):
        enc.setdefault("identifier", []).append(
            {
                "type": {"coding": [{"system": V2_0203, "code": "VN"}], "text": "visit number"},
                "system": ev.visit_system,
                "value": ev.visit_number,
            }
        )
    enc.pop("meta", None)
    status = STATUS_AFTER[ev.event]
    if current is None and status is None:
        status = ev.status_hint or (
            "finished" if ev.end else "in-progress" if ev.start else "unknown"
        )
    if status is not None:
        _set_status(enc, status, ev.at)
    if ev.class_code:
        _set_class(enc, ev.class_code, ev.at)
    elif "class" not in enc:  # R4: class is required
        enc["class"] = encounter_class("U")
    period = enc.setdefault("period", {})
    if ev.start:
        period["start"] = ev.start
    elif ev.event in ("admit", "register") and "start" not in period:
        period["start"] = ev.at
    if ev.event == "discharge":
        period["end"] = ev.end or ev.at
    elif ev.event in ("cancel-discharge",):
        period.pop("end", None)
    elif ev.end:
        period["end"] = ev.end
    if not period:
        enc.pop("period")
    if ev.event == "cancel-transfer":
        _undo_transfer(enc)
    elif ev.location:
        _move_to(enc, ev, planned=enc.get("status") == "planned")
    if ev.event == "discharge":
        _close_location(enc, period.get("end", ev.at))
    elif ev.event == "cancel-discharge":
        locs = enc.get("location") or []
        if locs and _active_index(enc) is None:
            locs[-1]["status"] = "active"
            (locs[-1].get("period") or {}).pop("end", None)
    if ev.service_code or ev.service_display:
        coding = {
            k: v
            for k, v in (
                ("system", ev.service_system),
                ("code", ev.service_code),
                ("display", ev.service_display),
            )
            if v
        }
        enc["serviceType"] = (
            {"coding": [coding]} if ev.service_code else {"text": ev.service_display}
        )
    if ev.preadmit_number:
        enc.setdefault("hospitalization", {})["preAdmissionIdentifier"] = {
            "value": ev.preadmit_number
        }
    return enc


def is_open(enc: Resource) -> bool:
    return enc.get("status") in OPEN
