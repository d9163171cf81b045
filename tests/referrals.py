"""Referral and return transaction Bundles as a clinician's HIS would POST them."""

from __future__ import annotations

import uuid
from typing import Any

from bridge.referral.codes import ICD10, KIND_SYSTEM, KINDS
from tests.factory import NATIONAL_ID, observation


def _u() -> str:
    return f"urn:uuid:{uuid.uuid4()}"


def referral(
    kind: str,
    receiver: str,
    *,
    national_id: str = "110102195003151234",
    name: str = "王秀英",
    icd10: str = "I10",
    consent: bool = True,
    priority: str = "routine",
    mrn: str = "YT0001",
) -> dict[str, Any]:
    p, sr, c, comp, cov = _u(), _u(), _u(), _u(), _u()
    entries: list[dict[str, Any]] = [
        {
            "fullUrl": p,
            "resource": {
                "resourceType": "Patient",
                "identifier": [
                    {"system": NATIONAL_ID, "value": national_id},
                    {"system": "urn:hutong:mrn:referrer", "value": mrn},
                ],
                "name": [{"text": name}],
                "gender": "female",
                "birthDate": "1950-03-15",
            },
        },
        {
            "fullUrl": sr,
            "resource": {
                "resourceType": "ServiceRequest",
                "status": "active",
                "intent": "order",
                "priority": priority,
                "code": {
                    "coding": [{"system": KIND_SYSTEM, "code": kind, "display": KINDS[kind].zh}]
                },
                "subject": {"reference": p},
                "reasonCode": [
                    {"coding": [{"system": ICD10, "code": icd10, "display": "原发性高血压"}]}
                ],
                "performer": [{"reference": f"Organization/{receiver}"}],
                "note": [{"text": "血压控制不佳，请专科评估"}],
                "insurance": [{"reference": cov}],
            },
        },
        {
            "fullUrl": comp,
            "resource": {
                "resourceType": "Composition",
                "status": "final",
                "type": {
                    "coding": [
                        {
                            "system": "http://loinc.org",
                            "code": "57133-1",
                            "display": "Referral note",
                        }
                    ],
                    "text": "转诊病历摘要",
                },
                "subject": {"reference": p},
                "date": "2026-11-20T09:00:00+08:00",
                "author": [{"display": "李医生"}],
                "title": "病历摘要",
                "section": [
                    {
                        "title": "现病史",
                        "text": {
                            "status": "generated",
                            "div": '<div xmlns="http://www.w3.org/1999/xhtml">头晕两周</div>',
                        },
                    }
                ],
            },
        },
        {
            "fullUrl": cov,
            "resource": {
                "resourceType": "Coverage",
                "status": "active",
                "identifier": [
                    {"system": "urn:hutong:insurance-referral-slip", "value": "YB-2026-0001"}
                ],
                "beneficiary": {"reference": p},
                "payor": [{"display": "北京市医疗保险"}],
            },
        },
    ]
    if consent:
        entries.append(
            {
                "fullUrl": c,
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
                    "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
                    "patient": {"reference": p},
                    "dateTime": "2026-11-20T08:50:00+08:00",
                    "policyRule": {"text": "患者本人同意转诊"},
                },
            }
        )
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {**e, "request": {"method": "POST", "url": e["resource"]["resourceType"]}}
            for e in entries
        ],
    }


def return_bundle(sr_id: str, patient_ref: str, *, discharge: bool = True) -> dict[str, Any]:
    enc, comp, dr, mr, down = _u(), _u(), _u(), _u(), _u()
    o1, o2 = observation(1, patient_ref, 8.9), observation(2, patient_ref, 5.4)
    obs = [(_u(), o1), (_u(), o2)]
    for _, o in obs:
        o.pop("id")
    entries: list[dict[str, Any]] = [
        {
            "fullUrl": down,
            "resource": {
                "resourceType": "ServiceRequest",
                "status": "active",
                "intent": "order",
                "basedOn": [{"reference": f"ServiceRequest/{sr_id}"}],
                "subject": {"reference": patient_ref},
                "note": [{"text": "继续降压治疗，两周后社区复查血压"}],
            },
        },
        {
            "fullUrl": enc,
            "resource": {
                "resourceType": "Encounter",
                "status": "finished",
                "class": {
                    "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                    "code": "IMP" if discharge else "AMB",
                },
                "subject": {"reference": patient_ref},
                "period": {
                    "start": "2026-11-21T10:00:00+08:00",
                    "end": "2026-11-25T09:00:00+08:00",
                },
            },
        },
        {
            "fullUrl": comp,
            "resource": {
                "resourceType": "Composition",
                "status": "final",
                "type": {
                    "coding": [
                        {
                            "system": "http://loinc.org",
                            "code": "18842-5",
                            "display": "Discharge summary",
                        }
                    ]
                },
                "subject": {"reference": patient_ref},
                "encounter": {"reference": enc},
                "date": "2026-11-25T09:00:00+08:00",
                "author": [{"display": "张主任"}],
                "title": "出院小结",
                "section": [
                    {
                        "title": "给社区医生的指导",
                        "text": {
                            "status": "generated",
                            "div": '<div xmlns="http://www.w3.org/1999/xhtml">'
                            "氨氯地平 5mg qd</div>",
                        },
                    }
                ],
            },
        },
        {
            "fullUrl": dr,
            "resource": {
                "resourceType": "DiagnosticReport",
                "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": "24323-8"}]},
                "subject": {"reference": patient_ref},
                "result": [{"reference": u} for u, _ in obs],
            },
        },
        {
            "fullUrl": mr,
            "resource": {
                "resourceType": "MedicationRequest",
                "status": "active",
                "intent": "order",
                "medicationCodeableConcept": {
                    "coding": [
                        {
                            "system": "urn:hutong:drug:core",
                            "code": "FX-0101",
                            "display": "氨氯地平片 5mg",
                        }
                    ]
                },
                "subject": {"reference": patient_ref},
                "dosageInstruction": [{"text": "5mg 每日一次"}],
            },
        },
    ] + [{"fullUrl": u, "resource": o} for u, o in obs]
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {**e, "request": {"method": "POST", "url": e["resource"]["resourceType"]}}
            for e in entries
        ],
    }
