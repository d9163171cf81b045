"""Storage that shrinks: purge delivered bodies by age per kind, keep headers and the audit.

Headers and the audit chain stay (audit at least six months, the MLPS 2.0 minimum); only body
bytes go, and the file really shrinks (SQLite incremental vacuum, PostgreSQL VACUUM).

Quarantine likewise: items older than ``[retention] quarantine_days`` lose their bytes (a
member's item keeps its row: code, ids, digest) and unauthenticated refusals go whole; then
the quota (``quarantine_max_bytes``) is enforced as at intake. Both audited as counts.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import and_, func, or_, update

from bridge.audit.events import AuditEntry
from bridge.context import NodeContext
from bridge.store.quarantine import enforce_quota, purge_old
from bridge.store.tables import INBOX, OUTBOX


def purge_bodies(ctx: NodeContext, *, vacuum: bool = True) -> dict[str, int]:
    now = ctx.now()
    days = dict(ctx.plan.retention.body_days)
    default = days.pop("*", None)
    purged = {"outbox": 0, "inbox": 0, "quarantine": 0}

    def kind_filter(col: Any, cutoff_col: Any) -> Any:
        clauses = []
        for kind, d in days.items():
            clauses.append(and_(col == kind, cutoff_col < now - timedelta(days=d)))
        if default is not None:
            clauses.append(
                and_(
                    col.notin_(list(days)) if days else True,
                    cutoff_col < now - timedelta(days=default),
                )
            )
        return or_(*clauses) if clauses else False

    with ctx.store.write() as conn:
        res = conn.execute(
            update(OUTBOX)
            .where(
                OUTBOX.c.state.in_(["acknowledged", "refused", "dead"]),
                or_(OUTBOX.c.body.is_not(None), OUTBOX.c.frame.is_not(None)),
                kind_filter(OUTBOX.c.kind, func.coalesce(OUTBOX.c.acked_at, OUTBOX.c.created_at)),
            )
            .values(body=None, frame=None)
        )
        purged["outbox"] = res.rowcount or 0
        res = conn.execute(
            update(INBOX)
            .where(
                INBOX.c.state == "delivered",
                INBOX.c.body.is_not(None),
                kind_filter(INBOX.c.kind, INBOX.c.delivered_at),
            )
            .values(body=None)
        )
        purged["inbox"] = res.rowcount or 0
        if purged["outbox"] or purged["inbox"]:
            ctx.audit.append(
                conn,
                [
                    AuditEntry(
                        action="purged",
                        at=now,
                        message="delivered bodies purged by retention",
                        extra={k: purged[k] for k in ("outbox", "inbox")},
                    )
                ],
            )
        ret = ctx.plan.retention
        old = purge_old(conn, now - timedelta(days=ret.quarantine_days))
        over = enforce_quota(conn, ret.quarantine_max_bytes)
        purged["quarantine"] = old["dropped"] + old["emptied"]
        if purged["quarantine"] or over["dropped"] or over["emptied"]:
            ctx.audit.append(
                conn,
                [
                    AuditEntry(
                        action="quarantine-purged",
                        at=now,
                        message=(
                            f"quarantine: {old['dropped']} unauthenticated refusal(s) and the "
                            f"bytes of {old['emptied']} item(s) older than {ret.quarantine_days:g}"
                            f" days purged; {over['dropped']} dropped and {over['emptied']} "
                            f"emptied over the quota of {ret.quarantine_max_bytes} bytes"
                        ),
                        extra={
                            "old_dropped": old["dropped"],
                            "old_emptied": old["emptied"],
                            "quota_dropped": over["dropped"],
                            "quota_emptied": over["emptied"],
                        },
                    )
                ],
            )
    if vacuum and any(purged.values()):
        ctx.store.vacuum()
    return purged
