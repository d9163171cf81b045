"""Exchange benchmark: what one machine can do, and what two real nodes do, A -> B.

Run ``.venv/bin/python bench/exchange.py [--quick] [--json out.json] [--pg-dsn DSN]``.
See bench/README.md for what each figure means. Summary:

1. **Machine ceiling** (in this process, same run): Ed25519 sign/verify of 4 KiB, envelope
   ``seal`` and ``decode + verify + open_body`` at 4 KiB and 64 KiB, FHIR validation
   (``parse_and_validate_bundle``) of the 4 KiB and 64 KiB bundles, and one durable commit
   (raw sqlite3, WAL, synchronous=FULL, one small INSERT per commit, on the disk the node data
   is on; PostgreSQL too when a server is available).

2. **Node to node, real processes**: an alliance of two nodes (A = community ``chc`` ->
   B = core ``core``, direct) scaffolded in a temp dir with ``tests.harness.Alliance``, each node
   a ``python -m bridge.cli run`` process. Throughput: with A stopped, N packets are queued in A's
   store in this process (``queue_packets`` through ``NodeContext.open(plan)``, spread over 50
   threads, or all in 1 thread); A is started and the clock runs until B's inbox holds the N rows
   (B's database is polled read-only). Latency: both nodes up, packets are queued through A's
   local API at a steady rate in small batches; per packet, B's ``inbox.received_at`` minus A's
   ``outbox.created_at`` (same clock), and A's ``acked_at`` minus ``created_at``.

3. **Fraction of the ceiling**. The ceiling of one A -> B pipeline is::

       ceiling packets/s = 1 / (seal + open + validate + commit * commits_per_batch / batch)

   seal: A seals each packet (X25519 + HKDF + AES-GCM + Ed25519 sign); open: B decodes, verifies
   the signature and decrypts; validate: B validates the FHIR bundle; commit: one durable commit
   (fsync), of which a batch needs two (B stores the batch's inbox rows, A records the receipts),
   amortised over the batch (``delivery.batch_size`` = 200, capped by the sender's 8 MiB per
   batch: 127 bodies of 64 KiB). The sum is serial because a peer has one batch in flight at a
   time, so A and B take turns. Not in it: queueing (done before the clock starts), receipt
   sign/verify, HTTP, SQL statements, the audit chain and B's local delivery; the fraction shown
   is therefore how much of the raw crypto+validation+fsync budget survives the rest.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import re
import secrets
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from bridge.config.models import DeliveryConfig  # noqa: E402
from bridge.context import NodeContext  # noqa: E402
from bridge.crypto import envelope as env  # noqa: E402
from bridge.delivery.queue import Outgoing, queue_packets  # noqa: E402
from bridge.delivery.sender import MAX_BATCH_BYTES  # noqa: E402
from bridge.fhir.validate import parse_and_validate_bundle  # noqa: E402
from tests.factory import bundle  # noqa: E402
from tests.harness import Alliance, NodeProcess  # noqa: E402

console = Console()

A, B = "chc", "core"
KIND = "result.lab"
MEMBERS = [
    {"id": B, "zh": "复兴医院", "en": "Fuxing Hospital", "role": "core"},
    {"id": A, "zh": "月坛社区卫生服务中心", "en": "Yuetan CHC", "role": "community"},
]
RULES = [{"from": A, "to": B, "kinds": [KIND]}]

#: body size -> observations in the bundle before padding (factory.bundle pads to the size)
SIZES = {4096: 3, 65536: 80}
KIB = {4096: "4 KiB", 65536: "64 KiB"}
COMMITS_PER_BATCH = 2  # B commits the batch's inbox rows, A commits the receipts it got back
MANY_THREADS = 50


@dataclass
class Settings:
    quick: bool
    op_budget_s: float  # time spent measuring one ceiling op
    n: dict[int, int]  # packets per throughput run, by body size
    lat_rate: float  # packets/s queued through the local API for the latency run
    lat_seconds: float
    lat_batch: int
    timeout_s: float = 300.0


def settings(quick: bool) -> Settings:
    if quick:
        return Settings(True, 0.15, {4096: 1000, 65536: 200}, 200.0, 3.0, 10)
    return Settings(False, 0.5, {4096: 5000, 65536: 1000}, 200.0, 10.0, 10)


def body_of(size: int) -> bytes:
    return orjson.dumps(bundle(SIZES[size], pad_to=size))


def batch_for(size: int) -> int:
    """Packets per sender batch: delivery.batch_size, capped by MAX_BATCH_BYTES of bodies."""
    return max(1, min(DeliveryConfig().batch_size, MAX_BATCH_BYTES // (size + 1)))


# =============================================================================================
# 1. machine ceiling, in-process
# =============================================================================================


def time_op(fn: Callable[[], Any], budget: float) -> float:
    """Seconds per call: median of repeated timed loops (each >= ~20 ms) over ``budget`` s."""
    fn()  # warm up (first validation compiles the schema for that resource type)
    n = 1
    while True:
        t = time.perf_counter()
        for _ in range(n):
            fn()
        dt = time.perf_counter() - t
        if dt >= 0.02:
            break
        n *= 2
    samples = [dt / n]
    end = time.perf_counter() + budget
    while time.perf_counter() < end or len(samples) < 5:
        t = time.perf_counter()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter() - t) / n)
    return statistics.median(samples)


class SqliteCommit:
    """One small INSERT per durable commit: WAL + synchronous=FULL, BEGIN IMMEDIATE/COMMIT."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "commit-bench.db"
        self.conn = sqlite3.connect(self.path, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, v TEXT)")

    def __call__(self) -> None:
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        c.execute("INSERT INTO t (v) VALUES ('packet-id-0000')")
        c.execute("COMMIT")

    def close(self) -> None:
        self.conn.close()


class PgCommit:
    """One small INSERT per commit (autocommit), durable only if the server has fsync on."""

    def __init__(self, dsn: str) -> None:
        import psycopg

        self.conn = psycopg.connect(libpq_url(dsn), autocommit=True)
        self.conn.execute("SET synchronous_commit = on")
        self.conn.execute("CREATE TABLE IF NOT EXISTS bench_commit (id bigserial PRIMARY KEY,"
                          " v text)")

    def __call__(self) -> None:
        self.conn.execute("INSERT INTO bench_commit (v) VALUES ('packet-id-0000')")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.execute("DROP TABLE bench_commit")
        self.conn.close()


def measure_ceiling(cfg: Settings, disk_dir: Path, pg_dsn: str | None) -> dict[str, Any]:
    sk = Ed25519PrivateKey.generate()
    pk = sk.public_key()
    rk = X25519PrivateKey.generate()
    msg = os.urandom(4096)
    sig = sk.sign(msg)
    ops: dict[str, float] = {}

    def run(name: str, fn: Callable[[], Any], budget: float | None = None) -> None:
        ops[name] = time_op(fn, budget or cfg.op_budget_s)

    run("ed25519 sign 4 KiB", lambda: sk.sign(msg))
    run("ed25519 verify 4 KiB", lambda: pk.verify(sig, msg))
    for size in SIZES:
        body = body_of(size)
        kw = dict(sender=A, recipient=B, kind=KIND, thread="t", seq=1, signing_key=sk,
                  recipient_key=rk.public_key())
        frame = env.seal(body, **kw)

        def open_(frame: bytes = frame) -> bytes:
            pkt = env.decode(frame, max_body=20 << 20)
            env.verify(pkt, (pk,))
            return env.open_body(pkt, (rk,))

        assert open_() == body
        run(f"seal {KIB[size]}", lambda body=body, kw=kw: env.seal(body, **kw))
        run(f"decode+verify+open {KIB[size]}", open_)
        run(f"validate FHIR {KIB[size]}", lambda body=body: parse_and_validate_bundle(body))
    commit = SqliteCommit(disk_dir)
    try:
        run("commit sqlite (WAL, FULL)", commit, max(1.0, cfg.op_budget_s * 2))
    finally:
        commit.close()
    if pg_dsn:
        try:
            pgc = PgCommit(pg_dsn)
            try:
                run("commit postgresql", pgc, max(1.0, cfg.op_budget_s * 2))
            finally:
                pgc.close()
        except Exception as exc:  # noqa: BLE001
            console.print(f"[yellow]PostgreSQL commit not measured: {exc}[/]")
    return ops


def ceiling_for(ops: dict[str, float], size: int, backend: str) -> dict[str, float] | None:
    commit = ops.get("commit sqlite (WAL, FULL)" if backend == "sqlite" else "commit postgresql")
    if commit is None:
        return None
    batch = batch_for(size)
    parts = {
        "seal": ops[f"seal {KIB[size]}"],
        "open": ops[f"decode+verify+open {KIB[size]}"],
        "validate": ops[f"validate FHIR {KIB[size]}"],
        "commit/batch": commit * COMMITS_PER_BATCH / batch,
    }
    per_packet = sum(parts.values())
    return {"per_packet_us": per_packet * 1e6, "packets_per_s": 1 / per_packet, "batch": batch,
            **{f"{k}_us": v * 1e6 for k, v in parts.items()}}


# =============================================================================================
# PostgreSQL: a DSN from --pg-dsn / HUTONG_PG_DSN, or a throwaway *durable* cluster
# =============================================================================================


def libpq_url(dsn: str) -> str:
    return re.sub(r"^postgres(ql)?(\+\w+)?://", "postgresql://", dsn)


def sqla_dsn(dsn: str) -> str:
    return re.sub(r"^postgres(ql)?(\+\w+)?://", "postgresql+psycopg://", dsn)


def with_database(dsn: str, name: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(dsn).set(database=name).render_as_string(hide_password=False)


_DURABLE = {"fsync=off": "fsync=on", "synchronous_commit=off": "synchronous_commit=on",
            "full_page_writes=off": "full_page_writes=on"}


def _cluster_class() -> tuple[type, str]:
    """tests/conftest.py's throwaway cluster, made durable; or a minimal copy of it."""
    try:
        from tests import conftest

        base = conftest._PgCluster  # noqa: SLF001 - reused on purpose, see module docstring
        bindir = conftest._pg_bindir()  # noqa: SLF001

        class Durable(base):  # type: ignore[misc, valid-type]
            """conftest's cluster turns fsync off for test speed; a commit benchmark must not."""

            def run(self, *args: str, timeout: float = 120) -> None:
                fixed = []
                for a in args:
                    for off, on in _DURABLE.items():
                        a = a.replace(off, on)
                    fixed.append(a)
                return super().run(*fixed, timeout=timeout)

        if bindir is None:
            raise RuntimeError("no pg_ctl/initdb on PATH or in /usr/lib/postgresql/*/bin")
        return Durable, bindir
    except ImportError as exc:
        console.print(f"[dim]tests.conftest not importable ({exc}); using bench's own copy[/]")
    return _MiniCluster, _mini_bindir()


def _mini_bindir() -> str:
    found = shutil.which("pg_ctl")
    if found and os.access(os.path.join(os.path.dirname(os.path.realpath(found)), "initdb"),
                           os.X_OK):
        return os.path.dirname(os.path.realpath(found))
    import glob

    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.access(os.path.join(d, "initdb"), os.X_OK):
            return d
    raise RuntimeError("no pg_ctl/initdb on PATH or in /usr/lib/postgresql/*/bin")


class _MiniCluster:
    """Minimal replica of tests/conftest.py's _PgCluster (durable settings)."""

    def __init__(self, bindir: str) -> None:
        import pwd

        self.bindir, self.as_user = bindir, None
        if os.geteuid() == 0:
            pwd.getpwnam("postgres")  # KeyError: no user to run initdb as
            self.as_user = "postgres"
        self.tmp = tempfile.mkdtemp(prefix="hutong-bench-pg-")
        self.data, self.log = os.path.join(self.tmp, "data"), os.path.join(self.tmp, "log")
        self.password, self.started = secrets.token_hex(16), False

    def run(self, *args: str, timeout: float = 120) -> None:
        cmd = [os.path.join(self.bindir, args[0]), *args[1:]]
        if self.as_user:
            cmd = ["runuser", "-u", self.as_user, "--", *cmd]
        p = subprocess.run(cmd, cwd=self.tmp, capture_output=True, text=True, timeout=timeout)
        if p.returncode:
            raise RuntimeError(f"{args[0]} exited {p.returncode}: {p.stderr.strip()[-300:]}")

    def start(self) -> str:
        import pwd
        import socket

        sock = os.path.join(self.tmp, "sock")
        os.mkdir(sock)
        pwfile = os.path.join(self.tmp, "pw")
        Path(pwfile).write_text(self.password + "\n")
        if self.as_user:
            pw = pwd.getpwnam(self.as_user)
            for p in (self.tmp, sock, pwfile):
                os.chown(p, pw.pw_uid, pw.pw_gid)
        self.run("initdb", "-D", self.data, "-U", "hutong", "--pwfile", pwfile,
                 "--auth", "scram-sha-256", "--encoding", "UTF8", "--no-locale", "--no-sync")
        os.unlink(pwfile)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.run("pg_ctl", "-D", self.data, "-l", self.log, "-w", "-t", "60", "-o",
                 f"-p {port} -k {sock} -c listen_addresses=127.0.0.1", "start")
        self.started = True
        return f"postgresql+psycopg://hutong:{self.password}@127.0.0.1:{port}/postgres"

    def stop(self) -> None:
        try:
            if self.started:
                self.run("pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop", timeout=60)
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)


class PgServer:
    """Where the PostgreSQL runs take place: two fresh databases (A and B), dropped at the end."""

    def __init__(self, given: str | None, source: str) -> None:
        self.cluster: Any = None
        self.source = ""
        self.admin_dsn: str | None = None
        self.dbs: dict[str, str] = {}
        self.durable: str = "?"
        self.skip_reason: str | None = None
        try:
            if given:
                self.source = source
                self.admin_dsn = sqla_dsn(given)
            else:
                cls, bindir = _cluster_class()
                self.cluster = cls(bindir)
                self.source = f"throwaway cluster ({bindir}, durable settings)"
                self.admin_dsn = self.cluster.start()
            import psycopg

            with psycopg.connect(libpq_url(self.admin_dsn), autocommit=True,
                                 connect_timeout=10) as conn:
                fsync = conn.execute("SHOW fsync").fetchone()[0]
                sync = conn.execute("SHOW synchronous_commit").fetchone()[0]
                self.durable = f"fsync={fsync}, synchronous_commit={sync}"
                for node in (A, B):
                    name = f"hutong_bench_{node}_{secrets.token_hex(4)}"
                    conn.execute(f'CREATE DATABASE "{name}" ENCODING \'UTF8\' TEMPLATE template0')
                    self.dbs[node] = with_database(self.admin_dsn, name)
        except BaseException as exc:  # pytest.skip() from conftest is a BaseException
            if isinstance(exc, KeyboardInterrupt):
                raise
            self.skip_reason = f"{type(exc).__name__}: {exc}".strip()
            self.close()

    @property
    def ok(self) -> bool:
        return self.skip_reason is None

    def close(self) -> None:
        if self.dbs and self.admin_dsn:
            try:
                import psycopg

                with psycopg.connect(libpq_url(self.admin_dsn), autocommit=True) as conn:
                    for dsn in self.dbs.values():
                        name = dsn.rsplit("/", 1)[1].split("?")[0]
                        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            except Exception:  # noqa: BLE001
                pass
            self.dbs = {}
        if self.cluster is not None:
            with contextlib.suppress(BaseException):
                self.cluster.stop()
            self.cluster = None


# =============================================================================================
# 2. node to node
# =============================================================================================


class Reader:
    """Plain read-only queries against a node's database (never through the node)."""

    def __init__(self, dsn: str) -> None:
        self.sqlite = dsn.startswith("sqlite:///")
        if self.sqlite:
            self.conn: Any = sqlite3.connect(dsn[len("sqlite:///"):], timeout=30,
                                             isolation_level=None)
            self.conn.execute("PRAGMA query_only = 1")
        else:
            import psycopg

            self.conn = psycopg.connect(libpq_url(dsn), autocommit=True)
            self.conn.execute("SET default_transaction_read_only = on")

    def rows(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        if not self.sqlite:
            sql = sql.replace("?", "%s")
        return list(self.conn.execute(sql, args).fetchall())

    def scalar(self, sql: str, *args: Any) -> Any:
        return self.rows(sql, *args)[0][0]

    def close(self) -> None:
        self.conn.close()


def ts(value: Any) -> float:
    """A stored naive-UTC timestamp (str on SQLite, datetime on PostgreSQL) as epoch seconds."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC).timestamp()


def cpu_seconds(pid: int | None) -> float:
    """user+system CPU seconds of a process (all threads), from /proc."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def pid_of(node: NodeProcess) -> int | None:
    return node.proc.pid if node.proc is not None and node.proc.poll() is None else None


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * p
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


class Pair:
    """A -> B, scaffolded as the tests do; B runs throughout, A is stopped and started."""

    def __init__(self, folder: Path, backend: str, dsns: dict[str, str] | None) -> None:
        self.backend = backend
        self.alliance = Alliance(folder, MEMBERS, RULES,
                                 dsn_for=(lambda n: dsns[n]) if dsns else None)
        self.a = self.alliance.node(A)
        self.b = self.alliance.node(B)
        self.alliance.start(B)
        self.rb = Reader(self.b.plan.storage_dsn)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.rb.close()
        self.alliance.stop_all()

    def logs(self) -> str:
        return "\n".join(f"--- {n.node_id}.log ---\n{n.log.read_text()[-1500:]}"
                         for n in (self.a, self.b) if n.log.exists())


def queue_direct(plan: Any, bodies: list[bytes], threads: list[str]) -> list[str]:
    """Queue packets into A's store from this process, as the local API would."""
    ctx = NodeContext.open(plan)
    ids: list[str] = []
    try:
        for i in range(0, len(bodies), 500):
            items = [Outgoing(B, KIND, b, t)
                     for b, t in zip(bodies[i:i + 500], threads[i:i + 500], strict=True)]
            with ctx.store.write() as conn:
                results = queue_packets(ctx, conn, items, actor="bench")
            bad = [r.error for r in results if r.error is not None]
            if bad:
                raise RuntimeError(f"queue refused {len(bad)} packets: {bad[0]}")
            ids += [r.packet_id for r in results]  # type: ignore[misc]
    finally:
        ctx.store.dispose()
    return ids


def throughput(pair: Pair, size: int, n: int, nthreads: int, tag: str,
               timeout: float) -> dict[str, Any]:
    a, rb = pair.a, pair.rb
    a.stop()
    b_before = rb.scalar("SELECT COALESCE(MAX(id), 0) FROM inbox")
    prefix = f"{tag}-{secrets.token_hex(3)}"
    threads = [f"{prefix}-{i % nthreads}" for i in range(n)]
    bodies = [body_of(size) for _ in range(n)]
    t = time.perf_counter()
    ids = queue_direct(a.plan, bodies, threads)
    queue_s = time.perf_counter() - t
    ra = Reader(a.plan.storage_dsn)
    a_before = ra.scalar("SELECT MIN(id) FROM outbox WHERE packet_id = ?", ids[0]) - 1
    b_pid = pid_of(pair.b)
    t0 = time.perf_counter()
    a.start()
    first_seen = None
    cpu0: tuple[float, float] = (0.0, 0.0)
    received_s = acked_s = delivered_s = None
    deadline = t0 + timeout
    try:
        while time.perf_counter() < deadline:
            now = time.perf_counter()
            if received_s is None or delivered_s is None:
                got, done = rb.rows(
                    "SELECT COUNT(*), COALESCE(SUM(CASE WHEN state = 'delivered' THEN 1 ELSE 0"
                    " END), 0) FROM inbox WHERE id > ?", b_before)[0]
                if got and first_seen is None:
                    first_seen = now
                    cpu0 = (cpu_seconds(pid_of(a)), cpu_seconds(b_pid))
                if received_s is None and got >= n:
                    received_s = now - t0
                    cpu1 = (cpu_seconds(pid_of(a)), cpu_seconds(b_pid))
                    window = now - first_seen
                if delivered_s is None and done >= n:
                    delivered_s = now - t0
            if received_s is not None and acked_s is None:
                acked = ra.scalar("SELECT COUNT(*) FROM outbox WHERE id > ? AND state ="
                                  " 'acknowledged'", a_before)
                if acked >= n:
                    acked_s = now - t0
            if received_s is not None and acked_s is not None and delivered_s is not None:
                break
            if a.proc is not None and a.proc.poll() is not None:
                raise RuntimeError(f"node A exited during the run\n{pair.logs()}")
            time.sleep(0.01)
        else:
            raise TimeoutError(f"{tag}: not all {n} packets arrived within {timeout:.0f} s\n"
                               f"{pair.logs()}")
        times = sorted(ts(r[0]) for r in rb.rows(
            "SELECT received_at FROM inbox WHERE id > ?", b_before))
        last_batch = sum(1 for x in times if x == times[-1])
        span = times[-1] - times[0]
        steady = (n - last_batch) / span if span > 0 else float("nan")
    finally:
        ra.close()
    return {
        "backend": pair.backend, "size": size, "n": n, "threads": nthreads,
        "queue_s": queue_s,
        "received_all_s": received_s, "acked_all_s": acked_s, "delivered_all_s": delivered_s,
        "wall_pps": n / received_s,
        "steady_pps": steady, "steady_span_s": span,
        "batches": len(set(times)),
        "mb_per_s": steady * size / 1e6,
        "delivered_pps": n / delivered_s,
        "cpu_a": (cpu1[0] - cpu0[0]) / window if window > 0 else None,
        "cpu_b": (cpu1[1] - cpu0[1]) / window if window > 0 else None,
    }


class LocalClient:
    """Keep-alive client for A's local API (orjson, no urllib per request)."""

    def __init__(self, node: NodeProcess) -> None:
        self.conn = http.client.HTTPConnection(node.plan.local_host, node.plan.local_port,
                                               timeout=60)
        self.headers = {"Authorization": f"Bearer {node.token('it')}",
                        "Content-Type": "application/json"}

    def send(self, items: list[dict[str, Any]]) -> list[str]:
        self.conn.request("POST", "/local/v1/packets", body=orjson.dumps(items),
                          headers=self.headers)
        r = self.conn.getresponse()
        data = orjson.loads(r.read())
        if r.status != 200:
            raise RuntimeError(f"local API answered {r.status}: {data}")
        ids = [x.get("packet_id") for x in data["results"]]
        if None in ids:
            raise RuntimeError(f"queue refused: {data['results']}")
        return ids

    def close(self) -> None:
        self.conn.close()


def latency(pair: Pair, cfg: Settings, size: int = 4096) -> dict[str, Any]:
    a, rb = pair.a, pair.rb
    if pid_of(a) is None:
        a.start()
    a.wait_ready()
    b_before = rb.scalar("SELECT COALESCE(MAX(id), 0) FROM inbox")
    total = int(cfg.lat_rate * cfg.lat_seconds)
    per = cfg.lat_batch
    interval = per / cfg.lat_rate
    docs = [bundle(SIZES[size], pad_to=size) for _ in range(total)]
    client = LocalClient(a)
    ids: list[str] = []
    late = 0
    t0 = time.perf_counter()
    try:
        for k in range(0, total, per):
            due = t0 + (k // per) * interval
            pause = due - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            elif pause < -interval:
                late += 1
            items = [{"to": B, "kind": KIND, "thread": f"lat-{(k + j) % MANY_THREADS}",
                      "bundle": d} for j, d in enumerate(docs[k:k + per])]
            ids += client.send(items)
        send_s = time.perf_counter() - t0
    finally:
        client.close()
    deadline = time.perf_counter() + cfg.timeout_s
    ra = Reader(a.plan.storage_dsn)
    try:
        while time.perf_counter() < deadline:
            got = rb.scalar("SELECT COUNT(*) FROM inbox WHERE id > ?", b_before)
            acked = ra.scalar("SELECT COUNT(*) FROM outbox WHERE packet_id IN (?, ?) AND state ="
                              " 'acknowledged'", ids[0], ids[-1])
            if got >= total and acked == 2:
                break
            time.sleep(0.02)
        else:
            raise TimeoutError(f"latency run: packets did not all arrive\n{pair.logs()}")
        time.sleep(0.3)  # last receipts recorded
        recv = {r[0]: ts(r[1]) for r in rb.rows(
            "SELECT packet_id, received_at FROM inbox WHERE id > ?", b_before)}
        first = ra.scalar("SELECT id FROM outbox WHERE packet_id = ?", ids[0])
        sent = {r[0]: (ts(r[1]), ts(r[2]) if r[2] is not None else None) for r in ra.rows(
            "SELECT packet_id, created_at, acked_at FROM outbox WHERE id >= ?", first)}
    finally:
        ra.close()
    one_way = [(recv[i] - sent[i][0]) * 1000 for i in ids if i in recv]
    acked = [(sent[i][1] - sent[i][0]) * 1000 for i in ids if sent[i][1] is not None]
    return {
        "backend": pair.backend, "size": size, "packets": total, "batch": per,
        "target_rate": cfg.lat_rate, "achieved_rate": total / send_s, "late_batches": late,
        "received_p50_ms": pct(one_way, 0.5), "received_p99_ms": pct(one_way, 0.99),
        "received_max_ms": max(one_way), "acked_p50_ms": pct(acked, 0.5),
        "acked_p99_ms": pct(acked, 0.99), "acked_n": len(acked),
    }


def node_to_node(root: Path, backend: str, dsns: dict[str, str] | None, cfg: Settings,
                 results: dict[str, Any]) -> None:
    console.print(f"[bold]node to node, {backend}[/]: scaffolding and starting B ...")
    pair = Pair(root / f"alliance-{backend}", backend, dsns)
    try:
        for size in SIZES:
            for nthreads in (MANY_THREADS, 1):
                tag = f"{backend}-{size // 1024}k-{nthreads}t"
                r = throughput(pair, size, cfg.n[size], nthreads, tag, cfg.timeout_s)
                results["throughput"].append(r)
                console.print(
                    f"  {KIB[size]:>6} x {cfg.n[size]:>5}, {nthreads:>2} thread(s): "
                    f"{r['steady_pps']:7.0f} packets/s steady, {r['wall_pps']:7.0f} incl. A "
                    f"start-up ({r['received_all_s']:.1f} s); CPU A {r['cpu_a']:.0%} "
                    f"B {r['cpu_b']:.0%}")
        r = latency(pair, cfg)
        results["latency"].append(r)
        console.print(f"  latency at {r['achieved_rate']:.0f}/s: received p50 "
                      f"{r['received_p50_ms']:.1f} ms p99 {r['received_p99_ms']:.1f} ms")
    finally:
        pair.close()


# =============================================================================================
# report
# =============================================================================================


def fmt_us(s: float) -> str:
    us = s * 1e6
    return f"{us:,.1f}" if us < 100 else f"{us:,.0f}"


def report(results: dict[str, Any]) -> None:
    ops = results["ceiling"]["ops_s"]
    t = Table(title="1. Machine ceiling (in-process, this run)", title_justify="left")
    t.add_column("operation")
    t.add_column("µs/op", justify="right")
    t.add_column("ops/s", justify="right")
    for name, s in ops.items():
        t.add_row(name, fmt_us(s), f"{1 / s:,.0f}")
    console.print(t)

    t = Table(title="Ceiling of one A→B pipeline = 1 / (seal + open + validate + "
                    f"commit × {COMMITS_PER_BATCH} / batch)", title_justify="left")
    for c in ("backend", "body", "seal µs", "open µs", "validate µs", "commit/batch µs",
              "batch", "= µs/packet", "ceiling pkt/s"):
        t.add_column(c, justify="right" if c not in ("backend", "body") else "left")
    for key, c in results["ceiling"]["pipeline"].items():
        backend, size = key.split(":")
        t.add_row(backend, KIB[int(size)], f"{c['seal_us']:.0f}", f"{c['open_us']:.0f}",
                  f"{c['validate_us']:.0f}", f"{c['commit/batch_us']:.1f}", str(c["batch"]),
                  f"{c['per_packet_us']:.0f}", f"{c['packets_per_s']:,.0f}")
    console.print(t)

    if results["throughput"]:
        t = Table(title="2. Node to node A→B, real processes, durable commits",
                  title_justify="left")
        for c in ("backend", "body", "threads", "N", "steady pkt/s", "MB/s", "% ceiling",
                  "wall pkt/s", "acked s", "delivered pkt/s", "CPU A", "CPU B"):
            t.add_column(c, justify="left" if c in ("backend", "body") else "right")
        for r in results["throughput"]:
            c = results["ceiling"]["pipeline"].get(f"{r['backend']}:{r['size']}")
            frac = f"{r['steady_pps'] / c['packets_per_s']:.0%}" if c else "-"
            t.add_row(r["backend"], KIB[r["size"]], str(r["threads"]), f"{r['n']:,}",
                      f"{r['steady_pps']:,.0f}", f"{r['mb_per_s']:.1f}", frac,
                      f"{r['wall_pps']:,.0f}", f"{r['acked_all_s']:.1f}",
                      f"{r['delivered_pps']:,.0f}",
                      f"{r['cpu_a']:.0%}", f"{r['cpu_b']:.0%}")
        console.print(t)
    if results["latency"]:
        t = Table(title="Latency, both nodes up, queued through A's local API",
                  title_justify="left")
        for c in ("backend", "body", "rate/s", "batch", "packets", "A created → B received "
                  "p50 ms", "p99 ms", "max ms", "A created → A acked p50 ms", "p99 ms"):
            t.add_column(c, justify="left" if c in ("backend", "body") else "right")
        for r in results["latency"]:
            t.add_row(r["backend"], KIB[r["size"]], f"{r['achieved_rate']:.0f}",
                      str(r["batch"]), str(r["packets"]), f"{r['received_p50_ms']:.1f}",
                      f"{r['received_p99_ms']:.1f}", f"{r['received_max_ms']:.1f}",
                      f"{r['acked_p50_ms']:.1f}", f"{r['acked_p99_ms']:.1f}")
        console.print(t)
    for s in results["skipped"]:
        console.print(f"[yellow]skipped:[/] {s}")
    aim = [r for r in results["throughput"] if r["backend"] == "sqlite" and r["size"] == 4096]
    if aim:
        best = max(r["steady_pps"] for r in aim)
        verdict = "[green]met[/]" if best >= 1500 else "[red]NOT met[/]"
        console.print(f"Aim: ≥ 1,500 sealed 4 KiB packets/s A→B on SQLite — best measured "
                      f"{best:,.0f}/s: {verdict}")
    console.print(
        "[dim]steady pkt/s: packets of all but the last batch / (last batch received_at − "
        "first batch received_at) at B; wall pkt/s: N / (A process start → N rows in B's "
        "inbox), includes A's start-up; % ceiling = steady / ceiling; CPU = process CPU time / "
        "wall time in the steady window (100% = one core; the machine has "
        f"{os.cpu_count()}); delivered: B's spool handler done.[/]")


def git_rev() -> str | None:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                             capture_output=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "bridge"], cwd=ROOT, text=True,
                               capture_output=True, timeout=10).stdout.strip()
        return rev + ("+dirty" if dirty else "") if rev else None
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller runs, under a minute")
    p.add_argument("--json", type=Path, help="result file (default bench/results/"
                                             "exchange-<date>.json)")
    p.add_argument("--pg-dsn", help="PostgreSQL DSN allowed to CREATE DATABASE (default: "
                                    "HUTONG_PG_DSN, else a throwaway cluster)")
    p.add_argument("--no-pg", action="store_true", help="skip PostgreSQL")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (node logs, DBs)")
    args = p.parse_args(argv)
    cfg = settings(args.quick)
    started = time.perf_counter()
    out = args.json or ROOT / "bench" / "results" / \
        f"exchange-{datetime.now().strftime('%Y-%m-%d-%H%M%S')}.json"
    root = Path(tempfile.mkdtemp(prefix="hutong-bench-"))
    results: dict[str, Any] = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"), "quick": cfg.quick,
        "git": git_rev(), "python": platform.python_version(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "data_dir": str(root)},
        "settings": {"n": cfg.n, "threads": [MANY_THREADS, 1], "batch_size":
                     DeliveryConfig().batch_size, "latency": {"rate": cfg.lat_rate,
                     "seconds": cfg.lat_seconds, "batch": cfg.lat_batch}},
        "ceiling": {}, "throughput": [], "latency": [], "skipped": [], "errors": [],
    }
    pg: PgServer | None = None
    try:
        if args.no_pg:
            results["skipped"].append("PostgreSQL: --no-pg")
        else:
            given = args.pg_dsn or os.environ.get("HUTONG_PG_DSN")
            console.print("[bold]PostgreSQL[/]: " + ("connecting ..." if given else
                                                     "starting a throwaway cluster ..."))
            pg = PgServer(given, "--pg-dsn" if args.pg_dsn else "HUTONG_PG_DSN")
            if pg.ok:
                results["postgresql"] = {"source": pg.source, "durability": pg.durable}
                console.print(f"  {pg.source}; {pg.durable}")
            else:
                results["skipped"].append(f"PostgreSQL: {pg.skip_reason}")
                console.print(f"  [yellow]skipped: {pg.skip_reason}[/]")
        console.print("[bold]machine ceiling[/] ...")
        ops = measure_ceiling(cfg, root / "commit", pg.dbs.get(A) if pg and pg.ok else None)
        pipeline = {}
        for backend in ("sqlite", "postgresql"):
            for size in SIZES:
                c = ceiling_for(ops, size, backend)
                if c:
                    pipeline[f"{backend}:{size}"] = c
        results["ceiling"] = {"ops_s": ops, "pipeline": pipeline,
                              "commits_per_batch": COMMITS_PER_BATCH}
        backends: list[tuple[str, dict[str, str] | None]] = [("sqlite", None)]
        if pg is not None and pg.ok:
            backends.append(("postgresql", pg.dbs))
        for backend, dsns in backends:
            try:
                node_to_node(root, backend, dsns, cfg, results)
            except Exception as exc:  # noqa: BLE001 - report, keep the other backend's figures
                results["errors"].append(f"{backend}: {exc}")
                console.print(f"[red]{backend} run failed:[/] {exc}")
                traceback.print_exc()
    finally:
        if pg is not None:
            pg.close()
        if args.keep:
            console.print(f"[dim]kept {root}[/]")
        else:
            shutil.rmtree(root, ignore_errors=True)
    results["elapsed_s"] = time.perf_counter() - started
    console.print()
    report(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2 |
                                 orjson.OPT_NON_STR_KEYS))
    console.print(f"wrote {out} ({results['elapsed_s']:.0f} s)")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
