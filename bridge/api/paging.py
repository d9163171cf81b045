"""Keyset paging for the ``/local/v1`` lists: every list says how many items match in all
(``X-Total-Count``) and where the next page is (``Link: <...>; rel="next"`` and
``X-Next-Cursor``), so no list stops silently at its page size.

The body stays the JSON array it always was (HIS integrations read it); a page is the
``limit`` items after the ``after`` cursor in the list's fixed order. The cursor is opaque to
callers: the order key of the page's last item, base64url JSON. Keyset, not offset, so page
1000 costs what page 1 costs and an item added meanwhile neither repeats nor skips one.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import orjson
from fastapi import Request, Response
from sqlalchemy import Connection, DateTime, Integer, and_, func, literal, or_, select

from bridge.api.outcome import RequestInvalid

MAX_LIMIT = 1000


def encode(values: Sequence[Any]) -> str:
    raw = orjson.dumps([v.isoformat() if isinstance(v, datetime) else v for v in values])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(token: str, columns: Sequence[Any]) -> list[Any]:
    """The cursor's values typed for ``columns``; a token this API did not give: 422
    ``HT-REQUEST-INVALID``, as for any query parameter that does not bind."""
    try:
        values = orjson.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        if not isinstance(values, list) or len(values) != len(columns):
            raise ValueError
        out: list[Any] = []
        for col, v in zip(columns, values, strict=True):
            kind = getattr(col.type, "impl_instance", col.type)  # a TypeDecorator's own type
            if isinstance(kind, DateTime):
                out.append(datetime.fromisoformat(v))
            elif isinstance(kind, Integer):
                out.append(int(v))
            else:
                out.append(str(v))
        return out
    except (ValueError, TypeError, orjson.JSONDecodeError):
        raise RequestInvalid("after: not a cursor this list gave out") from None


def _past(columns: Sequence[Any], values: Sequence[Any], desc: Sequence[bool]) -> Any:
    """Rows strictly after the cursor in the order (c1, c2, ...), each column ascending or
    descending as ``desc`` says."""
    terms = []
    for i, col in enumerate(columns):
        same = [c == literal(v, c.type) for c, v in zip(columns[:i], values[:i], strict=True)]
        value = literal(values[i], col.type)
        terms.append(and_(*same, col < value if desc[i] else col > value))
    return or_(*terms)


def page(
    conn: Connection,
    stmt: Any,
    *,
    where: Sequence[Any],
    order: Sequence[Any],
    desc: bool | Sequence[bool],
    limit: int,
    after: str | None,
) -> tuple[list[dict[str, Any]], int, str | None]:
    """(items, total matching ``where``, cursor of the next page or None) for a SELECT of one
    table, ordered by the unique key ``order`` (its last column unique). ``desc``: one
    direction for every column, or one per column (to walk an index such as
    ``(last_updated DESC, id)`` in its own order)."""
    if not 1 <= limit <= MAX_LIMIT:
        raise RequestInvalid(f"limit: 1..{MAX_LIMIT}")
    dirs = [desc] * len(order) if isinstance(desc, bool) else list(desc)
    if len(dirs) != len(order):
        raise ValueError("desc: one direction per order column")
    froms = stmt.get_final_froms()
    total = int(
        conn.execute(
            select(func.count()).select_from(*froms).where(and_(True, *where))
        ).scalar_one()
    )
    q = stmt.where(and_(True, *where))
    if after:
        q = q.where(_past(order, decode(after, order), dirs))
    q = q.order_by(*(c.desc() if d else c.asc() for c, d in zip(order, dirs, strict=True))).limit(
        limit + 1
    )
    rows = [dict(r._mapping) for r in conn.execute(q)]
    nxt = None
    if len(rows) > limit:
        rows = rows[:limit]
        nxt = encode([rows[-1][c.name] for c in order])
    return rows, total, nxt


def headers(request: Request, response: Response, total: int, nxt: str | None) -> None:
    """``X-Total-Count`` always; ``Link`` (rel=next) and ``X-Next-Cursor`` when more follow."""
    response.headers["X-Total-Count"] = str(total)
    if nxt is not None:
        url = request.url.remove_query_params("after").include_query_params(after=nxt)
        response.headers["Link"] = f'<{url.path}?{url.query}>; rel="next"'
        response.headers["X-Next-Cursor"] = nxt
