"""Consultations (远程会诊, MDT, 远程影像诊断) as HL7 v2.5 messages, both ways.

The vendor's interface sheet for consultations (the referral messages' layout, with the
consultation kinds in their own table):

=========================  ====================================================================
REF^I12 (会诊申请,         RF1-1 ``P``, RF1-2 ``S`` urgent | ``R``, RF1-3 the kind
HIS -> adapter)            ``general|mdt|imaging-reading^<中文>^HTCONSULT`` (what tells a
                           consultation from a referral), RF1-6 the HIS's consultation number,
                           RF1-7 written at, RF1-10 ``S^Second opinion^HL70336`` (table 0336,
                           informative); PRD|RP PRD-2 the inviting doctor; PRD|RT PRD-4 the
                           requested specialties (one repetition per department code, PRD-4.1),
                           PRD-7 the centre ``<member>^HTMEMBER``; PID as for a referral; DG1-3
                           the local diagnosis; NTE by NTE-4: ``1R`` 会诊目的, ``QU`` 会诊问题
                           (required), ``RE`` 病历摘要, ``CS`` who signed the consent (required),
                           ``CD`` the consent document's number, ``SR`` ids of reports held by
                           the node to share (``;``-separated); ZDS-1 the Study Instance UID to
                           read (``<uid>^^Application^DICOM``; required for imaging reading)
REF^I13 (补充资料,          RF1-6 the consultation number, RF1-11 the consultation id (optional:
HIS -> adapter)            the number finds it), RF1-7 written at; PRD|RP PRD-2 doctor; OBX-3
                           ``11506-3^<title>^LN``, OBX-5 the text (one repetition per line)
REF^I14 (撤回,              RF1-6 a consultation number this HIS sent, NTE 1R the reason: the
HIS -> adapter)            inviter's cancel (the referral withdrawal's message; the number
                           tells them apart)
RRI^I12 (会诊状态,          RF1-1 the step ``<step>^<中文>^HTCSTEP`` (table of
adapter -> HIS)            ``bridge.consult.codes.STEPS``), RF1-3 the kind, RF1-6 the
                           consultation number, RF1-7 when, RF1-11 the consultation id; PID-3
                           the HIS's MRN; NTE 1R what is missing (returned) / why cancelled;
                           ZHZ-1 the event, ZHZ-2/-3 the meeting's start/end, ZHZ-4 the video
                           link, ZHZ-5 the experts (one repetition each, ``<name>^<specialty>``)
ORU^R01 v2.5.1 (会诊报告,   general / MDT: ORC-2 = OBR-2 the consultation number, OBR-3 the
adapter -> HIS)            report id ``^HUTONG``, OBR-4 ``11488-4^会诊报告^LN``, OBR-22 issued,
                           OBR-25 status, OBR-32 the author; OBX 1 CWE ``29548-5^Diagnosis^LN``
                           ``<code>^<name>^LOCALDX`` (the site's own code), OBX 2 TX the
                           diagnosis as written, OBX 3 TX ``18776-5^Plan of care^LN`` the
                           advice, OBX 4 CWE ``REFREC^建议转诊^HTCONSULT`` the member the
                           report recommends referral to (NTE after it: the note); imaging
                           reading: the imaging ORU (:func:`adapters.his_hl7.results.
                           imaging_oru_message`: ZDS the study UID, the PDF as OBX ED)
=========================  ====================================================================

MSH-10 of what the adapter sends is the packet id (the report: ``<packet id>-R``), so a
redelivery is the same message.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from adapters import consult_slips as cs
from adapters.his_hl7 import v2
from adapters.his_hl7.errors import Hl7DataError
from adapters.his_hl7.messages import (
    CONSULT_TABLE,
    MEMBER_TABLE,
    STEP_TABLE,
    Header,
    _dg1,
    _get,
    _lines,
    _msh,
    _need,
    _notes,
    _nte,
    _pid,
    _prd,
    _write_dtm,
    read_dtm,
    read_patient,
)
from adapters.his_hl7.results import NAMESPACE, OBR_STATUS, VERSION, ts
from adapters.hl7v2.fields import Message
from bridge.consult.codes import KINDS, STEPS

CONSULT_NOTE = "11488-4"
RECORDS_CODE = "11506-3"
#: slip field -> where it travels (for refusals naming the field)
FIELDS = {
    "slip_no": "RF1-6",
    "kind": "RF1-3",
    "to_member": "PRD-7",
    "question": "NTE-4",
    "consent_by": "NTE-4",
    "study_uid": "ZDS-1",
    "shared_results": "NTE-4",
    "specialties": "PRD-4",
    "diagnosis_code": "DG1-3",
    "written_at": "RF1-7",
    "patient_name": "PID-5",
    "gender": "PID-8",
    "birth_date": "PID-7",
    "id_number": "PID-3",
    "text": "OBX-5",
}


def _kind_ce(kind: str) -> str:
    return v2.comp(kind, v2.esc(KINDS[kind].zh), CONSULT_TABLE) if kind in KINDS else v2.esc(kind)


# -- HIS -> adapter ------------------------------------------------------------------------------


def request_message(h: Header, slip: cs.ConsultSlip, control_id: str, at: datetime) -> str:
    """REF^I12 of a consultation request (what the HIS sends)."""
    patient = {
        "name": slip.patient_name,
        "gender": slip.gender,
        "birth_date": slip.birth_date,
        "id_number": slip.id_number,
        "phone": slip.phone,
    }
    depts = v2.reps(*(v2.esc(d) for d in cs._split(slip.specialties)))
    segs = [
        _msh(h, "REF", "I12", control_id, at),
        v2.segment(
            "RF1",
            "P",
            "S" if slip.urgent else "R",
            _kind_ce(slip.kind),
            "",
            "",
            v2.esc(slip.slip_no),
            _write_dtm(slip.written_at),
            "",
            "",
            v2.comp("S", "Second opinion", "HL70336"),
        ),
        v2.segment("PRD", "RP", v2.esc(slip.doctor)),
        v2.segment(
            "PRD", "RT", "", "", depts, "", "", v2.comp(v2.esc(slip.to_member), MEMBER_TABLE)
        ),
        _pid(slip.mrn, patient, h.sending_app),
        v2.segment(
            "DG1",
            "1",
            "",
            v2.comp(v2.esc(slip.diagnosis_code), v2.esc(slip.diagnosis_name), "LOCALDX"),
            "",
            "",
            "",
            "W",
        ),
        v2.segment("PV1", "1", "O"),
    ]
    if slip.study_uid:
        segs.append(v2.segment("ZDS", v2.comp(v2.esc(slip.study_uid), "", "Application", "DICOM")))
    notes = [
        (slip.reason, "1R", "会诊目的"),
        (slip.question, "QU", "会诊问题"),
        (slip.summary, "RE", "病历摘要"),
        (slip.consent_by, "CS", "知情同意签署人"),
        (slip.consent_doc, "CD", "知情同意书编号"),
        (slip.shared_results, "SR", "共享报告"),
    ]
    segs += [
        _nte(i, text, code, label)
        for i, (text, code, label) in enumerate([n for n in notes if n[0]], start=1)
    ]
    return v2.message(segs)


def request_slip(msg: Message, known: dict[str, str], offset: timedelta) -> cs.ConsultSlip:
    """The consultation slip of a REF^I12 (refusals name the segment and field)."""
    rf1 = v2.one(msg, "RF1")
    slip_no = _need(msg, rf1, 6, what="consultation number")
    kind = _need(msg, rf1, 3, what="consultation kind")
    if kind not in KINDS:
        raise Hl7DataError(
            f"unknown consultation kind {kind!r} (one of {', '.join(KINDS)})",
            field="RF1-3",
            hl7_error="103",
        )
    priority = _get(msg, rf1, 2)
    if priority not in ("", "R", "S", "A"):
        raise Hl7DataError(f"unknown priority {priority!r} (R S A)", field="RF1-2", hl7_error="103")
    written = read_dtm(_need(msg, rf1, 7, what="written at"), "RF1-7", offset, day=True)
    rt, rp = _prd(msg, "RT"), _prd(msg, "RP")
    if rt is None:
        raise Hl7DataError(
            "no PRD segment with role RT (the consultation centre)", field="PRD-1", hl7_error="101"
        )
    centre = _need(msg, rt, 7, what="consultation centre")
    patient = {**known, **read_patient(msg, required=True)}
    for key, where in (
        ("id_number", "PID-3"),
        ("name", "PID-5"),
        ("birth_date", "PID-7"),
        ("gender", "PID-8"),
    ):
        if not patient.get(key):
            raise Hl7DataError("required value is missing", field=where, hl7_error="101")
    dg1 = _dg1(msg)
    notes = _notes(msg)
    if not notes.get("QU", "").strip():
        raise Hl7DataError(
            "no question to the experts (NTE with NTE-4 = QU)", field="NTE-4", hl7_error="101"
        )
    if not notes.get("CS", "").strip():
        raise Hl7DataError(
            "no consent recorded (NTE with NTE-4 = CS: who signed)", field="NTE-4", hl7_error="101"
        )
    zds = v2.segments(msg, "ZDS")
    specialties = [_get(msg, rt, 4, 1, r) for r in range(1, v2.count_reps(rt, 4) + 1)]
    return cs.ConsultSlip(
        slip_no=slip_no,
        kind=kind,
        to_member=centre,
        patient_name=patient["name"],
        gender=patient["gender"],
        birth_date=patient["birth_date"],
        id_number=patient.get("id_number", ""),
        phone=patient.get("phone", ""),
        mrn=patient.get("mrn", ""),
        diagnosis_code=_need(msg, dg1, 3, what="diagnosis code"),
        diagnosis_name=_get(msg, dg1, 3, 2),
        reason=notes.get("1R", ""),
        question=notes["QU"],
        summary=notes.get("RE", ""),
        specialties=";".join(s for s in specialties if s),
        urgent=priority in ("S", "A"),
        consent_by=notes["CS"],
        consent_doc=notes.get("CD", ""),
        study_uid=_get(msg, zds[0], 1) if zds else "",
        shared_results=notes.get("SR", ""),
        doctor=_get(msg, rp, 2) if rp is not None else "",
        written_at=written,
    )


def resubmit_message(
    h: Header, slip: cs.ResubmitSlip, control_id: str, at: datetime, thread: str = ""
) -> str:
    """REF^I13: the records the centre asked for."""
    return v2.message(
        [
            _msh(h, "REF", "I13", control_id, at),
            v2.segment(
                "RF1",
                "P",
                "",
                "",
                "",
                "",
                v2.esc(slip.slip_no),
                _write_dtm(slip.written_at),
                "",
                "",
                "",
                v2.comp(v2.esc(thread), NAMESPACE) if thread else "",
            ),
            v2.segment("PRD", "RP", v2.esc(slip.doctor)),
            v2.segment("PID", "1"),
            v2.segment(
                "OBX",
                "1",
                "TX",
                v2.comp(RECORDS_CODE, v2.esc(slip.title), "LN"),
                "",
                _lines(slip.text),
                "",
                "",
                "",
                "",
                "",
                "F",
            ),
        ]
    )


def resubmit_slip(msg: Message, offset: timedelta) -> cs.ResubmitSlip:
    rf1 = v2.one(msg, "RF1")
    obx = v2.segments(msg, "OBX")
    if not obx:
        raise Hl7DataError("segment OBX (the records) is missing", field="OBX", hl7_error="100")
    rp = _prd(msg, "RP")
    text = "\n".join(_get(msg, obx[0], 5, 1, r) for r in range(1, v2.count_reps(obx[0], 5) + 1))
    if not text.strip():
        raise Hl7DataError("required field is empty (the records)", field="OBX-5", hl7_error="101")
    return cs.ResubmitSlip(
        slip_no=_need(msg, rf1, 6, what="consultation number"),
        title=_get(msg, obx[0], 3, 2),
        text=text,
        doctor=_get(msg, rp, 2) if rp is not None else "",
        written_at=read_dtm(_need(msg, rf1, 7, what="written at"), "RF1-7", offset, day=True),
    )


# -- adapter -> HIS ------------------------------------------------------------------------------


def status_message(
    h: Header, st: cs.ConsultStatus, kind: str, control_id: str, at: datetime, thread: str, mrn: str
) -> str:
    """RRI^I12: one step the centre took."""
    step = STEPS.get(st.step)
    segs = [
        _msh(h, "RRI", "I12", control_id, at),
        v2.segment(
            "RF1",
            v2.comp(st.step, v2.esc(step.zh if step else ""), STEP_TABLE),
            "",
            _kind_ce(kind),
            "",
            "",
            v2.esc(st.slip_no),
            _write_dtm(st.at),
            "",
            "",
            "",
            v2.comp(v2.esc(thread), NAMESPACE),
        ),
        _pid(mrn, {}, h.receiving_app) if mrn else v2.segment("PID", "1"),
        v2.segment(
            "ZHZ",
            v2.esc(st.event),
            _write_dtm(st.start),
            _write_dtm(st.end),
            v2.esc(st.video_link),
            v2.reps(
                *(
                    v2.comp(v2.esc(n), v2.esc(s))
                    for n, s in (
                        (e.partition("(")[0], e.partition("(")[2].rstrip(")"))
                        for e in st.experts.split(";")
                        if e
                    )
                )
            ),
        ),
    ]
    if st.reason:
        segs.append(_nte(1, st.reason, "1R", "退回补充/取消原因"))
    return v2.message(segs)


def report_message(
    h: Header,
    rep: cs.ConsultReport,
    control_id: str,
    at: datetime,
    thread: str,
    mrn: str,
    authority: str,
) -> str:
    """ORU^R01 v2.5.1 of a general / MDT consultation report."""
    placer = v2.comp(v2.esc(rep.slip_no), v2.esc(h.receiving_app)) if rep.slip_no else ""
    filler = v2.comp(v2.esc(rep.report_id), NAMESPACE)
    status = OBR_STATUS.get(rep.status, "")
    segs = [
        _msh(h, "ORU", "R01", control_id, at, version=VERSION),
        v2.segment("PID", "1", "", v2.comp(v2.esc(mrn), "", "", v2.esc(authority), "MR")),
        v2.segment("PV1", "1", "N", "", "", v2.comp(v2.esc(thread), NAMESPACE)),
        v2.segment("ORC", "RE", placer, filler),
        v2.segment(
            "OBR",
            "1",
            placer,
            filler,
            v2.comp(CONSULT_NOTE, "会诊报告", "LN"),
            "",
            "",
            "",
            *[""] * 14,
            ts(rep.issued_at),
            "",
            "",
            status,
            *[""] * 6,
            f"&{v2.esc(rep.author)}" if rep.author else "",
        ),
    ]
    obx: list[tuple[str, str, str, str]] = []
    if rep.diagnosis_code:
        obx.append(
            (
                "CWE",
                v2.comp("29548-5", "Diagnosis", "LN"),
                "1",
                v2.comp(v2.esc(rep.diagnosis_code), v2.esc(rep.diagnosis_name), "LOCALDX"),
            )
        )
    if rep.diagnosis_text:
        obx.append(("TX", v2.comp("29548-5", "Diagnosis", "LN"), "2", _lines(rep.diagnosis_text)))
    if rep.advice:
        obx.append(("TX", v2.comp("18776-5", "Plan of care", "LN"), "", _lines(rep.advice)))
    for n, (vtype, code, sub, value) in enumerate(obx, 1):
        segs.append(v2.segment("OBX", str(n), vtype, code, sub, value, "", "", "", "", "", status))
    if rep.referral_recommended:
        segs.append(
            v2.segment(
                "OBX",
                str(len(obx) + 1),
                "CWE",
                v2.comp("REFREC", "建议转诊", CONSULT_TABLE),
                "",
                v2.comp(v2.esc(rep.referral_to), "", MEMBER_TABLE),
                "",
                "",
                "",
                "",
                "",
                status,
            )
        )
        if rep.referral_note:
            segs.append(v2.segment("NTE", "1", "L", _lines(rep.referral_note)))
    return v2.message(segs)


def read_status(msg: Message) -> dict[str, Any]:
    """An RRI^I12 consultation status as the HIS files it (the simulator, the tests)."""
    rf1 = v2.one(msg, "RF1")
    zhz = v2.segments(msg, "ZHZ")
    z = zhz[0] if zhz else None
    experts = []
    if z is not None:
        for r in range(1, v2.count_reps(z, 5) + 1):
            name, dept = _get(msg, z, 5, 1, r), _get(msg, z, 5, 2, r)
            if name:
                experts.append(f"{name}({dept})" if dept else name)
    notes = _notes(msg)
    pid = read_patient(msg)
    return {
        "step": _get(msg, rf1, 1),
        "kind": _get(msg, rf1, 3),
        "slip_no": _get(msg, rf1, 6),
        "at": _get(msg, rf1, 7),
        "thread": _get(msg, rf1, 11),
        "mrn": pid.get("mrn", ""),
        "event": _get(msg, z, 1) if z is not None else "",
        "start": _get(msg, z, 2) if z is not None else "",
        "end": _get(msg, z, 3) if z is not None else "",
        "video_link": _get(msg, z, 4) if z is not None else "",
        "experts": ";".join(experts),
        "reason": notes.get("1R", ""),
    }
