"""Exactly-once intake of local records: the source key commits with the record's effect."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import Connection, bindparam, insert, select, update

from bridge.local.tables import ADAPTER_INTAKE
from bridge.store import bulk

#: audit action: a local system reused a record id (HL7 MSH-10) for different content, which
#: was taken in as a new record (listed on the IT page)
RECORD_ID_REUSED = "hl7-control-id-reused"


# constant statements: run for every record taken in
_SEEN = select(ADAPTER_INTAKE.c.result).where(
    ADAPTER_INTAKE.c.adapter == bindparam("_a"), ADAPTER_INTAKE.c.source_key == bindparam("_k")
)
_REMEMBER = insert(ADAPTER_INTAKE)
_AMEND = (
    update(ADAPTER_INTAKE)
    .where(
        ADAPTER_INTAKE.c.adapter == bindparam("_a"),
        ADAPTER_INTAKE.c.source_key == bindparam("_k"),
    )
    .values(result=bindparam("_r"), thread=bindparam("_t"))
)


_KEY = ADAPTER_INTAKE.c.source_key
_UNDER = (
    select(_KEY)
    .where(
        ADAPTER_INTAKE.c.adapter == bindparam("_a"),
        _KEY >= bindparam("_lo"),
        _KEY < bindparam("_hi"),
        _KEY.like(bindparam("_like"), escape="/"),
    )
    .order_by(ADAPTER_INTAKE.c.id)
)


def seen(conn: Connection, adapter: str, source_key: str) -> dict[str, Any] | None:
    """The stored result of an earlier call with this key, or None if the record is new."""
    row = conn.execute(_SEEN, {"_a": adapter, "_k": source_key}).first()
    return None if row is None else orjson.loads(row.result)


def remember(
    conn: Connection,
    adapter: str,
    source_key: str,
    result: dict[str, Any],
    at: datetime,
    thread: str | None = None,
) -> None:
    bulk.executemany(
        conn,
        _REMEMBER,
        [
            {
                "adapter": adapter,
                "source_key": source_key,
                "thread": thread,
                "at": at,
                "result": orjson.dumps(result).decode(),
            }
        ],
    )


def amend(
    conn: Connection,
    adapter: str,
    source_key: str,
    result: dict[str, Any],
    thread: str | None = None,
) -> None:
    """Replace a remembered key's result (a staged record, once its effect is stored: the
    answer given then stays in it, what the effect added joins it)."""
    bulk.executemany(
        conn,
        _AMEND,
        [{"_a": adapter, "_k": source_key, "_r": orjson.dumps(result).decode(), "_t": thread}],
    )


def thread_of(conn: Connection, adapter: str, source_key: str) -> str | None:
    row = conn.execute(
        select(ADAPTER_INTAKE.c.thread).where(
            ADAPTER_INTAKE.c.adapter == adapter, ADAPTER_INTAKE.c.source_key == source_key
        )
    ).first()
    return None if row is None else row.thread


def keys_under(conn: Connection, adapter: str, prefix: str) -> list[str]:
    """Every key of ``adapter`` that is ``prefix`` followed by lower-case hex, oldest first.

    A range on the unique index (``prefix`` <= key < ``prefix + "g"``, true in byte order and
    in locale collations alike for hex tails) rather than LIKE, which SQLite cannot serve from
    the index: this runs for every message. The LIKE (escaped here, one constant statement)
    only confirms the prefix within that range.
    """
    escaped = prefix.replace("/", "//").replace("%", "/%").replace("_", "/_")
    return [
        r.source_key
        for r in conn.execute(
            _UNDER, {"_a": adapter, "_lo": prefix, "_hi": prefix + "g", "_like": escaped + "%"}
        )
    ]
