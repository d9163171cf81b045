"""`make bench`: every benchmark in one run, one table, one JSON file.

1. ``exchange.py --quick``: the machine's ceiling (sign, verify, seal, open, durable commit),
   node-to-node packets/s and latency on SQLite and PostgreSQL (4 KiB and 64 KiB, 1 and many
   threads), where the time goes.
2. ``scaleout.py``: packets/s with 1, 2 and 4 processes of the sender on one PostgreSQL store,
   counted at the receiver (received once, no duplicate).
3. ``results.py``: LIS ORU^R01 -> validated, stored FHIR, messages/s (in-process and over MLLP).
4. ``growth.py``: packets/s A -> B with 10 k and 100 k packets already in both stores.
5. ``search.py``: local FHIR API searches/s on stores of 10 k, 100 k and 300 k resources.
Peak RSS (VmHWM) of both node processes is read in every exchange run.

Writes ``bench/results/<date>.json`` (both sections, machine, git revision, load average) and
prints a summary table. Whole run: about 7-9 minutes on the 2-core development VM.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import exchange as ex
import orjson
import results as lis_results
from growth import growth
from scaleout import scaleout
from search import search


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--scaleout-n", type=int, default=1500, help="packets per scale-out run")
    p.add_argument("--no-pg", action="store_true", help="SQLite only (no scale-out section)")
    p.add_argument("--oru-n", type=int, default=300, help="ORU messages end to end over MLLP")
    p.add_argument("--growth", default="10000,100000", help="packets in the store, comma list")
    p.add_argument("--search", default="10000,100000,300000",
                   help="FHIR resources in the store, comma list")
    args = p.parse_args(argv)
    started = time.perf_counter()
    day = datetime.now().strftime("%Y-%m-%d")
    out_dir = ex.ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    exchange_json = out_dir / f"{day}-exchange.json"
    rc = ex.main(["--quick", "--json", str(exchange_json)] + (["--no-pg"] if args.no_pg else []))
    results: dict = {"when": datetime.now(UTC).isoformat(timespec="seconds"),
                     "exchange": orjson.loads(exchange_json.read_bytes()), "scaleout": None,
                     "errors": []}
    exchange_json.unlink()
    if not args.no_pg:
        ex.console.print("[bold]scale-out on PostgreSQL[/]: 1, 2, 4 processes of A ...")
        pg = ex.PgServer(os.environ.get("HUTONG_PG_DSN"), "HUTONG_PG_DSN")
        root = Path(tempfile.mkdtemp(prefix="hutong-bench-scaleout-"))
        try:
            if pg.ok:
                results["scaleout"] = scaleout(root, pg.dbs, args.scaleout_n)
            else:
                results["errors"].append(f"scale-out skipped: {pg.skip_reason}")
        except Exception as exc:  # noqa: BLE001 - report, keep the other figures
            results["errors"].append(f"scale-out: {exc}")
            traceback.print_exc()
        finally:
            pg.close()
            shutil.rmtree(root, ignore_errors=True)
    for name, func in (
        ("oru", lambda root: lis_results.measure(args.oru_n)),
        ("growth", lambda root: growth(root, _levels(args.growth), 1000)),
        ("search", lambda root: search(root, _levels(args.search))),
    ):
        ex.console.print(f"[bold]{name}[/] ...")
        root = Path(tempfile.mkdtemp(prefix=f"hutong-bench-{name}-"))
        try:
            results[name] = func(root)
        except Exception as exc:  # noqa: BLE001 - report, keep the other figures
            results[name] = None
            results["errors"].append(f"{name}: {exc}")
            traceback.print_exc()
        finally:
            shutil.rmtree(root, ignore_errors=True)
    results["elapsed_s"] = time.perf_counter() - started
    summary(results)
    out = out_dir / f"{day}.json"
    out.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
    ex.console.print(f"wrote {out} ({results['elapsed_s']:.0f} s in all)")
    return 1 if rc or results["errors"] else 0


def _levels(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def summary(results: dict) -> None:
    t = ex._table("summary: packets/s A -> B (durable commits), as a share of the ceiling",
                  ["store", "body", "threads", "packets/s", "ceiling/s", "share"])
    ceiling = results["exchange"].get("ceiling", {}).get("pipeline", {})
    for r in results["exchange"].get("throughput", []):
        c = ceiling.get(f"{r['backend']}:{r['size']}", {})
        cap = c.get("packets_per_s") or c.get("pps")
        t.add_row(r["backend"], ex.KIB[r["size"]], str(r["threads"]),
                  f"{r['steady_pps']:.0f}", f"{cap:.0f}" if cap else "-",
                  f"{r['steady_pps'] / cap:.0%}" if cap else "-")
    ex.console.print(t)
    if results["scaleout"]:
        s = ex._table("scale-out on PostgreSQL (4 KiB, 64 threads)",
                      ["processes", "packets/s", "vs 1", "received once", "duplicates"])
        base = results["scaleout"][0]["steady_pps"]
        for r in results["scaleout"]:
            s.add_row(str(r["processes"]), f"{r['steady_pps']:.0f}",
                      f"{r['steady_pps'] / base:.2f}x", str(r["all_received_once"]),
                      str(r["duplicates_at_b"]))
        ex.console.print(s)
    rss = [(r["backend"], ex.KIB[r["size"]], r["threads"], r.get("rss_a_peak_mib"),
            r.get("rss_b_peak_mib")) for r in results["exchange"].get("throughput", [])]
    if rss:
        t = ex._table("peak RSS per node process (VmHWM, MiB)",
                      ["store", "body", "threads", "A (sender)", "B (receiver, cumulative)"])
        for b, size, th, ra, rb in rss:
            t.add_row(b, size, str(th), f"{ra:.0f}" if ra else "-", f"{rb:.0f}" if rb else "-")
        ex.console.print(t)
    if results.get("oru"):
        o = results["oru"]
        t = ex._table(f"LIS ORU^R01 -> FHIR ({o['bytes_per_message']:.0f} bytes, 8 OBX)",
                      ["stage", "messages/s"])
        for k, v in o["rates"].items():
            t.add_row(k, f"{v:.0f}")
        t.add_row("end to end over MLLP (durable, one connection)",
                  f"{o['end_to_end_per_s']:.1f}")
        ex.console.print(t)
    if results.get("growth"):
        t = ex._table("store growth: packets/s A -> B (SQLite, 4 KiB, 50 threads)",
                      ["packets already stored", "packets/s", "B's db MB", "CPU others"])
        for r in results["growth"]:
            t.add_row(f"{r['history']:,}", f"{r['steady_pps']:.0f}", f"{r['b_db_mb']:.0f}",
                      f"{r['cpu_others']:.0%}")
        ex.console.print(t)
    if results.get("search"):
        names = [k for k in results["search"][0] if "?" in k]
        t = ex._table("local FHIR API searches/s (one client, every search audited)",
                      ["resources", *names, "db MB"])
        for r in results["search"]:
            t.add_row(f"{r['resources']:,}", *(f"{r[k]['per_s']:.1f} (p50 {r[k]['p50_ms']:.0f}"
                                               f" ms)" for k in names), f"{r['db_mb']:.0f}")
        ex.console.print(t)
    for e in results["errors"]:
        ex.console.print(f"[red]{e}[/]")


if __name__ == "__main__":
    sys.exit(main())
