"""How a running node keeps knowing that its audit chain holds, without recomputing it all.

Recomputing the whole chain reads every row (a node with a million audit rows needs seconds),
too slow for every load of the auditor's page. ``ChainWatch`` recomputes the whole chain at most
every ``full_every_s`` (or when asked), remembers the last row that run confirmed, and in
between checks only the rows after it (``AuditChain.verify(after=...)``): that the confirmed row
is still there unchanged, that every newer row links, hashes and matches its columns, and that
newer checkpoints verify. Each check that holds moves that row forward, so a check reads only
what was appended since the one before (reading everything since the full run made the alert
job's check every 30 s grow with the node's traffic until the next full run: at 150 packets/s it
took the receiving node's Python for seconds of every round and held a read snapshot that kept
SQLite's WAL from being checkpointed, bench/README.md "soak"). An edit to an older row is caught
by the next full run; the page says when that was and offers to run one now. A failed run is
never remembered as a base. Both read the chain in chunks, each in a short read transaction of
its own (``AuditChain.verify_chunked``): one transaction over the whole chain held a SQLite WAL
snapshot (or PostgreSQL's vacuum horizon) for seconds.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import Connection

from bridge.audit.chain import VERIFY_CHUNK, VerifyResult

if TYPE_CHECKING:
    from bridge.context import NodeContext


@dataclass(frozen=True, slots=True)
class ChainStatus:
    ok: bool
    full_at: datetime | None  # when the whole chain was last recomputed with success
    full_checked: int  # rows that full run confirmed
    new_checked: int  # rows after it, confirmed now (0 right after a full run)
    head_seq: int
    head_hash: str
    checkpoints_checked: int
    first_bad_seq: int | None = None
    reason: str | None = None
    ran_full: bool = False  # this check recomputed the whole chain


#: a scheduled full run sleeps as long as each chunk took (``AuditChain.verify_chunked``)
PACE = 1.0


class ChainWatch:
    """One per node process; thread-safe (the page, the alert job and the API share it)."""

    def __init__(
        self,
        ctx: NodeContext,
        keys: Callable[[Connection], Sequence[Ed25519PublicKey]],
        full_every_s: float,
        chunk: int = VERIFY_CHUNK,
    ) -> None:
        self.ctx = ctx
        self.keys = keys
        self.full_every_s = full_every_s
        self.chunk = chunk  # rows a read transaction of a check reads at most
        self._lock = threading.Lock()
        self._base: tuple[datetime, VerifyResult] | None = None
        #: since the full run: the last row confirmed, and rows and checkpoints confirmed
        self._since: tuple[int, str, int, int] | None = None

    def check(self, *, full: bool = False) -> ChainStatus:
        ctx = self.ctx
        with self._lock:
            now = ctx.now()
            base = self._base
            if (
                base is not None
                and not full
                and (now - base[0]).total_seconds() < self.full_every_s
            ):
                at, done = base
                last_seq, last_hash, rows, cps = self._since or (
                    done.last_seq,
                    done.last_hash,
                    0,
                    0,
                )
                res = self._verify(after=(last_seq, last_hash))
                rows, cps = rows + res.checked, cps + res.checkpoints_checked
                if res.ok:
                    self._since = (res.last_seq, res.last_hash, rows, cps)
                else:
                    self._base = self._since = None
                return ChainStatus(
                    res.ok,
                    at,
                    done.checked,
                    rows,
                    res.last_seq,
                    res.last_hash,
                    done.checkpoints_checked + cps,
                    res.first_bad_seq,
                    res.reason,
                )
            # the scheduled run shares the GIL with intake and delivery: paced to half of the
            # time; a run asked for (the auditor page's "verify now") runs flat out
            res = self._verify(pause=0.0 if full else PACE)
            self._base = (now, res) if res.ok else None
            self._since = None
            return ChainStatus(
                res.ok,
                now if res.ok else None,
                res.checked,
                0,
                res.last_seq,
                res.last_hash,
                res.checkpoints_checked,
                res.first_bad_seq,
                res.reason,
                ran_full=True,
            )

    def _verify(self, *, after: tuple[int, str] | None = None, pause: float = 0.0) -> VerifyResult:
        """The rows after ``after`` (all without), in chunks of short read transactions, then
        the latest anchor in one more."""
        ctx = self.ctx
        res = ctx.audit.verify_chunked(
            ctx.store.read, self.keys, after=after, chunk=self.chunk, pause=pause
        )
        with ctx.store.read() as conn:
            return _anchored(conn, ctx, res)


def _anchored(conn: Connection, ctx: NodeContext, res: VerifyResult) -> VerifyResult:
    """A chain that verifies must still hold the latest checkpoint this node anchored (a tail
    cut together with its checkpoints under a running node shows here, one indexed read)."""
    from bridge.audit.anchor import problem

    latest = ctx.audit.latest
    if not res.ok or latest is None:
        return res
    found = problem(conn, latest, "the node's latest anchor")
    if found is None:
        return res
    return VerifyResult(
        False, res.checked, found[0], found[1], res.last_seq, res.last_hash, res.checkpoints_checked
    )
