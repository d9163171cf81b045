"""Quarantine replay for the intermediate-database and XML web-service HIS adapters.

Real node processes and the simulated vendor systems (vendor databases, HIS web-service
processes), as in ``test_his_db.py`` / ``test_his_ws.py``. In each style a referral written
under a diagnosis code the site's map does not list is quarantined; replayed before the fix it
stays held with its reason (not quarantined twice); IT adds the code to the site's CSV and runs
``hutong quarantine replay <id>`` (the real CLI, through the running node's local API); the
referral reaches the other hospital's HIS field by field with the code mapped into that
hospital's catalogue. A second held copy of the same record replayed afterwards does not send
it again (counted at the receiving HIS behind a later record that arrived), and a copy whose
replay now fails for another reason (a duplicate of what was sent) stays held with the new
reason; every try is in the audit chain, which verifies. The database style also re-reads a
row the HIS corrected in place, falls back to the kept copy when the HIS deleted the row, and
sends a row quarantined twice (the node killed between quarantine and watermark) once.
"""

from __future__ import annotations

import csv
import io
import shutil
import signal
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import delete, update

from simulators.his_db import ZZ_SQD, ZZ_ZHD, ZZ_ZHD_JY, ZZ_ZHD_YP, HisDb
from simulators.his_ws import HisWsProcess
from tests.harness import Alliance, NodeProcess, wait_for
from tests.slip_samples import return_slip
from tests.test_his_db import as_received, make_alliance, quarantined, received, slip
from tests.test_his_ws import referral_slip

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# a local code for 高血压性心脏病 (follow-up visit) that the site's map does not list until IT
# adds it; it maps to ICD-10 I11.9, which the core hospital's catalogue lists as FXZD0102
MAP_ROW = "{code},高血压性心脏病(复诊),I11.9,高血压性心脏病不伴有(充血性)心力衰竭,equivalent,\n"


def add_mapping(csv_path: Path, code: str) -> None:
    with csv_path.open("a", encoding="utf-8", newline="") as fh:
        fh.write(MAP_ROW.format(code=code))


def held(node: NodeProcess, state: str = "held") -> list[dict[str, Any]]:
    return [
        q
        for q in node.api("GET", f"/local/v1/quarantine?state={state}")
        if q["source"] == "adapter:his"
    ]


def item_for(node: NodeProcess, record: str, state: str = "held") -> list[dict[str, Any]]:
    """Held items of one record, oldest first (``record`` as the reason names it)."""
    return sorted(
        (q for q in held(node, state) if f"record {record} " in q["message"]), key=lambda q: q["id"]
    )


def replay_cli(node: NodeProcess, item_id: int) -> tuple[int, str]:
    done = node.cli("quarantine", "replay", str(item_id))
    return done.returncode, (done.stdout + done.stderr).replace("\n", " ")


def replay_api(node: NodeProcess, item_id: int) -> tuple[bool, str]:
    """The same replay through the local API (what the CLI and the IT page call)."""
    res = node.api("POST", f"/local/v1/quarantine/{item_id}/replay")
    return res["ok"], res["result"]


def replayed_audit(node: NodeProcess) -> list[tuple[str, str]]:
    rows = csv.DictReader(io.StringIO(node.cli("audit", "export", "--format", "csv").stdout))
    return [
        (r["outcome"], r.get("outcomeDesc") or r.get("message") or "")
        for r in rows
        if r["action"] == "replayed"
    ]


# -- intermediate database (中间库) ----------------------------------------------------------------


@pytest.fixture(scope="module")
def db_site(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("his-db-replay")
    chc_db = HisDb(f"sqlite:///{root / 'desheng-his.db'}").init()
    core_db = HisDb(f"sqlite:///{root / 'fuxing-his.db'}").init()
    a = make_alliance(root, chc_db.dsn, core_db.dsn)
    a.start("fuxing", "desheng-chc")
    try:
        yield a, chc_db, core_db, root / "mappings" / "desheng-chc" / "codes" / "diagnosis.csv"
    finally:
        a.stop_all()
        chc_db.close()
        core_db.close()


def barrier(chc_db: HisDb, core_db: HisDb, n: int) -> None:
    """A good row written now and seen at the core: what was queued before it has arrived."""
    s = slip(n)
    chc_db.write_referral(s)
    got = wait_for(lambda: received(core_db, s.slip_no), timeout=60, what=f"row {s.slip_no}")
    assert [asdict(x) for x in got] == [asdict(as_received(s))]


def test_db_unknown_code_replayed_after_the_mapping_fix(db_site: Any) -> None:
    a, chc_db, core_db, diagnosis_csv = db_site
    chc = a.node("desheng-chc")
    s = slip(1, diagnosis_code="YTZ-77", diagnosis_name="高血压性心脏病(复诊)")
    first = chc_db.write_referral(s)
    # the HIS saved the same form again (same slip number) before anyone noticed
    second = chc_db.write_referral(replace(s, phone="13900000000"))
    barrier(chc_db, core_db, 2)
    (item,) = item_for(chc, f"ZZ_SQD#{first}")
    (other,) = item_for(chc, f"ZZ_SQD#{second}")
    for q in (item, other):
        assert q["code"] == "HT-LOCAL-CODE" and "field ZDDM:" in q["message"]
        assert "YTZ-77" in q["message"]
        assert s.patient_name not in q["message"] and s.id_number not in q["message"]
    assert not received(core_db, s.slip_no)

    # replayed before the fix: still refused with its reason, still held, not quarantined twice
    ok, text = replay_api(chc, item["id"])
    assert not ok and text.startswith("HT-LOCAL-CODE: ") and "YTZ-77" in text
    assert f"record ZZ_SQD#{first} field ZDDM" in text
    assert [q["id"] for q in item_for(chc, f"ZZ_SQD#{first}")] == [item["id"]]
    assert len(held(chc)) == 2

    # IT adds the code to the site's map and replays from the command line
    add_mapping(diagnosis_csv, "YTZ-77")
    code, text = replay_cli(chc, item["id"])
    assert code == 0, text
    assert f"replayed: ZZ_SQD#{first} taken (row re-read from the HIS)" in text
    (done,) = item_for(chc, f"ZZ_SQD#{first}", "replayed")
    assert done["id"] == item["id"] and done["replay_result"].endswith(
        "taken (row re-read from the HIS)"
    )
    got = wait_for(lambda: received(core_db, s.slip_no), timeout=60, what="the replayed row")
    assert [asdict(x) for x in got] == [asdict(replace(as_received(s), diagnosis_code="FXZD0102"))]
    ref = next(
        r
        for r in chc.api("GET", "/local/v1/referrals")
        if r["side"] == "referrer"
        and chc.api("GET", f"/fhir/ServiceRequest/{r['sr_id']}", role="clinician")["requisition"][
            "value"
        ]
        == s.slip_no
    )
    sr = chc.api("GET", f"/fhir/ServiceRequest/{ref['sr_id']}", role="clinician")
    assert [(c["system"], c["code"]) for c in sr["reasonCode"][0]["coding"]] == [
        ("http://hl7.org/fhir/sid/icd-10", "I11.9"),
        ("http://hutong.dev/CodeSystem/desheng-chc/diagnosis", "YTZ-77"),
    ]

    # the replayed item cannot be replayed again; the second copy of the form is now a
    # duplicate of what was sent: still held, with that new reason
    assert replay_api(chc, item["id"]) == (False, f"item {item['id']} is replayed, not held")
    ok, text = replay_api(chc, other["id"])
    assert not ok and text.startswith("HT-LOCAL-DUPLICATE: ")
    assert f"already sent as ZZ_SQD#{first}" in text
    (still,) = item_for(chc, f"ZZ_SQD#{second}")
    assert still["id"] == other["id"]
    assert still["replay_result"].startswith("HT-LOCAL-DUPLICATE: record ZZ_SQD#")
    barrier(chc_db, core_db, 3)
    assert len(received(core_db, s.slip_no)) == 1  # sent once
    tries = [o for o, _ in replayed_audit(chc)]
    assert tries == ["4", "0", "4"]
    assert chc.cli("audit", "verify").returncode == 0


def test_db_row_corrected_by_the_his_or_deleted(db_site: Any) -> None:
    a, chc_db, core_db, diagnosis_csv = db_site
    chc = a.node("desheng-chc")
    fixed = slip(10)
    bad_date = chc_db.write_referral(fixed, CSRQ="19501340")
    gone = slip(11, diagnosis_code="YTZ-78", diagnosis_name="高血压性心脏病(复诊)")
    deleted = chc_db.write_referral(gone)
    barrier(chc_db, core_db, 12)
    (date_item,) = item_for(chc, f"ZZ_SQD#{bad_date}")
    (gone_item,) = item_for(chc, f"ZZ_SQD#{deleted}")
    assert date_item["code"] == "HT-MAP-FIELD" and "field CSRQ" in date_item["message"]
    assert gone_item["code"] == "HT-LOCAL-CODE" and "field ZDDM" in gone_item["message"]

    # the HIS corrects the birth date in place: the replay reads the row again
    with chc_db.tx() as conn:
        conn.execute(update(ZZ_SQD).where(ZZ_SQD.c.ID == bad_date).values(CSRQ="19500315"))
    assert replay_api(chc, date_item["id"]) == (
        True,
        f"ZZ_SQD#{bad_date} taken (row re-read from the HIS)",
    )
    got = wait_for(lambda: received(core_db, fixed.slip_no), timeout=60, what="corrected row")
    assert [asdict(x) for x in got] == [asdict(as_received(fixed))]

    # the HIS deleted the other row; IT maps its code: the kept copy goes
    (raw,) = [q.raw for q in quarantined(chc) if q.id == gone_item["id"]]
    kept = orjson.loads(raw)  # the vendor columns, and the table they came from
    assert (kept["@table"], kept["ID"], kept["ZDDM"]) == ("ZZ_SQD", deleted, "YTZ-78")
    with chc_db.tx() as conn:
        conn.execute(delete(ZZ_SQD).where(ZZ_SQD.c.ID == deleted))
    add_mapping(diagnosis_csv, "YTZ-78")
    assert replay_api(chc, gone_item["id"]) == (
        True,
        f"ZZ_SQD#{deleted} taken (kept copy: the row is gone from the HIS)",
    )
    got = wait_for(lambda: received(core_db, gone.slip_no), timeout=60, what="kept row")
    assert [asdict(x) for x in got] == [
        asdict(replace(as_received(gone), diagnosis_code="FXZD0102"))
    ]

    # a return slip's head row deleted: its drug and lab lines went with it and are not kept,
    # so the replay refuses rather than send a return slip without them
    ret = chc_db.write_return(return_slip(slip_no="DSZZ-NO-SUCH"))  # no such referral: held
    (ret_item,) = wait_for(
        lambda: item_for(chc, f"ZZ_ZHD#{ret}") or None, timeout=60, what="the return row held"
    )
    with chc_db.tx() as conn:
        conn.execute(delete(ZZ_ZHD_YP).where(ZZ_ZHD_YP.c.ZHD_ID == ret))
        conn.execute(delete(ZZ_ZHD_JY).where(ZZ_ZHD_JY.c.ZHD_ID == ret))
        conn.execute(delete(ZZ_ZHD).where(ZZ_ZHD.c.ID == ret))
    ok, text = replay_api(chc, ret_item["id"])
    assert not ok and text == (
        f"HT-LOCAL-REPLAY: ZZ_ZHD#{ret} is gone from the HIS and a return slip's drug and lab "
        "lines are not kept: enter it again in the HIS"
    )
    (still,) = item_for(chc, f"ZZ_ZHD#{ret}")
    assert still["id"] == ret_item["id"]
    assert chc.cli("audit", "verify").returncode == 0


def test_db_row_quarantined_twice_is_sent_once(
    db_site: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after a row's quarantine commit, before the watermark moved: the restarted node
    reads the row again and quarantines it again. Both items replay; the row goes once."""
    a, chc_db, core_db, diagnosis_csv = db_site
    chc = a.node("desheng-chc")
    chc.stop()
    monkeypatch.setenv("HUTONG_FAULT", "his_db.after_quarantine")
    chc.start()
    chc.wait_ready()
    monkeypatch.delenv("HUTONG_FAULT")
    s = slip(20, diagnosis_code="YTZ-79", diagnosis_name="高血压性心脏病(复诊)")
    rid = chc_db.write_referral(s)
    wait_for(lambda: chc.proc is not None and chc.proc.poll() is not None, what="the kill")
    assert chc.proc.returncode == -signal.SIGKILL
    chc.start()
    chc.wait_ready()
    wait_for(lambda: len(item_for(chc, f"ZZ_SQD#{rid}")) == 2, what="the second quarantine")
    one, two = item_for(chc, f"ZZ_SQD#{rid}")
    add_mapping(diagnosis_csv, "YTZ-79")
    assert replay_api(chc, one["id"]) == (True, f"ZZ_SQD#{rid} taken (row re-read from the HIS)")
    assert replay_api(chc, two["id"]) == (True, f"ZZ_SQD#{rid} was already taken")
    assert item_for(chc, f"ZZ_SQD#{rid}") == []
    assert [q["id"] for q in item_for(chc, f"ZZ_SQD#{rid}", "replayed")] == [one["id"], two["id"]]
    barrier(chc_db, core_db, 21)
    got = received(core_db, s.slip_no)
    assert [asdict(x) for x in got] == [asdict(replace(as_received(s), diagnosis_code="FXZD0102"))]
    assert chc.cli("audit", "verify").returncode == 0


# -- XML web service -------------------------------------------------------------------------------

WS_KINDS = ["referral.request", "referral.status", "referral.cancel", "referral.return"]
WS_MEMBERS = [
    ("fuxing", "复兴医院", "Fuxing Hospital", "core"),
    ("yuetan-chc", "月坛社区卫生服务中心", "Yuetan CHC", "community"),
]


@pytest.fixture(scope="module")
def ws_site(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("his-ws-replay")
    chc_maps = root / "mappings" / "yuetan-chc"
    shutil.copytree(ROOT / "mappings" / "yuetan-chc", chc_maps)
    maps = {"fuxing": ROOT / "mappings" / "fuxing", "yuetan-chc": chc_maps}
    sims = {
        m[0]: HisWsProcess(root / f"his-{m[0]}.sqlite", m[0], site_name=m[1]) for m in WS_MEMBERS
    }
    members = [
        {
            "id": i,
            "zh": zh,
            "en": en,
            "role": role,
            "adapters": [
                {
                    "name": "his",
                    "type": "his-xml-ws",
                    "mappings": str(maps[i]),
                    "receives": ["referral.*"],
                    "options": {
                        "url": sims[i].url,
                        "poll_s": 0.2,
                        "timeout_s": 5.0,
                        "site_name": zh,
                    },
                }
            ],
        }
        for i, zh, en, role in WS_MEMBERS
    ]
    rules = [
        {"from": "fuxing", "to": "yuetan-chc", "kinds": WS_KINDS},
        {"from": "yuetan-chc", "to": "fuxing", "kinds": WS_KINDS},
    ]
    alliance: Alliance | None = None
    try:
        for sim in sims.values():
            sim.start()
        alliance = Alliance(root / "alliance", members, rules)
        alliance.start("fuxing", "yuetan-chc")
        yield (
            alliance,
            sims["yuetan-chc"].his,
            sims["fuxing"].his,
            chc_maps / "codes" / "diagnosis.csv",
        )
    finally:
        if alliance is not None:
            alliance.stop_all()
        for sim in sims.values():
            sim.stop()


def ws_arrived(his: Any, slip_no: str) -> list[Any]:
    return [d for d in his.received("referral") if d.slip.slip_no == slip_no]


def test_ws_unknown_code_replayed_after_the_mapping_fix(ws_site: Any) -> None:
    a, chc_his, core_his, diagnosis_csv = ws_site
    chc = a.node("yuetan-chc")
    written = referral_slip(
        slip_no="YTZZ-RP-1", diagnosis_code="YTZ-77", diagnosis_name="高血压性心脏病(复诊)"
    )
    doc = "YT-RP-000001"
    chc_his.write_referral(written, doc_id=doc)
    chc_his.write_referral(written, doc_id=doc)  # offered again (the HIS lost our ack)
    chc_his.write_referral(replace(written, phone="13011112222"), doc_id=doc)  # then edited
    after = referral_slip(slip_no="YTZZ-RP-AFTER")
    chc_his.write_referral(after)
    wait_for(lambda: ws_arrived(core_his, after.slip_no), timeout=60, what="the good document")
    wait_for(lambda: chc_his.pending() == [], timeout=30, what="every document acked")
    items = item_for(chc, doc)
    assert len(items) == 3
    xpath = (
        "/ClinicalDocument/component/structuredBody/component[3]/section/entry/"
        "observation/value/@code"
    )
    for q in items:
        assert q["code"] == "HT-WS-CODE" and f"record {doc} field {xpath}:" in q["message"]
        assert "YTZ-77" in q["message"] and written.patient_name not in q["message"]
    first, again, edited = items
    assert not ws_arrived(core_his, written.slip_no)

    # replayed before the fix: still refused, still held, not quarantined a second time
    res = chc.api("POST", f"/local/v1/quarantine/{first['id']}/replay")
    assert res["ok"] is False and res["result"].startswith(f"HT-WS-CODE: record {doc} field")
    assert [q["id"] for q in item_for(chc, doc)] == [q["id"] for q in items]

    # IT adds the code to the site's map; the command-line replay sends the document
    add_mapping(diagnosis_csv, "YTZ-77")
    code, text = replay_cli(chc, first["id"])
    assert code == 0 and f"replayed: document {doc} (referral) taken" in text, text
    got = wait_for(
        lambda: ws_arrived(core_his, written.slip_no),
        timeout=60,
        what="the replayed document in the core's HIS",
    )
    assert [asdict(d.slip) for d in got] == [
        asdict(replace(written, id_number="", diagnosis_code="FXZD0102", department_code="0200"))
    ]
    assert got[0].custodian == "yuetan-chc"

    # the second copy of the same document: taken already, nothing sent again
    assert replay_api(chc, again["id"]) == (True, f"document {doc} (referral) was already taken")
    # the edited copy under the same id is now a duplicate with other content: held
    code, text = replay_cli(chc, edited["id"])
    assert (
        code == 1
        and f"still refused: HT-WS-DUPLICATE: record {doc} field /ClinicalDocument/id/@extension"
        in text
    ), text
    (still,) = item_for(chc, doc)
    assert still["id"] == edited["id"] and still["replay_result"].startswith("HT-WS-DUPLICATE")
    # counted at the receiving HIS, behind a document that arrived later
    later = referral_slip(slip_no="YTZZ-RP-LATER")
    chc_his.write_referral(later)
    wait_for(lambda: ws_arrived(core_his, later.slip_no), timeout=60, what="a later document")
    (once,) = ws_arrived(core_his, written.slip_no)
    assert core_his.deliveries(once.doc_id) == 1
    assert [o for o, _ in replayed_audit(chc)] == ["4", "0", "0", "4"]
    assert chc.cli("audit", "verify").returncode == 0
