"""Scale-out on PostgreSQL: packets/s A -> B with 1, 2 and 4 processes of A on one store.

``hutong run`` plus W-1 ``hutong worker`` processes of A run and have split A's lanes; then a
backlog of N packets (4 KiB, 64 threads so every lane has work) is queued into A's store in one
transaction and the clock runs from its commit until B has received all N. Counted at B: every
packet received once, and no ``duplicate`` in B's audit (nothing was sent twice). Between runs
B is restarted with the previous run's local deliveries skipped (``Pair.restart_b``), so every
run starts on an idle B. On a 2-core machine that also runs B and the database the gain is
bounded by the cores; the figure is what this machine shows, not a promise.
"""

from __future__ import annotations

import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import exchange as ex

from bridge.delivery.lanes import LANES, job_class


def lane_holders(reader: ex.Reader, job: str = f"send:{ex.B}") -> list[int]:
    """Lanes held per process for a job (default A's ``send:core``), from pg_locks on the
    node's database."""
    return sorted(
        int(r[1])
        for r in reader.rows(
            "SELECT pid, count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND objsubid = 2 AND classid = CAST(? AS bigint)::oid AND objid::bigint < ? "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            "GROUP BY pid",
            job_class(job),
            LANES,
        )
    )


def run_workers(pair: ex.Pair, workers: int, n: int, timeout: float) -> dict[str, Any]:
    """A and W-1 workers run and have split the lanes before the backlog is queued, so the
    figure is the steady rate of W processes, not their start-up."""
    a = pair.a
    prefix = f"w{workers}-{secrets.token_hex(3)}"
    threads = [f"{prefix}-{i % 64}" for i in range(n)]
    bodies = [ex.body_of(4096) for _ in range(n)]
    extra: list[subprocess.Popen[bytes]] = []
    for i in range(workers - 1):  # they start while B (restarted) starts too
        log = a.log.with_name(f"{a.node_id}-worker{i}.log")
        with open(log, "ab") as fh:
            extra.append(
                subprocess.Popen(
                    [sys.executable, "-m", "bridge.cli", "worker", "--config", str(a.config)],
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    cwd=ex.ROOT,
                )
            )
    ra = None
    try:
        pair.ready_a()
        pair.ready_b()
        rb = pair.rb
        ra = ex.Reader(a.plan.storage_dsn)
        b_before = rb.scalar("SELECT COALESCE(MAX(id), 0) FROM inbox")
        dup_before = rb.scalar("SELECT COUNT(*) FROM audit WHERE action = 'duplicate'")
        share = LANES // workers
        deadline = time.perf_counter() + 60
        while lane_holders(ra) != [share] * workers:
            if time.perf_counter() > deadline:
                raise TimeoutError(f"lanes not split {workers} ways: {lane_holders(ra)}")
            time.sleep(0.05)
        # one transaction: every process finds its lanes' whole backlog at its next poll
        ids = ex.queue_direct(a.plan, bodies, threads, one_transaction=True)
        t0 = time.perf_counter()
        deadline = t0 + timeout
        while time.perf_counter() < deadline:
            if rb.scalar("SELECT COUNT(*) FROM inbox WHERE id > ?", b_before) >= n:
                break
            time.sleep(0.02)
        else:
            raise TimeoutError(f"{workers} worker(s): not all {n} packets arrived\n{pair.logs()}")
        wall = time.perf_counter() - t0
        times = sorted(
            ex.ts(r[0]) for r in rb.rows("SELECT received_at FROM inbox WHERE id > ?", b_before)
        )
        span = times[-1] - times[0]
        received = [r[0] for r in rb.rows("SELECT packet_id FROM inbox WHERE id > ?", b_before)]
        dups = rb.scalar("SELECT COUNT(*) FROM audit WHERE action = 'duplicate'") - dup_before
    finally:
        for p in extra:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=30)
        if ra is not None:
            ra.close()
    return {
        "processes": workers,
        "n": n,
        "wall_s": wall,
        "wall_pps": n / wall,
        "steady_pps": n / span if span > 0 else float("nan"),
        "all_received_once": sorted(received) == sorted(ids),
        "duplicates_at_b": dups,
    }


def scaleout(
    root: Path, dsns: dict[str, str], n: int, timeout: float = 300.0
) -> list[dict[str, Any]]:
    pair = ex.Pair(root / "alliance-scaleout", "postgresql", dsns)
    pair.ready_a()
    out = []
    try:
        for i, workers in enumerate((1, 2, 4)):
            if i:
                pair.restart_b()  # B idle again: the previous run's local deliveries skipped
            r = run_workers(pair, workers, n, timeout)
            out.append(r)
            ex.console.print(
                f"  {workers} process(es): {r['steady_pps']:6.0f} packets/s steady,"
                f" {r['wall_pps']:6.0f} from the commit; received once: "
                f"{r['all_received_once']}, duplicates at B: {r['duplicates_at_b']}"
            )
    finally:
        pair.close()
    return out
