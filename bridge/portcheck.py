"""Is a port free to listen on, and if not, who holds it: checked before a node or the demo
starts anything, so the answer is one line naming the port instead of a log to search."""

from __future__ import annotations

import os
import socket

from bridge.errors import PortInUse

DEMO_HINT = (
    "; stop that process or move the demo with --port-base N "
    "(ports N+101..N+299 and N+1101..N+1107)"
)
RUN_HINT = "; stop that process or change local_bind / peer_bind in the node file"


def check_free(ports: set[int], host: str = "127.0.0.1", hint: str = DEMO_HINT) -> None:
    """PortInUse for the first taken port (lowest first), naming who holds it if known.
    SO_REUSEADDR as uvicorn binds: a port with only closed connections in TIME_WAIT is free."""
    for port in sorted(ports):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                holder = holder_of(port)
                raise PortInUse(
                    f"port {port} on {host} is already in use"
                    + (f" by {holder}" if holder else "")
                    + hint
                ) from None


def holder_of(port: int) -> str | None:
    """``pid 123 (python3)`` listening on the port, from /proc (Linux; None elsewhere or when
    the process belongs to another user)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as f:
                next(f, None)
                for line in f:
                    parts = line.split()
                    if (
                        len(parts) > 9
                        and parts[3] == "0A"
                        and int(parts[1].rsplit(":", 1)[1], 16) == port
                    ):
                        inodes.add(parts[9])
        except OSError:
            continue
    if not inodes:
        return None
    wanted = {f"socket:[{i}]" for i in inodes}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            for fd in fds:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in wanted:
                    with open(f"/proc/{pid}/comm", encoding="utf-8") as c:
                        return f"pid {pid} ({c.read().strip()})"
        except OSError:
            continue
    return None
