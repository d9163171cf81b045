"""Imaging reports from another member (``result.imaging``) as neutral records, for every HIS style.

The results inbox (:mod:`bridge.results.inbox`) has already stored the packet's resources in the
local FHIR store; this module reads the same Bundle into one :class:`ImagingReport` per
``DiagnosticReport`` (检查报告) with its ``ImagingStudy``, which each HIS adapter then writes
its own way: a ``ZZ_JS_JCBG`` row (:mod:`adapters.his_db`), an ORU^R01
(:mod:`adapters.his_hl7.results`), an exam report document (:mod:`adapters.his_ws.exam_report`).

The exam code is the READER's local exam code, translated back from the shared coding by
:class:`adapters.slips_fhir.Codes` (reverse of the site's ``exam`` ConceptMap); a code that cannot
be translated falls back to the sender's code with its system, and the gap is recorded.
Findings are the report's full text (``presentedForm`` text/plain), the conclusion is
``DiagnosticReport.conclusion``; a PDF rendering (``presentedForm`` application/pdf) travels as
its exact bytes.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

from adapters.slips_fhir import Codes

Resource = dict[str, Any]

#: DICOM modalities that hold no images of the patient (the report itself, key objects, states)
NON_IMAGE_MODALITIES = {"SR", "KO", "PR", "DOC"}
DICOM_UID = "urn:dicom:uid"
ACSN = "ACSN"  # identifier type (v2-0203) of an accession number


@dataclass
class ImagingReport:
    """One imaging report (检查报告) from another member, for the patient under referral."""

    report_id: str  # the DiagnosticReport id (stable across corrections)
    slip_no: str
    from_member: str
    patient_id: str  # the reader's own record number of the patient (病历号)
    exam_code: str  # the reader's local exam code, else the sender's code (and its system)
    exam_code_system: str
    exam_name: str
    modality: str  # image modalities of the study, "/"-joined (CT, MR/CT ...)
    body_site: str
    study_uid: str  # DICOM Study Instance UID
    status: str  # FHIR DiagnosticReport.status
    exam_at: str = ""  # ImagingStudy.started, else the report's effectiveDateTime
    issued_at: str = ""
    findings: str = ""  # 所见: the report's full text (presentedForm text/plain)
    conclusion: str = ""  # 诊断/印象
    doctor: str = ""  # the reporting doctor's name as the report gives it
    accession: str = ""  # the producer's accession number (identifier of type ACSN)
    translated: bool = False  # exam_code is the reader's own (the site's exam map knew it)
    pdf: bytes = b""  # the report as a PDF (presentedForm application/pdf), exact bytes
    pdf_title: str = ""


def _form(dr: Resource, content_type: str) -> Resource | None:
    for form in dr.get("presentedForm") or []:
        if str(form.get("contentType", "")).split(";")[
            0
        ].strip().lower() == content_type and form.get("data"):
            return dict(form)
    return None


def _decoded(form: Resource | None) -> bytes:
    if form is None:
        return b""
    try:
        return base64.b64decode(str(form["data"]), validate=True)
    except (binascii.Error, ValueError):
        return b""  # R4 validation at the gateway refuses bad base64: kept as a guard


def _text_form(dr: Resource) -> str:
    return _decoded(_form(dr, "text/plain")).decode("utf-8", errors="replace").strip()


def _doctor(dr: Resource, by_ref: dict[str, Resource]) -> str:
    for who in [*(dr.get("resultsInterpreter") or []), *(dr.get("performer") or [])]:
        if who.get("display"):
            return str(who["display"])
        found = by_ref.get(str(who.get("reference", "")), {})
        if found.get("resourceType") == "Practitioner":
            name = (found.get("name") or [{}])[0]
            return str(
                name.get("text") or "".join([name.get("family", ""), *name.get("given", [])])
            )
    return ""


def study_uid_of(study: Resource) -> str:
    for ident in study.get("identifier") or []:
        if ident.get("system") == DICOM_UID:
            return str(ident.get("value", "")).removeprefix("urn:oid:")
    return ""


def referenced_uid(dr: Resource) -> str:
    """The Study Instance UID a report names in ``imagingStudy[].identifier`` (a report on a
    study the reader holds itself carries no ImagingStudy, only the reference)."""
    for ref in dr.get("imagingStudy") or []:
        ident = ref.get("identifier") or {}
        if ident.get("system") == DICOM_UID and ident.get("value"):
            return str(ident["value"]).removeprefix("urn:oid:")
    return ""


def with_local_studies(bundle: Resource, host: Any) -> Resource:
    """``bundle`` plus the ImagingStudy each report names but the Bundle lacks, when this node
    holds it (a remote reading of our own study carries only the reference): the HIS then gets
    the study's modality, body site and time as for any other report. ``host``: the adapter's
    :class:`~bridge.local.host.AdapterHost` (read only)."""
    entries = list(bundle.get("entry") or [])
    have = {
        f"{(e.get('resource') or {}).get('resourceType')}/{(e.get('resource') or {}).get('id')}"
        for e in entries
    }
    for e in list(entries):
        dr = e.get("resource") or {}
        if dr.get("resourceType") != "DiagnosticReport":
            continue
        for ref in dr.get("imagingStudy") or []:
            rtype, _, rid = str(ref.get("reference", "")).partition("/")
            if (
                rtype != "ImagingStudy"
                or not rid
                or f"{rtype}/{rid}" in have
                or host.resource_info(rtype, rid) is None
            ):
                continue
            entries.append({"fullUrl": f"urn:uuid:{rid}", "resource": host.resource(rtype, rid)})
            have.add(f"{rtype}/{rid}")
    return (
        {**bundle, "entry": entries} if len(entries) != len(bundle.get("entry") or []) else bundle
    )


def _accession(dr: Resource) -> str:
    for ident in dr.get("identifier") or []:
        kinds = [c.get("code") for c in (ident.get("type") or {}).get("coding") or []]
        if ACSN in kinds:
            return str(ident.get("value", ""))
    return ""


def _unique(values: list[str]) -> str:
    return "/".join(dict.fromkeys(v for v in values if v))


def imaging_reports_from_bundle(
    bundle: Resource, codes: Codes, *, slip_no: str, sender: str, patient_id: str
) -> list[ImagingReport]:
    """The imaging reports of a ``result.imaging`` Bundle, each with its ImagingStudy."""
    resources = [e.get("resource") or {} for e in bundle.get("entry") or []]
    by_ref = {f"{r.get('resourceType')}/{r.get('id')}": r for r in resources if r.get("id")}
    out = []
    for dr in (r for r in resources if r.get("resourceType") == "DiagnosticReport"):
        study = next(
            (
                by_ref[s["reference"]]
                for s in dr.get("imagingStudy") or []
                if s.get("reference") in by_ref
            ),
            {},
        )
        before = len(codes.gaps)
        code, name = codes.local("exam", dr.get("code"))
        system = next(
            (
                str(c.get("system", ""))
                for c in (dr.get("code") or {}).get("coding") or []
                if c.get("code") == code
            ),
            "",
        )
        # the reader's own code: no gap met, and a map said so (no maps at all: only a code
        # already in the reader's own system)
        translated = len(codes.gaps) == before and (
            codes.maps is not None or system == codes.source_system("exam")
        )
        if translated:
            system = codes.source_system("exam")
        pdf = _form(dr, "application/pdf")
        out.append(
            ImagingReport(
                report_id=str(dr["id"]),
                slip_no=slip_no,
                from_member=sender,
                patient_id=patient_id,
                exam_code=code,
                exam_code_system=system,
                exam_name=name,
                modality=_unique(
                    [
                        str(m.get("code", ""))
                        for m in study.get("modality") or []
                        if m.get("code") not in NON_IMAGE_MODALITIES
                    ]
                ),
                body_site=_unique(
                    [
                        str(
                            s.get("bodySite", {}).get("display")
                            or s.get("bodySite", {}).get("code")
                            or ""
                        )
                        for s in study.get("series") or []
                    ]
                ),
                study_uid=study_uid_of(study) or referenced_uid(dr),
                status=str(dr.get("status", "")),
                exam_at=str(study.get("started") or dr.get("effectiveDateTime") or ""),
                issued_at=str(dr.get("issued", "")),
                findings=_text_form(dr),
                conclusion=str(dr.get("conclusion", "")),
                doctor=_doctor(dr, by_ref),
                accession=_accession(dr),
                translated=translated,
                pdf=_decoded(pdf),
                pdf_title=str((pdf or {}).get("title") or ""),
            )
        )
    return out
