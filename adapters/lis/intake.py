"""Bytes from the LIS -> a checked message: charset (kit), parse (MSH-2), header (ORU^R01, 2.1-2.8).

One entry point for the adapter, the fuzz target, the bench and the tests, so they all read a
message the way the listener does; refusals are the LIS's own errors (:mod:`.errors`).
"""

from __future__ import annotations

from adapters.hl7v2 import charset
from adapters.hl7v2.charset import Charset
from adapters.hl7v2.fields import Message
from adapters.lis.errors import kit_errors
from adapters.lis.oru import Header, header, parse


@kit_errors
def decode(raw: bytes, default_charset: str, override: str | None = None) -> tuple[str, Charset]:
    """(text, charset) of one message (see :func:`adapters.hl7v2.charset.decode`)."""
    return charset.decode(raw, default_charset, override)


def read(
    raw: bytes, default_charset: str = "UNICODE UTF-8", override: str | None = None
) -> tuple[Message, Header, Charset]:
    """Decode, parse and check the header of one message."""
    text, cs = decode(raw, default_charset, override)
    msg = parse(text, cs)
    return msg, header(msg), cs
