"""Send one peer's outbox in batches: claim due rows, seal, POST, record the signed answers.

Local packets are sealed at each attempt (so created-at is fresh even after a long outage); the
packet id stays, and the receiver answers an identical re-send with its original receipt.
Order within a thread holds because a thread has one batch in flight at a time, rows go out in
queue order, and a transient failure retries the whole batch. On PostgreSQL several processes
may send for one peer: each claims only the threads of the lanes it holds (``lanes.py``), so a
thread still has one batch in flight at a time.

``[delivery] per_peer_concurrency = k``: with k = 1 (the default) a peer has one batch in flight
and sender and receiver take turns. With k > 1 a round claims the head of the queue (up to k
batches' worth), splits it into k partitions by a stable hash of the thread (``partition_of``),
so all of a thread's rows fall in one partition, and posts the partitions at once from k
threads, each on its own connection (``http.client`` connections are not thread-safe). Each
partition's answers are checked on its thread and recorded (all in one write transaction) once
every partition has answered; only then is the next round claimed, so no row is ever in flight
twice. Backoff is head-of-line per partition: a partition whose oldest row is not due sends
nothing this round, the others go on.
"""

from __future__ import annotations

import random
import zlib
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import Connection, bindparam, func, insert, select, update

from bridge import faults
from bridge.audit.anchor import keep_from_receipts
from bridge.audit.events import AuditEntry
from bridge.context import NodeContext
from bridge.crypto import envelope as env
from bridge.delivery.lanes import Lanes, lane_of
from bridge.delivery.transport import PeerConnection
from bridge.errors import ClockSkew, HutongError, NotTaken, Retry, TransportError
from bridge.store.tables import OUTBOX

MAX_BATCH_BYTES = 4 << 20

HEAD_COLUMNS = (
    OUTBOX.c.id,
    OUTBOX.c.packet_id,
    OUTBOX.c.origin,
    OUTBOX.c.sender,
    OUTBOX.c.recipient,
    OUTBOX.c.kind,
    OUTBOX.c.thread,
    OUTBOX.c.seq,
    OUTBOX.c.patient_hash,
    OUTBOX.c.attempts,
    OUTBOX.c.created_at,
    OUTBOX.c.next_try_at,
    OUTBOX.c.body,
    OUTBOX.c.frame,
)
#: one constant statement: a platform polls a head per member, and building the statement
#: (and SQLAlchemy's cache key over its literals) each time cost more than running it.
#: Receipts a platform returns to their senders are not a hop's: one job returns every hop's
#: in a round (``receipts.py``)
_HEAD_WHERE = (
    OUTBOX.c.next_hop == bindparam("_peer"),
    OUTBOX.c.state == "queued",
    OUTBOX.c.origin != "receipt",
)
_HEAD = select(*HEAD_COLUMNS).where(*_HEAD_WHERE).order_by(OUTBOX.c.id).limit(bindparam("_limit"))
#: the sizes of the same rows, read first so that no more bodies are read than batches take
_HEAD_SIZES = (
    select(func.coalesce(func.length(OUTBOX.c.body), func.length(OUTBOX.c.frame), 0))
    .where(*_HEAD_WHERE)
    .order_by(OUTBOX.c.id)
    .limit(bindparam("_limit"))
)


@dataclass(slots=True)
class SendReport:
    sent: int = 0
    failed: int = 0
    error: str | None = None


class PeerSender:
    """Per-peer settings and connection; ``send_batch`` is one claim-send-record round."""

    def __init__(self, ctx: NodeContext, peer: str, lanes: Lanes | None = None) -> None:
        self.ctx = ctx
        self.peer = peer
        self.lanes = lanes
        self.member = ctx.plan.directory[peer]
        self.conn = PeerConnection(self.member.exchange_url)
        self.cfg = ctx.plan.delivery
        self.concurrency = self.cfg.per_peer_concurrency
        # partition i posts on conns[i]; partition 0 on the job's own thread, the rest on a pool
        self.conns = [self.conn] + [
            PeerConnection(self.member.exchange_url) for _ in range(self.concurrency - 1)
        ]
        self._pool: ThreadPoolExecutor | None = None

    def _head(self, limit: int) -> list[Any]:
        """Up to ``limit`` queued rows for this peer in queue order (with lanes: this
        process's share), cut after the first row that takes them over what the batches can
        hold (``concurrency`` x MAX_BATCH_BYTES): 200 rows of 64 KiB read to send 63 held
        12.5 MiB (twice that on PostgreSQL, with libpq's copy of the result)."""
        stmt, sizes = _HEAD, _HEAD_SIZES
        if self.lanes is not None:
            held = self.lanes.hold(f"send:{self.peer}")
            if held is not None:
                if not held:
                    return []
                mine = lane_of(OUTBOX.c.thread).in_(sorted(held))
                stmt, sizes = stmt.where(mine), sizes.where(mine)
        room, total, n = self.concurrency * MAX_BATCH_BYTES, 0, 0
        with self.ctx.store.read() as conn:
            for size in conn.execute(sizes, {"_peer": self.peer, "_limit": limit}).scalars().all():
                n += 1
                total += size
                if total > room:
                    break
            if n == 0:
                return []
            return list(conn.execute(stmt, {"_peer": self.peer, "_limit": n}).all())

    def claim(self, now: datetime) -> list[Any]:
        """The head of this peer's queue, in queue order. Backoff is head-of-line: while the
        oldest waiting row is not due, nothing newer may overtake it (that would break the
        order within its thread), so the whole peer waits (with lanes: this process's share)."""
        rows = self._head(self.cfg.batch_size)
        if rows and rows[0].next_try_at > now:
            return []
        picked: list[Any] = []
        total = 0
        for r in rows:
            size = len(r.body or r.frame or b"")
            if picked and total + size > MAX_BATCH_BYTES:
                break
            picked.append(r)
            total += size
        return picked

    def claim_partitions(self, now: datetime) -> list[tuple[int, list[Any]]]:
        """The head of the queue split into at most ``per_peer_concurrency`` batches, as
        (partition, rows in queue order). A thread's rows all fall in one partition, and a
        partition takes rows only up to the first it cannot take (full, or its oldest row not
        due): nothing newer of any of its threads may overtake that row."""
        k, size = self.concurrency, self.cfg.batch_size
        parts: dict[int, list[Any]] = {}
        total = [0] * k
        shut = [False] * k
        for r in self._head(size * k):
            p = partition_of(r.thread, k)
            if shut[p]:
                continue
            part = parts.get(p)
            if part is None:
                if r.next_try_at > now:  # head-of-line backoff, for this partition only
                    shut[p] = True
                    continue
                part = parts[p] = []
            n = len(r.body or r.frame or b"")
            if part and (len(part) >= size or total[p] + n > MAX_BATCH_BYTES):
                shut[p] = True
                continue
            part.append(r)
            total[p] += n
        return sorted(parts.items())

    def send_batch(self) -> SendReport:
        if self.concurrency > 1:
            return self._send_partitions()
        now = self.ctx.now()
        rows = self.claim(now)
        if not rows:
            return SendReport()
        faults.point("sender.after_commit_before_send")
        frames = [self._frame(r, now) for r in rows]
        try:
            checked = self.exchange(self.conn, rows, frames)
        except HutongError as exc:
            self.failed(rows, exc)
            return SendReport(failed=len(rows), error=str(exc))
        with self.ctx.store.write() as conn:
            entries = self.record_answers(conn, checked)
            if entries:
                self.ctx.audit.append_at_commit(conn, entries)
        return SendReport(sent=len(rows))

    def exchange(
        self, peer: PeerConnection, rows: list[Any], frames: list[bytes]
    ) -> list[tuple[Any, bytes, dict[str, Any] | HutongError]]:
        """POST one batch on ``peer`` and check every receipt; touches no store."""
        answers = env.decode_batch(
            peer.post_batch(env.encode_batch(frames), receipts_v2=self.cfg.batch_receipts),
            max_items=len(frames),
            max_total=64 << 20,
        )
        faults.point("sender.after_send_before_receipt")
        if len(answers) != len(frames):
            raise TransportError(f"{self.peer} answered {len(answers)} of {len(frames)}")
        # verify every receipt BEFORE taking the write lock (Ed25519 verify is ~0.2 ms each;
        # batch-signed receipts share one root signature: verified once for the batch)
        roots: set[tuple[str, bytes, bytes]] = set()
        return [self._check(r, a, roots) for r, a in zip(rows, answers, strict=True)]

    def record_answers(self, conn: Connection, checked: list[Any]) -> list[AuditEntry]:
        fast = [
            (r, a, f)
            for r, a, f in checked
            if r.origin in ("local", "relay")
            and isinstance(f, dict)
            and f.get("status") == "accepted"
        ]
        taken = [c for c in checked if c[0].origin == "receipt" and not c[1]]
        done = {id(c[0]) for c in (*fast, *taken)}
        slow = [c for c in checked if id(c[0]) not in done]
        entries = self._record_accepted(conn, fast)
        # the peer's latest signed audit checkpoint, kept to check its chain (audit/anchor.py)
        entries += keep_from_receipts(
            conn, self.ctx.plan.directory, [f for _, _, f in checked], self.ctx.now()
        )
        self._record_receipts_taken(conn, taken)
        for r, a, f in slow:
            entries += self._record(conn, r, a, f)
        return entries

    def _send_partition(self, part: int, rows: list[Any], now: datetime) -> Any:
        """One partition's batch on its own connection: the checked answers, or the
        HutongError that failed the whole batch (recorded by the caller)."""
        frames = [self._frame(r, now) for r in rows]
        try:
            return self.exchange(self.conns[part], rows, frames)
        except HutongError as exc:
            return exc

    def _send_partitions(self) -> SendReport:
        """One round with per_peer_concurrency > 1: up to k batches in flight at once."""
        now = self.ctx.now()
        parts = self.claim_partitions(now)
        if not parts:
            return SendReport()
        faults.point("sender.after_commit_before_send")
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                self.concurrency - 1, thread_name_prefix=f"send-{self.peer}"
            )
        futures = [self._pool.submit(self._send_partition, p, rows, now) for p, rows in parts[1:]]
        outcomes: list[Any] = []
        try:
            outcomes.append(self._send_partition(parts[0][0], parts[0][1], now))
        except Exception as exc:  # noqa: BLE001 - recorded below like a pool thread's
            outcomes.append(exc)
        wait(futures)  # every partition answers (or fails) before anything is recorded
        outcomes += [f.exception() or f.result() for f in futures]
        report = SendReport()
        unexpected: BaseException | None = None
        with self.ctx.store.write() as conn:
            entries: list[AuditEntry] = []
            for (_, rows), outcome in zip(parts, outcomes, strict=True):
                if isinstance(outcome, HutongError):
                    self.failed(rows, outcome, conn=conn)
                    report.failed += len(rows)
                    report.error = report.error or str(outcome)
                elif isinstance(outcome, BaseException):
                    # a bug, not a peer's answer: its rows stay queued as they were and go
                    # again next round (the receiver answers a re-send with its receipt)
                    unexpected = unexpected or outcome
                else:
                    entries += self.record_answers(conn, outcome)
                    report.sent += len(rows)
            if entries:
                self.ctx.audit.append_at_commit(conn, entries)
        if unexpected is not None:
            raise unexpected
        return report

    def _check(
        self, r: Any, answer: bytes, roots: set[tuple[str, bytes, bytes]]
    ) -> tuple[Any, bytes, dict[str, Any] | HutongError]:
        """Only a receipt signed by a member decides a packet's fate. An unsigned error (the
        peer could not authenticate the frame) or an answer that does not verify means "not
        delivered": the row stays queued and is tried again with backoff (a transient
        failure), never marked refused, whoever wrote the answer."""
        if answer[:1] == UNSIGNED:
            return r, answer, _unsigned_failure(self.peer, answer)
        if r.origin == "receipt":
            return r, answer, {}
        try:
            fields = env.verify_receipt(answer, self._keys_for, roots=roots)
            if fields.get("packet") != r.packet_id:
                raise TransportError(f"receipt from {self.peer} names another packet")
            return r, answer, fields
        except HutongError as exc:
            return (
                r,
                answer,
                TransportError(
                    f"{self.peer} answered with no valid receipt ({exc.code}): {exc.message}"
                ),
            )

    def _record_accepted(self, conn: Connection, done: list[Any]) -> list[AuditEntry]:
        """The common case in one executemany: packets the recipient accepted (local ones, and
        on a platform relayed ones, whose receipts go back to their senders in one more)."""
        if not done:
            return []
        now = self.ctx.now()
        conn.execute(
            update(OUTBOX)
            .where(OUTBOX.c.id == bindparam("_id"))
            .values(
                state="acknowledged",
                attempts=bindparam("_attempts"),
                sent_at=now,
                acked_at=now,
                last_error=None,
                receipt=bindparam("_receipt"),
            ),
            [{"_id": r.id, "_attempts": r.attempts + 1, "_receipt": a} for r, a, _ in done],
        )
        relayed = [self._receipt_row(r, a, now) for r, a, _ in done if r.origin == "relay"]
        if relayed:
            conn.execute(insert(OUTBOX), relayed)
        return [
            AuditEntry(
                action="relayed" if r.origin == "relay" else "sent",
                packet_id=r.packet_id,
                kind=r.kind,
                peer=r.recipient,
                thread=r.thread,
                patient_hash=r.patient_hash,
                at=now,
                extra={"hop": self.peer, "receipt": "accepted", "attempt": r.attempts + 1},
            )
            for r, _, _ in done
        ]

    def _frame(self, r: Any, now: datetime) -> bytes:
        if r.origin == "local":
            recipient = self.ctx.plan.directory[r.recipient]
            return env.seal(
                r.body,
                sender=r.sender,
                recipient=r.recipient,
                kind=r.kind,
                thread=r.thread,
                seq=r.seq,
                signing_key=self.ctx.signing_key,
                recipient_key=recipient.encryption_keys[0],
                packet_id=r.packet_id,
                created_at=now,
            )
        if r.origin == "relay":
            pkt = env.decode(r.frame, max_body=1 << 62)
            return env.stamp_relay(
                pkt, relay_id=self.ctx.node_id, signing_key=self.ctx.signing_key, now=now
            )
        return bytes(r.frame)  # a forwarded receipt travels as it was signed

    def _record(
        self, conn: Connection, r: Any, answer: bytes, fields: dict[str, Any] | HutongError
    ) -> list[AuditEntry]:
        now = self.ctx.now()
        if isinstance(fields, HutongError):
            self.failed([r], fields, conn=conn)
            return []
        if r.origin == "receipt":
            state = "acknowledged" if not answer else "refused"
            conn.execute(
                update(OUTBOX)
                .where(OUTBOX.c.id == r.id)
                .values(state=state, attempts=r.attempts + 1, sent_at=now, acked_at=now)
            )
            return []
        status = fields.get("status")
        if status == "refused" and fields.get("code") == ClockSkew.code:
            # the clocks disagree, not the packet: keep it queued (resealed with a fresh
            # created-at at each try) so it goes once the clocks agree again; IT sees why
            self.failed(
                [r],
                TransportError(
                    f"{self.peer} refused our clock ({ClockSkew.code}): {fields.get('message')}"
                ),
                conn=conn,
            )
            return [
                AuditEntry(
                    action="rejected",
                    outcome="4",
                    packet_id=r.packet_id,
                    kind=r.kind,
                    peer=r.recipient,
                    thread=r.thread,
                    patient_hash=r.patient_hash,
                    at=now,
                    code=ClockSkew.code,
                    message=fields.get("message"),
                    extra={"hop": self.peer, "attempt": r.attempts + 1, "kept": "queued"},
                )
            ]
        values: dict[str, Any] = {"attempts": r.attempts + 1, "sent_at": now, "last_error": None}
        entry = AuditEntry(
            action="sent",
            packet_id=r.packet_id,
            kind=r.kind,
            peer=r.recipient,
            thread=r.thread,
            patient_hash=r.patient_hash,
            at=now,
            extra={"hop": self.peer, "receipt": status, "attempt": r.attempts + 1},
        )
        relayed = status == "relayed"
        if status == "accepted":
            values.update(state="acknowledged", acked_at=now, receipt=answer)
        elif relayed:
            pass  # 'sent' below, unless the end-to-end receipt has already come back
        else:
            values.update(
                state="refused",
                acked_at=now,
                receipt=answer,
                last_error=f"{fields.get('code')}: {fields.get('message')}",
            )
            entry.action, entry.outcome = "rejected", "8"
            entry.code, entry.message = fields.get("code"), fields.get("message")
        conn.execute(update(OUTBOX).where(OUTBOX.c.id == r.id).values(**values))
        if relayed:
            # A re-send the platform had already relayed (its answer to our first try was lost,
            # e.g. it died before answering) may find the recipient's end-to-end receipt here
            # before this "relayed" answer is recorded: never turn 'acknowledged' back to 'sent'.
            conn.execute(
                update(OUTBOX)
                .where(OUTBOX.c.id == r.id, OUTBOX.c.state == "queued")
                .values(state="sent")
            )
        if r.origin == "relay" and status in ("accepted", "refused"):
            self._forward_receipt(conn, r, answer, now)
            entry.action = "relayed" if status == "accepted" else "rejected"
        return [entry]

    def _forward_receipt(self, conn: Connection, r: Any, receipt: bytes, now: datetime) -> None:
        """A platform passes the recipient's signed receipt back to the original sender."""
        conn.execute(insert(OUTBOX), [self._receipt_row(r, receipt, now)])

    def _receipt_row(self, r: Any, receipt: bytes, now: datetime) -> dict[str, Any]:
        return {
            "packet_id": f"receipt:{r.packet_id}",
            "origin": "receipt",
            "sender": self.ctx.node_id,
            "recipient": r.sender,
            "next_hop": r.sender,
            "kind": "receipt",
            "thread": r.thread,
            "seq": r.seq,
            "digest": "",
            "size": len(receipt),
            "state": "queued",
            "attempts": 0,
            "created_at": now,
            "next_try_at": now,
            "frame": receipt,
        }

    def _record_receipts_taken(self, conn: Connection, taken: list[Any]) -> None:
        """Forwarded receipts the member took (an empty answer), in one executemany."""
        if not taken:
            return
        now = self.ctx.now()
        conn.execute(
            update(OUTBOX)
            .where(OUTBOX.c.id == bindparam("_id"))
            .values(
                state="acknowledged", attempts=bindparam("_attempts"), sent_at=now, acked_at=now
            ),
            [{"_id": r.id, "_attempts": r.attempts + 1} for r, _, _ in taken],
        )

    def failed(self, rows: list[Any], exc: HutongError, conn: Connection | None = None) -> None:
        """Back off (transient/ambiguous) or dead-letter (permanent, too many tries, too old)."""
        now = self.ctx.now()
        cfg = self.cfg
        audit: list[AuditEntry] = []

        def apply(c: Connection) -> None:
            for r in rows:
                if isinstance(exc, NotTaken):  # over rate, backlog full: wait and resend
                    c.execute(
                        update(OUTBOX)
                        .where(OUTBOX.c.id == r.id)
                        .values(
                            last_error=str(exc)[:500],
                            next_try_at=now
                            + timedelta(seconds=exc.retry_after * random.uniform(1.0, 1.25)),
                        )
                    )
                    continue
                attempts = r.attempts + 1
                age = (now - r.created_at).total_seconds()
                dead = (
                    exc.retry is Retry.PERMANENT
                    or attempts >= cfg.max_attempts
                    or age > cfg.dead_after_s
                )
                values: dict[str, Any] = {"attempts": attempts, "last_error": str(exc)[:500]}
                if dead:
                    values["state"] = "dead"
                    audit.append(
                        AuditEntry(
                            action="dead-lettered",
                            outcome="8",
                            packet_id=r.packet_id,
                            kind=r.kind,
                            peer=r.recipient,
                            thread=r.thread,
                            patient_hash=r.patient_hash,
                            code=exc.code,
                            message=exc.message,
                            at=now,
                        )
                    )
                else:
                    values["next_try_at"] = now + timedelta(seconds=backoff(attempts, cfg))
                c.execute(update(OUTBOX).where(OUTBOX.c.id == r.id).values(**values))
            if audit:
                self.ctx.audit.append_at_commit(c, audit)

        if conn is not None:
            apply(conn)
        else:
            with self.ctx.store.write() as c:
                apply(c)

    def _keys_for(self, node: str) -> tuple[Any, ...]:
        member = self.ctx.plan.directory.get(node)
        return member.signing_keys if member else ()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        for peer in self.conns:
            peer.close()


#: an unsigned error answer starts with this byte (``bridge.gateway.intake.unsigned_error``)
UNSIGNED = b"{"


def _unsigned_failure(peer: str, answer: bytes) -> TransportError:
    """What an unsigned error answer says, as a transient failure (code and message only)."""
    try:
        said = orjson.loads(answer[:4096])
        code, message = str(said.get("code"))[:48], str(said.get("message"))[:300]
    except (orjson.JSONDecodeError, AttributeError):
        code, message = "?", "unreadable error answer"
    return TransportError(f"{peer} did not take the packet, unsigned answer {code}: {message}")


def partition_of(thread: str | None, k: int) -> int:
    """The partition (0..k-1) of a thread for per_peer_concurrency = k: a stable hash (CRC-32,
    the same in every process and after a restart; SQLite has no ``hashtext``), so a thread's
    rows always go on the same connection, one batch at a time."""
    return zlib.crc32((thread or "").encode()) % k


def backoff(attempts: int, cfg: Any) -> float:
    """Exponential backoff with equal jitter: half fixed, half random."""
    delay: float = min(cfg.backoff_max_s, cfg.backoff_base_s * (2 ** min(attempts - 1, 30)))
    return delay / 2 + random.uniform(0, delay / 2)
