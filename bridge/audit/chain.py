"""The hash chain: append audit rows inside the caller's transaction, sign checkpoints, verify.

Each row's ``hash = sha256(prev_hash_hex + "\\n" + canonical AuditEvent JSON)`` (genesis prev is
64 zeros), so an edited, deleted or reordered row breaks every later link. Signed checkpoints pin
the head, so a cut-off tail is caught too; deleting the tail *and* its checkpoints is only caught
against a checkpoint held elsewhere (export one off the node).

Concurrency: on PostgreSQL ``append`` takes ``pg_advisory_xact_lock(727274)`` before reading the
head, so writers serialize until the caller commits (READ COMMITTED, the default, is required so
the head read sees the previous writer's rows). On SQLite the caller's transaction must already be
``BEGIN IMMEDIATE``. A duplicate seq from a racing writer surfaces as a transient StoreError.

``append_at_commit`` gathers a transaction's rows and chains them in one ``append`` just before
its commit (``Store.write``'s before-commit hook): the head is read and the PostgreSQL lock taken
once a transaction, and held from its end to its commit only, not from its first audited step
(the results inbox's transaction of a dozen packets held it through all of their writes, and every
other writer of the node, the peer intake first, waited). The rows and their order are those
that appends at each step would have made; ``append`` and ``checkpoint`` chain the rows gathered
so far first, so the chain's order is always the order of the calls.
"""

from __future__ import annotations

import base64
import hashlib
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from sqlalchemy import Connection, insert, select
from sqlalchemy.exc import DBAPIError

from bridge.errors import StoreError
from bridge.store.hooks import after_commit, before_commit

from .anchor import Anchor, AnchorFile, from_checkpoint
from .events import AuditEntry, event_fields, instant, to_audit_event
from .tables import AuditCheckpoint, AuditRecord

GENESIS_HASH = "0" * 64
#: advisory lock id shared by every audit writer on PostgreSQL (transaction-scoped)
ADVISORY_LOCK_ID = 727274
_VERIFY_BATCH = 2000
#: rows a chunk of ``verify_chunked`` checks in one read transaction: ~20 us a row (SQLite, 2
#: cores), so about 40 ms a chunk; the whole run takes as long as one pass did
VERIFY_CHUNK = 2_000

_audit = AuditRecord.__table__  # type: ignore[attr-defined]
_checkpoints = AuditCheckpoint.__table__  # type: ignore[attr-defined]
#: the chain's head (built once: this runs in every audited transaction)
_HEAD = select(_audit.c.seq, _audit.c.hash).order_by(_audit.c.seq.desc()).limit(1)
_APPEND = insert(_audit)
#: the indexed copies that must agree with the hashed AuditEvent JSON
#: where a transaction's gathered rows wait for its commit (on its ``Connection``)
_PENDING = "_hutong_audit_pending"
_COLUMNS = ("action", "outcome", "packet_id", "kind", "peer", "thread", "patient_hash", "actor")
#: what verify reads: the rows after a seq (``.where``), and the checkpoints in a seq range
_ROWS = (
    select(
        _audit.c.seq,
        _audit.c.at,
        *(_audit.c[name] for name in _COLUMNS),
        _audit.c.resource,
        _audit.c.prev_hash,
        _audit.c.hash,
    )
    .order_by(_audit.c.seq)
    .execution_options(yield_per=_VERIFY_BATCH)
)
_CHECKPOINTS = select(_checkpoints).order_by(_checkpoints.c.seq, _checkpoints.c.id)
#: why the row a check continues from fails: confirmed by an earlier run, or by the last chunk
_CONFIRMED = "the row confirmed by the last verification is gone or changed"
_CHANGED = "gone or changed while the chain was being verified"
Keys = Sequence[Ed25519PublicKey]


def canonical(resource: dict[str, Any]) -> bytes:
    """The bytes that are hashed and stored: orjson with sorted keys, UTF-8, no whitespace."""
    return orjson.dumps(resource, option=orjson.OPT_SORT_KEYS)


def link_hash(prev_hash: str, canonical_bytes: bytes) -> str:
    """One chain link: sha256 over the previous hash (hex), a newline, and this row's JSON."""
    return hashlib.sha256(prev_hash.encode() + b"\n" + canonical_bytes).hexdigest()


def key_id(public_key: Ed25519PublicKey) -> str:
    """Short, stable name of a signing key: first 16 hex of sha256 of the raw public key."""
    raw = public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def checkpoint_message(node_id: str, seq: int, hash_: str, at: datetime) -> bytes:
    """What a checkpoint signs; ``at`` goes through ``instant`` so it survives a DB round trip."""
    return f"{node_id}|{seq}|{hash_}|{instant(at)}".encode()


@dataclass(slots=True)
class VerifyResult:
    """Outcome of ``AuditChain.verify``; on failure ``reason`` is one line naming the seq."""

    ok: bool
    checked: int  # rows whose link, hash and columns were confirmed
    first_bad_seq: int | None
    reason: str | None
    last_seq: int  # last confirmed row (0 if none)
    last_hash: str  # its hash (GENESIS_HASH if none)
    checkpoints_checked: int
    #: False only for a chunk (``verify(limit=...)``) that held and stopped before the log's end
    at_end: bool = True


class AuditChain:
    """Appends to and verifies one node's audit chain; holds no connection or state of its own."""

    def __init__(
        self,
        node_id: str,
        signing_key: Ed25519PrivateKey | None,
        checkpoint_every: int = 1000,
        anchor_file: AnchorFile | None = None,
    ) -> None:
        if not node_id:
            raise ValueError("node_id is required")
        if checkpoint_every < 1:
            raise ValueError("checkpoint_every must be at least 1")
        self.node_id = node_id
        self.signing_key = signing_key
        self.checkpoint_every = checkpoint_every
        self._key_id = key_id(signing_key.public_key()) if signing_key else None
        #: where each committed checkpoint is anchored outside the database (anchor.py)
        self.anchor_file = anchor_file
        #: the latest checkpoint this process knows committed (carried in receipts)
        self.latest: Anchor | None = None
        self._latest_lock = threading.Lock()

    # -- writing -----------------------------------------------------------------------------

    def _lock_and_head(self, conn: Connection) -> tuple[int, str]:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({ADVISORY_LOCK_ID})")
        row = conn.execute(_HEAD).first()
        return (row[0], row[1]) if row else (0, GENESIS_HASH)

    def append_at_commit(self, conn: Connection, entries: Sequence[AuditEntry]) -> None:
        """Chain ``entries`` when ``conn``'s transaction is about to commit, with every other
        row it gathered, in one ``append`` (a ``Store.write`` transaction; on any other
        connection they are appended now). A transaction that rolls back chains none."""
        if not entries:
            return
        pending: list[AuditEntry] | None = conn.__dict__.get(_PENDING)
        if pending is None:
            pending = []
            if not before_commit(conn, lambda: self._flush(conn)):
                self.append(conn, entries)
                return
            conn.__dict__[_PENDING] = pending
        pending.extend(entries)

    def _flush(self, conn: Connection) -> None:
        entries = conn.__dict__.pop(_PENDING, None)
        if entries:
            self.append(conn, entries)

    def append(self, conn: Connection, entries: Sequence[AuditEntry]) -> int:
        """Chain ``entries`` onto the log inside the caller's open transaction; returns last seq.

        Does not commit. One executemany for all rows (after the rows ``append_at_commit``
        gathered in this transaction so far); signs a checkpoint at every multiple of
        ``checkpoint_every`` crossed (when a signing key is set).
        """
        pending = conn.__dict__.pop(_PENDING, None)
        if pending:
            entries = [*pending, *entries]
        try:
            seq, prev = self._lock_and_head(conn)
            if not entries:
                return seq
            rows: list[dict[str, Any]] = []
            marks: list[tuple[int, str]] = []
            every = self.checkpoint_every
            for entry in entries:
                seq += 1
                resource = to_audit_event(entry, self.node_id, seq)
                body = canonical(resource)
                digest = link_hash(prev, body)
                rows.append(
                    {
                        "seq": seq,
                        "at": entry.at,
                        "action": entry.action,
                        "outcome": entry.outcome,
                        "packet_id": entry.packet_id,
                        "kind": entry.kind,
                        "peer": entry.peer,
                        "thread": entry.thread,
                        "patient_hash": entry.patient_hash,
                        "actor": entry.actor,
                        "resource": body.decode(),
                        "prev_hash": prev,
                        "hash": digest,
                    }
                )
                if seq % every == 0:
                    marks.append((seq, digest))
                prev = digest
            conn.execute(_APPEND, rows)
            if self.signing_key is not None:
                for mark_seq, mark_hash in marks:
                    self._insert_checkpoint(conn, mark_seq, mark_hash)
            return seq
        except DBAPIError as exc:
            raise StoreError("audit append failed", detail=type(exc.orig).__name__) from exc

    def checkpoint(self, conn: Connection) -> AuditCheckpoint | None:
        """Sign the current head now (shutdown, periodic job); None if no key or empty log.

        Does not commit. If the head already has a checkpoint, that one is returned.
        """
        if self.signing_key is None:
            return None
        self._flush(conn)  # the rows this transaction gathered are part of the head
        try:
            seq, head = self._lock_and_head(conn)
            if seq == 0:
                return None
            existing = conn.execute(
                select(_checkpoints)
                .where(_checkpoints.c.seq == seq, _checkpoints.c.hash == head)
                .order_by(_checkpoints.c.id.desc())
                .limit(1)
            ).first()
            if existing is not None:
                found = AuditCheckpoint(**existing._asdict())
                if found.at.tzinfo is None:  # SQLite keeps no offset; stored as UTC
                    found.at = found.at.replace(tzinfo=UTC)
                anchor = from_checkpoint(self.node_id, found)
                after_commit(conn, lambda: self.committed(anchor))
                return found
            return self._insert_checkpoint(conn, seq, head)
        except DBAPIError as exc:
            raise StoreError("audit checkpoint failed", detail=type(exc.orig).__name__) from exc

    def _insert_checkpoint(self, conn: Connection, seq: int, hash_: str) -> AuditCheckpoint:
        assert self.signing_key is not None and self._key_id is not None
        at = datetime.now(UTC)
        signature = self.signing_key.sign(checkpoint_message(self.node_id, seq, hash_, at))
        values: dict[str, Any] = {
            "seq": seq,
            "hash": hash_,
            "at": at,
            "key_id": self._key_id,
            "signature": base64.b64encode(signature).decode(),
        }
        result = conn.execute(insert(_checkpoints), values)
        pk = result.inserted_primary_key
        assert pk is not None
        cp = AuditCheckpoint(id=pk[0], **values)
        anchor = from_checkpoint(self.node_id, cp)
        after_commit(conn, lambda: self.committed(anchor))
        return cp

    def committed(self, anchor: Anchor) -> None:
        """A checkpoint is durably in the store: remember it for receipts, move the anchor
        file forward (fsynced before this returns)."""
        with self._latest_lock:
            if self.latest is None or anchor.seq >= self.latest.seq:
                self.latest = anchor
        if self.anchor_file is not None:
            self.anchor_file.advance(anchor)

    def receipt_anchor(self) -> dict[str, Any] | None:
        """The ``anchor`` field of the receipts this node signs (None: nothing signed yet)."""
        latest = self.latest
        return latest.to_dict() if latest is not None else None

    def receipt_fields(self) -> dict[str, Any]:
        """What the receipts this node signs gain: ``{"anchor": ...}``, or nothing yet."""
        anchor = self.receipt_anchor()
        return {"anchor": anchor} if anchor is not None else {}

    # -- verifying ---------------------------------------------------------------------------

    def verify(
        self,
        conn: Connection,
        public_keys: Sequence[Ed25519PublicKey] = (),
        *,
        after: tuple[int, str] | None = None,
        limit: int | None = None,
    ) -> VerifyResult:
        """Recompute the whole chain in seq order, streaming; stop at the first problem.

        Checkpoint signatures are checked against ``public_keys`` (all keys the node ever
        used); with none given, against this chain's own signing key; with neither, only the
        checkpoints' seq and hash are compared with the chain.

        ``after=(seq, hash)`` checks only the rows and checkpoints after a row that an earlier
        full run confirmed: the first newer row must link to that hash, so a deleted, edited or
        reordered row from there on is caught, while rows up to ``seq`` are taken as confirmed
        (``checked`` then counts the newer rows only).

        ``limit`` checks at most that many rows after ``after`` (one chunk of
        ``verify_chunked``) and the checkpoints among them; a chunk that holds and stops before
        the end of the log answers ``at_end=False``. The checks of the log's end (a checkpoint
        beyond the last row: a cut tail, or a forged checkpoint) run only in the chunk that
        reaches it.
        """
        if limit is not None and limit < 1:
            raise ValueError("limit must be at least 1")
        try:
            return self._verify(conn, public_keys, after or (0, GENESIS_HASH), limit, _CONFIRMED)
        except DBAPIError as exc:
            raise StoreError("audit verify failed", detail=type(exc.orig).__name__) from exc

    def verify_chunked(
        self,
        open_read: Callable[[], AbstractContextManager[Connection]],
        public_keys: Keys | Callable[[Connection], Keys] = (),
        *,
        after: tuple[int, str] | None = None,
        chunk: int = VERIFY_CHUNK,
        pause: float = 0.0,
    ) -> VerifyResult:
        """``verify`` of everything after ``after`` in chunks of at most ``chunk`` rows, each in
        a read transaction of its own from ``open_read()`` (``Store.read``).

        ``pause``: after each chunk but the last, sleep ``pause`` times as long as the chunk
        took. A node's scheduled run is pure Python (≈ 20 µs a row) and shares the GIL with
        intake and delivery: 300,000 rows in one go slowed a node's delivery for seconds every
        five minutes (the soak); with ``pause=1`` it takes at most half of the time.

        One transaction over a busy node's whole chain lasts seconds: on SQLite it holds a WAL
        snapshot the checkpoint cannot copy past (the WAL grows, writers stall), on PostgreSQL
        it holds back vacuum. The result is the single pass's, counts summed: each chunk
        continues from the row the one before confirmed and first re-reads it (a row edited or
        deleted there between chunks is caught); rows appended meanwhile are verified by the
        later chunks (the chain only grows at its head); the end-of-log checks run in the chunk
        that reaches the end. ``public_keys`` may be a function of the first chunk's connection.
        """
        if chunk < 1:
            raise ValueError("chunk must be at least 1")
        keys = None if callable(public_keys) else list(public_keys)
        base = after or (0, GENESIS_HASH)
        gone = _CONFIRMED
        checked = cps_checked = 0
        while True:
            started = time.monotonic()
            try:
                with open_read() as conn:
                    if keys is None:
                        assert callable(public_keys)
                        keys = list(public_keys(conn))
                    res = self._verify(conn, keys, base, chunk, gone)
            except DBAPIError as exc:
                raise StoreError("audit verify failed", detail=type(exc.orig).__name__) from exc
            checked += res.checked
            cps_checked += res.checkpoints_checked
            if not res.ok or res.at_end:
                res.checked, res.checkpoints_checked = checked, cps_checked
                return res
            base = (res.last_seq, res.last_hash)
            gone = _CHANGED
            if pause > 0:
                time.sleep((time.monotonic() - started) * pause)

    def _verify(
        self,
        conn: Connection,
        public_keys: Sequence[Ed25519PublicKey],
        after: tuple[int, str],
        limit: int | None,
        gone: str,
    ) -> VerifyResult:
        keys = list(public_keys) or ([self.signing_key.public_key()] if self.signing_key else [])
        by_id = {key_id(k): k for k in keys}
        last_seq, last_hash = after
        in_range = [_checkpoints.c.seq > last_seq]
        if limit is not None:  # a chunk's rows are seq + 1 .. seq + limit (a gap fails first)
            in_range.append(_checkpoints.c.seq <= last_seq + limit)
        cps = list(conn.execute(_CHECKPOINTS.where(*in_range)))
        cp_i = 0
        cps_checked = 0
        checked = 0
        if last_seq:  # the confirmed row itself must still be there, unchanged
            pinned = conn.execute(select(_audit.c.hash).where(_audit.c.seq == last_seq)).first()
            if pinned is None or pinned.hash != last_hash:
                return VerifyResult(
                    False, 0, last_seq, f"seq {last_seq}: {gone}", last_seq, last_hash, 0
                )

        def fail(seq: int, reason: str) -> VerifyResult:
            return VerifyResult(False, checked, seq, reason, last_seq, last_hash, cps_checked)

        def bad_signature(cp: Any) -> str | None:
            if not by_id:
                return None
            key = by_id.get(cp.key_id)
            if key is None:
                return f"checkpoint at seq {cp.seq}: signed by unknown key {cp.key_id}"
            try:
                key.verify(
                    base64.b64decode(cp.signature, validate=True),
                    checkpoint_message(self.node_id, cp.seq, cp.hash, cp.at),
                )
            except (InvalidSignature, ValueError):
                return f"checkpoint at seq {cp.seq}: signature does not verify (key {cp.key_id})"
            return None

        stmt = _ROWS.where(_audit.c.seq > last_seq)
        if limit is not None:
            stmt = stmt.limit(limit + 1)  # one row more than checked: does the log go on?
        result = conn.execute(stmt)
        try:
            for row in result:
                seq = row.seq
                if checked == limit:  # the chunk is done and the log goes on
                    return VerifyResult(
                        True, checked, None, None, last_seq, last_hash, cps_checked, at_end=False
                    )
                if seq <= last_seq:
                    return fail(seq, f"seq {seq}: out of order after seq {last_seq}")
                if seq != last_seq + 1:
                    gap = f"{last_seq + 1}" if seq == last_seq + 2 else f"{last_seq + 1}..{seq - 1}"
                    return fail(seq, f"seq {seq}: follows seq {last_seq}, row {gap} missing")
                if row.prev_hash != last_hash:
                    return fail(
                        seq,
                        f"seq {seq}: prev_hash does not link to seq {last_seq}"
                        " (row deleted, moved or reordered)",
                    )
                body = row.resource.encode()
                if link_hash(last_hash, body) != row.hash:
                    return fail(seq, f"seq {seq}: hash mismatch, resource or hash was edited")
                try:
                    fields = event_fields(orjson.loads(body))
                except (orjson.JSONDecodeError, AttributeError, TypeError):
                    return fail(seq, f"seq {seq}: resource is not a Hutong AuditEvent")
                if fields["seq"] != seq:
                    return fail(seq, f"seq {seq}: resource says seq {fields['seq']}")
                for name in _COLUMNS:
                    if getattr(row, name) != fields[name]:
                        return fail(seq, f"seq {seq}: column {name} does not match the resource")
                if instant(row.at) != fields["at"]:
                    return fail(seq, f"seq {seq}: column at does not match the resource")
                while cp_i < len(cps) and cps[cp_i].seq <= seq:
                    cp = cps[cp_i]
                    cp_i += 1
                    if cp.seq < seq:  # only possible for seq < 1: no row to pin
                        return fail(cp.seq, f"checkpoint at seq {cp.seq}: no such row")
                    if cp.hash != row.hash:
                        return fail(seq, f"checkpoint at seq {seq}: hash differs from the row's")
                    if problem := bad_signature(cp):
                        return fail(seq, problem)
                    cps_checked += 1
                checked += 1
                last_seq, last_hash = seq, row.hash
        finally:
            result.close()
        tail = cps[cp_i:]
        if limit is not None:  # a chunk loaded the checkpoints of its rows only
            tail = list(conn.execute(_CHECKPOINTS.where(_checkpoints.c.seq > last_seq)))
            # PostgreSQL reads each statement at its own snapshot (READ COMMITTED): rows and
            # their checkpoint committed since the rows were read are not a cut tail, the log
            # went on (SQLite reads the whole transaction at one snapshot: no row shows here)
            newer = select(_audit.c.seq).where(_audit.c.seq > last_seq).limit(1)
            if tail and conn.execute(newer).first() is not None:
                return VerifyResult(
                    True, checked, None, None, last_seq, last_hash, cps_checked, at_end=False
                )
        for cp in tail:  # checkpoints beyond the last row: forged, or the tail was cut
            if problem := bad_signature(cp):
                return fail(cp.seq, problem)
            return fail(
                last_seq + 1,
                f"truncated: checkpoint at seq {cp.seq} but the log ends at seq {last_seq}",
            )
        return VerifyResult(True, checked, None, None, last_seq, last_hash, cps_checked)
