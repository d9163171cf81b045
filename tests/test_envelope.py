"""Envelope: fixed vectors, round trips, and every way a frame can be refused."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import struct
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bridge.crypto import envelope as env
from bridge.errors import (
    BadSignature,
    DecryptFailed,
    DigestMismatch,
    MalformedPacket,
    PacketTooLarge,
    UnknownSender,
)

VECTORS = json.loads((Path(__file__).parent / "vectors" / "envelope_v1.json").read_text())
VIN, VOUT = VECTORS["inputs"], VECTORS["outputs"]
# computed once from the inputs and pinned: any change is a wire-format change
FRAME_SHA256 = "59b0c134ac5ffeb67d97beacdf470ec116ba4ee28615b167aec093432e995de6"

SIGN = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(VIN["sender_signing_seed"]))
RECIPIENT = X25519PrivateKey.from_private_bytes(bytes.fromhex(VIN["recipient_encryption_seed"]))
EPHEMERAL = X25519PrivateKey.from_private_bytes(bytes.fromhex(VIN["ephemeral_seed"]))
RELAY = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(VIN["relay_signing_seed"]))
RECEIVER = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(VIN["receiver_signing_seed"]))
BODY = VIN["body"].encode()
MAX = 1 << 20


def u32(n: int) -> bytes:
    return struct.pack(">I", n)


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int = 32) -> bytes:
    """RFC 5869 with the standard library only, to check the module's HKDF independently."""
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    okm, block, counter = b"", b"", 1
    while len(okm) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        okm += block
        counter += 1
    return okm[:length]


def canonical(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def vector_seal() -> bytes:
    return env.seal(
        BODY,
        sender=VIN["sender"],
        recipient=VIN["recipient"],
        kind=VIN["kind"],
        thread=VIN["thread"],
        seq=VIN["seq"],
        signing_key=SIGN,
        recipient_key=RECIPIENT.public_key(),
        packet_id=VIN["packet_id"],
        created_at=datetime.fromisoformat(VIN["created_at"]),
        ephemeral_key=EPHEMERAL,
        nonce=bytes.fromhex(VIN["nonce"]),
    )


def seal(body: bytes = b"hello", key: Ed25519PrivateKey = SIGN, **kw: Any) -> bytes:
    args: dict[str, Any] = dict(
        sender="hosp-a",
        recipient="hosp-b",
        kind="referral",
        thread="t1",
        seq=1,
        signing_key=key,
        recipient_key=RECIPIENT.public_key(),
    )
    args.update(kw)
    return env.seal(body, **args)


def encrypt(
    header: bytes,
    body: bytes,
    recipient: X25519PublicKey = RECIPIENT.public_key(),  # noqa: B008 - a fixed key
    ephemeral: X25519PrivateKey = EPHEMERAL,
    nonce: bytes = b"\x01" * 12,
) -> bytes:
    """The body encryption done step by step, outside the module."""
    epk = ephemeral.public_key().public_bytes_raw()
    key = hkdf_sha256(
        ephemeral.exchange(recipient), epk + recipient.public_bytes_raw(), b"hutong/v1/body"
    )
    return AESGCM(key).encrypt(nonce, body, header)


def frame_of(header: bytes, ciphertext: bytes, key: Ed25519PrivateKey = SIGN) -> bytes:
    """A correctly signed frame around whatever header and ciphertext a test wants."""
    sig = key.sign(b"hutong/v1/packet\x00" + u32(len(header)) + header + ciphertext)
    return b"HTP1" + u32(len(header)) + header + u32(len(ciphertext)) + ciphertext + sig


def evil_sender_frame(body: bytes, **header_changes: Any) -> bytes:
    """A sender with a valid key that lies in its own header (digest, size, ...)."""
    good = env.decode(seal(body, ephemeral_key=EPHEMERAL, nonce=b"\x01" * 12), max_body=MAX)
    header = canonical({**json.loads(good.header_bytes), **header_changes})
    return frame_of(header, encrypt(header, body))


def header_dict(frame: bytes) -> dict[str, Any]:
    return json.loads(env.decode(frame, max_body=MAX).header_bytes)


# -- fixed vector ------------------------------------------------------------------------------


def test_vector_frame_is_reproduced_exactly() -> None:
    frame = vector_seal()
    assert hashlib.sha256(frame).hexdigest() == FRAME_SHA256 == VOUT["frame_sha256"]
    assert frame.hex() == VOUT["frame"]


def test_vector_parts_match_an_independent_construction() -> None:
    rpk = RECIPIENT.public_key().public_bytes_raw()
    epk = EPHEMERAL.public_key().public_bytes_raw()
    sign_pub = SIGN.public_key().public_bytes_raw()
    assert (rpk.hex(), epk.hex()) == (VOUT["recipient_encryption_public"], VOUT["ephemeral_public"])
    # the header, field by field, from the inputs alone
    header = VOUT["header"].encode()
    assert json.loads(header) == {
        "v": 1,
        "id": VIN["packet_id"],
        "sender": "hosp-a",
        "recipient": "hosp-b",
        "kind": "referral",
        "created_at": "2025-03-14T01:59:26.535Z",
        "thread": "t-0001",
        "seq": 7,
        "digest": hashlib.sha256(BODY).hexdigest(),
        "size": len(BODY),
        "suite": "X25519-HKDF-SHA256-A256GCM/Ed25519",
        "epk": base64.b64encode(epk).decode(),
        "nonce": base64.b64encode(bytes.fromhex(VIN["nonce"])).decode(),
        "sig_key": "k" + hashlib.sha256(sign_pub).hexdigest()[:16],
        "enc_key": "k" + hashlib.sha256(rpk).hexdigest()[:16],
    }
    assert header == canonical(json.loads(header))
    # both sides of the exchange agree; HKDF by RFC 5869 with hmac; AES-GCM with header as AAD
    shared = EPHEMERAL.exchange(RECIPIENT.public_key())
    assert shared == RECIPIENT.exchange(EPHEMERAL.public_key())
    assert shared.hex() == VOUT["shared_secret"]
    key = hkdf_sha256(shared, salt=epk + rpk, info=b"hutong/v1/body")
    assert key.hex() == VOUT["body_key"]
    ciphertext = AESGCM(key).encrypt(bytes.fromhex(VIN["nonce"]), BODY, header)
    assert ciphertext.hex() == VOUT["ciphertext"]
    assert len(ciphertext) == len(BODY) + 16
    # signature over the domain-separated signed part; Ed25519 is deterministic
    signed = b"hutong/v1/packet\x00" + u32(len(header)) + header + ciphertext
    signature = SIGN.sign(signed)
    SIGN.public_key().verify(signature, signed)
    assert signature.hex() == VOUT["signature"]
    # and the frame is exactly these parts in wire order
    frame = b"HTP1" + u32(len(header)) + header + u32(len(ciphertext)) + ciphertext + signature
    assert hashlib.sha256(frame).hexdigest() == FRAME_SHA256


def test_vector_decodes_verifies_and_opens() -> None:
    pkt = env.decode(bytes.fromhex(VOUT["frame"]), max_body=MAX)
    env.verify(pkt, [SIGN.public_key()])
    assert env.open_body(pkt, [RECIPIENT]) == BODY
    assert pkt.header.created_at == datetime(2025, 3, 14, 1, 59, 26, 535000, tzinfo=UTC)
    assert pkt.header.epk == EPHEMERAL.public_key().public_bytes_raw()
    assert pkt.header.nonce == bytes.fromhex(VIN["nonce"])
    assert pkt.relay is None


def test_vector_relay_stamp_and_receipt() -> None:
    pkt = env.decode(bytes.fromhex(VOUT["frame"]), max_body=MAX)
    stamped = env.stamp_relay(
        pkt, relay_id="platform", signing_key=RELAY, now=datetime.fromisoformat(VIN["relayed_at"])
    )
    assert hashlib.sha256(stamped).hexdigest() == VOUT["stamped_frame_sha256"]
    stamp = VOUT["relay_stamp"].encode()
    assert stamped == (
        bytes.fromhex(VOUT["frame"])
        + b"RLY1"
        + u32(len(stamp))
        + stamp
        + bytes.fromhex(VOUT["relay_signature"])
    )
    RELAY.public_key().verify(
        bytes.fromhex(VOUT["relay_signature"]), b"hutong/v1/relay\x00" + stamp + pkt.signature
    )
    receipt = env.sign_receipt(VOUT["receipt_fields"], RECEIVER)
    assert receipt.hex() == VOUT["receipt"]
    raw = canonical(VOUT["receipt_fields"])
    assert receipt[:8] == b"HTR1" + u32(len(raw)) and receipt[8:-64] == raw
    RECEIVER.public_key().verify(receipt[-64:], b"hutong/v1/receipt\x00" + raw)


# -- round trip --------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 4096, 100_000])
def test_round_trip(size: int) -> None:
    body = bytes(i % 251 for i in range(size))
    at = datetime(2025, 6, 1, 12, 0, 0, 123456, tzinfo=timezone(timedelta(hours=8)))
    frame = seal(body, kind="lab-result", thread="th-9", seq=42, created_at=at)
    pkt = env.decode(frame, max_body=MAX)
    env.verify(pkt, [SIGN.public_key()])
    assert env.open_body(pkt, [RECIPIENT]) == body
    h = pkt.header
    assert (h.v, h.sender, h.recipient, h.kind, h.thread, h.seq, h.size) == (
        1,
        "hosp-a",
        "hosp-b",
        "lab-result",
        "th-9",
        42,
        size,
    )
    assert h.digest == env.body_digest(body) == hashlib.sha256(body).hexdigest()
    assert h.created_at == datetime(2025, 6, 1, 4, 0, 0, 123000, tzinfo=UTC)  # UTC, ms
    assert json.loads(h.raw)["created_at"] == "2025-06-01T04:00:00.123Z"
    assert h.suite == env.SUITE and h.raw == pkt.header_bytes
    assert len(frame) == 4 + 4 + len(h.raw) + 4 + size + 16 + 64
    assert pkt.frame == frame and pkt.unstamped == frame


def test_fresh_ids_ephemeral_keys_and_nonces_per_packet() -> None:
    a, b = header_dict(seal()), header_dict(seal())
    assert a["id"] != b["id"] and a["epk"] != b["epk"] and a["nonce"] != b["nonce"]
    assert a["id"][14] == "4"  # uuid4


def test_open_body_tries_the_named_key_first_then_others() -> None:
    other = X25519PrivateKey.generate()
    pkt = env.decode(seal(b"x"), max_body=MAX)
    assert env.open_body(pkt, [other, RECIPIENT]) == b"x"
    # sealed to a key whose id the header names but listed second: still found
    assert env.open_body(pkt, [X25519PrivateKey.generate(), other, RECIPIENT]) == b"x"


# -- refusals ----------------------------------------------------------------------------------


def test_flipped_header_byte_is_bad_signature() -> None:
    frame = seal(b"body", thread="t-0001")
    tampered = frame.replace(b'"thread":"t-0001"', b'"thread":"t-0002"')
    assert tampered != frame
    pkt = env.decode(tampered, max_body=MAX)
    with pytest.raises(BadSignature):
        env.verify(pkt, [SIGN.public_key()])


def test_every_header_byte_flip_is_refused() -> None:
    frame = seal(b"body")
    hlen = struct.unpack(">I", frame[4:8])[0]
    for i in range(8, 8 + hlen):
        bad = frame[:i] + bytes([frame[i] ^ 0x01]) + frame[i + 1 :]
        try:
            pkt = env.decode(bad, max_body=MAX)
        except MalformedPacket:
            continue
        with pytest.raises(BadSignature):
            env.verify(pkt, [SIGN.public_key()])


@pytest.mark.parametrize("where", ["ciphertext-first", "ciphertext-last", "signature"])
def test_flipped_ciphertext_or_signature_byte_is_bad_signature(where: str) -> None:
    frame = seal(b"some body bytes")
    i = {
        "ciphertext-first": len(frame) - 64 - 31,
        "ciphertext-last": len(frame) - 65,
        "signature": len(frame) - 10,
    }[where]
    bad = frame[:i] + bytes([frame[i] ^ 0x80]) + frame[i + 1 :]
    pkt = env.decode(bad, max_body=MAX)
    with pytest.raises(BadSignature, match="signature does not verify"):
        env.verify(pkt, [SIGN.public_key()])
    if where.startswith("ciphertext"):  # and GCM alone would also have caught it
        with pytest.raises(DecryptFailed):
            env.open_body(pkt, [RECIPIENT])


def test_header_is_bound_as_aad() -> None:
    """A validly signed header that is not the one the body was sealed under does not open."""
    good = env.decode(seal(b"body"), max_body=MAX)
    other = canonical({**json.loads(good.header_bytes), "thread": "moved"})
    pkt = env.decode(frame_of(other, good.ciphertext), max_body=MAX)
    env.verify(pkt, [SIGN.public_key()])
    with pytest.raises(DecryptFailed):
        env.open_body(pkt, [RECIPIENT])


def test_wrong_recipient_key_is_decrypt_failed() -> None:
    pkt = env.decode(seal(b"for hosp-b only"), max_body=MAX)
    with pytest.raises(DecryptFailed, match="does not open with any of this node's 1"):
        env.open_body(pkt, [X25519PrivateKey.generate()])
    with pytest.raises(DecryptFailed):
        env.open_body(pkt, [])


def test_low_order_ephemeral_key_is_decrypt_failed() -> None:
    good = env.decode(seal(b"x"), max_body=MAX)
    zero = base64.b64encode(bytes(32)).decode()
    header = canonical({**json.loads(good.header_bytes), "epk": zero})
    pkt = env.decode(frame_of(header, good.ciphertext), max_body=MAX)
    with pytest.raises(DecryptFailed, match="unusable ephemeral key"):
        env.open_body(pkt, [RECIPIENT])


def test_sender_lying_about_digest_is_digest_mismatch() -> None:
    frame = evil_sender_frame(b"real body", digest=hashlib.sha256(b"other body").hexdigest())
    pkt = env.decode(frame, max_body=MAX)
    env.verify(pkt, [SIGN.public_key()])  # the signature is fine: the sender lied
    with pytest.raises(DigestMismatch, match="does not match the header digest"):
        env.open_body(pkt, [RECIPIENT])


def test_sender_lying_about_size_is_digest_mismatch() -> None:
    pkt = env.decode(evil_sender_frame(b"real body", size=3), max_body=MAX)
    env.verify(pkt, [SIGN.public_key()])
    with pytest.raises(DigestMismatch, match="9 bytes, header says 3"):
        env.open_body(pkt, [RECIPIENT])


@pytest.mark.parametrize("stamped", [False, True])
def test_every_truncation_is_malformed(stamped: bool) -> None:
    frame = seal(b"tiny")
    full = frame
    if stamped:
        full = env.stamp_relay(env.decode(frame, max_body=MAX), relay_id="p", signing_key=RELAY)
    for cut in range(len(full)):
        if cut == len(frame) and stamped:
            continue  # the sender's own, unstamped frame: valid
        with pytest.raises(MalformedPacket):
            env.decode(full[:cut], max_body=MAX)


@pytest.mark.parametrize("tail", [b"\x00", b"RLY1", b"junk" * 20])
def test_trailing_bytes_are_malformed(tail: bytes) -> None:
    with pytest.raises(MalformedPacket, match=r"unexpected bytes|truncated"):
        env.decode(seal(b"x") + tail, max_body=MAX)


def test_trailing_bytes_after_relay_stamp_are_malformed() -> None:
    stamped = env.stamp_relay(env.decode(seal(), max_body=MAX), relay_id="p", signing_key=RELAY)
    with pytest.raises(MalformedPacket, match="unexpected bytes after the relay stamp"):
        env.decode(stamped + b"\x00", max_body=MAX)


def test_bad_magic_is_malformed_and_names_what_it_got() -> None:
    frame = seal(b"x")
    with pytest.raises(MalformedPacket, match="expected a packet frame, got: receipt"):
        env.decode(b"HTR1" + frame[4:], max_body=MAX)
    with pytest.raises(MalformedPacket, match="bad magic"):
        env.decode(b"XXXX" + frame[4:], max_body=MAX)


def test_plaintext_is_never_echoed_in_messages() -> None:
    secret = b'{"resourceType":"Patient","name":[{"text":"Zhang San"}]}'
    for junk in (secret, b"HTP1" + u32(len(secret)) + secret + u32(16) + bytes(16 + 64)):
        with pytest.raises(MalformedPacket) as caught:
            env.decode(junk, max_body=MAX)
        assert "Zhang" not in str(caught.value) and "\n" not in str(caught.value)
    # a correctly framed and signed frame whose "ciphertext" is plaintext
    header = json.loads(env.decode(seal(secret), max_body=MAX).header_bytes)
    pkt = env.decode(frame_of(canonical(header), secret), max_body=MAX)
    with pytest.raises(DecryptFailed) as caught2:
        env.open_body(pkt, [RECIPIENT])
    assert "Zhang" not in str(caught2.value)


def _non_canonical_b64(text: str) -> str:
    """Same bytes, other spelling: set a padding bit in the last character before '='."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    other = text[:42] + alphabet[alphabet.index(text[42]) ^ 1] + text[43:]
    assert base64.b64decode(other) == base64.b64decode(text) and other != text
    return other


def _header_case(name: str) -> bytes:
    h = header_dict(seal(b"x"))
    cases: dict[str, Any] = {
        "not json": b"{not json",
        "not utf-8": b'{"v":"\xff"}',
        "array": b"[1,2]",
        "not canonical (spaces)": json.dumps(h, sort_keys=True).encode(),
        "not canonical (order)": json.dumps(
            dict(reversed(list(h.items()))), separators=(",", ":")
        ).encode(),
        "duplicate key": canonical(h)[:-1] + b',"v":1}',
        "missing field": canonical({k: v for k, v in h.items() if k != "digest"}),
        "unknown field": canonical({**h, "zz": 1}),
        "v=2": canonical({**h, "v": 2}),
        "v as bool": canonical({**h, "v": True}),
        "seq as string": canonical({**h, "seq": "1"}),
        "negative seq": canonical({**h, "seq": -1}),
        "float size": canonical({**h, "size": 1.0}),
        "uppercase uuid": canonical({**h, "id": h["id"].upper()}),
        "uuid without hyphens": canonical({**h, "id": h["id"].replace("-", "")}),
        "empty sender": canonical({**h, "sender": ""}),
        "long kind": canonical({**h, "kind": "k" * 257}),
        "time without ms": canonical({**h, "created_at": "2025-01-31T08:00:00Z"}),
        "time with offset": canonical({**h, "created_at": "2025-01-31T08:00:00.000+00:00"}),
        "month 13": canonical({**h, "created_at": "2025-13-31T08:00:00.000Z"}),
        "unknown suite": canonical({**h, "suite": "SM2-SM3-SM4"}),
        "short epk": canonical({**h, "epk": base64.b64encode(bytes(31)).decode()}),
        "epk not base64": canonical({**h, "epk": "!" * 44}),
        "nonce not base64": canonical({**h, "nonce": h["nonce"][:-1] + "=="}),
        "epk non-canonical base64": canonical({**h, "epk": _non_canonical_b64(h["epk"])}),
        "uppercase digest": canonical({**h, "digest": h["digest"].upper()}),
        "bad key id": canonical({**h, "sig_key": "x123"}),
    }
    return cases[name]


@pytest.mark.parametrize(
    "case",
    [
        "not json",
        "not utf-8",
        "array",
        "not canonical (spaces)",
        "not canonical (order)",
        "duplicate key",
        "missing field",
        "unknown field",
        "v=2",
        "v as bool",
        "seq as string",
        "negative seq",
        "float size",
        "uppercase uuid",
        "uuid without hyphens",
        "empty sender",
        "long kind",
        "time without ms",
        "time with offset",
        "month 13",
        "unknown suite",
        "short epk",
        "epk not base64",
        "nonce not base64",
        "epk non-canonical base64",
        "uppercase digest",
        "bad key id",
    ],
)
def test_bad_header_is_malformed(case: str) -> None:
    header = _header_case(case)
    with pytest.raises(MalformedPacket) as caught:
        env.decode(frame_of(header, bytes(32)), max_body=MAX)
    message = str(caught.value)
    assert message.startswith("HT-PKT-MALFORMED: ") and "\n" not in message


def test_bad_header_messages_name_the_field() -> None:
    h = header_dict(seal(b"x"))
    for field, value, expected in [
        ("seq", "1", "field 'seq' must be a non-negative integer"),
        ("id", h["id"].upper(), "field 'id' must be a lowercase hyphenated UUID"),
        ("created_at", "yesterday", "field 'created_at' must be an RFC 3339 UTC time"),
    ]:
        with pytest.raises(MalformedPacket, match=expected):
            env.decode(frame_of(canonical({**h, field: value}), bytes(32)), max_body=MAX)
    with pytest.raises(MalformedPacket, match="missing field\\(s\\) digest"):
        env.decode(
            frame_of(canonical({k: v for k, v in h.items() if k != "digest"}), bytes(32)),
            max_body=MAX,
        )


def test_ciphertext_shorter_than_tag_is_malformed() -> None:
    header = canonical(header_dict(seal(b"x")))
    with pytest.raises(MalformedPacket, match="shorter than a tag"):
        env.decode(frame_of(header, bytes(15)), max_body=MAX)


def test_oversized_body_is_too_large() -> None:
    frame = seal(bytes(4096))
    assert env.decode(frame, max_body=4096).header.size == 4096
    with pytest.raises(PacketTooLarge, match="packet body is 4096 bytes, limit 4095"):
        env.decode(frame, max_body=4095)


def test_oversized_length_prefix_is_judged_before_the_body_is_there() -> None:
    header = canonical(header_dict(seal(b"x")))
    # only the prefixes: a frame that claims a 1 GB body (or header) but carries no bytes of it
    with pytest.raises(PacketTooLarge, match="packet body is"):
        env.decode(b"HTP1" + u32(len(header)) + header + u32(1 << 30), max_body=MAX)
    with pytest.raises(PacketTooLarge, match="packet header is"):
        env.decode(b"HTP1" + u32(1 << 30), max_body=1 << 40)
    with pytest.raises(PacketTooLarge, match="packet header is"):
        env.decode(b"HTP1" + u32(len(header)) + header, max_body=len(header) - 1)


def test_rollover_current_and_next_key_both_verify() -> None:
    old, new = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    by_new = env.decode(seal(b"x", key=new), max_body=MAX)
    by_old = env.decode(seal(b"x", key=old), max_body=MAX)
    for keys in ([old.public_key(), new.public_key()], [new.public_key(), old.public_key()]):
        env.verify(by_new, keys)
        env.verify(by_old, keys)
    with pytest.raises(BadSignature, match="any of the 1 key"):
        env.verify(by_new, [old.public_key()])
    with pytest.raises(BadSignature):
        env.verify(by_new, [])
    assert by_new.header.sig_key != by_old.header.sig_key


# -- relay stamps ------------------------------------------------------------------------------


def test_relay_stamp_verifies_and_keeps_sender_signature() -> None:
    frame = seal(b"through the platform")
    at = datetime(2025, 5, 1, 10, 0, 0, 250000, tzinfo=UTC)
    stamped = env.stamp_relay(
        env.decode(frame, max_body=MAX), relay_id="platform", signing_key=RELAY, now=at
    )
    pkt = env.decode(stamped, max_body=MAX)
    assert pkt.relay is not None
    assert (pkt.relay.relay, pkt.relay.relayed_at) == ("platform", at)
    assert pkt.relay.packet == pkt.header.id
    env.verify_relay(pkt, [RELAY.public_key()])
    env.verify(pkt, [SIGN.public_key()])
    assert pkt.unstamped == frame
    assert env.open_body(pkt, [RECIPIENT]) == b"through the platform"
    relay_enc = X25519PrivateKey.generate()  # the platform's own key does not open the body
    with pytest.raises(DecryptFailed):
        env.open_body(pkt, [relay_enc])


def test_restamp_replaces_the_old_stamp() -> None:
    frame = seal()
    once = env.stamp_relay(env.decode(frame, max_body=MAX), relay_id="p1", signing_key=RELAY)
    twice = env.stamp_relay(env.decode(once, max_body=MAX), relay_id="p2", signing_key=SIGN)
    pkt = env.decode(twice, max_body=MAX)
    assert pkt.relay is not None and pkt.relay.relay == "p2"
    assert twice.count(b"RLY1") == 1 and twice.startswith(frame)
    env.verify_relay(pkt, [SIGN.public_key()])


def test_relay_stamp_tampering_is_bad_signature() -> None:
    pkt = env.decode(seal(), max_body=MAX)
    at = datetime(2025, 5, 1, 10, 0, 0, tzinfo=UTC)
    stamped = env.stamp_relay(pkt, relay_id="platform", signing_key=RELAY, now=at)
    moved = stamped.replace(b"2025-05-01T10:00:00.000Z", b"2025-05-01T10:09:00.000Z")
    with pytest.raises(BadSignature, match="relay stamp of packet"):
        env.verify_relay(env.decode(moved, max_body=MAX), [RELAY.public_key()])
    with pytest.raises(BadSignature):  # right stamp, wrong relay keys
        env.verify_relay(env.decode(stamped, max_body=MAX), [SIGN.public_key()])
    with pytest.raises(BadSignature, match="no relay stamp"):
        env.verify_relay(pkt, [RELAY.public_key()])


def test_relay_stamp_moved_to_another_packet_is_bad_signature() -> None:
    a = env.decode(
        env.stamp_relay(env.decode(seal(b"a"), max_body=MAX), relay_id="p", signing_key=RELAY),
        max_body=MAX,
    )
    b_frame = seal(b"b")
    assert a.relay is not None
    moved = b_frame + a.frame[len(a.unstamped) :]
    with pytest.raises(BadSignature, match="relay stamp names packet"):
        env.verify_relay(env.decode(moved, max_body=MAX), [RELAY.public_key()])


# -- receipts ----------------------------------------------------------------------------------


def receipt_fields(**kw: Any) -> dict[str, Any]:
    return {
        "packet": VIN["packet_id"],
        "sender": "hosp-a",
        "recipient": "hosp-b",
        "receiver": "hosp-b",
        "status": "accepted",
        "code": None,
        "message": None,
        "at": "2025-03-14T01:59:28.250Z",
        "digest": "ab" * 32,
        **kw,
    }


def test_receipt_round_trip_looks_up_the_receiver() -> None:
    asked: list[str] = []

    def keys_for(node: str) -> list[Any]:
        asked.append(node)
        return [RECEIVER.public_key()]

    fields = receipt_fields(status="refused", code="HT-PKT-DIGEST", message="no", digest=None)
    assert env.verify_receipt(env.sign_receipt(fields, RECEIVER), keys_for) == fields
    assert asked == ["hosp-b"]
    at = datetime(2025, 3, 14, 9, 59, 28, 250000, tzinfo=timezone(timedelta(hours=8)))
    data = env.sign_receipt(receipt_fields(at=at), RECEIVER)
    assert env.verify_receipt(data, keys_for)["at"] == "2025-03-14T01:59:28.250Z"
    assert env.frame_kind(data) == "receipt"


def test_receipt_refusals() -> None:
    data = env.sign_receipt(receipt_fields(), RECEIVER)
    with pytest.raises(BadSignature, match="does not verify with any key of 'hosp-b'"):
        env.verify_receipt(data, lambda n: [SIGN.public_key()])
    tampered = data.replace(b'"digest":"abab', b'"digest":"acab')
    assert tampered != data and len(tampered) == len(data)
    with pytest.raises(BadSignature):
        env.verify_receipt(tampered, lambda n: [RECEIVER.public_key()])
    for cut in range(len(data)):
        with pytest.raises(MalformedPacket):
            env.verify_receipt(data[:cut], lambda n: [RECEIVER.public_key()])
    with pytest.raises(MalformedPacket, match="unexpected bytes after the receipt"):
        env.verify_receipt(data + b"\x00", lambda n: [RECEIVER.public_key()])
    with pytest.raises(PacketTooLarge):
        env.verify_receipt(b"HTR1" + u32(1 << 30), lambda n: [RECEIVER.public_key()])

    def unknown(node: str) -> list[Any]:
        raise UnknownSender(f"receipt signer '{node}' is not in the alliance directory")

    with pytest.raises(UnknownSender):
        env.verify_receipt(data, unknown)


def test_receipt_with_bad_fields_is_refused() -> None:
    bad = canonical({k: v for k, v in receipt_fields().items() if k != "status"})
    data = b"HTR1" + u32(len(bad)) + bad + RECEIVER.sign(b"hutong/v1/receipt\x00" + bad)
    with pytest.raises(MalformedPacket, match="missing field\\(s\\) status"):
        env.verify_receipt(data, lambda n: [RECEIVER.public_key()])
    for fields in (
        receipt_fields(status="maybe"),
        receipt_fields(code=5),
        {k: v for k, v in receipt_fields().items() if k != "receiver"},
    ):
        with pytest.raises(ValueError, match="receipt: "):
            env.sign_receipt(fields, RECEIVER)


# -- batches -----------------------------------------------------------------------------------


def test_batch_round_trip_mixed_items() -> None:
    items = [seal(b"one"), env.sign_receipt(receipt_fields(), RECEIVER), seal(b"")]
    data = env.encode_batch(items)
    assert data[:8] == b"HTB1" + u32(3)
    out = env.decode_batch(data, max_total=len(data))
    assert out == items
    assert [env.frame_kind(i) for i in out] == ["packet", "receipt", "packet"]
    assert env.decode_batch(env.encode_batch([]), max_total=100) == []


def test_batch_refusals() -> None:
    data = env.encode_batch([seal(b"one"), seal(b"two")])
    with pytest.raises(PacketTooLarge, match="limit"):
        env.decode_batch(data, max_total=len(data) - 1)
    with pytest.raises(PacketTooLarge, match="batch has 2 items, limit 1"):
        env.decode_batch(data, max_items=1, max_total=len(data))
    with pytest.raises(PacketTooLarge):  # a huge count is refused before any loop
        env.decode_batch(b"HTB1" + u32(0xFFFFFFFF), max_total=100)
    for cut in range(len(data)):
        with pytest.raises(MalformedPacket):
            env.decode_batch(data[:cut], max_total=len(data))
    with pytest.raises(MalformedPacket, match="unexpected bytes"):
        env.decode_batch(data + b"\x00", max_total=len(data) + 1)
    with pytest.raises(MalformedPacket, match="expected a batch frame, got: packet"):
        env.decode_batch(seal(), max_total=MAX)


@pytest.mark.parametrize("item", [b"", b"HT", b"HTB1\x00\x00\x00\x00", b"RLY1xxxx", b"GET /"])
def test_frame_kind_refuses_other_things(item: bytes) -> None:
    with pytest.raises(MalformedPacket, match="expected a packet or receipt frame"):
        env.frame_kind(item)


# -- seal's own argument checks ----------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        {"created_at": datetime(2025, 1, 1)},  # naive
        {"packet_id": "not-a-uuid"},
        {"packet_id": "0B5F6D1E-2C3A-4B7D-9E8F-1A2B3C4D5E6F"},
        {"nonce": b"short"},
        {"sender": ""},
        {"seq": -1},
        {"seq": True},
    ],
)
def test_seal_refuses_bad_arguments(kw: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="must be"):
        seal(b"x", **kw)


def test_stamp_relay_refuses_empty_relay_id() -> None:
    with pytest.raises(ValueError, match="field 'relay'"):
        env.stamp_relay(env.decode(seal(), max_body=MAX), relay_id="", signing_key=RELAY)


# -- receipts carrying an audit anchor (additive field, anchor v1) ----------------------------

ANCHOR_VECTORS = json.loads(
    (Path(__file__).parent / "vectors" / "receipt_anchor_v1.json").read_text()
)


def test_vector_receipt_with_anchor_is_a_v1_receipt_old_and_new_peers_read() -> None:
    """The anchor is one more signed receipt field: a peer that knows nothing of anchors
    verifies the receipt unchanged (extra fields are allowed), and an anchor-less receipt (the
    envelope_v1 vector) is still what a new peer accepts."""
    from bridge.audit.anchor import Anchor
    from bridge.audit.chain import key_id

    ain, aout = ANCHOR_VECTORS["inputs"], ANCHOR_VECTORS["outputs"]
    assert ain["receiver_signing_seed"] == VIN["receiver_signing_seed"]
    assert ain["receipt_fields"] == VOUT["receipt_fields"]
    message = f"{ain['node']}|{ain['seq']}|{ain['hash']}|{ain['checkpoint_at']}".encode()
    assert message.decode() == aout["checkpoint_message"]
    signature = base64.b64encode(RECEIVER.sign(message)).decode()  # Ed25519 is deterministic
    anchor = {
        "v": 1,
        "node": ain["node"],
        "seq": ain["seq"],
        "hash": ain["hash"],
        "at": ain["checkpoint_at"],
        "key_id": key_id(RECEIVER.public_key()),
        "signature": signature,
    }
    assert anchor == aout["anchor"]
    fields = {**VOUT["receipt_fields"], "anchor": anchor}
    assert fields == aout["receipt_fields"]
    receipt = env.sign_receipt(fields, RECEIVER)
    assert receipt.hex() == aout["receipt"]
    assert hashlib.sha256(receipt).hexdigest() == aout["receipt_sha256"]
    raw = canonical(fields)
    assert receipt[:8] == b"HTR1" + u32(len(raw)) and receipt[8:-64] == raw
    RECEIVER.public_key().verify(receipt[-64:], b"hutong/v1/receipt\x00" + raw)
    # the v1 verifier takes both forms
    got = env.verify_receipt(receipt, lambda n: [RECEIVER.public_key()])
    assert got == fields and got["anchor"]["seq"] == 3000
    plain = env.verify_receipt(bytes.fromhex(VOUT["receipt"]), lambda n: [RECEIVER.public_key()])
    assert "anchor" not in plain
    # the anchor stands on its own signature: whoever holds it needs only the node's key
    a = Anchor.from_dict(got["anchor"])
    assert a.verifies([RECEIVER.public_key()])
    assert not a.verifies([SIGN.public_key()])
    assert not Anchor.from_dict({**anchor, "seq": 2999}).verifies([RECEIVER.public_key()])
    with pytest.raises(ValueError, match="anchor version must be 1"):
        Anchor.from_dict({**anchor, "v": 2})


# -- batch-signed receipts (HTR2, receipt v2) -------------------------------------------------

BATCH_VECTORS = json.loads(
    (Path(__file__).parent / "vectors" / "receipt_batch_v2.json").read_text()
)


def mth(leaves: list[bytes]) -> bytes:
    """RFC 6962 Merkle tree head with hashlib only, to check the module's tree independently."""
    if len(leaves) == 1:
        return leaves[0]
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return hashlib.sha256(b"\x01" + mth(leaves[:k]) + mth(leaves[k:])).digest()


def audit_path(m: int, leaves: list[bytes]) -> list[bytes]:
    """RFC 6962 PATH(m, D[n]), bottom first."""
    if len(leaves) == 1:
        return []
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    if m < k:
        return audit_path(m, leaves[:k]) + [mth(leaves[k:])]
    return audit_path(m - k, leaves[k:]) + [mth(leaves[:k])]


def test_vector_receipt_batch_v2_rebuilt_independently() -> None:
    """Leaves, root, signature and every frame rebuilt with hashlib and the key alone; the
    module makes the same bytes, and each frame verifies on its own to its receipt's fields."""
    bin_, bout = BATCH_VECTORS["inputs"], BATCH_VECTORS["outputs"]
    assert bin_["receiver_signing_seed"] == VIN["receiver_signing_seed"]
    assert bin_["receipts"][0] == VOUT["receipt_fields"]
    raws = [canonical(f) for f in bin_["receipts"]]
    assert [r.decode() for r in raws] == bout["receipt_json"]
    leaves = [hashlib.sha256(b"\x00" + r).digest() for r in raws]
    assert [x.hex() for x in leaves] == bout["leaf_hashes"]
    root = mth(leaves)
    assert root.hex() == bout["root"]
    message = b"hutong/v2/receipt-batch\x00" + u32(len(leaves)) + root
    assert message.hex() == bout["signed_message"]
    sig = RECEIVER.sign(message)  # Ed25519 is deterministic
    assert sig.hex() == bout["signature"]
    RECEIVER.public_key().verify(sig, message)
    n = len(raws)
    for i, raw in enumerate(raws):
        path = audit_path(i, leaves)
        assert [p.hex() for p in path] == bout["paths"][i]
        frame = b"".join(
            (b"HTR2", u32(len(raw)), raw, u32(i), u32(n), bytes([len(path)]), *path, sig)
        )
        assert frame.hex() == bout["frames"][i]
        assert hashlib.sha256(frame).hexdigest() == bout["frames_sha256"][i]
    made = env.sign_receipts(bin_["receipts"], RECEIVER)
    assert [f.hex() for f in made] == bout["frames"]
    for i, frame in enumerate(made):
        got = env.verify_receipt(frame, lambda n: [RECEIVER.public_key()])
        assert got == bin_["receipts"][i]
        assert env.frame_kind(frame) == "receipt"
    # v1 is unchanged: the first receipt alone is the envelope_v1 receipt, byte for byte
    assert env.sign_receipt(bin_["receipts"][0], RECEIVER).hex() == VOUT["receipt"]


class CountingKey:
    """A public key that counts its verifications (the roots set saves all but one)."""

    def __init__(self, key: Any) -> None:
        self.key, self.calls = key, 0

    def public_bytes_raw(self) -> bytes:
        return self.key.public_bytes_raw()  # type: ignore[no-any-return]

    def verify(self, sig: bytes, message: bytes) -> None:
        self.calls += 1
        self.key.verify(sig, message)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 9, 33, 200])
def test_every_receipt_of_a_batch_verifies_alone_and_the_root_once(n: int) -> None:
    fields = [receipt_fields(packet=uuid_of(i)) for i in range(n)]
    frames = env.sign_receipts(fields, RECEIVER)
    assert len({f[-64:] for f in frames}) == 1  # one signature for the batch
    for i, frame in enumerate(frames):  # alone: a fresh verifier each time
        assert env.verify_receipt(frame, lambda _n: [RECEIVER.public_key()]) == fields[i]
        depth = frame[8 + len(canonical(fields[i])) + 8]
        assert depth <= max(1, (n - 1).bit_length())
    key = CountingKey(RECEIVER.public_key())
    roots: set[tuple[str, bytes, bytes]] = set()
    got = [env.verify_receipt(f, lambda _n: [key], roots=roots) for f in frames]  # type: ignore[list-item]
    assert got == fields and key.calls == 1 and len(roots) == 1


def uuid_of(i: int) -> str:
    return f"00000000-0000-4000-8000-{i:012x}"


def v2_parts(frame: bytes) -> tuple[bytes, int, int, list[bytes], bytes]:
    (n,) = struct.unpack_from(">I", frame, 4)
    raw = frame[8 : 8 + n]
    index, count = struct.unpack_from(">II", frame, 8 + n)
    depth = frame[16 + n]
    path = [frame[17 + n + 32 * k : 17 + n + 32 * (k + 1)] for k in range(depth)]
    return raw, index, count, path, frame[-64:]


def v2_frame(raw: bytes, index: int, count: int, path: list[bytes], sig: bytes) -> bytes:
    return b"".join(
        (b"HTR2", u32(len(raw)), raw, u32(index), u32(count), bytes([len(path)]), *path, sig)
    )


def test_a_batch_receipt_cannot_be_bent() -> None:
    """A wrong sibling, a swapped leaf, another position, another count, a root signed by
    another key, and a receipt for packet X edited into one for packet Y all fail."""
    keys = lambda _n: [RECEIVER.public_key()]  # noqa: E731
    fields = [receipt_fields(packet=uuid_of(i)) for i in range(5)]
    frames = env.sign_receipts(fields, RECEIVER)
    raw, index, count, path, sig = v2_parts(frames[1])
    assert (index, count, len(path)) == (1, 5, 3)
    bent = [bytes(32)] + path[1:]
    with pytest.raises(BadSignature):
        env.verify_receipt(v2_frame(raw, index, count, bent, sig), keys)
    other_raw = v2_parts(frames[2])[0]  # leaf 2 with leaf 1's path
    with pytest.raises(BadSignature):
        env.verify_receipt(v2_frame(other_raw, index, count, path, sig), keys)
    with pytest.raises(BadSignature):  # leaf 1 claiming position 0 (same path length)
        env.verify_receipt(v2_frame(raw, 0, count, path, sig), keys)
    with pytest.raises(BadSignature):  # the count is signed: 6 leaves have the same depth
        env.verify_receipt(v2_frame(raw, index, 6, path, sig), keys)
    # packet X into packet Y: the JSON is what the leaf hashes
    y = canonical({**fields[1], "packet": uuid_of(99)})
    with pytest.raises(BadSignature):
        env.verify_receipt(v2_frame(y, index, count, path, sig), keys)
    # a root the receiver never signed: another member's key, the receipt naming the receiver
    forged = env.sign_receipts(fields, SIGN)
    with pytest.raises(BadSignature):
        env.verify_receipt(forged[0], keys)
    # the v1 signature of a receipt is no v2 signature of a one-leaf batch (and back)
    v1 = env.sign_receipt(fields[0], RECEIVER)
    raw0 = canonical(fields[0])
    with pytest.raises(BadSignature):
        env.verify_receipt(v2_frame(raw0, 0, 1, [], v1[-64:]), keys)
    one = env.sign_receipts([fields[0]], RECEIVER)[0]
    with pytest.raises(BadSignature):
        env.verify_receipt(b"HTR1" + u32(len(raw0)) + raw0 + one[-64:], keys)
    # a node hash posing as a leaf: the two children of the root as one 'receipt' is not JSON,
    # and a leaf hash is never a node hash (0x00 vs 0x01 prefixes)
    leaves = [env.leaf_hash(canonical(f)) for f in fields]
    assert mth(leaves[:2]) != env.leaf_hash(leaves[0] + leaves[1])
    # a verified root in the roots set does not vouch for a bent path
    roots: set[tuple[str, bytes, bytes]] = set()
    env.verify_receipt(frames[1], keys, roots=roots)
    with pytest.raises(BadSignature):
        env.verify_receipt(v2_frame(y, index, count, path, sig), keys, roots=roots)


def test_a_malformed_batch_receipt_is_refused_before_any_key() -> None:
    def no_keys(node: str) -> list[Any]:
        raise AssertionError("no key may be looked up for a malformed receipt")

    fields = [receipt_fields(packet=uuid_of(i)) for i in range(3)]
    frame = env.sign_receipts(fields, RECEIVER)[0]
    raw, index, count, path, sig = v2_parts(frame)
    for cut in range(len(frame)):
        with pytest.raises((MalformedPacket, PacketTooLarge)):
            env.verify_receipt(frame[:cut], no_keys)
    bad = [
        frame + b"\x00",  # trailing byte
        v2_frame(raw, index, 0, path, sig),  # no leaves
        v2_frame(raw, 3, count, path, sig),  # index past the count
        v2_frame(raw, index, count, path[:-1], sig),  # path too short for 0 of 3
        v2_frame(raw, index, count, path + [bytes(32)], sig),  # too long
        v2_frame(raw, index, env.MAX_RECEIPT_BATCH + 1, path, sig),
        v2_frame(raw, index, count, [bytes(32)] * 33, sig),  # over MAX_PATH
        v2_frame(b'{"packet":1}', index, count, path, sig),  # not a receipt
        v2_frame(b'{ "a": 1 }', index, count, path, sig),  # not canonical
    ]
    for data in bad:
        with pytest.raises(MalformedPacket):
            env.verify_receipt(data, no_keys)
    with pytest.raises(PacketTooLarge):
        env.verify_receipt(b"HTR2" + u32(1 << 30) + bytes(100), no_keys)
    assert env.receipt_fields(frame) == fields[0]  # structure only, no key
    with pytest.raises(MalformedPacket):
        env.receipt_fields(bad[0])


def test_sign_receipts_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="1-65536"):
        env.sign_receipts([], RECEIVER)
    with pytest.raises(ValueError, match="field 'status'"):
        env.sign_receipts([receipt_fields(), receipt_fields(status="maybe")], RECEIVER)


def test_a_batch_of_v2_receipts_travels_like_v1_ones() -> None:
    items = [seal(b"one"), *env.sign_receipts([receipt_fields()] * 2, RECEIVER)]
    out = env.decode_batch(env.encode_batch(items), max_total=1 << 20)
    assert out == items
    assert [env.frame_kind(i) for i in out] == ["packet", "receipt", "receipt"]
