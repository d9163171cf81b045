"""IT page: alerts, peers and their health, queues (oldest waiting), dead letters with retry,
quarantine with replay, adapters, mapping gaps, reminders and the rule list.

Everything is read from the node's own tables and objects at request time; the alerts and peer
probes come from the node's alert job (:mod:`bridge.alerts`).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy import func, select

from bridge import ops
from bridge.alerts import Alerter
from bridge.errors import HutongError
from bridge.referral.tables import REFERRAL
from bridge.store import quarantine
from bridge.store.tables import INBOX, OUTBOX, QUARANTINE
from bridge.web import console_labels  # noqa: F401 - labels of the new rules and the dashboard
from bridge.web.dashboard import dashboard_section
from bridge.web.i18n import kind_name, t
from bridge.web.layout import Web, e, fmt_age, fmt_time, table
from bridge.web.referral_list import OVERDUE

#: rows of each list shown on the IT page; the page says how many there are and links the rest
SHOWN = 100


def mapping_gaps(web: Web) -> list[dict[str, Any]] | None:
    """Gaps of every adapter's mapping folder; None when no adapter has mappings configured
    (or the mapping module is not installed)."""
    folders = {a.name: a.mappings for a in web.plan.adapters if a.mappings is not None}
    if not folders:
        return None
    try:
        from bridge.mapping import find_gaps, load_site
    except ImportError:
        return None
    out: list[dict[str, Any]] = []
    for adapter, folder in sorted(folders.items()):
        try:
            gaps = find_gaps(load_site(folder))
        except HutongError as exc:
            out.append(
                {
                    "adapter": adapter,
                    "map": str(folder),
                    "code": exc.code,
                    "display": exc.message,
                    "kind": "error",
                    "count": 0,
                }
            )
            continue
        out += [
            {
                "adapter": adapter,
                "map": g.map,
                "code": g.code,
                "display": g.display,
                "kind": g.kind,
                "count": g.count,
            }
            for g in gaps
        ]
    return out


def it_routes(web: Web, alerter: Alerter) -> APIRouter:
    router = APIRouter()
    ctx, plan, node = web.ctx, web.plan, web.node

    @router.get("/it")
    def it(request: Request) -> Response:
        role = web.gate(request, "it")
        if not isinstance(role, str):
            return role
        lang = web.lang(request)
        facts = alerter.collect(probe=False)  # fresh counts; probes from the job
        active = alerter.active()
        summary = ops.queue_summary(ctx)
        now = ctx.now()

        alerts = (
            "".join(
                f'<div class="alert alert-{e(a["rule"])}" data-key="{e(k)}"><b>'
                f"{e(t(lang, 'rule_' + a['rule']))}</b> · {e(a['subject'])} · {e(a['message'])} "
                f"<small>({e(t(lang, 'since'))} {e(fmt_time(a['raised_at']))})</small></div>"
                for k, a in sorted(active.items())
            )
            or f'<p class="ok no-alerts">✔ {e(t(lang, "no_alerts"))}</p>'
        )
        hook = plan.alerts.webhook_url
        alerts += (
            f"<p><small>{e(t(lang, 'webhook'))}: "
            f"{e(hook.split('?')[0] if hook else t(lang, 'not_configured'))}</small></p>"
        )

        def ago(ts: Any) -> str:
            return "" if ts is None else f"{fmt_time(ts)} ({fmt_age((now - ts).total_seconds())})"

        peers = table(
            [
                t(lang, "peer"),
                t(lang, "health"),
                t(lang, "last_ack"),
                t(lang, "last_in"),
                t(lang, "last_probe"),
                t(lang, "waiting"),
                t(lang, "oldest"),
                t(lang, "dead"),
            ],
            [
                [
                    e(web.member_name(lang, p.peer)),
                    (
                        f'<span class="bad">✘ {e(t(lang, "silent"))}</span>'
                        if f"peer-silent:{p.peer}" in active
                        else f'<span class="ok">✔ {e(t(lang, "healthy"))}</span>'
                        if p.last_contact
                        else e(t(lang, "unknown"))
                    )
                    + (f"<br><small>{e(p.last_probe_error)}</small>" if p.last_probe_error else ""),
                    e(ago(p.last_ack)),
                    e(ago(p.last_packet_in)),
                    e(ago(p.last_probe_ok)),
                    e(p.waiting),
                    e(fmt_age(p.oldest_waiting_s)),
                    e(p.dead),
                ]
                for p in sorted(facts.peers.values(), key=lambda p: p.peer)
            ],
            t(lang, "none"),
            "peers",
            num=(5, 7),
        )

        states = ("queued", "sent", "acknowledged", "dead", "refused")

        def retry_cell(p: dict[str, Any]) -> str:
            if not p.get("dead"):
                return ""
            return (
                f'<form method="post" action="/ui/it/outbox/retry?'
                f'{e(urlencode({"peer": p["peer"]}))}" class="retry"><button type="submit">'
                f"{e(t(lang, 'retry'))}</button></form>"
            )

        queues = table(
            [t(lang, "peer"), *(t(lang, "q_" + s) for s in states), t(lang, "oldest"), ""],
            [
                [
                    e(web.member_name(lang, p["peer"])),
                    *(e(p.get(s, 0)) for s in states),
                    e(fmt_age(p["oldest_waiting_s"])),
                    retry_cell(p),
                ]
                for p in summary["outbox"]
            ],
            t(lang, "none"),
            "queues",
            num=(1, 2, 3, 4, 5),
        )
        with ctx.store.read() as conn:
            inbox_rows = conn.execute(
                select(INBOX.c.state, func.count(), func.min(INBOX.c.received_at)).group_by(
                    INBOX.c.state
                )
            ).all()
            q_rows = conn.execute(
                select(QUARANTINE.c.state, func.count(), func.min(QUARANTINE.c.at)).group_by(
                    QUARANTINE.c.state
                )
            ).all()
            held = quarantine.list_items(conn, state=None, limit=SHOWN)
            held_total = sum(n for _st, n, _oldest in q_rows)
            dead_total = conn.execute(
                select(func.count()).select_from(OUTBOX).where(OUTBOX.c.state == "dead")
            ).scalar_one()

        def shown(n: int, total: int, href: str) -> str:
            """How many of how many; the rest where a list pages through all of them."""
            rest = (
                f' <a class="all" href="{e(href)}">{e(t(lang, "see_all"))} →</a>'
                if total > n
                else ""
            )
            return (
                f'<p class="count"><span class="total">{total}</span> · {n} '
                f"{e(t(lang, 'shown'))}{rest}</p>"
            )

        inbound = table(
            [t(lang, "queue"), t(lang, "status"), t(lang, "count"), t(lang, "oldest")],
            [
                [
                    e(t(lang, "inbound")),
                    e(st),
                    e(n),
                    e(fmt_age((now - oldest).total_seconds()) if st == "received" else ""),
                ]
                for st, n, oldest in inbox_rows
            ]
            + [
                [
                    e(t(lang, "quarantine")),
                    e(st),
                    e(n),
                    e(fmt_age((now - oldest).total_seconds()) if st == "held" else ""),
                ]
                for st, n, oldest in q_rows
            ],
            t(lang, "none"),
            "inbound",
            num=(2,),
        )

        def replay_cell(item: dict[str, Any]) -> str:
            if item["state"] != "held":
                return ""
            return (
                f'<form method="post" action="/ui/it/quarantine/{item["id"]}/replay" '
                f'class="replay"><button type="submit">{e(t(lang, "replay"))}</button>'
                f"</form>"
            )

        quar = table(
            [
                "#",
                t(lang, "at"),
                t(lang, "source"),
                t(lang, "code"),
                t(lang, "message"),
                t(lang, "sender"),
                t(lang, "kind"),
                t(lang, "status"),
                t(lang, "replay_result"),
                "",
            ],
            [
                [
                    e(i["id"]),
                    e(fmt_time(i["at"])),
                    e(i["source"]),
                    e(i["code"]),
                    e(i["message"]),
                    e(i["sender"]),
                    e(i["kind"]),
                    e(i["state"]),
                    e(i["replay_result"]),
                    replay_cell(i),
                ]
                for i in held
            ],
            t(lang, "none"),
            "quarantine",
        )
        dead = ops.outbox_list(ctx, state="dead", limit=SHOWN)
        deads = table(
            [
                "#",
                t(lang, "peer"),
                t(lang, "kind"),
                t(lang, "thread"),
                t(lang, "attempts"),
                t(lang, "age"),
                t(lang, "message"),
            ],
            [
                [
                    e(d["id"]),
                    e(d["next_hop"]),
                    e(d["kind"]),
                    e(d["thread"]),
                    e(d["attempts"]),
                    e(fmt_age(d["age_s"])),
                    e(d["last_error"]),
                ]
                for d in dead
            ],
            t(lang, "none"),
            "dead",
        )

        adapters = table(
            [
                t(lang, "adapter"),
                t(lang, "type"),
                t(lang, "health"),
                t(lang, "last_ok"),
                t(lang, "last_error"),
                t(lang, "counters"),
            ],
            [
                [
                    e(name),
                    e(st.get("type")),
                    (
                        f'<span class="bad">✘ {e(t(lang, "silent"))}</span>'
                        if f"adapter-silent:{name}" in active
                        else f'<span class="bad">✘ {e(t(lang, "failing"))}</span>'
                        if _failing(st)
                        else f'<span class="ok">✔ {e(t(lang, "healthy"))}</span>'
                    ),
                    e(fmt_time(st.get("last_ok_at"))),
                    e(st.get("last_error")),
                    e(", ".join(f"{k}={v}" for k, v in sorted((st.get("counters") or {}).items()))),
                ]
                for name, st in sorted(facts.adapters.items())
            ],
            t(lang, "no_adapters"),
            "adapters",
        )

        gaps = mapping_gaps(web)
        if gaps is None:
            gap_html = f'<p class="mapping-none">{e(t(lang, "mapping_not_configured"))}</p>'
        else:
            gap_html = table(
                [
                    t(lang, "adapter"),
                    t(lang, "map"),
                    t(lang, "code"),
                    t(lang, "description"),
                    t(lang, "gap_kind"),
                    t(lang, "count"),
                ],
                [
                    [
                        e(g["adapter"]),
                        e(g["map"]),
                        e(g["code"]),
                        e(g["display"]),
                        e(
                            t(lang, "gap_" + g["kind"])
                            if g["kind"] in ("unmapped", "no-target", "unknown-map")
                            else g["kind"]
                        ),
                        e(g["count"]),
                    ]
                    for g in gaps
                ],
                t(lang, "no_gaps"),
                "gaps",
                num=(5,),
            )

        rules = table(
            [
                "#",
                t(lang, "from"),
                t(lang, "to"),
                t(lang, "kinds"),
                t(lang, "senders"),
                t(lang, "recipients"),
                t(lang, "notes"),
            ],
            [
                [
                    e(r["index"]),
                    e(r["from"]),
                    e(r["to"]),
                    e(", ".join(r["kinds"])),
                    e(", ".join(r["senders"])),
                    e(", ".join(r["recipients"])),
                    e(r["note"]),
                ]
                for r in plan.rules.describe()
            ],
            t(lang, "none"),
            "rules",
        )
        msg = web.sessions.pop_flash(request)
        body = (
            (f'<p class="msg">{e(msg)}</p>' if msg else "")
            + f'<h3>{e(t(lang, "alerts"))}</h3><div class="alerts">{alerts}</div>'
            + dashboard_section(web, request, lang)
            + f"<h3>{e(t(lang, 'peers'))}</h3>{peers}"
            f"<h3>{e(t(lang, 'queues'))}</h3>{queues}"
            f"<h3>{e(t(lang, 'inbound'))} / {e(t(lang, 'quarantine'))}</h3>{inbound}"
            f"<h3>{e(t(lang, 'quarantine'))}</h3>"
            + shown(len(held), held_total, "/ui/messages?box=quarantine")
            + quar
            + f"<h3>{e(t(lang, 'dead_letters'))}</h3>"
            + shown(len(dead), dead_total, "/ui/messages?box=dead")
            + deads
            + f"<h3>{e(t(lang, 'adapters'))}</h3>{adapters}"
            f"<h3>{e(t(lang, 'mapping_gaps'))}</h3>{gap_html}"
            + reused_ids_section(web, lang)
            + reminders_section(web, lang)
            + f"<h3>{e(t(lang, 'rules'))}</h3>{rules}"
        )
        return web.page(request, t(lang, "it"), body, role=role)

    @router.post("/it/quarantine/{item_id}/replay")
    def replay(request: Request, item_id: int) -> Response:
        role = web.gate(request, "it")
        if not isinstance(role, str):
            return role
        try:
            ok, result = ops.quarantine_replay(
                ctx, node.intake, item_id, actor=web.actor(request, role), adapters=node.adapters
            )
        except HutongError as exc:
            return web.error_page(request, role, exc, "/ui/it")
        node.wake_all_senders()
        node.wake("deliver")
        web.sessions.flash(request, f"#{item_id}: {'OK' if ok else 'FAILED'} {result}")
        return RedirectResponse("/ui/it", status_code=303)

    @router.post("/it/outbox/retry")
    def retry(request: Request, peer: str | None = None) -> Response:
        role = web.gate(request, "it")
        if not isinstance(role, str):
            return role
        n = ops.outbox_retry(ctx, peer=peer, actor=web.actor(request, role))
        node.wake_all_senders()
        web.sessions.flash(request, f"{t(web.lang(request), 'requeued')}: {n} ({peer or '*'})")
        return RedirectResponse("/ui/it", status_code=303)

    return router


def reused_ids_section(web: Web, lang: str, limit: int = 50) -> str:
    """Messages taken in under a control id their sender had already used for different
    content (audited by the adapter, newest first): IT tells the vendor, who must fix it."""
    import orjson

    from bridge.audit.events import event_fields
    from bridge.audit.tables import AuditRecord
    from bridge.local.intake import RECORD_ID_REUSED

    audit = AuditRecord.__table__  # type: ignore[attr-defined]
    with web.ctx.store.read() as conn:
        rows = conn.execute(
            select(audit.c.at, audit.c.resource)
            .where(audit.c.action == RECORD_ID_REUSED)
            .order_by(audit.c.seq.desc())
            .limit(limit)
        ).all()
        total = conn.execute(
            select(func.count()).select_from(audit).where(audit.c.action == RECORD_ID_REUSED)
        ).scalar_one()
    items = [(at, event_fields(orjson.loads(res))) for at, res in rows]
    # the rest are in the audit chain: the auditor's page pages through them, as does
    # hutong audit export --action ...
    rest = (
        f' <a class="all" href="/ui/audit?{e(urlencode({"action": RECORD_ID_REUSED}))}">'
        f"{e(t(lang, 'see_all'))} →</a>"
        if total > len(items)
        else ""
    )
    return (
        f"<h3>{e(t(lang, 'reused_ids'))}</h3>"
        f'<p class="count"><span class="total">{total}</span> · {len(items)} '
        f"{e(t(lang, 'shown'))} (audit: <code>{e(RECORD_ID_REUSED)}</code>){rest}</p>"
        + table(
            [t(lang, "at"), t(lang, "source"), t(lang, "message")],
            [[e(fmt_time(at)), e(f.get("actor")), e(f.get("message"))] for at, f in items],
            t(lang, "none"),
            "reused-ids",
        )
    )


#: the referral list filtered to what the reminders list (a clinician's page: patient names)
OVERDUE_HREF = "/ui/referrals?overdue=1"


def reminders_section(web: Web, lang: str, limit: int = SHOWN) -> str:
    """Referrals not accepted in time, most recently changed first: the newest ``limit``,
    how many in all, and the rest in the referral list filtered to the same overdue ones."""
    with web.ctx.store.read() as conn:
        total = conn.execute(
            select(func.count()).select_from(REFERRAL).where(*OVERDUE)
        ).scalar_one()
        due = [
            dict(r._mapping)
            for r in conn.execute(
                select(REFERRAL)
                .where(*OVERDUE)
                .order_by(REFERRAL.c.updated_at.desc(), REFERRAL.c.thread.desc())
                .limit(limit)
            )
        ]
    rest = (
        f' <a class="all" href="{e(OVERDUE_HREF)}">{e(t(lang, "see_all"))} →</a>'
        if total > len(due)
        else ""
    )
    return (
        f"<h3>{e(t(lang, 'reminders'))}</h3>"
        f'<p class="count"><span class="total">{total}</span> · {len(due)} '
        f"{e(t(lang, 'shown'))}{rest}</p>"
        + table(
            [
                t(lang, "thread"),
                t(lang, "kind"),
                t(lang, "peer"),
                t(lang, "green"),
                t(lang, "created"),
                t(lang, "reminded"),
            ],
            [
                [
                    e(r["thread"]),
                    e(kind_name(lang, r["kind"])),
                    e(
                        web.member_name(
                            lang, r["referrer"] if r["side"] == "receiver" else r["receiver"]
                        )
                    ),
                    e(t(lang, "yes") if r["green_channel"] else t(lang, "no")),
                    e(fmt_time(r["created_at"])),
                    e(fmt_time(r["reminded_at"])),
                ]
                for r in due
            ],
            t(lang, "none"),
            "reminders",
        )
    )


def _failing(status: dict[str, Any]) -> bool:
    """The adapter's last call failed after its last success (e.g. the HIS does not answer)."""
    err, ok = status.get("last_error_at"), status.get("last_ok_at")
    return bool(err) and (not ok or str(err) > str(ok))
