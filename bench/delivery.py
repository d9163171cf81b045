"""B's local delivery of result packets as its FHIR store grows, with its intake running beside it.

Run ``.venv/bin/python bench/delivery.py [--levels 0,100000] [-n 3000] [--rate 150]``.
See bench/README.md (the ``growth`` section, "B's local delivery as the store grows").

B (``core``, SQLite) is opened in this process as ``hutong run`` opens it (``bridge.node.Node``,
no servers, no scheduler). At each level its store is first topped up, while it is closed, to
``level`` Observations of result packets (and a third as many ``result_packet`` and delivered
inbox rows): copies, made by SQLite itself, of the rows real deliveries wrote at the earlier
levels (each copied resource under a new random id, in ``fhir_resource``, ``fhir_history``,
``fhir_token`` and ``fhir_date``; the audit chain is not back-filled). Every packet is about one
patient, as ``exchange.py``'s are, so the history is one patient's years of results. Then N
packets sealed by A (4 KiB, 3 Observations, 50 threads) are posted into B's ``Intake.receive``
by one thread, 10 a call, at ``--rate`` packets/s (0: as fast as it takes them), while the main
thread runs B's ``Dispatcher.run_once`` until all N are delivered (results in the FHIR store,
bundles in the spool). Printed per level: delivered/s (N / first post -> all delivered), the
intake's time per call (p50 / p99: what a peer's batch waits), the delivery's write
transactions, CPU (its thread) and time holding the writer per packet, and the intake's wait
for the writer per write; then every statement of the delivery thread with its calls, µs per
call at each level and SQLite's ``EXPLAIN QUERY PLAN`` (parameters of its first call) at the
last level. The statement times are the cursor's ``execute`` only: what SQLite does while the
rows are fetched (pysqlite steps one row ahead of ``fetchone``) is in delivered/s and CPU, not
in the statement's figure (bench/README.md: the patient lookup before its index).
"""

from __future__ import annotations

import argparse
import contextlib
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import exchange as ex
import growth as gr
from sqlalchemy import event

from bridge.crypto import envelope as env
from bridge.crypto.keys import load_signing_key

COPIED = ("fhir_resource", "fhir_history", "fhir_token", "fhir_date")
PER_CALL = 10  # packets per intake call (a peer's batch is up to 200; smaller: more turns)


def fill_results(dsn: str, observations: int) -> float:
    """Top B's store up to ``observations`` Observation rows (the node is closed): copies of
    the Observations there, each under a new random id in every table that keys it, doubling
    at most per pass; result_packet rows (doubling too) and delivered inbox rows up to a
    third of that. Returns the seconds it took."""
    t0 = time.perf_counter()
    conn = sqlite3.connect(gr._path(dsn), isolation_level=None, timeout=30)
    try:
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute("PRAGMA cache_size=-262144")
        cols = {t: [r[1] for r in conn.execute(f"PRAGMA table_info({t})")] for t in COPIED}
        cols["fhir_history"].remove("seq")  # INTEGER PRIMARY KEY: numbered by SQLite
        conn.execute("CREATE TEMP TABLE m (old TEXT PRIMARY KEY, new TEXT)")
        while True:
            have = conn.execute(
                "SELECT count(*) FROM fhir_resource WHERE rtype = 'Observation'"
            ).fetchone()[0]
            if have >= observations or have == 0:
                break
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("DELETE FROM m")
            conn.execute(
                "INSERT INTO m SELECT id, lower(hex(randomblob(16))) FROM fhir_resource "
                "WHERE rtype = 'Observation' LIMIT ?",
                (observations - have,),
            )
            for table in COPIED:
                names = ", ".join(f'"{c}"' for c in cols[table])
                picked = ", ".join("m.new" if c == "id" else f't."{c}"' for c in cols[table])
                conn.execute(
                    f"INSERT INTO {table} ({names}) SELECT {picked} FROM {table} t "
                    "JOIN m ON t.rtype = 'Observation' AND t.id = m.old"
                )
            packets = conn.execute("SELECT count(*) FROM result_packet").fetchone()[0]
            conn.execute(
                "INSERT INTO result_packet SELECT lower(hex(randomblob(16))), sender, kind, "
                "thread, patient_hash, resources, at FROM result_packet LIMIT ?",
                (max(0, observations // 3 - packets),),
            )
            conn.execute("COMMIT")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    finally:
        conn.close()
    gr.fill(dsn, "inbox", observations // 3, tag=f"fill{observations}")
    return time.perf_counter() - t0


class Timer:
    """Wall time per (thread name, SQL text) from SQLAlchemy's cursor events on B's engines."""

    def __init__(self) -> None:
        self.total: dict[tuple[str, str], float] = {}
        self.calls: dict[tuple[str, str], int] = {}
        self.params: dict[str, Any] = {}
        self._undo: list[tuple[Any, str, Any]] = []

    def add(self, key: tuple[str, str], seconds: float) -> None:
        self.total[key] = self.total.get(key, 0.0) + seconds
        self.calls[key] = self.calls.get(key, 0) + 1

    def watch(self, engine: Any) -> None:
        def before(conn: Any, cursor: Any, sql: str, params: Any, ctx: Any, many: bool) -> None:
            conn.info.setdefault("_t", []).append(time.perf_counter())

        def after(conn: Any, cursor: Any, sql: str, params: Any, ctx: Any, many: bool) -> None:
            t = conn.info["_t"].pop()
            text = " ".join(sql.split())
            self.add((threading.current_thread().name, text), time.perf_counter() - t)
            if text not in self.params:
                self.params[text] = params[0] if many else params

        for name, fn in (("before_cursor_execute", before), ("after_cursor_execute", after)):
            event.listen(engine, name, fn)
            self._undo.append((engine, name, fn))

    def close(self) -> None:
        for engine, name, fn in self._undo:
            event.remove(engine, name, fn)


class Writes:
    """Per thread name: write transactions (``Store.write`` of one store), seconds waiting for
    the writer (the call to the open transaction: the process's lock, then BEGIN IMMEDIATE)
    and seconds holding it (the open transaction to its end, COMMIT included)."""

    def __init__(self) -> None:
        self.count: dict[str, int] = {}
        self.wait: dict[str, float] = {}
        self.hold: dict[str, float] = {}

    def add(self, name: str, wait: float, hold: float) -> None:
        self.count[name] = self.count.get(name, 0) + 1
        self.wait[name] = self.wait.get(name, 0.0) + wait
        self.hold[name] = self.hold.get(name, 0.0) + hold


@contextlib.contextmanager
def counted_writes(store: Any, writes: Writes) -> Iterator[None]:
    original = store.write

    @contextlib.contextmanager
    def write() -> Iterator[Any]:
        t0 = time.perf_counter()
        t1 = t0
        try:
            with original() as conn:
                t1 = time.perf_counter()
                yield conn
        finally:
            writes.add(threading.current_thread().name, t1 - t0, time.perf_counter() - t1)

    store.write = write
    try:
        yield
    finally:
        store.write = original


def sealed(plans: dict[str, Any], n: int, tag: str) -> list[bytes]:
    key = load_signing_key(plans["A"].keys.signing, plans["A"].keys.passphrase)
    pub = plans["B"].directory[ex.B].encryption_keys[0]
    seqs: dict[str, int] = {}
    out = []
    for i in range(n):
        thread = f"{tag}-{i % ex.MANY_THREADS}"
        seqs[thread] = seqs.get(thread, 0) + 1
        out.append(
            env.seal(
                ex.body_of(4096),
                sender=ex.A,
                recipient=ex.B,
                kind=ex.KIND,
                thread=thread,
                seq=seqs[thread],
                signing_key=key,
                recipient_key=pub,
            )
        )
    return out


def run_level(plans: dict[str, Any], level: int, n: int, rate: float, timer: Timer) -> dict:
    from bridge.node import Node

    load_s = fill_results(plans["B"].storage_dsn, level) if level else 0.0
    frames = sealed(plans, n, f"lvl{level}")
    b = Node(plans["B"])
    writes = Writes()
    calls: list[float] = []
    try:
        timer.watch(b.ctx.store._writer)
        timer.watch(b.ctx.store._reader)
        with counted_writes(b.ctx.store, writes):

            def feed() -> None:
                start = time.perf_counter()
                for i in range(0, n, PER_CALL):
                    if rate:
                        wait = start + i / rate - time.perf_counter()
                        if wait > 0:
                            time.sleep(wait)
                    t = time.perf_counter()
                    b.intake.receive(frames[i : i + PER_CALL])
                    calls.append(time.perf_counter() - t)

            intake = threading.Thread(target=feed, name="intake")
            threading.current_thread().name = "delivery"
            t0, c0 = time.perf_counter(), time.thread_time()
            intake.start()
            delivered, idle = 0, 0
            while delivered < n:
                step = b.dispatcher.run_once()
                delivered += step
                if not step:
                    idle += 1
                    time.sleep(0.05)  # the node's poll: 0.5 s, woken by the intake
            wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
            intake.join()
    finally:
        timer.close()
        b.ctx.store.dispose()
    calls.sort()
    return {
        "level": level,
        "n": n,
        "load_s": load_s,
        "delivered_pps": n / wall,
        "intake_ms_p50": statistics.median(calls) * 1e3,
        "intake_ms_p99": calls[int(len(calls) * 0.99)] * 1e3,
        "delivery_writes_per_packet": writes.count.get("delivery", 0) / n,
        "delivery_cpu_ms_per_packet": cpu / n * 1e3,
        "delivery_hold_ms_per_packet": writes.hold.get("delivery", 0.0) / n * 1e3,
        "intake_wait_ms_per_call": writes.wait.get("intake", 0.0)
        / max(1, writes.count.get("intake", 0))
        * 1e3,
    }


def explain(dsn: str, sql: str, params: Any) -> str:
    if not sql.upper().startswith(("SELECT", "UPDATE", "DELETE", "INSERT", "WITH")):
        return ""
    conn = sqlite3.connect(f"file:{gr._path(dsn)}?mode=ro", uri=True)
    try:
        rows = conn.execute(f"EXPLAIN QUERY PLAN {sql}", params or ()).fetchall()
    except sqlite3.Error as exc:
        return f"({type(exc).__name__}: {exc})"
    finally:
        conn.close()
    return "; ".join(r[-1] for r in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--levels", default="0,100000", help="Observations already stored")
    p.add_argument("-n", type=int, default=3000, help="packets delivered a level")
    p.add_argument("--rate", type=float, default=150.0, help="intake packets/s (0: flat out)")
    p.add_argument("--width", type=int, default=120)
    args = p.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]
    from bridge.config.loader import load_node
    from bridge.config.scaffold import write_alliance

    results, timers = [], {}
    with tempfile.TemporaryDirectory(prefix="hutong-delivery-") as tmp:
        files = write_alliance(
            Path(tmp), ex.MEMBERS, ex.RULES, base_port_local=20500, base_port_peer=20600
        )
        plans = {"A": load_node(files[ex.A]), "B": load_node(files[ex.B])}
        ex.NodeContext.open(plans["B"]).store.dispose()
        for level in levels:
            timers[level] = Timer()
            r = run_level(plans, level, args.n, args.rate, timers[level])
            results.append(r)
            print(
                f"{level:>9,} Observations stored (filled in {r['load_s']:.0f} s): "
                f"delivered {r['delivered_pps']:.0f}/s, intake call p50 "
                f"{r['intake_ms_p50']:.1f} / p99 {r['intake_ms_p99']:.1f} ms, "
                f"{r['delivery_writes_per_packet']:.3f} delivery writes a packet; delivery "
                f"CPU {r['delivery_cpu_ms_per_packet']:.1f} ms and writer held "
                f"{r['delivery_hold_ms_per_packet']:.1f} ms a packet; intake waited "
                f"{r['intake_wait_ms_per_call']:.1f} ms a write for the writer",
                flush=True,
            )
        last = timers[levels[-1]]
        keys = sorted(
            {k for t in timers.values() for k in t.total if k[0] == "delivery"},
            key=lambda k: -last.total.get(k, 0.0),
        )
        print(
            "\ndelivery thread: calls at the last level, then µs per call at "
            + " / ".join(f"{lv:,}" for lv in levels)
        )
        for key in keys:
            per = [
                (t.total[key] / t.calls[key] * 1e6) if key in t.total else None
                for t in (timers[lv] for lv in levels)
            ]
            figures = " ".join(f"{x:9.0f}" if x is not None else f"{'-':>9}" for x in per)
            print(f"{last.calls.get(key, 0):6d} {figures}  {key[1][: args.width]}")
            plan = explain(plans["B"].storage_dsn, key[1], last.params.get(key[1]))
            if plan:
                print(f"{'':>6} {'':>{10 * len(levels)}} plan: {plan[: args.width]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
