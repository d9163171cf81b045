"""ADT and REF from an HL7 v2 HIS into a real node: Patient and Encounter in its FHIR store.

Two real node processes (the core hospital and the community centre), each with the his-hl7
adapter and a simulated HIS process (tests/test_his_hl7.py's Env). Messages go over real
sockets through python-hl7's MLLP client, as a HIS would send them; what the node stored is
read back through its /fhir API and compared field by field with the message.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hl7.client import MLLPClient

from adapters.slips import AcceptanceSlip
from tests.harness import db_rows, wait_for
from tests.test_his_hl7 import Env, one, referral_bytes, referral_row, slip

CORE_MEMBER = "fuxing"
VISIT = "urn:hutong:visit:fuxing"
MRN = "urn:hutong:mrn:fuxing"
CST = timezone(timedelta(hours=8))


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    e = Env(tmp_path_factory.mktemp("his-hl7-adt"))
    try:
        e.alliance.start("fuxing", "yuetan-chc")
        yield e
    finally:
        e.stop()


def mllp(port: int, raw: bytes) -> tuple[str, str, str]:
    """One message through python-hl7's MLLP client: (MSA-1, MSA-2, ERR-8 or MSA-3)."""
    with MLLPClient("127.0.0.1", port) as client:
        client.socket.settimeout(60)
        answer = client.send_message(raw)
    text = answer.strip(b"\x0b\x1c\r\n").decode("utf-8", "replace")
    segs = {s.split("|", 1)[0]: s.split("|") for s in text.split("\r") if s}
    msa = segs["MSA"]
    err = segs.get("ERR")  # v2.5+: ERR-8 the reason; before: MSA-3 (ERR-1 the location)
    why = err[8] if err is not None and len(err) > 8 else (msa[3] if len(msa) > 3 else "")
    return msa[1], msa[2], why


def adt(
    event: str,
    control: str,
    *,
    mrn: str = "FX5001",
    visit: str = "V5001",
    klass: str = "I",
    location: str = "",
    admitted: str = "",
    discharged: str = "",
    preadmit: str = "",
    referral: str = "",
    name: str = "钱^秀英",
    sent: str = "20261201080000",
    evn: str = "",
    national_id: str = "",
) -> bytes:
    pv1 = [""] * 51
    pv1[1], pv1[2], pv1[3], pv1[5] = "1", klass, location, preadmit
    pv1[19], pv1[44], pv1[45], pv1[50] = visit, admitted, discharged, referral
    ids = f"{mrn}^^^FXHIS^MR" + (f"~{national_id}^^^CHN^NNCHN" if national_id else "")
    segs = [
        (
            f"MSH|^~\\&|FXHIS|fuxing-his|HUTONG|fuxing|{sent}||ADT^{event}^ADT_A01|{control}|P|"
            "2.5|||AL|NE|CHN|UNICODE UTF-8"
        ),
        f"EVN|{event}|{evn or sent}",
        f"PID|1||{ids}||{name}||19500315|F|||||13901234567",
        "PV1|" + "|".join(pv1[1:]).rstrip("|"),
    ]
    return ("\r".join(segs) + "\r").encode()


def fhir(env: Env, path: str) -> dict[str, Any]:
    return env.alliance.node("fuxing").api("GET", path, role="clinician")


def search(env: Env, rtype: str, **params: str) -> list[dict[str, Any]]:
    q = urllib.parse.urlencode(params)
    return [e["resource"] for e in fhir(env, f"/fhir/{rtype}?{q}").get("entry", [])]


def encounter(env: Env, visit: str) -> dict[str, Any]:
    found = search(env, "Encounter", identifier=f"{VISIT}|{visit}")
    assert len(found) == 1, found
    return found[0]


def iso(hl7_ts: str) -> str:
    return datetime.strptime(hl7_ts, "%Y%m%d%H%M%S").replace(tzinfo=CST).isoformat()


@pytest.mark.slow
def test_admit_transfer_discharge_is_one_encounter_with_its_history(env: Env) -> None:
    port = env.ports["core-adapter"]
    # PV1-5 carries the HIS's preadmit number: not a referral id, accepted
    assert mllp(
        port,
        adt(
            "A01",
            "ADM-1",
            location="心内科^301^12",
            admitted="20261201083000",
            preadmit="PRE-778",
            sent="20261201083100",
        ),
    )[:2] == ("AA", "ADM-1")
    enc = encounter(env, "V5001")
    assert enc["status"] == "in-progress" and "statusHistory" not in enc
    assert enc["class"] == {
        "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
        "code": "IMP",
        "display": "inpatient encounter",
    }
    assert enc["period"] == {"start": iso("20261201083000")}
    assert enc["hospitalization"]["preAdmissionIdentifier"] == {"value": "PRE-778"}
    assert [
        (loc["location"]["display"], loc["status"], loc["period"]) for loc in enc["location"]
    ] == [("心内科 301 12", "active", {"start": iso("20261201083100")})]
    assert "basedOn" not in enc  # no referral field configured for PV1-5
    patient = fhir(env, f"/fhir/{enc['subject']['reference']}")
    assert {"system": MRN, "value": "FX5001"} in [
        {k: i[k] for k in ("system", "value")} for i in patient["identifier"]
    ]
    assert patient["name"][0]["text"] == "钱秀英" and patient["birthDate"] == "1950-03-15"
    assert patient["gender"] == "female"
    assert patient["telecom"] == [{"system": "phone", "value": "13901234567"}]
    # transfer, then discharge
    assert (
        mllp(port, adt("A02", "TRF-1", location="心内科^305^2", sent="20261202090000"))[0] == "AA"
    )
    assert (
        mllp(port, adt("A03", "DIS-1", discharged="20261205100000", sent="20261205100500"))[0]
        == "AA"
    )
    enc = encounter(env, "V5001")
    assert enc["status"] == "finished"
    assert enc["statusHistory"] == [
        {
            "status": "in-progress",
            "period": {"start": iso("20261201083000"), "end": iso("20261205100500")},
        }
    ]
    assert enc["period"] == {"start": iso("20261201083000"), "end": iso("20261205100000")}
    assert [
        (loc["location"]["display"], loc["status"], loc["period"]) for loc in enc["location"]
    ] == [
        (
            "心内科 301 12",
            "completed",
            {"start": iso("20261201083100"), "end": iso("20261202090000")},
        ),
        (
            "心内科 305 2",
            "completed",
            {"start": iso("20261202090000"), "end": iso("20261205100000")},
        ),
    ]
    assert enc["meta"]["versionId"] == "3"
    # the patient's encounters, by patient / status / date / class, through the indexes
    pid = enc["subject"]["reference"].split("/", 1)[1]
    assert [e["id"] for e in search(env, "Encounter", patient=pid)] == [enc["id"]]
    assert [e["id"] for e in search(env, "Encounter", patient=pid, status="finished")] == [
        enc["id"]
    ]
    assert search(env, "Encounter", patient=pid, status="in-progress") == []
    assert [e["id"] for e in search(env, "Encounter", patient=pid, date="2026-12")] == [
        enc["id"]
    ]  # the stay lies within December
    assert [e["id"] for e in search(env, "Encounter", patient=pid, date="ge2026-12-04")] == [
        enc["id"]
    ]  # ... and overlaps the 4th on
    assert search(env, "Encounter", patient=pid, date="2026-12-03") == []  # not within a day
    assert search(env, "Encounter", patient=pid, date="gt2026-12-06") == []
    assert [e["id"] for e in search(env, "Encounter", patient=pid, **{"class": "IMP"})] == [
        enc["id"]
    ]
    assert search(env, "Encounter", patient=pid, **{"class": "AMB"}) == []
    # A13 cancels the discharge: in progress again, no end; the last location active again
    assert mllp(port, adt("A13", "CDS-1", sent="20261205120000"))[0] == "AA"
    enc = encounter(env, "V5001")
    assert enc["status"] == "in-progress" and "end" not in enc["period"]
    assert enc["location"][-1]["status"] == "active" and "end" not in enc["location"][-1]["period"]
    # A11 cancels the visit: R4 "cancelled" (it ended before it began; not entered-in-error)
    assert mllp(port, adt("A11", "CAN-1", sent="20261205130000"))[0] == "AA"
    enc = encounter(env, "V5001")
    assert enc["status"] == "cancelled"
    assert [h["status"] for h in enc["statusHistory"]] == ["in-progress", "finished", "in-progress"]
    assert [e["id"] for e in search(env, "Encounter", patient=pid, status="cancelled")] == [
        enc["id"]
    ]


@pytest.mark.slow
def test_cancel_transfer_restores_the_location(env: Env) -> None:
    port = env.ports["core-adapter"]
    kw = {"mrn": "FX5002", "visit": "V5002"}
    assert (
        mllp(port, adt("A01", "ADM-2", location="骨科^201^1", sent="20261201080000", **kw))[0]
        == "AA"
    )
    assert (
        mllp(port, adt("A02", "TRF-2", location="ICU^1^3", sent="20261201100000", **kw))[0] == "AA"
    )
    assert mllp(port, adt("A12", "CTR-2", sent="20261201110000", **kw))[0] == "AA"
    enc = encounter(env, "V5002")
    assert [(loc["location"]["display"], loc["status"]) for loc in enc["location"]] == [
        ("骨科 201 1", "active")
    ]
    assert enc["status"] == "in-progress"


@pytest.mark.slow
def test_cancel_of_an_unknown_visit_is_refused_naming_pv1_19(env: Env) -> None:
    code, control, why = mllp(
        env.ports["core-adapter"], adt("A11", "CAN-X", mrn="FX5003", visit="V-NEVER")
    )
    assert (code, control) == ("AE", "CAN-X") and why.startswith("PV1-19")


@pytest.mark.slow
def test_same_control_id_different_message_both_taken_true_resend_once(env: Env) -> None:
    port = env.ports["core-adapter"]
    first = adt("A01", "DUPCTL-1", mrn="FX5101", visit="V5101", sent="20261203080000")
    second = adt("A01", "DUPCTL-1", mrn="FX5102", visit="V5102", sent="20261203080500")
    assert mllp(port, first)[0] == "AA"
    assert mllp(port, second)[0] == "AA"  # a new message: taken, not the first one's answer
    assert encounter(env, "V5101")["status"] == "in-progress"
    assert encounter(env, "V5102")["status"] == "in-progress"
    node = env.alliance.node("fuxing")
    audits = db_rows(
        node, "SELECT resource FROM audit WHERE action = 'hl7-control-id-reused'"
    )  # the LIS's action too: one list for IT
    assert any("MSH-10 DUPCTL-1 " in r[0] for r in audits)
    from tests.test_web import Browser  # IT sees it on its page, with the adapter's counters

    page = Browser(node).login("it").get("/ui/it")
    assert "control-id-reused=1" in page
    reused = page[page.index('class="reused-ids"') :]
    assert "MSH-10 DUPCTL-1 " in reused[: reused.index("</table>")]
    # a true re-send (MSH-7 renewed) gets the ACK again and is stored once
    resend = first.replace(b"20261203080000||", b"20261203090000||", 1)
    assert resend != first
    assert mllp(port, resend)[:2] == ("AA", "DUPCTL-1")
    assert encounter(env, "V5101")["meta"]["versionId"] == "1"
    keys = db_rows(
        node, "SELECT source_key FROM adapter_intake WHERE source_key LIKE 'fuxing-his:DUPCTL-1#%'"
    )
    assert len(keys) == 2
    # a refused message and a different one under its control id: never the other's NAK
    bad = adt("A01", "DUPCTL-2", mrn="FX5103", visit="V5103", klass="Q")
    good = adt("A01", "DUPCTL-2", mrn="FX5103", visit="V5103", klass="O")
    code, _, why = mllp(port, bad)
    assert code == "AE" and why.startswith("PV1-2")
    assert mllp(port, good) == ("AA", "DUPCTL-2", "")
    assert encounter(env, "V5103")["class"]["code"] == "AMB"
    assert mllp(port, bad)[0] == "AE"  # the refused one resent: its own answer again


@pytest.mark.slow
def test_linked_admission_points_the_referral_to_its_encounter(env: Env) -> None:
    chc, core = env.his["chc"], env.his["core"]
    fx = env.alliance.node("fuxing")
    s = slip(slip_no="YTENC-1", patient_name="孙億英", mrn="YTE1", id_number="110102195003151234")
    assert chc.refer(s).code == "AA"
    thread = one(core, "referral", s.slip_no)[0].thread
    assert (
        core.accept(
            AcceptanceSlip(
                s.slip_no, True, "", "2026-12-04T09:00:00+08:00", "0301", "5床", "张主任"
            ),
            thread,
        ).code
        == "AA"
    )
    port = env.ports["core-adapter"]
    assert (
        mllp(
            port,
            adt(
                "A01",
                "LNK-1",
                mrn="FX5201",
                visit="V5201",
                location="心内科^^5",
                referral=thread,
                sent="20261204093000",
            ),
        )[0]
        == "AA"
    )
    row = wait_for(
        lambda: (
            referral_row(fx, thread)
            if referral_row(fx, thread).get("status") == "in-progress"
            else None
        ),
        timeout=30,
        what="arrival",
    )
    enc = encounter(env, "V5201")
    assert enc["status"] == "in-progress"
    task = fhir(env, f"/fhir/Task/{row['task_id'] if 'task_id' in row else thread}")
    assert task["encounter"] == {"reference": f"Encounter/{enc['id']}"}
    sr_id = task["focus"]["reference"].split("/", 1)[1]
    sr = fhir(env, f"/fhir/ServiceRequest/{sr_id}")
    assert {"reference": f"Encounter/{enc['id']}"} in sr["supportingInfo"]
    assert enc["basedOn"] == [{"reference": f"ServiceRequest/{sr_id}"}]
    # the referral's own patient (registered from the referral) got the HIS's record number
    assert enc["subject"] == task["for"]
    patient = fhir(env, f"/fhir/{task['for']['reference']}")
    assert {"system": MRN, "value": "FX5201"} in [
        {k: i[k] for k in ("system", "value")} for i in patient["identifier"]
    ]
    # discharge: the Encounter the referral points to is finished
    assert (
        mllp(
            port,
            adt(
                "A03",
                "LNK-2",
                mrn="FX5201",
                visit="V5201",
                referral=thread,
                discharged="20261206100000",
                sent="20261206100000",
            ),
        )[0]
        == "AA"
    )
    assert encounter(env, "V5201")["status"] == "finished"
    task = fhir(env, f"/fhir/{task['resourceType']}/{task['id']}")
    assert task["encounter"] == {"reference": f"Encounter/{enc['id']}"}
    # the return reaches the referrer without this node's own visit references
    from tests.test_his_hl7 import back_slip

    assert core.write_return(back_slip(slip_no=s.slip_no), thread).code == "AA"
    yt = env.alliance.node("yuetan-chc")
    wait_for(
        lambda: referral_row(yt, thread).get("status") == "completed",
        timeout=60,
        what="the return at the referrer",
    )
    theirs = yt.api("GET", f"/fhir/Task/{task['id']}", role="clinician")
    assert "encounter" not in theirs
    their_sr = yt.api("GET", f"/fhir/ServiceRequest/{sr_id}", role="clinician")
    assert not [
        i for i in their_sr.get("supportingInfo", []) if i["reference"] == f"Encounter/{enc['id']}"
    ]
    mine = fhir(env, f"/fhir/Task/{task['id']}")
    assert mine["encounter"] == {"reference": f"Encounter/{enc['id']}"}
    # an admission naming a referral that is not here is refused naming the configured field
    code, _, why = mllp(
        port, adt("A01", "LNK-3", mrn="FX5202", visit="V5202", referral="no-such-referral")
    )
    assert code == "AE" and why.startswith("PV1-50")


@pytest.mark.slow
def test_real_style_referral_with_date_only_times_nulls_and_untyped_notes(env: Env) -> None:
    core = env.his["core"]
    s = slip(slip_no="YTREAL-1", patient_name="周億", mrn="YTR9", id_number="110102196001010018")
    text = referral_bytes(s, "GB 18030-2000", control="REAL-1").decode("gb18030")
    segs = text.split("\r")
    rf1 = next(i for i, x in enumerate(segs) if x.startswith("RF1|"))
    f = segs[rf1].split("|")
    f[7] = "20261120"  # RF1-7: a date only
    f += [""] * (13 - len(f))
    f[8], f[9] = '""', '""'  # RF1-8/9: the HL7 null
    segs[rf1] = "|".join(f)
    pid = next(i for i, x in enumerate(segs) if x.startswith("PID|"))
    p = segs[pid].split("|")
    p += [""] * (14 - len(p))
    p[6], p[10] = '""', '""'  # mother's maiden name, race: null
    segs[pid] = "|".join(p)
    dg1 = next(i for i, x in enumerate(segs) if x.startswith("DG1|"))
    d = segs[dg1].split("|")
    d += [""] * (16 - len(d))
    d[15] = "1"  # DG1-15: the primary diagnosis, listed after another one
    segs[dg1] = "|".join(d)
    segs.insert(dg1, "DG1|2||YTZ-99^其他诊断^LOCALDX||||W")
    segs = [x for x in segs if x]
    segs.insert(-1, "ZXT|1|vendor segment")  # an unknown optional segment
    segs += ["NTE|4||患者自诉头晕", "NTE|5||既往史见附件|^CLINICAL_INFORMATION"]
    raw = ("\r".join(segs) + "\r").encode("gb18030")
    assert mllp(env.ports["chc-adapter"], raw)[:2] == ("AA", "REAL-1")
    got = one(core, "referral", s.slip_no)[0].slip
    assert got.written_at == "2026-11-20"
    assert got.summary.split("\n") == [
        *s.summary.split("\n"),
        "患者自诉头晕",
        "CLINICAL_INFORMATION: 既往史见附件",
    ]
    assert got.reason == s.reason and got.patient_name == "周億"
    assert got.diagnosis_code == "FXZD0101"  # YTZ-01 (DG1-15 = 1) in the core's codes


@pytest.mark.slow
@pytest.mark.postgres
def test_visits_on_postgresql(tmp_path: Path, pg_node_dbs: Any) -> None:
    """The same visit events on nodes whose store is PostgreSQL: one Encounter with its
    history, the open-visit lookup, a conflicting visit number, re-send and reused MSH-10."""
    e = Env(tmp_path, dsn_for=pg_node_dbs)
    try:
        e.alliance.start("fuxing", "yuetan-chc")
        assert e.alliance.node("fuxing").plan.storage_dsn.startswith("postgresql")
        port = e.ports["core-adapter"]
        assert (
            mllp(
                port, adt("A01", "PG-1", mrn="PG1", visit="", location="A^1", sent="20261210080000")
            )[0]
            == "AA"
        )
        # no visit number: the transfer and the discharge find the patient's one open visit
        assert (
            mllp(
                port, adt("A02", "PG-2", mrn="PG1", visit="", location="B^2", sent="20261211080000")
            )[0]
            == "AA"
        )
        first = adt("A03", "PG-3", mrn="PG1", visit="", sent="20261212080000")
        assert mllp(port, first)[0] == "AA"
        assert mllp(port, first.replace(b"20261212080000||", b"20261212090000||", 1))[0] == "AA"
        pid = search(e, "Patient", identifier=f"{MRN}|PG1")[0]["id"]
        encs = search(e, "Encounter", patient=pid)
        assert len(encs) == 1 and encs[0]["status"] == "finished"
        assert encs[0]["meta"]["versionId"] == "3"  # the re-send changed nothing
        assert [loc["location"]["display"] for loc in encs[0]["location"]] == ["A 1", "B 2"]
        assert [
            x["id"] for x in search(e, "Encounter", date="ge2026-12-11", **{"class": "IMP"})
        ] == [encs[0]["id"]]
        # with nothing open, a discharge without a visit number is refused naming PV1-19
        code, _, why = mllp(port, adt("A03", "PG-4", mrn="PG1", visit=""))
        assert code == "AE" and why.startswith("PV1-19")
        # another patient under a used visit number; then a new message under a used MSH-10
        assert mllp(port, adt("A01", "PG-5", mrn="PG2", visit="PGV"))[0] == "AA"
        code, _, why = mllp(port, adt("A01", "PG-6", mrn="PG3", visit="PGV"))
        assert code == "AE" and why.startswith("PV1-19")
        assert mllp(port, adt("A01", "PG-5", mrn="PG4", visit="PGW"))[0] == "AA"
        assert encounter(e, "PGW")["status"] == "in-progress"
    finally:
        e.stop()


# -- pure layers (no node) ----------------------------------------------------------------------

OFFSET = timedelta(hours=8)


def _read(raw: bytes) -> Any:
    from adapters.his_hl7 import messages

    return messages.read(raw.decode())


def test_adt_reading_as_real_senders_write() -> None:
    from adapters.his_hl7 import adt as adt_mod

    raw = adt("A01", "P-1", mrn="", klass="", location="", sent="2026120108")
    text = (
        raw.decode()
        .replace("PID|1||^^^FXHIS^MR|", "PID|1||SS123^^^USA^SS~M777^^^H^PI~N1^^^H|")
        .replace("|19500315|F|", "|1950|A|")
    )
    got = adt_mod.read(
        _read(text.encode()).msg,
        "A01",
        OFFSET,
        member="fuxing",
        national_id_system="urn:oid:2.16.156.10011.1.3",
        sent_at="x",
    )
    assert got.mrn == "M777"  # PI before untyped; never the SSN
    assert got.patient["birthDate"] == "1950" and got.patient["gender"] == "other"
    assert (
        got.visit is not None
        and got.visit.class_code == ""
        and got.visit.at == "2026-12-01T08:00:00+08:00"
    )  # EVN-2 at hour precision
    assert got.referral_id == ""  # no referral field configured: PV1-50 is not read


def test_visit_history_semantics() -> None:
    from bridge.local.encounters import VisitEvent, apply

    def ev(event: str, at: str, **kw: Any) -> VisitEvent:
        return VisitEvent(event, at, VISIT, "V1", **kw)

    e = apply(None, ev("preadmit", "2026-12-01", class_code="P", location="A"))
    assert e["status"] == "planned" and e["location"][0]["status"] == "planned"
    e = apply(e, ev("admit", "2026-12-02", class_code="I", location="A"))
    assert e["status"] == "in-progress" and e["period"] == {"start": "2026-12-02"}
    assert e["classHistory"] == [
        {
            "class": {
                "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                "code": "PRENC",
                "display": "pre-admission",
            },
            "period": {"end": "2026-12-02"},
        }
    ]
    assert e["statusHistory"] == [{"status": "planned", "period": {"end": "2026-12-02"}}]
    e2 = apply(e, ev("update", "2026-12-03"))
    assert e2["status"] == "in-progress" and e2["location"] == e["location"]
    assert apply(None, ev("update", "2026-12-03", end="2026-12-04"))["status"] == "finished"


def test_rejection_and_withdrawal_reasons_from_untyped_notes() -> None:
    from adapters.his_hl7 import messages

    rri = (
        "MSH|^~\\&|FX|fx|HUTONG|yt|20261201||RRI^I12|R1|P|2.5\r"
        'RF1|R||""||||20261201\rPRD|RT|""\rPID|1\rNTE|1||床位已满\r'
    )
    rri = rri.replace('RF1|R||""||||20261201', 'RF1|R||""|||YT-9|20261201')
    a = messages.acceptance_slip(messages.read(rri).msg, OFFSET)
    assert (a.accepted, a.reason, a.appointment_at, a.slip_no) == (
        False,
        "床位已满",
        "2026-12-01",
        "YT-9",
    )
    i14 = (
        "MSH|^~\\&|YT|yt|HUTONG|yt|20261201||REF^I14|C1|P|2.5\r"
        "RF1||||||YT-9|20261201\rNTE|1||家属要求撤回\rNTE|2||改日再转|^REASON\r"
    )
    note = messages.cancel_note(messages.read(i14).msg, OFFSET)
    assert note.reason == "家属要求撤回\nREASON: 改日再转"
    assert note.cancelled_at == "2026-12-01"
    missing = i14.replace("|YT-9|", "||")
    with pytest.raises(messages.Hl7DataError) as err:
        messages.cancel_note(messages.read(missing).msg, OFFSET)
    assert getattr(err.value, "field", None) == "RF1-6"
