"""Reading v2 fields through python-hl7's parse tree (never by splitting strings ourselves).

``value(seg, 5, 2)`` is OBX-5.2 of the first repetition, unescaped by the library; a missing
field or component is "". Times (TS/DTM) become FHIR dateTime/instant strings; a time without a
zone gets the channel's zone (Chinese LIS send local time, +08:00).
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from typing import Any

from hl7.containers import Repetition

from adapters.lis.errors import BadField

_TS = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(?:(\d{2})(\d{2})?(\d{2})?(?:\.(\d{1,4}))?)?"
                 r"([+-]\d{4})?$")


def value(seg: Any, field: int, component: int = 1, rep: int = 1, sub: int = 1) -> str:
    """One leaf value (unescaped), or "" when absent."""
    try:
        return str(seg.extract_field(1, field, rep, component, sub)).strip()
    except IndexError:
        return ""


def raw_value(seg: Any, field: int, component: int = 1, rep: int = 1, sub: int = 1) -> str:
    """One leaf value (unescaped) exactly as sent: leading/trailing spaces and line breaks
    kept (text values: TX/FT lines, ED data)."""
    try:
        return str(seg.extract_field(1, field, rep, component, sub))
    except IndexError:
        return ""


def reps(seg: Any, field: int) -> int:
    """How many repetitions a field has (0 when absent or empty)."""
    if field >= len(seg):
        return 0
    f = seg(field)
    if not str(f):
        return 0
    return len(f) if len(f) and isinstance(f[0], Repetition) else 1


def rep_values(seg: Any, field: int, component: int = 1) -> list[str]:
    return [v for v in (value(seg, field, component, r) for r in range(1, reps(seg, field) + 1))
            if v]


def where(seg_name: str, index: int, field: int, component: int | None = None) -> str:
    """``OBX[3]-5.2``: the segment's position among its kind, for errors and ERR-2."""
    comp = f".{component}" if component else ""
    return f"{seg_name}[{index}]-{field}{comp}" if index else f"{seg_name}-{field}{comp}"


def zone_of(offset: str) -> timezone:
    sign = -1 if offset.startswith("-") else 1
    digits = offset.lstrip("+-")
    return timezone(sign * timedelta(hours=int(digits[:2]), minutes=int(digits[2:4])))


def fhir_datetime(text: str, at: str, default_zone: str = "+0800",
                  instant: bool = False) -> str | None:
    """A v2 TS/DTM as FHIR ``dateTime`` (or ``instant``: None unless it has seconds).

    Precision is kept (``2026``, ``2026-11``, ``2026-11-20``); a time gets seconds and a zone.
    Raises :class:`BadField` naming ``at`` for anything that is not a v2 timestamp.
    """
    text = text.strip()
    if not text:
        return None
    m = _TS.match(text)
    if m is None:
        raise BadField("not an HL7 timestamp (YYYYMMDD[HHMM[SS]][+ZZZZ])", field=at)
    year, month, day, hour, minute, second, frac, offset = m.groups()
    try:
        if hour is None:
            datetime(int(year), int(month or 1), int(day or 1))
            if instant:
                return None
            return "-".join(p for p in (year, month, day) if p)
        if instant and second is None:
            return None
        tz = zone_of(offset or default_zone)
        dt = datetime(int(year), int(month or 1), int(day or 1), int(hour), int(minute or 0),
                      int(second or 0), int((frac or "0").ljust(6, "0")[:6]), tzinfo=tz)
    except ValueError:
        raise BadField("not a valid date or time", field=at) from None
    spec = "milliseconds" if frac else "seconds"
    return dt.isoformat(timespec=spec)
