"""``executemany`` of a constant Core statement straight on the driver's cursor.

SQLAlchemy's own ``conn.execute(stmt, rows)`` builds every row's parameters through its
compiler (``construct_params``, each column type's bind processor, the result proxy): for a
lab message's 14 resources and their 60-odd search rows that was most of ``put_many``'s time
(bench/README.md, ``lis.py``). Here the statement is compiled once per dialect and set of
keys, the bind processors are looked up once, and each row becomes a tuple (or dict) the
driver takes as it is. The rows written are the same: the same SQL, the same processors.

Errors are SQLAlchemy's own exceptions (``IntegrityError``, ``OperationalError``, ...), so
``Store``'s translation of a locked or lost database still applies.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.dml import UpdateBase

_Processor = Callable[[Any], Any] | None


class _Plan:
    __slots__ = ("names", "positional", "sql")

    def __init__(self, stmt: UpdateBase, conn: Connection, keys: Sequence[str]) -> None:
        compiled: Any = stmt.compile(dialect=conn.dialect, column_keys=list(keys))
        if compiled.literal_execute_params or compiled.post_compile_params:
            raise ValueError("bulk.executemany takes no expanding or literal parameters")
        self.sql: str = compiled.string
        self.positional: bool = compiled.positional
        binds = compiled.bind_names  # BindParameter -> its name in the SQL
        by_name = {name: bp for bp, name in binds.items()}
        processors: dict[str, _Processor] = compiled._bind_processors
        escaped: dict[str, str] = compiled.escaped_bind_names or {}
        order = list(compiled.positiontup) if self.positional else list(by_name)
        for name in order:
            if by_name[name].key not in keys:
                raise ValueError(f"bulk.executemany: no value for {name!r}")
        # (key in the row, name in the SQL, bind processor)
        self.names: list[tuple[str, str, _Processor]] = [
            (by_name[name].key, escaped.get(name, name), processors.get(name)) for name in order
        ]


_UNSET = object()
#: plans kept; the hot paths' statements are module constants (a dozen), so a caller that
#: builds its statements per call only costs compiling them, never an unbounded cache
MAX_PLANS = 256
_PLANS: dict[tuple[int, str, tuple[str, ...]], tuple[UpdateBase, _Plan]] = {}


def _plan(conn: Connection, stmt: UpdateBase, keys: tuple[str, ...]) -> _Plan:
    key = (id(stmt), conn.dialect.name, keys)
    hit = _PLANS.get(key)
    if hit is None or hit[0] is not stmt:  # the statement kept: its id is not reused
        if len(_PLANS) >= MAX_PLANS:
            _PLANS.clear()
        hit = (stmt, _Plan(stmt, conn, keys))
        _PLANS[key] = hit
    return hit[1]


def executemany(conn: Connection, stmt: UpdateBase, rows: Sequence[dict[str, Any]]) -> None:
    """``conn.execute(stmt, rows)`` for an INSERT, UPDATE or DELETE without RETURNING, each
    row a dict with the same keys; in ``conn``'s transaction."""
    run(conn, [(stmt, rows)])


def run(conn: Connection, batches: Sequence[tuple[UpdateBase, Sequence[dict[str, Any]]]]) -> None:
    """Several ``executemany`` in order; on PostgreSQL in one pipeline (one round trip for
    all of them, where psycopg's ``executemany`` alone waits for the server after each)."""
    dbapi_conn: Any = conn.connection.driver_connection
    pipeline = getattr(dbapi_conn, "pipeline", None)
    if pipeline is None:
        for stmt, rows in batches:
            _executemany(conn, dbapi_conn, stmt, rows)
        return
    try:
        with pipeline():
            for stmt, rows in batches:
                _executemany(conn, dbapi_conn, stmt, rows)
    except conn.dialect.loaded_dbapi.Error as exc:  # raised when the pipeline syncs
        raise DBAPIError.instance(
            "pipeline", None, exc, conn.dialect.loaded_dbapi.Error, dialect=conn.dialect
        ) from exc


def _executemany(
    conn: Connection, dbapi_conn: Any, stmt: UpdateBase, rows: Sequence[dict[str, Any]]
) -> None:
    if not rows:
        return
    plan = _plan(conn, stmt, tuple(rows[0]))
    names = plan.names
    table = [[r[k] for k, _, _ in names] for r in rows]
    for i, (_, _, p) in enumerate(names):
        if p is None:
            continue
        # the processed value kept while the rows give the same object (a batch's rows share
        # its time: one conversion for the batch, not one a row)
        last: Any = _UNSET
        out: Any = None
        for row in table:
            v = row[i]
            if v is not last:
                last, out = v, p(v)
            row[i] = out
    params: list[Any]
    if plan.positional:
        params = table
    else:
        sql_names = [n for _, n, _ in names]
        params = [dict(zip(sql_names, row, strict=True)) for row in table]
    cursor = dbapi_conn.cursor()
    try:
        cursor.executemany(plan.sql, params)
    except conn.dialect.loaded_dbapi.Error as exc:
        raise DBAPIError.instance(
            plan.sql, params[:1], exc, conn.dialect.loaded_dbapi.Error, dialect=conn.dialect
        ) from exc
    finally:
        cursor.close()
