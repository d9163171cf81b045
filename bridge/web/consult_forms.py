"""The consultation pages' forms turned into the Bundles ``ConsultWorkflow.step`` takes: the
experts and time (schedule), the report (a Consult note with its diagnosis Condition, advice
and an optional referral recommendation; for an imaging reading a DiagnosticReport on the
study), the completed records (resubmit), the follow-up, and the referral's Consent. Pure
functions over the submitted fields; the workflow checks what they build."""

from __future__ import annotations

import html
import uuid
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from bridge.consult import codes as C
from bridge.errors import InvalidResource
from bridge.referral.codes import ICD10

Resource = dict[str, Any]
LOINC = "http://loinc.org"


def _u() -> str:
    return f"urn:uuid:{uuid.uuid4()}"


def _div(text: str) -> dict[str, str]:
    lines = "<br/>".join(html.escape(x) for x in text.strip().splitlines()) or "-"
    return {
        "status": "generated",
        "div": f'<div xmlns="http://www.w3.org/1999/xhtml">{lines}</div>',
    }


def collection(resources: list[tuple[str, Resource]]) -> Resource:
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"fullUrl": u, "resource": r} for u, r in resources],
    }


def local_time(value: str) -> str:
    """A datetime-local field (``2026-12-05T14:00``) as a FHIR instant in Beijing time;
    ValueError if it is none."""
    v = value.strip()
    if len(v) == 16:  # datetime-local has no seconds and no offset
        v += ":00"
    try:
        parsed = datetime.fromisoformat(v) if "T" in v else None
    except ValueError:
        parsed = None
    if parsed is None:
        raise ValueError("not a date and time (YYYY-MM-DDThh:mm)")
    if parsed.tzinfo is None:
        v += "+08:00"  # the alliance's wall clock is China Standard Time
    return v


def experts(text: str) -> list[tuple[str, str]]:
    """(name, department) per non-empty line ``姓名 科室`` (the department may be left out)."""
    out = []
    for line in text.splitlines():
        parts = line.replace("\u3000", " ").split(None, 1)
        if parts:
            out.append((parts[0], parts[1].strip() if len(parts) > 1 else ""))
    return out


def schedule(
    centre: str, names: list[tuple[str, str]], start: str, end: str, link: str
) -> Resource:
    """The Appointment naming each expert (a Practitioner and a PractitionerRole of the
    centre, type CON) with the video meeting link."""
    made: list[tuple[str, Resource]] = []
    parts: list[Resource] = []
    for name, dept in names:
        doc, role = _u(), _u()
        pr: Resource = {
            "resourceType": "PractitionerRole",
            "active": True,
            "practitioner": {"reference": doc, "display": name},
            "organization": {"reference": f"Organization/{centre}"},
        }
        if dept:
            pr["specialty"] = [{"text": dept}]
        made += [(doc, {"resourceType": "Practitioner", "name": [{"text": name}]}), (role, pr)]
        parts.append(
            {
                "type": [
                    {
                        "coding": [
                            {
                                "system": C.PARTICIPATION,
                                "code": C.EXPERT_ROLE,
                                "display": "consultant",
                            }
                        ]
                    }
                ],
                "actor": {"reference": role, "display": f"{name} {dept}".strip()},
                "required": "required",
                "status": "accepted",
            }
        )
    appt: Resource = {
        "resourceType": "Appointment",
        "status": "booked",
        "description": "远程会诊（视频）",
        "start": local_time(start),
        "end": local_time(end),
        "participant": parts,
    }
    if link.strip():
        if not is_web_link(link):
            raise InvalidResource("video meeting link: an http:// or https:// address")
        appt["extension"] = [{"url": C.VIDEO_EXTENSION, "valueUrl": link.strip()}]
    return collection([(_u(), appt), *made])


def is_web_link(link: str) -> bool:
    """An http(s) address with a host: the only links the pages make clickable (a link from
    the other side could be ``javascript:`` or a local file)."""
    parts = urlsplit(link.strip())
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def report(patient_ref: str, f: dict[str, str], *, now: str) -> Resource:
    """A consultation report from the editor: Consult note, diagnosis Condition, advice, and
    with ``refer`` a ServiceRequest (Patient referral, proposal) to ``refer_to``."""
    comp, cond, rec = _u(), _u(), _u()
    diagnosis, code = f.get("diagnosis", "").strip(), f.get("icd10", "").strip()
    author = f.get("author", "").strip() or "会诊专家"
    sections: list[Resource] = []
    made: list[tuple[str, Resource]] = []
    if diagnosis or code:
        cc: Resource = {"text": diagnosis or code}
        if code:
            cc["coding"] = [{"system": ICD10, "code": code, "display": diagnosis or code}]
        made.append(
            (
                cond,
                {
                    "resourceType": "Condition",
                    "clinicalStatus": {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                "code": "active",
                            }
                        ]
                    },
                    "verificationStatus": {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                                "code": "provisional",
                            }
                        ]
                    },
                    "code": cc,
                    "subject": {"reference": patient_ref},
                },
            )
        )
        sections.append(
            {
                "title": "会诊诊断",
                "code": {"coding": [{"system": LOINC, "code": "29548-5", "display": "Diagnosis"}]},
                "text": _div(diagnosis or code),
                "entry": [{"reference": cond}],
            }
        )
    sections.append(
        {
            "title": "诊疗建议",
            "code": {"coding": [{"system": LOINC, "code": "18776-5", "display": "Plan of care"}]},
            "text": _div(f.get("advice", "")),
        }
    )
    if f.get("refer") and f.get("refer_to", "").strip():
        note = f.get("referral_note", "").strip() or "建议转诊"
        made.append(
            (
                rec,
                {
                    "resourceType": "ServiceRequest",
                    "status": "draft",
                    "intent": "proposal",
                    "category": [{"coding": [dict(C.REFERRAL_CATEGORY)]}],
                    "subject": {"reference": patient_ref},
                    "performer": [{"reference": f"Organization/{f['refer_to'].strip()}"}],
                    "note": [{"text": note}],
                },
            )
        )
        sections.append({"title": "转诊建议", "text": _div(note), "entry": [{"reference": rec}]})
    consult_note: Resource = {
        "resourceType": "Composition",
        "status": "preliminary",
        "type": {
            "coding": [{"system": LOINC, "code": C.CONSULT_NOTE, "display": "Consult note"}],
            "text": "远程会诊报告",
        },
        "subject": {"reference": patient_ref},
        "date": now,
        "author": [{"display": author}],
        "title": "远程会诊报告",
        "section": sections,
    }
    return collection([(comp, consult_note), *made])


def imaging_report(
    patient_ref: str, study: Resource | None, f: dict[str, str], *, now: str
) -> Resource:
    """An imaging reading's report: a DiagnosticReport on the study with its conclusion."""
    dr: Resource = {
        "resourceType": "DiagnosticReport",
        "status": "preliminary",
        "category": [
            {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD"}]}
        ],
        "code": {
            "coding": [{"system": LOINC, "code": "18748-4", "display": "Diagnostic imaging study"}],
            "text": (study or {}).get("description") or "影像诊断",
        },
        "subject": {"reference": patient_ref},
        "issued": now,
        "conclusion": f.get("conclusion", "").strip(),
        "imagingStudy": ([{"reference": f"ImagingStudy/{study['id']}"}] if study else []),
    }
    if f.get("author", "").strip():
        dr["resultsInterpreter"] = [{"display": f["author"].strip()}]
    if study and study.get("started"):
        dr["effectiveDateTime"] = study["started"]
    findings = f.get("findings", "").strip()
    if findings:
        dr["text"] = _div(findings)
    return collection([(_u(), dr)])


def records(patient_ref: str, text: str, *, now: str) -> Resource:
    """The records the centre asked for, as one DocumentReference (plain text)."""
    import base64

    return collection(
        [
            (
                _u(),
                {
                    "resourceType": "DocumentReference",
                    "status": "current",
                    "type": {"text": "补充资料"},
                    "subject": {"reference": patient_ref},
                    "date": now,
                    "description": text.strip(),
                    "content": [
                        {
                            "attachment": {
                                "contentType": "text/plain;charset=utf-8",
                                "language": "zh-CN",
                                "data": base64.b64encode(text.strip().encode()).decode(),
                            }
                        }
                    ],
                },
            )
        ]
    )


def follow_up(patient_ref: str, text: str, start: str) -> Resource:
    plan: Resource = {
        "resourceType": "CarePlan",
        "status": "active",
        "intent": "plan",
        "title": "会诊后随访",
        "description": text.strip(),
        "subject": {"reference": patient_ref},
    }
    if start.strip():
        plan["period"] = {"start": start.strip()}
    return collection([(_u(), plan)])


def referral_consent(patient: Resource, now: str) -> dict[str, Any]:
    """The transaction entry of the referral's Consent (the clinician ticked that it is
    signed)."""
    return {
        "fullUrl": _u(),
        "request": {"method": "POST", "url": "Consent"},
        "resource": {
            "resourceType": "Consent",
            "status": "active",
            "scope": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/consentscope",
                        "code": "treatment",
                    }
                ]
            },
            "category": [{"coding": [{"system": LOINC, "code": "59284-0"}]}],
            "patient": patient,
            "dateTime": now,
            "policyRule": {"text": "患者或家属同意按会诊建议转诊"},
        },
    }
