"""Lab results reach the receiving member's simulated HIS: a centre with an intermediate-database
HIS refers a patient up to a core hospital whose LIS reports over MLLP; the ORU's values land in
the centre's ``ZZ_JS_JYBG`` / ``ZZ_JS_JYBG_MX`` tables field by field, item codes in the centre's
own lab catalogue (or LOINC / the lab's code where the centre's map has none), linked to the
referral (流水号 and the centre's slip number), and a correction updates the same rows."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from sqlalchemy import select, update

from adapters.slips import ReferralSlip
from simulators.his_db import ZZ_JS_JYBG, HisDb
from tests.harness import Alliance, free_port_block, lis_send, wait_for
from tests.lis_site import write_site

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
FIX = Path(__file__).parent / "fixtures" / "hl7" / "lis"
UTF8 = (FIX / "oru_r01_v251_utf8.hl7").read_bytes()
CORRECTED = (FIX / "oru_r01_v251_corrected.hl7").read_bytes()
KINDS = ["referral.request", "referral.status", "referral.cancel", "referral.return", "result.lab"]
CHC, CORE = "yuetan-chc", "fuxing"

#: what the centre's HIS must hold for the fixture ORU: (XMDM, XMMC, JG, DW, CKFW, BZ, JGZT, JCSJ)
#: item codes: the centre's catalogue (mappings/yuetan-chc/codes/lab.csv: 6690-2 -> 3007 ...);
#: LOINC where the centre has no item for it (770-8, 1988-5, 5196-1); the lab's own code where
#: the lab's map has none (XYZ99, TITER)
CBC = [
    ("3007", "白细胞计数", "11.2", "10^9/L", "3.5-9.5", "H", "F", "20261120090000"),
    ("3008", "血红蛋白", "128", "g/L", "115-150", "N", "F", "20261120090000"),
    ("3009", "血小板计数", "86", "10^9/L", "125-350", "L", "F", "20261120090000"),
    ("770-8", "中性粒细胞百分比", "78.5", "%", "40-75", "H", "F", "20261120090000"),
]
BIOCHEM = [
    ("3001", "葡萄糖", "6.85", "mmol/L", "3.9-6.1", "H", "P", "20261120091000"),
    ("1988-5", "C反应蛋白", "<5", "mg/L", "<10", "N", "P", "20261120091000"),
    ("5196-1", "乙肝表面抗原", "阴性", "", "", "N", "P", "20261120091000"),
    ("XYZ99", "未映射项目", "弱阳性(+)", "", "阴性", "A", "P", "20261120091000"),
    ("TITER", "抗体滴度", "1:320", "", "<1:80", "H", "P", "20261120091000"),
]
LINE = ("XMDM", "XMMC", "JG", "DW", "CKFW", "BZ", "JGZT", "JCSJ")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("results-his")
    lab_maps = write_site(root / "mappings" / "fxlab")
    db = HisDb(f"sqlite:///{root / 'yuetan-his.db'}").init()
    port = free_port_block(1)
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
                    "options": {"port": port},
                }
            ],
        },
        {
            "id": CHC,
            "zh": "月坛社区卫生服务中心",
            "en": "Yuetan CHC",
            "role": "community",
            "adapters": [
                {
                    "name": "his",
                    "type": "his-middle-db",
                    "mappings": str(ROOT / "mappings" / CHC),
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
    yield {"a": a, "db": db, "port": port}
    a.stop_all()
    db.close()


def by_name(db: HisDb) -> dict[str, dict[str, Any]]:
    return {r["BGMC"]: r for r in db.received_results()}


def test_results_in_the_centres_his_field_by_field(site: dict[str, Any]) -> None:
    a, db = site["a"], site["db"]
    chc, core = a.node(CHC), a.node(CORE)
    slip = ReferralSlip(
        slip_no="YTZZ000901",
        kind="up-inpatient",
        to_member=CORE,
        patient_name="王秀英",
        gender="female",
        birth_date="1950-03-15",
        id_number="110102195003151234",
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
    )
    db.write_referral(slip)  # the centre's doctor refers in the centre's own HIS
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
    assert db.received_results() == []
    # the core hospital's LIS reports (same patient: PID-3 national ID)
    assert lis_send(site["port"], UTF8) == "AA"
    got = wait_for(
        lambda: by_name(db) if len(db.received_results()) == 2 else None,
        what="two lab reports in the centre's HIS",
    )
    cbc, bio = got["血常规"], got["生化全套"]
    for head in (cbc, bio):
        assert (head["LSH"], head["ZZDH"], head["FSJG"]) == (thread, slip.slip_no, CORE)
        assert head["CJSJ"] == "20261120081500" and head["BGSJ"] == "20261120092500"
        assert head["JYJG"] == "复兴医院检验科" and head["CLBZ"] == "0"
        assert head["XXID"] and head["JSSJ"]
    assert cbc["XXID"] == bio["XXID"]  # one ORU, one result.lab packet
    # panel codes: LOINC (the centre's catalogue has no panels)
    assert (cbc["BGDM"], cbc["BGZT"], cbc["BGJL"]) == ("58410-2", "F", "标本轻度溶血，结果仅供参考")
    assert (bio["BGDM"], bio["BGZT"], bio["BGJL"]) == ("24323-8", "P", "")
    assert [tuple(x[c] for c in LINE) for x in cbc["items"]] == CBC
    assert [tuple(x[c] for c in LINE) for x in bio["items"]] == BIOCHEM
    assert [x["XH"] for x in bio["items"]] == [1, 2, 3, 4, 5]
    # the same report through the centre's local FHIR API, linked to the referral
    for head in (cbc, bio):
        dr = chc.api("GET", f"/fhir/DiagnosticReport/{head['BGID']}", role="clinician")
        DiagnosticReport.model_validate(dr)
        assert dr["code"]["text"] == head["BGMC"]
        assert len(dr["result"]) == len(head["items"])
        assert {r["reference"].split("/")[1] for r in dr["result"]} == {
            x["JGID"] for x in head["items"]
        }
        task = chc.api("GET", f"/fhir/Task/{thread}", role="clinician")
        assert dr["subject"] == task["for"]
    # the HIS has read the biochemistry report; then the lab corrects the glucose
    with db.tx() as conn:
        conn.execute(update(ZZ_JS_JYBG).where(ZZ_JS_JYBG.c.ID == bio["ID"]).values(CLBZ="1"))
    assert lis_send(site["port"], CORRECTED) == "AA"
    again = wait_for(
        lambda: (r := by_name(db))["生化全套"]["XXID"] != bio["XXID"] and r,
        what="corrected report in the centre's HIS",
    )
    assert len(db.received_results()) == 2 and again["血常规"] == cbc  # untouched
    fixed = again["生化全套"]
    assert (fixed["ID"], fixed["BGID"], fixed["BGZT"], fixed["BGSJ"], fixed["CLBZ"]) == (
        bio["ID"],
        bio["BGID"],
        "C",
        "20261120112500",
        "0",
    )
    want = [("3001", "葡萄糖", "7.25", "mmol/L", "3.9-6.1", "H", "C", "20261120110000")] + [
        (*x[:6], "F", x[7]) for x in BIOCHEM[1:]
    ]
    assert [tuple(x[c] for c in LINE) for x in fixed["items"]] == want
    # updated in place: same rows, same result ids, nothing added
    assert [(x["ID"], x["JGID"], x["XH"]) for x in fixed["items"]] == [
        (x["ID"], x["JGID"], x["XH"]) for x in bio["items"]
    ]
    with db.engine.connect() as conn:
        assert len(conn.execute(select(ZZ_JS_JYBG.c.ID)).all()) == 2
