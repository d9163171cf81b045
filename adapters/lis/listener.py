"""The MLLP listener: python-hl7's asyncio MLLP server in its own thread, optional TLS, rate limit.

Framing is python-hl7's (``hl7.mllp.start_hl7_server`` and ``readblock``): we read *blocks* (raw
bytes) rather than its ``readmessage``, because the character set is only known from MSH-18
inside the bytes (:mod:`adapters.lis.decode`). Each block is handled in a worker thread (the
store commit blocks) and its ACK written back on the same connection, in order.

Rate limit (per channel = per listener): a token bucket of ``per_second`` with ``burst``. A
message over the limit first waits up to ``hold_s`` for a token (the socket is simply held, so
a LIS replaying its history is slowed down, not failed); past that it gets AE "rate limit
exceeded, resend later" and is not quarantined, since the LIS still holds it and resends.

Bad framing: a block not starting with <VT> gets an AR and the connection keeps serving; a
block over ``max_bytes`` gets an AR; a connection closed in the middle of a block (a truncated
frame: nobody left to ACK) has its partial bytes quarantined.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
import time
from collections.abc import Callable

from hl7.mllp import InvalidBlockError, start_hl7_server

log = logging.getLogger("hutong.adapters.lis")


class TokenBucket:
    def __init__(self, per_second: float, burst: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = per_second
        self.burst = max(1, burst)
        self.tokens = float(self.burst)
        self.clock = clock
        self.at = clock()

    def take(self) -> float:
        """0 if a token was taken, else the seconds until one is available."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate if self.rate > 0 else float("inf")


class MllpListener:
    """``handle(raw) -> ack bytes`` runs for every block; the others answer framing problems."""

    def __init__(self, *, host: str, port: int, handle: Callable[[bytes], bytes],
                 over_limit: Callable[[bytes], bytes], bad_block: Callable[[bytes, str], bytes],
                 truncated: Callable[[bytes], None], bucket: TokenBucket | None,
                 hold_s: float, max_bytes: int, ssl_context: ssl.SSLContext | None = None,
                 idle_timeout_s: float = 600.0) -> None:
        self.host, self.port = host, port
        self.handle = handle
        self.over_limit = over_limit
        self.bad_block = bad_block
        self.truncated = truncated
        self.bucket = bucket
        self.hold_s = hold_s
        self.max_bytes = max_bytes
        self.ssl_context = ssl_context
        self.idle_timeout_s = idle_timeout_s
        self.connections = 0
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    # -- life cycle -------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> None:
        self._thread = threading.Thread(target=self._run, name=f"mllp:{self.port}",
                                        daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError(f"MLLP listener on {self.host}:{self.port} did not start")
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        loop, stop, thread = self._loop, self._stop, self._thread
        if loop is not None and stop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:  # loop already closed
                pass
        if thread is not None:
            thread.join(timeout=10)
        self._thread = None

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # noqa: BLE001 - reported to start() or logged
            if not self._ready.is_set():
                self._error = exc
                self._ready.set()
            else:
                log.error("MLLP listener on port %s stopped: %s", self.port, type(exc).__name__)
        finally:
            try:
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                asyncio.set_event_loop(None)
                loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        server = await start_hl7_server(self._client, self.host, self.port,
                                        ssl=self.ssl_context, limit=self.max_bytes)
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            server.close()
            await server.wait_closed()

    # -- one connection ---------------------------------------------------------------------

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        self.connections += 1
        try:
            while True:
                try:
                    raw = await asyncio.wait_for(reader.readblock(),  # type: ignore[attr-defined]
                                                 timeout=self.idle_timeout_s)
                except asyncio.IncompleteReadError as exc:
                    if exc.partial.strip(b"\x0b\x1c\r\n \t"):
                        await loop.run_in_executor(None, self.truncated, exc.partial)
                    return
                except InvalidBlockError:
                    ack = await loop.run_in_executor(
                        None, self.bad_block, b"", "block does not begin with <VT> (0x0B)")
                    writer.writeblock(ack)  # type: ignore[attr-defined]
                    await writer.drain()
                    continue
                except ValueError:  # over the size limit (python-hl7 raises ValueError)
                    ack = await loop.run_in_executor(
                        None, self.bad_block, b"",
                        f"message larger than the {self.max_bytes}-byte limit")
                    writer.writeblock(ack)  # type: ignore[attr-defined]
                    await writer.drain()
                    continue
                if not await self._admit():
                    ack = await loop.run_in_executor(None, self.over_limit, raw)
                else:
                    ack = await loop.run_in_executor(None, self.handle, raw)
                writer.writeblock(ack)  # type: ignore[attr-defined]
                await writer.drain()
        except (TimeoutError, ConnectionError, ssl.SSLError, OSError):
            return
        finally:
            self.connections -= 1
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, ssl.SSLError, OSError):
                pass

    async def _admit(self) -> bool:
        if self.bucket is None:
            return True
        waited = 0.0
        while True:
            wait = self.bucket.take()
            if wait == 0.0:
                return True
            if waited + wait > self.hold_s:
                return False
            await asyncio.sleep(wait)
            waited += wait


def server_tls(cert: str, key: str, client_ca: str | None = None) -> ssl.SSLContext:
    """TLS for the MLLP port; with ``client_ca`` the LIS must present a certificate too."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    if client_ca:
        ctx.load_verify_locations(client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
