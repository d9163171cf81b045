"""Scale-out on PostgreSQL: several processes of one node share its queues by *lanes*.

Every thread (a referral, a result stream) hashes to one of ``LANES`` lanes, the same in every
process. A process sends or delivers a row only while it holds that lane's PostgreSQL advisory
lock, so a thread is worked by one process at a time and keeps its order, and no row is claimed
by two processes. The locks are session locks on one small connection per process: a killed
process's locks vanish with its connection, and the others take its lanes at their next round.

Each process that works a job (``send:<peer>``, ``deliver``) registers for it with one more
lock of the job's lock class, and holds a fair share of ceil(LANES / registered) lanes: a second
worker makes the first give up half its lanes, a dead one's lanes are taken up again. A single
process holds all lanes, and then claims with no lane filter at all.

Who holds what is read from ``pg_locks`` once per ``refresh_s`` for all the process's jobs at
once, not once per job and round: a platform runs a send job per member, and reading the lock
table (thousands of lane locks) for each of them, one at a time on the one lanes connection,
kept its relay jobs waiting seconds in ``hold``. Between two reads a job's lanes are what this
process locked (its own bookkeeping); a lost connection is found at the next read (within
``refresh_s``), and its locks are then gone for everyone.

SQLite has one writer anyway: a SQLite node is one process and uses no lanes.
"""

from __future__ import annotations

import contextlib
import math
import random
import threading
import time
import zlib
from collections import defaultdict
from typing import Any

from sqlalchemy import ColumnElement, func

from bridge.errors import StoreError

LANES = 64  # a power of two: lane = hashtext(thread) & (LANES - 1)
_SLOT_BASE = LANES  # lock object ids >= LANES are registrations, below are lanes

#: every lane and registration lock of this database: (job class, lane or slot)
_LOCKS_SQL = """
SELECT classid::bigint, objid::bigint FROM pg_locks
WHERE locktype = 'advisory' AND objsubid = 2 AND granted
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""
#: how old the view of every process's locks may be when a job rebalances
REFRESH_S = 0.5


def lane_of(thread: Any) -> ColumnElement[int]:
    """The lane of a thread column, computed by PostgreSQL (stable within one server)."""
    return func.hashtext(thread).op("&")(LANES - 1)


def job_class(job: str) -> int:
    """The advisory lock class (first int4 key) of a job; never the audit chain's lock."""
    return (zlib.crc32(f"hutong-lanes:{job}".encode()) & 0x3FFFFFFF) + 0x100


class Lanes:
    """One process's lane locks on a PostgreSQL store; thread-safe (jobs run on many threads)."""

    def __init__(self, dsn: str, refresh_s: float = REFRESH_S) -> None:
        from sqlalchemy.engine import make_url

        self.url = make_url(dsn).set(drivername="postgresql").render_as_string(hide_password=False)
        self.refresh_s = refresh_s
        self._lock = threading.Lock()
        self._conn: Any = None
        self._held: dict[str, set[int]] = {}
        self._slots: dict[str, int] = {}
        self._view: dict[int, set[int]] = {}  # job class -> locks seen at the last read
        self._read_at: float | None = None
        #: statements sent on the lanes connection (what a round of jobs costs the database)
        self.statements = 0

    def hold(self, job: str) -> frozenset[int] | None:
        """Rebalance, then the lanes this process may work for ``job`` now (None: all)."""
        import psycopg

        with self._lock:
            try:
                held = self._rebalance(job)
            except psycopg.Error as exc:
                self._drop()
                raise StoreError(f"lane locks unavailable: {type(exc).__name__}") from exc
        return None if len(held) == LANES else frozenset(held)

    def held(self) -> dict[str, frozenset[int]]:
        with self._lock:
            return {job: frozenset(lanes) for job, lanes in self._held.items()}

    def _connection(self) -> Any:
        import psycopg

        if self._conn is None or self._conn.closed:
            self._held.clear()
            self._slots.clear()
            self._read_at = None
            self._conn = psycopg.connect(
                self.url, autocommit=True, connect_timeout=10, application_name="hutong-lanes"
            )
        return self._conn

    def _execute(self, conn: Any, sql: str, args: Any = None) -> Any:
        self.statements += 1
        return conn.execute(sql, args)

    def _register(self, conn: Any, job: str, cls: int) -> None:
        while job not in self._slots:
            slot = random.randint(_SLOT_BASE, 0x7FFFFFFF)
            got = self._execute(
                conn, "SELECT pg_try_advisory_lock(%s::int, %s::int)", (cls, slot)
            ).fetchone()[0]
            if got:
                self._slots[job] = slot
                self._held[job] = set()

    def _locks(self, conn: Any) -> dict[int, set[int]]:
        """Every process's lane and registration locks, read at most once per refresh_s."""
        now = time.monotonic()
        if self._read_at is None or now - self._read_at >= self.refresh_s:
            view: dict[int, set[int]] = defaultdict(set)
            for cls, obj in self._execute(conn, _LOCKS_SQL).fetchall():
                view[int(cls)].add(int(obj))
            self._view, self._read_at = view, now
        return self._view

    def _rebalance(self, job: str) -> set[int]:
        conn = self._connection()
        cls = job_class(job)
        self._register(conn, job, cls)
        held = self._held[job]
        taken = self._locks(conn).setdefault(cls, set())
        # this process's own locks are its bookkeeping, whatever the view (maybe older) says
        workers = len({t for t in taken if t >= _SLOT_BASE} | {self._slots[job]})
        share = math.ceil(LANES / workers)
        if len(held) > share:
            extra = random.sample(sorted(held), len(held) - share)
            self._execute(
                conn,
                "SELECT pg_advisory_unlock(%s::int, l) FROM unnest(%s::int[]) l",
                (cls, extra),
            )
            held.difference_update(extra)
            taken.difference_update(extra)
        elif len(held) < share:
            # never a lane this process holds: a second lock of it would outlive the unlock
            busy = {t for t in taken if t < _SLOT_BASE} | held
            free = [lane for lane in range(LANES) if lane not in busy]
            random.shuffle(free)
            want = free[: share - len(held)]
            if want:
                rows = self._execute(
                    conn,
                    "SELECT l, pg_try_advisory_lock(%s::int, l) FROM unnest(%s::int[]) l",
                    (cls, want),
                ).fetchall()
                got = {int(lane) for lane, ok in rows if ok}
                held.update(got)
                taken.update(want)  # ours now, or another's: not free either way
        return held

    def _drop(self) -> None:
        """Forget everything: a broken connection has lost its locks on the server too."""
        self._held.clear()
        self._slots.clear()
        self._read_at = None
        if self._conn is not None:
            with contextlib.suppress(Exception):  # already broken
                self._conn.close()
            self._conn = None

    def close(self) -> None:
        with self._lock:
            self._drop()
