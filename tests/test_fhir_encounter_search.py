"""Encounter searches by date (its period) and class, through the indexes, SQLite and PostgreSQL.

In-process against a real store, with the API's own parser and page function, as
tests/test_fhir_search_index.py does for identifiers: each answer is compared with the periods
put, for every prefix; an update moves the date and class rows; the plans name the indexes;
an old store (schema 2) gains the rows on open.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import delete

from bridge.api import fhir_api
from bridge.api.fhir_search import parse_query
from bridge.fhir.validate import validate_resource
from bridge.fhirstore import schema, store
from bridge.fhirstore.tables import FHIR_DATE, FHIR_TOKEN
from bridge.fhirstore.tables import FHIR_RESOURCE as T
from bridge.store import state
from bridge.store.db import Store

T0 = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)
ACT = "http://terminology.hl7.org/CodeSystem/v3-ActCode"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    dsn = (
        f"sqlite:///{tmp_path / 'node.db'}"
        if request.param == "sqlite"
        else str(request.getfixturevalue("pg_db"))
    )
    s = Store(dsn)
    s.create_all()
    yield s
    s.dispose()


def enc(eid: str, code: str, start: str | None, end: str | None) -> dict[str, Any]:
    period = {k: v for k, v in (("start", start), ("end", end)) if v}
    out: dict[str, Any] = {
        "resourceType": "Encounter",
        "id": eid,
        "status": "finished",
        "class": {"system": ACT, "code": code},
        "subject": {"reference": "Patient/p1"},
    }
    if period:
        out["period"] = period
    return out


#: a 5-day stay, a date-only outpatient visit, an ongoing stay, one with no period
ENCOUNTERS = [
    enc("e-stay", "IMP", "2026-12-01T08:30:00+08:00", "2026-12-05T10:00:00+08:00"),
    enc("e-visit", "AMB", "2026-12-03", "2026-12-03"),
    enc("e-open", "IMP", "2026-12-10T09:00:00+08:00", None),
    enc("e-none", "EMER", None, None),
]


def seed(s: Store) -> None:
    with s.write() as conn:
        for i, e in enumerate(ENCOUNTERS):
            validate_resource(e)
            store.put(conn, copy.deepcopy(e), at=T0 + timedelta(minutes=i))


def found(s: Store, *params: tuple[str, str]) -> list[str]:
    with s.read() as conn:
        q = parse_query("Encounter", list(params), T)
        rows, _, _ = fhir_api._page(conn, q)
    return sorted(orjson.loads(r.body)["id"] for r in rows)


@pytest.mark.parametrize(
    ("params", "want"),
    [
        ([("date", "2026-12")], ["e-stay", "e-visit"]),  # eq: lies within December (open: not)
        ([("date", "2026-12-03")], ["e-visit"]),  # the stay is not within one day
        ([("date", "ge2026-12-04")], ["e-open", "e-stay"]),  # overlaps from the 4th on
        ([("date", "gt2026-12-05")], ["e-open"]),
        ([("date", "lt2026-12-03")], ["e-stay"]),
        ([("date", "le2026-12-03")], ["e-stay", "e-visit"]),
        ([("date", "ge2026-12-03"), ("date", "le2026-12-03")], ["e-stay", "e-visit"]),
        ([("date", "sa2026-12-05")], ["e-open"]),
        ([("date", "eb2026-12-03")], []),  # the stay ends on the 5th (in +08:00: 02:00 UTC)
        ([("date", "eb2026-12-06")], ["e-stay", "e-visit"]),
        ([("date", "ne2026-12-03")], ["e-open", "e-stay"]),
        ([("class", "IMP")], ["e-open", "e-stay"]),
        ([("class", f"{ACT}|AMB")], ["e-visit"]),
        ([("class", "AMB,EMER")], ["e-none", "e-visit"]),
        ([("class", "IMP"), ("date", "ge2026-12-06")], ["e-open"]),
    ],
)
def test_date_and_class(db: Store, params: list[tuple[str, str]], want: list[str]) -> None:
    seed(db)
    assert found(db, *params) == want


def test_an_update_moves_the_rows(db: Store) -> None:
    seed(db)
    changed = enc("e-open", "EMER", "2026-12-10T09:00:00+08:00", "2026-12-11T09:00:00+08:00")
    with db.write() as conn:
        store.put(conn, changed, at=T0 + timedelta(hours=1))
    assert found(db, ("class", "IMP")) == ["e-stay"]
    assert found(db, ("class", "EMER")) == ["e-none", "e-open"]
    assert found(db, ("date", "gt2026-12-12")) == []
    with db.read() as conn:
        rows = conn.execute(FHIR_DATE.select().where(FHIR_DATE.c.id == "e-open")).all()
    assert [(r.start, r.end) for r in rows] == [
        (datetime(2026, 12, 10, 1, 0, tzinfo=UTC), datetime(2026, 12, 11, 1, 0, 1, tzinfo=UTC))
    ]


def test_plans_use_the_indexes(db: Store) -> None:
    seed(db)
    # the page walks the type's page-order index and probes each row's date or token by the
    # table's primary key (a correlated EXISTS: a broad condition costs a page, not every match)
    for params, index in (
        (("date", "ge2026-12-04"), "fhir_date USING INDEX sqlite_autoindex"),
        (("class", "IMP"), "SEARCH fhir_token USING"),
    ):
        q = parse_query("Encounter", [params], T)
        stmt = store.page_query("Encounter", q.where, 21)
        with db.read() as conn:
            sql = str(stmt.compile(conn, compile_kwargs={"literal_binds": True}))
            if conn.dialect.name == "sqlite":
                plan = "\n".join(r[-1] for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql))
                assert index in plan and "SCAN fhir_" not in plan, plan
                assert "ix_fhir_type_newest" in plan and "id=?" in plan, plan
            else:
                conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
                plan = "\n".join(r[0] for r in conn.exec_driver_sql("EXPLAIN " + sql))
                assert "Seq Scan" not in plan, plan


def test_a_schema_2_store_gains_the_rows_on_open(db: Store) -> None:
    seed(db)
    with db.write() as conn:  # as a store of schema 2 looked: no class tokens, no dates
        conn.execute(delete(FHIR_DATE))
        conn.execute(delete(FHIR_TOKEN).where(FHIR_TOKEN.c.param == "class"))
        state.put(conn, schema.MARKER, "2", T0)
    assert found(db, ("class", "IMP")) == []
    schema.upgrade(db)
    assert found(db, ("class", "IMP")) == ["e-open", "e-stay"]
    assert found(db, ("date", "ge2026-12-04")) == ["e-open", "e-stay"]
    with db.read() as conn:
        assert state.get(conn, schema.MARKER) == schema.SCHEMA_VERSION
