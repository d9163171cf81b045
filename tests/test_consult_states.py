"""The consultation machine in-process, packets shuttled by hand (like test_referral_states.py):
every step on both sides with the Task equal after each, illegal moves refused, consent
required, duplicates and reordering harmless, cancellation crossing steps, the reminder, the
imaging reading, the report turned into a referral; every emitted Bundle valid FHIR R4 and
without the national ID."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from fhir.resources.R4B.bundle import Bundle
from sqlalchemy import select, update

from bridge.alerts import Facts, evaluate
from bridge.audit.events import EXTRA_EXTENSION
from bridge.audit.tables import AuditRecord
from bridge.config.loader import load_node
from bridge.config.models import AlertsConfig
from bridge.config.scaffold import write_alliance
from bridge.consult.codes import VIDEO_EXTENSION, step_of
from bridge.consult.stats import csv_rows
from bridge.consult.tables import CONSULTATION
from bridge.consult.workflow import ConsultWorkflow
from bridge.context import NodeContext
from bridge.delivery.handlers import Delivery
from bridge.errors import IllegalTransition, InvalidResource, MissingConsent
from bridge.fhir.validate import parse_and_validate_bundle
from bridge.fhirstore import store
from bridge.local.contract import ConsultEvent
from bridge.referral.workflow import Workflow
from bridge.store.tables import INBOX, OUTBOX
from tests import consults
from tests.factory import NATIONAL_ID

AUDIT = AuditRecord.__table__  # type: ignore[attr-defined]
MEMBERS = [
    {"id": "core", "zh": "复兴医院", "en": "Fuxing Hospital", "role": "core"},
    {"id": "chc", "zh": "月坛社区卫生服务中心", "en": "Yuetan CHC", "role": "community"},
]
KINDS = [
    "consult.request",
    "consult.status",
    "consult.report",
    "referral.request",
    "referral.status",
    "referral.cancel",
    "referral.return",
]
RULES = [
    {"from": "chc", "to": "core", "kinds": KINDS},
    {"from": "core", "to": "chc", "kinds": KINDS},
]


class Side:
    def __init__(self, path: Path) -> None:
        self.ctx = NodeContext.open(load_node(path))
        self.wf = Workflow(self.ctx)
        self.cw = ConsultWorkflow(self.ctx)
        self.emitted: list[bytes] = []

    def take_outbox(self) -> list[Delivery]:
        """Queued packets, as the other side's dispatcher would hand them over."""
        with self.ctx.store.write() as conn:
            rows = conn.execute(
                select(OUTBOX).where(OUTBOX.c.state == "queued").order_by(OUTBOX.c.id)
            ).all()
            conn.execute(
                update(OUTBOX).where(OUTBOX.c.state == "queued").values(state="acknowledged")
            )
        self.emitted += [r.body for r in rows]
        return [
            Delivery(
                r.packet_id, r.sender, r.kind, r.thread, r.seq, r.patient_hash, r.created_at, r.body
            )
            for r in rows
        ]

    def row(self, thread: str) -> dict[str, Any]:
        return next(r for r in self.cw.list() if r["thread"] == thread)

    def task(self, thread: str) -> dict[str, Any]:
        with self.ctx.store.read() as conn:
            return store.get(conn, "Task", self.row(thread)["task_id"])

    def get(self, reference: str) -> dict[str, Any]:
        with self.ctx.store.read() as conn:
            return store.get(conn, *reference.split("/", 1))

    def state(self, thread: str) -> tuple[str, str]:
        """(Task.status, step) as stored in the Task, checked against the row."""
        task, row = self.task(thread), self.row(thread)
        assert (task["status"], step_of(task)) == (row["status"], row["step"])
        return task["status"], row["step"]

    def patient_ref(self, thread: str) -> str:
        return str(self.task(thread)["for"]["reference"])


@pytest.fixture
def sides(tmp_path: Path) -> Iterator[tuple[Side, Side]]:
    files = write_alliance(
        tmp_path / "a", MEMBERS, RULES, base_port_local=31100, base_port_peer=32100
    )
    chc, core = Side(files["chc"]), Side(files["core"])
    yield chc, core
    for s in (chc, core):
        s.ctx.store.dispose()


def deliver(to: Side, items: list[Delivery]) -> None:
    for item in items:
        to.cw.apply_packet(item)


def shuttle(a: Side, b: Side) -> None:
    """Deliver everything queued, both ways, until both outboxes are empty."""
    while True:
        items_a, items_b = a.take_outbox(), b.take_outbox()
        if not items_a and not items_b:
            return
        deliver(b, items_a)
        deliver(a, items_b)


def start(chc: Side, core: Side, kind: str = "mdt", **kw: Any) -> str:
    chc.cw.submit(consults.consultation(kind, "core", **kw), "user:dr.li")
    thread = chc.cw.list()[0]["thread"]
    shuttle(chc, core)
    return thread


def equal(chc: Side, core: Side, thread: str, expected: tuple[str, str]) -> None:
    assert chc.state(thread) == core.state(thread) == expected


def test_whole_mdt_loop_both_sides_equal_at_every_step(sides: tuple[Side, Side]) -> None:
    chc, core = sides
    thread = start(chc, core)
    equal(chc, core, thread, ("received", "received"))
    sr = core.get(f"ServiceRequest/{core.row(thread)['sr_id']}")
    assert sr["category"][0]["coding"][0]["code"] == "11429006"
    assert sr["note"][0]["text"] == "右肺上叶结节性质？是否需要手术？"
    assert sr["identifier"][0]["value"].startswith("HZ")
    assert core.row(thread)["side"] == "centre" and chc.row(thread)["side"] == "inviter"
    assert core.task(thread)["owner"] == {"reference": "Organization/core"}
    # pre-review: returned for completion, with what is missing
    core.cw.step(thread, "return", "user:dr.chen", reason="缺肺功能报告")
    shuttle(chc, core)
    equal(chc, core, thread, ("on-hold", "returned"))
    assert chc.task(thread)["statusReason"] == {"text": "缺肺功能报告"}
    assert chc.row(thread)["reason"] == "缺肺功能报告"
    chc.cw.step(thread, "resubmit", "user:dr.li", bundle=consults.records(chc.patient_ref(thread)))
    shuttle(chc, core)
    equal(chc, core, thread, ("received", "resubmitted"))
    assert "statusReason" not in core.task(thread)
    docs = [
        r
        for r in core.cw.view(thread)["resources"]  # type: ignore[index]
        if r["resourceType"] == "DocumentReference"
    ]
    assert [d["description"] for d in docs] == ["肺功能：FEV1 78%"]
    assert docs[0]["subject"] == {"reference": core.patient_ref(thread)}
    # accepted and scheduled: 3 experts, the inviting doctor added, the video link
    core.cw.step(thread, "schedule", "user:dr.chen", bundle=consults.schedule("core", 3))
    shuttle(chc, core)
    equal(chc, core, thread, ("accepted", "scheduled"))
    appt = chc.get(f"Appointment/{chc.row(thread)['appointment_id']}")
    assert appt["extension"] == [{"url": VIDEO_EXTENSION, "valueUrl": consults.MEETING}]
    kinds = [p["type"][0]["coding"][0]["code"] for p in appt["participant"]]
    assert kinds == ["CON", "CON", "CON", "REF"]
    inviting = chc.get(f"ServiceRequest/{chc.row(thread)['sr_id']}")["requester"]
    assert appt["participant"][3]["actor"] == inviting
    assert len(chc.row(thread)["experts"].split()) == 3
    assert chc.row(thread)["experts"] == core.row(thread)["experts"]
    for p in appt["participant"][:3]:  # the experts' roles travelled with it
        role = chc.get(p["actor"]["reference"])
        assert role["organization"] == {"reference": "Organization/core"}
        assert chc.get(role["practitioner"]["reference"])["name"][0]["text"]
    assert chc.task(thread)["output"][0]["valueReference"] == {
        "reference": f"Appointment/{appt['id']}"
    }
    core.cw.step(thread, "start", "user:dr.chen")
    shuttle(chc, core)
    equal(chc, core, thread, ("in-progress", "in-consultation"))
    # the draft report stays at the centre
    core.cw.step(
        thread,
        "report",
        "user:dr.zhang",
        bundle=consults.report(core.patient_ref(thread), refer_to="core"),
    )
    items = core.take_outbox()
    assert [i.kind for i in items] == ["consult.status"]
    body = orjson.loads(items[0].body)
    assert {e["resource"]["resourceType"] for e in body["entry"]} == {
        "MessageHeader",
        "Task",
        "Organization",
    }
    deliver(chc, items)
    equal(chc, core, thread, ("in-progress", "reported"))
    core.cw.step(thread, "release", "user:qc.wang")
    items = core.take_outbox()
    assert [i.kind for i in items] == ["consult.report"]
    deliver(chc, items)
    shuttle(chc, core)
    equal(chc, core, thread, ("completed", "report-received"))
    refs = chc.row(thread)["report_refs"].split()
    comp = chc.get(next(r for r in refs if r.startswith("Composition/")))
    assert comp["status"] == "final"
    assert comp["type"]["coding"][0]["code"] == "11488-4"
    assert comp["subject"] == {"reference": chc.patient_ref(thread)}
    cond = chc.get(next(r for r in refs if r.startswith("Condition/")))
    assert cond["code"]["coding"][0]["code"] == "C34.1"
    assert chc.row(thread)["recommends_referral"] is True
    assert chc.get(f"ServiceRequest/{chc.row(thread)['sr_id']}")["status"] == "completed"
    chc.cw.step(
        thread, "follow-up", "user:dr.li", bundle=consults.follow_up(chc.patient_ref(thread))
    )
    shuttle(chc, core)
    equal(chc, core, thread, ("completed", "follow-up-planned"))
    plan = next(
        o for o in core.task(thread)["output"] if o["type"]["coding"][0]["code"] == "follow-up"
    )
    assert core.get(plan["valueReference"]["reference"])["title"] == "会诊后随访"
    chc.cw.step(thread, "close", "user:dr.li")
    shuttle(chc, core)
    equal(chc, core, thread, ("completed", "closed"))
    assert chc.task(thread)["output"] == core.task(thread)["output"]
    # every step audited on both sides, the same events in the same order
    events = [
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
    for side in (chc, core):
        assert audited_events(side, thread) == events
    check_emitted(chc, core)


def audited_events(side: Side, thread: str) -> list[str]:
    """The ``event`` of each successful consultation audit record of the thread, in order."""
    with side.ctx.store.read() as conn:
        rows = conn.execute(
            select(AUDIT.c.resource)
            .where(
                AUDIT.c.action == "consultation", AUDIT.c.thread == thread, AUDIT.c.outcome == "0"
            )
            .order_by(AUDIT.c.seq)
        ).all()
    out = []
    for r in rows:
        ext = next(e for e in orjson.loads(r.resource)["extension"] if e["url"] == EXTRA_EXTENSION)
        out.append(next(x["valueString"] for x in ext["extension"] if x["url"] == "event"))
    return out


def check_emitted(*sides: Side) -> None:
    for side in sides:
        for body in side.emitted:
            parsed = parse_and_validate_bundle(body)  # the official R4 JSON schema
            Bundle.model_validate(orjson.loads(body))  # and fhir.resources
            assert parsed["entry"][0]["resource"]["resourceType"] == "MessageHeader"
            assert NATIONAL_ID.encode() not in body  # never the ID in clear


def test_illegal_moves_are_refused_and_change_nothing(sides: tuple[Side, Side]) -> None:
    chc, core = sides
    thread = start(chc, core)
    with pytest.raises(IllegalTransition):
        chc.cw.step(thread, "schedule", "user:dr.li", bundle=consults.schedule("core", 3))
    with pytest.raises(IllegalTransition):
        core.cw.step(thread, "resubmit", "user:dr.chen")
    with pytest.raises(IllegalTransition):
        core.cw.step(thread, "release", "user:dr.chen")
    with pytest.raises(IllegalTransition):
        core.cw.step(thread, "start", "user:dr.chen")
    with pytest.raises(InvalidResource, match="3-5 experts"):  # an MDT needs 3 to 5
        core.cw.step(thread, "schedule", "user:dr.chen", bundle=consults.schedule("core", 2))
    with pytest.raises(InvalidResource, match="reason"):
        core.cw.step(thread, "return", "user:dr.chen")
    assert core.take_outbox() == [] and chc.take_outbox() == []
    equal(chc, core, thread, ("received", "received"))
    core.cw.step(thread, "schedule", "user:dr.chen", bundle=consults.schedule("core", 5))
    core.cw.step(thread, "start", "user:dr.chen")
    bad = consults.report(core.patient_ref(thread))
    bad["entry"][0]["resource"]["type"]["coding"][0]["code"] = "34133-9"
    with pytest.raises(InvalidResource, match="LOINC 11488-4"):
        core.cw.step(thread, "report", "user:dr.chen", bundle=bad)
    with pytest.raises(IllegalTransition):  # too late: the meeting has begun
        core.cw.step(thread, "cancelled", "user:dr.chen", reason="专家临时有事")
    shuttle(chc, core)
    equal(chc, core, thread, ("in-progress", "in-consultation"))


def test_missing_consent_is_refused_and_nothing_leaves(sides: tuple[Side, Side]) -> None:
    chc, _core = sides
    with pytest.raises(MissingConsent):
        chc.cw.submit(consults.consultation("general", "core", consent=False), "user:dr.li")
    assert chc.cw.list() == [] and chc.take_outbox() == []
    b = consults.consultation("general", "core")
    b["entry"][2]["resource"]["note"] = []
    with pytest.raises(InvalidResource, match="question"):
        chc.cw.submit(b, "user:dr.li")
    b = consults.consultation("imaging-reading", "core")
    b["entry"] = [e for e in b["entry"] if e["resource"]["resourceType"] != "ImagingStudy"]
    with pytest.raises(InvalidResource, match="ImagingStudy"):
        chc.cw.submit(b, "user:dr.li")
    assert chc.cw.list() == [] and chc.take_outbox() == []


def test_duplicates_and_reordering_leave_both_sides_equal(sides: tuple[Side, Side]) -> None:
    chc, core = sides
    chc.cw.submit(consults.consultation("general", "core"), "user:dr.li")
    thread = chc.cw.list()[0]["thread"]
    request = chc.take_outbox()
    deliver(core, request)
    received = core.take_outbox()
    core.cw.step(thread, "schedule", "user:dr.chen", bundle=consults.schedule("core", 1))
    scheduled = core.take_outbox()
    core.cw.step(thread, "start", "user:dr.chen")
    started = core.take_outbox()
    with pytest.raises(IllegalTransition):  # ahead of its turn: refused, nothing changes
        deliver(chc, started)
    assert chc.state(thread) == ("requested", "requested")
    deliver(chc, received + scheduled + started + started + scheduled + received)
    equal(chc, core, thread, ("in-progress", "in-consultation"))
    deliver(core, request)  # the request again (after a crash): nothing new, nothing sent
    assert len(core.cw.list()) == 1 and core.take_outbox() == []
    check_emitted(chc, core)


def test_cancel_before_the_meeting_and_after_it(sides: tuple[Side, Side]) -> None:
    chc, core = sides
    thread = start(chc, core, "general")
    chc.cw.step(thread, "cancel", "user:dr.li", reason="患者病情好转，暂不会诊")
    assert chc.row(thread)["pending"] == "cancel"
    shuttle(chc, core)
    equal(chc, core, thread, ("cancelled", "cancelled"))
    assert chc.row(thread)["pending"] is None
    assert core.get(f"ServiceRequest/{core.row(thread)['sr_id']}")["status"] == "revoked"
    assert chc.task(thread)["statusReason"] == {"text": "患者病情好转，暂不会诊"}
    # the inviter's cancel crossing the start of the meeting: refused, both in consultation
    other = start(chc, core, "general", national_id="11010219600101002X", name="李四")
    core.cw.step(other, "schedule", "user:dr.chen", bundle=consults.schedule("core", 1))
    shuttle(chc, core)
    chc.cw.step(other, "cancel", "user:dr.li", reason="家属要求取消")
    core.cw.step(other, "start", "user:dr.chen")
    shuttle(chc, core)
    equal(chc, core, other, ("in-progress", "in-consultation"))
    assert chc.row(other)["pending"] is None
    # the inviter's resubmission crossing the centre's cancellation: both cancelled
    third = start(chc, core, "general", national_id="110102197001010011", name="张三")
    core.cw.step(third, "return", "user:dr.chen", reason="缺CT报告")
    shuttle(chc, core)
    chc.cw.step(third, "resubmit", "user:dr.li", bundle=consults.records(chc.patient_ref(third)))
    core.cw.step(third, "cancelled", "user:dr.chen", reason="超过会诊期限")
    shuttle(chc, core)
    equal(chc, core, third, ("cancelled", "cancelled"))
    check_emitted(chc, core)


def test_a_waiting_consultation_is_reminded_once_per_step(sides: tuple[Side, Side]) -> None:
    chc, core = sides
    thread = start(chc, core, "general")
    assert core.cw.remind() == 0
    with core.ctx.store.write() as conn:
        old = core.row(thread)["step_at"] - timedelta(
            seconds=core.ctx.plan.consult.wait_timeout_s + 60
        )
        conn.execute(
            update(CONSULTATION).where(CONSULTATION.c.thread == thread).values(step_at=old)
        )
    assert core.cw.remind() == 1
    assert core.cw.remind() == 0  # once per step
    assert core.cw.overdue() == 1
    with core.ctx.store.read() as conn:
        rows = conn.execute(
            select(AUDIT.c.resource).where(AUDIT.c.action == "reminder", AUDIT.c.thread == thread)
        ).all()
    assert len(rows) == 1
    assert (
        "consultation waiting at 'received' for 14" in orjson.loads(rows[0].resource)["outcomeDesc"]
    )
    [alert] = [
        a
        for a in evaluate(
            Facts(
                now=core.ctx.now(),
                started_at=core.ctx.now(),
                peers={},
                consults_overdue=core.cw.overdue(),
            ),
            AlertsConfig(),
        )
        if a.rule == "consult-overdue"
    ]
    assert (alert.subject, alert.value) == ("consultations", 1)
    core.cw.step(thread, "schedule", "user:dr.chen", bundle=consults.schedule("core", 1))
    assert core.cw.overdue() == 0  # moved on


def test_imaging_reading_report_arrives_with_its_study(sides: tuple[Side, Side]) -> None:
    chc, core = sides
    thread = start(chc, core, "imaging-reading")
    study = next(
        r
        for r in core.cw.view(thread)["resources"]  # type: ignore[index]
        if r["resourceType"] == "ImagingStudy"
    )
    assert study["identifier"][0]["value"] == f"urn:oid:{consults.STUDY_UID}"
    core.cw.step(thread, "schedule", "user:dr.sun", bundle=consults.schedule("core", 1))
    core.cw.step(thread, "start", "user:dr.sun")
    with pytest.raises(InvalidResource, match="imagingStudy"):
        core.cw.step(
            thread, "report", "user:dr.sun", bundle=consults.report(core.patient_ref(thread))
        )
    core.cw.step(
        thread,
        "report",
        "user:dr.sun",
        bundle=consults.imaging_report(core.patient_ref(thread), f"ImagingStudy/{study['id']}"),
    )
    core.cw.step(thread, "release", "user:qc.wang")
    shuttle(chc, core)
    equal(chc, core, thread, ("completed", "report-received"))
    ref = chc.row(thread)["report_refs"].split()[0]
    dr = chc.get(ref)
    assert dr["status"] == "final"
    assert dr["imagingStudy"] == [{"reference": f"ImagingStudy/{study['id']}"}]
    assert dr["conclusion"] == "右肺上叶磨玻璃结节，Lung-RADS 4A，建议3个月复查"
    assert dr["presentedForm"][0]["contentType"] == "application/pdf"
    assert dr["subject"] == {"reference": chc.patient_ref(thread)}
    assert {"reference": f"ServiceRequest/{chc.row(thread)['sr_id']}"} in dr["basedOn"]
    assert chc.get(f"ImagingStudy/{study['id']}")["subject"] == {
        "reference": chc.patient_ref(thread)
    }
    check_emitted(chc, core)


def test_a_report_recommending_referral_becomes_a_referral(sides: tuple[Side, Side]) -> None:
    chc, core = sides
    thread = start(chc, core, "general")
    with pytest.raises(IllegalTransition):  # no released report yet
        chc.cw.referral_draft(thread)
    core.cw.step(thread, "schedule", "user:dr.chen", bundle=consults.schedule("core", 1))
    core.cw.step(thread, "start", "user:dr.chen")
    core.cw.step(
        thread,
        "report",
        "user:dr.chen",
        bundle=consults.report(core.patient_ref(thread), refer_to="core"),
    )
    core.cw.step(thread, "release", "user:qc.wang")
    shuttle(chc, core)
    draft = chc.cw.referral_draft(thread, "up-inpatient")
    sr = draft["entry"][0]["resource"]
    consult_sr = f"ServiceRequest/{chc.row(thread)['sr_id']}"
    assert sr["basedOn"] == [{"reference": consult_sr}]
    assert sr["performer"] == [{"reference": "Organization/core"}]
    assert sr["reasonCode"][0]["coding"][0]["code"] == "C34.1"
    assert sr["subject"] == {"reference": chc.patient_ref(thread)}
    assert sr["note"][0]["text"].startswith("建议上转胸外科")
    with pytest.raises(MissingConsent):  # the referral asks its own consent
        chc.wf.submit(copy.deepcopy(draft), "user:dr.li")
    draft["entry"].append(
        {
            "fullUrl": "urn:uuid:7d1b1d1e-0000-4000-8000-000000000001",
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
    chc.wf.submit(draft, "user:dr.li")
    referral = chc.wf.list()[0]
    assert referral["side"] == "referrer" and referral["kind"] == "up-inpatient"
    kept = chc.get(f"ServiceRequest/{referral['sr_id']}")
    assert kept["basedOn"] == [{"reference": consult_sr}]
    items = chc.take_outbox()
    assert [i.kind for i in items] == ["referral.request"]
    sent = orjson.loads(items[0].body)
    wire_sr = next(e["resource"] for e in sent["entry"] if e["resource"]["id"] == referral["sr_id"])
    assert wire_sr["basedOn"] == [{"reference": consult_sr}]
    core.wf.apply_packet(items[0])
    assert core.wf.list()[0]["kind"] == "up-inpatient"
    # statistics: one consultation from chc this month, completed, turned into a referral
    assert chc.row(thread)["referral_thread"] == referral["thread"]
    year = chc.row(thread)["created_at"].year
    [(key, cell)] = [(k, c) for k, c in chc.cw.stats(year).items()]
    assert key[1] == "chc"
    assert (cell.requested, cell.completed, cell.cancelled, cell.referred) == (1, 1, 0, 1)
    assert cell.referral_share == 1.0 and cell.by_kind == {"general": 1}
    assert cell.median_to_report_h is not None and cell.median_to_report_h >= 0
    [centre] = core.cw.stats(year).values()  # the referral arrived there named its basis
    assert (centre.requested, centre.completed, centre.referred) == (1, 1, 1)
    assert core.row(thread)["referral_thread"] == referral["thread"]
    assert csv_rows({key: cell})[0][2:7] == (1, 1, 0, 1, "1.00")
    check_emitted(chc, core)


class ReferralOnly:
    """An adapter from before consultations: referral events and plain packets only."""

    def __init__(self) -> None:
        self.got: list[str] = []

    def on_referral(self, ev: Any) -> None:
        self.got.append(f"referral:{ev.event}")

    def deliver(self, item: Delivery) -> None:
        self.got.append(f"deliver:{item.kind}")

    def flush(self) -> None:
        pass


class ConsultAware(ReferralOnly):
    def on_consult(self, ev: ConsultEvent) -> None:
        self.got.append(f"consult:{ev.event}:{ev.side}:{ev.view['consultation']['step']}")


@pytest.mark.parametrize("sink", [ReferralOnly, ConsultAware])
def test_the_dispatcher_hands_consult_events_only_to_sinks_that_take_them(
    sides: tuple[Side, Side], tmp_path: Path, sink: type[ReferralOnly]
) -> None:
    from bridge.node import Node

    chc, core = sides
    node = Node(core.ctx.plan)  # the core's node in this process: no job, no listener
    try:
        adapter = sink()
        node.dispatcher.handlers = {"consult.*": adapter}
        chc.cw.submit(consults.consultation("general", "core"), "user:dr.li")
        [item] = chc.take_outbox()
        now = core.ctx.now()
        with core.ctx.store.write() as conn:
            conn.execute(
                INBOX.insert().values(
                    packet_id=item.packet_id,
                    sender="chc",
                    kind=item.kind,
                    thread=item.thread,
                    seq=item.seq,
                    digest="0" * 64,
                    size=len(item.body),
                    state="received",
                    attempts=0,
                    created_at=now,
                    received_at=now,
                    next_try_at=now,
                    body=item.body,
                    receipt=b"",
                )
            )
        assert node.dispatcher.run_once() == 1
        with core.ctx.store.read() as conn:
            state = conn.execute(
                select(INBOX.c.state).where(INBOX.c.packet_id == item.packet_id)
            ).scalar()
        assert state == "delivered"
        assert core.state(item.thread) == ("received", "received")  # applied by the hook
        assert adapter.got == ([] if sink is ReferralOnly else ["consult:request:centre:received"])
    finally:
        node.ctx.store.dispose()


def test_an_operations_inputs_from_parameters_a_bundle_or_one_resource() -> None:
    from bridge.api.fhir_api import consult_parameters

    records = consults.records("Patient/p-1")
    assert consult_parameters({}) == {}
    assert consult_parameters(records) == {"resources": records}
    got = consult_parameters(
        {
            "resourceType": "Parameters",
            "parameter": [
                {"name": "reason", "valueString": "缺CT报告"},
                {"name": "kind", "valueCode": "mdt"},
                {"name": "resources", "resource": records},
            ],
        }
    )
    assert got == {
        "reason": "缺CT报告",
        "kind": "mdt",
        "resources": {"resourceType": "Bundle", "type": "collection", "entry": records["entry"]},
    }
    plan = consults.follow_up("Patient/p-1")["entry"][0]["resource"]
    assert consult_parameters(plan) == {
        "resources": {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": plan}]}
    }
