"""Free loopback ports for listeners that tests, the demo's simulators and benches start.

A port found free is closed again before the real listener (often another process) binds it,
so it is taken outside the kernel's ephemeral range: no outgoing client socket (to PostgreSQL,
a peer, an HTTP client) can take it in between. Inside that range a node under load sometimes
lost its port that way and uvicorn exited with a startup failure.
"""

from __future__ import annotations

import random
import socket


def _listener_ports(n: int) -> tuple[int, int]:
    """The range listeners are picked from: below the kernel's ephemeral range (or above it
    when there is no room below)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as f:
            lo, hi = (int(x) for x in f.read().split())
    except (OSError, ValueError):
        lo, hi = 32768, 60999
    if lo - 20000 >= 2000:
        return 20000, lo - n
    return hi + 1, 65535 - n


def free_port_block(n: int) -> int:
    """A base port with n consecutive free ports (random start, checked by binding)."""
    first, last = _listener_ports(n)
    for _ in range(200):
        base = random.randint(first, last)
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)  # before bind, so a failed bind's socket is closed too
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port block")
