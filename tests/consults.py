"""Consultation Bundles as the inviting doctor's HIS and the centre's staff would send them:
the request (transaction), the schedule, the report, the imaging reading, the follow-up."""

from __future__ import annotations

import base64
import uuid
from typing import Any

from bridge.consult.codes import CONSULT_NOTE, EXPERT_ROLE, KIND_SYSTEM, KINDS, PARTICIPATION
from bridge.consult.codes import VIDEO_EXTENSION as VIDEO
from bridge.referral.codes import ICD10, SNOMED
from tests.factory import NATIONAL_ID

STUDY_UID = "1.2.826.0.1.3680043.8.498.10731"
PDF = b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"
MEETING = "https://meet.fuxing.example/room/hz-0001"
EXPERTS = [
    ("呼吸内科", "394588006", "张主任"),
    ("胸外科", "394609007", "王主任"),
    ("病理科", "394595002", "赵主任"),
    ("放射科", "394914008", "孙主任"),
]


def _u() -> str:
    return f"urn:uuid:{uuid.uuid4()}"


def _div(text: str) -> dict[str, str]:
    return {"status": "generated", "div": f'<div xmlns="http://www.w3.org/1999/xhtml">{text}</div>'}


def _transaction(entries: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {**e, "request": {"method": "POST", "url": e["resource"]["resourceType"]}}
            for e in entries
        ],
    }


def collection(entries: list[dict[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "collection", "entry": entries}


def consultation(
    kind: str,
    centre: str,
    *,
    national_id: str = "110102195003151234",
    name: str = "王秀英",
    consent: bool = True,
    priority: str = "routine",
    question: str = "右肺上叶结节性质？是否需要手术？",
    mrn: str = "YT0001",
    icd10: str = "R91",
    study: bool = False,
) -> dict[str, Any]:
    """A consultation request: the patient, the inviting doctor, the ServiceRequest, the record
    summary, the signed consent; with ``study`` (or kind imaging-reading) a CT ImagingStudy."""
    p, doc, sr, comp, con, img = _u(), _u(), _u(), _u(), _u(), _u()
    entries: list[dict[str, Any]] = [
        {
            "fullUrl": p,
            "resource": {
                "resourceType": "Patient",
                "identifier": [
                    {"system": NATIONAL_ID, "value": national_id},
                    {"system": "urn:hutong:mrn:inviter", "value": mrn},
                ],
                "name": [{"text": name}],
                "gender": "female",
                "birthDate": "1950-03-15",
            },
        },
        {
            "fullUrl": doc,
            "resource": {
                "resourceType": "Practitioner",
                "identifier": [{"system": "urn:hutong:staff:inviter", "value": "D0042"}],
                "name": [{"text": "李医生"}],
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
                "requester": {"reference": doc},
                "reasonCode": [
                    {"coding": [{"system": ICD10, "code": icd10, "display": "肺部影像学异常"}]}
                ],
                "performer": [{"reference": f"Organization/{centre}"}],
                "note": [{"text": question}],
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
                            "code": "34133-9",
                            "display": "Summary of episode note",
                        }
                    ],
                    "text": "病历摘要",
                },
                "subject": {"reference": p},
                "date": "2026-12-01T09:00:00+08:00",
                "author": [{"reference": doc}],
                "title": "会诊病历摘要",
                "section": [{"title": "现病史", "text": _div("咳嗽两月，CT 示右肺上叶结节 18mm")}],
            },
        },
    ]
    if consent:
        entries.append(
            {
                "fullUrl": con,
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
                    "dateTime": "2026-12-01T08:50:00+08:00",
                    "policyRule": {"text": "远程会诊知情同意书：患者本人签署"},
                },
            }
        )
    if study or kind == "imaging-reading":
        entries.append(
            {
                "fullUrl": img,
                "resource": {
                    "resourceType": "ImagingStudy",
                    "status": "available",
                    "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{STUDY_UID}"}],
                    "subject": {"reference": p},
                    "started": "2026-12-01T08:10:00+08:00",
                    "modality": [
                        {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "CT"}
                    ],
                    "numberOfSeries": 1,
                    "numberOfInstances": 120,
                    "description": "胸部CT平扫",
                },
            }
        )
    return _transaction(entries)


def records(patient_ref: str, text: str = "肺功能：FEV1 78%") -> dict[str, Any]:
    """The records the centre asked for (resubmission)."""
    return collection(
        [
            {
                "fullUrl": _u(),
                "resource": {
                    "resourceType": "DocumentReference",
                    "status": "current",
                    "type": {
                        "coding": [
                            {
                                "system": "http://loinc.org",
                                "code": "19835-8",
                                "display": "Pulmonary function study",
                            }
                        ],
                        "text": "肺功能报告",
                    },
                    "subject": {"reference": patient_ref},
                    "date": "2026-12-02T10:00:00+08:00",
                    "description": text,
                    "content": [
                        {
                            "attachment": {
                                "contentType": "text/plain",
                                "language": "zh-CN",
                                "data": base64.b64encode(text.encode()).decode(),
                            }
                        }
                    ],
                },
            }
        ]
    )


def schedule(
    centre: str,
    n_experts: int,
    *,
    start: str = "2026-12-05T14:00:00+08:00",
    end: str = "2026-12-05T15:00:00+08:00",
    patient_ref: str | None = None,
) -> dict[str, Any]:
    """The Appointment with ``n_experts`` experts (PractitionerRoles of the centre)."""
    entries: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for dept, code, who in (EXPERTS * 2)[:n_experts]:
        doc, role = _u(), _u()
        entries += [
            {"fullUrl": doc, "resource": {"resourceType": "Practitioner", "name": [{"text": who}]}},
            {
                "fullUrl": role,
                "resource": {
                    "resourceType": "PractitionerRole",
                    "active": True,
                    "practitioner": {"reference": doc},
                    "organization": {"reference": f"Organization/{centre}"},
                    "specialty": [{"coding": [{"system": SNOMED, "code": code}], "text": dept}],
                },
            },
        ]
        parts.append(
            {
                "type": [
                    {
                        "coding": [
                            {"system": PARTICIPATION, "code": EXPERT_ROLE, "display": "consultant"}
                        ]
                    }
                ],
                "actor": {"reference": role},
                "required": "required",
                "status": "accepted",
            }
        )
    if patient_ref:
        parts.append({"actor": {"reference": patient_ref}, "status": "accepted"})
    appt = {
        "resourceType": "Appointment",
        "status": "booked",
        "extension": [{"url": VIDEO, "valueUrl": MEETING}],
        "description": "远程会诊（视频）",
        "start": start,
        "end": end,
        "participant": parts,
        "comment": f"视频会议：{MEETING}",
    }
    return collection([{"fullUrl": _u(), "resource": appt}, *entries])


def report(
    patient_ref: str,
    *,
    refer_to: str | None = None,
    diagnosis: tuple[str, str] = ("C34.1", "右肺上叶恶性肿瘤（待病理证实）"),
    advice: str = "建议行胸腔镜下右肺上叶楔形切除术",
) -> dict[str, Any]:
    """The consultation report: a Consult note Composition, a diagnosis Condition, and with
    ``refer_to`` a ServiceRequest recommending referral to that member."""
    comp, cond, rec = _u(), _u(), _u()
    sections: list[dict[str, Any]] = [
        {
            "title": "会诊诊断",
            "code": {
                "coding": [
                    {"system": "http://loinc.org", "code": "29548-5", "display": "Diagnosis"}
                ]
            },
            "text": _div(diagnosis[1]),
            "entry": [{"reference": cond}],
        },
        {
            "title": "诊疗建议",
            "code": {
                "coding": [
                    {"system": "http://loinc.org", "code": "18776-5", "display": "Plan of care"}
                ]
            },
            "text": _div(advice),
        },
    ]
    entries: list[dict[str, Any]] = [
        {
            "fullUrl": cond,
            "resource": {
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
                "code": {
                    "coding": [{"system": ICD10, "code": diagnosis[0], "display": diagnosis[1]}]
                },
                "subject": {"reference": patient_ref},
            },
        },
    ]
    if refer_to:
        entries.append(
            {
                "fullUrl": rec,
                "resource": {
                    "resourceType": "ServiceRequest",
                    "status": "draft",
                    "intent": "proposal",
                    "category": [
                        {
                            "coding": [
                                {"system": SNOMED, "code": "3457005", "display": "Patient referral"}
                            ]
                        }
                    ],
                    "subject": {"reference": patient_ref},
                    "performer": [{"reference": f"Organization/{refer_to}"}],
                    "note": [{"text": "建议上转胸外科住院手术（已与家属沟通同意）"}],
                },
            }
        )
        sections.append(
            {"title": "转诊建议", "text": _div("建议转诊"), "entry": [{"reference": rec}]}
        )
    entries.insert(
        0,
        {
            "fullUrl": comp,
            "resource": {
                "resourceType": "Composition",
                "status": "preliminary",
                "type": {
                    "coding": [
                        {
                            "system": "http://loinc.org",
                            "code": CONSULT_NOTE,
                            "display": "Consult note",
                        }
                    ],
                    "text": "远程会诊报告",
                },
                "subject": {"reference": patient_ref},
                "date": "2026-12-05T15:10:00+08:00",
                "author": [{"display": "张主任（呼吸内科）"}],
                "title": "远程会诊报告",
                "section": sections,
            },
        },
    )
    return collection(entries)


def imaging_report(
    patient_ref: str,
    study_ref: str,
    conclusion: str = "右肺上叶磨玻璃结节，Lung-RADS 4A，建议3个月复查",
) -> dict[str, Any]:
    """The radiologist's reading: a DiagnosticReport on the study, with a PDF."""
    return collection(
        [
            {
                "fullUrl": _u(),
                "resource": {
                    "resourceType": "DiagnosticReport",
                    "status": "preliminary",
                    "category": [
                        {
                            "coding": [
                                {
                                    "system": "http://terminology.hl7.org/CodeSystem/v2-0074",
                                    "code": "RAD",
                                }
                            ]
                        }
                    ],
                    "code": {
                        "coding": [
                            {"system": "http://loinc.org", "code": "24627-2", "display": "Chest CT"}
                        ],
                        "text": "胸部CT",
                    },
                    "subject": {"reference": patient_ref},
                    "effectiveDateTime": "2026-12-01T08:10:00+08:00",
                    "imagingStudy": [{"reference": study_ref}],
                    "conclusion": conclusion,
                    "presentedForm": [
                        {
                            "contentType": "application/pdf",
                            "language": "zh-CN",
                            "title": "影像诊断报告.pdf",
                            "data": base64.b64encode(PDF).decode(),
                        }
                    ],
                },
            }
        ]
    )


def follow_up(patient_ref: str) -> dict[str, Any]:
    return collection(
        [
            {
                "fullUrl": _u(),
                "resource": {
                    "resourceType": "CarePlan",
                    "status": "active",
                    "intent": "plan",
                    "title": "会诊后随访",
                    "description": "术后两周社区随访，复查血常规",
                    "subject": {"reference": patient_ref},
                    "period": {"start": "2026-12-20", "end": "2027-03-20"},
                },
            }
        ]
    )
