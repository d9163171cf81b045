"""HL7 v2 acknowledgements (original mode) for every listener: AA, or AE/AR with MSA-3 and ERR.

ERR follows the answered message's version: v2.5+ fills ERR-2 (location ``SEG^1^field^1^comp``),
ERR-3 (table 0357 code), ERR-4 (severity E) and ERR-8 (the reason); v2.1-v2.4 put
``SEG^1^field^code&text`` in ERR-1. Free text is escaped, so a reason holding ``|`` or ``^``
cannot break the ACK. The ACK echoes the message's MSH-18 and is encoded in the charset the
message was read with (:func:`encode`). :func:`read_ack` reads an ACK a peer sent us.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from datetime import datetime

from adapters.hl7v2 import build, charset, fields
from adapters.hl7v2.errors import ERROR_TEXT, V2Error

_LOCATION = re.compile(r"^([A-Z][A-Z0-9]{2})(?:\[(\d+)\])?(?:-(\d+))?(?:\.(\d+))?")
_OLD_ERR = ("2.1", "2.2", "2.3", "2.3.1", "2.4")


@dataclass(frozen=True)
class Answering:
    """What an ACK echoes from the message it answers (from MSH, parsed or sniffed)."""

    sending_app: str = ""
    sending_facility: str = ""
    receiving_app: str = ""
    receiving_facility: str = ""
    control_id: str = ""
    processing_id: str = "P"
    version: str = "2.5.1"
    trigger: str = ""
    charset: str = ""  # MSH-18 as written

    @classmethod
    def from_raw(cls, raw: bytes) -> Answering:
        """Best effort from undecoded bytes (the message may be unreadable): MSH fields read
        only while they are plain ASCII (a later byte could be a GBK trail byte)."""
        f = sniff_msh(raw)
        if f is None or len(f[2]) < 1:
            return cls()
        comp = f[2][0]
        version = f[12].split(comp)[0]
        return cls(
            f[3].split(comp)[0],
            f[4].split(comp)[0],
            f[5].split(comp)[0],
            f[6].split(comp)[0],
            f[10],
            f[11] or "P",
            version if version in fields.VERSIONS else "2.5.1",
            (f[9].split(comp) + ["", ""])[1],
            _usable(charset.declared(raw)),
        )

    @classmethod
    def from_message(cls, msg: fields.Message) -> Answering:
        msh = msg.segment("MSH")
        v = fields.value
        version = v(msh, 12)
        return cls(
            v(msh, 3),
            v(msh, 4),
            v(msh, 5),
            v(msh, 6),
            v(msh, 10),
            v(msh, 11) or "P",
            version if version in fields.VERSIONS else "2.5.1",
            v(msh, 9, 2),
            v(msh, 18),
        )

    def with_charset(self, name: str) -> Answering:
        return replace(self, charset=name)


def _usable(name: str) -> str:
    """MSH-18 to echo in an ACK written before (or without) decoding: only a name the ACK's
    bytes can honour (an unknown or undecodable one is left out, the ACK is ASCII)."""
    try:
        cs = charset.lookup(name) if name.strip() else None
    except V2Error:
        return ""
    return name if cs is not None and cs.decoder is not None and not cs.wide else ""


def sniff_msh(raw: bytes, last_field: int = 18) -> list[str] | None:
    """MSH-0 .. MSH-``last_field`` from undecoded bytes, or None if that cannot be done safely.

    Index ``i`` is MSH-i (0 is "MSH"); missing trailing fields are "". A field after the first
    non-ASCII byte is "" (its separators could be trail bytes).
    """
    start = raw.lstrip(b"\r\n\t \x0b")
    if start.startswith(b"\xef\xbb\xbf"):
        start = start[3:]
    if len(start) < 4 or start[:3] != b"MSH":
        return None
    sep = start[3]
    if sep >= 0x80 or sep in b"\r\n":
        return None
    out: list[str] = ["MSH", chr(sep)]
    current = bytearray()
    for byte in start[4:]:
        if byte in (0x0D, 0x0A):
            break
        if byte >= 0x80:
            current.clear()
            break
        if byte == sep:
            out.append(current.decode("ascii"))
            current.clear()
            if len(out) > last_field:
                return out[: last_field + 1]
            continue
        current.append(byte)
    out.append(current.decode("ascii"))
    out.extend("" for _ in range(last_field + 1 - len(out)))
    return out[: last_field + 1]


def build_ack(
    to: Answering,
    code: str,
    *,
    at: datetime,
    error: V2Error | None = None,
    control_id: str | None = None,
    app: str | None = None,
    facility: str | None = None,
) -> str:
    """The ACK text (segments joined by CR). MSH-3/4 are ``app``/``facility`` when given, else
    the answered message's receiving application and facility."""
    esc = build.esc
    msh = build.msh(
        esc(app if app is not None else to.receiving_app),
        esc(facility if facility is not None else to.receiving_facility),
        esc(to.sending_app),
        esc(to.sending_facility),
        build.ts(at),
        "",
        build.comp("ACK", esc(to.trigger), "ACK") if to.trigger else "ACK",
        esc(control_id or build.control_id()),
        esc(to.processing_id) or "P",
        esc(to.version),
        "",
        "",
        "",
        "",
        "",
        esc(to.charset),
    )
    msa = ["MSA", code, esc(to.control_id)]
    segments = [msh, "|".join(msa)]
    if error is not None:
        segments[1] += "|" + esc(error.message[:200])
        segments.append(err_segment(to.version, error))
    return build.message(segments)


def err_segment(version: str, error: V2Error) -> str:
    seg = seq = field = component = ""
    m = _LOCATION.match(error.field or "")
    if m:
        seg, seq, field, component = (
            m.group(1),
            m.group(2) or "1",
            m.group(3) or "",
            m.group(4) or "",
        )
    code = error.hl7_error
    text = ERROR_TEXT.get(code, "")
    if version in _OLD_ERR:
        return f"ERR|{seg}^{seq}^{field}^{code}&{build.esc(text)}"
    location = build.comp(seg, seq, field, "1" if component else "", component) if seg else ""
    return build.segment(
        "ERR",
        "",
        location,
        build.comp(code, build.esc(text), "HL70357"),
        "E",
        "",
        "",
        "",
        build.esc(error.message[:200]),
    )


def encode(ack: str, cs: charset.Charset | None) -> bytes:
    """The ACK's bytes in the charset the message was read with (ASCII when unknown); a
    character the charset lacks (an echoed name) is replaced, never raised."""
    return charset.encode(ack, cs or charset.lookup("ASCII"), errors="replace")


def read_ack(raw: bytes, default: str = "UNICODE UTF-8") -> tuple[str, str, str]:
    """(MSA-1, MSA-2, ERR-8 or else MSA-3) of an ACK a peer sent us."""
    text, cs = charset.decode(raw, default)
    msg = fields.parse(text, cs)
    msa = msg.segment("MSA") if msg.segments("MSA") else None
    if msa is None:
        return "", "", "no MSA segment"
    errs = msg.segments("ERR")
    why = fields.value(errs[0], 8) if errs else ""
    return fields.value(msa, 1), fields.value(msa, 2), why or fields.value(msa, 3)


def ack_code_of(ack: str | bytes) -> str:
    """MSA-1 of an ACK, as text or as the bytes received (for logs, tests and simulators)."""
    if isinstance(ack, bytes):
        try:
            return read_ack(ack)[0]
        except V2Error:  # MSA-1 is ASCII: read it even when the rest does not decode
            ack = ack.decode("latin-1")
    msg = fields.parse(ack)
    return fields.value(msg.segment("MSA"), 1) if msg.segments("MSA") else ""
