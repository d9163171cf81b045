"""Every SQL statement of the exchange path, its plan and its time per call, as the store grows.

Run ``.venv/bin/python bench/statements.py [--levels 10000,1000000] [-n 1000]``.
See bench/README.md (the ``growth`` section).

Two nodes (A = ``chc`` -> B = ``core``, SQLite) are scaffolded and opened in this process as
``hutong run`` opens them (``bridge.node.Node``, no servers, no scheduler). At each level both
stores are topped up with the ``growth`` section's history (A's outbox, B's inbox, made by
SQLite itself: ``growth.fill``); then N packets are queued at A (``queue_packets``, as the
local API does), A's ``PeerSender.send_batch`` posts each batch straight into B's
``Intake.receive`` (what the gateway does, minus HTTP), B's ``Dispatcher.run_once`` delivers
them, and each node's alert facts are collected once (the 30 s job). Every statement both
stores run is timed by SQLAlchemy's cursor events (the SQL text is the key: constant
statements are one row each); each ``COMMIT`` is timed apart, per node. The table shows per
statement the calls and the microseconds per call at each level and, for the largest level,
SQLite's ``EXPLAIN QUERY PLAN`` with the parameters of its first call. A statement whose time
per call grows with the level walks something that grows with the store.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sqlite3
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import exchange as ex
import growth as gr
from sqlalchemy import event

#: the parts of the path, in the order the table groups them
PARTS = ("queue (A)", "send + intake (A, B)", "delivery (B)", "alert facts (A, B)")


class StatementTimer:
    """Wall time per (node, part, SQL text) from SQLAlchemy's cursor events on both stores."""

    def __init__(self) -> None:
        self.part = PARTS[0]
        self.total: dict[tuple[str, str, str], float] = {}
        self.calls: dict[tuple[str, str, str], int] = {}
        self.rows: dict[tuple[str, str, str], int] = {}
        self.params: dict[str, Any] = {}  # SQL -> the parameters of its first call
        self._undo: list[tuple[Any, str, Any]] = []

    def add(self, key: tuple[str, str, str], seconds: float, rows: int = 1) -> None:
        self.total[key] = self.total.get(key, 0.0) + seconds
        self.calls[key] = self.calls.get(key, 0) + 1
        self.rows[key] = self.rows.get(key, 0) + rows

    def watch(self, node: str, engine: Any) -> None:
        def before(
            conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
        ) -> None:
            conn.info.setdefault("_t", []).append(time.perf_counter())

        def after(
            conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
        ) -> None:
            t = conn.info["_t"].pop()
            sql = " ".join(statement.split())
            rows = len(parameters) if executemany else 1
            self.add((node, self.part, sql), time.perf_counter() - t, rows)
            if sql not in self.params:
                self.params[sql] = parameters[0] if executemany else parameters

        event.listen(engine, "before_cursor_execute", before)
        event.listen(engine, "after_cursor_execute", after)
        self._undo += [
            (engine, "before_cursor_execute", before),
            (engine, "after_cursor_execute", after),
        ]

    def close(self) -> None:
        for engine, name, fn in self._undo:
            event.remove(engine, name, fn)
        self._undo.clear()


@contextlib.contextmanager
def timed_commits(timer: StatementTimer, stores: dict[int, str]) -> Iterator[None]:
    """Each ``Store.write`` block's COMMIT (and its fsync), per node, as a row of its own."""
    from bridge.store import db as db_mod

    original = db_mod.Store.__dict__["write"]

    @contextlib.contextmanager
    def write(self: Any) -> Iterator[Any]:
        with original(self) as conn:
            yield conn
            t = time.perf_counter()  # the rest of the with-block is the COMMIT
        timer.add((stores.get(id(self), "?"), timer.part, "COMMIT"), time.perf_counter() - t)

    db_mod.Store.write = write  # type: ignore[method-assign]
    try:
        yield
    finally:
        db_mod.Store.write = original  # type: ignore[method-assign]


def run_level(plans: dict[str, Any], level: int, n: int, timer: StatementTimer) -> dict[str, float]:
    """Top both stores up to ``level``, then queue, send, receive, deliver ``n`` packets."""
    from bridge.alerts import Alerter
    from bridge.node import Node

    with contextlib.ExitStack() as stack:
        # the nodes are closed while their stores are loaded, as growth.py stops them
        gr.fill(plans["A"].storage_dsn, "outbox", level)
        gr.fill(plans["B"].storage_dsn, "inbox", level)
        nodes = {name: Node(plan) for name, plan in plans.items()}
        for node in nodes.values():
            stack.callback(node.ctx.store.dispose)
        a, b = nodes["A"], nodes["B"]
        sender = a.senders[ex.B]
        max_total = b.plan.limits.max_body_bytes * 2 + (8 << 20)

        class Direct:
            def post_batch(self, body: bytes, *, receipts_v2: bool = False) -> bytes:
                frames = ex.env.decode_batch(
                    body, max_items=b.plan.limits.max_batch, max_total=max_total
                )
                return ex.env.encode_batch(b.intake.receive(frames, receipts_v2=receipts_v2))

            def close(self) -> None:
                pass

        sender.conn.close()
        sender.conn = sender.conns[0] = Direct()  # type: ignore[assignment,list-item]
        for name, node in nodes.items():
            timer.watch(name, node.ctx.store._writer)
            timer.watch(name, node.ctx.store._reader)
        stack.callback(timer.close)
        stack.enter_context(timed_commits(timer, {id(a.ctx.store): "A", id(b.ctx.store): "B"}))
        walls: dict[str, float] = {}
        tag = f"lvl{level}"
        bodies = [ex.body_of(4096) for _ in range(n)]
        threads = [f"{tag}-{i % ex.MANY_THREADS}" for i in range(n)]
        timer.part = PARTS[0]
        t = time.perf_counter()
        with a.ctx.store.write() as conn:  # one transaction, as the bench queues its backlog
            got = ex.queue_packets(
                a.ctx,
                conn,
                [
                    ex.Outgoing(ex.B, ex.KIND, body, th)
                    for body, th in zip(bodies, threads, strict=True)
                ],
            )
        assert all(q.error is None for q in got)
        walls[PARTS[0]] = time.perf_counter() - t
        timer.part = PARTS[1]
        t = time.perf_counter()
        sent = 0
        while sent < n:
            report = sender.send_batch()
            if report.failed or not report.sent:
                raise RuntimeError(f"sent {sent} of {n}: {report.error}")
            sent += report.sent
        walls[PARTS[1]] = time.perf_counter() - t
        timer.part = PARTS[2]
        t = time.perf_counter()
        delivered = 0
        while delivered < n:
            step = b.dispatcher.run_once()
            if not step:
                raise RuntimeError(f"delivered {delivered} of {n}")
            delivered += step
        walls[PARTS[2]] = time.perf_counter() - t
        timer.part = PARTS[3]
        t = time.perf_counter()
        for node in nodes.values():
            Alerter(node).collect(probe=False)
        walls[PARTS[3]] = time.perf_counter() - t
        return walls


def explain(dsn: str, sql: str, params: Any) -> str:
    """SQLite's plan of one statement with the parameters of its first call (read only)."""
    if sql == "COMMIT" or not re.match(r"(?i)\s*(SELECT|UPDATE|DELETE|INSERT|WITH)", sql):
        return ""
    conn = sqlite3.connect(f"file:{gr._path(dsn)}?mode=ro", uri=True)
    try:
        rows = conn.execute(f"EXPLAIN QUERY PLAN {sql}", params or ()).fetchall()
    except sqlite3.Error as exc:
        return f"({type(exc).__name__}: {exc})"
    finally:
        conn.close()
    return "; ".join(r[-1] for r in rows)


def statements(root: Path, levels: tuple[int, ...], n: int) -> dict[str, Any]:
    from bridge.config.loader import load_node
    from bridge.config.scaffold import write_alliance

    files = write_alliance(root, ex.MEMBERS, ex.RULES, base_port_local=20300, base_port_peer=20400)
    plans = {"A": load_node(files[ex.A]), "B": load_node(files[ex.B])}
    for plan in plans.values():
        ex.NodeContext.open(plan).store.dispose()  # creates the tables
    timers: dict[int, StatementTimer] = {}
    walls: dict[int, dict[str, float]] = {}
    for level in levels:
        timers[level] = timer = StatementTimer()
        walls[level] = run_level(plans, level, n, timer)
        ex.console.print(
            f"  {level:>9,} packets stored: "
            + ", ".join(f"{part} {s:.2f} s" for part, s in walls[level].items())
        )
    last = timers[levels[-1]]
    keys = sorted(
        {k for t in timers.values() for k in t.total},
        key=lambda k: (PARTS.index(k[1]), k[0], -last.total.get(k, 0.0)),
    )
    rows = []
    for key in keys:
        node, part, sql = key
        rows.append(
            {
                "node": node,
                "part": part,
                "sql": sql,
                "calls": {lv: timers[lv].calls.get(key, 0) for lv in levels},
                "us_per_call": {
                    lv: (
                        timers[lv].total[key] / timers[lv].calls[key] * 1e6
                        if key in timers[lv].total
                        else None
                    )
                    for lv in levels
                },
                "plan": explain(plans[node].storage_dsn, sql, last.params.get(sql)),
            }
        )
    return {"levels": list(levels), "n": n, "walls_s": walls, "statements": rows}


def report(result: dict[str, Any], width: int = 110) -> None:
    levels = result["levels"]
    for part in PARTS:
        print(
            f"\n== {part}: "
            + " | ".join(f"{lv:,}: {result['walls_s'][lv][part]:.2f} s" for lv in levels)
        )
        for r in result["statements"]:
            if r["part"] != part:
                continue
            figures = " ".join(
                f"{r['us_per_call'][lv]:9.0f}" if r["us_per_call"][lv] is not None else f"{'-':>9}"
                for lv in levels
            )
            ratio = ""
            first, final = r["us_per_call"][levels[0]], r["us_per_call"][levels[-1]]
            if first and final:
                ratio = f"{final / first:5.1f}x"
            print(
                f"{r['node']} {r['calls'][levels[-1]]:5d} {figures} {ratio:>6}  {r['sql'][:width]}"
            )
            if r["plan"]:
                print(f"{'':>8}{'':>{10 * len(levels)}} plan: {r['plan'][:width]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--levels", default="10000,1000000")
    p.add_argument("-n", type=int, default=1000, help="packets per level")
    p.add_argument("--width", type=int, default=110, help="SQL characters shown")
    args = p.parse_args(argv)
    levels = tuple(int(x) for x in args.levels.split(","))
    with tempfile.TemporaryDirectory(prefix="hutong-statements-") as tmp:
        result = statements(Path(tmp), levels, args.n)
    print("node calls " + " ".join(f"{lv:>9,}" for lv in levels) + "  (us per call)")
    report(result, args.width)
    return 0


if __name__ == "__main__":
    sys.exit(main())
