"""What a port lets in before any application code runs: connections that must keep moving,
and a bound on requests and request bytes in flight.

``guarded_protocol`` is uvicorn's h11 protocol with two deadlines a client must meet: the
request head (line and headers) within ``header_timeout_s`` of the connection opening or of the
first byte of a kept-alive connection's next request, and the whole body within
``body_timeout_s`` of the head. A connection that misses one is closed (slowloris, a client
that opens and says nothing). Idle keep-alive connections close after ``keep_alive_s``
(uvicorn's own timer).

``Admission`` bounds, per port, the requests being handled at once and the request bytes they
may hold (by declared length); a request that cannot get its share waits a little, then is
answered 503 ``HT-BUSY`` before a byte of its body is read.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def guarded_protocol(header_timeout_s: float, body_timeout_s: float) -> type[H11Protocol]:
    """An h11 protocol class closing connections that miss the head or body deadline."""

    class GuardedH11Protocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None
        _phase: str = ""

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm("head", header_timeout_s)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._track()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._track()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _track(self) -> None:
            state = self.conn.their_state
            if state is h11.IDLE:
                # between requests uvicorn's keep-alive timer runs; once bytes of a next
                # request sit in h11's buffer, its head must complete in time
                if self._phase != "head" and self.conn.trailing_data[0]:
                    self._arm("head", header_timeout_s)
            elif state is h11.SEND_BODY:
                if self._phase != "body":
                    self._arm("body", body_timeout_s)
            else:
                self._disarm()

        def _arm(self, phase: str, seconds: float) -> None:
            self._disarm()
            self._phase = phase
            self._deadline = self.loop.call_later(seconds, self._expired)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline, self._phase = None, ""

        def _expired(self) -> None:
            self._deadline, self._phase = None, ""
            if not self.transport.is_closing():
                self.transport.close()

    return GuardedH11Protocol


class Admission:
    """Per-port bound on requests at once and on their declared bytes (asyncio, one loop)."""

    def __init__(self, max_requests: int, max_bytes: int, wait_s: float) -> None:
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self.wait_s = wait_s
        self.requests = 0
        self.bytes = 0
        self._cond: asyncio.Condition | None = None

    def _fits(self, n: int) -> bool:
        return self.requests < self.max_requests and (
            self.bytes + n <= self.max_bytes or self.bytes == 0
        )

    @asynccontextmanager
    async def admit(self, n: int) -> AsyncIterator[bool]:
        """Yields True with the share held until the block ends, or False (nothing held)."""
        if self._cond is None:
            self._cond = asyncio.Condition()
        cond = self._cond
        got = True
        async with cond:
            if not self._fits(n):
                try:
                    await asyncio.wait_for(cond.wait_for(lambda: self._fits(n)), self.wait_s)
                except TimeoutError:
                    got = False
            if got:
                self.requests += 1
                self.bytes += n
        if not got:
            yield False
            return
        try:
            yield True
        finally:
            async with cond:
                self.requests -= 1
                self.bytes -= n
                cond.notify_all()
