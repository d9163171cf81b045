"""The local port reads no request body before it knows who sends it, and none over the limit.

A pure ASGI wrapper around the local app, run before any route (FastAPI reads and parses a
body before a route's token dependency runs, so the check cannot live in the routes):

* a request with a body (declared or chunked) must carry a valid bearer token of any role
  (shared, personal or a system client's: ``known``), else it is answered 401 ``HT-AUTH``
  unread; the routes still check the role. Browser forms
  under ``/ui`` (login, and pages behind the session cookie) may come without a token, but
  their body is then limited to ``UI_FORM_MAX`` bytes;
* a declared length over ``[limits] local_max_body_bytes`` is answered 413 unread, and a
  body that grows past it while read (chunked, or longer than declared) is cut off with 413;
* the port's requests and bytes in flight are bounded (``Admission``): 503 ``HT-BUSY``.

Errors under ``/fhir`` are OperationOutcomes, elsewhere the usual ``{code, message, retry}``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from starlette.concurrency import run_in_threadpool

from bridge.errors import Busy, HutongError, PacketTooLarge, Unauthorized
from bridge.gateway.guard import Admission

#: largest body of a browser form sent without a bearer token (login, pages on a session)
UI_FORM_MAX = 256 * 1024


class _TooLarge(Exception):
    pass


class LocalBodyGuard:
    def __init__(
        self, app: Any, *, known: Callable[[str], bool], max_body: int, admission: Admission
    ) -> None:
        self.app = app
        self.known = known
        self.max_body = max_body
        self.admission = admission

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", ())}
        length = headers.get(b"content-length")
        chunked = b"chunked" in headers.get(b"transfer-encoding", b"").lower()
        declared = int(length) if length and length.isdigit() else None
        has_body = chunked or bool(declared)
        limit = self.max_body
        path: str = scope.get("path", "")
        if has_body:
            header = (headers.get(b"authorization") or b"").decode("latin-1")
            if not await run_in_threadpool(self.known, header):  # a hashed lookup, no body read
                if not path.startswith("/ui/"):
                    await _answer(
                        send,
                        path,
                        Unauthorized("unknown token" if header else "a bearer token is required"),
                    )
                    return
                limit = min(limit, UI_FORM_MAX)
        if declared is not None and declared > limit:
            await _answer(
                send,
                path,
                PacketTooLarge(f"request body of {declared} bytes is over the limit of {limit}"),
            )
            return
        async with self.admission.admit(declared or (limit if chunked else 0)) as admitted:
            if not admitted:
                await _answer(
                    send,
                    path,
                    Busy("the port is at its bound of requests in flight; try again later"),
                    {"retry-after": "1"},
                )
                return
            await self._run(scope, receive, send, path, limit)

    async def _run(
        self, scope: dict[str, Any], receive: Any, send: Any, path: str, limit: int
    ) -> None:
        seen = 0
        started = over = False

        async def counted() -> Any:
            nonlocal seen, over
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    over = True
                    raise _TooLarge
            return message

        async def tracked(message: Any) -> None:
            nonlocal started
            if over and not started:
                return  # the app's answer to the cut-off read; ours goes instead
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except Exception:
            if not over:
                raise
        if over and not started:
            await _answer(
                send, path, PacketTooLarge(f"request body is over the limit of {limit} bytes")
            )


async def _answer(
    send: Any, path: str, exc: HutongError, extra: dict[str, str] | None = None
) -> None:
    """The error answer, and the connection closed (an unread body is never read)."""
    if path == "/fhir" or path.startswith("/fhir/"):
        from bridge.api.outcome import operation_outcome

        body, media = orjson.dumps(operation_outcome(exc)), b"application/fhir+json"
    else:
        body, media = orjson.dumps(exc.as_dict()), b"application/json"
    headers = [
        (b"content-type", media),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    if isinstance(exc, Unauthorized):
        headers.append((b"www-authenticate", b'Bearer realm="hutong"'))
    headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": exc.http_status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
