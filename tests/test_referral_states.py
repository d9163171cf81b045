"""The referral machine in-process, packets shuttled by hand: duplicates, reordering and crossing
steps leave both sides in the same state; every emitted Bundle is valid FHIR R4."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
RULES = [
    {"from": "chc", "to": "core", "kinds": KINDS},
    {"from": "core", "to": "chc", "kinds": KINDS},
]


class Side:
    def __init__(self, path: Path) -> None:
        self.ctx = NodeContext.open(load_node(path))
        self.wf = Workflow(self.ctx)
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

    def state(self, thread: str) -> tuple[str, str]:
        row = next(r for r in self.wf.list() if r["thread"] == thread)
        return row["status"], row["step"]


@pytest.fixture
def sides(tmp_path: Path) -> tuple[Side, Side]:
    files = write_alliance(
        tmp_path / "a", MEMBERS, RULES, base_port_local=31000, base_port_peer=32000
    )
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
    core.wf.step(
        thread, "accept", "test", outputs=[{"type": {"text": "bed"}, "valueString": "12床"}]
    )
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


# -- one patient, two referring centres: each named its own way, nothing crosses ----------------

THREE = [
    *MEMBERS,
    {"id": "gchc", "zh": "广外社区卫生服务中心", "en": "Guangwai CHC", "role": "community"},
]
THREE_RULES = [
    *RULES,
    {"from": "gchc", "to": "core", "kinds": KINDS},
    {"from": "core", "to": "gchc", "kinds": KINDS},
]


def take_for(side: Side, recipient: str) -> list[Delivery]:
    """The queued packets to one recipient, as its dispatcher would hand them over."""
    with side.ctx.store.write() as conn:
        rows = conn.execute(
            select(OUTBOX)
            .where(OUTBOX.c.state == "queued", OUTBOX.c.recipient == recipient)
            .order_by(OUTBOX.c.id)
        ).all()
        conn.execute(
            update(OUTBOX).where(OUTBOX.c.id.in_([r.id for r in rows])).values(state="acknowledged")
        )
    side.emitted += [r.body for r in rows]
    return [
        Delivery(
            r.packet_id, r.sender, r.kind, r.thread, r.seq, r.patient_hash, r.created_at, r.body
        )
        for r in rows
    ]


def task_of(side: Side, thread: str) -> dict[str, Any]:
    from bridge.fhirstore import store

    row = next(r for r in side.wf.list() if r["thread"] == thread)
    with side.ctx.store.read() as conn:
        return store.get(conn, "Task", row["task_id"])


def test_one_patient_from_two_centres_is_named_each_centres_way(tmp_path: Path) -> None:
    files = write_alliance(
        tmp_path / "a", THREE, THREE_RULES, base_port_local=33000, base_port_peer=34000
    )
    chc, gchc, core = Side(files["chc"]), Side(files["gchc"]), Side(files["core"])
    try:
        threads, mine = {}, {}
        for name, centre, mrn in (("chc", chc, "YT0001"), ("gchc", gchc, "GW0077")):
            centre.wf.submit(referral("up-inpatient", "core", mrn=mrn), "test")
            threads[name] = centre.wf.list()[0]["thread"]
            mine[name] = task_of(centre, threads[name])["for"]["reference"]
            deliver(core, take_for(centre, "core"))
        # one record at the core, under an id of its own
        ours = {task_of(core, t)["for"]["reference"] for t in threads.values()}
        assert len(ours) == 1 and not ours & set(mine.values())
        for t in threads.values():
            core.wf.step(
                t, "accept", "test", outputs=[{"type": {"text": "bed"}, "valueString": "12床"}]
            )
            core.wf.step(t, "arrive", "test")
            row = next(r for r in core.wf.list() if r["thread"] == t)
            core.wf.submit(return_bundle(row["sr_id"], next(iter(ours))), "test")
        for name, centre in (("chc", chc), ("gchc", gchc)):
            got = take_for(core, name)
            other = "gchc" if name == "chc" else "chc"
            for item in got:  # nothing about the other centre's referral, nor the core's id
                for secret in (
                    mine[other].split("/")[1],
                    threads[other],
                    next(iter(ours)).split("/")[1],
                    "GW0077" if name == "chc" else "YT0001",
                    f'/{other}"',
                    f':{other}"',
                ):
                    assert secret.encode() not in item.body, (name, secret)
                parse_and_validate_bundle(item.body)
            deliver(centre, got)
            assert centre.state(threads[name]) == ("completed", "return-received")
            from bridge.fhirstore import store

            with centre.ctx.store.read() as conn:
                here = store.by_thread(conn, threads[name])
            assert task_of(centre, threads[name])["for"]["reference"] == mine[name]
            subjects = {
                (r.get("subject") or r.get("for") or {}).get("reference")
                for r in here
                if r["resourceType"]
                in (
                    "Task",
                    "ServiceRequest",
                    "Observation",
                    "DiagnosticReport",
                    "Encounter",
                    "Composition",
                    "MedicationRequest",
                )
            }
            assert subjects == {mine[name]}
    finally:
        for s in (chc, gchc, core):
            s.ctx.store.dispose()


def test_a_thread_without_the_peers_id_names_the_patient_by_hash(sides: tuple[Side, Side]) -> None:
    """A referral received before ``peer_patient``: its packets name the patient by the keyed
    hash only, and the referrer maps them to its own record."""
    from bridge.referral.tables import REFERRAL

    chc, core = sides
    thread = start(chc, core)
    deliver(chc, core.take_outbox())
    with core.ctx.store.write() as conn:
        conn.execute(update(REFERRAL).where(REFERRAL.c.thread == thread).values(peer_patient=None))
    core.wf.step(thread, "accept", "test", outputs=[])
    [item] = core.take_outbox()
    sent = next(
        e["resource"]
        for e in orjson.loads(item.body)["entry"]
        if e["resource"]["resourceType"] == "Task"
    )
    assert sent["for"] == {
        "type": "Patient",
        "identifier": {
            "system": "urn:hutong:patient-hash",
            "value": next(r for r in core.wf.list() if r["thread"] == thread)["patient_hash"],
        },
    }
    assert b"Patient/" not in item.body
    mine = task_of(chc, thread)["for"]
    deliver(chc, [item])
    assert chc.state(thread)[0] == "accepted" and task_of(chc, thread)["for"] == mine


def test_an_older_store_gets_peer_patient_on_open(tmp_path: Path) -> None:
    """Referral and consultation rows of a store made before ``peer_patient`` get the column
    when the node opens the store (their threads name the patient by the hash)."""
    import sqlite3
    from contextlib import closing

    from bridge.store.db import Store

    dsn = f"sqlite:///{tmp_path / 'n.db'}"
    store = Store(dsn)
    store.create_all()
    store.dispose()

    def columns() -> list[bool]:
        with closing(sqlite3.connect(tmp_path / "n.db")) as db:
            return [
                "peer_patient" in [r[1] for r in db.execute(f"PRAGMA table_info({t})")]
                for t in ("referral", "consultation")
            ]

    with closing(sqlite3.connect(tmp_path / "n.db")) as db:
        for table in ("referral", "consultation"):
            db.execute(f"ALTER TABLE {table} DROP COLUMN peer_patient")
        db.commit()
    assert columns() == [False, False]
    store = Store(dsn)
    store.create_all()
    store.dispose()
    assert columns() == [True, True]
