"""Turn raw MLLP payload bytes into text, choosing the character set before anything is parsed.

Why bytes are never split before decoding: in GBK/GB18030 the second byte of a two-byte character
ranges over 0x40-0xFE, which includes ``|`` (0x7C), ``\\`` (0x5C), ``^`` (0x5E) and ``~`` (0x7E).
A name such as 億 (0x83 0x7C) would be cut in two by a byte-level split on ``|``. So the whole
message is decoded first and only the resulting ``str`` is parsed.

The charset itself is declared in MSH-18, which sits *inside* the bytes we cannot yet decode. It is
read with :func:`sniff_msh`, which walks the MSH segment byte by byte and gives up as soon as it
meets a byte >= 0x80 before the field it wants: from then on a separator might be a trail byte.
MSH-1 to MSH-17 are ASCII in practice, so this nearly always works; when it does not, the
channel's configured default applies. Empty MSH-18 (very common in Chinese LIS) also means the
channel default.
"""

from __future__ import annotations

from adapters.lis.errors import EncodingError, Rejected

#: MSH-18 values (upper case, spaces/hyphens/underscores removed) -> Python codec.
#: GB2312 and GBK are subsets of GB18030, so decoding them as GB18030 never loses a character.
_CHARSETS = {
    "UNICODEUTF8": "utf-8",
    "UTF8": "utf-8",
    "ASCII": "ascii",
    "8859/1": "latin-1",
    "88591": "latin-1",
    "ISO88591": "latin-1",
    "GB180302000": "gb18030",
    "GB18030": "gb18030",
    "GBK": "gb18030",
    "GB2312": "gb18030",
    "CHINESE": "gb18030",
    "ISOIR58": "gb18030",  # the v2 table 0211 name for GB 2312
}


def codec_for(charset: str) -> str:
    """Python codec for an MSH-18 value or a channel default; :class:`EncodingError` if unknown."""
    key = charset.strip().upper().replace(" ", "").replace("-", "").replace("_", "")
    try:
        return _CHARSETS[key]
    except KeyError:
        raise EncodingError(f"unsupported character set {charset.strip()!r}",
                            field="MSH-18") from None


def sniff_msh(raw: bytes, last_field: int = 18) -> list[str] | None:
    """MSH-1 .. MSH-``last_field`` read from undecoded bytes, or None if that cannot be done safely.

    Index ``i`` of the result is MSH-i (index 0 is "MSH"). Missing trailing fields are "". Returns
    None when the bytes do not start with ``MSH`` or when a non-ASCII byte appears before the end
    of the wanted field (a separator after it could be a GBK trail byte).
    """
    start = raw.lstrip(b"\r\n\t \x0b")
    if len(start) < 4 or start[:3] != b"MSH":
        return None
    sep = start[3]
    if sep >= 0x80 or sep in b"\r\n":
        return None
    fields: list[str] = ["MSH", chr(sep)]
    current = bytearray()
    for byte in start[4:]:
        if byte in (0x0D, 0x0A):
            break
        if byte >= 0x80:
            return None
        if byte == sep:
            fields.append(current.decode("ascii"))
            current.clear()
            if len(fields) > last_field:
                return fields[: last_field + 1]
            continue
        current.append(byte)
    fields.append(current.decode("ascii"))
    fields.extend("" for _ in range(last_field + 1 - len(fields)))
    return fields[: last_field + 1]


def charset_of(raw: bytes, default_charset: str) -> str:
    """The Python codec for these bytes: MSH-18 (first repetition) if readable, else the default."""
    fields = sniff_msh(raw)
    declared = ""
    if fields is not None and len(fields[2]) >= 2:
        declared = fields[18].split(fields[2][1])[0].split(fields[2][0])[0]
    return codec_for(declared) if declared.strip() else codec_for(default_charset)


def decode_message(raw: bytes, default_charset: str) -> tuple[str, str]:
    """Decode a whole v2 message to ``str``; returns (text, codec).

    Raises :class:`EncodingError` (naming the charset) when the bytes do not decode and
    :class:`Rejected` when the message does not start with an MSH segment. Line endings are
    normalised to CR, the v2 segment terminator. The version and structure are checked on the
    parsed message (:mod:`adapters.lis.oru`), not here.
    """
    codec = charset_of(raw, default_charset)
    try:
        text = raw.decode(codec)
    except UnicodeDecodeError as exc:
        raise EncodingError(f"message does not decode as {codec} (byte {exc.start}: "
                            f"{exc.reason})", field="MSH-18") from None
    text = text.replace("\r\n", "\r").replace("\n", "\r").strip("\r\x0b\x1c \t")
    if not text.startswith("MSH") or len(text) < 8:
        raise Rejected("message does not start with an MSH segment", field="MSH")
    return text, codec
