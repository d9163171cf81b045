"""Typed field readers for HL7 v2.1-2.8: parse once, split first, unescape each leaf after.

:func:`parse` checks MSH-1/MSH-2 (4 or 5 distinct printable delimiters that are neither letters,
digits nor spaces: a space as escape character would eat the words of an address) and splits
segments -> fields -> repetitions -> components -> subcomponents. Escapes are replaced only in
the leaf a reader asks for, after splitting, so ``\\F\\`` is a ``|`` inside a value and never a
field boundary: ``\\F\\ \\S\\ \\T\\ \\R\\ \\E\\ \\P\\`` -> the delimiters, ``\\Xhh..\\`` -> those
bytes in the message's charset, ``\\.br\\`` -> newline (``\\.sp\\``: blank lines, ``\\.sk N\\``:
spaces, other formatting commands and ``\\H\\ \\N\\`` dropped), a local ``\\Z..\\`` kept as
written, an unterminated or empty escape refused naming the field.

The HL7 null ``""`` ("delete this value") is kept distinct from an empty field ("not sent"):
:func:`value` returns :data:`NULL`, which equals ``""`` (so code that only wants text sees
nothing) but :func:`is_null` tells it apart.

Times: :func:`dtm` reads DTM/TS at every precision (YYYY, YYYYMM, ... seconds, fraction) with
or without an offset; :func:`fhir_datetime` keeps that precision for FHIR.
Versions 2.1 through 2.8 are read (:data:`VERSIONS`): their differences are field-level.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import lru_cache

from adapters.hl7v2.charset import UTF8, Charset
from adapters.hl7v2.errors import (
    BadEncodingChars,
    BadValue,
    MissingValue,
    V2Rejected,
    VersionRefused,
)

#: MSH-12 values read (VID.1); 2.9 and later, and 2.0 or invented ones, are refused
VERSIONS = (
    "2.1",
    "2.2",
    "2.3",
    "2.3.1",
    "2.4",
    "2.5",
    "2.5.1",
    "2.6",
    "2.7",
    "2.7.1",
    "2.8",
    "2.8.1",
    "2.8.2",
)


class _Null(str):
    """The HL7 null ``""``: equal to "" but distinguishable (:func:`is_null`)."""

    def __repr__(self) -> str:
        return "NULL"


NULL = _Null("")


def is_null(v: object) -> bool:
    return v is NULL


@dataclass(frozen=True)
class Delimiters:
    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"
    truncation: str = ""  # v2.7+: MSH-2 may carry a fifth character

    @property
    def msh2(self) -> str:
        return self.component + self.repetition + self.escape + self.subcomponent + self.truncation


DEFAULT = Delimiters()


def delimiters(text: str) -> Delimiters:
    """MSH-1 and MSH-2 of a message, checked; :class:`BadEncodingChars` (AR) otherwise."""
    if not text.startswith("MSH") or len(text) < 8:
        raise V2Rejected("message does not start with an MSH segment", field="MSH")
    sep = text[3]
    end = text.find(sep, 4)
    line_end = min(i for i in (text.find("\r", 4), len(text)) if i >= 0)
    chars = text[4:end] if 0 <= end < line_end else text[4:line_end]

    def usable(c: str) -> bool:
        return "!" <= c <= "~" and not c.isalnum()

    if not usable(sep):
        raise BadEncodingChars(
            "MSH-1 field separator must be a printable character other "
            "than a letter, digit or space",
            field="MSH-1",
        )
    if (
        len(chars) not in (4, 5)
        or not all(usable(c) for c in chars)
        or len(set(chars + sep)) != len(chars) + 1
    ):
        raise BadEncodingChars(
            "MSH-2 must be 4 or 5 distinct printable characters, none a "
            "letter, digit, space or the field separator",
            field="MSH-2",
        )
    return Delimiters(sep, chars[0], chars[1], chars[2], chars[3], chars[4:5])


class Segment:
    """One segment; ``seg[n]`` is field n as written (``seg[0]`` the name, ``MSH[1]`` the
    field separator, ``MSH[2]`` the encoding characters), "" past the end."""

    __slots__ = ("charset", "d", "fields", "name")

    def __init__(self, fields: list[str], d: Delimiters, charset: Charset) -> None:
        self.name = fields[0]
        self.fields = fields
        self.d = d
        self.charset = charset

    def __getitem__(self, n: int) -> str:
        return self.fields[n] if n < len(self.fields) else ""

    def __call__(self, n: int) -> str:
        return self[n]

    def __len__(self) -> int:
        return len(self.fields)

    def __str__(self) -> str:
        if self.name == "MSH":
            return "MSH" + self.d.field + self.d.field.join(self.fields[2:])
        return self.d.field.join(self.fields)

    def __repr__(self) -> str:
        return f"<Segment {self.name}>"


class Message:
    """A parsed v2 message: its segments in order, its delimiters and charset."""

    def __init__(self, segments: list[Segment], d: Delimiters, charset: Charset) -> None:
        self.segments_ = segments
        self.d = d
        self.charset = charset

    def __iter__(self) -> Iterator[Segment]:
        return iter(self.segments_)

    def __len__(self) -> int:
        return len(self.segments_)

    def __str__(self) -> str:
        return "\r".join(str(s) for s in self.segments_)

    def segment(self, name: str) -> Segment:
        """The first segment with this name (KeyError when there is none)."""
        for s in self.segments_:
            if s.name == name:
                return s
        raise KeyError(name)

    def segments(self, name: str) -> list[Segment]:
        return [s for s in self.segments_ if s.name == name]


def parse(text: str, charset: Charset = UTF8) -> Message:
    """Split a decoded message (segments end with CR; LF and CRLF are taken too)."""
    text = text.replace("\r\n", "\r").replace("\n", "\r").strip("\r\x0b\x1c \t\ufeff")
    d = delimiters(text)
    out: list[Segment] = []
    for line in text.split("\r"):
        if not line.strip():
            continue
        if line.startswith("MSH") and len(line) > 3 and line[3] == d.field:
            parts = line.split(d.field)
            fields = ["MSH", d.field, *parts[1:]]
        else:
            fields = line.split(d.field)
        if not re.fullmatch(r"[A-Z][A-Z0-9]{2}", fields[0]):
            raise V2Rejected(
                f"segment {len(out) + 1} does not start with a segment id",
                field=f"segment {len(out) + 1}",
            )
        out.append(Segment(fields, d, charset))
    return Message(out, d, charset)


# -- leaves ---------------------------------------------------------------------------------


def raw_leaf(
    seg: Segment, field: int, component: int = 1, rep: int = 1, sub: int = 1
) -> str | None:
    """A leaf as written (escapes not replaced), None when the path is absent."""
    text = seg[field]
    if seg.name == "MSH" and field in (1, 2):
        return text if component == rep == sub == 1 else None
    d = seg.d
    if d.repetition not in text and d.component not in text and d.subcomponent not in text:
        # most leaves: one value, no separator (the splits below would each give [text])
        return text if rep == component == sub == 1 else None
    reps_ = text.split(d.repetition)
    if rep > len(reps_):
        return None
    comps = reps_[rep - 1].split(d.component)
    if component > len(comps):
        return None
    subs = comps[component - 1].split(d.subcomponent)
    if sub > len(subs):
        return None
    return subs[sub - 1]


def where(seg_name: str, index: int, field: int, component: int | None = None) -> str:
    """``OBX[3]-5.2``: the segment's position among its kind, for errors and ERR-2."""
    comp = f".{component}" if component else ""
    return f"{seg_name}[{index}]-{field}{comp}" if index else f"{seg_name}-{field}{comp}"


def value(
    seg: Segment, field: int, component: int = 1, rep: int = 1, sub: int = 1, *, strip: bool = True
) -> str:
    """One leaf, unescaped; "" when absent, :data:`NULL` for ``""``. Stripped of outer
    spaces unless ``strip=False``."""
    leaf = raw_leaf(seg, field, component, rep, sub)
    if not leaf:
        return ""
    if leaf == '""':
        return NULL
    if seg.name == "MSH" and field in (1, 2):
        return leaf
    out = (
        unescape(leaf, seg.d, seg.charset, at=f"{seg.name}-{field}")
        if seg.d.escape in leaf
        else leaf
    )
    return out.strip() if strip else out


def rep_text(seg: Segment, field: int, rep: int = 1, *, strip: bool = True) -> str:
    """A whole repetition as text (a TX/FT/ST value): escapes replaced, any component or
    subcomponent separators written in it kept as they are; "" when absent, NULL for ``""``."""
    text = seg[field]
    if not text:
        return ""
    parts = text.split(seg.d.repetition)
    if rep > len(parts) or not parts[rep - 1]:
        return ""
    if parts[rep - 1] == '""':
        return NULL
    out = unescape(parts[rep - 1], seg.d, seg.charset, at=f"{seg.name}-{field}")
    return out.strip() if strip else out


def reps(seg: Segment, field: int) -> int:
    """How many repetitions a field has (0 when absent or empty)."""
    text = seg[field]
    if not text:
        return 0
    if seg.name == "MSH" and field in (1, 2):
        return 1
    return len(text.split(seg.d.repetition))


def rep_values(seg: Segment, field: int, component: int = 1) -> list[str]:
    """The non-empty values of every repetition of a field (one component of each)."""
    return [
        v for v in (value(seg, field, component, r) for r in range(1, reps(seg, field) + 1)) if v
    ]


def need(
    seg: Segment,
    field: int,
    component: int = 1,
    rep: int = 1,
    what: str = "",
    *,
    strip: bool = False,
) -> str:
    """A leaf that must hold a value (:class:`MissingValue` naming it otherwise)."""
    v = value(seg, field, component, rep, strip=strip)
    if not v.strip():
        at = f"{seg.name}-{field}" + (f".{component}" if component > 1 else "")
        raise MissingValue(f"required field is empty{f' ({what})' if what else ''}", field=at)
    return v


_FORMAT = {".fi": "", ".nf": "", ".ce": "\n", "H": "", "N": ""}


def unescape(
    leaf: str, d: Delimiters = DEFAULT, charset: Charset = UTF8, *, at: str | None = None
) -> str:
    """Replace the escape sequences of one leaf (HL7 v2 section 2.7)."""
    esc = d.escape
    if esc not in leaf:
        return leaf
    out: list[str] = []
    i = 0
    while i < len(leaf):
        c = leaf[i]
        if c != esc:
            out.append(c)
            i += 1
            continue
        end = leaf.find(esc, i + 1)
        if end < 0:
            raise BadValue("unterminated escape sequence", field=at)
        seq = leaf[i + 1 : end]
        i = end + 1
        simple = {
            "F": d.field,
            "S": d.component,
            "T": d.subcomponent,
            "R": d.repetition,
            "E": esc,
            "P": d.truncation,
        }
        if not seq:
            raise BadValue("empty escape sequence", field=at)
        if simple.get(seq):
            out.append(simple[seq])
        elif seq in _FORMAT:
            out.append(_FORMAT[seq])
        elif seq == ".br":
            out.append("\n")
        elif re.fullmatch(r"\.sp\s*\d*", seq):
            out.append("\n" * int(seq[3:].strip() or "1"))
        elif re.fullmatch(r"\.sk\s*\d*", seq):
            out.append(" " * int(seq[3:].strip() or "1"))
        elif re.fullmatch(r"\.(in|ti)\s*[+-]?\d*", seq):
            pass  # indentation: presentation only
        elif seq[0] == "X":
            hexes = seq[1:]
            if not re.fullmatch(r"(?:[0-9A-Fa-f]{2})+", hexes):
                raise BadValue("\\X\\ escape is not an even number of hex digits", field=at)
            try:
                out.append(charset.decode(bytes.fromhex(hexes)))
            except (UnicodeDecodeError, ValueError):
                raise BadValue(
                    f"\\X\\ escape bytes are not valid {charset.name}", field=at
                ) from None
        elif seq[0] in "CM":
            raise BadValue(
                "character set switch escapes (\\C..\\, \\M..\\) are not supported", field=at
            )
        else:  # \Z..\ (locally defined) and anything unknown: kept as written
            out.append(esc + seq + esc)
    return "".join(out)


# -- MSH --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Header:
    sending_app: str  # MSH-3.1
    sending_facility: str  # MSH-4.1
    receiving_app: str
    receiving_facility: str
    message_type: str  # MSH-9.1
    trigger: str  # MSH-9.2
    control_id: str  # MSH-10
    processing_id: str  # MSH-11
    version: str  # MSH-12.1
    charset: str  # MSH-18 first repetition, as written


def header(msg: Message) -> Header:
    """MSH read and checked: MSH-12 present and within 2.1-2.8 (the rest is the adapter's)."""
    msh = msg.segment("MSH")
    version = value(msh, 12)
    if not version:
        raise V2Rejected(
            "MSH is truncated or has no MSH-12 version", field="MSH-12", hl7_error="101"
        )
    check_version(version)
    return Header(
        value(msh, 3),
        value(msh, 4),
        value(msh, 5),
        value(msh, 6),
        value(msh, 9, 1),
        value(msh, 9, 2),
        value(msh, 10),
        value(msh, 11),
        version,
        value(msh, 18),
    )


def check_version(version: str) -> str:
    if version not in VERSIONS:
        raise VersionRefused(
            f"HL7 version {version!r} is not read here (2.1 to 2.8)", field="MSH-12"
        )
    return version


# -- dates and times --------------------------------------------------------------------------

_DTM = re.compile(
    r"^(\d{4})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})"
    r"(?:\.(\d{1,4}))?)?)?)?)?)?([+-]\d{4})?$"
)
PRECISIONS = ("year", "month", "day", "hour", "minute", "second", "fraction")


@dataclass(frozen=True)
class Dtm:
    """A v2 DTM/TS as sent: the parts present, and the offset if one was given."""

    year: int
    month: int | None
    day: int | None
    hour: int | None
    minute: int | None
    second: int | None
    fraction: str  # the digits after the point, as sent ("" when none)
    offset: str | None  # "+0800" as sent, None when absent

    @property
    def precision(self) -> str:
        parts = (
            self.year,
            self.month,
            self.day,
            self.hour,
            self.minute,
            self.second,
            self.fraction or None,
        )
        return PRECISIONS[max(i for i, p in enumerate(parts) if p is not None)]

    def zone(self, default: str | timedelta = "+0800") -> timezone:
        return zone_of(self.offset or default)

    def datetime(self, default_zone: str | timedelta = "+0800") -> datetime:
        """As a datetime (missing parts at their lowest), in its own or the default zone."""
        micro = int(self.fraction.ljust(6, "0")[:6]) if self.fraction else 0
        return datetime(
            self.year,
            self.month or 1,
            self.day or 1,
            self.hour or 0,
            self.minute or 0,
            self.second or 0,
            micro,
            tzinfo=self.zone(default_zone),
        )

    def fhir(self, default_zone: str | timedelta = "+0800") -> str:
        """FHIR ``dateTime`` at the precision sent: ``2026``, ``2026-11``, ``2026-11-20``; a
        time gets seconds (FHIR needs them) and a zone (its own, else the channel's)."""
        if self.hour is None:
            return "-".join(
                f"{p:02d}" if i else f"{p:04d}"
                for i, p in enumerate((self.year, self.month, self.day))
                if p is not None
            )
        dt = self.datetime(default_zone).replace(microsecond=0)
        text = dt.isoformat()
        if self.fraction:
            text = text[:19] + "." + self.fraction + text[19:]
        return text


@lru_cache(maxsize=64)
def zone_of(offset: str | timedelta) -> timezone:
    if isinstance(offset, timedelta):
        return timezone(offset)
    sign = -1 if offset.startswith("-") else 1
    digits = offset.lstrip("+-").replace(":", "")
    return timezone(sign * timedelta(hours=int(digits[:2]), minutes=int(digits[2:4])))


def dtm(text: str, at: str | None = None) -> Dtm | None:
    """A DTM/TS at any precision; None when empty (or the HL7 null); BadValue naming ``at``."""
    text = text.strip()
    if not text or text == '""':
        return None
    m = _DTM.match(text)
    if m is None:
        raise BadValue("not an HL7 date/time (YYYY[MM[DD[HH[MM[SS[.S...]]]]]][+/-ZZZZ])", field=at)
    y, mo, d, h, mi, s, frac, off = m.groups()
    parts = [int(p) if p is not None else None for p in (y, mo, d, h, mi, s)]
    if off is not None and (int(off[1:3]) > 14 or int(off[3:5]) > 59):
        raise BadValue("not a valid time zone offset", field=at)
    try:
        datetime(  # noqa: DTZ001 - a validity check only
            parts[0] or 1,
            parts[1] or 1,
            parts[2] or 1,
            parts[3] or 0,
            parts[4] or 0,
            parts[5] or 0,
        )
    except ValueError:
        raise BadValue("not a valid date or time", field=at) from None
    return Dtm(parts[0] or 0, parts[1], parts[2], parts[3], parts[4], parts[5], frac or "", off)


@lru_cache(maxsize=1024)
def fhir_datetime(
    text: str, at: str | None, default_zone: str | timedelta = "+0800", instant: bool = False
) -> str | None:
    """A v2 TS/DTM as FHIR ``dateTime`` (precision kept) or ``instant`` (None without
    seconds). None for empty; BadValue naming ``at`` for anything that is not a timestamp.
    Memoised: a lab message repeats its times (each OBX-14, OBR-7), and a refusal is raised
    again each time (an exception is not cached)."""
    t = dtm(text, at)
    if t is None:
        return None
    if instant and t.second is None:
        return None
    return t.fhir(default_zone)


def read_ts(text: str, at: str, default_zone: str | timedelta) -> str:
    """A point in time down to the minute at least -> ISO 8601 with seconds and offset."""
    t = dtm(text, at)
    if t is None or t.minute is None:
        raise BadValue(
            "not a date and time to the minute at least (YYYYMMDDHHMM[SS][+ZZZZ])", field=at
        )
    return t.datetime(default_zone).replace(microsecond=0).isoformat()


def read_date(text: str, at: str) -> str:
    """A DT (or the date part of a TS) to the day -> YYYY-MM-DD."""
    t = dtm(text, at)
    if t is None or t.day is None:
        raise BadValue("not a date to the day (YYYYMMDD)", field=at)
    return f"{t.year:04d}-{t.month:02d}-{t.day:02d}"
