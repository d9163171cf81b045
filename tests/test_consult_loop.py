"""The consultation loop across real node processes, through the hospital-facing FHIR API:
every step field by field on both sides (the Task status equal at each), return for completion
and resubmission, cancellation, missing consent, a step from a member outside the consultation,
an imaging reading's report, and a report turned into a referral ``basedOn`` the consultation.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import text

from bridge.consult.codes import STEP_SYSTEM
from bridge.referral import resources as R
from bridge.store.db import Store
from tests import consults
from tests.harness import Alliance, NodeProcess, wait_for

pytestmark = pytest.mark.slow

MEMBERS = [
    {"id": "core", "zh": "复兴医院", "en": "Fuxing Hospital", "role": "core"},
    {"id": "chc", "zh": "月坛社区卫生服务中心", "en": "Yuetan CHC", "role": "community"},
    {"id": "gw", "zh": "广外医院", "en": "Guangwai Hospital", "role": "secondary"},
]
CONSULT = ["consult.request", "consult.status", "consult.report"]
REFERRAL = ["referral.request", "referral.status", "referral.cancel", "referral.return"]
RULES = [
    {"from": "chc", "to": "core", "kinds": [*CONSULT, *REFERRAL]},
    {"from": "core", "to": "chc", "kinds": [*CONSULT, *REFERRAL]},
    {"from": "gw", "to": "core", "kinds": CONSULT},
    {"from": "gw", "to": "chc", "kinds": CONSULT},
]


@pytest.fixture(scope="module")
def al(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Alliance]:
    a = Alliance(tmp_path_factory.mktemp("consult") / "alliance", MEMBERS, RULES)
    a.start("core", "chc", "gw")
    yield a
    a.stop_all()


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=60) as c:
        yield c


def sql(node: NodeProcess, query: str, **params: Any) -> list[dict[str, Any]]:
    s = Store(node.plan.storage_dsn)
    try:
        with s.read() as conn:
            return [dict(r._mapping) for r in conn.execute(text(query), params)]
    finally:
        s.dispose()


class Fhir:
    def __init__(self, client: httpx.Client, node: NodeProcess) -> None:
        self.client, self.node = client, node

    def call(self, method: str, path: str, body: Any = None, params: Any = None) -> httpx.Response:
        return self.client.request(
            method,
            self.node.local_url + "/fhir" + path,
            params=params,
            headers={
                "Authorization": f"Bearer {self.node.token('clinician')}",
                "Content-Type": "application/fhir+json",
                "Accept": "application/fhir+json",
            },
            content=json.dumps(body).encode() if body is not None else None,
        )

    def ok(self, method: str, path: str, body: Any = None, params: Any = None) -> Any:
        r = self.call(method, path, body, params)
        assert r.status_code in (200, 201), r.text
        return r.json()

    def op(self, task_id: str, step: str, body: Any = None) -> dict[str, Any]:
        return dict(self.ok("POST", f"/Task/{task_id}/${step}", body))

    def read(self, reference: str) -> dict[str, Any]:
        return dict(self.ok("GET", f"/{reference}"))


def row(node: NodeProcess, thread: str) -> dict[str, Any] | None:
    rows = [r for r in node.api("GET", "/local/v1/consultations") if r["thread"] == thread]
    return rows[0] if rows else None


def both(al: Alliance, client: httpx.Client, thread: str, status: str, step: str) -> None:
    """Wait until both sides are at (status, step); then their Tasks, read over /fhir, agree."""

    def there() -> bool:
        got = [row(al.node(n), thread) for n in ("chc", "core")]
        return all(g and (g["status"], g["step"]) == (status, step) for g in got)

    wait_for(there, timeout=40, what=f"both sides at {status}/{step}")
    tasks = [Fhir(client, al.node(n)).read(f"Task/{thread}") for n in ("chc", "core")]
    for t in tasks:
        assert t["status"] == status
        assert t["businessStatus"]["coding"][0] == {
            "system": STEP_SYSTEM,
            "code": step,
            "display": t["businessStatus"]["coding"][0]["display"],
        }
    assert tasks[0].get("statusReason") == tasks[1].get("statusReason")
    assert tasks[0].get("output") == tasks[1].get("output")


def request(fhir: Fhir, bundle: dict[str, Any]) -> str:
    answer = fhir.ok("POST", "", bundle)
    assert answer["type"] == "transaction-response"
    task_ref = next(
        e["response"]["location"]
        for e in answer["entry"]
        if e["response"]["location"].startswith("ServiceRequest/")
    )
    sr_id = task_ref.split("/")[1]
    found = fhir.ok("GET", "/Task", params={"focus": f"ServiceRequest/{sr_id}"})
    return str(found["entry"][0]["resource"]["id"])


def test_mdt_loop_with_return_and_resubmission(al: Alliance, client: httpx.Client) -> None:
    chc, core = Fhir(client, al.node("chc")), Fhir(client, al.node("core"))
    thread = request(chc, consults.consultation("mdt", "core", priority="urgent"))
    both(al, client, thread, "received", "received")
    centre_patient = core.read(f"Task/{thread}")["for"]["reference"]
    inviter_patient = chc.read(f"Task/{thread}")["for"]["reference"]
    # pre-review: returned for completion by PUT Task (on-hold with what is missing)
    task = core.read(f"Task/{thread}")
    task["status"] = "on-hold"
    task["statusReason"] = {"text": "缺肺功能报告与病理切片说明"}
    core.ok("PUT", f"/Task/{thread}", task)
    both(al, client, thread, "on-hold", "returned")
    assert row(al.node("chc"), thread)["reason"] == "缺肺功能报告与病理切片说明"
    chc.op(
        thread,
        "resubmit",
        {
            "resourceType": "Parameters",
            "parameter": [{"name": "resources", "resource": consults.records(inviter_patient)}],
        },
    )
    both(al, client, thread, "received", "resubmitted")
    sr_id = row(al.node("core"), thread)["sr_id"]
    sr = core.read(f"ServiceRequest/{sr_id}")
    doc = next(
        s["reference"]
        for s in sr["supportingInfo"]
        if s["reference"].startswith("DocumentReference/")
    )
    assert core.read(doc)["subject"] == {"reference": centre_patient}
    # scheduled: three experts and the video link
    core.op(thread, "schedule", consults.schedule("core", 3))
    both(al, client, thread, "accepted", "scheduled")
    appt_id = row(al.node("chc"), thread)["appointment_id"]
    appt = chc.read(f"Appointment/{appt_id}")
    assert appt["status"] == "booked"
    assert appt["extension"][0]["valueUrl"] == consults.MEETING
    assert appt["start"] == "2026-12-05T14:00:00+08:00"
    experts = [
        p["actor"]["reference"]
        for p in appt["participant"]
        if p["type"][0]["coding"][0]["code"] == "CON"
    ]
    assert len(experts) == 3
    assert core.read(experts[0])["specialty"][0]["text"] == "呼吸内科"
    assert chc.read(experts[0])["specialty"][0]["text"] == "呼吸内科"
    core.op(thread, "start")
    both(al, client, thread, "in-progress", "in-consultation")
    core.op(thread, "report", consults.report(centre_patient))
    both(al, client, thread, "in-progress", "reported")
    assert row(al.node("chc"), thread)["report_refs"] is None  # the draft stays at the centre
    core.op(thread, "release")
    both(al, client, thread, "completed", "report-received")
    refs = row(al.node("chc"), thread)["report_refs"].split()
    comp = chc.read(next(r for r in refs if r.startswith("Composition/")))
    assert comp["status"] == "final" and comp["title"] == "远程会诊报告"
    assert comp["subject"] == {"reference": inviter_patient}
    assert comp["section"][1]["text"]["div"].endswith("建议行胸腔镜下右肺上叶楔形切除术</div>")
    cond = chc.read(next(r for r in refs if r.startswith("Condition/")))
    assert cond["code"]["coding"][0]["code"] == "C34.1"
    chc.op(thread, "follow-up", consults.follow_up(inviter_patient))
    both(al, client, thread, "completed", "follow-up-planned")
    chc.op(thread, "close")
    both(al, client, thread, "completed", "closed")
    # the search the centre's pages and the HIS use: by status, patient, expert, date
    hit = core.ok(
        "GET",
        "/ServiceRequest",
        params={
            "category": "http://snomed.info/sct|11429006",
            "expert": experts[1],
            "patient": centre_patient,
            "authored": f"ge{datetime.now(UTC):%Y-%m-%d}",
            "status": "completed",
        },
    )
    assert [e["resource"]["id"] for e in hit["entry"]] == [sr_id]
    closed = core.ok("GET", "/Task", params={"business-status": f"{STEP_SYSTEM}|closed"})
    assert thread in [e["resource"]["id"] for e in closed["entry"]]
    # the steps in order on both sides, each from the side that took it
    for n in ("chc", "core"):
        steps = [
            r["event"]
            for r in sql(
                al.node(n),
                "SELECT event FROM consultation_step WHERE thread = :t ORDER BY id",
                t=thread,
            )
        ]
        assert steps == [
            "request",
            "received",
            "return",
            "resubmit",
            "schedule",
            "start",
            "report",
            "release",
            "report-received",
            "follow-up",
            "close",
        ]
    wire = sql(al.node("chc"), "SELECT kind FROM outbox WHERE thread = :t ORDER BY id", t=thread)
    assert [w["kind"] for w in wire] == [
        "consult.request",
        "consult.status",
        "consult.status",
        "consult.status",
        "consult.status",
    ]
    assert [
        w["kind"]
        for w in sql(
            al.node("core"),
            "SELECT kind FROM outbox WHERE thread = :t AND kind = 'consult.report'",
            t=thread,
        )
    ] == ["consult.report"]


def test_missing_consent_cancel_and_an_outsiders_step(al: Alliance, client: httpx.Client) -> None:
    chc, core = Fhir(client, al.node("chc")), Fhir(client, al.node("core"))
    before = len(al.node("chc").api("GET", "/local/v1/consultations"))
    r = chc.call("POST", "", consults.consultation("general", "core", consent=False))
    assert r.status_code == 422 and "HT-REF-CONSENT" in r.text
    assert len(al.node("chc").api("GET", "/local/v1/consultations")) == before
    thread = request(
        chc, consults.consultation("general", "core", national_id="11010219600101002X")
    )
    both(al, client, thread, "received", "received")
    # a member outside the consultation sends a step on its thread: refused by the gate
    task = core.read(f"Task/{thread}")
    task.pop("meta")
    task["status"], task["businessStatus"] = "cancelled", {"text": "已取消"}
    fake = R.message(
        "cancelled", sender="gw", receiver="core", task=task, resources=[], at=datetime.now(UTC)
    )
    [pid] = al.node("gw").send("core", "consult.status", [fake], thread=thread)
    q = wait_for(
        lambda: sql(
            al.node("core"), "SELECT code, sender FROM quarantine WHERE packet_id = :p", p=pid
        ),
        timeout=40,
        what="the outsider's step refused",
    )
    assert q == [{"code": "HT-THREAD-PARTY", "sender": "gw"}]
    assert row(al.node("core"), thread)["step"] == "received"
    # the inviting side cancels before the meeting; the centre confirms
    task = chc.read(f"Task/{thread}")
    task["status"] = "cancelled"
    task["statusReason"] = {"text": "患者已在外院就诊"}
    chc.ok("PUT", f"/Task/{thread}", task)
    both(al, client, thread, "cancelled", "cancelled")
    sr = chc.read(f"ServiceRequest/{row(al.node('chc'), thread)['sr_id']}")
    assert sr["status"] == "revoked"
    r = core.call("POST", f"/Task/{thread}/$start")
    assert r.status_code == 422 and "HT-REF-TRANSITION" in r.text  # business-rule


def test_imaging_reading_and_a_report_turned_into_a_referral(
    al: Alliance, client: httpx.Client
) -> None:
    chc, core = Fhir(client, al.node("chc")), Fhir(client, al.node("core"))
    thread = request(
        chc, consults.consultation("imaging-reading", "core", national_id="110102197001010011")
    )
    both(al, client, thread, "received", "received")
    [study] = [
        r
        for r in core.ok(
            "GET",
            "/ImagingStudy",
            params={"patient": core.read(f"Task/{thread}")["for"]["reference"]},
        )["entry"]
    ]
    study_ref = f"ImagingStudy/{study['resource']['id']}"
    core.op(thread, "schedule", consults.schedule("core", 1))
    core.op(thread, "start")
    patient = core.read(f"Task/{thread}")["for"]["reference"]
    core.op(thread, "report", consults.imaging_report(patient, study_ref))
    core.op(thread, "release")
    both(al, client, thread, "completed", "report-received")
    dr = chc.read(row(al.node("chc"), thread)["report_refs"].split()[0])
    assert dr["imagingStudy"] == [{"reference": study_ref}]
    assert dr["conclusion"] == "右肺上叶磨玻璃结节，Lung-RADS 4A，建议3个月复查"
    assert dr["presentedForm"][0]["title"] == "影像诊断报告.pdf"
    assert dr["status"] == "final"
    # a general consultation whose report recommends referral: one click to a referral
    other = request(
        chc, consults.consultation("general", "core", national_id="110102198002020022", name="赵六")
    )
    both(al, client, other, "received", "received")
    core.op(other, "schedule", consults.schedule("core", 1))
    core.op(other, "start")
    core.op(
        other,
        "report",
        consults.report(core.read(f"Task/{other}")["for"]["reference"], refer_to="core"),
    )
    r = chc.call("POST", f"/Task/{other}/$referral-draft")
    assert r.status_code == 422 and "HT-REF-TRANSITION" in r.text  # not released yet
    core.op(other, "release")
    both(al, client, other, "completed", "report-received")
    draft = chc.op(
        other,
        "referral-draft",
        {
            "resourceType": "Parameters",
            "parameter": [{"name": "kind", "valueCode": "up-inpatient"}],
        },
    )
    consult_sr = f"ServiceRequest/{row(al.node('chc'), other)['sr_id']}"
    sr = draft["entry"][0]["resource"]
    assert sr["basedOn"] == [{"reference": consult_sr}]
    draft["entry"].append(
        {
            "fullUrl": "urn:uuid:0b8a0c52-3c1e-4d5e-9a57-3b2f4c3d2e11",
            "request": {"method": "POST", "url": "Consent"},
            "resource": {
                "resourceType": "Consent",
                "status": "active",
                "scope": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/consentscope",
                            "code": "treatment",
                        }
                    ]
                },
                "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
                "patient": sr["subject"],
                "policyRule": {"text": "家属同意转诊"},
            },
        }
    )
    chc.ok("POST", "", draft)
    referral = wait_for(
        lambda: [
            r
            for r in al.node("core").api("GET", "/local/v1/referrals")
            if r["status"] == "received" and r["kind"] == "up-inpatient"
        ],
        timeout=40,
        what="the referral at the core",
    )[0]
    arrived = core.read(f"ServiceRequest/{referral['sr_id']}")
    assert arrived["basedOn"] == [{"reference": consult_sr}]
    assert arrived["reasonCode"][0]["coding"][0]["code"] == "C34.1"
    # the read of the draft is audited by person, with the patient's hash
    reads = sql(
        al.node("chc"),
        "SELECT actor, patient_hash, resource FROM audit WHERE "
        "action = 'read' AND resource LIKE :p",
        p="%referral-draft%",
    )
    assert reads and reads[-1]["patient_hash"] == row(al.node("chc"), other)["patient_hash"]
    assert orjson.loads(reads[-1]["resource"])["resourceType"] == "AuditEvent"


def test_the_consultation_list_counts_and_pages_through_all(
    al: Alliance, client: httpx.Client
) -> None:
    """``/local/v1/consultations`` says how many there are (``X-Total-Count``) and pages by
    keyset to the last one (``Link`` rel=next), as the other /local/v1 lists; no cap at 200."""
    from tests.test_api_regressions import _all_pages

    chc = al.node("chc")
    made = [
        request(
            Fhir(client, chc),
            consults.consultation(
                "general", "core", national_id=f"11010219700101{i:03d}X", mrn=f"PG{i:04d}"
            ),
        )
        for i in range(3)
    ]
    for thread in made:
        both(al, client, thread, "received", "received")
    whole = chc.api("GET", "/local/v1/consultations?limit=1000")
    seen, totals = _all_pages(chc, "/local/v1/consultations?limit=2", "thread")
    assert totals == {len(whole)} and len(whole) >= 3
    assert seen == [w["thread"] for w in whole] and set(made) <= set(seen)
    assert [w["updated_at"] for w in whole] == sorted(
        (w["updated_at"] for w in whole), reverse=True
    )  # latest change first
    # a filter is counted as it is paged: the centre's queue at core
    queue = al.node("core").api("GET", "/local/v1/consultations?side=centre&limit=1000")
    seen, totals = _all_pages(
        al.node("core"), "/local/v1/consultations?side=centre&limit=2", "thread"
    )
    assert totals == {len(queue)} and set(made) <= set(seen) == {q["thread"] for q in queue}
    assert {q["side"] for q in queue} == {"centre"}


def test_a_waiting_consultation_raises_a_reminder_and_the_alert(tmp_path: Path) -> None:
    a = Alliance(tmp_path / "alliance", MEMBERS, RULES)
    core_file = a.files["core"]
    core_file.write_text(
        core_file.read_text()
        + (
            "\n[consult]\nwait_timeout_s = 30.0\nurgent_timeout_s = 0.5\nreminder_every_s = 0.5\n"
            "\n[alerts]\nevery_s = 0.5\n"
        )
    )
    a.start("core", "chc")
    try:
        with httpx.Client(timeout=60) as client:
            chc, core = Fhir(client, a.node("chc")), Fhir(client, a.node("core"))
            thread = request(chc, consults.consultation("general", "core", priority="urgent"))
            reminded = wait_for(
                lambda: [
                    r
                    for r in a.node("core").api("GET", "/local/v1/consultations")
                    if r["reminded_at"]
                ],
                timeout=30,
                what="a reminder",
            )
            assert [r["thread"] for r in reminded] == [thread]
            assert reminded[0]["step"] == "received"
            rows = sql(
                a.node("core"),
                "SELECT outcome, resource FROM audit WHERE action = 'reminder' AND thread = :t",
                t=thread,
            )
            assert len(rows) == 1 and rows[0]["outcome"] == "4"
            assert "consultation waiting at 'received'" in rows[0]["resource"]

            def alert() -> Any:
                found = sql(
                    a.node("core"), "SELECT value FROM node_state WHERE key = 'alerts_active'"
                )
                active = json.loads(found[0]["value"]) if found else {}
                return active.get("consult-overdue")

            raised = wait_for(alert, timeout=30, what="the consult-overdue alert")
            assert raised["value"] == 1 and raised["subject"] == "consultations"
            # the centre moves on (a scheduled consultation waits for its meeting): it clears
            core.op(thread, "schedule", consults.schedule("core", 1))
            wait_for(lambda: alert() is None, timeout=30, what="the alert cleared")
            assert sql(
                a.node("core"),
                "SELECT count(*) AS n FROM audit WHERE action = 'reminder' AND thread = :t",
                t=thread,
            ) == [{"n": 1}]
    finally:
        a.stop_all()


def test_a_reading_of_a_study_the_inviters_own_pacs_holds(tmp_path: Path) -> None:
    """The study to read is the inviting member's own PACS record, shared by reference: the
    released reading comes back with that study (the centre carries what the report names),
    which the inviter keeps as it is instead of refusing the report; the reading is attached
    to the study at the inviter's PACS adapter (the consult.* hook, as for result.imaging)."""
    from adapters.pacs.study import study_resource_id
    from tests.harness import free_port_block
    from tests.test_pacs import S1, push, write_modality_files

    scp = free_port_block(1)
    write_modality_files(tmp_path / "modality")
    members = [
        MEMBERS[0],
        {
            **MEMBERS[1],
            "adapters": [
                {
                    "name": "pacs",
                    "type": "pacs-dicom",
                    "receives": ["imaging.*"],
                    "options": {
                        "bind": f"127.0.0.1:{scp}",
                        "ae_title": "YUETAN",
                        "complete_after_s": 120,
                    },
                }
            ],
        },
    ]
    a = Alliance(tmp_path / "alliance", members, RULES[:2])
    a.start("core", "chc")
    try:
        pushed = push(tmp_path / "modality", scp, study=S1, called="YUETAN")
        assert pushed.returncode == 0, pushed.stderr
        with httpx.Client(timeout=60) as client:
            chc, core = Fhir(client, a.node("chc")), Fhir(client, a.node("core"))
            rid = study_resource_id(S1)
            before = wait_for(
                lambda: (
                    chc.call("GET", f"/ImagingStudy/{rid}").status_code == 200
                    and chc.read(f"ImagingStudy/{rid}")
                ),
                timeout=40,
                what="the study at the inviter's PACS",
            )
            bundle = consults.consultation("general", "core", national_id="110102199001010033")
            sr = next(
                e["resource"]
                for e in bundle["entry"]
                if e["resource"]["resourceType"] == "ServiceRequest"
            )
            sr["code"]["coding"][0]["code"] = "imaging-reading"
            sr["supportingInfo"] = [{"reference": f"ImagingStudy/{rid}"}]
            thread = request(chc, bundle)
            both(a, client, thread, "received", "received")
            assert core.read(f"ImagingStudy/{rid}")["identifier"] == before["identifier"]
            core.op(thread, "schedule", consults.schedule("core", 1))
            core.op(thread, "start")
            patient = core.read(f"Task/{thread}")["for"]["reference"]
            core.op(thread, "report", consults.imaging_report(patient, f"ImagingStudy/{rid}"))
            core.op(thread, "release")
            both(a, client, thread, "completed", "report-received")
            dr_ref = row(a.node("chc"), thread)["report_refs"].split()[0]
            got = a.node("chc").api(
                "GET", f"/local/v1/adapters/pacs/studies/{S1}/reports", role="clinician"
            )
            mine = [r for r in got["reports"] if f"DiagnosticReport/{r['id']}" == dr_ref]
            assert [(r["from"], r["conclusion"], r["status"]) for r in mine] == [
                ("core", "右肺上叶磨玻璃结节，Lung-RADS 4A，建议3个月复查", "final")
            ]
            after = chc.read(f"ImagingStudy/{rid}")
            assert after["meta"]["versionId"] == before["meta"]["versionId"]  # ours, unchanged
            assert after["subject"] == before["subject"]
            assert sql(a.node("chc"), "SELECT code FROM quarantine") == []
            assert sql(
                a.node("chc"),
                "SELECT count(*) AS n FROM audit WHERE action = "
                "'imaging-report-attached' AND thread = :t",
                t=thread,
            ) == [{"n": 1}]
    finally:
        a.stop_all()
