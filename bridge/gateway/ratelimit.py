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

from bridge.crypto import envelope as env
from bridge.errors import HutongError


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
    def __init__(self, rate_per_s: float, burst: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
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
                    return Verdict(retry_after=max(wait, 0.05), peer=peer, packets=n,
                                   first=first)
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
    that do not decode cost nothing here: the intake refuses the latter on its own."""
    counts: dict[str, int] = {}
    for frame in frames:
        if frame[:4] != env.MAGIC_PACKET:
            continue
        try:
            pkt = env.decode(frame, max_body=max_body)
        except HutongError:
            continue
        peer = pkt.relay.relay if pkt.relay is not None else pkt.header.sender
        counts[peer] = counts.get(peer, 0) + 1
    return counts


def retry_after_header(seconds: float) -> str:
    """HTTP Retry-After is whole seconds; the JSON body carries the exact figure."""
    return str(max(1, math.ceil(seconds)))
