"""Visit events from the intermediate-database HIS (``ZZ_JZJL``) -> FHIR Encounter + Patient.

Real node processes and vendor databases, as ``tests/test_his_db.py``: the core hospital's HIS
writes admission, transfer, discharge and cancel rows; the node's ``/fhir`` API must show one
Encounter per visit number with its history, field by field against the rows. A referred
patient's admission (the row carries the referral's slip number, and the core's options say
which column that is) links the referral's Task and ServiceRequest to the Encounter.
"""

from __future__ import annotations

import signal
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from adapters.slips import AcceptanceSlip
from adapters.visits import Visit
from bridge.store.db import Store
from bridge.store.tables import QUARANTINE
from simulators.his_db import ZZ_JZJL, HisDb
from tests.harness import Alliance, NodeProcess, db_rows, wait_for
from tests.test_his_db import RULES, site_folder, slip

pytestmark = pytest.mark.slow

VISITS = "urn:hutong:visit:fuxing"
MRN = "urn:hutong:mrn:fuxing"
SHARED_DEPT = "http://hutong.dev/CodeSystem/xicheng-alliance/department"
LOCAL_DEPT = "http://hutong.dev/CodeSystem/fuxing/department"


def make_alliance(root: Path, chc_dsn: str, core_dsn: str) -> Alliance:
    chc_maps = site_folder(
        root / "mappings",
        "desheng-chc",
        "yuetan-chc",
        {"department": ["KS20,转诊·心血管内科,03.04,心血管内科专业,equivalent,"]},
    )
    core_maps = site_folder(root / "mappings", "fuxing", "fuxing", {})
    members = [
        {
            "id": "fuxing",
            "zh": "复兴医院",
            "en": "Fuxing Hospital",
            "role": "core",
            "adapters": [
                {
                    "name": "his",
                    "type": "his-middle-db",
                    "mappings": str(core_maps),
                    "receives": ["referral.*"],
                    "options": {
                        "dsn": core_dsn,
                        "poll_every_s": 0.3,
                        "visit_referral_column": "ZZDH",
                    },
                }
            ],
        },
        {
            "id": "desheng-chc",
            "zh": "德胜社区卫生服务中心",
            "en": "Desheng CHC",
            "role": "community",
            "adapters": [
                {
                    "name": "his",
                    "type": "his-middle-db",
                    "mappings": str(chc_maps),
                    "receives": ["referral.*"],
                    "options": {"dsn": chc_dsn, "poll_every_s": 0.3},
                }
            ],
        },
    ]
    return Alliance(root / "alliance", members, RULES)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("hisdb-visits")
    chc_db = HisDb(f"sqlite:///{root / 'desheng-his.db'}").init()
    core_db = HisDb(f"sqlite:///{root / 'fuxing-his.db'}").init()
    a = make_alliance(root, chc_db.dsn, core_db.dsn)
    a.start("fuxing", "desheng-chc")
    yield a, chc_db, core_db
    a.stop_all()
    chc_db.close()
    core_db.close()


def visit(no: str, event: str = "admit", **kw: Any) -> Visit:
    """An event of visit ``no``; each visit number is its own patient (record number and ID)."""
    person = int("".join(c for c in no if c.isdigit()))
    base = Visit(
        visit_no=no,
        event=event,
        visit_class="inpatient",
        mrn=f"FX{no}",
        patient_name="王秀英",
        gender="female",
        birth_date="1950-03-15",
        admitted_at="2026-11-21T10:00:00+08:00",
        id_number=f"110102195003{person:06d}",
        phone="13901234567",
        department_code="0301",
        ward="心内科一病区",
        bed="12床",
        doctor="张主任",
        recorded_at="2026-11-21T10:05:00+08:00",
    )
    return replace(base, **kw)


def encounters(node: NodeProcess, visit_no: str) -> list[dict[str, Any]]:
    found = node.api("GET", f"/fhir/Encounter?identifier={VISITS}|{visit_no}", role="clinician")
    return [e["resource"] for e in found.get("entry") or []]


def encounter_when(node: NodeProcess, visit_no: str, cond: Any, what: str) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        found = encounters(node, visit_no)
        assert len(found) <= 1, f"{len(found)} Encounters for visit {visit_no}"
        return found[0] if found and cond(found[0]) else None

    return wait_for(ready, what=what)


def version(enc: dict[str, Any]) -> int:
    return int(enc["meta"]["versionId"])


def location_history(enc: dict[str, Any]) -> list[tuple[str, str, str, str | None]]:
    return [
        (
            loc["location"]["display"],
            loc["status"],
            loc["period"]["start"],
            loc["period"].get("end"),
        )
        for loc in enc.get("location") or []
    ]


def quarantined(node: NodeProcess) -> list[Any]:
    s = Store(node.plan.storage_dsn)
    try:
        with s.read() as conn:
            return conn.execute(
                select(QUARANTINE).where(QUARANTINE.c.source == "adapter:his")
            ).all()
    finally:
        s.dispose()


def held(node: NodeProcess, *row_ids: int) -> list[Any]:
    """Quarantined items of these ``ZZ_JZJL`` rows (other tests' rows may be held too)."""
    return [
        q
        for q in quarantined(node)
        if any(q.message.startswith(f"record ZZ_JZJL#{rid} ") for rid in row_ids)
    ]


def encounter_audits(node: NodeProcess, enc_id: str) -> int:
    """Audit records of the Encounter being created or moved on."""
    return len(
        db_rows(
            node,
            "SELECT seq FROM audit WHERE action = 'encounter' AND resource LIKE :ref",
            ref=f"%Encounter/{enc_id}%",
        )
    )


def test_admit_transfer_discharge_one_encounter_with_history(site: Any) -> None:
    a, _chc_db, core_db = site
    core = a.node("fuxing")
    admit = visit("ZY0001")
    rows = [core_db.write_visit(admit)]
    enc = encounter_when(core, "ZY0001", lambda e: e["status"] == "in-progress", "admission")
    moved = visit(
        "ZY0001",
        "transfer",
        ward="心内科CCU",
        bed="3床",
        transferred_at="2026-11-22T08:30:00+08:00",
        recorded_at="2026-11-22T08:31:00+08:00",
    )
    rows.append(core_db.write_visit(moved))
    enc = encounter_when(core, "ZY0001", lambda e: len(e.get("location") or []) == 2, "transfer")
    assert enc["status"] == "in-progress"
    out = visit(
        "ZY0001",
        "discharge",
        ward="心内科CCU",
        bed="3床",
        transferred_at="2026-11-22T08:30:00+08:00",
        discharged_at="2026-11-25T09:15:00+08:00",
        status="finished",
    )
    rows.append(core_db.write_visit(out))
    enc = encounter_when(core, "ZY0001", lambda e: e["status"] == "finished", "discharge")
    # field by field against the three rows
    assert enc["identifier"][0]["system"] == VISITS and enc["identifier"][0]["value"] == "ZY0001"
    assert enc["class"]["code"] == "IMP"
    assert enc["period"] == {
        "start": "2026-11-21T10:00:00+08:00",
        "end": "2026-11-25T09:15:00+08:00",
    }
    assert location_history(enc) == [
        (
            "心内科一病区 12床",
            "completed",
            "2026-11-21T10:00:00+08:00",
            "2026-11-22T08:30:00+08:00",
        ),
        ("心内科CCU 3床", "completed", "2026-11-22T08:30:00+08:00", "2026-11-25T09:15:00+08:00"),
    ]
    assert enc["statusHistory"] == [
        {
            "status": "in-progress",
            "period": {"start": "2026-11-21T10:00:00+08:00", "end": "2026-11-25T09:15:00+08:00"},
        }
    ]
    assert {(c["system"], c["code"]) for c in enc["serviceType"]["coding"]} == {
        (SHARED_DEPT, "03.04"),
        (LOCAL_DEPT, "0301"),
    }
    assert enc["participant"][0]["individual"]["display"] == "张主任"
    assert version(enc) == 3  # one version per row
    # readable by id, and by patient; the Patient as the rows describe it
    assert core.api("GET", f"/fhir/Encounter/{enc['id']}", role="clinician") == enc
    pid = enc["subject"]["reference"].split("/", 1)[1]
    by_patient = core.api("GET", f"/fhir/Encounter?patient={pid}", role="clinician")
    assert [e["resource"]["id"] for e in by_patient["entry"]] == [enc["id"]]
    patient = core.api("GET", f"/fhir/Patient/{pid}", role="clinician")
    assert patient["name"] == [{"text": "王秀英"}]  # the CHAR padding (U+3000) stripped
    assert patient["gender"] == "female" and patient["birthDate"] == "1950-03-15"
    assert {"system": MRN, "value": "FXZY0001"} in patient["identifier"]
    assert patient["telecom"][0]["value"] == "13901234567"
    stored = core_db.visit_rows("ZY0001")
    assert [r["SJLX"] for r in stored] == ["1", "2", "3"] and stored[1]["BQMC"] == "心内科CCU"
    assert held(core, *rows) == []


def test_cancels_undo_their_event(site: Any) -> None:
    a, _chc_db, core_db = site
    core = a.node("fuxing")
    # an outpatient registration, then 退号: cancelled
    reg = visit(
        "MZ0002",
        "register",
        visit_class="outpatient",
        ward="",
        bed="",
        status="arrived",
        admitted_at="2026-11-21T08:00:00+08:00",
    )
    core_db.write_visit(reg)
    encounter_when(core, "MZ0002", lambda e: e["status"] == "arrived", "registration")
    core_db.write_visit(
        replace(
            reg, event="cancel-admit", status="cancelled", recorded_at="2026-11-21T08:20:00+08:00"
        )
    )
    enc = encounter_when(core, "MZ0002", lambda e: e["status"] == "cancelled", "退号")
    assert enc["class"]["code"] == "AMB"
    assert enc["statusHistory"] == [
        {
            "status": "arrived",
            "period": {"start": "2026-11-21T08:00:00+08:00", "end": "2026-11-21T08:20:00+08:00"},
        }
    ]
    # an admission, a transfer cancelled, a discharge cancelled (召回)
    core_db.write_visit(visit("ZY0003"))
    core_db.write_visit(
        visit(
            "ZY0003",
            "transfer",
            ward="神经内科病区",
            bed="8床",
            transferred_at="2026-11-22T09:00:00+08:00",
        )
    )
    encounter_when(core, "ZY0003", lambda e: len(e.get("location") or []) == 2, "transfer")
    core_db.write_visit(visit("ZY0003", "cancel-transfer", recorded_at="2026-11-22T09:30:00+08:00"))
    enc = encounter_when(
        core, "ZY0003", lambda e: len(e.get("location") or []) == 1, "cancelled transfer"
    )
    assert location_history(enc) == [
        ("心内科一病区 12床", "active", "2026-11-21T10:00:00+08:00", None)
    ]
    core_db.write_visit(visit("ZY0003", "discharge", discharged_at="2026-11-24T10:00:00+08:00"))
    encounter_when(core, "ZY0003", lambda e: e["status"] == "finished", "discharge")
    core_db.write_visit(
        visit(
            "ZY0003",
            "cancel-discharge",  # the old time left in the row
            discharged_at="2026-11-24T10:00:00+08:00",
            recorded_at="2026-11-24T11:00:00+08:00",
        )
    )
    enc = encounter_when(
        core,
        "ZY0003",
        lambda e: e["status"] == "in-progress" and version(e) == 5,
        "cancelled discharge",
    )
    assert "end" not in enc["period"]
    assert location_history(enc) == [
        ("心内科一病区 12床", "active", "2026-11-21T10:00:00+08:00", None)
    ]
    assert [h["status"] for h in enc["statusHistory"]] == ["in-progress", "finished"]


def test_update_changes_class_and_details(site: Any) -> None:
    """An emergency visit the HIS turns into an admission (急诊转住院) by an update row."""
    a, _chc_db, core_db = site
    core = a.node("fuxing")
    er = visit(
        "JZ0006",
        visit_class="emergency",
        department_code="0300",
        ward="急诊留观",
        bed="5床",
        doctor="刘医生",
    )
    core_db.write_visit(er)
    encounter_when(core, "JZ0006", lambda e: e["status"] == "in-progress", "emergency visit")
    core_db.write_visit(
        replace(
            er,
            event="update",
            visit_class="inpatient",
            status="in-progress",
            department_code="0301",
            phone="13800000006",
            recorded_at="2026-11-21T16:00:00+08:00",
        )
    )
    enc = encounter_when(core, "JZ0006", lambda e: e["class"]["code"] == "IMP", "the update")
    assert enc["classHistory"] == [
        {
            "class": {
                "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                "code": "EMER",
                "display": "emergency",
            },
            "period": {"start": "2026-11-21T10:00:00+08:00", "end": "2026-11-21T16:00:00+08:00"},
        }
    ]
    assert enc["status"] == "in-progress" and "statusHistory" not in enc
    assert (LOCAL_DEPT, "0301") in {(c["system"], c["code"]) for c in enc["serviceType"]["coding"]}
    assert location_history(enc) == [("急诊留观 5床", "active", "2026-11-21T10:00:00+08:00", None)]
    patient = core.api("GET", f"/fhir/{enc['subject']['reference']}", role="clinician")
    assert patient["telecom"][0]["value"] == "13800000006"


def test_referred_patient_admitted_and_discharged(site: Any) -> None:
    a, chc_db, core_db = site
    chc, core = a.node("desheng-chc"), a.node("fuxing")
    s = slip(7001)
    chc_db.write_referral(s)
    wait_for(
        lambda: [r for r in core_db.received_referrals() if r.slip_no == s.slip_no],
        what="referral in the core's HIS",
    )
    core_db.accept(
        AcceptanceSlip(
            slip_no=s.slip_no,
            accepted=True,
            appointment_at="2026-11-21T10:00:00+08:00",
            department_code="0301",
            bed_no="心内科 12床",
            doctor="张主任",
        )
    )
    row = wait_for(
        lambda: next(
            (
                r
                for r in core.api("GET", "/local/v1/referrals")
                if r["side"] == "receiver" and r["status"] == "accepted"
            ),
            None,
        ),
        what="accepted",
    )
    # the clerk copies the received slip number into the admission (the option names ZZDH)
    rows = [core_db.write_visit(visit("ZY7001", referral_no=s.slip_no, id_number=s.id_number))]
    enc = encounter_when(core, "ZY7001", lambda e: e["status"] == "in-progress", "admission")
    eref = {"reference": f"Encounter/{enc['id']}"}
    assert enc["basedOn"] == [{"reference": f"ServiceRequest/{row['sr_id']}"}]
    task = wait_for(
        lambda: (
            (t := core.api("GET", f"/fhir/Task/{row['task_id']}", role="clinician"))["status"]
            == "in-progress"
            and t
        ),
        what="the Task in progress",
    )
    assert task["encounter"] == eref
    sr = core.api("GET", f"/fhir/ServiceRequest/{row['sr_id']}", role="clinician")
    assert eref in sr["supportingInfo"]
    # the referrer's node hears of the arrival (the receiver's arrive step)
    wait_for(
        lambda: any(
            r["thread"] == row["thread"] and r["status"] == "in-progress"
            for r in chc.api("GET", "/local/v1/referrals")
        ),
        what="arrival at chc",
    )
    # the discharge row need not carry the slip number: the Encounter stays on the referral
    rows.append(
        core_db.write_visit(visit("ZY7001", "discharge", discharged_at="2026-11-25T10:00:00+08:00"))
    )
    enc = encounter_when(core, "ZY7001", lambda e: e["status"] == "finished", "discharge")
    assert enc["basedOn"] == [{"reference": f"ServiceRequest/{row['sr_id']}"}]
    task = core.api("GET", f"/fhir/Task/{row['task_id']}", role="clinician")
    assert task["encounter"] == eref
    assert held(core, *rows) == []


def test_repolled_row_is_stored_once(site: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The node is killed after a row's commit, before its watermark is saved: the row is read
    again after the restart and changes nothing."""
    a, _chc_db, core_db = site
    core = a.node("fuxing")
    core.stop()
    monkeypatch.setenv("HUTONG_FAULT", "his_db.after_submit")
    core.start()
    core.wait_ready()
    monkeypatch.delenv("HUTONG_FAULT")
    core_db.write_visit(visit("ZY0004"))
    wait_for(lambda: core.proc is not None and core.proc.poll() is not None, what="the kill")
    assert core.proc.returncode == -signal.SIGKILL
    core.start()
    core.wait_ready()
    core_db.write_visit(visit("ZY0005"))  # a later row: the round after the re-read one
    encounter_when(core, "ZY0005", lambda e: True, "the next row")
    enc = encounter_when(core, "ZY0004", lambda e: True, "the re-read row")
    assert version(enc) == 1
    assert encounter_audits(core, enc["id"]) == 1


BAD = [  # (event, vendor column overrides, error code, column named)
    ("admit", {"SJLX": "X"}, "HT-MAP-FIELD", "SJLX"),
    ("admit", {"RYSJ": "20261321100000"}, "HT-MAP-FIELD", "RYSJ"),
    ("discharge", {"ZT": "1"}, "HT-LOCAL-VALUE", "ZT"),
    ("transfer", {"ZKSJ": ""}, "HT-LOCAL-MISSING", "ZKSJ"),
    ("discharge", {"CYSJ": "20261120090000"}, "HT-LOCAL-DATE", "CYSJ"),
    ("admit", {"BQMC": "病区".encode()[:-1]}, "HT-LOCAL-ENCODING", "BQMC"),
    ("admit", {"ZZDH": "NO-SUCH-SLIP"}, "HT-REF-UNKNOWN", "ZZDH"),
    ("admit", {"BLH": ""}, "HT-MAP-FIELD", "BLH"),
    ("cancel-admit", {}, "HT-REF-UNKNOWN", "JZH"),  # a cancel of a visit never seen
    ("transfer", {"JZH": "ZY0990"}, "HT-VISIT-CONFLICT", "JZH"),  # another patient's visit
]


def test_bad_rows_quarantined_naming_column_and_next_taken(site: Any) -> None:
    a, _chc_db, core_db = site
    core = a.node("fuxing")
    core_db.write_visit(visit("ZY0990"))
    encounter_when(core, "ZY0990", lambda e: True, "the visit another row's number names")
    ids = []
    for n, (event, cols, _, _) in enumerate(BAD):
        extra = (
            {"discharged_at": "2026-11-25T10:00:00+08:00"}
            if event == "discharge"
            else {"transferred_at": "2026-11-22T10:00:00+08:00"}
            if event == "transfer"
            else {}
        )
        ids.append(core_db.write_visit(visit(f"ZY09{n:02d}", event, **extra), **cols))
    core_db.write_visit(visit("ZY0999"))
    encounter_when(core, "ZY0999", lambda e: True, "the good row after the bad ones")
    rows = {r.message.split(":")[0]: r for r in quarantined(core)}
    for rid, (_, _, code, col) in zip(ids, BAD, strict=True):
        q = rows.get(f"record ZZ_JZJL#{rid} field {col}")
        assert q is not None, (rid, col, list(rows))
        assert q.code == code and q.kind == "his-db.visit"
        assert "王秀英" not in q.message and "110102195003" not in q.message
    for n in range(len(BAD)):
        assert encounters(core, f"ZY09{n:02d}") == []
    assert version(encounters(core, "ZY0990")[0]) == 1  # the conflicting row changed nothing
    export = core.cli("audit", "export", "--format", "ndjson").stdout
    for rid, (_, _, _, col) in zip(ids, BAD, strict=True):
        assert f"record ZZ_JZJL#{rid} field {col}" in export
    assert core.cli("audit", "verify").returncode == 0


def test_quarantined_row_replayed_after_the_his_fixed_it(site: Any) -> None:
    a, _chc_db, core_db = site
    core = a.node("fuxing")
    rid = core_db.write_visit(visit("ZY0600"), BLH="")  # saved without the record number
    core_db.write_visit(visit("ZY0601"))
    encounter_when(core, "ZY0601", lambda e: True, "the row after the bad one")
    item = next(
        q
        for q in core.api("GET", "/local/v1/quarantine")
        if f"record ZZ_JZJL#{rid} field BLH:" in q["message"]
    )
    # replayed before the HIS fixed the row: still refused, still held
    res = core.api("POST", f"/local/v1/quarantine/{item['id']}/replay")
    assert not res["ok"] and f"record ZZ_JZJL#{rid} field BLH" in res["result"]
    with core_db.tx() as conn:
        conn.execute(update(ZZ_JZJL).where(ZZ_JZJL.c.ID == rid).values(BLH="FXZY0600"))
    res = core.api("POST", f"/local/v1/quarantine/{item['id']}/replay")
    assert res["ok"] and res["result"] == f"ZZ_JZJL#{rid} taken (row re-read from the HIS)"
    enc = encounter_when(core, "ZY0600", lambda e: True, "the replayed row")
    patient = core.api("GET", f"/fhir/{enc['subject']['reference']}", role="clinician")
    assert {"system": MRN, "value": "FXZY0600"} in patient["identifier"]
    assert enc["status"] == "in-progress" and version(enc) == 1


@pytest.mark.postgres
def test_visits_from_postgresql(tmp_path: Path, pg_db: str) -> None:
    core_db = HisDb(pg_db).init()
    chc_db = HisDb(f"sqlite:///{tmp_path / 'desheng-his.db'}").init()
    a = make_alliance(tmp_path, chc_db.dsn, pg_db)
    try:
        a.start("fuxing", "desheng-chc")
        core = a.node("fuxing")
        early = core_db.allocate_id("ZZ_JZJL")  # an admission form opened first, saved last
        core_db.write_visit(visit("ZY0101"))
        core_db.write_visit(visit("ZY0102"), CSRQ="19501340")  # no 13th month
        core_db.write_visit(
            visit(
                "ZY0101",
                "transfer",
                ward="心内科CCU",
                bed="3床",
                transferred_at="2026-11-22T08:30:00+08:00",
            )
        )
        encounter_when(core, "ZY0101", lambda e: version(e) == 2, "transfer row")
        core_db.write_visit(visit("ZY0103", mrn="FX0103"), row_id=early)
        core_db.write_visit(
            visit(
                "ZY0101",
                "discharge",
                ward="心内科CCU",
                bed="3床",
                discharged_at="2026-11-25T09:15:00+08:00",
            )
        )
        enc = encounter_when(
            core,
            "ZY0101",
            lambda e: e["status"] == "finished" and version(e) == 3,
            "discharge from PostgreSQL",
        )
        assert enc["period"] == {
            "start": "2026-11-21T10:00:00+08:00",
            "end": "2026-11-25T09:15:00+08:00",
        }
        assert [x[0] for x in location_history(enc)] == ["心内科一病区 12床", "心内科CCU 3床"]
        late = encounter_when(core, "ZY0103", lambda e: True, "the late-committed row")
        assert late["status"] == "in-progress" and late["id"] != enc["id"]
        q = quarantined(core)
        assert (
            len(q) == 1
            and q[0].message.startswith("record ZZ_JZJL#")
            and "field CSRQ" in q[0].message
        )
        assert encounters(core, "ZY0102") == []
    finally:
        a.stop_all()
        chc_db.close()
        core_db.close()
