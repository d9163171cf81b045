"""The HIS adapter's binding of the HL7 v2 kit (:mod:`adapters.hl7v2`): its call shapes, its errors.

Nothing is parsed, escaped, unescaped or dated here: every function is the kit's, with the
kit's refusals raised as this adapter's :class:`~adapters.his_hl7.errors.Hl7DataError` /
:class:`~adapters.his_hl7.errors.Hl7Rejected` (same reason, field, ERR code and ACK code), so
:mod:`.messages` reads and writes messages exactly as the LIS and the RIS reader do.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import timedelta
from typing import ParamSpec, TypeVar

from adapters.his_hl7.errors import Hl7DataError, Hl7Rejected
from adapters.hl7v2 import fields
from adapters.hl7v2.build import (  # noqa: F401 - the writers, re-exported for .messages
    ENCODING_CHARS,
    comp,
    control_id,
    esc,
    message,
    segment,
    ts,
    write_date,
    write_ts,
)
from adapters.hl7v2.build import join_reps as reps  # noqa: F401
from adapters.hl7v2.charset import UTF8, Charset
from adapters.hl7v2.errors import V2Error
from adapters.hl7v2.fields import Message, Segment

P = ParamSpec("P")
T = TypeVar("T")


def from_kit(exc: V2Error) -> Hl7DataError:
    """This adapter's error for a kit refusal."""
    cls = Hl7Rejected if exc.ack_code == "AR" else Hl7DataError
    return cls(exc.reason, field=exc.field, hl7_error=exc.hl7_error, ack_code=exc.ack_code)


def kit_errors(fn: Callable[P, T]) -> Callable[P, T]:
    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return fn(*args, **kwargs)
        except Hl7DataError:
            raise
        except V2Error as exc:
            raise from_kit(exc) from None

    return wrapper


@kit_errors
def parse(text: str, charset: Charset = UTF8) -> Message:
    """The kit's parse (MSH-1/MSH-2 checked) and MSH-12 within 2.1-2.8, as on every listener."""
    msg = fields.parse(text, charset)
    fields.header(msg)
    return msg


def segments(msg: Message, name: str) -> list[Segment]:
    return msg.segments(name)


def one(msg: Message, name: str, *, required: bool = True) -> Segment | None:
    """The only segment with this name; a repeated one is a duplicate row."""
    found = msg.segments(name)
    if len(found) > 1:
        raise Hl7DataError(
            f"segment {name} appears {len(found)} times, once expected", field=name, hl7_error="100"
        )
    if not found:
        if required:
            raise Hl7DataError(f"segment {name} is missing", field=name, hl7_error="100")
        return None
    return found[0]


def count_reps(seg: Segment, field: int) -> int:
    return fields.reps(seg, field)


@kit_errors
def get(
    msg: Message, seg: Segment, field: int, component: int = 1, rep: int = 1, sub: int = 1
) -> str:
    """One leaf, unescaped, as written ('' when absent, the kit's NULL for ``""``)."""
    return fields.value(seg, field, component, rep, sub, strip=False)


@kit_errors
def need(
    msg: Message, seg: Segment, field: int, component: int = 1, rep: int = 1, what: str = ""
) -> str:
    return fields.need(seg, field, component, rep, what)


@kit_errors
def read_ts(value: str, where: str, default_offset: timedelta) -> str:
    return fields.read_ts(value, where, default_offset)


@kit_errors
def read_date(value: str, where: str) -> str:
    return fields.read_date(value, where)
