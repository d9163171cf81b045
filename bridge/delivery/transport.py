"""Peer transport: one keep-alive stdlib HTTP connection per peer, batches only.

stdlib ``http.client`` costs ~0.4 ms a request against ~1.1 ms for httpx, and packets move in
batches, so one connection a peer is plenty; with ``[delivery] per_peer_concurrency = k`` the
sender keeps k of them, one per partition (a connection is used by one thread at a time: an
``http.client`` connection is not thread-safe). Socket errors are translated here, at the edge:
refused/unreachable before sending is transient; a failure after the request went out is
ambiguous (the receiver may have committed; it dedupes by packet id, so a resend is safe).
"""

from __future__ import annotations

import http.client
import socket
from urllib.parse import urlsplit

import orjson

from bridge.errors import (
    AmbiguousDelivery,
    Backlogged,
    Busy,
    RateLimited,
    TransportError,
)

PATH = "/exchange/v1/packets"
CONTENT_TYPE = "application/x-hutong-batch"
#: request header of a sender that takes batch-signed receipts (``HTR2``); a receiver that
#: predates them ignores it and answers ``HTR1``, as does one set to ``batch_receipts = false``
RECEIPTS_HEADER, RECEIPTS_V2 = "Hutong-Receipts", "v2"


class PeerConnection:
    def __init__(self, url: str, *, connect_timeout: float = 5.0, read_timeout: float = 120.0):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise TransportError(f"bad exchange URL '{url}'")
        self.url = url
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.https = parts.scheme == "https"
        self.base = parts.path.rstrip("/")
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._conn: http.client.HTTPConnection | None = None

    def _connect(self) -> http.client.HTTPConnection:
        if self._conn is None:
            cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
            conn = cls(self.host, self.port, timeout=self.connect_timeout)
            try:
                conn.connect()
            except OSError as exc:
                conn.close()
                raise TransportError(
                    f"cannot connect to {self.url}: {exc.strerror or exc}"
                ) from exc
            assert conn.sock is not None
            conn.sock.settimeout(self.read_timeout)
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._conn = conn
        return self._conn

    def post_batch(self, body: bytes, *, receipts_v2: bool = False) -> bytes:
        """POST one batch; returns the answer batch bytes. ``receipts_v2``: say that this
        sender takes batch-signed receipts.

        A kept-alive connection the peer closed while it sat idle (its keep-alive timeout;
        uvicorn's is 5 s, and with per_peer_concurrency a partition's connection may idle
        longer) fails with a reset before any answer: that try is repeated once on a fresh
        connection instead of counting as a failed attempt (a resend is safe: the receiver
        answers a packet it has already taken with its original receipt)."""
        reused = self._conn is not None
        headers = {"Content-Type": CONTENT_TYPE}
        if receipts_v2:
            headers[RECEIPTS_HEADER] = RECEIPTS_V2
        try:
            return self._post(body, headers)
        except AmbiguousDelivery as exc:
            if not reused or not isinstance(exc.__cause__, (ConnectionResetError, BrokenPipeError)):
                raise
        return self._post(body, headers)

    def _post(self, body: bytes, headers: dict[str, str]) -> bytes:
        conn = self._connect()
        try:
            conn.request("POST", self.base + PATH, body=body, headers=headers)
        except OSError as exc:
            self.close()
            # the request may be partly out; nothing was answered: safe to resend
            raise AmbiguousDelivery(f"send to {self.url} failed: {exc}") from exc
        try:
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise AmbiguousDelivery(f"no answer from {self.url}: {type(exc).__name__}") from exc
        if resp.status == 200:
            return data
        if resp.status == 429:  # over the peer's rate: nothing taken, keep the connection
            raise RateLimited(
                f"{self.url} refused the batch as over rate: "
                f"{data[:300].decode('utf-8', 'replace')}",
                retry_after=_retry_after(resp.getheader("Retry-After")),
            )
        self.close()
        message = data[:300].decode("utf-8", "replace")
        if resp.status == 503 and _code(data) == Backlogged.code:
            # the receiver's local delivery is behind: nothing taken, not a failed attempt
            raise Backlogged(
                f"{self.url} refused the batch, its backlog is full: {message}",
                retry_after=_retry_after(resp.getheader("Retry-After")),
            )
        if resp.status == 503 and _code(data) == Busy.code:
            # the peer port is at its bound of requests in flight: it read none of it
            raise Busy(
                f"{self.url} is busy, the batch was not read: {message}",
                retry_after=_retry_after(resp.getheader("Retry-After")),
            )
        # an HTTP error is unsigned: whoever wrote it, it says only "not taken this time", so
        # the batch stays queued and goes again with backoff (dead only after max_attempts or
        # dead_after_s); only a signed receipt can refuse a packet
        raise TransportError(f"{self.url} answered HTTP {resp.status}: {message}")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _retry_after(value: str | None) -> float:
    try:
        return min(max(float(value or 1), 0.05), 300.0)
    except ValueError:
        return 1.0


def _code(data: bytes) -> str | None:
    """The ``code`` of an unsigned JSON error answer, if it is one."""
    try:
        said = orjson.loads(data[:4096])
    except orjson.JSONDecodeError:
        return None
    code = said.get("code") if isinstance(said, dict) else None
    return code if isinstance(code, str) else None
