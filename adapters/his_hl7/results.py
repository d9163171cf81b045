"""Results from another member as one ORU^R01 v2.5.1 for the HIS: lab results (``result.lab``)
and imaging reports (``result.imaging``, 检查报告).

The results inbox (:mod:`bridge.results.inbox`) has already stored the Bundle in the node's FHIR
store; this module writes the same Bundle as the HIS vendor's interface sheet has it:

==========  =====================================================================================
MSH         MSH-9 ``ORU^R01^ORU_R01``, MSH-10 the packet id (a resend is the same message),
            MSH-12 ``2.5.1``, MSH-18 the channel's charset
PID         PID-3 the patient's id in this HIS (``mrn^^^<HIS application>^MR``; on the
            receiving side before any ADT names the referral: the referrer's id under the
            referrer's member id, as in the REF^I12); nothing else: the HIS knows its patient,
            and no ID number crosses the gateway
PV1         PV1-2 ``N``, PV1-5 the alliance referral id (as in ADT and RF1-11)
ORC + OBR   per DiagnosticReport: ORC-1 ``RE``; ORC-2 = OBR-2 placer order number = the referral
            slip number (RF1-6 as this HIS knows it); ORC-3 = OBR-3 filler order number = the
            report id (stable at the producing lab across corrections) ``^HUTONG``; OBR-4 the
            panel in this HIS's lab catalogue; OBR-7 collection time; OBR-20 the lab's own
            report number; OBR-22 issued; OBR-25 status (table 0123: F, P, C ...)
NTE         after OBR: the report's conclusion; after an OBX: the result's notes (one NTE-3
            repetition per line)
OBX         per Observation: OBX-2 NM | SN (comparator, ratio, range) | ST/TX | CE | TS | TM;
            OBX-3 the item in this HIS's catalogue ``code^name^LOCALLAB^<LOINC>^^LN``; where it
            has none, the sender's code with its coding system (``LN`` for LOINC, else the
            system URI) and the gap is counted; OBX-5 value; OBX-6 printed unit
            (``^^^<UCUM>^^UCUM`` when that differs); OBX-7 reference range; OBX-8 abnormal flags;
            OBX-11 status (table 0085: F, P, C ...; a corrected result is ``C``); OBX-14 time;
            OBX-21 the result id (stable across corrections) ``^HUTONG``; OBX-23 the lab
SPM         per report with a Specimen: SPM-2 specimen number, SPM-4 type (table 0487),
            SPM-17 collected, SPM-18 received
==========  =====================================================================================

An imaging report (:func:`imaging_oru_message`, one ORU per packet, the same MSH/PID/PV1 and
ORC) is written as a RIS sends it to a HIS (IHE RAD style, the layout the PACS adapter's own RIS
reader :func:`adapters.pacs.report.parse_oru` takes back):

==========  =====================================================================================
OBR         per DiagnosticReport: OBR-2/3 as above (OBR-3 the report id, stable across
            corrections); OBR-4 the exam in this HIS's exam catalogue ``code^name^LOCALEXAM``
            (where it has none: the sender's code with its system, ``LN`` for LOINC, and the gap
            is counted); OBR-7 the exam time (the study's start); OBR-18 the producer's
            accession number; OBR-22 issued; OBR-24 the study's image modalities (``CT``,
            ``MR/CT``); OBR-25 status (table 0123: F, P, C ...); OBR-32 the reporting doctor
            (``&<name>``)
ZDS         ZDS-1 the Study Instance UID ``<uid>^HUTONG^Application^DICOM`` (IHE RAD)
OBX         ``TX 59776-5^Findings^LN`` the report's full text, ``TX 19005-8^Impression^LN`` the
            conclusion (one OBX-5 repetition per line); ``ST 123014^Target Region^DCM`` the body
            site; ``ED 18748-4^<PDF title>^LN`` the PDF rendering when the report has one
            (OBX-5 ``^AP^PDF^Base64^<data>``, the exact bytes); OBX-11 the report's status
==========  =====================================================================================
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from adapters.his_hl7 import v2
from adapters.his_hl7.messages import Header, _lines, _msh
from adapters.slips_fhir import Codes

Resource = dict[str, Any]

VERSION = "2.5.1"
LOCAL_LAB = "LOCALLAB"  # this HIS's own lab catalogue (as in the return slip's OBX-3)
LOCAL_EXAM = "LOCALEXAM"  # this HIS's own exam catalogue (OBR-4 of an imaging report)
NAMESPACE = "HUTONG"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
#: FHIR system URI -> HL7 table 0396 mnemonic (anything else travels as its URI)
SYSTEM_NAMES = {
    LOINC: "LN",
    "http://snomed.info/sct": "SCT",
    UCUM: "UCUM",
    "http://hl7.org/fhir/sid/icd-10": "I10",
    "http://terminology.hl7.org/CodeSystem/v2-0078": "HL70078",
    "http://terminology.hl7.org/CodeSystem/v2-0487": "HL70487",
    "http://terminology.hl7.org/CodeSystem/v2-0136": "HL70136",
}
#: Observation.status -> OBX-11 (table 0085)
OBX_STATUS = {
    "final": "F",
    "preliminary": "P",
    "corrected": "C",
    "amended": "C",
    "cancelled": "X",
    "entered-in-error": "W",
    "registered": "I",
    "unknown": "U",
}
#: DiagnosticReport.status -> OBR-25 (table 0123)
OBR_STATUS = {
    "final": "F",
    "preliminary": "P",
    "corrected": "C",
    "amended": "C",
    "appended": "C",
    "partial": "A",
    "registered": "I",
    "cancelled": "X",
    "entered-in-error": "X",
    "unknown": "I",
}


@dataclass
class Addressee:
    """Who the ORU is about, as this HIS knows it."""

    mrn: str
    authority: str
    slip_no: str
    thread: str


def system_name(uri: str) -> str:
    return SYSTEM_NAMES.get(uri, uri)


def number(value: Any) -> str:
    """A FHIR decimal as printed (no exponent)."""
    if value is None:
        return ""
    text = str(value)
    if "e" in text.lower():
        text = format(Decimal(text), "f")
    return text


def ts(iso: str | None) -> str:
    """FHIR date/dateTime/instant -> HL7 DTM, keeping the precision and the offset."""
    if not iso:
        return ""
    if "T" not in iso:
        return iso.replace("-", "")
    return v2.ts(datetime.fromisoformat(iso))


def item_code(codes: Codes, cc: Resource | None, category: str = "lab") -> str:
    """OBX-3 / OBR-4: this HIS's code (LOINC as the alternate), else the sender's code with its
    system. :meth:`Codes.local` records a gap for anything not in this site's map
    (``category``: the site's ``lab`` or ``exam`` map)."""
    if not cc:
        return ""
    code, text = codes.local(category, cc)
    codings = [c for c in cc.get("coding") or [] if c.get("code")]
    found = next((c for c in codings if str(c["code"]) == code), None)
    mine = codes.source_system(category)
    local = LOCAL_EXAM if category == "exam" else LOCAL_LAB
    system = (
        local
        if found is None or found.get("system") == mine
        else system_name(str(found.get("system", "")))
    )
    loinc = next((c for c in codings if c.get("system") == LOINC), None)
    alt: tuple[str, ...] = ()
    if loinc is not None and loinc is not found:
        alt = (v2.esc(str(loinc["code"])), v2.esc(str(loinc.get("display", ""))), "LN")
    return v2.comp(v2.esc(code), v2.esc(text), v2.esc(system), *alt)


def _coded(cc: Resource) -> str:
    """A coded value (OBX-5 of type CE): first coding, its display or the concept's text."""
    c = next((c for c in cc.get("coding") or [] if c.get("code")), None)
    text = str(cc.get("text") or (c or {}).get("display") or "")
    if c is None:
        return v2.comp("", v2.esc(text))
    return v2.comp(
        v2.esc(str(c["code"])),
        v2.esc(str(c.get("display") or text)),
        v2.esc(system_name(str(c.get("system", "")))),
    )


def _unit(q: Resource) -> str:
    printed = str(q.get("unit") or q.get("code") or "")
    ucum = str(q.get("code") or "") if q.get("system") == UCUM else ""
    if ucum and ucum != printed:
        return v2.comp(v2.esc(printed), "", "", v2.esc(ucum), "", "UCUM")
    return v2.esc(printed)


def value_fields(obs: Resource) -> tuple[str, str, str]:
    """(OBX-2 value type, OBX-5, OBX-6), escaped."""
    if "valueQuantity" in obs:
        q = obs["valueQuantity"]
        if q.get("comparator"):
            return "SN", v2.comp(v2.esc(q["comparator"]), number(q.get("value"))), _unit(q)
        return "NM", number(q.get("value")), _unit(q)
    if "valueRatio" in obs:
        r = obs["valueRatio"]
        num, den = r.get("numerator") or {}, r.get("denominator") or {}
        return (
            "SN",
            v2.comp("", number(num.get("value")), ":", number(den.get("value"))),
            _unit(num),
        )
    if "valueRange" in obs:
        low, high = obs["valueRange"].get("low") or {}, obs["valueRange"].get("high") or {}
        return (
            "SN",
            v2.comp("", number(low.get("value")), "-", number(high.get("value"))),
            _unit(low or high),
        )
    if "valueString" in obs:
        text = str(obs["valueString"])
        return "TX" if "\n" in text else "ST", _lines(text), ""
    if "valueCodeableConcept" in obs:
        return "CE", _coded(obs["valueCodeableConcept"]), ""
    if "valueDateTime" in obs:
        return "DTM", ts(obs["valueDateTime"]), ""
    if "valueTime" in obs:
        return "TM", str(obs["valueTime"]).replace(":", ""), ""
    if "valueInteger" in obs:
        return "NM", str(obs["valueInteger"]), ""
    if "valueBoolean" in obs:
        return "ST", "true" if obs["valueBoolean"] else "false", ""
    return "", "", ""


def reference_range(obs: Resource) -> str:
    rr = (obs.get("referenceRange") or [{}])[0]
    if rr.get("text"):
        return v2.esc(str(rr["text"]))
    low, high = (
        number((rr.get("low") or {}).get("value")),
        number((rr.get("high") or {}).get("value")),
    )
    return v2.esc(
        f"{low}-{high}" if low and high else f"<{high}" if high else f">{low}" if low else ""
    )


def _flags(obs: Resource) -> str:
    return v2.reps(
        *(
            v2.esc(str(c["code"]))
            for i in obs.get("interpretation") or []
            for c in (i.get("coding") or [])[:1]
            if c.get("code")
        )
    )


def _performer(r: Resource, by_ref: dict[str, Resource]) -> str:
    return next(
        (
            str(by_ref.get(p.get("reference", ""), {}).get("name") or p.get("display") or "")
            for p in r.get("performer") or []
        ),
        "",
    )


def _notes(texts: list[str]) -> list[str]:
    return [v2.segment("NTE", str(i), "L", _lines(t)) for i, t in enumerate(texts, 1) if t]


def _lab_number(dr: Resource) -> str:
    for i in dr.get("identifier") or []:
        kinds = [c.get("code") for c in (i.get("type") or {}).get("coding") or []]
        if "FILL" in kinds:
            return str(i.get("value", ""))
    return ""


def oru_message(
    h: Header, bundle: Resource, to: Addressee, codes: Codes, control_id: str, at: datetime
) -> str | None:
    """The ORU^R01 for a ``result.lab`` Bundle, or None when it holds no DiagnosticReport."""
    resources = [e.get("resource") or {} for e in bundle.get("entry") or []]
    by_ref = {f"{r.get('resourceType')}/{r.get('id')}": r for r in resources if r.get("id")}
    reports = [r for r in resources if r.get("resourceType") == "DiagnosticReport"]
    if not reports:
        return None
    placer = v2.comp(v2.esc(to.slip_no), v2.esc(h.receiving_app)) if to.slip_no else ""
    segs = [
        _msh(h, "ORU", "R01", control_id, at, version=VERSION),
        v2.segment("PID", "1", "", v2.comp(v2.esc(to.mrn), "", "", v2.esc(to.authority), "MR")),
        v2.segment("PV1", "1", "N", "", "", v2.comp(v2.esc(to.thread), NAMESPACE)),
    ]
    for n, dr in enumerate(reports, 1):
        filler = v2.comp(v2.esc(str(dr["id"])), NAMESPACE)
        lab = _performer(dr, by_ref)
        segs.append(v2.segment("ORC", "RE", placer, filler))
        segs.append(
            v2.segment(
                "OBR",
                str(n),
                placer,
                filler,
                item_code(codes, dr.get("code")),
                "",
                "",
                ts(dr.get("effectiveDateTime")),
                "",
                "",
                "",
                "",
                "",
                "",
                "",
                "",
                "",
                "",
                "",
                "",
                v2.esc(_lab_number(dr)),
                "",
                ts(dr.get("issued")),
                "",
                "",
                OBR_STATUS.get(str(dr.get("status", "")), ""),
            )
        )
        segs += _notes([str(dr.get("conclusion") or "")])
        for i, ref in enumerate(dr.get("result") or [], 1):
            obs = by_ref.get(ref.get("reference", ""))
            if obs is None:
                continue
            vtype, value, unit = value_fields(obs)
            segs.append(
                v2.segment(
                    "OBX",
                    str(i),
                    vtype,
                    item_code(codes, obs.get("code")),
                    "",
                    value,
                    unit,
                    reference_range(obs),
                    _flags(obs),
                    "",
                    "",
                    OBX_STATUS.get(str(obs.get("status", "")), ""),
                    "",
                    "",
                    ts(obs.get("effectiveDateTime")),
                    "",
                    "",
                    "",
                    "",
                    "",
                    "",
                    v2.comp(v2.esc(str(obs["id"])), NAMESPACE),
                    "",
                    v2.esc(_performer(obs, by_ref) or lab),
                )
            )
            segs += _notes([str(note.get("text") or "") for note in obs.get("note") or []])
        spec = next(
            (
                by_ref.get(s.get("reference", ""))
                for s in dr.get("specimen") or []
                if s.get("reference", "") in by_ref
            ),
            None,
        )
        if spec is not None:
            number_ = next((str(i.get("value", "")) for i in spec.get("identifier") or []), "")
            kind = spec.get("type") or {}
            coding = next((c for c in kind.get("coding") or [] if c.get("code")), {})
            segs.append(
                v2.segment(
                    "SPM",
                    "1",
                    v2.comp(v2.esc(number_), v2.esc(number_)),
                    "",
                    v2.comp(
                        v2.esc(str(coding.get("code", ""))),
                        v2.esc(str(coding.get("display") or kind.get("text") or "")),
                        "HL70487" if coding else "",
                    ),
                    *[""] * 12,
                    ts((spec.get("collection") or {}).get("collectedDateTime")),
                    ts(spec.get("receivedTime")),
                )
            )
    return v2.message(segs)


# -- imaging reports (result.imaging) ----------------------------------------------------------

FINDINGS = v2.comp("59776-5", "Findings", "LN")
IMPRESSION = v2.comp("19005-8", "Impression", "LN")
TARGET_REGION = v2.comp("123014", "Target Region", "DCM")
PDF_TITLE = "影像诊断报告"


def _imaging_obx(n: int, vtype: str, code: str, value: str, status: str) -> str:
    return v2.segment("OBX", str(n), vtype, code, "", value, "", "", "", "", "", status)


def imaging_oru_message(
    h: Header, bundle: Resource, to: Addressee, codes: Codes, control_id: str, at: datetime
) -> str | None:
    """The ORU^R01 for a ``result.imaging`` Bundle (module text), or None when it holds no
    DiagnosticReport. The exam code is read with the site's ``exam`` map (gaps in ``codes``)."""
    from adapters.imaging import imaging_reports_from_bundle

    resources = [e.get("resource") or {} for e in bundle.get("entry") or []]
    reports = {
        str(r.get("id")): r for r in resources if r.get("resourceType") == "DiagnosticReport"
    }
    if not reports:
        return None
    placer = v2.comp(v2.esc(to.slip_no), v2.esc(h.receiving_app)) if to.slip_no else ""
    segs = [
        _msh(h, "ORU", "R01", control_id, at, version=VERSION),
        v2.segment("PID", "1", "", v2.comp(v2.esc(to.mrn), "", "", v2.esc(to.authority), "MR")),
        v2.segment("PV1", "1", "N", "", "", v2.comp(v2.esc(to.thread), NAMESPACE)),
    ]
    neutral = imaging_reports_from_bundle(
        bundle,
        Codes(codes.maps, codes.member, []),
        slip_no=to.slip_no,
        sender="",
        patient_id=to.mrn,
    )
    for n, (rep, dr) in enumerate(((r, reports[r.report_id]) for r in neutral), 1):
        filler = v2.comp(v2.esc(rep.report_id), NAMESPACE)
        status = OBR_STATUS.get(rep.status, "")
        segs.append(v2.segment("ORC", "RE", placer, filler))
        segs.append(
            v2.segment(
                "OBR",
                str(n),
                placer,
                filler,
                item_code(codes, dr.get("code"), "exam"),
                "",
                "",
                ts(rep.exam_at),
                *[""] * 10,
                v2.esc(rep.accession),
                "",
                "",
                "",
                ts(rep.issued_at),
                "",
                v2.esc(rep.modality),
                status,
                *[""] * 6,
                f"&{v2.esc(rep.doctor)}" if rep.doctor else "",
            )
        )
        if rep.study_uid:
            segs.append(
                v2.segment("ZDS", v2.comp(v2.esc(rep.study_uid), NAMESPACE, "Application", "DICOM"))
            )
        obx = 0
        for code, text in ((FINDINGS, rep.findings), (IMPRESSION, rep.conclusion)):
            if text:
                obx += 1
                segs.append(_imaging_obx(obx, "TX", code, _lines(text), status))
        if rep.body_site:
            obx += 1
            segs.append(_imaging_obx(obx, "ST", TARGET_REGION, v2.esc(rep.body_site), status))
        if rep.pdf:
            obx += 1
            data = base64.b64encode(rep.pdf).decode("ascii")  # A-Z a-z 0-9 + / =: no delimiter
            segs.append(
                _imaging_obx(
                    obx,
                    "ED",
                    v2.comp("18748-4", v2.esc(rep.pdf_title or PDF_TITLE), "LN"),
                    v2.comp("", "AP", "PDF", "Base64", data),
                    status,
                )
            )
    return v2.message(segs)
