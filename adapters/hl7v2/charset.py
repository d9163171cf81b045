"""MSH-18 character sets: one table for every HL7 v2 speaker, and decoding before any split.

Why the whole message is decoded before it is split: in GB 18030/GBK and Big5 the second byte
of a two-byte character runs over 0x40-0xFE, which holds ``|`` (0x7C), ``\\`` (0x5C), ``^``
(0x5E) and ``~`` (0x7E): 億 is 83 7C. Splitting bytes on ``|`` would cut such a name in two, so
only decoded text is parsed (:mod:`adapters.hl7v2.fields`).

The declaration sits inside the bytes it describes. :func:`declared` reads MSH-18 (its first
repetition: the message's default character set) from the MSH line: a UTF-16/32 frame is known
by its BOM or its NUL-interleaved ``MSH``; an MSH line with non-ASCII bytes (a facility name in
Chinese) is decoded with UTF-8, then GB 18030, then Big5, keeping the reading whose MSH-18
names that very codec; otherwise bytes are split as they are (exact for single-byte charsets
and UTF-8, whose bytes >= 0x80 never equal a delimiter). An empty MSH-18 means the channel's
``default_charset``.

GBK is decoded as GB 18030, once, everywhere. GB 18030 is the mandatory national standard
(GB 18030-2000/2005/2022) and contains GBK's and GB 2312's two-byte codes unchanged (checked:
every two-byte sequence Python's ``gbk`` decodes, ``gb18030`` decodes to the same character),
so a GBK, CP936, GB2312 or ISO IR58 message loses nothing and a four-byte GB 18030 character
(rare names, 㐀) sent under a GBK label is still read. What we *write* follows the declared
repertoire (``GBK`` -> gbk, ``GB2312`` -> gb2312) so a HIS is never sent a code it cannot read;
a character outside it fails the encode instead.

Mismatch is never stored as mojibake: bytes not valid in the declared charset are refused
(:class:`~adapters.hl7v2.errors.CharsetRefused`, ERR at MSH-18, the reason naming the field
holding them), and valid multi-byte UTF-8 in a message declaring a single-byte charset
(``8859/1``: 张无忌 would read as ``å¼ æ å¿``) is refused the same way, unless the channel's
``charset_override`` says which charset that sender really uses; then the bytes are decoded
with it whatever MSH-18 says (and the ACK is written in it). Under a two-byte declaration
(GB 18030, GBK, Big5...) UTF-8 Chinese often decodes too, into wrong characters; there the
message is refused when it is valid UTF-8 holding at least :data:`UTF8_EVIDENCE` multi-byte
characters (below that, real GB text is valid UTF-8 by chance too often to tell them apart).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

from adapters.hl7v2.errors import CharsetRefused


@dataclass(frozen=True)
class Charset:
    """One MSH-18 value: how to read and write it."""

    name: str  # the canonical MSH-18 spelling (HL7 table 0211 where it has one)
    decoder: str | None  # Python codec; None: a name of the standard with no decoder here
    encoder: str | None
    single_byte: bool = False  # one byte, one character (ASCII, ISO 8859): UTF-8 check applies
    wide: bool = False  # UTF-16/32: not byte-oriented

    def decode(self, raw: bytes) -> str:
        if self.decoder is None:
            raise CharsetRefused(
                f"character set {self.name!r} is known but cannot be decoded here", field="MSH-18"
            )
        return raw.decode(self.decoder)


def _cs(
    name: str,
    decoder: str | None,
    encoder: str | None = "",
    *aliases: str,
    single: bool = False,
    wide: bool = False,
) -> tuple[Charset, tuple[str, ...]]:
    return Charset(name, decoder, decoder if encoder == "" else encoder, single, wide), aliases


#: every MSH-18 name of HL7 table 0211 (v2.1-2.8), the DICOM-style ``ISO IR`` spellings vendors
#: use, and the Chinese vendors' own spellings -> one Charset
_ENTRIES = [
    _cs("ASCII", "ascii", "", "ISO IR6", "US-ASCII", "ISO646", single=True),
    _cs(
        "8859/1",
        "latin-1",
        "",
        "ISO IR100",
        "ISO-8859-1",
        "ISO8859-1",
        "LATIN1",
        "LATIN-1",
        single=True,
    ),
    _cs("8859/2", "iso8859_2", "", "ISO IR101", "ISO-8859-2", single=True),
    _cs("8859/3", "iso8859_3", "", "ISO IR109", "ISO-8859-3", single=True),
    _cs("8859/4", "iso8859_4", "", "ISO IR110", "ISO-8859-4", single=True),
    _cs("8859/5", "iso8859_5", "", "ISO IR144", "ISO-8859-5", single=True),
    _cs("8859/6", "iso8859_6", "", "ISO IR127", "ISO-8859-6", single=True),
    _cs("8859/7", "iso8859_7", "", "ISO IR126", "ISO-8859-7", single=True),
    _cs("8859/8", "iso8859_8", "", "ISO IR138", "ISO-8859-8", single=True),
    _cs("8859/9", "iso8859_9", "", "ISO IR148", "ISO-8859-9", single=True),
    _cs("8859/10", "iso8859_10", "", "ISO IR157", "ISO-8859-10", single=True),
    _cs("8859/11", "iso8859_11", "", "ISO IR166", "ISO-8859-11", single=True),
    _cs("8859/13", "iso8859_13", "", "ISO IR179", "ISO-8859-13", single=True),
    _cs("8859/14", "iso8859_14", "", "ISO IR199", "ISO-8859-14", single=True),
    _cs("8859/15", "iso8859_15", "", "ISO IR203", "ISO-8859-15", single=True),
    _cs("UNICODE UTF-8", "utf-8", "", "UTF-8", "UTF8", "ISO IR192"),
    # table 0211 "UNICODE" (ISO/IEC 10646): a byte-oriented frame is UTF-8, a wide one UTF-16
    _cs("UNICODE", "utf-8"),
    _cs("UNICODE UTF-16", "utf-16", "utf-16", "UTF-16", wide=True),
    _cs("UNICODE UTF-32", "utf-32", "utf-32", "UTF-32", wide=True),
    _cs(
        "GB 18030-2000",
        "gb18030",
        "",
        "GB18030",
        "GB-18030",
        "GB 18030",
        "GB18030-2005",
        "GB18030-2022",
        "CHINESE",
    ),
    _cs("GBK", "gb18030", "gbk", "CP936", "MS936", "WINDOWS-936"),
    _cs("GB2312", "gb18030", "gb2312", "ISO IR58", "GB 2312", "GB2312-80", "EUC-CN"),
    _cs("BIG-5", "big5", "", "BIG5"),
    _cs("CNS 11643-1992", None, None),
    _cs("KS X 1001", "euc_kr", "", "ISO IR149", "EUC-KR", "KS C 5601"),
    _cs("ISO IR87", "iso2022_jp", "", "JIS X 0208", "JIS X 0202", "JAS2020", "ISO-2022-JP"),
    _cs("ISO IR159", "iso2022_jp_1", "", "JIS X 0212"),
    _cs("ISO IR14", "shift_jis", "", "JIS X 0201"),
]


def _key(name: str) -> str:
    return re.sub(r"[\s\-_/.]", "", name.upper())


TABLE: dict[str, Charset] = {}
for _entry, _aliases in _ENTRIES:
    for _n in (_entry.name, *_aliases):
        TABLE[_key(_n)] = _entry
#: every accepted spelling (for docs and tests), canonical names first
NAMES: list[str] = [e.name for e, _ in _ENTRIES] + [a for _, al in _ENTRIES for a in al]
UTF8 = TABLE[_key("UNICODE UTF-8")]
_WIDE_OK = {"UNICODE", "UNICODE UTF-16", "UNICODE UTF-32"}


def lookup(name: str) -> Charset:
    """The Charset for an MSH-18 value or a configured name; CharsetRefused if unknown."""
    try:
        return TABLE[_key(name)]
    except KeyError:
        raise CharsetRefused(
            f"unsupported character set {name.strip()!r}", field="MSH-18"
        ) from None


def check_name(name: str) -> str:
    """For config validation: the name if known (raises ValueError naming it otherwise)."""
    try:
        lookup(name)
    except CharsetRefused as exc:
        raise ValueError(exc.reason) from None
    return name


class Decoded(NamedTuple):
    text: str
    charset: Charset


def _wide(raw: bytes) -> str | None:
    """The codec of a UTF-16/32 frame (BOM or NUL-interleaved ``MSH``), else None."""
    for prefix, codec in (
        (b"\xff\xfe\x00\x00", "utf-32"),
        (b"\x00\x00\xfe\xff", "utf-32"),
        (b"\xff\xfe", "utf-16"),
        (b"\xfe\xff", "utf-16"),
        (b"M\x00\x00\x00S\x00\x00\x00", "utf-32-le"),
        (b"\x00\x00\x00M\x00\x00\x00S", "utf-32-be"),
        (b"M\x00S\x00H\x00", "utf-16-le"),
        (b"\x00M\x00S\x00H", "utf-16-be"),
    ):
        if raw.startswith(prefix):
            return codec
    return None


def _msh18_of(msh: str) -> str:
    if len(msh) < 4 or not msh.startswith("MSH"):
        return ""
    sep = msh[3]
    rep = msh[5] if len(msh) > 5 and msh[5] != sep else "~"
    parts = msh.split(sep)  # parts[n - 1] is MSH-n (MSH-1 is the separator itself)
    return parts[17].split(rep)[0] if len(parts) > 17 else ""


def _strip_head(raw: bytes) -> bytes:
    head = raw.lstrip(b"\r\n\t \x0b")
    return head[3:] if head.startswith(b"\xef\xbb\xbf") else head


def declared(raw: bytes) -> str:
    """MSH-18 as written (first repetition), "" when absent or unreadable."""
    wide = _wide(raw)
    if wide is not None:
        try:
            text = raw.decode(wide).lstrip("\ufeff")
        except UnicodeDecodeError:
            return ""
        return _msh18_of(re.split(r"[\r\n]", text, maxsplit=1)[0])
    head = _strip_head(raw)
    msh = re.split(rb"[\r\n]", head, maxsplit=1)[0]
    if msh.isascii():
        return _msh18_of(msh.decode("ascii"))
    for codec in ("utf-8", "gb18030", "big5"):
        try:
            value = _msh18_of(msh.decode(codec))
        except UnicodeDecodeError:
            continue
        found = TABLE.get(_key(value)) if value.strip() else None
        if found is not None and found.decoder == codec:
            return value
    return _msh18_of(msh.decode("latin-1"))  # the decode below names any problem


def _where(raw: bytes, offset: int, codec: str) -> str:
    """``PID-5``: the field holding byte ``offset`` (for naming, never quoting, bad bytes)."""
    text = raw[:offset].decode(codec, "replace").replace("\r\n", "\r").replace("\n", "\r")
    text = text.lstrip("\ufeff\r\t \x0b")
    if not text.startswith("MSH") or len(text) < 4:
        return "MSH"
    sep = text[3]
    seg = text.split("\r")[-1]
    name = seg[:3]
    if not re.fullmatch(r"[A-Z][A-Z0-9]{2}", name):
        return "MSH"
    n = seg.count(sep)
    return f"{name}-{n + 1 if name == 'MSH' else n}"


def _first_multibyte(raw: bytes) -> int:
    for i, b in enumerate(raw):
        if b >= 0x80:
            return i
    return 0


#: UTF-8 characters above which a message declaring a two-byte charset (GB 18030, GBK, Big5,
#: KS X 1001, Shift JIS) but valid as UTF-8 is taken for UTF-8: real GB 2312 text is valid
#: UTF-8 by chance for 18% of single characters, 3% of pairs, 0.6% of three, under 0.1% of
#: four (measured on random common hanzi); below that the bytes are read as declared
UTF8_EVIDENCE = 4


def _refuse_utf8(raw: bytes, cs: Charset, said: str) -> None:
    """Refuse UTF-8 text sent under a legacy declaration (it would be stored as mojibake)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return
    many = sum(1 for ch in text if ord(ch) > 0x7F)
    if not cs.single_byte and many < UTF8_EVIDENCE:
        return
    at = _where(raw, _first_multibyte(raw), "utf-8")
    kind = "single-byte" if cs.single_byte else "two-byte"
    raise CharsetRefused(
        f"{at} holds multi-byte UTF-8 text but {said} is the {kind} "
        f"{cs.name} (set the channel's charset_override if this sender really "
        "sends UTF-8)",
        field="MSH-18",
    )


def decode(raw: bytes, default: str = "UNICODE UTF-8", override: str | None = None) -> Decoded:
    """The text of one message and the Charset it was read with.

    ``default`` applies when MSH-18 is empty; ``override`` (a channel's ``charset_override``)
    wins over MSH-18. Raises :class:`CharsetRefused` (AR, ERR at MSH-18, reason naming the
    field holding the bytes) for an unknown name, bytes not valid in the charset, a UTF-16
    frame declared otherwise, or multi-byte UTF-8 under a single-byte declaration.
    Line ends are normalised to CR; a UTF-8 BOM is dropped.
    """
    name = declared(raw)
    if override:
        cs, said = lookup(override), f"charset_override {override!r}"
    else:
        cs = lookup(name) if name.strip() else lookup(default)
        said = f"MSH-18 {name.strip()!r}" if name.strip() else f"default charset {default!r}"
    wide = _wide(raw)
    if wide is not None:
        if cs.name not in _WIDE_OK:
            raise CharsetRefused(
                f"the message is {wide.upper()} but {said} says otherwise", field="MSH-18"
            )
        codec = wide
    elif cs.wide:
        raise CharsetRefused(
            f"{said} declares {cs.name} but the bytes are not UTF-16/32", field="MSH-18"
        )
    else:
        codec = cs.decoder or ""
    if not codec:
        cs.decode(raw)  # raises: known name, no decoder
    try:
        text = raw.decode(codec)
    except UnicodeDecodeError as exc:
        raise CharsetRefused(
            f"{_where(raw, exc.start, codec)} holds bytes that are not valid "
            f"{cs.name} (byte {exc.start}); {said}",
            field="MSH-18",
        ) from None
    if not override and not raw.isascii() and codec not in ("utf-8", "utf-8-sig") and wide is None:
        _refuse_utf8(raw, cs, said)
    text = text.lstrip("\ufeff").replace("\r\n", "\r").replace("\n", "\r")
    return Decoded(text.strip("\r\x0b\x1c \t"), cs)


def encode(text: str, charset: Charset | str, errors: str = "strict") -> bytes:
    """Text in a charset (a Charset or an MSH-18 name); strict unless told otherwise."""
    cs = lookup(charset) if isinstance(charset, str) else charset
    if cs.encoder is None:
        raise CharsetRefused(f"character set {cs.name!r} cannot be written here", field="MSH-18")
    return text.encode(cs.encoder, errors)
