"""Small helpers over python-hl7: build segments with escaping, read fields unescaped, dates.

python-hl7 parses, escapes and unescapes; it has no builder, and its ``escape`` turns every
non-ASCII character into ``\\Xhhhh\\`` (a code point, not the bytes of the declared charset
HL7 2.10.5 means). So Chinese text is written as is (the message is encoded by MSH-18 as a
whole) and only ASCII runs go through the library's escape (delimiters -> \\F\\ \\S\\ \\T\\
\\R\\ \\E\\, CR -> \\.br\\).
"""

from __future__ import annotations

import logging
import re
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import hl7

from adapters.his_hl7.errors import Hl7DataError

SEPARATORS = "\r|~^&"
ENCODING_CHARS = "^~\\&"
_ASCII_RUN = re.compile(r"[\x00-\x7f]+|[^\x00-\x7f]+")
# python-hl7 logs a value it cannot unescape (patient data) and drops it: keep it out of logs
hl7.util.logger.setLevel(logging.CRITICAL)
_TEMPLATE = hl7.parse("MSH|^~\\&|X\r")  # carries the default separators for escape/unescape


def esc(text: str | None) -> str:
    """One value, escaped for a field with the default delimiters."""
    if not text:
        return ""
    return "".join(_TEMPLATE.escape(run) if run.isascii() else run
                   for run in _ASCII_RUN.findall(text))


def comp(*parts: str | None) -> str:
    """Components (already escaped) joined with ^, trailing empties dropped."""
    out = [p or "" for p in parts]
    while out and not out[-1]:
        out.pop()
    return "^".join(out)


def reps(*values: str) -> str:
    return "~".join(v for v in values)


def segment(name: str, *fields: str | None) -> str:
    out = [name, *(f or "" for f in fields)]
    while len(out) > 1 and not out[-1]:
        out.pop()
    return "|".join(out)


def message(segments: list[str]) -> str:
    return "\r".join(segments) + "\r"


def control_id() -> str:
    return uuid.uuid4().hex[:20].upper()


def ts(value: datetime) -> str:
    """HL7 TS with seconds and offset: 20261120090000+0800."""
    return value.strftime("%Y%m%d%H%M%S%z")


# -- reading ------------------------------------------------------------------------------------


def parse(text: str) -> hl7.Message:
    from adapters.his_hl7.errors import Hl7Rejected

    if not text.lstrip().startswith("MSH"):
        raise Hl7Rejected("the message does not start with an MSH segment", field="MSH")
    try:
        return hl7.parse(text)
    except Exception as exc:  # noqa: BLE001 - python-hl7 raises bare errors on bad structure
        raise Hl7Rejected(f"not parseable as HL7 v2 ({type(exc).__name__})", field="MSH") from None


def segments(msg: hl7.Message, name: str) -> list[Any]:
    return [s for s in msg if str(s[0]) == name]


def one(msg: hl7.Message, name: str, *, required: bool = True) -> Any | None:
    """The only segment with this name; a repeated one is a duplicate row."""
    found = segments(msg, name)
    if len(found) > 1:
        raise Hl7DataError(f"segment {name} appears {len(found)} times, once expected",
                           field=name, hl7_error="100")
    if not found:
        if required:
            raise Hl7DataError(f"segment {name} is missing", field=name, hl7_error="100")
        return None
    return found[0]


def count_reps(seg: Any, field: int) -> int:
    """How many repetitions a field has (0 when empty)."""
    index = field if str(seg[0]) != "MSH" else field - 1
    if len(seg) <= index or not str(seg[index]):
        return 0
    value = seg[index]
    if len(value) and isinstance(value[0], hl7.Repetition):
        return len(value)
    return 1


def get(msg: hl7.Message, seg: Any, field: int, component: int = 1, rep: int = 1,
        sub: int = 1) -> str:
    """One leaf, unescaped ('' when absent)."""
    try:
        raw = seg.extract_field(1, field, rep, component, sub)  # unescapes \\F\\ \\S\\ ...
    except IndexError:  # the path goes deeper than the value (a component of a plain field)
        return ""
    except Exception:  # noqa: BLE001 - a malformed escape (a warning turned error in tests)
        raise Hl7DataError("malformed escape sequence", field=f"{seg[0]}-{field}",
                           hl7_error="102") from None
    return str(raw or "")


def need(msg: hl7.Message, seg: Any, field: int, component: int = 1, rep: int = 1,
         what: str = "") -> str:
    value = get(msg, seg, field, component, rep)
    if not value.strip():
        where = f"{seg[0]}-{field}" + (f".{component}" if component > 1 else "")
        raise Hl7DataError(f"required field is empty{f' ({what})' if what else ''}",
                           field=where, hl7_error="101")
    return value


_TS = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2}(?:\.\d{1,4})?)?([+-]\d{4})?$")


def read_ts(value: str, where: str, default_offset: timedelta) -> str:
    """HL7 TS -> ISO 8601 with offset (seconds kept as given; no offset -> the site's)."""
    m = _TS.match(value.strip())
    if not m or not all(m.group(i) for i in (1, 2, 3, 4, 5)):
        raise Hl7DataError("unparseable date/time (expected YYYYMMDDHHMM[SS][+ZZZZ])",
                           field=where, hl7_error="102")
    y, mo, d, h, mi, s, off = m.groups()
    sec = int(float(s)) if s else 0
    if off:
        sign = 1 if off[0] == "+" else -1
        tz = timezone(sign * timedelta(hours=int(off[1:3]), minutes=int(off[3:5])))
    else:
        tz = timezone(default_offset)
    try:
        at = datetime(int(y), int(mo), int(d), int(h), int(mi), sec, tzinfo=tz)
    except ValueError:
        raise Hl7DataError("not a real date/time", field=where, hl7_error="102") from None
    return at.isoformat()


def read_date(value: str, where: str) -> str:
    """HL7 DT (YYYYMMDD, or a TS whose date part is used) -> YYYY-MM-DD."""
    m = re.match(r"^(\d{4})(\d{2})(\d{2})", value.strip())
    if not m:
        raise Hl7DataError("unparseable date (expected YYYYMMDD)", field=where, hl7_error="102")
    try:
        return datetime(int(m[1]), int(m[2]), int(m[3])).date().isoformat()
    except ValueError:
        raise Hl7DataError("not a real date", field=where, hl7_error="102") from None


def write_ts(iso: str) -> str:
    if not iso:
        return ""
    return ts(datetime.fromisoformat(iso))


def write_date(iso: str) -> str:
    return iso.replace("-", "") if iso else ""
