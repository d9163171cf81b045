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

import itertools
import os
import random
import re
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
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


OUT_COLS = (
    "packet_id",
    "origin",
    "sender",
    "recipient",
    "next_hop",
    "kind",
    "thread",
    "seq",
    "digest",
    "size",
    "patient_hash",
    "state",
    "attempts",
    "created_at",
    "next_try_at",
    "body",
)
IN_COLS = (
    "packet_id",
    "sender",
    "kind",
    "thread",
    "seq",
    "digest",
    "size",
    "patient_hash",
    "state",
    "attempts",
    "created_at",
    "received_at",
    "next_try_at",
    "body",
    "receipt",
)
Q_COLS = (
    "at",
    "source",
    "code",
    "message",
    "sender",
    "packet_id",
    "kind",
    "state",
    "raw",
    "patient_hash",
    "trusted",
)


def generate(n: int, seed: int = 7) -> tuple[list[str], dict[str, Iterator[tuple[Any, ...]]]]:
    """The patients' hashes, and each table's rows (columns ``*_COLS``) as generators."""
    rng = random.Random(seed)
    patients = [f"{rng.getrandbits(128):032x}" for _ in range(max(1, n // 10))]
    start = datetime(2026, 11, 1, tzinfo=UTC)
    span = 30 * 86400
    half = n // 2

    def packets(box: str, count: int) -> Iterator[tuple[Any, ...]]:
        for i in range(count):
            k = i * 2 + (box == "in")  # packet k belongs to patient k % len
            at = _ts(start + timedelta(seconds=span * k / n))
            pid = f"{box}-{i:09d}"
            peer = PEERS[k % len(PEERS)]
            ph = patients[k % len(patients)]
            thread = f"t-{k // 4:09d}"
            if box == "out":
                yield (
                    pid,
                    "local",
                    "core",
                    peer,
                    peer,
                    KINDS[k % 4],
                    thread,
                    i,
                    "0" * 64,
                    900,
                    ph,
                    "acknowledged",
                    1,
                    at,
                    at,
                    b"{}",
                )
            else:
                yield (
                    pid,
                    peer,
                    KINDS[k % 4],
                    thread,
                    i,
                    "0" * 64,
                    900,
                    ph,
                    "delivered",
                    1,
                    at,
                    at,
                    at,
                    b"{}",
                    b"{}",
                )

    def held() -> Iterator[tuple[Any, ...]]:
        for i in range(n // 100):
            yield (
                _ts(start + timedelta(seconds=span * i / max(1, n // 100))),
                "peer",
                "HT-SIGNATURE",
                "bad signature",
                PEERS[i % 4],
                f"q-{i:07d}",
                KINDS[i % 4],
                "held",
                b"x",
                patients[(i * 7) % len(patients)],
                True,
            )

    return patients, {
        "outbox": packets("out", half),
        "inbox": packets("in", n - half),
        "quarantine": held(),
    }


def load(path: Path, n: int, seed: int = 7) -> list[str]:
    """Fill the SQLite store; returns the patient hashes used."""
    patients, tables = generate(n, seed)
    cols = {"outbox": OUT_COLS, "inbox": IN_COLS, "quarantine": Q_COLS}
    with closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA synchronous=OFF")
        db.execute("PRAGMA cache_size=-200000")
        for table, rows in tables.items():
            sql = (
                f"INSERT INTO {table} ({', '.join(cols[table])}) VALUES "
                f"({', '.join('?' * len(cols[table]))})"
            )
            while True:
                chunk = list(itertools.islice(rows, CHUNK))
                if not chunk:
                    break
                db.execute("BEGIN")
                db.executemany(sql, chunk)
                db.execute("COMMIT")
        db.execute("ANALYZE")
    return patients


def load_pg(dsn: str, n: int, seed: int = 7) -> list[str]:
    """Fill a PostgreSQL store by COPY; returns the patient hashes used."""
    import psycopg

    patients, tables = generate(n, seed)
    cols = {"outbox": OUT_COLS, "inbox": IN_COLS, "quarantine": Q_COLS}
    with psycopg.connect(re.sub(r"^postgres(ql)?(\+\w+)?://", "postgresql://", dsn)) as conn:
        for table, rows in tables.items():
            with (
                conn.cursor() as cur,
                cur.copy(f"COPY {table} ({', '.join(cols[table])}) FROM STDIN") as copy,
            ):
                for row in rows:
                    copy.write_row(row)
        conn.commit()
        conn.autocommit = True
        for table in tables:
            conn.execute(f"VACUUM ANALYZE {table}")
    return patients


def measure(root: Path, n: int, pg_dsn: str | None = None) -> dict[str, Any]:
    """The figures on a SQLite store under ``root``, or on the PostgreSQL database
    ``pg_dsn`` (empty, made into a node's store here)."""
    path = root / "node.db"
    dsn = pg_dsn or f"sqlite:///{path}"
    store = Store(dsn)
    store.create_all()  # the node's schema and the browser's indexes
    store.dispose()
    t = time.perf_counter()
    patients = load_pg(dsn, n) if pg_dsn else load(path, n)
    load_s = time.perf_counter() - t
    store = Store(dsn)
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
            plans = {
                box: _plan(conn, stmt) for box, stmt in mb.statements(patient_hash=patients[0])
            }
            t = time.perf_counter()
            _first, token = mb.search(conn)
            first_ms = (time.perf_counter() - t) * 1000
            deep_ms = 0.0
            for _ in range(200):
                t = time.perf_counter()
                page, token = mb.search(conn, after=token)
                deep_ms = (time.perf_counter() - t) * 1000
                assert token is not None and len(page) == mb.PAGE
            if pg_dsn:
                size = conn.exec_driver_sql("SELECT pg_database_size(current_database())")
                db_mb = round(int(size.scalar_one()) / 2**20, 1)
            else:
                db_mb = round(path.stat().st_size / 2**20, 1)
    finally:
        store.dispose()
    ms.sort()
    return {
        "packets": n,
        "db": "postgresql" if pg_dsn else "sqlite",
        "load_s": round(load_s, 1),
        "patient_p50_ms": round(statistics.median(ms), 2),
        "patient_p95_ms": round(ms[int(len(ms) * 0.95) - 1], 2),
        "patient_max_ms": round(ms[-1], 2),
        "rows_per_patient": sorted(found),
        "boxes_found": sorted(boxes),
        "plans": plans,
        "first_page_ms": round(first_ms, 2),
        "page_200_ms": round(deep_ms, 2),
        "db_mb": db_mb,
    }


def _plan(conn: Any, stmt: Any) -> str:
    """The plan of one box's statement, one line: SQLite's ``EXPLAIN QUERY PLAN``, or the
    node lines of PostgreSQL's ``EXPLAIN`` (the planner's own choice, on analysed tables)."""
    sql = str(stmt.compile(conn, compile_kwargs={"literal_binds": True}))
    if conn.dialect.name == "sqlite":
        return " | ".join(r[-1] for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql))
    lines = [r[0] for r in conn.exec_driver_sql("EXPLAIN (COSTS OFF) " + sql)]
    return " | ".join(line.strip() for line in lines if "Cond" not in line)


def messages(
    root: Path, levels: tuple[int, ...] = (1_000_000,), pg: Any = None
) -> list[dict[str, Any]]:
    """Each level on SQLite, and on PostgreSQL when ``pg`` (bench/exchange.PgServer) is up."""
    out = []
    for n in levels:
        sub = root / str(n)
        sub.mkdir(parents=True, exist_ok=True)
        out.append(measure(sub, n))
        if pg is not None and pg.ok:
            try:
                out.append(measure(sub, n, next(iter(pg.new_dbs().values()))))
            finally:
                pg.drop_dbs()
    return out


if __name__ == "__main__":
    # bench/messages.py [N] [PostgreSQL DSN of an empty database, or HUTONG_PG_DSN]
    size = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    pg_dsn = sys.argv[2] if len(sys.argv) > 2 else os.environ.get("HUTONG_PG_DSN")
    with tempfile.TemporaryDirectory(prefix="hutong-bench-messages-") as d:
        print(measure(Path(d), size, pg_dsn) if pg_dsn else messages(Path(d), (size,))[0])
