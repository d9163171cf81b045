"""The live part of the IT page (``/ui/it``): one row per peer and per local adapter, two
charts of the last 24 hours, pause/resume buttons; refreshed every 15 s by
``static/dashboard.js`` from ``/ui/it/live`` (the same HTML, without the page frame).

Numbers come from ``bridge.console.snapshot`` (the same as ``/metrics``). Pause/resume posts
are IT-only, carry the session's anti-forgery token and are audited (``paused``/``resumed``).
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response

from bridge.console import Channel, Snapshot, pause_target, snapshot
from bridge.errors import HutongError
from bridge.web import console_labels  # noqa: F401 - registers the labels used here
from bridge.web.charts import grouped_bars
from bridge.web.i18n import t
from bridge.web.layout import _POST_FORM, CST, Web, e, fmt_age, fmt_time, table
from bridge.web.security import CSRF_FIELD

REFRESH_S = 15


def live_html(web: Web, lang: str, snap: Snapshot | None = None) -> str:
    """The dashboard's tables and charts (escaped HTML, forms without the token yet)."""
    snap = snap or snapshot(web.node)

    def state_cell(ch: Channel) -> str:
        if ch.paused:
            return f'<span class="bad paused">⏸ {e(t(lang, "paused"))}</span>'
        return f'<span class="ok running">▶ {e(t(lang, "running"))}</span>'

    def toggle(ch: Channel) -> str:
        if ch.kind == "peer":
            label = t(lang, "resume_sending" if ch.paused else "pause_sending")
        else:
            label = t(lang, "resume" if ch.paused else "pause")
        q = urlencode({"kind": ch.kind, "name": ch.name, "paused": "0" if ch.paused else "1"})
        return (
            f'<form method="post" action="/ui/it/pause?{e(q)}" class="pause">'
            f'<button type="submit" data-name="{e(ch.name)}">{e(label)}</button></form>'
        )

    def pair(d: dict[str, int]) -> str:
        return f"{d['1h']} / {d['24h']}"

    heads = [
        t(lang, "channel"),
        t(lang, "state"),
        t(lang, "series_in") + " 1h/24h",
        t(lang, "series_out") + " 1h/24h",
        t(lang, "queued_now"),
        t(lang, "series_failed") + " 1h/24h",
        t(lang, "series_quarantined") + " 1h/24h",
        t(lang, "oldest_waiting"),
        t(lang, "last_error"),
        "",
    ]
    peers = table(
        heads,
        [
            [
                f'<span data-peer="{e(ch.name)}">{e(web.member_name(lang, ch.name))}</span>',
                state_cell(ch),
                e(pair(ch.received)),
                e(pair(ch.sent)),
                e(ch.queued),
                e(pair(ch.failed)),
                e(pair(ch.quarantined)),
                e(fmt_age(ch.oldest_waiting_s)),
                f"<small>{e(ch.last_error or '')}</small>",
                toggle(ch),
            ]
            for ch in snap.peers
        ],
        t(lang, "none"),
        "live-peers",
        num=(2, 3, 4, 5, 6),
    )
    adapters = table(
        [
            t(lang, "adapter"),
            t(lang, "state"),
            t(lang, "adapter_in") + " 1h/24h",
            t(lang, "adapter_out") + " 1h/24h",
            t(lang, "queued_now"),
            t(lang, "series_failed") + " 1h/24h",
            t(lang, "series_quarantined") + " 1h/24h",
            t(lang, "last_ok"),
            t(lang, "last_error"),
            t(lang, "counters"),
            "",
        ],
        [
            [
                f'<span data-adapter="{e(ch.name)}">{e(ch.name)}</span>',
                state_cell(ch),
                e(pair(ch.received)),
                e(pair(ch.sent)),
                e(ch.queued),
                e(pair(ch.failed)),
                e(pair(ch.quarantined)),
                e(fmt_time(ch.last_ok_at)),
                f"<small>{e(ch.last_error or '')}</small>",
                f"<small>{e(', '.join(f'{k}={v}' for k, v in sorted(ch.counters.items())))}</small>",
                toggle(ch),
            ]
            for ch in snap.adapters
        ],
        t(lang, "no_adapters"),
        "live-adapters",
        num=(2, 3, 4, 5, 6),
    )
    labels = [h.astimezone(CST).strftime("%H") for h in snap.hours]
    rate = grouped_bars(
        t(lang, "chart_rate"),
        labels,
        [
            (t(lang, "series_in"), snap.per_hour["received"]),
            (t(lang, "series_out"), snap.per_hour["sent"]),
        ],
        cls="chart chart-rate",
        height=220,
    )
    errors = grouped_bars(
        t(lang, "chart_errors"),
        labels,
        [
            (t(lang, "series_failed"), snap.per_hour["failed"]),
            (t(lang, "series_quarantined"), snap.per_hour["quarantined"]),
        ],
        cls="chart chart-errors",
        height=220,
    )
    return (
        f'<p class="updated" data-updated="{e(snap.now.isoformat())}"><small>'
        f"{e(fmt_time(snap.now))} (UTC+8) · {e(t(lang, 'auto_refresh'))}</small></p>"
        f"<h4>{e(t(lang, 'peers'))}</h4>{peers}<h4>{e(t(lang, 'adapters'))}</h4>{adapters}"
        f'<div class="charts">{rate}{errors}</div>'
    )


def dashboard_section(web: Web, request: Request, lang: str) -> str:
    """The section as placed at the top of /ui/it (the page frame adds the form tokens)."""
    try:  # ?refresh=N (2..300 s) for a wall screen or a test; default 15 s
        every = min(max(int(request.query_params.get("refresh", REFRESH_S)), 2), 300)
    except ValueError:
        every = REFRESH_S
    return (
        f"<h3>{e(t(lang, 'dashboard'))}</h3>"
        f'<div id="live" data-refresh-s="{every}">{live_html(web, lang)}</div>'
        f'<script src="/ui/static/dashboard.js" defer></script>'
    )


def dashboard_routes(web: Web) -> APIRouter:
    router = APIRouter()
    node = web.node

    @router.get("/it/live")
    def live(request: Request) -> Response:
        role = web.gate(request, "it")
        if not isinstance(role, str):
            return role
        body = live_html(web, web.lang(request))
        token = web.csrf_for(request)
        if token:
            field = f'<input type="hidden" name="{CSRF_FIELD}" value="{e(token)}">'
            body = _POST_FORM.sub(lambda m: m.group(1) + field, body)
        return HTMLResponse(body, headers={"Cache-Control": "no-store"})

    @router.post("/it/pause")
    def pause(request: Request, kind: str, name: str, paused: str = "1") -> Response:
        role = web.gate(request, "it")
        if not isinstance(role, str):
            return role
        lang = web.lang(request)
        try:
            target = pause_target(node, kind, name)
        except HutongError as exc:
            return web.error_page(request, role, exc, "/ui/it")
        on = paused == "1"
        node.pauses.set(target, on, actor=f"role:{role}")
        if not on:  # resumed: work that waited goes now
            if kind == "peer":
                node.wake(f"send:{name}")
            else:
                node.wake("deliver")
        web.sessions.flash(request, f"{t(lang, 'paused_done' if on else 'resumed_done')}: {target}")
        return RedirectResponse("/ui/it", status_code=303)

    return router


def dashboard_script() -> FileResponse:
    return FileResponse(
        Path(__file__).parent / "static" / "dashboard.js",
        media_type="text/javascript; charset=utf-8",
    )
