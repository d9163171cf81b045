"""Each refusal class, produced against a running node: its own code, kept in quarantine,
audited, and nothing of it delivered. A frame whose sender signature verified gets its refusal
in a signed receipt; one that did not authenticate (malformed, too large, unknown sender, bad
signature) gets an unsigned error, and quarantine keeps only a prefix and digest of it."""

from __future__ import annotations

import csv
import io
import os
import select
import socket
import struct
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bridge.crypto import envelope as env
from bridge.crypto.keys import load_signing_key
from bridge.delivery.transport import PeerConnection
from bridge.errors import REFUSALS
from tests.factory import bundle_bytes
from tests.harness import Alliance, spooled, wait_for

pytestmark = pytest.mark.slow

MEMBERS = [
    {"id": "core", "zh": "复兴医院", "en": "Fuxing Hospital", "role": "core"},
    {"id": "chc", "zh": "月坛社区卫生服务中心", "en": "Yuetan CHC", "role": "community"},
    {"id": "sec", "zh": "广外医院", "en": "Guangwai Hospital", "role": "secondary"},
]
RULES = [{"from": "chc", "to": "core", "kinds": ["result.lab"]}]


@pytest.fixture(scope="module")
def alliance(tmp_path_factory: pytest.TempPathFactory):
    a = Alliance(tmp_path_factory.mktemp("refusals") / "alliance", MEMBERS, RULES)
    a.start("core")
    yield a
    a.stop_all()


class Forge:
    """Builds frames as chc would, with one thing wrong at a time."""

    def __init__(self, a: Alliance) -> None:
        chc = a.node("chc").plan
        self.key = load_signing_key(chc.keys.signing, chc.keys.passphrase)
        self.core_pub = a.node("core").plan.directory["core"].encryption_keys[0]
        self.chc_pub = chc.directory["chc"].encryption_keys[0]

    def seal(self, body: bytes | None = None, **kw: object) -> bytes:
        args = dict(
            sender="chc",
            recipient="core",
            kind="result.lab",
            thread="t1",
            seq=1,
            signing_key=self.key,
            recipient_key=self.core_pub,
        )
        args.update(kw)
        return env.seal(body if body is not None else bundle_bytes(), **args)  # type: ignore[arg-type]

    def wrong_digest(self) -> bytes:
        body = bundle_bytes()
        eph, nonce = X25519PrivateKey.generate(), os.urandom(12)
        pkt = env.decode(self.seal(body, ephemeral_key=eph, nonce=nonce), max_body=1 << 30)
        header = orjson.loads(pkt.header_bytes)
        header["digest"] = "0" * 64
        hb = orjson.dumps(header, option=orjson.OPT_SORT_KEYS)
        epk = eph.public_key().public_bytes_raw()
        key = env._body_key(eph.exchange(self.core_pub), epk, self.core_pub.public_bytes_raw())
        ct = AESGCM(key).encrypt(nonce, body, hb)
        u32 = struct.Struct(">I").pack
        sig = self.key.sign(env.CTX_PACKET + u32(len(hb)) + hb + ct)
        return b"HTP1" + u32(len(hb)) + hb + u32(len(ct)) + ct + sig


def post(a: Alliance, frames: list[bytes]) -> list[dict]:
    conn = PeerConnection(a.node("core").peer_url)
    try:
        answers = env.decode_batch(conn.post_batch(env.encode_batch(frames)), max_total=1 << 30)
    finally:
        conn.close()
    keys = {m: p.signing_keys for m, p in a.node("core").plan.directory.items()}
    return [env.verify_receipt(x, lambda n: keys[n]) for x in answers]


def flip(frame: bytes, at: int) -> bytes:
    b = bytearray(frame)
    b[at] ^= 0x01
    return bytes(b)


def cases(f: Forge) -> dict[str, bytes]:
    stranger = Ed25519PrivateKey.generate()
    good = f.seal()
    return {
        "HT-PKT-MALFORMED": b"HTP1" + b"\x00\x00\x00\x05hello",
        "HT-PKT-BAD-SIGNATURE": flip(good, len(good) - 100),
        "HT-PKT-UNKNOWN-SENDER": f.seal(sender="stranger", signing_key=stranger),
        "HT-PKT-WRONG-RECIPIENT": f.seal(recipient="sec"),
        "HT-PKT-CLOCK": f.seal(created_at=datetime.now(UTC) - timedelta(minutes=6)),
        "HT-PKT-DECRYPT": f.seal(recipient_key=f.chc_pub),
        "HT-PKT-DIGEST": f.wrong_digest(),
        "HT-PKT-INVALID-FHIR": f.seal(b'{"resourceType": "Bundle", "type": "bogus"}'),
        "HT-PKT-ROUTE-DENIED": f.seal(kind="referral.return"),
        "HT-PKT-TOO-LARGE": f.seal(b" " * (20 * 1024 * 1024 + 1)),
    }


UNAUTHENTICATED = {
    "HT-PKT-MALFORMED",
    "HT-PKT-BAD-SIGNATURE",
    "HT-PKT-UNKNOWN-SENDER",
    "HT-PKT-TOO-LARGE",
}


def post_alone(a: Alliance, frame: bytes) -> tuple[int, dict]:
    """One frame in its own request: (HTTP status, the unsigned JSON error). The node may
    answer before the body is all sent (and close): its answer is read all the same."""
    core = a.node("core")
    body = env.encode_batch([frame])
    with socket.create_connection((core.plan.peer_host, core.plan.peer_port), 60) as s:
        s.sendall(
            f"POST /exchange/v1/packets HTTP/1.1\r\nHost: x\r\nContent-Length: "
            f"{len(body)}\r\n\r\n".encode()
        )
        try:
            for i in range(0, len(body), 1 << 18):
                if select.select([s], [], [], 0)[0]:
                    break
                s.sendall(body[i : i + (1 << 18)])
        except OSError:
            pass
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(head[9:12]), orjson.loads(rest)


def test_every_refusal_class_is_answered_quarantined_audited_not_delivered(alliance) -> None:
    f = Forge(alliance)
    core = alliance.node("core")
    made = cases(f)
    # every refusal class but replay (next test) is produced here
    assert set(made) | {"HT-PKT-REPLAY"} == set(REFUSALS)
    signed = {c: fr for c, fr in made.items() if c not in UNAUTHENTICATED}
    receipts = post(alliance, list(signed.values()))
    for (code, _frame), receipt in zip(signed.items(), receipts, strict=True):
        assert receipt["status"] == "refused", code
        assert receipt["code"] == code, (code, receipt)
        assert receipt["receiver"] == "core"
        assert receipt["message"]
    statuses = {"HT-PKT-MALFORMED": 400, "HT-PKT-TOO-LARGE": 413}
    for code in sorted(UNAUTHENTICATED):
        status, error = post_alone(alliance, made[code])
        assert (status, error["code"], error["retry"]) == (
            statuses.get(code, 403),
            code,
            "transient",
        )
        assert error["message"]
    held = core.api("GET", "/local/v1/quarantine")
    held_codes = sorted(item["code"] for item in held)
    assert held_codes == sorted(made)
    for item in held:  # of what nobody authenticated, a prefix and digest only
        assert item["trusted"] is (item["code"] not in UNAUTHENTICATED), item
        if not item["trusted"]:
            assert item["remote"] == "127.0.0.1" and len(item["raw_digest"]) == 64
    big = [i for i in held if i["code"] == "HT-PKT-TOO-LARGE"][0]
    assert big["raw_size"] < len(made["HT-PKT-TOO-LARGE"])  # refused before read whole
    rows = list(csv.DictReader(io.StringIO(core.cli("audit", "export", "--format", "csv").stdout)))
    refused = sorted(r["code"] for r in rows if r["action"] == "refused")
    assert refused == sorted(made)
    assert all(r["outcome"] == "4" for r in rows if r["action"] == "refused")
    assert spooled(core) == []


def test_replay_same_id_other_content_refused_identical_resend_gets_original(alliance) -> None:
    f = Forge(alliance)
    core = alliance.node("core")
    pid = str(uuid.uuid4())
    body = bundle_bytes(marker="first")
    first = post(alliance, [f.seal(body, packet_id=pid, thread="t-replay")])[0]
    assert first["status"] == "accepted"
    again = post(alliance, [f.seal(body, packet_id=pid, thread="t-replay")])[0]
    assert again == first  # the original receipt, not a new one
    other = post(
        alliance, [f.seal(bundle_bytes(marker="second"), packet_id=pid, thread="t-replay")]
    )[0]
    assert other["status"] == "refused" and other["code"] == "HT-PKT-REPLAY"
    wait_for(lambda: len([p for p in spooled(core) if pid in p.name]) == 1)
    delivered = [p for p in spooled(core) if pid in p.name]
    assert len(delivered) == 1
    assert b"first" in delivered[0].read_bytes()


def test_disallowed_route_refused_at_queueing_never_leaves(alliance, tmp_path: Path) -> None:
    core = alliance.node("core")
    res = core.api(
        "POST",
        "/local/v1/packets",
        [
            {"to": "chc", "kind": "result.lab", "bundle": orjson.loads(bundle_bytes())},
            {"to": "nobody", "kind": "result.lab", "bundle": orjson.loads(bundle_bytes())},
        ],
        role="clinician",
    )["results"]
    assert [r["code"] for r in res] == ["HT-PKT-ROUTE-DENIED", "HT-PKT-ROUTE-DENIED"]
    assert "no rule allows core -> chc" in res[0]["message"]
    assert core.api("GET", "/local/v1/outbox") == []
    held = [i for i in core.api("GET", "/local/v1/quarantine") if i["source"] == "local"]
    assert len(held) == 2


def test_quarantined_packet_replays_after_rule_is_added(tmp_path: Path) -> None:
    a = Alliance(tmp_path / "alliance", MEMBERS, RULES)
    a.start("core")
    try:
        core = a.node("core")
        refused = post(a, [Forge(a).seal(kind="result.imaging", thread="t-fix")])[0]
        assert refused["code"] == "HT-PKT-ROUTE-DENIED"
        item = core.api("GET", "/local/v1/quarantine")[0]
        r = core.cli("quarantine", "replay", str(item["id"]))
        assert r.returncode == 1 and "HT-PKT-ROUTE-DENIED" in r.stderr
        alliance_toml = a.folder / "alliance.toml"
        alliance_toml.write_text(
            alliance_toml.read_text()
            + ('\n[[rules]]\nfrom = "chc"\nto = "core"\nkinds = ["result.imaging"]\n')
        )
        core.restart()
        r = core.cli("quarantine", "replay", str(item["id"]))
        assert r.returncode == 0, r.stderr
        wait_for(lambda: len(spooled(core)) == 1, what="replayed packet delivered")
        assert core.api("GET", "/local/v1/quarantine") == []
        assert core.cli("audit", "verify").returncode == 0
    finally:
        a.stop_all()
