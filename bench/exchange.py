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
   a ``python -m bridge.cli run`` process. Throughput: with A and B up and idle, N packets are
   queued in A's store from this process in one transaction (``queue_packets`` through
   ``NodeContext.open(plan)``, spread over 50 threads, or all in 1 thread); the clock runs from
   the commit until B's inbox holds the N rows (B's database is polled read-only). Latency:
   both nodes up, packets are queued through A's local API at a steady rate in small batches;
   per packet, B's ``inbox.received_at`` minus A's ``outbox.created_at`` (same clock), and A's
   ``acked_at`` minus ``created_at``. Before the runs B gets a warm-up batch (its FHIR schema
   compiles on first use); before every run but the first, B is restarted with the previous
   run's undelivered backlog skipped (``Pair.restart_b``). The headline rate is the
   *steady* one: packets of all but the last batch over (last - first batch ``received_at`` at
   B); the rate from the commit (N / (commit -> N rows at B), including A's next poll, <= 0.5 s)
   is printed beside it.

3. **Fraction of the ceiling**. The ceiling of one A -> B pipeline is::

       ceiling packets/s = 1 / (seal + open + validate + commit * commits_per_batch / batch)

   seal: A seals each packet (X25519 + HKDF + AES-GCM + Ed25519 sign); open: B decodes, verifies
   the signature and decrypts; validate: B validates the FHIR bundle; commit: one durable commit
   (fsync), of which a batch needs two (B stores the batch's inbox rows, A records the receipts),
   amortised over the batch (``delivery.batch_size`` = 200, capped by the sender's 4 MiB per
   batch: 63 bodies of 64 KiB; 8 MiB and 127 until 2026-12-07). The sum is serial because a
   peer has one batch in flight at a time, so A and B take turns. Not in it: queueing (done
   before the clock starts), receipt sign/verify, HTTP, SQL statements, the audit chain and B's
   local delivery; the fraction shown is therefore how much of the raw
   crypto+validation+fsync budget survives the rest.

4. **Where the time goes**: the same pipeline in this one process (A's ``PeerSender.send_batch``
   posting straight into B's ``Intake.receive``, SQLite, no HTTP, no delivery), with the
   functions of each stage wrapped by a timer: microseconds per packet by stage. With
   ``--py-spy [EXE]`` both node processes are also sampled (``py-spy record --gil``) during the
   first SQLite run; raw stacks go to bench/results/, the top bridge functions are printed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import http.client
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
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from rich.console import Console
from rich.table import Table

from bridge.config.models import DeliveryConfig
from bridge.context import NodeContext
from bridge.crypto import envelope as env
from bridge.delivery.queue import Outgoing, queue_packets
from bridge.delivery.sender import MAX_BATCH_BYTES
from bridge.fhir.validate import parse_and_validate_bundle
from tests.factory import bundle
from tests.harness import Alliance, NodeProcess

console = Console(width=None if sys.stdout.isatty() else 150)

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
#: packets/s offered in the latency run: about half of what B sustains with its local delivery
#: running (results stored), so the figure is the path's latency rather than a queue's length
LATENCY_RATE = 100.0


@dataclass
class Settings:
    quick: bool
    op_budget_s: float  # time spent measuring one ceiling op
    n: dict[int, int]  # packets per throughput run, by body size
    lat_rate: float  # packets/s queued through the local API for the latency run
    lat_seconds: float
    lat_batch: int
    breakdown_n: int  # packets through the in-process pipeline (section 3)
    variants: tuple[tuple[int, int], ...]  # (body size, threads) of the throughput runs
    timeout_s: float = 300.0


def settings(quick: bool) -> Settings:
    if quick:  # the 1-thread run at 64 KiB is left out; 400 x 64 KiB = 7 batches (63 each)
        return Settings(
            True,
            0.12,
            {4096: 1000, 65536: 400},
            LATENCY_RATE,
            3.0,
            10,
            600,
            ((4096, MANY_THREADS), (4096, 1), (65536, MANY_THREADS)),
        )
    return Settings(
        False,
        0.5,
        {4096: 5000, 65536: 1000},
        LATENCY_RATE,
        10.0,
        10,
        2000,
        ((4096, MANY_THREADS), (4096, 1), (65536, MANY_THREADS), (65536, 1)),
    )


def body_of(size: int) -> bytes:
    return orjson.dumps(bundle(SIZES[size], pad_to=size))


def batch_for(size: int) -> int:
    """Packets per sender batch: delivery.batch_size, capped by MAX_BATCH_BYTES of bodies."""
    return max(1, min(DeliveryConfig().batch_size, MAX_BATCH_BYTES // (size + 1)))


# =============================================================================================
# 1. machine ceiling, in-process
# =============================================================================================


def time_op(fn: Callable[[], Any], budget: float) -> tuple[float, float]:
    """Seconds per call as (best, median) of repeated timed loops (each >= ~20 ms) over
    ``budget`` s. The best loop is the timeit convention: what the machine can do when nothing
    else is running (this machine is shared; the median is kept in the JSON too)."""
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
    return min(samples), statistics.median(samples)


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
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS bench_commit (id bigserial PRIMARY KEY, v text)"
        )

    def __call__(self) -> None:
        self.conn.execute("INSERT INTO bench_commit (v) VALUES ('packet-id-0000')")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.execute("DROP TABLE bench_commit")
        self.conn.close()


def measure_ceiling(
    cfg: Settings, disk_dir: Path, pg_dsn: str | None
) -> tuple[dict[str, float], dict[str, float]]:
    """Each op's best and median seconds per call."""
    sk = Ed25519PrivateKey.generate()
    pk = sk.public_key()
    rk = X25519PrivateKey.generate()
    msg = os.urandom(4096)
    sig = sk.sign(msg)
    best: dict[str, float] = {}
    median: dict[str, float] = {}

    def run(name: str, fn: Callable[[], Any], budget: float | None = None) -> None:
        best[name], median[name] = time_op(fn, budget or cfg.op_budget_s)

    run("ed25519 sign 4 KiB", lambda: sk.sign(msg))
    run("ed25519 verify 4 KiB", lambda: pk.verify(sig, msg))
    for size in SIZES:
        body = body_of(size)
        kw: dict[str, Any] = {
            "sender": A,
            "recipient": B,
            "kind": KIND,
            "thread": "t",
            "seq": 1,
            "signing_key": sk,
            "recipient_key": rk.public_key(),
        }
        frame = env.seal(body, **kw)

        def open_(frame: bytes = frame) -> bytes:
            pkt = env.decode(frame, max_body=20 << 20)
            env.verify(pkt, (pk,))
            return env.open_body(pkt, (rk,))

        assert open_() == body
        run(f"seal {KIB[size]}", lambda body=body, kw=kw: env.seal(body, **kw))
        run(f"decode+verify+open {KIB[size]}", open_)
        run(f"validate FHIR {KIB[size]}", lambda body=body: parse_and_validate_bundle(body))
    # what the receiver signs per packet and the sender verifies (not in the formula)
    fields = {
        "packet": "0b7e2f5c-8d1a-4c2e-9f3a-5b6c7d8e9f00",
        "sender": A,
        "recipient": B,
        "receiver": B,
        "status": "accepted",
        "code": None,
        "message": None,
        "at": datetime.now(UTC),
        "digest": "ab" * 32,
    }
    receipt = env.sign_receipt(fields, sk)
    run("receipt sign (B)", lambda: env.sign_receipt(fields, sk))
    run("receipt verify (A)", lambda: env.verify_receipt(receipt, lambda _n: (pk,)))
    commit = SqliteCommit(disk_dir)
    try:
        run("commit sqlite (WAL, FULL)", commit, cfg.op_budget_s * 3)
    finally:
        commit.close()
    if pg_dsn:
        try:
            pgc = PgCommit(pg_dsn)
            try:
                run("commit postgresql", pgc, cfg.op_budget_s * 3)
            finally:
                pgc.close()
        except Exception as exc:  # noqa: BLE001
            console.print(f"[yellow]PostgreSQL commit not measured: {exc}[/]")
    return best, median


def ceiling_for(ops: dict[str, float], size: int, backend: str) -> dict[str, float] | None:
    """The formula of the module docstring, for one backend and body size."""
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
    receipts = ops["receipt sign (B)"] + ops["receipt verify (A)"]
    return {
        "per_packet_us": per_packet * 1e6,
        "packets_per_s": 1 / per_packet,
        "batch": batch,
        **{f"{k}_us": v * 1e6 for k, v in parts.items()},
        "receipts_us": receipts * 1e6,
        "with_receipts_packets_per_s": 1 / (per_packet + receipts),
    }


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


_DURABLE = {
    "fsync=off": "fsync=on",
    "synchronous_commit=off": "synchronous_commit=on",
    "full_page_writes=off": "full_page_writes=on",
}


def _cluster_class() -> tuple[type, str]:
    """tests/conftest.py's throwaway cluster, made durable; or a minimal copy of it."""
    try:
        from tests import conftest

        base = conftest._PgCluster
        bindir = conftest._pg_bindir()

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
    if found and os.access(
        os.path.join(os.path.dirname(os.path.realpath(found)), "initdb"), os.X_OK
    ):
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
        p = subprocess.run(
            cmd, cwd=self.tmp, capture_output=True, text=True, timeout=timeout, check=False
        )
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
        self.run(
            "initdb",
            "-D",
            self.data,
            "-U",
            "hutong",
            "--pwfile",
            pwfile,
            "--auth",
            "scram-sha-256",
            "--encoding",
            "UTF8",
            "--no-locale",
            "--no-sync",
        )
        os.unlink(pwfile)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.run(
            "pg_ctl",
            "-D",
            self.data,
            "-l",
            self.log,
            "-w",
            "-t",
            "60",
            "-o",
            f"-p {port} -k {sock} -c listen_addresses=127.0.0.1",
            "start",
        )
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
        self.version: str | None = None
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

            with psycopg.connect(
                libpq_url(self.admin_dsn), autocommit=True, connect_timeout=10
            ) as conn:
                fsync = conn.execute("SHOW fsync").fetchone()[0]
                sync = conn.execute("SHOW synchronous_commit").fetchone()[0]
                self.durable = f"fsync={fsync}, synchronous_commit={sync}"
                self.version = conn.execute("SHOW server_version").fetchone()[0]
            self.new_dbs()
        except BaseException as exc:  # pytest.skip() from conftest is a BaseException
            if isinstance(exc, KeyboardInterrupt):
                raise
            self.skip_reason = f"{type(exc).__name__}: {exc}".strip()
            self.close()

    @property
    def ok(self) -> bool:
        return self.skip_reason is None

    def new_dbs(self) -> dict[str, str]:
        """Drop the current pair of databases and make two fresh ones (A and B), so one server
        (one cluster start) serves every PostgreSQL section of a run."""
        import psycopg

        self.drop_dbs()
        assert self.admin_dsn is not None
        with psycopg.connect(
            libpq_url(self.admin_dsn), autocommit=True, connect_timeout=10
        ) as conn:
            for node in (A, B):
                name = f"hutong_bench_{node}_{secrets.token_hex(4)}"
                conn.execute(f"CREATE DATABASE \"{name}\" ENCODING 'UTF8' TEMPLATE template0")
                self.dbs[node] = with_database(self.admin_dsn, name)
        return self.dbs

    def drop_dbs(self) -> None:
        if self.dbs and self.admin_dsn:
            try:
                import psycopg

                with psycopg.connect(libpq_url(self.admin_dsn), autocommit=True) as conn:
                    for dsn in self.dbs.values():
                        name = dsn.rsplit("/", 1)[1].split("?")[0]
                        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            except Exception as exc:  # noqa: BLE001 - best effort: the temp dir goes anyway
                console.print(f"[yellow]could not drop the bench databases: {exc}[/]")
        self.dbs = {}

    def close(self) -> None:
        self.drop_dbs()
        if self.cluster is not None:
            with contextlib.suppress(BaseException):
                self.cluster.stop()
            self.cluster = None


# =============================================================================================
# 2. node to node
# =============================================================================================


class Reader:
    """Plain read-only queries against a node's database (never through the node)."""

    def __init__(self, dsn: str, write: bool = False) -> None:
        self.sqlite = dsn.startswith("sqlite:///")
        if self.sqlite:
            self.conn: Any = sqlite3.connect(
                dsn[len("sqlite:///") :], timeout=30, isolation_level=None
            )
            if not write:
                self.conn.execute("PRAGMA query_only = 1")
        else:
            import psycopg

            self.conn = psycopg.connect(libpq_url(dsn), autocommit=True)
            if not write:
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


def peak_rss_mib(pid: int | None) -> float | None:
    """Peak resident set of a process so far (VmHWM in /proc/<pid>/status), MiB."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def machine_busy_s() -> float:
    """CPU seconds all cores have spent busy since boot (/proc/stat), to see others' load."""
    try:
        v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait
    except (OSError, ValueError, IndexError):
        return 0.0


def postgres_cpu_s() -> float:
    """CPU seconds of every process named ``postgres`` on this machine (server + backends)."""
    total = 0.0
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (d / "comm").read_text().strip() == "postgres":
                    total += cpu_seconds(int(d.name))
            except OSError:
                continue
    return total


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
    """A -> B, scaffolded as the tests do; both run throughout, B is restarted between runs."""

    def __init__(
        self, folder: Path, backend: str, dsns: dict[str, str] | None, start_b: bool = True
    ) -> None:
        """``start_b=False``: both stores are created but A and B are left stopped
        (``ready_a`` / ``restart_b`` start them), for a caller that loads the stores first."""
        self.backend = backend
        self.alliance = Alliance(
            folder, MEMBERS, RULES, dsn_for=(lambda n: dsns[n]) if dsns else None
        )
        self.a = self.alliance.node(A)
        self.b = self.alliance.node(B)
        self.rb: Reader | None = None
        self._b_starting = False
        if not start_b:
            for node in (self.a, self.b):
                NodeContext.open(node.plan).store.dispose()  # creates the tables
            return
        self.alliance.start(B, A)
        self.rb = Reader(self.b.plan.storage_dsn)
        self.warm_up()

    def warm_up(self) -> None:
        """Post a few packets sealed with A's keys straight to B's gateway, so B's one-time
        costs (the FHIR schema is compiled on first use, ~0.2 s) fall outside the runs."""
        ctx = NodeContext.open(self.a.plan)
        try:
            rk = ctx.plan.directory[B].encryption_keys[0]
            frames = [
                env.seal(
                    body_of(size),
                    sender=A,
                    recipient=B,
                    kind=KIND,
                    thread="warm-up",
                    seq=i + 1,
                    signing_key=ctx.signing_key,
                    recipient_key=rk,
                )
                for i, size in enumerate([4096] * 8 + [65536] * 2)
            ]
        finally:
            ctx.store.dispose()
        conn = http.client.HTTPConnection(self.b.plan.peer_host, self.b.plan.peer_port, timeout=60)
        try:
            conn.request(
                "POST",
                "/exchange/v1/packets",
                body=env.encode_batch(frames),
                headers={"Content-Type": "application/x-hutong-batch"},
            )
            r = conn.getresponse()
            r.read()
            if r.status != 200:
                raise RuntimeError(f"warm-up batch answered HTTP {r.status}")
        finally:
            conn.close()

    def restart_b(self) -> None:
        """A fresh B for the next run: B is killed (SIGKILL: nothing it accepted is lost, and
        it need not finish its delivery batch first), the packets it has not yet handed to its
        local side are marked delivered in its database (bench only: the previous run's local
        deliveries must not eat the next run's CPU, and waiting for them costs 10-80 s a run),
        then B is started; ``ready_b`` (called by every run just before it queues its packets,
        so B's start-up overlaps building them) waits for it and warms it up again. Its peak
        RSS then counts from this start."""
        self.b.kill()
        if self.rb is not None:
            self.rb.close()
        with contextlib.suppress(Exception):
            w = Reader(self.b.plan.storage_dsn, write=True)
            try:
                w.rows("UPDATE inbox SET state = 'delivered' WHERE state = 'received' RETURNING id")
            finally:
                w.close()
        self.b.start()
        self._b_starting = True

    def ready_a(self) -> None:
        """A running and ready (started if it is not: ``growth`` stops it to load its store)."""
        if pid_of(self.a) is None:
            self.a.start()
        self.a.wait_ready()

    def ready_b(self) -> None:
        """Wait for a B that ``restart_b`` started, open the reader, warm it up."""
        if not self._b_starting:
            return
        self.b.wait_ready()
        self.rb = Reader(self.b.plan.storage_dsn)
        self.warm_up()
        self._b_starting = False

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.rb.close()
        self.b.kill()  # the rest of its delivery backlog does not matter: the data go now
        self.alliance.stop_all()

    def logs(self) -> str:
        return "\n".join(
            f"--- {n.node_id}.log ---\n{n.log.read_text()[-1500:]}"
            for n in (self.a, self.b)
            if n.log.exists()
        )


def queue_direct(
    plan: Any, bodies: list[bytes], threads: list[str], one_transaction: bool = False
) -> list[str]:
    """Queue packets into A's store from this process, as the local API would: 500 a
    transaction, or all in one (a running A then sees the whole backlog at once)."""
    ctx = NodeContext.open(plan)
    ids: list[str] = []
    step = len(bodies) if one_transaction else 500
    try:
        for i in range(0, len(bodies), step):
            items = [
                Outgoing(B, KIND, b, t)
                for b, t in zip(bodies[i : i + step], threads[i : i + step], strict=True)
            ]
            with ctx.store.write() as conn:
                results = queue_packets(ctx, conn, items, actor="bench")
                bad = [r.error for r in results if r.error is not None]
                if bad:  # raised inside the block: nothing of this run is committed
                    raise RuntimeError(f"queue refused {len(bad)} packets: {bad[0]}")
            ids += [r.packet_id for r in results]  # type: ignore[misc]
    finally:
        ctx.store.dispose()
    return ids


def throughput(
    pair: Pair,
    size: int,
    n: int,
    nthreads: int,
    tag: str,
    timeout: float,
    spy: Spy | None = None,
    wait_delivered: bool = True,
) -> dict[str, Any]:
    """One run; with ``wait_delivered`` the clock also runs until B's local side has all N
    (end to end), else it stops once B has received and A has recorded every receipt.

    A and B are up and idle; the N packets are queued into A's store in one transaction, and
    the clock starts at its commit (A's sender finds them at its next poll, <= 0.5 s)."""
    a = pair.a
    prefix = f"{tag}-{secrets.token_hex(3)}"
    threads = [f"{prefix}-{i % nthreads}" for i in range(n)]
    bodies = [body_of(size) for _ in range(n)]
    pair.ready_a()
    pair.ready_b()
    rb = pair.rb
    b_before = rb.scalar("SELECT COALESCE(MAX(id), 0) FROM inbox")
    b_pid = pid_of(pair.b)
    t = time.perf_counter()
    ids = queue_direct(a.plan, bodies, threads, one_transaction=True)
    t0 = time.perf_counter()
    queue_s = t0 - t
    ra = Reader(a.plan.storage_dsn)
    a_before = ra.scalar("SELECT MIN(id) FROM outbox WHERE packet_id = ?", ids[0]) - 1
    if spy is not None:
        spy.start("B", b_pid)  # type: ignore[arg-type]
    first_seen = None
    cpu0: tuple[float, ...] = (0.0,) * 5
    is_pg = pair.backend == "postgresql"
    received_s = acked_s = delivered_s = None
    deadline = t0 + timeout
    try:
        while time.perf_counter() < deadline:
            now = time.perf_counter()
            if received_s is None or (wait_delivered and delivered_s is None):
                got, done = rb.rows(
                    "SELECT COUNT(*), COALESCE(SUM(CASE WHEN state = 'delivered' THEN 1 ELSE 0"
                    " END), 0) FROM inbox WHERE id > ?",
                    b_before,
                )[0]
                if got and first_seen is None:
                    first_seen = now
                    if spy is not None and pid_of(a):
                        spy.start("A", pid_of(a))  # type: ignore[arg-type]  # A is up by now
                    cpu0 = (
                        cpu_seconds(pid_of(a)),
                        cpu_seconds(b_pid),
                        machine_busy_s(),
                        time.process_time(),
                        postgres_cpu_s() if is_pg else 0.0,
                    )
                if received_s is None and got >= n:
                    received_s = now - t0
                    cpu1 = (
                        cpu_seconds(pid_of(a)),
                        cpu_seconds(b_pid),
                        machine_busy_s(),
                        time.process_time(),
                        postgres_cpu_s() if is_pg else 0.0,
                    )
                    window = max(now - first_seen, 1e-3)
                if delivered_s is None and done >= n:
                    delivered_s = now - t0
            if received_s is not None and acked_s is None:
                acked = ra.scalar(
                    "SELECT COUNT(*) FROM outbox WHERE id > ? AND state = 'acknowledged'", a_before
                )
                if acked >= n:
                    acked_s = now - t0
            if (
                received_s is not None
                and acked_s is not None
                and (delivered_s is not None or not wait_delivered)
            ):
                break
            if a.proc is not None and a.proc.poll() is not None:
                raise RuntimeError(f"node A exited during the run\n{pair.logs()}")
            time.sleep(0.01)
        else:
            raise TimeoutError(
                f"{tag}: not all {n} packets arrived within {timeout:.0f} s\n{pair.logs()}"
            )
        times = sorted(
            ts(r[0]) for r in rb.rows("SELECT received_at FROM inbox WHERE id > ?", b_before)
        )
        rss_a, rss_b = peak_rss_mib(pid_of(a)), peak_rss_mib(b_pid)  # A and B still up
        last_batch = sum(1 for x in times if x == times[-1])
        span = times[-1] - times[0]
        steady = (n - last_batch) / span if span > 0 else float("nan")
    finally:
        ra.close()
        profile = spy.stop() if spy is not None else None
    used = [c1 - c0 for c0, c1 in zip(cpu0, cpu1, strict=True)]
    return {
        "backend": pair.backend,
        "size": size,
        "n": n,
        "threads": nthreads,
        "queue_s": queue_s,
        "received_all_s": received_s,
        "acked_all_s": acked_s,
        "delivered_all_s": delivered_s,
        "wall_pps": n / received_s,
        "steady_pps": steady,
        "steady_span_s": span,
        "batches": len(set(times)),
        "mb_per_s": steady * size / 1e6,
        "delivered_pps": n / delivered_s if delivered_s else None,
        "cpu_a": used[0] / window,
        "cpu_b": used[1] / window,
        "cpu_db": used[4] / window if is_pg else None,  # the PostgreSQL server's processes
        # busy cores not spent by A, B, the database or this process: other users of the machine
        "cpu_others": max(0.0, used[2] - used[0] - used[1] - used[3] - used[4]) / window,
        "steady_window_s": window,
        "rss_a_peak_mib": rss_a,
        "rss_b_peak_mib": rss_b,  # VmHWM: A since its start, B since
        "pyspy": profile,
    }


class LocalClient:
    """Keep-alive client for A's local API (orjson, no urllib per request)."""

    def __init__(self, node: NodeProcess) -> None:
        self.conn = http.client.HTTPConnection(
            node.plan.local_host, node.plan.local_port, timeout=60
        )
        self.headers = {
            "Authorization": f"Bearer {node.token('clinician')}",
            "Content-Type": "application/json",
        }

    def send(self, items: list[dict[str, Any]]) -> list[str]:
        self.conn.request(
            "POST", "/local/v1/packets", body=orjson.dumps(items), headers=self.headers
        )
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
    pair.ready_b()
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
            items = [
                {"to": B, "kind": KIND, "thread": f"lat-{(k + j) % MANY_THREADS}", "bundle": d}
                for j, d in enumerate(docs[k : k + per])
            ]
            ids += client.send(items)
        send_s = time.perf_counter() - t0
    finally:
        client.close()
    deadline = time.perf_counter() + cfg.timeout_s
    ra = Reader(a.plan.storage_dsn)
    try:
        while time.perf_counter() < deadline:
            got = rb.scalar("SELECT COUNT(*) FROM inbox WHERE id > ?", b_before)
            acked = ra.scalar(
                "SELECT COUNT(*) FROM outbox WHERE id >= (SELECT id FROM outbox"
                " WHERE packet_id = ?) AND state = 'acknowledged'",
                ids[0],
            )
            if got >= total and acked >= total:
                break
            time.sleep(0.02)
        else:
            raise TimeoutError(f"latency run: packets did not all arrive\n{pair.logs()}")
        recv = {
            r[0]: ts(r[1])
            for r in rb.rows("SELECT packet_id, received_at FROM inbox WHERE id > ?", b_before)
        }
        first = ra.scalar("SELECT id FROM outbox WHERE packet_id = ?", ids[0])
        sent = {
            r[0]: (ts(r[1]), ts(r[2]) if r[2] is not None else None)
            for r in ra.rows(
                "SELECT packet_id, created_at, acked_at FROM outbox WHERE id >= ?", first
            )
        }
    finally:
        ra.close()
    one_way = [(recv[i] - sent[i][0]) * 1000 for i in ids if i in recv]
    acked = [(sent[i][1] - sent[i][0]) * 1000 for i in ids if sent[i][1] is not None]
    return {
        "backend": pair.backend,
        "size": size,
        "packets": total,
        "batch": per,
        "target_rate": cfg.lat_rate,
        "achieved_rate": total / send_s,
        "late_batches": late,
        "received_p50_ms": pct(one_way, 0.5),
        "received_p99_ms": pct(one_way, 0.99),
        "received_max_ms": max(one_way),
        "acked_p50_ms": pct(acked, 0.5),
        "acked_p99_ms": pct(acked, 0.99),
        "acked_n": len(acked),
    }


def node_to_node(
    root: Path,
    backend: str,
    dsns: dict[str, str] | None,
    cfg: Settings,
    results: dict[str, Any],
    spy: Spy | None = None,
) -> None:
    console.print(f"[bold]node to node, {backend}[/]: scaffolding and starting B ...")
    pair = Pair(root / f"alliance-{backend}", backend, dsns)
    try:
        for i, (size, nthreads) in enumerate(cfg.variants):
            tag = f"{backend}-{size // 1024}k-{nthreads}t"
            first = i == 0
            if not first:
                pair.restart_b()  # B idle and fresh, its previous backlog skipped
            # only SQLite's first run waits for B's local delivery (the end-to-end figure;
            # on PostgreSQL it cost 20-75 s a run, more than the rest of the run)
            r = throughput(
                pair,
                size,
                cfg.n[size],
                nthreads,
                tag,
                cfg.timeout_s,
                spy if first else None,
                wait_delivered=first and backend == "sqlite",
            )
            results["throughput"].append(r)
            console.print(
                f"  {KIB[size]:>6} x {cfg.n[size]:>5}, {nthreads:>2} thread(s): "
                f"{r['steady_pps']:7.0f} packets/s steady, {r['wall_pps']:7.0f} from the "
                f"commit ({r['received_all_s']:.1f} s); CPU A {r['cpu_a']:.0%} "
                f"B {r['cpu_b']:.0%}"
                + ("" if r["cpu_db"] is None else f" db {r['cpu_db']:.0%}")
                + f", others {r['cpu_others']:.0%}"
            )
        pair.restart_b()
        r = latency(pair, cfg)
        results["latency"].append(r)
        console.print(
            f"  latency at {r['achieved_rate']:.0f}/s: received p50 "
            f"{r['received_p50_ms']:.1f} ms p99 {r['received_p99_ms']:.1f} ms"
        )
    finally:
        pair.close()


# =============================================================================================
# 3. where the time goes: the same pipeline in one process, timed stage by stage
# =============================================================================================


class StageTimer:
    """Wraps functions and methods of the running code (this process only) to add up wall time
    per stage; ``restore`` puts the originals back. A missing name is skipped, not an error."""

    def __init__(self) -> None:
        self.total: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._undo: list[tuple[Any, str, Any]] = []

    def add(self, label: str, seconds: float) -> None:
        self.total[label] = self.total.get(label, 0.0) + seconds
        self.calls[label] = self.calls.get(label, 0) + 1

    def wrap(self, owner: Any, name: str, label: str) -> None:
        original = (
            owner.__dict__.get(name) if isinstance(owner, type) else getattr(owner, name, None)
        )
        if original is None:
            return
        timer = self

        def timed(*args: Any, **kw: Any) -> Any:
            t = time.perf_counter()
            try:
                return original(*args, **kw)
            finally:
                timer.add(label, time.perf_counter() - t)

        setattr(owner, name, timed)
        self._undo.append((owner, name, original))

    def restore(self) -> None:
        for owner, name, original in reversed(self._undo):
            setattr(owner, name, original)
        self._undo.clear()


#: (label, indent): the rows of the breakdown, in order; nested rows are inside the row above
STAGES = [
    ("A claim: SELECT due rows", 0),
    ("A seal (_frame)", 0),
    ("A record receipts (_record)", 0),
    ("verify receipt", 1),
    ("A COMMIT (fsync)", 0),
    ("B receive batch (Intake.receive)", 0),
    ("dedupe lookup (_existing)", 1),
    ("decode frame", 1),
    ("verify signature", 1),
    ("open body", 1),
    ("validate FHIR", 1),
    ("patient hash", 1),
    ("sign receipt", 1),
    ("INSERT inbox + audit (_commit)", 1),
    ("B COMMIT (fsync)", 1),
    ("audit chain append (A and B, inside the rows above)", 0),
]


def breakdown(root: Path, n: int, batch_receipts: bool = True) -> dict[str, Any]:
    """A's PeerSender.send_batch posting straight into B's Intake.receive (the gateway's job,
    minus HTTP), both on SQLite in this process; B's local delivery does not run.
    ``batch_receipts``: A asks for batch-signed receipts (HTR2, the default) or not (HTR1)."""
    from bridge.audit.chain import AuditChain
    from bridge.config.loader import load_node
    from bridge.config.scaffold import write_alliance
    from bridge.delivery.sender import PeerSender
    from bridge.gateway import intake as intake_mod
    from bridge.store import db as db_mod

    files = write_alliance(root, MEMBERS, RULES, base_port_local=20100, base_port_peer=20200)
    plan_a, plan_b = load_node(files[A]), load_node(files[B])
    plan_a = dataclasses.replace(
        plan_a, delivery=dataclasses.replace(plan_a.delivery, batch_receipts=batch_receipts)
    )
    queue_direct(
        plan_a, [body_of(4096) for _ in range(n)], [f"p-{i % MANY_THREADS}" for i in range(n)]
    )
    ctx_a, ctx_b = NodeContext.open(plan_a), NodeContext.open(plan_b)
    intake = intake_mod.Intake(ctx_b)
    sender = PeerSender(ctx_a, B)
    max_total = plan_b.limits.max_body_bytes * 2 + (8 << 20)

    class Direct:
        def post_batch(self, body: bytes, *, receipts_v2: bool = False) -> bytes:
            frames = env.decode_batch(body, max_items=plan_b.limits.max_batch, max_total=max_total)
            return env.encode_batch(intake.receive(frames, receipts_v2=receipts_v2))

        def close(self) -> None:
            pass

    sender.conn.close()
    sender.conn = Direct()  # type: ignore[assignment]
    timer = StageTimer()
    timer.wrap(PeerSender, "claim", "A claim: SELECT due rows")
    timer.wrap(PeerSender, "_frame", "A seal (_frame)")
    timer.wrap(PeerSender, "_record", "A record receipts (_record)")
    timer.wrap(env, "verify_receipt", "verify receipt")
    timer.wrap(intake_mod.Intake, "receive", "B receive batch (Intake.receive)")
    timer.wrap(intake_mod.Intake, "_existing", "dedupe lookup (_existing)")
    timer.wrap(env, "decode", "decode frame")
    timer.wrap(env, "verify", "verify signature")
    timer.wrap(env, "open_body", "open body")
    timer.wrap(intake_mod, "parse_and_validate_bundle", "validate FHIR")
    timer.wrap(intake_mod, "bundle_patient_hash", "patient hash")
    timer.wrap(env, "sign_receipt", "sign receipt")  # HTR1, one each
    timer.wrap(env, "sign_receipts", "sign receipt")  # HTR2, one per answer batch
    timer.wrap(intake_mod.Intake, "_commit", "INSERT inbox + audit (_commit)")
    timer.wrap(AuditChain, "append", "audit chain append (A and B, inside the rows above)")
    original_write = db_mod.Store.__dict__["write"]
    stores = {id(ctx_a.store): "A COMMIT (fsync)", id(ctx_b.store): "B COMMIT (fsync)"}

    @contextlib.contextmanager
    def write(self: Any) -> Iterator[Any]:
        with original_write(self) as conn:
            yield conn
            t = time.perf_counter()  # the rest of the with-block is the COMMIT
        timer.add(stores.get(id(self), "other COMMIT"), time.perf_counter() - t)

    db_mod.Store.write = write  # type: ignore[method-assign]
    sent = 0
    t0 = time.perf_counter()
    try:
        while True:
            report = sender.send_batch()
            if report.failed:
                raise RuntimeError(f"in-process pipeline: {report.error}")
            if not report.sent:
                break
            sent += report.sent
    finally:
        wall = time.perf_counter() - t0
        db_mod.Store.write = original_write  # type: ignore[method-assign]
        timer.restore()
        ctx_a.store.dispose()
        ctx_b.store.dispose()
    if sent != n:
        raise RuntimeError(f"in-process pipeline sent {sent} of {n}")
    stages = {
        label: {"us_per_packet": timer.total[label] / n * 1e6, "calls": timer.calls[label]}
        for label, _ in STAGES
        if label in timer.total
    }
    return {
        "n": n,
        "size": 4096,
        "wall_s": wall,
        "packets_per_s": n / wall,
        "us_per_packet": wall / n * 1e6,
        "stages": stages,
    }


# =============================================================================================
# optional: py-spy on the node processes
# =============================================================================================


class Spy:
    """``py-spy record --gil`` on A and B during one run (stacks holding the GIL = Python CPU);
    ``idle=True``: ``--idle`` instead, every thread's stack whether it runs or waits."""

    def __init__(self, exe: str, out_dir: Path, stamp: str, idle: bool = False) -> None:
        self.exe, self.out_dir, self.stamp, self.idle = exe, out_dir, stamp, idle
        self.procs: list[tuple[str, subprocess.Popen[bytes], Path]] = []

    def start(self, node: str, pid: int) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        out = self.out_dir / f"pyspy-{self.stamp}-{node}.txt"
        p = subprocess.Popen(
            [
                self.exe,
                "record",
                "-p",
                str(pid),
                "-r",
                "200",
                "-f",
                "raw",
                "-o",
                str(out),
                "--idle" if self.idle else "--gil",
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.procs.append((node, p, out))

    def stop(self) -> dict[str, Any]:
        import signal

        summary: dict[str, Any] = {}
        for _node, p, _out in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for node, p, out in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
            if out.exists():
                summary[node] = {"file": str(out), "top": top_frames(out)}
        self.procs.clear()
        return summary


def top_frames(path: Path, k: int = 15) -> list[tuple[str, float]]:
    """Share of GIL-holding samples spent inside each bridge/ function (inclusive)."""
    counts: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        total += int(n)
        seen = set()
        for frame in stack.split(";"):
            m = re.match(r"(.*) \((.*?):\d+\)$", frame)
            path_ = m.group(2) if m else ""
            if path_.startswith("bridge/") or "/bridge/" in path_:
                name = f"{path_.rsplit('bridge/', 1)[-1]}:{m.group(1)}"  # type: ignore[union-attr]
                if name not in seen:
                    seen.add(name)
                    counts[name] = counts.get(name, 0) + int(n)
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])[:k]
    return [(name, c / total) for name, c in ranked] if total else []


# =============================================================================================
# report
# =============================================================================================


def fmt_us(s: float) -> str:
    us = s * 1e6
    return f"{us:,.1f}" if us < 100 else f"{us:,.0f}"


def _table(title: str, columns: list[str], left: int = 1) -> Table:
    t = Table(title=title, title_justify="left", title_style="bold")
    for i, c in enumerate(columns):
        t.add_column(c, justify="left" if i < left else "right")
    return t


def report(results: dict[str, Any]) -> None:
    ceiling = results["ceiling"]
    t = _table(
        "1. Machine ceiling, in-process, this run (best loop; median in the JSON)",
        ["operation", "µs/op", "ops/s", "median µs/op"],
    )
    for name, s in ceiling["best_s"].items():
        t.add_row(name, fmt_us(s), f"{1 / s:,.0f}", fmt_us(ceiling["median_s"][name]))
    console.print(t)

    t = _table(
        f"Ceiling of one A→B pipeline = 1 / (seal + open + validate + commit × "
        f"{COMMITS_PER_BATCH} / batch)",
        [
            "backend",
            "body",
            "seal µs",
            "open µs",
            "validate µs",
            "commit×2/batch µs",
            "batch",
            "= µs/packet",
            "ceiling pkt/s",
            "+ receipts µs",
            "ceiling incl. receipts",
        ],
        left=2,
    )
    for key, c in ceiling["pipeline"].items():
        backend, size = key.split(":")
        t.add_row(
            backend,
            KIB[int(size)],
            f"{c['seal_us']:.0f}",
            f"{c['open_us']:.0f}",
            f"{c['validate_us']:.0f}",
            f"{c['commit/batch_us']:.1f}",
            str(c["batch"]),
            f"{c['per_packet_us']:.0f}",
            f"{c['packets_per_s']:,.0f}",
            f"{c['receipts_us']:.0f}",
            f"{c['with_receipts_packets_per_s']:,.0f}",
        )
    console.print(t)
    console.print(
        "[dim]seal = A encrypts + signs; open = B decodes, verifies, decrypts; validate = B's "
        "FHIR check; commit = one fsync'd commit, two per batch (B stores the batch, A records "
        "the receipts), shared by the batch's packets. Serial, because a peer has one batch in "
        "flight: A and B take turns. Receipts (B signs one per packet, A verifies it) are not "
        "in the formula; the last column adds them.[/]"
    )

    if results["throughput"]:
        t = _table(
            "2. Node to node A→B, real processes, durable commits",
            [
                "backend",
                "body",
                "threads",
                "N",
                "steady pkt/s",
                "MB/s",
                "% of ceiling",
                "wall pkt/s",
                "all acked s",
                "delivered pkt/s",
                "CPU A",
                "CPU B",
                "CPU db",
                "CPU others",
            ],
            left=2,
        )
        for r in results["throughput"]:
            c = ceiling["pipeline"].get(f"{r['backend']}:{r['size']}")
            frac = f"{r['steady_pps'] / c['packets_per_s']:.0%}" if c else "-"
            t.add_row(
                r["backend"],
                KIB[r["size"]],
                str(r["threads"]),
                f"{r['n']:,}",
                f"{r['steady_pps']:,.0f}",
                f"{r['mb_per_s']:.1f}",
                frac,
                f"{r['wall_pps']:,.0f}",
                f"{r['acked_all_s']:.1f}",
                "-" if r.get("delivered_pps") is None else f"{r['delivered_pps']:,.0f}",
                f"{r['cpu_a']:.0%}",
                f"{r['cpu_b']:.0%}",
                "-" if r.get("cpu_db") is None else f"{r['cpu_db']:.0%}",
                f"{r['cpu_others']:.0%}",
            )
        console.print(t)
        console.print(
            "[dim]steady pkt/s = packets of all but the last batch / (last − first batch "
            "received_at at B); wall pkt/s = N / (queue commit → N rows in B's inbox), so it "
            "includes A's next poll (≤ 0.5 s); MB/s counts bundle bytes at the steady rate; "
            "delivered = "
            "N / time until B's spool handler had written all N; CPU = process CPU seconds / "
            f"steady-window seconds (100% = one core of {os.cpu_count()}); CPU db = all "
            "'postgres' processes; CPU others = busy cores used by anything but A, B, the "
            "database and this script (other users of a shared machine).[/]"
        )
    if results["latency"]:
        t = _table(
            "Latency, both nodes up, packets queued through A's local API",
            [
                "backend",
                "body",
                "rate/s",
                "per call",
                "packets",
                "created→received p50 ms",
                "p99 ms",
                "max ms",
                "created→acked p50 ms",
                "p99 ms",
            ],
            left=2,
        )
        for r in results["latency"]:
            t.add_row(
                r["backend"],
                KIB[r["size"]],
                f"{r['achieved_rate']:.0f}",
                str(r["batch"]),
                str(r["packets"]),
                f"{r['received_p50_ms']:.1f}",
                f"{r['received_p99_ms']:.1f}",
                f"{r['received_max_ms']:.1f}",
                f"{r['acked_p50_ms']:.1f}",
                f"{r['acked_p99_ms']:.1f}",
            )
        console.print(t)
        console.print(
            "[dim]created = A's outbox.created_at (queue_packets started); received = B's "
            "inbox.received_at (Intake.receive started, before B's commit); acked = A's "
            "outbox.acked_at (B's signed receipt recorded at A). Same clock, same machine.[/]"
        )
    bd = results.get("breakdown")
    if bd:
        t = _table(
            f"3. Where the time goes: A sender → B intake in one process, no HTTP, "
            f"no delivery, SQLite, 4 KiB × {bd['n']:,} = {bd['packets_per_s']:,.0f} "
            f"pkt/s ({bd['us_per_packet']:,.0f} µs/packet)",
            ["stage", "µs/packet", "% of wall"],
        )
        indent = dict(STAGES)
        for label, v in bd["stages"].items():
            share = v["us_per_packet"] / bd["us_per_packet"]
            t.add_row(
                "    " * indent.get(label, 0) + label, f"{v['us_per_packet']:,.0f}", f"{share:.0%}"
            )
        console.print(t)
    for r in results["throughput"]:
        for node, prof in (r.get("pyspy") or {}).items():
            t = _table(
                f"py-spy --gil, node {node}, {r['backend']} {KIB[r['size']]} ({prof['file']})",
                ["bridge function (inclusive)", "GIL samples"],
            )
            for name, share in prof["top"]:
                t.add_row(name, f"{share:.0%}")
            console.print(t)
    for s in results["skipped"]:
        console.print(f"[yellow]skipped:[/] {s}")
    for s in results["errors"]:
        console.print(f"[red]error:[/] {s.splitlines()[0]}")
    aim = [r for r in results["throughput"] if r["backend"] == "sqlite" and r["size"] == 4096]
    if aim:
        best = max(r["steady_pps"] for r in aim)
        verdict = "[green]met[/]" if best >= 1500 else "[red]NOT met[/]"
        console.print(
            f"[bold]Aim: ≥ 1,500 sealed 4 KiB packets/s A→B with durable commits on "
            f"SQLite — best measured {best:,.0f}/s: {verdict}[/]"
        )
    load = results.get("loadavg")
    if load:
        console.print(
            f"[dim]load average at start {load['start']}, at end {load['end']} "
            f"(this machine has {os.cpu_count()} cores and may be shared).[/]"
        )


def git_rev() -> str | None:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            text=True,
            capture_output=True,
            timeout=10,
            check=False,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "bridge"],
            cwd=ROOT,
            text=True,
            capture_output=True,
            timeout=10,
            check=False,
        ).stdout.strip()
        return rev + ("+dirty" if dirty else "") if rev else None
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv: list[str] | None = None, pg_server: PgServer | None = None) -> int:
    """``pg_server``: a server the caller started (``run.py`` shares one across sections);
    it is used as is and left running."""
    p = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="smaller runs, under a minute")
    p.add_argument(
        "--json", type=Path, help="result file (default bench/results/exchange-<date>.json)"
    )
    p.add_argument(
        "--pg-dsn",
        help="PostgreSQL DSN allowed to CREATE DATABASE (default: "
        "HUTONG_PG_DSN, else a throwaway durable cluster)",
    )
    p.add_argument("--no-pg", action="store_true", help="skip PostgreSQL")
    p.add_argument(
        "--py-spy",
        nargs="?",
        const="py-spy",
        metavar="EXE",
        help="profile both nodes with py-spy (--gil) during the first SQLite run",
    )
    p.add_argument("--keep", action="store_true", help="keep the temp dir (node logs, DBs)")
    args = p.parse_args(argv)
    cfg = settings(args.quick)
    started = time.perf_counter()
    stamp = datetime.now().strftime("%Y-%m-%d-%H%M%S")
    results_dir = ROOT / "bench" / "results"
    out = args.json or results_dir / f"exchange-{stamp}.json"
    root = Path(tempfile.mkdtemp(prefix="hutong-bench-"))
    results: dict[str, Any] = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": cfg.quick,
        "git": git_rev(),
        "python": platform.python_version(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "data_dir": str(root)},
        "loadavg": {"start": [round(x, 2) for x in os.getloadavg()]},
        "settings": {
            "n": cfg.n,
            "variants": cfg.variants,
            "batch_size": DeliveryConfig().batch_size,
            "commits_per_batch": COMMITS_PER_BATCH,
            "latency": {
                "rate": cfg.lat_rate,
                "seconds": cfg.lat_seconds,
                "per_call": cfg.lat_batch,
            },
        },
        "ceiling": {},
        "throughput": [],
        "latency": [],
        "skipped": [],
        "errors": [],
    }
    spy = None
    if args.py_spy:
        exe = shutil.which(args.py_spy) or os.environ.get("PY_SPY")
        if exe:
            spy = Spy(exe, results_dir, stamp)
        else:
            results["skipped"].append(f"py-spy: '{args.py_spy}' not found (pip install py-spy)")
    pg: PgServer | None = pg_server
    parts: dict[str, float] = {}
    results["parts_s"] = parts
    mark = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal mark
        parts[name] = time.perf_counter() - mark
        mark = time.perf_counter()

    try:
        if args.no_pg:
            results["skipped"].append("PostgreSQL: --no-pg")
        elif pg is not None:
            if pg.ok:
                results["postgresql"] = {
                    "source": pg.source,
                    "durability": pg.durable,
                    "version": pg.version,
                }
            else:
                results["skipped"].append(f"PostgreSQL: {pg.skip_reason}")
        else:
            given = args.pg_dsn or os.environ.get("HUTONG_PG_DSN")
            console.print(
                "[bold]PostgreSQL[/]: "
                + ("connecting ..." if given else "starting a throwaway cluster ...")
            )
            pg = PgServer(given, "--pg-dsn" if args.pg_dsn else "HUTONG_PG_DSN")
            if pg.ok:
                results["postgresql"] = {
                    "source": pg.source,
                    "durability": pg.durable,
                    "version": pg.version,
                }
                console.print(f"  {pg.source}; {pg.durable}")
            else:
                results["skipped"].append(f"PostgreSQL: {pg.skip_reason}")
                console.print(f"  [yellow]skipped: {pg.skip_reason}[/]")
        lap("postgresql start")
        console.print("[bold]machine ceiling[/] ...")
        best, median = measure_ceiling(
            cfg, root / "commit", pg.dbs.get(A) if pg and pg.ok else None
        )
        pipeline = {}
        for backend in ("sqlite", "postgresql"):
            for size in SIZES:
                c = ceiling_for(best, size, backend)
                if c:
                    pipeline[f"{backend}:{size}"] = c
        results["ceiling"] = {"best_s": best, "median_s": median, "pipeline": pipeline}
        lap("ceiling")
        console.print("[bold]where the time goes[/]: in-process pipeline ...")
        try:
            results["breakdown"] = breakdown(root / "in-process", cfg.breakdown_n)
        except Exception as exc:  # noqa: BLE001
            results["errors"].append(f"breakdown: {exc}")
            traceback.print_exc()
        lap("where the time goes")
        backends: list[tuple[str, dict[str, str] | None]] = [("sqlite", None)]
        if pg is not None and pg.ok:
            backends.append(("postgresql", pg.dbs))
        for backend, dsns in backends:
            try:
                node_to_node(
                    root, backend, dsns, cfg, results, spy if backend == "sqlite" else None
                )
            except Exception as exc:  # noqa: BLE001 - report, keep the other backend's figures
                results["errors"].append(f"{backend}: {exc}")
                console.print(f"[red]{backend} run failed:[/] {str(exc)[:2000]}")
                traceback.print_exc()
            lap(f"node to node, {backend}")
    finally:
        if pg is not None and pg is not pg_server:
            pg.close()
        if args.keep:
            console.print(f"[dim]kept {root}[/]")
        else:
            shutil.rmtree(root, ignore_errors=True)
    results["loadavg"]["end"] = [round(x, 2) for x in os.getloadavg()]
    results["elapsed_s"] = time.perf_counter() - started
    console.print()
    report(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
    console.print(f"wrote {out} ({results['elapsed_s']:.0f} s)")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
