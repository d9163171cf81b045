"""The XML web-service HIS receives lab results and withdraws referrals.

Results (检查检验结果互认): the community centre refers a patient up in its own web-service HIS
(a simulated vendor process); the core hospital's LIS reports an ORU^R01 over a real MLLP
socket; the result.lab packet reaches the centre's node, whose his-xml-ws adapter pushes one
lab report document (检验报告, checked against cda-lab-report.xsd) per report into the centre's
HIS. Each must match the LIS's message field by field, item codes in the centre's catalogue
(LOINC or the lab's own code where it has none, counted as gaps); a correction arrives as
version 2 of the same report; a HIS that answers a Fault once gets it again and stores it once;
no patient ID number in either node's log.

Cancellation: the referring doctor withdraws a referral in the centre's HIS (a cancel document,
转诊撤销单); the core node shows the Task cancelled with the reason and the core hospital's HIS
gets a cancellation notice; the same cancel offered again and a second cancel document are
applied once; a cancel naming an unknown referral document, and one without its reason, are
quarantined with a clear reason and audited.

The pure part first: documents written and read back, and what the XSDs refuse.
"""

from __future__ import annotations

import csv
import io
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.task import Task

from adapters.his_hl7 import v2
from adapters.his_ws import cda, lab_report
from adapters.his_ws.errors import MissingElement, SchemaInvalid
from adapters.slips import ReferralSlip
from adapters.slips_fhir import Codes
from bridge.mapping.conceptmap import load_site
from simulators.his_hl7 import read_results
from simulators.his_ws import HisWsProcess
from tests.harness import ROOT, Alliance, db_rows, free_port_block, lab_gaps, lis_send, wait_for
from tests.lis_site import LOCAL, write_site
from tests.test_results_his_hl7 import (  # the same LIS fixtures
    CHC,
    CORE,
    CORRECTED,
    KINDS,
    UTF8,
    lis_bundle,
)

ID_NUMBER = "110102195003151234"  # the LIS fixture's patient (PID-3 NI)
SITE = cda.Site(member=CHC, name="月坛社区卫生服务中心")
LAB_OID, LOINC_OID = SITE.lab, cda.LOINC_OID

#: the lab's code (OBX-3.1 / OBR-4.1) -> (code, code system, name) in the centre's HIS: its
#: catalogue (mappings/yuetan-chc/codes/lab.csv); LOINC where it has no item; the lab's own code
#: and system where the lab's map has none (XYZ99, TITER)
ITEM = {
    "WBC": ("3007", LAB_OID, "白细胞计数"),
    "HGB": ("3008", LAB_OID, "血红蛋白"),
    "PLT": ("3009", LAB_OID, "血小板计数"),
    "GLU": ("3001", LAB_OID, "葡萄糖"),
    "NEUT%": ("770-8", LOINC_OID, "中性粒细胞百分比"),
    "CRP": ("1988-5", LOINC_OID, "C反应蛋白"),
    "HBSAG": ("5196-1", LOINC_OID, "乙肝表面抗原"),
    "XYZ99": ("XYZ99", LOCAL, "未映射项目"),
    "TITER": ("TITER", LOCAL, "抗体滴度"),
    "CBC": ("58410-2", LOINC_OID, "血常规"),
    "BIOCHEM": ("24323-8", LOINC_OID, "生化全套"),
}
STATUS = {"F": "final", "P": "preliminary", "C": "corrected"}  # tables 0085 / 0123 -> FHIR
GAPS = ["58410-2", "770-8", "24323-8", "1988-5", "5196-1", "XYZ99", "TITER"]


def referral_slip(**kw: Any) -> ReferralSlip:
    return replace(
        ReferralSlip(
            slip_no="YTZZ-LAB-1",
            kind="up-inpatient",
            to_member=CORE,
            patient_name="王秀英",
            gender="female",
            birth_date="1950-03-15",
            id_number=ID_NUMBER,
            phone="13901234567",
            mrn="YT0001",
            diagnosis_code="YTZ-01",
            diagnosis_name="原发性高血压",
            reason="血压控制不佳",
            summary="头晕两周",
            department_code="KS01",
            urgent=False,
            consent_by="患者本人",
            doctor="李医生",
            written_at="2026-11-20T07:30:00+08:00",
        ),
        **kw,
    )


def zoned(hl7_time: str) -> str:
    """The LIS's local times (no offset) as written into the document (China Standard Time)."""
    return f"{hl7_time}+0800" if hl7_time else ""


def source(raw: bytes) -> dict[str, Any]:
    return read_results(v2.parse(raw.decode()))


def expected_value(obx: dict[str, Any]) -> dict[str, str]:
    """What the document's value must say for the LIS's OBX-2/5/6."""
    value, unit = obx["value"][0], (obx["unit"][0][0] if obx["unit"] else "")
    if obx["vtype"] == "NM":
        return {"vtype": "PQ", "value": value[0], "comparator": "", "unit": unit}
    if obx["vtype"] == "SN" and value[2:3] == [":"]:
        return {"vtype": "RTO", "value": f"{value[1]}:{value[3]}", "comparator": "", "unit": ""}
    if obx["vtype"] == "SN":
        return {"vtype": "PQ", "value": value[1], "comparator": value[0], "unit": unit}
    if obx["vtype"] == "CE":
        return {
            "vtype": "CD",
            "value": value[0],
            "value_name": value[1],
            "value_system": "http://terminology.hl7.org/CodeSystem/v2-0078",
        }
    return {"vtype": "ST", "value": value[0], "comparator": "", "unit": ""}


def assert_report_matches(
    doc: lab_report.LabReportDoc, theirs: dict[str, Any], *, lab: str
) -> None:
    """One lab report document against the LIS's OBR with its OBX lines, field by field."""
    assert (doc.code, doc.code_system, doc.name) == ITEM[theirs["code"][0]]
    assert doc.lab_no == theirs["filler"]  # the lab's own report number
    assert (doc.collected_at, doc.written_at) == (
        zoned(theirs["collected"]),
        zoned(theirs["issued"]),
    )
    assert doc.status == STATUS[theirs["status"]]
    assert doc.conclusion == "\n".join(theirs["notes"])
    assert (doc.producer, doc.lab) == (CORE, lab)
    assert len(doc.items) == len(theirs["items"])
    for x, y in zip(doc.items, theirs["items"], strict=True):
        assert (x.code, x.code_system, x.name) == ITEM[y["code"][0]]
        got = asdict(x)
        assert {k: got[k] for k in expected_value(y)} == expected_value(y)
        assert (x.reference_range, x.flags, x.status) == (
            y["range"],
            y["flags"],
            STATUS[y["status"]],
        )
        assert (x.observed_at, x.notes) == (zoned(y["observed"]), "\n".join(y["notes"]))
        assert x.result_id


def documents(bundle: dict[str, Any], gaps: list[Any]) -> list[lab_report.LabReportDoc]:
    docs = lab_report.from_bundle(
        bundle,
        Codes(load_site(ROOT / "mappings" / CHC), CHC, gaps),
        SITE,
        producer=CORE,
        slip_no="YTZZ-LAB-1",
        referral_doc="YT-ZZD-000001",
        mrn="YT0001",
        mrn_authority=CHC,
        received_at="2026-11-20T10:00:00+08:00",
    )
    for d in docs:
        d.version, d.doc_id = 1, lab_report.doc_id_of(d.report_id, 1)
    return docs


# -- pure -----------------------------------------------------------------------------------


def test_lab_report_documents_match_the_lis_message_and_read_back(tmp_path: Path) -> None:
    gaps: list[Any] = []
    docs = documents(lis_bundle(UTF8, write_site(tmp_path / "fxlab")), gaps)
    src = source(UTF8)
    assert len(docs) == len(src["reports"]) == 2
    for doc, theirs in zip(docs, src["reports"], strict=True):
        assert_report_matches(doc, theirs, lab="复兴医院检验科")
        raw = lab_report.write(doc, SITE, "GB18030")
        assert raw.startswith(b"<?xml version='1.0' encoding='GB18030'?>")
        assert ID_NUMBER.encode() not in raw and "秀英".encode("gb18030") not in raw
        assert asdict(lab_report.read(raw, SITE, record=doc.doc_id)) == asdict(doc)
    wbc = docs[0].items[0]
    assert (wbc.unit, wbc.ucum) == ("10^9/L", "10*9/L")  # printed, then UCUM where it differs
    assert sorted(g.code for g in gaps) == sorted(GAPS)  # each unmapped code once


def test_lab_report_refused_by_its_xsd_before_sending(tmp_path: Path) -> None:
    doc = documents(lis_bundle(UTF8, write_site(tmp_path / "fxlab")), [])[0]
    doc.items[0].status = "done"  # not an Observation.status
    with pytest.raises(SchemaInvalid) as exc:
        lab_report.write(doc, SITE)
    assert exc.value.field == (
        "/ClinicalDocument/component/structuredBody/component/section"
        "/entry[1]/observation/statusCode"
    )
    assert doc.doc_id in exc.value.message and "done" not in exc.value.message


def test_cancel_document_reads_back_and_needs_its_reason() -> None:
    slip = cda.CancelSlip(
        "YTZZ-CX-9",
        "家属要求在社区继续治疗",
        doctor="李医生",
        written_at="2026-11-20T10:00:00+08:00",
    )
    doc = cda.Document("YT-CXD-9", "cancel", slip, slip.written_at, CHC, "YT-ZZD-000009")
    raw = cda.write(doc, SITE)
    back = cda.read(raw, SITE, record="YT-CXD-9", expect="cancel")
    assert asdict(back) == asdict(doc)
    blank = raw.replace("<text>家属要求在社区继续治疗</text>".encode(), b"<text> </text>")
    with pytest.raises(MissingElement) as exc:
        cda.read(blank, SITE, record="YT-CXD-9")
    assert exc.value.field == ("/ClinicalDocument/component/structuredBody/component/section/text")


# -- real processes -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("his-ws-results")
    lab_maps = write_site(root / "mappings" / "fxlab")
    lis = free_port_block(1)
    sims = {
        m: HisWsProcess(root / f"his-{m}.sqlite", m, site_name=zh)
        for m, zh in ((CORE, "复兴医院"), (CHC, "月坛社区卫生服务中心"))
    }

    def his(member: str, receives: list[str]) -> dict[str, Any]:
        return {
            "name": "his",
            "type": "his-xml-ws",
            "mappings": str(ROOT / "mappings" / member),
            "receives": receives,
            "options": {"url": sims[member].url, "poll_s": 0.2, "timeout_s": 5.0},
        }

    members = [
        {
            "id": CORE,
            "zh": "复兴医院",
            "en": "Fuxing Hospital",
            "role": "core",
            "adapters": [
                {
                    "name": "lis",
                    "type": "lis-hl7",
                    "mappings": str(lab_maps),
                    "options": {"port": lis},
                },
                his(CORE, ["referral.*"]),
            ],
        },
        {
            "id": CHC,
            "zh": "月坛社区卫生服务中心",
            "en": "Yuetan CHC",
            "role": "community",
            "adapters": [his(CHC, ["referral.*", "result.*"])],
        },
    ]
    rules = [{"from": CHC, "to": CORE, "kinds": KINDS}, {"from": CORE, "to": CHC, "kinds": KINDS}]
    a = Alliance(root / "alliance", members, rules)
    try:
        for sim in sims.values():
            sim.start()
        a.start(CORE, CHC)
        yield {
            "a": a,
            "chc_his": sims[CHC].his,
            "core_his": sims[CORE].his,
            "lis": lis,
            "chc_db": sims[CHC].db,
        }
    finally:
        a.stop_all()
        for sim in sims.values():
            sim.stop()


def received_referral(his: Any, slip_no: str) -> cda.Document:
    return wait_for(
        lambda: next((d for d in his.received("referral") if d.slip.slip_no == slip_no), None),
        timeout=60,
        what=f"referral {slip_no} in the core hospital's HIS",
    )


def task_of(node: Any, slip_no: str) -> dict[str, Any]:
    for row in node.api("GET", "/local/v1/referrals"):
        sr = node.api("GET", f"/fhir/ServiceRequest/{row['sr_id']}", role="clinician")
        if (sr.get("requisition") or {}).get("value") == slip_no:
            return {
                "row": row,
                "sr": sr,
                "task": node.api("GET", f"/fhir/Task/{row['task_id']}", role="clinician"),
            }
    raise AssertionError(f"no referral {slip_no} at {node.node_id}")


@pytest.mark.slow
def test_lab_results_in_the_centres_ws_his_field_by_field(site: dict[str, Any]) -> None:
    a, chc_his, core_his = site["a"], site["chc_his"], site["core_his"]
    chc, core = a.node(CHC), a.node(CORE)
    slip = referral_slip()
    ref_doc = chc_his.write_referral(slip)
    received_referral(core_his, slip.slip_no)
    thread = wait_for(
        lambda: next(
            (
                r["thread"]
                for r in core.api("GET", "/local/v1/referrals")
                if r["status"] == "received"
            ),
            None,
        ),
        what="referral received at the core",
    )
    assert chc_his.lab_reports() == []
    assert lis_send(site["lis"], UTF8) == "AA"  # same patient: PID-3 national ID
    got = wait_for(
        lambda: r if len(r := chc_his.lab_reports()) == 2 else None,
        timeout=60,
        what="two lab reports in the centre's HIS",
    )
    src = source(UTF8)
    for doc, theirs in zip(got, src["reports"], strict=True):
        assert_report_matches(doc, theirs, lab="复兴医院检验科")
        assert (doc.version, doc.replaces, doc.doc_id) == (1, "", f"{doc.report_id}-v1")
        # filed under the centre's own referral document, slip number and record number
        assert (doc.referral_doc, doc.slip_no, doc.mrn, doc.mrn_authority) == (
            ref_doc,
            slip.slip_no,
            slip.mrn,
            CHC,
        )
        # the same report in the centre's FHIR store: setId and observation ids are its ids
        dr = chc.api("GET", f"/fhir/DiagnosticReport/{doc.report_id}", role="clinician")
        DiagnosticReport.model_validate(dr)
        assert [r["reference"] for r in dr["result"]] == [
            f"Observation/{x.result_id}" for x in doc.items
        ]
        assert chc_his.deliveries(doc.doc_id) == 1
    # routed on the referral's thread: the packet the centre's node took is that thread's
    assert db_rows(chc, "SELECT thread FROM inbox WHERE kind = 'result.lab'") == [(thread,)]
    wanted = dict.fromkeys(GAPS, 1)
    wait_for(lambda: lab_gaps(chc) == wanted, what="mapping gaps counted")
    with closing(sqlite3.connect(site["chc_db"])) as db:
        raws = [
            bytes(r) for (r,) in db.execute("SELECT raw FROM inbound WHERE type = 'lab-report'")
        ]
    assert len(raws) == 2 and all(
        ID_NUMBER.encode() not in r and "秀英".encode() not in r for r in raws
    )

    # the lab corrects the glucose; the centre's HIS answers the first offer with a Fault
    chc_his.fail_next(1, op="ReceiveLabReport")
    assert lis_send(site["lis"], CORRECTED) == "AA"
    got = wait_for(
        lambda: r if len(r := chc_his.lab_reports()) == 3 else None,
        timeout=90,
        what="the corrected report in the centre's HIS",
    )
    fixed, before = got[2], got[1]
    (theirs,) = source(CORRECTED)["reports"]
    assert_report_matches(fixed, theirs, lab="FXLAB")  # the correction names the facility only
    assert (fixed.report_id, fixed.version, fixed.doc_id, fixed.replaces) == (
        before.report_id,
        2,
        f"{before.report_id}-v2",
        before.doc_id,
    )
    assert [x.result_id for x in fixed.items] == [x.result_id for x in before.items]
    glu = fixed.items[0]
    assert (glu.code, glu.value, glu.status, glu.observed_at, glu.notes) == (
        "3001",
        "7.25",
        "corrected",
        "20261120110000+0800",
        "复测后更正",
    )
    assert (fixed.status, fixed.written_at) == ("corrected", "20261120112500+0800")
    calls = [(op, out) for op, d, out in chc_his.calls() if d == fixed.doc_id]
    assert calls == [("ReceiveLabReport", "fault"), ("ReceiveLabReport", "stored")]
    assert chc_his.deliveries(fixed.doc_id) == 1  # stored once
    (packet,) = [
        p
        for (p,) in db_rows(
            chc, "SELECT packet_id FROM inbox WHERE kind = 'result.lab' ORDER BY seq DESC LIMIT 1"
        )
    ]
    sent = wait_for(
        lambda: (
            (
                r := db_rows(
                    chc,
                    "SELECT state, attempts, last_error FROM inbox WHERE packet_id = :p",
                    p=packet,
                )
            )[0][0]
            == "delivered"
            and r
        ),
        what="the corrected packet delivered",
    )
    assert sent[0][1] == 2 and "HT-WS-UNAVAILABLE" in sent[0][2]
    wanted.update(dict.fromkeys(("24323-8", "1988-5", "5196-1", "XYZ99", "TITER"), 2))
    wait_for(lambda: lab_gaps(chc) == wanted, what="mapping gaps counted again")
    for node in (chc, core):
        text = node.log.read_text(encoding="utf-8", errors="replace")
        assert ID_NUMBER not in text and "秀英" not in text and slip.phone not in text


@pytest.mark.slow
def test_cancel_from_the_ws_his_reaches_the_other_node_once(site: dict[str, Any]) -> None:
    a, chc_his, core_his = site["a"], site["chc_his"], site["core_his"]
    chc, core = a.node(CHC), a.node(CORE)
    slip = referral_slip(
        slip_no="YTZZ-CX-1",
        patient_name="赵淑芬",
        id_number="110102196205054321",
        mrn="YT0002",
        phone="13800000001",
    )
    ref_doc = chc_his.write_referral(slip)
    got = received_referral(core_his, slip.slip_no)
    reason = "家属要求在社区继续治疗 <暂不转诊>"
    cancel_doc = chc_his.cancel(ref_doc, reason, doctor="李医生")
    # the HIS lost the ack and offers it again; the doctor also clicks "withdraw" a second time
    first_raw = next(raw for d, raw in _outbound(site["chc_db"]) if d == cancel_doc)
    chc_his.write_raw(cancel_doc, "cancel", first_raw)
    again = chc_his.cancel(ref_doc, "再次撤销")
    wait_for(
        lambda: task_of(core, slip.slip_no)["task"]["status"] == "cancelled",
        timeout=60,
        what="Task cancelled at the core",
    )
    found = task_of(core, slip.slip_no)
    task = Task.model_validate(found["task"])
    assert task.status == "cancelled" and task.statusReason.text == reason
    assert found["sr"]["status"] == "revoked"
    assert found["row"]["step"] == "cancelled"
    # the referrer mirrors it
    wait_for(
        lambda: task_of(chc, slip.slip_no)["task"]["status"] == "cancelled",
        timeout=60,
        what="Task cancelled at the centre",
    )
    mine = task_of(chc, slip.slip_no)["task"]
    assert mine["statusReason"]["text"] == reason
    # applied once: one cancel packet, every copy acked, the second one audited as repeated
    thread = task_of(chc, slip.slip_no)["row"]["thread"]
    assert db_rows(
        chc, "SELECT COUNT(*) FROM outbox WHERE kind = 'referral.cancel' AND thread = :t", t=thread
    ) == [(1,)]
    wait_for(lambda: chc_his.pending() == [], timeout=30, what="every cancel document acked")
    held = [
        h
        for h in chc.api("GET", "/local/v1/quarantine")
        if cancel_doc in h["message"] or again in h["message"]
    ]
    assert held == []
    rows = list(csv.DictReader(io.StringIO(chc.cli("audit", "export", "--format", "csv").stdout)))
    repeated = [r for r in rows if f"cancel document {again}" in r["message"]]
    assert [(r["action"], r["thread"], r["kind"]) for r in repeated] == [
        ("referral", thread, "referral.cancel")
    ]
    assert not any(f"cancel document {cancel_doc}" in r["message"] for r in rows)
    # the core hospital's HIS gets the cancellation with its reason, once
    notice = wait_for(
        lambda: next(
            (d for d in core_his.received("cancel") if d.slip.slip_no == slip.slip_no), None
        ),
        timeout=60,
        what="cancellation in the core hospital's HIS",
    )
    assert asdict(notice.slip) == asdict(
        cda.CancelSlip(slip.slip_no, reason, "cancelled", written_at=notice.written_at)
    )
    assert (notice.referral_doc, notice.custodian) == (got.doc_id, CHC)
    assert [d.slip.slip_no for d in core_his.received("cancel")].count(slip.slip_no) == 1
    assert core_his.deliveries(notice.doc_id) == 1
    # ... and the centre's HIS the confirmation
    confirm = wait_for(
        lambda: next(
            (d for d in chc_his.received("cancel") if d.slip.slip_no == slip.slip_no), None
        ),
        timeout=60,
        what="cancellation confirmed in the centre's HIS",
    )
    assert (confirm.slip.status, confirm.slip.reason, confirm.referral_doc) == (
        "cancelled",
        reason,
        ref_doc,
    )
    for node in (chc, core):
        text = node.log.read_text(encoding="utf-8", errors="replace")
        assert slip.id_number not in text and "淑芬" not in text


def _outbound(db_path: Path) -> list[tuple[str, bytes]]:
    with closing(sqlite3.connect(db_path)) as db:
        return [
            (str(d), bytes(r))
            for d, r in db.execute("SELECT doc_id, raw FROM outbound ORDER BY seq")
        ]


@pytest.mark.slow
def test_bad_cancel_documents_quarantined_and_audited(site: dict[str, Any]) -> None:
    chc_his, chc = site["chc_his"], site["a"].node(CHC)
    unknown = cda.Document(
        "CX-UNKNOWN-1",
        "cancel",
        cda.CancelSlip("YTZZ-NONE", "患者失访"),
        "2026-11-20T10:00:00+08:00",
        CHC,
        "NO-SUCH-DOC",
    )
    chc_his.write(unknown)
    blank = cda.write(replace(unknown, doc_id="CX-BLANK-1", referral_doc="YT-ZZD-000001"), SITE)
    chc_his.write_raw(
        "CX-BLANK-1", "cancel", blank.replace("<text>患者失访</text>".encode(), b"<text> </text>")
    )
    wait_for(lambda: chc_his.pending() == [], timeout=30, what="bad cancels acked")
    held = {
        h["message"].split(" ")[1]: h
        for h in chc.api("GET", "/local/v1/quarantine")
        if h["message"].startswith("record CX-")
    }
    order = "/ClinicalDocument/inFulfillmentOf/order/id[@root='2.999.156.2']/@extension"
    assert held["CX-UNKNOWN-1"]["code"] == "HT-WS-DOC"
    assert held["CX-UNKNOWN-1"]["message"] == (
        f"record CX-UNKNOWN-1 field {order}: document CX-UNKNOWN-1 answers referral document "
        "NO-SUCH-DOC, which this node never wrote into the HIS"
    )
    assert held["CX-BLANK-1"]["code"] == "HT-WS-MISSING"
    assert held["CX-BLANK-1"]["message"].startswith(
        "record CX-BLANK-1 field /ClinicalDocument/component/structuredBody/component/section"
        "/text: "
    )
    assert all(h["source"] == "adapter:his" for h in held.values())
    rows = list(csv.DictReader(io.StringIO(chc.cli("audit", "export", "--format", "csv").stdout)))
    audited = [r for r in rows if r["action"] == "quarantined" and "record CX-" in r["message"]]
    assert sorted(r["code"] for r in audited) == ["HT-WS-DOC", "HT-WS-MISSING"]
