"""Replaying what an adapter quarantined, on a real node (``source = "adapter:<name>"``).

The community centre's HL7 v2 HIS refers a patient under a diagnosis code its site's map does
not list: NAKed, quarantined, audited. Replayed before the fix it stays held (not quarantined
twice); IT adds the code to the mapping CSV and replays with ``hutong quarantine replay``
(which goes through the running node's local API): the referral is taken, reaches the core
hospital with the code mapped, the item is marked replayed, and the HIS's resend of the same
message is now answered AA without a second referral. The LIS: a GB18030 ORU without MSH-18
on a channel set to UTF-8 is refused; IT fixes ``default_charset``, restarts, replays.
"""

from __future__ import annotations

import csv
import io
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from simulators.his_hl7 import VendorHis
from tests.harness import ROOT, Alliance, free_port_block, wait_for
from tests.test_his_hl7 import MEMBERS, RULES, slip

pytestmark = pytest.mark.slow

UNLISTED = "YTZ-77"  # 高血压肾病: not in Yuetan's diagnosis map until IT adds it


@pytest.fixture
def centre(tmp_path: Path) -> Any:
    ports = free_port_block(2)
    maps = tmp_path / "mappings" / "yuetan-chc"
    shutil.copytree(ROOT / "mappings" / "yuetan-chc" / "codes", maps / "codes")
    core, chc = MEMBERS
    members = [
        core,
        {
            **chc,
            "adapters": [
                {
                    "name": "his",
                    "type": "his-hl7",
                    "mappings": str(maps),
                    "receives": ["referral.*"],
                    "options": {
                        "listen": f"127.0.0.1:{ports}",
                        "his": f"127.0.0.1:{ports + 1}",
                        "charset": "GB 18030-2000",
                    },
                }
            ],
        },
    ]
    alliance = Alliance(tmp_path / "alliance", members, RULES)
    his = VendorHis(tmp_path / "chc-his.sqlite", f"127.0.0.1:{ports}", charset_name="GB 18030-2000")
    try:
        alliance.start("fuxing", "yuetan-chc")
        yield alliance, his, maps / "codes" / "diagnosis.csv"
    finally:
        alliance.stop_all()


def held(node: Any, state: str = "held") -> list[dict[str, Any]]:
    return [
        q
        for q in node.api("GET", f"/local/v1/quarantine?state={state}")
        if q["source"] == "adapter:his"
    ]


def test_hl7_referral_replayed_after_the_code_is_added(centre: Any) -> None:
    alliance, his, diagnosis_csv = centre
    chc, core = alliance.node("yuetan-chc"), alliance.node("fuxing")
    s = replace(slip(), slip_no="YTRP-1", diagnosis_code=UNLISTED, diagnosis_name="高血压肾病")
    nak = his.refer(s, control_id="RP-0001")
    assert nak.code == "AE" and nak.text.startswith("DG1-3")
    (item,) = held(chc)
    assert item["message"].startswith("record MSH-10 RP-0001 field DG1-3:")
    assert UNLISTED in item["message"] and s.patient_name not in item["message"]

    # replayed before the fix: still refused, still held, not quarantined a second time
    again = chc.api("POST", f"/local/v1/quarantine/{item['id']}/replay")
    assert again["ok"] is False and UNLISTED in again["result"]
    assert [q["id"] for q in held(chc)] == [item["id"]]
    assert his.refer(s, control_id="RP-0001").code == "AE"  # the HIS's resend: same NAK

    # IT adds the code to the site's map and replays from the command line
    with diagnosis_csv.open("a", encoding="utf-8", newline="") as fh:
        fh.write(f"{UNLISTED},高血压肾病,I12.9,高血压肾脏病不伴有肾衰竭,equivalent,\n")
    done = chc.cli("quarantine", "replay", str(item["id"]))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "replayed: MSH-10 RP-0001 (REF^I12) taken" in done.stdout
    assert held(chc) == []
    (replayed,) = held(chc, "replayed")
    assert replayed["id"] == item["id"] and replayed["replay_result"].endswith("taken")

    # the referral reached the core hospital, the diagnosis mapped through the new row
    def arrived() -> dict[str, Any] | None:
        rows = core.api("GET", "/local/v1/referrals")
        return rows[0] if rows else None

    row = wait_for(arrived, timeout=60, what="the replayed referral at the core")
    sr = core.api("GET", f"/fhir/ServiceRequest/{row['sr_id']}", role="clinician")
    assert sr["requisition"]["value"] == s.slip_no
    assert [(c["system"], c["code"]) for c in sr["reasonCode"][0]["coding"]] == [
        ("http://hl7.org/fhir/sid/icd-10", "I12.9"),
        ("http://hutong.dev/CodeSystem/yuetan-chc/diagnosis", UNLISTED),
    ]

    # the HIS resends the message it once got a NAK for: AA now, nothing new
    assert his.refer(s, control_id="RP-0001").code == "AA"
    assert len(chc.api("GET", "/local/v1/referrals")) == 1
    assert len(core.api("GET", "/local/v1/referrals")) == 1
    # replaying a replayed item is refused; both tries are in the audit chain
    assert chc.api("POST", f"/local/v1/quarantine/{item['id']}/replay")["ok"] is False
    rows = list(csv.DictReader(io.StringIO(chc.cli("audit", "export", "--format", "csv").stdout)))
    assert [r["outcome"] for r in rows if r["action"] == "replayed"] == ["4", "0"]
    assert chc.cli("audit", "verify").returncode == 0


def test_lis_message_replayed_after_the_charset_is_fixed(tmp_path: Path) -> None:
    """A GB18030 ORU without MSH-18 on a LIS channel set to UTF-8 is refused; IT sets the
    channel's default_charset, restarts the node and replays: the results are stored."""
    from sqlalchemy import select

    from bridge.fhirstore.tables import FHIR_RESOURCE
    from bridge.store.db import Store
    from tests.lis_site import write_site
    from tests.test_lis_mllp import GBK, msa, observations_of, report, send

    raw = GBK.replace(b"|CHN|GB18030\r", b"|CHN|\r")
    assert raw != GBK
    port = free_port_block(1)
    members = [
        {
            "id": "core",
            "zh": "复兴医院",
            "en": "Fuxing Hospital",
            "role": "core",
            "adapters": [
                {
                    "name": "lis",
                    "type": "lis-hl7",
                    "mappings": str(write_site(tmp_path / "mappings" / "fxlab")),
                    "options": {"port": port, "default_charset": "UTF-8"},
                }
            ],
        },
        {"id": "chc", "zh": "月坛社区卫生服务中心", "en": "Yuetan CHC", "role": "community"},
    ]
    alliance = Alliance(
        tmp_path / "alliance", members, [{"from": "core", "to": "chc", "kinds": ["result.lab"]}]
    )
    node = alliance.node("core")
    store = Store(node.plan.storage_dsn)

    def reports() -> list[bytes]:
        with store.read() as conn:
            return [
                r.body
                for r in conn.execute(
                    select(FHIR_RESOURCE.c.body).where(FHIR_RESOURCE.c.rtype == "DiagnosticReport")
                )
            ]

    try:
        alliance.start("core")
        (ack,) = send(port, raw)
        assert msa(ack)[:2] == ("AR", "YT-000042")
        (item,) = [
            q for q in node.api("GET", "/local/v1/quarantine") if q["source"] == "adapter:lis"
        ]
        assert item["code"] == "HT-LIS-ENCODING" and reports() == []
        toml = node.config.read_text(encoding="utf-8")
        assert toml.count('"default_charset" = "UTF-8"') == 1
        node.config.write_text(
            toml.replace('"default_charset" = "UTF-8"', '"default_charset" = "GB18030"'),
            encoding="utf-8",
        )
        node.stop()
        node.start()
        node.wait_ready()
        done = node.api("POST", f"/local/v1/quarantine/{item['id']}/replay")
        assert done == {"ok": True, "result": "MSH-10 YT-000042 taken"}
        assert len(reports()) == 1
        glu = observations_of(store, report(store, "YT-LAB-0042"))["GLU"]  # read as GB18030
        assert glu["valueQuantity"]["value"] == 7.9
        assert glu["note"] == [{"text": "患者诉近期饮食不规律；億元(测试字符)"}]
        assert glu["performer"][0]["display"] == "月坛社区检验室"
        (ack,) = send(port, raw)  # the LIS resends: the stored AA, nothing new
        assert msa(ack)[:2] == ("AA", "YT-000042") and len(reports()) == 1
    finally:
        store.dispose()
        alliance.stop_all()
