"""The web-service HIS's consultation documents (``schemas/consult.xsd``), written and read.

=======================  =========  ==============================================================
document                 direction  what
=======================  =========  ==============================================================
``ConsultRequest``       HIS->node  远程会诊申请单 (pending type ``consult``): the fields of
                                    :class:`~adapters.consult_slips.ConsultSlip`, ``specialty``
                                    and ``shared_report`` repeated -> ``submit_consultation``
``ConsultRecords``       HIS->node  补充资料 (pending type ``consult-records``): ``consult_doc`` the
                                    request document's id -> ``resubmit``
``ConsultCancel``        HIS->node  会诊撤回单 (``consult-cancel``): ``consult_doc``, ``reason`` ->
                                    the inviter's ``cancel`` (the centre answers ``cancelled``)
``ConsultStatus``        node->HIS  会诊状态通知 (``ReceiveConsultStatus``, id = the packet id):
                                    event, step, Task status, what is missing / why cancelled,
                                    the meeting (start, end, video link, experts)
``ConsultReport``        node->HIS  会诊报告 (``ReceiveConsultReport``, id ``<packet id>-R``): the
                                    diagnosis in the site's codes, advice, referral
                                    recommendation; an imaging reading's conclusion, study UID
                                    and the PDF (base64 of its exact bytes)
=======================  =========  ==============================================================

Every document is checked against the XSD before it leaves and when it is read; a refusal
names the element (``/ConsultRequest/question``).
"""

from __future__ import annotations

import base64
from dataclasses import asdict, dataclass, fields
from typing import Any

from lxml import etree

from adapters import consult_slips as cs
from adapters.his_ws import xmlsafe

NS = "urn:hutong:his-ws:consult:1"
XSD = "consult.xsd"
ROOTS = {
    "consult": "ConsultRequest",
    "consult-records": "ConsultRecords",
    "consult-cancel": "ConsultCancel",
    "consult-status": "ConsultStatus",
    "consult-report": "ConsultReport",
}
TYPE_OF_ROOT = {v: k for k, v in ROOTS.items()}


@dataclass
class Doc:
    """One consultation document: its id, type, the request it belongs to, its record."""

    doc_id: str
    type: str  # a key of ROOTS
    record: Any  # ConsultSlip | ResubmitSlip | ConsultStatus | ConsultReport
    consult_doc: str = ""  # the request document (not on a request itself)
    thread: str = ""  # on a status: the consultation id


def field_path(doc_type: str, field: str) -> str:
    """The element a slip field travels in (refusals name it)."""
    name = {"specialties": "specialty", "shared_results": "shared_report"}.get(field, field)
    return f"/{ROOTS.get(doc_type, 'ConsultRequest')}/{name}"


def _q(tag: str) -> str:
    return f"{{{NS}}}{tag}"


def _add(root: etree._Element, tag: str, value: Any) -> None:
    if value is None or value == "":
        return
    el = etree.SubElement(root, _q(tag))
    el.text = ("true" if value else "false") if isinstance(value, bool) else str(value)


def write(doc: Doc, encoding: str = "UTF-8") -> bytes:
    root = etree.Element(_q(ROOTS[doc.type]), nsmap={None: NS})
    _add(root, "id", doc.doc_id)
    r = doc.record
    if doc.type == "consult":
        for f in fields(cs.ConsultSlip):
            value = getattr(r, f.name)
            if f.name == "specialties":
                for s in cs._split(value):
                    _add(root, "specialty", s)
            elif f.name == "shared_results":
                for s in cs._split(value):
                    _add(root, "shared_report", s)
            else:
                _add(root, f.name, value if f.name != "urgent" else bool(value))
    elif doc.type == "consult-records":
        _add(root, "consult_doc", doc.consult_doc)
        for f in fields(cs.ResubmitSlip):
            _add(root, f.name, getattr(r, f.name))
    elif doc.type == "consult-cancel":
        _add(root, "consult_doc", doc.consult_doc)
        for f in fields(cs.ConsultCancel):
            _add(root, f.name, getattr(r, f.name))
    elif doc.type == "consult-status":
        _add(root, "consult_doc", doc.consult_doc)
        etree.SubElement(root, _q("slip_no")).text = r.slip_no
        _add(root, "thread", doc.thread)
        for name in ("event", "step", "status", "reason", "start", "end", "video_link"):
            _add(root, name, getattr(r, name))
        for e in (x for x in r.experts.split(";") if x):
            who, _, dept = e.partition("(")
            ex = etree.SubElement(root, _q("expert"))
            _add(ex, "name", who)
            _add(ex, "specialty", dept.rstrip(")"))
        _add(root, "at", r.at)
    else:
        _add(root, "consult_doc", doc.consult_doc)
        etree.SubElement(root, _q("slip_no")).text = r.slip_no
        values = asdict(r)
        for name in (
            "report_id",
            "kind",
            "status",
            "diagnosis_code",
            "diagnosis_name",
            "diagnosis_text",
            "advice",
        ):
            _add(root, name, values[name])
        _add(root, "referral_recommended", bool(r.referral_recommended))
        for name in ("referral_to", "referral_note", "conclusion", "study_uid"):
            _add(root, name, values[name])
        if r.pdf:
            _add(root, "pdf", base64.b64encode(r.pdf).decode("ascii"))
        _add(root, "author", r.author)
        _add(root, "issued_at", r.issued_at)
    xmlsafe.validate(root, XSD, doc.doc_id)
    return bytes(etree.tostring(root, xml_declaration=True, encoding=encoding))


def identify(raw: bytes) -> tuple[str | None, str | None]:
    """(id, type) of a consultation document, or (None, None) if it is not one."""
    try:
        root = etree.fromstring(raw, xmlsafe.parser())
    except etree.XMLSyntaxError:
        return None, None
    qn = etree.QName(root)
    if qn.namespace != NS or qn.localname not in TYPE_OF_ROOT:
        return None, None
    return root.findtext(_q("id")), TYPE_OF_ROOT[qn.localname]


def read(raw: bytes, record: str, expect: str | None = None) -> Doc:
    """A consultation document read and checked (encoding, XSD); refusals name the element."""
    xmlsafe.check_encoding(raw, record)
    root = xmlsafe.parse(raw, record)
    qn = etree.QName(root)
    doc_type = TYPE_OF_ROOT.get(qn.localname) if qn.namespace == NS else None
    if doc_type is None or (expect is not None and doc_type != expect):
        from adapters.his_ws.errors import SchemaInvalid

        raise SchemaInvalid(
            f"document {record} is not a {ROOTS.get(expect or '', 'consult')} document",
            field=f"/{qn.localname}",
        )
    xmlsafe.validate(root, XSD, record)

    def t(tag: str, el: etree._Element = root) -> str:
        return (el.findtext(_q(tag)) or "").strip()

    doc_id = t("id")
    if doc_type == "consult":
        values: dict[str, Any] = {f.name: t(f.name) for f in fields(cs.ConsultSlip)}
        values["urgent"] = t("urgent") in ("true", "1")
        values["specialties"] = ";".join(
            (e.text or "").strip() for e in root.findall(_q("specialty"))
        )
        values["shared_results"] = ";".join(
            (e.text or "").strip() for e in root.findall(_q("shared_report"))
        )
        return Doc(doc_id, doc_type, cs.ConsultSlip(**values))
    if doc_type == "consult-records":
        return Doc(
            doc_id,
            doc_type,
            cs.ResubmitSlip(**{f.name: t(f.name) for f in fields(cs.ResubmitSlip)}),
            consult_doc=t("consult_doc"),
        )
    if doc_type == "consult-cancel":
        return Doc(
            doc_id,
            doc_type,
            cs.ConsultCancel(**{f.name: t(f.name) for f in fields(cs.ConsultCancel)}),
            consult_doc=t("consult_doc"),
        )
    if doc_type == "consult-status":
        experts = ";".join(
            f"{t('name', e)}({t('specialty', e)})" if t("specialty", e) else t("name", e)
            for e in root.findall(_q("expert"))
        )
        st = cs.ConsultStatus(
            slip_no=t("slip_no"),
            event=t("event"),
            step=t("step"),
            status=t("status"),
            reason=t("reason"),
            start=t("start"),
            end=t("end"),
            experts=experts,
            video_link=t("video_link"),
            at=t("at"),
        )
        return Doc(doc_id, doc_type, st, consult_doc=t("consult_doc"), thread=t("thread"))
    rep = cs.ConsultReport(
        slip_no=t("slip_no"),
        report_id=t("report_id"),
        kind=t("kind"),
        status=t("status"),
        diagnosis_code=t("diagnosis_code"),
        diagnosis_name=t("diagnosis_name"),
        diagnosis_text=t("diagnosis_text"),
        advice=t("advice"),
        referral_recommended=t("referral_recommended") in ("true", "1"),
        referral_to=t("referral_to"),
        referral_note=t("referral_note"),
        conclusion=t("conclusion"),
        study_uid=t("study_uid"),
        pdf=base64.b64decode(t("pdf")) if t("pdf") else b"",
        author=t("author"),
        issued_at=t("issued_at"),
    )
    return Doc(doc_id, doc_type, rep, consult_doc=t("consult_doc"))
