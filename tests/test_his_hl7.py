"""HL7 v2 over MLLP HIS style: the his-hl7 adapter against simulated vendor HIS processes.

Pure layers first (slips <-> HL7 bytes in UTF-8 and GB18030, escapes and repeats, fixtures),
then two real node processes, each with a his-hl7 adapter and a simulated HIS process: a
referral written in the community centre's HIS reaches the core hospital's HIS, the acceptance
and the return flow back, field by field; bad data is NAKed, quarantined and audited; a HIS
that NAKs or drops gets the message again until it ACKs, once, in order.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from adapters.his_hl7 import messages
from adapters.his_hl7.errors import Hl7DataError
from adapters.hl7v2 import ack, charset
from adapters.hl7v2.errors import CharsetRefused
from adapters.hl7v2.mllp import PeerUnreachable, Timeouts, send_once
from adapters.slips import AcceptanceSlip, ReferralSlip, ReturnSlip
from simulators.his_hl7 import VendorHis
from tests.harness import ROOT, Alliance, free_port_block, wait_for
from tests.slip_samples import return_slip

FIXTURES = ROOT / "tests" / "fixtures" / "hl7" / "his"
OFFSET = timedelta(hours=8)
#: GBK/GB18030 trail byte equal to an HL7 delimiter: 億 83 7C (|), 乗 81 5C (\), 乛 81 5E (^),
#: 亊 81 7E (~); 娉 E6 B3 and 兝 83 C0 are plain two-byte characters for contrast
TRICKY = "億乗乛亊娉兝"
HEADER = messages.Header("YTHIS", "yuetan-his", "HUTONG", "yuetan-chc", "UNICODE UTF-8")


def slip(**kw: Any) -> ReferralSlip:
    base = ReferralSlip(
        slip_no="YTZZ20261120001",
        kind="up-inpatient",
        to_member="fuxing",
        patient_name="王秀英",
        gender="female",
        birth_date="1950-03-15",
        id_number="110102195003151234",
        phone="13901234567",
        mrn="YT0001",
        diagnosis_code="YTZ-01",
        diagnosis_name="原发性高血压",
        reason="血压控制不佳 160/100|加量无效",
        summary="头晕两周。\n既往高血压十年 & 糖尿病 ^_^ ~",
        department_code="KS01",
        urgent=True,
        consent_by="患者本人",
        doctor="李医生",
        written_at="2026-11-20T09:00:00+08:00",
    )
    return replace(base, **kw)


def back_slip(**kw: Any) -> ReturnSlip:
    """The shared sample with a two-line course (NTE repeats)."""
    return return_slip(**{"course": "入院后调整降压方案，血压平稳\n住院 5 天", **kw})


def referral_bytes(s: ReferralSlip, codec_name: str, control: str = "MSG0001") -> bytes:
    h = replace(HEADER, charset=codec_name)
    text = messages.referral_message(h, s, control, datetime(2026, 11, 20, 1, 0, tzinfo=UTC))
    return charset.encode(text, codec_name)


def read_referral(raw: bytes) -> ReferralSlip:
    inbound = messages.read(*charset.decode(raw))
    assert inbound.what == "referral"
    return messages.referral_slip(inbound.msg, {}, OFFSET)


# -- (b) character sets --------------------------------------------------------------------------


@pytest.mark.parametrize("declared", ["UNICODE UTF-8", "GB 18030-2000", "GBK"])
def test_chinese_names_survive_each_charset(declared: str) -> None:
    s = slip(patient_name=f"王{TRICKY}", doctor=f"李{TRICKY}", diagnosis_name=TRICKY)
    raw = referral_bytes(s, declared)
    if declared != "UNICODE UTF-8":  # the delimiter bytes really are inside the names
        for b in (b"\x83\x7c", b"\x81\x5c", b"\x81\x5e", b"\x81\x7e"):
            assert b in raw
    got = read_referral(raw)
    assert asdict(got) == asdict(s)
    assert got.patient_name == "王億乗乛亊娉兝"


def test_charset_declared_with_chinese_in_msh() -> None:
    """MSH itself holds GB18030 text with a 0x7C trail byte before MSH-18."""
    h = replace(HEADER, sending_facility="月坛億社区", charset="GB 18030-2000")
    text = messages.referral_message(h, slip(), "M1", datetime(2026, 11, 20, tzinfo=UTC))
    raw = text.encode("gb18030")
    decoded, cs = charset.decode(raw)
    assert cs.decoder == "gb18030" and messages.read(decoded, cs).facility == "月坛億社区"


def test_wrong_encoding_is_named() -> None:
    raw = referral_bytes(slip(patient_name="王億"), "GB 18030-2000")
    lying = raw.replace(b"GB 18030-2000", b"UNICODE UTF-8")
    with pytest.raises(CharsetRefused) as err:
        charset.decode(lying)
    assert "UNICODE UTF-8" in err.value.reason and err.value.field == "MSH-18"
    assert "RF1-3" in err.value.reason  # the first field holding such bytes (its kind name)


# -- (c) escapes and repeats ---------------------------------------------------------------------


def test_escapes_and_repeats_round_trip() -> None:
    s = slip(reason="a|b^c~d&e\\f", summary="第一行\n第二行|含竖线\n\\E\\ 字面")
    raw = referral_bytes(s, "UNICODE UTF-8")
    text = raw.decode()
    assert "a\\F\\b\\S\\c\\R\\d\\T\\e\\E\\f" in text  # library escapes on the wire
    nte = next(line for line in text.split("\r") if line.endswith("RE^病历摘要"))
    assert nte.count("~") == 2  # one repetition of NTE-3 per line
    got = read_referral(raw)
    assert got.reason == s.reason and got.summary == s.summary


def test_identifier_repeats_and_hand_written_escapes() -> None:
    raw = (FIXTURES / "ref_i12_utf8.hl7").read_bytes()
    got = read_referral(raw)
    want = json.loads((FIXTURES / "ref_i12_utf8.expected.json").read_text(encoding="utf-8"))
    assert asdict(got) == want


def test_gb18030_fixture() -> None:
    raw = (FIXTURES / "ref_i12_gb18030.hl7").read_bytes()
    assert b"\x83\x7c" in raw  # 億 with its | trail byte
    got = read_referral(raw)
    want = json.loads((FIXTURES / "ref_i12_gb18030.expected.json").read_text(encoding="utf-8"))
    assert asdict(got) == want


def test_return_and_acceptance_round_trip() -> None:
    r = back_slip(course="经过|一~二", advice="多饮水\n低盐 & 低脂")
    text = messages.return_message(HEADER, r, "R1", datetime.now(UTC), thread="t-1", mrn="YT1")
    inbound = messages.read(text)
    assert inbound.what == "return" and inbound.thread == "t-1" and inbound.slip_no == r.slip_no
    assert asdict(messages.return_slip(inbound.msg, OFFSET)) == asdict(r)
    a = AcceptanceSlip(
        r.slip_no, True, "", "2026-11-21T10:00:00+08:00", "0301", "心内科 12床", "张主任"
    )
    inbound = messages.read(messages.acceptance_message(HEADER, a, "A1", datetime.now(UTC)))
    assert asdict(messages.acceptance_slip(inbound.msg, OFFSET)) == asdict(a)


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda t: t.replace("|19500315|", "|1950-03-15|"), "PID-7"),
        (lambda t: t.replace("|19500315|", "|19501345|"), "PID-7"),
        (lambda t: t.replace("|F|", "|X|"), "PID-8"),
        (lambda t: t.replace("up-inpatient^", "up-nowhere^"), "RF1-3"),
        (lambda t: t.replace("|YTZZ20261120001|", "||"), "RF1-6"),
        (lambda t: t.replace("^^^CHN^NNCHN", "^^^CHN^XX"), "PID-3"),
        (lambda t: t.replace("|20261120090000+0800", "|2026-11-20 09:00"), "RF1-7"),
        (lambda t: "\r".join(x for x in t.split("\r") if "CS^" not in x), "NTE-4"),
        (lambda t: t.replace("\rPID|", "\rPID|1||A^^^B^MR||重复||19500101|M\rPID|", 1), "PID"),
    ],
)
def test_bad_fields_are_named(mutate: Any, field: str) -> None:
    text = mutate(referral_bytes(slip(), "UNICODE UTF-8").decode())
    with pytest.raises(Hl7DataError) as err:
        messages.referral_slip(messages.read(text).msg, {}, OFFSET)
    assert err.value.field == field


def test_ack_err_names_the_field() -> None:
    to = ack.Answering(control_id="MSG9", version="2.5", charset="GB 18030-2000")
    raw = ack.encode(
        ack.build_ack(
            to,
            "AE",
            at=datetime.now(UTC),
            app="HUTONG",
            facility="hutong",
            error=Hl7DataError("unparseable date", field="PID-7", hl7_error="102"),
        ),
        charset.lookup("GB 18030-2000"),
    )
    text = raw.decode("gb18030")
    assert "MSA|AE|MSG9|" in text and "ERR||PID^1^7|102^Data type error^HL70357|E" in text
    assert ack.read_ack(raw) == ("AE", "MSG9", "PID-7: unparseable date")


# -- real processes -----------------------------------------------------------------------------

MEMBERS = [
    {"id": "fuxing", "zh": "复兴医院", "en": "Fuxing Hospital", "role": "core"},
    {"id": "yuetan-chc", "zh": "月坛社区卫生服务中心", "en": "Yuetan CHC", "role": "community"},
]
KINDS = ["referral.request", "referral.status", "referral.cancel", "referral.return"]
RULES = [
    {"from": "yuetan-chc", "to": "fuxing", "kinds": KINDS},
    {"from": "fuxing", "to": "yuetan-chc", "kinds": KINDS},
]


class Env:
    def __init__(
        self, folder: Path, referral_id_field: str = "PV1-50", dsn_for: Any = None
    ) -> None:
        base = free_port_block(4)
        self.ports = {
            "chc-adapter": base,
            "chc-his": base + 1,
            "core-adapter": base + 2,
            "core-his": base + 3,
        }
        sites = {
            "fuxing": ("core", "fuxing", "UNICODE UTF-8"),
            "yuetan-chc": ("chc", "yuetan-chc", "GB 18030-2000"),
        }
        members = []
        for m in MEMBERS:
            short, mapping, cs = sites[m["id"]]
            members.append(
                {
                    **m,
                    "adapters": [
                        {
                            "name": "his",
                            "type": "his-hl7",
                            "mappings": str(ROOT / "mappings" / mapping),
                            "receives": ["referral.*"],
                            "options": {
                                "listen": f"127.0.0.1:{self.ports[f'{short}-adapter']}",
                                "his": f"127.0.0.1:{self.ports[f'{short}-his']}",
                                "charset": cs,
                                "ack_timeout_s": 2,
                                "connect_timeout_s": 2,
                                "referral_id_field": referral_id_field,
                            },
                        }
                    ],
                }
            )
        self.alliance = Alliance(folder / "alliance", members, RULES, dsn_for=dsn_for)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Any] = []
        self.his: dict[str, VendorHis] = {}
        for short, cs in (("chc", "GB 18030-2000"), ("core", "UNICODE UTF-8")):
            db = folder / f"{short}-his.sqlite"
            self.his[short] = VendorHis(
                db,
                f"127.0.0.1:{self.ports[f'{short}-adapter']}",
                application=f"{short.upper()}HIS",
                facility=f"{short}-his",
                charset_name=cs,
            )
            self.start_his(short, folder)

    def start_his(self, short: str, folder: Path) -> None:
        log = open(folder / f"{short}-his.log", "ab")  # noqa: SIM115 - closed in stop()
        self.logs.append(log)
        self.procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "simulators.his_hl7",
                    "serve",
                    "--db",
                    str(self.his[short].db),
                    "--listen",
                    f"127.0.0.1:{self.ports[f'{short}-his']}",
                ],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )

    def stop(self) -> None:
        self.alliance.stop_all()
        for p in self.procs:
            p.terminate()
            p.wait(30)
        for log in self.logs:
            log.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory):
    e = Env(tmp_path_factory.mktemp("his-hl7"))
    try:
        e.alliance.start("fuxing", "yuetan-chc")
        yield e
    finally:
        e.stop()


def one(his: VendorHis, what: str, slip_no: str, n: int = 1) -> Any:
    def got() -> list[Any]:
        rows = [r for r in his.received(what) if r.slip_no == slip_no]
        return rows if len(rows) >= n else []

    return wait_for(got, timeout=60, what=f"{what} for {slip_no} in the HIS")


def referral_row(node: Any, thread: str) -> dict[str, Any]:
    rows = [r for r in node.api("GET", "/local/v1/referrals") if r["thread"] == thread]
    return rows[0] if rows else {}


@pytest.mark.slow
def test_referral_loop_between_two_hl7_his(env: Env) -> None:
    chc, core = env.his["chc"], env.his["core"]
    fx = env.alliance.node("fuxing")
    # a patient of this test's own (record number, ID number, slip): the module's other tests
    # refer theirs, in any order, and change nothing this test reads
    mrn, id_number = "YTLOOP1", "110102195003152015"
    # the HIS's ADT feed: register, then a name/phone change the REF^I12 does not repeat
    assert (
        chc.adt(
            "A04",
            mrn,
            name="王秀",
            gender="female",
            birth_date="1950-03-15",
            phone="13900000000",
            id_number=id_number,
        ).code
        == "AA"
    )
    assert chc.adt("A08", mrn, name="王億英", phone="13901234567").code == "AA"
    s = slip(slip_no="YTZZ-LOOP-HL7", patient_name="", phone="", mrn=mrn, id_number=id_number)
    ack1 = chc.refer(s, control_id="YT-REF-0001")
    assert ack1.code == "AA" and ack1.control_id == "YT-REF-0001"
    # resent with the same MSH-10: the same ACK, nothing new
    assert chc.refer(s, control_id="YT-REF-0001").code == "AA"
    got = one(core, "referral", s.slip_no)
    assert len(got) == 1
    thread = got[0].thread
    assert asdict(got[0].slip) == asdict(
        replace(
            s,
            patient_name="王億英",
            phone="13901234567",
            id_number="",
            diagnosis_code="FXZD0101",
            department_code="0200",
        )
    )
    # one referral at the core for this slip (the module's other tests send theirs)
    assert [
        r["thread"]
        for r in fx.api("GET", "/local/v1/referrals")
        if (
            fx.api("GET", f"/fhir/ServiceRequest/{r['sr_id']}", role="clinician").get("requisition")
            or {}
        ).get("value")
        == s.slip_no
    ] == [thread]
    # the core hospital's HIS accepts: RRI^I12 -> accept step -> RRI^I12 into the centre's HIS
    a = AcceptanceSlip(
        slip_no=s.slip_no,
        accepted=True,
        appointment_at="2026-11-21T10:00:00+08:00",
        department_code="0301",
        bed_no="心内科 12床",
        doctor="张主任",
    )
    assert core.accept(a, thread).code == "AA"
    acc = one(chc, "acceptance", s.slip_no)
    assert asdict(acc[0].slip) == asdict(replace(a, department_code="03.04"))
    assert acc[0].thread == thread
    # admission (A01 naming the referral in PV1-5) is the arrival; then the return slip
    assert (
        core.adt(
            "A01",
            "FX778",
            name="王億英",
            gender="female",
            birth_date="1950-03-15",
            referral_id=thread,
            patient_class="I",
        ).code
        == "AA"
    )
    wait_for(
        lambda: referral_row(fx, thread).get("status") == "in-progress", timeout=30, what="arrival"
    )
    r = back_slip(slip_no=s.slip_no)
    assert core.write_return(r, thread).code == "AA"
    ret = one(chc, "return", s.slip_no)
    want = replace(
        r,
        diagnosis_code="YTZ-01",
        prescriptions=[
            replace(r.prescriptions[0], drug_code="YT2037"),
            replace(r.prescriptions[1], drug_code="YT2111"),
        ],
        results=[
            replace(r.results[0], item_code="3001"),
            replace(r.results[1], item_code="3003"),
            replace(r.results[2], item_code="3002"),
        ],
    )
    assert asdict(ret[0].slip) == asdict(want)
    assert len([r for r in chc.received() if r.slip_no == s.slip_no]) == 2
    assert len([r for r in core.received() if r.slip_no == s.slip_no]) == 1


def quarantined(node: Any) -> list[dict[str, Any]]:
    out = node.cli("quarantine", "list", "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout) if out.stdout.strip().startswith("[") else []


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "mutate", "field", "code"),
    [
        ("missing", lambda t: t.replace("|19500315|", "||"), "PID-7", "AE"),
        ("date", lambda t: t.replace("|19500315|", "|1950-3-15|"), "PID-7", "AE"),
        ("code", lambda t: t.replace("|F|", "|Q|"), "PID-8", "AE"),
        ("type", lambda t: t.replace("REF^I12^REF_I12", "ORM^O01^ORM_O01"), "MSH-9", "AR"),
        (
            "dup-rows",
            lambda t: t.replace("\rPID|", "\rPID|1||YTX-9^^^YTHIS^MR||重复||19500101|M\rPID|", 1),
            "PID",
            "AE",
        ),
    ],
)
def test_bad_data_is_nakked_quarantined_and_audited(
    env: Env, name: str, mutate: Any, field: str, code: str
) -> None:
    chc = env.his["chc"]
    node = env.alliance.node("yuetan-chc")
    s = slip(slip_no=f"YTBAD-{name}", patient_name="王億英", mrn=f"YTX-{name}")  # no ADT record
    text = mutate(referral_bytes(s, "GB 18030-2000", control=f"BAD-{name}").decode("gb18030"))
    raw = text.encode("gb18030")
    answer = chc.send_raw(raw, "referral", s.slip_no)
    assert answer.code == code and answer.control_id == f"BAD-{name}"
    assert answer.text.startswith(field)
    assert chc.send_raw(raw, "referral", s.slip_no).code == code  # same answer when resent
    # readable as far as PID: kept under the patient's keyed hash (PID-3 NNCHN)
    from bridge.privacy import patient_hash

    _assert_quarantined(
        node,
        f"BAD-{name}",
        field,
        raw,
        None
        if name in ("type", "dup-rows")
        else patient_hash(node.plan.patient_hash_key, s.id_number),
    )
    # the listener keeps serving: a good referral right after is taken
    good = slip(slip_no=f"YTOK-{name}", patient_name="王秀英")
    assert chc.refer(good).code == "AA"


def _assert_quarantined(
    node: Any, record: str, field: str, raw: bytes, phash: str | None = None
) -> None:
    from sqlalchemy import select

    from bridge.audit.tables import AuditRecord
    from bridge.store.db import Store
    from bridge.store.tables import QUARANTINE

    audit = AuditRecord.__table__  # type: ignore[attr-defined]
    store = Store(node.plan.storage_dsn)
    try:
        with store.read() as conn:
            rows = [
                r._mapping
                for r in conn.execute(select(QUARANTINE)).all()
                if f"MSH-10 {record} " in r.message
            ]
            assert len(rows) == 1, "quarantined once, not again on the resend"
            assert f"field {field}" in rows[0]["message"] and bytes(rows[0]["raw"]) == raw
            assert rows[0]["source"] == "adapter:his"
            assert rows[0]["patient_hash"] == phash
            audits = [
                a
                for a in conn.execute(
                    select(audit).where(
                        audit.c.action == "quarantined", audit.c.actor == "adapter:his"
                    )
                ).all()
                if f"MSH-10 {record} " in a.resource
            ]
            assert len(audits) == 1
            assert (
                '"quarantine_id"' in audits[0].resource or str(rows[0]["id"]) in audits[0].resource
            )
    finally:
        store.dispose()


@pytest.mark.slow
def test_wrong_encoding_nakked_and_quarantined(env: Env) -> None:
    chc = env.his["chc"]
    node = env.alliance.node("yuetan-chc")
    raw = referral_bytes(
        slip(slip_no="YTBAD-enc", patient_name="王億英"), "GB 18030-2000", control="BAD-enc"
    ).replace(b"GB 18030-2000", b"UNICODE UTF-8")
    answer = chc.send_raw(raw, "referral")
    assert answer.code == "AR" and answer.text.startswith("MSH-18")
    _assert_quarantined(node, "BAD-enc", "MSH-18", raw)


@pytest.mark.slow
def test_duplicate_slip_under_a_new_message_is_refused(env: Env) -> None:
    chc = env.his["chc"]
    s = slip(slip_no="YTDUP-1", patient_name="王秀英")
    assert chc.refer(s, control_id="DUP-A").code == "AA"
    answer = chc.refer(s, control_id="DUP-B")
    assert answer.code == "AE" and answer.text.startswith("RF1-6")
    node = env.alliance.node("yuetan-chc")
    from bridge.privacy import patient_hash

    _assert_quarantined(
        node,
        "DUP-B",
        "RF1-6",
        next(r for r in _sent(chc) if r[0] == "DUP-B")[1],
        patient_hash(node.plan.patient_hash_key, s.id_number),
    )


def _sent(his: VendorHis) -> list[tuple[str, bytes]]:
    import contextlib
    import sqlite3

    with contextlib.closing(sqlite3.connect(his.db)) as conn:
        return [(c, bytes(r)) for c, r in conn.execute("SELECT control_id, raw FROM sent")]


@pytest.mark.slow
def test_his_naks_drops_and_is_down_then_gets_each_message_once_in_order(env: Env) -> None:
    core, chc = env.his["core"], env.his["chc"]
    folder = env.his["core"].db.parent
    # the core HIS NAKs twice, then drops the connection twice, then ACKs
    core.set_mode(nak=2, drop=2)
    slips = [
        slip(
            slip_no=f"YTRETRY-{i}",
            patient_name=f"患者{i}億",
            mrn=f"YTR{i}",
            id_number=f"1101021960010100{i}X",
        )
        for i in range(3)
    ]
    for s in slips:
        assert chc.refer(s).code == "AA"
    for s in slips:
        one(core, "referral", s.slip_no)
    assert core.mode()["nak"] == 0 and core.mode()["drop"] == 0
    got = [r for r in core.received("referral") if r.slip_no.startswith("YTRETRY-")]
    # once each (three threads: the dispatcher keeps order within a thread, not across)
    assert sorted(r.slip_no for r in got) == [s.slip_no for s in slips]
    assert sorted(r.slip.patient_name for r in got) == [s.patient_name for s in slips]
    # within one thread: the centre's HIS NAKs the acceptance twice and drops it once while
    # the return is already on its way; it still gets acceptance, then return, once each
    s = slip(slip_no="YTORDER-1", patient_name="钱億", mrn="YTO1", id_number="110102197001010011")
    assert chc.refer(s).code == "AA"
    thread = one(core, "referral", s.slip_no)[0].thread
    chc.set_mode(nak=2, drop=1)
    assert (
        core.accept(
            AcceptanceSlip(
                s.slip_no, True, "", "2026-11-22T08:00:00+08:00", "0301", "3床", "周医生"
            ),
            thread,
        ).code
        == "AA"
    )
    assert core.adt("A04", "FX900", referral_id=thread).code == "AA"
    fx = env.alliance.node("fuxing")
    wait_for(
        lambda: referral_row(fx, thread).get("status") == "in-progress", timeout=30, what="arrival"
    )
    assert core.write_return(back_slip(slip_no=s.slip_no), thread).code == "AA"
    one(chc, "return", s.slip_no)
    assert chc.mode()["nak"] == 0 and chc.mode()["drop"] == 0
    mine = [r.what for r in chc.received() if r.slip_no == s.slip_no]
    assert mine == ["acceptance", "return"]
    # the HIS listener is down: queued, then delivered when it comes back
    proc = next(p for p in env.procs if str(core.db) in " ".join(map(str, p.args)))
    proc.terminate()
    proc.wait(30)
    env.procs.remove(proc)
    late = slip(
        slip_no="YTRETRY-down", patient_name="赵乗", mrn="YTD1", id_number="110102198001010022"
    )
    before = len(fx.api("GET", "/local/v1/referrals"))  # counted before it can arrive
    assert chc.refer(late).code == "AA"
    wait_for(
        lambda: len(fx.api("GET", "/local/v1/referrals")) > before,
        timeout=60,
        what="the referral at the core node while its HIS is down",
    )
    assert not [r for r in core.received() if r.slip_no == late.slip_no]
    env.start_his("core", folder)
    rows = one(core, "referral", late.slip_no)
    assert len(rows) == 1 and rows[0].slip.patient_name == "赵乗"


def test_mllp_sender_names_down_listener() -> None:
    port = free_port_block(1)
    with pytest.raises(PeerUnreachable, match=f"127.0.0.1:{port}"):
        send_once("127.0.0.1", port, b"MSH|^~\\&|x\r", Timeouts(connect_s=1, ack_s=1))


@contextmanager
def hl7_centre_db_core(folder: Path) -> Iterator[tuple[Alliance, VendorHis, Any]]:
    """The centre on HL7 v2 (this style, GB 18030, its HIS a separate process), the core
    hospital on an intermediate database; both nodes started."""
    from simulators.his_db import HisDb
    from tests.test_his_cross import db_site

    ports = free_port_block(2)
    core_db = HisDb(f"sqlite:///{folder / 'fuxing-his.db'}").init()
    members = [
        {
            **MEMBERS[0],
            "adapters": [
                {
                    "name": "his",
                    "type": "his-middle-db",
                    "mappings": str(db_site(folder, "fuxing")),
                    "receives": ["referral.*"],
                    "options": {"dsn": core_db.dsn, "poll_every_s": 0.3},
                }
            ],
        },
        {
            **MEMBERS[1],
            "adapters": [
                {
                    "name": "his",
                    "type": "his-hl7",
                    "mappings": str(ROOT / "mappings" / "yuetan-chc"),
                    "receives": ["referral.*"],
                    "options": {
                        "listen": f"127.0.0.1:{ports}",
                        "his": f"127.0.0.1:{ports + 1}",
                        "charset": "GB 18030-2000",
                        "referral_id_field": "PV1-50",
                    },
                }
            ],
        },
    ]
    alliance = Alliance(folder / "alliance", members, RULES)
    his = VendorHis(folder / "chc-his.sqlite", f"127.0.0.1:{ports}", charset_name="GB 18030-2000")
    log = open(folder / "chc-his.log", "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "simulators.his_hl7",
            "serve",
            "--db",
            str(his.db),
            "--listen",
            f"127.0.0.1:{ports + 1}",
        ],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        alliance.start("fuxing", "yuetan-chc")
        yield alliance, his, core_db
    finally:
        alliance.stop_all()
        proc.terminate()
        proc.wait(30)
        log.close()
        core_db.close()


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Alliance, VendorHis, Any]]:
    with hl7_centre_db_core(tmp_path_factory.mktemp("his-hl7-mixed")) as world:
        yield world


@pytest.mark.slow
def test_hl7_his_to_middle_db_his_and_back(mixed: Any) -> None:
    _alliance, chc, core_db = mixed
    s = slip(slip_no="YTMIX-1", patient_name="王億乗", department_code="KS01")
    assert chc.refer(s).code == "AA"
    got = wait_for(
        lambda: [x for x in core_db.received_referrals() if x.slip_no == s.slip_no],
        timeout=60,
        what="referral in the core's database HIS",
    )
    # the database HIS's inbox table keeps these columns (simulators/his_db.py); compare them all
    kept = (
        "slip_no",
        "kind",
        "patient_name",
        "gender",
        "birth_date",
        "id_number",
        "phone",
        "mrn",
        "diagnosis_code",
        "diagnosis_name",
        "reason",
        "department_code",
        "written_at",
    )
    want_ref = asdict(replace(s, id_number="", diagnosis_code="FXZD0101", department_code="0200"))
    assert len(got) == 1 and {k: asdict(got[0])[k] for k in kept} == {k: want_ref[k] for k in kept}
    acc = AcceptanceSlip(
        slip_no=s.slip_no,
        accepted=True,
        appointment_at="2026-11-21T10:00:00+08:00",
        department_code="0301",
        bed_no="心内科 12床",
        doctor="张主任",
    )
    core_db.accept(acc)
    got_acc = one(chc, "acceptance", s.slip_no)
    assert asdict(got_acc[0].slip) == asdict(replace(acc, department_code="03.04"))
    ret = back_slip(slip_no=s.slip_no)
    core_db.write_return(ret)
    got_ret = one(chc, "return", s.slip_no)
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
            replace(ret.results[2], item_code="3002"),
        ],
    )
    assert asdict(got_ret[0].slip) == asdict(want)
