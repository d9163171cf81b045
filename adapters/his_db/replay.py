"""Quarantine replay for the intermediate-database adapter: what a held row carries, read back.

A bad row is quarantined with ``raw`` = the vendor row as JSON (BLOB columns as
``{"bytes_hex": ...}``) plus :data:`TABLE_KEY`, the vendor table it came from; the record is
``<table>#<id>``. A replay re-reads the row by its id from the vendor table (the HIS may have
corrected it since) and falls back to this kept copy when the row is gone; either way it runs
through the same intake as a polled row, with the same source key ``<table>:<id>``.
"""

from __future__ import annotations

from typing import Any

import orjson

from bridge.errors import HutongError

TABLE_KEY = "@table"  # not a vendor column name: SQL identifiers do not start with '@'
RECORD_KEY = "@record"  # what the row was taken as when it is not the table's own record


class BadQuarantineItem(HutongError):
    code = "HT-LOCAL-REPLAY"


def kept_row(raw: bytes) -> tuple[str | None, dict[str, Any]]:
    """(vendor table or None for items kept before the table was recorded, row as read)."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadQuarantineItem("the held item is not a kept vendor row (not JSON)") from None
    if not isinstance(data, dict):
        raise BadQuarantineItem("the held item is not a kept vendor row")
    table = data.pop(TABLE_KEY, None)
    data.pop(RECORD_KEY, None)
    row = {
        k: bytes.fromhex(v["bytes_hex"]) if isinstance(v, dict) and set(v) == {"bytes_hex"} else v
        for k, v in data.items()
    }
    return (str(table) if table else None), row


def kept_record(raw: bytes) -> str | None:
    """What a held row was taken as when that is not its table's own record (``cancel``: a
    withdrawn referral row), else None."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return str(data[RECORD_KEY]) if isinstance(data, dict) and data.get(RECORD_KEY) else None


def named(error: HutongError, record: str | None, field: str | None) -> HutongError:
    """The error's message prefixed with record and field, as ``host.quarantine`` words it."""
    where = " ".join(
        p for p in (f"record {record}" if record else "", f"field {field}" if field else "") if p
    )
    if where and where not in error.message:
        error.message = f"{where}: {error.message}"
    return error
