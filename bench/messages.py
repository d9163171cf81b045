"""Message browser searches on a store of N packets (1 M by default): by patient, first page,
and deep keyset paging, through ``bridge.messages.search`` (what ``/ui/messages`` and
``hutong messages search`` run).

The store is a node's SQLite file made by ``Store.create_all`` (so the browser's indexes are
those a node makes), loaded with ``executemany`` on the raw sqlite3 connection: half outbox,
half inbox, plus 1 % quarantined input (each under a patient's hash); ten packets per patient
(N/10 keyed patient hashes), spread over 30 days. Bodies are a few bytes (search reads headers
only). Then, in-process:

* ``patient``: every box for one patient's hash (the ID-number lookup), ``QUERIES`` random
  patients, p50 / p95 / max milliseconds, rows found (10 packets, plus a quarantined item
  for every tenth patient) and the boxes they came from; the query
  plan of each box's statement (``SEARCH ... USING INDEX ix_*_patient*``);
* ``first page``: the newest 50 across the boxes, no filter;
* ``page 200``: following the keyset token 200 pages deep (ms per page at the end).

Run alone: ``.venv/bin/python bench/messages.py [N]``.
"""

from __future__ import annotations

import random
import sqlite3
import statistics
import sys
import tempfile
import time
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bridge import messages as mb
from bridge.store.db import Store

QUERIES = 200
CHUNK = 100_000
PEERS = ("chc", "yuetan", "platform", "lab")
KINDS = ("referral.request", "referral.status", "result.lab", "imaging.report")


def _ts(d: datetime) -> str:
    return d.strftime("%Y-%m-%d %H:%M:%S.%f")


def load(path: Path, n: int, seed: int = 7) -> list[str]:
    """Fill the store; returns the patient hashes used."""
    rng = random.Random(seed)
    patients = [f"{rng.getrandbits(128):032x}" for _ in range(max(1, n // 10))]
    start = datetime(2026, 11, 1, tzinfo=UTC)
    span = 30 * 86400
    half = n // 2
    with closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA synchronous=OFF")
        db.execute("PRAGMA cache_size=-200000")
        out_sql = ("INSERT INTO outbox (packet_id, origin, sender, recipient, next_hop, kind, "
                   "thread, seq, digest, size, patient_hash, state, attempts, created_at, "
                   "next_try_at, body) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)")
        in_sql = ("INSERT INTO inbox (packet_id, sender, kind, thread, seq, digest, size, "
                  "patient_hash, state, attempts, created_at, received_at, next_try_at, body, "
                  "receipt) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)")
        q_sql = ("INSERT INTO quarantine (at, source, code, message, sender, packet_id, kind, "
                 "state, raw, patient_hash, trusted) VALUES (?,?,?,?,?,?,?,?,?,?,1)")
        for box, count, sql in (("out", half, out_sql), ("in", n - half, in_sql)):
            done = 0
            while done < count:
                rows = []
                for i in range(done, min(count, done + CHUNK)):
                    k = i * 2 + (box == "in")  # packet k belongs to patient k % len
                    at = _ts(start + timedelta(seconds=span * k / n))
                    pid = f"{box}-{i:09d}"
                    peer = PEERS[k % len(PEERS)]
                    ph = patients[k % len(patients)]
                    thread = f"t-{k // 4:09d}"
                    if box == "out":
                        rows.append((pid, "local", "core", peer, peer, KINDS[k % 4], thread,
                                     i, "0" * 64, 900, ph, "acknowledged", 1, at, at, b"{}"))
                    else:
                        rows.append((pid, peer, KINDS[k % 4], thread, i, "0" * 64, 900, ph,
                                     "delivered", 1, at, at, at, b"{}", b"{}"))
                db.execute("BEGIN")
                db.executemany(sql, rows)
                db.execute("COMMIT")
                done += len(rows)
        db.execute("BEGIN")
        db.executemany(q_sql, [(_ts(start + timedelta(seconds=span * i / max(1, n // 100))),
                                "peer", "HT-SIGNATURE", "bad signature", PEERS[i % 4],
                                f"q-{i:07d}", KINDS[i % 4], "held", b"x",
                                patients[(i * 7) % len(patients)])
                               for i in range(n // 100)])
        db.execute("COMMIT")
        db.execute("ANALYZE")
    return patients


def measure(root: Path, n: int) -> dict[str, Any]:
    path = root / "node.db"
    store = Store(f"sqlite:///{path}")
    store.create_all()  # the node's schema and the browser's indexes
    store.dispose()
    t = time.perf_counter()
    patients = load(path, n)
    load_s = time.perf_counter() - t
    store = Store(f"sqlite:///{path}")
    rng = random.Random(11)
    ms: list[float] = []
    found: set[int] = set()
    boxes: set[str] = set()
    try:
        with store.read() as conn:
            for ph in rng.sample(patients, min(QUERIES, len(patients))):
                t = time.perf_counter()
                rows, _nxt = mb.search(conn, patient_hash=ph)
                ms.append((time.perf_counter() - t) * 1000)
                found.add(len(rows))
                boxes |= {r["box"] for r in rows}
            plans = {box: _plan(conn, stmt) for box, stmt in
                     mb.statements(patient_hash=patients[0])}
            t = time.perf_counter()
            _first, token = mb.search(conn)
            first_ms = (time.perf_counter() - t) * 1000
            deep_ms = 0.0
            for _ in range(200):
                t = time.perf_counter()
                page, token = mb.search(conn, after=token)
                deep_ms = (time.perf_counter() - t) * 1000
                assert token is not None and len(page) == mb.PAGE
    finally:
        store.dispose()
    ms.sort()
    return {"packets": n, "load_s": round(load_s, 1),
            "patient_p50_ms": round(statistics.median(ms), 2),
            "patient_p95_ms": round(ms[int(len(ms) * 0.95) - 1], 2),
            "patient_max_ms": round(ms[-1], 2), "rows_per_patient": sorted(found),
            "boxes_found": sorted(boxes), "plans": plans,
            "first_page_ms": round(first_ms, 2), "page_200_ms": round(deep_ms, 2),
            "db_mb": round(path.stat().st_size / 2**20, 1)}


def _plan(conn: Any, stmt: Any) -> str:
    """SQLite's plan of one box's statement, one line (the index it searches)."""
    sql = str(stmt.compile(conn, compile_kwargs={"literal_binds": True}))
    return " | ".join(r[-1] for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql))


def messages(root: Path, levels: tuple[int, ...] = (1_000_000,)) -> list[dict[str, Any]]:
    out = []
    for n in levels:
        sub = root / str(n)
        sub.mkdir(parents=True, exist_ok=True)
        out.append(measure(sub, n))
    return out


if __name__ == "__main__":
    size = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    with tempfile.TemporaryDirectory(prefix="hutong-bench-messages-") as d:
        for r in messages(Path(d), (size,)):
            print(r)
