"""Backpressure when a node's local delivery falls behind its intake (``[limits]
max_inbox_backlog``): at the bound the peer port refuses new batches unread with 503
``HT-PKT-BACKLOG`` and Retry-After, stores nothing of them, audits the episode once and raises
``queue-depth:inbox``; the peers' senders keep the packets queued, back off without counting an
attempt, and everything arrives exactly once after the backlog drains.

The count first, in process (SQLite and PostgreSQL, a fake clock), then real nodes: the
receiver's local delivery is held by pausing the adapter that receives the packets (IT's pause,
``bridge/console.py``), so the backlog stays until the test resumes it.
"""

from __future__ import annotations

import http.client
import json
import threading
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert, text

from bridge.alerts import Facts, evaluate
from bridge.audit.events import CODE_EXTENSION
from bridge.config.models import AlertsConfig
from bridge.console import Pauses
from bridge.context import NodeContext
from bridge.crypto import envelope as env
from bridge.crypto.keys import load_signing_key
from bridge.delivery.transport import PeerConnection
from bridge.errors import Backlogged, Busy, NotTaken, TransportError
from bridge.gateway.backlog import InboxBacklog
from bridge.store.db import Store
from bridge.store.tables import INBOX
from tests.factory import bundle, bundle_bytes
from tests.harness import ROOT, Alliance, NodeProcess, free_port_block, wait_for
from tests.harness import db_rows as rows

T0 = datetime(2026, 12, 7, 8, 0, tzinfo=UTC)


# -- the count, in process ------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        s = Store(f"sqlite:///{tmp_path / 'node.db'}")
    else:
        s = Store(str(request.getfixturevalue("pg_db")))
    s.create_all()
    yield s
    s.dispose()


def add_inbox(store: Store, states: list[str], start: int = 0) -> None:
    with store.write() as conn:
        conn.execute(
            insert(INBOX),
            [
                {
                    "packet_id": f"p{start + i}",
                    "sender": "chc",
                    "kind": "result.lab",
                    "thread": f"t{start + i}",
                    "seq": 1,
                    "digest": "d",
                    "size": 1,
                    "state": st,
                    "created_at": T0,
                    "received_at": T0,
                    "next_try_at": T0,
                    "receipt": b"r",
                }
                for i, st in enumerate(states)
            ],
        )


def deliver_all(store: Store) -> None:
    with store.write() as conn:
        conn.execute(text("UPDATE inbox SET state = 'delivered' WHERE state = 'received'"))


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_backlog_counts_received_only_is_cached_and_refuses_per_episode(store: Store) -> None:
    clock = Clock()
    gate = InboxBacklog(store, 20, clock=clock)
    assert (gate.bound, gate.resume) == (20, 18)
    assert gate.due
    # held rows wait for an earlier packet that must still get in; delivered/failed are done
    add_inbox(store, ["received"] * 12 + ["held"] * 30 + ["delivered"] * 40 + ["failed"] * 5)
    gate.refresh()
    assert not gate.due
    v = gate.check()
    assert (v.refuse, v.backlog, v.first, v.ended) == (False, 12, False, None)
    # batches taken between reads are counted without reading the store
    gate.taken(8)
    v = gate.check()
    assert (v.refuse, v.backlog, v.first) == (True, 20, True)
    v = gate.check()
    assert (v.refuse, v.backlog, v.first) == (True, 20, False)  # same episode, not audited again
    # the count is read again only after refresh_s: until then the cache answers
    add_inbox(store, ["received"] * 200, start=1000)
    clock.t += 0.4
    assert not gate.due
    clock.t += 0.1
    assert gate.due
    gate.refresh()
    assert gate.check().backlog == 21  # the read stops at bound + 1 entries, whatever is there
    deliver_all(store)
    add_inbox(store, ["received"] * 19, start=5000)  # 19: still over resume (18)
    clock.t += 0.5
    gate.refresh()
    v = gate.check()
    assert (v.refuse, v.backlog, v.ended) == (True, 19, None)
    with store.write() as conn:
        conn.execute(text("UPDATE inbox SET state = 'delivered' WHERE packet_id = 'p5000'"))
    clock.t += 0.5
    gate.refresh()
    v = gate.check()
    assert (v.refuse, v.backlog, v.ended) == (False, 18, 4)  # 4 batches refused in the episode
    v = gate.check()
    assert (v.refuse, v.first, v.ended) == (False, False, None)


def test_a_small_bound_resumes_one_under_it(store: Store) -> None:
    gate = InboxBacklog(store, 3, clock=Clock())
    assert gate.resume == 2
    gate.taken(3)
    assert gate.check().first
    gate.taken(-1)
    assert gate.check().ended == 1


def test_a_failed_read_keeps_the_last_count(tmp_path: Path) -> None:
    """The store failing under the count does not fail the request: the last count stands
    (the intake's own commit answers 503 if the store is really down) and the read waits for
    the next refresh instead of being retried by every request."""
    s = Store(f"sqlite:///{tmp_path / 'node.db'}")
    s.create_all()
    clock = Clock()
    gate = InboxBacklog(s, 5, clock=clock)
    add_inbox(s, ["received"] * 5)
    gate.refresh()
    with s.write() as conn:
        conn.execute(text("DROP TABLE inbox"))
    clock.t += 1.0
    gate.refresh()
    s.dispose()
    assert not gate.due and gate.check().refuse and gate.check().backlog == 5


def test_the_backlog_read_is_an_index_range_on_sqlite(tmp_path: Path) -> None:
    """EXPLAIN: the count reads ix_inbox_pending's entries of one state, never the table."""
    s = Store(f"sqlite:///{tmp_path / 'node.db'}")
    s.create_all()
    gate = InboxBacklog(s, 20_000)
    with s.read() as conn:
        compiled = gate._query.compile(conn, compile_kwargs={"literal_binds": True})
        plan = " ".join(str(r[-1]) for r in conn.execute(text(f"EXPLAIN QUERY PLAN {compiled}")))
    s.dispose()
    assert "USING COVERING INDEX ix_inbox_pending (state=?)" in plan, plan


def test_alert_at_the_bound_and_none_without_one() -> None:
    cfg = AlertsConfig()
    facts = Facts(now=T0, started_at=T0, peers={}, inbox_waiting=20_000, inbox_bound=20_000)
    [alert] = evaluate(facts, cfg)
    assert (alert.key, alert.rule, alert.subject, alert.value, alert.threshold) == (
        "queue-depth:inbox",
        "queue-depth",
        "inbox",
        20_000,
        20_000,
    )
    assert "HT-PKT-BACKLOG" in alert.message and "max_inbox_backlog" in alert.message
    assert (
        evaluate(
            Facts(now=T0, started_at=T0, peers={}, inbox_waiting=19_999, inbox_bound=20_000), cfg
        )
        == []
    )
    assert evaluate(Facts(now=T0, started_at=T0, peers={}, inbox_waiting=10**6), cfg) == []


@pytest.mark.parametrize(
    ("code", "retry_after", "raised"),
    [
        ("HT-PKT-BACKLOG", "3", Backlogged),
        ("HT-BUSY", "2", Busy),
        ("HT-STORE", "1", TransportError),
    ],
)
def test_the_sender_reads_a_backlog_refusal_as_not_taken(
    code: str, retry_after: str, raised: type[Exception]
) -> None:
    """A real socket: 503 with HT-PKT-BACKLOG is ``Backlogged`` and with HT-BUSY ``Busy``
    (NotTaken: no attempt is counted, Retry-After is kept); any other 503 (the receiver's store
    down) stays a transport failure, counted and backed off."""
    body = json.dumps({"code": code, "message": "m", "retry": "transient"}).encode()

    class Refuse(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(503)
            self.send_header("Retry-After", retry_after)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    conn = PeerConnection(f"http://127.0.0.1:{server.server_address[1]}")
    try:
        with pytest.raises(TransportError) as info:
            conn.post_batch(b"x")
    finally:
        conn.close()
        server.shutdown()
        server.server_close()
        thread.join()
    assert type(info.value) is raised
    assert isinstance(info.value, NotTaken) is (raised is not TransportError)
    assert info.value.code == (code if raised is not TransportError else "HT-TRANSPORT")
    if raised is not TransportError:
        assert info.value.retry_after == float(retry_after)  # type: ignore[attr-defined]


# -- real nodes -----------------------------------------------------------------------------------

MEMBERS = [
    {"id": "core", "zh": "复兴医院", "en": "Fuxing Hospital", "role": "core"},
    {"id": "chc", "zh": "月坛社区卫生服务中心", "en": "Yuetan CHC", "role": "community"},
    {"id": "sec", "zh": "广外医院", "en": "Guangwai Hospital", "role": "secondary"},
]
RULES = [
    {"from": "chc", "to": "core", "kinds": ["result.lab"]},
    {"from": "sec", "to": "core", "kinds": ["result.lab"]},
]
BOUND = 3


@pytest.fixture(scope="module")
def alliance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Alliance]:
    """core files every result.lab through its his-hl7 adapter (results for a patient its HIS
    does not know are counted and skipped, so no HIS needs to listen); the adapter is paused
    before core first starts, so what core takes stays received."""
    listen = free_port_block(2)
    his = listen + 1  # nothing listens there: no result reaches the HIS
    members = [dict(m) for m in MEMBERS]
    members[0]["adapters"] = [
        {
            "name": "his",
            "type": "his-hl7",
            "mappings": str(ROOT / "mappings" / "fuxing"),
            "receives": ["result.*"],
            "options": {"listen": f"127.0.0.1:{listen}", "his": f"127.0.0.1:{his}"},
        }
    ]
    a = Alliance(tmp_path_factory.mktemp("backpressure") / "alliance", members, RULES)
    core, chc = a.files["core"], a.files["chc"]
    assert "[limits]" not in core.read_text() and "[alerts]" not in core.read_text()
    assert "[delivery]" not in chc.read_text()
    core.write_text(
        core.read_text() + f"\n[limits]\nmax_inbox_backlog = {BOUND}\n\n[alerts]\nevery_s = 1\n"
    )
    chc.write_text(chc.read_text() + f"\n[delivery]\nbatch_size = {BOUND}\n")
    pause(a.node("core"), True)
    a.start("core")
    yield a
    a.stop_all()


def pause(node: NodeProcess, on: bool) -> None:
    """IT's pause of core's adapter, as the dashboard sets it (stored, audited); the running
    node reads it within Pauses.ttl_s."""
    ctx = NodeContext.open(node.plan)
    try:
        Pauses(ctx).set("adapter:his", on, actor="role:it")
    finally:
        ctx.store.dispose()


def sec_frames(a: Alliance, n: int, thread: str) -> list[bytes]:
    sec = a.node("sec").plan
    key = load_signing_key(sec.keys.signing, sec.keys.passphrase)
    core_pub = a.node("core").plan.directory["core"].encryption_keys[0]
    return [
        env.seal(
            bundle_bytes(),
            sender="sec",
            recipient="core",
            kind="result.lab",
            thread=thread,
            seq=i,
            signing_key=key,
            recipient_key=core_pub,
        )
        for i in range(1, n + 1)
    ]


def raw_post(node: NodeProcess, frames: list[bytes]) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(node.plan.peer_host, node.plan.peer_port, timeout=30)
    try:
        conn.request(
            "POST",
            "/exchange/v1/packets",
            body=env.encode_batch(frames),
            headers={"Content-Type": "application/x-hutong-batch"},
        )
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def backlog_audits(core: NodeProcess) -> list[tuple[str, str, str, str]]:
    """(action, outcome, code, outcomeDesc) of the backlog refusals core audited."""
    out = []
    for action, outcome, resource in rows(
        core, "SELECT action, outcome, resource FROM audit ORDER BY seq"
    ):
        event = json.loads(resource)
        codes = [e["valueCode"] for e in event.get("extension", []) if e["url"] == CODE_EXTENSION]
        if codes == ["HT-PKT-BACKLOG"]:
            out.append((action, outcome, codes[0], event.get("outcomeDesc", "")))
    return out


def metric(core: NodeProcess, name: str, **labels: str) -> float | None:
    req = urllib_request(core)
    for line in req.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def urllib_request(core: NodeProcess) -> str:
    import urllib.request

    req = urllib.request.Request(
        core.local_url + "/metrics", headers={"Authorization": f"Bearer {core.token('it')}"}
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return str(r.read().decode())


@pytest.mark.slow
def test_over_the_backlog_batches_are_refused_unread_and_arrive_once_after_it_drains(
    alliance: Alliance,
) -> None:
    core, chc = alliance.node("core"), alliance.node("chc")
    first = sec_frames(alliance, BOUND, "bp-sec-1")
    status, _, _ = raw_post(core, first)
    assert status == 200
    assert rows(core, "SELECT state, COUNT(*) FROM inbox GROUP BY state") == [("received", BOUND)]

    # at the bound: refused before anything is read or stored, one audit entry an episode
    second = sec_frames(alliance, 2, "bp-sec-2")
    for _ in range(2):
        status, headers, body = raw_post(core, second)
        assert status == 503
        assert headers["retry-after"] == "2" and headers["connection"] == "close"
        answer = json.loads(body)
        assert (answer["code"], answer["retry"]) == ("HT-PKT-BACKLOG", "transient")
        assert f"{BOUND} received packets wait for local delivery" in answer["message"]
    assert rows(core, "SELECT COUNT(*) FROM inbox")[0][0] == BOUND
    assert rows(core, "SELECT COUNT(*) FROM quarantine")[0][0] == 0
    [(action, outcome, code, message)] = backlog_audits(core)
    assert (action, outcome, code) == ("refused", "4", "HT-PKT-BACKLOG")
    assert message == (
        f"HT-PKT-BACKLOG: {BOUND} received packets wait for local delivery, at the bound of "
        f"{BOUND} ([limits] max_inbox_backlog): new batches are refused until at most "
        f"{BOUND - 1} wait"
    )
    # IT sees it: the alert and the bound in /metrics
    assert metric(core, "hutong_inbox_backlog_limit", node="core") == BOUND
    wait_for(
        lambda: metric(core, "hutong_alert_active", rule="queue-depth", subject="inbox") == 1,
        timeout=30,
        what="queue-depth:inbox raised",
    )

    # a real sender: refused, its packets stay queued with no attempt counted
    chc.start()
    chc.wait_ready()
    try:
        sent = chc.send(
            "core", "result.lab", [bundle(marker=f"bp-{i}") for i in range(7)], thread="bp-chc"
        )
        wait_for(
            lambda: (
                rows(
                    chc,
                    "SELECT COUNT(*) FROM outbox WHERE origin = 'local' AND last_error LIKE "
                    "'%HT-PKT-BACKLOG%'",
                )[0][0]
                == BOUND
            ),
            timeout=60,
            what="chc's first batch refused for core's backlog",
        )
        assert Counter(
            rows(chc, "SELECT state, attempts FROM outbox WHERE origin = 'local'")
        ) == Counter({("queued", 0): 7})
        assert rows(core, "SELECT COUNT(*) FROM inbox WHERE sender = 'chc'")[0][0] == 0

        # local delivery resumes: the backlog drains, chc resumes by itself, each packet once
        pause(core, False)
        wait_for(
            lambda: (
                rows(
                    core,
                    "SELECT COUNT(*) FROM inbox WHERE sender = 'chc' AND state = 'delivered'",
                )[0][0]
                == 7
            ),
            timeout=120,
            what="all of chc's packets delivered at core",
        )
        got = Counter(p for (p,) in rows(core, "SELECT packet_id FROM inbox WHERE sender = 'chc'"))
        assert got == Counter(sent)
        seqs = [s for (s,) in rows(core, "SELECT seq FROM inbox WHERE sender = 'chc' ORDER BY id")]
        assert seqs == list(range(1, 8))  # taken in thread order
        wait_for(
            lambda: (
                Counter(rows(chc, "SELECT state, attempts FROM outbox WHERE origin = 'local'"))
                == Counter({("acknowledged", 1): 7})
            ),
            timeout=30,
            what="chc's receipts recorded",
        )  # the refusals were not failed attempts
        received = Counter(
            p
            for (p,) in rows(
                core, "SELECT packet_id FROM audit WHERE action = 'received' AND peer = 'chc'"
            )
        )
        assert received == Counter(sent)
        assert rows(core, "SELECT state, COUNT(*) FROM inbox GROUP BY state") == [
            ("delivered", BOUND + 7)
        ]
        audits = backlog_audits(core)
        assert 1 <= len(audits) <= 4  # one per episode: chc's batches of 3 may start new ones
        assert {(a, o, c) for a, o, c, _ in audits} == {("refused", "4", "HT-PKT-BACKLOG")}
        wait_for(
            lambda: (
                metric(core, "hutong_alert_active", rule="queue-depth", subject="inbox") is None
            ),
            timeout=30,
            what="queue-depth:inbox cleared",
        )
    finally:
        chc.stop()
