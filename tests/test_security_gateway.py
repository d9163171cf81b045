"""Issue 13: every request at a node's two ports is untrusted, and refusing it must cost the
attacker more than the node.

Real node processes on loopback (a platform ``hub`` and members ``chc`` and ``core`` behind
it). An attacker is any socket from 127.0.0.2 (another loopback address: another host, as far
as the node can tell); members talk from 127.0.0.1. Each test fails on the code before the
gateway hardening: whole frames kept in quarantine, signed receipts for frames nobody could
authenticate, bodies read before the token, connections never closed.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bridge.crypto import envelope as env
from bridge.crypto.keys import load_signing_key
from tests.factory import bundle_bytes
from tests.harness import Alliance, NodeProcess, db_rows, spooled, wait_for

pytestmark = pytest.mark.slow

MEMBERS = [
    {"id": "core", "zh": "复兴医院", "en": "Fuxing Hospital", "role": "core", "via": "hub"},
    {
        "id": "chc",
        "zh": "月坛社区卫生服务中心",
        "en": "Yuetan CHC",
        "role": "community",
        "via": "hub",
    },
    {"id": "hub", "zh": "医联体信息平台", "en": "Alliance platform", "role": "platform"},
]
RULES = [{"from": "chc", "to": "core", "kinds": ["result.lab"]}]
ATTACKER = "127.0.0.2"
MIB = 1 << 20
U32 = struct.Struct(">I").pack


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Alliance]:
    """Default settings everywhere: the defaults themselves must be safe."""
    a = Alliance(tmp_path_factory.mktemp("gw") / "alliance", MEMBERS, RULES)
    a.start("hub", "chc", "core")
    yield a
    a.stop_all()


# -- helpers ------------------------------------------------------------------------------------


def key_of(a: Alliance, node: str) -> Ed25519PrivateKey:
    plan = a.node(node).plan
    return load_signing_key(plan.keys.signing, plan.keys.passphrase)


def seal(
    a: Alliance, *, key: Ed25519PrivateKey | None = None, body: bytes | None = None, **kw: Any
) -> bytes:
    args: dict[str, Any] = dict(
        sender="chc",
        recipient="core",
        kind="result.lab",
        thread="gw-t",
        seq=1,
        signing_key=key or key_of(a, "chc"),
        recipient_key=a.node("hub").plan.directory["core"].encryption_keys[0],
    )
    args.update(kw)
    return env.seal(body if body is not None else bundle_bytes(n_obs=1), **args)


def vm_hwm_kib(node: NodeProcess) -> int:
    """Peak resident set of the node process (kB), from /proc/<pid>/status."""
    assert node.proc is not None
    for line in Path(f"/proc/{node.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def db_bytes(node: NodeProcess) -> int:
    return sum(p.stat().st_size for p in node.plan.data_dir.glob("*.db*") if p.is_file())


def post_raw(
    host: str,
    port: int,
    body: bytes | None,
    *,
    headers: dict[str, str] | None = None,
    path: str = "/exchange/v1/packets",
    source: str = ATTACKER,
    declared: int | None = None,
    timeout: float = 60.0,
) -> tuple[int | None, bytes]:
    """POST from ``source``, streaming the body; read whatever the node answers, even if it
    answers (and closes) before the body is all sent. (status, body); status None: closed
    without an answer."""
    s = socket.create_connection((host, port), timeout=timeout, source_address=(source, 0))
    try:
        length = declared if declared is not None else len(body or b"")
        head = [
            f"POST {path} HTTP/1.1",
            f"Host: {host}",
            f"Content-Length: {length}",
            "Content-Type: application/x-hutong-batch",
        ]
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        s.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        view = memoryview(body or b"")
        try:
            for i in range(0, len(view), 256 * 1024):
                if select.select([s], [], [], 0)[0]:
                    break  # the node answered before the end of the body: read its answer
                s.sendall(view[i : i + 256 * 1024])
        except OSError:  # the node answered and closed before the end: read its answer
            pass
        return read_response(s)
    finally:
        s.close()


def read_response(s: socket.socket) -> tuple[int | None, bytes]:
    data = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
            head, sep, rest = data.partition(b"\r\n\r\n")
            if sep:
                length = [
                    int(x.split(b":")[1])
                    for x in head.split(b"\r\n")
                    if x.lower().startswith(b"content-length:")
                ]
                if length and len(rest) >= length[0]:
                    break
    except OSError:
        pass
    if not data.startswith(b"HTTP/1.1 "):
        return None, data
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(head[9:12]), rest


def post_frames(
    node: NodeProcess, frames: list[bytes], source: str = ATTACKER
) -> tuple[int | None, bytes]:
    """As a sender that asks for batch-signed receipts (HTR2): what they cover is judged on
    the v2 path (an unauthenticated frame still gets no receipt of either kind)."""
    return post_raw(
        node.plan.peer_host,
        node.plan.peer_port,
        env.encode_batch(frames),
        source=source,
        headers={"Hutong-Receipts": "v2"},
    )


def forged_big(a: Alliance, size: int) -> bytes:
    """A batch of one packet frame with a real header of chc's, ``size`` bytes of garbage as
    its ciphertext and a garbage signature: the node must read it whole to find the signature
    false."""
    real = env.decode(seal(a), max_body=1 << 20)
    hb = real.header_bytes
    frame = b"".join(
        (b"HTP1", U32(len(hb)), hb, U32(size), os.urandom(1024) * (size // 1024), os.urandom(64))
    )
    return env.encode_batch([frame])


def quarantine(node: NodeProcess) -> list[dict[str, Any]]:
    cols = (
        "id",
        "code",
        "sender",
        "packet_id",
        "raw",
        "raw_digest",
        "raw_size",
        "remote",
        "trusted",
        "state",
    )
    rows = db_rows(node, f"SELECT {', '.join(cols)} FROM quarantine ORDER BY id")
    return [dict(zip(cols, r, strict=True)) for r in rows]


# -- 1. a flood of garbage at the platform ---------------------------------------------------


def test_flood_of_40_mib_garbage_costs_the_platform_little_and_it_keeps_relaying(net) -> None:
    hub, chc, core = net.node("hub"), net.node("chc"), net.node("core")
    before = db_bytes(hub)
    big = forged_big(net, 40 * MIB - 200)
    junk = os.urandom(MIB) * 40
    sent = {"n": 0, "answered": 0}
    lock = threading.Lock()
    delivered = threading.Event()
    deadline = time.monotonic() + 300

    def one() -> None:
        while time.monotonic() < deadline:
            with lock:
                if (sent["n"] >= 50 and delivered.is_set()) or sent["n"] >= 400:
                    return
                sent["n"] += 1
                i = sent["n"]
            status, _ = post_raw(
                hub.plan.peer_host, hub.plan.peer_port, big if i % 2 else junk, timeout=60
            )
            with lock:
                sent["answered"] += status is not None and status >= 400

    with ThreadPoolExecutor(5) as pool:
        flood = [pool.submit(one) for _ in range(5)]
        wait_for(lambda: sent["n"] >= 10, 120, what="the flood to be under way")
        [pid] = chc.send(
            "core", "result.lab", [orjson.loads(bundle_bytes(marker="in-flood"))], thread="flood-t"
        )
        wait_for(
            lambda: any(pid in p.name for p in spooled(core)),
            240,
            what="a real packet relayed during the flood",
        )
        during = not all(f.done() for f in flood)
        delivered.set()
        for f in flood:
            f.result(timeout=300)
    assert during, "the packet went through only after the flood"
    assert sent["n"] >= 50
    grown = db_bytes(hub) - before
    assert grown < 4 * MIB, f"hub database grew by {grown / MIB:.1f} MiB"
    peak = vm_hwm_kib(hub)
    assert peak < 250 * 1024, f"hub peak RSS {peak / 1024:.0f} MiB"
    kept = [q for q in quarantine(hub) if q["remote"] == ATTACKER]
    assert kept and all(len(q["raw"]) <= 4096 and not q["trusted"] for q in kept)


# -- 2. unauthenticated frames get unsigned errors; signed receipts only for the verified ---------


def test_unauthenticated_frame_gets_an_unsigned_error_never_a_signed_receipt(net) -> None:
    hub = net.node("hub")
    other = "127.0.0.3"  # an attacker of its own (the flood's address may be over its rate)
    stranger = Ed25519PrivateKey.generate()
    forged = seal(net, key=stranger, thread="gw-unauth")
    status, body = post_frames(hub, [forged], source=other)
    assert status == 403
    assert b"HTR" not in body  # no receipt, v1 or v2
    answer = json.loads(body)
    assert answer["code"] == "HT-PKT-BAD-SIGNATURE"
    assert answer["retry"] == "transient"
    # unknown sender and garbage that is not a frame: unsigned as well
    status, body = post_frames(hub, [seal(net, key=stranger, sender="nobody")], source=other)
    assert (status, json.loads(body)["code"]) == (403, "HT-PKT-UNKNOWN-SENDER")
    status, body = post_raw(
        hub.plan.peer_host,
        hub.plan.peer_port,
        b"HTB1" + U32(1) + U32(60) + b"XXXX" + os.urandom(56),
        source=other,
    )
    assert status == 400 and b"HTR" not in body
    assert json.loads(body)["code"] == "HT-PKT-MALFORMED"
    # in a batch with a real packet: the real one gets its signed receipt, the forged one an
    # unsigned error item in its place
    real = seal(net, thread="gw-mixed")
    status, body = post_frames(hub, [real, forged], source="127.0.0.1")
    assert status == 200
    first, second = env.decode_batch(body, max_total=1 << 20)
    keys = hub.plan.directory
    fields = env.verify_receipt(first, lambda n: keys[n].signing_keys)
    assert (fields["status"], fields["packet"]) == (
        "relayed",
        env.decode(real, max_body=1 << 20).header.id,
    )
    assert first[:4] == b"HTR2"  # the sender asked; a one-receipt batch
    assert not second.startswith(b"HTR")
    assert json.loads(second)["code"] == "HT-PKT-BAD-SIGNATURE"


def test_a_forged_refusal_cannot_change_a_senders_packet(tmp_path: Path) -> None:
    """A stranger who knows an in-flight packet's id asks its recipient to sign a refusal
    (old code: it did, for a frame signed with any key) and hands that to the sender."""
    a = Alliance(tmp_path / "alliance", MEMBERS, RULES)
    a.start("chc", "core")  # the platform is down: chc's packet stays queued
    try:
        chc, core = a.node("chc"), a.node("core")
        [pid] = chc.send(
            "core", "result.lab", [orjson.loads(bundle_bytes(marker="real"))], thread="forge-t"
        )
        stranger = Ed25519PrivateKey.generate()
        forged = seal(a, key=stranger, packet_id=pid, thread="forge-t")
        status, body = post_frames(core, [forged])
        assert status == 403 and b"HTR" not in body
        assert json.loads(body)["code"] == "HT-PKT-BAD-SIGNATURE"
        # a receipt the stranger signs itself, claiming to be core: not taken either (alone,
        # and as a batch-signed one)
        fake_fields = {
            "packet": pid,
            "sender": "chc",
            "recipient": "core",
            "receiver": "core",
            "status": "refused",
            "code": "HT-PKT-INVALID-FHIR",
            "message": "forged",
            "at": "2026-01-01T00:00:00.000Z",
            "digest": None,
        }
        for fake in (
            env.sign_receipt(fake_fields, stranger),
            env.sign_receipts([fake_fields], stranger)[0],
        ):
            status, body = post_frames(chc, [fake])
            assert status == 403 and json.loads(body)["code"] == "HT-PKT-BAD-SIGNATURE"
        [(state, receipt)] = db_rows(
            chc, "SELECT state, receipt FROM outbox WHERE packet_id = :p", p=pid
        )
        assert (state, receipt) == ("queued", None)
        a.start("hub")
        wait_for(
            lambda: (
                db_rows(chc, "SELECT state FROM outbox WHERE packet_id = :p", p=pid)
                == [("acknowledged",)]
            ),
            60,
            what="real delivery",
        )
        # a receipt says "stored"; the hand-over to core's local side follows on its own round
        wait_for(lambda: any(pid in p.name for p in spooled(core)), what="handed over at core")
    finally:
        a.stop_all()


class _Peer(threading.Thread):
    """A real HTTP peer that answers every batch with one fixed answer."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(daemon=True)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.port = self.sock.getsockname()[1]
        self.answer = (
            f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode() + body
        self.hits = 0

    def run(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            with c:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += c.recv(65536)
                head, _, rest = data.partition(b"\r\n\r\n")
                n = [
                    int(x.split(b":")[1])
                    for x in head.split(b"\r\n")
                    if x.lower().startswith(b"content-length:")
                ][0]
                while len(rest) < n:
                    rest += c.recv(65536)
                self.hits += 1
                c.sendall(self.answer)


def test_sender_takes_an_unsigned_or_false_answer_as_not_delivered_and_retries(
    tmp_path: Path,
) -> None:
    """Whoever answers a sender's batch (the peer, or anyone in between) with an unsigned
    error or a receipt no member signed cannot make the packet refused or dead: it stays
    queued and is tried again after a backoff."""
    from sqlalchemy import update

    from bridge.config.loader import load_node
    from bridge.context import NodeContext
    from bridge.delivery.queue import Outgoing, queue_packets
    from bridge.delivery.sender import PeerSender
    from bridge.store.tables import OUTBOX

    error = orjson.dumps(
        {"code": "HT-PKT-BAD-SIGNATURE", "message": "no key verifies", "retry": "transient"}
    )
    a = Alliance(tmp_path / "alliance", MEMBERS, RULES)
    ctx = NodeContext.open(load_node(a.files["chc"]))
    with ctx.store.write() as conn:
        [res] = queue_packets(
            ctx, conn, [Outgoing("core", "result.lab", bundle_bytes(), "retry-t")]
        )
    stranger = Ed25519PrivateKey.generate()
    false_receipt = env.sign_receipt(
        {
            "packet": res.packet_id,
            "sender": "chc",
            "recipient": "core",
            "receiver": "core",
            "status": "refused",
            "code": "HT-PKT-INVALID-FHIR",
            "message": "forged",
            "at": "2026-01-01T00:00:00.000Z",
            "digest": None,
        },
        stranger,
    )
    # batch-signed: one the stranger signed; one the platform really signed but for another
    # packet; and that one with its JSON edited to name this packet (its path and root stay)
    hub_key = load_signing_key(load_node(a.files["hub"]).keys.signing)
    other = "00000000-0000-4000-8000-0000000000ff"
    hub_fields = {
        "packet": other,
        "sender": "chc",
        "recipient": "core",
        "receiver": "hub",
        "status": "refused",
        "code": "HT-PKT-INVALID-FHIR",
        "message": "not this one",
        "at": "2026-01-01T00:00:00.000Z",
        "digest": None,
    }
    real_other = env.sign_receipts([hub_fields, {**hub_fields, "status": "relayed"}], hub_key)[0]
    assert res.packet_id is not None and len(res.packet_id) == len(other)
    bent = real_other.replace(other.encode(), res.packet_id.encode())
    answers = [
        (200, env.encode_batch([error])),
        (403, error),
        (200, env.encode_batch([false_receipt])),
        (
            200,
            env.encode_batch(
                env.sign_receipts([{**hub_fields, "packet": res.packet_id}], stranger)
            ),
        ),
        (200, env.encode_batch([real_other])),
        (200, env.encode_batch([bent])),
    ]
    try:
        for attempt, (status, body) in enumerate(answers, start=1):
            peer = _Peer(status, body)
            peer.start()
            try:
                sender = PeerSender(ctx, "hub")
                sender.conn.port = sender.conns[0].port = peer.port
                report = sender.send_batch()
                sender.close()
            finally:
                peer.sock.close()
            assert peer.hits == 1, (attempt, report)
            with ctx.store.read() as conn:
                row = conn.execute(OUTBOX.select().where(OUTBOX.c.packet_id == res.packet_id)).one()
            assert row.state == "queued", attempt
            assert row.receipt is None and row.acked_at is None
            assert row.attempts == attempt
            assert row.next_try_at > ctx.now()
            assert (
                "HT-PKT-BAD-SIGNATURE" if attempt < 3 else "no valid receipt"
            ) in row.last_error, row.last_error
            with ctx.store.write() as conn:  # due again now, for the next answer
                conn.execute(
                    update(OUTBOX)
                    .where(OUTBOX.c.id == row.id)
                    .values(next_try_at=ctx.now() - timedelta(seconds=1))
                )
    finally:
        ctx.store.dispose()


# -- 3. the local port reads no body before the token, and none over the limit -------------------


def test_local_port_refuses_100_mb_without_a_token_before_reading_it(net) -> None:
    core = net.node("core")
    before = vm_hwm_kib(core)
    body = b"[" + b" " * (100_000_000 - 2) + b"]"
    for path in ("/local/v1/packets", "/fhir"):
        status, answer = post_raw(
            core.plan.local_host,
            core.plan.local_port,
            body,
            path=path,
            source="127.0.0.1",
            headers={"Content-Type": "application/json"},
        )
        assert status == 401, (path, status, answer[:200])
        assert b"HT-AUTH" in answer
    # with a token, over the local body limit: refused from the declared length
    status, answer = post_raw(
        core.plan.local_host,
        core.plan.local_port,
        body,
        path="/local/v1/packets",
        source="127.0.0.1",
        headers={"Authorization": f"Bearer {core.token('it')}"},
    )
    assert status == 413 and b"HT-PKT-TOO-LARGE" in answer
    grown = vm_hwm_kib(core) - before
    assert grown < 30 * 1024, f"core peak RSS grew by {grown / 1024:.0f} MiB"
    # the port still serves a real request
    assert core.api("GET", "/local/v1/queues") is not None


# -- 4. idle and slow connections are closed ------------------------------------------------


@pytest.mark.parametrize("port", ["peer", "local"])
def test_slowloris_and_idle_connections_are_closed(net, port: str) -> None:
    hub = net.node("hub")
    host, p = (
        (hub.plan.peer_host, hub.plan.peer_port)
        if port == "peer"
        else (hub.plan.local_host, hub.plan.local_port)
    )
    idle = socket.create_connection((host, p), timeout=1, source_address=(ATTACKER, 0))
    slow = socket.create_connection((host, p), timeout=1, source_address=(ATTACKER, 0))
    slow.sendall(b"POST /exchange/v1/packets HTTP/1.1\r\nHost: x\r\n")
    drip = iter(b"X-Slow: " + b"a" * 1000)
    closed = {"idle": False, "slow": False}

    def gone(s: socket.socket) -> bool:
        try:
            return s.recv(4096) == b""
        except TimeoutError:
            return False
        except OSError:
            return True

    def both_closed() -> bool:
        if not closed["slow"]:
            try:
                slow.send(bytes([next(drip)]))
            except OSError:
                closed["slow"] = True
        closed["slow"] = closed["slow"] or gone(slow)
        closed["idle"] = closed["idle"] or gone(idle)
        return closed["slow"] and closed["idle"]

    try:
        wait_for(both_closed, 60, every=0.5, what="idle and slow connections closed")
    finally:
        idle.close()
        slow.close()
    # a normal request on the same port still works
    url = hub.peer_url + "/exchange/v1/health" if port == "peer" else hub.local_url + "/health"
    conn = http.client.HTTPConnection(host, p, timeout=10)
    conn.request("GET", url.split(str(p), 1)[1])
    assert conn.getresponse().status == 200
    conn.close()


def test_a_body_dripped_slower_than_its_deadline_is_cut_off(tmp_path: Path) -> None:
    """Complete headers, then a body of 1000 bytes at one byte per 0.3 s (5 minutes): the
    connection is closed once ``body_timeout_s`` has passed, on both ports."""
    a = Alliance(tmp_path / "alliance", MEMBERS, RULES)
    hub_file = a.files["hub"]
    hub_file.write_text(hub_file.read_text() + "\n[limits]\nbody_timeout_s = 2.0\n")
    a.start("hub")
    hub = a.node("hub")
    try:
        for host, port, path in (
            (hub.plan.peer_host, hub.plan.peer_port, "/exchange/v1/packets"),
            (hub.plan.local_host, hub.plan.local_port, "/ui/login"),
        ):
            s = socket.create_connection((host, port), timeout=1, source_address=(ATTACKER, 0))
            s.sendall(
                f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n"
                "Content-Type: application/x-www-form-urlencoded\r\n\r\n".encode()
            )
            # a body that stays plausible as far as it gets (a batch, a packet, its header)
            body = b"HTB1" + U32(1) + U32(988) + b"HTP1" + U32(900) + b"a" * 976
            sent = {"n": 0}

            def cut_off(
                s: socket.socket = s, body: bytes = body, sent: dict[str, int] = sent
            ) -> bool:
                try:
                    s.send(body[sent["n"] : sent["n"] + 1])
                    sent["n"] += 1
                    return s.recv(4096) == b""
                except TimeoutError:
                    return False
                except OSError:
                    return True

            try:
                wait_for(cut_off, 60, every=0.3, what=f"slow body cut off on {path}")
            finally:
                s.close()
            assert sent["n"] < 1000, "the whole body arrived: nothing was cut off"
    finally:
        a.stop_all()


def test_refusals_are_rate_limited_per_address_and_for_all_addresses() -> None:
    """Per address: ``burst`` refusals kept, then the address is turned away (the wait it is
    told matches the refill), its episode counted once; all addresses together: past the
    total rate refusals are still charged to their address but not kept."""
    from bridge.gateway.ratelimit import SourceRefusals

    now = [100.0]
    lim = SourceRefusals(1.0, 3, clock=lambda: now[0], total_per_s=2.0)
    assert [lim.charge("10.0.0.1") for _ in range(4)] == [True, True, True, False]
    away = lim.turned_away("10.0.0.1")
    assert away is not None and away.first and away.retry_after == pytest.approx(1.0)
    again = lim.turned_away("10.0.0.1")
    assert again is not None and not again.first  # one audit per episode
    assert lim.turned_away("10.0.0.2") is None  # another address is heard
    now[0] += 1.0
    back = lim.turned_away("10.0.0.1")
    assert back is not None and back.retry_after is None and back.episode == {"10.0.0.1": 2}
    # all addresses: a burst of 5 x 2/s = 10, 3 taken above, 2 refilled in the second
    kept = [lim.charge(f"10.0.1.{i}") for i in range(10)]
    assert kept == [True] * 9 + [False] and lim.unkept == 1


# -- 5. quarantine keeps a prefix, a digest, a length and the source; quota and retention -------


def test_quarantine_keeps_prefix_digest_length_source_within_quota_and_retention(
    tmp_path: Path,
) -> None:
    from sqlalchemy import update

    from bridge.config.loader import load_node
    from bridge.context import NodeContext
    from bridge.delivery.retention import purge_bodies
    from bridge.store.tables import QUARANTINE

    a = Alliance(tmp_path / "alliance", MEMBERS, RULES)
    hub_file = a.files["hub"]
    hub_file.write_text(
        hub_file.read_text()
        + (
            "\n[retention]\nquarantine_prefix_bytes = 1024\nquarantine_max_bytes = 32768\n"
            "quarantine_days = 10.0\n\n[limits]\nrefusal_burst = 1000\n"
        )
    )
    a.start("hub")
    hub = a.node("hub")
    stranger = Ed25519PrivateKey.generate()
    try:
        frames = [
            seal(a, key=stranger, thread=f"q-{i}", body=bundle_bytes(marker="x" * 20000))
            for i in range(40)
        ]
        for f in frames:
            status, _ = post_frames(hub, [f])
            assert status == 403
        rows = quarantine(hub)
        # field by field: what is kept of a frame refused before its signature verified
        last = rows[-1]
        frame = frames[-1]
        header = env.decode(frame, max_body=1 << 20).header
        assert last["raw"] == frame[:1024]
        assert last["raw_digest"] == hashlib.sha256(frame).hexdigest()
        assert last["raw_size"] == len(frame)
        assert last["remote"] == ATTACKER
        assert not last["trusted"]
        assert (last["code"], last["sender"], last["packet_id"]) == (
            "HT-PKT-BAD-SIGNATURE",
            "chc",
            header.id,
        )
        # quota: 32 KiB for 40 refusals of 1 KiB + row overhead; the oldest went first
        assert 10 < len(rows) < 40
        assert [r["packet_id"] for r in rows] == [
            env.decode(f, max_body=1 << 20).header.id for f in frames[-len(rows) :]
        ]
        dropped = db_rows(hub, "SELECT resource FROM audit WHERE action = 'quarantine-dropped'")
        counts = [json.loads(r)["outcomeDesc"] for (r,) in dropped]
        assert counts and sum(int(c.split()[0]) for c in counts) == 40 - len(rows)
    finally:
        hub.stop()
    # retention: items older than quarantine_days go (unauthenticated rows entirely)
    ctx = NodeContext.open(load_node(hub_file))
    try:
        with ctx.store.write() as conn:
            oldest = conn.execute(QUARANTINE.select().order_by(QUARANTINE.c.id)).first()
            conn.execute(
                update(QUARANTINE)
                .where(QUARANTINE.c.id == oldest.id)
                .values(at=ctx.now() - timedelta(days=11))
            )
        purged = purge_bodies(ctx)
        assert purged["quarantine"] == 1
        with ctx.store.read() as conn:
            ids = [r.id for r in conn.execute(QUARANTINE.select())]
        assert oldest.id not in ids and len(ids) == len(rows) - 1
    finally:
        ctx.store.dispose()
