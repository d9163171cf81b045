"""Login with a role's token from the site config, swapped for a session id.

The token is compared in constant time (``bridge.api.auth.role_of``) and never stored in the
browser: the cookie holds a random session id kept in memory (HttpOnly, SameSite=Strict,
scoped to /ui), so a node restart logs everyone out. A session ends after ``[web]
session_idle_s`` without a request and ``session_max_s`` after login, whichever comes first;
each carries its own anti-forgery token for the forms it is shown (``bridge.web.security``).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import Request

from bridge.accounts.service import Principal, shared

SESSION_COOKIE = "hutong_session"


@dataclass(slots=True)
class Session:
    role: str
    csrf: str
    created: float
    seen: float
    flash: str | None = None  # the result of the last action, shown once on the next page
    #: who logged in (a named person, or a shared role token for one release)
    principal: Principal | None = None

    @property
    def who(self) -> Principal:
        return self.principal or shared(self.role)


class Sessions:
    def __init__(
        self,
        idle_s: float = 1800.0,
        max_s: float = 12 * 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.idle_s = idle_s
        self.max_s = max_s
        self.clock = clock
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def _expired(self, s: Session, now: float) -> bool:
        return now - s.seen > self.idle_s or now - s.created > self.max_s

    def create(self, role: str, principal: Principal | None = None) -> str:
        sid = secrets.token_urlsafe(32)
        now = self.clock()
        with self._lock:
            for old in [k for k, s in self._sessions.items() if self._expired(s, now)]:
                del self._sessions[old]  # ended sessions do not pile up in memory
            self._sessions[sid] = Session(
                role, secrets.token_urlsafe(32), now, now, principal=principal
            )
        return sid

    def get(self, request: Request) -> Session | None:
        """The request's live session (its idle clock restarts), or None: an expired one is
        dropped here, so the caller sends the user to the login page."""
        sid = request.cookies.get(SESSION_COOKIE) or ""
        now = self.clock()
        with self._lock:
            s = self._sessions.get(sid)
            if s is None:
                return None
            if self._expired(s, now):
                del self._sessions[sid]
                return None
            s.seen = now
            return s

    def role(self, request: Request) -> str | None:
        s = self.get(request)
        return s.role if s else None

    def flash(self, request: Request, message: str) -> None:
        """Keep an action's result for the next page (never a URL parameter: a link from
        elsewhere could make the page say anything)."""
        s = self.get(request)
        if s is not None:
            s.flash = message

    def pop_flash(self, request: Request) -> str | None:
        s = self.get(request)
        if s is None:
            return None
        message, s.flash = s.flash, None
        return message

    def drop(self, request: Request) -> Session | None:
        with self._lock:
            return self._sessions.pop(request.cookies.get(SESSION_COOKIE) or "", None)
