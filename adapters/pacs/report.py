"""Radiology reports -> FHIR R4 ``DiagnosticReport`` with the ImagingStudy and a conclusion.

Two sources: a DICOM SR stored with the study (Basic/Enhanced/Comprehensive Text SR), and an
HL7 v2 ORU^R01 text report from the RIS. The ORU reader is deliberately minimal (MSH, OBR,
OBX, ZDS): it reads what a radiology report needs and nothing of lab results, which the LIS
adapter owns. It reads through the HL7 v2 kit (:mod:`adapters.hl7v2`): charset by MSH-18,
MSH-2 and version checks, escapes per leaf, DTM at any precision. The report is tied to its
study by the Study Instance UID (OBX-3 ``113014^^DCM`` or ZDS-1, IHE RAD) or else by the
accession number (OBR-3 filler order number).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset

from adapters.hl7v2 import charset, fields
from adapters.hl7v2.errors import V2Error
from adapters.pacs.errors import ReportRejected
from adapters.pacs.study import DCM, DICOM_UID, SNOMED, fhir_datetime, report_resource_id, text

LOINC = "http://loinc.org"
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
IMAGING_REPORT = {"system": LOINC, "code": "18748-4", "display": "Diagnostic imaging study"}
IMPRESSION_CODES = {"19005-8", "121073"}  # LOINC Impression, DCM Impressions
_SCHEMES = {"LN": LOINC, "DCM": DCM, "SCT": SNOMED, "SRT": SNOMED}
_STATUS = {
    "F": "final",
    "C": "corrected",
    "P": "preliminary",
    "X": "cancelled",
    "A": "partial",
    "I": "registered",
    "R": "preliminary",
}


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


def report_from_sr(
    ds: Dataset, *, subject: dict[str, Any], study_ref: dict[str, Any], tz: str
) -> dict[str, Any]:
    sop = str(ds.SOPInstanceUID)
    texts: list[tuple[str | None, str]] = []
    _sr_texts(ds.get("ContentSequence"), texts)
    impressions = [t for c, t in texts if c in IMPRESSION_CODES]
    conclusion = "\n".join(impressions or [t for _, t in texts])
    title = _coding_from_sequence(ds.get("ConceptNameCodeSequence"))
    verified = text(ds, "VerificationFlag") == "VERIFIED"
    complete = text(ds, "CompletionFlag") == "COMPLETE"
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "id": report_resource_id(f"sr:{sop}"),
        "identifier": [{"system": DICOM_UID, "value": f"urn:oid:{sop}"}],
        "status": "final" if verified and complete else "preliminary",
        "category": _category(),
        "code": {
            "coding": [title or IMAGING_REPORT],
            "text": (title or IMAGING_REPORT).get("display", "Imaging report"),
        },
        "subject": subject,
        "imagingStudy": [study_ref],
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


def _kit(exc: V2Error, control: str = "") -> ReportRejected:
    record = f"record {control} " if control else ""
    return ReportRejected(f"{record}field {exc.field or 'MSH'}: {exc.reason}")


def parse_oru(
    message: str | bytes,
    tz: str,
    *,
    default_charset: str = "UNICODE UTF-8",
    charset_override: str | None = None,
) -> OruReport:
    """Read an ORU^R01 radiology report; ReportRejected names the segment and field.

    Bytes are decoded by MSH-18 (else ``default_charset``; ``charset_override`` wins) with the
    HL7 v2 kit, as the LIS and the HIS listener do; text is taken as already decoded.
    """
    control = ""
    try:
        if isinstance(message, bytes):
            text, cs = charset.decode(message, default_charset, charset_override)
        else:
            text, cs = message, charset.UTF8
        msg = fields.parse(text, cs)
        head = fields.header(msg)
        control = head.control_id
        if head.message_type != "ORU":
            raise ReportRejected(f"field MSH-9: message type {head.message_type!r} is not ORU")
        if not control:
            raise ReportRejected("field MSH-10: message control id is missing")
        obrs = msg.segments("OBR")
        if not obrs:
            raise ReportRejected(f"record {control} field OBR: segment missing")
        obr = obrs[0]
        pids = msg.segments("PID")
        v = fields.value
        pid_3 = v(pids[0], 3) if pids else ""
        code = None
        if v(obr, 4, 1):
            system = {"LN": LOINC}.get(v(obr, 4, 3), "urn:hutong:ris:exam-code")
            coding = {"system": system, "code": v(obr, 4, 1)}
            if v(obr, 4, 2):
                coding["display"] = v(obr, 4, 2)
            code = {"coding": [coding], "text": v(obr, 4, 2) or v(obr, 4, 1)}
        report = OruReport(
            control_id=control,
            sending=head.sending_facility or head.sending_app,
            patient_id=pid_3 or None,
            accession=v(obr, 3) or None,
            study_uid=None,
            code=code,
            status=_STATUS.get(v(obr, 25)[:1], "final"),
            effective=fields.fhir_datetime(v(obr, 7), "OBR-7", tz),
        )
        for obx in msg.segments("OBX"):
            if v(obx, 3) == "113014":
                report.study_uid = report.study_uid or v(obx, 5) or None
                continue
            if v(obx, 2) in ("TX", "ST", "FT"):
                lines = [fields.rep_text(obx, 5, r) for r in range(1, fields.reps(obx, 5) + 1)]
                value = "\n".join(lines).strip()
                if value:
                    report.texts.append((v(obx, 3) or None, value))
        for seg in msg.segments("ZDS"):
            report.study_uid = report.study_uid or v(seg, 1) or None
    except V2Error as exc:
        raise _kit(exc, control) from None
    if not report.texts:
        raise ReportRejected(f"record {control} field OBX-5: no report text (TX/ST/FT)")
    return report


def report_from_oru(
    oru: OruReport, *, subject: dict[str, Any], study_ref: dict[str, Any] | None
) -> dict[str, Any]:
    key = f"oru:{oru.sending}:{oru.accession or oru.control_id}"
    impressions = [t for c, t in oru.texts if c in IMPRESSION_CODES]
    full = "\n".join(t for _, t in oru.texts)
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "id": report_resource_id(key),
        "status": oru.status,
        "category": _category(),
        "code": oru.code or {"coding": [IMAGING_REPORT], "text": IMAGING_REPORT["display"]},
        "subject": subject,
        "conclusion": "\n".join(impressions) or full,
        "presentedForm": [
            {
                "contentType": "text/plain; charset=utf-8",
                "data": base64.b64encode(full.encode("utf-8")).decode("ascii"),
            }
        ],
    }
    if oru.accession:
        report["identifier"] = [
            {
                "type": {
                    "coding": [
                        {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}
                    ]
                },
                "value": oru.accession,
            }
        ]
    if study_ref is not None:
        report["imagingStudy"] = [study_ref]
    if oru.effective:
        report["effectiveDateTime"] = oru.effective
    return report
