"""Consultations from and into the intermediate-database HIS (中间库), on real node processes.

The community centre's HIS writes a 会诊申请 row (``ZZ_HZSQ``); the centre (the core, driven over
its ``/fhir`` API as its consultation staff would) returns it for completion, the HIS adds the
records (``ZZ_HZBC``), the centre schedules, starts, reports and releases. The inviting HIS has
each step as a ``ZZ_JS_HZZT`` row and the report as a ``ZZ_JS_HZBG`` row, field by field; an
imaging reading's report also lands in ``ZZ_JS_JCBG`` with its PDF. Bad rows are quarantined
naming the vendor column.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from adapters.consult_slips import ConsultSlip, ResubmitSlip
from adapters.pacs.study import study_resource_id
from simulators.his_db import HisDb
from tests import consults
from tests.harness import Alliance, NodeProcess, free_port_block, wait_for
from tests.test_consult_loop import Fhir, row
from tests.test_his_db import quarantined, site_folder
from tests.test_pacs import NID1, S1, push, write_modality_files

pytestmark = pytest.mark.slow

CHC, CORE = "desheng-chc", "fuxing"
KINDS = ["consult.request", "consult.status", "consult.report"]
RULES = [{"from": CHC, "to": CORE, "kinds": KINDS}, {"from": CORE, "to": CHC, "kinds": KINDS}]
STUDY = "1.2.826.0.1.3680043.8.498.30303"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Alliance, HisDb]]:
    root = tmp_path_factory.mktemp("hisdb-consult")
    scp = free_port_block(1)
    write_modality_files(root / "modality")
    db = HisDb(f"sqlite:///{root / 'desheng-his.db'}").init()
    maps = site_folder(
        root / "mappings",
        CHC,
        "yuetan-chc",
        {"department": ["KS20,转诊·心血管内科,03.04,心血管内科专业,equivalent,"]},
    )
    members = [
        {"id": CORE, "zh": "复兴医院", "en": "Fuxing Hospital", "role": "core"},
        {
            "id": CHC,
            "zh": "德胜社区卫生服务中心",
            "en": "Desheng CHC",
            "role": "community",
            "adapters": [
                {
                    "name": "his",
                    "type": "his-middle-db",
                    "mappings": str(maps),
                    "receives": ["consult.*"],
                    "options": {"dsn": db.dsn, "poll_every_s": 0.3},
                },
                {
                    "name": "pacs",
                    "type": "pacs-dicom",
                    "receives": ["imaging.*"],
                    "options": {
                        "bind": f"127.0.0.1:{scp}",
                        "ae_title": "DESHENG",
                        "complete_after_s": 120,
                    },
                },
            ],
        },
    ]
    a = Alliance(root / "alliance", members, RULES)
    a.start(CORE, CHC)
    a.scp, a.modality = scp, root / "modality"  # type: ignore[attr-defined]
    yield a, db
    a.stop_all()
    db.close()


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=60) as c:
        yield c


def slip(n: int, **kw: Any) -> ConsultSlip:
    base = ConsultSlip(
        slip_no=f"DSHZ{n:06d}",
        kind="mdt",
        to_member=CORE,
        patient_name="王秀英",
        gender="female",
        birth_date="1950-03-15",
        id_number="110102195003151234",
        phone="13901234567",
        mrn="DS0001",
        diagnosis_code="YTZ-01",
        diagnosis_name="原发性高血压",
        reason="明确诊断，制定治疗方案",
        question="血压控制不佳合并右肺结节，是否需手术？",
        summary="头晕两周。\n既往高血压十年",
        specialties="KS20;KS01",
        urgent=True,
        consent_by="患者本人",
        consent_doc="ZQTY-2026-001",
        study_uid="",
        shared_results="",
        doctor="李医生",
        written_at="2026-12-01T09:00:00+08:00",
    )
    return replace(base, **kw)


def thread_of(node: NodeProcess) -> list[str]:
    return [r["thread"] for r in node.api("GET", "/local/v1/consultations")]


def states(db: HisDb, slip_no: str, n: int) -> list[dict[str, Any]]:
    got = db.consult_states(slip_no)
    return got if len(got) >= n else []


def test_mdt_from_the_his_returned_resubmitted_scheduled_and_reported(
    site: tuple[Alliance, HisDb], client: httpx.Client
) -> None:
    a, db = site
    chc, core = a.node(CHC), a.node(CORE)
    before = set(thread_of(core))
    s = slip(1)
    rid = db.write_consult(s)
    [thread] = wait_for(
        lambda: [t for t in thread_of(core) if t not in before],
        timeout=40,
        what="the request at the centre",
    )
    fc, fi = Fhir(client, core), Fhir(client, chc)
    wait_for(
        lambda: (row(chc, thread) or {}).get("step") == "received",
        timeout=40,
        what="received on the inviting side",
    )
    # the request as the centre got it: kind, question, urgency, specialties, consent
    crow = row(core, thread)
    assert (crow["kind"], crow["priority"], crow["inviter"]) == ("mdt", "urgent", CHC)
    sr = fc.read(f"ServiceRequest/{crow['sr_id']}")
    assert sr["note"][0]["text"] == s.question
    assert sr["note"][1]["text"] == "会诊目的：明确诊断，制定治疗方案"
    assert sr["identifier"][0]["value"] == "DSHZ000001"
    assert sr["reasonCode"][0]["coding"][0]["code"] == "I10"
    assert [d["coding"][0]["code"] for d in sr["orderDetail"]] == ["03.04", "02"]
    consent = next(
        fc.read(x["reference"])
        for x in sr["supportingInfo"]
        if x["reference"].startswith("Consent/")
    )
    assert consent["identifier"][0]["value"] == "ZQTY-2026-001"
    assert consent["performer"][0]["display"] == "患者本人"
    [st] = wait_for(lambda: states(db, s.slip_no, 1), timeout=40, what="'received' in the HIS")
    assert (st["SJLX"], st["HZZT"], st["RWZT"], st["LSH"], st["CLBZ"]) == (
        "received",
        "received",
        "received",
        thread,
        "0",
    )
    # returned for completion: the HIS shows what is missing
    fc.op(
        thread,
        "return",
        {
            "resourceType": "Parameters",
            "parameter": [{"name": "reason", "valueString": "缺肺功能报告"}],
        },
    )
    got = wait_for(lambda: states(db, s.slip_no, 2), timeout=40, what="'return' in the HIS")
    assert (got[1]["SJLX"], got[1]["HZZT"], got[1]["RWZT"], got[1]["ZTSM"]) == (
        "return",
        "returned",
        "on-hold",
        "缺肺功能报告",
    )
    # the HIS adds the records (补充资料), the 流水号 copied from the status row
    bc = db.resubmit_consult(
        ResubmitSlip(
            slip_no=s.slip_no,
            title="肺功能报告",
            text="FEV1 78%，轻度阻塞性通气功能障碍",
            doctor="李医生",
            written_at="2026-12-02T10:00:00+08:00",
        )
    )
    wait_for(
        lambda: (row(core, thread) or {}).get("step") == "resubmitted",
        timeout=40,
        what="resubmitted at the centre",
    )
    sr = fc.read(f"ServiceRequest/{crow['sr_id']}")
    doc = next(
        fc.read(x["reference"])
        for x in sr["supportingInfo"]
        if x["reference"].startswith("DocumentReference/")
    )
    assert (
        base64.b64decode(doc["content"][0]["attachment"]["data"]).decode()
        == "FEV1 78%，轻度阻塞性通气功能障碍"
    )
    assert doc["description"] == "肺功能报告"
    # scheduled: time, three experts, the video link
    fc.op(thread, "schedule", consults.schedule(CORE, 3))
    got = wait_for(lambda: states(db, s.slip_no, 3), timeout=40, what="'schedule' in the HIS")
    assert (
        got[2]["SJLX"],
        got[2]["HZZT"],
        got[2]["HZKS"],
        got[2]["HZJS"],
        got[2]["SPLJ"],
        got[2]["ZTSM"],
    ) == ("schedule", "scheduled", "20261205140000", "20261205150000", consults.MEETING, "")
    assert got[2]["HZZJ"] == "张主任(呼吸内科);王主任(胸外科);赵主任(病理科)"
    fc.op(thread, "start")
    patient = fc.read(f"Task/{thread}")["for"]["reference"]
    fc.op(thread, "report", consults.report(patient, refer_to=CORE))
    fc.op(thread, "release")
    got = wait_for(lambda: states(db, s.slip_no, 6), timeout=40, what="'release' in the HIS")
    assert [g["SJLX"] for g in got] == [
        "received",
        "return",
        "schedule",
        "start",
        "report",
        "release",
    ]
    assert got[5]["HZZT"] == "released" and got[5]["RWZT"] == "completed"
    [rep] = db.consult_reports(s.slip_no)
    comp = fi.read(
        next(r for r in row(chc, thread)["report_refs"].split() if r.startswith("Composition/"))
    )
    assert (rep["BGID"], rep["LSH"], rep["HZLX"], rep["BGZT"]) == (comp["id"], thread, "2", "F")
    assert (rep["ZDDM"], rep["ZDMC"], rep["ZDMS"], rep["ZLJY"]) == (
        "C34.1",
        "右肺上叶恶性肿瘤（待病理证实）",
        "右肺上叶恶性肿瘤（待病理证实）",
        "建议行胸腔镜下右肺上叶楔形切除术",
    )
    assert (rep["JYZZ"], rep["ZZJG"], rep["ZZSM"]) == (
        "1",
        CORE,
        "建议上转胸外科住院手术（已与家属沟通同意）",
    )
    assert (rep["BGYS"], rep["BGSJ"], rep["CLBZ"], rep["BGWJ"]) == (
        "张主任（呼吸内科）",
        "20261205151000",
        "0",
        None,
    )
    wait_for(
        lambda: (row(chc, thread) or {}).get("step") == "report-received",
        timeout=40,
        what="report received",
    )
    assert not [
        q
        for q in quarantined(chc)
        if q.message.startswith((f"record ZZ_HZSQ#{rid} ", f"record ZZ_HZBC#{bc} "))
    ]


def test_imaging_reading_report_lands_in_the_his_with_its_pdf(
    site: tuple[Alliance, HisDb], client: httpx.Client
) -> None:
    a, db = site
    core = a.node(CORE)
    before = set(thread_of(core))
    s = slip(
        2,
        kind="imaging-reading",
        study_uid=STUDY,
        specialties="",
        id_number="11010219600101002X",
        patient_name="李四",
        mrn="DS0002",
    )
    db.write_consult(s)
    [thread] = wait_for(
        lambda: [t for t in thread_of(core) if t not in before],
        timeout=40,
        what="the imaging reading at the centre",
    )
    fc = Fhir(client, core)
    wait_for(
        lambda: (row(core, thread) or {}).get("step") == "received", timeout=40, what="received"
    )
    patient = fc.read(f"Task/{thread}")["for"]["reference"]
    [study] = fc.ok("GET", "/ImagingStudy", params={"patient": patient})["entry"]
    assert study["resource"]["identifier"][0]["value"] == f"urn:oid:{STUDY}"
    fc.op(thread, "schedule", consults.schedule(CORE, 1))
    fc.op(thread, "start")
    fc.op(
        thread,
        "report",
        consults.imaging_report(patient, f"ImagingStudy/{study['resource']['id']}"),
    )
    fc.op(thread, "release")
    [rep] = wait_for(
        lambda: db.consult_reports(s.slip_no), timeout=40, what="the reading in ZZ_JS_HZBG"
    )
    assert (rep["HZLX"], rep["BGZT"], rep["JCUID"], rep["YXJL"], rep["BGWJ"]) == (
        "3",
        "F",
        STUDY,
        "右肺上叶磨玻璃结节，Lung-RADS 4A，建议3个月复查",
        consults.PDF,
    )
    assert (rep["ZDDM"], rep["JYZZ"]) == ("", "0")
    [img] = [r for r in db.received_imaging() if r["LSH"] == thread]
    assert (img["ZZDH"], img["FSJG"], img["BLH"], img["JCUID"], img["BGZT"], img["ZDYJ"]) == (
        "DSHZ000002",
        CORE,
        "DS0002",
        STUDY,
        "F",
        rep["YXJL"],
    )
    assert (img["BGID"], img["CLBZ"], img["JCSJ"]) == (rep["BGID"], "0", "20261201081000")


BAD = [  # (vendor column overrides, error code, column named)
    ({"TYR": ""}, "HT-REF-CONSENT", "TYR"),
    ({"HZWT": b""}, "HT-MAP-FIELD", "HZWT"),
    ({"HZLX": "7"}, "HT-MAP-FIELD", "HZLX"),
    ({"HZLX": "3", "JCUID": ""}, "HT-LOCAL-MISSING", "JCUID"),
    ({"GXBG": "no-such-report"}, "HT-REF-UNKNOWN", "GXBG"),
]


@pytest.mark.parametrize(("override", "code", "column"), BAD)
def test_a_bad_request_row_is_quarantined_naming_its_column(
    site: tuple[Alliance, HisDb], override: dict[str, Any], code: str, column: str
) -> None:
    a, db = site
    chc = a.node(CHC)
    rid = db.allocate_id("ZZ_HZSQ")
    db.write_consult(slip(1000 + rid, id_number="110102198003030033"), row_id=rid, **override)
    held = wait_for(
        lambda: [
            q
            for q in quarantined(chc)
            if q.message.startswith(f"record ZZ_HZSQ#{rid} field {column}:")
        ],
        timeout=40,
        what="the row quarantined",
    )
    assert held[0].code == code, held[0].message
    assert "110102198003030033" not in held[0].message
    assert "110102198003030033" not in Path(chc.log).read_text(encoding="utf-8")


def test_imaging_reading_of_a_study_in_the_pacs_is_attached_to_it(
    site: tuple[Alliance, HisDb], client: httpx.Client
) -> None:
    """The HIS asks for a reading of a study its PACS holds (by UID): the study travels from
    the PACS adapter's store; the released reading lands in the HIS and is attached to the
    study at the PACS adapter."""
    a, db = site
    chc, core = a.node(CHC), a.node(CORE)
    pushed = push(a.modality, a.scp, study=S1, called="DESHENG")  # type: ignore[attr-defined]
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    wait_for(
        lambda: chc.api("GET", f"/local/v1/adapters/pacs/studies/{S1}/reports", role="clinician"),
        timeout=60,
        what="S1 in the PACS adapter",
    )
    before = set(thread_of(core))
    s = slip(
        3,
        kind="imaging-reading",
        study_uid=S1,
        specialties="",
        id_number=NID1,
        patient_name="张三",
        gender="male",
        birth_date="1980-01-01",
        mrn="DS0003",
    )
    db.write_consult(s)
    [thread] = wait_for(
        lambda: [t for t in thread_of(core) if t not in before],
        timeout=40,
        what="the reading at the centre",
    )
    fc = Fhir(client, core)
    wait_for(
        lambda: (row(core, thread) or {}).get("step") == "received", timeout=40, what="received"
    )
    patient = fc.read(f"Task/{thread}")["for"]["reference"]
    # the PACS adapter's study travels, filed with the consultation's patient at the centre
    [found] = fc.ok("GET", "/ImagingStudy", params={"patient": patient})["entry"]
    study = found["resource"]
    pacs = chc.api("GET", f"/fhir/ImagingStudy/{study_resource_id(S1)}", role="clinician")
    assert study["id"] == study_resource_id(S1)
    assert study["identifier"][0]["value"] == f"urn:oid:{S1}"
    assert (study["modality"], study["numberOfInstances"]) == (
        pacs["modality"],
        pacs["numberOfInstances"],
    )
    fc.op(thread, "schedule", consults.schedule(CORE, 1))
    fc.op(thread, "start")
    fc.op(thread, "report", consults.imaging_report(patient, f"ImagingStudy/{study['id']}"))
    fc.op(thread, "release")
    [rep] = wait_for(lambda: db.consult_reports(s.slip_no), timeout=40, what="in the HIS")
    assert (rep["JCUID"], rep["BGWJ"]) == (S1, consults.PDF)

    def attached() -> Any:
        got = chc.api("GET", f"/local/v1/adapters/pacs/studies/{S1}/reports", role="clinician")
        return [x for x in got["reports"] if x["id"] == rep["BGID"]]

    [shown] = wait_for(attached, timeout=40, what="the reading attached to S1")
    assert (shown["from"], shown["conclusion"], shown["status"]) == (
        CORE,
        "右肺上叶磨玻璃结节，Lung-RADS 4A，建议3个月复查",
        "final",
    )


def test_a_consultation_the_centre_cancels_shows_cancelled_with_the_reason(
    site: tuple[Alliance, HisDb], client: httpx.Client
) -> None:
    a, db = site
    core = a.node(CORE)
    before = set(thread_of(core))
    s = slip(4, kind="general", specialties="", id_number="110102197707070077")
    db.write_consult(s)
    [thread] = wait_for(
        lambda: [t for t in thread_of(core) if t not in before],
        timeout=40,
        what="the request at the centre",
    )
    fc = Fhir(client, core)
    wait_for(
        lambda: (row(core, thread) or {}).get("step") == "received", timeout=40, what="received"
    )
    task = fc.read(f"Task/{thread}")
    task["status"], task["statusReason"] = "cancelled", {"text": "患者已转上级医院就诊"}
    fc.ok("PUT", f"/Task/{thread}", task)
    got = wait_for(lambda: states(db, s.slip_no, 2), timeout=40, what="'cancelled' in the HIS")
    assert (got[1]["SJLX"], got[1]["HZZT"], got[1]["RWZT"], got[1]["ZTSM"], got[1]["LSH"]) == (
        "cancelled",
        "cancelled",
        "cancelled",
        "患者已转上级医院就诊",
        thread,
    )
    assert db.consult_reports(s.slip_no) == []


def test_a_request_the_his_withdraws_is_cancelled_and_the_his_is_told(
    site: tuple[Alliance, HisDb], client: httpx.Client
) -> None:
    """The doctor marks the request row withdrawn (ZT 9, CXYY, CXXH): the inviter's cancel
    step; the centre confirms before the meeting, and the HIS gets the cancelled status row.
    A withdrawal once the meeting has begun is not allowed: the row is quarantined naming
    ZT, and nothing changes at the centre."""
    a, db = site
    chc, core = a.node(CHC), a.node(CORE)
    before = set(thread_of(core))
    s = slip(5, kind="general", specialties="", id_number="110102196606060066")
    rid = db.write_consult(s)
    [thread] = wait_for(
        lambda: [t for t in thread_of(core) if t not in before],
        timeout=40,
        what="the request at the centre",
    )
    wait_for(lambda: states(db, s.slip_no, 1), timeout=40, what="received")
    db.cancel_consult(rid, "患者已在外院就诊")
    got = wait_for(lambda: states(db, s.slip_no, 2), timeout=40, what="cancelled")
    assert (got[1]["SJLX"], got[1]["HZZT"], got[1]["ZTSM"]) == (
        "cancelled",
        "cancelled",
        "患者已在外院就诊",
    )
    assert row(core, thread)["step"] == "cancelled"
    assert row(chc, thread)["status"] == "cancelled"
    # after the meeting began: the centre refuses, the HIS is told, nothing changes
    before = set(thread_of(core))
    s = slip(6, kind="general", specialties="", id_number="110102196606060066")
    rid = db.write_consult(s)
    [thread] = wait_for(
        lambda: [t for t in thread_of(core) if t not in before],
        timeout=40,
        what="the second request at the centre",
    )
    fc = Fhir(client, core)
    wait_for(
        lambda: (row(core, thread) or {}).get("step") == "received", timeout=40, what="received"
    )
    fc.op(thread, "schedule", consults.schedule(CORE, 1))
    fc.op(thread, "start")
    wait_for(lambda: states(db, s.slip_no, 3), timeout=40, what="started")
    db.cancel_consult(rid, "家属要求撤回")
    held = wait_for(
        lambda: [
            q for q in quarantined(chc) if q.message.startswith(f"record ZZ_HZSQ#{rid} field ZT:")
        ],
        timeout=40,
        what="the late withdrawal quarantined",
    )
    assert held[0].code == "HT-REF-TRANSITION", held[0].message
    assert row(core, thread)["step"] == "in-consultation"
    assert len(db.consult_states(s.slip_no)) == 3
