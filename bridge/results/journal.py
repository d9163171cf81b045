"""The results journal: a lab message acknowledged after one small commit, expanded after.

Store-and-forward, as integration engines do it. Intake (``AdapterHost.share_results`` with
``staged=True``; the LIS adapter) parses, converts and validates the message in memory, then
commits ONE journal row (the raw message and the converted Bundle) with the exactly-once key
and its answer (the AA ACK), and only then answers. That commit writes a handful of pages;
expanding the message into the FHIR store (a resource row, a history row and their search
rows per Observation: 200-400 pages) made the ACK wait for all of them (bench/README.md,
``lis.py``).

The node's ``results-journal`` job (:meth:`Journal.run_once`, woken by every staged message)
expands the rows in id order (so one sender's messages keep their order), several messages a
transaction: ``store_and_route`` as before (resources, raw message, routing to open referrals,
the ``results`` audit entry, the exactly-once key's result completed), and the row deleted in
the same transaction. So a crash at any point loses nothing and expands nothing twice: before
the commit the row is still there (the job resumes with it after a restart), after it the row
is gone. A re-send finds the key committed with the journal row and gets the original ACK.

A transaction that fails is rolled back and its rows are expanded one by one; a row that
fails alone with a transient error (the database unavailable) stays queued and is tried again
on the job's next round; any other failure marks the row ``failed`` (kept, never deleted),
quarantines its raw message with the reason (``HT-RESULTS-EXPAND``) and audits it; IT replays
the quarantine item, which puts the row back in the queue (:meth:`Journal.requeue`).

The journal is bounded (``[limits] max_results_journal``): at the bound a new message waits up
to ``results_journal_wait_s`` for the job, then is refused with a transient error (the LIS
gets AE "resend later"), nothing stored. IT sees the backlog on ``/metrics``
(``hutong_results_journal``) and in the alerts (docs/it/operations.md).
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections.abc import Callable
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import Connection, bindparam, delete, func, insert, select, update

from bridge import faults
from bridge.audit.events import AuditEntry
from bridge.context import NodeContext
from bridge.errors import Backlogged, HutongError, Retry, StoreError
from bridge.local import intake
from bridge.results.tables import RESULT_JOURNAL
from bridge.store import bulk
from bridge.store.quarantine import quarantine_row
from bridge.store.tables import QUARANTINE

log = logging.getLogger("hutong.results.journal")

J = RESULT_JOURNAL
#: rows read a round, and how long one transaction may go on taking more of them (the writers'
#: lock is held meanwhile: staged messages of the LIS connections wait for it)
BATCH = 64
HOLD_S = 0.03
#: the job leaves the store (and the GIL) to intake while messages keep arriving (one staged
#: in the last QUIET_S) and fewer than ``defer_below`` wait, until the oldest waiting row was
#: staged DEFER_MAX_S ago: a burst from the LIS is answered at the handler's pace and filed
#: within about DEFER_MAX_S of its first message, and under a steady load the results reach
#: the FHIR store about DEFER_MAX_S after their ACK. One SQLite writer at a time: a staged
#: message's ACK waited for the job's transaction (two thirds of the handler's time in the
#: first measurement, bench/README.md ``lis.py``)
QUIET_S = 0.05
DEFER_MAX_S = 5.0
_STAGE = insert(J)
#: the table holds only the backlog and failed rows (expanded rows are deleted): no index
_QUEUED = select(J).where(J.c.state == "queued").order_by(J.c.id).limit(bindparam("_n"))
_DONE = delete(J).where(J.c.id.in_(bindparam("_ids", expanding=True)))
_COUNTS = select(J.c.state, func.count(), func.min(J.c.received_at)).group_by(J.c.state)


class ExpansionFailed(HutongError):
    """A staged message that could not be expanded into the FHIR store (kept, quarantined)."""

    code = "HT-RESULTS-EXPAND"
    retry = Retry.PERMANENT


def pack(bundle: dict[str, Any]) -> bytes:
    return zlib.compress(orjson.dumps(bundle), 1)


def unpack(data: bytes) -> dict[str, Any]:
    out: dict[str, Any] = orjson.loads(zlib.decompress(data))
    return out


def counts(conn: Connection) -> dict[str, tuple[int, datetime | None]]:
    """Rows per state (``queued``, ``failed``) and the oldest's arrival."""
    return {st: (n, oldest) for st, n, oldest in conn.execute(_COUNTS)}


class Journal:
    """One per node: staging (intake threads) and expansion (the ``results-journal`` job)."""

    def __init__(
        self,
        ctx: NodeContext,
        *,
        bound: int = 0,
        wait_s: float = 5.0,
        on_routed: Callable[[], None] | None = None,
    ) -> None:
        self.ctx = ctx
        self.bound = bound
        self.wait_s = wait_s
        self.on_routed = on_routed
        #: set by the node: wakes the job (a staged message, a requeued row)
        self.wake: Callable[[], None] = lambda: None
        self._cond = threading.Condition()
        self._queued: int | None = None  # counted from the table on first use
        self._last_staged = 0.0  # time.monotonic() of the last staged message
        #: the backlog at which the job stops deferring to intake
        self.defer_below = max(bound // 2, 1) if bound else 1000

    # -- intake side --------------------------------------------------------------------------

    def queued(self) -> int:
        with self._cond:
            if self._queued is None:
                with self.ctx.store.read() as conn:
                    self._queued = counts(conn).get("queued", (0, None))[0]
            return self._queued

    def admit(self) -> None:
        """Before staging: at the bound, wait for the job up to ``wait_s``; still there: a
        transient refusal (nothing stored, the sender resends later)."""
        if not self.bound or self.queued() < self.bound:
            return
        deadline = time.monotonic() + self.wait_s
        with self._cond:
            while (self._queued or 0) >= self.bound:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Backlogged(
                        f"{self._queued} results wait to be stored ([limits] "
                        f"max_results_journal = {self.bound}); resend later",
                        retry_after=self.wait_s,
                    )
                self._cond.wait(left)

    def stage(
        self,
        conn: Connection,
        *,
        adapter: str,
        source_key: str,
        bundle: dict[str, Any],
        patient_hash: str | None,
        answer: dict[str, Any],
        raw: bytes | None,
        kind: str,
        notes: list[AuditEntry],
        at: datetime,
    ) -> dict[str, Any]:
        """In the caller's transaction: the journal row, the exactly-once key with ``answer``
        and the notes' audit entries. Call :meth:`staged` after the commit."""
        bulk.executemany(
            conn,
            _STAGE,
            [
                {
                    "adapter": adapter,
                    "source_key": source_key,
                    "kind": kind,
                    "received_at": at,
                    "patient_hash": patient_hash,
                    "state": "queued",
                    "bundle": pack(bundle),
                    "raw": raw,
                }
            ],
        )
        out = {**answer, "staged": True}
        intake.remember(conn, adapter, source_key, out, at)
        self.ctx.audit.append_at_commit(conn, notes)
        return out

    def staged(self, n: int = 1) -> None:
        """After the commit of ``n`` staged messages: counted, the job woken."""
        with self._cond:
            self._last_staged = time.monotonic()
            if self._queued is not None:
                self._queued += n
        self.wake()

    def requeue(self, adapter: str, source_key: str) -> bool:
        """A failed row back in the queue (IT replayed its quarantine item); False if the key
        has no failed row (expanded, or never staged)."""
        with self.ctx.store.write() as conn:
            n = conn.execute(
                update(J)
                .where(J.c.adapter == adapter, J.c.source_key == source_key, J.c.state == "failed")
                .values(state="queued", error=None)
            ).rowcount
        if n:
            with self._cond:
                if self._queued is not None:
                    self._queued += n
            self.wake()
        return bool(n)

    # -- the job --------------------------------------------------------------------------------

    def run_once(self) -> tuple[int, bool]:
        """Expand the next rows; (rows done, failed: try again on the next round)."""
        with self.ctx.store.read() as conn:
            rows = list(conn.execute(_QUEUED, {"_n": BATCH}))
        if not rows:
            return 0, False
        self._defer(rows[0].received_at)
        faults.point("journal.before_expand")

        def work(conn: Connection) -> tuple[list[Any], bool]:
            done: list[Any] = []
            routed = False
            started = time.monotonic()
            for row in rows:
                routed |= self._expand(conn, row)
                done.append(row)
                if time.monotonic() - started > HOLD_S:
                    break
            conn.execute(_DONE, {"_ids": [r.id for r in done]})
            faults.point("journal.before_commit")
            return done, routed

        try:
            done, routed = self._file(work)
        except Exception as exc:  # noqa: BLE001 - rolled back: each row alone below
            log.debug("journal batch rolled back (%s): row by row", type(exc).__name__)
            return self._one_by_one(rows)
        faults.point("journal.after_commit")
        self._finished(len(done), routed)
        return len(done), False

    def _file(self, work: Callable[[Connection], tuple[list[Any], bool]]) -> tuple[list[Any], bool]:
        """SQLite: grouped, so messages staged meanwhile commit with this transaction instead of
        waiting for SQLite's one writer and then committing again (Store.write_grouped).
        PostgreSQL: a transaction of its own beside the staging ones, which would otherwise
        wait in the group for the whole filing (the LIS soak: the handler spent over half of
        its time there and the ACK's p50 grew from 9 to 12 ms in ten minutes); they meet only
        at the audit chain's lock, taken just before each commit."""
        store = self.ctx.store
        if store.is_sqlite:
            return store.write_grouped(work)
        with store.write() as conn:
            return work(conn)

    def _defer(self, oldest: datetime) -> None:
        """While intake is busy and the backlog small: wait for a pause (see QUIET_S), at most
        until the oldest waiting row (staged at ``oldest``) is DEFER_MAX_S old."""
        age = (self.ctx.now() - oldest).total_seconds()
        until = time.monotonic() + min(max(DEFER_MAX_S - age, 0.0), DEFER_MAX_S)
        with self._cond:
            while (
                (self._queued or 0) < self.defer_below
                and (now := time.monotonic()) - self._last_staged < QUIET_S
                and now < until
            ):
                self._cond.wait(min(QUIET_S, until - now))

    def _one_by_one(self, rows: list[Any]) -> tuple[int, bool]:
        n = 0
        for row in rows:
            try:
                with self.ctx.store.write() as conn:
                    routed = self._expand(conn, row)
                    conn.execute(_DONE, {"_ids": [row.id]})
            except StoreError as exc:  # the database, not the row: the next round retries
                log.warning("journal row not expanded, retried later: %s", exc.code)
                return n, True
            except Exception as exc:  # noqa: BLE001 - this row's own failure: kept, quarantined
                if not self._failed(row, exc):
                    return n, True  # not even marked: still queued, the next round again
                self._finished(1, False)
                continue
            n += 1
            self._finished(1, routed)
        return n, False

    def _finished(self, n: int, routed: bool) -> None:
        """``n`` rows left the queue (expanded, or failed and kept)."""
        with self._cond:
            if self._queued is not None:  # may dip below 0 for a moment: a row expanded
                self._queued -= n  # before its stager counted it
            self._cond.notify_all()
        if routed and self.on_routed is not None:
            self.on_routed()

    def _expand(self, conn: Connection, row: Any) -> bool:
        from bridge.results.routing import store_and_route

        prior = intake.seen(conn, row.adapter, row.source_key) or {}
        now = self.ctx.now()
        # the key's result keeps the answer given (the ACK) and says when it was stored
        answer = {k: v for k, v in prior.items() if k != "staged"}
        answer["stored_at"] = now.isoformat()
        out = store_and_route(
            self.ctx,
            conn,
            unpack(row.bundle),
            adapter=row.adapter,
            source_key=row.source_key,
            answer=answer,
            patient_hash=row.patient_hash,
            raw=row.raw,
            kind=row.kind,
            at=now,
            received_at=row.received_at,
            remembered=True,
        )
        return bool(out["routed"])

    def _failed(self, row: Any, exc: BaseException) -> bool:
        """Kept as ``failed``, its raw message quarantined (IT can read and replay it), audited."""
        what = exc.code if isinstance(exc, HutongError) else type(exc).__name__
        err = ExpansionFailed(
            f"record {row.source_key[:60]}: acknowledged, not stored in the FHIR store ({what}); "
            "kept in the results journal, replay after the cause is fixed"
        )
        log.error("journal row %s not expanded: %s", row.id, what)
        now = self.ctx.now()
        source = f"adapter:{row.adapter}"
        try:
            with self.ctx.store.write() as conn:
                conn.execute(
                    update(J).where(J.c.id == row.id).values(state="failed", error=what[:500])
                )
                qid = conn.execute(
                    QUARANTINE.insert().values(
                        **quarantine_row(
                            now,
                            source,
                            err,
                            raw=row.raw or b"",
                            sender=row.adapter,
                            kind=row.kind,
                            patient_hash=row.patient_hash,
                        )
                    )
                ).inserted_primary_key
                self.ctx.audit.append(
                    conn,
                    [
                        AuditEntry(
                            action="quarantined",
                            outcome="8",
                            kind=row.kind,
                            at=now,
                            patient_hash=row.patient_hash,
                            actor=source,
                            code=err.code,
                            message=err.message,
                            extra={"quarantine_id": int(qid[0]) if qid else None},
                        )
                    ],
                )
        except Exception as store_exc:  # noqa: BLE001 - still queued: the next round again
            log.error("journal row %s not marked failed: %s", row.id, type(store_exc).__name__)
            return False
        return True
