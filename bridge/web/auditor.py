"""Auditor pages: the exchange log with filters, the chain's verification, export.

Filters: time (since inclusive, until exclusive; bridge.timeinput's rule), member (the peer
of the exchange), kind, action, outcome, patient hash (or the ID-number lookup), actor; counts
and keyset pages. The log holds keyed patient hashes only, never names. Export streams the same
selection as CSV (with a BOM for Excel) or FHIR AuditEvent ndjson carrying the chain hashes.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy import select

from bridge.audit.events import AuditEntry
from bridge.audit.export import count as count_audit
from bridge.audit.export import export as export_audit
from bridge.audit.export import query as query_audit
from bridge.audit.tables import AuditRecord
from bridge.privacy import patient_hash
from bridge.timeinput import TIME_RULE
from bridge.web.i18n import t
from bridge.web.layout import Web, e, fmt_time, parse_time, read_form, table

FILTERS = ("since", "until", "peer", "kind", "action", "outcome", "patient_hash", "actor")
SHOWN = 500
AUDIT = AuditRecord.__table__  # type: ignore[attr-defined]


def audit_filters(request: Request) -> tuple[dict[str, Any], str | None]:
    """(export/query filters, kind) from the query string; ValueError on a bad time."""
    q = request.query_params
    out: dict[str, Any] = {}
    for k in ("peer", "action", "outcome", "patient_hash", "actor"):
        if q.get(k):
            out[k] = q[k].strip()
    for k in ("since", "until"):
        if q.get(k):
            out[k] = parse_time(q[k])
    return out, (q.get("kind") or "").strip() or None


#: a filter that does not parse (ValueError texts quote the input, so they are not shown)
BAD_FILTER = (
    "filter not understood: " + TIME_RULE + "; a patient is a hash of hex digits "
    "(or use the ID number lookup)"
)


def auditor_routes(web: Web) -> APIRouter:
    router = APIRouter()
    ctx, plan = web.ctx, web.plan

    @router.get("/audit")
    def audit(request: Request) -> Response:
        role = web.gate(request, "auditor")
        if not isinstance(role, str):
            return role
        lang = web.lang(request)
        q: Any = request.query_params
        error = ""
        try:
            filters, kind = audit_filters(request)
        except ValueError:  # the text would quote the input: name the rule instead
            filters, kind, error = {}, None, BAD_FILTER
            q = {}  # and the form is not filled with it either
        # the whole chain is recomputed every alerts.chain_every_s or on request (?verify=full);
        # in between only the rows after the last full run are checked (bridge/audit/watch.py)
        result = web.node.chain_watch.check(full=q.get("verify") == "full")
        before = q.get("before") if not error else None
        before_seq = int(before) if before and before.isdigit() and len(before) < 19 else None
        with ctx.store.read() as conn:  # kind is a column too: no filtering after the query
            rows = query_audit(conn, limit=SHOWN, before_seq=before_seq, kind=kind, **filters)
            total = count_audit(conn, kind=kind, **filters)
            actions = sorted(a for (a,) in conn.execute(select(AUDIT.c.action).distinct()))
        # the auditor's own searches are recorded too (one entry, no patient: hashes only)
        web.audit_read(
            request,
            role,
            [],
            "/ui/audit?"
            + "&".join(f"{k}={v}" for k, v in request.query_params.items() if k in FILTERS)[:250],
            interaction="search-type",
        )
        next_before = rows[-1]["seq"] if len(rows) >= SHOWN else None
        full_link = (
            f'<a class="noprint" href="/ui/audit?verify=full">{e(t(lang, "verify_full_now"))}</a>'
        )
        if result.ok:
            at = fmt_time(result.full_at)
            chain = (
                f'<p class="chain ok">✔ {e(t(lang, "verified"))}: '
                f"{result.full_checked + result.new_checked} {e(t(lang, 'records'))}, "
                f"{result.checkpoints_checked} {e(t(lang, 'checkpoints'))}, head "
                f"<code>{e(result.head_hash[:16])}</code> · "
                f"{e(t(lang, 'full_verify_at'))} <time>{e(at)}</time> "
                f"({result.full_checked} {e(t(lang, 'records'))}), "
                f'<span class="since-full">{e(t(lang, "since_full"))}: '
                f"{result.new_checked}</span> · {full_link}</p>"
            )
        else:
            chain = (
                f'<p class="chain bad">✘ {e(t(lang, "broken"))}: #{result.first_bad_seq} '
                f"{e(result.reason)} · {full_link}</p>"
            )

        def opts(values: Iterable[tuple[str, str]], current: str | None) -> str:
            return '<option value=""></option>' + "".join(
                f'<option value="{e(v)}"{" selected" if v == current else ""}>{e(label)}</option>'
                for v, label in values
            )

        members = [(m, web.member_name(lang, m)) for m in sorted(plan.directory)]
        kinds = sorted({k for r in plan.rules.describe() for k in r["kinds"] if k != "*"})
        outcomes = [(o, f"{o} {t(lang, 'outcome_' + o)}") for o in ("0", "4", "8", "12")]
        form = (
            f'<form method="get" action="/ui/audit" class="inline noprint audit-filter">'
            f'<label>{e(t(lang, "since"))} <input name="since" size="18" '
            f'placeholder="2026-12-01 / -2h / yesterday" '
            f'value="{e(q.get("since"))}"></label>'
            f'<label>{e(t(lang, "until"))} <input name="until" size="18" '
            f'placeholder="2026-12-01 / -2h / yesterday" '
            f'value="{e(q.get("until"))}"></label>'
            f'<label>{e(t(lang, "member"))} <select name="peer">'
            f"{opts(members, q.get('peer'))}</select></label>"
            f'<label>{e(t(lang, "kind"))} <select name="kind">'
            f"{opts(((k, k) for k in kinds), q.get('kind'))}</select></label>"
            f'<label>{e(t(lang, "action"))} <select name="action">'
            f"{opts(((a, a) for a in actions), q.get('action'))}</select></label>"
            f'<label>{e(t(lang, "outcome"))} <select name="outcome">'
            f"{opts(outcomes, q.get('outcome'))}</select></label>"
            f'<label>{e(t(lang, "patient_hash"))} <input name="patient_hash" size="20" '
            f'value="{e(q.get("patient_hash"))}"></label>'
            f'<label>{e(t(lang, "actor"))} <input name="actor" size="16" '
            f'placeholder="user:…" value="{e(q.get("actor"))}"></label>'
            f'<button type="submit">{e(t(lang, "filter"))}</button>'
            f"<p><small>{e(t(lang, 'time_rule'))}</small></p></form>"
        )
        keep = {k: q[k] for k in FILTERS if q.get(k)}
        links = " ".join(
            f'<a class="export export-{fmt}" href="/ui/audit/export.{fmt}?{e(urlencode(keep))}"'
            f">{e(t(lang, 'export'))} {fmt.upper()}</a>"
            for fmt in ("csv", "ndjson")
        )
        if next_before is not None:
            links += (
                f' <a class="next-page" href="/ui/audit?'
                f'{e(urlencode({**keep, "before": next_before}))}">'
                f"{e(t(lang, 'next_page'))} →</a>"
            )
        lookup = (
            f'<form method="post" action="/ui/audit/lookup" class="inline noprint lookup">'
            f'<label>{e(t(lang, "national_id"))} <input name="national_id" size="20" '
            f'autocomplete="off"></label><input type="hidden" name="back" value="audit">'
            f'<button type="submit">{e(t(lang, "who_looked"))}</button>'
            f"<p><small>{e(t(lang, 'lookup_hint'))}</small></p></form>"
        )
        log = table(
            [
                t(lang, "seq"),
                t(lang, "at"),
                t(lang, "action"),
                t(lang, "outcome"),
                t(lang, "kind"),
                t(lang, "member"),
                t(lang, "thread"),
                t(lang, "packet"),
                t(lang, "patient_hash"),
                t(lang, "actor"),
                t(lang, "role"),
                t(lang, "address"),
                t(lang, "shown_what"),
                t(lang, "message"),
            ],
            [
                [
                    e(r["seq"]),
                    e(fmt_time(r["at"])),
                    e(r["action"]),
                    e(r["outcome"]),
                    e(r["kind"]),
                    e(r["peer"]),
                    e(r["thread"]),
                    e(r["packet_id"]),
                    f'<span title="{e(r["patient_hash"])}">{e((r["patient_hash"] or "")[:16])}</span>',
                    (
                        f'<a class="actor" href="/ui/audit?{e(urlencode({"actor": r["actor"]}))}">'
                        f"{e(r['actor'])}</a>"
                        if r["actor"]
                        else ""
                    ),
                    e(r["actor_role"]),
                    e(r["address"]),
                    e(" ".join(x for x in (r["shown"], r["resources"]) if x)),
                    e(" ".join(x for x in (r["code"], r["message"]) if x)),
                ]
                for r in rows
            ],
            t(lang, "none"),
            "audit",
        )
        body = (
            f"<h3>{e(t(lang, 'chain'))}</h3>{chain}"
            + (f'<p class="bad">{e(error)}</p>' if error else "")
            + lookup
            + form
            + f'<p class="noprint count">{links} &nbsp; <small>'
            + f'<span class="total">{total}</span> {e(t(lang, "matching"))}, '
            + f"{len(rows)} {e(t(lang, 'audit_shown'))}</small></p>"
            + log
        )
        return web.page(request, t(lang, "audit"), body, role=role, status=400 if error else 200)

    @router.get("/audit/export.{fmt}")
    def audit_download(request: Request, fmt: str) -> Response:
        role = web.gate(request, "auditor")
        if not isinstance(role, str):
            return role
        if fmt not in ("ndjson", "csv"):
            return Response(status_code=404)
        try:
            filters, kind = audit_filters(request)
        except ValueError:
            return Response(BAD_FILTER, status_code=400)
        buf = io.StringIO(newline="")
        with ctx.store.read() as conn:  # a long export must not hold the write lock
            n = export_audit(conn, buf, fmt=fmt, kind=kind, **filters)  # type: ignore[arg-type]
        with ctx.store.write() as conn:
            # the export itself is audited (after the rows it carries: it is not in itself)
            shown = "&".join(f"{k}={q_}" for k, q_ in request.query_params.items() if k in FILTERS)[
                :250
            ]
            ctx.audit.append(
                conn,
                [
                    AuditEntry(
                        action="export",
                        actor=web.actor(request, role),
                        actor_role=role,
                        address=request.client.host if request.client else None,
                        at=ctx.now(),
                        message=f"audit export {fmt}",
                        extra={"rows": n, "filters": shown or None},
                    )
                ],
            )
        data = buf.getvalue().encode()
        if fmt == "csv":
            data = b"\xef\xbb\xbf" + data  # BOM so Excel reads the Chinese text
        media = "text/csv; charset=utf-8" if fmt == "csv" else "application/x-ndjson"
        stamp = ctx.now().strftime("%Y%m%dT%H%M%SZ")
        return Response(
            data,
            media_type=media,
            headers={
                "Content-Disposition": f'attachment; filename="audit-{plan.node_id}-{stamp}.{fmt}"'
            },
        )

    @router.post("/audit/lookup")
    async def lookup(request: Request) -> Response:
        """A national ID number typed by an auditor (or IT): its keyed hash, computed here and
        put in the filter; the typed value is neither stored, logged nor sent back."""
        role = web.gate(request, "auditor", "it")
        if not isinstance(role, str):
            return role
        form = await read_form(request)
        typed = form.get("national_id", "").strip()
        back = "/ui/messages" if form.get("back") == "messages" else "/ui/audit"
        if back == "/ui/audit" and role != "auditor":
            back = "/ui/messages"
        if not typed:
            return RedirectResponse(back, status_code=303)
        phash = patient_hash(plan.patient_hash_key, typed)
        del typed, form
        keep = {"patient_hash": phash, **({"action": "read"} if back == "/ui/audit" else {})}
        return RedirectResponse(f"{back}?{urlencode(keep)}", status_code=303)

    return router
