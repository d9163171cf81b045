"""``[delivery] per_peer_concurrency``: up to k batches to one peer in flight at once, every
packet received once and in order within its thread (real node processes on loopback).

How concurrency is observed, at the receiver, without timing anything: the receiver runs with a
slow point (``HUTONG_FAULT_DELAY=intake.after_commit:D``: every intake request waits D seconds
after its commit before it answers). With one batch in flight, the sender posts the next batch
only after the previous answer, so every intake starts at least D after the previous one started.
An intake that started less than D after the one committed before it began while that one was
still inside the receiver: the two requests overlapped. And since a round's batches are sealed
at one instant, packets with the same created-at arriving in different intake transactions were
posted as separate batches before any of their answers came back.
"""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from bridge.delivery.sender import partition_of
from bridge.delivery.transport import PeerConnection
from bridge.errors import AmbiguousDelivery, RateLimited
from tests.harness import Alliance, NodeProcess, spooled, wait_for
from tests.harness import db_rows as rows
from tests.test_faults import Ledger, check_delivered_once, dead, start_with, stop_together

pytestmark = pytest.mark.slow

MEMBERS = [
    {"id": "core", "zh": "复兴医院", "en": "Fuxing Hospital", "role": "core"},
    {"id": "chc", "zh": "月坛社区卫生服务中心", "en": "Yuetan CHC", "role": "community"},
    {"id": "gw", "zh": "广外医院", "en": "Guangwai Hospital", "role": "secondary"},
]
RULES = [
    {"from": "chc", "to": "core", "kinds": ["result.lab"]},
    {"from": "chc", "to": "gw", "kinds": ["result.lab"]},
]
SLOW_S = 0.4  # the receiver's slow point: each intake answers this long after its commit
BATCH = 6


def configure(a: Alliance, node: str, section: str, **settings: object) -> None:
    path = a.files[node]
    text = path.read_text()
    assert f"[{section}]" not in text.replace(f"# [{section}]", "")
    lines = [f"{k} = {v!r}" for k, v in settings.items()]
    path.write_text(text + f"\n[{section}]\n" + "\n".join(lines) + "\n")


def alliance(tmp_path: Path, k: int, members: int = 2) -> Alliance:
    """core, chc (the sender, k batches per peer) and with ``members=3`` also gw."""
    a = Alliance(tmp_path / f"alliance-k{k}", MEMBERS[:members], RULES[: members - 1])
    configure(
        a,
        "chc",
        "delivery",
        batch_size=BATCH,
        per_peer_concurrency=k,
        poll_interval_s=0.2,
        backoff_base_s=0.3,
        backoff_max_s=1.0,
    )
    return a


def up(*nodes: NodeProcess) -> None:
    """Wait for started nodes (generous: this shared 2-core machine starts them slowly)."""
    for node in nodes:
        node.wait_ready(timeout=90)


def queue_interleaved(
    node: NodeProcess, to: str, threads: int, per_thread: int, tag: str
) -> Ledger:
    """Queue threads x per_thread packets in one request (one commit), the threads'
    packets interleaved: t0#0, t1#0, ..., t0#1, t1#1, ... A Ledger of what was queued."""
    items: list[dict[str, Any]] = []
    for i in range(per_thread):
        for t in range(threads):
            marker = f"{tag}-t{t}-{i}"
            items.append(
                {"to": to, "kind": "result.lab", "thread": f"{tag}-t{t}", "bundle": _bundle(marker)}
            )
    res = node.api("POST", "/local/v1/packets", items, role="clinician")["results"]
    ledger = Ledger()
    for item, r in zip(items, res, strict=True):
        assert r.get("packet_id"), r
        note = item["bundle"]["entry"][1]["resource"]["note"][0]["text"]
        ledger.adopt(item["thread"], [r["packet_id"]], [note])
    return ledger


def _bundle(marker: str) -> dict[str, Any]:
    from tests.factory import bundle

    return bundle(1, marker=marker)


def arrival_order(receiver: NodeProcess) -> dict[str, list[str]]:
    """Per thread, the packet ids in the order the receiver committed them (inbox id)."""
    got: dict[str, list[str]] = defaultdict(list)
    for thread, pid in rows(receiver, "SELECT thread, packet_id FROM inbox ORDER BY id"):
        got[thread].append(pid)
    return got


def _ts(value: Any) -> datetime:
    return value if isinstance(value, datetime) else datetime.fromisoformat(str(value))


def intakes(receiver: NodeProcess) -> list[tuple[datetime, set[datetime]]]:
    """The receiver's intake transactions in commit order: (started at, the created-at
    stamps of its packets). One intake gives all its packets one received_at."""
    started: dict[datetime, int] = {}
    sealed: dict[datetime, set[datetime]] = defaultdict(set)
    for row_id, received_at, created_at in rows(
        receiver, "SELECT id, received_at, created_at FROM inbox ORDER BY id"
    ):
        at = _ts(received_at)
        started.setdefault(at, row_id)
        sealed[at].add(_ts(created_at))
    return [(at, sealed[at]) for at in sorted(started, key=started.__getitem__)]


def overlaps(receiver: NodeProcess) -> int:
    """Intakes that began while the one committed before them had not answered yet."""
    seq = intakes(receiver)
    slow = timedelta(seconds=SLOW_S)
    return sum(1 for (a, _), (b, _) in pairwise(seq) if b - a < slow)


def split_rounds(receiver: NodeProcess) -> int:
    """Seal instants (one per sender round) whose packets came in more than one intake."""
    per_stamp: Counter[datetime] = Counter()
    for _, stamps in intakes(receiver):
        per_stamp.update(stamps)
    return sum(1 for n in per_stamp.values() if n > 1)


def check_arrived_in_order(receiver: NodeProcess, ledger: Ledger) -> None:
    got = arrival_order(receiver)
    assert set(got) == ledger.threads
    for thread, ids in ledger.ids.items():
        assert got[thread] == ids, thread  # nothing of a thread overtook an older packet
        seqs = [
            int(s)
            for (s,) in rows(
                receiver, "SELECT seq FROM inbox WHERE thread = :t ORDER BY id", t=thread
            )
        ]
        assert seqs == list(range(1, len(ids) + 1)), thread


def all_answered(sender: NodeProcess) -> bool:
    """The sender has recorded an answer for every row (it records a round's answers once
    every partition has answered, after the receiver may already have delivered them)."""
    return not rows(sender, "SELECT id FROM outbox WHERE state = 'queued'")


def check_sent_once(sender: NodeProcess, to: str, ledger: Ledger) -> None:
    """Never in flight twice: one attempt and one 'sent' audit entry per packet."""
    wait_for(lambda: all_answered(sender), timeout=60, what="the sender to record every answer")
    out = rows(sender, "SELECT packet_id, state, attempts FROM outbox WHERE recipient = :r", r=to)
    assert {(pid, state, attempts) for pid, state, attempts in out} == {
        (pid, "acknowledged", 1) for pid in ledger.marker
    }
    sent = Counter(
        pid
        for pid, peer in rows(sender, "SELECT packet_id, peer FROM audit WHERE action = 'sent'")
        if peer == to
    )
    assert sent == Counter(set(ledger.marker))


def test_partition_of_is_stable_and_spreads_threads() -> None:
    threads = [f"thread-{i}" for i in range(64)]
    first = [partition_of(t, 4) for t in threads]
    assert first == [partition_of(t, 4) for t in threads]  # same in every call and process
    assert set(first) == {0, 1, 2, 3}
    assert all(partition_of(t, 1) == 0 for t in threads)
    assert partition_of(None, 4) == partition_of("", 4)


class _ClosingPeer(http.server.BaseHTTPRequestHandler):
    """Answers one POST per connection, then closes it without saying so (as a peer's
    keep-alive timeout does); with ``answer`` False it closes without answering at all."""

    protocol_version = "HTTP/1.1"
    answer = True
    seen: list[tuple[str, int]]

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.seen.append(("request", self.client_address[1]))
        if self.answer:
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")
        self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def closing_peer(answer: bool) -> Iterator[tuple[str, list[tuple[str, int]]]]:
    seen: list[tuple[str, int]] = []
    handler = type("Peer", (_ClosingPeer,), {"answer": answer, "seen": seen})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_a_connection_the_peer_closed_while_idle_is_reopened_once() -> None:
    """A partition's kept-alive connection may sit idle past the peer's keep-alive timeout:
    the next batch goes again on a fresh connection instead of failing an attempt."""
    with closing_peer(answer=True) as (url, seen):
        peer = PeerConnection(url)
        try:
            assert peer.post_batch(b"first") == b"ok"
            assert peer.post_batch(b"second") == b"ok"  # its connection was closed meanwhile
        finally:
            peer.close()
    assert [what for what, _ in seen] == ["request", "request"]
    assert seen[0][1] != seen[1][1]  # the second went on a new connection


def test_a_fresh_connection_closed_without_an_answer_is_not_retried() -> None:
    with closing_peer(answer=False) as (url, seen):
        peer = PeerConnection(url)
        try:
            with pytest.raises(AmbiguousDelivery, match="no answer"):
                peer.post_batch(b"lost")
        finally:
            peer.close()
    assert len(seen) == 1  # one try: a fresh connection that fails is a real failure


def test_four_batches_in_flight_each_thread_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """k = 4 to two peers at once. core is slow (HUTONG_FAULT_DELAY): it sees overlapping
    batches, and gets every packet once, in order within its thread, each sent once. gw
    refuses batches over its rate (HTTP 429, nothing of the batch taken): its refused
    partitions wait while the others go on, and no later packet of a waiting thread overtakes
    its older ones (each partition holds more than one batch of its threads)."""
    a = alliance(tmp_path, 4, members=3)
    configure(a, "gw", "limits", peer_rate_per_s=12, peer_burst=12)
    chc, core, gw = a.node("chc"), a.node("core"), a.node("gw")
    try:
        start_with(core, monkeypatch, HUTONG_FAULT_DELAY=f"intake.after_commit:{SLOW_S}")
        chc.start()
        gw.start()
        up(core, chc, gw)
        slow = queue_interleaved(chc, "core", threads=16, per_thread=5, tag="slow")
        rated = queue_interleaved(chc, "gw", threads=12, per_thread=5, tag="rate")
        wait_for(
            lambda: len(spooled(core)) >= slow.total,
            timeout=120,
            what="every packet at the slow peer's HIS",
        )
        wait_for(
            lambda: len(spooled(gw)) >= rated.total,
            timeout=120,
            what="every packet at the rate-limited peer's HIS",
        )

        check_arrived_in_order(core, slow)
        check_sent_once(chc, "core", slow)
        check_delivered_once(core, slow, chc, core)
        assert overlaps(core) >= 1
        assert split_rounds(core) >= 1
        per_stamp: Counter[datetime] = Counter()  # never more than k batches a round
        for _, stamps in intakes(core):
            per_stamp.update(stamps)
        assert max(per_stamp.values()) <= 4

        refused = [
            peer
            for peer, resource in rows(
                gw, "SELECT peer, resource FROM audit WHERE action = 'refused'"
            )
            if RateLimited.code in resource
        ]
        assert refused and set(refused) == {"chc"}  # some batches were refused, then taken
        check_arrived_in_order(gw, rated)
        check_sent_once(chc, "gw", rated)  # a 429 is not a failed attempt
        check_delivered_once(gw, rated, gw)
    finally:
        stop_together(a)


def test_one_batch_in_flight_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The control, k = 1 (the default): the same slow receiver never sees two batches at
    once, and never two batches of one sender round."""
    a = alliance(tmp_path, 1)
    chc, core = a.node("chc"), a.node("core")
    try:
        start_with(core, monkeypatch, HUTONG_FAULT_DELAY=f"intake.after_commit:{SLOW_S}")
        chc.start()
        up(core, chc)
        ledger = queue_interleaved(chc, "core", threads=8, per_thread=3, tag="one")
        wait_for(
            lambda: len(spooled(core)) >= ledger.total,
            timeout=120,
            what="every packet at the receiving HIS",
        )
        assert len(intakes(core)) >= ledger.total // BATCH  # several batches
        assert overlaps(core) == 0
        assert split_rounds(core) == 0
        check_arrived_in_order(core, ledger)
        check_sent_once(chc, "core", ledger)
        check_delivered_once(core, ledger, chc, core)
    finally:
        stop_together(a)


def test_receiver_killed_with_batches_in_flight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The receiver dies after committing one batch, before answering it, while other
    partitions' batches are in flight: those fail, back off per partition and go again; the
    receiver takes nothing twice and every thread stays in order."""
    a = alliance(tmp_path, 4)
    chc, core = a.node("chc"), a.node("core")
    try:
        start_with(
            core,
            monkeypatch,
            HUTONG_FAULT="intake.after_commit:2",
            HUTONG_FAULT_DELAY=f"intake.after_commit:{SLOW_S}",
        )
        chc.start()
        up(core, chc)
        ledger = queue_interleaved(chc, "core", threads=12, per_thread=4, tag="kill")
        wait_for(lambda: dead(core), timeout=60, what="the receiver to die at its fault point")
        taken = len(rows(core, "SELECT id FROM inbox"))
        assert 0 < taken < ledger.total
        core.start()  # without the fault
        up(core)
        wait_for(
            lambda: len(spooled(core)) >= ledger.total,
            timeout=120,
            what="every packet at the receiving HIS",
        )
        check_arrived_in_order(core, ledger)
        check_delivered_once(core, ledger, chc, core)
        wait_for(lambda: all_answered(chc), timeout=60, what="the sender to record every answer")
        assert {s for (s,) in rows(chc, "SELECT state FROM outbox")} == {"acknowledged"}
        retried = rows(chc, "SELECT packet_id FROM outbox WHERE attempts > 1")
        assert retried  # some batches failed with the receiver and went again
    finally:
        stop_together(a)
