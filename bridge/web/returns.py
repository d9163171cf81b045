"""Discharge-and-return from the clinician page: a small form becomes the return Bundle.

The same transaction Bundle a HIS would POST to /fhir (a down-referral ServiceRequest basedOn
the referral, the Encounter, a discharge or visit summary Composition), handed to
``Workflow.submit``; lab and imaging results already in the thread travel with the HIS's own
return, not with this form.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from bridge.referral.codes import KINDS

LOINC = "http://loinc.org"
FIELDS = ("doctor", "diagnosis", "summary", "instructions")


def _div(text: str) -> dict[str, str]:
    from html import escape

    return {
        "status": "generated",
        "div": f'<div xmlns="http://www.w3.org/1999/xhtml">{escape(text)}</div>',
    }


def return_bundle(
    row: dict[str, Any],
    task: dict[str, Any],
    arrived_at: datetime | None,
    now: datetime,
    form: dict[str, str],
) -> dict[str, Any]:
    """The return transaction Bundle for one received referral; form fields by ``FIELDS``.

    Raises ValueError naming the missing field (the page shows it)."""
    f = {k: (form.get(k) or "").strip() for k in FIELDS}
    for k in ("doctor", "summary", "instructions"):
        if not f[k]:
            raise ValueError(f"form field '{k}' is required for a return")
    inpatient = KINDS[row["kind"]].encounter_class == "IMP" if row["kind"] in KINDS else False
    patient = task["for"]
    u = {k: f"urn:uuid:{uuid.uuid4()}" for k in ("sr", "enc", "comp")}
    sections = []
    if f["diagnosis"]:
        sections.append(
            {"title": "出院诊断" if inpatient else "诊断", "text": _div(f["diagnosis"])}
        )
    sections.append({"title": "诊疗经过", "text": _div(f["summary"])})
    sections.append({"title": "给社区医生的指导", "text": _div(f["instructions"])})
    period = {"end": now.isoformat()}
    if arrived_at is not None:
        period["start"] = arrived_at.isoformat()
    entries: list[dict[str, Any]] = [
        {
            "fullUrl": u["sr"],
            "resource": {
                "resourceType": "ServiceRequest",
                "status": "active",
                "intent": "order",
                "basedOn": [{"reference": f"ServiceRequest/{row['sr_id']}"}],
                "subject": patient,
                "note": [{"text": f["instructions"]}],
            },
        },
        {
            "fullUrl": u["enc"],
            "resource": {
                "resourceType": "Encounter",
                "status": "finished",
                "class": {
                    "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                    "code": "IMP" if inpatient else "AMB",
                },
                "subject": patient,
                "period": period,
            },
        },
        {
            "fullUrl": u["comp"],
            "resource": {
                "resourceType": "Composition",
                "status": "final",
                "type": {
                    "coding": [{"system": LOINC, "code": "18842-5", "display": "Discharge summary"}]
                    if inpatient
                    else [{"system": LOINC, "code": "11488-4", "display": "Consult note"}]
                },
                "subject": patient,
                "encounter": {"reference": u["enc"]},
                "date": now.isoformat(),
                "author": [{"display": f["doctor"]}],
                "title": "出院小结" if inpatient else "门诊诊疗小结",
                "section": sections,
            },
        },
    ]
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {**x, "request": {"method": "POST", "url": x["resource"]["resourceType"]}}
            for x in entries
        ],
    }
