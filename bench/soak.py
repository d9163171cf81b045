"""Soak: a steady offered rate for minutes, sampled every 15 s, first part against last.

Run ``make soak`` or ``.venv/bin/python bench/soak.py [--minutes 3] [--store sqlite,pg]
[--only exchange,lis] [--rate 20] [--lis-rate 10] [--every 15] [--bound N]``. Not part of
``make bench`` nor of the tests: run it before a release. See bench/README.md ("soak").

Two loads, each on every store asked for (SQLite; PostgreSQL: ``HUTONG_PG_DSN`` or the throwaway
durable cluster of ``bench/exchange.py``), one after the other, on fresh nodes:

* **exchange**: A -> B (``bench/exchange.py``'s ``Pair``: community ``chc`` -> core ``core``),
  4 KiB ``result.lab`` bundles queued through A's local API (``POST /local/v1/packets``, 10 a
  call) at ``--rate`` packets/s; B files each into its FHIR store (its local delivery).
* **lis**: ``core``'s ``lis-hl7`` adapter fed ORU^R01 messages (8 OBX, ``simulators.lis``) over
  one MLLP connection at ``--lis-rate`` messages/s, each waiting for its ACK (a LIS), as
  ``bench/lis.py`` starts it; each message is acknowledged after its results-journal commit
  and filed into the FHIR store after (the backlog column: journal rows waiting). No member
  referred these patients, so no result is routed on: core is the one node of this load.

Every ``--every`` seconds (15) a sample: what the bench handed over (offered/s), what the
receiving node took in (in/s) and delivered locally (done/s), the latencies of that window
(exchange: queued -> received at B; lis: the ACK as the LIS sees it; both: received ->
delivered at the receiver), the receiver's backlog (inbox rows received, not yet delivered)
and the sender's outbox waiting, RSS and open fds of both node processes (/proc), and the
database size of both (SQLite: file + WAL; PostgreSQL: ``pg_database_size``). At the end, the
first and the last part of the run (five minutes each when the run is 15 minutes or longer,
else a third each) are compared figure by figure: the aim (issue 17) is in/s and done/s of the
last part >= 90 % of the first, and a flat backlog (the last part's mean at most 10 % above the
first's, or two seconds of intake). JSON to ``bench/results/soak-<date>-<time>.json``.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import exchange as ex
import lis as lisbench
import orjson

from tests.factory import bundle
from tests.harness import Alliance, NodeProcess, free_port_block

MIB = 1 << 20
LOOKBACK = 1000  # inbox ids below the highest seen that are read again (see Sampler.inbox)


# -- what one node process and its store look like now ------------------------------------------


def rss_mib(pid: int | None) -> float | None:
    """Resident set now (VmRSS), MiB."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def open_fds(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def db_mib(dsn: str, reader: ex.Reader) -> tuple[float, float | None]:
    """(database, WAL) MiB: SQLite's file and its -wal file; PostgreSQL's database (no WAL of
    its own: the cluster's is shared)."""
    if dsn.startswith("sqlite:///"):
        path = Path(dsn[len("sqlite:///") :])
        wal = Path(str(path) + "-wal")
        size = path.stat().st_size if path.exists() else 0
        return size / MIB, (wal.stat().st_size if wal.exists() else 0) / MIB
    return reader.scalar("SELECT pg_database_size(current_database())") / MIB, None


def pct(values: list[float], p: float) -> float | None:
    return ex.pct(values, p) if values else None


# -- the sampler ----------------------------------------------------------------------------------


@dataclass
class Run:
    """One load on one store: the two nodes, what the bench handed over and when."""

    load: str  # exchange | lis
    store: str  # sqlite | postgresql
    sender: NodeProcess  # "tx": A (exchange) / core, the node with the LIS (lis)
    receiver: NodeProcess | None  # "rx": B (exchange); lis: None (core is the one node)
    rate: float
    lock: threading.Lock = field(default_factory=threading.Lock)
    started_at: list[float] = field(default_factory=list)  # each item offered (epoch s)
    handed: list[tuple[float, float]] = field(default_factory=list)  # (taken at, latency s)
    queued_at: dict[str, float] = field(default_factory=dict)  # exchange: packet -> epoch s
    late: int = 0
    errors: list[str] = field(default_factory=list)


class Sampler:
    def __init__(self, run: Run) -> None:
        self.run = run
        self.tx = ex.Reader(run.sender.plan.storage_dsn)
        self.rx = ex.Reader(run.receiver.plan.storage_dsn) if run.receiver else self.tx
        #: the inbox read incrementally: rows after ``last_id`` are new; of the older ones only
        #: those not yet delivered (``pending``: id -> received at) are read again. Reading the
        #: whole run's rows each sample was a read transaction on the receiver's store that
        #: grew with the run (150/s for 15 min: 135,000 rows every 15 s).
        self.base = self.last_id = self.rx.scalar("SELECT COALESCE(MAX(id), 0) FROM inbox")
        self.pending: dict[int, float] = {}
        #: ids seen among the last LOOKBACK: on PostgreSQL a lower id can commit after a
        #: higher one, so the ids just below ``last_id`` are read again until seen
        self.seen: set[int] = set()
        self.samples: list[dict[str, Any]] = []
        self.raw: list[dict[str, list[float]]] = []  # per sample: latencies, for the parts
        self.started = time.time()

    def close(self) -> None:
        if self.rx is not self.tx:
            self.rx.close()
        self.tx.close()

    def inbox(
        self, t0: float, t1: float
    ) -> tuple[list[tuple[str, float]], list[tuple[float, float]]]:
        """The rows received (packet, at) and delivered (received at, delivered at) in the
        window, reading only the rows not seen yet or not delivered when last seen."""
        lo = min(self.pending, default=self.last_id + 1)
        lo = max(self.base + 1, min(lo, self.last_id + 1 - LOOKBACK))
        rows = self.rx.rows(
            "SELECT id, packet_id, received_at, delivered_at FROM inbox WHERE id >= ?", lo
        )
        inn: list[tuple[str, float]] = []
        done: list[tuple[float, float]] = []
        for id_, packet, received, delivered in rows:
            if id_ in self.pending:
                r = self.pending.pop(id_)
            elif id_ not in self.seen and id_ > self.last_id - LOOKBACK:
                self.seen.add(id_)
                r = ex.ts(received)
                if t0 <= r < t1:
                    inn.append((packet, r))
            else:
                continue  # delivered, and counted, in an earlier window
            if delivered is None:
                self.pending[id_] = r
            elif t0 <= (d := ex.ts(delivered)) < t1:
                done.append((r, d))
        self.last_id = max(self.last_id, max((row[0] for row in rows), default=0))
        self.seen = {i for i in self.seen if i > self.last_id - LOOKBACK}
        return inn, done

    def sample(self, t0: float, t1: float) -> dict[str, Any]:
        run = self.run
        with run.lock:
            handed = [(t, lat) for t, lat in run.handed if t0 <= t < t1]
            queued_at = dict(run.queued_at)
        inn, done = self.inbox(t0, t1)
        span = t1 - t0
        lis = run.receiver is None
        if lis:  # the ACK (sent only after the message's commit), as the LIS sees it
            lat_in = [lat * 1000 for _, lat in handed]
            in_per_s, done_per_s = len(handed) / span, None
        else:  # queued through A's local API -> received at B
            lat_in = [(r - queued_at[p]) * 1000 for p, r in inn if p in queued_at]
            in_per_s, done_per_s = len(inn) / span, len(done) / span
        lat_done = [(d - r) * 1000 for r, d in done]
        db_tx, wal_tx = db_mib(run.sender.plan.storage_dsn, self.tx)
        db_rx, wal_rx = (
            db_mib(run.receiver.plan.storage_dsn, self.rx) if run.receiver else (None, None)
        )
        with run.lock:
            offered = sum(1 for t in run.started_at if t0 <= t < t1)
        s = {
            "t_s": round(t1 - self.started, 1),
            "offered_per_s": offered / span,
            "in_per_s": in_per_s,
            "done_per_s": done_per_s,
            "in_p50_ms": pct(lat_in, 0.5),
            "in_p99_ms": pct(lat_in, 0.99),
            "done_p50_ms": pct(lat_done, 0.5),
            "done_p99_ms": pct(lat_done, 0.99),
            # lis: the messages acknowledged and not yet filed into the FHIR store (the
            # results journal, bridge/results/journal.py)
            "backlog": self.rx.scalar(
                "SELECT COUNT(*) FROM result_journal WHERE state = 'queued'"
                if lis
                else "SELECT COUNT(*) FROM inbox WHERE state = 'received'"
            ),
            "out_waiting": self.tx.scalar(
                "SELECT COUNT(*) FROM outbox WHERE state IN ('queued', 'sent')"
            ),
            "rss_tx_mib": rss_mib(ex.pid_of(run.sender)),
            "rss_rx_mib": rss_mib(ex.pid_of(run.receiver)) if run.receiver else None,
            "fds_tx": open_fds(ex.pid_of(run.sender)),
            "fds_rx": open_fds(ex.pid_of(run.receiver)) if run.receiver else None,
            "db_tx_mib": db_tx,
            "wal_tx_mib": wal_tx,
            "db_rx_mib": db_rx,
            "wal_rx_mib": wal_rx,
            "loadavg_1m": os.getloadavg()[0],
        }
        self.samples.append(s)
        self.raw.append({"in": lat_in, "done": lat_done})
        return s


#: figures compared first part vs last part; (key, what the aim is)
RATES = ("in_per_s", "done_per_s")
FIGURES = (
    "offered_per_s",
    "in_per_s",
    "done_per_s",
    "in_p50_ms",
    "in_p99_ms",
    "done_p50_ms",
    "done_p99_ms",
    "backlog",
    "out_waiting",
    "rss_tx_mib",
    "rss_rx_mib",
    "fds_tx",
    "fds_rx",
    "db_tx_mib",
    "wal_tx_mib",
    "db_rx_mib",
    "wal_rx_mib",
)


def mean(values: list[Any]) -> float | None:
    v = [x for x in values if x is not None]
    return sum(v) / len(v) if v else None


def compare(sampler: Sampler, every: float, rate: float) -> dict[str, Any]:
    """The first part against the last: five minutes each if the run has 15, else thirds."""
    n = len(sampler.samples)
    k = int(300 / every) if n * every >= 900 else max(1, n // 3)
    first, last = sampler.samples[:k], sampler.samples[-k:]
    out: dict[str, Any] = {"part_samples": k, "part_s": k * every, "figures": {}}
    for key in FIGURES:
        if key.endswith("_ms"):  # pooled over the part's windows, not a mean of percentiles
            which, p = ("in" if key.startswith("in_") else "done"), (0.5 if "p50" in key else 0.99)
            a = pct([x for r in sampler.raw[:k] for x in r[which]], p)
            b = pct([x for r in sampler.raw[-k:] for x in r[which]], p)
        else:
            a, b = mean([s[key] for s in first]), mean([s[key] for s in last])
        ratio = b / a if a and b is not None else None
        out["figures"][key] = {"first": a, "last": b, "last_over_first": ratio}
    f = out["figures"]
    rates_met = all(
        f[key]["last_over_first"] is not None and f[key]["last_over_first"] >= 0.9
        for key in RATES
        if f[key]["first"] is not None  # the LIS run has no local delivery of its own
    )
    b0, b1 = f["backlog"]["first"] or 0.0, f["backlog"]["last"] or 0.0
    flat = b1 <= max(b0 * 1.1, b0 + 2 * rate)
    out["rates_met"] = rates_met
    out["backlog_flat"] = flat
    out["met"] = rates_met and flat
    return out


# -- the loads ------------------------------------------------------------------------------------


def pace(run: Run, stop: threading.Event, per_call: int, call: Callable[[int], None]) -> None:
    """Call ``call(k)`` (k = calls so far) so that ``per_call`` items go out at ``run.rate``/s;
    a call that is late by more than one interval is counted, not made up for in a burst."""
    interval = per_call / run.rate
    t0 = time.perf_counter()
    k = 0
    while not stop.is_set():
        due = t0 + k * interval
        wait = due - time.perf_counter()
        if wait > 0:
            if stop.wait(wait):
                return
        elif wait < -interval:
            run.late += 1
            t0 += -wait - interval  # start again from now: no catch-up burst
        try:
            call(k)
        except Exception as exc:  # noqa: BLE001 - recorded and shown; the soak goes on
            run.errors.append(f"{type(exc).__name__}: {exc}"[:300])
            if len(run.errors) > 50:
                return
        k += 1


def offer_exchange(run: Run, stop: threading.Event) -> None:
    client = ex.LocalClient(run.sender)
    per = 10
    docs = [bundle(ex.SIZES[4096], pad_to=4096) for _ in range(50)]
    try:

        def call(k: int) -> None:
            items = [
                {
                    "to": ex.B,
                    "kind": ex.KIND,
                    "thread": f"soak-{(k * per + j) % ex.MANY_THREADS}",
                    "bundle": docs[(k * per + j) % len(docs)],
                }
                for j in range(per)
            ]
            t = time.time()
            with run.lock:
                run.started_at.extend([t] * per)
            ids = client.send(items)
            done = time.time()
            with run.lock:
                for pid in ids:
                    run.queued_at[pid] = t
                run.handed.extend((done, done - t) for _ in ids)

        pace(run, stop, per, call)
    finally:
        client.close()


def offer_lis(run: Run, stop: threading.Event, port: int, first: int) -> None:
    from hl7.client import MLLPClient

    from simulators.lis import oru_message

    client = MLLPClient("127.0.0.1", port)
    client.socket.settimeout(120)
    try:

        def call(k: int) -> None:
            msg = oru_message(first + k)
            t = time.time()
            with run.lock:
                run.started_at.append(t)
            ack = client.send_message(msg)
            done = time.time()
            if b"MSA|AA" not in ack:
                raise RuntimeError(f"not AA: {ack[:80]!r}")
            with run.lock:
                run.handed.append((done, done - t))

        pace(run, stop, 1, call)
    finally:
        client.close()


def soak(
    run: Run,
    offer: Callable[[threading.Event], None],
    minutes: float,
    every: float,
    warm_up: float = 15.0,
) -> dict[str, Any]:
    """Offer the load; after ``warm_up`` s (offered, not sampled: the receiver's queues fill
    to their steady level), a sample every ``every`` s for ``minutes``."""
    sampler = Sampler(run)
    stop = threading.Event()
    worker = threading.Thread(target=offer, args=(stop,), daemon=True)
    total = max(3, round(minutes * 60 / every))
    ex.console.print(
        f"[bold]{run.load} on {run.store}[/]: {run.rate:g}/s for {total * every:.0f} s, "
        f"a sample every {every:g} s after {warm_up:g} s of warm-up"
    )
    header = (
        f"{'t s':>5} {'offered/s':>9} {'in/s':>6} {'done/s':>6} {'in p50/p99 ms':>15} "
        f"{'done p50/p99 ms':>17} {'backlog':>7} {'out':>5} {'RSS MiB tx/rx':>13} "
        f"{'fds tx/rx':>9} {'DB MiB tx/rx':>13} {'WAL MiB':>9} {'load':>5}"
    )
    ex.console.print(header, highlight=False)
    worker.start()
    try:
        time.sleep(warm_up)
        start = time.time()
        sampler.started = start
        t0 = start
        for i in range(1, total + 1):
            due = start + i * every
            time.sleep(max(0.0, due - time.time()))
            t1 = time.time()
            s = sampler.sample(t0, t1)
            t0 = t1
            ex.console.print(row(s), highlight=False)
    finally:
        stop.set()
        worker.join(timeout=60)
    cmp = compare(sampler, every, run.rate)
    sampler.close()
    print_compare(cmp)
    return {
        "load": run.load,
        "store": run.store,
        "rate": run.rate,
        "every_s": every,
        "seconds": total * every,
        "warm_up_s": warm_up,
        "late_calls": run.late,
        "errors": run.errors[:20],
        "samples": sampler.samples,
        "compare": cmp,
    }


def fmt(v: Any, digits: int = 0) -> str:
    if v is None:
        return "-"
    return f"{v:,.{digits}f}"


def row(s: dict[str, Any]) -> str:
    lat_in = f"{fmt(s['in_p50_ms'])}/{fmt(s['in_p99_ms'])}"
    lat_done = f"{fmt(s['done_p50_ms'])}/{fmt(s['done_p99_ms'])}"
    rss = f"{fmt(s['rss_tx_mib'])}/{fmt(s['rss_rx_mib'])}"
    fds = f"{fmt(s['fds_tx'])}/{fmt(s['fds_rx'])}"
    db = f"{fmt(s['db_tx_mib'], 1)}/{fmt(s['db_rx_mib'], 1)}"
    wal = (
        f"{fmt(s['wal_tx_mib'], 1)}/{fmt(s['wal_rx_mib'], 1)}"
        if s["wal_tx_mib"] is not None
        else "-"
    )
    return (
        f"{s['t_s']:>5.0f} {s['offered_per_s']:>9.1f} {s['in_per_s']:>6.1f} "
        f"{fmt(s['done_per_s'], 1):>6} {lat_in:>15} {lat_done:>17} {s['backlog']:>7} "
        f"{s['out_waiting']:>5} {rss:>13} {fds:>9} {db:>13} {wal:>9} {s['loadavg_1m']:>5.1f}"
    )


def print_compare(cmp: dict[str, Any]) -> None:
    ex.console.print(
        f"first vs last {cmp['part_s']:.0f} s ({cmp['part_samples']} samples each):",
        highlight=False,
    )
    for key, f in cmp["figures"].items():
        ratio = f["last_over_first"]
        note = ""
        if key in RATES and f["first"] is not None:
            note = "  aim >= 0.90: " + ("MET" if ratio is not None and ratio >= 0.9 else "NOT MET")
        elif key == "backlog":
            note = "  aim flat: " + ("MET" if cmp["backlog_flat"] else "NOT MET")
        ex.console.print(
            f"  {key:<14} {fmt(f['first'], 1):>10} -> {fmt(f['last'], 1):>10}  "
            f"last/first {fmt(ratio, 2):>5}{note}",
            highlight=False,
        )
    verdict = "[green]MET[/]" if cmp["met"] else "[red]NOT MET[/]"
    ex.console.print(f"  soak aim (rates >= 90 %, backlog flat): {verdict}")


# -- nodes ----------------------------------------------------------------------------------------


def with_limits(path: Path, bound: int | None) -> None:
    if bound is not None:
        assert "[limits]" not in path.read_text()
        path.write_text(path.read_text() + f"\n[limits]\nmax_inbox_backlog = {bound}\n")


def exchange_run(
    folder: Path, store: str, dsns: dict[str, str] | None, args: argparse.Namespace
) -> dict[str, Any]:
    pair = ex.Pair(folder, store, dsns, start_b=False)
    with_limits(pair.alliance.files[ex.B], args.bound)
    try:
        pair.alliance.start(ex.B, ex.A)
        pair.rb = ex.Reader(pair.b.plan.storage_dsn)
        pair.warm_up()
        run = Run("exchange", store, pair.a, pair.b, args.rate)
        return soak(
            run, lambda stop: offer_exchange(run, stop), args.minutes, args.every, args.warm_up
        )
    finally:
        pair.close()


def lis_run(
    folder: Path, store: str, dsns: dict[str, str] | None, args: argparse.Namespace
) -> dict[str, Any]:
    from simulators.lis import oru_message

    site = lisbench.hutong_site(folder)
    port = free_port_block(1)
    members = [
        {
            "id": ex.B,
            "zh": "复兴医院",
            "en": "Fuxing Hospital",
            "role": "core",
            "adapters": [
                {
                    "name": "lis",
                    "type": "lis-hl7",
                    "mappings": str(site),
                    "options": {
                        "port": port,
                        "rate_limit": {"per_second": 100000, "burst": 100000, "hold_s": 0},
                    },
                }
            ],
        },
        {"id": ex.A, "zh": "月坛社区卫生服务中心", "en": "Yuetan CHC", "role": "community"},
    ]
    a = Alliance(
        folder / "alliance",
        members,
        [{"from": ex.B, "to": ex.A, "kinds": ["result.lab"]}],
        dsn_for=(lambda n: dsns[n]) if dsns else None,
    )
    try:
        a.start(ex.B)  # chc only has to exist: results of patients it referred nobody routes
        lisbench.drive(port, [oru_message(9_000_000 + i) for i in range(20)], 1)  # warm-up
        run = Run("lis", store, a.node(ex.B), None, args.lis_rate)
        return soak(
            run, lambda stop: offer_lis(run, stop, port, 1), args.minutes, args.every, args.warm_up
        )
    finally:
        a.stop_all()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=3.0, help="per load and store (3)")
    p.add_argument("--rate", type=float, default=20.0, help="exchange packets/s offered (20)")
    p.add_argument("--lis-rate", type=float, default=10.0, help="LIS messages/s offered (10)")
    p.add_argument("--every", type=float, default=15.0, help="seconds between samples (15)")
    p.add_argument(
        "--warm-up", type=float, default=15.0, help="seconds offered before sampling (15)"
    )
    p.add_argument("--store", default="sqlite,pg", help="sqlite,pg")
    p.add_argument("--only", default="exchange,lis", help="exchange,lis")
    p.add_argument(
        "--bound",
        type=int,
        default=None,
        help="exchange: B's [limits] max_inbox_backlog (default: the node's, 20000)",
    )
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    stores = [s.strip() for s in args.store.split(",") if s.strip()]
    loads = [s.strip() for s in args.only.split(",") if s.strip()]
    if set(stores) - {"sqlite", "pg"} or set(loads) - {"exchange", "lis"}:
        p.error("--store takes sqlite,pg and --only exchange,lis")
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out_path = args.json or ROOT / "bench" / "results" / f"soak-{stamp}.json"
    rev = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout.strip()
    results: dict[str, Any] = {
        "machine": {
            "date": stamp,
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "git": rev,
        },
        "loadavg_start": os.getloadavg(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "runs": [],
    }
    ex.console.print(
        f"soak {stamp}, git {rev}, load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )
    pg: ex.PgServer | None = None
    failed = False
    with tempfile.TemporaryDirectory(prefix="hutong-soak-") as tmp:
        try:
            for store in stores:
                dsns = None
                name = "sqlite"
                if store == "pg":
                    if pg is None:
                        ex.console.print("[bold]PostgreSQL[/]: ...")
                        given = os.environ.get("HUTONG_PG_DSN")
                        pg = ex.PgServer(given, "HUTONG_PG_DSN")
                    if not pg.ok:
                        ex.console.print(f"[yellow]PostgreSQL skipped: {pg.skip_reason}[/]")
                        results["postgresql_skipped"] = pg.skip_reason
                        continue
                    results["machine"]["postgresql"] = f"{pg.version} ({pg.durable})"
                    name = "postgresql"
                for load in loads:
                    if pg is not None and store == "pg":
                        dsns = pg.new_dbs()
                    folder = Path(tmp) / f"{load}-{store}"
                    try:
                        runner = exchange_run if load == "exchange" else lis_run
                        results["runs"].append(runner(folder, name, dsns, args))
                    except Exception as exc:  # noqa: BLE001 - the other runs still go
                        failed = True
                        ex.console.print(f"[red]{load} on {name} failed: {exc}[/]")
                        results["runs"].append(
                            {"load": load, "store": name, "error": f"{type(exc).__name__}: {exc}"}
                        )
        finally:
            if pg is not None:
                pg.close()
    results["loadavg_end"] = os.getloadavg()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    ex.console.print("\n[bold]Summary[/] (first vs last part; aim: rates >= 90 %, backlog flat)")
    for r in results["runs"]:
        if "compare" not in r:
            ex.console.print(f"  {r['load']:<8} {r['store']:<10} ERROR {r.get('error')}")
            continue
        f = r["compare"]["figures"]
        ex.console.print(
            f"  {r['load']:<8} {r['store']:<10} in/s x{fmt(f['in_per_s']['last_over_first'], 2)} "
            f"done/s x{fmt(f['done_per_s']['last_over_first'], 2)} backlog "
            f"{fmt(f['backlog']['first'])} -> {fmt(f['backlog']['last'])}: "
            + ("MET" if r["compare"]["met"] else "NOT MET"),
            highlight=False,
        )
    ex.console.print(f"written {out_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
