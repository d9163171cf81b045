"""Bearer tokens: personal and system-client tokens from the node's account book
(``bridge.accounts``), and for one release the shared per-role tokens of the site config
(``[web] shared_role_tokens``); shared ones are compared in constant time.

``require(...)`` resolves who is asking once per request and keeps it on
``request.state.principal``, so handlers audit by name with :func:`who`.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Depends, Request

from bridge.accounts.service import Principal, principal_for_token, shared
from bridge.errors import Forbidden, Unauthorized

ROLES = ("clinician", "it", "auditor")


def role_of(tokens: dict[str, str], header: str | None) -> str:
    """The shared role token's role (the old scheme); Unauthorized otherwise."""
    if not header or not header.lower().startswith("bearer "):
        raise Unauthorized("a bearer token is required")
    given = header[7:].strip().encode()
    for role, secret in tokens.items():
        if hmac.compare_digest(given, secret.encode()):
            return role
    raise Unauthorized("unknown token")


def token_known(node: Any, tokens: dict[str, str], header: str | None) -> bool:
    """Whether a bearer header names anyone: a shared role token (while allowed) or a
    personal or client token of the node's account book. For checks made before a route runs
    (``bridge.api.body_limit``); the route still resolves the principal and its roles."""
    try:
        role_of(tokens, header)
        return True
    except Unauthorized:
        pass
    if node is None or not header or not header.lower().startswith("bearer "):
        return False
    with node.ctx.store.read() as conn:
        return principal_for_token(conn, header[7:].strip()) is not None


def principal_of(request: Request) -> Principal:
    """Who the request's bearer token names: a shared role token first (while allowed), then a
    personal or client token from the store. Kept on ``request.state.principal``."""
    known = getattr(request.state, "principal", None)
    if isinstance(known, Principal):
        return known
    header = request.headers.get("authorization")
    try:
        principal = shared(role_of(request.app.state.tokens, header))
    except Unauthorized:
        node = getattr(request.app.state, "node", None)
        if node is None or not header or not header.lower().startswith("bearer "):
            raise
        with node.ctx.store.read() as conn:
            found = principal_for_token(conn, header[7:].strip())
        if found is None:
            raise Unauthorized("unknown token") from None
        principal = found
    request.state.principal = principal
    return principal


def address_of(request: Request) -> str | None:
    return request.client.host if request.client else None


def who(request: Request, role: str) -> dict[str, Any]:
    """The audit's ``actor``, ``actor_role`` and ``address`` for this request."""
    return {"actor": actor_of(request, role), "actor_role": role, "address": address_of(request)}


def actor_of(request: Request, role: str) -> str:
    """Who the audit names: the principal's actor, else the shared role."""
    principal = getattr(request.state, "principal", None)
    return principal.actor if isinstance(principal, Principal) else f"role:{role}"


def acting_role(request: Request, allowed: tuple[str, ...]) -> str:
    """The caller's role among ``allowed``: 401 without a good token, 403 without the role."""
    principal = principal_of(request)
    role = principal.acting(allowed)
    if role is None:
        raise Forbidden(f"role '{','.join(principal.roles)}' may not use this endpoint")
    return role


def require(*allowed: str) -> Callable[[Request], str]:
    def dep(request: Request) -> str:
        return acting_role(request, allowed)

    return dep


ITRole = Annotated[str, Depends(require("it"))]
AnyRole = Annotated[str, Depends(require(*ROLES))]
SenderRole = Annotated[str, Depends(require("it", "clinician"))]
ClinicianRole = Annotated[str, Depends(require("clinician"))]
AuditorRole = Annotated[str, Depends(require("auditor"))]
