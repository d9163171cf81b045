"""The third-party corpus (tests/fixtures/hl7v2-corpus) as a sender would put it on the wire.

Each file is split into messages (a new message at every ``MSH`` segment; batch envelopes
FHS/BHS/BTS/FTS dropped), segment ends normalised to CR, a UTF-8 byte order mark dropped, one
message per MLLP frame; the bytes are kept otherwise (MSH-2 as written, odd delimiters too).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

CORPUS = Path(__file__).parent / "fixtures" / "hl7v2-corpus"
BATCH = (b"FHS", b"BHS", b"BTS", b"FTS")


def split(raw: bytes) -> list[bytes]:
    """The messages of one file, each with CR segment ends (and a final CR)."""
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    lines = raw.replace(b"\r\n", b"\r").replace(b"\n", b"\r").split(b"\r")
    messages: list[list[bytes]] = []
    for line in lines:
        if not line.strip() or line[:3] in BATCH:
            continue
        if line.startswith(b"MSH"):
            messages.append([line])
        elif messages:
            messages[-1].append(line)
    return [b"\r".join(m) + b"\r" for m in messages]


def message_type(message: bytes) -> tuple[str, str]:
    """(MSH-9.1, MSH-9.2) read with the message's own delimiters ('' when absent)."""
    msh = message.split(b"\r", 1)[0].decode("latin-1")
    if len(msh) < 8:
        return "", ""
    fields = msh.split(msh[3])
    comp = msh[4]
    parts = fields[8].split(comp) if len(fields) > 8 else [""]
    return parts[0], parts[1] if len(parts) > 1 else ""


def his_messages() -> Iterator[tuple[str, int, bytes]]:
    """(file relative to the corpus, index in the file from 0, bytes) of every ADT, REF and
    RRI message, in a stable order."""
    for path in sorted(CORPUS.rglob("*")):
        if not path.is_file() or path.name.startswith(("README", "LICENSE")):
            continue
        for i, message in enumerate(split(path.read_bytes())):
            if message_type(message)[0] in ("ADT", "REF", "RRI"):
                yield str(path.relative_to(CORPUS)), i, message
