"""FHIR responses for the /fhir API: ``application/fhir+json`` bodies and OperationOutcome errors.

Every failure under /fhir answers with an OperationOutcome: severity ``error``, an issue code
from the HutongError class, the Hutong error code as ``details.coding`` (system
``ERROR_SYSTEM``) and the message in ``diagnostics``. ``FhirRoute`` is the one place that turns
exceptions into those answers, so no error from a /fhir route reaches the app's JSON handler.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

import orjson
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

from bridge.errors import (
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
            return _ISSUE[cls]  # type: ignore[index]
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
    return {"resourceType": "OperationOutcome", "issue": [issue]}


class FhirResponse(Response):
    media_type = FHIR_JSON

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def fhir_json(body: dict[str, Any], status: int = 200,
              headers: dict[str, str] | None = None) -> FhirResponse:
    return FhirResponse(body, status_code=status, headers=headers,
                        media_type=f"{FHIR_JSON}; charset=utf-8")


def outcome_response(exc: HutongError) -> FhirResponse:
    headers = {"WWW-Authenticate": 'Bearer realm="hutong"'} if isinstance(exc, Unauthorized) \
        else None
    return fhir_json(operation_outcome(exc), exc.http_status, headers)


def as_hutong(exc: Exception) -> HutongError:
    if isinstance(exc, HutongError):
        return exc
    if isinstance(exc, RequestValidationError):
        return BadRequest("request does not match this interaction")
    log.exception("unexpected error in the FHIR API", exc_info=exc)
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
