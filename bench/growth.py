"""Store growth: packets/s A -> B (SQLite, 4 KiB, 50 threads) with 10 k, 100 k, ... packets
already in both stores.

The history is bulk-loaded, not sent: ``executemany`` of finished rows straight into A's
``outbox`` (acknowledged, with a receipt) and B's ``inbox`` (delivered), as retention leaves
them after ``body_days`` (headers, digests and receipts kept, bodies purged), in chunks of 20 k
rows in one transaction each. Sending 1 M packets through the protocol would take about an
hour on this machine; the rows and indexes the exchange path touches are the same either way.
The audit chain is not back-filled (it is append-only and its head is read by sequence).
Then the usual throughput run (``exchange.throughput``: A stopped, N packets queued, A started,
steady rate counted at B) measures the rate on top of that history.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import exchange as ex
from sqlalchemy import create_engine, func, insert, select

from bridge.store.tables import INBOX, OUTBOX

CHUNK = 20_000


def fill(dsn: str, table: Any, target: int, make: Any) -> float:
    """Top ``table`` up to ``target`` rows; returns the seconds it took."""
    engine = create_engine(dsn)
    t0 = time.perf_counter()
    try:
        with engine.connect() as conn:
            have = conn.execute(select(func.count()).select_from(table)).scalar_one()
        i = have
        while i < target:
            rows = [make(j) for j in range(i, min(target, i + CHUNK))]
            with engine.begin() as conn:
                conn.execute(insert(table), rows)
            i += len(rows)
    finally:
        engine.dispose()
    return time.perf_counter() - t0


def history_rows(tag: str) -> tuple[Any, Any]:
    base = datetime.now(UTC) - timedelta(days=90)
    receipt = secrets.token_bytes(260)  # about a signed receipt's size

    def common(j: int) -> dict[str, Any]:
        at = base + timedelta(seconds=j)
        return {"packet_id": f"{tag}-{j:08d}", "sender": ex.A, "kind": ex.KIND,
                "thread": f"{tag}-t{j % 5000}", "seq": j // 5000 + 1,
                "digest": hashlib.sha256(str(j).encode()).hexdigest(), "size": 4096,
                "patient_hash": hashlib.sha256(f"p{j % 20000}".encode()).hexdigest(),
                "attempts": 1, "created_at": at, "next_try_at": at, "receipt": receipt}

    def outbox(j: int) -> dict[str, Any]:
        return common(j) | {"origin": "local", "recipient": ex.B, "next_hop": ex.B,
                            "state": "acknowledged", "sent_at": base + timedelta(seconds=j),
                            "acked_at": base + timedelta(seconds=j)}

    def inbox(j: int) -> dict[str, Any]:
        return common(j) | {"state": "delivered", "received_at": base + timedelta(seconds=j)}

    return outbox, inbox


def growth(root: Path, levels: tuple[int, ...], n: int, timeout: float = 300.0
           ) -> list[dict[str, Any]]:
    pair = ex.Pair(root / "alliance-growth", "sqlite", None)
    out = []
    try:
        outbox, inbox = history_rows("hist")
        for level in levels:
            pair.a.stop()
            load_a = fill(pair.a.plan.storage_dsn, OUTBOX, level, outbox)
            load_b = fill(pair.b.plan.storage_dsn, INBOX, level, inbox)
            r = ex.throughput(pair, 4096, n, ex.MANY_THREADS, f"growth-{level}", timeout)
            size_b = sum(p.stat().st_size for p in Path(pair.b.plan.data_dir).glob("*.db*"))
            row = {"history": level, "n": n, "steady_pps": r["steady_pps"],
                   "wall_pps": r["wall_pps"], "load_a_s": load_a, "load_b_s": load_b,
                   "b_db_mb": size_b / 1e6, "cpu_others": r["cpu_others"],
                   "rss_a_peak_mib": r.get("rss_a_peak_mib"),
                   "rss_b_peak_mib": r.get("rss_b_peak_mib")}
            out.append(row)
            ex.console.print(f"  {level:>9,} packets in the store: {r['steady_pps']:6.0f} "
                             f"packets/s steady (history loaded in {load_a + load_b:.0f} s, "
                             f"B's database {row['b_db_mb']:.0f} MB)")
    finally:
        pair.close()
    return out
