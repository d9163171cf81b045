"""Issue 17's aims beside a ``make bench`` run: one row per aim, the figure measured, MET or
NOT MET (or "not measured" when the run left the section out).

``run.py`` prints the table last and keeps it in the run's JSON (``aims``); ``summary_md.py``
renders it under the figures. Nothing here measures: each row reads what the sections wrote.
The soak's aims (first vs last part of a sustained run) are judged by ``make soak``
(``bench/soak.py``), which is not part of ``make bench``.
"""

from __future__ import annotations

from typing import Any

MET, NOT_MET, MISSING = "MET", "NOT MET", "not measured"


def _row(what: str, aim: str, figure: str | None, ok: bool | None) -> dict[str, str]:
    return {
        "what": what,
        "aim": aim,
        "measured": figure if figure is not None else "-",
        "verdict": MISSING if ok is None else (MET if ok else NOT_MET),
    }


def _one(rows: list[dict[str, Any]] | None, **match: Any) -> dict[str, Any] | None:
    for r in rows or ():
        if all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def aims(r: dict[str, Any]) -> list[dict[str, str]]:
    """The rows of issue 17's table, in its order, from one run's results."""
    out: list[dict[str, str]] = []
    lis = (r.get("lis") or {}).get("runs") or []
    one = _one(lis, obx=8, conns=1)
    four = _one(lis, obx=8, conns=4)
    out.append(
        _row(
            "LIS ORU^R01 (8 OBX), one MLLP connection, vs a plain store-and-ACK receiver",
            ">= 0.6x",
            f"{one['ratio']:.2f}x" if one else None,
            one["ratio"] >= 0.6 if one else None,
        )
    )
    x = four["hutong"]["per_s"] / one["hutong"]["per_s"] if one and four else None
    out.append(
        _row(
            "LIS intake, 4 connections vs one",
            ">= 1.6x",
            f"{x:.2f}x" if x is not None else None,
            x >= 1.6 if x is not None else None,
        )
    )
    exch = r.get("exchange") or {}
    t = _one(exch.get("throughput"), backend="sqlite", size=4096, threads=50)
    out.append(
        _row(
            "packets received A -> B (SQLite, 4 KiB, 50 threads)",
            ">= 1,500/s",
            f"{t['steady_pps']:,.0f}/s" if t else None,
            t["steady_pps"] >= 1500 if t else None,
        )
    )
    d = t.get("delivered_pps") if t else None
    share = d / t["steady_pps"] if t and d and t["steady_pps"] else None
    out.append(
        _row(
            "... and stored by B's local side (results in B's FHIR store)",
            ">= 80 % of received",
            f"{d:,.0f}/s = {share:.0%}" if share is not None and d else None,
            share >= 0.8 if share is not None else None,
        )
    )
    g = r.get("growth") or []
    ratio = g[-1]["steady_pps"] / g[0]["steady_pps"] if len(g) > 1 else None
    out.append(
        _row(
            "exchange with the most packets already stored vs the fewest"
            + (f" ({g[-1]['history']:,} vs {g[0]['history']:,})" if len(g) > 1 else ""),
            ">= 90 %",
            f"{ratio:.0%}" if ratio is not None else None,
            ratio >= 0.9 if ratio is not None else None,
        )
    )
    so = r.get("scaleout") or []
    s1, s2 = _one(so, processes=1), _one(so, processes=2)
    x = s2["steady_pps"] / s1["steady_pps"] if s1 and s2 and s1["steady_pps"] else None
    out.append(
        _row(
            "PostgreSQL scale-out 1 -> 2 processes",
            ">= 1.7x",
            f"{x:.2f}x" if x is not None else None,
            x >= 1.7 if x is not None else None,
        )
    )
    for backend, name in (("sqlite", "SQLite"), ("postgresql", "PostgreSQL")):
        lat = _one(exch.get("latency"), backend=backend)
        out.append(
            _row(
                f"created -> acked p99 at ~100 packets/s ({name})",
                "< 50 ms",
                f"{lat['acked_p99_ms']:,.0f} ms at {lat['achieved_rate']:.0f}/s" if lat else None,
                lat["acked_p99_ms"] < 50 if lat else None,
            )
        )
    relay = r.get("relay")
    out.append(
        _row(
            "platform relay, 50 members, one platform process (SQLite)",
            ">= 2,000/s",
            f"{relay['steady_pps']:,.0f}/s" if relay else None,
            relay["steady_pps"] >= 2000 if relay else None,
        )
    )
    out.append(
        _row(
            "platform relay p99 at half its rate",
            "< 100 ms",
            f"{relay['p99_ms']:,.0f} ms at {relay['lat_rate']:.0f}/s" if relay else None,
            relay["p99_ms"] < 100 if relay else None,
        )
    )
    peaks = [
        v
        for row in exch.get("throughput") or []
        for v in (row.get("rss_a_peak_mib"), row.get("rss_b_peak_mib"))
        if v is not None
    ] + ([relay["platform_rss_mib"]] if relay and relay.get("platform_rss_mib") else [])
    top = max(peaks) if peaks else None
    out.append(
        _row(
            "peak RSS per node process (every exchange run and the platform)",
            "< 150 MiB",
            f"{top:,.0f} MiB" if top is not None else None,
            top < 150 if top is not None else None,
        )
    )
    return out
