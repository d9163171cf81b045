"""Resources for the search tests: every search parameter of every served type has a value
here that some resources carry and others do not, and ``EXAMPLES`` says which ids each
(type, parameter, value) must find. Written with ``store.put`` (lastUpdated T0 + i minutes in
list order), in-process (tests/test_fhir_search_params.py) or before a node starts
(tests/test_fhir_search_api.py).
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection

from bridge.fhir.validate import validate_resource
from bridge.fhirstore import store

T0 = datetime(2026, 11, 1, 0, 0, tzinfo=UTC)
NID = "urn:oid:2.16.156.10011.1.3"
LOINC = "http://loinc.org"
OBS_CAT = "http://terminology.hl7.org/CodeSystem/observation-category"
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
ACT = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
SNOMED = "http://snomed.info/sct"


def _ref(r: str) -> dict[str, str]:
    return {"reference": r}


def _cc(system: str, code: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code}]}


def _patient(
    pid: str, nid: str, name: dict[str, Any], gender: str | None, born: str | None
) -> dict[str, Any]:
    p: dict[str, Any] = {
        "resourceType": "Patient",
        "id": pid,
        "identifier": [{"system": NID, "value": nid}],
        "name": [name],
    }
    if gender:
        p["gender"] = gender
    if born:
        p["birthDate"] = born
    p["text"] = {
        "status": "generated",
        "div": '<div xmlns="http://www.w3.org/1999/xhtml">patient</div>',
    }
    return p


def _obs(
    oid: str,
    pid: str,
    status: str,
    code: str,
    cat: str,
    effective: dict[str, Any],
    enc: str | None,
    based: str | None,
) -> dict[str, Any]:
    o: dict[str, Any] = {
        "resourceType": "Observation",
        "id": oid,
        "status": status,
        "identifier": [{"system": "urn:hutong:lis:fuxing", "value": oid.upper()}],
        "category": [_cc(OBS_CAT, cat)],
        "code": _cc(LOINC, code),
        "subject": _ref(f"Patient/{pid}"),
        "performer": [_ref("Organization/core")],
        **effective,
        "valueString": "ok",
    }
    if enc:
        o["encounter"] = _ref(f"Encounter/{enc}")
    if based:
        o["basedOn"] = [_ref(f"ServiceRequest/{based}")]
    return o


def _dr(
    did: str,
    pid: str,
    status: str,
    code: str,
    cat: str,
    effective: dict[str, Any],
    enc: str | None,
    based: str,
    result: str,
) -> dict[str, Any]:
    d: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "id": did,
        "status": status,
        "identifier": [{"system": "urn:hutong:lis:fuxing", "value": did.upper()}],
        "category": [_cc(V2_0074, cat)],
        "code": _cc(LOINC, code),
        "subject": _ref(f"Patient/{pid}"),
        "performer": [_ref("Organization/core")],
        **effective,
        "basedOn": [_ref(f"ServiceRequest/{based}")],
        "result": [_ref(f"Observation/{result}")],
    }
    if enc:
        d["encounter"] = _ref(f"Encounter/{enc}")
    return d


def _enc(eid: str, pid: str, status: str, cls: str, period: dict[str, str]) -> dict[str, Any]:
    return {
        "resourceType": "Encounter",
        "id": eid,
        "status": status,
        "identifier": [{"system": "urn:hutong:visit:fuxing", "value": eid.upper()}],
        "class": {"system": ACT, "code": cls},
        "subject": _ref(f"Patient/{pid}"),
        "serviceProvider": _ref("Organization/core"),
        "period": period,
    }


def _sr(
    sid: str,
    pid: str,
    status: str,
    enc: str | None,
    requester: str,
    category: str,
    authored: str,
    experts: tuple[str, ...] = (),
) -> dict[str, Any]:
    s: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "id": sid,
        "status": status,
        "intent": "order",
        "identifier": [{"system": "urn:hutong:placer:yuetan-chc", "value": sid.upper()}],
        "category": [_cc(SNOMED, category)],
        "code": _cc(SNOMED, "3457005"),
        "subject": _ref(f"Patient/{pid}"),
        "requester": _ref(requester),
        "authoredOn": authored,
        "performer": [_ref("Organization/core"), *map(_ref, experts)],
    }
    if enc:
        s["encounter"] = _ref(f"Encounter/{enc}")
    return s


def _task(tid: str, pid: str, status: str, focus: str) -> dict[str, Any]:
    return {
        "resourceType": "Task",
        "id": tid,
        "status": status,
        "intent": "order",
        "identifier": [{"system": "urn:hutong:task", "value": tid.upper()}],
        "focus": _ref(f"ServiceRequest/{focus}"),
        "for": _ref(f"Patient/{pid}"),
        "requester": _ref("Organization/chc"),
        "owner": _ref("Organization/core"),
    }


#: in write order (lastUpdated T0 + i minutes)
RESOURCES: list[dict[str, Any]] = [
    {
        "resourceType": "Organization",
        "id": "core",
        "name": "复兴医院",
        "identifier": [{"system": "urn:hutong:node", "value": "core"}],
    },
    {
        "resourceType": "Organization",
        "id": "chc",
        "name": "月坛社区",
        "identifier": [{"system": "urn:hutong:node", "value": "chc"}],
    },
    {
        "resourceType": "Practitioner",
        "id": "dr-li",
        "name": [{"text": "李医生"}],
        "identifier": [{"system": "urn:hutong:staff:chc", "value": "D-017"}],
    },
    _patient(
        "p-wang",
        "110102195003151234",
        {"text": "王秀英", "family": "王", "given": ["秀英"]},
        "female",
        "1950-03-15",
    ),
    _patient(
        "p-zhang",
        "11010119650505231X",
        {"text": "张伟", "family": "张", "given": ["伟"]},
        "male",
        "1965-05-05",
    ),
    _patient(
        "p-muller",
        "110101198001010022",
        {"family": "Müller", "given": ["Anna", "Maria"], "prefix": ["Dr."]},
        "female",
        "1980-01-01",
    ),
    _patient("p-li", "110101199912120033", {"family": "李"}, None, None),
    _enc("enc-1", "p-wang", "finished", "AMB", {"start": "2026-11-01", "end": "2026-11-01"}),
    _enc("enc-2", "p-zhang", "in-progress", "IMP", {"start": "2026-11-02T08:00:00+08:00"}),
    _sr(
        "sr-1",
        "p-wang",
        "active",
        "enc-1",
        "Practitioner/dr-li",
        "11429006",
        "2026-11-01T08:00:00+08:00",
        ("PractitionerRole/role-1",),
    ),
    _sr("sr-2", "p-zhang", "completed", None, "Organization/chc", "3457005", "2026-11-03"),
    {
        **_task("task-1", "p-wang", "requested", "sr-1"),
        "businessStatus": _cc("http://hutong.dev/CodeSystem/consult-step", "requested"),
    },
    _task("task-2", "p-zhang", "completed", "sr-2"),
    _obs(
        "obs-glu",
        "p-wang",
        "final",
        "2345-7",
        "laboratory",
        {"effectiveDateTime": "2026-11-01T09:00:00+08:00"},
        "enc-1",
        "sr-1",
    ),
    _obs(
        "obs-hb",
        "p-zhang",
        "final",
        "718-7",
        "laboratory",
        {"effectiveDateTime": "2026-11-03"},
        "enc-2",
        "sr-2",
    ),
    _obs(
        "obs-bp",
        "p-wang",
        "preliminary",
        "85354-9",
        "vital-signs",
        {"effectivePeriod": {"start": "2026-11-02T08:00:00Z", "end": "2026-11-02T09:00:00Z"}},
        None,
        None,
    ),
    _dr(
        "dr-1",
        "p-wang",
        "final",
        "24323-8",
        "LAB",
        {"effectiveDateTime": "2026-11-01T10:00:00+08:00"},
        "enc-1",
        "sr-1",
        "obs-glu",
    ),
    _dr(
        "dr-2",
        "p-zhang",
        "registered",
        "58410-2",
        "HM",
        {"effectiveDateTime": "2026-11-04"},
        None,
        "sr-2",
        "obs-hb",
    ),
    {
        "resourceType": "ImagingStudy",
        "id": "img-1",
        "status": "available",
        "identifier": [{"system": "urn:dicom:uid", "value": "urn:oid:1.2.840.99.1"}],
        "subject": _ref("Patient/p-zhang"),
        "encounter": _ref("Encounter/enc-2"),
        "basedOn": [_ref("ServiceRequest/sr-2")],
    },
    {
        "resourceType": "Consent",
        "id": "consent-1",
        "status": "active",
        "identifier": [{"system": "urn:hutong:consent", "value": "C-1"}],
        "scope": _cc("http://terminology.hl7.org/CodeSystem/consentscope", "treatment"),
        "category": [_cc(LOINC, "59284-0")],
        "patient": _ref("Patient/p-zhang"),
        "policyRule": {"text": "同意转诊"},
    },
    {
        "resourceType": "Composition",
        "id": "comp-1",
        "status": "final",
        "identifier": {"system": "urn:hutong:doc", "value": "DS-1"},
        "type": _cc(LOINC, "18842-5"),
        "subject": _ref("Patient/p-wang"),
        "date": "2026-11-05",
        "author": [_ref("Practitioner/dr-li")],
        "title": "出院小结",
    },
    {
        "resourceType": "DocumentReference",
        "id": "doc-1",
        "status": "current",
        "identifier": [{"system": "urn:hutong:doc", "value": "DR-1"}],
        "subject": _ref("Patient/p-wang"),
        "author": [_ref("Practitioner/dr-li")],
        "content": [{"attachment": {"contentType": "application/pdf", "url": "urn:x:1"}}],
    },
    {
        "resourceType": "MedicationRequest",
        "id": "med-1",
        "status": "active",
        "intent": "order",
        "identifier": [{"system": "urn:hutong:rx", "value": "RX-1"}],
        "medicationCodeableConcept": {"text": "阿司匹林"},
        "subject": _ref("Patient/p-zhang"),
        "requester": _ref("Practitioner/dr-li"),
    },
    {
        "resourceType": "Coverage",
        "id": "cov-1",
        "status": "active",
        "identifier": [{"system": "urn:hutong:insurance", "value": "INS-1"}],
        "beneficiary": _ref("Patient/p-wang"),
        "payor": [_ref("Organization/core")],
    },
    # the consultation's resources (bridge/consult)
    {
        "resourceType": "PractitionerRole",
        "id": "role-1",
        "active": True,
        "identifier": [{"system": "urn:hutong:staff-role:core", "value": "ROLE-1"}],
        "practitioner": _ref("Practitioner/dr-li"),
        "organization": _ref("Organization/core"),
    },
    {
        "resourceType": "Appointment",
        "id": "appt-1",
        "status": "booked",
        "identifier": [{"system": "urn:hutong:appointment", "value": "APPT-1"}],
        "basedOn": [_ref("ServiceRequest/sr-1")],
        "start": "2026-11-06T14:00:00+08:00",
        "end": "2026-11-06T15:00:00+08:00",
        "participant": [{"actor": _ref("PractitionerRole/role-1"), "status": "accepted"}],
    },
    {
        "resourceType": "Condition",
        "id": "cond-1",
        "identifier": [{"system": "urn:hutong:diagnosis", "value": "COND-1"}],
        "code": _cc("http://hl7.org/fhir/sid/icd-10", "C34.1"),
        "subject": _ref("Patient/p-wang"),
    },
    {
        "resourceType": "CarePlan",
        "id": "cp-1",
        "status": "active",
        "intent": "plan",
        "identifier": [{"system": "urn:hutong:careplan", "value": "CP-1"}],
        "subject": _ref("Patient/p-zhang"),
    },
]


def seed(conn: Connection, hashes: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Write RESOURCES (each validated); what was stored, by id. ``hashes``: patient id ->
    patient hash, kept on the Patient and on what refers to it (what the audit records)."""
    out = {}
    for i, r in enumerate(RESOURCES):
        validate_resource(r)
        patient = store.search_columns(r)["patient"] or ""
        out[r["id"]] = copy.deepcopy(
            store.put(
                conn,
                copy.deepcopy(r),
                at=T0 + timedelta(minutes=i),
                patient_hash=(hashes or {}).get(patient.rpartition("/")[2]),
            )
        )
    return out


def ids_of(rtype: str) -> list[str]:
    """A type's ids newest first (the default order)."""
    return [r["id"] for r in reversed(RESOURCES) if r["resourceType"] == rtype]


#: (type, parameter) -> (value, the ids it finds, in the default order). Every search
#: parameter the CapabilityStatement lists for a clinical type is here
#: (tests/test_fhir_search_api.py walks the statement and fails on a missing one).
EXAMPLES: dict[tuple[str, str], tuple[str, list[str]]] = {
    ("Patient", "identifier"): (f"{NID}|11010119650505231X", ["p-zhang"]),
    ("Patient", "name"): ("muLLer", ["p-muller"]),
    ("Patient", "family"): ("王", ["p-wang"]),
    ("Patient", "given"): ("mar", ["p-muller"]),
    ("Patient", "birthdate"): ("lt1970", ["p-zhang", "p-wang"]),
    ("Patient", "gender"): ("female", ["p-muller", "p-wang"]),
    ("Encounter", "patient"): ("Patient/p-zhang", ["enc-2"]),
    ("Encounter", "subject"): ("Patient/p-wang", ["enc-1"]),
    ("Encounter", "status"): ("in-progress", ["enc-2"]),
    ("Encounter", "identifier"): ("ENC-1", ["enc-1"]),
    ("Encounter", "service-provider"): ("Organization/core", ["enc-2", "enc-1"]),
    ("Encounter", "date"): ("ge2026-11-03", ["enc-2"]),
    ("Encounter", "class"): (f"{ACT}|IMP", ["enc-2"]),
    ("ServiceRequest", "patient"): ("p-wang", ["sr-1"]),
    ("ServiceRequest", "subject"): ("Patient/p-zhang", ["sr-2"]),
    ("ServiceRequest", "status"): ("active", ["sr-1"]),
    ("ServiceRequest", "requester"): ("Practitioner/dr-li", ["sr-1"]),
    ("ServiceRequest", "performer"): ("Organization/core", ["sr-2", "sr-1"]),
    ("ServiceRequest", "identifier"): ("SR-2", ["sr-2"]),
    ("ServiceRequest", "encounter"): ("enc-1", ["sr-1"]),
    ("ServiceRequest", "code"): (f"{SNOMED}|3457005", ["sr-2", "sr-1"]),
    ("ServiceRequest", "category"): (f"{SNOMED}|11429006", ["sr-1"]),
    ("ServiceRequest", "authored"): ("lt2026-11-02", ["sr-1"]),
    ("ServiceRequest", "expert"): ("PractitionerRole/role-1", ["sr-1"]),
    ("Task", "business-status"): ("requested", ["task-1"]),
    ("Appointment", "status"): ("booked", ["appt-1"]),
    ("Appointment", "identifier"): ("APPT-1", ["appt-1"]),
    ("Appointment", "date"): ("ge2026-11-06", ["appt-1"]),
    ("Appointment", "based-on"): ("ServiceRequest/sr-1", ["appt-1"]),
    ("CarePlan", "patient"): ("p-zhang", ["cp-1"]),
    ("CarePlan", "subject"): ("Patient/p-zhang", ["cp-1"]),
    ("CarePlan", "status"): ("active", ["cp-1"]),
    ("CarePlan", "identifier"): ("CP-1", ["cp-1"]),
    ("Condition", "patient"): ("p-wang", ["cond-1"]),
    ("Condition", "subject"): ("Patient/p-wang", ["cond-1"]),
    ("Condition", "identifier"): ("COND-1", ["cond-1"]),
    ("Condition", "code"): ("C34.1", ["cond-1"]),
    ("PractitionerRole", "identifier"): ("ROLE-1", ["role-1"]),
    ("Task", "patient"): ("p-zhang", ["task-2"]),
    ("Task", "subject"): ("Patient/p-wang", ["task-1"]),
    ("Task", "status"): ("requested", ["task-1"]),
    ("Task", "requester"): ("Organization/chc", ["task-2", "task-1"]),
    ("Task", "identifier"): ("TASK-2", ["task-2"]),
    ("Task", "owner"): ("Organization/core", ["task-2", "task-1"]),
    ("Task", "focus"): ("ServiceRequest/sr-1", ["task-1"]),
    ("Observation", "patient"): ("p-wang", ["obs-bp", "obs-glu"]),
    ("Observation", "subject"): ("Patient/p-zhang", ["obs-hb"]),
    ("Observation", "status"): ("final", ["obs-hb", "obs-glu"]),
    ("Observation", "performer"): ("Organization/core", ["obs-bp", "obs-hb", "obs-glu"]),
    ("Observation", "identifier"): ("urn:hutong:lis:fuxing|OBS-HB", ["obs-hb"]),
    ("Observation", "code"): (f"{LOINC}|718-7", ["obs-hb"]),
    ("Observation", "category"): ("vital-signs", ["obs-bp"]),
    ("Observation", "date"): ("2026-11-02", ["obs-bp"]),
    ("Observation", "encounter"): ("Encounter/enc-1", ["obs-glu"]),
    ("Observation", "based-on"): ("sr-2", ["obs-hb"]),
    ("DiagnosticReport", "patient"): ("p-zhang", ["dr-2"]),
    ("DiagnosticReport", "subject"): ("Patient/p-wang", ["dr-1"]),
    ("DiagnosticReport", "status"): ("registered", ["dr-2"]),
    ("DiagnosticReport", "performer"): ("Organization/core", ["dr-2", "dr-1"]),
    ("DiagnosticReport", "identifier"): ("DR-1", ["dr-1"]),
    ("DiagnosticReport", "code"): ("58410-2", ["dr-2"]),
    ("DiagnosticReport", "category"): (f"{V2_0074}|LAB", ["dr-1"]),
    ("DiagnosticReport", "date"): ("le2026-11-02", ["dr-1"]),
    ("DiagnosticReport", "encounter"): ("enc-1", ["dr-1"]),
    ("DiagnosticReport", "based-on"): ("ServiceRequest/sr-2", ["dr-2"]),
    ("DiagnosticReport", "result"): ("Observation/obs-glu", ["dr-1"]),
    ("ImagingStudy", "patient"): ("p-zhang", ["img-1"]),
    ("ImagingStudy", "subject"): ("Patient/p-zhang", ["img-1"]),
    ("ImagingStudy", "status"): ("available", ["img-1"]),
    ("ImagingStudy", "identifier"): ("urn:dicom:uid|urn:oid:1.2.840.99.1", ["img-1"]),
    ("ImagingStudy", "encounter"): ("enc-2", ["img-1"]),
    ("ImagingStudy", "basedon"): ("sr-2", ["img-1"]),
    ("Consent", "patient"): ("p-zhang", ["consent-1"]),
    ("Consent", "status"): ("active", ["consent-1"]),
    ("Consent", "identifier"): ("C-1", ["consent-1"]),
    ("Composition", "patient"): ("p-wang", ["comp-1"]),
    ("Composition", "subject"): ("Patient/p-wang", ["comp-1"]),
    ("Composition", "status"): ("final", ["comp-1"]),
    ("Composition", "author"): ("Practitioner/dr-li", ["comp-1"]),
    ("Composition", "identifier"): ("DS-1", ["comp-1"]),
    ("DocumentReference", "patient"): ("p-wang", ["doc-1"]),
    ("DocumentReference", "subject"): ("Patient/p-wang", ["doc-1"]),
    ("DocumentReference", "status"): ("current", ["doc-1"]),
    ("DocumentReference", "author"): ("Practitioner/dr-li", ["doc-1"]),
    ("DocumentReference", "identifier"): ("DR-1", ["doc-1"]),
    ("MedicationRequest", "patient"): ("p-zhang", ["med-1"]),
    ("MedicationRequest", "subject"): ("Patient/p-zhang", ["med-1"]),
    ("MedicationRequest", "status"): ("active", ["med-1"]),
    ("MedicationRequest", "requester"): ("Practitioner/dr-li", ["med-1"]),
    ("MedicationRequest", "identifier"): ("RX-1", ["med-1"]),
    ("Coverage", "patient"): ("p-wang", ["cov-1"]),
    ("Coverage", "status"): ("active", ["cov-1"]),
    ("Coverage", "identifier"): ("INS-1", ["cov-1"]),
    ("Coverage", "beneficiary"): ("p-wang", ["cov-1"]),
    ("Organization", "identifier"): ("urn:hutong:node|chc", ["chc"]),
    ("Practitioner", "identifier"): ("D-017", ["dr-li"]),
}
