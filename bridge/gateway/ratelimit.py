"""Per-peer rate limit at the peer port: a token bucket of packets per sending peer.

A peer is the node that handed us the frame: the relay platform for a relayed packet (its
stamp names it), otherwise the packet's sender. Each packet costs one token; a peer's bucket
refills at ``limits.peer_rate_per_s`` up to ``limits.peer_burst``. A batch is taken whole or
refused whole with HTTP 429 and ``HT-PKT-RATE`` plus ``Retry-After``: nothing of it is
committed, so the sender keeps the packets queued and sends the same batch again later (it does
not count the refusal as a failed attempt). A batch larger than the burst is taken when the
bucket is full and leaves it in debt, so any batch size gets through at the configured rate.

The refusal is audited once per episode: the first refused batch of a peer writes one
``refused`` entry; later refusals are only counted until a batch of that peer is taken again.

The bucket is charged by the peer the frames *claim* (before any signature is checked: the
point is to refuse cheaply). A forger who can reach the port could spend a real peer's tokens;
that peer's packets then wait (nothing is lost). Keep the peer port behind the firewall rules of
the alliance network; the limit is against a misbehaving member, not an open internet.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import orjson

from bridge.crypto import envelope as env


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float
    limited: bool = False  # inside a refusal episode (audited already)
    refused_batches: int = 0
    refused_packets: int = 0


@dataclass(slots=True)
class Verdict:
    """``retry_after`` is None when the batch is taken; ``first`` lists the peers whose refusal
    episode starts with this batch (audit those, once)."""

    retry_after: float | None
    peer: str | None = None
    packets: int = 0
    first: bool = False
    episode: dict[str, int] = field(default_factory=dict)


class PeerRateLimit:
    def __init__(
        self, rate_per_s: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = float(rate_per_s)
        self.burst = float(burst)
        self.clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def charge(self, counts: dict[str, int]) -> Verdict:
        """Take ``counts[peer]`` tokens from each peer's bucket, all or nothing."""
        with self._lock:
            now = self.clock()
            for peer, n in counts.items():
                b = self._bucket(peer, now)
                need = min(float(n), self.burst)
                if b.tokens < need:
                    wait = (need - b.tokens) / self.rate
                    first = not b.limited
                    b.limited = True
                    b.refused_batches += 1
                    b.refused_packets += n
                    return Verdict(retry_after=max(wait, 0.05), peer=peer, packets=n, first=first)
            episode: dict[str, int] = {}
            for peer, n in counts.items():
                b = self._buckets[peer]
                b.tokens -= n
                if b.limited:
                    episode[peer] = b.refused_batches
                    b.limited, b.refused_batches, b.refused_packets = False, 0, 0
            return Verdict(retry_after=None, episode=episode)

    def _bucket(self, peer: str, now: float) -> _Bucket:
        b = self._buckets.get(peer)
        if b is None:
            b = self._buckets[peer] = _Bucket(tokens=self.burst, at=now)
        else:
            b.tokens = min(self.burst, b.tokens + (now - b.at) * self.rate)
            b.at = now
        return b


def peers_of(frames: Iterable[bytes], max_body: int) -> dict[str, int]:
    """Packets per claimed peer (relay platform if stamped, else sender). Receipts and frames
    whose header does not parse cost nothing here: the intake refuses the latter on its own.
    (``max_body`` is kept for callers; the header is read without copying the body.)"""
    counts: dict[str, int] = {}
    for frame in frames:
        peer = claimed_peer(frame)
        if peer is not None:
            counts[peer] = counts.get(peer, 0) + 1
    return counts


def retry_after_header(seconds: float) -> str:
    """HTTP Retry-After is whole seconds; the JSON body carries the exact figure."""
    return str(max(1, math.ceil(seconds)))


class SourceRefusals:
    """Refusals of unauthenticated input per source address (a token bucket each).

    Each refusal of input nobody authenticated costs its source address one token. While an
    address has a token its refusals are kept (a prefix, in quarantine) and audited; once it
    has none, its next requests are turned away before their body is read (429, nothing
    kept), counted, and audited once per episode. Members talk from their own addresses and
    their authenticated packets never cost a token here.

    The address is the TCP peer: behind a reverse proxy it is the proxy's, and the limit then
    applies to everything the proxy forwards (raise ``refusal_rate_per_s`` there).
    """

    MAX_SOURCES = 10_000  # buckets kept; beyond, full (idle) ones are forgotten first

    def __init__(
        self,
        rate_per_s: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
        *,
        total_per_s: float | None = None,
    ) -> None:
        self.rate = float(rate_per_s)
        self.burst = float(burst)
        self.clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()
        # all sources together (many addresses): refusals past it are answered, not kept
        self.total_rate = float(total_per_s) if total_per_s else None
        self.total_burst = 5.0 * self.total_rate if self.total_rate else 0.0
        self._total = _Bucket(tokens=self.total_burst, at=clock())
        self.unkept = 0  # refusals answered but not kept for the all-sources rate

    def _bucket(self, source: str, now: float) -> _Bucket:
        b = self._buckets.get(source)
        if b is None:
            if len(self._buckets) >= self.MAX_SOURCES:
                self._forget(now)
            b = self._buckets[source] = _Bucket(tokens=self.burst, at=now)
        else:
            b.tokens = min(self.burst, b.tokens + (now - b.at) * self.rate)
            b.at = now
        return b

    def _forget(self, now: float) -> None:
        for key, b in list(self._buckets.items()):
            if b.tokens + (now - b.at) * self.rate >= self.burst:
                del self._buckets[key]
        while len(self._buckets) >= self.MAX_SOURCES:  # all busy: drop the oldest
            del self._buckets[next(iter(self._buckets))]

    def turned_away(self, source: str) -> Verdict | None:
        """None if ``source`` may be heard; else the wait, counting this request in its
        episode (``first`` on the episode's first request: audit that one)."""
        with self._lock:
            b = self._bucket(source, self.clock())
            if b.tokens >= 1.0:
                if b.limited:  # back under its rate: the episode ends
                    episode = {source: b.refused_batches}
                    b.limited, b.refused_batches = False, 0
                    return Verdict(retry_after=None, peer=source, episode=episode)
                return None
            first = not b.limited
            b.limited = True
            b.refused_batches += 1
            return Verdict(
                retry_after=max((1.0 - b.tokens) / self.rate, 0.05), peer=source, first=first
            )

    def charge(self, source: str) -> bool:
        """One refusal of ``source``: True if it is within its rate and within the rate of all
        sources together (keep and audit it)."""
        with self._lock:
            now = self.clock()
            b = self._bucket(source, now)
            if b.tokens < 1.0:
                return False
            b.tokens -= 1.0
            if self.total_rate is not None:
                t = self._total
                t.tokens = min(self.total_burst, t.tokens + (now - t.at) * self.total_rate)
                t.at = now
                if t.tokens < 1.0:
                    self.unkept += 1
                    return False
                t.tokens -= 1.0
            return True


def claimed_peer(frame: bytes) -> str | None:
    """The peer a packet frame claims, cheaply (no copy of its body): the relay of its stamp,
    else its header's sender; None for anything else (the intake judges it)."""
    try:
        if frame[:4] != env.MAGIC_PACKET:
            return None
        view = memoryview(frame)
        hlen = int.from_bytes(view[4:8], "big")
        if hlen > env.MAX_HEADER:
            return None
        header = orjson.loads(view[8 : 8 + hlen])
        end = 8 + hlen
        clen = int.from_bytes(view[end : end + 4], "big")
        end += 4 + clen + env.SIG_LEN
        if len(frame) > end + 8 and view[end : end + 4] == env.MAGIC_RELAY:
            slen = int.from_bytes(view[end + 4 : end + 8], "big")
            if slen <= env.MAX_STAMP:
                stamp = orjson.loads(view[end + 8 : end + 8 + slen])
                relay = stamp.get("relay") if isinstance(stamp, dict) else None
                if isinstance(relay, str):
                    return relay
        sender = header.get("sender") if isinstance(header, dict) else None
        return sender if isinstance(sender, str) else None
    except (orjson.JSONDecodeError, ValueError):
        return None
