"""The two-way referral loop across two real node processes, step by step on both sides."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from bridge.fhirstore import store as fstore
from bridge.store.db import Store
from tests.harness import Alliance, ApiError, NodeProcess, wait_for
from tests.referrals import referral, return_bundle

pytestmark = pytest.mark.slow

MEMBERS = [
    {"id": "core", "zh": "复兴医院", "en": "Fuxing Hospital", "role": "core"},
    {"id": "chc", "zh": "月坛社区卫生服务中心", "en": "Yuetan CHC", "role": "community"},
]
REFERRAL_KINDS = ["referral.request", "referral.status", "referral.cancel", "referral.return"]
RULES = [
    {"from": "chc", "to": "core", "kinds": REFERRAL_KINDS},
    {"from": "core", "to": "chc", "kinds": REFERRAL_KINDS},
]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory):
    a = Alliance(tmp_path_factory.mktemp("loop") / "alliance", MEMBERS, RULES)
    a.start("core", "chc")
    yield a
    a.stop_all()


def state(node: NodeProcess, thread: str) -> dict[str, Any] | None:
    rows = [r for r in node.api("GET", "/local/v1/referrals") if r["thread"] == thread]
    return rows[0] if rows else None


def resource(node: NodeProcess, rtype: str, rid: str) -> dict[str, Any]:
    s = Store(node.plan.storage_dsn)
    try:
        with s.read() as conn:
            return fstore.get(conn, rtype, rid)
    finally:
        s.dispose()


def thread_resources(node: NodeProcess, thread: str, rtype: str) -> list[dict[str, Any]]:
    s = Store(node.plan.storage_dsn)
    try:
        with s.read() as conn:
            return fstore.by_thread(conn, thread, rtype)
    finally:
        s.dispose()


def both(pair: Alliance, thread: str, status: str, step: str | None = None) -> None:
    def same() -> bool:
        got = [state(pair.node(n), thread) for n in ("chc", "core")]
        return all(g and g["status"] == status and (step is None or g["step"] == step) for g in got)

    wait_for(same, timeout=30, what=f"both sides at {status}/{step}")
    tasks = [
        resource(pair.node(n), "Task", state(pair.node(n), thread)["task_id"])
        for n in ("chc", "core")
    ]
    assert tasks[0]["status"] == tasks[1]["status"] == status


def submit(node: NodeProcess, bundle: dict[str, Any]) -> dict[str, Any]:
    return node.api("POST", "/local/v1/referrals", bundle, role="clinician")


def step(node: NodeProcess, thread: str, event: str, **body: Any) -> dict[str, Any]:
    return node.api("POST", f"/local/v1/referrals/{thread}/steps/{event}", body, role="clinician")


def new_thread(node: NodeProcess, bundle: dict[str, Any]) -> str:
    before = {r["thread"] for r in node.api("GET", "/local/v1/referrals")}
    submit(node, bundle)
    after = [r for r in node.api("GET", "/local/v1/referrals") if r["thread"] not in before]
    assert len(after) == 1
    return after[0]["thread"]


def test_inpatient_up_referral_full_loop(pair: Alliance) -> None:
    chc, core = pair.node("chc"), pair.node("core")
    thread = new_thread(chc, referral("up-inpatient", "core", icd10="I10"))
    both(pair, thread, "received", "received")
    here = state(core, thread)
    assert here["side"] == "receiver" and here["kind"] == "up-inpatient"
    assert here["pilot"] is None  # pilot is set on the referrer's side from its reason codes
    assert state(chc, thread)["pilot"] == "hypertension"
    # the core hospital got the referral slip contents, with the patient but no ID number
    sr = resource(core, "ServiceRequest", here["sr_id"])
    assert sr["note"][0]["text"] == "血压控制不佳，请专科评估"
    assert sr["reasonCode"][0]["coding"][0]["code"] == "I10"
    task = resource(core, "Task", here["task_id"])
    patient = resource(core, "Patient", task["for"]["reference"].split("/")[1])
    assert patient["name"][0]["text"] == "王秀英"
    systems = [i["system"] for i in patient["identifier"]]
    assert "urn:oid:2.16.156.10011.1.3" not in systems
    assert "urn:hutong:patient-hash" in systems
    assert here["patient_hash"] == state(chc, thread)["patient_hash"]
    # acceptance slip: bed, department, doctor
    outputs = [
        {"type": {"text": "bed"}, "valueString": "心内科 12床"},
        {"type": {"text": "department"}, "valueString": "心血管内科"},
        {"type": {"text": "doctor"}, "valueString": "张主任"},
        {"type": {"text": "appointment"}, "valueDateTime": "2026-11-21T10:00:00+08:00"},
    ]
    step(core, thread, "accept", outputs=outputs)
    both(pair, thread, "accepted", "scheduled")
    task = resource(chc, "Task", state(chc, thread)["task_id"])
    assert [o.get("valueString") or o.get("valueDateTime") for o in task["output"]] == [
        "心内科 12床",
        "心血管内科",
        "张主任",
        "2026-11-21T10:00:00+08:00",
    ]
    fill = [i for i in task["identifier"] if i["type"]["coding"][0]["code"] == "FILL"]
    assert len(fill) == 1 and fill[0]["value"].startswith("JZ")
    step(core, thread, "arrive")
    both(pair, thread, "in-progress", "arrived")
    core_task = resource(core, "Task", here["task_id"])
    submit(core, return_bundle(here["sr_id"], core_task["for"]["reference"]))
    both(pair, thread, "completed", "return-received")
    # the return landed at the referrer: summary, lab report with results, prescriptions
    comps = [c for c in thread_resources(chc, thread, "Composition") if c["title"] == "出院小结"]
    assert len(comps) == 1
    assert "氨氯地平" in comps[0]["section"][0]["text"]["div"]
    reports = thread_resources(chc, thread, "DiagnosticReport")
    assert len(reports) == 1 and len(reports[0]["result"]) == 2
    values = sorted(
        o["valueQuantity"]["value"] for o in thread_resources(chc, thread, "Observation")
    )
    assert values == [5.4, 8.9]
    meds = thread_resources(chc, thread, "MedicationRequest")
    assert meds[0]["medicationCodeableConcept"]["coding"][0]["display"] == "氨氯地平片 5mg"
    # references in what arrived point at the referrer's own patient record
    chc_patient = resource(chc, "Task", state(chc, thread)["task_id"])["for"]["reference"]
    assert {o["subject"]["reference"] for o in thread_resources(chc, thread, "Observation")} == {
        chc_patient
    }
    # every step is in both audit chains
    for node in (chc, core):
        rows = node.cli("audit", "export", "--format", "ndjson").stdout.splitlines()
        events = [e for e in map(orjson.loads, rows) if _thread(e) == thread]
        steps = {x["valueString"] for e in events for x in _ext(e) if x["url"].endswith("event")}
        assert {"request", "received", "accept", "arrive", "return", "return-received"} <= steps, (
            node.node_id,
            steps,
        )
        assert node.cli("audit", "verify").returncode == 0


@pytest.mark.parametrize("kind", ["up-outpatient", "up-exam"])
def test_other_up_kinds_complete(pair: Alliance, kind: str) -> None:
    chc, core = pair.node("chc"), pair.node("core")
    thread = new_thread(chc, referral(kind, "core", icd10="E11"))
    both(pair, thread, "received")
    assert state(chc, thread)["pilot"] == "diabetes"
    step(
        core,
        thread,
        "accept",
        outputs=[{"type": {"text": "appointment"}, "valueDateTime": "2026-11-22T08:00:00+08:00"}],
    )
    step(core, thread, "arrive")
    both(pair, thread, "in-progress")
    here = state(core, thread)
    task = resource(core, "Task", here["task_id"])
    submit(core, return_bundle(here["sr_id"], task["for"]["reference"], discharge=False))
    both(pair, thread, "completed", "return-received")
    downs = [s for s in thread_resources(chc, thread, "ServiceRequest") if s.get("basedOn")]
    assert downs[0]["code"]["coding"][0]["code"] == "down-outpatient"


@pytest.mark.parametrize("kind", ["down-outpatient", "down-discharge"])
def test_down_referral_from_core_to_community_completes(pair: Alliance, kind: str) -> None:
    chc, core = pair.node("chc"), pair.node("core")
    thread = new_thread(core, referral(kind, "chc", icd10="I63.9", mrn="FX778"))
    both(pair, thread, "received")
    assert state(core, thread)["pilot"] == "cerebrovascular"
    assert state(chc, thread)["side"] == "receiver"
    step(
        chc,
        thread,
        "accept",
        outputs=[{"type": {"text": "doctor"}, "valueString": "社区全科 刘医生"}],
    )
    both(pair, thread, "accepted")
    step(chc, thread, "arrive")
    here = state(chc, thread)
    task = resource(chc, "Task", here["task_id"])
    submit(chc, return_bundle(here["sr_id"], task["for"]["reference"], discharge=False))
    both(pair, thread, "completed", "return-received")
    assert [
        c["title"]
        for c in thread_resources(core, thread, "Composition")
        if c["title"] == "出院小结"
    ] == ["出院小结"]


def test_rejection_with_reason(pair: Alliance) -> None:
    chc, core = pair.node("chc"), pair.node("core")
    thread = new_thread(chc, referral("up-exam", "core"))
    both(pair, thread, "received")
    step(core, thread, "reject", reason="本院暂无该项检查设备")
    both(pair, thread, "rejected", "rejected")
    assert state(chc, thread)["reason"] == "本院暂无该项检查设备"
    task = resource(chc, "Task", state(chc, thread)["task_id"])
    assert task["statusReason"]["text"] == "本院暂无该项检查设备"
    # an illegal transition is refused and changes nothing
    with pytest.raises(ApiError) as exc:
        step(core, thread, "arrive")
    assert exc.value.status == 409
    assert b"HT-REF-TRANSITION" in exc.value.body
    assert state(core, thread)["status"] == "rejected"


def test_cancellation_by_referrer(pair: Alliance) -> None:
    chc, core = pair.node("chc"), pair.node("core")
    thread = new_thread(chc, referral("up-outpatient", "core"))
    both(pair, thread, "received")
    step(chc, thread, "cancel", reason="患者决定暂不转诊")
    both(pair, thread, "cancelled", "cancelled")
    sr = resource(core, "ServiceRequest", state(core, thread)["sr_id"])
    assert sr["status"] == "revoked"
    with pytest.raises(ApiError) as exc:
        step(core, thread, "accept")
    assert exc.value.status == 409


def test_missing_consent_refused_and_nothing_sent(pair: Alliance) -> None:
    chc = pair.node("chc")
    before = len(chc.api("GET", "/local/v1/referrals"))
    with pytest.raises(ApiError) as exc:
        submit(chc, referral("up-inpatient", "core", consent=False))
    assert exc.value.status == 422
    assert b"HT-REF-CONSENT" in exc.value.body
    assert len(chc.api("GET", "/local/v1/referrals")) == before


def test_bad_token_and_wrong_role(pair: Alliance) -> None:
    chc = pair.node("chc")
    with pytest.raises(ApiError) as exc:
        chc.api("POST", "/local/v1/referrals", referral("up-exam", "core"), role="auditor")
    assert exc.value.status == 403


def _ext(event: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for x in event.get("extension", []):
        out.append(x)
        out.extend(x.get("extension", []))
    for ent in event.get("entity", []):
        for d in ent.get("detail", []):
            out.append({"url": "detail:" + d.get("type", ""), "valueString": d.get("valueString")})
    return out


def _thread(event: dict[str, Any]) -> str | None:
    for x in _ext(event):
        if x["url"].endswith("thread"):
            return x.get("valueString")
    return None


def test_unaccepted_referral_raises_a_reminder(tmp_path: Path) -> None:
    a = Alliance(tmp_path / "alliance", MEMBERS, RULES)
    core_file = a.files["core"]
    core_file.write_text(
        core_file.read_text()
        + (
            "\n[referral]\naccept_timeout_s = 1.0\ngreen_channel_timeout_s = 0.5\n"
            "reminder_every_s = 0.5\n"
        )
    )
    a.start("core", "chc")
    try:
        chc, core = a.node("chc"), a.node("core")
        thread = new_thread(chc, referral("up-outpatient", "core", priority="stat"))
        assert state(chc, thread)["green_channel"] is True
        reminders = wait_for(
            lambda: core.api("GET", "/local/v1/reminders"), timeout=20, what="a reminder"
        )
        assert [r["thread"] for r in reminders] == [thread]
        assert reminders[0]["status"] == "received"
        rows = core.cli("audit", "export", "--format", "csv").stdout
        assert sum(1 for line in rows.splitlines() if ",reminder," in line) == 1
        # accepting clears it from the IT list
        step(core, thread, "accept")
        assert core.api("GET", "/local/v1/reminders") == []
    finally:
        a.stop_all()
