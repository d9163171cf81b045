"""Anchors: the audit chain's signed head, kept where deleting the database cannot reach it.

Signed checkpoints in the node's own database catch a cut-off tail only while they survive;
whoever deletes the last rows can delete their checkpoints too (or the whole ``node.db``). So
each signed checkpoint, once committed, is also written as an *anchor*:

* locally, ``<data_dir>/audit-anchor.json`` (0600, written to a temporary file, fsynced, renamed,
  the folder fsynced; only ever moved forward), checked at every start: a store younger than
  its anchor refuses to start (``HT-AUDIT-ANCHOR``) until IT accepts a deliberate restore
  (``hutong audit accept-restore``, audited);
* at peers: the node's latest anchor rides in the signed receipts it returns (the additive
  ``anchor`` receipt field, ``docs/envelope.md``); each sender keeps the highest one per peer
  (table ``peer_anchor``) and exports it with ``hutong audit anchor-export --peer ID``, which
  ``hutong audit verify --anchor FILE`` checks the peer's own chain against.

An anchor is the checkpoint itself (node, seq, hash, time, key id, Ed25519 signature over
``chain.checkpoint_message``): whoever holds it needs no trust in the holder, only the node's
public key.
"""

from __future__ import annotations

import base64
import fcntl
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import Connection, func, select

from .tables import AuditRecord

ANCHOR_NAME = "audit-anchor.json"
#: version of the anchor object (in the file, in receipts, in exports); unknown versions are
#: ignored by receivers and refused by ``verify --anchor``
ANCHOR_VERSION = 1
_KEYS = ("v", "node", "seq", "hash", "at", "key_id", "signature")
_audit = AuditRecord.__table__  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class Anchor:
    node: str
    seq: int
    hash: str
    at: str  # chain.instant() of the checkpoint time, exactly as signed
    key_id: str
    signature: str  # base64 Ed25519 signature over chain.checkpoint_message(...)

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": ANCHOR_VERSION,
            "node": self.node,
            "seq": self.seq,
            "hash": self.hash,
            "at": self.at,
            "key_id": self.key_id,
            "signature": self.signature,
        }

    @classmethod
    def from_dict(cls, d: Any) -> Anchor:
        """Shape checks only (the signature is checked by ``verifies``); ValueError names the
        field, never echoes a value."""
        if not isinstance(d, dict):
            raise ValueError("an anchor is a JSON object")
        missing = [k for k in _KEYS if k not in d]
        if missing:
            raise ValueError(f"anchor is missing field(s) {', '.join(missing)}")
        if d["v"] != ANCHOR_VERSION or type(d["v"]) is not int:
            raise ValueError(f"anchor version must be {ANCHOR_VERSION}")
        if type(d["seq"]) is not int or d["seq"] < 1:
            raise ValueError("anchor field 'seq' must be a positive integer")
        for k in ("node", "hash", "at", "key_id", "signature"):
            if not isinstance(d[k], str) or not d[k] or len(d[k]) > 256:
                raise ValueError(f"anchor field '{k}' must be a string of 1-256 characters")
        if len(d["hash"]) != 64 or any(c not in "0123456789abcdef" for c in d["hash"]):
            raise ValueError("anchor field 'hash' must be 64 lowercase hex digits")
        return cls(d["node"], d["seq"], d["hash"], d["at"], d["key_id"], d["signature"])

    def message(self) -> bytes:
        return f"{self.node}|{self.seq}|{self.hash}|{self.at}".encode()

    def verifies(self, keys: Sequence[Ed25519PublicKey]) -> bool:
        try:
            sig = base64.b64decode(self.signature, validate=True)
        except ValueError:
            return False
        for key in keys:
            try:
                key.verify(sig, self.message())
                return True
            except (InvalidSignature, ValueError):
                continue
        return False


def from_checkpoint(node_id: str, cp: Any) -> Anchor:
    from .events import instant

    at = cp.at if cp.at.tzinfo is not None else cp.at.replace(tzinfo=UTC)
    return Anchor(node_id, int(cp.seq), cp.hash, instant(at), cp.key_id, cp.signature)


def load(raw: bytes) -> Anchor:
    """An anchor from exported/file bytes (extra fields such as ``held_by`` are ignored)."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ValueError("not JSON") from None
    return Anchor.from_dict(data)


class AnchorFile:
    """``<data_dir>/audit-anchor.json``: moved forward only, atomically, durably, 0600."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def read(self) -> Anchor | None:
        """None if there is no file; ValueError if it is there but unreadable."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        return load(raw)

    def advance(self, anchor: Anchor) -> bool:
        """Write ``anchor`` if it is ahead of the file's (several processes may share a data
        folder's file: the check and the write hold an exclusive lock). True if written."""
        return self._write(anchor, force=False)

    def replace(self, anchor: Anchor) -> None:
        """Overwrite whatever is there (only ``hutong audit accept-restore`` does this)."""
        self._write(anchor, force=True)

    def _write(self, anchor: Anchor, *, force: bool) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            fd = os.open(
                self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600
            )
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                if not force:
                    try:
                        current = self.read()
                    except ValueError:
                        current = None  # an unreadable file is replaced by a good one
                    if current is not None and current.seq >= anchor.seq:
                        return False
                _atomic_write(
                    self.path, orjson.dumps(anchor.to_dict(), option=orjson.OPT_SORT_KEYS) + b"\n"
                )
                return True
            finally:
                os.close(fd)  # releases the flock


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def head(conn: Connection) -> tuple[int, str | None]:
    row = conn.execute(
        select(_audit.c.seq, _audit.c.hash).order_by(_audit.c.seq.desc()).limit(1)
    ).first()
    return (int(row[0]), row[1]) if row else (0, None)


def problem(conn: Connection, anchor: Anchor, source: str) -> tuple[int, str] | None:
    """(first bad seq, one-line reason) if the chain in ``conn`` does not hold ``anchor``'s row
    with its hash; None if it does. ``source`` names where the anchor came from."""
    row = conn.execute(select(_audit.c.hash).where(_audit.c.seq == anchor.seq)).first()
    if row is None:
        last, _ = head(conn)
        if last < anchor.seq:
            gap = f"{last + 1}" if last + 1 == anchor.seq else f"{last + 1}..{anchor.seq}"
            ends = "the log is empty" if last == 0 else f"the log ends at seq {last}"
            return last + 1, (
                f"truncated: {source} records seq {anchor.seq} (hash "
                f"{anchor.hash[:16]}) but {ends}, row(s) {gap} missing"
            )
        return anchor.seq, f"seq {anchor.seq}: row missing, {source} records it"
    if row.hash != anchor.hash:
        return anchor.seq, (
            f"seq {anchor.seq}: hash differs from {source}'s (store replaced or rewritten)"
        )
    return None


def row_count(conn: Connection) -> int:
    return int(conn.execute(select(func.count()).select_from(_audit)).scalar() or 0)


def superseded_name(now: datetime | None = None) -> str:
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    return f"audit-anchor.superseded-{stamp}.json"


# -- anchors held for peers ---------------------------------------------------------------------


def keep_from_receipts(
    conn: Connection, directory: Any, receipts: Sequence[Any], now: datetime
) -> list[Any]:
    """Keep the highest anchor each receipt signer showed (inside the caller's transaction).

    ``receipts``: verified receipt field dicts (others are skipped). An anchor must be of the
    receipt's signer and verify with its directory keys; an unknown version or a bad one is
    ignored (an old or a broken peer must not stop delivery). An anchor behind the one kept,
    or with another hash at the same seq, means the peer's chain went back: audited once per
    such anchor (returned as AuditEntry rows for the caller's append).
    """
    from .events import AuditEntry
    from .tables import PeerAnchor

    table = PeerAnchor.__table__  # type: ignore[attr-defined]
    shown: dict[str, set[Anchor]] = {}
    for fields in receipts:
        if not isinstance(fields, dict) or not isinstance(fields.get("anchor"), dict):
            continue
        try:
            a = Anchor.from_dict(fields["anchor"])
        except ValueError:
            continue
        if a.node == fields.get("receiver"):
            shown.setdefault(a.node, set()).add(a)
    entries: list[Any] = []
    for node, candidates in shown.items():
        member = directory.get(node)
        if member is None:
            continue
        # the highest that verifies (a batch's receipts mostly carry one and the same)
        best = next(
            (
                c
                for c in sorted(candidates, key=lambda c: -c.seq)
                if c.verifies(member.signing_keys)
            ),
            None,
        )
        if best is None:
            continue
        a = best
        row = conn.execute(select(table).where(table.c.node == node)).first()
        values = {
            "seq": a.seq,
            "hash": a.hash,
            "at": a.at,
            "key_id": a.key_id,
            "signature": a.signature,
            "received_at": now,
        }
        if row is None:
            conn.execute(table.insert().values(node=node, **values))
        elif a.seq > row.seq:
            conn.execute(table.update().where(table.c.node == node).values(**values))
        elif (a.seq < row.seq or a.hash != row.hash) and row.regressed != f"{a.seq}:{a.hash}":
            conn.execute(
                table.update().where(table.c.node == node).values(regressed=f"{a.seq}:{a.hash}")
            )
            entries.append(
                AuditEntry(
                    action="peer-anchor",
                    outcome="8",
                    peer=node,
                    at=now,
                    code="HT-AUDIT-ANCHOR",
                    message=f"{node}'s audit chain went back: it now shows seq {a.seq} (hash "
                    f"{a.hash[:16]}), it showed seq {row.seq} (hash {row.hash[:16]})",
                    extra={
                        "held_seq": str(row.seq),
                        "held_hash": row.hash,
                        "shown_seq": str(a.seq),
                        "shown_hash": a.hash,
                    },
                )
            )
    return entries


def held_for(conn: Connection, node: str) -> dict[str, Any] | None:
    """The anchor kept for ``node``, as exported (the anchor plus who holds it and since when)."""
    from .events import instant
    from .tables import PeerAnchor

    table = PeerAnchor.__table__  # type: ignore[attr-defined]
    row = conn.execute(select(table).where(table.c.node == node)).first()
    if row is None:
        return None
    a = Anchor(row.node, int(row.seq), row.hash, row.at, row.key_id, row.signature)
    received = row.received_at if row.received_at.tzinfo else row.received_at.replace(tzinfo=UTC)
    return {**a.to_dict(), "received_at": instant(received)}
