"""Lab results from another member (``result.lab``) as CDA-like lab report documents (检验报告).

The results inbox (:mod:`bridge.results.inbox`) has already stored the Bundle in the node's FHIR
store; this module writes each ``DiagnosticReport`` of it as one document for the HIS, checked
against ``schemas/cda-lab-report.xsd`` before it leaves, and reads such a document back (the
simulated HIS, tests). Header as the slips (WS/T 500-style, :mod:`adapters.his_ws.cda`):

=============================  ==================================================================
``id``                         ``<report id>-v<version>``: one id per version, so a resend is a
                               duplicate the HIS recognises
``code``                       ``JYBG`` 检验报告
``effectiveTime``              when the lab issued the report (``DiagnosticReport.issued``)
``setId`` / ``versionNumber``  the report's id (stable at the producing lab across corrections)
                               and its version in this HIS (1, 2, ... per packet that carried it)
``recordTarget``               the patient's record number as the HIS got it with the referral
                               (``assigningAuthorityName``: the member that issued it); nothing
                               else about the patient: no ID number crosses the gateway
``author``                     the performing lab (name) of the producing member
``custodian``                  the producing member
``relatedDocument``            ``RPLC`` + the version it replaces (from version 2)
``inFulfillmentOf``            the referral: slip number and the referral document's id in the
                               HIS (as acceptances and returns name it)
``documentationOf``            the lab's report number, the panel code (this HIS's catalogue),
                               collection time, report status (FHIR ``DiagnosticReport.status``)
=============================  ==================================================================

One section (LOINC 30954-2 检验结果; ``text``: the report's conclusion) with one ``observation``
per Observation, in the report's order: ``id`` the result id (stable across corrections),
``code`` the item in this HIS's lab catalogue (``codeSystem`` = the site's lab OID); where the
site's map has none, the shared LOINC code (``codeSystem`` 2.16.840.1.113883.6.1) or the sender's
own code with its system URI, and the gap is counted (:class:`adapters.slips_fhir.Codes`);
``text`` the result's notes; ``statusCode`` the FHIR ``Observation.status`` (final, preliminary,
corrected, ...); ``effectiveTime``; ``value`` flat with a ``type``:

======  ====================================================================================
PQ      ``value`` (+ ``comparator`` ``<`` ``>`` ...), ``unit`` as printed, ``ucum`` when it differs
IVL_PQ  ``value`` ``low-high``, ``unit``
RTO     ``value`` ``numerator:denominator``
CD      ``code``, ``codeSystem`` (the sender's system URI), ``displayName``
ST      the text as element content (line breaks kept)
TS      ``value`` HL7 TS; INT, BL ``value``
======  ====================================================================================

``interpretationCode`` once per abnormal flag (H, L, A, N, ...) and ``referenceRange`` text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from lxml import etree

from adapters.his_ws import xmlsafe
from adapters.his_ws.cda import (
    CDA_TYPE_ID,
    LOINC_OID,
    NS,
    V3,
    Site,
    _el,
    _Reader,
    ts,
)
from adapters.his_ws.errors import SchemaInvalid
from adapters.slips_fhir import Codes

Resource = dict[str, Any]

LAB_XSD = "cda-lab-report.xsd"
DOC_CODE, DOC_TITLE = "JYBG", "检验报告"
SECTION = ("30954-2", LOINC_OID, "检验结果")
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"


@dataclass
class LabItem:
    """One result line (an Observation) as the HIS files it."""

    result_id: str
    code: str
    code_system: str  # the site's lab OID, LOINC's OID, or the sender's system URI
    name: str
    status: str  # FHIR Observation.status
    vtype: str = ""  # PQ | IVL_PQ | RTO | CD | ST | TS | INT | BL | "" (no value)
    value: str = ""  # PQ/IVL_PQ/RTO/TS/INT/BL: value attribute; ST: the text; CD: the code
    unit: str = ""
    ucum: str = ""
    comparator: str = ""
    value_system: str = ""  # CD only
    value_name: str = ""  # CD only
    flags: list[str] = field(default_factory=list)
    reference_range: str = ""
    observed_at: str = ""  # HL7 TS
    notes: str = ""


@dataclass
class LabReportDoc:
    doc_id: str
    report_id: str  # setId: stable across corrections
    version: int
    written_at: str  # HL7 TS (issued)
    producer: str  # member id of the producing hospital (custodian)
    lab: str  # performing lab's name
    slip_no: str
    referral_doc: str  # the referral document in this HIS
    mrn: str = ""
    mrn_authority: str = ""
    replaces: str = ""  # the document id of the previous version
    lab_no: str = ""  # the lab's own report number
    code: str = ""
    code_system: str = ""
    name: str = ""
    status: str = ""  # FHIR DiagnosticReport.status
    collected_at: str = ""  # HL7 TS
    conclusion: str = ""
    items: list[LabItem] = field(default_factory=list)


def doc_id_of(report_id: str, version: int) -> str:
    return f"{report_id}-v{version}"


# -- FHIR -> records ------------------------------------------------------------------------


def _num(value: Any) -> str:
    if value is None:
        return ""
    text = str(value)
    return format(Decimal(text), "f") if "e" in text.lower() else text


def _ts(iso: str | None) -> str:
    if not iso:
        return ""
    return iso.replace("-", "") if "T" not in iso else ts(iso)


def _code(codes: Codes, site: Site, cc: Resource | None) -> tuple[str, str, str]:
    """(code, code system, name) in the reader's catalogue, else LOINC, else the sender's."""
    if not cc:
        return "", "", ""
    code, name = codes.local("lab", cc)
    codings = [c for c in cc.get("coding") or [] if c.get("code")]
    found = next((c for c in codings if str(c["code"]) == code), None)
    system = str((found or {}).get("system", ""))
    if found is None or system == codes.source_system("lab"):
        return code, site.lab, name
    return code, LOINC_OID if system == LOINC else system, name


def _value(obs: Resource, item: LabItem) -> None:
    if "valueQuantity" in obs:
        q = obs["valueQuantity"]
        item.vtype, item.value = "PQ", _num(q.get("value"))
        item.comparator = str(q.get("comparator") or "")
        item.unit = str(q.get("unit") or q.get("code") or "")
        ucum = str(q.get("code") or "") if q.get("system") == UCUM else ""
        item.ucum = ucum if ucum != item.unit else ""
    elif "valueRange" in obs:
        low, high = obs["valueRange"].get("low") or {}, obs["valueRange"].get("high") or {}
        item.vtype, item.value = "IVL_PQ", f"{_num(low.get('value'))}-{_num(high.get('value'))}"
        item.unit = str(low.get("unit") or high.get("unit") or "")
    elif "valueRatio" in obs:
        r = obs["valueRatio"]
        item.vtype = "RTO"
        item.value = (
            f"{_num((r.get('numerator') or {}).get('value'))}:"
            f"{_num((r.get('denominator') or {}).get('value'))}"
        )
    elif "valueCodeableConcept" in obs:
        cc = obs["valueCodeableConcept"]
        c = next((c for c in cc.get("coding") or [] if c.get("code")), {})
        item.vtype, item.value = "CD", str(c.get("code", ""))
        item.value_system = str(c.get("system", ""))
        item.value_name = str(c.get("display") or cc.get("text") or "")
    elif "valueString" in obs:
        item.vtype, item.value = "ST", str(obs["valueString"])
    elif "valueDateTime" in obs:
        item.vtype, item.value = "TS", _ts(str(obs["valueDateTime"]))
    elif "valueTime" in obs:
        item.vtype, item.value = "ST", str(obs["valueTime"])
    elif "valueInteger" in obs:
        item.vtype, item.value = "INT", str(obs["valueInteger"])
    elif "valueBoolean" in obs:
        item.vtype, item.value = "BL", "true" if obs["valueBoolean"] else "false"


def _range(obs: Resource) -> str:
    rr = (obs.get("referenceRange") or [{}])[0]
    if rr.get("text"):
        return str(rr["text"])
    low, high = _num((rr.get("low") or {}).get("value")), _num((rr.get("high") or {}).get("value"))
    return f"{low}-{high}" if low and high else f"<{high}" if high else f">{low}" if low else ""


def _lab_number(dr: Resource) -> str:
    for i in dr.get("identifier") or []:
        if "FILL" in [c.get("code") for c in (i.get("type") or {}).get("coding") or []]:
            return str(i.get("value", ""))
    return ""


def from_bundle(
    bundle: Resource,
    codes: Codes,
    site: Site,
    *,
    producer: str,
    slip_no: str,
    referral_doc: str,
    mrn: str,
    mrn_authority: str,
    received_at: str,
) -> list[LabReportDoc]:
    """One document per DiagnosticReport (id and version set by the caller)."""
    resources = [e.get("resource") or {} for e in bundle.get("entry") or []]
    by_ref = {f"{r.get('resourceType')}/{r.get('id')}": r for r in resources if r.get("id")}
    out = []
    for dr in (r for r in resources if r.get("resourceType") == "DiagnosticReport"):
        lab = next(
            (
                str(by_ref.get(p.get("reference", ""), {}).get("name") or p.get("display") or "")
                for p in dr.get("performer") or []
            ),
            "",
        )
        code, system, name = _code(codes, site, dr.get("code"))
        doc = LabReportDoc(
            doc_id="",
            report_id=str(dr["id"]),
            version=0,
            written_at=_ts(str(dr.get("issued") or received_at)),
            producer=producer,
            lab=lab,
            slip_no=slip_no,
            referral_doc=referral_doc,
            mrn=mrn,
            mrn_authority=mrn_authority,
            lab_no=_lab_number(dr),
            code=code,
            code_system=system,
            name=name,
            status=str(dr.get("status", "")),
            collected_at=_ts(dr.get("effectiveDateTime")),
            conclusion=str(dr.get("conclusion") or ""),
        )
        for ref in dr.get("result") or []:
            obs = by_ref.get(ref.get("reference", ""))
            if obs is None:
                continue
            icode, isystem, iname = _code(codes, site, obs.get("code"))
            item = LabItem(
                result_id=str(obs["id"]),
                code=icode,
                code_system=isystem,
                name=iname,
                status=str(obs.get("status", "")),
                flags=[
                    str(c["code"])
                    for i in obs.get("interpretation") or []
                    for c in (i.get("coding") or [])[:1]
                    if c.get("code")
                ],
                reference_range=_range(obs),
                observed_at=_ts(obs.get("effectiveDateTime")),
                notes="\n".join(str(n.get("text") or "") for n in obs.get("note") or []),
            )
            _value(obs, item)
            doc.items.append(item)
        out.append(doc)
    return out


# -- writing --------------------------------------------------------------------------------


def write(doc: LabReportDoc, site: Site, encoding: str = "UTF-8") -> bytes:
    """The document's bytes, checked against ``cda-lab-report.xsd`` (SchemaInvalid if not)."""
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
    org = _el(_el(author, "assignedAuthor"), "representedOrganization")
    _el(org, "id", root=site.org_oid, extension=doc.producer)
    if doc.lab:
        _el(org, "name", doc.lab)
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
    event = _el(_el(root, "documentationOf"), "serviceEvent")
    if doc.lab_no:
        _el(
            event,
            "id",
            root=site.org_oid,
            extension=doc.lab_no,
            assigningAuthorityName=doc.producer,
        )
    if doc.code:
        _el(event, "code", code=doc.code, codeSystem=doc.code_system, displayName=doc.name)
    if doc.collected_at:
        _el(event, "effectiveTime", value=doc.collected_at)
    _el(event, "statusCode", code=doc.status or "unknown")
    code, system, title = SECTION
    sec = _el(_el(_el(_el(root, "component"), "structuredBody"), "component"), "section")
    _el(sec, "code", code=code, codeSystem=system, displayName=title)
    _el(sec, "title", title)
    if doc.conclusion:
        _el(sec, "text", doc.conclusion)
    for it in doc.items:
        o = _el(_el(sec, "entry"), "observation", classCode="OBS", moodCode="EVN")
        _el(o, "id", root=site.doc_oid, extension=it.result_id)
        _el(o, "code", code=it.code, codeSystem=it.code_system, displayName=it.name)
        if it.notes:
            _el(o, "text", it.notes)
        _el(o, "statusCode", code=it.status or "unknown")
        if it.observed_at:
            _el(o, "effectiveTime", value=it.observed_at)
        if it.vtype == "ST":
            _el(o, "value", it.value, type="ST")
        elif it.vtype == "CD":
            _el(
                o,
                "value",
                type="CD",
                code=it.value,
                codeSystem=it.value_system,
                displayName=it.value_name,
            )
        elif it.vtype:
            _el(
                o,
                "value",
                type=it.vtype,
                value=it.value,
                comparator=it.comparator,
                unit=it.unit,
                ucum=it.ucum,
            )
        for flag in it.flags:
            _el(o, "interpretationCode", code=flag)
        if it.reference_range:
            _el(_el(_el(o, "referenceRange"), "observationRange"), "text", it.reference_range)
    xmlsafe.validate(root, LAB_XSD, doc.doc_id)
    return bytes(etree.tostring(root, xml_declaration=True, encoding=encoding, pretty_print=True))


# -- reading (the HIS's side) ---------------------------------------------------------------


def is_lab_report(raw: bytes) -> bool:
    try:
        root = etree.fromstring(raw, xmlsafe.parser())
    except (etree.XMLSyntaxError, ValueError):
        return False
    code = root.find(f"{{{V3}}}code")
    return code is not None and code.get("code") == DOC_CODE


def read(raw: bytes, site: Site, *, record: str) -> LabReportDoc:
    """Check (encoding, hardened parse, XSD) and read a lab report document."""
    xmlsafe.check_encoding(raw, record)
    root = xmlsafe.parse(raw, record)
    xmlsafe.validate(root, LAB_XSD, record)
    r = _Reader(root, record)

    def attr(path: str, name: str, base: Any = None) -> str:
        el = r.opt(path, base)
        return (el.get(name) or "") if el is not None else ""

    ids = {
        i.get("root"): i.get("extension", "")
        for i in root.xpath("v3:inFulfillmentOf/v3:order/v3:id", namespaces=NS)
    }
    if not ids.get(site.doc_oid):
        raise SchemaInvalid(
            f"document {record} does not name its referral document",
            field="/ClinicalDocument/inFulfillmentOf/order/id",
        )
    mrn = r.opt("v3:recordTarget/v3:patientRole/v3:id")
    doc = LabReportDoc(
        doc_id=attr("v3:id", "extension"),
        report_id=attr("v3:setId", "extension"),
        version=int(attr("v3:versionNumber", "value")),
        written_at=attr("v3:effectiveTime", "value"),
        producer=attr(
            "v3:custodian/v3:assignedCustodian/v3:representedCustodianOrganization/v3:id",
            "extension",
        ),
        lab=r.text(
            "v3:author/v3:assignedAuthor/v3:representedOrganization/v3:name", required=False
        ),
        slip_no=ids.get(site.slip_oid, ""),
        referral_doc=ids[site.doc_oid],
        mrn=mrn.get("extension", "") if mrn is not None else "",
        mrn_authority=mrn.get("assigningAuthorityName", "") if mrn is not None else "",
        replaces=attr("v3:relatedDocument[@typeCode='RPLC']/v3:parentDocument/v3:id", "extension"),
        lab_no=attr("v3:documentationOf/v3:serviceEvent/v3:id", "extension"),
        code=attr("v3:documentationOf/v3:serviceEvent/v3:code", "code"),
        code_system=attr("v3:documentationOf/v3:serviceEvent/v3:code", "codeSystem"),
        name=attr("v3:documentationOf/v3:serviceEvent/v3:code", "displayName"),
        status=attr("v3:documentationOf/v3:serviceEvent/v3:statusCode", "code"),
        collected_at=attr("v3:documentationOf/v3:serviceEvent/v3:effectiveTime", "value"),
    )
    sec = r.one("v3:component/v3:structuredBody/v3:component/v3:section")
    doc.conclusion = r.text("v3:text", sec, required=False)
    for o in sec.xpath("v3:entry/v3:observation", namespaces=NS):
        code = r.one("v3:code", o)
        value = r.opt("v3:value", o)
        rng = r.opt("v3:referenceRange/v3:observationRange/v3:text", o)
        item = LabItem(
            result_id=attr("v3:id", "extension", o),
            code=code.get("code", ""),
            code_system=code.get("codeSystem", ""),
            name=code.get("displayName", ""),
            status=attr("v3:statusCode", "code", o),
            flags=[e.get("code", "") for e in o.xpath("v3:interpretationCode", namespaces=NS)],
            reference_range=(rng.text or "") if rng is not None else "",
            observed_at=attr("v3:effectiveTime", "value", o),
            notes=r.text("v3:text", o, required=False),
        )
        if value is not None:
            item.vtype = value.get("type", "")
            if item.vtype == "ST":
                item.value = value.text or ""
            elif item.vtype == "CD":
                item.value, item.value_system, item.value_name = (
                    value.get("code", ""),
                    value.get("codeSystem", ""),
                    value.get("displayName", ""),
                )
            else:
                item.value, item.unit, item.ucum, item.comparator = (
                    value.get("value", ""),
                    value.get("unit", ""),
                    value.get("ucum", ""),
                    value.get("comparator", ""),
                )
        doc.items.append(item)
    return doc
