"""Imaging reports reach the referring centre's intermediate-database HIS (检查结果互认).

A centre with an intermediate-database HIS refers a patient up to a core hospital; the core's
radiology reports (DiagnosticReport from the RIS's ORU, read by the PACS adapter's own reader,
with the ImagingStudy) go back on the referral thread as one ``result.imaging`` packet. The
centre's ``ZZ_JS_JCBG`` then holds one row per report, field by field: exam code in the
centre's own catalogue (or the sender's code and system, counted as a gap), the centre's own
record number of the patient, modality, body site, Study Instance UID, times, findings,
conclusion, doctor, status and version. The centre is killed after writing the rows and before
the packet is marked delivered: the packet is delivered again and nothing new is written. No
patient ID number reaches the node logs.
"""

from __future__ import annotations

import base64
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.imagingstudy import ImagingStudy

from adapters.pacs.report import parse_oru, report_from_oru
from adapters.pacs.study import study_resource_id
from adapters.slips import ReferralSlip
from simulators.his_db import HisDb
from tests.harness import Alliance, db_rows, wait_for

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
KINDS = [
    "referral.request",
    "referral.status",
    "referral.cancel",
    "referral.return",
    "result.imaging",
]
CHC, CORE = "yuetan-chc", "fuxing"
ID_NUMBER = "110102195003151234"
EXAM = "http://hutong.dev/CodeSystem/yuetan-chc/exam"
RIS = "urn:hutong:ris:exam-code"
UID = "1.2.826.0.1.3680043.8.498.7001"
ORU = (
    "MSH|^~\\&|RIS|FUXING|HUTONG|FUXING|20261120110000||ORU^R01|{ctl}|P|2.5.1||||||"
    "UNICODE UTF-8\r"
    "PID|||FX0001\r"
    "OBR|1||{acc}|{code}|||{at}||||||||||||||||||{status}\r"
    "OBX|1|TX|59776-5^Findings^LN||{findings}||||||F\r"
    "OBX|2|TX|19005-8^Impression^LN||{impression}||||||F\r"
    "ZDS|{uid}^^Application^DICOM\r"
)
CT = {
    "ctl": "RIS-1",
    "acc": "ACC-7001",
    "code": "24627-2^胸部CT平扫^LN",
    "at": "20261120093000",
    "status": "F",
    "findings": "右下肺见一枚约4mm结节。",
    "impression": "右下肺小结节，建议3个月复查。",
    "uid": UID,
}
MR = {
    "ctl": "RIS-2",
    "acc": "ACC-7002",
    "code": "MR-HEAD-01^头颅MR平扫^L",
    "at": "20261120101500",
    "status": "P",
    "findings": "脑实质未见异常信号。",
    "impression": "头颅MR未见明显异常。",
    "uid": UID,
}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("imaging-his")
    maps = root / "mappings" / CHC  # the centre's maps plus its exam catalogue
    shutil.copytree(ROOT / "mappings" / CHC, maps)
    with (maps / "codes" / "maps.csv").open("a", encoding="utf-8") as f:
        f.write(
            f"exam,月坛社区卫生服务中心检查项目→LOINC,Yuetan exams to LOINC,{EXAM},"
            "http://loinc.org,2017.1\n"
        )
    (maps / "codes" / "exam.csv").write_text(
        "source_code,source_display,target_code,target_display,equivalence,comment\n"
        "JC4001,胸部CT平扫,24627-2,CT Chest,equivalent,\n",
        encoding="utf-8",
    )
    db = HisDb(f"sqlite:///{root / 'yuetan-his.db'}").init()
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
                    "type": "his-middle-db",
                    "mappings": str(maps),
                    "receives": ["referral.*", "result.*"],
                    "options": {
                        "dsn": db.dsn,
                        "poll_every_s": 0.3,
                        "fields": str(ROOT / "simulators" / "his_db_site"),
                    },
                }
            ],
        },
    ]
    rules = [{"from": CHC, "to": CORE, "kinds": KINDS}, {"from": CORE, "to": CHC, "kinds": KINDS}]
    a = Alliance(root / "alliance", members, rules)
    a.start(CORE, CHC)
    yield {"a": a, "db": db}
    a.stop_all()
    db.close()


def _report(
    values: dict[str, str], subject: dict[str, str], study_ref: dict[str, str], doctor: str
) -> dict[str, Any]:
    report = report_from_oru(
        parse_oru(ORU.format(**values), "+08:00"), subject=subject, study_ref=study_ref
    )
    report["issued"] = "2026-11-20T11:00:00+08:00"
    report["resultsInterpreter"] = [{"display": doctor}]
    return report


def _study(subject: dict[str, str]) -> dict[str, Any]:
    ct = {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "CT"}
    sr = {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "SR"}
    return {
        "resourceType": "ImagingStudy",
        "id": study_resource_id(UID),
        "status": "available",
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{UID}"}],
        "subject": subject,
        "started": "2026-11-20T09:20:00+08:00",
        "modality": [ct, sr],
        "numberOfSeries": 2,
        "numberOfInstances": 3,
        "series": [
            {
                "uid": f"{UID}.1",
                "modality": ct,
                "numberOfInstances": 2,
                "bodySite": {
                    "system": "http://snomed.info/sct",
                    "code": "51185008",
                    "display": "胸部",
                },
            },
            {"uid": f"{UID}.3", "modality": sr, "numberOfInstances": 1},
        ],
    }


def test_imaging_reports_in_the_centres_his_field_by_field(
    site: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, db = site["a"], site["db"]
    chc, core = a.node(CHC), a.node(CORE)
    slip = ReferralSlip(
        slip_no="YTZZ000951",
        kind="up-exam",
        to_member=CORE,
        patient_name="王秀英",
        gender="female",
        birth_date="1950-03-15",
        id_number=ID_NUMBER,
        phone="13901234567",
        mrn="YT0951",
        diagnosis_code="YTZ-01",
        diagnosis_name="原发性高血压",
        reason="胸部CT检查",
        summary="咳嗽两周",
        department_code="KS01",
        urgent=False,
        consent_by="患者本人",
        doctor="李医生",
        written_at="2026-11-20T07:30:00+08:00",
    )
    db.write_referral(slip)
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
    wait_for(
        lambda: any(
            r["thread"] == thread and r["status"] == "received"
            for r in chc.api("GET", "/local/v1/referrals")
        ),
        what="the centre knows the core received it",
    )
    # the core's radiology reports for the referred patient, on the referral's thread
    task = core.api("GET", f"/fhir/Task/{thread}", role="clinician")
    subject = task["for"]
    ref = {"reference": f"ImagingStudy/{study_resource_id(UID)}"}
    study = _study(subject)
    ct, mr = _report(CT, subject, ref, "张影像"), _report(MR, subject, ref, "赵医生")
    for resource, model in ((study, ImagingStudy), (ct, DiagnosticReport), (mr, DiagnosticReport)):
        model.model_validate(resource)
    patient = {"resourceType": "Patient", "id": subject["reference"].split("/", 1)[1]}
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {"fullUrl": f"urn:uuid:{r['id']}", "resource": r} for r in (patient, study, ct, mr)
        ],
    }
    assert db.received_imaging() == []
    # the centre dies after writing the rows, before the packet is marked delivered
    chc.kill(signal.SIGKILL)
    with monkeypatch.context() as m:
        m.setenv("HUTONG_FAULT", "dispatcher.during_delivery")
        chc.start()  # the child copies the environment now
    chc.wait_ready()
    (packet,) = core.send(CHC, "result.imaging", [bundle], thread=thread)
    wait_for(
        lambda: chc.proc is not None and chc.proc.poll() is not None,
        timeout=60,
        what="the centre to die",
    )
    first = db.received_imaging()
    assert len(first) == 2
    chc.start()  # no fault now: the packet comes again
    chc.wait_ready()
    wait_for(
        lambda: (
            db_rows(chc, "SELECT state FROM inbox WHERE packet_id = :p", p=packet)
            == [("delivered",)]
        ),
        what="the re-delivered packet",
    )
    got = db.received_imaging()
    assert got == first  # the second delivery wrote nothing
    rows = {r["BGID"]: r for r in got}
    assert set(rows) == {ct["id"], mr["id"]}
    for report, values, row in ((ct, CT, rows[ct["id"]]), (mr, MR, rows[mr["id"]])):
        assert (row["XXID"], row["LSH"], row["ZZDH"], row["FSJG"], row["BLH"]) == (
            packet,
            thread,
            slip.slip_no,
            CORE,
            slip.mrn,
        )
        assert (row["JCLX"], row["JCBW"], row["JCUID"]) == ("CT", "胸部", UID)
        assert row["JCSJ"] == "20261120092000"  # the study's start
        assert row["BGSJ"] == "20261120110000"
        assert row["YXSJ"] == f"{values['findings']}\n{values['impression']}"
        assert row["ZDYJ"] == values["impression"] == report["conclusion"]
        assert base64.b64decode(report["presentedForm"][0]["data"]).decode() == row["YXSJ"]
        assert (row["BBH"], row["CLBZ"]) == (1, "0") and row["JSSJ"]
    c, m = rows[ct["id"]], rows[mr["id"]]
    # mapped to the centre's own exam catalogue; the MR exam has no entry: the RIS's code
    assert (c["JCDM"], c["DMXT"], c["JCMC"], c["BGZT"], c["BGYS"]) == (
        "JC4001",
        EXAM,
        "胸部CT平扫",
        "F",
        "张影像",
    )
    assert (m["JCDM"], m["DMXT"], m["JCMC"], m["BGZT"], m["BGYS"]) == (
        "MR-HEAD-01",
        RIS,
        "头颅MR平扫",
        "P",
        "赵医生",
    )
    gaps = db_rows(chc, "SELECT code, count FROM mapping_gap WHERE map = 'exam'")
    assert gaps == [("MR-HEAD-01", 1)]  # counted once: the re-delivery wrote nothing
    # the same report is readable through the centre's FHIR API, on the referral's patient
    dr = chc.api("GET", f"/fhir/DiagnosticReport/{ct['id']}", role="clinician")
    DiagnosticReport.model_validate(dr)
    assert dr["conclusion"] == c["ZDYJ"]
    assert dr["subject"] == chc.api("GET", f"/fhir/Task/{thread}", role="clinician")["for"]
    # no patient ID number in either node's log
    for node in (chc, core):
        assert ID_NUMBER not in node.log.read_text(encoding="utf-8", errors="replace")


def test_a_correction_updates_the_row_in_place(site: dict[str, Any]) -> None:
    a, db = site["a"], site["db"]
    chc, core = a.node(CHC), a.node(CORE)
    before = {r["BGID"]: r for r in db.received_imaging()}
    assert len(before) == 2, "runs after the first test"
    (thread,) = {r["LSH"] for r in before.values()}
    task = core.api("GET", f"/fhir/Task/{thread}", role="clinician")
    subject = task["for"]
    ref = {"reference": f"ImagingStudy/{study_resource_id(UID)}"}
    fixed = _report(
        {**MR, "status": "C", "impression": "左侧基底节区腔隙灶。"}, subject, ref, "赵医生"
    )
    patient = {"resourceType": "Patient", "id": subject["reference"].split("/", 1)[1]}
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {"fullUrl": f"urn:uuid:{r['id']}", "resource": r}
            for r in (patient, _study(subject), fixed)
        ],
    }
    (packet,) = core.send(CHC, "result.imaging", [bundle], thread=thread)
    after = wait_for(
        lambda: (
            (r := {x["BGID"]: x for x in db.received_imaging()})[fixed["id"]]["XXID"] == packet
            and r
        ),
        what="the corrected report in the HIS",
    )
    row, old = after[fixed["id"]], before[fixed["id"]]
    assert (row["ID"], row["BGZT"], row["BBH"], row["ZDYJ"]) == (
        old["ID"],
        "C",
        2,
        "左侧基底节区腔隙灶。",
    )
    assert row["YXSJ"] == f"{MR['findings']}\n左侧基底节区腔隙灶。"
    others = [k for k in after if k != fixed["id"]]
    assert [after[k] for k in others] == [before[k] for k in others]  # untouched
    assert len(after) == 2
    assert chc.proc.poll() is None
