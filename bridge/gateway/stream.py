"""Judge a peer request's framing while its bytes arrive, so a bad one is refused at its first
bad byte and never read whole.

``FramePeek.feed`` walks the batch (or single frame) as far as the bytes received allow: magic,
item count, each item's length, each packet's header (canonical JSON, a sender in the
directory) and its ciphertext length. It raises the refusal (``MalformedPacket``,
``PacketTooLarge``, ``UnknownSender``) as soon as it can tell; ``items`` are the frames'
(start, end) offsets, so the caller slices frames without decoding the batch again.
The signature is checked later, by the intake, on the whole frame.
"""

from __future__ import annotations

from collections.abc import Callable

from bridge.crypto import envelope as env
from bridge.errors import MalformedPacket, PacketRefused, PacketTooLarge, UnknownSender


def _u32(buf: bytearray | bytes, pos: int) -> int:
    return int.from_bytes(buf[pos : pos + 4], "big")


class FramePeek:
    def __init__(
        self, total: int, *, known: Callable[[str], bool], max_body: int, max_items: int
    ) -> None:
        self.total = total
        self.known = known
        self.max_body = max_body
        self.max_items = max_items
        self.items: list[tuple[int, int]] = []
        self.senders: list[str | None] = []  # claimed sender of each item (None: receipt)
        self._pos = 0  # next offset to judge
        self._left = 0  # items still to come
        self._step = self._start
        self.done = False

    def feed(self, buf: bytearray | bytes, have: int) -> None:
        """``buf[:have]`` has arrived; judge all that can be judged now."""
        while not self.done and self._step(buf, have):
            pass

    def finish(self, buf: bytearray | bytes, have: int) -> None:
        self.feed(buf, have)
        if not self.done:
            raise MalformedPacket(f"request is truncated: {have} of {self.total} bytes")

    # -- steps: each returns True when it moved on, False when it needs more bytes -----------

    def _start(self, buf: bytearray | bytes, have: int) -> bool:
        if have < 4:
            if self.total < 4:
                raise MalformedPacket(f"request of {self.total} bytes is not a Hutong frame")
            return False
        magic = bytes(buf[:4])
        if magic == env.MAGIC_PACKET:
            self._left = 1
            self._frame(0, self.total)
            return True
        if magic != env.MAGIC_BATCH:
            raise MalformedPacket("request is not a Hutong batch or packet (bad magic)")
        if have < 8:
            if self.total < 8:
                raise MalformedPacket("batch is truncated: no item count")
            return False
        count = _u32(buf, 4)
        if count > self.max_items:
            raise PacketTooLarge(f"batch has {count} items, limit {self.max_items}")
        self._left, self._pos = count, 8
        self._step = self._item if count else self._end
        return True

    def _item(self, buf: bytearray | bytes, have: int) -> bool:
        if self.total < self._pos + 4:
            raise MalformedPacket(f"batch item {len(self.items)} is truncated: no length")
        if have < self._pos + 4:
            return False
        n = _u32(buf, self._pos)
        start = self._pos + 4
        if start + n > self.total:
            raise MalformedPacket(
                f"batch item {len(self.items)} of {n} bytes runs past the end of the request"
            )
        self._frame(start, start + n)
        return True

    def _frame(self, start: int, end: int) -> None:
        self.items.append((start, end))
        self.senders.append(None)
        self._pos, self._cur = start, (start, end)
        self._step = self._magic

    def _magic(self, buf: bytearray | bytes, have: int) -> bool:
        start, end = self._cur
        if end - start < 4:
            raise MalformedPacket(f"batch item {len(self.items) - 1} is not a frame")
        if have < start + 4:
            return False
        magic = bytes(buf[start : start + 4])
        if magic in (env.MAGIC_RECEIPT, env.MAGIC_RECEIPT_BATCH):
            limit = 8 + env.MAX_RECEIPT + env.SIG_LEN
            if magic == env.MAGIC_RECEIPT_BATCH:  # position, count, path length, longest path
                limit += 9 + 32 * env.MAX_PATH
            if end - start > limit:
                raise PacketTooLarge(f"receipt is {end - start} bytes, limit {limit}")
            self._step = self._skip
            return True
        if magic != env.MAGIC_PACKET:
            raise MalformedPacket(
                f"batch item {len(self.items) - 1}: expected a packet or receipt frame (bad magic)"
            )
        self._step = self._header
        return True

    def _header(self, buf: bytearray | bytes, have: int) -> bool:
        start, end = self._cur
        limit = min(self.max_body, env.MAX_HEADER)
        if end < start + 8:
            raise MalformedPacket("packet header is truncated: the frame ends before its length")
        if have < start + 8:
            return False
        hlen = _u32(buf, start + 4)
        if hlen > limit:
            raise PacketTooLarge(f"packet header is {hlen} bytes, limit {limit}")
        body_at = start + 8 + hlen
        if end < body_at + 4:
            raise MalformedPacket("packet header is truncated")
        if have < body_at + 4:
            return False
        d = env._object(bytes(buf[start + 8 : body_at]), "packet header", env._HEADER_KEYS)
        sender = d["sender"]
        if not self.known(sender):
            raise UnknownSender(f"sender '{sender[:64]}' is not in the alliance directory")
        self.senders[-1] = sender
        clen = _u32(buf, body_at)
        if clen > self.max_body + env.TAG_LEN:
            raise PacketTooLarge(
                f"packet body is {clen - env.TAG_LEN} bytes, limit {self.max_body}"
            )
        if end < body_at + 4 + clen + env.SIG_LEN:
            raise MalformedPacket("packet body is truncated")
        self._step = self._skip
        return True

    def _skip(self, buf: bytearray | bytes, have: int) -> bool:
        _, end = self._cur
        if have < end:
            return False
        self._left -= 1
        self._pos = end
        self._step = self._item if self._left else self._end
        return True

    def _end(self, buf: bytearray | bytes, have: int) -> bool:
        if self._pos != self.total:
            raise MalformedPacket(
                f"{self.total - self._pos} unexpected bytes after the {len(self.items)} batch items"
            )
        self.done = True
        return False


__all__ = ["FramePeek", "PacketRefused"]
