"""HL7 v2.5 messages <-> the neutral slips (adapters.slips), for the HIS side of the adapter.

Where each slip field travels (the HIS vendor's interface sheet):

=========================  ====================================================================
REF^I12 (new referral)     RF1-1 status P, RF1-2 priority S (green channel) | R, RF1-3 kind
                           (``up-inpatient^专科住院^HTKIND``), RF1-6 slip_no, RF1-7 written_at,
                           RF1-11 the alliance referral id (thread; only on what we send);
                           PRD|RP: PRD-2 doctor; PRD|RT: PRD-4.1 department code, PRD-7 receiving
                           member; PID-3 ``mrn^^^<HIS>^MR~<id>^^^CHN^NNCHN``, PID-5 name, PID-7
                           birth date, PID-8 M/F/O/U, PID-13 phone; DG1-3 local diagnosis; NTE-4
                           1R reason, RE summary, CS consent signed by; PV1-2 I | O
RRI^I12 (acceptance)       RF1-1 A accepted | R rejected, RF1-6 the referrer's slip_no, RF1-7
                           appointment/admission time, RF1-11 referral id; PRD|RT: PRD-2 doctor;
                           PV1-3 ``department^^bed``; NTE 1R rejection reason
REF^I12 (return, 转回单)   RF1-4 ``RP`` (return patient) marks it; RF1-3 down-discharge |
                           down-outpatient, RF1-6 the referrer's slip_no, RF1-7 written_at,
                           RF1-11 referral id; PRD|RP: PRD-2 doctor; DG1-3 diagnosis; NTE RE
                           course, PI advice; OBR + OBX lab lines (OBX-3 item, -5 value, -6
                           unit, -7 range, -8 flag); RXE drug lines (RXE-2 drug, RXE-3 amount,
                           RXE-5 unit) each followed by TQ1 (TQ1-3 frequency, TQ1-6 days^d)
REF^I14 (cancellation)     RF1-6 the referrer's slip_no (the placer id of its REF^I12), RF1-11 the
                           referral id (optional from the HIS: the slip number finds it), RF1-7
                           when withdrawn; NTE 1R the reason (else RF1-10.2/.1, table 0336);
                           PID with the MRN. Sent both ways: the referring HIS withdraws its
                           referral; the receiving HIS is told (REF^I14 is the trigger an HL7
                           referral interface that takes I12 also takes for "cancel patient
                           referral"; RRI is the answer message type, which a receiving HIS sends
                           rather than takes)
ADT^A01-A14/A28/A31        :mod:`adapters.his_hl7.adt`: Patient + Encounter (PV1-19 the visit
                           number, PV1-5 the preadmit number); a referral only through the
                           field the ``referral_id_field`` option names (e.g. PV1-50 = RF1-11
                           of the REF^I12 the HIS got: an admission then means "arrived")
=========================  ====================================================================

Multi-line text travels as repetitions of NTE-3 (one per line). Read tolerantly, as real senders
write: times at any precision (a slip date may be a date only), the HL7 null ``""`` as "no
value", several NTEs of one type joined, NTEs without NTE-4 kept as notes after the slip's text
(summary, course; the reason of a rejection or withdrawal that has no other), unknown segments
ignored; a refusal names the segment and field of missing or bad required data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from adapters.his_hl7 import v2
from adapters.his_hl7.errors import Hl7DataError, Hl7Rejected
from adapters.hl7v2 import fields
from adapters.hl7v2.charset import UTF8, Charset
from adapters.hl7v2.errors import V2Error
from adapters.hl7v2.fields import Message
from adapters.slips import AcceptanceSlip, LabResult, Prescription, ReferralSlip, ReturnSlip
from bridge.referral.codes import KINDS

KIND_TABLE = "HTKIND"
CONSULT_TABLE = "HTCONSULT"  # RF1-3 of a consultation request (adapters.his_hl7.consult)
STEP_TABLE = "HTCSTEP"  # RF1-1 of a consultation status (RRI^I12 to the HIS)
MEMBER_TABLE = "HTMEMBER"
GENDER_TO_V2 = {"male": "M", "female": "F", "other": "O", "unknown": "U"}
GENDER_FROM_V2 = {v: k for k, v in GENDER_TO_V2.items()}
RETURN_DISPOSITION = "RP"
#: ADT events taken (adapters.his_hl7.adt): visits, and person updates (A28/A31). Merges, swaps
#: and moves of records (A17 A18 A34 A40 A45 ...) are refused (AR, MSH-9): they need a person.
ADT_EVENTS = (
    "A01",
    "A02",
    "A03",
    "A04",
    "A05",
    "A06",
    "A07",
    "A08",
    "A11",
    "A12",
    "A13",
    "A14",
    "A28",
    "A31",
)
NUMERIC = re.compile(r"^[+-]?\d+(\.\d+)?$")
DOSE = re.compile(r"^(\d+(?:\.\d+)?) (\S.*)$")


@dataclass
class Header:
    sending_app: str
    sending_facility: str
    receiving_app: str
    receiving_facility: str
    charset: str  # MSH-18 as written


@dataclass
class Inbound:
    """One parsed message from the HIS: what it is and what it carries."""

    msg: Message
    control_id: str  # MSH-10
    facility: str  # MSH-4
    mtype: str  # REF | RRI | ADT
    event: str  # I12 | A01 ...
    what: str  # referral | return | acceptance | cancel | adt
    thread: str = ""  # RF1-11
    slip_no: str = ""  # RF1-6
    patient: dict[str, str] = field(default_factory=dict)
    application: str = ""  # MSH-3


# -- building -----------------------------------------------------------------------------------


def _msh(
    h: Header, mtype: str, event: str, control_id: str, at: datetime, version: str = "2.5"
) -> str:
    fields = [
        v2.esc(h.sending_app),
        v2.esc(h.sending_facility),
        v2.esc(h.receiving_app),
        v2.esc(h.receiving_facility),
        v2.ts(at),
        "",
        v2.comp(mtype, event, f"{mtype}_{event}"),
        v2.esc(control_id),
        "P",
        version,
        "",
        "",
        "AL",
        "NE",
        "CHN",
        v2.esc(h.charset),
    ]
    return "MSH|" + v2.ENCODING_CHARS + "|" + "|".join(fields)


def _lines(text: str) -> str:
    return v2.reps(*(v2.esc(line) for line in text.split("\n")))


def _nte(n: int, text: str, code: str, label: str) -> str:
    return v2.segment("NTE", str(n), "L", _lines(text), v2.comp(code, v2.esc(label)))


def _pid(mrn: str, patient: dict[str, str], his: str) -> str:
    ids = [v2.comp(v2.esc(mrn), "", "", v2.esc(his), "MR")] if mrn else []
    if patient.get("id_number"):
        ids.append(v2.comp(v2.esc(patient["id_number"]), "", "", "CHN", "NNCHN"))
    gender = GENDER_TO_V2.get(patient.get("gender", ""), "")
    return v2.segment(
        "PID",
        "1",
        "",
        v2.reps(*ids),
        "",
        v2.esc(patient.get("name", "")),
        "",
        v2.write_date(patient.get("birth_date", "")),
        gender,
        "",
        "",
        "",
        "",
        v2.comp(v2.esc(patient.get("phone", "")), "PRN", "PH") if patient.get("phone") else "",
    )


def _rf1(
    status: str,
    slip_no: str,
    *,
    priority: str = "",
    kind: str = "",
    disposition: str = "",
    at: str = "",
    thread: str = "",
) -> str:
    kind_ce = v2.comp(kind, v2.esc(KINDS[kind].zh), KIND_TABLE) if kind in KINDS else v2.esc(kind)
    disp = v2.comp(disposition, "Return patient after evaluation", "HL70282") if disposition else ""
    return v2.segment(
        "RF1",
        status,
        priority,
        kind_ce,
        disp,
        "",
        v2.esc(slip_no),
        _write_dtm(at),
        "",
        "",
        "",
        v2.comp(v2.esc(thread), "HUTONG") if thread else "",
    )


def _write_dtm(iso: str) -> str:
    """A slip's time as HL7 DTM; a date-only slip time stays a date (no invented midnight)."""
    return iso.replace("-", "") if len(iso) == 10 else v2.write_ts(iso)


def referral_message(
    h: Header,
    slip: ReferralSlip,
    control_id: str,
    at: datetime,
    thread: str = "",
    mrn_authority: str = "",
) -> str:
    """REF^I12 for a new referral (HIS -> adapter, or adapter -> receiving HIS)."""
    patient = {
        "name": slip.patient_name,
        "gender": slip.gender,
        "birth_date": slip.birth_date,
        "id_number": slip.id_number,
        "phone": slip.phone,
    }
    segs = [
        _msh(h, "REF", "I12", control_id, at),
        _rf1(
            "P",
            slip.slip_no,
            priority="S" if slip.urgent else "R",
            kind=slip.kind,
            at=slip.written_at,
            thread=thread,
        ),
        v2.segment("PRD", "RP", v2.esc(slip.doctor)),
        v2.segment(
            "PRD",
            "RT",
            "",
            "",
            v2.esc(slip.department_code),
            "",
            "",
            v2.comp(v2.esc(slip.to_member), MEMBER_TABLE),
        ),
        _pid(slip.mrn, patient, mrn_authority or h.sending_app),
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
        v2.segment("PV1", "1", "I" if slip.kind == "up-inpatient" else "O"),
    ]
    notes = [
        (slip.reason, "1R", "转诊原因"),
        (slip.summary, "RE", "病历摘要"),
        (slip.consent_by, "CS", "知情同意签署人"),
    ]
    segs += [
        _nte(i, text, code, label)
        for i, (text, code, label) in enumerate([n for n in notes if n[0]], start=1)
    ]
    return v2.message(segs)


def acceptance_message(
    h: Header,
    slip: AcceptanceSlip,
    control_id: str,
    at: datetime,
    thread: str = "",
    mrn: str = "",
    inpatient: bool = False,
) -> str:
    """RRI^I12 carrying the receiver's answer."""
    segs = [
        _msh(h, "RRI", "I12", control_id, at),
        _rf1("A" if slip.accepted else "R", slip.slip_no, at=slip.appointment_at, thread=thread),
        v2.segment("PRD", "RT", v2.esc(slip.doctor)),
        _pid(mrn, {}, h.sending_app) if mrn else v2.segment("PID", "1"),
        v2.segment(
            "PV1",
            "1",
            "I" if inpatient else "O",
            v2.comp(v2.esc(slip.department_code), "", v2.esc(slip.bed_no)),
        ),
    ]
    if slip.reason:
        segs.append(_nte(1, slip.reason, "1R", "拒收原因"))
    return v2.message(segs)


def return_message(
    h: Header, slip: ReturnSlip, control_id: str, at: datetime, thread: str = "", mrn: str = ""
) -> str:
    """REF^I12 with RF1-4 = RP: the return slip, its lab lines and drug lines."""
    kind = "down-discharge" if slip.discharge else "down-outpatient"
    segs = [
        _msh(h, "REF", "I12", control_id, at),
        _rf1(
            "A",
            slip.slip_no,
            priority="R",
            kind=kind,
            disposition=RETURN_DISPOSITION,
            at=slip.written_at,
            thread=thread,
        ),
        v2.segment("PRD", "RP", v2.esc(slip.doctor)),
        _pid(mrn, {}, h.sending_app) if mrn else v2.segment("PID", "1"),
        v2.segment(
            "DG1",
            "1",
            "",
            v2.comp(v2.esc(slip.diagnosis_code), v2.esc(slip.diagnosis_name), "LOCALDX"),
            "",
            "",
            "",
            "F",
        ),
    ]
    if slip.results:
        segs.append(v2.segment("OBR", "1", "", "", v2.comp("RETURN", v2.esc("转回检验结果"))))
        for i, r in enumerate(slip.results, start=1):
            segs.append(
                v2.segment(
                    "OBX",
                    str(i),
                    "NM" if NUMERIC.match(r.value) else "ST",
                    v2.comp(v2.esc(r.item_code), v2.esc(r.item_name), "LOCALLAB"),
                    "",
                    v2.esc(r.value),
                    v2.esc(r.unit),
                    v2.esc(r.reference_range),
                    v2.esc(r.flag),
                    "",
                    "",
                    "F",
                )
            )
    for p in slip.prescriptions:
        m = DOSE.match(p.dose)
        amount, unit = (m[1], v2.esc(m[2])) if m else ("", v2.comp("", v2.esc(p.dose)))
        segs.append(
            v2.segment(
                "RXE",
                "",
                v2.comp(v2.esc(p.drug_code), v2.esc(p.drug_name), "LOCALDRUG"),
                amount,
                "",
                unit,
            )
        )
        segs.append(
            v2.segment("TQ1", "1", "", v2.esc(p.frequency), "", "", v2.comp(str(p.days), "d"))
        )
    segs.append(v2.segment("PV1", "1", "I" if slip.discharge else "O"))
    notes = [(slip.course, "RE", "诊疗经过"), (slip.advice, "PI", "康复指导")]
    segs += [
        _nte(i, text, code, label)
        for i, (text, code, label) in enumerate([n for n in notes if n[0]], start=1)
    ]
    return v2.message(segs)


@dataclass
class CancelNote:
    """A withdrawn referral (REF^I14): which slip, why, when (ISO, may be empty)."""

    slip_no: str
    reason: str
    cancelled_at: str = ""
    thread: str = ""


def cancel_message(
    h: Header,
    note: CancelNote,
    control_id: str,
    at: datetime,
    mrn: str = "",
    mrn_authority: str = "",
) -> str:
    """REF^I14: cancel patient referral (the referring HIS -> adapter, adapter -> the
    receiving HIS)."""
    segs = [
        _msh(h, "REF", "I14", control_id, at),
        _rf1("", note.slip_no, at=note.cancelled_at, thread=note.thread),
        _pid(mrn, {}, mrn_authority or h.sending_app) if mrn else v2.segment("PID", "1"),
        _nte(1, note.reason, "1R", "撤销原因"),
    ]
    return v2.message(segs)


# -- reading ------------------------------------------------------------------------------------


def _get(msg: Message, seg: Any, field: int, component: int = 1, rep: int = 1, sub: int = 1) -> str:
    """One leaf, unescaped; the HL7 null ``""`` (the sender says "no value") reads as empty."""
    value = v2.get(msg, seg, field, component, rep, sub)
    return "" if not value or value == '""' else str(value)


def _need(
    msg: Message, seg: Any, field: int, component: int = 1, rep: int = 1, what: str = ""
) -> str:
    value = _get(msg, seg, field, component, rep)
    if not value.strip():
        where = f"{seg[0]}-{field}" + (f".{component}" if component > 1 else "")
        raise Hl7DataError(
            f"required field is empty{f' ({what})' if what else ''}", field=where, hl7_error="101"
        )
    return value


def read_dtm(value: str, where: str, offset: timedelta, *, day: bool = False) -> str:
    """HL7 DTM/TS at any precision -> FHIR dateTime at the same precision (the kit's reader):
    ``2022``, ``2022-01``, ``2022-01-25`` (a date has no zone), or a time with seconds and an
    offset (the site's when none is given); "" for empty or the null. ``day``: at least a day
    is needed (a slip's date)."""
    try:
        t = fields.dtm(value, where)
    except V2Error as exc:
        raise v2.from_kit(exc) from None
    if t is None:
        return ""
    if day and t.day is None:
        raise Hl7DataError("a date needs at least the day (YYYYMMDD)", field=where, hl7_error="102")
    return t.fhir(offset)


def read(text: str, charset: Charset = UTF8) -> Inbound:
    """Parse and classify; the slip itself is read by the ``*_slip`` functions below."""
    msg = v2.parse(text, charset)
    head = msg.segment("MSH")
    control = _get(msg, head, 10).strip()
    if not control:
        raise Hl7Rejected("MSH-10 (message control id) is empty", field="MSH-10", hl7_error="101")
    mtype, event = _get(msg, head, 9, 1), _get(msg, head, 9, 2)
    inbound = Inbound(
        msg, control, _get(msg, head, 4), mtype, event, "", application=_get(msg, head, 3)
    )
    if (mtype, event) == ("REF", "I12"):
        rf1 = v2.one(msg, "RF1")
        inbound.what = "return" if _get(msg, rf1, 4) == RETURN_DISPOSITION else "referral"
        if _get(msg, rf1, 3, 3) == CONSULT_TABLE:  # adapters.his_hl7.consult
            inbound.what = "consult"
    elif (mtype, event) == ("REF", "I13"):
        inbound.what = "consult_resubmit"
    elif (mtype, event) == ("RRI", "I12"):
        rf1 = v2.one(msg, "RF1")
        inbound.what = "consult_status" if _get(msg, rf1, 1, 3) == STEP_TABLE else "acceptance"
    elif (mtype, event) == ("REF", "I14"):
        inbound.what = "cancel"
    elif mtype == "ADT" and event in ADT_EVENTS:
        inbound.what = "adt"
    else:
        raise Hl7Rejected(
            f"message type {mtype}^{event} is not taken here (REF^I12, REF^I13, "
            f"REF^I14, RRI^I12, ADT^{'/'.join(ADT_EVENTS)})",
            field="MSH-9",
            hl7_error="200",
        )
    rf1s = v2.segments(msg, "RF1")
    if rf1s:
        rf1 = v2.one(msg, "RF1")
        inbound.slip_no = _get(msg, rf1, 6)
        inbound.thread = _get(msg, rf1, 11)
    return inbound


def national_id(msg: Message) -> str | None:
    """The first PID's national ID (PID-3 typed NN*) as :func:`read_patient` reads it, without
    checking anything else of the message (for a refused message's quarantine hash)."""
    pids = v2.segments(msg, "PID")
    if not pids:
        return None
    pid = pids[0]
    for r in range(1, v2.count_reps(pid, 3) + 1):
        value, kind = _get(msg, pid, 3, 1, r).strip(), _get(msg, pid, 3, 5, r)
        if value and kind.startswith("NN"):
            return value
    return None


def read_patient(msg: Message, required: bool = False) -> dict[str, str]:
    """PID as a dict (only fields present); identifiers by type code in PID-3.5."""
    pid = v2.one(msg, "PID", required=required)
    if pid is None:
        return {}
    out: dict[str, str] = {}
    for r in range(1, v2.count_reps(pid, 3) + 1):
        value, kind = _get(msg, pid, 3, 1, r), _get(msg, pid, 3, 5, r)
        key = "mrn" if kind == "MR" else "id_number" if kind.startswith("NN") else None
        if key and value:
            if key in out and out[key] != value:
                raise Hl7DataError(
                    f"PID-3 holds two different {kind} identifiers", field="PID-3", hl7_error="205"
                )
            out[key] = value
    family, given = _get(msg, pid, 5, 1), _get(msg, pid, 5, 2)
    name = family + ("" if not given else given if not (family + given).isascii() else f" {given}")
    if name.strip():
        out["name"] = name
    birth = _get(msg, pid, 7)
    if birth:
        out["birth_date"] = v2.read_date(birth, "PID-7")
    sex = _get(msg, pid, 8)
    if sex:
        if sex not in GENDER_FROM_V2:
            raise Hl7DataError(
                f"unknown administrative sex code {sex!r} (table 0001: M F O U)",
                field="PID-8",
                hl7_error="103",
            )
        out["gender"] = GENDER_FROM_V2[sex]
    phone = _get(msg, pid, 13, 1) or _get(msg, pid, 13, 12)
    if phone:
        out["phone"] = phone
    return out


def _notes(msg: Message) -> dict[str, str]:
    """NTE text by comment type (NTE-4.1); several NTEs of one type are joined line by line.
    NTEs without a type (real senders often leave NTE-4 empty, or put only a label in NTE-4.2)
    are kept under ``""``, each prefixed with its label when it has one."""
    out: dict[str, list[str]] = {}
    for nte in v2.segments(msg, "NTE"):
        code = _get(msg, nte, 4, 1)
        lines = [_get(msg, nte, 3, 1, r) for r in range(1, v2.count_reps(nte, 3) + 1)]
        text = "\n".join(lines).strip("\n")
        if not text.strip():
            continue
        label = _get(msg, nte, 4, 2) if not code else ""
        out.setdefault(code, []).append(f"{label}: {text}" if label else text)
    return {k: "\n".join(v) for k, v in out.items()}


def _with_notes(text: str, notes: dict[str, str]) -> str:
    """A slip text with the untyped notes kept after it."""
    extra = notes.get("", "")
    return "\n".join(t for t in (text, extra) if t)


def _dg1(msg: Message) -> Any:
    """The slip's diagnosis: DG1 repeats in REF/RRI (a sender lists every diagnosis), so the
    primary one (DG1-15 priority 1) is taken, else the first; missing DG1 is refused."""
    found = v2.segments(msg, "DG1")
    if not found:
        raise Hl7DataError("segment DG1 is missing", field="DG1", hl7_error="100")
    return next((d for d in found if _get(msg, d, 15).strip() == "1"), found[0])


def _prd(msg: Message, role: str) -> Any | None:
    found = [s for s in v2.segments(msg, "PRD") if _get(msg, s, 1) == role]
    if len(found) > 1:
        raise Hl7DataError(f"two PRD segments with role {role}", field="PRD-1", hl7_error="205")
    return found[0] if found else None


def _kind(msg: Message, rf1: Any) -> str:
    kind = _need(msg, rf1, 3, what="referral kind")
    if kind not in KINDS:
        raise Hl7DataError(
            f"unknown referral kind {kind!r} (one of {', '.join(KINDS)})",
            field="RF1-3",
            hl7_error="103",
        )
    return kind


def referral_slip(
    msg: Message, known: dict[str, str], offset: timedelta, *, from_alliance: bool = False
) -> ReferralSlip:
    """A new referral from the HIS; ``known`` fills PID fields the message leaves empty (the
    patient as the HIS's ADT feed last described them). ``from_alliance``: read a referral the
    adapter sent to a receiving HIS (no national ID number: it never crosses the gateway)."""
    rf1 = v2.one(msg, "RF1")
    slip_no = _need(msg, rf1, 6, what="referral slip number")
    kind = _kind(msg, rf1)
    priority = _get(msg, rf1, 2)
    if priority not in ("", "R", "S", "A"):
        raise Hl7DataError(
            f"unknown referral priority {priority!r} (R S A)", field="RF1-2", hl7_error="103"
        )
    written = read_dtm(_need(msg, rf1, 7, what="written at"), "RF1-7", offset, day=True)
    rt, rp = _prd(msg, "RT"), _prd(msg, "RP")
    if rt is None:
        raise Hl7DataError(
            "no PRD segment with role RT (referred-to member)", field="PRD-1", hl7_error="101"
        )
    to_member = _need(msg, rt, 7, what="receiving member")
    patient = {**known, **read_patient(msg, required=True)}
    for key, where in (
        ("mrn", "PID-3"),
        ("id_number", "PID-3"),
        ("name", "PID-5"),
        ("birth_date", "PID-7"),
        ("gender", "PID-8"),
    ):
        if not patient.get(key) and not (from_alliance and key in ("id_number", "mrn")):
            what = (
                "MR identifier"
                if key == "mrn"
                else "NNCHN identifier (national ID)"
                if key == "id_number"
                else "value"
            )
            raise Hl7DataError(f"required {what} is missing", field=where, hl7_error="101")
    dg1 = _dg1(msg)
    notes = _notes(msg)
    if not notes.get("CS", "").strip():
        raise Hl7DataError(
            "no consent recorded (NTE with NTE-4 = CS: who signed)", field="NTE-4", hl7_error="101"
        )
    return ReferralSlip(
        slip_no=slip_no,
        kind=kind,
        to_member=to_member,
        patient_name=patient["name"],
        gender=patient["gender"],
        birth_date=patient["birth_date"],
        id_number=patient.get("id_number", ""),
        phone=patient.get("phone", ""),
        mrn=patient.get("mrn", ""),
        diagnosis_code=_need(msg, dg1, 3, what="diagnosis code"),
        diagnosis_name=_get(msg, dg1, 3, 2),
        reason=notes.get("1R", ""),
        summary=_with_notes(notes.get("RE", ""), notes),
        department_code=_get(msg, rt, 4, 1) if rt else "",
        urgent=priority in ("S", "A"),
        consent_by=notes["CS"],
        doctor=_get(msg, rp, 2) if rp is not None else "",
        written_at=written,
    )


def acceptance_slip(msg: Message, offset: timedelta) -> AcceptanceSlip:
    rf1 = v2.one(msg, "RF1")
    status = _need(msg, rf1, 1, what="referral status")
    if status not in ("A", "R"):
        raise Hl7DataError(
            f"unknown referral status {status!r} (A accepted, R rejected)",
            field="RF1-1",
            hl7_error="103",
        )
    at = _get(msg, rf1, 7)
    rt = _prd(msg, "RT")
    pv1 = v2.one(msg, "PV1", required=False)
    notes = _notes(msg)
    if status == "R" and not notes.get("1R", "").strip() and notes.get(""):
        notes["1R"] = notes.pop("")  # a rejection's only note is its reason
    if status == "R" and not notes.get("1R", "").strip():
        raise Hl7DataError(
            "a rejection needs its reason (NTE-4 = 1R)", field="NTE-4", hl7_error="101"
        )
    return AcceptanceSlip(
        slip_no=_need(msg, rf1, 6, what="referrer's slip number"),
        accepted=status == "A",
        reason=notes.get("1R", ""),
        appointment_at=read_dtm(at, "RF1-7", offset, day=True) if at else "",
        department_code=_get(msg, pv1, 3, 1) if pv1 is not None else "",
        bed_no=_get(msg, pv1, 3, 3) if pv1 is not None else "",
        doctor=_get(msg, rt, 2) if rt is not None else "",
    )


def cancel_note(msg: Message, offset: timedelta) -> CancelNote:
    """REF^I14: the slip number is required, and so is a reason (NTE 1R, else RF1-10)."""
    rf1 = v2.one(msg, "RF1")
    slip_no = _need(msg, rf1, 6, what="referrer's slip number")
    notes = _notes(msg)
    reason = (
        notes.get("1R", "").strip()
        or _get(msg, rf1, 10, 2).strip()
        or _get(msg, rf1, 10, 1).strip()
        or notes.get("", "").strip()
    )
    if not reason:
        raise Hl7DataError(
            "a cancellation needs its reason (NTE-4 = 1R, or RF1-10)",
            field="NTE-3",
            hl7_error="101",
        )
    at = _get(msg, rf1, 7)
    return CancelNote(
        slip_no=slip_no,
        reason=reason,
        cancelled_at=read_dtm(at, "RF1-7", offset, day=True) if at else "",
        thread=_get(msg, rf1, 11),
    )


def return_slip(msg: Message, offset: timedelta) -> ReturnSlip:
    rf1 = v2.one(msg, "RF1")
    kind = _kind(msg, rf1)
    if kind not in ("down-discharge", "down-outpatient"):
        raise Hl7DataError(
            f"a return slip is down-discharge or down-outpatient, not {kind!r}",
            field="RF1-3",
            hl7_error="103",
        )
    rp = _prd(msg, "RP")
    dg1 = _dg1(msg)
    notes = _notes(msg)
    results = []
    for obx in v2.segments(msg, "OBX"):
        results.append(
            LabResult(
                item_code=_need(msg, obx, 3, what="lab item code"),
                item_name=_get(msg, obx, 3, 2),
                value=_get(msg, obx, 5),
                unit=_get(msg, obx, 6, 1),
                flag=_get(msg, obx, 8),
                reference_range=_get(msg, obx, 7),
            )
        )
    prescriptions: list[Prescription] = []
    pending: Any = None
    for seg in list(msg) + [None]:
        name = str(seg[0]) if seg is not None else ""
        if name == "TQ1" and pending is not None:
            days = _get(msg, seg, 6, 1)
            if days and not days.isdigit():
                raise Hl7DataError(
                    "duration is not a whole number of days", field="TQ1-6", hl7_error="102"
                )
            pending.frequency, pending.days = _get(msg, seg, 3, 1), int(days or 0)
        elif name == "RXE" or seg is None:
            if pending is not None:
                prescriptions.append(pending)
                pending = None
            if seg is not None:
                amount, unit = _get(msg, seg, 3), _get(msg, seg, 5, 1)
                dose = f"{amount} {unit}" if amount else _get(msg, seg, 5, 2)
                pending = Prescription(
                    drug_code=_need(msg, seg, 2, what="drug code"),
                    drug_name=_get(msg, seg, 2, 2),
                    dose=dose,
                    frequency="",
                    days=0,
                )
    return ReturnSlip(
        slip_no=_need(msg, rf1, 6, what="referrer's slip number"),
        discharge=kind == "down-discharge",
        diagnosis_code=_need(msg, dg1, 3, what="diagnosis code"),
        diagnosis_name=_get(msg, dg1, 3, 2),
        course=_with_notes(notes.get("RE", ""), notes),
        advice=notes.get("PI", ""),
        doctor=_get(msg, rp, 2) if rp is not None else "",
        written_at=read_dtm(_need(msg, rf1, 7, what="written at"), "RF1-7", offset, day=True),
        prescriptions=prescriptions,
        results=results,
    )
