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

How many processes work each job is read from ``pg_locks`` once per ``refresh_s`` for all the
process's jobs at once (one row per job), and a job short of its share reads its busy lanes at
most once per ``refresh_s``; a round that changes nothing sends no statement. A platform runs a
send job per member: reading the lock table (thousands of lane locks) for each of them every
round, one at a time on the one lanes connection, kept its relay jobs waiting seconds in
``hold``. Between two reads a job's lanes are what this process locked (its own bookkeeping); a
lost connection is found at the next read (within ``refresh_s``), and its locks are then gone
for everyone.

SQLite has one writer anyway: a SQLite node is one process and uses no lanes.
"""

from __future__ import annotations

import contextlib
import math
import random
import threading
import time
import zlib
from typing import Any

from sqlalchemy import ColumnElement, func

from bridge.errors import StoreError

LANES = 64  # a power of two: lane = hashtext(thread) & (LANES - 1)
_SLOT_BASE = LANES  # lock object ids >= LANES are registrations, below are lanes

#: processes registered per job class (registration locks), in this database
_WORKERS_SQL = """
SELECT classid::bigint, count(*) FROM pg_locks
WHERE locktype = 'advisory' AND objsubid = 2 AND granted AND objid::bigint >= %s
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
GROUP BY 1
"""
#: the lanes of one job class held by any process
_LANES_SQL = """
SELECT objid::bigint FROM pg_locks
WHERE locktype = 'advisory' AND objsubid = 2 AND granted
  AND classid = %s::bigint::oid AND objid::bigint < %s
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
        self._workers: dict[int, int] = {}  # job class -> processes registered, at the last read
        self._busy: dict[int, set[int]] = {}  # job class -> lanes held by anyone, since then
        self._fresh: set[str] = set()  # jobs registered since the last read
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

    def alone(self) -> bool:
        """Did this process work every job alone at the last read of ``pg_locks`` (no other
        process registered for any)? Then no other process needs a wake-up."""
        with self._lock:
            return all(n <= 1 for n in self._workers.values())

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
                self._fresh.add(job)

    def _registered(self, conn: Any, job: str, cls: int) -> int:
        """Processes working ``job``: read for every job at once, at most once per refresh_s."""
        now = time.monotonic()
        if self._read_at is None or now - self._read_at >= self.refresh_s:
            rows = self._execute(conn, _WORKERS_SQL, (_SLOT_BASE,)).fetchall()
            self._workers = {int(c): int(n) for c, n in rows}
            self._busy.clear()
            self._fresh.clear()
            self._read_at = now
        return max(1, self._workers.get(cls, 0) + (job in self._fresh))

    def _busy_lanes(self, conn: Any, cls: int) -> set[int]:
        """The job's lanes held by any process, read once per refresh (only when short)."""
        busy = self._busy.get(cls)
        if busy is None:
            rows = self._execute(conn, _LANES_SQL, (cls, LANES)).fetchall()
            busy = self._busy[cls] = {int(r[0]) for r in rows}
        return busy

    def _rebalance(self, job: str) -> set[int]:
        conn = self._connection()
        cls = job_class(job)
        self._register(conn, job, cls)
        held = self._held[job]
        share = math.ceil(LANES / self._registered(conn, job, cls))
        if len(held) > share:
            extra = random.sample(sorted(held), len(held) - share)
            self._execute(
                conn,
                "SELECT pg_advisory_unlock(%s::int, l) FROM unnest(%s::int[]) l",
                (cls, extra),
            )
            held.difference_update(extra)
            self._busy.get(cls, set()).difference_update(extra)
        elif len(held) < share:
            # never a lane this process holds: a second lock of it would outlive the unlock
            busy = self._busy_lanes(conn, cls)
            free = [lane for lane in range(LANES) if lane not in busy and lane not in held]
            random.shuffle(free)
            want = free[: share - len(held)]
            if want:
                rows = self._execute(
                    conn,
                    "SELECT l, pg_try_advisory_lock(%s::int, l) FROM unnest(%s::int[]) l",
                    (cls, want),
                ).fetchall()
                held.update(int(lane) for lane, ok in rows if ok)
                busy.update(want)  # ours now, or another's: not free either way
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
