"""Send ORU^R01 messages over MLLP with python-hl7's ``MLLPClient`` and read back the ACKs.

For a LIS that can only *export* result files (one message per file, in a drop folder), the
sender is the missing half: :func:`send_folder` sends each file to the node's MLLP listener and
moves it to ``done/`` on AA or ``refused/`` on AE/AR (with the ACK beside it), so a file is
never sent twice once acknowledged. ``python -m simulators.lis send-dir`` runs it.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable
from pathlib import Path

from hl7.client import MLLPClient

from adapters.hl7v2.ack import ack_code_of
from adapters.hl7v2.mllp import END, START, Frame, FrameReader


def _recv_ack(client: MLLPClient) -> bytes:
    """The ACK frame's payload: read until the kit's framer has one whole frame."""
    reader = FrameReader()
    while True:
        more = client.socket.recv(65536)
        if not more:
            raise ConnectionError("the listener closed the connection without an ACK")
        for event in reader.feed(more):
            if isinstance(event, Frame):
                return event.payload
            raise ConnectionError(f"the listener answered with a bad MLLP frame ({event.kind})")


def send_messages(
    host: str,
    port: int,
    messages: Iterable[bytes],
    *,
    tls: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    timeout: float = 30.0,
) -> list[bytes]:
    """Send each message (bytes, already in its MSH-18 charset) on one connection; the ACKs.

    The frame is written with ``sendall``: MLLPClient.send_message makes a single
    ``socket.send``, which with a timeout set may write only part of a large message."""
    acks: list[bytes] = []
    with MLLPClient(host, port) as client:
        client.socket.settimeout(timeout)
        if tls is not None:
            client.socket = tls.wrap_socket(client.socket, server_hostname=server_hostname or host)
        for m in messages:
            client.socket.sendall(START + m + END)
            acks.append(_recv_ack(client))
    return acks


def send_folder(
    folder: Path, host: str, port: int, *, tls: ssl.SSLContext | None = None
) -> dict[str, int]:
    """Send every ``*.hl7`` file of an export folder, oldest name first; returns counts."""
    counts = {"accepted": 0, "refused": 0}
    for path in sorted(folder.glob("*.hl7")):
        ack = send_messages(host, port, [path.read_bytes()], tls=tls)[0]
        code = ack_code_of(ack)
        target = folder / ("done" if code == "AA" else "refused")
        target.mkdir(exist_ok=True)
        (target / (path.name + ".ack")).write_bytes(ack)
        path.replace(target / path.name)
        counts["accepted" if code == "AA" else "refused"] += 1
    return counts
