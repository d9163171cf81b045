"""Code systems and value sets of the referral loop: kinds, steps, events, pilot diseases.

Business statuses follow the alliance's own steps (DOMAIN.md), each with the HL7 BSeR/IHE 360X
business code as a second coding, so a BSeR-aware system reads them too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

HUTONG = "http://hutong.dev/CodeSystem"
KIND_SYSTEM = f"{HUTONG}/referral-kind"
STEP_SYSTEM = f"{HUTONG}/referral-step"
EVENT_SYSTEM = f"{HUTONG}/referral-event"
OUTPUT_SYSTEM = f"{HUTONG}/referral-output"
MEMBER_SYSTEM = "urn:hutong:member"
PATIENT_HASH_SYSTEM = "urn:hutong:patient-hash"
BSER_SYSTEM = "http://hl7.org/fhir/us/bser/CodeSystem/TaskBusinessStatusCS"
SNOMED = "http://snomed.info/sct"
ICD10 = "http://hl7.org/fhir/sid/icd-10"  # Chinese clinical edition codes share the ICD-10 form
TASK_CODE = "http://hl7.org/fhir/CodeSystem/task-code"
PLACER = "http://terminology.hl7.org/CodeSystem/v2-0203"


@dataclass(frozen=True)
class Kind:
    code: str
    direction: str  # up | down
    zh: str
    en: str
    encounter_class: str  # v3 ActCode: AMB | IMP


KINDS: dict[str, Kind] = {
    k.code: k
    for k in (
        Kind(
            "up-outpatient",
            "up",
            "上转·专科门诊",
            "Up-referral: specialist outpatient visit",
            "AMB",
        ),
        Kind("up-inpatient", "up", "上转·专科住院", "Up-referral: inpatient admission", "IMP"),
        Kind("up-exam", "up", "上转·特殊检查", "Up-referral: special examination", "AMB"),
        Kind(
            "down-outpatient",
            "down",
            "下转·专科门诊转回",
            "Down-referral after a specialist outpatient visit",
            "AMB",
        ),
        Kind("down-discharge", "down", "下转·出院转回", "Down-referral after discharge", "IMP"),
    )
}

#: which down-referral kind returns a patient sent up for each up kind
RETURN_KIND = {
    "up-outpatient": "down-outpatient",
    "up-exam": "down-outpatient",
    "up-inpatient": "down-discharge",
}


@dataclass(frozen=True)
class Step:
    code: str
    zh: str
    en: str
    bser: str | None


STEPS: dict[str, Step] = {
    s.code: s
    for s in (
        Step("draft", "待提交", "Indication confirmed", None),
        Step("consented", "已签署同意", "Consent signed", None),
        Step("requested", "已申请", "Referral requested", "2.0"),
        Step("received", "评估中", "Received, under evaluation", None),
        Step("accepted", "已接收", "Accepted", "3.0"),
        Step("scheduled", "已预约", "Appointment or bed booked", "5.1.1"),
        Step("rejected", "已拒绝", "Declined", "4.0"),
        Step("arrived", "已到院", "Patient arrived", None),
        Step("cancel-requested", "申请撤销", "Cancellation requested by the referrer", "5.2"),
        Step("cancelled", "已撤销", "Withdrawn by the referrer", "6.0"),
        Step("completed", "已完成", "Care finished, return sent", "7.0"),
        Step("return-received", "转回已接收", "Return received by the referrer", "7.0"),
    )
}


#: message events (MessageHeader.eventCoding) and the packet kind each travels as
EVENTS: dict[str, str] = {
    "request": "referral.request",
    "received": "referral.status",
    "accept": "referral.status",
    "reject": "referral.status",
    "arrive": "referral.status",
    "cancel": "referral.cancel",
    "cancelled": "referral.status",
    "cancel-refused": "referral.status",
    "return": "referral.return",
    "return-received": "referral.status",
}

#: the pilot chronic diseases of graded care, by ICD-10 three-character category
PILOT_DISEASES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "hypertension": ("高血压", "Hypertension", ("I10", "I11", "I12", "I13", "I15")),
    "diabetes": ("糖尿病", "Diabetes mellitus", ("E10", "E11", "E12", "E13", "E14")),
    "chd": ("冠心病", "Coronary heart disease", ("I20", "I21", "I22", "I23", "I24", "I25")),
    "cerebrovascular": (
        "脑血管病",
        "Cerebrovascular disease",
        tuple(f"I{n}" for n in range(60, 70)),
    ),
}


def pilot_disease(icd10: str) -> str | None:
    """Which pilot chronic disease an ICD-10 code belongs to, if any."""
    head = icd10.strip().upper()[:3]
    for key, (_zh, _en, cats) in PILOT_DISEASES.items():
        if head in cats:
            return key
    return None


def step_codeable(step: str) -> dict[str, object]:
    s = STEPS[step]
    coding = [{"system": STEP_SYSTEM, "code": s.code, "display": s.zh}]
    if s.bser:
        coding.append({"system": BSER_SYSTEM, "code": s.bser})
    return {"coding": coding, "text": f"{s.zh} / {s.en}"}


def step_of(task: dict[str, Any]) -> str | None:
    """The alliance step code in a Task's businessStatus."""
    for c in (task.get("businessStatus") or {}).get("coding") or []:
        if c.get("system") == STEP_SYSTEM and c.get("code") in STEPS:
            return str(c["code"])
    return None


def kind_of(service_request: dict[str, Any]) -> str | None:
    code = service_request.get("code") or {}
    for c in code.get("coding") or []:
        if c.get("system") == KIND_SYSTEM and c.get("code") in KINDS:
            return str(c["code"])
    return None
