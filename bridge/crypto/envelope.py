"""Packet envelope: signed frames whose body only the recipient can open.

Frame: ``HTP1 | u32 | header | u32 | ciphertext | sig(64) [| RLY1 | u32 | stamp | sig(64)]``.
The header is visible (relays route on it) but signed and bound to the body as AES-GCM AAD;
the body is sealed to the recipient's X25519 key with a fresh ephemeral key per packet
(docs/envelope.md explains the construction and the reasons behind it). Receipts come in two
frames: ``HTR1`` (one signature each) and ``HTR2`` (one signature over a Merkle root of a whole
answer batch, each receipt carrying its path, so each still verifies alone)."""

from __future__ import annotations

import hashlib
import os
import re
import struct
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, cast

import orjson
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from bridge.crypto.keys import b64, key_id, unb64
from bridge.errors import (
    BadSignature,
    DecryptFailed,
    DigestMismatch,
    HutongError,
    MalformedPacket,
    PacketTooLarge,
)

VERSION = 1
SUITE = "X25519-HKDF-SHA256-A256GCM/Ed25519"
MAGIC_PACKET, MAGIC_RECEIPT, MAGIC_BATCH, MAGIC_RELAY = b"HTP1", b"HTR1", b"HTB1", b"RLY1"
MAGIC_RECEIPT_BATCH = b"HTR2"
SIG_LEN, TAG_LEN, NONCE_LEN, KEY_LEN = 64, 16, 12, 32
MAX_HEADER = 16 * 1024  # a real header is ~600 bytes; never parse megabytes of JSON
MAX_STAMP, MAX_RECEIPT = 4 * 1024, 64 * 1024
MAX_TEXT = 256  # sender, recipient, kind, thread, relay are identifiers, not free text
RECEIPT_STATUSES = ("accepted", "relayed", "refused")
CTX_PACKET, CTX_RELAY = b"hutong/v1/packet\x00", b"hutong/v1/relay\x00"
CTX_RECEIPT, HKDF_INFO = b"hutong/v1/receipt\x00", b"hutong/v1/body"
CTX_RECEIPT_BATCH = b"hutong/v2/receipt-batch\x00"
#: HTR2: receipts under one root (more than any answer batch holds), and the longest path
MAX_RECEIPT_BATCH, MAX_PATH = 1 << 16, 32
_LEAF, _NODE = b"\x00", b"\x01"  # RFC 6962 prefixes: a leaf hash can never pose as a node

_U32 = struct.Struct(">I")
_SORTED = orjson.OPT_SORT_KEYS
_SHA256 = hashes.SHA256()
_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z")
_NAMES = {
    MAGIC_PACKET: "packet",
    MAGIC_RECEIPT: "receipt",
    MAGIC_RECEIPT_BATCH: "receipt",
    MAGIC_BATCH: "batch",
    MAGIC_RELAY: "relay stamp",
}


@dataclass(frozen=True, slots=True)
class Header:
    """Routing and integrity facts of a packet: signed by the sender, readable by relays."""

    v: int
    id: str
    sender: str
    recipient: str
    kind: str
    created_at: datetime
    thread: str
    seq: int
    digest: str
    size: int
    suite: str
    epk: bytes  # raw 32-byte ephemeral X25519 public key (base64 on the wire)
    nonce: bytes  # raw 12-byte AES-GCM nonce (base64 on the wire)
    sig_key: str
    enc_key: str
    raw: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class RelayStamp:
    """A platform's signed note that it forwarded this exact packet, and when."""

    relay: str
    relayed_at: datetime
    packet: str
    sig_key: str
    raw: bytes = field(repr=False)
    signature: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class Packet:
    """A decoded frame: structure checked, signature not yet verified, body still sealed."""

    header: Header
    header_bytes: bytes = field(repr=False)
    ciphertext: bytes = field(repr=False)
    signature: bytes = field(repr=False)
    relay: RelayStamp | None
    frame: bytes = field(repr=False)

    @property
    def signed_part(self) -> bytes:
        """Exactly the bytes the sender's Ed25519 signature covers."""
        hb = self.header_bytes
        return b"".join((CTX_PACKET, _U32.pack(len(hb)), hb, self.ciphertext))

    @property
    def unstamped(self) -> bytes:
        """The frame as the sender made it, without any relay stamp."""
        return self.frame[: 12 + len(self.header_bytes) + len(self.ciphertext) + SIG_LEN]


def _re(pattern: str) -> Callable[[Any], bool]:
    rx = re.compile(pattern)
    return lambda v: isinstance(v, str) and rx.fullmatch(v) is not None


# Field checks shared by seal, decode, stamps and receipts: (test, what it must be).
_IS_TEXT = (_re(rf"(?s).{{1,{MAX_TEXT}}}"), f"a string of 1-{MAX_TEXT} characters")
_IS_UUID = (
    _re("[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"),
    "a lowercase hyphenated UUID",
)  # canonical form only: one spelling per packet id
_IS_TIME = (lambda v: _time(v) is not None, "an RFC 3339 UTC time like 2025-01-31T08:00:00.000Z")
_IS_KEY_ID = (_re("k[0-9a-f]{16}"), "a key id like k0123456789abcdef")
_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "v": (lambda v: type(v) is int and v == VERSION, "1, the only supported version"),
    "id": _IS_UUID,
    "packet": _IS_UUID,
    "created_at": _IS_TIME,
    "relayed_at": _IS_TIME,
    "sender": _IS_TEXT,
    "recipient": _IS_TEXT,
    "kind": _IS_TEXT,
    "relay": _IS_TEXT,
    "receiver": _IS_TEXT,
    "at": _IS_TEXT,
    "thread": (_re(rf"(?s).{{0,{MAX_TEXT}}}"), f"a string of 0-{MAX_TEXT} characters"),
    "seq": (lambda v: type(v) is int and 0 <= v < 1 << 63, "a non-negative integer"),
    "size": (lambda v: type(v) is int and 0 <= v < 1 << 32, "a non-negative integer"),
    "digest": (_re("[0-9a-f]{64}"), "64 lowercase hex digits"),
    "suite": (lambda v: v == SUITE, f"{SUITE}, the only supported suite"),
    "epk": (lambda v: len(unb64(v)) == KEY_LEN, f"{KEY_LEN} bytes of base64"),
    "nonce": (lambda v: len(unb64(v)) == NONCE_LEN, f"{NONCE_LEN} bytes of base64"),
    "sig_key": _IS_KEY_ID,
    "enc_key": _IS_KEY_ID,
    "status": (lambda v: v in RECEIPT_STATUSES, "accepted, relayed or refused"),
}
_HEADER_KEYS = (
    "v",
    "id",
    "sender",
    "recipient",
    "kind",
    "created_at",
    "thread",
    "seq",
    "digest",
    "size",
    "suite",
    "epk",
    "nonce",
    "sig_key",
    "enc_key",
)
_STAMP_KEYS = ("relay", "relayed_at", "packet", "sig_key")
_RECEIPT_KEYS = (
    "packet",
    "sender",
    "recipient",
    "receiver",
    "status",
    "code",
    "message",
    "at",
    "digest",
)
_RECEIPT_NULLABLE = ("packet", "sender", "recipient", "code", "message", "digest")


def _problem(d: dict[str, Any], names: Sequence[str]) -> str | None:
    """First field of ``names`` failing its check, as one line (the value is never echoed)."""
    for name in names:
        ok, what = _CHECKS[name]
        if not ok(d[name]):
            return f"field '{name}' must be {what}"
    return None


def body_digest(body: bytes) -> str:
    """Hex sha256 of a plaintext body: names the content for dedup without revealing it."""
    return hashlib.sha256(body).hexdigest()


def seal(
    body: bytes,
    *,
    sender: str,
    recipient: str,
    kind: str,
    thread: str,
    seq: int,
    signing_key: Ed25519PrivateKey,
    recipient_key: X25519PublicKey,
    packet_id: str | None = None,
    created_at: datetime | None = None,
    ephemeral_key: X25519PrivateKey | None = None,
    nonce: bytes | None = None,
) -> bytes:
    """Encrypt ``body`` to the recipient and sign; returns the frame. The optional arguments
    pin random values (test vectors); bad arguments are the caller's bug: ValueError."""
    nonce = os.urandom(NONCE_LEN) if nonce is None else nonce
    eph = X25519PrivateKey.generate() if ephemeral_key is None else ephemeral_key
    epk, rpk = eph.public_key().public_bytes_raw(), recipient_key.public_bytes_raw()
    fields = {
        "v": VERSION,
        "id": str(uuid.uuid4()) if packet_id is None else packet_id,
        "sender": sender,
        "recipient": recipient,
        "kind": kind,
        "created_at": format_time(created_at or datetime.now(UTC)),
        "thread": thread,
        "seq": seq,
        "digest": hashlib.sha256(body).hexdigest(),
        "size": len(body),
        "suite": SUITE,
        "epk": b64(epk),
        "nonce": b64(nonce),
        "sig_key": key_id(signing_key.public_key().public_bytes_raw()),
        "enc_key": key_id(rpk),
    }
    problem = _problem(fields, ("id", "sender", "recipient", "kind", "thread", "seq", "nonce"))
    if problem:
        raise ValueError(problem)
    header = orjson.dumps(fields, option=_SORTED)
    key = _body_key(eph.exchange(recipient_key), epk, rpk)
    ciphertext = AESGCM(key).encrypt(nonce, body, header)
    hlen = _U32.pack(len(header))
    signature = signing_key.sign(b"".join((CTX_PACKET, hlen, header, ciphertext)))
    return b"".join((MAGIC_PACKET, hlen, header, _U32.pack(len(ciphertext)), ciphertext, signature))


def _body_key(shared: bytes, epk: bytes, rpk: bytes) -> bytes:
    """Salt binds the key to both public keys, so one shared secret never serves two pairs."""
    return HKDF(_SHA256, KEY_LEN, epk + rpk, HKDF_INFO).derive(shared)


def decode(frame: bytes, *, max_body: int) -> Packet:
    """Split and check a frame without any key; every length is judged before it is used."""
    frame = frame if isinstance(frame, bytes) else bytes(frame)
    _magic(frame, MAGIC_PACKET)
    header_raw, pos = _chunk(frame, 4, "packet header", min(max_body, MAX_HEADER), PacketTooLarge)
    ciphertext, pos = _chunk(
        frame,
        pos,
        "packet body",
        max_body + TAG_LEN,
        PacketTooLarge,
        extra=SIG_LEN,
        overhead=TAG_LEN,
    )
    if len(ciphertext) < TAG_LEN:
        raise MalformedPacket(f"packet ciphertext is {len(ciphertext)} bytes, shorter than a tag")
    d = _object(header_raw, "packet header", _HEADER_KEYS)
    d.update(created_at=_time(d["created_at"]), epk=unb64(d["epk"]), nonce=unb64(d["nonce"]))
    end = pos + SIG_LEN
    relay = _stamp(frame, end) if len(frame) > end else None
    return Packet(
        header=Header(**d, raw=header_raw),
        header_bytes=header_raw,
        ciphertext=ciphertext,
        signature=frame[pos:end],
        relay=relay,
        frame=frame,
    )


def _stamp(frame: bytes, pos: int) -> RelayStamp:
    if frame[pos : pos + 4] != MAGIC_RELAY:
        raise MalformedPacket(f"{len(frame) - pos} unexpected bytes after the packet signature")
    raw, end = _chunk(frame, pos + 4, "relay stamp", MAX_STAMP, MalformedPacket, SIG_LEN, last=True)
    d = _object(raw, "relay stamp", _STAMP_KEYS)
    d["relayed_at"] = _time(d["relayed_at"])
    return RelayStamp(**d, raw=raw, signature=frame[end:])


def verify(packet: Packet, signing_keys: Sequence[Ed25519PublicKey]) -> None:
    """Pass if any of the sender's keys signed the packet (current and next, during rollover)."""
    h = packet.header
    _verify_any(
        signing_keys,
        h.sig_key,
        packet.signature,
        packet.signed_part,
        f"packet {h.id} signature does not verify with any of the {len(signing_keys)} "
        f"key(s) of '{h.sender}' (signed with {h.sig_key})",
    )


def open_body(packet: Packet, encryption_keys: Sequence[X25519PrivateKey]) -> bytes:
    """Decrypt and check the body; the key the header names is tried first, then the others."""
    h = packet.header
    epk = X25519PublicKey.from_public_bytes(h.epk)
    pairs = [(k, k.public_key().public_bytes_raw()) for k in encryption_keys]
    pairs.sort(key=lambda p: key_id(p[1]) != h.enc_key)
    for priv, rpk in pairs:
        try:
            shared = priv.exchange(epk)
        except ValueError:  # all-zero shared secret: a low-order ephemeral point
            raise DecryptFailed(f"packet {h.id} has an unusable ephemeral key") from None
        try:
            body = AESGCM(_body_key(shared, h.epk, rpk)).decrypt(
                h.nonce, packet.ciphertext, packet.header_bytes
            )
        except InvalidTag:
            continue
        if len(body) != h.size:
            raise DigestMismatch(f"packet {h.id} body is {len(body)} bytes, header says {h.size}")
        if hashlib.sha256(body).hexdigest() != h.digest:
            raise DigestMismatch(f"packet {h.id} body does not match the header digest")
        return body
    raise DecryptFailed(
        f"packet {h.id} does not open with any of this node's "
        f"{len(pairs)} encryption key(s) (sealed to {h.enc_key})"
    )


def stamp_relay(
    packet: Packet, *, relay_id: str, signing_key: Ed25519PrivateKey, now: datetime | None = None
) -> bytes:
    """Frame to forward, with a fresh relay stamp (an older one dropped); the body stays sealed."""
    fields = {
        "relay": relay_id,
        "relayed_at": format_time(now or datetime.now(UTC)),
        "packet": packet.header.id,
        "sig_key": key_id(signing_key.public_key().public_bytes_raw()),
    }
    problem = _problem(fields, ("relay",))
    if problem:
        raise ValueError(problem)
    stamp = orjson.dumps(fields, option=_SORTED)
    sig = signing_key.sign(b"".join((CTX_RELAY, stamp, packet.signature)))
    return b"".join((packet.unstamped, MAGIC_RELAY, _U32.pack(len(stamp)), stamp, sig))


def verify_relay(packet: Packet, signing_keys: Sequence[Ed25519PublicKey]) -> None:
    """Check the stamp names this very packet and was signed by one of the relay's keys."""
    s, pid = packet.relay, packet.header.id
    if s is None:
        raise BadSignature(f"packet {pid} has no relay stamp")
    if s.packet != pid:
        raise BadSignature(f"relay stamp names packet {s.packet}, not {pid}")
    _verify_any(
        signing_keys,
        s.sig_key,
        s.signature,
        b"".join((CTX_RELAY, s.raw, packet.signature)),
        f"relay stamp of packet {pid} does not verify with any of the "
        f"{len(signing_keys)} key(s) of relay '{s.relay}'",
    )


def sign_receipt(fields: dict[str, Any], signing_key: Ed25519PrivateKey) -> bytes:
    """``HTR1 | u32 | json | sig(64)``: the receiver's signed word on what it did with a packet."""
    raw = _receipt_json(fields)
    sig = signing_key.sign(CTX_RECEIPT + raw)
    return b"".join((MAGIC_RECEIPT, _U32.pack(len(raw)), raw, sig))


def sign_receipts(batch: Sequence[dict[str, Any]], signing_key: Ed25519PrivateKey) -> list[bytes]:
    """``HTR2 | u32 | json | u32 index | u32 count | u8 n | n * 32 | sig(64)`` for each receipt
    of one answer batch: one signature over the Merkle root (RFC 6962 tree) of their JSON, and
    in each frame its audit path, so each receipt still verifies alone wherever it goes."""
    if not 1 <= len(batch) <= MAX_RECEIPT_BATCH:
        raise ValueError(f"a receipt batch holds 1-{MAX_RECEIPT_BATCH} receipts, not {len(batch)}")
    raws = [_receipt_json(f) for f in batch]
    root, paths = _tree([leaf_hash(raw) for raw in raws])
    count = _U32.pack(len(raws))
    sig = signing_key.sign(b"".join((CTX_RECEIPT_BATCH, count, root)))
    return [
        b"".join(
            (MAGIC_RECEIPT_BATCH, _U32.pack(len(raw)), raw, _U32.pack(i), count)
            + (bytes((len(path),)), *path, sig)
        )
        for i, (raw, path) in enumerate(zip(raws, paths, strict=True))
    ]


def verify_receipt(
    data: bytes,
    keys_for: Callable[[str], Sequence[Ed25519PublicKey]],
    *,
    roots: set[tuple[str, bytes, bytes]] | None = None,
) -> dict[str, Any]:
    """Check a receipt (``HTR1`` or ``HTR2``) with the keys of the node it names as receiver;
    returns its fields. Whatever ``keys_for`` raises for an unknown node (e.g. UnknownSender)
    propagates. ``roots``: a set the caller keeps across the receipts of one answer batch (and
    one ``keys_for``): a batch root whose signature verified once is not verified again."""
    fields, message, sig = _open_receipt(data if isinstance(data, bytes) else bytes(data))
    keys = keys_for(fields["receiver"])
    seen = (fields["receiver"], message, sig)
    if roots is not None and seen in roots:
        return fields
    _verify_any(
        keys,
        None,
        sig,
        message,
        f"receipt for packet {fields['packet']} does not verify with any key of "
        f"'{fields['receiver']}'",
    )
    if roots is not None and message.startswith(CTX_RECEIPT_BATCH):
        roots.add(seen)
    return fields


def receipt_fields(data: bytes) -> dict[str, Any]:
    """The fields of a receipt frame, its structure checked but NOT its signature: only for
    a node's own stored receipts (to sign their fields again as ``HTR1``), never a peer's."""
    return _open_receipt(data if isinstance(data, bytes) else bytes(data))[0]


def _open_receipt(data: bytes) -> tuple[dict[str, Any], bytes, bytes]:
    """A receipt frame's fields, the message its signature covers, and the signature."""
    if data[:4] == MAGIC_RECEIPT_BATCH:
        raw, pos = _chunk(data, 4, "receipt", MAX_RECEIPT, PacketTooLarge, extra=9)
        index, count = _U32.unpack_from(data, pos)[0], _U32.unpack_from(data, pos + 4)[0]
        n = data[pos + 8]
        if not 0 < count <= MAX_RECEIPT_BATCH or index >= count:
            raise MalformedPacket(f"receipt batch position {index} of {count} is impossible")
        if n > MAX_PATH:
            raise MalformedPacket(f"receipt path has {n} hashes, limit {MAX_PATH}")
        at = pos + 9 + 32 * n
        if len(data) != at + SIG_LEN:
            raise MalformedPacket(
                f"receipt is {len(data)} bytes, its path and signature make {at + SIG_LEN}"
            )
        fields = _object(raw, "receipt", _RECEIPT_KEYS, _receipt_problem)
        path = [data[i : i + 32] for i in range(pos + 9, at, 32)]
        root = merkle_root(leaf_hash(raw), index, count, path)
        return fields, b"".join((CTX_RECEIPT_BATCH, _U32.pack(count), root)), data[at:]
    _magic(data, MAGIC_RECEIPT)
    raw, end = _chunk(data, 4, "receipt", MAX_RECEIPT, PacketTooLarge, SIG_LEN, last=True)
    fields = _object(raw, "receipt", _RECEIPT_KEYS, _receipt_problem)
    return fields, CTX_RECEIPT + raw, data[end:]


def _receipt_json(fields: dict[str, Any]) -> bytes:
    data = dict(fields)
    if isinstance(data.get("at"), datetime):
        data["at"] = format_time(data["at"])
    problem = _receipt_problem(data)
    if problem:
        raise ValueError(f"receipt: {problem}")
    raw = orjson.dumps(data, option=_SORTED)  # orjson.JSONEncodeError is a TypeError
    if len(raw) > MAX_RECEIPT:
        raise ValueError(f"receipt is {len(raw)} bytes, limit {MAX_RECEIPT}")
    return raw


def leaf_hash(raw: bytes) -> bytes:
    """RFC 6962 leaf: sha256(0x00 || receipt JSON)."""
    return hashlib.sha256(_LEAF + raw).digest()


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"".join((_NODE, left, right))).digest()


def _tree(leaves: list[bytes]) -> tuple[bytes, list[list[bytes]]]:
    """RFC 6962 Merkle tree head of ``leaves`` and each leaf's audit path (bottom first):
    the left subtree takes the largest power of two below the count."""
    n = len(leaves)
    if n == 1:
        return leaves[0], [[]]
    k = 1 << ((n - 1).bit_length() - 1)
    left, lpaths = _tree(leaves[:k])
    right, rpaths = _tree(leaves[k:])
    return _node(left, right), [p + [right] for p in lpaths] + [p + [left] for p in rpaths]


def merkle_root(leaf: bytes, index: int, count: int, path: Sequence[bytes]) -> bytes:
    """The root a leaf's audit path leads to (RFC 9162, 2.1.3.2): the index and count say
    which side each sibling is on and how long the path must be; any other length is
    MalformedPacket. (A wrong sibling gives another root: the signature then fails.)"""
    fn, sn, r = index, count - 1, leaf
    for p in path:
        if sn == 0:
            raise MalformedPacket(f"receipt path is longer than position {index} of {count} has")
        if fn & 1 or fn == sn:
            r = _node(p, r)
            while not fn & 1 and fn:
                fn, sn = fn >> 1, sn >> 1
        else:
            r = _node(r, p)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:
        raise MalformedPacket(f"receipt path is shorter than position {index} of {count} needs")
    return r


def _receipt_problem(d: dict[str, Any]) -> str | None:
    missing = [k for k in _RECEIPT_KEYS if k not in d]
    if missing:
        return f"missing field(s) {', '.join(missing)}"
    bad = [k for k in _RECEIPT_NULLABLE if not (d[k] is None or isinstance(d[k], str))]
    if bad:
        return f"field '{bad[0]}' must be a string or null"
    return _problem(d, ("receiver", "status", "at"))


def encode_batch(items: Sequence[bytes]) -> bytes:
    """``HTB1 | u32 count | (u32 len | item)*``: many frames in one HTTP round trip."""
    parts = [MAGIC_BATCH, _U32.pack(len(items))]
    for item in items:
        parts += (_U32.pack(len(item)), item)
    return b"".join(parts)


def decode_batch(data: bytes, *, max_items: int = 10_000, max_total: int) -> list[bytes]:
    """Split a batch into frames: framing only, the caller judges each item on its own."""
    if len(data) > max_total:
        raise PacketTooLarge(f"batch is {len(data)} bytes, limit {max_total}")
    data = data if isinstance(data, bytes) else bytes(data)
    _magic(data, MAGIC_BATCH)
    if len(data) < 8:
        raise MalformedPacket(f"batch is truncated: {len(data)} bytes, no item count")
    count = _U32.unpack_from(data, 4)[0]
    if count > max_items:
        raise PacketTooLarge(f"batch has {count} items, limit {max_items}")
    items, pos = [], 8
    for i in range(count):
        item, pos = _chunk(data, pos, f"batch item {i}", max_total, PacketTooLarge)
        items.append(item)
    if pos != len(data):
        raise MalformedPacket(f"{len(data) - pos} unexpected bytes after the {count} batch items")
    return items


def frame_kind(item: bytes) -> Literal["packet", "receipt"]:
    """What a batch item is, told by its magic."""
    kind = _NAMES.get(bytes(item[:4]), "no Hutong frame (bad magic)")
    if kind == "packet" or kind == "receipt":
        return cast(Literal["packet", "receipt"], kind)
    raise MalformedPacket(f"expected a packet or receipt frame, got: {kind}")


def format_time(t: datetime) -> str:
    """RFC 3339 UTC with milliseconds and 'Z': one spelling, so signed bytes are predictable."""
    if t.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware")
    return t.astimezone(UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def _time(value: Any) -> datetime | None:
    """The one spelling ``format_time`` writes, as an aware datetime; None for anything else."""
    try:
        return datetime.fromisoformat(value) if _TIME.fullmatch(value) else None
    except (TypeError, ValueError):  # not a string; or e.g. month 13, second 60
        return None


def _chunk(
    data: bytes,
    pos: int,
    what: str,
    limit: int,
    too_big: type[HutongError],
    extra: int = 0,
    overhead: int = 0,
    last: bool = False,
) -> tuple[bytes, int]:
    """Read ``u32 len | bytes`` at pos, judging the length before anything is sliced. ``extra``
    bytes must follow (all that is left if ``last``); ``overhead`` is left out of messages."""
    if len(data) < pos + 4:
        raise MalformedPacket(f"{what} is truncated: the frame ends before its length")
    n = _U32.unpack_from(data, pos)[0]
    if n > limit:
        raise too_big(f"{what} is {n - overhead} bytes, limit {limit - overhead}")
    end = pos + 4 + n
    if len(data) < end + extra:
        raise MalformedPacket(f"{what} is truncated: {len(data)} bytes, needs {end + extra}")
    if last and len(data) > end + extra:
        raise MalformedPacket(f"{len(data) - end - extra} unexpected bytes after the {what}")
    return data[pos + 4 : end], end


def _verify_any(
    keys: Sequence[Ed25519PublicKey], wanted: str | None, sig: bytes, message: bytes, failure: str
) -> None:
    """Any key that verifies is accepted (rollover); the key named ``wanted`` is tried first."""
    for k in sorted(keys, key=lambda k: key_id(k.public_bytes_raw()) != wanted):
        try:
            return k.verify(sig, message)
        except InvalidSignature:
            pass
    raise BadSignature(failure)


def _magic(data: bytes, magic: bytes) -> None:
    if len(data) < 4:
        raise MalformedPacket(f"{_NAMES[magic]} is truncated: {len(data)} bytes, no magic")
    if data[:4] != magic:
        got = _NAMES.get(data[:4], "no Hutong frame (bad magic)")
        raise MalformedPacket(f"expected a {_NAMES[magic]} frame, got: {got}")


def _object(
    raw: bytes,
    what: str,
    keys: Sequence[str],
    check: Callable[[dict[str, Any]], str | None] | None = None,
) -> dict[str, Any]:
    """Parse canonical JSON (one byte form, no duplicate keys) and check its fields: without
    ``check`` it must have exactly ``keys``, each passing its ``_CHECKS`` test."""
    try:
        d = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise MalformedPacket(f"{what} is not valid UTF-8 JSON") from None
    if not isinstance(d, dict):
        raise MalformedPacket(f"{what} is not a JSON object")
    if orjson.dumps(d, option=_SORTED) != raw:
        raise MalformedPacket(f"{what} is not canonical JSON (sorted keys, no whitespace)")
    missing = [k for k in keys if k not in d]
    if missing:
        raise MalformedPacket(f"{what} is missing field(s) {', '.join(missing)}")
    if check is None and len(d) != len(keys):
        unknown = ", ".join(repr(k[:32]) for k in sorted(set(d) - set(keys))[:3])
        raise MalformedPacket(f"{what} has unknown field(s) {unknown}")
    problem = check(d) if check else _problem(d, keys)
    if problem:
        raise MalformedPacket(f"{what}: {problem}")
    return d
