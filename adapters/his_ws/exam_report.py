"""Imaging reports from another member (``result.imaging``) as CDA-like exam report documents
(检查报告), the web-service HIS's counterpart of :mod:`adapters.his_ws.lab_report`.

The results inbox has already stored the Bundle in the node's FHIR store; the shared reader
(:func:`adapters.imaging.imaging_reports_from_bundle`) gives one neutral report per
``DiagnosticReport`` with its ``ImagingStudy``, written here as one document for the HIS,
checked against ``schemas/cda-exam-report.xsd`` before it leaves (``ReceiveExamReport``), and read
back (the simulated HIS, tests). Header as the lab report's:

=============================  ==================================================================
``id``                         ``<report id>-v<version>`` (a resend is a duplicate the HIS knows)
``code``                       ``JCBG`` 检查报告
``effectiveTime``              when the report was issued (``DiagnosticReport.issued``)
``setId`` / ``versionNumber``  the report's id (stable across corrections), its version here
``recordTarget``               the patient's record number as the HIS got it with the referral
``author``                     the reporting doctor (``assignedPerson/name``) of the producer
``custodian``                  the producing member
``relatedDocument``            ``RPLC`` + the version it replaces (from version 2)
``inFulfillmentOf``            the referral (slip number, the referral document in the HIS) and
                               the producer's accession number (``accession`` OID)
``documentationOf``            as DICOM PS3.20 has it: ``serviceEvent/id@root`` the Study
                               Instance UID; the exam code in this HIS's catalogue (``exam``
                               OID; where the site's map has none, LOINC or the sender's code
                               and system, counted as a gap); exam time; status (FHIR
                               ``DiagnosticReport.status``)
=============================  ==================================================================

Sections: 检查所见 (LOINC 18782-3; ``text`` the report's full text; entries the modality, DCM
121139, and the body site, DCM 123014), 诊断意见 (LOINC 19005-8; ``text`` the conclusion) and,
when the report has a PDF rendering, 报告单 (LOINC 18748-4: one ``observationMedia`` whose value
is the base64 of the PDF's exact bytes, ``mediaType="application/pdf"``).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

from lxml import etree

from adapters.his_ws import xmlsafe
from adapters.his_ws.cda import CDA_TYPE_ID, LOINC_OID, NS, V3, Site, _el, _Reader
from adapters.his_ws.lab_report import _ts
from adapters.imaging import ImagingReport
from adapters.slips_fhir import Codes

EXAM_XSD = "cda-exam-report.xsd"
DOC_CODE, DOC_TITLE = "JCBG", "检查报告"
DCM_OID = "1.2.840.10008.2.16.4"  # DICOM Controlled Terminology
FINDINGS = ("18782-3", LOINC_OID, "检查所见")
IMPRESSION = ("19005-8", LOINC_OID, "诊断意见")
PDF_SECTION = ("18748-4", LOINC_OID, "报告单")
MODALITY = ("121139", DCM_OID, "Modality")
BODY_SITE = ("123014", DCM_OID, "Target Region")
LOINC = "http://loinc.org"


@dataclass
class ExamReportDoc:
    """One exam report document as the HIS files it."""

    doc_id: str
    report_id: str  # setId: stable across corrections
    version: int
    written_at: str  # HL7 TS (issued)
    producer: str  # member id of the producing hospital (custodian)
    slip_no: str
    referral_doc: str  # the referral document in this HIS
    mrn: str = ""
    mrn_authority: str = ""
    replaces: str = ""
    accession: str = ""
    code: str = ""
    code_system: str = ""  # the site's exam OID, LOINC's OID, or the sender's system URI
    name: str = ""
    status: str = ""  # FHIR DiagnosticReport.status
    exam_at: str = ""  # HL7 TS
    study_uid: str = ""
    modality: str = ""
    body_site: str = ""
    doctor: str = ""
    findings: str = ""
    conclusion: str = ""
    pdf: bytes = b""


def doc_id_of(report_id: str, version: int) -> str:
    return f"{report_id}-v{version}"


def from_reports(
    reports: list[ImagingReport],
    codes: Codes,
    site: Site,
    *,
    producer: str,
    referral_doc: str,
    mrn: str,
    mrn_authority: str,
    received_at: str,
) -> list[ExamReportDoc]:
    """One document per report (id and version set by the caller)."""
    out = []
    for r in reports:
        system = (
            site.exam
            if r.translated
            else LOINC_OID
            if r.exam_code_system == LOINC
            else r.exam_code_system
        )
        out.append(
            ExamReportDoc(
                doc_id="",
                report_id=r.report_id,
                version=0,
                written_at=_ts(r.issued_at or received_at),
                producer=producer,
                slip_no=r.slip_no,
                referral_doc=referral_doc,
                mrn=mrn,
                mrn_authority=mrn_authority,
                accession=r.accession,
                code=r.exam_code,
                code_system=system,
                name=r.exam_name,
                status=r.status,
                exam_at=_ts(r.exam_at),
                study_uid=r.study_uid,
                modality=r.modality,
                body_site=r.body_site,
                doctor=r.doctor,
                findings=r.findings,
                conclusion=r.conclusion,
                pdf=r.pdf,
            )
        )
    return out


def _section(body: etree._Element, what: tuple[str, str, str], text: str) -> etree._Element:
    code, system, title = what
    sec = _el(_el(body, "component"), "section")
    _el(sec, "code", code=code, codeSystem=system, displayName=title)
    _el(sec, "title", title)
    if text:
        _el(sec, "text", text)
    return sec


def write(doc: ExamReportDoc, site: Site, encoding: str = "UTF-8") -> bytes:
    """The document's bytes, checked against ``cda-exam-report.xsd`` (SchemaInvalid if not)."""
    root = etree.Element(f"{{{V3}}}ClinicalDocument", nsmap={None: V3})
    _el(root, "realmCode", code="CN")
    _el(root, "typeId", root=CDA_TYPE_ID[0], extension=CDA_TYPE_ID[1])
    _el(root, "id", root=site.doc_oid, extension=doc.doc_id)
    _el(root, "code", code=DOC_CODE, codeSystem=site.doc_types, displayName=DOC_TITLE)
    _el(root, "title", DOC_TITLE)
    _el(root, "effectiveTime", value=doc.written_at)
    _el(root, "confidentialityCode", code="N", codeSystem="2.16.840.1.113883.5.25")
    _el(root, "setId", root=site.doc_oid, extension=doc.report_id)
    _el(root, "versionNumber", value=str(doc.version))
    if doc.mrn:
        role = _el(_el(root, "recordTarget"), "patientRole")
        _el(
            role,
            "id",
            root=site.mrn_oid,
            extension=doc.mrn,
            assigningAuthorityName=doc.mrn_authority,
        )
    author = _el(root, "author")
    _el(author, "time", value=doc.written_at)
    assigned = _el(author, "assignedAuthor")
    if doc.doctor:
        _el(_el(assigned, "assignedPerson"), "name", doc.doctor)
    _el(_el(assigned, "representedOrganization"), "id", root=site.org_oid, extension=doc.producer)
    cust = _el(_el(_el(root, "custodian"), "assignedCustodian"), "representedCustodianOrganization")
    _el(cust, "id", root=site.org_oid, extension=doc.producer)
    if doc.replaces:
        parent = _el(_el(root, "relatedDocument", typeCode="RPLC"), "parentDocument")
        _el(parent, "id", root=site.doc_oid, extension=doc.replaces)
        _el(parent, "setId", root=site.doc_oid, extension=doc.report_id)
        _el(parent, "versionNumber", value=str(doc.version - 1))
    order = _el(_el(root, "inFulfillmentOf"), "order")
    if doc.slip_no:
        _el(order, "id", root=site.slip_oid, extension=doc.slip_no)
    _el(order, "id", root=site.doc_oid, extension=doc.referral_doc)
    if doc.accession:
        _el(
            order,
            "id",
            root=site.accession,
            extension=doc.accession,
            assigningAuthorityName=doc.producer,
        )
    event = _el(_el(root, "documentationOf"), "serviceEvent")
    if doc.study_uid:
        _el(event, "id", root=doc.study_uid)
    if doc.code:
        _el(event, "code", code=doc.code, codeSystem=doc.code_system, displayName=doc.name)
    if doc.exam_at:
        _el(event, "effectiveTime", value=doc.exam_at)
    _el(event, "statusCode", code=doc.status or "unknown")
    body = _el(_el(root, "component"), "structuredBody")
    found = _section(body, FINDINGS, doc.findings)
    for (code, system, name), value, vtype in (
        (MODALITY, doc.modality, "CD"),
        (BODY_SITE, doc.body_site, "ST"),
    ):
        if value:
            o = _el(_el(found, "entry"), "observation", classCode="OBS", moodCode="EVN")
            _el(o, "code", code=code, codeSystem=system, displayName=name)
            if vtype == "CD":
                _el(o, "value", type="CD", code=value, codeSystem=DCM_OID)
            else:
                _el(o, "value", value, type="ST")
    _section(body, IMPRESSION, doc.conclusion)
    if doc.pdf:
        media = _el(
            _el(_section(body, PDF_SECTION, ""), "entry"),
            "observationMedia",
            classCode="OBS",
            moodCode="EVN",
        )
        _el(
            media,
            "value",
            base64.b64encode(doc.pdf).decode("ascii"),
            mediaType="application/pdf",
            representation="B64",
        )
    xmlsafe.validate(root, EXAM_XSD, doc.doc_id)
    return bytes(etree.tostring(root, xml_declaration=True, encoding=encoding, pretty_print=True))


# -- reading (the HIS's side) ---------------------------------------------------------------


def read(raw: bytes, site: Site, *, record: str) -> ExamReportDoc:
    """Check (encoding, hardened parse, XSD) and read an exam report document."""
    xmlsafe.check_encoding(raw, record)
    root = xmlsafe.parse(raw, record)
    xmlsafe.validate(root, EXAM_XSD, record)
    r = _Reader(root, record)

    def attr(path: str, name: str, base: etree._Element | None = None) -> str:
        el = r.opt(path, base)
        return (el.get(name) or "") if el is not None else ""

    ids = {
        i.get("root"): (i.get("extension", ""), i.get("assigningAuthorityName", ""))
        for i in root.xpath("v3:inFulfillmentOf/v3:order/v3:id", namespaces=NS)
    }
    if not ids.get(site.doc_oid):
        from adapters.his_ws.errors import SchemaInvalid

        raise SchemaInvalid(
            f"document {record} does not name its referral document",
            field="/ClinicalDocument/inFulfillmentOf/order/id",
        )
    mrn = r.opt("v3:recordTarget/v3:patientRole/v3:id")
    event = "v3:documentationOf/v3:serviceEvent/"
    doc = ExamReportDoc(
        doc_id=attr("v3:id", "extension"),
        report_id=attr("v3:setId", "extension"),
        version=int(attr("v3:versionNumber", "value")),
        written_at=attr("v3:effectiveTime", "value"),
        producer=attr(
            "v3:custodian/v3:assignedCustodian/v3:representedCustodianOrganization/v3:id",
            "extension",
        ),
        slip_no=ids.get(site.slip_oid, ("", ""))[0],
        referral_doc=ids[site.doc_oid][0],
        mrn=mrn.get("extension", "") if mrn is not None else "",
        mrn_authority=mrn.get("assigningAuthorityName", "") if mrn is not None else "",
        replaces=attr("v3:relatedDocument[@typeCode='RPLC']/v3:parentDocument/v3:id", "extension"),
        accession=ids.get(site.accession, ("", ""))[0],
        code=attr(event + "v3:code", "code"),
        code_system=attr(event + "v3:code", "codeSystem"),
        name=attr(event + "v3:code", "displayName"),
        status=attr(event + "v3:statusCode", "code"),
        exam_at=attr(event + "v3:effectiveTime", "value"),
        study_uid=attr(event + "v3:id", "root"),
        doctor=r.text("v3:author/v3:assignedAuthor/v3:assignedPerson/v3:name", required=False),
    )
    for sec in root.xpath("v3:component/v3:structuredBody/v3:component/v3:section", namespaces=NS):
        code = r.one("v3:code", sec).get("code")
        text = r.text("v3:text", sec, required=False)
        if code == FINDINGS[0]:
            doc.findings = text
            for o in sec.xpath("v3:entry/v3:observation", namespaces=NS):
                what, value = r.one("v3:code", o).get("code"), r.one("v3:value", o)
                if what == MODALITY[0]:
                    doc.modality = value.get("code", "")
                elif what == BODY_SITE[0]:
                    doc.body_site = value.text or ""
        elif code == IMPRESSION[0]:
            doc.conclusion = text
        elif code == PDF_SECTION[0]:
            media = r.one("v3:entry/v3:observationMedia/v3:value", sec)
            doc.pdf = base64.b64decode(media.text or "")
    return doc
