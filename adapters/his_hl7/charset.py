"""MSH-18 character sets: decode the bytes of a v2 message before anything splits them.

GB18030/GBK trail bytes run 0x40-0x7E, so one Chinese character can hold a byte equal to ``|``
(億 = 83 7C), ``\\`` (乗 = 81 5C), ``^`` (乛 = 81 5E) or ``~`` (亊 = 81 7E). Splitting the bytes
first would cut such a name in half; so the whole message is decoded with the declared charset
and only the text is parsed. The MSH segment itself may carry Chinese (a facility name), so
the declaration is found by decoding MSH with each candidate and keeping the one that names
itself in MSH-18.
"""

from __future__ import annotations

#: HL7 table 0211 values (and the spellings Chinese vendors use) -> Python codec
CHARSETS: dict[str, str] = {
    "ASCII": "ascii",
    "8859/1": "latin-1",
    "UNICODE UTF-8": "utf-8",
    "UTF-8": "utf-8",
    "UTF8": "utf-8",
    "GB 18030-2000": "gb18030",
    "GB18030": "gb18030",
    "GB 18030": "gb18030",
    "GBK": "gbk",
    "GB2312": "gbk",  # GBK is a superset; a GB2312 sender never emits a byte GBK reads otherwise
    "CP936": "gbk",
}

#: what we write in MSH-18 for a codec
DECLARE: dict[str, str] = {"utf-8": "UNICODE UTF-8", "gb18030": "GB 18030-2000", "gbk": "GBK",
                           "ascii": "ASCII", "latin-1": "8859/1"}

#: tried, in order, when MSH holds non-ASCII bytes
CANDIDATES = ("utf-8", "gb18030")


class CharsetError(Exception):
    """The bytes do not decode with the declared (or default) character set."""

    def __init__(self, reason: str, declared: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.declared = declared


def codec_for(declared: str, default: str) -> str:
    """The Python codec for an MSH-18 value ('' -> the channel default)."""
    name = declared.strip().upper()
    if not name:
        return default
    try:
        return CHARSETS[name]
    except KeyError:
        raise CharsetError(f"MSH-18 names an unknown character set {declared.strip()!r}",
                           declared) from None


def _msh18(msh_text: str) -> str:
    if len(msh_text) < 8 or not msh_text.startswith("MSH"):
        return ""
    sep, rep = msh_text[3], msh_text[5] if len(msh_text) > 5 else "~"
    parts = msh_text.split(sep)
    # parts[0] = 'MSH', parts[1] = encoding characters (MSH-2), so MSH-n = parts[n - 1]
    value = parts[17] if len(parts) > 17 else ""
    return value.split(rep)[0]  # MSH-18 repeats: the first is the default character set


def declared_charset(raw: bytes) -> str:
    """MSH-18 as written (first repetition), '' when absent."""
    head = raw.lstrip(b"\r\n")
    msh = head.split(b"\r", 1)[0].split(b"\n", 1)[0]
    if msh.isascii():
        return _msh18(msh.decode("ascii"))
    for codec in CANDIDATES:
        try:
            value = _msh18(msh.decode(codec))
        except UnicodeDecodeError:
            continue
        if value and CHARSETS.get(value.strip().upper()) == codec:
            return value
    return _msh18(msh.decode("latin-1"))  # best effort: the decode below reports the problem


def decode(raw: bytes, default: str = "utf-8") -> tuple[str, str]:
    """(text, codec) of one message; CharsetError when the bytes do not fit the declaration."""
    declared = declared_charset(raw)
    codec = codec_for(declared, default)
    try:
        return raw.decode(codec), codec
    except UnicodeDecodeError as exc:
        what = f"MSH-18 {declared.strip()!r}" if declared.strip() else f"default {codec}"
        raise CharsetError(f"bytes at offset {exc.start} are not valid {codec} ({what})",
                           declared) from None


def encode(text: str, codec: str) -> bytes:
    return text.encode(codec)
