"""Backpressure at the peer port: while the node's local delivery is behind its intake, new
batches are refused unread (503 ``HT-PKT-BACKLOG`` with ``Retry-After``) instead of being
taken without bound; the senders keep them queued and try again (``bridge/delivery/sender.py``).

The backlog is the inbox rows in state ``received`` (taken from a peer, not yet handed to the
local side). Rows ``held`` for an earlier packet of their thread are not counted: the packet
they wait for must still get in, or the node would refuse what would let it drain.

The count is read at most every ``refresh_s`` (one ``LIMIT``-ed index range of
``ix_inbox_pending (state, id)``, at most ``bound + 1`` entries, whatever the inbox's size) and
raised by the batches taken in between, so a request costs a comparison. It is read from the
store, so it is the node's, on SQLite and PostgreSQL alike. An episode starts when the backlog
reaches the bound and ends when it is back under ``resume`` (90 % of the bound), so a backlog
hovering at the bound does not open an episode (and an audit entry) every refresh.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import func, select

from bridge.store.db import Store
from bridge.store.tables import INBOX

log = logging.getLogger("hutong.gateway")

#: what a refused sender is told to wait (it adds up to 25 % of jitter)
RETRY_AFTER_S = 2.0


@dataclass(slots=True)
class BacklogVerdict:
    """``refuse``: answer 503; ``first``: the first refusal of an episode (audit and log it);
    ``ended``: batches refused in the episode that has just ended (log it), else None."""

    refuse: bool
    backlog: int
    first: bool = False
    ended: int | None = None


class InboxBacklog:
    def __init__(
        self,
        store: Store,
        bound: int,
        *,
        refresh_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.bound = bound
        self.resume = max(0, int(bound * 0.9) if bound >= 10 else bound - 1)
        self.refresh_s = refresh_s
        self.clock = clock
        self._count = 0
        self._read_at: float | None = None
        self._refreshing = threading.Lock()
        self._lock = threading.Lock()
        self.refusing = False
        self.refused = 0  # batches refused in the current episode
        self._query = select(func.count()).select_from(
            select(INBOX.c.id).where(INBOX.c.state == "received").limit(bound + 1).subquery()
        )

    @property
    def due(self) -> bool:
        """Whether the cached count is older than ``refresh_s`` (call ``refresh`` off the
        event loop: it reads the store)."""
        return self._read_at is None or self.clock() - self._read_at >= self.refresh_s

    def refresh(self) -> None:
        """Read the backlog again; a caller that finds another thread reading keeps the
        cached count."""
        if not self._refreshing.acquire(blocking=False):
            return
        try:
            started = self.clock()
            try:
                with self.store.read() as conn:
                    n = int(conn.execute(self._query).scalar_one())
            except Exception as exc:  # noqa: BLE001 - the intake's own commit answers for the store
                log.warning("backlog not read, the last count stands: %s", type(exc).__name__)
                with self._lock:
                    self._read_at = started
                return
            with self._lock:
                self._count, self._read_at = n, started
        finally:
            self._refreshing.release()

    def taken(self, packets: int) -> None:
        """A batch of ``packets`` was stored: count it until the next read."""
        with self._lock:
            self._count += packets

    def check(self) -> BacklogVerdict:
        """Whether the next batch is refused, from the cached count."""
        with self._lock:
            n = self._count
            if self.refusing:
                if n > self.resume:
                    self.refused += 1
                    return BacklogVerdict(True, n)
                ended, self.refusing, self.refused = self.refused, False, 0
                return BacklogVerdict(False, n, ended=ended)
            if n >= self.bound:
                self.refusing, self.refused = True, 1
                return BacklogVerdict(True, n, first=True)
            return BacklogVerdict(False, n)
