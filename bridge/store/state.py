"""Small named facts a node keeps across restarts."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Connection, insert, select, update

from bridge.store.tables import NODE_STATE


def get(conn: Connection, key: str) -> str | None:
    return conn.execute(select(NODE_STATE.c.value).where(NODE_STATE.c.key == key)).scalar()


def put(conn: Connection, key: str, value: str, at: datetime) -> None:
    done = conn.execute(
        update(NODE_STATE).where(NODE_STATE.c.key == key).values(value=value, updated_at=at)
    )
    if done.rowcount == 0:
        conn.execute(insert(NODE_STATE).values(key=key, value=value, updated_at=at))
