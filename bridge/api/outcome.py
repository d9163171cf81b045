"""FHIR responses for the /fhir API: ``application/fhir+json`` bodies and OperationOutcome errors.

Every failure under /fhir answers with an OperationOutcome: severity ``error``, an issue code
from the HutongError class, the Hutong error code as ``details.coding`` (system
``ERROR_SYSTEM``) and the message in ``diagnostics``. ``FhirRoute`` is the one place that turns
exceptions into those answers, so no error from a /fhir route reaches the app's JSON handler.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any, Literal

import orjson
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response

from bridge.errors import (
    ChangeNotApplied,
    Forbidden,
    HutongError,
    IllegalTransition,
    InvalidFhir,
    InvalidResource,
    MissingConsent,
    NotFound,
    Retry,
    Unauthorized,
    UnknownReference,
    VersionConflict,
    WorkflowError,
)

log = logging.getLogger("hutong.fhir")

FHIR_JSON = "application/fhir+json"
ERROR_SYSTEM = "http://hutong.dev/CodeSystem/error"


class BadRequest(HutongError):
    """A /fhir request the API does not understand: unknown search parameter, bad value, ...

    (Belongs in ``bridge.errors`` next to the other codes; kept here until it moves.)
    """

    code = "HT-FHIR-REQUEST"
    http_status = 400

    def __init__(self, message: str, *, issue: str = "invalid") -> None:
        super().__init__(message)
        self.issue = issue


class NotSupported(BadRequest):
    code = "HT-FHIR-UNSUPPORTED"
    http_status = 405

    def __init__(self, message: str, *, allow: str | None = None) -> None:
        super().__init__(message, issue="not-supported")
        self.allow = allow  # the ``Allow`` header of the 405: what the path does answer


class NotAcceptable(BadRequest):
    """``Accept`` / ``_format`` asks only for what is not served (XML, another FHIR version)."""

    code = "HT-FHIR-FORMAT"
    http_status = 406

    def __init__(self, message: str) -> None:
        super().__init__(message, issue="not-supported")


class UnsupportedMediaType(BadRequest):
    """A body in a format the API does not read (``Content-Type`` XML, text, ...)."""

    code = "HT-FHIR-MEDIA"
    http_status = 415

    def __init__(self, message: str) -> None:
        super().__init__(message, issue="not-supported")


class _Internal(HutongError):
    code = "HT-INTERNAL"
    http_status = 500


#: issue type (http://hl7.org/fhir/issue-type) by error class; the first match in MRO order wins
_ISSUE: dict[type[HutongError], str] = {
    NotFound: "not-found",
    Unauthorized: "login",
    Forbidden: "forbidden",
    IllegalTransition: "business-rule",
    ChangeNotApplied: "business-rule",
    VersionConflict: "conflict",
    MissingConsent: "business-rule",
    UnknownReference: "processing",
    InvalidResource: "invalid",
    InvalidFhir: "invalid",
    WorkflowError: "processing",
}


def issue_type(exc: HutongError) -> str:
    if isinstance(exc, BadRequest):
        return exc.issue
    for cls in type(exc).__mro__:
        if cls in _ISSUE:
            return _ISSUE[cls]
    if exc.retry is not Retry.PERMANENT:
        return "transient"
    return "processing" if exc.http_status >= 500 else "invalid"


def operation_outcome(exc: HutongError) -> dict[str, Any]:
    issue: dict[str, Any] = {
        "severity": "error",
        "code": issue_type(exc),
        "details": {"coding": [{"system": ERROR_SYSTEM, "code": exc.code}], "text": exc.code},
        "diagnostics": exc.message,
    }
    problems = [p for p in (exc.detail or "").splitlines() if p][:50]
    if isinstance(exc, (InvalidFhir, InvalidResource)) and problems:
        issue["expression"] = [p.split(":", 1)[0][:200] for p in problems]
    if isinstance(exc, ChangeNotApplied):
        issue["expression"] = exc.elements[:50]
    return {"resourceType": "OperationOutcome", "issue": [issue]}


class FhirResponse(JSONResponse):
    """A FHIR JSON body (a JSONResponse, so OpenAPI documents it as JSON of media type
    ``application/fhir+json``)."""

    media_type = FHIR_JSON

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def fhir_json(
    body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None
) -> FhirResponse:
    return FhirResponse(
        body, status_code=status, headers=headers, media_type=f"{FHIR_JSON}; charset=utf-8"
    )


def fhir_status(exc: HutongError) -> int:
    """The HTTP status under /fhir: R4 answers a refused state change with 422 (the local API
    keeps 409 for ``IllegalTransition``)."""
    return 422 if isinstance(exc, IllegalTransition) else exc.http_status


def outcome_response(exc: HutongError) -> FhirResponse:
    headers = (
        {"WWW-Authenticate": 'Bearer realm="hutong"'} if isinstance(exc, Unauthorized) else None
    )
    allow = getattr(exc, "allow", None)
    if allow:
        headers = {**(headers or {}), "Allow": allow}
    return fhir_json(operation_outcome(exc), fhir_status(exc), headers)


def as_hutong(exc: Exception) -> HutongError:
    if isinstance(exc, HutongError):
        return exc
    if isinstance(exc, RequestValidationError):
        return BadRequest("request does not match this interaction")
    log.error("unexpected error in the FHIR API", exc_info=exc)
    return _Internal("internal error; see the node log")


class FhirRoute(APIRoute):
    """An APIRoute whose every exception becomes an OperationOutcome response."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def run(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:  # noqa: BLE001 - the API boundary: every error answered
                return outcome_response(as_hutong(exc))

        return run


# ---------------------------------------------------------------------------------------------
# OpenAPI: what each route may answer (checked by tests/test_api_schemathesis.py)

#: why a route answers each error status (the OpenAPI ``description``)
WHY = {
    400: "request not understood: unknown parameter, bad value, body not JSON or wrong type",
    401: "no bearer token, or an unknown one",
    403: "this role may not do this (minimum necessary)",
    404: "no such resource, item, referral or resource type here",
    406: "the Accept header or _format asks only for formats not served (JSON R4 is)",
    409: "the referral's state does not allow this step",
    412: "If-Match (or a transaction entry's ifMatch) names another version than the current",
    415: "the body's Content-Type is not JSON",
    422: "refused: not valid FHIR R4, a malformed request, or the workflow refuses it "
    "(consent, references); the message names the path and the rule, never the value",
    501: "the referral workflow is not available on this node",
}

#: an OperationOutcome as /fhir writes it (``operation_outcome``)
OUTCOME_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["resourceType", "issue"],
    "properties": {
        "resourceType": {"const": "OperationOutcome"},
        "issue": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["severity", "code"],
                "properties": {
                    "severity": {"enum": ["fatal", "error", "warning", "information"]},
                    "code": {"type": "string"},
                    "details": {"type": "object"},
                    "diagnostics": {"type": "string"},
                    "expression": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
}


def resource_schema(rtype: str | None = None) -> dict[str, Any]:
    """A FHIR resource (of one type, if given): the R4 JSON schema is the full definition."""
    return {
        "type": "object",
        "required": ["resourceType"],
        "properties": {"resourceType": {"const": rtype} if rtype else {"type": "string"}},
    }


def fhir_responses(ok: str | None, *errors: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a /fhir route: 200 with a resource (type ``ok``) and OperationOutcomes.

    Every /fhir route can also answer 400 (a request FastAPI cannot bind becomes a BadRequest
    in ``FhirRoute``), 401 and 422 (declared so FastAPI does not document its own 422 model,
    which /fhir never sends)."""
    out: dict[int | str, dict[str, Any]] = {
        200: {
            "description": f"a {ok or 'FHIR resource'}",
            "content": {FHIR_JSON: {"schema": resource_schema(ok)}},
        }
    }
    for status in sorted({400, 401, 406, 422, *errors}):
        out[status] = {
            "description": WHY[status],
            "content": {FHIR_JSON: {"schema": OUTCOME_SCHEMA}},
        }
    return out


def fhir_body(rtype: str) -> dict[str, Any]:
    """``openapi_extra=`` for a /fhir route that reads a resource from the raw body itself."""
    return {
        "requestBody": {
            "required": True,
            "content": {FHIR_JSON: {"schema": resource_schema(rtype)}},
        }
    }


class ErrorOut(BaseModel):
    """An error on the local API outside /fhir (``HutongError.as_dict``)."""

    code: str
    message: str
    retry: Literal["transient", "ambiguous", "permanent"]


class BodyUnreadable(BaseModel):
    """FastAPI's own answer to a body it cannot parse as JSON (400, before any route code)."""

    detail: str


def local_responses(*errors: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a /local/v1 route: each error status as an ``ErrorOut``.

    422 is always there: a request the route cannot bind is answered by
    ``request_invalid_response`` in that shape (not FastAPI's, which quotes the input). 400 is
    only for routes with a JSON body: FastAPI answers a body that does not parse itself."""
    return {
        status: {
            "model": BodyUnreadable if status == 400 else ErrorOut,
            "description": "the body is not JSON" if status == 400 else WHY[status],
        }
        for status in sorted({422, *errors})
    }


class RequestInvalid(HutongError):
    """A /local/v1 request that does not match the route (missing field, wrong type)."""

    code = "HT-REQUEST-INVALID"
    http_status = 422


def request_problems(exc: RequestValidationError) -> str:
    """Where and what, never the value: ``body[0].to: Field required``."""
    problems = []
    for err in exc.errors()[:5]:
        where = ""
        for part in err.get("loc", ()):
            where = (
                f"{where}[{part}]"
                if isinstance(part, int)
                else (f"{where}.{part}" if where else str(part))
            )
        problems.append(f"{where or '(request)'}: {err.get('type', 'invalid')}")
    more = len(exc.errors()) - len(problems)
    return "; ".join(problems) + (f" (and {more} more)" if more > 0 else "")


async def request_invalid_response(_req: Request, exc: Exception) -> JSONResponse:
    """The local app's handler for RequestValidationError: FastAPI's default answer echoes the
    offending input (a whole FHIR Bundle, patient data included) back; this names field and
    rule (pydantic's error type, e.g. ``missing``, ``string_type``) only."""
    assert isinstance(exc, RequestValidationError)
    err = RequestInvalid(f"request does not match this endpoint: {request_problems(exc)}")
    return JSONResponse(err.as_dict(), status_code=err.http_status)
