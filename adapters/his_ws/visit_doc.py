"""Visit documents of the web-service HIS (就诊事件: admission, transfer, discharge, ...) as
CDA-like XML (WS/T 500-style header as the slips), written (the simulated HIS) and read back.

The HIS offers one document per event of a visit (``GetPendingDocuments`` type ``visit``),
checked on intake through the encoding check, the hardened parser, ``schemas/cda-visit.xsd`` and
then here (parts each event needs, real dates, known department codes), every failure naming
the element's XPath. Fields (the :class:`~adapters.visits.Visit` each becomes):

==============================================================  ============================
``code/@code``: RYDJ 入院登记, GHDJ 门急诊挂号, ZKDJ 转科登记,  ``event``: admit, register,
CYDJ 出院登记, XXXG 就诊信息修改, QXRY 取消入院/退号, QXZK 取消   transfer, discharge, update,
转科, QXCY 取消出院                                              cancel-admit, -transfer,
                                                                 -discharge
``effectiveTime/@value``: when the HIS recorded the event        ``recorded_at``
``recordTarget/patientRole/id[@root=<mrn OID>]/@extension``      ``mrn`` (required)
``recordTarget/patientRole/id[@root=2.16.156.10011.1.3]``        ``id_number`` (optional)
``recordTarget/patientRole/telecom/@value`` (``tel:``)            ``phone``
``.../patient/name``, ``administrativeGenderCode/@code``          ``patient_name``, ``gender``
(GB/T 2261.1), ``birthTime/@value``                               ``birth_date``
``componentOf/encompassingEncounter/id[@root=<visit OID>]``       ``visit_no``
``.../encompassingEncounter/code/@code`` AMB / EMER / IMP         ``visit_class``
``.../effectiveTime/low/@value``, ``high/@value``                 ``admitted_at``,
                                                                  ``discharged_at`` (discharge)
``.../responsibleParty/assignedEntity/assignedPerson/name``       ``doctor``
``.../location/healthCareFacility/code/@code`` (department OID)   ``department_code``
``.../location/healthCareFacility/location/name``                 ``ward``
section JZXX entry ``bed`` (text), ``status`` (code: planned,     ``bed``, ``status``,
arrived, in-progress, finished, cancelled), ``transfer-time``     ``transferred_at`` (transfer)
(value TS)
``inFulfillmentOf/order/id[@root=<document OID>]/@extension``     the referral document this
                                                                  HIS received (the option
                                                                  ``visit_referral`` says
                                                                  whether to read it)
==============================================================  ============================
"""

from __future__ import annotations

from dataclasses import dataclass

from lxml import etree

from adapters.his_ws import xmlsafe
from adapters.his_ws.cda import (
    CDA_TYPE_ID,
    GENDER,
    GENDER_OF,
    GENDER_OID,
    ID_CARD_OID,
    NS,
    V3,
    Known,
    Site,
    _el,
    _org,
    _Reader,
    birth,
    iso,
    ts,
)
from adapters.his_ws.errors import BadDocument, MissingElement, SchemaInvalid
from adapters.visits import Visit

VISIT_XSD = "cda-visit.xsd"
ACT_CODE_OID = "2.16.840.1.113883.5.4"
#: document code -> (event, title)
CODES = {
    "RYDJ": ("admit", "入院登记"),
    "GHDJ": ("register", "门急诊挂号登记"),
    "ZKDJ": ("transfer", "转科登记"),
    "CYDJ": ("discharge", "出院登记"),
    "XXXG": ("update", "就诊信息修改"),
    "QXRY": ("cancel-admit", "取消入院"),
    "QXZK": ("cancel-transfer", "取消转科"),
    "QXCY": ("cancel-discharge", "取消出院"),
}
CODE_OF = {event: code for code, (event, _) in CODES.items()}
CLASS_CODES = {
    "outpatient": ("AMB", "门诊"),
    "emergency": ("EMER", "急诊"),
    "inpatient": ("IMP", "住院"),
}
CLASS_OF = {code: c for c, (code, _) in CLASS_CODES.items()}
SECTION = ("JZXX", "就诊信息")
STATUSES = ("planned", "arrived", "in-progress", "finished", "cancelled")
DOC_TYPE = "visit"  # as GetPendingDocuments lists these documents
ENCOUNTER = "/ClinicalDocument/componentOf/encompassingEncounter"
#: visit field -> the element holding it (quarantine reasons name it)
FIELD_PATHS = {
    "event": "/ClinicalDocument/code/@code",
    "recorded_at": "/ClinicalDocument/effectiveTime/@value",
    "visit_no": f"{ENCOUNTER}/id/@extension",
    "visit_class": f"{ENCOUNTER}/code/@code",
    "admitted_at": f"{ENCOUNTER}/effectiveTime/low/@value",
    "discharged_at": f"{ENCOUNTER}/effectiveTime/high/@value",
    "department_code": f"{ENCOUNTER}/location/healthCareFacility/code/@code",
    "ward": f"{ENCOUNTER}/location/healthCareFacility/location/name",
    "doctor": f"{ENCOUNTER}/responsibleParty/assignedEntity/assignedPerson/name",
    "mrn": "/ClinicalDocument/recordTarget/patientRole/id/@extension",
    "id_number": f"/ClinicalDocument/recordTarget/patientRole/id[@root='{ID_CARD_OID}']/@extension",
    "patient_name": "/ClinicalDocument/recordTarget/patientRole/patient/name",
    "gender": "/ClinicalDocument/recordTarget/patientRole/patient/administrativeGenderCode/@code",
    "birth_date": "/ClinicalDocument/recordTarget/patientRole/patient/birthTime/@value",
    "bed": "/ClinicalDocument/component/structuredBody/component/section/entry/observation"
    "[code/@code='bed']/value",
    "status": "/ClinicalDocument/component/structuredBody/component/section/entry/observation"
    "[code/@code='status']/value/@code",
    "transferred_at": "/ClinicalDocument/component/structuredBody/component/section/entry"
    "/observation[code/@code='transfer-time']/value/@value",
    "referral_no": "/ClinicalDocument/inFulfillmentOf/order/id/@extension",
}


@dataclass
class VisitDoc:
    doc_id: str
    visit: Visit
    custodian: str  # member id of the writing hospital
    referral_doc: str = ""  # the referral document (in this HIS) the visit fulfils
    slip_no: str = ""  # that referral's slip number


def field_path(visit_field: str) -> str:
    return FIELD_PATHS.get(visit_field, f"/ClinicalDocument ({visit_field})")


def identify(raw: bytes) -> tuple[str | None, bool]:
    """(document id, is a visit document), read leniently only to route a quarantine replay."""
    try:
        root = etree.fromstring(raw, xmlsafe.parser())
    except (etree.XMLSyntaxError, ValueError):
        return None, False
    id_el, code_el = root.find(f"{{{V3}}}id"), root.find(f"{{{V3}}}code")
    doc_id = id_el.get("extension") if id_el is not None else None
    return doc_id or None, code_el is not None and code_el.get("code", "") in CODES


# -- writing (the HIS) ---------------------------------------------------------------------------


def write(doc: VisitDoc, site: Site, encoding: str = "UTF-8") -> bytes:
    """The document's bytes in ``encoding`` (UTF-8 or GB18030), with an XML declaration."""
    v = doc.visit
    code = CODE_OF[v.event]
    root = etree.Element(f"{{{V3}}}ClinicalDocument", nsmap={None: V3})
    _el(root, "realmCode", code="CN")
    _el(root, "typeId", root=CDA_TYPE_ID[0], extension=CDA_TYPE_ID[1])
    _el(root, "id", root=site.doc_oid, extension=doc.doc_id)
    _el(root, "code", code=code, codeSystem=site.doc_types, displayName=CODES[code][1])
    _el(root, "title", CODES[code][1])
    _el(root, "effectiveTime", value=ts(v.recorded_at or v.admitted_at))
    _el(root, "confidentialityCode", code="N", codeSystem="2.16.840.1.113883.5.25")
    role = _el(_el(root, "recordTarget"), "patientRole")
    if v.id_number:
        _el(role, "id", root=ID_CARD_OID, extension=v.id_number)
    _el(role, "id", root=site.mrn_oid, extension=v.mrn)
    if v.phone:
        _el(role, "telecom", value=f"tel:{v.phone}")
    patient = _el(role, "patient")
    _el(patient, "name", v.patient_name)
    _el(patient, "administrativeGenderCode", code=GENDER[v.gender], codeSystem=GENDER_OID)
    _el(patient, "birthTime", value=v.birth_date.replace("-", ""))
    _org(
        _el(_el(root, "custodian"), "assignedCustodian"),
        "representedCustodianOrganization",
        site,
        doc.custodian,
        site.name,
    )
    if doc.slip_no or doc.referral_doc:
        order = _el(_el(root, "inFulfillmentOf"), "order")
        if doc.slip_no:
            _el(order, "id", root=site.slip_oid, extension=doc.slip_no)
        if doc.referral_doc:
            _el(order, "id", root=site.doc_oid, extension=doc.referral_doc)
    enc = _el(_el(root, "componentOf"), "encompassingEncounter")
    _el(enc, "id", root=site.visit_oid, extension=v.visit_no)
    klass, label = CLASS_CODES[v.visit_class]
    _el(enc, "code", code=klass, codeSystem=ACT_CODE_OID, displayName=label)
    period = _el(enc, "effectiveTime")
    _el(period, "low", value=ts(v.admitted_at))
    if v.discharged_at:
        _el(period, "high", value=ts(v.discharged_at))
    if v.doctor:
        _el(
            _el(_el(_el(enc, "responsibleParty"), "assignedEntity"), "assignedPerson"),
            "name",
            v.doctor,
        )
    if v.department_code or v.ward:
        facility = _el(_el(enc, "location"), "healthCareFacility")
        if v.department_code:
            _el(facility, "code", code=v.department_code, codeSystem=site.department)
        if v.ward:
            _el(_el(facility, "location"), "name", v.ward)
    sec = _el(_el(_el(_el(root, "component"), "structuredBody"), "component"), "section")
    _el(sec, "code", code=SECTION[0], codeSystem=site.items, displayName=SECTION[1])
    _el(sec, "title", SECTION[1])
    for item, text, attrs in (
        ("status", None, {"code": v.status} if v.status else None),
        ("bed", v.bed or None, {} if v.bed else None),
        ("transfer-time", None, {"value": ts(v.transferred_at)} if v.transferred_at else None),
    ):
        if attrs is None:
            continue
        o = _el(_el(sec, "entry"), "observation", classCode="OBS", moodCode="EVN")
        _el(o, "code", code=item, codeSystem=site.items)
        _el(o, "value", text, **attrs)
    return bytes(etree.tostring(root, xml_declaration=True, encoding=encoding, pretty_print=True))


# -- reading (the adapter) -----------------------------------------------------------------------


def read(raw: bytes, site: Site, *, record: str, known: Known | None = None) -> VisitDoc:
    """Check and read one visit document from the HIS (``record`` names it in every error).
    Whether the visit's values agree (times, status) is :func:`adapters.visits.check`'s."""
    try:
        return _read(raw, site, record, known)
    except BadDocument as exc:
        if record not in exc.message:
            exc.message = f"document {record}: {exc.message}"
        raise


def _read(raw: bytes, site: Site, record: str, known: Known | None) -> VisitDoc:
    xmlsafe.check_encoding(raw, record)
    root = xmlsafe.parse(raw, record)
    xmlsafe.validate(root, VISIT_XSD, record)
    r = _Reader(root, record)
    doc_id = r.attr(r.one("v3:id"), "extension")
    event = CODES[r.one("v3:code").get("code", "")][0]
    recorded = iso(r.one("v3:effectiveTime").get("value", ""), FIELD_PATHS["recorded_at"])
    custodian = r.attr(
        r.one("v3:custodian/v3:assignedCustodian/v3:representedCustodianOrganization/v3:id"),
        "extension",
    )
    role = r.one("v3:recordTarget/v3:patientRole")
    ids = {i.get("root"): i for i in role.xpath("v3:id", namespaces=NS)}
    if site.mrn_oid not in ids:
        raise MissingElement(
            f"document {record} lacks the patient's record number",
            field=f"/ClinicalDocument/recordTarget/patientRole/id[@root="
            f"'{site.mrn_oid}']/@extension",
        )
    mrn = r.attr(ids[site.mrn_oid], "extension")
    id_number = r.attr(ids[ID_CARD_OID], "extension") if ID_CARD_OID in ids else ""
    tel = r.opt("v3:telecom", role)
    patient = r.one("v3:patient", role)
    birth_el = r.one("v3:birthTime", patient)
    enc = r.one("v3:componentOf/v3:encompassingEncounter")
    visit_id = r.one("v3:id", enc)
    if visit_id.get("root") != site.visit_oid:
        raise SchemaInvalid(
            f"document {record}: the visit number is not under this HIS's visit "
            f"OID ({site.visit_oid})",
            field=f"{ENCOUNTER}/id/@root",
        )
    low = r.one("v3:effectiveTime/v3:low", enc)
    high = r.opt("v3:effectiveTime/v3:high", enc)
    dept = r.opt("v3:location/v3:healthCareFacility/v3:code", enc)
    sec = r.one("v3:component/v3:structuredBody/v3:component/v3:section")
    status = r.item(sec, "status", required=False)
    bed = r.item(sec, "bed", required=False)
    moved = r.item(sec, "transfer-time", required=False)
    order_ids = root.xpath("v3:inFulfillmentOf/v3:order/v3:id", namespaces=NS)
    visit = Visit(
        visit_no=r.attr(visit_id, "extension"),
        event=event,
        visit_class=CLASS_OF[r.one("v3:code", enc).get("code", "")],
        mrn=mrn,
        patient_name=r.text("v3:name", patient),
        gender=GENDER_OF[r.one("v3:administrativeGenderCode", patient).get("code", "")],
        birth_date=birth(birth_el.get("value", ""), FIELD_PATHS["birth_date"]),
        admitted_at=iso(low.get("value", ""), FIELD_PATHS["admitted_at"]),
        status=r.choice(status, STATUSES) if status is not None else "",
        id_number=id_number,
        phone=(tel.get("value") or "").removeprefix("tel:") if tel is not None else "",
        department_code=r.coded(dept, "department", site, known) if dept is not None else "",
        ward=r.text("v3:location/v3:healthCareFacility/v3:location/v3:name", enc, required=False),
        bed=(bed.text or "").strip() if bed is not None else "",
        transferred_at=iso(r.attr(moved, "value"), FIELD_PATHS["transferred_at"])
        if moved is not None
        else "",
        discharged_at=iso(high.get("value", ""), FIELD_PATHS["discharged_at"])
        if high is not None
        else "",
        recorded_at=recorded,
        doctor=r.text(
            "v3:responsibleParty/v3:assignedEntity/v3:assignedPerson/v3:name", enc, required=False
        ),
    )
    return VisitDoc(
        doc_id,
        visit,
        custodian,
        referral_doc=next(
            (i.get("extension", "") for i in order_ids if i.get("root") == site.doc_oid), ""
        ),
        slip_no=next(
            (i.get("extension", "") for i in order_ids if i.get("root") == site.slip_oid), ""
        ),
    )
