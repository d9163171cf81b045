"""XML web-service HIS style: CDA-like documents in SOAP envelopes, end to end.

Documents (no processes): fixtures read field by field and written byte for byte; every bad-data
class raises its own error naming the element's XPath; hostile XML is not expanded.
Alliance (slow): two real node processes, each with a real simulated HIS process (SQLite state);
(a) a referral written in one HIS arrives in the other HIS and in the node's FHIR API, the
acceptance and the return come back field by field (codes in each site's catalogue);
(b) bad documents are quarantined and audited with record and field, the next one goes through;
(c) HIS faults are retried until accepted, each document delivered once and in order.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest

from adapters.his_ws import cda
from adapters.his_ws.errors import (
    BadDate,
    MissingElement,
    SchemaInvalid,
    UnknownCode,
    WrongEncoding,
)
from adapters.slips import AcceptanceSlip, LabResult, Prescription, ReferralSlip, ReturnSlip

ROOT = Path(__file__).resolve().parents[1]
XML = ROOT / "tests" / "fixtures" / "xml"
SITE = cda.Site(member="yuetan-chc", name="月坛社区卫生服务中心")
DX = ("/ClinicalDocument/component/structuredBody/component[3]/section/entry/observation"
      "/value")


def referral_slip(**kw: Any) -> ReferralSlip:
    return replace(ReferralSlip(
        slip_no="YTZZ20261120001", kind="up-inpatient", to_member="fuxing",
        patient_name="王秀英", gender="female", birth_date="1950-03-15",
        id_number="110102195003151234", phone="13901234567", mrn="YT0001",
        diagnosis_code="YTZ-01", diagnosis_name="原发性高血压", reason="血压控制不佳 <160/100>",
        summary="头晕两周。既往高血压十年 & 糖尿病", department_code="KS01", urgent=True,
        consent_by="患者本人", doctor="李医生", written_at="2026-11-20T09:00:00+08:00"), **kw)


def return_slip(**kw: Any) -> ReturnSlip:
    return replace(ReturnSlip(
        slip_no="YTZZ20261120001", discharge=True, diagnosis_code="FXZD0101",
        diagnosis_name="原发性高血压", course="入院后调整降压方案，血压平稳",
        advice="继续氨氯地平 5mg qd，两周后社区复查血压", doctor="张主任",
        written_at="2026-11-25T09:00:00+08:00",
        prescriptions=[Prescription("FX-0101", "苯磺酸氨氯地平片 5mg", "5 mg", "qd", 14),
                       Prescription("FX-0103", "硝苯地平控释片 30mg", "30mg", "qd", 28)],
        results=[LabResult("FXL-GLU", "葡萄糖", "8.9", "mmol/L", "H", "3.9-6.1"),
                 LabResult("FXL-CREA", "肌酐", "72", "μmol/L", "N", "44-133"),
                 LabResult("FXL-HBA1C", "糖化血红蛋白", "7.20", "%", "", "")]), **kw)


ACCEPTED = AcceptanceSlip("YTZZ20261120001", True, "", "2026-11-21T10:00:00+08:00", "0301",
                          "心内科 12床", "张主任")
FIXTURES = [
    ("referral.xml", cda.Document("YT-ZZD-000001", "referral", referral_slip(),
                                  "2026-11-20T09:00:00+08:00", "yuetan-chc"), "UTF-8"),
    ("referral-gb18030.xml", cda.Document("YT-ZZD-000002", "referral", referral_slip(),
                                          "2026-11-20T09:00:00+08:00", "yuetan-chc"),
     "GB18030"),
    ("acceptance.xml", cda.Document("FX-JZD-000001", "acceptance", ACCEPTED,
                                    "2026-11-20T15:30:00+08:00", "fuxing", "YT-ZZD-000001"),
     "UTF-8"),
    ("rejection.xml", cda.Document("FX-JZD-000002", "acceptance",
                                   AcceptanceSlip("YTZZ20261120001", False, "本院暂无床位"),
                                   "2026-11-20T15:30:00+08:00", "fuxing", "YT-ZZD-000001"),
     "UTF-8"),
    ("return.xml", cda.Document("FX-ZHD-000001", "return", return_slip(),
                                "2026-11-25T09:00:00+08:00", "fuxing", "YT-ZZD-000001"),
     "UTF-8"),
]


def fixture(name: str) -> bytes:
    return (XML / name).read_bytes()


# -- documents ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "doc", "encoding"), FIXTURES, ids=[f[0] for f in FIXTURES])
def test_fixture_reads_field_by_field_and_writes_byte_for_byte(
        name: str, doc: cda.Document, encoding: str) -> None:
    raw = fixture(name)
    got = cda.read(raw, SITE, record=name)
    assert asdict(got.slip) == asdict(doc.slip)
    assert (got.doc_id, got.type, got.custodian, got.referral_doc) == (
        doc.doc_id, doc.type, doc.custodian, doc.referral_doc)
    assert got.written_at == (getattr(doc.slip, "written_at", "") or doc.written_at)
    assert cda.write(doc, SITE, encoding) == raw
    assert raw.startswith(f"<?xml version='1.0' encoding='{encoding}'?>".encode())


def test_gb18030_document_is_really_gb18030() -> None:
    raw = fixture("referral-gb18030.xml")
    assert "王秀英".encode("gb18030") in raw and "王秀英".encode() not in raw


def _edit(raw: bytes, path: str, action: str, value: str = "") -> bytes:
    """Change one element of a fixture: drop it, or set an attribute (``@name``)."""
    from lxml import etree
    root = etree.fromstring(raw)
    el = root.xpath(path, namespaces=cda.NS)[0]
    if action == "drop":
        el.getparent().remove(el)
    else:
        el.set(action, value)
    return bytes(etree.tostring(root, xml_declaration=True, encoding="UTF-8"))


REF = fixture("referral.xml")
ROLE = "/ClinicalDocument/recordTarget/patientRole"
REASON = "v3:component/v3:structuredBody/v3:component[1]/v3:section"
BAD = {
    "xsd-gender": (_edit(REF, "//v3:administrativeGenderCode", "code", "5"), SchemaInvalid,
                   f"{ROLE}/patient/administrativeGenderCode"),
    "xsd-missing-name": (_edit(REF, "//v3:patient/v3:name", "drop"), SchemaInvalid,
                         f"{ROLE}/patient/administrativeGenderCode"),
    "missing-reason-section": (
        _edit(REF, REASON + "/..", "drop"), MissingElement,
        "/ClinicalDocument/component/structuredBody/component/section[code/@code='42349-1']"),
    "missing-id-card": (_edit(REF, f"//v3:patientRole/v3:id[@root='{cda.ID_CARD_OID}']", "drop"),
                        MissingElement, f"{ROLE}/id[@root='{cda.ID_CARD_OID}']"),
    "missing-recipient": (_edit(REF, "v3:informationRecipient", "drop"), MissingElement,
                          "/ClinicalDocument/informationRecipient/intendedRecipient/"
                          + "receivedOrganization/id"),
    "date-birth": (_edit(REF, "//v3:birthTime", "value", "19500231"), BadDate,
                   f"{ROLE}/patient/birthTime/@value"),
    "date-effective": (_edit(REF, "v3:effectiveTime", "value", "20261131090000+0800"), BadDate,
                       "/ClinicalDocument/effectiveTime/@value"),
    "code-diagnosis": (_edit(REF, "//v3:observation[v3:code/@code='diagnosis']/v3:value", "code",
                             "YTZ-99"), UnknownCode, DX + "/@code"),
    "code-system": (_edit(REF, "//v3:observation[v3:code/@code='diagnosis']/v3:value",
                          "codeSystem", "2.16.156.10011.2.3.3.11"), UnknownCode, DX + "/@code"),
    "code-kind": (_edit(REF, "//v3:observation[v3:code/@code='kind']/v3:value", "code",
                        "sideways"), UnknownCode,
                  "/ClinicalDocument/component/structuredBody/component[1]/section/entry[1]/"
                  + "observation/value/@code"),
    "encoding-utf8-labelled-gb": (REF.replace(b"encoding='UTF-8'", b"encoding='GB18030'"),
                                  WrongEncoding, "xml-declaration/@encoding"),
    "encoding-gb-labelled-utf8": (
        fixture("referral-gb18030.xml").replace(b"encoding='GB18030'", b"encoding='UTF-8'"),
        WrongEncoding, "xml-declaration/@encoding"),
    "doctype-entities": (REF.replace(b"?>\n", b'?>\n<!DOCTYPE x [<!ENTITY e SYSTEM '
                                              b'"file:///etc/passwd">]>\n', 1),
                         SchemaInvalid, "/!DOCTYPE"),
    "not-xml": (REF[:400], SchemaInvalid, None),
}


def known(category: str, code: str) -> bool:
    return category != "diagnosis" or code.startswith("YTZ-0")


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_document_names_record_and_field(case: str) -> None:
    raw, error, field = BAD[case]
    with pytest.raises(error) as exc:
        cda.read(raw, SITE, record="DOC-7", known=known)
    assert "DOC-7" in exc.value.message
    if field is not None:
        assert exc.value.field == field
    else:
        assert exc.value.field.startswith("line ")
    assert "王秀英" not in exc.value.message and "110102" not in exc.value.message


def test_referral_from_the_node_carries_no_id_number() -> None:
    doc = cda.Document("p-1", "referral", referral_slip(id_number="", mrn=""),
                       "2026-11-20T09:00:00+08:00", "fuxing")
    raw = cda.write(doc, SITE)
    assert cda.ID_CARD_OID.encode() not in raw
    from lxml import etree
    cda.xmlsafe.validate(etree.fromstring(raw), cda.CDA_XSD, "p-1")  # valid without it
    with pytest.raises(MissingElement):  # but a referral FROM the HIS must have it
        cda.read(raw, SITE, record="p-1")
