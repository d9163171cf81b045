"""The message browser page (IT): search every box, open one message, resend with a reason.

Headers only in the list; a message's FHIR body and raw input are shown only on request
(``?body=1``), and that request is an audited read naming the person (``bridge.messages``).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

import orjson
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse, Response

from bridge import messages as mb
from bridge.errors import HutongError
from bridge.timeinput import TIME_RULE
from bridge.web.i18n import t
from bridge.web.layout import Web, e, fmt_time, parse_time, read_form, table

FILTERS = ("box", "since", "until", "peer", "kind", "state", "thread", "patient_hash", "packet_id")


def message_routes(web: Web) -> APIRouter:
    router = APIRouter()
    ctx = web.ctx

    @router.get("/messages")
    def browse(request: Request) -> Response:
        role = web.gate(request, "it")
        if not isinstance(role, str):
            return role
        lang = web.lang(request)
        q = request.query_params
        f = {k: (q.get(k) or "").strip() or None for k in FILTERS}
        error = ""
        rows: list[dict[str, Any]] = []
        nxt = None
        total, exact = 0, True
        try:
            since, until = parse_time(f["since"]), parse_time(f["until"])
            filters: dict[str, Any] = dict(
                boxes=[f["box"]] if f["box"] else None,
                since=since,
                until=until,
                peer=f["peer"],
                kind=f["kind"],
                state=f["state"],
                thread=f["thread"],
                patient_hash=f["patient_hash"],
                packet_id=f["packet_id"],
            )
            with ctx.store.read() as conn:
                rows, nxt = mb.search(conn, after=q.get("after") or None, **filters)
                total, exact = mb.count(conn, **filters)
        except ValueError:
            error = TIME_RULE
        except HutongError as exc:
            error = f"{exc.code}: {exc.message}"

        def field(name: str, label: str, size: int = 14) -> str:
            return (
                f'<label>{e(t(lang, label))} <input name="{name}" size="{size}" '
                f'value="{e(f[name] if not error else "")}"></label>'
            )

        boxes = '<option value=""></option>' + "".join(
            f'<option value="{b}"{" selected" if f["box"] == b else ""}>{b}</option>'
            for b in mb.BOXES
        )
        form = (
            f'<form method="get" action="/ui/messages" class="inline noprint filter">'
            f'<label>{e(t(lang, "box"))} <select name="box">{boxes}</select></label>'
            + field("since", "since")
            + field("until", "until")
            + field("peer", "peer")
            + field("kind", "kind")
            + field("state", "state")
            + field("thread", "thread")
            + field("packet_id", "packet_id")
            + field("patient_hash", "patient_hash", 20)
            + f'<button type="submit">{e(t(lang, "filter"))}</button></form>'
            f'<form method="post" action="/ui/audit/lookup" class="inline noprint lookup">'
            f'<label>{e(t(lang, "national_id"))} <input name="national_id" size="20" '
            f'autocomplete="off"></label><input type="hidden" name="back" value="messages">'
            f'<button type="submit">{e(t(lang, "filter"))}</button>'
            f"<p><small>{e(t(lang, 'lookup_hint'))}</small></p></form>"
        )
        keep = {k: v for k, v in f.items() if v}
        more = (
            f'<a class="next-page" href="/ui/messages?{e(urlencode({**keep, "after": nxt}))}">'
            f"{e(t(lang, 'next_page'))} →</a>"
            if nxt
            else ""
        )
        listing = table(
            [
                t(lang, "at"),
                t(lang, "box"),
                t(lang, "packet_id"),
                t(lang, "kind"),
                t(lang, "peer"),
                t(lang, "state"),
                t(lang, "thread"),
                "",
            ],
            [
                [
                    f"<time>{e(fmt_time(r['at']))}</time>",
                    e(r["box"]),
                    e(r.get("packet_id")),
                    e(r.get("kind")),
                    e(r.get("recipient") or r.get("sender")),
                    e(r.get("state")),
                    e(r.get("thread")),
                    f'<a href="/ui/messages/{e(r["box_table"])}/{r["id"]}">{e(t(lang, "open"))}</a>',
                ]
                for r in rows
            ],
            t(lang, "none"),
            "messages",
        )
        body = (
            (f'<p class="bad">{e(error)}</p>' if error else "")
            + form
            + f'<p class="count"><span class="total">{total:,}{"" if exact else "+"}'
            f"</span> {e(t(lang, 'matching'))} · {len(rows)} {e(t(lang, 'on_page'))} "
            f"{more}</p>" + listing
        )
        return web.page(request, t(lang, "messages"), body, role=role, status=400 if error else 200)

    @router.get("/messages/{box}/{rid}")
    def one(request: Request, box: str, rid: int) -> Response:
        role = web.gate(request, "it")
        if not isinstance(role, str):
            return role
        lang = web.lang(request)
        want_body = request.query_params.get("body") == "1"
        try:
            if want_body:
                with ctx.store.write() as conn:
                    msg = mb.show(conn, box, rid)
                    mb.audit_body_read(
                        ctx,
                        conn,
                        msg,
                        actor=web.actor(request, role),
                        role=role,
                        address=request.client.host if request.client else None,
                        via="/ui/messages",
                    )
            else:
                with ctx.store.read() as conn:
                    msg = mb.show(conn, box, rid)
        except HutongError as exc:
            return web.error_page(request, role, exc, "/ui/messages")
        flash = web.sessions.pop_flash(request)
        heads = table(
            [t(lang, "item"), t(lang, "value")],
            [
                [e(k), e(fmt_time(v) if hasattr(v, "tzinfo") else v)]
                for k, v in msg["headers"].items()
            ],
            "",
            "headers",
        )
        path = table(
            [
                t(lang, "at"),
                t(lang, "action"),
                t(lang, "outcome"),
                t(lang, "peer"),
                t(lang, "actor"),
            ],
            [
                [
                    f"<time>{e(fmt_time(p['at']))}</time>",
                    e(p["action"]),
                    e(p["outcome"]),
                    e(p["peer"]),
                    e(p["actor"]),
                ]
                for p in msg["path"]
            ],
            t(lang, "none"),
            "path",
        )
        if want_body:
            shown = (
                f'<h3>{e(t(lang, "fhir_body"))}</h3><pre class="fhir-body">'
                + e(
                    orjson.dumps(msg["body"], option=orjson.OPT_INDENT_2).decode()
                    if msg["body"] is not None
                    else t(lang, "none")
                )
                + "</pre>"
            )
            if msg["raw"] is not None:
                shown += f'<h3>{e(t(lang, "raw_input"))}</h3><pre class="raw">{e(msg["raw"])}</pre>'
        else:
            shown = (
                f'<p class="noprint"><a class="open-body" href="/ui/messages/{e(box)}/'
                f'{rid}?body=1">{e(t(lang, "open_body"))}</a></p>'
            )
        intake = table(
            ["adapter", "source", t(lang, "at")],
            [[e(i["adapter"]), e(i["source_key"]), e(fmt_time(i["at"]))] for i in msg["intake"]],
            t(lang, "none"),
            "intake",
        )
        resend = (
            f'<form method="post" action="/ui/messages/{e(box)}/{rid}/resend" '
            f'class="inline resend"><label>{e(t(lang, "reason_text"))} '
            f'<input name="reason" required size="40"></label>'
            f'<button type="submit">{e(t(lang, "resend"))}</button></form>'
        )
        body = (
            (f'<p class="msg">{e(flash)}</p>' if flash else "")
            + f"<h3>{e(t(lang, 'headers'))}</h3>{heads}"
            + f"<h3>{e(t(lang, 'path'))}</h3>{path}"
            + f"<p>receipt: {'✔' if msg['receipt'] else '—'}</p>"
            + shown
            + f"<h3>{e(t(lang, 'raw_input'))} (adapter)</h3>{intake}"
            + resend
        )
        return web.page(request, t(lang, "messages"), body, role=role)

    @router.post("/messages/{box}/{rid}/resend")
    async def resend(request: Request, box: str, rid: int) -> Response:
        role = web.gate(request, "it")
        if not isinstance(role, str):
            return role
        form = await read_form(request)
        back = f"/ui/messages/{box}/{rid}"
        try:
            result = await run_in_threadpool(
                lambda: mb.resend(
                    ctx,
                    box,
                    rid,
                    reason=form.get("reason", ""),
                    actor=web.actor(request, role),
                    role=role,
                    address=request.client.host if request.client else None,
                    node=web.node,
                )
            )
        except HutongError as exc:
            return web.error_page(request, role, exc, back)
        web.sessions.flash(request, f"{t(web.lang(request), 'resend')}: {result}")
        return RedirectResponse(back, status_code=303)

    return router
