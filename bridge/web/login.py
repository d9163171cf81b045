"""Login, logout, one's own password, and the home redirect (each role lands on its page).

People log in with their own account (``bridge.accounts``: argon2 password, lockout, optional
TOTP, optional directory bind). For one release the shared role token of the site config still
logs in (``[web] shared_role_tokens``); the accounts page flags it while it is on. Logins,
failed logins, logouts and password changes are audited with the source address.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse, Response

from bridge.accounts.service import Principal, shared
from bridge.api.auth import role_of
from bridge.audit.events import AuditEntry
from bridge.errors import HutongError, Unauthorized
from bridge.web.i18n import t
from bridge.web.layout import HOME, LOGIN_COOKIE, Web, e, read_form
from bridge.web.session import SESSION_COOKIE


def login_routes(web: Web) -> APIRouter:
    router = APIRouter()

    def address(request: Request) -> str | None:
        return request.client.host if request.client else None

    def login_form(request: Request, error: str | None = None, status: int = 200) -> Response:
        lang = web.lang(request)
        nonce = request.cookies.get(LOGIN_COOKIE) or ""
        token = web.login_token(nonce)
        if token is None:
            nonce = secrets.token_urlsafe(24)
            token = web.login_token(nonce)
        msg = f'<p class="bad">{e(error)}</p>' if error else ""
        body = (
            f'{msg}<form method="post" action="/ui/login" class="inline login-personal">'
            f'<label>{e(t(lang, "user_name"))} <input name="name" autocomplete="username" '
            f'size="20"></label>'
            f'<label>{e(t(lang, "password"))} <input type="password" name="password" '
            f'autocomplete="current-password" size="20"></label>'
            f'<label>{e(t(lang, "totp"))} <input name="totp" size="8" '
            f'autocomplete="one-time-code" inputmode="numeric"></label>'
            f'<button type="submit">{e(t(lang, "login"))}</button></form>'
        )
        if web.plan.web.shared_role_tokens:
            body += (
                f'<form method="post" action="/ui/login" class="inline login">'
                f'<label>{e(t(lang, "token"))} <input type="password" name="token" '
                f'autocomplete="off" size="40" required></label>'
                f'<button type="submit">{e(t(lang, "login"))}</button>'
                f"<p><small>{e(t(lang, 'token_help'))}</small></p></form>"
            )
        resp = web.page(request, t(lang, "login"), body, status=status, csrf=token)
        resp.set_cookie(LOGIN_COOKIE, nonce, httponly=True, samesite="strict", path="/ui/login")
        return resp

    def shared_login(request: Request, token: str) -> Principal:
        """The old shared role token (while allowed): audited as ``role:<role>``."""
        ctx = web.ctx
        try:
            role = role_of(request.app.state.tokens, f"Bearer {token}")
        except Unauthorized:
            with ctx.store.write() as conn:
                ctx.audit.append(
                    conn,
                    [
                        AuditEntry(
                            action="login-failed",
                            outcome="4",
                            actor="user:?",
                            address=address(request),
                            message="unknown token",
                            at=ctx.now(),
                        )
                    ],
                )
            raise
        with ctx.store.write() as conn:
            ctx.audit.append(
                conn,
                [
                    AuditEntry(
                        action="login",
                        actor=f"role:{role}",
                        actor_role=role,
                        address=address(request),
                        message="logged in with the shared role token",
                        at=ctx.now(),
                    )
                ],
            )
        return shared(role)

    @router.get("/login")
    def login_get(request: Request) -> Response:
        return login_form(request)

    @router.post("/login")
    async def login_post(request: Request) -> Response:
        form = await read_form(request)
        lang = web.lang(request)
        name = form.get("name", "").strip()
        try:
            if name:
                bad = "bad_login"
                principal = await run_in_threadpool(
                    web.accounts.login,
                    name,
                    form.get("password", ""),
                    form.get("totp"),
                    address(request),
                )
            else:
                bad = "bad_token"
                principal = await run_in_threadpool(
                    shared_login, request, form.get("token", "").strip()
                )
        except Unauthorized:
            return login_form(request, t(lang, bad), 401)
        role = principal.roles[0]
        resp = RedirectResponse(HOME[role], status_code=303)
        resp.set_cookie(
            SESSION_COOKIE,
            web.sessions.create(role, principal),
            httponly=True,
            samesite="strict",
            path="/ui",
        )
        return resp

    @router.get("/logout")
    def logout_page(request: Request) -> Response:
        """A bookmark or an old link: the page with the logout button (a GET changes nothing,
        so a page elsewhere cannot log anyone out)."""
        role = web.sessions.role(request)
        if role is None:
            return RedirectResponse("/ui/login", status_code=303)
        lang = web.lang(request)
        return web.page(request, t(lang, "logout"), "", role=role)

    @router.post("/logout")
    def logout(request: Request) -> Response:
        s = web.sessions.drop(request)
        if s is not None:
            web.accounts.logout(s.who, address(request))
        resp = RedirectResponse("/ui/login", status_code=303)
        resp.delete_cookie(SESSION_COOKIE, path="/ui")
        return resp

    @router.get("/password")
    def password_page(request: Request) -> Response:
        s = web.sessions.get(request)
        if s is None or s.who.kind != "user":
            return RedirectResponse("/ui/login", status_code=303)
        lang = web.lang(request)
        flash = web.sessions.pop_flash(request)
        body = (
            (f'<p class="msg">{e(flash)}</p>' if flash else "")
            + f'<form method="post" action="/ui/password" class="inline password">'
            f'<label>{e(t(lang, "password_old"))} <input type="password" name="old" '
            f'autocomplete="current-password" required></label>'
            f'<label>{e(t(lang, "password_new"))} <input type="password" name="new" '
            f'autocomplete="new-password" minlength="10" required></label>'
            f'<button type="submit">{e(t(lang, "save"))}</button></form>'
        )
        return web.page(request, t(lang, "password"), body, role=s.role)

    @router.post("/password")
    async def password_change(request: Request) -> Response:
        s = web.sessions.get(request)
        if s is None or s.who.kind != "user":
            return RedirectResponse("/ui/login", status_code=303)
        form = await read_form(request)
        lang = web.lang(request)
        try:
            await run_in_threadpool(
                web.accounts.change_own_password,
                s.who.name,
                form.get("old", ""),
                form.get("new", ""),
            )
            web.sessions.flash(request, t(lang, "password_changed"))
        except HutongError as exc:
            web.sessions.flash(request, f"{exc.code}: {exc.message}")
        except ValueError as exc:  # the rule (length), never the typed value
            web.sessions.flash(request, str(exc))
        return RedirectResponse("/ui/password", status_code=303)

    return router


def home_route(web: Web) -> Callable[[Request], Response]:
    """/ui and /ui/: each role lands on its own page (registered on the prefixed router)."""

    def home(request: Request) -> Response:
        role = web.sessions.role(request)
        return RedirectResponse(HOME[role] if role else "/ui/login", status_code=303)

    return home
