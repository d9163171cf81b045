"""One time-zone rule for people: what they see and what they type.

Every time shown (pages, CLI tables) is in the node's display zone (``[web] display_zone``,
default Asia/Shanghai) *with its offset*, so a time copied from one place means the same
instant everywhere. Every time typed (the web filters, ``--since/--until``) goes through
:func:`parse_when`, which accepts an ISO 8601 time with an offset, one without (the display
zone), a date alone (its midnight in the display zone), or a relative form: ``-2h``, ``-30m``,
``-7d``, ``now``, ``today``, ``yesterday``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

DEFAULT_ZONE = "Asia/Shanghai"
_RELATIVE = re.compile(r"-\s*(\d{1,6})\s*(s|m|min|h|d|w)")
_UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def zone(name: str | None) -> tzinfo:
    """The display zone by IANA name; ValueError names the rule (never a traceback)."""
    try:
        return ZoneInfo(name or DEFAULT_ZONE)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError("display_zone must be an IANA time zone such as Asia/Shanghai") from None


def parse_when(
    text: str | None, tz: tzinfo, now: Callable[[], datetime] = lambda: datetime.now(UTC)
) -> datetime | None:
    """A typed time as an aware UTC instant, or None for empty; ValueError if not understood
    (the message names the accepted forms, never the input: it may be anything)."""
    if text is None or not text.strip():
        return None
    s = (
        text.strip().lower().replace("t", "T", 1)
        if text.strip()[:1].isdigit()
        else text.strip().lower()
    )
    current = now().astimezone(tz)
    midnight = current.replace(hour=0, minute=0, second=0, microsecond=0)
    if s == "now":
        return current.astimezone(UTC)
    if s == "today":
        return midnight.astimezone(UTC)
    if s == "yesterday":
        return _wall(midnight.replace(tzinfo=None) - timedelta(days=1), tz)
    m = _RELATIVE.fullmatch(s)
    if m:
        return (current - timedelta(seconds=int(m.group(1)) * _UNITS[m.group(2)])).astimezone(UTC)
    raw = text.strip()
    if raw.endswith(("z", "Z")):
        raw = raw[:-1] + "+00:00"
    try:
        dt = datetime.fromisoformat(raw)
    except ValueError:
        raise ValueError(TIME_RULE) from None
    if _DATE.fullmatch(raw) or dt.tzinfo is None:
        return _wall(dt.replace(tzinfo=None), tz)
    return dt.astimezone(UTC)


def _wall(naive: datetime, tz: tzinfo) -> datetime:
    """A wall-clock time in ``tz`` as a UTC instant."""
    return naive.replace(tzinfo=tz).astimezone(UTC)


def show(value: datetime | None, tz: tzinfo) -> str:
    """An instant for people: ``2026-12-07 16:20:05 +08:00`` (naive values are UTC)."""
    if value is None:
        return ""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    local = value.astimezone(tz)
    off = local.strftime("%z")
    return local.strftime("%Y-%m-%d %H:%M:%S") + f" {off[:3]}:{off[3:]}"


#: what parse_when accepts, for error messages and form hints
TIME_RULE = (
    "times are ISO 8601 with or without an offset (2026-11-20, 2026-11-20T08:00, "
    "2026-11-20T08:00+08:00) or relative (-2h, -30m, -7d, today, yesterday, now); "
    "without an offset they are in the display zone"
)

__all__ = ["DEFAULT_ZONE", "TIME_RULE", "parse_when", "show", "zone"]
