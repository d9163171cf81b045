"""Login with a role's token from the site config, swapped for a session id.

The token is compared in constant time (``bridge.api.auth.role_of``) and never stored in the
browser: the cookie holds a random session id kept in memory (HttpOnly, SameSite=Strict,
scoped to /ui), so a node restart logs everyone out.
"""

from __future__ import annotations

import secrets
import threading

from fastapi import Request

SESSION_COOKIE = "hutong_session"


class Sessions:
    def __init__(self) -> None:
        self._roles: dict[str, str] = {}
        self._lock = threading.Lock()

    def create(self, role: str) -> str:
        sid = secrets.token_urlsafe(32)
        with self._lock:
            self._roles[sid] = role
        return sid

    def role(self, request: Request) -> str | None:
        with self._lock:
            return self._roles.get(request.cookies.get(SESSION_COOKIE) or "")

    def drop(self, request: Request) -> None:
        with self._lock:
            self._roles.pop(request.cookies.get(SESSION_COOKIE) or "", None)
