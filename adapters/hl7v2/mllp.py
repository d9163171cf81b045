"""MLLP for every HL7 v2 listener: framing, frame limit, timeouts, TLS, rate limit, a sender.

Framing (:class:`FrameReader`) is sans-IO: bytes are fed in, events come out, so it is tested by
feeding bytes. A frame is ``<VT> payload <FS><CR>``; inside a frame only ``<FS><CR>`` ends it
(a 0x0B byte inside is data: UTF-16 ``下`` is 0B 4E). Between frames CR/LF/space are ignored.

Nothing is dropped in silence:

* a frame over ``max_bytes`` is read to its end but not kept: the sender gets an ``AR`` naming
  the limit, and the quarantine gets its first ``keep_bytes`` and the SHA-256 of the whole
  frame; the connection then serves the next frame;
* bytes outside a frame ending with ``<FS><CR>`` (no ``<VT>``) get an ``AR``; the connection
  goes on;
* a connection closed inside a frame (truncated) has the bytes received quarantined (bounded
  the same way); nobody is left to answer;
* a frame not completed within ``frame_timeout_s`` of its first byte (a slow or stalled
  sender) gets an ``AR`` naming the timeout, is quarantined, and the connection is closed;
* a connection idle (no byte between frames) for ``idle_timeout_s`` is closed; an ACK the
  peer does not read within ``write_timeout_s`` closes it too. No timeout is infinite.

Each frame is handed to a synchronous ``handle(bytes) -> bytes`` in a worker thread (it commits
before it answers); one connection is served in order, one frame at a time. Rate limit (per
listener): a token bucket; a frame over it waits up to ``hold_s`` for a token, then gets the
adapter's answer for it (an ``AE``: the sender keeps the message and resends).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from adapters.hl7v2.errors import FrameRefused

log = logging.getLogger("hutong.adapters.hl7v2")

VT, FS, CR = 0x0B, 0x1C, 0x0D
START, END = b"\x0b", b"\x1c\r"
MiB = 1024 * 1024
#: default frame limit: a scanned report or a long referral summary fits, a flood does not
DEFAULT_MAX_BYTES = 10 * MiB
#: bytes of a refused frame kept in quarantine (with the digest of the whole frame)
DEFAULT_KEEP_BYTES = 64 * 1024


@dataclass(frozen=True)
class Limits:
    """Per-listener limits; every one finite."""

    max_bytes: int = DEFAULT_MAX_BYTES
    keep_bytes: int = DEFAULT_KEEP_BYTES
    idle_timeout_s: float = 300.0  # no byte between frames
    frame_timeout_s: float = 120.0  # first byte of a frame to its end
    write_timeout_s: float = 30.0  # an ACK not read by the peer

    def __post_init__(self) -> None:
        for name in ("idle_timeout_s", "frame_timeout_s", "write_timeout_s"):
            value = getattr(self, name)
            if not 0 < value < float("inf"):
                raise ValueError(f"{name} must be a positive, finite number of seconds")
        if self.max_bytes < 1 or self.keep_bytes < 0:
            raise ValueError("max_bytes must be positive")


# -- events -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    payload: bytes


@dataclass(frozen=True)
class Fault:
    """A frame (or stray bytes) that will not be handled: what is kept of it, and why."""

    kind: str  # "oversize" | "truncated" | "slow" | "no-start"
    prefix: bytes  # the first bytes (at most keep_bytes) as received, with <VT>, without <FS><CR>
    size: int  # bytes of the whole thing
    sha256: str  # digest of the whole thing
    limit: int = 0  # the frame limit (oversize) or the timeout in seconds (slow)

    @property
    def reason(self) -> str:
        if self.kind == "oversize":  # size counts <VT> and <FS><CR>; the message is the rest
            return (
                f"message of {self.size - 3} bytes is larger than this listener's frame "
                f"limit of {self.limit} bytes (MLLP max_message_bytes)"
            )
        if self.kind == "truncated":
            return (
                f"connection closed before the end of the MLLP block (truncated frame, "
                f"{self.size} bytes received)"
            )
        if self.kind == "slow":
            return (
                f"MLLP frame not completed within {self.limit} s of its first byte "
                f"({self.size} bytes received); connection closed"
            )
        return "block does not begin with <VT> (0x0B)"

    @property
    def whole(self) -> bool:
        """True when ``prefix`` is the whole thing (nothing was cut off)."""
        return len(self.prefix) == self.size

    def error(self) -> FrameRefused:
        note = "" if self.whole else f"; first {len(self.prefix)} bytes kept, sha256 {self.sha256}"
        return FrameRefused(self.reason + note, field="MSH")


Event = Frame | Fault


class FrameReader:
    """Feed bytes, get :class:`Frame` and :class:`Fault` events (no I/O, no clock)."""

    def __init__(
        self, max_bytes: int = DEFAULT_MAX_BYTES, keep_bytes: int = DEFAULT_KEEP_BYTES
    ) -> None:
        self.max_bytes = max_bytes
        self.keep_bytes = keep_bytes
        self._buf = bytearray()  # the current frame (with its <VT>) or stray bytes
        self._over = False  # past the limit: only prefix, size and digest are kept
        self._prefix = b""
        self._hash = hashlib.sha256()
        self._size = 0
        self._last = 0  # last byte seen while over (an <FS> may end a chunk, <CR> start one)

    @property
    def in_frame(self) -> bool:
        """True while a frame (or stray bytes) has begun and not ended."""
        return self._over or bool(self._buf)

    def feed(self, data: bytes) -> list[Event]:
        out: list[Event] = []
        while data:
            if self._over:
                data = self._feed_over(data, out)
                continue
            if not self._buf:
                data = data.lstrip(b"\r\n\t ")  # between frames
                if not data:
                    break
            start = max(len(self._buf) - 1, 0)
            self._buf += data
            data = b""
            end = self._buf.find(END, start)
            if end < 0:
                # + 1: the <VT>; a last <FS> may be the first half of the <FS><CR> that ends
                # the frame (the chunk was cut between the two), so it does not count yet
                if len(self._buf) - (self._buf[-1] == FS) > self.max_bytes + 1:
                    self._go_over()
                break
            block = bytes(self._buf[:end])
            data = bytes(self._buf[end + 2 :])
            self._buf = bytearray()
            if len(block) > self.max_bytes + 1:
                self._hash = hashlib.sha256(block)
                self._hash.update(END)
                out.append(
                    Fault(
                        "oversize",
                        block[: self.keep_bytes],
                        len(block) + 2,
                        self._hash.hexdigest(),
                        self.max_bytes,
                    )
                )
            elif block[:1] == START:
                out.append(Frame(block[1:]))
            else:
                out.append(
                    Fault(
                        "no-start",
                        block[: self.keep_bytes],
                        len(block),
                        hashlib.sha256(block).hexdigest(),
                    )
                )
        return out

    def _go_over(self) -> None:
        self._over = True
        self._hash = hashlib.sha256(self._buf)
        self._size = len(self._buf)
        self._prefix = bytes(self._buf[: self.keep_bytes])
        self._last = self._buf[-1]
        self._buf = bytearray()

    def _feed_over(self, data: bytes, out: list[Event]) -> bytes:
        """Past the limit: hash and count until <FS><CR>, keep nothing more."""
        if self._last == FS and data[:1] == b"\r":
            stop, ended = 1, True
        else:
            end = data.find(END)
            stop, ended = (len(data), False) if end < 0 else (end + 2, True)
        self._hash.update(data[:stop])
        if len(self._prefix) < self.keep_bytes:
            self._prefix += data[: min(stop, self.keep_bytes - len(self._prefix))]
        self._size += stop
        self._last = data[stop - 1]
        if ended:  # the prefix never holds the <FS><CR> that ended the frame
            out.append(
                Fault(
                    "oversize",
                    self._prefix[: self._size - 2],
                    self._size,
                    self._hash.hexdigest(),
                    self.max_bytes,
                )
            )
            self._reset()
        return data[stop:]

    def _reset(self) -> None:
        self._buf = bytearray()
        self._over = False
        self._prefix = b""
        self._size = 0
        self._last = 0

    def _pending(self, kind: str, limit: int) -> Fault:
        if self._over:
            fault = Fault(kind, self._prefix, self._size, self._hash.hexdigest(), limit)
        else:
            block = bytes(self._buf)
            fault = Fault(
                kind, block[: self.keep_bytes], len(block), hashlib.sha256(block).hexdigest(), limit
            )
        self._reset()
        return fault

    def eof(self) -> Fault | None:
        """The connection closed: a frame in progress is a truncated one."""
        return self._pending("truncated", self.max_bytes) if self.in_frame else None

    def abandon(self, timeout_s: float) -> Fault | None:
        """The frame took too long: a ``slow`` fault for what came (None between frames)."""
        return self._pending("slow", int(timeout_s)) if self.in_frame else None


# -- rate limit ---------------------------------------------------------------------------------


class TokenBucket:
    def __init__(
        self, per_second: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
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


def server_tls(cert: str, key: str, client_ca: str | None = None) -> ssl.SSLContext:
    """TLS for an MLLP port; with ``client_ca`` the peer must present a certificate too."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    if client_ca:
        ctx.load_verify_locations(client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def split_addr(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host or "127.0.0.1", int(port)


# -- listener -----------------------------------------------------------------------------------


@dataclass
class Handlers:
    """What a listener calls (each from a worker thread, never on the loop).

    ``handle``: one frame's payload -> the ACK bytes (commit first). ``fault``: a framing
    fault -> the ACK bytes for the sender, or None when nobody is left to answer (truncated);
    it quarantines. ``over_rate``: a frame over the rate limit -> its ACK (not quarantined).
    """

    handle: Callable[[bytes], bytes]
    fault: Callable[[Fault], bytes | None]
    over_rate: Callable[[bytes], bytes] | None = None


@dataclass
class Stats:
    connections: int = 0
    frames: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    idle_closed: int = 0


class MllpListener:
    """An MLLP server on its own loop thread; ``start`` returns once it listens (port 0 is
    resolved). The loop is also lent to :meth:`send` (one-shot exchanges with a peer)."""

    def __init__(
        self,
        host: str,
        port: int,
        handlers: Handlers,
        *,
        limits: Limits = Limits(),
        ssl_context: ssl.SSLContext | None = None,
        bucket: TokenBucket | None = None,
        hold_s: float = 0.0,
        name: str = "mllp",
        read_chunk: int = 65536,
    ) -> None:
        self.host, self.port = host, port
        self.handlers = handlers
        self.limits = limits
        self.ssl_context = ssl_context
        self.bucket = bucket
        self.hold_s = hold_s
        self.name = name
        self.read_chunk = read_chunk
        self.stats = Stats()
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    @property
    def connections(self) -> int:
        return self.stats.connections

    def start(self, timeout: float = 10.0) -> None:
        self._thread = threading.Thread(
            target=self._run, name=f"{self.name}:{self.port}", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError(f"MLLP listener on {self.host}:{self.port} did not start")
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        loop, stop, thread = self.loop, self._stop, self._thread
        if stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop.set)
        if thread is not None:
            thread.join(timeout=10)
        elif not loop.is_closed():  # never started: nothing runs the loop
            loop.close()
        self._thread = None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._serve())
        except BaseException as exc:  # noqa: BLE001 - reported to start() or logged
            if not self._ready.is_set():
                self._error = exc
                self._ready.set()
            else:
                log.error("%s: listener stopped (%s)", self.name, type(exc).__name__)
        finally:
            try:
                pending = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
                for t in pending:
                    t.cancel()
                self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                self.loop.run_until_complete(self.loop.shutdown_default_executor())
            finally:
                asyncio.set_event_loop(None)
                self.loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        server = await asyncio.start_server(
            self._client, self.host, self.port, ssl=self.ssl_context, limit=self.read_chunk * 2
        )
        if self.port == 0:
            self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 5)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        lim = self.limits
        frames = FrameReader(lim.max_bytes, lim.keep_bytes)
        loop = asyncio.get_running_loop()
        self.stats.connections += 1
        started: float | None = None  # when the current frame's first byte came
        try:
            while True:
                if frames.in_frame:
                    started = started if started is not None else loop.time()
                    wait = started + lim.frame_timeout_s - loop.time()
                else:
                    started = None
                    wait = lim.idle_timeout_s
                try:
                    data = await asyncio.wait_for(reader.read(self.read_chunk), max(wait, 0))
                except TimeoutError:
                    fault = frames.abandon(lim.frame_timeout_s)
                    if fault is None:
                        self.stats.idle_closed += 1
                        return  # idle: nothing pending, close
                    await self._fault(fault, writer)
                    return
                if not data:
                    fault = frames.eof()
                    if fault is not None:
                        await self._fault(fault, None)
                    return
                for event in frames.feed(data):
                    started = None
                    if isinstance(event, Frame):
                        self.stats.frames += 1
                        if await self._admit():
                            answer = await loop.run_in_executor(
                                None, self.handlers.handle, event.payload
                            )
                        else:
                            over = self.handlers.over_rate or self.handlers.handle
                            answer = await loop.run_in_executor(None, over, event.payload)
                        await self._write(writer, answer)
                    else:
                        await self._fault(event, writer)
        except (ConnectionError, ssl.SSLError, OSError, TimeoutError):
            return
        except asyncio.CancelledError:
            pass
        finally:
            self.stats.connections -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 5)

    async def _fault(self, fault: Fault, writer: asyncio.StreamWriter | None) -> None:
        self.stats.faults[fault.kind] = self.stats.faults.get(fault.kind, 0) + 1
        log.warning("%s: MLLP %s (%d bytes)", self.name, fault.kind, fault.size)
        loop = asyncio.get_running_loop()
        answer = await loop.run_in_executor(None, self.handlers.fault, fault)
        if answer is not None and writer is not None:
            await self._write(writer, answer)

    async def _write(self, writer: asyncio.StreamWriter, answer: bytes) -> None:
        writer.write(START + answer + END)
        await asyncio.wait_for(writer.drain(), self.limits.write_timeout_s)

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

    def send(self, host: str, port: int, raw: bytes, timeouts: Timeouts) -> bytes:
        """One framed message to a peer and its ACK's bytes (blocking, from any thread)."""
        future: Future[bytes] = asyncio.run_coroutine_threadsafe(
            exchange(host, port, raw, timeouts, self.limits.max_bytes), self.loop
        )
        return future.result(timeouts.connect_s + timeouts.ack_s + 5)


# -- sender -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timeouts:
    connect_s: float = 5.0
    ack_s: float = 15.0
    idle_s: float = 300.0


class PeerUnreachable(ConnectionError):
    """Connect refused or timed out."""


class NoAck(TimeoutError):
    """Sent, but no complete ACK frame came back in time."""


async def exchange(
    host: str,
    port: int,
    raw: bytes,
    timeouts: Timeouts,
    max_bytes: int = DEFAULT_MAX_BYTES,
    ssl_context: ssl.SSLContext | None = None,
) -> bytes:
    """One MLLP round trip: connect, write the frame, read the ACK frame."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=ssl_context), timeouts.connect_s
        )
    except (TimeoutError, OSError) as exc:
        raise PeerUnreachable(f"{host}:{port} unreachable ({type(exc).__name__})") from None
    frames = FrameReader(max_bytes)
    try:
        writer.write(START + raw + END)
        deadline = asyncio.get_running_loop().time() + timeouts.ack_s
        await asyncio.wait_for(writer.drain(), timeouts.ack_s)
        while True:
            left = deadline - asyncio.get_running_loop().time()
            try:
                data = await asyncio.wait_for(reader.read(65536), max(left, 0))
            except TimeoutError:
                raise NoAck(f"no ACK from {host}:{port} within {timeouts.ack_s:g} s") from None
            if not data:
                raise NoAck(f"{host}:{port} closed without an ACK")
            for event in frames.feed(data):
                if isinstance(event, Frame):
                    return event.payload
                raise NoAck(f"{host}:{port} answered with a bad MLLP frame ({event.kind})")
    except OSError as exc:
        if isinstance(exc, NoAck | PeerUnreachable):
            raise
        raise NoAck(f"{host}:{port}: {type(exc).__name__} while sending") from None
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def send_once(host: str, port: int, raw: bytes, timeouts: Timeouts | None = None) -> bytes:
    """A blocking round trip on a private loop (simulators, tests, CLI)."""
    return asyncio.run(exchange(host, port, raw, timeouts or Timeouts()))
