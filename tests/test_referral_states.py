"""The referral machine in-process, packets shuttled by hand: duplicates, reordering and crossing
steps leave both sides in the same state; every emitted Bundle is valid FHIR R4."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from fhir.resources.R4B.bundle import Bundle
from sqlalchemy import select, update

from bridge.config.loader import load_node
from bridge.config.scaffold import write_alliance
from bridge.context import NodeContext
from bridge.delivery.handlers import Delivery
from bridge.errors import IllegalTransition
from bridge.fhir.validate import parse_and_validate_bundle
from bridge.referral.workflow import Workflow
from bridge.store.tables import OUTBOX
from tests.referrals import referral, return_bundle

MEMBERS = [
    {"id": "core", "zh": "复兴医院", "en": "Fuxing Hospital", "role": "core"},
    {"id": "chc", "zh": "月坛社区卫生服务中心", "en": "Yuetan CHC", "role": "community"},
]
KINDS = ["referral.request", "referral.status", "referral.cancel", "referral.return"]
RULES = [{"from": "chc", "to": "core", "kinds": KINDS},
         {"from": "core", "to": "chc", "kinds": KINDS}]


class Side:
    def __init__(self, path: Path) -> None:
        self.ctx = NodeContext.open(load_node(path))
        self.wf = Workflow(self.ctx)
        self.emitted: list[bytes] = []

    def take_outbox(self) -> list[Delivery]:
        """Queued packets, as the other side's dispatcher would hand them over."""
        with self.ctx.store.write() as conn:
            rows = conn.execute(select(OUTBOX).where(OUTBOX.c.state == "queued")
                                .order_by(OUTBOX.c.id)).all()
            conn.execute(update(OUTBOX).where(OUTBOX.c.state == "queued")
                         .values(state="acknowledged"))
        self.emitted += [r.body for r in rows]
        return [Delivery(r.packet_id, r.sender, r.kind, r.thread, r.seq, r.patient_hash,
                         r.created_at, r.body) for r in rows]

    def state(self, thread: str) -> tuple[str, str]:
        row = next(r for r in self.wf.list() if r["thread"] == thread)
        return row["status"], row["step"]


@pytest.fixture
def sides(tmp_path: Path) -> tuple[Side, Side]:
    files = write_alliance(tmp_path / "a", MEMBERS, RULES, base_port_local=31000,
                           base_port_peer=32000)
    chc, core = Side(files["chc"]), Side(files["core"])
    yield chc, core
    for s in (chc, core):
        s.ctx.store.dispose()


def deliver(to: Side, items: list[Delivery]) -> None:
    for item in items:
        to.wf.apply_packet(item)


def start(chc: Side, core: Side) -> str:
    chc.wf.submit(referral("up-inpatient", "core"), "test")
    thread = chc.wf.list()[0]["thread"]
    chc.request = chc.take_outbox()  # type: ignore[attr-defined]
    deliver(core, chc.request)  # type: ignore[attr-defined]
    return thread


def test_duplicates_and_reordering_leave_both_sides_equal(sides: tuple[Side, Side]) -> None:
    chc, core = sides
    thread = start(chc, core)
    received = core.take_outbox()
    core.wf.step(thread, "accept", "test")
    accepted = core.take_outbox()
    core.wf.step(thread, "arrive", "test")
    arrived = core.take_outbox()
    # a step ahead of its turn is no longer applied here: the state machine refuses it and
    # nothing changes (the dispatcher hands a thread's packets over in the sender's seq order,
    # holding one that comes early: tests/test_security_threads.py posts a pair reversed)
    with pytest.raises(IllegalTransition):
        deliver(chc, arrived)
    assert chc.state(thread) == ("requested", "requested")
    # in order, then everything again: duplicates change nothing
    deliver(chc, received + accepted + arrived + arrived + accepted + received)
    assert chc.state(thread) == core.state(thread) == ("in-progress", "arrived")
    # the request delivered again (same packet after a crash) registers nothing new
    deliver(core, chc.request)  # type: ignore[attr-defined]
    assert len(core.wf.list()) == 1
    assert core.take_outbox() == []  # and sends nothing twice


def test_cancel_that_crosses_arrival_is_refused_and_sides_agree(sides: tuple[Side, Side]) -> None:
    chc, core = sides
    thread = start(chc, core)
    core.wf.step(thread, "accept", "test")
    deliver(chc, core.take_outbox())
    assert chc.state(thread)[0] == "accepted"
    chc.wf.step(thread, "cancel", "test", reason="患者改变主意")  # leaves before arrival is known
    core.wf.step(thread, "arrive", "test")
    deliver(core, chc.take_outbox())  # the cancel arrives after the patient did
    deliver(chc, core.take_outbox())
    assert core.state(thread) == ("in-progress", "arrived")
    assert chc.state(thread) == ("in-progress", "arrived")


def test_cancel_before_arrival_is_confirmed_by_the_receiver(sides: tuple[Side, Side]) -> None:
    chc, core = sides
    thread = start(chc, core)
    deliver(chc, core.take_outbox())
    chc.wf.step(thread, "cancel", "test", reason="患者决定暂不转诊")
    assert chc.state(thread) == ("received", "cancel-requested")
    deliver(core, chc.take_outbox())
    deliver(chc, core.take_outbox())
    assert core.state(thread) == chc.state(thread) == ("cancelled", "cancelled")
    with pytest.raises(IllegalTransition):
        core.wf.step(thread, "accept", "test")
    with pytest.raises(IllegalTransition):
        chc.wf.step(thread, "accept", "test")  # only the receiver accepts


def test_every_emitted_bundle_is_valid_r4(sides: tuple[Side, Side]) -> None:
    chc, core = sides
    thread = start(chc, core)
    core.wf.step(thread, "accept", "test", outputs=[{"type": {"text": "bed"},
                                                     "valueString": "12床"}])
    core.wf.step(thread, "arrive", "test")
    row = next(r for r in core.wf.list() if r["thread"] == thread)
    with core.ctx.store.read() as conn:
        from bridge.fhirstore import store
        task = store.get(conn, "Task", row["task_id"])
    core.wf.submit(return_bundle(row["sr_id"], task["for"]["reference"]), "test")
    deliver(chc, core.take_outbox())
    deliver(core, chc.take_outbox())
    assert chc.state(thread) == ("completed", "return-received")
    assert core.state(thread) == ("completed", "return-received")
    events = []
    for body in chc.emitted + core.emitted:
        parsed = parse_and_validate_bundle(body)  # the official R4 JSON schema
        Bundle.model_validate(orjson.loads(body))  # and fhir.resources (R4B == R4 here)
        header = parsed["entry"][0]["resource"]
        assert header["resourceType"] == "MessageHeader"
        events.append(header["eventCoding"]["code"])
        for e in parsed["entry"]:
            if e["resource"]["resourceType"] == "Patient":
                systems = {i["system"] for i in e["resource"]["identifier"]}
                assert "urn:oid:2.16.156.10011.1.3" not in systems  # never the ID in clear
    assert events == ["request", "return-received", "received", "accept", "arrive", "return"]

