"""Render a ``make bench`` result (``bench/results/<date>.json``) as the README's Markdown table.

    .venv/bin/python bench/summary_md.py                 # the newest bench/results/<date>.json
    .venv/bin/python bench/summary_md.py results.json    # a given run

Prints a heading with the date, run time and machine, then one ``| what | figure |`` table: a
row per figure issue 7 names (node to node on SQLite and PostgreSQL, latency, scale-out, peak
RSS, ORU^R01 -> FHIR, store growth, FHIR searches, platform relay) and the machine's ceiling.
Sections missing from the run are left out; nothing is computed that the JSON does not hold.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
from aims import aims

RESULTS = Path(__file__).resolve().parent / "results"
STORES = {"sqlite": "SQLite", "postgresql": "PostgreSQL"}
KIB = {4096: "4 KiB", 65536: "64 KiB"}


def _n(v: float | None, digits: int = 0) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def _count(n: int) -> str:
    return (
        f"{n // 1_000_000} M"
        if n >= 1_000_000 and n % 1_000_000 == 0
        else (f"{n // 1000} k" if n >= 1000 and n % 1000 == 0 else f"{n:,}")
    )


def header(r: dict[str, Any]) -> str:
    m = r.get("machine") or {}
    if not m.get("cpu"):  # a run from before run.py recorded the machine
        old = (r.get("exchange") or {}).get("machine") or {}
        m = {"cores": old.get("cpus"), "python": (r.get("exchange") or {}).get("python"), **m}
    d = m.get("disk") or {}
    rot = {True: "kernel: rotational", False: "kernel: non-rotational", None: "?"}[
        d.get("rotational")
    ]
    load = r.get("loadavg") or (r.get("exchange") or {}).get("loadavg") or {}
    start, end = (load.get("start") or [None])[0], (load.get("end") or [None])[0]
    return (
        f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores, {_n(m.get('ram_gib'))} GiB RAM;"
        f" disk {d.get('device', '?')} ({d.get('fs', '?')}, {_n(d.get('size_gb'))} GB, "
        f"{rot}); Python {m.get('python', '?')}, SQLite {m.get('sqlite', '?')}, "
        f"PostgreSQL {m.get('postgresql') or '-'}; load average {_n(start, 1)} → "
        f"{_n(end, 1)}; git {r.get('git') or (r.get('exchange') or {}).get('git') or '?'}"
    )


def rows(r: dict[str, Any]) -> Iterator[tuple[str, str]]:
    exch = r.get("exchange") or {}
    pipe = (exch.get("ceiling") or {}).get("pipeline") or {}
    runs = exch.get("throughput") or []
    for backend, store in STORES.items():
        for size, kib in KIB.items():
            mine = [x for x in runs if x["backend"] == backend and x["size"] == size]
            if not mine:
                continue
            cap = (pipe.get(f"{backend}:{size}") or {}).get("packets_per_s")
            yield (
                f"{store} {kib}, {' / '.join(str(x['threads']) for x in mine)} threads",
                f"{' / '.join(_n(x['steady_pps']) for x in mine)} packets/s"
                + (f" (ceiling {_n(cap)})" if cap else ""),
            )
    ends = [x for x in runs if x.get("delivered_pps")]
    if ends:
        yield (
            "end to end, B's local side has stored the results",
            "; ".join(
                f"{STORES[x['backend']]} {KIB[x['size']]} {x['threads']} threads: "
                f"{_n(x['delivered_pps'])} packets/s"
                for x in ends
            ),
        )
    for lat in exch.get("latency") or []:
        yield (
            (
                f"latency {STORES[lat['backend']]} at {_n(lat['achieved_rate'])} packets/s "
                "(created → received, → acked)"
            ),
            (
                f"p50 {_n(lat['received_p50_ms'])} / p99 {_n(lat['received_p99_ms'])} ms; "
                f"acked p50 {_n(lat['acked_p50_ms'])} / p99 {_n(lat['acked_p99_ms'])} ms"
            ),
        )
    so = r.get("scaleout")
    if so:
        dups = sum(x["duplicates_at_b"] for x in so)
        once = all(x["all_received_once"] for x in so)
        yield (
            f"scale-out PostgreSQL {' / '.join(str(x['processes']) for x in so)} processes",
            f"{' / '.join(_n(x['steady_pps']) for x in so)} packets/s, "
            + ("received once" if once else "**NOT all received once**")
            + f", {dups} duplicates",
        )
    for who, key in (("sender", "rss_a_peak_mib"), ("receiver", "rss_b_peak_mib")):
        vals = [x for x in runs if x.get(key)]
        if vals:
            top = max(vals, key=lambda x: x[key])
            yield (
                f"peak RSS per node, {who} (VmHWM)",
                (
                    f"{min(x[key] for x in vals):.0f}–{top[key]:.0f} MiB (highest: "
                    f"{STORES[top['backend']]} {KIB[top['size']]} {top['threads']} threads)"
                ),
            )
    best = (exch.get("ceiling") or {}).get("best_s") or {}
    if best:
        yield (
            "machine ceiling, same run (µs per op)",
            ", ".join(f"{k} {v * 1e6:,.0f}" for k, v in best.items()),
        )
    oru = r.get("oru")
    if oru:
        names = {
            "bare python-hl7 parse": "parse",
            "bare resource construction (to_fhir)": "construct",
            "schema validation of the Bundle": "validate",
            "in-process ORU -> validated FHIR (no store)": "in-process",
        }
        rates = oru.get("rates") or {}
        yield (
            "ORU^R01 → FHIR: " + " / ".join(names.get(k, k) for k in rates),
            " / ".join(_n(v) for v in rates.values()) + " msg/s",
        )
        yield (
            "ORU^R01 → FHIR end to end over MLLP, durable",
            f"{_n(oru['end_to_end_per_s'], 1)} msg/s ({oru['n']} messages)",
        )
    lis = r.get("lis")
    if lis:
        for x in lis["runs"]:
            h = x["hutong"]
            aim = (
                " (aim ≥ 0.6×: " + ("MET" if x["ratio"] >= 0.6 else "NOT MET") + ")"
                if x["conns"] == 1
                else ""
            )
            what = (
                f"LIS intake, {x['obx']} OBX, {x['conns']} connection(s): Hutong vs a "
                "plain store-and-ACK receiver"
            )
            figure = (
                f"{_n(h['per_s'])} vs {_n(x['plain']['per_s'])} msg/s = "
                f"{x['ratio']:.2f}×{aim}; ACK p50 / p99 {_n(h['p50_ms'])} / "
                f"{_n(h['p99_ms'])} ms"
            )
            yield (what, figure)
    growth = r.get("growth")
    if growth:
        yield (
            (f"store growth: {' / '.join(_count(x['history']) for x in growth)} packets stored"),
            (
                f"{' / '.join(_n(x['steady_pps']) for x in growth)} packets/s"
                f" (B's database {' / '.join(_n(x['b_db_mb']) for x in growth)} MB)"
            ),
        )
    search = r.get("search")
    if search:
        levels = " / ".join(_count(x["resources"]) for x in search)
        for q in [k for k in search[0] if "?" in k]:
            yield (
                f"FHIR `{q}` at {levels}",
                " / ".join(_n(x[q]["per_s"], 1) for x in search)
                + " searches/s (p50 "
                + " / ".join(_n(x[q]["p50_ms"]) for x in search)
                + " ms)",
            )
    relay = r.get("relay")
    if relay:
        once = relay.get("received_once")
        yield (
            f"platform relay, {relay.get('members', '?')} members",
            f"{_n(relay.get('steady_pps'))} packets/s; p50 {_n(relay.get('p50_ms'))} / p99 "
            f"{_n(relay.get('p99_ms'))} ms at {_n(relay.get('lat_rate'))}/s; "
            + ("received once" if once else "**NOT all received once**")
            + f", {relay.get('duplicates', '?')} duplicates",
        )
    secs = r.get("sections_s") or {}
    if secs:
        yield ("run time by section (s)", ", ".join(f"{k} {v:.0f}" for k, v in secs.items()))


def markdown(r: dict[str, Any]) -> str:
    when = (r.get("when") or "?")[:10]
    out = [
        f"## Figures of {when} (`make bench`, {_n(r.get('elapsed_s'))} s)",
        "",
        header(r) + ".",
        "",
        "| what | figure |",
        "| --- | --- |",
    ]
    out += [f"| {_cell(a)} | {_cell(b)} |" for a, b in rows(r)]
    out += [
        "",
        "Issue 17's aims (the soak's are judged by `make soak`):",
        "",
        "| what | measured | aim | verdict |",
        "| --- | --- | --- | --- |",
    ]
    out += [
        f"| {_cell(a['what'])} | {_cell(a['measured'])} | {_cell(a['aim'])} | {a['verdict']} |"
        for a in r.get("aims") or aims(r)
    ]
    errors = list(r.get("errors") or []) + list((r.get("exchange") or {}).get("errors") or [])
    if errors:
        out += ["", "Errors in this run: " + "; ".join(e.splitlines()[0] for e in errors if e)]
    return "\n".join(out) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def newest() -> Path:
    found = sorted(p for p in RESULTS.glob("*.json") if re.fullmatch(r"\d{4}-\d{2}-\d{2}", p.stem))
    if not found:
        raise SystemExit(f"no bench/results/<date>.json in {RESULTS}: run `make bench` first")
    return found[-1]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0]) if args else newest()
    sys.stdout.write(markdown(orjson.loads(path.read_bytes())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
