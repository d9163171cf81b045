"""Platform relay: packets/s through one platform node for 50 members, counted at two receivers.

Run ``.venv/bin/python bench/relay.py [--members 50] [-n 1500] [--py-spy [EXE]]``, or with
``--pg [--pg-dsn DSN] [--processes 1,2,4]`` the platform on PostgreSQL with 1, 2 and 4 processes.
See bench/README.md.

An alliance of ``members`` sending members (role community, ``via = "platform"``), one
``platform`` node and two receiving nodes (``recv-a``, ``recv-b``, also behind the platform) is
scaffolded in a temp dir with ``tests.harness.Alliance``: keys for every member are generated
there at run time, and one rule per member allows ``result.lab`` and the referral kinds from
that member to one receiver (odd members to ``recv-a``, even to ``recv-b``). The platform and the
receivers are real ``hutong run`` processes on SQLite (the embedded default). With ``--pg`` the
platform's store is a PostgreSQL database and each round runs it as ``hutong run`` plus
``processes - 1`` ``hutong worker`` processes, which split its lanes (the relay send jobs and the
returned receipts); the peer port, and so the intake, stays with ``hutong run``.

The members themselves are not nodes: sender processes (``multiprocessing``, a thread per
member, one keep-alive ``PeerConnection`` each, one batch in flight per member as a member node
would) seal packets with ``bridge.crypto.envelope`` as those members with their own keys and post
them to the platform's peer port. The platform passes each recipient's end-to-end receipt back
to the sending member's ``exchange_url``: all members' URLs point at one small receipt sink
process, which verifies each receipt's signature and answers as a member node does.

1. **Throughput**: every sender process seals its share of ``n`` 4 KiB packets before the clock
   starts; then all post as fast as the platform answers. Counted at the receivers (read-only
   queries on their databases): every packet in exactly the inbox it was addressed to, once,
   and no ``duplicate`` in the receivers' audit. *steady* = packets of all but the last arrival
   instant / (last - first ``received_at`` over both receivers); *wall* = n / (go -> all n
   received). CPU of the platform process (all threads) over go -> all received; its peak RSS
   (VmHWM) at the end.
2. **Latency**: members send one packet at a time, sealed just before it is posted, at a steady
   total rate below the measured throughput (``lat_rate``, default half the steady rate);
   per packet, the receiver's ``inbox.received_at`` - the packet's sealed ``created_at`` (same
   clock). p50 and p99 come from here; the throughput run's post -> received times (queueing
   under saturation) are in the result as ``saturated_p50_ms`` / ``saturated_p99_ms``.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import exchange as ex
from scaleout import lane_holders

from bridge.crypto import envelope as env
from bridge.crypto.keys import load_signing_key
from bridge.delivery.lanes import LANES
from bridge.delivery.transport import PeerConnection
from bridge.errors import HutongError, RateLimited
from tests.harness import Alliance

PLATFORM = "platform"
RECEIVERS = ("recv-a", "recv-b")
KIND = "result.lab"
KINDS = ["result.lab", "referral.request", "referral.status", "referral.cancel", "referral.return"]
THREADS_PER_MEMBER = 2  # FHIR threads per member: order holds within each
SIZE = 4096


def member_id(i: int) -> str:
    return f"member-{i:02d}"


def receiver_of(i: int) -> str:
    return RECEIVERS[(i - 1) % len(RECEIVERS)]


def alliance_members(members: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Directory entries and rules: one rule per member to its receiver."""
    out = [
        {"id": PLATFORM, "zh": "医联体信息平台", "en": "Alliance platform", "role": "platform"},
        {
            "id": RECEIVERS[0],
            "zh": "复兴医院",
            "en": "Fuxing Hospital",
            "role": "core",
            "via": PLATFORM,
        },
        {
            "id": RECEIVERS[1],
            "zh": "广外医院",
            "en": "Guangwai Hospital",
            "role": "secondary",
            "via": PLATFORM,
        },
    ]
    out += [
        {
            "id": member_id(i),
            "zh": f"社区卫生服务中心 {i}",
            "en": f"Community centre {i}",
            "role": "community",
            "via": PLATFORM,
        }
        for i in range(1, members + 1)
    ]
    rules = [
        {"from": member_id(i), "to": receiver_of(i), "kinds": KINDS} for i in range(1, members + 1)
    ]
    return out, rules


def point_members_at(alliance_toml: Path, url: str) -> None:
    """Every sending member's exchange_url -> the receipt sink (the platform's way back)."""
    blocks = alliance_toml.read_text(encoding="utf-8").split("\n[[members]]\n")
    for k, block in enumerate(blocks):
        if 'id = "member-' in block:
            lines = [
                f'exchange_url = "{url}"' if line.startswith("exchange_url = ") else line
                for line in block.split("\n")
            ]
            blocks[k] = "\n".join(lines)
    alliance_toml.write_text("\n[[members]]\n".join(blocks), encoding="utf-8")


# =============================================================================================
# receipt sink: where the platform forwards end-to-end receipts to the sending members
# =============================================================================================


class _SinkHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the platform's PeerConnection expects

    def do_POST(self) -> None:
        server: Any = self.server
        data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        frames = env.decode_batch(data, max_items=10_000, max_total=64 << 20)
        got = []
        for frame in frames:
            try:
                f = env.verify_receipt(frame, server.keys_for)
                got.append((f["packet"], f["receiver"], f["status"]))
            except HutongError as exc:
                got.append((None, None, exc.code))
        with server.lock:
            server.got += got
        body = env.encode_batch([b""] * len(frames))  # a member node's answer to a receipt
        self.send_response(200)
        self.send_header("Content-Type", "application/x-hutong-batch")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def _sink_main(pipe: Any, keys: dict[str, tuple[Any, ...]]) -> None:
    server: Any = ThreadingHTTPServer(("127.0.0.1", 0), _SinkHandler)
    server.daemon_threads = True
    server.keys_for, server.lock, server.got = (lambda n: keys.get(n, ())), threading.Lock(), []
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    pipe.send(server.server_address[1])
    while pipe.recv() == "count":
        with server.lock:
            pipe.send(len({p for p, _, s in server.got if s == "accepted"}))
    server.shutdown()  # "stop"
    server.server_close()
    with server.lock:
        pipe.send(list(server.got))


# =============================================================================================
# senders: a process per share of the members, a thread per member
# =============================================================================================


def _post(
    conn: PeerConnection, frames: list[bytes], platform_keys: tuple[Any, ...], stats: dict[str, Any]
) -> None:
    """POST one member's batch until the platform took it (a re-send after a lost answer gets
    the original receipts: the platform dedupes by packet id). Checks every signed answer."""
    body = env.encode_batch(frames)
    for attempt in range(50):
        try:
            answers = env.decode_batch(
                conn.post_batch(body), max_items=len(frames), max_total=64 << 20
            )
            break
        except RateLimited as exc:
            time.sleep(exc.retry_after)
        except HutongError as exc:
            stats["errors"].append(f"{exc.code}: {str(exc)[:200]}")
            time.sleep(min(2.0, 0.1 * 2**attempt))
        stats["retries"] += 1
    else:
        raise RuntimeError(f"platform did not take a batch: {stats['errors'][-1:]}")
    for answer in answers:
        try:
            f = env.verify_receipt(answer, lambda _n: platform_keys)
            stats["status"][f["status"]] += 1
            if f["status"] != "relayed":
                stats["errors"].append(f"{f['packet']}: {f['status']} {f['code']}")
        except HutongError as exc:
            stats["status"]["bad receipt"] += 1
            stats["errors"].append(f"{exc.code}: {str(exc)[:200]}")


def _member_loop(
    jobs: list[dict[str, Any]],
    frames: list[bytes] | None,
    ctx: dict[str, Any],
    stats: dict[str, Any],
    t0: float,
) -> None:
    """One member's packets in order: pre-sealed in batches, or sealed one by one when due."""
    conn = PeerConnection(ctx["url"])
    try:
        if frames is not None:
            for k in range(0, len(frames), ctx["batch"]):
                posted = time.time()
                _post(conn, frames[k : k + ctx["batch"]], ctx["platform_keys"], stats)
                for job in jobs[k : k + ctx["batch"]]:
                    stats["posted"][job["id"]] = posted
            return
        for job in jobs:
            pause = t0 + job["due"] - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            frame = _seal(job, ctx)
            stats["posted"][job["id"]] = time.time()
            _post(conn, [frame], ctx["platform_keys"], stats)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which fails the run
        stats["errors"].append(f"member thread: {type(exc).__name__}: {exc}")
        stats["fatal"] = True
    finally:
        conn.close()


def _seal(job: dict[str, Any], ctx: dict[str, Any]) -> bytes:
    return env.seal(
        ex.body_of(SIZE),
        sender=job["sender"],
        recipient=job["to"],
        kind=KIND,
        thread=job["thread"],
        seq=job["seq"],
        packet_id=job["id"],
        signing_key=ctx["signing"][job["sender"]],
        recipient_key=ctx["recipient_keys"][job["to"]],
    )


def _sender_main(
    pipe: Any, go: Any, jobs: dict[str, list[dict[str, Any]]], ctx: dict[str, Any], preseal: bool
) -> None:
    ctx = dict(ctx, signing={m: load_signing_key(ctx["keys_dir"] / f"{m}.sign.key") for m in jobs})
    frames = {m: [_seal(j, ctx) for j in js] for m, js in jobs.items()} if preseal else {}
    stats: dict[str, Any] = {
        "posted": {},
        "status": Counter(),
        "errors": [],
        "retries": 0,
        "fatal": False,
    }
    pipe.send("ready")
    go.wait()
    t0 = time.perf_counter()
    threads = [
        threading.Thread(target=_member_loop, args=(js, frames.get(m), ctx, stats, t0))
        for m, js in jobs.items()
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats["status"] = dict(stats["status"])
    pipe.send(stats)


class Senders:
    """``procs`` sender processes sharing the members; ``run`` releases them and collects."""

    def __init__(
        self, jobs: list[dict[str, Any]], procs: int, ctx: dict[str, Any], preseal: bool
    ) -> None:
        by_member: dict[str, list[dict[str, Any]]] = {}
        for job in jobs:
            by_member.setdefault(job["sender"], []).append(job)
        names = sorted(by_member)
        mpc = mp.get_context("fork")
        self.go = mpc.Event()
        self.procs: list[tuple[Any, Any]] = []
        for p in range(procs):
            share = {m: by_member[m] for m in names[p::procs]}
            if not share:
                continue
            ours, theirs = mpc.Pipe()
            proc = mpc.Process(
                target=_sender_main, args=(theirs, self.go, share, ctx, preseal), daemon=True
            )
            proc.start()
            theirs.close()
            self.procs.append((proc, ours))
        for _proc, pipe in self.procs:  # sealed (or keys loaded) before the clock starts
            if not pipe.poll(300):
                raise TimeoutError("a sender process did not get ready")
            pipe.recv()

    def pids(self) -> list[int]:
        return [p.pid for p, _ in self.procs if p.pid is not None]

    def start(self) -> float:
        self.go.set()
        return time.perf_counter()

    def results(self, timeout: float) -> dict[str, Any]:
        out: dict[str, Any] = {"posted": {}, "status": Counter(), "errors": [], "retries": 0}
        for proc, pipe in self.procs:
            if not pipe.poll(timeout):
                raise TimeoutError("a sender process did not finish")
            s = pipe.recv()
            proc.join(30)
            pipe.close()
            if s["fatal"]:
                raise RuntimeError(f"sender failed: {s['errors'][-3:]}")
            out["posted"].update(s["posted"])
            out["status"].update(s["status"])
            out["errors"] += s["errors"]
            out["retries"] += s["retries"]
        out["status"] = dict(out["status"])
        return out

    def close(self) -> None:
        for proc, pipe in self.procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(10)
            pipe.close()


def plan_jobs(
    members: int, n: int, tag: str, seq_from: dict[tuple[str, str], int], spacing: float = 0.0
) -> list[dict[str, Any]]:
    """n packets round-robin over the members; ``due`` = when to post (paced runs)."""
    jobs = []
    for j in range(n):
        i = j % members + 1
        sender = member_id(i)
        thread = f"{sender}-{tag}-{(j // members) % THREADS_PER_MEMBER}"
        seq = seq_from[(sender, thread)] = seq_from.get((sender, thread), 0) + 1
        jobs.append(
            {
                "id": str(uuid.uuid4()),
                "sender": sender,
                "to": receiver_of(i),
                "thread": thread,
                "seq": seq,
                "due": j * spacing,
            }
        )
    return jobs


# =============================================================================================
# the run
# =============================================================================================


class Receivers:
    """Read-only views of both receivers' stores."""

    def __init__(self, alliance: Alliance) -> None:
        self.readers = {r: ex.Reader(alliance.node(r).plan.storage_dsn) for r in RECEIVERS}

    def count(self, after: dict[str, int]) -> int:
        return sum(
            rd.scalar("SELECT COUNT(*) FROM inbox WHERE id > ?", after[r])
            for r, rd in self.readers.items()
        )

    def marks(self) -> dict[str, int]:
        return {
            r: rd.scalar("SELECT COALESCE(MAX(id), 0) FROM inbox") for r, rd in self.readers.items()
        }

    def rows(self, after: dict[str, int]) -> dict[str, list[tuple[Any, ...]]]:
        return {
            r: rd.rows(
                "SELECT packet_id, received_at, created_at, sender FROM inbox WHERE id > ?",
                after[r],
            )
            for r, rd in self.readers.items()
        }

    def duplicates(self) -> int:
        return sum(
            rd.scalar("SELECT COUNT(*) FROM audit WHERE action = 'duplicate'")
            for rd in self.readers.values()
        )

    def close(self) -> None:
        for rd in self.readers.values():
            rd.close()


def _wait_received(
    recv: Receivers, before: dict[str, int], n: int, alliance: Alliance, timeout: float, what: str
) -> float:
    deadline = time.perf_counter() + timeout
    while recv.count(before) < n:
        for node in alliance.nodes.values():
            if node.proc is not None and node.proc.poll() is not None:
                raise RuntimeError(f"{node.node_id} exited during the {what} run")
        if time.perf_counter() > deadline:
            raise TimeoutError(
                f"{what}: {recv.count(before)} of {n} packets arrived in {timeout:.0f} s"
            )
        time.sleep(0.02)
    return time.perf_counter()


def _check_once(
    rows: dict[str, list[tuple[Any, ...]]], jobs: list[dict[str, Any]]
) -> dict[str, Any]:
    """Every packet in the inbox it was addressed to, exactly once."""
    addressed: dict[str, list[str]] = {r: [] for r in RECEIVERS}
    for job in jobs:
        addressed[job["to"]].append(job["id"])
    got = {r: [x[0] for x in rs] for r, rs in rows.items()}
    per = {
        r: {"addressed": len(addressed[r]), "received": len(got[r]), "distinct": len(set(got[r]))}
        for r in RECEIVERS
    }
    once = all(sorted(got[r]) == sorted(addressed[r]) for r in RECEIVERS)
    return {"received_once": once, "per_receiver": per}


def platform_intake(dsn: str, ids: list[str]) -> dict[str, float]:
    """When the platform took each packet (its relay row's created_at), by packet id."""
    reader = ex.Reader(dsn)
    try:
        rows = reader.rows("SELECT packet_id, created_at FROM outbox WHERE origin = 'relay'")
    finally:
        reader.close()
    wanted = set(ids)
    return {r[0]: ex.ts(r[1]) for r in rows if r[0] in wanted}


class Platform:
    """The scaffolded alliance, the receipt sink and the running platform and receivers; the
    platform on SQLite, or on PostgreSQL (``pg_dsn``) with ``hutong worker`` processes added
    per round (``processes``). ``measure`` runs one throughput and one latency round."""

    def __init__(self, root: Path, members: int, pg_dsn: str | None = None) -> None:
        self.members = members
        self.pg = pg_dsn is not None
        people, rules = alliance_members(members)
        mpc = mp.get_context("fork")
        self.sink_pipe, theirs = mpc.Pipe()
        folder = root / "alliance-relay"
        self.alliance = Alliance(
            folder,
            people,
            rules,
            dsn_for=(lambda n: pg_dsn if n == PLATFORM else None)  # type: ignore[arg-type, return-value]
            if pg_dsn
            else None,
        )
        platform_plan = self.alliance.node(PLATFORM).plan
        keys = {r: platform_plan.directory[r].signing_keys for r in RECEIVERS}
        self.sink = mpc.Process(target=_sink_main, args=(theirs, keys), daemon=True)
        self.sink.start()
        theirs.close()
        sink_port = self.sink_pipe.recv()
        point_members_at(folder / "alliance.toml", f"http://127.0.0.1:{sink_port}")
        self.alliance.nodes.clear()  # reload the plans with the sink's URL
        self.platform = self.alliance.node(PLATFORM)
        self.recv: Receivers | None = None
        self.workers: list[subprocess.Popen[bytes]] = []
        self.ctx = {
            "url": self.platform.peer_url,
            "keys_dir": folder / "keys",
            "platform_keys": self.platform.plan.directory[PLATFORM].signing_keys,
            "recipient_keys": {
                r: self.platform.plan.directory[r].encryption_keys[0] for r in RECEIVERS
            },
        }
        self.seqs: dict[tuple[str, str], int] = {}
        self.sent_total = 0  # packets of every round so far: the receipts the sink should get

    def start(self) -> None:
        for node_id in (PLATFORM, *RECEIVERS):
            self.alliance.node(node_id).start()
        for node_id in (PLATFORM, *RECEIVERS):  # a busy machine may take a while to import
            self.alliance.node(node_id).wait_ready(timeout=180)
        self.recv = Receivers(self.alliance)

    def use_processes(self, processes: int, timeout: float = 120.0) -> None:
        """PostgreSQL: ``hutong run`` + processes-1 ``hutong worker``s, waited for until they
        have split the lanes of the send jobs to both receivers."""
        assert self.pg
        self.stop_workers()
        plat = self.platform
        for i in range(processes - 1):
            log = plat.log.with_name(f"{PLATFORM}-worker{i}.log")
            with open(log, "ab") as fh:
                self.workers.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "bridge.cli",
                            "worker",
                            "--config",
                            str(plat.config),
                        ],
                        stdout=fh,
                        stderr=subprocess.STDOUT,
                        cwd=ex.ROOT,
                    )
                )
        reader = ex.Reader(plat.plan.storage_dsn)
        try:
            share = LANES // processes
            deadline = time.perf_counter() + timeout
            while True:
                held = {r: lane_holders(reader, f"send:{r}") for r in RECEIVERS}
                if all(h == [share] * processes for h in held.values()):
                    return
                for w in self.workers:
                    if w.poll() is not None:
                        raise RuntimeError(f"a platform worker exited: see {plat.log.parent}")
                if time.perf_counter() > deadline:
                    raise TimeoutError(f"lanes not split {processes} ways: {held}")
                time.sleep(0.1)
        finally:
            reader.close()

    def stop_workers(self) -> None:
        for w in self.workers:
            if w.poll() is None:
                w.send_signal(signal.SIGTERM)
        for w in self.workers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                w.wait(timeout=30)
            if w.poll() is None:
                w.kill()
                w.wait(10)
        self.workers = []

    def pids(self) -> list[int]:
        """The platform's processes: ``hutong run`` and its workers."""
        pp = ex.pid_of(self.platform)
        return [p for p in [pp, *(w.pid for w in self.workers)] if p is not None]

    def measure(
        self,
        n: int,
        *,
        procs: int = 3,
        batch: int = 20,
        lat_rate: float | None = None,
        lat_frac: float = 0.5,
        lat_seconds: float = 4.0,
        timeout: float = 300.0,
        spy: ex.Spy | None = None,
        spy_latency: ex.Spy | None = None,
        tag: str = "",
    ) -> dict[str, Any]:
        """One round: throughput of a pre-sealed backlog, then latency at ``lat_rate`` (default
        ``lat_frac`` of the measured steady rate), then every end-to-end receipt back."""
        recv, alliance, members = self.recv, self.alliance, self.members
        assert recv is not None
        ctx = dict(self.ctx, batch=batch)
        senders: Senders | None = None
        profile = lat_profile = None
        try:
            # ---- 1. throughput: pre-sealed backlog, all members at once ---------------------
            jobs = plan_jobs(members, n, f"tp{tag}", self.seqs)
            senders = Senders(jobs, procs, ctx, preseal=True)
            before = recv.marks()
            dup0 = recv.duplicates()
            pps = self.pids()
            pp = pps[0] if pps else None
            rpids = [ex.pid_of(alliance.node(r)) for r in RECEIVERS]
            spids = senders.pids() + [self.sink.pid]

            def cpu() -> tuple[float, ...]:
                return (
                    sum(ex.cpu_seconds(p) for p in pps),
                    sum(ex.cpu_seconds(p) for p in rpids),
                    sum(ex.cpu_seconds(p) for p in spids),
                    ex.postgres_cpu_s() if self.pg else 0.0,
                    ex.machine_busy_s(),
                    time.process_time(),
                )

            c0 = cpu()
            t0 = senders.start()
            if spy is not None and pp is not None:
                spy.start("platform", pp)
            try:
                t_all = _wait_received(recv, before, n, alliance, timeout, "throughput")
            finally:
                profile = spy.stop() if spy is not None else None
            c1 = cpu()
            sent = senders.results(timeout)
            senders.close()
            senders = None
            window = t_all - t0
            used = [b - a for a, b in zip(c0, c1, strict=True)]
            rows = recv.rows(before)
            once = _check_once(rows, jobs)
            per_sender = {
                r: dict(sorted(Counter(x[3] for x in rs).items())) for r, rs in rows.items()
            }
            times = sorted(ex.ts(r[1]) for rs in rows.values() for r in rs)
            span = times[-1] - times[0]
            steady = sum(1 for x in times if x < times[-1]) / span if span > 0 else float("nan")
            queued = [
                (ex.ts(r[1]) - sent["posted"][r[0]]) * 1000
                for rs in rows.values()
                for r in rs
                if r[0] in sent["posted"]
            ]
            rss = ex.peak_rss_mib(pp)
            # ---- 2. latency: one packet per post, sealed when due, below the measured rate --
            rate = lat_rate or max(5.0, lat_frac * steady)
            m = max(members, int(rate * lat_seconds))
            ljobs = plan_jobs(members, m, f"lat{tag}", self.seqs, spacing=1 / rate)
            senders = Senders(ljobs, procs, ctx, preseal=False)
            before2 = recv.marks()
            senders.start()
            if spy_latency is not None:
                for k, pid in enumerate(pps):
                    spy_latency.start("platform" if k == 0 else f"worker{k}", pid)
            try:
                _wait_received(recv, before2, m, alliance, timeout, "latency")
            finally:
                lat_profile = spy_latency.stop() if spy_latency is not None else None
            lsent = senders.results(timeout)
            senders.close()
            senders = None
            lrows = recv.rows(before2)
            lonce = _check_once(lrows, ljobs)
            lat = [(ex.ts(r[1]) - ex.ts(r[2])) * 1000 for rs in lrows.values() for r in rs]
            # where it waited: sealed -> the platform's intake (its relay row's created_at)
            # and from there -> the receiver's intake
            at_platform = platform_intake(self.platform.plan.storage_dsn, [j["id"] for j in ljobs])
            lat_in = [
                (at_platform[r[0]] - ex.ts(r[2])) * 1000
                for rs in lrows.values()
                for r in rs
                if r[0] in at_platform
            ]
            lat_out = [
                (ex.ts(r[1]) - at_platform[r[0]]) * 1000
                for rs in lrows.values()
                for r in rs
                if r[0] in at_platform
            ]
            # ---- end-to-end receipts back at the members, through the platform --------------
            self.sent_total += n + m
            want = self.sent_total
            deadline = time.perf_counter() + 60
            while time.perf_counter() < deadline:  # the platform may still be forwarding some
                self.sink_pipe.send("count")
                if self.sink_pipe.recv() >= want:
                    break
                time.sleep(0.1)
            self.sink_pipe.send("count")
            back = self.sink_pipe.recv()
            dups = recv.duplicates() - dup0
        finally:
            if senders is not None:
                senders.close()
        return {
            "members": members,
            "n": n,
            "procs": procs,
            "batch": batch,
            "size": SIZE,
            "backend": "postgresql" if self.pg else "sqlite",
            "processes": len(pps),
            "steady_pps": steady,
            "wall_pps": n / window,
            "window_s": window,
            "span_s": span,
            "received_once": once["received_once"] and lonce["received_once"],
            "per_receiver": once["per_receiver"],
            "per_sender": per_sender,
            "duplicates": dups,
            "platform_cpu": used[0] / window,
            "receivers_cpu": used[1] / window,
            "senders_cpu": used[2] / window,
            "db_cpu": used[3] / window,
            "others_cpu": max(0.0, used[4] - sum(used[:4]) - used[5]) / window,
            "platform_rss_mib": rss,
            "sender_retries": sent["retries"] + lsent["retries"],
            "sender_errors": (sent["errors"] + lsent["errors"])[:10],
            "platform_answers": sent["status"],
            "saturated_p50_ms": ex.pct(queued, 0.5),
            "saturated_p99_ms": ex.pct(queued, 0.99),
            "lat_rate": rate,
            "lat_n": m,
            "lat_received_once": lonce["received_once"],
            "p50_ms": ex.pct(lat, 0.5),
            "p99_ms": ex.pct(lat, 0.99),
            "max_ms": max(lat),
            "to_platform_p50_ms": ex.pct(lat_in, 0.5),
            "to_platform_p99_ms": ex.pct(lat_in, 0.99),
            "from_platform_p50_ms": ex.pct(lat_out, 0.5),
            "from_platform_p99_ms": ex.pct(lat_out, 0.99),
            "receipts_back": back,
            "receipts_expected": want,
            "pyspy": profile,
            "pyspy_latency": lat_profile,
        }

    def receipts(self) -> list[tuple[Any, ...]]:
        """Stop the sink; every receipt it got (packet, receiver, status)."""
        self.sink_pipe.send("stop")
        got: list[tuple[Any, ...]] = self.sink_pipe.recv()
        return got

    def close(self) -> None:
        self.stop_workers()
        if self.recv is not None:
            self.recv.close()
        self.alliance.stop_all()
        with contextlib.suppress(Exception):
            if self.sink.is_alive():
                self.sink.terminate()
            self.sink.join(10)
        self.sink_pipe.close()


def relay(
    root: Path,
    members: int = 50,
    n: int = 1500,
    *,
    procs: int = 3,
    batch: int = 20,
    lat_rate: float | None = None,
    lat_frac: float = 0.5,
    lat_seconds: float = 4.0,
    timeout: float = 300.0,
    spy: ex.Spy | None = None,
    spy_latency: ex.Spy | None = None,
) -> dict[str, Any]:
    """The platform on SQLite: scaffold, start, one round (see ``Platform.measure``), stop.
    ``spy_latency``: sample the platform (``--idle``) during the latency run."""
    started = time.perf_counter()
    plat = Platform(root, members)
    try:
        plat.start()
        r = plat.measure(
            n,
            procs=procs,
            batch=batch,
            lat_rate=lat_rate,
            lat_frac=lat_frac,
            lat_seconds=lat_seconds,
            timeout=timeout,
            spy=spy,
            spy_latency=spy_latency,
        )
        receipts = plat.receipts()
    finally:
        plat.close()
    r["receipts_back"] = len({p for p, _, s in receipts if s == "accepted"})
    r["receipt_statuses"] = dict(Counter(s for _, _, s in receipts))
    r["elapsed_s"] = time.perf_counter() - started
    return r


def relay_pg(
    root: Path,
    pg_dsn: str,
    members: int = 50,
    n: int = 1500,
    *,
    processes: tuple[int, ...] = (1, 2, 4),
    procs: int = 3,
    batch: int = 20,
    lat_frac: float = 0.5,
    lat_seconds: float = 4.0,
    timeout: float = 300.0,
    spy_exe: str | None = None,
) -> list[dict[str, Any]]:
    """The platform on PostgreSQL (``pg_dsn``: an empty database) with 1, 2, 4 processes:
    ``hutong run`` and the rest ``hutong worker``s, which split the platform's lanes (its
    relay send jobs and returned receipts; intake stays with ``hutong run``, the process with
    the peer port). One round per count, on one running alliance; latency at ``lat_frac`` of
    each round's own steady rate. ``spy_exe``: py-spy ``--idle`` on every platform process
    during each latency run."""
    started = time.perf_counter()
    plat = Platform(root, members, pg_dsn)
    out = []
    try:
        plat.start()
        for k, count in enumerate(processes):
            plat.use_processes(count)
            r = plat.measure(
                n,
                procs=procs,
                batch=batch,
                lat_frac=lat_frac,
                lat_seconds=lat_seconds,
                timeout=timeout,
                tag=f"-{k}",
                spy_latency=None
                if spy_exe is None
                else ex.Spy(
                    spy_exe,
                    ex.ROOT / "bench" / "results",
                    time.strftime(f"relay-pg{count}-lat-%Y%m%d-%H%M%S"),
                    idle=True,
                ),
            )
            ex.console.print(
                f"  {count} platform process(es): {r['steady_pps']:,.0f} packets/s steady; "
                f"at {r['lat_rate']:.0f}/s p50 {r['p50_ms']:.0f} / p99 {r['p99_ms']:.0f} ms"
            )
            out.append(r)
        receipts = plat.receipts()
    finally:
        plat.close()
    statuses = dict(Counter(s for _, _, s in receipts))
    for r in out:
        r["receipt_statuses"] = statuses
        r["elapsed_s"] = time.perf_counter() - started
    out[-1]["receipts_back"] = len({p for p, _, s in receipts if s == "accepted"})
    return out


def report(r: dict[str, Any]) -> None:
    store = "SQLite" if r["backend"] == "sqlite" else f"PostgreSQL, {r['processes']} process(es)"
    t = ex._table(
        f"Platform relay: {r['members']} members -> platform -> 2 receivers, "
        f"4 KiB, {store}, {r['procs']} sender processes, {r['batch']} per post",
        ["what", "figure"],
    )
    rows = [
        ("packets", f"{r['n']:,} (+ {r['lat_n']:,} in the latency run)"),
        ("steady packets/s through the platform", f"{r['steady_pps']:,.0f}"),
        ("wall packets/s (go -> all received)", f"{r['wall_pps']:,.0f} ({r['window_s']:.1f} s)"),
        ("every packet received once, where addressed", str(r["received_once"])),
        ("duplicates at the receivers", str(r["duplicates"])),
        (
            "per receiver: addressed / received",
            ", ".join(
                f"{k} {v['addressed']}/{v['received']}" for k, v in r["per_receiver"].items()
            ),
        ),
        (
            "end-to-end receipts back at the members",
            (f"{r['receipts_back']:,} of {r['receipts_expected']:,}"),
        ),
        (
            f"latency sealed -> received at {r['lat_rate']:.0f}/s: p50 / p99 / max",
            f"{r['p50_ms']:.0f} / {r['p99_ms']:.0f} / {r['max_ms']:.0f} ms",
        ),
        (
            "  of which sealed -> platform intake: p50 / p99",
            f"{r['to_platform_p50_ms']:.0f} / {r['to_platform_p99_ms']:.0f} ms",
        ),
        (
            "  and platform intake -> receiver intake: p50 / p99",
            f"{r['from_platform_p50_ms']:.0f} / {r['from_platform_p99_ms']:.0f} ms",
        ),
        (
            "posted -> received under saturation: p50 / p99",
            f"{r['saturated_p50_ms']:.0f} / {r['saturated_p99_ms']:.0f} ms",
        ),
        (
            "CPU platform / PostgreSQL / receivers / senders+sink / others",
            (
                f"{r['platform_cpu']:.0%} / {r['db_cpu']:.0%} / {r['receivers_cpu']:.0%} / "
                f"{r['senders_cpu']:.0%} / {r['others_cpu']:.0%}"
            ),
        ),
        ("platform peak RSS (VmHWM, hutong run)", f"{r['platform_rss_mib']:.0f} MiB"),
        ("sender retries (platform answered 503 / no answer)", str(r["sender_retries"])),
        ("whole run incl. scaffolding and start-up", f"{r['elapsed_s']:.0f} s"),
    ]
    if r["backend"] != "sqlite":
        rows[0] = ("packets", f"{r['n']:,} (+ {r['lat_n']:,} in the latency run) in this round")
    for what, fig in rows:
        t.add_row(what, fig)
    ex.console.print(t)
    ex.console.print(
        f"[dim]CPU = process CPU seconds / seconds of the throughput window "
        f"(100% = one core of {os.cpu_count()}); others = busy cores used by "
        f"anything else on the machine. Load average {os.getloadavg()[0]:.1f}.[/]"
    )
    for e in r["sender_errors"]:
        ex.console.print(f"[yellow]sender: {e}[/]")
    for node, prof in (r.get("pyspy") or {}).items():
        t = ex._table(
            f"py-spy --gil, {node}, throughput run ({prof['file']})",
            ["bridge function (inclusive)", "GIL samples"],
        )
        for name, share in prof["top"]:
            t.add_row(name, f"{share:.0%}")
        ex.console.print(t)
    for node, prof in (r.get("pyspy_latency") or {}).items():
        t = ex._table(
            f"py-spy --idle, {node}, latency run ({prof['file']})",
            ["bridge function (inclusive)", "samples, all threads"],
        )
        for name, share in prof["top"]:
            t.add_row(name, f"{share:.0%}")
        ex.console.print(t)


def report_pg(results: list[dict[str, Any]], server: str) -> None:
    """One line per process count, then each round's full table."""
    t = ex._table(
        f"Platform relay on PostgreSQL ({server}): {results[0]['members']} members, 4 KiB, "
        "hutong run + workers",
        [
            "processes",
            "steady packets/s",
            "latency at",
            "p50 / p99 ms",
            "platform -> receiver p50 / p99 ms",
            "CPU platform / PostgreSQL",
            "once, no duplicate",
        ],
    )
    for r in results:
        t.add_row(
            str(r["processes"]),
            f"{r['steady_pps']:,.0f}",
            f"{r['lat_rate']:.0f}/s",
            f"{r['p50_ms']:,.0f} / {r['p99_ms']:,.0f}",
            f"{r['from_platform_p50_ms']:,.0f} / {r['from_platform_p99_ms']:,.0f}",
            f"{r['platform_cpu']:.0%} / {r['db_cpu']:.0%}",
            str(r["received_once"] and r["duplicates"] == 0),
        )
    ex.console.print(t)
    for r in results:
        report(r)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--members", type=int, default=50)
    p.add_argument("-n", type=int, default=1500, help="packets in the throughput run")
    p.add_argument("--procs", type=int, default=3, help="sender processes")
    p.add_argument("--batch", type=int, default=20, help="packets per post by one member")
    p.add_argument(
        "--lat-rate",
        type=float,
        help="packets/s of the latency run (default: --lat-frac of the measured steady rate)",
    )
    p.add_argument(
        "--lat-frac",
        type=float,
        default=0.5,
        help="the latency run's rate as a share of the steady rate (default 0.5: half)",
    )
    p.add_argument(
        "--pg",
        action="store_true",
        help="the platform on PostgreSQL with 1, 2, 4 processes (hutong run + workers): "
        "--pg-dsn, else HUTONG_PG_DSN, else a throwaway cluster",
    )
    p.add_argument("--pg-dsn", help="a role allowed to CREATE DATABASE (implies --pg)")
    p.add_argument(
        "--processes",
        default="1,2,4",
        help="PostgreSQL: platform process counts, one round each (default 1,2,4)",
    )
    p.add_argument("--keep", action="store_true", help="keep the temp dir (node logs, DBs)")
    p.add_argument(
        "--py-spy",
        nargs="?",
        const="py-spy",
        metavar="EXE",
        help="sample the platform with py-spy (--gil) during the throughput run",
    )
    p.add_argument(
        "--py-spy-latency",
        nargs="?",
        const="py-spy",
        metavar="EXE",
        help="sample the platform with py-spy --idle during the latency run",
    )
    args = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="hutong-bench-relay-"))
    spy_latency = None
    if args.py_spy_latency:
        exe = shutil.which(args.py_spy_latency) or os.environ.get("PY_SPY")
        if not exe:
            p.error(f"py-spy '{args.py_spy_latency}' not found")
        spy_latency = ex.Spy(
            exe, ex.ROOT / "bench" / "results", time.strftime("relay-lat-%Y%m%d-%H%M%S"), idle=True
        )
    spy = None
    if args.py_spy:
        exe = shutil.which(args.py_spy) or os.environ.get("PY_SPY")
        if not exe:
            p.error(f"py-spy '{args.py_spy}' not found")
        spy = ex.Spy(exe, ex.ROOT / "bench" / "results", time.strftime("relay-%Y%m%d-%H%M%S"))
    if args.pg or args.pg_dsn:
        return main_pg(args, root, spy_latency)
    try:
        r = relay(
            root,
            args.members,
            args.n,
            procs=args.procs,
            batch=args.batch,
            lat_rate=args.lat_rate,
            lat_frac=args.lat_frac,
            spy=spy,
            spy_latency=spy_latency,
        )
    finally:
        if args.keep:
            ex.console.print(f"[dim]kept {root}[/]")
        else:
            shutil.rmtree(root, ignore_errors=True)
    report(r)
    return 0 if r["received_once"] and r["duplicates"] == 0 else 1


def main_pg(args: argparse.Namespace, root: Path, spy_latency: ex.Spy | None) -> int:
    given = args.pg_dsn or os.environ.get("HUTONG_PG_DSN")
    pg = ex.PgServer(given, "--pg-dsn" if args.pg_dsn else "HUTONG_PG_DSN")
    if not pg.ok:
        ex.console.print(f"[red]no PostgreSQL: {pg.skip_reason}[/]")
        return 1
    server = f"{pg.version}, {pg.durable}"
    ex.console.print(f"[dim]PostgreSQL: {pg.source}; {server}[/]")
    try:
        results = relay_pg(
            root,
            pg.dbs[ex.A],
            args.members,
            args.n,
            processes=tuple(int(x) for x in args.processes.split(",")),
            procs=args.procs,
            batch=args.batch,
            lat_frac=args.lat_frac,
            spy_exe=spy_latency.exe if spy_latency is not None else None,
        )
    finally:
        pg.close()
        if args.keep:
            ex.console.print(f"[dim]kept {root}[/]")
        else:
            shutil.rmtree(root, ignore_errors=True)
    report_pg(results, server)
    ok = all(r["received_once"] and r["duplicates"] == 0 for r in results)
    return 0 if ok and results[-1]["receipts_back"] >= results[-1]["receipts_expected"] else 1


if __name__ == "__main__":
    sys.exit(main())
