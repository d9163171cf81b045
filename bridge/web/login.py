"""Login, logout and the home redirect (each role lands on its own page)."""

from __future__ import annotations

import secrets
from collections.abc import Callable

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from bridge.api.auth import role_of
from bridge.errors import Unauthorized
from bridge.web.i18n import t
from bridge.web.layout import HOME, LOGIN_COOKIE, Web, e, read_form
from bridge.web.session import SESSION_COOKIE


def login_routes(web: Web) -> APIRouter:
    router = APIRouter()

    def login_form(request: Request, error: str | None = None, status: int = 200) -> Response:
        lang = web.lang(request)
        nonce = request.cookies.get(LOGIN_COOKIE) or ""
        token = web.login_token(nonce)
        if token is None:
            nonce = secrets.token_urlsafe(24)
            token = web.login_token(nonce)
        msg = f'<p class="bad">{e(error)}</p>' if error else ""
        body = (f'{msg}<form method="post" action="/ui/login" class="inline login">'
                f'<label>{e(t(lang, "token"))} <input type="password" name="token" '
                f'autocomplete="off" size="40" required></label>'
                f'<button type="submit">{e(t(lang, "login"))}</button>'
                f'<p><small>{e(t(lang, "token_help"))}</small></p></form>')
        resp = web.page(request, t(lang, "login"), body, status=status, csrf=token)
        resp.set_cookie(LOGIN_COOKIE, nonce, httponly=True, samesite="strict",
                        path="/ui/login")
        return resp

    @router.get("/login")
    def login_get(request: Request) -> Response:
        return login_form(request)

    @router.post("/login")
    async def login_post(request: Request) -> Response:
        token = (await read_form(request)).get("token", "").strip()
        try:
            role = role_of(request.app.state.tokens, f"Bearer {token}")
        except Unauthorized:
            return login_form(request, t(web.lang(request), "bad_token"), 401)
        resp = RedirectResponse(HOME[role], status_code=303)
        resp.set_cookie(SESSION_COOKIE, web.sessions.create(role), httponly=True,
                        samesite="strict", path="/ui")
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
        web.sessions.drop(request)
        resp = RedirectResponse("/ui/login", status_code=303)
        resp.delete_cookie(SESSION_COOKIE, path="/ui")
        return resp

    return router


def home_route(web: Web) -> Callable[[Request], Response]:
    """/ui and /ui/: each role lands on its own page (registered on the prefixed router)."""

    def home(request: Request) -> Response:
        role = web.sessions.role(request)
        return RedirectResponse(HOME[role] if role else "/ui/login", status_code=303)

    return home
