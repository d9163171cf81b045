"""Bearer tokens per role, from the site config; compared in constant time."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, Request

from bridge.errors import Forbidden, Unauthorized

ROLES = ("clinician", "it", "auditor")


def role_of(tokens: dict[str, str], header: str | None) -> str:
    if not header or not header.lower().startswith("bearer "):
        raise Unauthorized("a bearer token is required")
    given = header[7:].strip().encode()
    for role, secret in tokens.items():
        if hmac.compare_digest(given, secret.encode()):
            return role
    raise Unauthorized("unknown token")


def require(*allowed: str) -> Callable[[Request], str]:
    def dep(request: Request) -> str:
        role = role_of(request.app.state.tokens, request.headers.get("authorization"))
        if role not in allowed:
            raise Forbidden(f"role '{role}' may not use this endpoint")
        return role

    return dep


ITRole = Annotated[str, Depends(require("it"))]
AnyRole = Annotated[str, Depends(require(*ROLES))]
SenderRole = Annotated[str, Depends(require("it", "clinician"))]
ClinicianRole = Annotated[str, Depends(require("clinician"))]
