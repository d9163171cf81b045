"""Store growth: packets/s A -> B (SQLite, 4 KiB, 50 threads) with 10 k, 100 k and 1 M packets
already in both stores.

The history is bulk-loaded, not sent: ``executemany`` of finished rows with raw ``sqlite3``
straight into A's ``outbox`` (acknowledged, with a receipt) and B's ``inbox`` (delivered), as
retention leaves them after ``body_days`` (headers, digests and receipts kept, bodies purged),
100 k rows per transaction, with the node's own tables and indexes (``hutong run`` created them).
Both nodes are stopped while their store is loaded, so the load can run with
``synchronous=OFF`` (one ``fsync`` at the end instead of one per transaction); the exchange runs
afterwards with the node's normal settings. Sending 1 M packets through the protocol would take
about an hour on this machine; the rows and indexes the exchange path touches are the same
either way. The audit chain is not back-filled (it is append-only and its head is read by
sequence). Then the usual throughput run (``exchange.throughput``: A stopped, N packets queued,
A started, steady rate counted at B) measures the rate on top of that history.
"""

from __future__ import annotations

import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import exchange as ex

CHUNK = 200_000  # rows per transaction
RECEIPT = bytes(range(256)) + b"sig."  # about a signed receipt's size (260 bytes)
PATIENTS = 20_000
THREADS = 5_000

# Row j of the history: one packet a second from 90 days ago, 5,000 threads, 20,000 patients;
# timestamps exactly as SQLAlchemy writes them on SQLite (naive UTC, "YYYY-MM-DD HH:MM:SS.ffffff").
_ROWS = """WITH RECURSIVE c(j) AS (SELECT :start UNION ALL SELECT j + 1 FROM c WHERE j + 1 < :stop),
r(j, t) AS (SELECT j, strftime('%Y-%m-%d %H:%M:%S', :base, '+' || j || ' seconds') || '.000000'
            FROM c)
"""
_FIELDS = (
    "printf('%s-%08d', :tag, j) AS packet_id, :a AS sender, :kind AS kind, "
    "printf('%s-t%d', :tag, j % :threads) AS thread, j / :threads + 1 AS seq, "
    "lower(hex(randomblob(32))) AS digest, 4096 AS size, "
    "printf('%064x', j % :patients) AS patient_hash, 1 AS attempts, "
    "t AS created_at, t AS next_try_at, :receipt AS receipt"
)
SQL = {
    "outbox": _ROWS + "INSERT INTO outbox (packet_id, sender, kind, thread, seq, digest, size, "
    "patient_hash, attempts, created_at, next_try_at, receipt, origin, recipient, next_hop, "
    "state, sent_at, acked_at) SELECT "
    + _FIELDS
    + ", 'local', :b, :b, 'acknowledged', t, t FROM r",
    "inbox": _ROWS + "INSERT INTO inbox (packet_id, sender, kind, thread, seq, digest, size, "
    "patient_hash, attempts, created_at, next_try_at, receipt, state, received_at, "
    "delivered_at) SELECT " + _FIELDS + ", 'delivered', t, t FROM r",
}


def _path(dsn: str) -> str:
    if not dsn.startswith("sqlite:///"):
        raise ValueError("growth loads SQLite stores only")
    return dsn[len("sqlite:///") :]


def fill(dsn: str, table: str, target: int, tag: str = "hist") -> tuple[float, float]:
    """Top ``table`` up to ``target`` rows (the node is stopped); returns the wall and CPU
    seconds it took (CPU: this thread's, to judge a load on a shared machine).
    The rows are made by SQLite itself (``INSERT ... SELECT`` over a counter), ``CHUNK`` per
    transaction: at 1 M rows, building them in Python took longer than inserting them."""
    base = datetime.now(UTC).replace(tzinfo=None, microsecond=0) - timedelta(days=90)
    t0, c0 = time.perf_counter(), time.thread_time()
    conn = sqlite3.connect(_path(dsn), isolation_level=None, timeout=30)
    try:
        conn.execute("PRAGMA synchronous=OFF")  # made durable at the end, see below
        conn.execute("PRAGMA cache_size=-262144")  # 256 MiB: the indexes stay in memory
        have = conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
        i = have
        while i < target:
            stop = min(target, i + CHUNK)
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(
                SQL[table],
                {
                    "start": i,
                    "stop": stop,
                    "base": f"{base:%Y-%m-%d %H:%M:%S}",
                    "tag": tag,
                    "a": ex.A,
                    "b": ex.B,
                    "kind": ex.KIND,
                    "threads": THREADS,
                    "patients": PATIENTS,
                    "receipt": RECEIPT,
                },
            )
            conn.execute("COMMIT")
            i = stop
        # synchronous=FULL, then a checkpoint: the WAL and the database file are fsynced once,
        # here, so the exchange run that follows does not pay for the load's dirty pages
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    finally:
        conn.close()
    return time.perf_counter() - t0, time.thread_time() - c0


def growth(
    root: Path, levels: tuple[int, ...], n: int, timeout: float = 300.0
) -> list[dict[str, Any]]:
    pair = ex.Pair(root / "alliance-growth", "sqlite", None, start_b=False)
    out = []
    try:
        for level in levels:
            pair.a.stop()
            pair.b.stop()
            with ThreadPoolExecutor(2) as pool:  # sqlite3 releases the GIL: one core each
                fa = pool.submit(fill, pair.a.plan.storage_dsn, "outbox", level)
                fb = pool.submit(fill, pair.b.plan.storage_dsn, "inbox", level)
                (load_a, cpu_a), (load_b, cpu_b) = fa.result(), fb.result()
            pair.restart_b()
            r = ex.throughput(
                pair, 4096, n, ex.MANY_THREADS, f"growth-{level}", timeout, wait_delivered=False
            )
            size_b = sum(p.stat().st_size for p in Path(pair.b.plan.data_dir).glob("*.db*"))
            row = {
                "history": level,
                "n": n,
                "steady_pps": r["steady_pps"],
                "wall_pps": r["wall_pps"],
                "load_a_s": load_a,
                "load_b_s": load_b,
                "load_cpu_s": cpu_a + cpu_b,
                "b_db_mb": size_b / 1e6,
                "cpu_a": r["cpu_a"],
                "cpu_b": r["cpu_b"],
                "cpu_others": r["cpu_others"],
                "rss_a_peak_mib": r.get("rss_a_peak_mib"),
                "rss_b_peak_mib": r.get("rss_b_peak_mib"),
            }
            out.append(row)
            ex.console.print(
                f"  {level:>9,} packets in the store: {r['steady_pps']:6.0f} "
                f"packets/s steady (history loaded in {max(load_a, load_b):.0f} s, "
                f"B's database {row['b_db_mb']:.0f} MB)"
            )
    finally:
        pair.close()
    return out
