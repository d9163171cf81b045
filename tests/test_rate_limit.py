"""Per-peer rate limit at the peer port: an over-rate peer is answered 429 with ``HT-PKT-RATE``
and Retry-After, nothing of the refused batch is stored, the refusal is audited once per episode
(not per batch, not per packet), and a real sender backs off and delivers everything exactly
once, in thread order, without counting the refusals as failed attempts."""

from __future__ import annotations

import http.client
import json
from collections import Counter, defaultdict

import pytest

from bridge.audit.events import CODE_EXTENSION
from bridge.crypto import envelope as env
from bridge.crypto.keys import load_signing_key
from bridge.delivery.transport import PeerConnection
from bridge.errors import RateLimited
from bridge.gateway.ratelimit import PeerRateLimit
from tests.factory import bundle, bundle_bytes
from tests.harness import Alliance, NodeProcess, spooled, wait_for
from tests.harness import db_rows as rows

MEMBERS = [
    {"id": "core", "zh": "复兴医院", "en": "Fuxing Hospital", "role": "core"},
    {"id": "chc", "zh": "月坛社区卫生服务中心", "en": "Yuetan CHC", "role": "community"},
    {"id": "sec", "zh": "广外医院", "en": "Guangwai Hospital", "role": "secondary"},
]
RULES = [
    {"from": "chc", "to": "core", "kinds": ["result.lab"]},
    {"from": "sec", "to": "core", "kinds": ["result.lab"]},
]
RATE, BURST = 4, 10  # a batch of 10 empties the bucket; the next needs 2.5 s of refill


# -- the bucket alone (fake clock) ---------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_bucket_takes_up_to_burst_then_refuses_with_the_wait():
    clock = Clock()
    lim = PeerRateLimit(4, 10, clock=clock)
    assert lim.charge({"chc": 6}).retry_after is None
    v = lim.charge({"chc": 6})  # 4 left, 6 needed: 0.5 s at 4/s
    assert (v.retry_after, v.peer, v.packets, v.first) == (0.5, "chc", 6, True)
    assert lim.charge({"chc": 6}).first is False  # same episode
    clock.t += 0.5
    ok = lim.charge({"chc": 6})
    assert ok.retry_after is None and ok.episode == {"chc": 2}
    assert lim.charge({"chc": 1}).first is True  # a new episode starts


def test_bucket_batch_over_burst_waits_for_a_full_bucket_then_runs_in_debt():
    clock = Clock()
    lim = PeerRateLimit(5, 10, clock=clock)
    assert lim.charge({"p": 30}).retry_after is None  # full bucket: taken, 20 in debt
    assert lim.charge({"p": 30}).retry_after == pytest.approx(6.0)  # -20 -> 10 at 5/s
    clock.t += 6.0
    assert lim.charge({"p": 30}).retry_after is None


def test_bucket_is_per_peer_and_all_or_nothing():
    clock = Clock()
    lim = PeerRateLimit(1, 5, clock=clock)
    assert lim.charge({"a": 5}).retry_after is None
    v = lim.charge({"b": 3, "a": 1})
    assert v.peer == "a" and v.retry_after == pytest.approx(1.0)
    assert lim.charge({"b": 5}).retry_after is None  # b was not charged by the refused batch


# -- real nodes -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def alliance(tmp_path_factory: pytest.TempPathFactory):
    a = Alliance(tmp_path_factory.mktemp("ratelimit") / "alliance", MEMBERS, RULES)
    core, chc = a.files["core"], a.files["chc"]
    assert "[limits]" not in core.read_text() and "[delivery]" not in chc.read_text()
    core.write_text(
        core.read_text() + f"\n[limits]\npeer_rate_per_s = {RATE}\npeer_burst = {BURST}\n"
    )
    chc.write_text(chc.read_text() + "\n[delivery]\nbatch_size = 10\n")
    a.start("core")
    yield a
    a.stop_all()


def rate_audits(core: NodeProcess, peer: str) -> list[tuple[str, str, str | None, str]]:
    """(action, outcome, error code, outcomeDesc) of the rate refusals audited for a peer."""
    out = []
    for action, outcome, resource in rows(
        core, "SELECT action, outcome, resource FROM audit WHERE peer = :p ORDER BY seq", p=peer
    ):
        event = json.loads(resource)
        codes = [e["valueCode"] for e in event.get("extension", []) if e["url"] == CODE_EXTENSION]
        if codes == ["HT-PKT-RATE"]:
            out.append((action, outcome, codes[0], event.get("outcomeDesc", "")))
    return out


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


def raw_post(node: NodeProcess, frames: list[bytes]) -> tuple[int, str | None, bytes]:
    conn = http.client.HTTPConnection(node.plan.peer_host, node.plan.peer_port, timeout=30)
    try:
        conn.request(
            "POST",
            "/exchange/v1/packets",
            body=env.encode_batch(frames),
            headers={"Content-Type": "application/x-hutong-batch"},
        )
        resp = conn.getresponse()
        return resp.status, resp.getheader("Retry-After"), resp.read()
    finally:
        conn.close()


def inbox_ids(core: NodeProcess, sender: str) -> Counter[str]:
    return Counter(
        p for (p,) in rows(core, "SELECT packet_id FROM inbox WHERE sender = :s", s=sender)
    )


@pytest.mark.slow
def test_over_rate_peer_gets_429_with_code_and_one_audit_per_episode(alliance: Alliance):
    core = alliance.node("core")
    first, second, third = (sec_frames(alliance, 10, t) for t in ("s1", "s2", "s3"))
    status, _, _ = raw_post(core, first)
    assert status == 200
    assert inbox_ids(core, "sec") == Counter(
        env.decode(f, max_body=1 << 30).header.id for f in first
    )
    refused = [raw_post(core, second) for _ in range(3)]  # the bucket is empty: 2.5 s to refill
    for status, retry_after, body in refused:
        assert status == 429
        answer = json.loads(body)
        assert answer["code"] == "HT-PKT-RATE" and answer["retry"] == "transient"
        assert "'sec'" in answer["message"] and f"{RATE:g} packets/s" in answer["message"]
        assert 0 < answer["retry_after_s"] <= BURST / RATE
        assert retry_after is not None and int(retry_after) >= 1
    # nothing of a refused batch was stored or quarantined; one audit entry for the episode
    assert sum(inbox_ids(core, "sec").values()) == 10
    assert rows(core, "SELECT COUNT(*) FROM quarantine")[0][0] == 0
    audits = rate_audits(core, "sec")
    assert len(audits) == 1
    action, outcome, code, message = audits[0]
    assert (action, outcome, code) == ("refused", "4", "HT-PKT-RATE") and "'sec'" in message

    # the same batch sent again once the bucket has refilled is taken, each packet once
    conn = PeerConnection(core.peer_url)
    try:

        def resend() -> bool:
            try:
                conn.post_batch(env.encode_batch(second))
            except RateLimited as exc:
                assert exc.retry_after > 0
                return False
            return True

        wait_for(resend, timeout=30, every=0.5, what="second batch taken")
    finally:
        conn.close()
    want = Counter(env.decode(f, max_body=1 << 30).header.id for f in first + second)
    assert inbox_ids(core, "sec") == want
    # a new episode is audited again, once
    assert raw_post(core, third)[0] == 429
    assert raw_post(core, third)[0] == 429
    assert len(rate_audits(core, "sec")) == 2


@pytest.mark.slow
def test_real_sender_backs_off_and_delivers_everything_once_in_order(alliance: Alliance):
    core, chc = alliance.node("core"), alliance.node("chc")
    chc.start()
    chc.wait_ready()
    try:
        sent: dict[str, list[str]] = {}
        for thread in ("rl-a", "rl-b"):
            sent[thread] = chc.send(
                "core",
                "result.lab",
                [bundle(marker=f"{thread}-{i}") for i in range(20)],
                thread=thread,
            )
        total = sum(len(v) for v in sent.values())
        wait_for(
            lambda: len([f for f in spooled(core) if f.parent.name.startswith("rl-")]) >= total,
            timeout=120,
            what="all 40 packets at core's HIS",
        )
        got: dict[str, list[tuple[int, str]]] = defaultdict(list)
        for f in spooled(core):
            if f.parent.name.startswith("rl-"):
                seq, pid = f.stem.split("-", 1)
                got[f.parent.name].append((int(seq), pid))
        for thread, ids in sent.items():
            assert [pid for _, pid in sorted(got[thread])] == ids  # each once, in order
        assert inbox_ids(core, "chc") == Counter(p for v in sent.values() for p in v)
        # the refusals were not failed attempts: every packet went through on its first count
        states = rows(chc, "SELECT state, attempts FROM outbox WHERE origin = 'local'")
        assert Counter(states) == Counter({("acknowledged", 1): total})
        # 4 batches of 10 against a bucket of 10: refused at least once, audited per episode
        audits = rate_audits(core, "chc")
        assert 1 <= len(audits) <= 3
        assert {(a, o, c) for a, o, c, _ in audits} == {("refused", "4", "HT-PKT-RATE")}
        received = Counter(
            p
            for (p,) in rows(
                core, "SELECT packet_id FROM audit WHERE action = 'received' AND peer = 'chc'"
            )
        )
        assert received == Counter(p for v in sent.values() for p in v)
    finally:
        chc.stop()
