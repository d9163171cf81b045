"""Code systems of the consultation loop (远程会诊): kinds, steps, events and their packet kinds.

The ServiceRequest's category is SNOMED CT 11429006 "Consultation"; its ``code`` carries the
consultation kind from the Hutong CodeSystem below. The Task's ``businessStatus`` carries the
alliance's own step (and, where one exists, the HL7 BSeR/360X business code as a second coding,
as for referrals); ``Task.status`` follows from the step (:data:`STEP_STATUS`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bridge.referral.codes import BSER_SYSTEM, HUTONG, SNOMED

KIND_SYSTEM = f"{HUTONG}/consult-kind"
STEP_SYSTEM = f"{HUTONG}/consult-step"
EVENT_SYSTEM = f"{HUTONG}/consult-event"
OUTPUT_SYSTEM = f"{HUTONG}/consult-output"
LOINC = "http://loinc.org"
#: the video meeting of a scheduled consultation (R4 Appointment has no virtualService)
VIDEO_EXTENSION = "http://hutong.dev/StructureDefinition/video-meeting"
PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
EXPERT_ROLE = "CON"  # v3 ParticipationType consultant: an expert of the consultation
INVITER_ROLE = "REF"  # v3 ParticipationType referrer: the inviting doctor
CONSULT_NOTE = "11488-4"  # LOINC Consult note
CATEGORY = {"system": SNOMED, "code": "11429006", "display": "Consultation"}
REFERRAL_CATEGORY = {"system": SNOMED, "code": "3457005", "display": "Patient referral"}


@dataclass(frozen=True)
class Kind:
    code: str
    zh: str
    en: str
    experts: tuple[int, int]  # how many experts the Appointment names (min, max)


KINDS: dict[str, Kind] = {
    k.code: k
    for k in (
        Kind("general", "远程会诊", "Remote consultation", (1, 5)),
        Kind("mdt", "多学科会诊", "Multi-disciplinary consultation (MDT)", (3, 5)),
        Kind("imaging-reading", "远程影像诊断", "Remote imaging reading", (1, 2)),
    )
}


@dataclass(frozen=True)
class Step:
    code: str
    zh: str
    en: str
    status: str  # Task.status while the consultation is at this step
    bser: str | None = None


STEPS: dict[str, Step] = {
    s.code: s
    for s in (
        Step("draft", "待提交", "Not yet sent", "draft"),
        Step("requested", "已申请", "Requested", "requested", "2.0"),
        Step("received", "预审中", "Received, in pre-review", "received"),
        Step("returned", "退回补充", "Returned for completion", "on-hold"),
        Step("resubmitted", "已补充重提", "Completed and resubmitted", "received"),
        Step("scheduled", "已排期", "Accepted and scheduled", "accepted", "5.1.1"),
        Step("in-consultation", "会诊中", "In consultation", "in-progress"),
        Step("reported", "报告质控中", "Report written, in quality control", "in-progress"),
        Step("released", "报告已发布", "Report released", "completed", "7.0"),
        Step(
            "report-received",
            "报告已接收",
            "Report received by the inviting side",
            "completed",
            "7.0",
        ),
        Step("follow-up-planned", "已安排随访", "Follow-up planned", "completed"),
        Step("closed", "已结束", "Closed", "completed"),
        Step("cancelled", "已取消", "Cancelled", "cancelled", "6.0"),
    )
}

STEP_STATUS = {s.code: s.status for s in STEPS.values()}

#: message events (MessageHeader.eventCoding) and the packet kind each travels as
EVENTS: dict[str, str] = {
    "request": "consult.request",
    "received": "consult.status",
    "return": "consult.status",
    "resubmit": "consult.status",
    "schedule": "consult.status",
    "start": "consult.status",
    "report": "consult.status",
    "release": "consult.report",
    "report-received": "consult.status",
    "follow-up": "consult.status",
    "close": "consult.status",
    "cancel": "consult.status",
    "cancelled": "consult.status",
    "cancel-refused": "consult.status",
}
PACKET_KINDS = tuple(dict.fromkeys(EVENTS.values()))


def step_codeable(step: str) -> dict[str, Any]:
    s = STEPS[step]
    coding = [{"system": STEP_SYSTEM, "code": s.code, "display": s.zh}]
    if s.bser:
        coding.append({"system": BSER_SYSTEM, "code": s.bser})
    return {"coding": coding, "text": f"{s.zh} / {s.en}"}


def step_of(task: dict[str, Any]) -> str | None:
    """The consultation step in a Task's businessStatus."""
    for c in (task.get("businessStatus") or {}).get("coding") or []:
        if c.get("system") == STEP_SYSTEM and c.get("code") in STEPS:
            return str(c["code"])
    return None


def kind_of(service_request: dict[str, Any]) -> str | None:
    for c in (service_request.get("code") or {}).get("coding") or []:
        if c.get("system") == KIND_SYSTEM and c.get("code") in KINDS:
            return str(c["code"])
    return None


def is_consultation(service_request: dict[str, Any]) -> bool:
    """A ServiceRequest of category Consultation (or with a consultation kind code)."""
    for cat in service_request.get("category") or []:
        for c in cat.get("coding") or []:
            if c.get("system") == SNOMED and c.get("code") == CATEGORY["code"]:
                return True
    return kind_of(service_request) is not None


def kind_codeable(kind: str) -> dict[str, Any]:
    k = KINDS[kind]
    return {
        "coding": [{"system": KIND_SYSTEM, "code": k.code, "display": k.zh}],
        "text": f"{k.zh} / {k.en}",
    }
