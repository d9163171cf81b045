"""Writing HL7 v2: escaped values, components, segments, messages, timestamps.

Values are escaped with the message's delimiters (``|`` -> ``\\F\\``, ``^`` -> ``\\S\\``,
``&`` -> ``\\T\\``, ``~`` -> ``\\R\\``, ``\\`` -> ``\\E\\``, a line break -> ``\\.br\\``);
non-ASCII text is written as is, since the whole message is encoded in its MSH-18 charset
(:func:`adapters.hl7v2.charset.encode`), never as ``\\Xhh\\`` code points.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from adapters.hl7v2.fields import DEFAULT, Delimiters

ENCODING_CHARS = DEFAULT.msh2


def esc(text: str | None, d: Delimiters = DEFAULT) -> str:
    """One value, escaped for a field."""
    if not text:
        return ""
    out = text.replace(d.escape, f"{d.escape}E{d.escape}")
    for ch, code in (
        (d.field, "F"),
        (d.component, "S"),
        (d.subcomponent, "T"),
        (d.repetition, "R"),
    ):
        out = out.replace(ch, f"{d.escape}{code}{d.escape}")
    if d.truncation:
        out = out.replace(d.truncation, f"{d.escape}P{d.escape}")
    br = f"{d.escape}.br{d.escape}"
    return out.replace("\r\n", br).replace("\n", br).replace("\r", br)


def comp(*parts: str | None) -> str:
    """Components (already escaped) joined with ^, trailing empties dropped."""
    out = [p or "" for p in parts]
    while out and not out[-1]:
        out.pop()
    return "^".join(out)


def join_reps(*values: str) -> str:
    """Repetitions (already escaped) joined with ~."""
    return "~".join(values)


def segment(name: str, *fields: str | None) -> str:
    """One segment (fields already escaped), trailing empty fields dropped."""
    out = [name, *(f or "" for f in fields)]
    while len(out) > 1 and not out[-1]:
        out.pop()
    return "|".join(out)


def msh(*fields: str | None) -> str:
    """MSH with the default delimiters; ``fields`` start at MSH-3."""
    out = [f or "" for f in fields]
    while out and not out[-1]:
        out.pop()
    return "MSH|" + ENCODING_CHARS + ("|" + "|".join(out) if out else "")


def message(segments: list[str]) -> str:
    return "\r".join(segments) + "\r"


def control_id() -> str:
    return uuid.uuid4().hex[:20].upper()


def ts(value: datetime) -> str:
    """HL7 TS/DTM with seconds and offset: 20261120090000+0800."""
    return value.strftime("%Y%m%d%H%M%S%z")


def write_ts(iso: str) -> str:
    return ts(datetime.fromisoformat(iso)) if iso else ""


def write_date(iso: str) -> str:
    return iso.replace("-", "") if iso else ""
