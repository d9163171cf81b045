"""SOAP 1.1 envelopes of the HIS web service (``schemas/his-ws.xsd``), both directions.

Operations, namespace ``urn:hutong:his-ws:1``:

* ``ReceiveReferral`` / ``ReceiveAcceptance`` / ``ReceiveReturn`` / ``ReceiveCancel`` /
  ``ReceiveLabReport`` / ``ReceiveExamReport`` (node -> HIS): one document, base64 of its own
  bytes, with its id;
  answered ``ReceiveResponse`` (stored | duplicate).
* ``GetPendingDocuments(Since, Max)`` (node <- HIS): documents the HIS wrote and nobody acked,
  ``seq`` above ``Since``, oldest first, each ``PendingDocument(seq, id, type)``; a referring
  doctor's withdrawal is a ``cancel`` document (CXD) naming the referral document and a reason.
* ``AckDocuments(Seq+)``: the node took (or quarantined) these; the HIS stops offering them.

A failure is a SOAP ``Fault`` (faultcode ``soap:Client`` or ``soap:Server``) with HTTP 500.
Envelopes are parsed with :mod:`adapters.his_ws.xmlsafe` and checked against the XSD both ways.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

from lxml import etree

from adapters.his_ws import xmlsafe
from adapters.his_ws.errors import SchemaInvalid

SOAP = "http://schemas.xmlsoap.org/soap/envelope/"
HWS = "urn:hutong:his-ws:1"
XSD = "his-ws.xsd"
RECEIVE = {
    "referral": "ReceiveReferral",
    "acceptance": "ReceiveAcceptance",
    "return": "ReceiveReturn",
    "cancel": "ReceiveCancel",
    "lab-report": "ReceiveLabReport",
    "exam-report": "ReceiveExamReport",
    "consult-status": "ReceiveConsultStatus",
    "consult-report": "ReceiveConsultReport",
}
TYPE_OF_RECEIVE = {v: k for k, v in RECEIVE.items()}
#: what GetPendingDocuments may list (his-ws.xsd DocumentType): the receive types but
#: lab-report and exam-report (the node sends those, the HIS never offers one), and visit
#: documents
PENDING_TYPES = (
    "referral",
    "acceptance",
    "return",
    "cancel",
    "visit",
    "consult",
    "consult-records",
    "consult-cancel",
)


@dataclass(frozen=True)
class Pending:
    seq: int
    doc_id: str
    type: str
    raw: bytes
    #: > 0: the document was over the size limit; this many bytes (of its base64 text, or of
    #: the decoded document) were seen before it was refused, and ``raw`` is empty
    too_large: int = 0


class Fault(Exception):
    def __init__(self, code: str, text: str) -> None:
        super().__init__(f"{code}: {text}")
        self.code = code
        self.text = text


def _h(tag: str) -> str:
    return f"{{{HWS}}}{tag}"


def envelope(op: etree._Element) -> bytes:
    env = etree.Element(f"{{{SOAP}}}Envelope", nsmap={"soap": SOAP, "hws": HWS})
    etree.SubElement(env, f"{{{SOAP}}}Body").append(op)
    return bytes(etree.tostring(env, xml_declaration=True, encoding="UTF-8"))


def fault(code: str, text: str) -> bytes:
    """``code``: Client (the request is wrong) or Server (the HIS cannot serve it now)."""
    env = etree.Element(f"{{{SOAP}}}Envelope", nsmap={"soap": SOAP})
    f = etree.SubElement(etree.SubElement(env, f"{{{SOAP}}}Body"), f"{{{SOAP}}}Fault")
    etree.SubElement(f, "faultcode").text = f"soap:{code}"
    etree.SubElement(f, "faultstring").text = text
    return bytes(etree.tostring(env, xml_declaration=True, encoding="UTF-8"))


def operation(raw: bytes, what: str = "envelope") -> etree._Element:
    """The Body's one element of a checked envelope; a Fault is raised as :class:`Fault`."""
    root = xmlsafe.parse(raw, what)
    if root.tag != f"{{{SOAP}}}Envelope":
        raise SchemaInvalid(f"{what} is not a SOAP 1.1 envelope", field="/Envelope")
    xmlsafe.validate(root, XSD, what)
    op = root.find(f"{{{SOAP}}}Body")[0]
    if op.tag == f"{{{SOAP}}}Fault":
        raise Fault(op.findtext("faultcode") or "", op.findtext("faultstring") or "")
    return op


# -- requests -----------------------------------------------------------------------------------


def receive(doc_type: str, doc_id: str, raw: bytes) -> bytes:
    op = etree.Element(_h(RECEIVE[doc_type]))
    etree.SubElement(op, _h("DocumentId")).text = doc_id
    etree.SubElement(op, _h("Document")).text = base64.b64encode(raw).decode()
    return envelope(op)


def get_pending(since: int, max_docs: int) -> bytes:
    op = etree.Element(_h("GetPendingDocuments"))
    etree.SubElement(op, _h("Since")).text = str(since)
    etree.SubElement(op, _h("Max")).text = str(max_docs)
    return envelope(op)


def ack(seqs: list[int]) -> bytes:
    op = etree.Element(_h("AckDocuments"))
    for s in seqs:
        etree.SubElement(op, _h("Seq")).text = str(s)
    return envelope(op)


# -- responses ----------------------------------------------------------------------------------


def receive_response(doc_id: str, status: str) -> bytes:
    op = etree.Element(_h("ReceiveResponse"))
    etree.SubElement(op, _h("DocumentId")).text = doc_id
    etree.SubElement(op, _h("Status")).text = status
    return envelope(op)


def pending_response(docs: list[Pending]) -> bytes:
    op = etree.Element(_h("GetPendingDocumentsResponse"))
    for d in docs:
        e = etree.SubElement(op, _h("PendingDocument"), seq=str(d.seq), id=d.doc_id, type=d.type)
        e.text = base64.b64encode(d.raw).decode()
    return envelope(op)


def ack_response(n: int) -> bytes:
    op = etree.Element(_h("AckDocumentsResponse"))
    etree.SubElement(op, _h("Acked")).text = str(n)
    return envelope(op)


def read_pending(op: etree._Element) -> list[Pending]:
    return [
        Pending(int(e.get("seq")), e.get("id"), e.get("type"), base64.b64decode(e.text or ""))
        for e in op.iterfind(_h("PendingDocument"))
    ]


def read_receive(op: etree._Element) -> tuple[str, str, bytes]:
    """(document type, document id, document bytes) of a Receive* request."""
    doc_type = TYPE_OF_RECEIVE[etree.QName(op).localname]
    return (
        doc_type,
        op.findtext(_h("DocumentId")) or "",
        base64.b64decode(op.findtext(_h("Document")) or ""),
    )


def text(op: etree._Element, tag: str) -> str:
    return op.findtext(_h(tag)) or ""
