"""`hutong demo --once`: the seven Fuxing nodes and their simulated vendor systems as processes,
the scenario played through the vendor systems and self-checked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import ROOT

pytestmark = pytest.mark.slow

STEPS = [
    ("up-inpatient from 西城区月坛社区卫生服务中心 (中间库 HIS) in Fuxing's HIS (HL7 REF^I12), "
    "Fuxing's codes, no ID number"),
    "acceptance (接诊单) written in Fuxing's HIS arrives in 西城区月坛社区卫生服务中心's HIS",
    "admission (ADT^A01, AA) in Fuxing's HIS: in-progress on both nodes",
    ("lab results (ORU^R01 from Fuxing's LIS) routed to Yuetan and into its HIS "
     "(ZZ_JS_JYBG, Yuetan's item codes), values as sent"),
    "CT study (DICOM C-STORE from the scanner) is an ImagingStudy at Fuxing",
    "Yuetan fetches the CT on demand: same instances, same pixel data",
    "return slip (转回单) in Yuetan's HIS: FX-0101/FX-0103 arrive as Yuetan's YT2037/YT2111",
    "completed on both nodes, return received at Yuetan",
    ("up-exam from 北京市西城区广外医院 (XML Web Service HIS) in Fuxing's HIS (HL7 REF^I12), "
    "Fuxing's codes, no ID number"),
    "rejection with its reason in 广外医院's HIS (XML Web Service)",
    ("up-outpatient from 西城区展览路社区卫生服务中心 (HL7 v2 HIS) in Fuxing's HIS (HL7 REF^I12), "
    "Fuxing's codes, no ID number"),
    "cancellation confirmed by Fuxing (both nodes: cancelled)",
    "acceptance (接诊单) written in Fuxing's HIS arrives in 西城区广外社区卫生服务中心's HIS",
    "acceptance (接诊单) written in Fuxing's HIS arrives in 北京市西城区展览路医院's HIS",
    "malformed ORU^R01 NAKed (AE) and quarantined at Fuxing (IT page, hutong quarantine list)",
    *(f"audit chain of {n} verifies" for n in ("fuxing", "guangwai-chc", "guangwai-hosp",
                                               "platform", "yuetan-chc", "zhanlanlu-chc",
                                               "zhanlanlu-hosp")),
]


def test_demo_once_plays_the_scenario_and_exits_zero(tmp_path: Path) -> None:
    folder = tmp_path / "fuxing"
    r = subprocess.run([sys.executable, "-m", "bridge.cli", "demo", "--once", "--folder",
                        str(folder)], check=False, capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    out = r.stdout
    assert "31/31 steps landed where they should" in out
    lines = out.splitlines()
    for step in STEPS:
        assert f"  ✓ {step}" in lines, step  # shown as it happened
        assert f"  OK     {step}" in lines, step  # and named in the summary
    assert "✗" not in out and "FAILED" not in out
    # the vendor systems really hold what the clinicians wrote and received
    from simulators.his_db import HisDb
    yuetan = HisDb(f"sqlite:///{folder / 'his' / 'yuetan-chc.db'}")
    try:
        returns = yuetan.received_returns()
        assert [p.drug_code for p in returns[0].prescriptions] == ["YT2037", "YT2111"]
        assert len(yuetan.received_acceptances()) == 1
        labs = yuetan.received_results()
        assert [(x["XMDM"], x["JG"]) for x in labs[0]["items"]] == [
            ("3001", "8.9"), ("3003", "72"), ("3010", "4.1")]
    finally:
        yuetan.close()
    # where to look: every member's pages by role, with the token file to log in with
    for port in range(8101, 8108):
        for page in ("/ui/referrals", "/ui/it", "/ui/audit"):
            assert f"http://127.0.0.1:{port}{page}" in out
    assert f"{folder / 'secrets'}/fuxing.clinician.token" in out
    # every process the demo started is gone: the ports are free again
    import socket
    for port in (8101, 8107, 9101, 8201, 8202, 8203, 8204, 8211, 8241, 8251, 8252):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, port
