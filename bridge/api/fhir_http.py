"""HTTP manners of the /fhir API that every route shares: formats, HEAD, trailing slashes,
versions in headers, conditional reads and writes, ``Prefer``.

``FhirHttp`` is a pure ASGI wrapper (inside the body guard, so the token is checked first) that,
for paths under ``/fhir`` only:

* answers 406 when ``Accept`` (or ``_format``) asks only for what is not served: the API speaks
  FHIR R4 JSON (``application/fhir+json``, ``application/json``; ``fhirVersion=4.0``);
* answers 415 when a body comes as anything but JSON (an XML body is not read);
* serves ``HEAD`` as the ``GET`` of the same URL without the body (every GET route);
* reads ``/fhir/Task/`` as ``/fhir/Task`` (a trailing slash, as many clients write it).

The helpers below turn a stored row into ``ETag``/``Last-Modified``, decide a 304 from
``If-None-Match``/``If-Modified-Since``, read ``If-Match``, and answer a write as ``Prefer:
return=`` asks.
"""

from __future__ import annotations

from datetime import datetime
from email.utils import format_datetime, parsedate_to_datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from bridge.api.outcome import (
    BadRequest,
    NotAcceptable,
    UnsupportedMediaType,
    fhir_json,
    outcome_response,
)

#: media types the API reads and writes (the FHIR R4 JSON names, old and new, and plain JSON)
JSON_TYPES = frozenset(
    {"application/fhir+json", "application/json", "application/json+fhir", "text/json"}
)
#: ``_format`` values meaning JSON (R4 http.html#mime-type: json, or a JSON MIME type)
JSON_FORMATS = JSON_TYPES | {"json"}
#: besides JSON, a POST may send a form (``POST [type]/_search``)
FORM = "application/x-www-form-urlencoded"


def _media(value: str) -> tuple[str, dict[str, str]]:
    kind, _, rest = value.partition(";")
    params = {}
    for p in rest.split(";"):
        k, _, v = p.partition("=")
        if k.strip():
            params[k.strip().lower()] = v.strip().strip('"')
    return kind.strip().lower(), params


def _r4(params: dict[str, str]) -> bool:
    version = params.get("fhirversion")
    return version is None or version in ("4.0", "4.0.1")


def acceptable(accept: str) -> bool:
    """Whether an ``Accept`` header admits FHIR R4 JSON (absent or empty: yes)."""
    if not accept.strip():
        return True
    for item in accept.split(","):
        kind, params = _media(item)
        if params.get("q") in ("0", "0.0", "0.00", "0.000"):
            continue
        if kind in ("*/*", "application/*") or (kind in JSON_TYPES and _r4(params)):
            return True
    return False


def format_ok(value: str) -> bool:
    """Whether a ``_format`` value means JSON (a ``+`` sent unescaped arrives as a space)."""
    kind, params = _media(value.replace(" ", "+"))
    return kind in JSON_FORMATS and _r4(params)


class FhirHttp:
    """See the module docstring; everything outside /fhir passes through untouched."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path: str = scope.get("path", "")
        if scope["type"] != "http" or not (path == "/fhir" or path.startswith("/fhir/")):
            await self.app(scope, receive, send)
            return
        problem = self._problem(scope)
        if problem is not None:
            await outcome_response(problem)(scope, receive, send)
            return
        if len(path) > len("/fhir/") and path.endswith("/"):
            scope = {**scope, "path": path.rstrip("/")}
            if scope.get("raw_path"):
                scope["raw_path"] = scope["raw_path"].rstrip(b"/")
        if scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def no_body(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body":
                if message.get("more_body"):
                    return
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, no_body)

    @staticmethod
    def _problem(scope: dict[str, Any]) -> BadRequest | None:
        headers = {k.lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        if not acceptable(headers.get(b"accept", "")):
            return NotAcceptable(
                "this API serves FHIR R4 JSON only (application/fhir+json; "
                "fhirVersion=4.0): the Accept header admits none of it"
            )
        query = scope.get("query_string", b"").decode("latin-1")
        if "_format=" in query:
            from urllib.parse import parse_qsl

            for k, v in parse_qsl(query, keep_blank_values=True):
                if k == "_format" and not format_ok(v):
                    return NotAcceptable(
                        "_format: this API serves FHIR R4 JSON only (json, application/fhir+json)"
                    )
        ctype = headers.get(b"content-type")
        if ctype and scope["method"] in ("POST", "PUT", "PATCH"):
            kind, params = _media(ctype)
            if not ((kind in JSON_TYPES and _r4(params)) or kind == FORM):
                return UnsupportedMediaType(
                    "the body must be FHIR R4 JSON (Content-Type: application/fhir+json)"
                )
        return None


# ---------------------------------------------------------------------------------------------
# versions in headers


def etag(version: Any) -> str:
    return f'W/"{version}"'


def http_date(at: datetime) -> str:
    return format_datetime(at, usegmt=True)


def version_headers(version: Any, at: datetime | None) -> dict[str, str]:
    headers = {"ETag": etag(version)}
    if at is not None:
        headers["Last-Modified"] = http_date(at)
    return headers


def _tags(value: str) -> list[str]:
    out = []
    for t in value.split(","):
        t = t.strip()
        if t.startswith("W/"):
            t = t[2:]
        out.append(t.strip('"'))
    return out


def not_modified(request: Request, version: Any, at: datetime) -> bool:
    """``If-None-Match`` (takes precedence, RFC 9110) or ``If-Modified-Since`` says the client's
    copy is current: answer 304."""
    inm = request.headers.get("if-none-match")
    if inm is not None:
        tags = _tags(inm)
        return "*" in tags or str(version) in tags
    ims = request.headers.get("if-modified-since")
    if ims:
        try:
            since = parsedate_to_datetime(ims)
        except (TypeError, ValueError):
            return False
        if since.tzinfo is None:
            return False
        return at.replace(microsecond=0) <= since
    return False


def not_modified_response(version: Any, at: datetime) -> Response:
    return Response(status_code=304, headers=version_headers(version, at))


def if_match(value: str | None) -> int | None:
    """The version an ``If-Match`` header or ``ifMatch`` element names (``W/"3"``, ``"3"``)."""
    if value is None or not value.strip():
        return None
    tags = _tags(value)
    if len(tags) != 1 or not tags[0].isdigit():
        raise BadRequest('If-Match must name one version, as W/"<versionId>"')
    return int(tags[0])


# ---------------------------------------------------------------------------------------------
# Prefer: return=


def prefer_return(request: Request) -> str:
    """``representation`` (the default), ``minimal`` or ``OperationOutcome``."""
    for part in request.headers.get("prefer", "").split(","):
        for item in part.split(";"):
            k, _, v = item.strip().partition("=")
            if k.strip() == "return" and v.strip().strip('"') in (
                "minimal",
                "OperationOutcome",
                "representation",
            ):
                return v.strip().strip('"')
    return "representation"


def written(
    request: Request,
    resource: dict[str, Any],
    base: str,
    status: int,
    at: datetime | None,
    what: str,
) -> Response:
    """The answer to a write: headers with the new version (ETag, Last-Modified, Location) and
    the body ``Prefer: return=`` asks for."""
    meta = resource.get("meta") or {}
    version = meta.get("versionId")
    headers = version_headers(version, at) if version else {}
    if version:
        headers["Location"] = (
            f"{base}/{resource['resourceType']}/{resource['id']}/_history/{version}"
        )
    kind = prefer_return(request)
    if kind == "minimal":
        return Response(status_code=status, headers=headers)
    if kind == "OperationOutcome":
        return fhir_json(
            {
                "resourceType": "OperationOutcome",
                "issue": [
                    {"severity": "information", "code": "informational", "diagnostics": what}
                ],
            },
            status,
            headers,
        )
    return fhir_json(resource, status, headers)
