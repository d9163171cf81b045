"""What the demo's clinicians, lab and CT scanner produce: slips in each HIS's own codes, the
Fuxing LIS's ORU^R01 messages (Fuxing's own lab item codes), and a CT study of the patient.

Every code here is the writing site's LOCAL code, as its catalogue in ``mappings/<site>`` lists
it; the demo checks that the receiving HIS gets the codes of ITS catalogue.
"""

from __future__ import annotations

import base64
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from adapters.slips import AcceptanceSlip, LabResult, Prescription, ReferralSlip, ReturnSlip
from bridge.consult.codes import (
    CONSULT_NOTE,
    EXPERT_ROLE,
    KIND_SYSTEM,
    KINDS,
    LOINC,
    PARTICIPATION,
    VIDEO_EXTENSION,
)
from bridge.referral.codes import ICD10, SNOMED

CHINA = timezone(timedelta(hours=8))
NATIONAL_ISSUER = "2.16.156.10011.1.3"
#: the CT study's UID root (a demo-only UID under the pydicom example root)
STUDY_ROOT = "1.2.826.0.1.3680043.8.498.7701"
CONSENT_SCOPE = "http://terminology.hl7.org/CodeSystem/consentscope"
CONDITION_CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
CONDITION_VERIFICATION = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
#: the reading's printable form (a minimal PDF; the report's presentedForm)
READING_PDF = b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"


def now() -> str:
    return datetime.now(CHINA).isoformat(timespec="seconds")


def later(days: int, hour: int) -> str:
    d = datetime.now(CHINA) + timedelta(days=days)
    return d.replace(hour=hour, minute=0, second=0, microsecond=0).isoformat()


def referral(
    slip_no: str,
    kind: str,
    name: str,
    gender: str,
    birth: str,
    nid: str,
    diagnosis: tuple[str, str],
    department: str,
    reason: str,
    summary: str,
    *,
    mrn: str,
    doctor: str,
    urgent: bool = False,
    consent: str = "患者本人",
) -> ReferralSlip:
    return ReferralSlip(
        slip_no=slip_no,
        kind=kind,
        to_member="fuxing",
        patient_name=name,
        gender=gender,
        birth_date=birth,
        id_number=nid,
        phone="13901234567",
        mrn=mrn,
        diagnosis_code=diagnosis[0],
        diagnosis_name=diagnosis[1],
        reason=reason,
        summary=summary,
        department_code=department,
        urgent=urgent,
        consent_by=consent,
        doctor=doctor,
        written_at=now(),
    )


def acceptance(slip_no: str) -> AcceptanceSlip:
    return AcceptanceSlip(
        slip_no=slip_no,
        accepted=True,
        appointment_at=later(1, 10),
        department_code="0301",
        bed_no="心内科 12床",
        doctor="张主任",
    )


def discharge(slip_no: str) -> ReturnSlip:
    """Fuxing's return slip: its diagnosis, drug and lab codes (FXZD0101, FX-0101, FXL-GLU)."""
    return ReturnSlip(
        slip_no=slip_no,
        discharge=True,
        diagnosis_code="FXZD0101",
        diagnosis_name="原发性高血压",
        course="入院后调整降压方案，头颅及胸部CT未见异常，血压平稳",
        advice="继续氨氯地平 5mg qd、硝苯地平控释片 30mg qd，两周后社区复查血压",
        doctor="张主任",
        written_at=now(),
        prescriptions=[
            Prescription("FX-0101", "苯磺酸氨氯地平片 5mg", "5 mg", "qd", 14),
            Prescription("FX-0103", "硝苯地平控释片 30mg", "30 mg", "qd", 28),
        ],
        results=[
            LabResult("FXL-GLU", "葡萄糖", "8.9", "mmol/L", "H", "3.9-6.1"),
            LabResult("FXL-CREA", "肌酐", "72", "μmol/L", "N", "44-133"),
        ],
    )


def oru(n: int, nid: str, mrn: str, name: tuple[str, str], *, glucose: str = "8.9") -> bytes:
    """A biochemistry ORU^R01 from Fuxing's LIS, its own item codes (FXL-*)."""
    ts = datetime.now(CHINA).strftime("%Y%m%d%H%M%S")
    segs = [
        (
            f"MSH|^~\\&|LIS|FXLAB|HUTONG|FUXING|{ts}||ORU^R01^ORU_R01|FXLAB-DEMO-{n:06d}|P|2.5.1"
            "|||AL|NE|CHN|UNICODE UTF-8"
        ),
        f"PID|1||{mrn}^^^FUXING^MR~{nid}^^^{NATIONAL_ISSUER}^NI||{name[0]}^{name[1]}||19500315|F",
        "PV1|1|I|0301^心内科",
        (
            f"OBR|1|ORD-{n}|LAB-DEMO-{n:06d}|BIOCHEM^生化全套^L|||{ts}|||||||{ts}||"
            f"DR001^张^主任||||||{ts}|||F"
        ),
        f"OBX|1|NM|FXL-GLU^葡萄糖^L||{glucose}|mmol/L|3.9-6.1|H|||F|||{ts}",
        f"OBX|2|NM|FXL-CREA^肌酐^L||72|μmol/L|44-133|N|||F|||{ts}",
        f"OBX|3|NM|FXL-K^钾^L||4.1|mmol/L|3.5-5.3|N|||F|||{ts}",
        "NTE|1||生化全套已审核",
    ]
    return ("\r".join(segs) + "\r").encode()


def malformed_oru(n: int, nid: str, mrn: str) -> bytes:
    """An ORU whose numeric result is not a number (the LIS's bad export): NAKed, quarantined."""
    return oru(n, nid, mrn, ("王", "秀英"), glucose="8..9")


def ct_study(
    folder: Path,
    nid: str,
    mrn: str,
    name: str,
    *,
    site: str = "1",
    station: str = "FXCT",
    birth: str = "19500315",
    sex: str = "F",
) -> tuple[str, list[Path]]:
    """Two CT images (copies of pydicom's CT_small.dcm) as the patient's chest CT; ``site``
    keeps two members' studies of the same second apart."""
    from pydicom import dcmread
    from pydicom.data import get_testdata_file
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import UID

    folder.mkdir(parents=True, exist_ok=True)
    study = f"{STUDY_ROOT}.{site}.{datetime.now(CHINA).strftime('%Y%m%d%H%M%S')}"
    out = []
    for i in (1, 2):
        ds = dcmread(str(get_testdata_file("CT_small.dcm")))
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, f"{study}.1"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = UID(f"{study}.1.{i}")
        ds.PatientID, ds.PatientName = mrn, name
        ds.PatientBirthDate, ds.PatientSex = birth, sex
        other = Dataset()
        other.PatientID, other.IssuerOfPatientID = nid, NATIONAL_ISSUER
        ds.OtherPatientIDsSequence = Sequence([other])
        ds.StudyDate = ds.SeriesDate = datetime.now(CHINA).strftime("%Y%m%d")
        ds.StudyTime = "100000"
        ds.AccessionNumber = f"{station}{study[-6:]}"
        ds.ReferringPhysicianName = "Zhang^Zhuren"
        ds.StudyDescription = "胸部CT平扫"
        ds.BodyPartExamined = "CHEST"
        ds.SeriesNumber, ds.InstanceNumber = 1, i
        p = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(p, enforce_file_format=True)
        out.append(p)
    return study, out


# -- the consultation loop (远程会诊): Bundles as Yuetan's doctor and Fuxing's centre send them ----

#: the video meeting of the respiratory MDT (the Appointment's video-meeting extension)
MEETING = "https://meet.fuxing.example/room/"
#: (department, SNOMED CT specialty, expert) of the centre: the respiratory MDT's three experts,
#: the radiologist who reads the CT
MDT_EXPERTS = [
    ("呼吸内科", "418112009", "张主任"),
    ("胸外科", "408456005", "王主任"),
    ("放射科", "394914008", "孙主任"),
]
RADIOLOGIST = [("放射科", "394914008", "孙主任")]


def _u() -> str:
    return f"urn:uuid:{uuid.uuid4()}"


def _div(text: str) -> dict[str, str]:
    return {"status": "generated", "div": f'<div xmlns="http://www.w3.org/1999/xhtml">{text}</div>'}


def _collection(resources: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"fullUrl": url, "resource": r} for url, r in resources],
    }


def consult_request(
    kind: str,
    patient_ref: str,
    question: str,
    *,
    priority: str = "routine",
    summary: str,
    study_ref: str | None = None,
) -> dict[str, Any]:
    """Yuetan's application (远程会诊申请单) as a transaction: the inviting doctor, the
    ServiceRequest (kind, reason ICD-10 R91, the question), the record summary and the signed
    consent (远程会诊知情同意书), for the patient Yuetan's PACS registered with the CT;
    ``study_ref`` (an imaging reading) names the CT Yuetan's PACS holds."""
    doc, sr, comp, con = _u(), _u(), _u(), _u()
    request: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "status": "active",
        "intent": "order",
        "priority": priority,
        "code": {"coding": [{"system": KIND_SYSTEM, "code": kind, "display": KINDS[kind].zh}]},
        "subject": {"reference": patient_ref},
        "requester": {"reference": doc},
        "reasonCode": [{"coding": [{"system": ICD10, "code": "R91", "display": "肺部影像学异常"}]}],
        "performer": [{"reference": "Organization/fuxing"}],
        "note": [{"text": question}],
    }
    if study_ref:
        request["supportingInfo"] = [{"reference": study_ref}]
    entries: list[tuple[str, dict[str, Any]]] = [
        (
            doc,
            {
                "resourceType": "Practitioner",
                "identifier": [{"system": "urn:hutong:staff:yuetan-chc", "value": "YT-D007"}],
                "name": [{"text": "李医生"}],
            },
        ),
        (sr, request),
        (
            comp,
            {
                "resourceType": "Composition",
                "status": "final",
                "type": {
                    "coding": [
                        {"system": LOINC, "code": "34133-9", "display": "Summary of episode note"}
                    ],
                    "text": "病历摘要",
                },
                "subject": {"reference": patient_ref},
                "date": now(),
                "author": [{"reference": doc}],
                "title": "会诊病历摘要",
                "section": [{"title": "现病史", "text": _div(summary)}],
            },
        ),
        (
            con,
            {
                "resourceType": "Consent",
                "status": "active",
                "scope": {"coding": [{"system": CONSENT_SCOPE, "code": "treatment"}]},
                "category": [{"coding": [{"system": LOINC, "code": "59284-0"}]}],
                "patient": {"reference": patient_ref},
                "dateTime": now(),
                "performer": [{"display": "患者本人"}],
                "policyRule": {"text": "远程会诊知情同意书：患者本人签署"},
            },
        ),
    ]
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"fullUrl": url, "resource": r, "request": {"method": "POST", "url": r["resourceType"]}}
            for url, r in entries
        ],
    }


def consult_records(patient_ref: str, text: str) -> dict[str, Any]:
    """What the centre asked for, resubmitted: the lung function report."""
    return _collection(
        [
            (
                _u(),
                {
                    "resourceType": "DocumentReference",
                    "status": "current",
                    "type": {
                        "coding": [
                            {
                                "system": LOINC,
                                "code": "19835-8",
                                "display": "Pulmonary function study",
                            }
                        ],
                        "text": "肺功能报告",
                    },
                    "subject": {"reference": patient_ref},
                    "date": now(),
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
            )
        ]
    )


def consult_schedule(
    experts: list[tuple[str, str, str]], room: str, *, day: int = 1, hour: int = 14
) -> dict[str, Any]:
    """The centre's Appointment: the experts' PractitionerRoles (CON), the video link."""
    entries: list[tuple[str, dict[str, Any]]] = []
    parts = []
    for dept, code, who in experts:
        doc, role = _u(), _u()
        entries += [
            (doc, {"resourceType": "Practitioner", "name": [{"text": who}]}),
            (
                role,
                {
                    "resourceType": "PractitionerRole",
                    "active": True,
                    "practitioner": {"reference": doc},
                    "organization": {"reference": "Organization/fuxing"},
                    "specialty": [{"coding": [{"system": SNOMED, "code": code}], "text": dept}],
                },
            ),
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
    appt = {
        "resourceType": "Appointment",
        "status": "booked",
        "extension": [{"url": VIDEO_EXTENSION, "valueUrl": MEETING + room}],
        "description": "远程会诊（视频）",
        "start": later(day, hour),
        "end": later(day, hour + 1),
        "participant": parts,
        "comment": f"视频会议：{MEETING + room}",
    }
    return _collection([(_u(), appt), *entries])


def consult_report(
    patient_ref: str, diagnosis: tuple[str, str], advice: str, refer: str
) -> dict[str, Any]:
    """The MDT's report (远程会诊报告): a Consult note Composition, the diagnosis Condition and
    a ServiceRequest recommending referral (``refer``: why, agreed with the family)."""
    comp, cond, rec = _u(), _u(), _u()
    return _collection(
        [
            (
                comp,
                {
                    "resourceType": "Composition",
                    "status": "preliminary",
                    "type": {
                        "coding": [
                            {"system": LOINC, "code": CONSULT_NOTE, "display": "Consult note"}
                        ],
                        "text": "远程会诊报告",
                    },
                    "subject": {"reference": patient_ref},
                    "date": now(),
                    "author": [{"display": "张主任（呼吸内科）"}],
                    "title": "远程会诊报告",
                    "section": [
                        {
                            "title": "会诊诊断",
                            "code": {
                                "coding": [
                                    {"system": LOINC, "code": "29548-5", "display": "Diagnosis"}
                                ]
                            },
                            "text": _div(diagnosis[1]),
                            "entry": [{"reference": cond}],
                        },
                        {
                            "title": "诊疗建议",
                            "code": {
                                "coding": [
                                    {"system": LOINC, "code": "18776-5", "display": "Plan of care"}
                                ]
                            },
                            "text": _div(advice),
                        },
                        {"title": "转诊建议", "text": _div(refer), "entry": [{"reference": rec}]},
                    ],
                },
            ),
            (
                cond,
                {
                    "resourceType": "Condition",
                    "clinicalStatus": {
                        "coding": [{"system": CONDITION_CLINICAL, "code": "active"}]
                    },
                    "verificationStatus": {
                        "coding": [{"system": CONDITION_VERIFICATION, "code": "provisional"}]
                    },
                    "code": {
                        "coding": [{"system": ICD10, "code": diagnosis[0], "display": diagnosis[1]}]
                    },
                    "subject": {"reference": patient_ref},
                },
            ),
            (
                rec,
                {
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
                    "performer": [{"reference": "Organization/fuxing"}],
                    "note": [{"text": refer}],
                },
            ),
        ]
    )


def imaging_reading(patient_ref: str, study_ref: str, conclusion: str) -> dict[str, Any]:
    """The radiologist's reading of Yuetan's CT (远程影像诊断报告), with its PDF."""
    return _collection(
        [
            (
                _u(),
                {
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
                        "coding": [{"system": LOINC, "code": "24627-2", "display": "Chest CT"}],
                        "text": "胸部CT",
                    },
                    "subject": {"reference": patient_ref},
                    "effectiveDateTime": now(),
                    "imagingStudy": [{"reference": study_ref}],
                    "conclusion": conclusion,
                    "presentedForm": [
                        {
                            "contentType": "application/pdf",
                            "language": "zh-CN",
                            "title": "影像诊断报告.pdf",
                            "data": base64.b64encode(READING_PDF).decode(),
                        }
                    ],
                },
            )
        ]
    )


def follow_up(patient_ref: str) -> dict[str, Any]:
    """Yuetan's follow-up after the reading (a CarePlan)."""
    return _collection(
        [
            (
                _u(),
                {
                    "resourceType": "CarePlan",
                    "status": "active",
                    "intent": "plan",
                    "title": "会诊后随访",
                    "description": "3个月后复查胸部CT",
                    "subject": {"reference": patient_ref},
                    "period": {"start": later(1, 9)[:10], "end": later(90, 9)[:10]},
                },
            )
        ]
    )


def referral_consent(patient_ref: str) -> dict[str, Any]:
    """The family's consent that turns the recommended referral into one (a transaction
    entry, added to the referral draft before it is POSTed)."""
    return {
        "fullUrl": _u(),
        "request": {"method": "POST", "url": "Consent"},
        "resource": {
            "resourceType": "Consent",
            "status": "active",
            "scope": {"coding": [{"system": CONSENT_SCOPE, "code": "treatment"}]},
            "category": [{"coding": [{"system": LOINC, "code": "59284-0"}]}],
            "patient": {"reference": patient_ref},
            "dateTime": now(),
            "performer": [{"display": "家属"}],  # who signed (the HIS's consent field)
            "policyRule": {"text": "家属同意转诊"},
        },
    }
