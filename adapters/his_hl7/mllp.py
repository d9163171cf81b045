"""MLLP on python-hl7's asyncio streams: a listener on its own thread, and a one-shot sender.

The listener (long-lived, per channel) runs an asyncio loop on a daemon thread and hands each
block's raw bytes to a synchronous ``handle(bytes) -> bytes`` in a worker thread (it commits to
the node's database before it answers); each connection (per-connection state) is served in
order, one message at a time. Blocks are read with ``readblock`` (bytes), never ``readmessage``:
the bytes are decoded by MSH-18 before parsing (see :mod:`adapters.his_hl7.charset`).

Every phase has its own timeout: connect, ACK wait, idle connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from hl7.mllp import InvalidBlockError, open_hl7_connection, start_hl7_server

from adapters.his_hl7.errors import HisNoAck, HisUnreachable

log = logging.getLogger("hutong.adapters.his_hl7")


@dataclass(frozen=True)
class Timeouts:
    connect_s: float = 5.0
    ack_s: float = 15.0
    idle_s: float = 300.0


def split_addr(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host or "127.0.0.1", int(port)


class MllpListener:
    """An MLLP server plus the loop the sender borrows; ``start`` returns once it listens."""

    def __init__(self, bind: str, handle: Callable[[bytes], bytes], timeouts: Timeouts,
                 name: str = "mllp") -> None:
        self.host, self.port = split_addr(bind)
        self.handle = handle
        self.timeouts = timeouts
        self.name = name
        self.loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._server: Any = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"{self.name}-listener",
                                        daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self._server = self.loop.run_until_complete(
                start_hl7_server(self._serve, self.host, self.port))
            if self.port == 0:
                self.port = self._server.sockets[0].getsockname()[1]
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()
        # stopping: close the server and every open connection
        self._server.close()
        self.loop.run_until_complete(self._server.wait_closed())
        pending = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
        for t in pending:
            t.cancel()
        self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self.loop.close()

    async def _serve(self, reader: Any, writer: Any) -> None:
        try:
            while True:
                try:
                    raw = await asyncio.wait_for(reader.readblock(), self.timeouts.idle_s)
                except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                    return  # peer closed, or idle too long
                except (InvalidBlockError, ValueError):
                    log.warning("%s: dropped a connection sending a bad MLLP block", self.name)
                    return
                answer = await asyncio.to_thread(self.handle, bytes(raw))
                writer.writeblock(answer)
                await writer.drain()
        except asyncio.CancelledError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def send(self, host: str, port: int, raw: bytes) -> bytes:
        """Send one framed message and return the ACK's bytes (blocking, from any thread)."""
        future: Future[bytes] = asyncio.run_coroutine_threadsafe(
            exchange(host, port, raw, self.timeouts), self.loop)
        return future.result(self.timeouts.connect_s + self.timeouts.ack_s + 5)

    def stop(self) -> None:
        if self._thread is None:
            return
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self._thread = None


async def exchange(host: str, port: int, raw: bytes, timeouts: Timeouts) -> bytes:
    """One MLLP round trip: connect, write the block, wait for the ACK block."""
    try:
        reader, writer = await asyncio.wait_for(open_hl7_connection(host, port),
                                                timeouts.connect_s)
    except (TimeoutError, OSError) as exc:
        raise HisUnreachable(f"HIS listener {host}:{port} unreachable "
                             f"({type(exc).__name__})") from None
    try:
        writer.writeblock(raw)
        await writer.drain()
        try:
            return bytes(await asyncio.wait_for(reader.readblock(), timeouts.ack_s))
        except TimeoutError:
            raise HisNoAck(f"no ACK from {host}:{port} within {timeouts.ack_s:g} s") from None
        except (asyncio.IncompleteReadError, ConnectionError, InvalidBlockError, ValueError) as e:
            raise HisNoAck(f"{host}:{port} closed without an ACK ({type(e).__name__})") from None
    except OSError as exc:
        raise HisNoAck(f"{host}:{port}: {type(exc).__name__} while sending") from None
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def send_once(host: str, port: int, raw: bytes, timeouts: Timeouts | None = None) -> bytes:
    """A blocking round trip on a private loop (simulators, tests, CLI)."""
    return asyncio.run(exchange(host, port, raw, timeouts or Timeouts()))
