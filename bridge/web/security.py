"""Browser-facing defences of the node's two apps: response headers, the same-origin check on
state-changing requests, and the anti-forgery token of /ui forms.

Sessions are cookies, and cookies do not separate ports: a page served on another port of the
same host is same-site, so SameSite=Strict still sends the session with its form posts. Two
checks stop such a post: the request's ``Origin`` (or, without one, its ``Referer``) must be this
node's own origin, and the form must carry the session's token (a page on another port cannot
read it: the same-origin policy does separate ports). ``Referrer-Policy: same-origin`` keeps a
full ``Origin`` on our own posts (``no-referrer`` would make browsers send ``Origin: null``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import urlsplit

import orjson

from bridge.errors import CrossOriginRefused, HutongError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
#: the form field (and page meta tag) carrying the anti-forgery token
CSRF_FIELD = "csrf"

COMMON_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
)
#: JSON, FHIR and packet answers: nothing to load, nothing to frame
API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
#: the API docs page: Swagger UI's own files from this node, no inline script, no CDN
DOCS_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'none'"
)


def style_hash(css: str) -> str:
    """The CSP source for one inline <style> element's text."""
    return "'sha256-" + base64.b64encode(hashlib.sha256(css.encode()).digest()).decode() + "'"


def page_csp(css: str) -> str:
    """/ui pages: the one inline stylesheet by its hash, scripts only from this node's files;
    those scripts may fetch from this node only (the IT dashboard's refresh)."""
    return (
        f"default-src 'none'; style-src {style_hash(css)}; script-src 'self'; "
        "img-src 'self' data:; connect-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; "
        "base-uri 'none'"
    )


def _authority(url: str) -> str | None:
    """``host[:port]`` of an absolute http(s) URL, or None."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or "@" in parts.netloc:
        return None
    return parts.netloc.lower()


def origin_problem(scope: Scope, headers: dict[bytes, bytes], *, required: bool) -> str | None:
    """Why a state-changing request does not come from this node's own pages, or None.

    The page's host and port must be the ones the request was sent to (``Host``); the scheme
    is not compared, so a TLS proxy in front of the local port that keeps ``Host`` works.
    ``required``: a cookie-authenticated request (/ui) must show where it comes from; a bearer
    API call from a hospital system sends neither header and is let through unless it names
    another origin."""
    host = headers.get(b"host", b"").decode("latin-1").lower()
    for name in (b"origin", b"referer"):
        value = headers.get(name)
        if value is not None:
            if not host or _authority(value.decode("latin-1")) != host:
                return "the request comes from another origin"
            return None
    return (
        "the request does not say where it comes from (no Origin or Referer)" if required else None
    )


class SecurityHeaders:
    """ASGI middleware: the security headers on every answer, and the origin check.

    ``css``: the page stylesheet (its hash goes into the /ui pages' policy); without it (the
    peer port) every answer gets the API policy."""

    def __init__(self, app: ASGIApp, css: str | None = None) -> None:
        self.app = app
        self.page_csp = page_csp(css).encode() if css is not None else None

    def csp_for(self, path: str) -> bytes:
        if self.page_csp is not None:
            if path == "/ui" or path.startswith("/ui/"):
                return self.page_csp
            if path == "/docs" or path.startswith("/docs/"):
                return DOCS_CSP.encode()
        return API_CSP.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        extra = [*COMMON_HEADERS, (b"content-security-policy", self.csp_for(path))]
        is_page = self.page_csp is not None and (path == "/ui" or path.startswith("/ui/"))
        if is_page:
            extra.append((b"cache-control", b"no-store"))

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = [
                    *message.get("headers", []),
                    *((k, v) for k, v in extra if k not in names),
                ]
            await send(message)

        if scope.get("method", "GET") not in SAFE_METHODS:
            headers = {k.lower(): v for k, v in scope.get("headers", [])}
            problem = origin_problem(scope, headers, required=is_page)
            if problem is not None:
                await refuse(CrossOriginRefused(problem), path, send_with_headers)
                return
        await self.app(scope, receive, send_with_headers)


def refusal_html(exc: HutongError) -> bytes:
    """A plain page for a refused browser request: the code and the rule, no input echoed."""
    return (
        f'<!DOCTYPE html><html lang="zh-CN"><head><meta charset="utf-8"><title>'
        f"{html.escape(exc.code)}</title></head><body><h2>请求被拒绝 / Request refused</h2>"
        f"<p>{html.escape(exc.code)}: {html.escape(exc.message)}</p>"
        f'<p><a href="/ui/login">登录 / Log in</a></p></body></html>'
    ).encode()


async def refuse(exc: HutongError, path: str, send: Send) -> None:
    """Answer ``exc`` before the app runs: HTML under /ui, an OperationOutcome under /fhir,
    the error as JSON elsewhere."""
    if path == "/ui" or path.startswith("/ui/"):
        body, ctype = refusal_html(exc), b"text/html; charset=utf-8"
    elif path == "/fhir" or path.startswith("/fhir/"):
        from bridge.api.outcome import operation_outcome

        body, ctype = orjson.dumps(operation_outcome(exc)), b"application/fhir+json"
    else:
        body, ctype = orjson.dumps(exc.as_dict()), b"application/json"
    await send(
        {
            "type": "http.response.start",
            "status": exc.http_status,
            "headers": [(b"content-type", ctype), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def same_token(given: str, expected: str | None) -> bool:
    """Constant-time comparison of a submitted anti-forgery token."""
    if not expected:
        return False
    return hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode())
