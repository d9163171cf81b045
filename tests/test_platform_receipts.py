"""A platform returns the recipients' end-to-end receipts to every member in one round: one read,
each member's batch posted at once, every answer recorded in one commit
(``bridge/delivery/receipts.py``). Members here are their real ``Intake`` behind a loopback
HTTP server (what the gateway does, minus FastAPI): each records the receipt on its own outbox
row. A member that does not answer backs off alone; a member's send job no longer takes
receipt rows.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from sqlalchemy import insert, select

from bridge.config.loader import load_node
from bridge.context import NodeContext
from bridge.crypto import envelope as env
from bridge.delivery.queue import Outgoing, queue_packets
from bridge.delivery.receipts import ReceiptReturn
from bridge.delivery.sender import PeerSender
from bridge.gateway.intake import Intake
from bridge.store import db as db_mod
from bridge.store.tables import OUTBOX
from tests.factory import bundle_bytes
from tests.harness import Alliance

MEMBERS = [
    {"id": "hub", "zh": "平台", "en": "Platform", "role": "platform"},
    {"id": "core", "zh": "复兴医院", "en": "Fuxing Hospital", "role": "core", "via": "hub"},
]
MEMBERS += [
    {"id": f"m-{i}", "zh": f"社区 {i}", "en": f"CHC {i}", "role": "community", "via": "hub"}
    for i in (1, 2, 3)
]
RULES = [{"from": f"m-{i}", "to": "core", "kinds": ["result.lab"]} for i in (1, 2, 3)]
PACKETS = {"m-1": 3, "m-2": 2, "m-3": 2}


class _Member(BaseHTTPRequestHandler):
    """A member's peer port: its real Intake, or HTTP 503 while ``down``."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        server: Any = self.server
        data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if server.down:
            body, status = b"store unavailable", 503
        else:
            frames = env.decode_batch(data, max_items=1000, max_total=64 << 20)
            server.posts.append(len(frames))
            body, status = env.encode_batch(server.intake.receive(frames)), 200
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def platform(tmp_path: Path) -> Iterator[dict[str, Any]]:
    alliance = Alliance(tmp_path / "alliance", MEMBERS, RULES)
    ctxs = {m: NodeContext.open(load_node(alliance.files[m])) for m in ("hub", "core", *PACKETS)}
    servers: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        for ctx in ctxs.values():
            stack.callback(ctx.store.dispose)
        for m in PACKETS:
            url = urlsplit(ctxs["hub"].plan.directory[m].exchange_url)
            server: Any = ThreadingHTTPServer((url.hostname or "", url.port or 0), _Member)
            server.daemon_threads = True
            server.intake, server.down, server.posts = Intake(ctxs[m]), m == "m-3", []
            threading.Thread(target=server.serve_forever, daemon=True).start()
            stack.callback(server.server_close)
            stack.callback(server.shutdown)
            servers[m] = server
        yield {"ctx": ctxs, "servers": servers}


def _queue(ctxs: dict[str, NodeContext]) -> dict[str, list[str]]:
    """Each member's packets to core (queued at the member), and core's signed receipts for
    them queued at the hub as the relay sender queues them."""
    hub, core = ctxs["hub"], ctxs["core"]
    sent: dict[str, list[str]] = {}
    rows = []
    now = datetime.now(UTC)
    for m, n in PACKETS.items():
        ctx = ctxs[m]
        with ctx.store.write() as conn:
            queued = queue_packets(
                ctx,
                conn,
                [Outgoing("core", "result.lab", bundle_bytes(marker=f"{m}-{i}")) for i in range(n)],
            )
        sent[m] = [q.packet_id for q in queued if q.packet_id]
        with ctx.store.read() as conn:
            got = conn.execute(
                select(OUTBOX.c.packet_id, OUTBOX.c.thread, OUTBOX.c.seq, OUTBOX.c.digest).where(
                    OUTBOX.c.packet_id.in_(sent[m])
                )
            ).all()
        for r in got:
            receipt = env.sign_receipt(
                {
                    "packet": r.packet_id,
                    "sender": m,
                    "recipient": "core",
                    "receiver": "core",
                    "status": "accepted",
                    "code": None,
                    "message": None,
                    "at": now,
                    "digest": r.digest,
                },
                core.signing_key,
            )
            rows.append(
                {
                    "packet_id": f"receipt:{r.packet_id}",
                    "origin": "receipt",
                    "sender": "hub",
                    "recipient": m,
                    "next_hop": m,
                    "kind": "receipt",
                    "thread": r.thread,
                    "seq": r.seq,
                    "digest": "",
                    "size": len(receipt),
                    "state": "queued",
                    "attempts": 0,
                    "created_at": now,
                    "next_try_at": now,
                    "frame": receipt,
                }
            )
    with hub.store.write() as conn:
        conn.execute(insert(OUTBOX), rows)
    return sent


def _states(ctx: NodeContext, **where: str) -> dict[str, tuple[str, int]]:
    with ctx.store.read() as conn:
        stmt = select(OUTBOX.c.packet_id, OUTBOX.c.state, OUTBOX.c.attempts)
        for col, value in where.items():
            stmt = stmt.where(OUTBOX.c[col] == value)
        return {r.packet_id: (r.state, r.attempts) for r in conn.execute(stmt)}


def test_every_members_receipts_go_in_one_round_and_one_commit(
    platform: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    ctxs, servers = platform["ctx"], platform["servers"]
    hub = ctxs["hub"]
    sent = _queue(ctxs)
    # a member's own send job leaves the receipts to the round below
    for m in PACKETS:
        assert PeerSender(hub, m)._head(100) == []
    writes: list[int] = []
    original = db_mod.Store.__dict__["write"]

    @contextlib.contextmanager
    def counted(self: Any) -> Iterator[Any]:
        if self is hub.store:
            writes.append(1)
        with original(self) as conn:
            yield conn

    monkeypatch.setattr(db_mod.Store, "write", counted)
    job = ReceiptReturn(hub, ["core", *PACKETS])
    try:
        report = job.run_once()
        assert (report.sent, report.failed) == (5, 2)
        assert "HTTP 503" in (report.error or "")
        assert len(writes) == 1  # m-1's, m-2's and m-3's outcomes: one transaction
        assert (servers["m-1"].posts, servers["m-2"].posts, servers["m-3"].posts) == ([3], [2], [])
        # each member recorded core's receipt on its own outbox row
        for m in ("m-1", "m-2"):
            assert _states(ctxs[m], origin="local") == {p: ("acknowledged", 0) for p in sent[m]}
        assert _states(ctxs["m-3"], origin="local") == {p: ("queued", 0) for p in sent["m-3"]}
        # at the hub: taken ones acknowledged; m-3's back off, still queued, tried once
        hub_rows = _states(hub, origin="receipt")
        assert hub_rows == {
            **{f"receipt:{p}": ("acknowledged", 1) for p in sent["m-1"] + sent["m-2"]},
            **{f"receipt:{p}": ("queued", 1) for p in sent["m-3"]},
        }
        with hub.store.read() as conn:
            waits = conn.execute(
                select(OUTBOX.c.next_try_at, OUTBOX.c.last_error).where(OUTBOX.c.next_hop == "m-3")
            ).all()
        assert all(
            w.next_try_at > datetime.now(UTC) - timedelta(seconds=1) and "HTTP 503" in w.last_error
            for w in waits
        )
        # nothing due: the next round reads, posts nothing and writes nothing
        assert job.run_once().sent == 0
        assert len(writes) == 1
        # m-3 back; once its backoff has passed, its receipts go (and only they)
        servers["m-3"].down = False
        with hub.store.write() as conn:
            conn.execute(
                OUTBOX.update()
                .where(OUTBOX.c.next_hop == "m-3")
                .values(next_try_at=datetime.now(UTC) - timedelta(seconds=1))
            )
        assert job.run_once().sent == 2
        assert (servers["m-1"].posts, servers["m-3"].posts) == ([3], [2])
        assert _states(ctxs["m-3"], origin="local") == {p: ("acknowledged", 0) for p in sent["m-3"]}
        assert set(_states(hub, origin="receipt").values()) == {
            ("acknowledged", 1),
            ("acknowledged", 2),
        }
    finally:
        job.close()
