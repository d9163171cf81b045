"""`make bench`: every benchmark in one run, one table per section, one JSON file.

1. ``exchange.py --quick``: the machine's ceiling (sign, verify, seal, open, durable commit),
   node-to-node packets/s and latency on SQLite and PostgreSQL (4 KiB and 64 KiB, 1 and many
   threads), where the time goes.
2. ``scaleout.py``: packets/s with 1, 2 and 4 processes of the sender on one PostgreSQL store,
   counted at the receiver (received once, no duplicate).
3. ``results.py``: LIS ORU^R01 -> validated, stored FHIR, messages/s (in-process and over MLLP).
4. ``growth.py``: packets/s A -> B with 10 k, 100 k and 1 M packets already in both stores.
5. ``search.py``: local FHIR API searches/s on stores of growing size.
6. ``messages.py``: the message browser's patient search and keyset paging over 1 M packets.
7. ``lis.py``: LIS intake per connection, Hutong beside a plain store-and-ACK MLLP receiver
   (python-hl7's asyncio server, one SQLite commit per message) on the same messages, 1 and 4
   connections, 8 and 20 OBX.
Peak RSS (VmHWM) of both node processes is read in every exchange run. One throwaway
PostgreSQL cluster (or ``HUTONG_PG_DSN``) serves every PostgreSQL section.

Writes ``bench/results/<date>.json`` (every section, its elapsed seconds, the machine, git
revision, load average) and prints a header line and one table per section;
``bench/summary_md.py`` renders that JSON as the README's Markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sqlite3
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import exchange as ex
import lis as lis_intake
import orjson
import results as lis_results
from aims import aims
from growth import growth
from messages import messages
from relay import relay
from scaleout import scaleout
from search import search


def machine() -> dict[str, Any]:
    """What the figures ran on: CPU, cores, RAM, the temp dir's disk, software versions."""
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = int(line.split()[1]) / 1024 / 1024
    except (OSError, ValueError):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": ram,
        "disk": disk(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "postgresql": None,
    }


def disk() -> dict[str, Any]:
    """The block device under the temp dir (where every node's data lives during the run)."""
    where = os.path.realpath(tempfile.gettempdir())
    dev, fs, best = "?", "?", ""
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            src, mnt, kind = line.split()[:3]
            if (where == mnt or where.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                dev, fs, best = src, kind, mnt
    except OSError:
        pass
    name = os.path.basename(os.path.realpath(dev))
    rot = Path(f"/sys/class/block/{name}/queue/rotational")
    if not rot.exists():  # a partition: its disk's queue
        rot = Path(f"/sys/class/block/{name}/../queue/rotational")
    try:
        rotational: bool | None = rot.read_text().strip() == "1"
    except OSError:
        rotational = None
    usage = shutil.disk_usage(where)
    return {
        "device": dev,
        "fs": fs,
        "mount": best,
        "size_gb": usage.total / 1e9,
        "rotational": rotational,
    }


def header(results: dict[str, Any]) -> str:
    m = results["machine"]
    d = m["disk"]
    rot = {True: "kernel: rotational", False: "kernel: non-rotational", None: "?"}[d["rotational"]]
    load = results["loadavg"]
    return (
        f"{results['when'][:10]} · {m['cpu']}, {m['cores']} cores, "
        f"{m['ram_gib']:.0f} GiB RAM · disk {d['device']} ({d['fs']}, {d['size_gb']:.0f} GB,"
        f" {rot}) · Python {m['python']} · SQLite {m['sqlite']} · PostgreSQL "
        f"{m['postgresql'] or '-'} · load average {load['start'][0]:.1f} → "
        f"{load['end'][0]:.1f} · git {results.get('git') or '?'}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--scaleout-n", type=int, default=3000, help="packets per scale-out run")
    p.add_argument("--no-pg", action="store_true", help="SQLite only (no scale-out section)")
    p.add_argument(
        "--oru-n",
        type=int,
        default=200,
        help="ORU messages: end to end over MLLP, and the in-process loops",
    )
    p.add_argument(
        "--growth", default="10000,100000,1000000", help="packets in the store, comma list"
    )
    p.add_argument(
        "--search", default="10000,100000,1000000", help="FHIR resources in the store, comma list"
    )
    p.add_argument(
        "--messages",
        default="1000000",
        help="packet counts for the message browser section, comma list",
    )
    p.add_argument("--lis-n", type=int, default=300, help="LIS messages per run (lis section)")
    p.add_argument("--only", help="run only these sections, comma list (e.g. growth,search)")
    p.add_argument("--json", type=Path, help="result file (default bench/results/<date>.json)")
    args = p.parse_args(argv)
    started = time.perf_counter()
    day = datetime.now().strftime("%Y-%m-%d")
    out_dir = ex.ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "git": ex.git_rev(),
        "machine": machine(),
        "loadavg": {"start": [round(x, 2) for x in os.getloadavg()]},
        "sections_s": {},
        "exchange": None,
        "scaleout": None,
        "errors": [],
    }
    only = set(args.only.split(",")) if args.only else None
    sections: dict[str, float] = results["sections_s"]
    pg: ex.PgServer | None = None
    t = time.perf_counter()
    if not args.no_pg and (only is None or only & {"exchange", "scaleout", "messages"}):
        ex.console.print("[bold]PostgreSQL[/]: one server for every PostgreSQL section ...")
        pg = ex.PgServer(os.environ.get("HUTONG_PG_DSN"), "HUTONG_PG_DSN")
        if pg.ok:
            results["machine"]["postgresql"] = pg.version
            ex.console.print(f"  {pg.source}; {pg.durable}")
        else:
            results["errors"].append(f"PostgreSQL skipped: {pg.skip_reason}")
        sections["postgresql start"] = time.perf_counter() - t
    steps: list[tuple[str, Callable[[Path], Any]]] = [
        ("exchange", lambda root: run_exchange(root, pg, args.no_pg)),
        ("scaleout", lambda root: run_scaleout(root, pg, args.scaleout_n)),
        ("oru", lambda root: lis_results.measure(args.oru_n)),
        ("growth", lambda root: growth(root, _levels(args.growth), 2000)),
        ("search", lambda root: search(root, _levels(args.search))),
        ("relay", relay),
        ("messages", lambda root: messages(root, _levels(args.messages), pg)),
        ("lis", lambda root: lis_intake.measure(args.lis_n)),
    ]
    try:
        for name, func in steps:
            if only is not None and name not in only:
                continue
            ex.console.print(f"[bold]{name}[/] ...")
            root = Path(tempfile.mkdtemp(prefix=f"hutong-bench-{name}-"))
            t = time.perf_counter()
            try:
                results[name] = func(root)
            except Exception as exc:  # noqa: BLE001 - report, keep the other figures
                results[name] = None
                results["errors"].append(f"{name}: {exc}")
                traceback.print_exc()
            finally:
                shutil.rmtree(root, ignore_errors=True)
                sections[name] = time.perf_counter() - t
            ex.console.print(f"[dim]  {name}: {sections[name]:.0f} s[/]")
    finally:
        if pg is not None:
            pg.close()
    results["loadavg"]["end"] = [round(x, 2) for x in os.getloadavg()]
    results["elapsed_s"] = time.perf_counter() - started
    results["aims"] = aims(results)
    summary(results)
    out = args.json or out_dir / f"{day}.json"
    out.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
    ex.console.print(
        f"wrote {out} ({results['elapsed_s']:.0f} s in all); "
        f"Markdown: .venv/bin/python bench/summary_md.py {out}"
    )
    failed = results["errors"] or (results.get("exchange") or {}).get("errors")
    return 1 if failed else 0


def run_exchange(root: Path, pg: ex.PgServer | None, no_pg: bool) -> dict[str, Any]:
    """exchange.py --quick on the shared PostgreSQL server; its own JSON is folded in."""
    path = root / "exchange.json"
    ex.main(
        ["--quick", "--json", str(path)] + (["--no-pg"] if no_pg or pg is None else []),
        pg_server=pg,
    )
    return orjson.loads(path.read_bytes())


def run_scaleout(root: Path, pg: ex.PgServer | None, n: int) -> list[dict[str, Any]] | None:
    if pg is None:
        return None
    if not pg.ok:
        raise RuntimeError(f"skipped: {pg.skip_reason}")
    return scaleout(root, pg.new_dbs(), n)


def _levels(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _f(v: Any, fmt: str = ",.0f") -> str:
    return "-" if v is None else format(v, fmt)


def summary(results: dict[str, Any]) -> None:
    ex.console.print()
    ex.console.print(f"[bold]{header(results)}[/]")
    exch = results.get("exchange") or {}
    ceiling = exch.get("ceiling") or {}
    if ceiling.get("best_s"):
        t = ex._table(
            "machine ceiling, same run (in-process, best loop)", ["operation", "µs/op", "ops/s"]
        )
        for name, s in ceiling["best_s"].items():
            t.add_row(name, ex.fmt_us(s), f"{1 / s:,.0f}")
        ex.console.print(t)
    pipe = ceiling.get("pipeline", {})
    if exch.get("throughput"):
        t = ex._table(
            "node to node A -> B: sealed packets/s (durable commits), share of the ceiling",
            [
                "store",
                "body",
                "threads",
                "packets/s",
                "ceiling/s",
                "share",
                "from commit",
                "delivered/s",
                "CPU others",
            ],
        )
        for r in exch["throughput"]:
            c = pipe.get(f"{r['backend']}:{r['size']}", {})
            cap = c.get("packets_per_s")
            t.add_row(
                r["backend"],
                ex.KIB[r["size"]],
                str(r["threads"]),
                f"{r['steady_pps']:.0f}",
                _f(cap),
                f"{r['steady_pps'] / cap:.0%}" if cap else "-",
                f"{r['wall_pps']:.0f}",
                _f(r.get("delivered_pps")),
                f"{r['cpu_others']:.0%}",
            )
        ex.console.print(t)
    if exch.get("latency"):
        t = ex._table(
            "latency node to node (4 KiB, queued through A's local API)",
            [
                "store",
                "offered/s",
                "packets",
                "created→received p50 ms",
                "p99 ms",
                "created→acked p50 ms",
                "p99 ms",
            ],
        )
        for r in exch["latency"]:
            t.add_row(
                r["backend"],
                f"{r['achieved_rate']:.0f}",
                str(r["packets"]),
                f"{r['received_p50_ms']:.0f}",
                f"{r['received_p99_ms']:.0f}",
                f"{r['acked_p50_ms']:.0f}",
                f"{r['acked_p99_ms']:.0f}",
            )
        ex.console.print(t)
    if results.get("scaleout"):
        s = ex._table(
            "scale-out on PostgreSQL (4 KiB, 64 threads)",
            ["processes", "packets/s", "vs 1", "received once", "duplicates"],
        )
        base = results["scaleout"][0]["steady_pps"]
        for r in results["scaleout"]:
            s.add_row(
                str(r["processes"]),
                f"{r['steady_pps']:.0f}",
                f"{r['steady_pps'] / base:.2f}x",
                str(r["all_received_once"]),
                str(r["duplicates_at_b"]),
            )
        ex.console.print(s)
    rss = [
        (
            r["backend"],
            ex.KIB[r["size"]],
            r["threads"],
            r.get("rss_a_peak_mib"),
            r.get("rss_b_peak_mib"),
        )
        for r in exch.get("throughput") or []
    ]
    if rss:
        t = ex._table(
            "peak RSS per node process (VmHWM, MiB; each run's own processes)",
            ["store", "body", "threads", "A (sender)", "B (receiver)"],
        )
        for b, size, th, ra, rb in rss:
            t.add_row(b, size, str(th), _f(ra), _f(rb))
        ex.console.print(t)
    if results.get("oru"):
        o = results["oru"]
        t = ex._table(
            f"LIS ORU^R01 -> FHIR ({o['bytes_per_message']:.0f} bytes, 8 OBX)",
            ["stage", "messages/s"],
        )
        for k, v in o["rates"].items():
            t.add_row(k, f"{v:.0f}")
        t.add_row("end to end over MLLP (durable, one connection)", f"{o['end_to_end_per_s']:.1f}")
        ex.console.print(t)
    if results.get("growth"):
        t = ex._table(
            "store growth: packets/s A -> B (SQLite, 4 KiB, 50 threads)",
            [
                "packets already stored",
                "packets/s",
                "vs first",
                "load s",
                "load CPU s",
                "B's db MB",
                "CPU others",
            ],
        )
        base = results["growth"][0]["steady_pps"]
        for r in results["growth"]:
            t.add_row(
                f"{r['history']:,}",
                f"{r['steady_pps']:.0f}",
                f"{r['steady_pps'] / base:.2f}x",
                f"{max(r['load_a_s'], r['load_b_s']):.0f}",
                _f(r.get("load_cpu_s")),
                f"{r['b_db_mb']:.0f}",
                f"{r['cpu_others']:.0%}",
            )
        ex.console.print(t)
    if results.get("search"):
        names = [k for k in results["search"][0] if "?" in k]
        t = ex._table(
            "local FHIR API searches/s (one client, every search audited)",
            ["resources", *names, "db MB"],
        )
        for r in results["search"]:
            t.add_row(
                f"{r['resources']:,}",
                *(f"{r[k]['per_s']:.1f} (p50 {r[k]['p50_ms']:.0f} ms)" for k in names),
                f"{r['db_mb']:.0f}",
            )
        ex.console.print(t)
    if results.get("relay"):
        r = results["relay"]
        t = ex._table(
            f"platform relay: {r['members']} members -> platform -> 2 receivers "
            f"(SQLite, 4 KiB, {r['n']:,} packets)",
            [
                "packets/s",
                "wall",
                "received once",
                "duplicates",
                f"latency p50 / p99 ms at {r['lat_rate']:.0f}/s",
                "platform CPU",
                "platform RSS MiB",
            ],
        )
        t.add_row(
            f"{r['steady_pps']:.0f}",
            f"{r['wall_pps']:.0f}",
            str(r["received_once"]),
            str(r["duplicates"]),
            f"{r['p50_ms']:.0f} / {r['p99_ms']:.0f}",
            f"{r['platform_cpu']:.0%}",
            _f(r["platform_rss_mib"]),
        )
        ex.console.print(t)
    if results.get("messages"):
        t = ex._table(
            "message browser (in-process): a patient's packets across "
            "outbox/inbox/quarantine, and keyset pages",
            [
                "store",
                "packets",
                "patient p50 / p95 / max ms",
                "first page ms",
                "page 200 ms",
                "db MB",
            ],
        )
        for r in results["messages"]:
            t.add_row(
                r.get("db", "sqlite"),
                f"{r['packets']:,}",
                f"{r['patient_p50_ms']:.1f} / "
                f"{r['patient_p95_ms']:.1f} / {r['patient_max_ms']:.1f}",
                f"{r['first_page_ms']:.1f}",
                f"{r['page_200_ms']:.1f}",
                f"{r['db_mb']:.0f}",
            )
        ex.console.print(t)
    if results.get("lis"):
        runs = results["lis"]["runs"]
        one = {r["obx"]: r["hutong"]["per_s"] for r in runs if r["conns"] == 1}
        t = ex._table(
            "LIS intake per connection: Hutong vs a plain store-and-ACK receiver "
            "(python-hl7 asyncio + one SQLite commit), same messages, same run",
            [
                "OBX",
                "connections",
                "plain msg/s",
                "Hutong msg/s",
                "Hutong ACK p50 / p99 ms",
                "ratio (aim 1 conn >= 0.6x)",
                "vs 1 conn (aim 4 >= 1.6x)",
            ],
        )
        for r in runs:
            h = r["hutong"]
            vs = f"{h['per_s'] / one[r['obx']]:.2f}x" if r["conns"] > 1 and r["obx"] in one else "-"
            met = "MET" if r["ratio"] >= 0.6 else "NOT MET"
            t.add_row(
                str(r["obx"]),
                str(r["conns"]),
                f"{r['plain']['per_s']:.0f}",
                f"{h['per_s']:.0f}",
                f"{h['p50_ms']:.0f} / {h['p99_ms']:.0f}",
                f"{r['ratio']:.2f}x" + (f" {met}" if r["conns"] == 1 else ""),
                vs,
            )
        ex.console.print(t)
    t = ex._table(
        f"elapsed seconds by section ({results['elapsed_s']:.0f} s in all)",
        ["section", "seconds", "share"],
    )
    for name, s in results["sections_s"].items():
        t.add_row(name, f"{s:.0f}", f"{s / results['elapsed_s']:.0%}")
    for name, s in (exch.get("parts_s") or {}).items():
        t.add_row(f"  exchange: {name}", f"{s:.0f}", f"{s / results['elapsed_s']:.0%}")
    ex.console.print(t)
    t = ex._table("issue 17's aims (the soak's: make soak)", ["what", "measured", "aim", "verdict"])
    for a in results.get("aims") or aims(results):
        colour = {"MET": "green", "NOT MET": "red"}.get(a["verdict"], "dim")
        t.add_row(a["what"], a["measured"], a["aim"], f"[{colour}]{a['verdict']}[/]")
    ex.console.print(t)
    for e in results["errors"] + list(exch.get("errors") or []):
        ex.console.print(f"[red]{e.splitlines()[0] if e else e}[/]")


if __name__ == "__main__":
    sys.exit(main())
