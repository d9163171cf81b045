"""A referral withdrawn in the referring HIS (患者/家属撤回) reaches the other HIS.

One alliance, two real node processes: the Yuetan centre's HIS speaks HL7 v2 over MLLP (a
simulated HIS process, GB 18030), Fuxing's HIS is an intermediate database. HL7 -> DB: the
centre refers up (REF^I12), then withdraws (REF^I14); DB -> HL7: Fuxing refers a patient down
(a ``ZZ_SQD`` row), then marks the row withdrawn (``ZT`` 9 with ``CXSJ``/``CXYY``/``CXXH``).
Each time the other HIS shows the referral withdrawn with the reason, field by field, and the
Task / ServiceRequest on both nodes are ``cancelled`` / ``revoked`` (checked with the R4B
models); a resent message or a re-edited row is not applied twice (audit count); a withdrawal
of an unknown referral and one after the patient arrived are refused naming record and field,
quarantined and audited; the receiving clinician's page shows the withdrawal and its reason.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from fhir.resources.R4B.servicerequest import ServiceRequest
from fhir.resources.R4B.task import Task
from sqlalchemy import select

from adapters.his_hl7 import messages
from adapters.hl7v2 import charset
from adapters.slips import AcceptanceSlip, ReferralSlip
from bridge.audit.tables import AuditRecord
from bridge.store.db import Store
from bridge.store.tables import QUARANTINE
from simulators.his_db import HisDb
from simulators.his_hl7 import VendorHis
from tests.harness import Alliance, NodeProcess, wait_for
from tests.test_his_hl7 import hl7_centre_db_core, one, referral_row, slip
from tests.test_web import Browser

pytestmark = pytest.mark.slow

REASON_UP = "患者家属撤回：改去他院|就诊 ^_^"
REASON_DOWN = "患者要求留院观察，家属撤回下转"


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Alliance, VendorHis, HisDb]]:
    with hl7_centre_db_core(tmp_path_factory.mktemp("his-cancel")) as world:
        yield world


# -- helpers -------------------------------------------------------------------------------------


def thread_of_slip(node: NodeProcess, slip_no: str, side: str) -> str:
    def find() -> str:
        for r in node.api("GET", "/local/v1/referrals"):
            if r["side"] == side:
                sr = node.api("GET", f"/fhir/ServiceRequest/{r['sr_id']}", role="clinician")
                if any(i.get("value") == slip_no for i in sr.get("identifier") or []):
                    return str(r["thread"])
        return ""

    return wait_for(find, timeout=60, what=f"the {side} referral of slip {slip_no}")


def fhir_pair(node: NodeProcess, thread: str) -> tuple[Task, ServiceRequest]:
    row = referral_row(node, thread)
    task = Task.model_validate(node.api("GET", f"/fhir/Task/{row['task_id']}", role="clinician"))
    sr = ServiceRequest.model_validate(
        node.api("GET", f"/fhir/ServiceRequest/{row['sr_id']}", role="clinician")
    )
    return task, sr


def assert_withdrawn(node: NodeProcess, thread: str, reason: str) -> None:
    wait_for(
        lambda: referral_row(node, thread).get("status") == "cancelled",
        timeout=60,
        what=f"the referral cancelled at {node.plan.node_id}",
    )
    task, sr = fhir_pair(node, thread)
    assert task.status == "cancelled" and sr.status == "revoked"
    assert task.statusReason is not None and task.statusReason.text == reason
    codes = {c.code for c in task.businessStatus.coding}
    assert "cancelled" in codes and "6.0" in codes  # alliance step and BSeR code
    assert referral_row(node, thread)["reason"] == reason


def audit_rows(node: NodeProcess, **where: str) -> list[Any]:
    audit = AuditRecord.__table__  # type: ignore[attr-defined]
    store = Store(node.plan.storage_dsn)
    try:
        with store.read() as conn:
            return list(
                conn.execute(
                    select(audit).where(*(audit.c[k] == v for k, v in where.items()))
                ).all()
            )
    finally:
        store.dispose()


def cancel_steps(node: NodeProcess, thread: str) -> int:
    """Audited 'cancel' steps the adapter took for the thread (the referrer's side)."""
    return len(
        [
            a
            for a in audit_rows(
                node, action="referral", thread=thread, kind="referral.cancel", actor="adapter:his"
            )
            if '"cancel"' in a.resource
        ]
    )


def quarantined(node: NodeProcess, needle: str) -> list[Any]:
    store = Store(node.plan.storage_dsn)
    try:
        with store.read() as conn:
            return [
                r
                for r in conn.execute(
                    select(QUARANTINE).where(QUARANTINE.c.source == "adapter:his")
                ).all()
                if needle in r.message
            ]
    finally:
        store.dispose()


def quarantine_audited(node: NodeProcess, needle: str) -> int:
    return len(
        [
            a
            for a in audit_rows(node, action="quarantined", actor="adapter:his")
            if needle in a.resource
        ]
    )


def cancel_bytes(his: VendorHis, note: messages.CancelNote, control: str) -> bytes:
    from datetime import UTC, datetime

    text = messages.cancel_message(his.header, note, control, datetime.now(UTC))
    return charset.encode(text, his.codec)


def down_slip(slip_no: str) -> ReferralSlip:
    """Fuxing refers a stable patient down to the centre, in Fuxing's own codes."""
    return replace(
        slip(
            slip_no=slip_no,
            patient_name="赵億乗",
            mrn=f"FX-{slip_no}",
            id_number="110102196001011234",
        ),
        kind="down-outpatient",
        to_member="yuetan-chc",
        diagnosis_code="FXZD0101",
        department_code="0200",
        urgent=False,
    )


def refer_from_hl7(
    chc: VendorHis, core_db: HisDb, yt: NodeProcess, slip_no: str
) -> tuple[Any, str]:
    """The centre's HL7 HIS refers up; the referral is in the core's database HIS. (slip,
    thread)"""
    s = slip(slip_no=slip_no, patient_name="王億乗")
    assert chc.refer(s).code == "AA"
    wait_for(
        lambda: [x for x in core_db.received_referrals() if x.slip_no == s.slip_no],
        timeout=60,
        what="referral in the core's database HIS",
    )
    return s, thread_of_slip(yt, s.slip_no, "referrer")


# -- HL7 v2 HIS -> intermediate-database HIS ------------------------------------------------------


def test_hl7_his_withdraws_and_the_db_his_shows_it(pair: Any) -> None:
    alliance, chc, core_db = pair
    fx, yt = alliance.node("fuxing"), alliance.node("yuetan-chc")
    s, thread = refer_from_hl7(chc, core_db, yt, "YTCX-1")
    assert core_db.thread_of(s.slip_no) == thread
    wait_for(
        lambda: referral_row(yt, thread).get("status") == "received",
        timeout=60,
        what="received at the core",
    )

    raw = cancel_bytes(
        chc, messages.CancelNote(s.slip_no, REASON_UP, "2026-11-23T09:30:00+08:00"), "CX-UP-1"
    )
    answer = chc.send_raw(raw, "cancel", s.slip_no)
    assert (answer.code, answer.control_id) == ("AA", "CX-UP-1")
    # the core's database HIS: the received row marked withdrawn, reason and time, unread
    state = wait_for(
        lambda: [
            r for r in core_db.received_states() if r["slip_no"] == s.slip_no and r["state"] == "9"
        ],
        timeout=60,
        what="the withdrawal in the core's database HIS",
    )
    assert len(state) == 1
    assert state[0]["thread"] == thread and state[0]["reason"] == REASON_UP
    assert state[0]["unread"] == "0" and state[0]["cancelled_at"]
    assert_withdrawn(fx, thread, REASON_UP)
    assert_withdrawn(yt, thread, REASON_UP)

    # the same message again (the HIS lost our ACK): same answer, nothing applied twice
    again = chc.send_raw(raw, "cancel", s.slip_no)
    assert (again.code, again.control_id) == ("AA", "CX-UP-1")
    assert cancel_steps(yt, thread) == 1
    # a second withdrawal (new MSH-10) of a referral already withdrawn is refused, RF1-6
    late = chc.cancel(s.slip_no, "再次撤回", control_id="CX-UP-2")
    assert late.code == "AE" and late.text.startswith("RF1-6")
    assert cancel_steps(yt, thread) == 1
    assert len(quarantined(yt, "record MSH-10 CX-UP-2 field RF1-6")) == 1
    # the receiving clinician's page shows the withdrawal and its reason
    page = Browser(fx).login("clinician").get(f"/ui/referrals/{thread}")
    assert "已撤销" in page and "改去他院|就诊" in page
    assert [r for r in core_db.received_states() if r["slip_no"] == s.slip_no] == state


def test_hl7_withdrawal_of_unknown_or_malformed_is_nakked_and_quarantined(pair: Any) -> None:
    alliance, chc, _core_db = pair
    yt = alliance.node("yuetan-chc")
    raw = cancel_bytes(chc, messages.CancelNote("NO-SUCH-SLIP", "撤回"), "CX-UNKNOWN")
    answer = chc.send_raw(raw, "cancel")
    assert answer.code == "AE" and answer.text.startswith("RF1-6")
    assert chc.send_raw(raw, "cancel").code == "AE"  # resent: same answer, held once
    held = quarantined(yt, "record MSH-10 CX-UNKNOWN ")
    assert len(held) == 1 and bytes(held[0].raw) == raw
    assert "field RF1-6" in held[0].message and "NO-SUCH-SLIP" in held[0].message
    assert quarantine_audited(yt, "MSH-10 CX-UNKNOWN ") == 1
    # no reason (neither NTE 1R nor RF1-10)
    text = charset.decode(cancel_bytes(chc, messages.CancelNote("YTCX-1", "x"), "CX-NOREASON"))[0]
    raw = charset.encode(text.split("\rNTE|")[0] + "\r", chc.codec)
    answer = chc.send_raw(raw, "cancel")
    assert answer.code == "AE" and answer.text.startswith("NTE-3")
    assert len(quarantined(yt, "record MSH-10 CX-NOREASON field NTE-3")) == 1


def test_hl7_withdrawal_after_arrival_is_refused(pair: Any) -> None:
    alliance, chc, core_db = pair
    fx, yt = alliance.node("fuxing"), alliance.node("yuetan-chc")
    s, thread = refer_from_hl7(chc, core_db, yt, "YTCX-LATE")
    core_db.accept(
        AcceptanceSlip(
            slip_no=s.slip_no,
            accepted=True,
            appointment_at="2026-11-24T09:00:00+08:00",
            department_code="0301",
            bed_no="12",
            doctor="张主任",
        )
    )
    wait_for(
        lambda: referral_row(fx, thread).get("status") == "accepted",
        timeout=60,
        what="accepted at the core",
    )
    # the patient is admitted at the core (the clinician takes 'arrive' on the node)
    task = fx.api("GET", f"/fhir/Task/{referral_row(fx, thread)['task_id']}", role="clinician")
    fx.api("PUT", f"/fhir/Task/{task['id']}", {**task, "status": "in-progress"}, role="clinician")
    wait_for(
        lambda: referral_row(yt, thread).get("status") == "in-progress",
        timeout=60,
        what="the arrival mirrored at the centre",
    )
    answer = chc.cancel(s.slip_no, "撤回", control_id="CX-LATE")
    assert answer.code == "AE" and answer.text.startswith("RF1-6")
    assert "in-progress" in answer.text
    held = quarantined(yt, "record MSH-10 CX-LATE field RF1-6")
    assert len(held) == 1 and held[0].code == "HT-REF-TRANSITION"
    assert cancel_steps(yt, thread) == 0
    for node in (fx, yt):
        t, sr = fhir_pair(node, thread)
        assert t.status == "in-progress" and sr.status == "active"
    assert [r["state"] for r in core_db.received_states() if r["slip_no"] == s.slip_no] == ["1"]


# -- intermediate-database HIS -> HL7 v2 HIS ------------------------------------------------------


def test_db_his_withdraws_and_the_hl7_his_gets_ref_i14(pair: Any) -> None:
    alliance, chc, core_db = pair
    fx, yt = alliance.node("fuxing"), alliance.node("yuetan-chc")
    s = down_slip("FXCX-1")
    rid = core_db.write_referral(s)
    got = one(chc, "referral", s.slip_no)
    thread = got[0].thread
    assert thread_of_slip(fx, s.slip_no, "referrer") == thread
    wait_for(
        lambda: referral_row(fx, thread).get("status") == "received",
        timeout=60,
        what="received at the centre",
    )
    core_db.cancel_referral(rid, REASON_DOWN, at="2026-11-23T10:15:00+08:00")
    cancels = one(chc, "cancel", s.slip_no)
    assert len(cancels) == 1
    note = cancels[0].slip
    assert (note.slip_no, note.reason, note.thread) == (s.slip_no, REASON_DOWN, thread)
    assert cancels[0].thread == thread and note.cancelled_at
    assert_withdrawn(fx, thread, REASON_DOWN)
    assert_withdrawn(yt, thread, REASON_DOWN)
    # the HIS edits the withdrawn row again (a new CXXH): taken once, sent once
    core_db.cancel_referral(rid, REASON_DOWN + "（补充）")
    marker = core_db.write_referral(down_slip("FXCX-MARK"))  # a later row: the poll went past
    one(chc, "referral", "FXCX-MARK")
    assert marker > rid
    assert cancel_steps(fx, thread) == 1
    assert len([r for r in chc.received("cancel") if r.slip_no == s.slip_no]) == 1
    assert chc.attempts()[cancels[0].control_id] == (1, "AA")
    page = Browser(yt).login("clinician").get(f"/ui/referrals/{thread}")
    assert "已撤销" in page and REASON_DOWN in page


def test_db_withdrawal_of_unsent_or_arrived_referral_is_quarantined(pair: Any) -> None:
    alliance, chc, core_db = pair
    fx, yt = alliance.node("fuxing"), alliance.node("yuetan-chc")
    # a referral row that was never sent (no consent: quarantined), then withdrawn
    unsent = core_db.write_referral(down_slip("FXCX-UNSENT"), TYR="")
    wait_for(
        lambda: quarantined(fx, f"record ZZ_SQD#{unsent} field TYR"),
        timeout=60,
        what="the row without consent held",
    )
    core_db.cancel_referral(unsent, "撤回")
    held = wait_for(
        lambda: quarantined(fx, f"record ZZ_SQD#{unsent} field ZZDH"),
        timeout=60,
        what="the withdrawal of an unsent referral held",
    )
    assert len(held) == 1 and "no referral was sent" in held[0].message
    assert held[0].kind == "his-db.cancel"
    assert quarantine_audited(fx, f"record ZZ_SQD#{unsent} field ZZDH") == 1
    # the HIS fills the consent in; IT replays the referral, then the withdrawal: it goes once
    from sqlalchemy import update

    from simulators.his_db import ZZ_SQD

    with core_db.tx() as conn:
        conn.execute(update(ZZ_SQD).where(ZZ_SQD.c.ID == unsent).values(TYR="患者本人"))
    early = fx.api("POST", f"/local/v1/quarantine/{held[0].id}/replay")
    assert early["ok"] is False and "no referral was sent" in early["result"]
    first = quarantined(fx, f"record ZZ_SQD#{unsent} field TYR")[0]
    assert fx.api("POST", f"/local/v1/quarantine/{first.id}/replay")["ok"] is True
    assert fx.api("POST", f"/local/v1/quarantine/{held[0].id}/replay")["ok"] is True
    note = one(chc, "cancel", "FXCX-UNSENT")[0].slip
    assert note.reason == "撤回" and note.thread == one(chc, "referral", "FXCX-UNSENT")[0].thread
    assert_withdrawn(fx, note.thread, "撤回")
    assert cancel_steps(fx, note.thread) == 1
    fx.api("POST", f"/local/v1/quarantine/{held[0].id}/replay")  # replayed twice: once sent
    assert cancel_steps(fx, note.thread) == 1
    assert len([r for r in chc.received("cancel") if r.slip_no == "FXCX-UNSENT"]) == 1
    # a referral whose patient already arrived at the centre (A04 naming the referral)
    s = down_slip("FXCX-LATE")
    rid = core_db.write_referral(s)
    thread = one(chc, "referral", s.slip_no)[0].thread
    assert (
        chc.accept(
            AcceptanceSlip(
                slip_no=s.slip_no,
                accepted=True,
                appointment_at="2026-11-24T09:00:00+08:00",
                department_code="KS01",
                doctor="李医生",
            ),
            thread,
        ).code
        == "AA"
    )
    wait_for(
        lambda: referral_row(fx, thread).get("status") == "accepted",
        timeout=60,
        what="accepted, mirrored at the core",
    )
    assert (
        chc.adt(
            "A04",
            "YT-LATE",
            name="赵億乗",
            gender="female",
            birth_date="1950-03-15",
            referral_id=thread,
        ).code
        == "AA"
    )
    wait_for(
        lambda: referral_row(fx, thread).get("status") == "in-progress",
        timeout=60,
        what="the arrival mirrored at the core",
    )
    core_db.cancel_referral(rid, "撤回")
    held = wait_for(
        lambda: quarantined(fx, f"record ZZ_SQD#{rid} field ZT"),
        timeout=60,
        what="the late withdrawal held",
    )
    assert len(held) == 1 and "in-progress" in held[0].message
    assert held[0].code == "HT-REF-TRANSITION"
    assert cancel_steps(fx, thread) == 0
    for node in (fx, yt):
        t, sr = fhir_pair(node, thread)
        assert t.status == "in-progress" and sr.status == "active"
    assert not [r for r in chc.received("cancel") if r.slip_no == s.slip_no]
    assert fx.cli("audit", "verify").returncode == 0
    assert yt.cli("audit", "verify").returncode == 0
