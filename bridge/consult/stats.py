"""Consultation figures per inviting member and month (Beijing time), from this node's rows.

Requested, completed (report released), cancelled, turned into a referral, and the time from
request to released report (hours). A node counts each consultation it took part in once (its
own side's row). Aggregates only, no patient data: for the statistics page and its CSV.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

CST = timezone(timedelta(hours=8))


@dataclass
class ConsultCell:
    requested: int = 0
    completed: int = 0
    cancelled: int = 0
    referred: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    to_report_h: list[float] = field(default_factory=list)

    @property
    def median_to_report_h(self) -> float | None:
        return statistics.median(self.to_report_h) if self.to_report_h else None

    @property
    def referral_share(self) -> float | None:
        return None if self.completed == 0 else self.referred / self.completed


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def compute(rows: Iterable[dict[str, Any]], year: int) -> dict[tuple[str, str], ConsultCell]:
    """{(month "YYYY-MM", inviting member): ConsultCell} for one year (month of the request)."""
    cells: dict[tuple[str, str], ConsultCell] = {}
    for r in rows:
        if r["step"] == "draft":
            continue
        month = _aware(r["created_at"]).astimezone(CST).strftime("%Y-%m")
        if not month.startswith(f"{year:04d}-"):
            continue
        c = cells.setdefault((month, r["inviter"]), ConsultCell())
        c.requested += 1
        c.by_kind[r["kind"]] = c.by_kind.get(r["kind"], 0) + 1
        if r["released_at"] is not None:
            c.completed += 1
            c.to_report_h.append(
                (_aware(r["released_at"]) - _aware(r["created_at"])).total_seconds() / 3600
            )
        if r["step"] == "cancelled":
            c.cancelled += 1
        if r["referral_thread"]:
            c.referred += 1
    return cells


CSV_HEADER = (
    "month",
    "member",
    "requested",
    "completed",
    "cancelled",
    "referred",
    "referral_share",
    "median_hours_to_report",
)


def csv_rows(cells: dict[tuple[str, str], ConsultCell]) -> list[tuple[Any, ...]]:
    out = []
    for (month, member), c in sorted(cells.items()):
        share, median = c.referral_share, c.median_to_report_h
        out.append(
            (
                month,
                member,
                c.requested,
                c.completed,
                c.cancelled,
                c.referred,
                "" if share is None else f"{share:.2f}",
                "" if median is None else f"{median:.1f}",
            )
        )
    return out
