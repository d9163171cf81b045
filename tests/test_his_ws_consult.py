"""Consultations from and into the XML web-service HIS (``his-xml-ws``): the documents first
(远程会诊申请单, 补充资料, 会诊状态通知, 会诊报告 written and read back against
``consult.xsd``, a bad one refused naming the element), then real processes: the community
centre's HIS (the simulated vendor service, its own process) offers the request, the centre
(driven over its ``/fhir`` API) returns it, the HIS offers the records, the centre schedules,
reports and releases; the HIS has each step and the report field by field; an imaging reading
arrives with its PDF, also as an exam report document; a bad request is quarantined naming
the element.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from adapters.consult_slips import ConsultReport, ConsultSlip, ConsultStatus, ResubmitSlip
from adapters.his_ws import consult_doc
from adapters.his_ws.errors import SchemaInvalid
from bridge.store.db import Store
from bridge.store.tables import QUARANTINE
from simulators.his_ws import HisWs, HisWsProcess
from tests import consults
from tests.harness import ROOT, Alliance, NodeProcess, wait_for
from tests.test_consult_loop import Fhir, row

CHC, CORE = "zhanlanlu-chc", "fuxing"
KINDS = ["consult.request", "consult.status", "consult.report"]
STUDY = "1.2.826.0.1.3680043.8.498.50505"


def slip(n: int, **kw: Any) -> ConsultSlip:
    base = ConsultSlip(
        slip_no=f"ZLHZ{n:06d}",
        kind="mdt",
        to_member=CORE,
        patient_name="王秀英",
        gender="female",
        birth_date="1950-03-15",
        id_number="110102195003151234",
        phone="13901234567",
        mrn="ZL0001",
        diagnosis_code="ZLS001",
        diagnosis_name="原发性高血压",
        reason="明确诊断 & 制定方案",
        question="血压控制不佳合并右肺结节，是否需手术？\n请胸外科评估",
        summary="头晕两周 <三天加重>",
        specialties="01;02",
        urgent=True,
        consent_by="患者本人",
        consent_doc="ZQTY-001",
        study_uid="",
        shared_results="",
        doctor="李医生",
        written_at="2026-12-01T09:00:00+08:00",
    )
    return replace(base, **kw)


@pytest.mark.parametrize("encoding", ["UTF-8", "GB18030"])
def test_documents_read_back_field_by_field(encoding: str) -> None:
    s = slip(1, kind="imaging-reading", study_uid=STUDY, shared_results="dr-1;dr-2")
    got = consult_doc.read(
        consult_doc.write(consult_doc.Doc("ZL-HZSQ-1", "consult", s), encoding), "ZL-HZSQ-1"
    )
    assert (got.doc_id, got.type) == ("ZL-HZSQ-1", "consult") and asdict(got.record) == asdict(s)
    r = ResubmitSlip(
        slip_no=s.slip_no,
        title="肺功能报告",
        text="FEV1 78%\n轻度阻塞",
        doctor="李医生",
        written_at="2026-12-02T10:00:00+08:00",
    )
    got = consult_doc.read(
        consult_doc.write(
            consult_doc.Doc("ZL-HZBC-1", "consult-records", r, consult_doc="ZL-HZSQ-1"), encoding
        ),
        "ZL-HZBC-1",
    )
    assert got.consult_doc == "ZL-HZSQ-1" and asdict(got.record) == asdict(r)
    st = ConsultStatus(
        slip_no=s.slip_no,
        event="schedule",
        step="scheduled",
        status="accepted",
        start="2026-12-05T14:00:00+08:00",
        end="2026-12-05T15:00:00+08:00",
        experts="张主任(呼吸内科);王主任",
        video_link=consults.MEETING,
        at="2026-12-03T10:00:00+08:00",
    )
    got = consult_doc.read(
        consult_doc.write(
            consult_doc.Doc("p-1", "consult-status", st, consult_doc="ZL-HZSQ-1", thread="t-1"),
            encoding,
        ),
        "p-1",
    )
    assert (got.thread, asdict(got.record)) == ("t-1", asdict(st))
    rep = ConsultReport(
        slip_no=s.slip_no,
        report_id="dr-9",
        kind="imaging-reading",
        status="final",
        conclusion="结节 4A",
        study_uid=STUDY,
        pdf=consults.PDF,
        author="孙主任",
        issued_at="2026-12-05T16:00:00+08:00",
    )
    got = consult_doc.read(
        consult_doc.write(
            consult_doc.Doc("dr-9-R", "consult-report", rep, consult_doc="ZL-HZSQ-1"), encoding
        ),
        "dr-9-R",
    )
    assert asdict(got.record) == asdict(rep)


def test_a_bad_request_document_names_the_element() -> None:
    raw = consult_doc.write(consult_doc.Doc("ZL-HZSQ-2", "consult", slip(2)))
    bad = raw.replace(b"<question>", b"<questionx>").replace(b"</question>", b"</questionx>")
    with pytest.raises(SchemaInvalid) as err:
        consult_doc.read(bad, "ZL-HZSQ-2")
    assert err.value.field == "/ConsultRequest/questionx"
    with pytest.raises(SchemaInvalid) as err:
        consult_doc.read(raw.replace(b"<kind>mdt</kind>", b"<kind>x</kind>"), "ZL-HZSQ-2")
    assert err.value.field == "/ConsultRequest/kind"


# -- real processes -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Alliance, HisWs]]:
    root = tmp_path_factory.mktemp("his-ws-consult")
    sim = HisWsProcess(root / "his-chc.sqlite", CHC, site_name="展览路社区卫生服务中心")
    members = [
        {"id": CORE, "zh": "复兴医院", "en": "Fuxing Hospital", "role": "core"},
        {
            "id": CHC,
            "zh": "展览路社区卫生服务中心",
            "en": "Zhanlanlu CHC",
            "role": "community",
            "adapters": [
                {
                    "name": "his",
                    "type": "his-xml-ws",
                    "mappings": str(ROOT / "mappings" / CHC),
                    "receives": ["consult.*"],
                    "options": {
                        "url": sim.url,
                        "poll_s": 0.2,
                        "timeout_s": 5.0,
                        "site_name": "展览路社区卫生服务中心",
                    },
                }
            ],
        },
    ]
    rules = [{"from": CHC, "to": CORE, "kinds": KINDS}, {"from": CORE, "to": CHC, "kinds": KINDS}]
    a = Alliance(root / "alliance", members, rules)
    sim.start()
    try:
        a.start(CORE, CHC)
        yield a, sim.his
    finally:
        a.stop_all()
        sim.stop()


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=60) as c:
        yield c


def threads(node: NodeProcess) -> list[str]:
    return [r["thread"] for r in node.api("GET", "/local/v1/consultations")]


def new_thread(core: NodeProcess, before: set[str]) -> str:
    [thread] = wait_for(
        lambda: [t for t in threads(core) if t not in before],
        timeout=40,
        what="the consultation at the centre",
    )
    return str(thread)


def statuses(his: HisWs, slip_no: str, n: int) -> list[consult_doc.Doc]:
    got = [d for d in his.consult_documents("consult-status") if d.record.slip_no == slip_no]
    return got if len(got) >= n else []


@pytest.mark.slow
def test_mdt_from_the_ws_his_returned_resubmitted_scheduled_and_reported(
    site: tuple[Alliance, HisWs], client: httpx.Client
) -> None:
    a, his = site
    chc, core = a.node(CHC), a.node(CORE)
    before = set(threads(core))
    s = slip(10)
    request_doc = his.write_consult(s)
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
    assert (st.consult_doc, st.thread, st.record.event, st.record.step, st.record.status) == (
        request_doc,
        thread,
        "received",
        "received",
        "received",
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
    assert (got[1].record.step, got[1].record.status, got[1].record.reason) == (
        "returned",
        "on-hold",
        "缺肺功能报告",
    )
    his.write_records(
        request_doc,
        ResubmitSlip(
            slip_no=s.slip_no,
            title="肺功能报告",
            text="FEV1 78%\n轻度阻塞性通气功能障碍",
            doctor="李医生",
            written_at="2026-12-02T10:00:00+08:00",
        ),
    )
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
        got[2].record.step,
        got[2].record.start,
        got[2].record.end,
        got[2].record.video_link,
        got[2].record.experts,
    ) == (
        "scheduled",
        "2026-12-05T14:00:00+08:00",
        "2026-12-05T15:00:00+08:00",
        consults.MEETING,
        "张主任(呼吸内科);王主任(胸外科);赵主任(病理科)",
    )
    fc.op(thread, "start")
    patient = fc.read(f"Task/{thread}")["for"]["reference"]
    fc.op(thread, "report", consults.report(patient, refer_to=CORE))
    fc.op(thread, "release")
    got = wait_for(lambda: statuses(his, s.slip_no, 6), timeout=40, what="released")
    assert [g.record.event for g in got] == [
        "received",
        "return",
        "schedule",
        "start",
        "report",
        "release",
    ]
    [rep] = wait_for(
        lambda: [
            d for d in his.consult_documents("consult-report") if d.record.slip_no == s.slip_no
        ],
        timeout=40,
        what="the report",
    )
    comp = fi.read(
        next(r for r in row(chc, thread)["report_refs"].split() if r.startswith("Composition/"))
    )
    assert rep.consult_doc == request_doc and rep.doc_id == f"{comp['id']}-R"
    assert asdict(rep.record) == asdict(
        ConsultReport(
            slip_no=s.slip_no,
            report_id=comp["id"],
            kind="mdt",
            status="final",
            diagnosis_code="C34.1",
            diagnosis_name="右肺上叶恶性肿瘤（待病理证实）",
            diagnosis_text="右肺上叶恶性肿瘤（待病理证实）",
            advice="建议行胸腔镜下右肺上叶楔形切除术",
            referral_recommended=True,
            referral_to=CORE,
            referral_note="建议上转胸外科住院手术（已与家属沟通同意）",
            author="张主任（呼吸内科）",
            issued_at="2026-12-05T15:10:00+08:00",
        )
    )


@pytest.mark.slow
def test_imaging_reading_lands_as_report_and_exam_report_with_its_pdf(
    site: tuple[Alliance, HisWs], client: httpx.Client
) -> None:
    a, his = site
    core = a.node(CORE)
    before = set(threads(core))
    s = slip(
        11,
        kind="imaging-reading",
        study_uid=STUDY,
        specialties="",
        id_number="11010219600101002X",
        mrn="ZL0002",
    )
    request_doc = his.write_consult(s)
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
    [rep] = wait_for(
        lambda: [
            d for d in his.consult_documents("consult-report") if d.record.slip_no == s.slip_no
        ],
        timeout=40,
        what="the reading",
    )
    assert (
        rep.record.kind,
        rep.record.status,
        rep.record.study_uid,
        rep.record.conclusion,
        rep.record.pdf,
    ) == (
        "imaging-reading",
        "final",
        STUDY,
        "右肺上叶磨玻璃结节，Lung-RADS 4A，建议3个月复查",
        consults.PDF,
    )
    [exam] = wait_for(
        lambda: [e for e in his.exam_reports() if e.referral_doc == request_doc],
        timeout=40,
        what="the exam report document",
    )
    assert (exam.study_uid, exam.slip_no, exam.mrn, exam.pdf, exam.producer) == (
        STUDY,
        s.slip_no,
        "ZL0002",
        consults.PDF,
        CORE,
    )


def quarantined(node: NodeProcess) -> list[Any]:
    s = Store(node.plan.storage_dsn)
    try:
        with s.read() as conn:
            return list(
                conn.execute(select(QUARANTINE).where(QUARANTINE.c.source == "adapter:his")).all()
            )
    finally:
        s.dispose()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"consent_by": ""}, "/ConsultRequest/consent_by"),
        ({"kind": "imaging-reading"}, "/ConsultRequest/study_uid"),
        ({"shared_results": "no-such-report"}, "/ConsultRequest/shared_report"),
        ({"diagnosis_code": "ZLS999"}, "/ConsultRequest/diagnosis_code"),
    ],
)
def test_a_bad_request_is_quarantined_naming_the_element(
    site: tuple[Alliance, HisWs], change: dict[str, Any], field: str
) -> None:
    a, his = site
    chc = a.node(CHC)
    doc_id = his.write_consult(slip(900, id_number="110102198003030033", **change))
    held = wait_for(
        lambda: [q for q in quarantined(chc) if q.message.startswith(f"record {doc_id} ")],
        timeout=40,
        what="the document quarantined",
    )
    assert held[0].message.startswith(f"record {doc_id} field {field}:"), held[0].message
    assert "110102198003030033" not in held[0].message
    assert "110102198003030033" not in Path(chc.log).read_text(encoding="utf-8")


@pytest.mark.slow
def test_a_consultation_the_centre_cancels_reaches_the_his_with_the_reason(
    site: tuple[Alliance, HisWs], client: httpx.Client
) -> None:
    a, his = site
    core = a.node(CORE)
    before = set(threads(core))
    s = slip(12, kind="general", specialties="", id_number="110102197707070077")
    request_doc = his.write_consult(s)
    thread = new_thread(core, before)
    fc = Fhir(client, core)
    wait_for(
        lambda: (row(core, thread) or {}).get("step") == "received", timeout=40, what="received"
    )
    task = fc.read(f"Task/{thread}")
    task["status"], task["statusReason"] = "cancelled", {"text": "患者已转上级医院就诊"}
    fc.ok("PUT", f"/Task/{thread}", task)
    got = wait_for(lambda: statuses(his, s.slip_no, 2), timeout=40, what="cancelled")
    assert (got[1].consult_doc, got[1].record.step, got[1].record.status, got[1].record.reason) == (
        request_doc,
        "cancelled",
        "cancelled",
        "患者已转上级医院就诊",
    )


@pytest.mark.slow
def test_a_request_the_his_withdraws_is_cancelled_and_the_his_is_told(
    site: tuple[Alliance, HisWs],
) -> None:
    """A ConsultCancel document naming the request: the inviter's cancel; the centre confirms
    before the meeting and the HIS gets the cancelled ConsultStatus."""
    a, his = site
    core = a.node(CORE)
    before = set(threads(core))
    s = slip(13, kind="general", specialties="", id_number="110102196606060066")
    request_doc = his.write_consult(s)
    thread = new_thread(core, before)
    wait_for(lambda: statuses(his, s.slip_no, 1), timeout=40, what="received")
    his.cancel_consult(request_doc, s.slip_no, "患者已在外院就诊")
    got = wait_for(lambda: statuses(his, s.slip_no, 2), timeout=40, what="cancelled")
    assert (got[1].record.event, got[1].record.step, got[1].record.reason) == (
        "cancelled",
        "cancelled",
        "患者已在外院就诊",
    )
    assert row(core, thread)["step"] == "cancelled"
