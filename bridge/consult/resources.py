"""Build and check a consultation's FHIR R4 resources as plain dicts (payload, not tables):
the Task, the booked Appointment, the report, the referral drafted from a report."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from bridge.consult import codes as C
from bridge.errors import InvalidResource
from bridge.referral import resources as R
from bridge.referral.codes import KIND_SYSTEM, KINDS, TASK_CODE

Resource = dict[str, Any]


def new_task(
    sr: Resource,
    thread: str,
    kind: str,
    *,
    inviter: str,
    centre: str,
    patient_ref: str,
    at: datetime,
) -> Resource:
    """The consultation's Task (id = the thread), owned by the centre, not yet requested."""
    return {
        "resourceType": "Task",
        "id": thread,
        "identifier": [{"system": f"urn:hutong:consult:{inviter}", "value": thread}],
        "basedOn": [{"reference": R.ref(sr)}],
        "status": "draft",
        "businessStatus": C.step_codeable("draft"),
        "intent": "order",
        "priority": sr["priority"],
        "code": {"coding": [{"system": TASK_CODE, "code": "fulfill"}], "text": C.KINDS[kind].zh},
        "focus": {"reference": R.ref(sr)},
        "for": {"reference": patient_ref},
        "authoredOn": R.iso(at),
        "lastModified": R.iso(at),
        "requester": {"reference": f"Organization/{inviter}"},
        "owner": {"reference": f"Organization/{centre}"},
    }


def book(appt: Resource, sr: Resource, kind: str) -> list[str]:
    """Check and complete the Appointment of a consultation: as many experts (participants
    of type CON with a PractitionerRole) as the kind asks, the inviting doctor (type REF,
    added from ``ServiceRequest.requester``), status booked, basedOn and service category.
    The experts' references, in order."""
    parts = appt.setdefault("participant", [])
    experts = [
        p["actor"]["reference"]
        for p in parts
        if (p.get("actor") or {}).get("reference", "").startswith("PractitionerRole/")
        and typed(p, C.EXPERT_ROLE)
    ]
    low, high = C.KINDS[kind].experts
    if not low <= len(experts) <= high:
        raise InvalidResource(
            f"a {kind} consultation names {low}-{high} experts "
            f"(Appointment.participant of type {C.EXPERT_ROLE} with a "
            f"PractitionerRole), found {len(experts)}"
        )
    inviting = sr["requester"]["reference"]
    if not any((p.get("actor") or {}).get("reference") == inviting for p in parts):
        parts.append(
            {
                "type": [
                    {
                        "coding": [
                            {
                                "system": C.PARTICIPATION,
                                "code": C.INVITER_ROLE,
                                "display": "referrer",
                            }
                        ]
                    }
                ],
                "actor": {"reference": inviting},
                "required": "required",
                "status": "accepted",
            }
        )
    appt["status"] = "booked"
    appt.setdefault("basedOn", [{"reference": R.ref(sr)}])
    if not any(
        c.get("code") == C.CATEGORY["code"]
        for sc in appt.get("serviceCategory") or []
        for c in sc.get("coding") or []
    ):
        appt.setdefault("serviceCategory", []).append({"coding": [C.CATEGORY]})
    return experts


def check_report(resources: list[Resource], kind: str, focus_ref: str) -> None:
    """A draft report: one Consult note Composition (LOINC 11488-4), or for an imaging reading
    one DiagnosticReport with imagingStudy and conclusion; written ``preliminary`` (a
    recommending ServiceRequest ``draft``), each basedOn the consultation where R4 has it."""
    comps = [r for r in resources if r["resourceType"] == "Composition"]
    reports = [r for r in resources if r["resourceType"] == "DiagnosticReport"]
    focus = {"reference": focus_ref}
    if kind == "imaging-reading":
        if (
            len(reports) != 1
            or not reports[0].get("imagingStudy")
            or not reports[0].get("conclusion")
        ):
            raise InvalidResource(
                "an imaging reading's report is one DiagnosticReport with "
                "imagingStudy and conclusion"
            )
    elif len(comps) != 1:
        raise InvalidResource(
            "a consultation report is one Composition (LOINC 11488-4 Consult note)"
        )
    for comp in comps:
        coding = (comp.get("type") or {}).get("coding") or []
        if not any(c.get("system") == C.LOINC and c.get("code") == C.CONSULT_NOTE for c in coding):
            raise InvalidResource("the report Composition's type is LOINC 11488-4 (Consult note)")
        comp["status"] = "preliminary"
    for r in resources:
        if r["resourceType"] == "DiagnosticReport":
            r["status"] = "preliminary"
        elif recommends(r):
            r["status"] = "draft"
            r.setdefault("intent", "proposal")
        else:
            continue
        based = r.setdefault("basedOn", [])
        if focus not in based:
            based.append(focus)


def referral_draft(
    sr: Resource, report: list[Resource], kind: str, receiver: str | None, centre: str
) -> Resource:
    """A referral transaction Bundle pre-filled from a released report: ``basedOn`` the
    consultation's ServiceRequest, to the member the recommendation names (else the centre),
    reason codes from the report's diagnoses, the report as supporting information."""
    proposal = next((r for r in report if recommends(r)), {})
    reasons = [r["code"] for r in report if r["resourceType"] == "Condition" and r.get("code")]
    target = receiver or member_of(proposal.get("performer")) or centre
    note = list(proposal.get("note") or []) or [
        {"text": "会诊报告建议转诊 / referral recommended by the consultation report"}
    ]
    out: Resource = {
        "resourceType": "ServiceRequest",
        "status": "active",
        "intent": "order",
        "priority": sr.get("priority", "routine"),
        "basedOn": [{"reference": R.ref(sr)}],
        "code": {"coding": [{"system": KIND_SYSTEM, "code": kind, "display": KINDS[kind].zh}]},
        "subject": sr["subject"],
        "performer": [{"reference": f"Organization/{target}"}],
        "note": note,
        "supportingInfo": [
            {"reference": R.ref(r)}
            for r in report
            if r["resourceType"] in ("Composition", "DiagnosticReport")
        ],
    }
    if reasons or sr.get("reasonCode"):
        out["reasonCode"] = reasons or sr["reasonCode"]
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": f"urn:uuid:{uuid.uuid4()}",
                "resource": out,
                "request": {"method": "POST", "url": "ServiceRequest"},
            }
        ],
    }


def typed(participant: Resource, code: str) -> bool:
    return any(
        c.get("code") == code for t in participant.get("type") or [] for c in t.get("coding") or []
    )


def recommends(r: Resource) -> bool:
    """A ServiceRequest of the report that recommends referral (category Patient referral)."""
    return r.get("resourceType") == "ServiceRequest" and any(
        c.get("code") == C.REFERRAL_CATEGORY["code"]
        for cat in r.get("category") or []
        for c in cat.get("coding") or []
    )


def member_of(performers: Any) -> str | None:
    for p in performers or []:
        reference = (p or {}).get("reference", "")
        if reference.startswith("Organization/"):
            return str(reference.split("/", 1)[1])
    return None


def output(code: str, zh: str, value: Resource) -> Resource:
    return {
        "type": {"coding": [{"system": C.OUTPUT_SYSTEM, "code": code, "display": zh}]},
        "valueReference": value,
    }


def instant(value: str) -> datetime | None:
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
