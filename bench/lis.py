"""LIS intake per connection: Hutong's ``lis-hl7`` adapter beside a plain store-and-ACK receiver.

Run ``.venv/bin/python bench/lis.py [-n 300] [--conns 1,4] [--py-spy PATH]``.

What a hospital would otherwise script (the *plain receiver*, :func:`plain_main`, a process of
its own): python-hl7's asyncio MLLP server; per message: parse (``readmessage``), one SQLite
``INSERT`` of the raw message and ``COMMIT`` (WAL, ``synchronous=FULL``, the node's settings),
then the AA (``create_ack``). No validation, no FHIR, no exactly-once, no audit.

Hutong: a node (``hutong run``) with the ``lis-hl7`` adapter on SQLite, as ``results.py``
starts it (rate limit lifted). Each message is answered only after its raw message, converted
Bundle, exactly-once key and ACK are committed as one results-journal row; the node files it
into the FHIR store after (``bridge/results/journal.py``): each run waits for that at its end
and reports how long it took after the last ACK ("filed +s"). ``--direct`` adds the same
node's unstaged path (``staged = false``: everything filed before the ACK) to the same chunks.

Both get the same messages from the same client code (python-hl7's ``MLLPClient``, one thread
per connection, each sending its share one message at a time and waiting for each ACK, as a
LIS does), in the same run, back to back: for each message size (8 OBX: ``oru_message``; 20
OBX: ``oru_message(full_cbc=True)``) and each number of connections, alternating in chunks of
50 messages (the plain receiver, then Hutong, the same 50; a shared machine's fsync latency
drifts over seconds). Figures are messages/s over the N messages (the chunks' times added)
and the ACK latency p50/p99 as the client sees it; Hutong's figure is also given as a ratio of
the plain receiver's (the aims of issue 17: >= 0.6x on one connection; 4 connections >= 1.6x
one).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: messages sent to one side before the other gets the same ones
CHUNK = 50
PLAIN_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS message (id INTEGER PRIMARY KEY, received_at TEXT "
    "NOT NULL, control_id TEXT, raw BLOB NOT NULL)"
)


# -- the plain receiver (its own process) ---------------------------------------------------------


def plain_main(port: int, db: str) -> None:
    """python-hl7's asyncio MLLP server: parse, INSERT + COMMIT (synchronous=FULL), AA."""
    import hl7
    from hl7.mllp import start_hl7_server

    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(PLAIN_SCHEMA)

    async def client(reader: Any, writer: Any) -> None:
        try:
            while not writer.is_closing():
                msg = await reader.readmessage()
                raw = str(msg).encode("utf-8")
                conn.execute("BEGIN IMMEDIATE")
                conn.execute(
                    "INSERT INTO message (received_at, control_id, raw) "
                    "VALUES (datetime('now'), ?, ?)",
                    (str(msg.segment("MSH")[10]), raw),
                )
                conn.execute("COMMIT")
                writer.writemessage(msg.create_ack())
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def serve() -> None:
        server = await start_hl7_server(client, "127.0.0.1", port, encoding="utf-8")
        print("ready", flush=True)
        async with server:
            await server.serve_forever()

    _ = hl7  # the parser readmessage uses
    asyncio.run(serve())


def start_plain(port: int, db: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, __file__, "plain", "--port", str(port), "--db", str(db)],
        stdout=subprocess.PIPE,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != b"ready":
        proc.kill()
        raise RuntimeError("the plain receiver did not start")
    return proc


def stop_plain(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


# -- the client (the LIS side) --------------------------------------------------------------------


def drive(port: int, messages: list[bytes], conns: int) -> dict[str, Any]:
    """Send ``messages`` over ``conns`` connections (message i on connection i % conns), each
    one at a time waiting for its ACK; msg/s over the whole run and ACK latency."""
    from hl7.client import MLLPClient

    shares = [messages[c::conns] for c in range(conns)]
    lat: list[list[float]] = [[] for _ in range(conns)]
    bad = [0] * conns
    clients = [MLLPClient("127.0.0.1", port) for _ in range(conns)]
    for cl in clients:
        cl.socket.settimeout(120)
    go = threading.Barrier(conns + 1)

    def run(c: int) -> None:
        go.wait()
        for m in shares[c]:
            t = time.perf_counter()
            ack = clients[c].send_message(m)
            lat[c].append(time.perf_counter() - t)
            if b"MSA|AA" not in ack:
                bad[c] += 1

    threads = [threading.Thread(target=run, args=(c,)) for c in range(conns)]
    for th in threads:
        th.start()
    go.wait()
    t0 = time.perf_counter()
    for th in threads:
        th.join()
    elapsed = time.perf_counter() - t0
    for cl in clients:
        cl.close()
    return {
        "n": len(messages),
        "conns": conns,
        "elapsed": elapsed,
        "lat": [x for c in lat for x in c],
        "not_aa": sum(bad),
    }


def alternate(
    ports: dict[str, int], messages: list[bytes], conns: int, chunk: int = CHUNK
) -> dict[str, dict[str, Any]]:
    """The messages in chunks, each sent to every side in turn (the plain receiver first):
    all sides meet the same moments of a shared machine (its disk's fsync latency drifts over
    seconds). ``ports``: side -> port; each side gets the same messages."""
    sides: dict[str, list[dict[str, Any]]] = {name: [] for name in ports}
    for i in range(0, len(messages), chunk):
        part = messages[i : i + chunk]
        for name, port in ports.items():
            sides[name].append(drive(port, part, conns))
    out = {}
    for name, runs in sides.items():
        lat = sorted(x for r in runs for x in r["lat"])
        out[name] = {
            "n": len(messages),
            "conns": conns,
            "per_s": len(messages) / sum(r["elapsed"] for r in runs),
            "p50_ms": statistics.median(lat) * 1000,
            "p99_ms": lat[max(int(len(lat) * 0.99) - 1, 0)] * 1000,
            "not_aa": sum(r["not_aa"] for r in runs),
        }
    return out


# -- Hutong's node ---------------------------------------------------------------------------------


def hutong_site(root: Path) -> Path:
    """The bench's mapping folder: tests.lis_site's lab map plus the full blood count's items."""
    from simulators.lis import FULL_CBC_LOINC
    from tests.lis_site import LAB_ROWS, write_site

    site = write_site(root / "mappings" / "fxlab")
    have = {c for c, _, _ in LAB_ROWS}
    with (site / "codes" / "lab.csv").open("a", encoding="utf-8") as f:
        for code, loinc in FULL_CBC_LOINC.items():
            if code not in have:
                f.write(f"{code},,{loinc},,equivalent\n")
    return site


def measure(
    n: int = 300,
    conns: tuple[int, ...] = (1, 4),
    py_spy: str | None = None,
    keep: Path | None = None,
    direct: bool = False,
    pg: Any = None,
) -> dict[str, Any]:
    """Every figure of the module docstring; prints them and returns them. ``pg``: a
    ``bench.exchange.PgServer``; the node's store is then a fresh PostgreSQL database."""
    from simulators.lis import oru_message
    from tests.harness import Alliance, free_port_block, results_stored

    dsns = pg.new_dbs() if pg is not None else {}
    with tempfile.TemporaryDirectory() as tmp:
        root = keep or Path(tmp)
        site = hutong_site(root)
        port = free_port_block(3)
        plain_port = port + 1
        adapters: list[dict[str, Any]] = [
            {
                "name": "lis",
                "type": "lis-hl7",
                "mappings": str(site),
                "options": {
                    "port": port,
                    "rate_limit": {"per_second": 100000, "burst": 100000, "hold_s": 0},
                },
            }
        ]
        if direct:  # the same node's unstaged path: everything filed before the ACK
            adapters.append(
                {
                    **adapters[0],
                    "name": "lis-direct",
                    "options": {**adapters[0]["options"], "port": port + 2, "staged": False},
                }
            )
        ports = {"plain": plain_port, "hutong": port}
        if direct:
            ports["direct"] = port + 2
        members = [
            {
                "id": "core",
                "zh": "复兴医院",
                "en": "Fuxing Hospital",
                "role": "core",
                "adapters": adapters,
            },
            {"id": "chc", "zh": "月坛社区卫生服务中心", "en": "Yuetan CHC", "role": "community"},
        ]
        a = Alliance(
            root / "alliance",
            members,
            [{"from": "core", "to": "chc", "kinds": ["result.lab"]}],
            dsn_for=(lambda m: dsns[m]) if dsns else None,
        )
        plain = start_plain(plain_port, root / "plain.db")
        spy: subprocess.Popen[bytes] | None = None
        runs: list[dict[str, Any]] = []
        try:
            a.start("core")
            node = a.node("core").proc
            assert node is not None
            warm = [oru_message(9_000_000 + i) for i in range(20)]
            for p in ports.values():  # schema compiled, connections opened
                drive(p, warm, 1)
            if py_spy:
                spy = subprocess.Popen(
                    [
                        py_spy,
                        "record",
                        "--idle",
                        "-r",
                        "200",
                        "-f",
                        "raw",
                        "-o",
                        str(ROOT / "bench" / "results" / "pyspy-lis.txt"),
                        "-p",
                        str(node.pid),
                    ],
                    stdout=subprocess.DEVNULL,
                )
                time.sleep(1.0)
            first = 1
            for obx, full in ((8, False), (20, True)):
                for c in conns:
                    msgs = [oru_message(i, full_cbc=full) for i in range(first, first + n)]
                    first += n
                    sides = alternate(ports, msgs, c)
                    # the staged messages' filing into the FHIR store after the last ACK
                    t = time.perf_counter()
                    results_stored(a.node("core"), timeout=300)
                    p, h = sides["plain"], sides["hutong"]
                    runs.append(
                        {
                            "obx": obx,
                            "conns": c,
                            "bytes": sum(map(len, msgs)) / n,
                            **sides,
                            "ratio": h["per_s"] / p["per_s"],
                            "filed_after_s": time.perf_counter() - t,
                        }
                    )
                    if "direct" in sides:
                        runs[-1]["direct_ratio"] = sides["direct"]["per_s"] / p["per_s"]
        finally:
            if spy is not None:
                spy.send_signal(2)
                spy.wait(30)
            stop_plain(plain)
            a.stop_all()
    out = {"n": n, "store": "postgresql" if dsns else "sqlite", "runs": runs}
    print_table(out)
    return out


def print_table(out: dict[str, Any]) -> None:
    print(
        f"LIS intake per connection, node on {out.get('store', 'sqlite')} ({out['n']} messages "
        "a run; plain = python-hl7 asyncio "
        "server + one SQLite commit per message; Hutong = staged: AA after the results "
        "journal's commit; direct = staged = false: filed before the AA)"
    )
    print(
        f"  {'OBX':>3} {'conns':>5} {'plain msg/s':>11} {'p50 ms':>7} {'Hutong msg/s':>12} "
        f"{'p50 ms':>7} {'p99 ms':>7} {'ratio':>6} {'not AA':>6} {'filed +s':>8}"
        f" {'direct msg/s':>12} {'ratio':>6}"
    )
    one: dict[int, float] = {}
    for r in out["runs"]:
        p, h = r["plain"], r["hutong"]
        if r["conns"] == 1:
            one[r["obx"]] = h["per_s"]
        scale = (
            f"  {h['per_s'] / one[r['obx']]:.2f}x one conn"
            if r["conns"] > 1 and r["obx"] in one
            else ""
        )
        d = r.get("direct")
        direct = f" {d['per_s']:>12.0f} {r['direct_ratio']:>5.2f}x" if d else f" {'-':>12} {'-':>6}"
        bad = p["not_aa"] + h["not_aa"] + (d["not_aa"] if d else 0)
        print(
            f"  {r['obx']:>3} {r['conns']:>5} {p['per_s']:>11.0f} {p['p50_ms']:>7.1f} "
            f"{h['per_s']:>12.0f} {h['p50_ms']:>7.1f} {h['p99_ms']:>7.1f} "
            f"{r['ratio']:>5.2f}x {bad:>6} {r['filed_after_s']:>8.2f}{direct}{scale}"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd")
    pl = sub.add_parser("plain", help="run the plain receiver (used by the bench)")
    pl.add_argument("--port", type=int, required=True)
    pl.add_argument("--db", required=True)
    p.add_argument("-n", type=int, default=300, help="messages a run")
    p.add_argument("--conns", default="1,4", help="connections, comma list")
    p.add_argument(
        "--py-spy", help="py-spy binary: sample the node (--idle) to bench/results/pyspy-lis.txt"
    )
    p.add_argument("--keep", type=Path, help="keep the node's folder here")
    p.add_argument(
        "--direct",
        action="store_true",
        help="also the same node's unstaged LIS path (staged = false), in the same chunks",
    )
    p.add_argument(
        "--pg",
        action="store_true",
        help="the node on PostgreSQL (a throwaway durable cluster, as exchange.py starts it)",
    )
    args = p.parse_args(argv)
    if args.cmd == "plain":
        plain_main(args.port, args.db)
        return 0
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    pg = None
    if args.pg:
        from bench.exchange import PgServer

        pg = PgServer(None, "")
        if not pg.ok:
            print(f"PostgreSQL could not start: {pg.skip_reason}")
            return 1
    try:
        out = measure(
            args.n,
            tuple(int(x) for x in args.conns.split(",")),
            args.py_spy,
            args.keep,
            args.direct,
            pg,
        )
    finally:
        if pg is not None:
            pg.close()
    bad = sum(
        r["plain"]["not_aa"] + r["hutong"]["not_aa"] + r.get("direct", {}).get("not_aa", 0)
        for r in out["runs"]
    )
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
