"""Lab results reach a member whose HIS speaks HL7 v2: the community centre refers a patient up
in its own HL7 HIS (a simulated vendor process on real MLLP); the core hospital's LIS reports an
ORU^R01 over MLLP; the result.lab packet reaches the centre's node and its his-hl7 adapter sends
the centre's HIS one ORU^R01 v2.5.1 (GB 18030), which must match the LIS's message field by
field with the item codes in the centre's own lab catalogue; a correction arrives as corrected
OBX/OBR; a HIS that NAKs once gets the message again and files it once; the node logs hold no
patient ID number or name.

The pure part first: the same conversion in process, and the value types the LIS fixture has
not got.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B.diagnosticreport import DiagnosticReport

from adapters.his_hl7 import messages, results, v2
from adapters.hl7v2 import charset
from adapters.lis import oru
from adapters.slips import ReferralSlip
from adapters.slips_fhir import Codes
from bridge.mapping.conceptmap import load_site
from simulators.his_hl7 import VendorHis, read_results
from tests.harness import ROOT, Alliance, db_rows, free_port_block, lab_gaps, lis_send, wait_for
from tests.lis_site import LOCAL, write_site

FIX = ROOT / "tests" / "fixtures" / "hl7" / "lis"
UTF8 = (FIX / "oru_r01_v251_utf8.hl7").read_bytes()
CORRECTED = (FIX / "oru_r01_v251_corrected.hl7").read_bytes()
KINDS = ["referral.request", "referral.status", "referral.cancel", "referral.return", "result.lab"]
CHC, CORE = "yuetan-chc", "fuxing"
ID_NUMBER = "110102195003151234"
HIS_APP = "YTHIS"

#: the lab's code (OBX-3.1 / OBR-4.1 in the LIS message) -> OBX-3 / OBR-4 in the centre's HIS:
#: the centre's catalogue (mappings/yuetan-chc/codes/lab.csv) with LOINC as the alternate;
#: LOINC where the centre has no item for it; the lab's own code and system where the lab's map
#: has none (XYZ99, TITER)
ITEM = {
    "WBC": ["3007", "白细胞计数", "LOCALLAB", "6690-2", "", "LN"],
    "HGB": ["3008", "血红蛋白", "LOCALLAB", "718-7", "", "LN"],
    "PLT": ["3009", "血小板计数", "LOCALLAB", "777-3", "", "LN"],
    "NEUT%": ["770-8", "中性粒细胞百分比", "LN"],
    "GLU": ["3001", "葡萄糖", "LOCALLAB", "2345-7", "", "LN"],
    "CRP": ["1988-5", "C反应蛋白", "LN"],
    "HBSAG": ["5196-1", "乙肝表面抗原", "LN"],
    "XYZ99": ["XYZ99", "未映射项目", LOCAL],
    "TITER": ["TITER", "抗体滴度", LOCAL],
    "CBC": ["58410-2", "血常规", "LN"],  # panels: the centre's catalogue has none
    "BIOCHEM": ["24323-8", "生化全套", "LN"],
}


def zoned(hl7_time: str) -> str:
    """The LIS's local times (no offset) as the adapter writes them (with +0800)."""
    return f"{hl7_time}+0800" if hl7_time else ""


def assert_matches_source(
    ours: dict[str, Any], source: dict[str, Any], *, slip_no: str, lab: str = "复兴医院检验科"
) -> None:
    """One ORU as the HIS filed it against the LIS's ORU, report by report, OBX by OBX."""
    assert len(ours["reports"]) == len(source["reports"])
    for mine, theirs in zip(ours["reports"], source["reports"], strict=True):
        assert mine["placer"] == slip_no
        assert mine["code"] == ITEM[theirs["code"][0]]
        assert mine["lab_no"] == theirs["filler"]  # the lab's own report number
        assert (mine["collected"], mine["issued"]) == (
            zoned(theirs["collected"]),
            zoned(theirs["issued"]),
        )
        assert (mine["status"], mine["notes"]) == (theirs["status"], theirs["notes"])
        assert mine["specimen"] == {
            **theirs["specimen"],
            "collected": zoned(theirs["specimen"]["collected"]),
            "received": zoned(theirs["specimen"]["received"]),
        }
        assert len(mine["items"]) == len(theirs["items"])
        for x, y in zip(mine["items"], theirs["items"], strict=True):
            assert x["code"] == ITEM[y["code"][0]]
            assert (x["vtype"], x["value"]) == (y["vtype"], y["value"])
            assert (
                x["unit"][:1] and x["unit"][0][0] == y["unit"][0][0]
                if y["unit"]
                else x["unit"] == []
            )
            assert (x["range"], x["flags"], x["status"]) == (y["range"], y["flags"], y["status"])
            assert (x["observed"], x["notes"], x["lab"]) == (zoned(y["observed"]), y["notes"], lab)
            assert x["result_id"]


def lis_bundle(raw: bytes, lab_maps: Path) -> dict[str, Any]:
    msg = oru.parse(raw.decode())
    cfg = oru.Settings(
        node_id=CORE,
        hash_key=b"k" * 32,
        national_id_system="urn:oid:2.16.156.10011.1.3",
        local_system=LOCAL,
        translator=load_site(lab_maps),
    )
    return oru.to_fhir(msg, oru.header(msg), cfg).bundle


def source(raw: bytes) -> dict[str, Any]:
    return read_results(v2.parse(raw.decode()))


HEADER = messages.Header("HUTONG", CHC, HIS_APP, "", "GB 18030-2000")
TO = results.Addressee("YT0001", HIS_APP, "YTZZ000901", "thread-1")


# -- pure -----------------------------------------------------------------------------------


def test_oru_from_the_lis_bundle_matches_the_lis_message(tmp_path: Path) -> None:
    gaps: list[Any] = []
    bundle = lis_bundle(UTF8, write_site(tmp_path / "fxlab"))
    text = results.oru_message(
        HEADER,
        bundle,
        TO,
        Codes(load_site(ROOT / "mappings" / CHC), CHC, gaps),
        "PKT-1",
        datetime(2026, 11, 20, 2, tzinfo=UTC),
    )
    assert text is not None
    raw = charset.encode(text, "gb18030")
    decoded, codec = charset.decode(raw)
    assert codec.decoder == "gb18030"
    msg = v2.parse(decoded)
    msh = msg.segment("MSH")
    assert (
        v2.get(msg, msh, 9, 1),
        v2.get(msg, msh, 9, 2),
        v2.get(msg, msh, 10),
        v2.get(msg, msh, 12),
    ) == ("ORU", "R01", "PKT-1", "2.5.1")
    ours = read_results(msg)
    assert (ours["mrn"], ours["mrn_authority"], ours["mrn_type"], ours["thread"]) == (
        "YT0001",
        HIS_APP,
        "MR",
        "thread-1",
    )
    assert ours["pid"] == f"PID|1||YT0001^^^{HIS_APP}^MR"  # nothing else about the patient
    assert ID_NUMBER.encode() not in raw and "秀英".encode("gb18030") not in raw
    assert_matches_source(ours, source(UTF8), slip_no=TO.slip_no)
    dr_ids = [
        r["resource"]["id"]
        for r in bundle["entry"]
        if r["resource"]["resourceType"] == "DiagnosticReport"
    ]
    assert [r["filler"] for r in ours["reports"]] == dr_ids
    wbc = ours["reports"][0]["items"][0]
    assert wbc["unit"] == [["10^9/L", "", "", "10*9/L", "", "UCUM"]]  # printed, then UCUM
    # every code not in the centre's catalogue is a gap, once
    assert sorted(g.code for g in gaps) == sorted(
        ["58410-2", "770-8", "24323-8", "1988-5", "5196-1", "XYZ99", "TITER"]
    )


def _obs(**kw: Any) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": kw.pop("id", "o1"),
        "status": "final",
        "code": {"coding": [{"system": "urn:x:lab", "code": "K1", "display": "项目"}]},
        **kw,
    }


def _only_item(observations: list[dict[str, Any]], maps: Any = None) -> list[dict[str, Any]]:
    dr = {
        "resourceType": "DiagnosticReport",
        "id": "r1",
        "status": "final",
        "code": {"text": "杂项"},
        "result": [{"reference": f"Observation/{o['id']}"} for o in observations],
    }
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": r} for r in [dr, *observations]],
    }
    text = results.oru_message(
        HEADER, bundle, TO, Codes(maps, CHC, []), "P2", datetime(2026, 11, 20, tzinfo=UTC)
    )
    assert text is not None
    items: list[dict[str, Any]] = read_results(v2.parse(text))["reports"][0]["items"]
    return items


def test_value_types_escapes_and_unmapped_codes_without_maps() -> None:
    items = _only_item(
        [
            _obs(
                id="a",
                valueRange={
                    "low": {"value": 2, "unit": "mmol/L"},
                    "high": {"value": 4.5, "unit": "mmol/L"},
                },
            ),
            _obs(
                id="b",
                valueString="第一行 a|b^c~d&e\\f\n第二行",
                note=[{"text": "注1|x"}, {"text": "注2"}],
            ),
            _obs(
                id="c",
                valueDateTime="2026-11-20T08:30:00+08:00",
                interpretation=[{"coding": [{"code": "H"}]}, {"coding": [{"code": "A"}]}],
            ),
            _obs(id="d", status="cancelled"),
            _obs(
                id="e",
                status="corrected",
                valueQuantity={"value": 1e-05, "unit": "g/L"},
                referenceRange=[{"low": {"value": 1}, "high": {"value": 3}}],
            ),
        ]
    )
    a, b, c, d, e = items
    assert (a["vtype"], a["value"], a["unit"]) == ("SN", [["", "2", "-", "4.5"]], [["mmol/L"]])
    assert (b["vtype"], b["value"]) == ("TX", [["第一行 a|b^c~d&e\\f"], ["第二行"]])
    assert b["notes"] == ["注1|x", "注2"]
    assert (c["vtype"], c["value"], c["flags"]) == ("DTM", [["20261120083000+0800"]], ["H", "A"])
    assert (d["vtype"], d["value"], d["status"]) == ("", [], "X")
    assert (e["vtype"], e["value"], e["range"], e["status"]) == ("NM", [["0.00001"]], "1-3", "C")
    # no maps at all: the sender's code with its system
    assert a["code"] == ["K1", "项目", "urn:x:lab"]


# -- real processes -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("results-his-hl7")
    lab_maps = write_site(root / "mappings" / "fxlab")
    lis, adapter, his_port = (free_port_block(3) + i for i in range(3))
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
                    "type": "his-hl7",
                    "mappings": str(ROOT / "mappings" / CHC),
                    "receives": ["referral.*", "result.*"],
                    "options": {
                        "listen": f"127.0.0.1:{adapter}",
                        "his": f"127.0.0.1:{his_port}",
                        "charset": "GB 18030-2000",
                        "his_application": HIS_APP,
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
        application=HIS_APP,
        facility="yuetan-his",
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
        yield {"a": a, "his": his, "lis": lis}
    finally:
        a.stop_all()
        proc.terminate()
        proc.wait(30)
        log.close()


@pytest.mark.slow
def test_results_in_the_centres_hl7_his_field_by_field(site: dict[str, Any]) -> None:
    a, his = site["a"], site["his"]
    chc, core = a.node(CHC), a.node(CORE)
    slip = ReferralSlip(
        slip_no="YTZZ000901",
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
    )
    assert his.refer(slip, control_id="YT-REF-0901").code == "AA"  # in the centre's own HIS
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
    assert his.results() == []
    # the core hospital's LIS reports (same patient: PID-3 national ID)
    assert lis_send(site["lis"], UTF8) == "AA"
    got = wait_for(lambda: his.results() or None, timeout=60, what="ORU in the centre's HIS")
    assert len(got) == 1
    control, first, raw = got[0]
    # MSH-10 is the result.lab packet's id
    packets = db_rows(chc, "SELECT packet_id FROM inbox WHERE kind = 'result.lab'")
    assert [p for (p,) in packets] == [control]
    assert raw.startswith(b"MSH|") and b"|ORU^R01^ORU_R01|" in raw and b"|2.5.1|" in raw
    assert b"|GB 18030-2000" in raw.split(b"\r")[0] and "白细胞计数".encode("gb18030") in raw
    assert ID_NUMBER.encode() not in raw and "秀英".encode("gb18030") not in raw
    assert (first["mrn"], first["mrn_authority"], first["mrn_type"], first["thread"]) == (
        slip.mrn,
        HIS_APP,
        "MR",
        thread,
    )
    assert_matches_source(first, source(UTF8), slip_no=slip.slip_no)
    # the same reports in the centre's FHIR store: OBR-3 and OBX-21 are their ids
    task = chc.api("GET", f"/fhir/Task/{thread}", role="clinician")
    for report in first["reports"]:
        dr = chc.api("GET", f"/fhir/DiagnosticReport/{report['filler']}", role="clinician")
        DiagnosticReport.model_validate(dr)
        assert dr["code"]["text"] == report["code"][1] and dr["subject"] == task["for"]
        assert [r["reference"] for r in dr["result"]] == [
            f"Observation/{x['result_id']}" for x in report["items"]
        ]
    wanted_gaps = {
        "58410-2": 1,
        "770-8": 1,
        "24323-8": 1,
        "1988-5": 1,
        "5196-1": 1,
        "XYZ99": 1,
        "TITER": 1,
    }
    # counted after the HIS's ACK (so waited for)
    wait_for(lambda: lab_gaps(chc) == wanted_gaps, what="mapping gaps counted")
    assert his.attempts()[control] == (1, "AA")

    # the lab corrects the glucose; the centre's HIS NAKs the first offer
    his.set_mode(nak=1)
    assert lis_send(site["lis"], CORRECTED) == "AA"
    got = wait_for(
        lambda: r if len(r := his.results()) == 2 else None,
        timeout=90,
        what="corrected ORU in the centre's HIS",
    )
    control2, fixed, _ = got[1]
    assert his.mode()["nak"] == 0
    assert his.attempts()[control2] == (2, "AA")  # NAKed once, sent again, filed once
    assert [c for c, _, _ in his.results()] == [control, control2]
    # (the correction names its lab by the facility id only: no OBX-23)
    assert_matches_source(fixed, source(CORRECTED), slip_no=slip.slip_no, lab="FXLAB")
    bio_before = first["reports"][1]
    (bio,) = fixed["reports"]
    assert (bio["filler"], bio["status"], bio["issued"]) == (
        bio_before["filler"],
        "C",
        "20261120112500+0800",
    )
    glu = bio["items"][0]
    assert (glu["code"][0], glu["value"], glu["status"], glu["observed"], glu["notes"]) == (
        "3001",
        [["7.25"]],
        "C",
        "20261120110000+0800",
        ["复测后更正"],
    )
    # the same results (same ids), now final or corrected
    assert [x["result_id"] for x in bio["items"]] == [x["result_id"] for x in bio_before["items"]]
    assert [x["status"] for x in bio["items"]] == ["C", "F", "F", "F", "F"]
    # gaps counted once per packet, not again for the NAKed offer
    wanted_gaps.update({"24323-8": 2, "1988-5": 2, "5196-1": 2, "XYZ99": 2, "TITER": 2})
    wait_for(lambda: lab_gaps(chc) == wanted_gaps, what="mapping gaps counted again")
    sent = wait_for(
        lambda: (
            (
                r := db_rows(
                    chc,
                    "SELECT state, attempts, last_error FROM inbox WHERE packet_id = :p",
                    p=control2,
                )
            )[0][0]
            == "delivered"
            and r
        ),
        what="the corrected packet delivered",
    )
    # the NAK was one failed delivery attempt, named for IT
    assert sent[0][1] == 2 and "HT-HL7-HIS-NAK" in sent[0][2]
    assert lab_gaps(chc) == wanted_gaps
    # no patient ID number or name in either node's log
    for node in (chc, core):
        text = node.log.read_text(encoding="utf-8", errors="replace")
        assert ID_NUMBER not in text and "秀英" not in text and slip.phone not in text
