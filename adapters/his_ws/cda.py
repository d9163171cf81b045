"""The three slips, and a referral's withdrawal (转诊撤销单, :class:`CancelSlip`), as CDA-like
documents (WS/T 500-style header), written and read back.

A :class:`Document` is one slip plus its header: document id, type, when written, the custodian
(the HIS's hospital) and, for an acceptance or return, the referral it answers
(``inFulfillmentOf/order/id``: the referral's slip number and the referral document's id).
:func:`write` gives the bytes; :func:`read` takes bytes from the HIS through the encoding check,
the hardened parser, ``schemas/cda-slip.xsd`` and then this module's own checks (mandatory
sections and values, real dates, codes the site knows), each failure naming the element's XPath.

OIDs: 2.16.156.10011.1.3 (居民身份证号) and 2.16.156.10011.2.3.3.4 (GB/T 2261.1 gender) are the
ones WS/T 500 headers use; the others are a site's own (``Site``), defaulting to the example arc
2.999 (ITU-T X.660) so nobody mistakes them for registered ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from lxml import etree

from adapters.his_ws import xmlsafe
from adapters.his_ws.errors import (
    BadDate,
    BadDocument,
    MissingElement,
    SchemaInvalid,
    UnknownCode,
)
from adapters.slips import AcceptanceSlip, LabResult, Prescription, ReferralSlip, ReturnSlip

V3 = "urn:hl7-org:v3"
NS = {"v3": V3}
CDA_XSD = "cda-slip.xsd"
ID_CARD_OID = "2.16.156.10011.1.3"  # 居民身份证号 (WS/T 500 header)
GENDER_OID = "2.16.156.10011.2.3.3.4"  # GB/T 2261.1 生理性别代码
LOINC_OID = "2.16.840.1.113883.6.1"
CDA_TYPE_ID = ("2.16.840.1.113883.1.3", "POCD_MT000040")
CST = timezone(timedelta(hours=8))  # a time written without offset is China Standard Time

#: document type -> (CDA code, title)
TYPES = {
    "referral": ("ZZD", "双向转诊单"),
    "acceptance": ("JZD", "接诊单"),
    "return": ("ZHD", "转回单"),
    "cancel": ("CXD", "转诊撤销单"),
}
TYPE_OF_CODE = {code: t for t, (code, _) in TYPES.items()}
GENDER = {"unknown": "0", "male": "1", "female": "2", "other": "9"}
GENDER_OF = {v: k for k, v in GENDER.items()}

#: sections by key: (code, code system, title)
SECTIONS = {
    "reason": ("42349-1", LOINC_OID, "转诊原因"),
    "summary": ("10164-2", LOINC_OID, "病历摘要"),
    "diagnosis": ("29548-5", LOINC_OID, "诊断"),
    "course": ("8648-8", LOINC_OID, "诊疗经过"),
    "advice": ("18776-5", LOINC_OID, "康复指导"),
    "drugs": ("10160-0", LOINC_OID, "用药"),
    "labs": ("30954-2", LOINC_OID, "检验结果"),
    "acceptance": ("JZJG", None, "接诊结果"),  # code system: Site.items
    "cancel": ("CXYY", None, "撤销原因"),  # code system: Site.items
}
#: a cancellation's state: asked by the HIS (requested), or the node's notice of the outcome
CANCEL_STATUS = ("requested", "cancelled", "refused")


@dataclass(frozen=True)
class Site:
    """Who writes and which code systems a HIS uses (its local catalogues' OIDs)."""

    member: str  # alliance member id of the hospital (custodian id extension)
    name: str = ""
    org_oid: str = "2.999.156.1"  # custodian / recipient organisation ids (extension: member id)
    doc_oid: str = "2.999.156.2"  # document ids
    slip_oid: str = "2.999.156.3"  # referral slip numbers
    mrn_oid: str = "2.999.156.4"  # the HIS's patient record numbers
    items: str = "2.999.156.5"  # this module's own item codes (kind, priority, decision, ...)
    doc_types: str = "2.999.156.6"  # ZZD / JZD / ZHD
    visit_oid: str = "2.999.156.7"  # the HIS's visit numbers (就诊号/住院号)
    diagnosis: str = "2.999.156.10"
    drug: str = "2.999.156.11"
    lab: str = "2.999.156.12"
    department: str = "2.999.156.13"
    exam: str = "2.999.156.14"  # the HIS's exam catalogue (检查项目)
    accession: str = "2.999.156.15"  # the producing member's accession numbers (检查号)

    def system(self, category: str) -> str:
        return str(getattr(self, category))


@dataclass
class CancelSlip:
    """A referral withdrawn (撤销转诊): asked by the referring doctor in the HIS, or the node's
    notice to either HIS that it was cancelled (or refused: the patient had arrived)."""

    slip_no: str
    reason: str
    status: str = "requested"  # requested | cancelled | refused
    doctor: str = ""
    written_at: str = ""


Slip = ReferralSlip | AcceptanceSlip | ReturnSlip | CancelSlip


@dataclass
class Document:
    doc_id: str
    type: str  # referral | acceptance | return | cancel
    slip: Any  # ReferralSlip | AcceptanceSlip | ReturnSlip | CancelSlip
    written_at: str  # ISO 8601 with offset (effectiveTime)
    custodian: str  # member id of the writing hospital
    referral_doc: str = ""  # acceptance/return/cancel: the referral document it answers


#: (category, code) -> is this code in the site's catalogue?
Known = Callable[[str, str], bool]


# -- time ---------------------------------------------------------------------------------------


def ts(iso: str) -> str:
    """ISO 8601 with offset -> HL7 TS ``yyyyMMddHHmmss+zzzz``."""
    dt = datetime.fromisoformat(iso)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=CST)
    return dt.strftime("%Y%m%d%H%M%S%z")


def iso(value: str, where: str) -> str:
    """HL7 TS -> ISO 8601 (seconds, with offset); BadDate if the moment does not exist."""
    digits, sign, zone = value, "", ""
    for s in "+-":
        if s in value:
            digits, zone = value.split(s, 1)
            sign = s
    try:
        dt = datetime.strptime(digits.ljust(14, "0"), "%Y%m%d%H%M%S")  # noqa: DTZ007 - zone set below
        tz = CST
        if sign:
            h, m = int(zone[:2]), int(zone[2:])
            if h > 14 or m > 59:
                raise ValueError("offset")
            off = timedelta(hours=h, minutes=m)
            tz = timezone(off if sign == "+" else -off)
    except ValueError:
        raise BadDate(
            "not a real date and time (HL7 TS yyyyMMddHHmmss+zzzz)", field=where
        ) from None
    return dt.replace(tzinfo=tz).isoformat(timespec="seconds")


def birth(value: str, where: str) -> str:
    try:
        return (
            datetime.strptime(value[:8], "%Y%m%d").date().isoformat()  # noqa: DTZ007 - a date
            if len(value) >= 8
            else _bad_date(value, where)
        )
    except ValueError:
        return _bad_date(value, where)


def _bad_date(value: str, where: str) -> str:
    raise BadDate("birthTime is not a real date (yyyyMMdd)", field=where)


# -- writing ------------------------------------------------------------------------------------


def _el(parent: etree._Element, tag: str, text: str | None = None, **attrs: str) -> etree._Element:
    e = etree.SubElement(parent, f"{{{V3}}}{tag}", {k: v for k, v in attrs.items() if v != ""})
    if text is not None:
        e.text = text
    return e


def _org(parent: etree._Element, tag: str, site: Site, member: str, name: str = "") -> None:
    org = _el(parent, tag)
    _el(org, "id", root=site.org_oid, extension=member)
    if name:
        _el(org, "name", name)


def _section(body: etree._Element, key: str, site: Site, text: str | None = None) -> etree._Element:
    code, system, title = SECTIONS[key]
    sec = _el(_el(body, "component"), "section")
    _el(sec, "code", code=code, codeSystem=system or site.items, displayName=title)
    _el(sec, "title", title)
    if text is not None:
        _el(sec, "text", text)
    return sec


def _obs(
    sec: etree._Element, item: str, site: Site, text: str | None = None, **value: str
) -> etree._Element:
    o = _el(_el(sec, "entry"), "observation", classCode="OBS", moodCode="EVN")
    _el(o, "code", code=item, codeSystem=site.items)
    if text is not None or value:
        _el(o, "value", text, **value)
    return o


def write(doc: Document, site: Site, encoding: str = "UTF-8") -> bytes:
    """The document's bytes in ``encoding`` (UTF-8 or GB18030), with an XML declaration."""
    code, title = TYPES[doc.type]
    root = etree.Element(f"{{{V3}}}ClinicalDocument", nsmap={None: V3})
    _el(root, "realmCode", code="CN")
    _el(root, "typeId", root=CDA_TYPE_ID[0], extension=CDA_TYPE_ID[1])
    _el(root, "id", root=site.doc_oid, extension=doc.doc_id)
    _el(root, "code", code=code, codeSystem=site.doc_types, displayName=title)
    _el(root, "title", title)
    when = getattr(doc.slip, "written_at", "") or doc.written_at  # the slip's own time wins
    _el(root, "effectiveTime", value=ts(when))
    _el(root, "confidentialityCode", code="N", codeSystem="2.16.840.1.113883.5.25")
    s = doc.slip
    if isinstance(s, ReferralSlip):
        role = _el(_el(root, "recordTarget"), "patientRole")
        if s.id_number:
            _el(role, "id", root=ID_CARD_OID, extension=s.id_number)
        if s.mrn:
            _el(role, "id", root=site.mrn_oid, extension=s.mrn)
        if s.phone:
            _el(role, "telecom", value=f"tel:{s.phone}")
        patient = _el(role, "patient")
        _el(patient, "name", s.patient_name)
        _el(patient, "administrativeGenderCode", code=GENDER[s.gender], codeSystem=GENDER_OID)
        _el(patient, "birthTime", value=s.birth_date.replace("-", ""))
    doctor = s.doctor
    if doctor:
        author = _el(root, "author")
        _el(author, "time", value=ts(when))
        _el(_el(_el(author, "assignedAuthor"), "assignedPerson"), "name", doctor)
    custodian = _el(_el(root, "custodian"), "assignedCustodian")
    _org(custodian, "representedCustodianOrganization", site, doc.custodian, site.name)
    if isinstance(s, ReferralSlip):
        rec = _el(_el(root, "informationRecipient"), "intendedRecipient")
        _org(rec, "receivedOrganization", site, s.to_member)
    order = _el(_el(root, "inFulfillmentOf"), "order")
    _el(order, "id", root=site.slip_oid, extension=s.slip_no)
    if doc.referral_doc:
        _el(order, "id", root=site.doc_oid, extension=doc.referral_doc)
    if isinstance(s, ReferralSlip) and s.consent_by:
        consent = _el(_el(root, "authorization"), "consent")
        _el(consent, "code", code="CONSENT", codeSystem=site.items, displayName=s.consent_by)
        _el(consent, "statusCode", code="completed")
    body = _el(_el(root, "component"), "structuredBody")
    if isinstance(s, ReferralSlip):
        sec = _section(body, "reason", site, s.reason)
        _obs(sec, "kind", site, code=s.kind)
        _obs(sec, "priority", site, code="urgent" if s.urgent else "routine")
        _obs(sec, "department", site, code=s.department_code, codeSystem=site.department)
        _section(body, "summary", site, s.summary)
        sec = _section(body, "diagnosis", site)
        _obs(
            sec,
            "diagnosis",
            site,
            code=s.diagnosis_code,
            codeSystem=site.diagnosis,
            displayName=s.diagnosis_name,
        )
    elif isinstance(s, AcceptanceSlip):
        sec = _section(body, "acceptance", site)
        _obs(sec, "decision", site, code="accepted" if s.accepted else "rejected")
        if s.reason:
            _obs(sec, "reject-reason", site, s.reason)
        if s.appointment_at:
            _obs(sec, "appointment", site, value=ts(s.appointment_at))
        if s.department_code:
            _obs(sec, "department", site, code=s.department_code, codeSystem=site.department)
        if s.bed_no:
            _obs(sec, "bed", site, s.bed_no)
    elif isinstance(s, CancelSlip):
        sec = _section(body, "cancel", site, s.reason)
        _obs(sec, "cancel-status", site, code=s.status)
    else:
        sec = _section(body, "diagnosis", site)
        _obs(
            sec,
            "diagnosis",
            site,
            code=s.diagnosis_code,
            codeSystem=site.diagnosis,
            displayName=s.diagnosis_name,
        )
        sec = _section(body, "course", site, s.course)
        _obs(sec, "return-type", site, code="discharge" if s.discharge else "outpatient")
        _section(body, "advice", site, s.advice)
        sec = _section(body, "drugs", site)
        for p in s.prescriptions:
            sa = _el(
                _el(sec, "entry"), "substanceAdministration", classCode="SBADM", moodCode="INT"
            )
            drug = _el(_el(_el(sa, "consumable"), "manufacturedProduct"), "manufacturedLabeledDrug")
            _el(drug, "code", code=p.drug_code, codeSystem=site.drug, displayName=p.drug_name)
            _el(sa, "doseText", p.dose)
            _el(sa, "frequency", code=p.frequency)
            _el(sa, "duration", value=str(p.days), unit="d")
        sec = _section(body, "labs", site)
        for r in s.results:
            o = _el(_el(sec, "entry"), "observation", classCode="OBS", moodCode="EVN")
            _el(o, "code", code=r.item_code, codeSystem=site.lab, displayName=r.item_name)
            _el(o, "value", value=r.value, unit=r.unit)
            if r.flag:
                _el(o, "interpretationCode", code=r.flag)
            if r.reference_range:
                _el(_el(_el(o, "referenceRange"), "observationRange"), "text", r.reference_range)
    return bytes(etree.tostring(root, xml_declaration=True, encoding=encoding, pretty_print=True))


# -- reading ------------------------------------------------------------------------------------


class _Reader:
    """XPath look-ups that raise MissingElement naming the path they wanted."""

    def __init__(self, root: etree._Element, record: str) -> None:
        self.root = root
        self.record = record

    def one(self, path: str, base: etree._Element | None = None) -> etree._Element:
        found = self.opt(path, base)
        if found is None:
            where = xmlsafe.readable_path(base) if base is not None else ""
            raise MissingElement(
                f"document {self.record} lacks mandatory {path}",
                field=f"{where}/{path.replace('v3:', '')}"
                if where
                else "/ClinicalDocument/" + path.replace("v3:", ""),
            )
        return found

    def opt(self, path: str, base: etree._Element | None = None) -> etree._Element | None:
        hits = (base if base is not None else self.root).xpath(path, namespaces=NS)
        return hits[0] if hits else None

    def text(self, path: str, base: etree._Element | None = None, *, required: bool = True) -> str:
        el = self.one(path, base) if required else self.opt(path, base)
        value = (el.text or "").strip() if el is not None else ""
        if required and not value:
            raise MissingElement(
                f"document {self.record}: {path} is empty", field=xmlsafe.readable_path(el)
            )
        return value

    def attr(self, el: etree._Element, name: str) -> str:
        value = (el.get(name) or "").strip()
        if not value:
            raise MissingElement(
                f"document {self.record}: @{name} is empty",
                field=f"{xmlsafe.readable_path(el)}/@{name}",
            )
        return value

    def section(self, key: str) -> etree._Element:
        code = SECTIONS[key][0]
        path = f"v3:component/v3:structuredBody/v3:component/v3:section[v3:code/@code='{code}']"
        found = self.opt(path)
        if found is None:
            raise MissingElement(
                f"document {self.record} lacks the {key} section ({code})",
                field=f"/ClinicalDocument/component/structuredBody/component"
                f"/section[code/@code='{code}']",
            )
        return found

    def item(
        self, sec: etree._Element, item: str, *, required: bool = True
    ) -> etree._Element | None:
        path = f"v3:entry/v3:observation[v3:code/@code='{item}']/v3:value"
        found = self.opt(path, sec)
        if found is None and required:
            raise MissingElement(
                f"document {self.record} lacks the '{item}' entry",
                field=f"{xmlsafe.readable_path(sec)}/entry/observation[code/@code='{item}']/value",
            )
        return found

    def coded(self, el: etree._Element, category: str, site: Site, known: Known | None) -> str:
        code = self.attr(el, "code")
        where = f"{xmlsafe.readable_path(el)}/@code"
        system = el.get("codeSystem") or ""
        if system != site.system(category):
            raise UnknownCode(
                f"document {self.record}: {category} code system '{system}' is "
                f"not this site's ({site.system(category)})",
                field=where,
            )
        if known is not None and not known(category, code):
            raise UnknownCode(
                f"document {self.record}: {category} code '{code}' is not in the site's catalogue",
                field=where,
            )
        return code

    def choice(self, el: etree._Element, allowed: tuple[str, ...]) -> str:
        code = self.attr(el, "code")
        if code not in allowed:
            raise UnknownCode(
                f"document {self.record}: '{code}' is not one of {', '.join(allowed)}",
                field=f"{xmlsafe.readable_path(el)}/@code",
            )
        return code


KINDS = ("up-outpatient", "up-inpatient", "up-exam", "down-outpatient", "down-discharge")


#: slip field (adapters.slips, as named by adapters.slips_fhir errors) -> the element holding it
FIELD_PATHS = {
    "slip_no": "/ClinicalDocument/inFulfillmentOf/order/id[1]/@extension",
    "kind": "/ClinicalDocument/component/structuredBody/component/section[code/@code='42349-1']"
    "/entry/observation[code/@code='kind']/value/@code",
    "to_member": "/ClinicalDocument/informationRecipient/intendedRecipient/receivedOrganization"
    "/id/@extension",
    "patient_name": "/ClinicalDocument/recordTarget/patientRole/patient/name",
    "gender": "/ClinicalDocument/recordTarget/patientRole/patient/administrativeGenderCode/@code",
    "birth_date": "/ClinicalDocument/recordTarget/patientRole/patient/birthTime/@value",
    "id_number": f"/ClinicalDocument/recordTarget/patientRole/id[@root='{ID_CARD_OID}']/@extension",
    "diagnosis_code": "/ClinicalDocument/component/structuredBody/component/section[code/@code="
    "'29548-5']/entry/observation[code/@code='diagnosis']/value/@code",
    "written_at": "/ClinicalDocument/effectiveTime/@value",
    "appointment_at": "/ClinicalDocument/component/structuredBody/component/section/entry"
    "/observation[code/@code='appointment']/value/@value",
    "consent_by": "/ClinicalDocument/authorization/consent/code/@displayName",
}


def field_path(slip_field: str) -> str:
    """The XPath of a slip field; list items (``prescriptions[0].dose``) by section entry."""
    if slip_field in FIELD_PATHS:
        return FIELD_PATHS[slip_field]
    head, _, rest = slip_field.partition(".")
    for name, key in (("prescriptions", "10160-0"), ("results", "30954-2")):
        if head.startswith(name + "["):
            n = int(head[len(name) + 1 : -1]) + 1
            return (
                f"/ClinicalDocument/component/structuredBody/component/section[code/@code="
                f"'{key}']/entry[{n}]" + (f" ({rest})" if rest else "")
            )
    return f"/ClinicalDocument ({slip_field})"


def identify(raw: bytes) -> tuple[str | None, str | None]:
    """(document id, document type) a held document claims, read leniently only to name it
    and route a quarantine replay; None where unreadable. :func:`read` checks everything."""
    try:
        root = etree.fromstring(raw, xmlsafe.parser())
    except (etree.XMLSyntaxError, ValueError):
        return None, None
    id_el, code_el = root.find(f"{{{V3}}}id"), root.find(f"{{{V3}}}code")
    doc_id = id_el.get("extension") if id_el is not None else None
    dtype = TYPE_OF_CODE.get(code_el.get("code", "")) if code_el is not None else None
    return doc_id or None, dtype


def read(
    raw: bytes,
    site: Site,
    *,
    record: str,
    known: Known | None = None,
    expect: str | None = None,
    from_node: bool = False,
) -> Document:
    """Check and read one document from the HIS (``record`` names it in every error).

    ``expect``: the type the envelope announced; a different document code is SchemaInvalid.
    ``from_node``: a document the node wrote (the HIS's side), which never has the ID number.
    """
    try:
        return _read(raw, site, record, known, expect, from_node)
    except BadDocument as exc:
        if record not in exc.message:
            exc.message = f"document {record}: {exc.message}"
        raise


def _read(
    raw: bytes, site: Site, record: str, known: Known | None, expect: str | None, from_node: bool
) -> Document:
    xmlsafe.check_encoding(raw, record)
    root = xmlsafe.parse(raw, record)
    xmlsafe.validate(root, CDA_XSD, record)
    r = _Reader(root, record)
    doc_id = r.attr(r.one("v3:id"), "extension")
    dtype = TYPE_OF_CODE[r.one("v3:code").get("code", "")]
    if expect is not None and dtype != expect:
        raise SchemaInvalid(
            f"document {record} is a {dtype} document, listed as {expect}",
            field="/ClinicalDocument/code/@code",
        )
    written = iso(
        r.one("v3:effectiveTime").get("value", ""), "/ClinicalDocument/effectiveTime/@value"
    )
    custodian = r.attr(
        r.one("v3:custodian/v3:assignedCustodian/v3:representedCustodianOrganization/v3:id"),
        "extension",
    )
    doctor = r.text(
        "v3:author/v3:assignedAuthor/v3:assignedPerson/v3:name",
        required=dtype not in ("acceptance", "cancel"),
    )
    order_ids = root.xpath("v3:inFulfillmentOf/v3:order/v3:id", namespaces=NS)
    slip_no = next(
        (i.get("extension", "") for i in order_ids if i.get("root") == site.slip_oid), ""
    )
    if not slip_no:
        raise MissingElement(
            f"document {record} lacks its referral slip number",
            field=f"/ClinicalDocument/inFulfillmentOf/order/id[@root='{site.slip_oid}']/@extension",
        )
    referral_doc = next(
        (i.get("extension", "") for i in order_ids if i.get("root") == site.doc_oid), ""
    )
    if dtype != "referral" and not referral_doc:
        raise MissingElement(
            f"document {record} does not name the referral document it answers",
            field=f"/ClinicalDocument/inFulfillmentOf/order/id[@root='{site.doc_oid}']/@extension",
        )
    slip: Slip
    if dtype == "referral":
        slip = _referral(r, site, known, slip_no, doctor, written, from_node)
    elif dtype == "acceptance":
        slip = _acceptance(r, site, known, slip_no, doctor)
    elif dtype == "cancel":
        sec = r.section("cancel")
        status = r.item(sec, "cancel-status", required=False)
        slip = CancelSlip(
            slip_no,
            r.text("v3:text", sec),
            r.choice(status, CANCEL_STATUS) if status is not None else "requested",
            doctor,
            written,
        )
    else:
        slip = _return(r, site, known, slip_no, doctor, written)
    return Document(doc_id, dtype, slip, written, custodian, referral_doc)


def id_number_in(raw: bytes) -> str | None:
    """The patient's ID card number in a (possibly refused) document's header, or None: the
    quarantined item is hashed under it so IT finds it by patient (every document type of the
    web-service HIS keeps it at ``recordTarget/patientRole/id[@root=ID_CARD_OID]``)."""
    if not raw:
        return None
    try:
        root = etree.fromstring(raw, xmlsafe.parser())
    except (etree.XMLSyntaxError, ValueError):
        return None
    found = root.xpath(
        f"v3:recordTarget/v3:patientRole/v3:id[@root='{ID_CARD_OID}']/@extension", namespaces=NS
    )
    return str(found[0]).strip() or None if found else None


def _referral(
    r: _Reader,
    site: Site,
    known: Known | None,
    slip_no: str,
    doctor: str,
    written: str,
    from_node: bool,
) -> ReferralSlip:
    role = r.one("v3:recordTarget/v3:patientRole")
    ids = {i.get("root"): i for i in role.xpath("v3:id", namespaces=NS)}
    if ID_CARD_OID not in ids and not from_node:
        raise MissingElement(
            f"document {r.record} lacks the patient's ID card number",
            field=f"/ClinicalDocument/recordTarget/patientRole/id[@root='{ID_CARD_OID}']",
        )
    id_number = r.attr(ids[ID_CARD_OID], "extension") if ID_CARD_OID in ids else ""
    mrn = ids[site.mrn_oid].get("extension", "") if site.mrn_oid in ids else ""
    tel = r.opt("v3:telecom", role)
    phone = (tel.get("value") or "").removeprefix("tel:") if tel is not None else ""
    patient = r.one("v3:patient", role)
    gender_el = r.one("v3:administrativeGenderCode", patient)
    birth_el = r.one("v3:birthTime", patient)
    recipient = r.one("v3:informationRecipient/v3:intendedRecipient/v3:receivedOrganization/v3:id")
    consent = r.opt("v3:authorization/v3:consent/v3:code")
    reason = r.section("reason")
    diag = r.item(r.section("diagnosis"), "diagnosis")
    assert diag is not None
    kind_el = r.item(reason, "kind")
    prio_el = r.item(reason, "priority")
    dept_el = r.item(reason, "department")
    assert kind_el is not None and prio_el is not None and dept_el is not None
    return ReferralSlip(
        slip_no=slip_no,
        kind=r.choice(kind_el, KINDS),
        to_member=r.attr(recipient, "extension"),
        patient_name=r.text("v3:name", patient),
        gender=GENDER_OF[gender_el.get("code", "")],
        birth_date=birth(birth_el.get("value", ""), xmlsafe.readable_path(birth_el) + "/@value"),
        id_number=id_number,
        phone=phone,
        mrn=mrn,
        diagnosis_code=r.coded(diag, "diagnosis", site, known),
        diagnosis_name=diag.get("displayName", ""),
        reason=r.text("v3:text", reason),
        summary=r.text("v3:text", r.section("summary")),
        department_code=r.coded(dept_el, "department", site, known),
        urgent=r.choice(prio_el, ("urgent", "routine")) == "urgent",
        consent_by=(consent.get("displayName") or "") if consent is not None else "",
        doctor=doctor,
        written_at=written,
    )


def _acceptance(
    r: _Reader, site: Site, known: Known | None, slip_no: str, doctor: str
) -> AcceptanceSlip:
    sec = r.section("acceptance")
    decision = r.item(sec, "decision")
    assert decision is not None
    accepted = r.choice(decision, ("accepted", "rejected")) == "accepted"
    reason = r.item(sec, "reject-reason", required=False)
    appt = r.item(sec, "appointment", required=False)
    dept = r.item(sec, "department", required=False)
    bed = r.item(sec, "bed", required=False)
    if not accepted and (reason is None or not (reason.text or "").strip()):
        raise MissingElement(
            f"document {r.record}: a rejection needs its reason",
            field=f"{xmlsafe.readable_path(sec)}/entry/observation"
            "[code/@code='reject-reason']/value",
        )
    return AcceptanceSlip(
        slip_no=slip_no,
        accepted=accepted,
        reason=(reason.text or "").strip() if reason is not None else "",
        appointment_at=iso(appt.get("value", ""), xmlsafe.readable_path(appt) + "/@value")
        if appt is not None
        else "",
        department_code=r.coded(dept, "department", site, known) if dept is not None else "",
        bed_no=(bed.text or "").strip() if bed is not None else "",
        doctor=doctor,
    )


def _return(
    r: _Reader, site: Site, known: Known | None, slip_no: str, doctor: str, written: str
) -> ReturnSlip:
    diag = r.item(r.section("diagnosis"), "diagnosis")
    course = r.section("course")
    kind = r.item(course, "return-type")
    assert diag is not None and kind is not None
    prescriptions = []
    for sa in r.section("drugs").xpath("v3:entry/v3:substanceAdministration", namespaces=NS):
        drug = r.one("v3:consumable/v3:manufacturedProduct/v3:manufacturedLabeledDrug/v3:code", sa)
        prescriptions.append(
            Prescription(
                drug_code=r.coded(drug, "drug", site, known),
                drug_name=drug.get("displayName", ""),
                dose=r.text("v3:doseText", sa),
                frequency=r.attr(r.one("v3:frequency", sa), "code"),
                days=int(r.one("v3:duration", sa).get("value", "0")),
            )
        )
    results = []
    for o in r.section("labs").xpath("v3:entry/v3:observation", namespaces=NS):
        code = r.one("v3:code", o)
        value = r.one("v3:value", o)
        interp = r.opt("v3:interpretationCode", o)
        rng = r.opt("v3:referenceRange/v3:observationRange/v3:text", o)
        results.append(
            LabResult(
                item_code=r.coded(code, "lab", site, known),
                item_name=code.get("displayName", ""),
                value=r.attr(value, "value"),
                unit=value.get("unit", ""),
                flag=interp.get("code", "") if interp is not None else "",
                reference_range=(rng.text or "").strip() if rng is not None else "",
            )
        )
    return ReturnSlip(
        slip_no=slip_no,
        discharge=r.choice(kind, ("discharge", "outpatient")) == "discharge",
        diagnosis_code=r.coded(diag, "diagnosis", site, known),
        diagnosis_name=diag.get("displayName", ""),
        course=r.text("v3:text", course),
        advice=r.text("v3:text", r.section("advice")),
        doctor=doctor,
        written_at=written,
        prescriptions=prescriptions,
        results=results,
    )
