"""The page frame shared by every audience: escaping, tables, the header, role gates.

Plain HTML built with ``html.escape`` (no template engine, no JavaScript). :class:`Web` holds
what every page needs (the node, the session table, the language) so each audience module is
a set of routes over one ``Web``.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import re
import secrets
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlencode

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from bridge.errors import CsrfRefused, HutongError
from bridge.timeinput import parse_when, show, zone
from bridge.web.i18n import LANG_COOKIE, pick_lang, t
from bridge.web.security import CSRF_FIELD, SAFE_METHODS, same_token
from bridge.web.session import Session, Sessions

if TYPE_CHECKING:
    from bridge.node import Node

#: the alliance's wall clock (China Standard Time, no daylight saving)
CST = timezone(timedelta(hours=8), "CST")
#: the login form's anti-forgery nonce (before there is a session)
LOGIN_COOKIE = "hutong_login"
_POST_FORM = re.compile(r'(<form method="post"[^>]*>)')
HOME = {
    "clinician": "/ui/referrals",
    "auditor": "/ui/audit",
    "it": "/ui/it",
    "admin": "/ui/accounts",
}
#: nav links per role: (label key, path); statistics are aggregates, open to every role
NAV = {
    "clinician": (
        ("referrals", "/ui/referrals"),
        ("consultations", "/ui/consultations"),
        ("stats", "/ui/stats"),
    ),
    "auditor": (("audit", "/ui/audit"), ("stats", "/ui/stats")),
    "it": (("it", "/ui/it"), ("messages", "/ui/messages"), ("stats", "/ui/stats")),
    "admin": (("accounts", "/ui/accounts"),),
}
#: the display zone of this process's pages (``[web] display_zone``, set by ``Web``)
DISPLAY: dict[str, Any] = {"zone": CST}

CSS = """
body{font-family:"Noto Sans CJK SC","PingFang SC","Microsoft YaHei","WenQuanYi Micro Hei",
 sans-serif;margin:0;
 color:#222;background:#f6f7f9}
header{background:#1d4e89;color:#fff;padding:.5em 1em;display:flex;gap:1em;align-items:center}
header a{color:#fff}header .sp{flex:1}
header form{display:inline;margin:0}header form button{background:none;border:none;color:#fff;
 text-decoration:underline;cursor:pointer;font:inherit;padding:0}
main{padding:1em;max-width:1200px}
table{border-collapse:collapse;background:#fff;margin:.5em 0 1.5em;width:100%}
th,td{border:1px solid #ccd;padding:.3em .5em;text-align:left;vertical-align:top;font-size:.92em}
th{background:#e8edf4}
td.num,th.num{text-align:right}
.flag-H,.flag-HH,.flag-A,.flag-AA{color:#b00;font-weight:bold}
.flag-L,.flag-LL{color:#0050b0;font-weight:bold}
.green{color:#087a2c;font-weight:bold}.ok{color:#087a2c;font-weight:bold}
.bad{color:#b00;font-weight:bold}.msg{background:#fff8d6;padding:.5em;border:1px solid #e0c860}
.alert{background:#fde8e8;border:1px solid #d88;padding:.4em .6em;margin:.3em 0}
form.inline{display:inline-block;margin:.3em 1em .3em 0;padding:.5em;background:#fff;
 border:1px solid #ccd}
label{display:inline-block;margin-right:.6em}
.slip{background:#fff;padding:2em;max-width:800px;border:1px solid #999}
.slip h1{text-align:center;letter-spacing:.3em}
.chart{background:#fff;border:1px solid #ccd;margin:.5em 0 1.5em}
.beside{display:grid;grid-template-columns:minmax(0,1fr) minmax(0,1fr);gap:1em}
.beside>div,.report-box{background:#fff;border:1px solid #ccd;padding:.5em 1em;margin:.5em 0}
form.step textarea{max-width:100%;box-sizing:border-box}
.letterhead{text-align:center;border-bottom:2px solid #1d4e89;padding-bottom:.4em}
.letterhead .org{font-size:1.5em;font-weight:bold;letter-spacing:.2em}
.letterhead .org-en{font-size:.85em;color:#444}
.draft-mark{color:#b36b00;font-weight:bold;text-align:center}
.signatures p{margin:1.6em 0 .4em}
@page{size:A4;margin:15mm}
@media print{header,.noprint{display:none}body{background:#fff}main{padding:0}main>h2{display:none}
 .slip{border:none;padding:0;max-width:none}table{page-break-inside:avoid}}
"""


def e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def fmt_time(value: Any) -> str:
    """An instant in the node's display zone, with its offset (bridge.timeinput)."""
    if isinstance(value, str) and len(value) >= 19 and value[4] == "-" and value[10] == "T":
        text: str = value
        try:
            value = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            return text
    if isinstance(value, datetime):
        return show(aware(value), DISPLAY["zone"])
    return "" if value is None else str(value)


def fmt_age(seconds: float | None) -> str:
    """A duration for people: 42 s, 5 min, 3.2 h, 2.1 d."""
    if seconds is None:
        return ""
    s = float(seconds)
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    if s < 172800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def parse_time(value: str | None) -> datetime | None:
    """A form's time, by the one rule of bridge.timeinput (offset, date alone, relative;
    the display zone when none is given); ValueError if not understood."""
    return parse_when(value, DISPLAY["zone"])


def table(
    headers: Iterable[str],
    rows: Iterable[Iterable[str]],
    empty: str,
    cls: str = "",
    num: Iterable[int] = (),
) -> str:
    """Rows are already-escaped HTML cells; ``num`` are column indexes aligned right."""
    right = set(num)
    heads = list(headers)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{c}</td>' if i in right else f"<td>{c}</td>" for i, c in enumerate(r)
        )
        + "</tr>"
        for r in rows
    )
    head = "".join(
        f'<th class="num">{e(h)}</th>' if i in right else f"<th>{e(h)}</th>"
        for i, h in enumerate(heads)
    )
    if not body:
        body = f'<tr><td colspan="{len(heads) or 1}">{e(empty)}</td></tr>'
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


async def read_form(request: Request) -> dict[str, str]:
    """The urlencoded body (no multipart dependency needed for these small forms)."""
    raw = (await request.body()).decode("utf-8", "replace")
    return {k: v[0] for k, v in parse_qs(raw, keep_blank_values=True).items()}


class Web:
    """What every page needs: the node, its plan, the sessions and the page frame."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.ctx = node.ctx
        self.plan = node.ctx.plan
        web = getattr(self.plan, "web", None)
        self.sessions = Sessions(web.session_idle_s, web.session_max_s) if web else Sessions()
        self._login_key = secrets.token_bytes(32)  # per process, like the sessions
        if web is not None:
            DISPLAY["zone"] = zone(web.display_zone)
        from bridge.accounts.service import Accounts

        self.accounts = Accounts(node.ctx)

    def login_token(self, nonce: str | None) -> str | None:
        """The login form's token: bound to the browser's login nonce cookie by an HMAC under a
        key only this process has (a page elsewhere can neither read nor make one)."""
        if not nonce or len(nonce) > 64:
            return None
        return hmac.new(self._login_key, nonce.encode(), hashlib.sha256).hexdigest()

    def csrf_for(self, request: Request) -> str | None:
        s = self.sessions.get(request)
        return s.csrf if s else None

    async def csrf_guard(self, request: Request) -> None:
        """Router dependency: a form post under /ui must carry the token of the session it was
        shown in (the login form: of the browser's login nonce). Without a live session the
        route's gate sends the user to the login page (nothing changes)."""
        if request.method in SAFE_METHODS:
            return
        given = (await read_form(request)).get(CSRF_FIELD, "")
        if request.url.path == "/ui/login":
            expected = self.login_token(request.cookies.get(LOGIN_COOKIE))
        else:
            if self.sessions.get(request) is None:
                return
            expected = self.csrf_for(request)
        if not same_token(given, expected):
            raise CsrfRefused(
                "the form's anti-forgery token is missing or wrong; reload the "
                "page and submit again"
            )

    def lang(self, request: Request) -> str:
        return pick_lang(request.query_params.get("lang"), request.cookies.get(LANG_COOKIE))

    def member_name(self, lang: str, member_id: str | None) -> str:
        m = self.plan.directory.get(member_id or "")
        if m is None:
            return member_id or ""
        return f"{m.names.en if lang == 'en' else m.names.zh} ({member_id})"

    def page(
        self,
        request: Request,
        title: str,
        body: str,
        *,
        role: str | None = None,
        status: int = 200,
        csrf: str | None = None,
    ) -> HTMLResponse:
        lang = self.lang(request)
        token = csrf or self.csrf_for(request)
        if request.url.path == "/ui/it" and status < 400 and self.plan.web.shared_role_tokens:
            # flagged on the IT page until every person and system has their own account
            body = (
                f'<p class="alert shared-tokens"><a href="/ui/accounts">'
                f"{e(t(lang, 'shared_tokens_on'))}</a></p>" + body
            )
        meta = field = ""
        if token:  # every post form carries it; scripts and test clients find it in the head
            meta = f'<meta name="csrf-token" content="{e(token)}">'
            field = f'<input type="hidden" name="{CSRF_FIELD}" value="{e(token)}">'
            body = _POST_FORM.sub(lambda m: m.group(1) + field, body)
        other = "en" if lang == "zh" else "zh"
        keep = {k: v for k, v in request.query_params.items() if k != "lang"}
        here = request.url.path
        if status >= 400:  # an error page does not write the caller's URL back
            keep, here = {}, "/ui/"
        switch = (
            f'<a class="lang" href="{e(here)}?'
            f'{e(urlencode({**keep, "lang": other}))}">'
            f"{'English' if other == 'en' else '中文'}</a>"
        )
        nav = ""
        if role:
            s = self.sessions.get(request)
            roles = s.who.roles if s else (role,)
            seen_links = {href: key for r in (role, *roles) for key, href in NAV.get(r, ())}
            links = "".join(
                f'<a href="{href}">{e(t(lang, key))}</a>' for href, key in seen_links.items()
            )
            person = (
                f'<span class="who">{e(s.who.name)}</span>' if s and s.who.kind == "user" else ""
            )
            links += (
                '<a href="/ui/password">' + e(t(lang, "password")) + "</a>"
                if s and s.who.kind == "user"
                else ""
            )
            # logging out changes state: a form post (with the token), not a link
            nav = (
                f"{person}<span>{e(t(lang, 'role'))}: {e(t(lang, 'role_' + role))}</span>{links}"
                f'<form method="post" action="/ui/logout" class="logout">{field}'
                f'<button type="submit">{e(t(lang, "logout"))}</button></form>'
            )
        doc = (
            f'<!DOCTYPE html><html lang="{"en" if lang == "en" else "zh-CN"}"><head>'
            f'<meta charset="utf-8"><meta name="viewport" content="width=device-width">{meta}'
            f"<title>{e(title)} · {e(t(lang, 'app'))}</title>"
            f"<style>{CSS}</style></head><body><header><strong>{e(t(lang, 'app'))}</strong>"
            f"<span>{e(self.member_name(lang, self.plan.node_id))}</span>"
            f'<span class="sp"></span>{nav}{switch}</header>'
            f"<main><h2>{e(title)}</h2>{body}</main></body></html>"
        )
        resp = HTMLResponse(doc, status_code=status)
        if request.query_params.get("lang") in ("zh", "en"):
            resp.set_cookie(LANG_COOKIE, lang, max_age=365 * 86400, samesite="lax", path="/ui")
        return resp

    def actor(self, request: Request, role: str) -> str:
        """The audit actor of this session: ``user:<name>`` (or ``role:<role>``)."""
        s = self.sessions.get(request)
        return s.who.actor if s else f"role:{role}"

    def session(self, request: Request) -> Session | None:
        return self.sessions.get(request)

    def audit_read(
        self,
        request: Request,
        role: str,
        seen: list[tuple[str, str | None]],
        shown: str,
        *,
        interaction: str = "read",
    ) -> None:
        """One ``read`` AuditEvent per patient this page shows (one without a patient when it
        shows none), naming the person, role, address and what was shown; written before the
        page is sent, so an unaudited look cannot happen."""
        from bridge.api.fhir_audit import read_entries

        s = self.sessions.get(request)
        actor = s.who.actor if s else f"role:{role}"
        address = request.client.host if request.client else None
        with self.ctx.store.write() as conn:
            self.ctx.audit.append(
                conn,
                read_entries(
                    role,
                    shown,
                    seen,
                    self.ctx.now(),
                    actor=actor,
                    actor_role=role,
                    address=address,
                    interaction=interaction,
                    message="page read",
                ),
            )

    def gate(self, request: Request, *allowed: str) -> str | Response:
        """The role the session acts in here, or the response to send instead (login redirect
        or 403). A person with several roles acts in the first one the page allows."""
        s = self.sessions.get(request)
        if s is None:
            return RedirectResponse("/ui/login", status_code=303)
        role = s.who.acting(allowed) or s.role
        if role not in allowed:
            lang = self.lang(request)
            return self.page(
                request,
                t(lang, "forbidden"),
                f'<p class="bad">{e(t(lang, "forbidden_text"))}</p>'
                f'<p><a href="{HOME[role]}">{e(t(lang, "back"))}</a></p>',
                role=role,
                status=403,
            )
        return role

    def error_page(self, request: Request, role: str, exc: HutongError, back: str) -> HTMLResponse:
        lang = self.lang(request)
        return self.page(
            request,
            t(lang, "error"),
            f'<p class="bad">{e(exc.code)}: {e(exc.message)}</p>'
            f'<p><a href="{e(back)}">{e(t(lang, "back"))}</a></p>',
            role=role,
            status=exc.http_status,
        )

    def not_found(self, request: Request, role: str, what: str) -> HTMLResponse:
        """404 page; ``what`` (caller input: a thread id from the URL) is not shown back."""
        lang = self.lang(request)
        return self.page(
            request,
            t(lang, "not_found"),
            f"<p>{e(t(lang, 'not_found'))}</p>",
            role=role,
            status=404,
        )
