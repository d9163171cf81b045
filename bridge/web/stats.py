"""Statistics like the alliance's yearly report, computed from this node's own tables.

Per member (the member that made the referral) and month (Beijing time): up- and
down-referrals, green channel, accepted, rejected, cancelled, returned, acceptance rate
(accepted / decided), median time from request to acceptance and from request to return;
results shared (``result.*`` packets this node sent and had acknowledged, or received) per
sending member; consultations per inviting member and month (``bridge/consult/stats.py``), also
as CSV (``/ui/stats/consultations.csv``). The referral table holds both sides' rows
(``side``), so a node counts every referral it took part in once. Open to every role:
aggregates only, no patient data.
"""

from __future__ import annotations

import csv
import io
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from sqlalchemy import select

from bridge.consult.stats import CSV_HEADER, ConsultCell, csv_rows
from bridge.referral.codes import KINDS
from bridge.referral.tables import REFERRAL
from bridge.store.tables import INBOX, OUTBOX
from bridge.web.charts import grouped_bars
from bridge.web.i18n import t
from bridge.web.layout import CST, Web, aware, e, fmt_age, table

ACCEPTED = ("accepted", "in-progress", "completed")


@dataclass
class Cell:
    """One member's figures for one period."""

    up: int = 0
    down: int = 0
    green: int = 0
    accepted: int = 0
    rejected: int = 0
    cancelled: int = 0
    returned: int = 0
    results_sent: int = 0
    to_accept: list[float] = field(default_factory=list)
    to_return: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float | None:
        decided = self.accepted + self.rejected
        return None if decided == 0 else self.accepted / decided

    def add(self, other: Cell) -> None:
        for k in (
            "up",
            "down",
            "green",
            "accepted",
            "rejected",
            "cancelled",
            "returned",
            "results_sent",
        ):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        self.to_accept += other.to_accept
        self.to_return += other.to_return


def month_of(ts: datetime) -> str:
    return aware(ts).astimezone(CST).strftime("%Y-%m")


def compute(
    referrals: Iterable[dict[str, Any]], results: Iterable[tuple[str, datetime]], year: int
) -> dict[tuple[str, str], Cell]:
    """{(month, member): Cell} for one year; ``results`` = (sending member, when)."""
    cells: dict[tuple[str, str], Cell] = {}
    prefix = f"{year:04d}-"
    for r in referrals:
        month = month_of(r["created_at"])
        if not month.startswith(prefix):
            continue
        c = cells.setdefault((month, r["referrer"]), Cell())
        kind = KINDS.get(r["kind"])
        if kind is not None and kind.direction == "down":
            c.down += 1
        else:
            c.up += 1
        c.green += bool(r["green_channel"])
        if r["accepted_at"] is not None or r["status"] in ACCEPTED:
            c.accepted += 1
        c.rejected += r["status"] == "rejected"
        c.cancelled += r["status"] == "cancelled"
        c.returned += r["status"] == "completed"
        created = aware(r["created_at"])
        if r["accepted_at"] is not None:
            c.to_accept.append((aware(r["accepted_at"]) - created).total_seconds())
        if r["completed_at"] is not None:
            c.to_return.append((aware(r["completed_at"]) - created).total_seconds())
    for member, at in results:
        month = month_of(at)
        if month.startswith(prefix):
            cells.setdefault((month, member), Cell()).results_sent += 1
    return cells


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def stats_routes(web: Web) -> APIRouter:
    router = APIRouter()
    ctx, plan = web.ctx, web.plan

    def load(year: int) -> dict[tuple[str, str], Cell]:
        me = plan.node_id
        with ctx.store.read() as conn:
            refs = [
                dict(r._mapping)
                for r in conn.execute(
                    select(
                        REFERRAL.c.kind,
                        REFERRAL.c.referrer,
                        REFERRAL.c.status,
                        REFERRAL.c.green_channel,
                        REFERRAL.c.created_at,
                        REFERRAL.c.accepted_at,
                        REFERRAL.c.completed_at,
                    )
                )
            ]
            sent = [
                (me, r.acked_at)
                for r in conn.execute(
                    select(OUTBOX.c.acked_at).where(
                        OUTBOX.c.kind.like("result.%"),
                        OUTBOX.c.origin == "local",
                        OUTBOX.c.state == "acknowledged",
                    )
                )
                if r.acked_at is not None
            ]
            got = [
                (r.sender, r.received_at)
                for r in conn.execute(
                    select(INBOX.c.sender, INBOX.c.received_at).where(INBOX.c.kind.like("result.%"))
                )
            ]
        return compute(refs, sent + got, year)

    @router.get("/stats")
    def stats(request: Request) -> Response:
        role = web.gate(request, "clinician", "auditor", "it")
        if not isinstance(role, str):
            return role
        lang = web.lang(request)
        this_year = ctx.now().astimezone(CST).year
        try:
            year = int(request.query_params.get("year") or this_year)
        except ValueError:
            year = this_year
        cells = load(year)
        heads = [
            t(lang, "month"),
            t(lang, "member"),
            t(lang, "up"),
            t(lang, "down"),
            t(lang, "green"),
            t(lang, "accepted_n"),
            t(lang, "rejected_n"),
            t(lang, "cancelled_n"),
            t(lang, "returned_n"),
            t(lang, "accept_rate"),
            t(lang, "median_accept"),
            t(lang, "median_return"),
            t(lang, "results_shared"),
        ]

        def cells_of(label: str, member: str, c: Cell) -> list[str]:
            ma, mr = _median(c.to_accept), _median(c.to_return)
            rate = "—" if c.rate is None else f"{c.rate * 100:.1f}%"

            def dur(v: float | None) -> str:
                return "—" if v is None else f'<span data-seconds="{v:.1f}">{e(fmt_age(v))}</span>'

            return [
                e(label),
                e(web.member_name(lang, member) if member else t(lang, "total")),
                e(c.up),
                e(c.down),
                e(c.green),
                e(c.accepted),
                e(c.rejected),
                e(c.cancelled),
                e(c.returned),
                e(rate),
                dur(ma),
                dur(mr),
                e(c.results_sent),
            ]

        num = tuple(range(2, 13))
        monthly = table(
            heads,
            [cells_of(m, who, c) for (m, who), c in sorted(cells.items())],
            t(lang, "none"),
            "monthly",
            num=num,
        )
        per_member: dict[str, Cell] = {}
        total = Cell()
        for (_m, who), c in cells.items():
            per_member.setdefault(who, Cell()).add(c)
            total.add(c)
        yearly_rows = [cells_of(str(year), who, c) for who, c in sorted(per_member.items())]
        if per_member:
            yearly_rows.append(cells_of(str(year), "", total))
        yearly = table(
            [t(lang, "year"), *heads[1:]], yearly_rows, t(lang, "none"), "yearly", num=num
        )  # its first column holds the year, not a month
        months = [f"{year:04d}-{m:02d}" for m in range(1, 13)]
        by_month = [
            (t(lang, "up"), [sum(c.up for (m, _), c in cells.items() if m == mm) for mm in months]),
            (
                t(lang, "down"),
                [sum(c.down for (m, _), c in cells.items() if m == mm) for mm in months],
            ),
        ]
        members = sorted(per_member)
        by_member = [
            (t(lang, "up"), [per_member[w].up for w in members]),
            (t(lang, "down"), [per_member[w].down for w in members]),
            (t(lang, "accepted_n"), [per_member[w].accepted for w in members]),
        ]
        charts = grouped_bars(
            f"{year} {t(lang, 'chart_month')}",
            [m[5:] for m in months],
            by_month,
            cls="chart chart-month",
        ) + (
            grouped_bars(
                f"{year} {t(lang, 'chart_member')}", members, by_member, cls="chart chart-member"
            )
            if members
            else ""
        )
        years = (
            f'<form method="get" action="/ui/stats" class="inline noprint">'
            f'<label>{e(t(lang, "year"))} <input type="number" name="year" min="2000" '
            f'max="2100" value="{year}"></label><button type="submit">'
            f"{e(t(lang, 'filter'))}</button></form>"
        )
        body = (
            years + f"<p><small>{e(t(lang, 'stats_hint'))}</small></p>"
            f'<h3>{e(t(lang, "stats_year"))}</h3>{yearly}<div class="charts">{charts}</div>'
            f"<h3>{e(t(lang, 'stats_month'))}</h3>{monthly}" + consult_section(lang, year)
        )
        return web.page(request, t(lang, "stats"), body, role=role)

    def consult_section(lang: str, year: int) -> str:
        """Consultations per inviting member and month (``bridge/consult/stats.py``): requested,
        completed (report released), cancelled, turned into referrals, the share referred and
        the median time from request to report; a total row; the CSV link."""
        cells = web.node.consult.stats(year)
        heads = [
            t(lang, "month"),
            t(lang, "member"),
            t(lang, "consult_requested"),
            t(lang, "consult_completed"),
            t(lang, "cancelled_n"),
            t(lang, "consult_referred"),
            t(lang, "referral_share"),
            t(lang, "median_report"),
        ]
        total = ConsultCell()
        for c in cells.values():
            total.requested += c.requested
            total.completed += c.completed
            total.cancelled += c.cancelled
            total.referred += c.referred
            total.to_report_h += c.to_report_h

        def row(month: str, member: str, c: ConsultCell) -> list[str]:
            share, median = c.referral_share, c.median_to_report_h
            return [
                e(month),
                e(web.member_name(lang, member) if member else t(lang, "total")),
                e(c.requested),
                e(c.completed),
                e(c.cancelled),
                e(c.referred),
                e("—" if share is None else f"{share * 100:.1f}%"),
                "—"
                if median is None
                else f'<span data-seconds="{median * 3600:.1f}">{e(fmt_age(median * 3600))}</span>',
            ]

        rows = [row(m, who, c) for (m, who), c in sorted(cells.items())]
        if cells:
            rows.append(row(str(year), "", total))
        return (
            f"<h3>{e(t(lang, 'stats_consult'))}</h3>"
            + table(heads, rows, t(lang, "none"), "consult-stats", num=tuple(range(2, 8)))
            + f'<p class="noprint"><a class="consult-csv" '
            f'href="/ui/stats/consultations.csv?year={year}">{e(t(lang, "export_csv"))}'
            f"</a></p>"
        )

    @router.get("/stats/consultations.csv")
    def consult_csv(request: Request) -> Response:
        """The consultation figures of one year as CSV (aggregates only, no patient data)."""
        role = web.gate(request, "clinician", "auditor", "it")
        if not isinstance(role, str):
            return role
        this_year = ctx.now().astimezone(CST).year
        try:
            year = int(request.query_params.get("year") or this_year)
        except ValueError:
            year = this_year
        out = io.StringIO()
        w = csv.writer(out, lineterminator="\n")
        w.writerow(CSV_HEADER)
        w.writerows(csv_rows(web.node.consult.stats(year)))
        return Response(
            out.getvalue(),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="consultations-{year}.csv"'},
        )

    return router
