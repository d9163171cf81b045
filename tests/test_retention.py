"""Retention purges delivered bodies by age and kind: headers and the audit chain stay, the
SQLite file really shrinks, and young or still-waiting packets keep their bodies.

In-process: a scaffolded alliance, a NodeContext on one node, inbox rows through the real
receive and delivery paths, outbox rows through the real queueing path; then timestamps are
moved into the past with an UPDATE and ``purge_bodies`` runs.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import select, update

from bridge import ops
from bridge.audit.events import EXTRA_EXTENSION
from bridge.audit.tables import AuditRecord
from bridge.config.loader import load_node
from bridge.config.scaffold import write_alliance
from bridge.context import NodeContext
from bridge.crypto import envelope as env
from bridge.crypto.keys import load_signing_key
from bridge.delivery.dispatcher import Dispatcher
from bridge.delivery.handlers import load_handlers
from bridge.delivery.queue import Outgoing, queue_packets
from bridge.delivery.retention import purge_bodies
from bridge.errors import NotFound
from bridge.gateway.intake import Intake
from bridge.privacy import patient_hash
from bridge.store.tables import INBOX, OUTBOX
from tests.factory import bundle_bytes
from tests.harness import wait_for

AUDIT = AuditRecord.__table__  # type: ignore[attr-defined]
BODY = 50 * 1024

MEMBERS = [
    {"id": "core", "zh": "复兴医院", "en": "Fuxing Hospital", "role": "core"},
    {"id": "chc", "zh": "月坛社区卫生服务中心", "en": "Yuetan CHC", "role": "community"},
]
RULES = [
    {"from": "chc", "to": "core", "kinds": ["referral.request", "result.lab"]},
    {"from": "core", "to": "chc", "kinds": ["referral.request", "result.lab"]},
]


@pytest.fixture
def site(tmp_path: Path) -> Iterator[tuple[NodeContext, NodeContext]]:
    """(core's context, chc's context), core with per-kind body retention."""
    files = write_alliance(tmp_path / "alliance", MEMBERS, RULES)
    core_file = files["core"]
    core_file.write_text(
        core_file.read_text() + ('\n[retention]\nbody_days = { "*" = 30.0, "result.lab" = 90.0 }\n')
    )
    core = NodeContext.open(load_node(core_file))
    chc = NodeContext.open(load_node(files["chc"]), create=False)
    yield core, chc
    core.store.dispose()
    chc.store.dispose()


def db_path(ctx: NodeContext) -> Path:
    return Path(ctx.plan.storage_dsn.split("///", 1)[1])


def on_disk(ctx: NodeContext) -> int:
    """Bytes of the database file plus its WAL, after a checkpoint that folds the WAL in."""
    path = db_path(ctx)
    conn = sqlite3.connect(path)
    try:
        # the store's own checkpoint thread (bridge/store/checkpoint.py) may be copying the WAL
        # at this moment: SQLite answers busy to a second checkpoint, so ask again until ours ran
        wait_for(
            lambda: conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0,
            timeout=30,
            what="a TRUNCATE checkpoint not busy",
        )
    finally:
        conn.close()
    wal = path.with_name(path.name + "-wal")
    return os.path.getsize(path) + (os.path.getsize(wal) if wal.exists() else 0)


def receive(
    core: NodeContext, chc: NodeContext, kind: str, thread: str, n: int, id_base: int
) -> list[tuple[str, bytes, str]]:
    """n packets from chc through core's real intake; returns (packet id, body, national id)."""
    key = load_signing_key(chc.plan.keys.signing, chc.plan.keys.passphrase)
    core_pub = core.plan.directory["core"].encryption_keys[0]
    sent, frames = [], []
    for i in range(n):
        nid = f"1101021950{id_base + i:07d}X"[-18:]
        body = bundle_bytes(n_obs=1, national_id=nid, pad_to=BODY)
        frame = env.seal(
            body,
            sender="chc",
            recipient="core",
            kind=kind,
            thread=thread,
            seq=i + 1,
            signing_key=key,
            recipient_key=core_pub,
        )
        frames.append(frame)
        sent.append((env.decode(frame, max_body=1 << 30).header.id, body, nid))
    verify_keys = {m: p.signing_keys for m, p in core.plan.directory.items()}
    receipts = [
        env.verify_receipt(r, lambda m: verify_keys[m]) for r in Intake(core).receive(frames)
    ]
    assert [r["status"] for r in receipts] == ["accepted"] * n
    assert [r["packet"] for r in receipts] == [pid for pid, _, _ in sent]
    return sent


def deliver_all(core: NodeContext) -> int:
    dispatcher = Dispatcher(
        core, load_handlers({"*": "spool"}, {"spool_dir": core.plan.delivery.spool_dir})
    )
    total = 0
    while (n := dispatcher.run_once()) > 0:
        total += n
    return total


def queue(core: NodeContext, kind: str, thread: str, n: int) -> list[tuple[str, bytes]]:
    items = [Outgoing("chc", kind, bundle_bytes(n_obs=1, pad_to=BODY), thread) for _ in range(n)]
    with core.store.write() as conn:
        results = queue_packets(core, conn, items, actor="test")
    assert [r.error for r in results] == [None] * n
    return [(str(r.packet_id), i.body) for r, i in zip(results, items, strict=True)]


def backdate_inbox(
    core: NodeContext, ids: list[str], days: float, state: str = "delivered"
) -> None:
    when = core.now() - timedelta(days=days)
    with core.store.write() as conn:
        done = conn.execute(
            update(INBOX)
            .where(INBOX.c.packet_id.in_(ids))
            .values(
                received_at=when,
                created_at=when,
                next_try_at=when,
                delivered_at=when if state == "delivered" else None,
                state=state,
            )
        )
        assert done.rowcount == len(ids)


def backdate_outbox(core: NodeContext, ids: list[str], days: float, state: str) -> None:
    when = core.now() - timedelta(days=days)
    with core.store.write() as conn:
        done = conn.execute(
            update(OUTBOX)
            .where(OUTBOX.c.packet_id.in_(ids))
            .values(
                state=state,
                created_at=when,
                next_try_at=when,
                sent_at=when,
                acked_at=when if state == "acknowledged" else None,
            )
        )
        assert done.rowcount == len(ids)


def bodies(core: NodeContext, table: Any, ids: list[str]) -> dict[str, bytes | None]:
    with core.store.read() as conn:
        rows = conn.execute(
            select(table.c.packet_id, table.c.body).where(table.c.packet_id.in_(ids))
        ).all()
    return {r.packet_id: (bytes(r.body) if r.body is not None else None) for r in rows}


def test_purge_by_age_and_kind_keeps_headers_audit_and_shrinks_file(site) -> None:
    core, chc = site
    # inbox: through the real intake and delivery
    in_old = receive(core, chc, "referral.request", "in-old", 60, 0)
    in_lab_40 = receive(core, chc, "result.lab", "in-lab-40", 20, 100)
    in_lab_100 = receive(core, chc, "result.lab", "in-lab-100", 20, 200)
    in_young = receive(core, chc, "referral.request", "in-young", 20, 300)
    in_waiting = receive(core, chc, "referral.request", "in-waiting", 5, 400)
    assert deliver_all(core) == 125
    ids = {
        name: [p for p, _, _ in group]
        for name, group in (
            ("in_old", in_old),
            ("in_lab_40", in_lab_40),
            ("in_lab_100", in_lab_100),
            ("in_young", in_young),
            ("in_waiting", in_waiting),
        )
    }
    backdate_inbox(core, ids["in_old"], 40)
    backdate_inbox(core, ids["in_lab_40"], 40)
    backdate_inbox(core, ids["in_lab_100"], 100)
    backdate_inbox(core, ids["in_young"], 10)
    backdate_inbox(core, ids["in_waiting"], 40, state="received")  # not handed over yet
    # outbox: through the real queueing path, then marked acknowledged in the past
    out_old = queue(core, "referral.request", "out-old", 60)
    out_young = queue(core, "referral.request", "out-young", 10)
    out_queued = queue(core, "referral.request", "out-queued", 5)
    ids["out_old"] = [p for p, _ in out_old]
    ids["out_young"] = [p for p, _ in out_young]
    ids["out_queued"] = [p for p, _ in out_queued]
    backdate_outbox(core, ids["out_old"], 40, "acknowledged")
    backdate_outbox(core, ids["out_young"], 5, "acknowledged")
    backdate_outbox(core, ids["out_queued"], 40, "queued")  # still waiting for the peer

    with core.store.read() as conn:
        seq_before = conn.execute(select(AUDIT.c.seq).order_by(AUDIT.c.seq.desc())).scalar()
    size_before = on_disk(core)
    assert size_before > 200 * BODY  # the bodies really are in the file

    purged = purge_bodies(core)
    assert purged == {"outbox": 60, "inbox": 80, "quarantine": 0}

    # bodies: gone exactly where retention says, kept everywhere else
    in_bodies = bodies(core, INBOX, [p for group in ids.values() for p in group])
    out_bodies = bodies(core, OUTBOX, [p for group in ids.values() for p in group])
    for pid in ids["in_old"] + ids["in_lab_100"]:
        assert in_bodies[pid] is None, pid
    by_id = {
        pid: body
        for group in (in_old, in_lab_40, in_lab_100, in_young, in_waiting)
        for pid, body, _ in group
    }
    for pid in ids["in_lab_40"] + ids["in_young"] + ids["in_waiting"]:
        assert in_bodies[pid] == by_id[pid], pid
    for pid in ids["out_old"]:
        assert out_bodies[pid] is None, pid
    for pid, body in out_young + out_queued:
        assert out_bodies[pid] == body, pid

    # headers stay answerable by packet id, field by field
    nid_of = {pid: nid for group in (in_old, in_lab_100) for pid, _, nid in group}
    for i, pid in enumerate(ids["in_old"]):
        h = ops.find_packet(core, pid)
        assert "body" not in h and "receipt" not in h
        assert h["direction"] == "in"
        assert h["packet_id"] == pid
        assert h["sender"] == "chc"
        assert h["kind"] == "referral.request"
        assert h["thread"] == "in-old"
        assert h["seq"] == i + 1
        assert h["state"] == "delivered"
        assert h["digest"] == env.body_digest(by_id[pid])
        assert h["size"] == len(by_id[pid])
        assert h["patient_hash"] == patient_hash(core.plan.patient_hash_key, nid_of[pid])
        assert h["delivered_at"] is not None
    for i, (pid, body) in enumerate(out_old):
        h = ops.find_packet(core, pid)
        assert "body" not in h and "frame" not in h
        assert (h["direction"], h["recipient"], h["kind"], h["thread"], h["seq"], h["state"]) == (
            "out",
            "chc",
            "referral.request",
            "out-old",
            i + 1,
            "acknowledged",
        )
        assert h["digest"] == env.body_digest(body)
        assert h["size"] == len(body)
    with pytest.raises(NotFound):
        ops.find_packet(core, "00000000-0000-4000-8000-000000000000")

    # one audited purge event, with the counts, and the chain still verifies
    with core.store.read() as conn:
        rows = conn.execute(
            select(AUDIT.c.seq, AUDIT.c.action, AUDIT.c.resource)
            .where(AUDIT.c.seq > seq_before)
            .order_by(AUDIT.c.seq)
        ).all()
        result = core.audit.verify(conn, core.plan.me.signing_keys)
    assert [(r.seq, r.action) for r in rows] == [(seq_before + 1, "purged")]
    resource = orjson.loads(rows[0].resource)
    assert resource["action"] == "D"
    assert resource["outcomeDesc"] == "delivered bodies purged by retention"
    extra = next(e for e in resource["extension"] if e["url"] == EXTRA_EXTENSION)
    assert {e["url"]: e["valueInteger"] for e in extra["extension"]} == {"outbox": 60, "inbox": 80}
    assert result.ok, result.reason
    assert result.checked == seq_before + 1

    # the file really shrank: at least most of the purged bytes went back to the file system
    size_after = on_disk(core)
    freed = 140 * BODY
    assert size_after <= size_before - 0.8 * freed, (size_before, size_after)

    # a second run finds nothing, writes no audit row
    assert purge_bodies(core) == {"outbox": 0, "inbox": 0, "quarantine": 0}
    with core.store.read() as conn:
        assert conn.execute(select(AUDIT.c.seq).order_by(AUDIT.c.seq.desc())).scalar() == (
            seq_before + 1
        )


def test_kind_setting_moves_the_cutoff(site) -> None:
    """result.lab keeps bodies 90 days, other kinds 30: 89 and 91 days either side of it."""
    core, chc = site
    lab_89 = receive(core, chc, "result.lab", "lab-89", 3, 0)
    lab_91 = receive(core, chc, "result.lab", "lab-91", 3, 10)
    ref_29 = receive(core, chc, "referral.request", "ref-29", 3, 20)
    ref_31 = receive(core, chc, "referral.request", "ref-31", 3, 30)
    assert deliver_all(core) == 12
    for group, days in ((lab_89, 89), (lab_91, 91), (ref_29, 29), (ref_31, 31)):
        backdate_inbox(core, [p for p, _, _ in group], days)
    assert core.plan.retention.body_days_for("result.lab") == 90.0
    assert core.plan.retention.body_days_for("referral.request") == 30.0
    assert purge_bodies(core) == {"outbox": 0, "inbox": 6, "quarantine": 0}
    got = bodies(core, INBOX, [p for g in (lab_89, lab_91, ref_29, ref_31) for p, _, _ in g])
    for pid, body, _ in lab_89 + ref_29:
        assert got[pid] == body
    for pid, _, _ in lab_91 + ref_31:
        assert got[pid] is None
