"""`hutong demo --once`: the seven Fuxing nodes and their simulated vendor systems as processes,
the scenario played through the vendor systems and self-checked."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import ROOT, wait_for

pytestmark = pytest.mark.slow

STEPS = [
    (
        "up-inpatient from 西城区月坛社区卫生服务中心 (中间库 HIS) in Fuxing's HIS (HL7 REF^I12), "
        "Fuxing's codes, no ID number"
    ),
    "acceptance (接诊单) written in Fuxing's HIS arrives in 西城区月坛社区卫生服务中心's HIS",
    "admission (ADT^A01, AA) in Fuxing's HIS: in-progress on both nodes",
    (
        "lab results (ORU^R01 from Fuxing's LIS) routed to Yuetan and into its HIS "
        "(ZZ_JS_JYBG, Yuetan's item codes), values as sent"
    ),
    "CT study (DICOM C-STORE from the scanner) is an ImagingStudy at Fuxing",
    "Yuetan fetches the CT on demand: same instances, same pixel data",
    "return slip (转回单) in Yuetan's HIS: FX-0101/FX-0103 arrive as Yuetan's YT2037/YT2111",
    "completed on both nodes, return received at Yuetan",
    (
        "up-exam from 北京市西城区广外医院 (XML Web Service HIS) in Fuxing's HIS (HL7 REF^I12), "
        "Fuxing's codes, no ID number"
    ),
    "rejection with its reason in 广外医院's HIS (XML Web Service)",
    (
        "up-outpatient from 西城区展览路社区卫生服务中心 (HL7 v2 HIS) in Fuxing's HIS (HL7 REF^I12), "
        "Fuxing's codes, no ID number"
    ),
    "cancellation confirmed by Fuxing (both nodes: cancelled)",
    "acceptance (接诊单) written in Fuxing's HIS arrives in 西城区广外社区卫生服务中心's HIS",
    "acceptance (接诊单) written in Fuxing's HIS arrives in 北京市西城区展览路医院's HIS",
    # the consultation loop (远程会诊): Yuetan's HIS asks, Fuxing's centre answers
    "Yuetan's CT (DICOM C-STORE from its scanner) is an ImagingStudy at Yuetan's PACS adapter",
    *(
        f"{w} from Yuetan's HIS (ZZ_HZSQ) at the centre: kind, question, R91 (Yuetan's YTZ-14), "
        "the consent's signer"
        for w in ("respiratory MDT (多学科会诊)", "CT reading (远程影像诊断)")
    ),
    "respiratory MDT (多学科会诊) received by the centre: Task received (received) on both nodes",
    "respiratory MDT (多学科会诊): 'received' in Yuetan's HIS (ZZ_JS_HZZT)",
    "MDT returned for completion (the reason at Yuetan): Task on-hold (returned) on both nodes",
    "what is missing in Yuetan's HIS (ZZ_JS_HZZT: returned, on-hold, ZTSM) and on its node",
    "MDT resubmitted: Task received (resubmitted) on both nodes",
    "the resubmitted record is at the centre with the application",
    "MDT scheduled: Task accepted (scheduled) on both nodes",
    (
        "the Appointment at Yuetan: 3 experts (呼吸内科, 胸外科, 放射科), the video link, the "
        "inviting doctor"
    ),
    "the schedule in Yuetan's HIS (ZZ_JS_HZZT): the three experts, the video link",
    "MDT report drafted at the centre; nothing sent to Yuetan yet",
    "MDT report released, received at Yuetan: Task completed (report-received) on both nodes",
    (
        "the MDT report in Yuetan's HIS (ZZ_JS_HZBG): C34.1 (ICD-10, not in Yuetan's catalogue), "
        "the advice, referral recommended to fuxing"
    ),
    (
        "the referral (basedOn the consultation, reason C34.1) arrives at Fuxing and in its HIS "
        "(REF^I12)"
    ),
    "the centre fetches the CT from Yuetan's PACS on demand: same instances, same pixel data",
    "CT reading scheduled (1 radiologist): Task accepted (scheduled) on both nodes",
    (
        "CT reading report released, received at Yuetan: Task completed (report-received) on both "
        "nodes"
    ),
    "the CT reading at Yuetan: final DiagnosticReport on its study, conclusion and PDF as written",
    (
        "the CT reading in Yuetan's HIS: ZZ_JS_HZBG with its PDF, and as an exam report "
        "(ZZ_JS_JCBG) on the study"
    ),
    "the CT reading attached to the study at Yuetan's PACS adapter (from fuxing)",
    "CT reading closed: Task completed (closed) on both nodes",
    "malformed ORU^R01 NAKed (AE) and quarantined at Fuxing (IT page, hutong quarantine list)",
    *(
        f"audit chain of {n} verifies"
        for n in (
            "fuxing",
            "guangwai-chc",
            "guangwai-hosp",
            "platform",
            "yuetan-chc",
            "zhanlanlu-chc",
            "zhanlanlu-hosp",
        )
    ),
]


def demo_ports() -> int:
    """A --port-base whose whole span (base+101 .. base+1107) is free now."""
    from simulators.ports import free_port_block

    return free_port_block(1010) - 100


def test_demo_once_plays_the_scenario_and_exits_zero(tmp_path: Path) -> None:
    folder = tmp_path / "fuxing"
    base = demo_ports()
    cmd = [
        sys.executable,
        "-m",
        "bridge.cli",
        "demo",
        "--once",
        "--folder",
        str(folder),
        "--port-base",
        str(base),
    ]
    first = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        lock = folder.parent / ".fuxing.demo.lock"
        wait_for(
            lambda: lock.exists() and lock.read_text().strip() == str(first.pid),
            timeout=60,
            what="the first demo's lock",
        )
        # a second demo on the same folder refuses in one line and touches nothing
        second = subprocess.run(
            cmd, check=False, capture_output=True, text=True, cwd=ROOT, timeout=60
        )
        assert second.returncode == 2 and second.stdout == ""
        assert second.stderr.strip().splitlines() == [
            (
                f"error: HT-DEMO-LOCKED: demo folder {folder} is in use by another 'hutong demo' "
                f"(pid {first.pid}); stop it first or use --folder elsewhere (and --port-base)"
            )
        ]
        out, errtext = first.communicate(timeout=480)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    r = subprocess.CompletedProcess(cmd, first.returncode, out, errtext)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    out = r.stdout
    assert "61/61 steps landed where they should" in out
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
            ("3001", "8.9"),
            ("3003", "72"),
            ("3010", "4.1"),
        ]
        # the consultations: the centre's steps and both reports as Yuetan's HIS rows
        mdt, ct = sorted({r["HZDH"] for r in yuetan.consult_states()})
        assert [r["SJLX"] for r in yuetan.consult_states(mdt)] == [
            "received",
            "return",
            "schedule",
            "start",
            "report",
            "release",
        ]
        assert [r["SJLX"] for r in yuetan.consult_states(ct)] == [
            "received",
            "schedule",
            "start",
            "report",
            "release",
        ]
        [report] = yuetan.consult_reports(mdt)
        assert (report["HZLX"], report["BGZT"], report["ZDDM"], report["JYZZ"], report["ZZJG"]) == (
            "2",
            "F",
            "C34.1",
            "1",
            "fuxing",
        )
        [reading] = yuetan.consult_reports(ct)
        assert (reading["HZLX"], reading["BGZT"], reading["BGYS"] is not None) == ("3", "F", True)
        [exam] = [r for r in yuetan.received_imaging() if r["ZZDH"] == ct]
        assert exam["JCUID"].startswith("1.2.826.0.1.3680043.8.498.7701.2.")
        assert reading["JCUID"] == exam["JCUID"]
        assert exam["ZDYJ"] == reading["YXJL"]
    finally:
        yuetan.close()
    # where to look: every member's pages by role, with the token file to log in with
    platform = base + 107
    for port in range(base + 101, base + 108):
        pages = (
            ("/ui/it", "/ui/audit")
            if port == platform
            else ("/ui/referrals", "/ui/consultations", "/ui/stats", "/ui/it", "/ui/audit")
        )
        for page in pages:
            assert f"http://127.0.0.1:{port}{page}" in out
    assert f"http://127.0.0.1:{platform}/ui/referrals" not in out  # no clinicians there
    assert f"{folder / 'secrets'}/fuxing.clinician.token" in out
    # commands printed as they run from here (the venv's script unless PATH finds it)
    (line,) = [x for x in lines if "quarantine at the command line" in x]
    command = line.split(": ", 1)[1].split()
    shown = subprocess.run(
        command, check=False, capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert shown.returncode == 0, shown.stderr
    assert "HT-LIS" in shown.stdout or "AE" in shown.stdout or "lis" in shown.stdout
    # every process the demo started is gone: the ports are free again
    import socket

    for port in (101, 107, 1101, 201, 202, 203, 204, 211, 241, 251, 252):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", base + port)) != 0, port


def test_demo_with_a_taken_port_fails_at_once_naming_it(tmp_path: Path) -> None:
    import socket

    base = demo_ports()
    folder = tmp_path / "fuxing"
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", base + 203))  # the Fuxing LIS port after --port-base
        holder.listen()
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "bridge.cli",
                "demo",
                "--once",
                "--folder",
                str(folder),
                "--port-base",
                str(base),
            ],
            check=False,
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
        )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith(
        f"error: HT-PORT-IN-USE: port {base + 203} on 127.0.0.1 is already "
        f"in use by pid {os.getpid()} ("
    )
    assert not folder.exists()  # nothing was started or written
