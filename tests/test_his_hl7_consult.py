"""Consultations from and into the HL7 v2 HIS (``his-hl7``): the layout first (a REF^I12 with a
consultation kind and a REF^I13 read back field by field in GB18030), then real processes: the
community centre's HIS (a simulated vendor HIS process over real MLLP) sends the request, the
centre (driven over its ``/fhir`` API) returns it for completion, the HIS sends the records,
the centre schedules, reports and releases; the HIS files each step (RRI^I12) and the report
(ORU^R01) field by field; an imaging reading arrives as the imaging ORU with its PDF; a bad
request is NAKed naming the field.
"""

from __future__ import annotations

import base64
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import asdict, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from adapters.consult_slips import ConsultSlip, ResubmitSlip
from adapters.his_hl7 import consult as hz
from adapters.his_hl7 import messages
from adapters.hl7v2 import charset
from simulators.his_hl7 import VendorHis
from tests import consults
from tests.harness import ROOT, Alliance, NodeProcess, free_port_block, wait_for
from tests.test_consult_loop import Fhir, row

CHC, CORE = "yuetan-chc", "fuxing"
KINDS = ["consult.request", "consult.status", "consult.report"]
OFFSET = timedelta(hours=8)
HEADER = messages.Header("CHCHIS", "chc-his", "HUTONG", "", "GB 18030-2000")
STUDY = "1.2.826.0.1.3680043.8.498.40404"


def slip(n: int, **kw: Any) -> ConsultSlip:
    base = ConsultSlip(
        slip_no=f"YTHZ{n:06d}",
        kind="mdt",
        to_member=CORE,
        patient_name="王秀英",
        gender="female",
        birth_date="1950-03-15",
        id_number="110102195003151234",
        phone="13901234567",
        mrn="YT0001",
        diagnosis_code="YTZ-01",
        diagnosis_name="原发性高血压",
        reason="明确诊断|制定方案",
        question="血压控制不佳合并右肺结节，是否需手术？\n请胸外科评估",
        summary="头晕两周。\n既往高血压十年",
        specialties="KS01;KS03",
        urgent=True,
        consent_by="患者本人",
        consent_doc="ZQTY-001",
        study_uid="",
        shared_results="",
        doctor="李医生",
        written_at="2026-12-01T09:00:00+08:00",
    )
    return replace(base, **kw)


def test_request_and_records_read_back_field_by_field_in_gb18030() -> None:
    s = slip(1, study_uid=STUDY, kind="imaging-reading")
    raw = charset.encode(
        hz.request_message(HEADER, s, "C1", datetime(2026, 12, 1, tzinfo=UTC)), "GB 18030-2000"
    )
    inbound = messages.read(*charset.decode(raw))
    assert inbound.what == "consult"
    assert asdict(hz.request_slip(inbound.msg, {}, OFFSET)) == asdict(s)
    r = ResubmitSlip(
        slip_no=s.slip_no,
        title="肺功能报告",
        text="FEV1 78%\n轻度阻塞",
        doctor="李医生",
        written_at="2026-12-02T10:00:00+08:00",
    )
    raw = charset.encode(
        hz.resubmit_message(HEADER, r, "C2", datetime.now(UTC), thread="t-1"), "GB 18030-2000"
    )
    inbound = messages.read(*charset.decode(raw))
    assert (inbound.what, inbound.thread) == ("consult_resubmit", "t-1")
    assert asdict(hz.resubmit_slip(inbound.msg, OFFSET)) == asdict(r)


# -- real processes -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Alliance, VendorHis]]:
    root = tmp_path_factory.mktemp("his-hl7-consult")
    adapter, his_port = (free_port_block(2) + i for i in range(2))
    members = [
        {"id": CORE, "zh": "复兴医院", "en": "Fuxing Hospital", "role": "core"},
        {
            "id": CHC,
            "zh": "月坛社区卫生服务中心",
            "en": "Yuetan CHC",
            "role": "community",
            "adapters": [
                {
                    "name": "his",
                    "type": "his-hl7",
                    "mappings": str(ROOT / "mappings" / CHC),
                    "receives": ["consult.*"],
                    "options": {
                        "listen": f"127.0.0.1:{adapter}",
                        "his": f"127.0.0.1:{his_port}",
                        "charset": "GB 18030-2000",
                        "his_application": "CHCHIS",
                        "ack_timeout_s": 5,
                        "connect_timeout_s": 2,
                    },
                }
            ],
        },
    ]
    rules = [{"from": CHC, "to": CORE, "kinds": KINDS}, {"from": CORE, "to": CHC, "kinds": KINDS}]
    a = Alliance(root / "alliance", members, rules)
    his = VendorHis(
        root / "chc-his.sqlite",
        f"127.0.0.1:{adapter}",
        application="CHCHIS",
        facility="chc-his",
        charset_name="GB 18030-2000",
    )
    log = open(root / "chc-his.log", "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "simulators.his_hl7",
            "serve",
            "--db",
            str(his.db),
            "--listen",
            f"127.0.0.1:{his_port}",
        ],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        a.start(CORE, CHC)
        yield a, his
    finally:
        a.stop_all()
        proc.terminate()
        proc.wait(30)
        log.close()


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=60) as c:
        yield c


def threads(node: NodeProcess) -> list[str]:
    return [r["thread"] for r in node.api("GET", "/local/v1/consultations")]


def statuses(his: VendorHis, slip_no: str, n: int) -> list[dict[str, Any]]:
    got = [r.slip for r in his.received("consult_status") if r.slip_no == slip_no]
    return got if len(got) >= n else []


def new_thread(core: NodeProcess, before: set[str]) -> str:
    [thread] = wait_for(
        lambda: [t for t in threads(core) if t not in before],
        timeout=40,
        what="the consultation at the centre",
    )
    return str(thread)


@pytest.mark.slow
def test_mdt_from_the_hl7_his_returned_resubmitted_scheduled_and_reported(
    site: tuple[Alliance, VendorHis], client: httpx.Client
) -> None:
    a, his = site
    chc, core = a.node(CHC), a.node(CORE)
    before = set(threads(core))
    s = slip(1)
    assert his.consult(s).code == "AA"
    thread = new_thread(core, before)
    fc, fi = Fhir(client, core), Fhir(client, chc)
    crow = wait_for(lambda: row(core, thread), timeout=40, what="the centre's row")
    assert (crow["kind"], crow["priority"]) == ("mdt", "urgent")
    sr = fc.read(f"ServiceRequest/{crow['sr_id']}")
    assert sr["note"][0]["text"] == s.question
    assert sr["identifier"][0]["value"] == s.slip_no
    assert sr["reasonCode"][0]["coding"][0]["code"] == "I10"
    assert [d["coding"][0]["code"] for d in sr["orderDetail"]] == ["02", "50"]
    [st] = wait_for(lambda: statuses(his, s.slip_no, 1), timeout=40, what="received")
    assert (st["step"], st["event"], st["kind"], st["thread"], st["mrn"]) == (
        "received",
        "received",
        "mdt",
        thread,
        "YT0001",
    )
    fc.op(
        thread,
        "return",
        {
            "resourceType": "Parameters",
            "parameter": [{"name": "reason", "valueString": "缺肺功能报告"}],
        },
    )
    got = wait_for(lambda: statuses(his, s.slip_no, 2), timeout=40, what="returned")
    assert (got[1]["step"], got[1]["event"], got[1]["reason"]) == (
        "returned",
        "return",
        "缺肺功能报告",
    )
    ack = his.resubmit(
        ResubmitSlip(
            slip_no=s.slip_no,
            title="肺功能报告",
            text="FEV1 78%\n轻度阻塞性通气功能障碍",
            doctor="李医生",
            written_at="2026-12-02T10:00:00+08:00",
        ),
        thread=thread,
    )
    assert ack.code == "AA", ack.text
    wait_for(
        lambda: (row(core, thread) or {}).get("step") == "resubmitted",
        timeout=40,
        what="resubmitted",
    )
    sr = fc.read(f"ServiceRequest/{crow['sr_id']}")
    doc = next(
        fc.read(x["reference"])
        for x in sr["supportingInfo"]
        if x["reference"].startswith("DocumentReference/")
    )
    assert (
        base64.b64decode(doc["content"][0]["attachment"]["data"]).decode()
        == "FEV1 78%\n轻度阻塞性通气功能障碍"
    )
    fc.op(thread, "schedule", consults.schedule(CORE, 3))
    got = wait_for(lambda: statuses(his, s.slip_no, 3), timeout=40, what="scheduled")
    assert (
        got[2]["step"],
        got[2]["start"],
        got[2]["end"],
        got[2]["video_link"],
        got[2]["experts"],
    ) == (
        "scheduled",
        "20261205140000+0800",
        "20261205150000+0800",
        consults.MEETING,
        "张主任(呼吸内科);王主任(胸外科);赵主任(病理科)",
    )
    fc.op(thread, "start")
    patient = fc.read(f"Task/{thread}")["for"]["reference"]
    fc.op(thread, "report", consults.report(patient, refer_to=CORE))
    fc.op(thread, "release")
    got = wait_for(lambda: statuses(his, s.slip_no, 6), timeout=40, what="released")
    assert [g["event"] for g in got] == [
        "received",
        "return",
        "schedule",
        "start",
        "report",
        "release",
    ]
    assert [g["step"] for g in got][3:] == ["in-consultation", "reported", "released"]
    [rep] = wait_for(
        lambda: [r.slip for r in his.received("consult_report") if r.thread == thread],
        timeout=40,
        what="the report ORU",
    )
    comp = fi.read(
        next(r for r in row(chc, thread)["report_refs"].split() if r.startswith("Composition/"))
    )
    (obr,) = rep["reports"]
    assert (
        rep["mrn"],
        rep["mrn_authority"],
        obr["placer"],
        obr["filler"],
        obr["status"],
        obr["code"],
        obr["interpreter"],
    ) == (
        "YT0001",
        "CHCHIS",
        s.slip_no,
        comp["id"],
        "F",
        ["11488-4", "会诊报告", "LN"],
        "张主任（呼吸内科）",
    )
    items = [(i["vtype"], i["code"][0], i["value"]) for i in obr["items"]]
    assert items == [
        ("CWE", "29548-5", [["C34.1", "右肺上叶恶性肿瘤（待病理证实）", "LOCALDX"]]),
        ("TX", "29548-5", [["右肺上叶恶性肿瘤（待病理证实）"]]),
        ("TX", "18776-5", [["建议行胸腔镜下右肺上叶楔形切除术"]]),
        ("CWE", "REFREC", [[CORE, "", "HTMEMBER"]]),
    ]
    assert obr["items"][3]["notes"] == ["建议上转胸外科住院手术（已与家属沟通同意）"]


@pytest.mark.slow
def test_imaging_reading_arrives_as_the_imaging_oru_with_its_pdf(
    site: tuple[Alliance, VendorHis], client: httpx.Client
) -> None:
    a, his = site
    core = a.node(CORE)
    before = set(threads(core))
    s = slip(
        2,
        kind="imaging-reading",
        study_uid=STUDY,
        specialties="",
        id_number="11010219600101002X",
        mrn="YT0002",
    )
    assert his.consult(s).code == "AA"
    thread = new_thread(core, before)
    fc = Fhir(client, core)
    wait_for(
        lambda: (row(core, thread) or {}).get("step") == "received", timeout=40, what="received"
    )
    patient = fc.read(f"Task/{thread}")["for"]["reference"]
    [study] = fc.ok("GET", "/ImagingStudy", params={"patient": patient})["entry"]
    fc.op(thread, "schedule", consults.schedule(CORE, 1))
    fc.op(thread, "start")
    fc.op(
        thread,
        "report",
        consults.imaging_report(patient, f"ImagingStudy/{study['resource']['id']}"),
    )
    fc.op(thread, "release")
    [(_control, oru, _raw)] = wait_for(
        lambda: [x for x in his.imaging_reports() if x[1]["thread"] == thread],
        timeout=40,
        what="the imaging ORU",
    )
    (obr,) = oru["reports"]
    assert (oru["mrn"], obr["placer"], obr["study_uid"], obr["status"]) == (
        "YT0002",
        s.slip_no,
        STUDY,
        "F",
    )
    impression = next(i for i in obr["items"] if i["code"][0] == "19005-8")
    assert impression["value"] == [["右肺上叶磨玻璃结节，Lung-RADS 4A，建议3个月复查"]]
    pdf = next(i for i in obr["items"] if i["vtype"] == "ED")
    assert base64.b64decode(pdf["value"][0][4]) == consults.PDF


@pytest.mark.slow
@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"consent_by": ""}, "NTE-4"),
        ({"question": ""}, "NTE-4"),
        ({"kind": "imaging-reading", "study_uid": ""}, "ZDS-1"),
        ({"diagnosis_code": "YTZ-999"}, "DG1-3"),
    ],
)
def test_a_bad_request_is_naked_naming_the_field(
    site: tuple[Alliance, VendorHis], change: dict[str, Any], field: str
) -> None:
    _a, his = site
    ack = his.consult(slip(900, **change))
    assert ack.code in ("AE", "AR")
    assert ack.text.startswith(f"{field}:"), ack.text


@pytest.mark.slow
def test_a_consultation_the_centre_cancels_reaches_the_his_with_the_reason(
    site: tuple[Alliance, VendorHis], client: httpx.Client
) -> None:
    a, his = site
    core = a.node(CORE)
    before = set(threads(core))
    s = slip(3, kind="general", specialties="", id_number="110102197707070077", mrn="YT0003")
    assert his.consult(s).code == "AA"
    thread = new_thread(core, before)
    fc = Fhir(client, core)
    wait_for(
        lambda: (row(core, thread) or {}).get("step") == "received", timeout=40, what="received"
    )
    task = fc.read(f"Task/{thread}")
    task["status"], task["statusReason"] = "cancelled", {"text": "患者已转上级医院就诊"}
    fc.ok("PUT", f"/Task/{thread}", task)
    got = wait_for(lambda: statuses(his, s.slip_no, 2), timeout=40, what="cancelled")
    assert (got[1]["step"], got[1]["event"], got[1]["reason"], got[1]["mrn"]) == (
        "cancelled",
        "cancelled",
        "患者已转上级医院就诊",
        "YT0003",
    )


@pytest.mark.slow
def test_a_request_the_his_withdraws_with_ref_i14_is_cancelled(
    site: tuple[Alliance, VendorHis], client: httpx.Client
) -> None:
    """REF^I14 naming the consultation number: the inviter's cancel; the centre confirms
    before the meeting and the HIS gets the RRI^I12 cancelled; after the meeting began the
    REF^I14 is refused naming RF1-6 and nothing changes."""
    a, his = site
    core = a.node(CORE)
    before = set(threads(core))
    s = slip(4, kind="general", specialties="", id_number="110102196606060066", mrn="YT0004")
    assert his.consult(s).code == "AA"
    thread = new_thread(core, before)
    wait_for(lambda: statuses(his, s.slip_no, 1), timeout=40, what="received")
    ack = his.cancel(s.slip_no, "患者已在外院就诊", mrn="YT0004")
    assert ack.code == "AA", ack.text
    got = wait_for(lambda: statuses(his, s.slip_no, 2), timeout=40, what="cancelled")
    assert (got[1]["event"], got[1]["step"], got[1]["reason"]) == (
        "cancelled",
        "cancelled",
        "患者已在外院就诊",
    )
    assert row(core, thread)["step"] == "cancelled"
    before = set(threads(core))
    s = slip(5, kind="general", specialties="", id_number="110102196606060066", mrn="YT0004")
    assert his.consult(s).code == "AA"
    thread = new_thread(core, before)
    fc = Fhir(client, core)
    wait_for(
        lambda: (row(core, thread) or {}).get("step") == "received", timeout=40, what="received"
    )
    fc.op(thread, "schedule", consults.schedule(CORE, 1))
    fc.op(thread, "start")
    wait_for(lambda: statuses(his, s.slip_no, 3), timeout=40, what="started")
    ack = his.cancel(s.slip_no, "家属要求撤回", mrn="YT0004")
    assert ack.code in ("AE", "AR") and ack.text.startswith("RF1-6:"), ack.text
    assert row(core, thread)["step"] == "in-consultation"
