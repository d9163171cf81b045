"""Identifier and reference searches of the FHIR store use indexes, on SQLite and PostgreSQL.

In-process against a real store (a SQLite file, a fresh PostgreSQL database): resources are
validated and written with ``store.put``, searched with the API's own parser and page function
(``parse_query`` + ``fhir_api._page``: the SQL the /fhir API runs), and compared field by field
with what was put. The query plans are read with ``EXPLAIN QUERY PLAN`` (SQLite) and ``EXPLAIN``
(PostgreSQL, sequential scans disabled so the plan shows whether an index *can* serve the query;
its tables are too small for the planner to prefer one) and must name the index, never a scan.
An older store (no ``fhir_token``, the earlier indexes) gains the table, the indexes and the
token rows when it is opened, and gives the same answers.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.patient import Patient
from sqlalchemy import Connection, Index, delete, select, text

from bridge.api import fhir_api
from bridge.api.fhir_search import parse_query
from bridge.fhir.validate import validate_resource
from bridge.fhirstore import schema, store
from bridge.fhirstore.tables import FHIR_RESOURCE as T
from bridge.fhirstore.tables import (
    FHIR_TOKEN,
    IX_NEWEST,
    IX_PATIENT_HASH,
    IX_PATIENT_NEWEST,
    OLD_INDEXES,
)
from bridge.results.recognition import results_for
from bridge.store.db import Store
from bridge.store.tables import NODE_STATE
from bridge.web import fhirview

NID = "urn:oid:2.16.156.10011.1.3"  # national ID numbers
MRN = "urn:hutong:mrn:fuxing"
T0 = datetime(2026, 11, 1, 8, 0, tzinfo=UTC)


@pytest.fixture
def db(dsn: str) -> Iterator[Store]:
    s = Store(dsn)
    s.create_all()
    yield s
    s.dispose()


def patient(pid: str, idents: list[tuple[str | None, str]], name: str) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": pid,
        "identifier": [{"value": v} if s is None else {"system": s, "value": v} for s, v in idents],
        "name": [{"text": name, "family": name[0], "given": [name[1:]]}],
    }


#: several identifiers per patient, one value shared by two systems, one with no system
PATIENTS = [
    patient("p-wang", [(NID, "110102195003151234"), (MRN, "FX0001")], "王秀英"),
    patient("p-zhang", [(NID, "11010119650505231X"), (MRN, "FX0002"), (MRN, "FX0002-OLD")], "张伟"),
    patient("p-li", [(MRN, "FX0003"), (None, "PAPER-77")], "李娜"),
    patient("p-zhao", [("urn:hutong:mrn:guangwai", "FX0001")], "赵强"),  # same value, other system
]


def observation(i: int, pid: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": f"obs-{i}",
        "status": "final",
        "identifier": [{"system": "urn:hutong:lis:fuxing", "value": f"LAB-{i:04d}"}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "718-7"}]},
        "subject": {"reference": f"Patient/{pid}"},
        "valueQuantity": {"value": 100 + i, "unit": "g/L"},
    }


def seed(s: Store) -> dict[str, dict[str, Any]]:
    """The patients (lastUpdated T0 + i min) and 12 Observations alternating wang/zhang."""
    put: dict[str, dict[str, Any]] = {}
    with s.write() as conn:
        for i, p in enumerate(PATIENTS):
            validate_resource(p)
            put[p["id"]] = copy.deepcopy(
                store.put(conn, copy.deepcopy(p), at=T0 + timedelta(minutes=i))
            )
        for i in range(12):
            o = observation(i, "p-wang" if i % 2 == 0 else "p-zhang")
            validate_resource(o)
            put[o["id"]] = copy.deepcopy(store.put(conn, o, at=T0 + timedelta(hours=1, minutes=i)))
    return put


def find(s: Store, rtype: str, **params: str) -> tuple[list[dict[str, Any]], int | None]:
    """Run a search as the API does: its parser, its page function; (resources, total)."""
    with s.read() as conn:
        q = parse_query(rtype, list(params.items()), T)
        rows, total, _ = fhir_api._page(conn, q)
    return [orjson.loads(r.body) for r in rows], total


def ids(found: tuple[list[dict[str, Any]], int | None]) -> list[str]:
    return [r["id"] for r in found[0]]


def test_identifier_search_every_syntax_field_by_field(db: Store) -> None:
    put = seed(db)
    hits, total = find(db, "Patient", identifier=f"{NID}|11010119650505231X")
    assert total == 1 and len(hits) == 1
    got, want = hits[0], put["p-zhang"]
    assert got["id"] == "p-zhang" and got["identifier"] == PATIENTS[1]["identifier"]
    assert got["name"] == PATIENTS[1]["name"] and got["meta"] == want["meta"]
    Patient.model_validate(got)
    # value only: any system (two patients carry FX0001 under different systems)
    assert ids(find(db, "Patient", identifier="FX0001")) == ["p-zhao", "p-wang"]
    assert ids(find(db, "Patient", identifier=f"{MRN}|FX0001")) == ["p-wang"]
    assert ids(find(db, "Patient", identifier="urn:hutong:mrn:guangwai|FX0001")) == ["p-zhao"]
    # |value: only an identifier without a system
    assert ids(find(db, "Patient", identifier="|PAPER-77")) == ["p-li"]
    assert ids(find(db, "Patient", identifier="|FX0003")) == []
    assert ids(find(db, "Patient", identifier="PAPER-77")) == ["p-li"]
    # system|: any value of that system, each resource once though p-zhang has two
    found = find(db, "Patient", identifier=f"{MRN}|")
    assert ids(found) == ["p-li", "p-zhang", "p-wang"] and found[1] == 3
    # comma = OR; a resource matched by two alternatives comes once
    found = find(
        db, "Patient", identifier=f"{MRN}|FX0002,{NID}|11010119650505231X,{MRN}|FX0003,{MRN}|nobody"
    )
    assert ids(found) == ["p-li", "p-zhang"] and found[1] == 2
    # the second identifier of a resource matches as well as the first
    assert ids(find(db, "Patient", identifier=f"{MRN}|FX0002-OLD")) == ["p-zhang"]
    # exact: no prefix, no other type, no case folding
    assert ids(find(db, "Patient", identifier=f"{MRN}|FX000")) == []
    assert ids(find(db, "Patient", identifier=f"{NID}|11010119650505231x")) == []
    assert ids(find(db, "Observation", identifier="FX0001")) == []
    lab = find(db, "Observation", identifier="urn:hutong:lis:fuxing|LAB-0007")
    assert ids(lab) == ["obs-7"] and lab[0][0]["valueQuantity"] == {"value": 107, "unit": "g/L"}
    Observation.model_validate(lab[0][0])
    # ANDed with another parameter
    assert ids(
        find(db, "Observation", identifier="urn:hutong:lis:fuxing|LAB-0007", status="final")
    ) == ["obs-7"]
    assert (
        ids(
            find(
                db, "Observation", identifier="urn:hutong:lis:fuxing|LAB-0007", status="preliminary"
            )
        )
        == []
    )
    with db.read() as conn:
        assert (
            store.find_by_identifier(conn, "Patient", MRN, "FX0003")["name"] == PATIENTS[2]["name"]
        )
        assert store.find_by_identifier(conn, "Patient", MRN, "PAPER-77") is None


def test_reference_search_pages_in_order_with_totals(db: Store) -> None:
    put = seed(db)
    found = find(db, "Observation", patient="Patient/p-wang")
    assert ids(found) == [f"obs-{i}" for i in (10, 8, 6, 4, 2, 0)] and found[1] == 6
    assert [o["valueQuantity"]["value"] for o in found[0]] == [110, 108, 106, 104, 102, 100]
    assert all(o["subject"] == {"reference": "Patient/p-wang"} for o in found[0])
    assert found[0][0]["meta"] == put["obs-10"]["meta"]
    # pages of 4: keyset cursor through the patient index, no gaps, no repeats
    seen: list[str] = []
    params: dict[str, str] = {"patient": "p-zhang", "_count": "4"}
    with db.read() as conn:
        while True:
            q = parse_query("Observation", list(params.items()), T)
            rows, total, nxt = fhir_api._page(conn, q)
            assert total == 6
            seen += [r.id for r in rows]
            if nxt is None:
                break
            params["_cursor"] = nxt
    assert seen == [f"obs-{i}" for i in (11, 9, 7, 5, 3, 1)]


def test_update_that_changes_identifiers_moves_the_tokens(db: Store) -> None:
    seed(db)
    changed = copy.deepcopy(PATIENTS[0])
    changed["identifier"] = [{"system": MRN, "value": "FX0001"}, {"system": MRN, "value": "FX9999"}]
    validate_resource(changed)
    with db.write() as conn:
        store.put(conn, changed, at=T0 + timedelta(days=1))
    assert ids(find(db, "Patient", identifier=f"{NID}|110102195003151234")) == []
    assert ids(find(db, "Patient", identifier="110102195003151234")) == []
    assert ids(find(db, "Patient", identifier=f"{MRN}|FX9999")) == ["p-wang"]
    hits, _ = find(db, "Patient", identifier=f"{MRN}|FX0001")
    assert [h["meta"]["versionId"] for h in hits] == ["2"]
    assert hits[0]["identifier"] == changed["identifier"]
    with db.read() as conn:
        toks = conn.execute(
            select(FHIR_TOKEN.c.param, FHIR_TOKEN.c.system, FHIR_TOKEN.c.value)
            .where(FHIR_TOKEN.c.rtype == "Patient", FHIR_TOKEN.c.id == "p-wang")
            .order_by(FHIR_TOKEN.c.value)
        ).all()
    assert [tuple(t) for t in toks] == [
        ("identifier", MRN, "FX0001"),
        ("identifier", MRN, "FX9999"),
    ]
    # an update that keeps the identifiers keeps the rows (and the search) as they were
    again = copy.deepcopy(changed)
    again["gender"] = "female"
    with db.write() as conn:
        store.put(conn, again, at=T0 + timedelta(days=2))
    assert ids(find(db, "Patient", identifier=f"{MRN}|FX9999")) == ["p-wang"]


def _answers(s: Store) -> list[Any]:
    queries = [
        ("Patient", {"identifier": f"{NID}|11010119650505231X"}),
        ("Patient", {"identifier": "FX0001"}),
        ("Patient", {"identifier": f"{MRN}|"}),
        ("Patient", {"identifier": "|PAPER-77"}),
        ("Patient", {"identifier": f"{MRN}|FX0002,{MRN}|FX0003"}),
        ("Observation", {"identifier": "urn:hutong:lis:fuxing|LAB-0003"}),
        ("Observation", {"patient": "p-zhang"}),
        ("Observation", {"_count": "5"}),
    ]
    return [find(s, rtype, **params) for rtype, params in queries]


def _tokens(s: Store) -> list[tuple[str, ...]]:
    with s.read() as conn:
        return sorted(tuple(r) for r in conn.execute(select(FHIR_TOKEN)).all())


def _make_old(s: Store) -> None:
    """What a store made before fhir_token looks like: no table, no marker, the old indexes."""
    FHIR_TOKEN.drop(s.engine)
    with s.write() as conn:
        for ix in (IX_NEWEST, IX_PATIENT_NEWEST, IX_PATIENT_HASH):
            conn.execute(text(f"DROP INDEX {ix.name}"))
        conn.execute(text(f"CREATE INDEX {OLD_INDEXES[0]} ON fhir_resource (rtype, last_updated)"))
        conn.execute(text(f"CREATE INDEX {OLD_INDEXES[1]} ON fhir_resource (rtype, patient)"))
        conn.execute(text(f"CREATE INDEX {OLD_INDEXES[2]} ON fhir_resource (patient_hash)"))
        conn.execute(delete(NODE_STATE).where(NODE_STATE.c.key == schema.MARKER))


def _index_names(conn: Connection) -> set[str]:
    if conn.dialect.name == "sqlite":
        sql = "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'fhir_resource'"
    else:
        sql = "SELECT indexname FROM pg_indexes WHERE tablename = 'fhir_resource'"
    return {r[0] for r in conn.exec_driver_sql(sql)}


def test_an_old_store_is_upgraded_once_on_open_with_the_same_answers(dsn: str) -> None:
    s = Store(dsn)
    try:
        s.create_all()
        seed(s)
        want_answers, want_tokens = _answers(s), _tokens(s)
        # each (system, value) identifier of each resource once, and each Observation's code
        assert len(want_tokens) == 8 + 12 + 12
        _make_old(s)
        with s.read() as conn:
            assert not conn.dialect.has_table(conn, "fhir_token")
            assert set(OLD_INDEXES) <= _index_names(conn)
    finally:
        s.dispose()
    reopened = Store(dsn)  # what a node does on start
    try:
        reopened.create_all()
        with reopened.read() as conn:
            names = _index_names(conn)
            assert (
                conn.execute(
                    select(NODE_STATE.c.value).where(NODE_STATE.c.key == schema.MARKER)
                ).scalar()
                == schema.SCHEMA_VERSION
            )
        assert {IX_NEWEST.name, IX_PATIENT_NEWEST.name, IX_PATIENT_HASH.name} <= names
        assert not set(OLD_INDEXES) & names
        assert _tokens(reopened) == want_tokens
        assert _answers(reopened) == want_answers
        # once: a second open leaves the rows alone (a changed row would stay changed)
        with reopened.write() as conn:
            conn.execute(delete(FHIR_TOKEN).where(FHIR_TOKEN.c.id == "p-li"))
        assert schema.upgrade(reopened) == 0
        assert len(_tokens(reopened)) == len(want_tokens) - 2
    finally:
        reopened.dispose()


def test_total_is_exact_when_small_and_an_estimate_above_the_bound(
    db: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed(db)
    monkeypatch.setattr(store, "EXACT_UP_TO", 3)
    monkeypatch.setattr(store, "_ESTIMATES", {})
    assert find(db, "Observation", _count="2")[1] == 12
    assert find(db, "Observation", patient="p-wang", _count="2")[1] == 6
    with db.write() as conn:
        o = observation(12, "p-wang")
        validate_resource(o)
        store.put(conn, o, at=T0 + timedelta(days=1))
    # the estimate is the count of the same query made moments ago; accurate counts now
    assert find(db, "Observation", _count="2")[1] == 12
    assert find(db, "Observation", _count="2", _total="accurate")[1] == 13
    assert find(db, "Observation", _count="2", status="final")[1] == 13  # another query
    assert find(db, "Observation", _count="2", _total="none")[1] is None
    monkeypatch.setattr(store, "EXACT_UP_TO", 1_000)
    assert find(db, "Observation", _count="2")[1] == 13


def _plan(conn: Connection, stmt: Any) -> str:
    sql = str(stmt.compile(conn, compile_kwargs={"literal_binds": True}))
    if conn.dialect.name == "sqlite":
        return "\n".join(r[-1] for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql))
    conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
    return "\n".join(r[0] for r in conn.exec_driver_sql("EXPLAIN " + sql))


def _statements(rtype: str, params: dict[str, str]) -> dict[str, Any]:
    q = parse_query(rtype, list(params.items()), T)
    typed = not q.by_token
    return {
        "page": store.page_query(rtype, q.where, q.count + 1, typed=typed),
        "count": store.count_query(rtype, q.where, typed=typed),
        "bounded count": store.count_query(rtype, q.where, typed=typed, up_to=1000),
    }


@pytest.mark.parametrize(
    ("rtype", "params", "index", "ordered"),
    [
        ("Observation", {"patient": "Patient/p-wang"}, "ix_fhir_type_patient_newest", True),
        (
            "Observation",
            {"subject": "Patient/p-wang", "_count": "5"},
            "ix_fhir_type_patient_newest",
            True,
        ),
        ("Observation", {"_count": "20"}, "ix_fhir_type_newest", True),
        ("Patient", {"identifier": f"{NID}|11010119650505231X"}, "ix_fhir_token_system", False),
        ("Patient", {"identifier": "11010119650505231X"}, "ix_fhir_token_value", False),
        ("Patient", {"identifier": "|PAPER-77"}, "ix_fhir_token", False),
        ("Patient", {"identifier": f"{MRN}|"}, "ix_fhir_token_system", False),
        ("Patient", {"identifier": f"{MRN}|FX0002,FX0003"}, "ix_fhir_token", False),
    ],
)
def test_query_plans_use_the_indexes(
    db: Store, rtype: str, params: dict[str, str], index: str, ordered: bool
) -> None:
    seed(db)
    for kind, stmt in _statements(rtype, params).items():
        with db.read() as conn:
            plan = _plan(conn, stmt)
        what = f"{rtype}?{params} {kind}:\n{plan}"
        if db.is_sqlite:
            # a count may take any index with the same leading columns (the narrowest)
            assert index in plan if kind == "page" else "INDEX" in plan, what
            if index.startswith("ix_fhir_token"):
                assert "fhir_token USING COVERING INDEX ix_fhir_token" in plan, what
            assert not any(line.startswith("SCAN fhir_") for line in plan.splitlines()), what
            assert "SEARCH fhir_resource USING" in plan, what
            if ordered and kind == "page":  # the index gives the page order: no sort
                assert "TEMP B-TREE" not in plan, what
        else:
            # the planner's choice among indexes follows its statistics: no scan is the rule
            assert "Seq Scan" not in plan and "Index" in plan, what
            if index.startswith("ix_fhir_token"):
                assert "on fhir_token" in plan, what
            if ordered and kind == "page":
                assert "Sort" not in plan, what
    # the cursor of a next page is a range of the same index
    if ordered:
        q = parse_query(rtype, list(params.items()), T)
        at = T0 + timedelta(hours=1, minutes=5)
        where = [*q.where, (T.c.last_updated <= at) & ((T.c.last_updated < at) | (T.c.id > "x"))]
        with db.read() as conn:
            plan = _plan(conn, store.page_query(rtype, where, 21))
        assert "Seq Scan" not in plan and "SCAN fhir_" not in plan, plan
        if db.is_sqlite:
            assert index in plan and "last_updated<?" in plan, plan


def test_token_rows_are_each_distinct_identifier_once() -> None:
    p = patient("p-x", [(MRN, "A"), (MRN, "A"), (None, "B"), (MRN, "C" * 300)], "钱")
    p["identifier"].append({"system": MRN})  # a system alone is still searchable by system|
    assert store.token_rows(p) == [
        {"rtype": "Patient", "id": "p-x", "param": "identifier", "system": MRN, "value": "A"},
        {"rtype": "Patient", "id": "p-x", "param": "identifier", "system": "", "value": "B"},
        {"rtype": "Patient", "id": "p-x", "param": "identifier", "system": MRN, "value": "C" * 256},
        {"rtype": "Patient", "id": "p-x", "param": "identifier", "system": MRN, "value": ""},
    ]
    assert store.token_rows({"resourceType": "Patient", "id": "p-y"}) == []


def test_index_objects_are_declared_on_the_table() -> None:
    names = {ix.name for ix in T.indexes if isinstance(ix, Index)}
    assert {IX_NEWEST.name, IX_PATIENT_NEWEST.name, IX_PATIENT_HASH.name} <= names
    assert not set(OLD_INDEXES) & names


def test_a_store_at_schema_4_gains_the_patient_hash_index_without_a_backfill(dsn: str) -> None:
    """Schema 5 only swaps an index: a store at 4 is not read through again (its side tables
    are left as they are: a row removed here stays removed)."""
    s = Store(dsn)
    try:
        s.create_all()
        seed(s)
        want = _tokens(s)
        with s.write() as conn:
            conn.execute(text(f"DROP INDEX {IX_PATIENT_HASH.name}"))
            conn.execute(text(f"CREATE INDEX {OLD_INDEXES[2]} ON fhir_resource (patient_hash)"))
            conn.execute(delete(FHIR_TOKEN).where(FHIR_TOKEN.c.id == "p-li"))
            conn.execute(
                NODE_STATE.update().where(NODE_STATE.c.key == schema.MARKER).values(value="4")
            )
    finally:
        s.dispose()
    reopened = Store(dsn)
    try:
        reopened.create_all()
        with reopened.read() as conn:
            names = _index_names(conn)
            assert (
                conn.execute(
                    select(NODE_STATE.c.value).where(NODE_STATE.c.key == schema.MARKER)
                ).scalar()
                == schema.SCHEMA_VERSION
                == "5"
            )
        assert IX_PATIENT_HASH.name in names and OLD_INDEXES[2] not in names
        assert len(_tokens(reopened)) == len(want) - 2
    finally:
        reopened.dispose()


def _run_by_hash(s: Store, name: str, phash: str) -> list[tuple[str, Any]]:
    """Run one of the functions that find a patient's resources by keyed hash against the
    store; the SQL statements it sent (with their parameters), captured at the driver."""
    from types import SimpleNamespace

    from sqlalchemy import Engine, event

    from bridge.web.clinician import patient_imaging

    sent: list[tuple[str, Any]] = []

    def spy(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if "patient_hash" in statement and statement.lstrip().upper().startswith("SELECT"):
            sent.append((statement, parameters))

    event.listen(Engine, "before_cursor_execute", spy)  # the store's reader and writer
    try:
        if name == "find_patient_by_hash":
            with s.read() as conn:
                assert store.find_patient_by_hash(conn, phash) is not None
        elif name == "results_for":  # the first page and the one after its cursor
            with s.read() as conn:
                nxt = results_for(conn, phash, node_id="core", limit=1)[2]
                results_for(conn, phash, node_id="core", limit=1, after=nxt)
        else:
            patient_imaging(SimpleNamespace(ctx=SimpleNamespace(store=s)), phash)  # type: ignore[arg-type]
    finally:
        event.remove(Engine, "before_cursor_execute", spy)
    assert sent
    return sent


@pytest.mark.parametrize("name", ["find_patient_by_hash", "results_for", "patient_imaging"])
def test_finding_a_patient_by_hash_uses_the_type_and_hash_index(db: Store, name: str) -> None:
    """One patient with many Observations: finding their Patient row (or their reports) by hash
    is a range of ``ix_fhir_type_patient_hash``, not a walk over all of that patient's rows."""
    seed(db)
    phash = "a" * 64
    with db.write() as conn:
        conn.execute(T.update().values(patient_hash=phash))
    for sql, params in _run_by_hash(db, name, phash):
        with db.read() as conn:
            if db.is_sqlite:
                plan = "\n".join(
                    r[-1] for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql, params)
                )
                assert "ix_fhir_type_patient_hash (rtype=? AND patient_hash=?)" in plan, plan
                assert "TEMP B-TREE" not in plan and "SCAN fhir_" not in plan, plan
            else:
                conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
                plan = "\n".join(r[0] for r in conn.exec_driver_sql("EXPLAIN " + sql, params))
                # the planner's choice among indexes follows statistics (a tiny table here)
                assert "Seq Scan" not in plan and "Index" in plan, plan


def report(i: int, pid: str, obs: list[str]) -> dict[str, Any]:
    return {
        "resourceType": "DiagnosticReport",
        "id": f"dr-{i}",
        "status": "final",
        "code": {
            "coding": [{"system": "http://loinc.org", "code": "58410-2", "display": "血常规"}],
            "text": f"血常规 {i}",
        },
        "subject": {"reference": f"Patient/{pid}"},
        "effectiveDateTime": (T0 + timedelta(days=i)).isoformat(),
        "result": [{"reference": f"Observation/{o}"} for o in obs],
    }


def test_results_view_counts_every_report_and_pages_to_the_last(db: Store) -> None:
    """The mutual-recognition view (``results_for``, ``/local/v1/patients/{hash}/results``)
    says how many reports the patient has and pages, newest first, through every one of them
    (no silent cap at 200): 7 reports, two pairs written at the same instant, pages of 2;
    another patient's report is neither counted nor listed."""
    seed(db)
    wang, zhang = "a" * 64, "b" * 64
    with db.write() as conn:
        for i in range(7):  # dr-1/dr-2 and dr-4/dr-5 share their lastUpdated
            at = T0 + timedelta(days=1, minutes={1: 2, 4: 5}.get(i, i))
            r = report(i, "p-wang", [f"obs-{2 * (i % 6)}"])
            validate_resource(r)
            store.put(conn, r, at=at, patient_hash=wang, origin="chc" if i % 2 else None)
        store.put(
            conn, report(9, "p-zhang", ["obs-1"]), at=T0 + timedelta(days=2), patient_hash=zhang
        )
    seen: list[dict[str, Any]] = []
    totals: set[int] = set()
    after: str | None = None
    with db.read() as conn:
        while True:
            items, total, after = results_for(conn, wang, node_id="core", limit=2, after=after)
            totals.add(total)
            seen += items
            if after is None:
                break
            assert len(items) == 2  # a full page before every next cursor
        whole, total, nxt = results_for(conn, wang, node_id="core", limit=1000)
    assert totals == {7} and total == 7 and nxt is None and len(seen) == 7
    assert seen == whole
    # newest first, ties in id order (the index's own order)
    assert [s["report"] for s in seen] == [
        f"DiagnosticReport/dr-{i}" for i in (6, 4, 5, 3, 1, 2, 0)
    ]
    for s in seen:  # each report with its own Observation, where it was produced
        i = int(s["report"].rsplit("-", 1)[1])
        assert (s["name"], s["loinc"], s["status"], s["recognisable"]) == (
            f"血常规 {i}",
            "58410-2",
            "final",
            True,
        )
        assert (s["produced_by"], s["here"]) == (("chc", False) if i % 2 else ("core", True))
        assert [(o["id"], o["value"], o["unit"]) for o in s["observations"]] == [
            (f"obs-{2 * (i % 6)}", 100 + 2 * (i % 6), "g/L")
        ]
    with db.read() as conn:
        assert results_for(conn, zhang, node_id="core")[1] == 1
        assert results_for(conn, "c" * 64, node_id="core") == ([], 0, None)


def test_two_processes_opening_an_old_store_at_once_backfill_it_once(dsn: str) -> None:
    """Two nodes' processes (here: two Stores in two threads) open the same old store: one
    upgrades it, the other finds it done; the tokens are there exactly once."""
    s = Store(dsn)
    try:
        s.create_all()
        seed(s)
        want = _tokens(s)
        _make_old(s)
    finally:
        s.dispose()
    stores = [Store(dsn), Store(dsn)]
    errors: list[BaseException] = []
    made: list[int] = []

    def open_it(st: Store) -> None:
        try:
            st.create_all()
            made.append(schema.upgrade(st))  # a second call on the same store: nothing to do
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=open_it, args=(st,)) for st in stores]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == [] and made == [0, 0]
        assert _tokens(stores[0]) == want
        assert _answers(stores[1]) == _answers(stores[0])
    finally:
        for st in stores:
            st.dispose()


def _imaging_seed(s: Store, phash: str) -> dict[str, list[tuple[datetime, str]]]:
    """Imaging and other reports of one patient (and a study of another): what the referral
    page's imaging lists must hold, as (lastUpdated, id) per type, newest first."""
    rad = [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD"}]}]
    lab = [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "LAB"}]}]
    study_ref = [{"reference": "ImagingStudy/st-000"}]
    items: list[tuple[dict[str, Any], str]] = []
    for i in range(45):  # some at the same instant: the id breaks the tie
        items.append(
            ({"resourceType": "ImagingStudy", "id": f"st-{i:03d}", "status": "available"}, phash)
        )
    items.append(
        ({"resourceType": "ImagingStudy", "id": "st-other", "status": "available"}, "b" * 64)
    )
    for i in range(25):  # coded RAD, naming a study, or both
        dr: dict[str, Any] = {
            "resourceType": "DiagnosticReport",
            "id": f"img-{i:03d}",
            "status": "final",
            "code": {"text": "CT"},
        }
        if i % 3 != 1:
            dr["category"] = rad
        if i % 3 != 0:
            dr["imagingStudy"] = study_ref
        items.append((dr, phash))
    for i in range(6):  # lab reports, one coded RAD by mistake: they hold results
        items.append(
            (
                {
                    "resourceType": "DiagnosticReport",
                    "id": f"lab-{i}",
                    "status": "final",
                    "code": {"text": "CBC"},
                    "category": rad if i == 0 else lab,
                    "result": [{"reference": f"Observation/o-{i}"}],
                },
                phash,
            )
        )
    items.append(
        (
            {
                "resourceType": "DiagnosticReport",
                "id": "quoted",
                "status": "final",
                "code": {"text": "note"},
                "conclusion": 'see "imagingStudy": none',
            },
            phash,
        )
    )
    want: dict[str, list[tuple[datetime, str]]] = {"ImagingStudy": [], "DiagnosticReport": []}
    with s.write() as conn:
        for n, (r, h) in enumerate(items):
            at = T0 + timedelta(minutes=n // 4)
            store.put(conn, r, at=at, patient_hash=h, origin="core")
            if h == phash and (
                r["resourceType"] == "ImagingStudy" or fhirview.is_imaging_report(r)
            ):
                want[r["resourceType"]].append((at, r["id"]))
    return {k: sorted(v, key=lambda w: (-w[0].timestamp(), w[1])) for k, v in want.items()}


def test_a_patients_imaging_is_counted_and_paged_to_the_last_item(db: Store) -> None:
    """The referral page's imaging of the patient (bridge/web/clinician.py): each type counted
    exactly (an imaging report as ``is_imaging_report`` says, in SQL) and paged by keyset,
    newest first, to the last item; no cap at 20 per type."""
    from types import SimpleNamespace

    from bridge.api.outcome import RequestInvalid
    from bridge.web.clinician import IMAGING_PAGE, patient_imaging_page

    phash = "a" * 64
    want = _imaging_seed(db, phash)
    assert (len(want["ImagingStudy"]), len(want["DiagnosticReport"])) == (45, 25)
    web: Any = SimpleNamespace(ctx=SimpleNamespace(store=db))
    for rtype, expected in want.items():
        seen: list[str] = []
        after: str | None = None
        pages = 0
        while True:
            items, total, after = patient_imaging_page(web, phash, rtype, after=after)
            pages += 1
            assert total == len(expected), rtype
            assert {r["resourceType"] for r in items} == {rtype}
            assert {r["_origin"] for r in items} == {"core"}
            seen += [r["id"] for r in items]
            if after is None:
                break
            assert len(items) == IMAGING_PAGE  # a full page before every next one
        assert seen == [rid for _at, rid in expected], rtype  # each once, in order
        assert pages == -(-len(expected) // IMAGING_PAGE)
    assert patient_imaging_page(web, "c" * 64, "ImagingStudy") == ([], 0, None)
    with pytest.raises(RequestInvalid):
        patient_imaging_page(web, phash, "ImagingStudy", after="bm90LWEtY3Vyc29y")
