"""Intermediate-database HIS style (中间库) between two real node processes and two vendor DBs.

The community centre is a member that exists only in this test (``desheng-chc``): its node file
has an ``[[adapters]]`` table of type his-middle-db and its mapping folder is written here, so
the fourth-hospital case (config and mapping files only, no code) is every test of this file.
"""

from __future__ import annotations

import shutil
import signal
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import select

from adapters.slips import AcceptanceSlip, LabResult, Prescription, ReferralSlip, ReturnSlip
from bridge.audit.tables import AuditRecord
from bridge.store.db import Store
from bridge.store.tables import INBOX, OUTBOX, QUARANTINE
from simulators.his_db import HisDb
from tests.harness import Alliance, NodeProcess, wait_for

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ROOT / "simulators" / "his_db_site" / "fields"
AUDIT = AuditRecord.__table__
KINDS = ["referral.request", "referral.status", "referral.cancel", "referral.return"]
RULES = [
    {"from": "desheng-chc", "to": "fuxing", "kinds": KINDS},
    {"from": "fuxing", "to": "desheng-chc", "kinds": KINDS},
]


def site_folder(root: Path, site: str, like: str, extra: dict[str, list[str]]) -> Path:
    """A mapping folder made from files only: another site's catalogue under this site's
    code-system URIs, plus rows, plus the vendor's field maps."""
    folder = root / site
    shutil.copytree(ROOT / "mappings" / like / "codes", folder / "codes")
    index = folder / "codes" / "maps.csv"
    index.write_text(
        index.read_text(encoding="utf-8").replace(f"/{like}/", f"/{site}/"), encoding="utf-8"
    )
    for name, rows in extra.items():
        with (folder / "codes" / f"{name}.csv").open("a", encoding="utf-8") as fh:
            fh.write("".join(r + "\n" for r in rows))
    shutil.copytree(FIELDS, folder / "fields")
    return folder


def his_adapter(mappings: Path, dsn: str) -> dict[str, Any]:
    return {
        "name": "his",
        "type": "his-middle-db",
        "mappings": str(mappings),
        "receives": ["referral.*"],
        "options": {"dsn": dsn, "poll_every_s": 0.3},
    }


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
            "adapters": [his_adapter(core_maps, core_dsn)],
        },
        {
            "id": "desheng-chc",
            "zh": "德胜社区卫生服务中心",
            "en": "Desheng CHC",
            "role": "community",
            "adapters": [his_adapter(chc_maps, chc_dsn)],
        },
    ]
    return Alliance(root / "alliance", members, RULES)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("hisdb")
    chc_db = HisDb(f"sqlite:///{root / 'desheng-his.db'}").init()
    core_db = HisDb(f"sqlite:///{root / 'fuxing-his.db'}").init()
    a = make_alliance(root, chc_db.dsn, core_db.dsn)
    a.start("fuxing", "desheng-chc")
    yield a, chc_db, core_db
    a.stop_all()
    chc_db.close()
    core_db.close()


def slip(n: int, **kw: Any) -> ReferralSlip:
    base = ReferralSlip(
        slip_no=f"DSZZ{n:06d}",
        kind="up-inpatient",
        to_member="fuxing",
        patient_name="王秀英",
        gender="female",
        birth_date="1950-03-15",
        id_number="110102195003151234",
        phone="13901234567",
        mrn="DS0001",
        diagnosis_code="YTZ-01",
        diagnosis_name="原发性高血压",
        reason="血压控制不佳，请专科评估",
        summary="头晕两周。\n既往高血压十年",
        department_code="KS20",
        urgent=True,
        consent_by="患者本人",
        doctor="李医生",
        written_at="2026-11-20T09:00:00+08:00",
    )
    return replace(base, **kw)


def received(db: HisDb, slip_no: str) -> list[ReferralSlip]:
    return [s for s in db.received_referrals() if s.slip_no == slip_no]


def as_received(s: ReferralSlip) -> ReferralSlip:
    """What the core's HIS must show: its own codes, no ID number."""
    return replace(s, id_number="", diagnosis_code="FXZD0101", department_code="0301")


def referrals(node: NodeProcess) -> list[dict[str, Any]]:
    return node.api("GET", "/local/v1/referrals")


def quarantined(node: NodeProcess) -> list[Any]:
    s = Store(node.plan.storage_dsn)
    try:
        with s.read() as conn:
            return conn.execute(
                select(QUARANTINE).where(QUARANTINE.c.source == "adapter:his")
            ).all()
    finally:
        s.dispose()


def test_referral_acceptance_return_field_by_field(site: Any) -> None:
    a, chc_db, core_db = site
    chc, core = a.node("desheng-chc"), a.node("fuxing")
    s = slip(1)
    chc_db.write_referral(s)
    got = wait_for(lambda: received(core_db, s.slip_no), what="referral in the core's HIS")
    assert len(got) == 1
    assert asdict(got[0]) == asdict(as_received(s))
    row = [r for r in referrals(core) if r["side"] == "receiver"]
    assert len(row) == 1 and row[0]["kind"] == "up-inpatient" and row[0]["green_channel"]
    thread = row[0]["thread"]
    # the core's HIS accepts; the centre's HIS gets the acceptance slip in its own codes
    acc = AcceptanceSlip(
        slip_no=s.slip_no,
        accepted=True,
        appointment_at="2026-11-21T10:00:00+08:00",
        department_code="0301",
        bed_no="心内科 12床",
        doctor="张主任",
    )
    core_db.accept(acc)
    got_acc = wait_for(chc_db.received_acceptances, what="acceptance in the centre's HIS")
    assert [asdict(x) for x in got_acc] == [asdict(replace(acc, department_code="KS20"))]
    # the return with prescriptions and results, drug and lab codes in the centre's catalogue
    ret = ReturnSlip(
        slip_no=s.slip_no,
        discharge=True,
        diagnosis_code="FXZD0101",
        diagnosis_name="原发性高血压",
        course="入院后调整降压方案，血压平稳",
        advice="继续氨氯地平 5mg qd，两周后社区复查",
        doctor="张主任",
        written_at="2026-11-25T09:00:00+08:00",
        prescriptions=[
            Prescription("FX-0101", "苯磺酸氨氯地平片 5mg", "5 mg", "qd", 14),
            Prescription("FX-0103", "硝苯地平控释片 30mg", "30mg", "qd", 28),
        ],
        results=[
            LabResult("FXL-GLU", "葡萄糖", "8.9", "mmol/L", "H", "3.9-6.1"),
            LabResult("FXL-CREA", "肌酐", "72", "μmol/L", "N", "44-133"),
        ],
    )
    core_db.write_return(ret)
    got_ret = wait_for(chc_db.received_returns, what="return in the centre's HIS")
    want = replace(
        ret,
        diagnosis_code="YTZ-01",
        prescriptions=[
            replace(ret.prescriptions[0], drug_code="YT2037"),
            replace(ret.prescriptions[1], drug_code="YT2111"),
        ],
        results=[
            replace(ret.results[0], item_code="3001"),
            replace(ret.results[1], item_code="3003"),
        ],
    )
    assert [asdict(x) for x in got_ret] == [asdict(want)]
    wait_for(
        lambda: all(
            r["status"] == "completed"
            for n in (chc, core)
            for r in referrals(n)
            if r["thread"] == thread
        ),
        what="completed",
    )
    assert quarantined(chc) == [] and quarantined(core) == []


def test_late_committed_row_is_sent(site: Any) -> None:
    _a, chc_db, core_db = site
    early = chc_db.allocate_id("ZZ_SQD")  # the form is opened; the row is saved later
    chc_db.write_referral(slip(101))
    chc_db.write_referral(slip(102))
    wait_for(lambda: received(core_db, "DSZZ000102"), what="the later rows")
    chc_db.write_referral(slip(100), row_id=early)
    got = wait_for(lambda: received(core_db, "DSZZ000100"), what="the late row")
    assert len(got) == 1 and asdict(got[0]) == asdict(as_received(slip(100)))


BAD = [  # (vendor column overrides, error code, column named)
    ({"HZXM": ""}, "HT-MAP-FIELD", "HZXM"),
    ({"CSRQ": "19501340"}, "HT-MAP-FIELD", "CSRQ"),
    ({"XB": "3"}, "HT-MAP-FIELD", "XB"),
    ({"ZDDM": "YTZ-999"}, "HT-LOCAL-CODE", "ZDDM"),
    ({"BLZY": "病历".encode()[:-1]}, "HT-LOCAL-ENCODING", "BLZY"),
    ({"TYR": ""}, "HT-REF-CONSENT", "TYR"),
]


def test_bad_rows_quarantined_and_next_row_goes(site: Any) -> None:
    a, chc_db, core_db = site
    chc = a.node("desheng-chc")
    with pytest.raises(UnicodeDecodeError):
        "病历".encode()[:-1].decode("gbk")
    first = chc_db.write_referral(slip(200))
    wait_for(lambda: received(core_db, "DSZZ000200"), what="the original row")
    ids = [chc_db.write_referral(slip(201 + n), **cols) for n, (cols, _, _) in enumerate(BAD)]
    dup = chc_db.write_referral(slip(200, mrn="DS-dup"))  # the same slip number again
    ok = chc_db.write_referral(slip(299))
    wait_for(lambda: received(core_db, "DSZZ000299"), what="the good row after the bad ones")
    rows = {r.message.split(":")[0]: r for r in quarantined(chc)}
    expected = [(rid, code, col) for rid, (_, code, col) in zip(ids, BAD, strict=True)]
    expected.append((dup, "HT-LOCAL-DUPLICATE", "ZZDH"))
    for rid, code, col in expected:
        q = rows.get(f"record ZZ_SQD#{rid} field {col}")
        assert q is not None, (rid, col, list(rows))
        assert q.code == code
        raw = orjson.loads(q.raw)
        assert raw["ID"] == rid
        assert "王秀英" not in q.message and "110102195003151234" not in q.message
    assert len(rows) == len(expected)
    assert first < ok
    # each is in the audit chain, and nothing of them reached the core
    export = chc.cli("audit", "export", "--format", "ndjson").stdout
    for rid, _, col in expected:
        assert f"record ZZ_SQD#{rid} field {col}" in export
    slips = {s.slip_no for s in core_db.received_referrals()}
    assert not slips & {f"DSZZ{201 + n:06d}" for n in range(len(BAD))}
    assert len(received(core_db, "DSZZ000200")) == 1
    assert chc.cli("audit", "verify").returncode == 0


def _outbox_row(node: NodeProcess, kind: str, thread: str) -> Any:
    s = Store(node.plan.storage_dsn)
    try:
        with s.read() as conn:
            return conn.execute(
                select(OUTBOX).where(OUTBOX.c.kind == kind, OUTBOX.c.thread == thread)
            ).one()
    finally:
        s.dispose()


def _inbox_row(node: NodeProcess, packet_id: str) -> Any:
    s = Store(node.plan.storage_dsn)
    try:
        with s.read() as conn:
            return conn.execute(select(INBOX).where(INBOX.c.packet_id == packet_id)).one()
    finally:
        s.dispose()


def _actions(node: NodeProcess, packet_id: str) -> list[tuple[str, str | None]]:
    s = Store(node.plan.storage_dsn)
    try:
        with s.read() as conn:
            return [
                (r.action, r.actor)
                for r in conn.execute(
                    select(AUDIT.c.action, AUDIT.c.actor)
                    .where(AUDIT.c.packet_id == packet_id)
                    .order_by(AUDIT.c.seq)
                )
            ]
    finally:
        s.dispose()


def test_resend_from_the_message_browser_reaches_the_receiving_his_once(site: Any) -> None:
    """IT resends a delivered referral three ways: from the sender's /ui/messages, with
    ``hutong messages resend`` and from the receiver's inbox (to its HIS again). The receiving
    HIS holds the referral once; each resend is audited by name and reason."""
    from tests.test_people import add_user, person

    a, chc_db, core_db = site
    chc, core = a.node("desheng-chc"), a.node("fuxing")
    s = slip(600)
    chc_db.write_referral(s)
    wait_for(lambda: received(core_db, s.slip_no), what="the referral in the core's HIS")
    thread = next(
        r["thread"]
        for r in referrals(chc)
        if r["side"] == "referrer" and r["status"] in ("requested", "received")
    )
    out = wait_for(
        lambda: (lambda r: r if r.state == "acknowledged" else None)(
            _outbox_row(chc, "referral.request", thread)
        ),
        what="the request acknowledged",
    )
    rows_before = len(core_db.received_rows())
    # 1. the sender's IT, from the page
    add_user(chc, "it.gao", "it", "高工")
    it = person(chc, "it.gao")
    status, url, _page = it.open(
        f"/ui/messages/outbox/{out.id}/resend", {"reason": "the HIS says it lost the referral"}
    )
    assert status == 200 and url.endswith(f"/ui/messages/outbox/{out.id}")
    wait_for(
        lambda: ("duplicate", None) in _actions(core, out.packet_id),
        what="the resent packet at the receiver (a duplicate)",
    )
    wait_for(
        lambda: _outbox_row(chc, "referral.request", thread).state == "acknowledged",
        what="the resent packet acknowledged again",
    )
    # 2. the same from the command line
    r = chc.cli("messages", "resend", "outbox", str(out.id), "--reason", "second try")
    assert r.returncode == 0 and "queued" in r.stdout, r.stderr
    wait_for(
        lambda: [x for x in _actions(core, out.packet_id) if x[0] == "duplicate"][1:],
        what="the second resend at the receiver",
    )
    # 3. the receiver's IT hands the inbox packet to its HIS again
    got = _inbox_row(core, out.packet_id)
    assert got.state == "delivered"
    add_user(core, "it.qian", "it", "钱工")
    it_core = person(core, "it.qian")
    status, url, _page = it_core.open(
        f"/ui/messages/inbox/{got.id}/resend", {"reason": "HIS restored from backup"}
    )
    assert status == 200
    wait_for(
        lambda: _inbox_row(core, out.packet_id).state != "received",
        what="the inbox packet handed over again",
    )
    again = _inbox_row(core, out.packet_id)
    assert again.state == "delivered", again.last_error
    # counted at the receiving HIS: the referral once, no other row added
    assert len(received(core_db, s.slip_no)) == 1
    assert len(core_db.received_rows()) == rows_before
    replayed = [actor for action, actor in _actions(chc, out.packet_id) if action == "replayed"]
    assert len(replayed) == 2 and replayed[0] == "user:it.gao", replayed
    assert (replayed[1] or "").startswith("cli:"), replayed  # the OS user who ran it
    assert ("replayed", "user:it.qian") in _actions(core, out.packet_id)
    assert quarantined(core) == []


@pytest.mark.parametrize("point", ["his_db.after_poll", "his_db.after_submit"])
def test_sigkill_between_poll_and_commit(
    site: Any, point: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, chc_db, core_db = site
    chc = a.node("desheng-chc")
    base = 400 if point.endswith("poll") else 500
    chc.stop()
    monkeypatch.setenv("HUTONG_FAULT", point)
    chc.start()
    chc.wait_ready()
    monkeypatch.delenv("HUTONG_FAULT")
    for n in range(3):
        chc_db.write_referral(slip(base + n))
    wait_for(lambda: chc.proc is not None and chc.proc.poll() is not None, what="the kill")
    assert chc.proc.returncode == -signal.SIGKILL
    chc.start()
    chc.wait_ready()
    names = [f"DSZZ{base + n:06d}" for n in range(3)]
    wait_for(lambda: all(received(core_db, s) for s in names), what="all three rows")
    for name in names:
        assert len(received(core_db, name)) == 1
    # exactly once at the receiving node too
    slips = [r for r in referrals(a.node("fuxing")) if r["side"] == "receiver"]
    assert len(slips) == len({r["thread"] for r in slips})
    assert len(core_db.received_rows()) == len({r["XXID"] for r in core_db.received_rows()})


@pytest.mark.postgres
def test_vendor_database_on_postgresql(tmp_path: Path, pg_db: str) -> None:
    chc_db = HisDb(pg_db).init()
    core_db = HisDb(f"sqlite:///{tmp_path / 'fuxing-his.db'}").init()
    a = make_alliance(tmp_path, pg_db, core_db.dsn)
    try:
        a.start("fuxing", "desheng-chc")
        early = chc_db.allocate_id("ZZ_SQD")
        chc_db.write_referral(slip(1))
        chc_db.write_referral(slip(2), CSRQ="1950-03-15")  # wrong date format: quarantined
        wait_for(lambda: received(core_db, "DSZZ000001"), what="referral from PostgreSQL")
        chc_db.write_referral(slip(3), row_id=early)
        got = wait_for(lambda: received(core_db, "DSZZ000003"), what="late row on PostgreSQL")
        assert asdict(got[0]) == asdict(as_received(slip(3)))
        q = quarantined(a.node("desheng-chc"))
        assert (
            len(q) == 1
            and q[0].message.startswith("record ZZ_SQD#")
            and "field CSRQ" in q[0].message
        )
        assert not received(core_db, "DSZZ000002")
    finally:
        a.stop_all()
        chc_db.close()
        core_db.close()
