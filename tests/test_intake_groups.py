"""Peer intake commits grouped: the batches of several requests that queue behind the store's
write lock share one commit (``Store.write_grouped``), each answered only after it; a packet id
carried by two requests of one group is stored once and the second answered as a duplicate (or
refused as a replay if its content differs); a request whose commit fails takes nothing of the
others with it (the group runs again one by one). A peer's packet with the id of one of the
node's own packets is refused as a replay at once, for good (at a platform it would otherwise
hit the outbox's unique key on every try), while two processes racing with one packet on
PostgreSQL still end in a 503 and then a duplicate.

The real ``Intake`` in process with real keys and a real store (SQLite, and PostgreSQL for the
platform); requests are threads calling ``Intake.receive`` as the gateway's thread pool does. To
make them one group, the test holds the group's lock while they queue up behind it (as a group
being committed does).
"""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, event, select, text

from bridge.audit.tables import AuditRecord
from bridge.config.loader import load_node
from bridge.context import NodeContext
from bridge.crypto import envelope as env
from bridge.crypto.keys import load_signing_key
from bridge.delivery.queue import Outgoing, queue_packets
from bridge.errors import StoreError
from bridge.gateway.intake import Intake
from bridge.store.tables import INBOX, OUTBOX, QUARANTINE
from tests.factory import bundle_bytes
from tests.harness import Alliance, wait_for

MEMBERS = [
    {"id": "hub", "zh": "医联体信息平台", "en": "Alliance platform", "role": "platform"},
    {"id": "core", "zh": "复兴医院", "en": "Fuxing Hospital", "role": "core"},
    {"id": "chc", "zh": "月坛社区卫生服务中心", "en": "Yuetan CHC", "role": "community"},
    {"id": "m-1", "zh": "社区 1", "en": "CHC 1", "role": "community", "via": "hub"},
    {"id": "m-2", "zh": "社区 2", "en": "CHC 2", "role": "community", "via": "hub"},
]
RULES = [
    {"from": "chc", "to": "core", "kinds": ["result.lab"]},
    {"from": "m-1", "to": "core", "kinds": ["result.lab"]},
    {"from": "m-2", "to": "core", "kinds": ["result.lab"]},
    {"from": "hub", "to": "m-1", "kinds": ["result.lab"]},  # the platform's own packets
    {"from": "core", "to": "chc", "kinds": ["result.lab"]},
]


class Node:
    """One node's real intake and store, and a count of its write commits."""

    def __init__(self, a: Alliance, node: str) -> None:
        self.plan = load_node(a.files[node])
        self.ctx = NodeContext.open(self.plan)
        self.intake = Intake(self.ctx)
        self.commits = 0
        self.relayed: list[set[str]] = []
        self.intake.on_relayed = self.relayed.append
        event.listen(self.ctx.store.engine, "commit", self._count)

    def _count(self, _conn: Connection) -> None:
        self.commits += 1

    def keys(self, node: str) -> tuple[Any, ...]:
        return self.plan.directory[node].signing_keys

    def rows(self, query: Any) -> list[Any]:
        with self.ctx.store.read() as conn:
            return list(conn.execute(query))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def nodes(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[dict[str, Node]]:
    dsn_for = request.getfixturevalue("pg_node_dbs") if request.param == "postgres" else None
    a = Alliance(tmp_path / "alliance", MEMBERS, RULES, dsn_for=dsn_for)
    made = {n: Node(a, n) for n in ("hub", "core")}
    made["keys"] = {  # type: ignore[assignment]
        m: load_signing_key(p.keys.signing, p.keys.passphrase)
        for m in ("chc", "m-1", "m-2")
        for p in [load_node(a.files[m])]
    }
    yield made
    for n in ("hub", "core"):
        made[n].ctx.store.dispose()


def sealed(nodes: dict[str, Any], sender: str, thread: str, seq: int, **kw: Any) -> bytes:
    return env.seal(
        bundle_bytes(n_obs=1, **kw.pop("bundle", {})),
        sender=sender,
        recipient="core",
        kind="result.lab",
        thread=thread,
        seq=seq,
        signing_key=nodes["keys"][sender],
        recipient_key=nodes["core"].plan.directory["core"].encryption_keys[0],
        **kw,
    )


def one_group(node: Node, requests: list[list[bytes]], **kw: Any) -> list[Any]:
    """Each request on a thread of its own, queued behind the held writer lock so that all
    of them form one group; each one's answers, or the exception it raised."""
    store = node.ctx.store
    out: list[Any] = [None] * len(requests)

    def call(i: int) -> None:
        try:
            out[i] = node.intake.receive(requests[i], **kw)
        except Exception as exc:  # noqa: BLE001 - the caller's outcome, asserted by the test
            out[i] = exc

    with store._group_lock:  # a group in progress: the requests queue up behind it
        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(requests))]
        for t in threads:
            t.start()
        wait_for(lambda: len(store._queue) == len(requests), 30, what="the requests queued")
    for t in threads:
        t.join(60)
    return out


def ids_of(frames: list[bytes]) -> list[str]:
    return [env.decode(f, max_body=1 << 20).header.id for f in frames]


def audit_of(node: Node, action: str) -> Counter[str]:
    audit = AuditRecord.__table__  # type: ignore[attr-defined]
    return Counter(
        r.packet_id for r in node.rows(select(audit.c.packet_id).where(audit.c.action == action))
    )


def own_packet(node: Node, to: str) -> str:
    """The id of a packet ``node`` queued itself (its outbox, origin ``local``) for ``to``,
    who reads that id on the packet when it arrives."""
    with node.ctx.store.write() as conn:
        [queued] = queue_packets(node.ctx, conn, [Outgoing(to, "result.lab", bundle_bytes())])
    assert queued.packet_id is not None, queued.error
    return queued.packet_id


def chain_ok(node: Node) -> bool:
    with node.ctx.store.read() as conn:
        return node.ctx.audit.verify(conn).ok


def test_a_platform_relays_the_batches_of_three_members_in_one_commit(
    nodes: dict[str, Any],
) -> None:
    hub: Node = nodes["hub"]
    requests = [
        [sealed(nodes, "m-1", "t-a", s) for s in (1, 2, 3)],
        [sealed(nodes, "m-2", "t-b", s) for s in (1, 2)],
        [sealed(nodes, "m-1", "t-c", s) for s in (1, 2)],
    ]
    before = hub.commits
    answers = one_group(hub, requests)
    assert hub.commits - before == 1  # one for three requests
    for frames, got in zip(requests, answers, strict=True):
        assert isinstance(got, list), got
        fields = [env.verify_receipt(raw, hub.keys) for raw in got]
        assert [f["packet"] for f in fields] == ids_of(frames)
        assert {(f["status"], f["receiver"], f["recipient"]) for f in fields} == {
            ("relayed", "hub", "core")
        }
    every = [pid for frames in requests for pid in ids_of(frames)]
    stored = hub.rows(select(OUTBOX.c.packet_id, OUTBOX.c.state).where(OUTBOX.c.origin == "relay"))
    assert sorted(stored) == sorted((pid, "queued") for pid in every)
    assert audit_of(hub, "relay-queued") == Counter(every)
    assert hub.relayed == [{"core"}] * 3  # each request woke the next hop's sender
    assert chain_ok(hub)


def test_one_packet_in_two_requests_of_a_group_is_stored_once_and_answered_twice(
    nodes: dict[str, Any],
) -> None:
    """Both requests passed the first look-up (neither was stored yet); the look-up inside the
    transaction finds the first one's row: the second gets that stored receipt, byte for byte."""
    core: Node = nodes["core"]
    same = sealed(nodes, "chc", "t-dup", 1)
    requests = [[same, sealed(nodes, "chc", "t-x", 1)], [sealed(nodes, "chc", "t-y", 1), same]]
    before = core.commits
    first, second = one_group(core, requests)
    assert core.commits - before == 1
    [pid] = ids_of([same])
    [(receipt,)] = core.rows(select(INBOX.c.receipt).where(INBOX.c.packet_id == pid))
    assert first[0] == second[1] == receipt
    assert env.verify_receipt(receipt, core.keys)["status"] == "accepted"
    for got, frames in zip((first, second), requests, strict=True):
        fields = [env.verify_receipt(raw, core.keys) for raw in got]
        assert [(f["packet"], f["status"]) for f in fields] == [
            (p, "accepted") for p in ids_of(frames)
        ]
    every = set(ids_of(requests[0]) + ids_of(requests[1]))
    assert Counter(r.packet_id for r in core.rows(select(INBOX.c.packet_id))) == Counter(every)
    assert audit_of(core, "received") == Counter(every)
    assert audit_of(core, "duplicate") == Counter({pid: 1})
    assert chain_ok(core)


def test_one_packet_id_with_other_content_in_a_group_is_refused_as_a_replay(
    nodes: dict[str, Any],
) -> None:
    """Two members' packets with one id: whichever the group took first is relayed, the other
    is refused (signed, quarantined, audited), not relayed."""
    hub: Node = nodes["hub"]
    pid = "4f7c2d1e-0000-4000-8000-00000000a11d"
    a = sealed(nodes, "m-1", "t-a", 1, packet_id=pid)
    b = sealed(nodes, "m-2", "t-b", 1, packet_id=pid)
    got = one_group(hub, [[a], [b]])
    [(sender,)] = hub.rows(select(OUTBOX.c.sender).where(OUTBOX.c.packet_id == pid))
    won, lost = (0, 1) if sender == "m-1" else (1, 0)
    assert env.verify_receipt(got[won][0], hub.keys)["status"] == "relayed"
    refusal = env.verify_receipt(got[lost][0], hub.keys)
    assert (refusal["status"], refusal["code"], refusal["packet"]) == (
        "refused",
        "HT-PKT-REPLAY",
        pid,
    )
    loser = ("m-1", "m-2")[lost]
    quarantined = hub.rows(select(QUARANTINE.c.sender, QUARANTINE.c.code, QUARANTINE.c.packet_id))
    assert [tuple(r) for r in quarantined] == [(loser, "HT-PKT-REPLAY", pid)]
    assert audit_of(hub, "relay-queued") == Counter({pid: 1})
    assert audit_of(hub, "refused") == Counter({pid: 1})
    assert chain_ok(hub)


def test_a_request_that_fails_in_a_group_leaves_the_others_committed(
    nodes: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The middle request's commit fails after writing its rows: the group is rolled back and
    runs again one by one; the two others are stored and answered, the failing one gets its
    error and nothing of it is kept. Sent again, it is stored once."""
    core: Node = nodes["core"]
    requests = [[sealed(nodes, "chc", f"t-{k}", s) for s in (1, 2)] for k in range(3)]
    bad = set(ids_of(requests[1]))
    real: Callable[..., Any] = core.intake._commit

    def failing(conn: Connection, batch: Any, *rest: Any) -> Any:
        out = real(conn, batch, *rest)
        if any(new.header.id in bad for new in batch.new):
            raise StoreError("database unavailable: forced")
        return out

    monkeypatch.setattr(core.intake, "_commit", failing)
    before = core.commits
    answers = one_group(core, requests)
    # the group's and the failing request's own transactions rolled back; the two others
    # committed alone
    assert core.commits - before == 2
    assert isinstance(answers[1], StoreError)
    for k in (0, 2):
        fields = [env.verify_receipt(raw, core.keys) for raw in answers[k]]
        assert [(f["packet"], f["status"]) for f in fields] == [
            (p, "accepted") for p in ids_of(requests[k])
        ]
    good = set(ids_of(requests[0]) + ids_of(requests[2]))
    assert {r.packet_id for r in core.rows(select(INBOX.c.packet_id))} == good
    assert audit_of(core, "received") == Counter(good)
    assert chain_ok(core)
    monkeypatch.undo()
    again = core.intake.receive(requests[1])
    assert [env.verify_receipt(raw, core.keys)["status"] for raw in again] == ["accepted"] * 2
    assert audit_of(core, "received") == Counter(good | bad)
    assert audit_of(core, "duplicate") == Counter()


def test_a_packet_twice_in_one_request_gets_the_answer_its_first_got(
    nodes: dict[str, Any],
) -> None:
    """The same id twice in one batch, the second time with other content: the first is
    stored, the second refused; byte-identical twice: both get the one stored receipt."""
    core: Node = nodes["core"]
    same = sealed(nodes, "chc", "t-1", 1)
    other = sealed(nodes, "chc", "t-1", 2, packet_id=ids_of([same])[0], bundle={"marker": "other"})
    got = core.intake.receive([same, same, other])
    [(receipt,)] = core.rows(select(INBOX.c.receipt))
    assert got[0] == got[1] == receipt
    refusal = env.verify_receipt(got[2], core.keys)
    assert (refusal["status"], refusal["code"]) == ("refused", "HT-PKT-REPLAY")
    assert audit_of(core, "received") == Counter(ids_of([same]))
    assert audit_of(core, "refused") == Counter(ids_of([same]))


def test_a_relayed_packet_with_the_id_of_the_platforms_own_packet_is_refused_for_good(
    nodes: dict[str, Any],
) -> None:
    """m-1 read the id of the hub's own packet to it and sends a packet for core with that id:
    refused at once as a replay (signed, quarantined, audited), not answered 503 on every try
    by the outbox's unique key; the rest of its request and of the group relayed, the hub's
    own packet untouched. Sent again, the same final answer."""
    hub: Node = nodes["hub"]
    pid = own_packet(hub, "m-1")
    hostile = sealed(nodes, "m-1", "t-h", 1, packet_id=pid)
    requests = [
        [sealed(nodes, "m-1", "t-a", 1), hostile, sealed(nodes, "m-1", "t-a", 2)],
        [sealed(nodes, "m-2", "t-b", 1)],
    ]
    good = ids_of(requests[0][::2] + requests[1])
    before = hub.commits
    answers = one_group(hub, requests)
    assert hub.commits - before == 1
    assert all(isinstance(got, list) for got in answers), answers
    fields = [env.verify_receipt(raw, hub.keys) for got in answers for raw in got]
    assert [(f["packet"], f["status"], f["code"]) for f in fields] == [
        (good[0], "relayed", None),
        (pid, "refused", "HT-PKT-REPLAY"),
        (good[1], "relayed", None),
        (good[2], "relayed", None),
    ]
    assert (fields[1]["sender"], fields[1]["recipient"], fields[1]["receiver"]) == (
        "m-1",
        "core",
        "hub",
    )
    outbox = hub.rows(select(OUTBOX.c.packet_id, OUTBOX.c.origin, OUTBOX.c.sender))
    assert sorted(tuple(r) for r in outbox) == sorted(
        [(pid, "local", "hub"), (good[0], "relay", "m-1"), (good[1], "relay", "m-1")]
        + [(good[2], "relay", "m-2")]
    )
    [mine] = hub.rows(
        select(OUTBOX.c.recipient, OUTBOX.c.state, OUTBOX.c.frame).where(OUTBOX.c.packet_id == pid)
    )
    assert tuple(mine) == ("m-1", "queued", None)
    quarantined = hub.rows(
        select(QUARANTINE.c.sender, QUARANTINE.c.code, QUARANTINE.c.packet_id, QUARANTINE.c.raw)
    )
    assert [tuple(r) for r in quarantined] == [("m-1", "HT-PKT-REPLAY", pid, hostile)]
    assert audit_of(hub, "refused") == Counter({pid: 1})
    assert audit_of(hub, "relay-queued") == Counter(good)
    assert hub.relayed == [{"core"}, {"core"}]

    again = hub.intake.receive([hostile])  # the member's retry: the same answer, for good
    refusal = env.verify_receipt(again[0], hub.keys)
    assert (refusal["packet"], refusal["status"], refusal["code"]) == (
        pid,
        "refused",
        "HT-PKT-REPLAY",
    )
    assert len(hub.rows(select(QUARANTINE.c.id))) == 2
    assert audit_of(hub, "refused") == Counter({pid: 2})

    # the hub's own packet itself, sent back to it by m-1 (its header is the outbox row's
    # word for word): not a duplicate of a relay, refused the same way
    [row] = hub.rows(
        select(OUTBOX.c.body, OUTBOX.c.thread, OUTBOX.c.seq).where(OUTBOX.c.packet_id == pid)
    )
    hub_key = load_signing_key(hub.plan.keys.signing, hub.plan.keys.passphrase)
    reflected = env.seal(
        row.body,
        sender="hub",
        recipient="m-1",
        kind="result.lab",
        thread=row.thread,
        seq=row.seq,
        signing_key=hub_key,
        recipient_key=hub.plan.directory["m-1"].encryption_keys[0],
        packet_id=pid,
    )
    refusal = env.verify_receipt(hub.intake.receive([reflected])[0], hub.keys)
    assert (refusal["packet"], refusal["status"], refusal["code"]) == (
        pid,
        "refused",
        "HT-PKT-REPLAY",
    )
    assert audit_of(hub, "refused") == Counter({pid: 3})
    assert audit_of(hub, "duplicate") == Counter()
    assert len(hub.rows(select(OUTBOX.c.id))) == 4
    assert chain_ok(hub)


def test_a_packet_with_the_id_of_the_nodes_own_packet_is_refused_on_a_plain_node(
    nodes: dict[str, Any],
) -> None:
    """On a node that relays nothing the intake writes only inbox rows, so no unique key is
    hit; the id is refused all the same (one packet id, one packet at a node), and the node's
    own packet is untouched."""
    core: Node = nodes["core"]
    pid = own_packet(core, "chc")
    hostile = sealed(nodes, "chc", "t-h", 1, packet_id=pid)
    other = sealed(nodes, "chc", "t-o", 1)
    for attempt in (1, 2):
        got = core.intake.receive([hostile, other])
        fields = [env.verify_receipt(raw, core.keys) for raw in got]
        assert [(f["packet"], f["status"], f["code"]) for f in fields] == [
            (pid, "refused", "HT-PKT-REPLAY"),
            (ids_of([other])[0], "accepted", None),
        ]
        assert audit_of(core, "refused") == Counter({pid: attempt})
    assert [r.packet_id for r in core.rows(select(INBOX.c.packet_id))] == ids_of([other])
    [mine] = core.rows(
        select(OUTBOX.c.origin, OUTBOX.c.recipient, OUTBOX.c.state).where(OUTBOX.c.packet_id == pid)
    )
    assert tuple(mine) == ("local", "chc", "queued")
    assert [tuple(r) for r in core.rows(select(QUARANTINE.c.code, QUARANTINE.c.packet_id))] == [
        ("HT-PKT-REPLAY", pid)
    ] * 2
    assert chain_ok(core)


@pytest.mark.postgres
def test_two_processes_racing_with_one_packet_on_postgresql_end_in_a_duplicate(
    tmp_path: Path, pg_node_dbs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two processes of a platform on one database (lanes) take the same packet at once:
    neither look-up sees the other's uncommitted row, the second's insert waits on the
    outbox's unique key and fails when the first commits. That one is a 503 (the sender tries
    again), never a refusal, and the next try gets the duplicate answer."""
    a = Alliance(tmp_path / "alliance", MEMBERS, RULES, dsn_for=pg_node_dbs)
    first, second = Node(a, "hub"), Node(a, "hub")  # two processes, one database
    member = load_node(a.files["m-1"])
    key = load_signing_key(member.keys.signing, member.keys.passphrase)
    wrote, go = threading.Event(), threading.Event()
    try:
        pkt = env.seal(
            bundle_bytes(n_obs=1),
            sender="m-1",
            recipient="core",
            kind="result.lab",
            thread="t-race",
            seq=1,
            signing_key=key,
            recipient_key=first.plan.directory["core"].encryption_keys[0],
        )
        [pid] = ids_of([pkt])
        real: Callable[..., Any] = first.intake._commit

        def held(conn: Connection, batch: Any, *rest: Any) -> Any:
            out = real(conn, batch, *rest)
            wrote.set()
            assert go.wait(60)  # the row written, not committed: the other one runs now
            return out

        monkeypatch.setattr(first.intake, "_commit", held)
        got: dict[str, Any] = {}

        def call(name: str, node: Node) -> None:
            try:
                got[name] = node.intake.receive([pkt])
            except Exception as exc:  # noqa: BLE001 - the caller's outcome, asserted below
                got[name] = exc

        one = threading.Thread(target=call, args=("first", first))
        one.start()
        assert wrote.wait(60)
        two = threading.Thread(target=call, args=("second", second))
        two.start()
        waiting = text(  # a session of this database waiting on a lock
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        wait_for(  # the second's insert waits on the first's uncommitted key
            lambda: second.rows(waiting)[0][0] == 1, 30, what="the second insert waiting"
        )
        go.set()
        one.join(60)
        two.join(60)
        assert env.verify_receipt(got["first"][0], first.keys)["status"] == "relayed"
        assert isinstance(got["second"], StoreError), got["second"]
        assert got["second"].code == "HT-STORE"
        again = env.verify_receipt(second.intake.receive([pkt])[0], second.keys)
        assert (again["packet"], again["status"], again["code"]) == (pid, "relayed", None)
        assert second.rows(select(OUTBOX.c.packet_id, OUTBOX.c.origin)) == [(pid, "relay")]
        assert audit_of(second, "relay-queued") == Counter({pid: 1})
        assert audit_of(second, "duplicate") == Counter({pid: 1})
        assert audit_of(second, "refused") == Counter()
        assert second.rows(select(QUARANTINE.c.id)) == []
        assert chain_ok(second)
    finally:
        go.set()
        first.ctx.store.dispose()
        second.ctx.store.dispose()


def test_a_packet_stored_before_the_node_used_its_id_itself_is_still_a_duplicate(
    nodes: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store from before the own-id check may hold a peer's packet under an id the node has
    since used for its own: the stored packet's resend still gets its stored receipt."""
    core: Node = nodes["core"]
    pkt = sealed(nodes, "chc", "t-old", 1)
    [receipt] = core.intake.receive([pkt])
    [pid] = ids_of([pkt])
    monkeypatch.setattr(uuid, "uuid4", lambda: uuid.UUID(pid))  # the node's next packet id
    assert own_packet(core, "chc") == pid
    monkeypatch.undo()
    assert core.intake.receive([pkt]) == [receipt]
    assert audit_of(core, "duplicate") == Counter({pid: 1})
    assert audit_of(core, "refused") == Counter()
