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

import csv
import io
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
from adapters.slips import AcceptanceSlip, ReferralSlip
from simulators.his_ws import HisWsProcess
from tests.harness import Alliance, wait_for
from tests.slip_samples import return_slip

ROOT = Path(__file__).resolve().parents[1]
XML = ROOT / "tests" / "fixtures" / "xml"
SITE = cda.Site(member="yuetan-chc", name="月坛社区卫生服务中心")
DX = "/ClinicalDocument/component/structuredBody/component[3]/section/entry/observation/value"


def referral_slip(**kw: Any) -> ReferralSlip:
    return replace(
        ReferralSlip(
            slip_no="YTZZ20261120001",
            kind="up-inpatient",
            to_member="fuxing",
            patient_name="王秀英",
            gender="female",
            birth_date="1950-03-15",
            id_number="110102195003151234",
            phone="13901234567",
            mrn="YT0001",
            diagnosis_code="YTZ-01",
            diagnosis_name="原发性高血压",
            reason="血压控制不佳 <160/100>",
            summary="头晕两周。既往高血压十年 & 糖尿病",
            department_code="KS01",
            urgent=True,
            consent_by="患者本人",
            doctor="李医生",
            written_at="2026-11-20T09:00:00+08:00",
        ),
        **kw,
    )


ACCEPTED = AcceptanceSlip(
    "YTZZ20261120001", True, "", "2026-11-21T10:00:00+08:00", "0301", "心内科 12床", "张主任"
)
FIXTURES = [
    (
        "referral.xml",
        cda.Document(
            "YT-ZZD-000001", "referral", referral_slip(), "2026-11-20T09:00:00+08:00", "yuetan-chc"
        ),
        "UTF-8",
    ),
    (
        "referral-gb18030.xml",
        cda.Document(
            "YT-ZZD-000002", "referral", referral_slip(), "2026-11-20T09:00:00+08:00", "yuetan-chc"
        ),
        "GB18030",
    ),
    (
        "acceptance.xml",
        cda.Document(
            "FX-JZD-000001",
            "acceptance",
            ACCEPTED,
            "2026-11-20T15:30:00+08:00",
            "fuxing",
            "YT-ZZD-000001",
        ),
        "UTF-8",
    ),
    (
        "rejection.xml",
        cda.Document(
            "FX-JZD-000002",
            "acceptance",
            AcceptanceSlip("YTZZ20261120001", False, "本院暂无床位"),
            "2026-11-20T15:30:00+08:00",
            "fuxing",
            "YT-ZZD-000001",
        ),
        "UTF-8",
    ),
    (
        "return.xml",
        cda.Document(
            "FX-ZHD-000001",
            "return",
            return_slip(),
            "2026-11-25T09:00:00+08:00",
            "fuxing",
            "YT-ZZD-000001",
        ),
        "UTF-8",
    ),
]


def fixture(name: str) -> bytes:
    return (XML / name).read_bytes()


# -- documents ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "doc", "encoding"), FIXTURES, ids=[f[0] for f in FIXTURES])
def test_fixture_reads_field_by_field_and_writes_byte_for_byte(
    name: str, doc: cda.Document, encoding: str
) -> None:
    raw = fixture(name)
    got = cda.read(raw, SITE, record=name)
    assert asdict(got.slip) == asdict(doc.slip)
    assert (got.doc_id, got.type, got.custodian, got.referral_doc) == (
        doc.doc_id,
        doc.type,
        doc.custodian,
        doc.referral_doc,
    )
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
    "xsd-gender": (
        _edit(REF, "//v3:administrativeGenderCode", "code", "5"),
        SchemaInvalid,
        f"{ROLE}/patient/administrativeGenderCode",
    ),
    "xsd-missing-name": (
        _edit(REF, "//v3:patient/v3:name", "drop"),
        SchemaInvalid,
        f"{ROLE}/patient/administrativeGenderCode",
    ),
    "missing-reason-section": (
        _edit(REF, REASON + "/..", "drop"),
        MissingElement,
        "/ClinicalDocument/component/structuredBody/component/section[code/@code='42349-1']",
    ),
    "missing-id-card": (
        _edit(REF, f"//v3:patientRole/v3:id[@root='{cda.ID_CARD_OID}']", "drop"),
        MissingElement,
        f"{ROLE}/id[@root='{cda.ID_CARD_OID}']",
    ),
    "missing-recipient": (
        _edit(REF, "v3:informationRecipient", "drop"),
        MissingElement,
        ("/ClinicalDocument/informationRecipient/intendedRecipient/receivedOrganization/id"),
    ),
    "date-birth": (
        _edit(REF, "//v3:birthTime", "value", "19500231"),
        BadDate,
        f"{ROLE}/patient/birthTime/@value",
    ),
    "date-effective": (
        _edit(REF, "v3:effectiveTime", "value", "20261131090000+0800"),
        BadDate,
        "/ClinicalDocument/effectiveTime/@value",
    ),
    "code-diagnosis": (
        _edit(REF, "//v3:observation[v3:code/@code='diagnosis']/v3:value", "code", "YTZ-99"),
        UnknownCode,
        DX + "/@code",
    ),
    "code-system": (
        _edit(
            REF,
            "//v3:observation[v3:code/@code='diagnosis']/v3:value",
            "codeSystem",
            "2.16.156.10011.2.3.3.11",
        ),
        UnknownCode,
        DX + "/@code",
    ),
    "code-kind": (
        _edit(REF, "//v3:observation[v3:code/@code='kind']/v3:value", "code", "sideways"),
        UnknownCode,
        (
            "/ClinicalDocument/component/structuredBody/component[1]/section/entry[1]/"
            "observation/value/@code"
        ),
    ),
    "encoding-utf8-labelled-gb": (
        REF.replace(b"encoding='UTF-8'", b"encoding='GB18030'"),
        WrongEncoding,
        "xml-declaration/@encoding",
    ),
    "encoding-gb-labelled-utf8": (
        fixture("referral-gb18030.xml").replace(b"encoding='GB18030'", b"encoding='UTF-8'"),
        WrongEncoding,
        "xml-declaration/@encoding",
    ),
    "doctype-entities": (
        REF.replace(b"?>\n", b'?>\n<!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]>\n', 1),
        SchemaInvalid,
        "/!DOCTYPE",
    ),
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
    doc = cda.Document(
        "p-1",
        "referral",
        referral_slip(id_number="", mrn=""),
        "2026-11-20T09:00:00+08:00",
        "fuxing",
    )
    raw = cda.write(doc, SITE)
    assert cda.ID_CARD_OID.encode() not in raw
    from lxml import etree

    cda.xmlsafe.validate(etree.fromstring(raw), cda.CDA_XSD, "p-1")  # valid without it
    with pytest.raises(MissingElement):  # but a referral FROM the HIS must have it
        cda.read(raw, SITE, record="p-1")
    assert cda.read(raw, SITE, record="p-1", from_node=True).slip.id_number == ""


# -- two nodes, two simulated HIS processes ------------------------------------------------------

KINDS = ["referral.request", "referral.status", "referral.cancel", "referral.return"]
MEMBERS = [
    ("fuxing", "复兴医院", "Fuxing Hospital", "core"),
    ("yuetan-chc", "月坛社区卫生服务中心", "Yuetan CHC", "community"),
]


class World:
    def __init__(self, folder: Path) -> None:

        self.sims = {
            m[0]: HisWsProcess(folder / f"his-{m[0]}.sqlite", m[0], site_name=m[1]) for m in MEMBERS
        }
        members = [
            {
                "id": i,
                "zh": zh,
                "en": en,
                "role": role,
                "adapters": [
                    {
                        "name": "his",
                        "type": "his-xml-ws",
                        "mappings": str(ROOT / "mappings" / i),
                        "receives": ["referral.*"],
                        "options": {
                            "url": self.sims[i].url,
                            "poll_s": 0.2,
                            "timeout_s": 5.0,
                            "site_name": zh,
                        },
                    }
                ],
            }
            for i, zh, en, role in MEMBERS
        ]
        rules = [
            {"from": "fuxing", "to": "yuetan-chc", "kinds": KINDS},
            {"from": "yuetan-chc", "to": "fuxing", "kinds": KINDS},
        ]
        for sim in self.sims.values():
            sim.start()
        self.alliance = Alliance(folder / "alliance", members, rules)
        self.alliance.start("fuxing", "yuetan-chc")

    def stop(self) -> None:
        self.alliance.stop_all()
        for sim in self.sims.values():
            sim.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    w = World(tmp_path_factory.mktemp("his-ws"))
    try:
        yield w
    finally:
        w.stop()


def arrived(his: Any, doc_type: str, slip_no: str) -> cda.Document:
    return wait_for(
        lambda: next((d for d in his.received(doc_type) if d.slip.slip_no == slip_no), None),
        timeout=60,
        what=f"{doc_type} {slip_no} in the HIS",
    )


def thread_of(node: Any, slip_no: str) -> dict[str, Any]:

    def find() -> dict[str, Any] | None:
        for row in node.api("GET", "/local/v1/referrals"):
            sr = node.api("GET", f"/fhir/ServiceRequest/{row['sr_id']}", role="clinician")
            if (sr.get("requisition") or {}).get("value") == slip_no:
                return {"row": row, "sr": sr}
        return None

    return wait_for(find, timeout=60, what=f"referral {slip_no} at {node.node_id}")


@pytest.mark.slow
def test_up_referral_loop_field_by_field(world: World) -> None:
    chc_his, core_his = world.sims["yuetan-chc"].his, world.sims["fuxing"].his
    core = world.alliance.node("fuxing")
    written = referral_slip(slip_no="YTZZ-LOOP-1")
    ref_doc = chc_his.write_referral(written)
    # the core hospital's HIS got the slip, codes in ITS catalogue, no ID number
    got = arrived(core_his, "referral", written.slip_no)
    assert asdict(got.slip) == asdict(
        replace(written, id_number="", diagnosis_code="FXZD0101", department_code="0200")
    )
    assert got.custodian == "yuetan-chc"
    # ... and the core node's FHIR API shows the same referral
    found = thread_of(core, written.slip_no)
    sr = found["sr"]
    assert sr["priority"] == "urgent" and sr["note"][0]["text"] == written.reason
    assert sr["code"]["coding"][0]["code"] == "up-inpatient"
    assert sr["reasonCode"][0]["coding"][0]["code"] == "I10"
    task = core.api("GET", f"/fhir/Task/{found['row']['task_id']}", role="clinician")
    patient = core.api("GET", f"/fhir/{task['for']['reference']}", role="clinician")
    assert patient["name"][0]["text"] == written.patient_name
    assert (patient["gender"], patient["birthDate"]) == ("female", "1950-03-15")
    assert written.id_number not in str(patient)
    # acceptance: written in the core HIS, arrives in the community centre's HIS
    core_his.accept(
        got.doc_id,
        appointment_at=ACCEPTED.appointment_at,
        department_code="0301",
        bed_no=ACCEPTED.bed_no,
        doctor=ACCEPTED.doctor,
    )
    acc = arrived(chc_his, "acceptance", written.slip_no)
    # 0301 心内科 -> alliance 03.04, which the community catalogue does not list: shared code
    assert asdict(acc.slip) == asdict(
        replace(ACCEPTED, slip_no=written.slip_no, department_code="03.04")
    )
    assert acc.referral_doc == ref_doc and acc.custodian == "fuxing"
    # return slip with prescriptions and results, drug and lab codes in the centre's catalogue
    back = return_slip(slip_no=written.slip_no)
    core_his.write_return(got.doc_id, back)
    ret = arrived(chc_his, "return", written.slip_no)
    assert asdict(ret.slip) == asdict(
        replace(
            back,
            diagnosis_code="YTZ-01",
            prescriptions=[
                replace(back.prescriptions[0], drug_code="YT2037"),
                replace(back.prescriptions[1], drug_code="YT2111"),
            ],
            results=[
                replace(back.results[0], item_code="3001"),
                replace(back.results[1], item_code="3003"),
                replace(back.results[2], item_code="3002"),
            ],
        )
    )
    chc = world.alliance.node("yuetan-chc")
    wait_for(
        lambda: thread_of(chc, written.slip_no)["row"]["step"] == "return-received",
        timeout=60,
        what="return received at the centre",
    )
    assert thread_of(core, written.slip_no)["row"]["status"] == "completed"
    # every document was delivered once
    for doc in (acc, ret):
        assert chc_his.deliveries(doc.doc_id) == 1
    assert core_his.deliveries(got.doc_id) == 1
    assert chc_his.pending() == [] and core_his.pending() == []


@pytest.mark.slow
def test_down_referral_rejected_back_into_core_his(world: World) -> None:
    chc_his, core_his = world.sims["yuetan-chc"].his, world.sims["fuxing"].his
    written = referral_slip(
        slip_no="FXZZ-DOWN-1",
        kind="down-discharge",
        to_member="yuetan-chc",
        diagnosis_code="FXZD0101",
        department_code="0200",
        urgent=False,
        mrn="FX778",
        doctor="张主任",
        patient_name="赵建国",
        gender="male",
        birth_date="1962-08-08",
        id_number="110102196208084321",
        phone="13700000000",
    )
    core_his.write_referral(written)
    got = arrived(chc_his, "referral", written.slip_no)
    assert asdict(got.slip) == asdict(
        replace(written, id_number="", diagnosis_code="YTZ-01", department_code="KS01")
    )
    chc_his.reject(got.doc_id, "本中心暂无康复床位")
    ans = arrived(core_his, "acceptance", written.slip_no)
    assert asdict(ans.slip) == asdict(AcceptanceSlip(written.slip_no, False, "本中心暂无康复床位"))


NODE_BAD = [
    "xsd-gender",
    "missing-reason-section",
    "date-birth",
    "code-diagnosis",
    "encoding-utf8-labelled-gb",
    "not-xml",
]


@pytest.mark.slow
def test_bad_documents_quarantined_audited_and_the_next_goes_through(world: World) -> None:
    chc_his, core_his = world.sims["yuetan-chc"].his, world.sims["fuxing"].his
    chc = world.alliance.node("yuetan-chc")
    expect: dict[str, tuple[str, str | None]] = {}
    for n, case in enumerate(NODE_BAD):
        raw, error, field = BAD[case]
        doc_id = f"BAD-{n}"
        chc_his.write_raw(
            doc_id,
            "referral",
            raw.replace(b'extension="YT-ZZD-000001"', f'extension="{doc_id}"'.encode()),
        )
        expect[doc_id] = (error.code, field)
    # a second document under a taken id, with other content (a corrected phone number)
    first = referral_slip(
        slip_no="YTZZ-DUP-1", patient_name="钱桂兰", id_number="110102194511112222"
    )
    chc_his.write_referral(first, doc_id="DUP-1")
    chc_his.write_referral(replace(first, phone="13011112222"), doc_id="DUP-1")
    expect["DUP-1"] = ("HT-WS-DUPLICATE", "/ClinicalDocument/id/@extension")
    after = referral_slip(
        slip_no="YTZZ-AFTER-BAD", patient_name="周敏", id_number="110102198003034444"
    )
    chc_his.write_referral(after)
    arrived(core_his, "referral", after.slip_no)
    assert [
        d.slip.phone for d in core_his.received("referral") if d.slip.slip_no == first.slip_no
    ] == [first.phone]  # the first one, once
    wait_for(lambda: chc_his.pending() == [], timeout=30, what="every document acked")
    held = chc.api("GET", "/local/v1/quarantine")
    for doc_id, (code, field) in expect.items():
        mine = [h for h in held if f"record {doc_id} " in h["message"]]
        assert len(mine) == 1, (doc_id, held)
        assert mine[0]["code"] == code
        assert mine[0]["source"] == "adapter:his"
        if field is not None:
            assert f"record {doc_id} field {field}:" in mine[0]["message"]
        else:
            assert f"record {doc_id} field line " in mine[0]["message"]
        assert "钱桂兰" not in mine[0]["message"] and "1950" not in mine[0]["message"]
    # the held document names its patient in its header: kept under the keyed hash (an ID
    # number search in the message browser finds it); bytes that are not XML name nobody
    from bridge.privacy import patient_hash

    by_doc = {d: next(h for h in held if f"record {d} " in h["message"]) for d in expect}
    assert by_doc["DUP-1"]["patient_hash"] == patient_hash(
        chc.plan.patient_hash_key, first.id_number
    )
    assert by_doc[f"BAD-{NODE_BAD.index('not-xml')}"]["patient_hash"] is None
    rows = list(csv.DictReader(io.StringIO(chc.cli("audit", "export", "--format", "csv").stdout)))
    audited = sorted(r["code"] for r in rows if r["action"] == "quarantined")
    assert audited == sorted(code for code, _ in expect.values())


@pytest.mark.slow
def test_his_faults_retried_until_accepted_delivered_once_in_order(world: World) -> None:
    chc_his, core_his = world.sims["yuetan-chc"].his, world.sims["fuxing"].his
    core = world.alliance.node("fuxing")
    written = referral_slip(
        slip_no="YTZZ-FAULT-1", patient_name="孙立", id_number="110102197001013333"
    )
    chc_his.write_referral(written)
    got = arrived(core_his, "referral", written.slip_no)
    start = len(chc_his.calls())  # earlier tests' calls are in the same log
    chc_his.fail_next(10**6)  # the centre's HIS answers every call with a SOAP Fault

    def faults(op: str) -> int:
        return sum(1 for o, _, out in chc_his.calls()[start:] if o == op and out == "fault")

    core_his.accept(
        got.doc_id,
        appointment_at="2026-11-22T08:00:00+08:00",
        department_code="0302",
        bed_no="内分泌科 3床",
        doctor="王医生",
    )
    wait_for(lambda: faults("ReceiveAcceptance") >= 2, timeout=60, what="acceptance retried")
    back = return_slip(slip_no=written.slip_no, discharge=False, prescriptions=[], results=[])
    core_his.write_return(got.doc_id, back)
    wait_for(
        lambda: thread_of(core, written.slip_no)["row"]["status"] == "completed",
        timeout=60,
        what="return sent by the core hospital",
    )
    wait_for(lambda: faults("ReceiveAcceptance") >= 3, timeout=60, what="acceptance retried")
    assert not any(o == "ReceiveReturn" for o, _, _ in chc_his.calls()[start:])  # behind it
    chc_his.fail_next(0)
    acc = arrived(chc_his, "acceptance", written.slip_no)
    ret = arrived(chc_his, "return", written.slip_no)
    assert asdict(acc.slip) == asdict(
        AcceptanceSlip(
            written.slip_no,
            True,
            "",
            "2026-11-22T08:00:00+08:00",
            "03.07",
            "内分泌科 3床",
            "王医生",
        )
    )  # 0302 内分泌科 -> alliance 03.07, not in the centre's catalogue
    assert asdict(ret.slip) == asdict(replace(back, diagnosis_code="YTZ-01"))
    stored = [
        (o, d) for o, d, out in chc_his.calls() if out == "stored" and d in (acc.doc_id, ret.doc_id)
    ]
    assert stored == [("ReceiveAcceptance", acc.doc_id), ("ReceiveReturn", ret.doc_id)]
    assert chc_his.deliveries(acc.doc_id) == chc_his.deliveries(ret.doc_id) == 1
