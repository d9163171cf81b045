"""The consultation slips (远程会诊申请单 and what comes back) as neutral records, shared by the
HIS styles like :mod:`adapters.slips` is for referrals.

* :class:`ConsultSlip`: what the inviting doctor fills in the HIS; :func:`consult_bundle` makes
  it the transaction Bundle of ``host.submit_consultation`` (Patient, the inviting doctor, the
  ServiceRequest of kind general / mdt / imaging-reading, the record summary, the signed
  Consent, the study to read, the shared reports named by id).
* :class:`ResubmitSlip`: the records the centre asked for (补充资料), for ``resubmit``;
  :class:`ConsultCancel`: the request withdrawn before the meeting, for ``cancel``.
* :class:`ConsultStatus`: one step the centre took, as the inviting HIS shows it (returned with
  what is missing, scheduled with time, experts and video link, cancelled, ...).
* :class:`ConsultReport`: the released report (consult note: diagnosis, advice, referral
  recommendation; imaging reading: conclusion, study UID and the PDF).

Codes in the slips are the site's LOCAL codes (diagnosis, department), translated by the
site's maps as for referrals (:class:`adapters.slips_fhir.Codes`).
"""

from __future__ import annotations

import base64
import re
import uuid
from dataclasses import dataclass
from typing import Any

from adapters.slips_fhir import (
    GENDERS,
    LOINC,
    MRN_SYSTEM,
    NATIONAL_ID_SYSTEM,
    STRICT,
    BadValue,
    Codes,
    MissingField,
    _date,
    _datetime,
    _div,
    _entries,
    _need,
    _undiv,
)
from bridge.consult import codes as C
from bridge.consult.states import MOVES
from bridge.referral.codes import PLACER

Resource = dict[str, Any]
CONSULT_SLIP_SYSTEM = "urn:hutong:consult-slip:{member}"
CONSENT_DOC_SYSTEM = "urn:hutong:consent-doc:{member}"
DICOM_UID = "urn:dicom:uid"
SUMMARY_NOTE = ("34133-9", "Summary of episode note")
RECORDS_NOTE = ("11506-3", "Progress note")


@dataclass
class ConsultSlip:
    """远程会诊申请单: written by the inviting doctor in the local HIS."""

    slip_no: str  # the HIS's own consultation number (unique in that HIS)
    kind: str  # general | mdt | imaging-reading
    to_member: str  # the consultation centre's member id
    patient_name: str
    gender: str
    birth_date: str  # YYYY-MM-DD
    id_number: str  # never travels in clear
    phone: str
    mrn: str
    diagnosis_code: str  # local diagnosis code: why the consultation is asked for
    diagnosis_name: str
    reason: str  # 会诊目的
    question: str  # 会诊问题: what the experts are asked (mandatory)
    summary: str  # 病历摘要
    specialties: str  # requested specialties: local department codes, ';'-separated
    urgent: bool
    consent_by: str  # who signed the consent (empty = none: refused)
    consent_doc: str  # the signed consent's document number in the HIS (知情同意书编号)
    study_uid: str  # imaging reading: the DICOM Study Instance UID to read
    shared_results: str  # ids of DiagnosticReports in this node's store, ';'-separated
    doctor: str
    written_at: str  # ISO 8601 with offset


@dataclass
class ResubmitSlip:
    """会诊补充资料: the records the centre asked for when it returned the request."""

    slip_no: str  # the consultation slip it completes
    title: str  # e.g. 肺功能报告
    text: str
    doctor: str
    written_at: str


@dataclass
class ConsultCancel:
    """会诊撤回: the inviting doctor withdraws the request before the meeting."""

    slip_no: str
    reason: str = ""
    cancelled_at: str = ""  # ISO 8601 (may be empty)


@dataclass
class ConsultStatus:
    """One step of the consultation as the inviting HIS shows it (会诊状态)."""

    slip_no: str
    event: str  # received | return | schedule | start | release | cancelled | cancel-refused
    step: str  # the step after it (bridge.consult.codes.STEPS)
    status: str  # Task.status
    reason: str = ""  # what is missing (returned) / why cancelled
    start: str = ""  # scheduled: ISO 8601
    end: str = ""
    experts: str = ""  # "张主任(呼吸内科);王主任(胸外科)"
    video_link: str = ""
    at: str = ""  # when the step was taken (Task.lastModified)


@dataclass
class ConsultReport:
    """会诊报告 (general, MDT) or 远程影像诊断报告 (imaging reading), released by the centre."""

    slip_no: str
    report_id: str  # the Composition's or DiagnosticReport's id
    kind: str
    status: str  # final once released
    diagnosis_code: str = ""  # the site's local code (ICD-10 if unmapped)
    diagnosis_name: str = ""
    diagnosis_text: str = ""  # the report's diagnosis section as written
    advice: str = ""
    referral_recommended: bool = False
    referral_to: str = ""  # the member the report recommends referral to
    referral_note: str = ""
    conclusion: str = ""  # imaging reading
    study_uid: str = ""
    pdf: bytes = b""  # the report's PDF (presentedForm), if any
    author: str = ""
    issued_at: str = ""


def _u() -> str:
    return f"urn:uuid:{uuid.uuid4()}"


def _split(text: str) -> list[str]:
    return [p for p in re.split(r"[;,；，\s]+", text or "") if p]


def consult_bundle(
    slip: ConsultSlip,
    maps: Any,
    me: str,
    *,
    national_id_system: str = NATIONAL_ID_SYSTEM,
    study: Resource | None = None,
    gaps: list[Any] | None = None,
) -> Resource:
    """The transaction Bundle for ``host.submit_consultation``. Raises
    :class:`~adapters.slips_fhir.SlipError` naming the slip field. ``study``: the ImagingStudy
    of ``study_uid`` stored here (the PACS adapter's): the request names it (the workflow sends
    it about the request's patient, and the reading comes back on it); else the request brings
    an ImagingStudy of that UID. Images stay in the PACS (fetched on demand)."""
    codes = Codes(maps, me, gaps)
    slip_no = _need("slip_no", slip.slip_no)
    if slip.kind not in C.KINDS:
        raise BadValue(
            "kind", f"consultation kind {slip.kind!r} is not one of {', '.join(C.KINDS)}"
        )
    centre = _need("to_member", slip.to_member)
    name = _need("patient_name", slip.patient_name)
    if slip.gender not in GENDERS:
        raise BadValue("gender", f"gender {slip.gender!r} is not one of {', '.join(GENDERS)}")
    birth = _date("birth_date", slip.birth_date)
    id_number = _need("id_number", slip.id_number).upper()
    if not re.fullmatch(r"\d{17}[\dX]", id_number):
        raise BadValue("id_number", "'id_number' is not an 18-character resident ID number")
    question = _need("question", slip.question)
    written = _datetime("written_at", slip.written_at)
    uid = slip.study_uid.strip()
    if slip.kind == "imaging-reading" and not uid:
        raise MissingField(
            "study_uid", "an imaging reading names the study to read (Study Instance UID)"
        )
    if uid and not re.fullmatch(r"[0-9]+(\.[0-9]+)*", uid):
        raise BadValue("study_uid", "'study_uid' is not a DICOM UID (digits and dots)")
    diagnosis = codes.concept(
        "diagnosis",
        _need("diagnosis_code", slip.diagnosis_code),
        slip.diagnosis_name.strip(),
        field="diagnosis_code",
        strict=STRICT,
    )
    p, doc, sr, comp = _u(), _u(), _u(), _u()
    idents = [{"system": national_id_system, "value": id_number}]
    if slip.mrn.strip():
        idents.append({"system": MRN_SYSTEM.format(member=me), "value": slip.mrn.strip()})
    patient: Resource = {
        "resourceType": "Patient",
        "identifier": idents,
        "name": [{"text": name}],
        "gender": slip.gender,
        "birthDate": birth,
    }
    if slip.phone.strip():
        patient["telecom"] = [{"system": "phone", "value": slip.phone.strip(), "use": "mobile"}]
    doctor: Resource = {
        "resourceType": "Practitioner",
        "name": [{"text": slip.doctor.strip() or "未署名"}],
    }
    notes = [{"text": question}]
    if slip.reason.strip():
        notes.append({"text": f"会诊目的：{slip.reason.strip()}"})
    request: Resource = {
        "resourceType": "ServiceRequest",
        "status": "active",
        "intent": "order",
        "identifier": [
            {
                "type": {"coding": [{"system": PLACER, "code": "PLAC"}]},
                "system": CONSULT_SLIP_SYSTEM.format(member=me),
                "value": slip_no,
            }
        ],
        "category": [{"coding": [C.CATEGORY]}],
        "priority": "urgent" if slip.urgent else "routine",
        "code": C.kind_codeable(slip.kind),
        "subject": {"reference": p},
        "authoredOn": written,
        "requester": {"reference": doc},
        "performer": [{"reference": f"Organization/{centre}"}],
        "reasonCode": [diagnosis],
        "note": notes,
        "supportingInfo": [],
    }
    specialties = [
        codes.concept("department", code, field="specialties") for code in _split(slip.specialties)
    ]
    if specialties:
        request["orderDetail"] = specialties
    codes.mark(request)
    composition: Resource = {
        "resourceType": "Composition",
        "status": "final",
        "type": {
            "coding": [{"system": LOINC, "code": SUMMARY_NOTE[0], "display": SUMMARY_NOTE[1]}],
            "text": "会诊病历摘要",
        },
        "subject": {"reference": p},
        "date": written,
        "author": [{"reference": doc}],
        "title": "会诊病历摘要",
        "section": [{"title": "病历摘要", "text": _div(slip.summary.strip() or "无")}],
    }
    resources: list[tuple[str, Resource]] = [
        (p, patient),
        (doc, doctor),
        (sr, request),
        (comp, composition),
    ]
    if slip.consent_by.strip():
        consent: Resource = {
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
            "category": [
                {"coding": [{"system": LOINC, "code": "59284-0", "display": "Patient Consent"}]}
            ],
            "patient": {"reference": p},
            "dateTime": written,
            "performer": [{"display": slip.consent_by.strip()}],
            "policyRule": {"text": f"远程会诊知情同意书：{slip.consent_by.strip()}签署"},
        }
        if slip.consent_doc.strip():
            consent["identifier"] = [
                {"system": CONSENT_DOC_SYSTEM.format(member=me), "value": slip.consent_doc.strip()}
            ]
        resources.append((_u(), consent))
    if uid and study is not None:
        request["supportingInfo"].append({"reference": f"ImagingStudy/{study['id']}"})
    elif uid:
        resources.append(
            (
                _u(),
                {
                    "resourceType": "ImagingStudy",
                    "status": "available",
                    "identifier": [{"system": DICOM_UID, "value": f"urn:oid:{uid}"}],
                    "subject": {"reference": p},
                },
            )
        )
    for rid in _split(slip.shared_results):
        request["supportingInfo"].append({"reference": f"DiagnosticReport/{rid}"})
    if not request["supportingInfo"]:
        del request["supportingInfo"]
    return _entries(resources, codes)


def resubmit_bundle(slip: ResubmitSlip, patient_ref: str) -> Resource:
    """The completed records as a collection Bundle for ``consultation_step("resubmit")``."""
    text = _need("text", slip.text)
    written = _datetime("written_at", slip.written_at)
    title = slip.title.strip() or "补充资料"
    doc: Resource = {
        "resourceType": "DocumentReference",
        "status": "current",
        "type": {
            "coding": [{"system": LOINC, "code": RECORDS_NOTE[0], "display": RECORDS_NOTE[1]}],
            "text": title,
        },
        "subject": {"reference": patient_ref},
        "date": written,
        "description": title,
        "content": [
            {
                "attachment": {
                    "contentType": "text/plain",
                    "language": "zh-CN",
                    "title": title,
                    "data": base64.b64encode(text.encode()).decode(),
                }
            }
        ],
    }
    if slip.doctor.strip():
        doc["author"] = [{"display": slip.doctor.strip()}]
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"fullUrl": _u(), "resource": doc}],
    }


# -- what comes back ---------------------------------------------------------------------------


def slip_no_of(sr: Resource) -> str:
    """The inviting HIS's consultation number (PLAC identifier) of a consultation request."""
    for i in sr.get("identifier") or []:
        if any(c.get("code") == "PLAC" for c in (i.get("type") or {}).get("coding") or []):
            return str(i.get("value", ""))
    return ""


def _refs(resources: list[Resource]) -> dict[str, Resource]:
    return {f"{r['resourceType']}/{r['id']}": r for r in resources if r.get("id")}


def request_of(view: dict[str, Any]) -> Resource:
    row = view["consultation"]
    return _refs(view["resources"]).get(f"ServiceRequest/{row['sr_id']}", {})


def _expert_names(appt: Resource, refs: dict[str, Resource]) -> str:
    out = []
    for part in appt.get("participant") or []:
        if not any(
            c.get("code") == C.EXPERT_ROLE
            for t in part.get("type") or []
            for c in t.get("coding") or []
        ):
            continue
        role = refs.get((part.get("actor") or {}).get("reference", ""), {})
        doc = refs.get((role.get("practitioner") or {}).get("reference", ""), {})
        who = ((doc.get("name") or [{}])[0]).get("text") or (part.get("actor") or {}).get(
            "display", ""
        )
        dept = next((s.get("text", "") for s in role.get("specialty") or []), "")
        out.append(f"{who}({dept})" if dept else str(who))
    return ";".join(out)


def status_of(event: str, view: dict[str, Any], task: Resource) -> ConsultStatus:
    """The step the centre took, as the inviting HIS shows it."""
    row = view["consultation"]
    refs = _refs(view["resources"])
    move = MOVES.get(event)
    step = (move.target if move is not None else None) or row["step"]
    out = ConsultStatus(
        slip_no=slip_no_of(request_of(view)),
        event=event,
        step=step,
        status=C.STEP_STATUS.get(step, row["status"]),
        reason=str((task.get("statusReason") or {}).get("text") or ""),
        at=str(task.get("lastModified") or ""),
    )
    if event in ("schedule", "start") and row.get("appointment_id"):
        appt = refs.get(f"Appointment/{row['appointment_id']}", {})
        out.start, out.end = str(appt.get("start", "")), str(appt.get("end", ""))
        out.experts = _expert_names(appt, refs)
        out.video_link = next(
            (
                str(e.get("valueUrl", ""))
                for e in appt.get("extension") or []
                if e.get("url") == C.VIDEO_EXTENSION
            ),
            "",
        )
    if event not in ("return", "cancelled", "cancel-refused"):
        out.reason = ""
    return out


def _section(comp: Resource, code: str, title: str) -> Resource:
    return next(
        (
            s
            for s in comp.get("section") or []
            if any(c.get("code") == code for c in (s.get("code") or {}).get("coding") or [])
            or s.get("title") == title
        ),
        {},
    )


def reports_of(view: dict[str, Any], codes: Codes, host: Any = None) -> list[ConsultReport]:
    """The released report of a consultation, one record per Composition / DiagnosticReport.
    ``host`` (an AdapterHost, read only): the study a reading names when it is this node's own
    record outside the thread (the PACS adapter's study the request shared)."""
    row = view["consultation"]
    refs = _refs(view["resources"])
    if host is not None:
        for r in list(refs.values()):
            for s in r.get("imagingStudy") or [] if r["resourceType"] == "DiagnosticReport" else []:
                ref = str(s.get("reference", ""))
                rtype, _, rid = ref.partition("/")
                if (
                    ref not in refs
                    and rtype == "ImagingStudy"
                    and rid
                    and host.resource_info(rtype, rid) is not None
                ):
                    refs[ref] = host.resource(rtype, rid)
    slip_no = slip_no_of(request_of(view))
    report = [refs[r] for r in (row.get("report_refs") or "").split() if r in refs]
    rec = next((r for r in report if r["resourceType"] == "ServiceRequest"), None)
    out = []
    for r in report:
        if r["resourceType"] == "Composition":
            dx = _section(r, "29548-5", "会诊诊断")
            cond = next(
                (refs[e["reference"]] for e in dx.get("entry") or [] if e.get("reference") in refs),
                {},
            )
            code, name = codes.local("diagnosis", cond.get("code")) if cond else ("", "")
            out.append(
                ConsultReport(
                    slip_no=slip_no,
                    report_id=str(r["id"]),
                    kind=row["kind"],
                    status=str(r.get("status", "")),
                    diagnosis_code=code,
                    diagnosis_name=name,
                    diagnosis_text=_undiv(dx.get("text")),
                    advice=_undiv(_section(r, "18776-5", "诊疗建议").get("text")),
                    referral_recommended=rec is not None,
                    referral_to=((rec or {}).get("performer") or [{}])[0]
                    .get("reference", "")
                    .removeprefix("Organization/"),
                    referral_note=" ".join(
                        n.get("text", "") for n in (rec or {}).get("note") or []
                    ),
                    author=((r.get("author") or [{}])[0]).get("display", ""),
                    issued_at=str(r.get("date", "")),
                )
            )
        elif r["resourceType"] == "DiagnosticReport":
            uid = ""
            for s in r.get("imagingStudy") or []:
                study = refs.get(s.get("reference", ""), {})
                uid = (
                    next(
                        (
                            str(i["value"]).removeprefix("urn:oid:")
                            for i in study.get("identifier") or []
                            if i.get("system") == DICOM_UID and i.get("value")
                        ),
                        "",
                    )
                    or uid
                )
            pdf = next(
                (
                    base64.b64decode(f["data"])
                    for f in r.get("presentedForm") or []
                    if f.get("contentType") == "application/pdf" and f.get("data")
                ),
                b"",
            )
            out.append(
                ConsultReport(
                    slip_no=slip_no,
                    report_id=str(r["id"]),
                    kind=row["kind"],
                    status=str(r.get("status", "")),
                    conclusion=str(r.get("conclusion", "")),
                    study_uid=uid,
                    pdf=pdf,
                    author=next(
                        (
                            str(p.get("display", ""))
                            for p in r.get("resultsInterpreter") or r.get("performer") or []
                        ),
                        "",
                    ),
                    issued_at=str(r.get("issued") or r.get("effectiveDateTime") or ""),
                )
            )
    return out


def imaging_bundle(view: dict[str, Any]) -> Resource:
    """The thread's released imaging-reading report with its study, as a Bundle the shared
    imaging reader (:func:`adapters.imaging.imaging_reports_from_bundle`) takes."""
    refs = _refs(view["resources"])
    report = [
        refs[r]
        for r in (view["consultation"].get("report_refs") or "").split()
        if r in refs and r.startswith("DiagnosticReport/")
    ]
    studies = [
        refs[s["reference"]]
        for r in report
        for s in r.get("imagingStudy") or []
        if s.get("reference") in refs
    ]
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": r} for r in [*report, *studies]],
    }
