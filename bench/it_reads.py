"""IT's reads of the queues (the dashboard and ``/metrics``: ``console.snapshot``; the IT page
and ``/local/v1/queues``: ``ops.queue_summary``) on a store with N finished packets, the old
statements (every outbox row per request) and the new ones (``bridge/store/counts.py`` and
the console's window queries) alternating in one process, so the ratio is one run's.

    .venv/bin/python bench/it_reads.py --levels 10000,1000000 --rounds 3

The history is ``growth.fill``'s (A's outbox acknowledged, B's inbox delivered, both in one
SQLite store here), plus 60 packets of the last hour: waiting, sent, dead with an error,
acknowledged.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import growth
from sqlalchemy import Connection, func, select

from bridge.console import _ACKED_SINCE, _CREATED_SINCE, _OPEN_ERRORS
from bridge.store import counts
from bridge.store.db import Store
from bridge.store.tables import INBOX, OUTBOX

HOPS = ("hub", "m-1", "m-2")


def old_reads(conn: Connection, since: datetime) -> int:
    """The statements of console.snapshot and ops.queue_summary before bridge/store/counts.py."""
    n = len(
        conn.execute(
            select(OUTBOX.c.next_hop, OUTBOX.c.state, func.count()).group_by(
                OUTBOX.c.next_hop, OUTBOX.c.state
            )
        ).all()
    )
    n += len(
        conn.execute(
            select(OUTBOX.c.next_hop, func.min(OUTBOX.c.created_at))
            .where(OUTBOX.c.state.in_(("queued", "sent")))
            .group_by(OUTBOX.c.next_hop)
        ).all()
    )
    n += len(
        conn.execute(
            select(OUTBOX.c.next_hop, OUTBOX.c.state, OUTBOX.c.created_at, OUTBOX.c.acked_at).where(
                (OUTBOX.c.created_at >= since) | (OUTBOX.c.acked_at >= since)
            )
        ).all()
    )
    n += len(
        conn.execute(
            select(OUTBOX.c.next_hop, OUTBOX.c.last_error)
            .where(OUTBOX.c.last_error.is_not(None))
            .order_by(OUTBOX.c.id.desc())
            .limit(200)
        ).all()
    )
    n += len(conn.execute(select(INBOX.c.state, func.count()).group_by(INBOX.c.state)).all())
    # queue_summary
    n += len(
        conn.execute(
            select(
                OUTBOX.c.next_hop, OUTBOX.c.state, func.count(), func.min(OUTBOX.c.created_at)
            ).group_by(OUTBOX.c.next_hop, OUTBOX.c.state)
        ).all()
    )
    n += len(
        conn.execute(
            select(INBOX.c.state, func.count(), func.min(INBOX.c.received_at)).group_by(
                INBOX.c.state
            )
        ).all()
    )
    return n


def new_reads(conn: Connection, since: datetime) -> int:
    """The same answers as console.snapshot and ops.queue_summary read them now."""
    out = counts.outbox(conn)
    recent = list(conn.execute(_CREATED_SINCE, {"since": since}))
    for hop in sorted({r[0] for r in out} | set(HOPS)):
        recent += conn.execute(_ACKED_SINCE, {"hop": hop, "since": since}).all()
    errors = conn.execute(_OPEN_ERRORS).all()
    inbox = counts.inbox(conn)
    # queue_summary
    out2 = counts.outbox(conn)
    inbox2 = counts.inbox(conn)
    return len(out) + len(recent) + len(errors) + len(inbox) + len(out2) + len(inbox2)


def recent_rows(path: str) -> None:
    now = datetime.now(UTC).replace(tzinfo=None)
    rows = []
    for i in range(60):
        t = f"{now - timedelta(minutes=i):%Y-%m-%d %H:%M:%S}.000000"
        st = ("queued", "sent", "dead", "acknowledged")[i % 4]
        rows.append(
            (f"recent-{i}", "local", "a", HOPS[i % 3], HOPS[i % 3], "result.lab", f"r-{i}", 1,
             "d", 10, st, 1, t, t, t if st == "acknowledged" else None,
             "HT-NET: timeout" if st in ("dead", "queued") else None)
        )  # fmt: skip
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany(
        "INSERT INTO outbox (packet_id, origin, sender, recipient, next_hop, kind, thread, seq, "
        "digest, size, state, attempts, created_at, next_try_at, acked_at, last_error) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        rows,
    )
    conn.execute("COMMIT")
    conn.close()


def timed(fn: Callable[[Connection, datetime], int], store: Store) -> tuple[float, int]:
    since = datetime.now(UTC) - timedelta(hours=24)
    t0 = time.perf_counter()
    with store.read() as conn:
        n = fn(conn, since)
    return (time.perf_counter() - t0) * 1000, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levels", default="10000,1000000")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="it-reads-") as tmp:
        path = str(Path(tmp) / "node.db")
        dsn = f"sqlite:///{path}"
        Store(dsn).create_all()
        recent_rows(path)
        for level in (int(x) for x in args.levels.split(",")):
            for table in ("outbox", "inbox"):
                wall, _ = growth.fill(dsn, table, level)
                print(f"{table} filled to {level:,} in {wall:.1f} s", flush=True)
            store = Store(dsn)
            try:
                res: dict[str, list[float]] = {"old": [], "new": []}
                answers: dict[str, Any] = {}
                for _ in range(args.rounds):
                    for name, fn in (("old", old_reads), ("new", new_reads)):
                        ms, n = timed(fn, store)
                        res[name].append(ms)
                        answers[name] = n
                print(
                    f"{level:>9,} rows: old "
                    + " / ".join(f"{x:,.1f}" for x in res["old"])
                    + " ms; new "
                    + " / ".join(f"{x:,.1f}" for x in res["new"])
                    + " ms",
                    flush=True,
                )
            finally:
                store.dispose()


if __name__ == "__main__":
    main()
