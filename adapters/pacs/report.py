"""Radiology reports -> FHIR R4 ``DiagnosticReport`` with the ImagingStudy and a conclusion.

Two sources: a DICOM SR stored with the study (Basic/Enhanced/Comprehensive Text SR), and an
HL7 v2 ORU^R01 text report from the RIS. The ORU reader is deliberately minimal (MSH, OBR,
OBX, ZDS): it reads what a radiology report needs and nothing of lab results, which the LIS
adapter owns. The report is tied to its study by the Study Instance UID (OBX-3 ``113014^^DCM``
or ZDS-1, IHE RAD) or else by the accession number (OBR-3 filler order number).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

import hl7
from pydicom.dataset import Dataset

from adapters.pacs.errors import ReportRejected
from adapters.pacs.study import DCM, DICOM_UID, SNOMED, fhir_datetime, report_resource_id, text

LOINC = "http://loinc.org"
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
IMAGING_REPORT = {"system": LOINC, "code": "18748-4", "display": "Diagnostic imaging study"}
IMPRESSION_CODES = {"19005-8", "121073"}  # LOINC Impression, DCM Impressions
_SCHEMES = {"LN": LOINC, "DCM": DCM, "SCT": SNOMED, "SRT": SNOMED}
_STATUS = {"F": "final", "C": "corrected", "P": "preliminary", "X": "cancelled",
           "A": "partial", "I": "registered", "R": "preliminary"}


def _category() -> list[dict[str, Any]]:
    return [{"coding": [{"system": V2_0074, "code": "RAD", "display": "Radiology"}]}]


def _coding_from_sequence(seq: Any) -> dict[str, Any] | None:
    if not seq:
        return None
    item = seq[0]
    scheme = text(item, "CodingSchemeDesignator") or ""
    system = _SCHEMES.get(scheme, f"urn:hutong:dicom:coding-scheme:{scheme or 'unknown'}")
    code, meaning = text(item, "CodeValue"), text(item, "CodeMeaning")
    if not code:
        return None
    coding = {"system": system, "code": code}
    if meaning:
        coding["display"] = meaning
    return coding


def _sr_texts(items: Any, out: list[tuple[str | None, str]]) -> None:
    """TEXT items the report CONTAINS (observation context is not report text)."""
    for item in items or ():
        if text(item, "RelationshipType") == "HAS OBS CONTEXT":
            continue
        if text(item, "ValueType") == "TEXT" and text(item, "TextValue"):
            concept = _coding_from_sequence(item.get("ConceptNameCodeSequence"))
            out.append((concept["code"] if concept else None, str(item.TextValue).strip()))
        _sr_texts(item.get("ContentSequence"), out)


def report_from_sr(ds: Dataset, *, subject: dict[str, Any], study_ref: dict[str, Any],
                   tz: str) -> dict[str, Any]:
    sop = str(ds.SOPInstanceUID)
    texts: list[tuple[str | None, str]] = []
    _sr_texts(ds.get("ContentSequence"), texts)
    impressions = [t for c, t in texts if c in IMPRESSION_CODES]
    conclusion = "\n".join(impressions or [t for _, t in texts])
    title = _coding_from_sequence(ds.get("ConceptNameCodeSequence"))
    verified = text(ds, "VerificationFlag") == "VERIFIED"
    complete = text(ds, "CompletionFlag") == "COMPLETE"
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport", "id": report_resource_id(f"sr:{sop}"),
        "identifier": [{"system": DICOM_UID, "value": f"urn:oid:{sop}"}],
        "status": "final" if verified and complete else "preliminary",
        "category": _category(),
        "code": {"coding": [title or IMAGING_REPORT],
                 "text": (title or IMAGING_REPORT).get("display", "Imaging report")},
        "subject": subject, "imagingStudy": [study_ref],
    }
    when = fhir_datetime(text(ds, "ContentDate"), text(ds, "ContentTime"), tz)
    if when:
        report["effectiveDateTime"] = when
        if "T" in when:
            report["issued"] = when
    if conclusion:
        report["conclusion"] = conclusion
    return report


@dataclass
class OruReport:
    """The parts of an ORU^R01 a radiology report needs (no patient data beyond PID-3)."""

    control_id: str
    sending: str
    patient_id: str | None
    accession: str | None
    study_uid: str | None
    code: dict[str, Any] | None
    status: str
    effective: str | None
    texts: list[tuple[str | None, str]] = field(default_factory=list)


def _field(seg: Any, n: int) -> str:
    try:
        return str(seg(n)).strip()
    except (IndexError, KeyError):
        return ""


def _component(value: str, n: int) -> str:
    parts = value.split("^")
    return parts[n - 1].strip() if len(parts) >= n else ""


def parse_oru(message: str, tz: str) -> OruReport:
    """Read an ORU^R01 radiology report; ReportRejected names the segment and field."""
    try:
        msg = hl7.parse(message.replace("\r\n", "\r").replace("\n", "\r").strip("\r"))
    except Exception as exc:  # noqa: BLE001 - python-hl7 raises bare exceptions on bad framing
        raise ReportRejected(f"not an HL7 v2 message ({type(exc).__name__})") from None
    try:
        msh = msg.segment("MSH")
    except KeyError:
        raise ReportRejected("field MSH: segment missing") from None
    mtype = _field(msh, 9)
    if _component(mtype, 1) != "ORU":
        raise ReportRejected(f"field MSH-9: message type {mtype!r} is not ORU")
    control = _field(msh, 10)
    if not control:
        raise ReportRejected("field MSH-10: message control id is missing")
    try:
        obr = msg.segment("OBR")
    except KeyError:
        raise ReportRejected(f"record {control} field OBR: segment missing") from None
    pid_3 = ""
    try:
        pid_3 = _component(_field(msg.segment("PID"), 3), 1)
    except KeyError:
        pass
    service = _field(obr, 4)
    code = None
    if _component(service, 1):
        system = {"LN": LOINC}.get(_component(service, 3), "urn:hutong:ris:exam-code")
        code = {"coding": [{"system": system, "code": _component(service, 1),
                            "display": _component(service, 2) or None}],
                "text": _component(service, 2) or _component(service, 1)}
        if code["coding"][0]["display"] is None:
            del code["coding"][0]["display"]
    observed = _field(obr, 7)
    report = OruReport(
        control_id=control, sending=_component(_field(msh, 4), 1) or _component(_field(msh, 3), 1),
        patient_id=pid_3 or None, accession=_component(_field(obr, 3), 1) or None,
        study_uid=None, code=code, status=_STATUS.get(_field(obr, 25)[:1], "final"),
        effective=fhir_datetime(observed[:8], observed[8:14], tz) if observed else None)
    for obx in (seg for seg in msg if str(seg[0]) == "OBX"):
        ident = _field(obx, 3)
        value = msg.unescape(_field(obx, 5)) if _field(obx, 5) else ""
        if _component(ident, 1) == "113014" and value:
            report.study_uid = _component(value, 1)
            continue
        if _field(obx, 2) in ("TX", "ST", "FT") and value:
            report.texts.append((_component(ident, 1) or None,
                                 value.replace("~", "\n").strip()))
    for seg in msg:
        if str(seg[0]) == "ZDS" and _component(_field(seg, 1), 1):
            report.study_uid = report.study_uid or _component(_field(seg, 1), 1)
    if not report.texts:
        raise ReportRejected(f"record {control} field OBX-5: no report text (TX/ST/FT)")
    return report


def report_from_oru(oru: OruReport, *, subject: dict[str, Any],
                    study_ref: dict[str, Any] | None) -> dict[str, Any]:
    key = f"oru:{oru.sending}:{oru.accession or oru.control_id}"
    impressions = [t for c, t in oru.texts if c in IMPRESSION_CODES]
    full = "\n".join(t for _, t in oru.texts)
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport", "id": report_resource_id(key),
        "status": oru.status, "category": _category(),
        "code": oru.code or {"coding": [IMAGING_REPORT], "text": IMAGING_REPORT["display"]},
        "subject": subject,
        "conclusion": "\n".join(impressions) or full,
        "presentedForm": [{"contentType": "text/plain; charset=utf-8",
                           "data": base64.b64encode(full.encode("utf-8")).decode("ascii")}],
    }
    if oru.accession:
        report["identifier"] = [{"type": {"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]},
            "value": oru.accession}]
    if study_ref is not None:
        report["imagingStudy"] = [study_ref]
    if oru.effective:
        report["effectiveDateTime"] = oru.effective
    return report
