"""Cross-style referral loops: a vendor HIS of one style at one node, another style at the other.

Issue 4's "done when" for the styles the per-style files do not pair up (HL7 v2 <-> intermediate
database is in ``tests/test_his_hl7.py``):

(a) XML web-service HIS at the community centre -> HL7 v2 over MLLP HIS at the core hospital;
(b) intermediate-database HIS at the community centre -> XML web-service HIS at the core hospital.

Each: the referral written in the centre's HIS arrives in the core's HIS field by field (codes in
the core's catalogue, no ID number), the acceptance and the return with prescriptions and lab
results come back into the centre's HIS field by field (codes in the centre's catalogue).
Real node processes, real simulated HIS processes/databases (``simulators/``).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest

from adapters.slips import AcceptanceSlip, ReturnSlip
from simulators.his_db import HisDb
from simulators.his_hl7 import VendorHis
from simulators.his_ws import HisWsProcess
from tests.harness import ROOT, Alliance, free_port_block, wait_for
from tests.slip_samples import return_slip
from tests.test_his_hl7 import MEMBERS, RULES, one, referral_row
from tests.test_his_ws import arrived, referral_slip

pytestmark = pytest.mark.slow

CORE, CHC = MEMBERS  # fuxing (core hospital), yuetan-chc (community centre)


def ws_adapter(member: dict[str, Any], sim: HisWsProcess) -> dict[str, Any]:
    return {
        "name": "his",
        "type": "his-xml-ws",
        "mappings": str(ROOT / "mappings" / member["id"]),
        "receives": ["referral.*"],
        "options": {"url": sim.url, "poll_s": 0.2, "timeout_s": 5.0, "site_name": member["zh"]},
    }


def db_site(folder: Path, member: str) -> Path:
    """The site's catalogue plus the database vendor's field maps, as the his-db tests do."""
    maps = folder / "mappings" / member
    shutil.copytree(ROOT / "mappings" / member / "codes", maps / "codes")
    shutil.copytree(ROOT / "simulators" / "his_db_site" / "fields", maps / "fields")
    return maps


def in_centre_codes(back: ReturnSlip) -> ReturnSlip:
    """A Fuxing return slip as the Yuetan centre's catalogue writes it."""
    return replace(
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


ACCEPTANCE = {
    "appointment_at": "2026-11-21T10:00:00+08:00",
    "department_code": "0301",
    "bed_no": "心内科 12床",
    "doctor": "张主任",
}


# -- (a) XML web service at the centre -> HL7 v2 at the core -----------------------------------


@pytest.fixture
def ws_to_hl7(tmp_path: Path) -> Iterator[tuple[Alliance, Any, VendorHis]]:
    ports = free_port_block(2)  # the core adapter's MLLP listener, the core HIS's listener
    chc_sim = HisWsProcess(tmp_path / "yuetan-his.sqlite", CHC["id"], site_name=CHC["zh"])
    members = [
        {
            **CORE,
            "adapters": [
                {
                    "name": "his",
                    "type": "his-hl7",
                    "mappings": str(ROOT / "mappings" / "fuxing"),
                    "receives": ["referral.*"],
                    "options": {
                        "listen": f"127.0.0.1:{ports}",
                        "his": f"127.0.0.1:{ports + 1}",
                        "charset": "UNICODE UTF-8",
                        "ack_timeout_s": 2,
                        "connect_timeout_s": 2,
                        "referral_id_field": "PV1-50",
                    },
                }
            ],
        },
        {**CHC, "adapters": [ws_adapter(CHC, chc_sim)]},
    ]
    alliance = Alliance(tmp_path / "alliance", members, RULES)
    core_his = VendorHis(
        tmp_path / "fuxing-his.sqlite",
        f"127.0.0.1:{ports}",
        application="FXHIS",
        facility="fuxing-his",
    )
    log = open(tmp_path / "fuxing-his.log", "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "simulators.his_hl7",
            "serve",
            "--db",
            str(core_his.db),
            "--listen",
            f"127.0.0.1:{ports + 1}",
        ],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        chc_sim.start()
        alliance.start("fuxing", "yuetan-chc")
        yield alliance, chc_sim.his, core_his
    finally:
        alliance.stop_all()
        chc_sim.stop()
        proc.terminate()
        proc.wait(30)
        log.close()


def test_ws_his_to_hl7_his_and_back(ws_to_hl7: Any) -> None:
    alliance, chc_his, core_his = ws_to_hl7
    written = referral_slip(slip_no="YTWS-HL7-1", summary="头晕两周。\n既往高血压 & 糖尿病 a|b^c")
    ref_doc = chc_his.write_referral(written)
    got = one(core_his, "referral", written.slip_no)
    assert len(got) == 1
    thread = got[0].thread
    # every field of the slip, codes in Fuxing's catalogue; the ID number stays at the centre
    assert asdict(got[0].slip) == asdict(
        replace(written, id_number="", diagnosis_code="FXZD0101", department_code="0200")
    )
    # the core HIS accepts in HL7 (RRI^I12); the centre's web-service HIS gets its document
    accepted = AcceptanceSlip(slip_no=written.slip_no, accepted=True, **ACCEPTANCE)
    assert core_his.accept(accepted, thread).code == "AA"
    acc = arrived(chc_his, "acceptance", written.slip_no)
    # 0301 心内科 -> alliance 03.04, not in the centre's catalogue: the shared code
    assert asdict(acc.slip) == asdict(replace(accepted, department_code="03.04"))
    assert acc.referral_doc == ref_doc and acc.custodian == "fuxing"
    # admission (A01 naming the referral) is the arrival; then the return slip
    assert (
        core_his.adt(
            "A01",
            "FX901",
            name=written.patient_name,
            gender="female",
            birth_date=written.birth_date,
            referral_id=thread,
            patient_class="I",
        ).code
        == "AA"
    )
    fx = alliance.node("fuxing")
    wait_for(
        lambda: referral_row(fx, thread).get("status") == "in-progress",
        timeout=30,
        what="arrival at the core",
    )
    back = return_slip(slip_no=written.slip_no, course="调整降压方案\n住院 5 天 <稳定>")
    assert core_his.write_return(back, thread).code == "AA"
    ret = arrived(chc_his, "return", written.slip_no)
    assert asdict(ret.slip) == asdict(in_centre_codes(back))
    assert ret.referral_doc == ref_doc
    for doc in (acc, ret):
        assert chc_his.deliveries(doc.doc_id) == 1
    assert [r.what for r in core_his.received()] == ["referral"]
    assert chc_his.pending() == []


# -- (b) intermediate database at the centre -> XML web service at the core --------------------


@pytest.fixture
def db_to_ws(tmp_path: Path) -> Iterator[tuple[Alliance, HisDb, Any]]:
    chc_db = HisDb(f"sqlite:///{tmp_path / 'yuetan-his.db'}").init()
    core_sim = HisWsProcess(tmp_path / "fuxing-his.sqlite", CORE["id"], site_name=CORE["zh"])
    members = [
        {**CORE, "adapters": [ws_adapter(CORE, core_sim)]},
        {
            **CHC,
            "adapters": [
                {
                    "name": "his",
                    "type": "his-middle-db",
                    "mappings": str(db_site(tmp_path, CHC["id"])),
                    "receives": ["referral.*"],
                    "options": {"dsn": chc_db.dsn, "poll_every_s": 0.3},
                }
            ],
        },
    ]
    alliance = Alliance(tmp_path / "alliance", members, RULES)
    try:
        core_sim.start()
        alliance.start("fuxing", "yuetan-chc")
        yield alliance, chc_db, core_sim.his
    finally:
        alliance.stop_all()
        core_sim.stop()
        chc_db.close()


def test_db_his_to_ws_his_and_back(db_to_ws: Any) -> None:
    alliance, chc_db, core_his = db_to_ws
    written = referral_slip(slip_no="YTDB-WS-1", summary="头晕两周。\n既往高血压十年 & 糖尿病")
    chc_db.write_referral(written)
    got = arrived(core_his, "referral", written.slip_no)
    assert asdict(got.slip) == asdict(
        replace(written, id_number="", diagnosis_code="FXZD0101", department_code="0200")
    )
    assert got.custodian == "yuetan-chc"
    # the core's web-service HIS accepts; the centre's inbox table ZZ_JS_JZD gets the row
    core_his.accept(got.doc_id, **ACCEPTANCE)
    acc = wait_for(
        lambda: [a for a in chc_db.received_acceptances() if a.slip_no == written.slip_no],
        timeout=60,
        what="acceptance in the centre's database",
    )
    assert [asdict(a) for a in acc] == [
        asdict(
            AcceptanceSlip(
                slip_no=written.slip_no, accepted=True, **{**ACCEPTANCE, "department_code": "03.04"}
            )
        )
    ]
    back = return_slip(slip_no=written.slip_no)
    core_his.write_return(got.doc_id, back)
    ret = wait_for(
        lambda: [r for r in chc_db.received_returns() if r.slip_no == written.slip_no],
        timeout=60,
        what="return in the centre's database",
    )
    assert [asdict(r) for r in ret] == [asdict(in_centre_codes(back))]
    chc = alliance.node("yuetan-chc")
    threads = [r for r in chc.api("GET", "/local/v1/referrals") if r["side"] == "referrer"]
    assert len(threads) == 1
    wait_for(
        lambda: referral_row(chc, threads[0]["thread"]).get("step") == "return-received",
        timeout=60,
        what="return received at the centre",
    )
    assert core_his.deliveries(got.doc_id) == 1 and core_his.pending() == []
