"""The search parameters, modifiers, chains, orders, includes and subsets of issue #19, in-process
against a real store (SQLite file and a fresh PostgreSQL database).

Searches run through the API's own parser and page function (``parse_query`` + ``fhir_api._page``,
then ``fhir_results``), so the SQL is the one the /fhir API runs; every answer is compared with
the ids (and values) of ``tests/search_seed.py``. The plans of the new conditions name an index
and never scan a table; a store of schema 3 gains the new index rows when it is opened.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import Connection, delete

from bridge.api import fhir_api
from bridge.api.fhir_results import (
    SUBSETTED,
    included,
    revinclude_query,
    revincluded,
    sort_order,
    subset,
)
from bridge.api.fhir_search import REVINCLUDES, parse_query
from bridge.api.outcome import BadRequest
from bridge.fhir.validate import validate_resource
from bridge.fhirstore import schema, store
from bridge.fhirstore.tables import FHIR_DATE, FHIR_STRING, FHIR_TOKEN
from bridge.fhirstore.tables import FHIR_RESOURCE as T
from bridge.store import state
from bridge.store.db import Store
from tests import search_seed as sd

BASE = "http://hospital.example:8080/fhir"


def _seeded(dsn: str) -> Store:
    s = Store(dsn)
    s.create_all()
    with s.write() as conn:
        sd.seed(conn)
    return s


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def db(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    """One seeded store per backend for the module's tests that only read it (about 200; seeding
    takes 0.4-1.5 s). A test that writes takes ``fresh``."""
    dsn = (
        f"sqlite:///{tmp_path_factory.mktemp('search') / 'node.db'}"
        if request.param == "sqlite"
        else str(request.getfixturevalue("pg_module_db"))
    )
    s = _seeded(dsn)
    yield s
    s.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def fresh(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A seeded store of this test's own, for the tests that change it."""
    dsn = (
        f"sqlite:///{tmp_path / 'node.db'}"
        if request.param == "sqlite"
        else str(request.getfixturevalue("pg_db"))
    )
    s = _seeded(dsn)
    yield s
    s.dispose()


def page(s: Store, rtype: str, *params: tuple[str, str]) -> tuple[list[Any], int | None, Any]:
    with s.read() as conn:
        q = parse_query(rtype, list(params), T, base=BASE)
        return fhir_api._page(conn, q)


def found(s: Store, rtype: str, *params: tuple[str, str]) -> list[str]:
    return [r.id for r in page(s, rtype, *params)[0]]


def test_every_example_finds_its_ids_with_the_stored_bodies(db: Store) -> None:
    bodies = {r["id"]: r for r in sd.RESOURCES}
    for (rtype, name), (value, want) in sd.EXAMPLES.items():
        rows, total, _ = page(db, rtype, (name, value))
        assert [r.id for r in rows] == want, (rtype, name, value)
        assert total == len(want)
        for r in rows:  # the stored body, field by field (meta added by the store)
            body = orjson.loads(r.body)
            assert {k: v for k, v in body.items() if k != "meta"} == bodies[r.id]


@pytest.mark.parametrize(
    ("rtype", "params", "want"),
    [
        # strings: starts with, case and accents folded; :exact as written; :contains anywhere
        ("Patient", [("name", "MÜL")], ["p-muller"]),
        ("Patient", [("name", "dr")], ["p-muller"]),  # the prefix is a name part too
        ("Patient", [("name", "秀")], ["p-wang"]),  # the given name 秀英 is a part of the name
        ("Patient", [("name", "英")], []),  # no part starts with it (王秀英, 王, 秀英)
        ("Patient", [("given", "秀")], ["p-wang"]),
        ("Patient", [("name:contains", "秀")], ["p-wang"]),
        ("Patient", [("name:contains", "LLE")], ["p-muller"]),
        ("Patient", [("family:exact", "Müller")], ["p-muller"]),
        ("Patient", [("family:exact", "muller")], []),
        ("Patient", [("family:exact", "Mül")], []),
        ("Patient", [("family", "王,张")], ["p-zhang", "p-wang"]),
        ("Patient", [("name", "王"), ("gender", "male")], []),
        ("Patient", [("gender:missing", "true")], ["p-li"]),
        ("Patient", [("birthdate:missing", "false"), ("gender", "female")], ["p-muller", "p-wang"]),
        ("Patient", [("birthdate", "1965-05-05")], ["p-zhang"]),
        (
            "Patient",
            [("birthdate", "ge1965-05-05"), ("birthdate", "lt1981")],
            ["p-muller", "p-zhang"],
        ),
        ("Patient", [("gender", "http://hl7.org/fhir/administrative-gender|male")], ["p-zhang"]),
        ("Patient", [("gender", "urn:other|male")], []),
        ("Patient", [("gender:not", "female")], ["p-li", "p-zhang"]),
        # tokens: system honoured, :not, :missing
        ("Observation", [("code", "urn:other|718-7")], []),
        ("Observation", [("code", "|718-7")], []),  # no system: every code here has one
        ("Observation", [("code", f"{sd.LOINC}|")], ["obs-bp", "obs-hb", "obs-glu"]),
        ("Observation", [("code:not", "718-7")], ["obs-bp", "obs-glu"]),
        ("Observation", [("category", "laboratory"), ("patient", "p-wang")], ["obs-glu"]),
        ("Observation", [("encounter:missing", "true")], ["obs-bp"]),
        ("Observation", [("based-on:missing", "false")], ["obs-hb", "obs-glu"]),
        ("Observation", [("date", "ge2026-11-02")], ["obs-bp", "obs-hb"]),
        ("Observation", [("date", "lt2026-11-02")], ["obs-glu"]),
        # status: system|code with the type's status system; :not; :missing
        (
            "Observation",
            [("status", "http://hl7.org/fhir/observation-status|final")],
            ["obs-hb", "obs-glu"],
        ),
        ("Observation", [("status", "http://hl7.org/fhir/task-status|final")], []),
        ("Observation", [("status", "|final")], []),
        ("Observation", [("status:not", "final")], ["obs-bp"]),
        (
            "Task",
            [("status", "http://hl7.org/fhir/task-status|requested,completed")],
            ["task-2", "task-1"],
        ),
        ("ServiceRequest", [("encounter:missing", "true")], ["sr-2"]),
        ("Encounter", [("date:missing", "false"), ("class:not", "IMP")], ["enc-1"]),
        # references: this server's absolute URL, :Type, :identifier
        ("Observation", [("patient", f"{BASE}/Patient/p-zhang")], ["obs-hb"]),
        ("Observation", [("encounter", f"{BASE}/Encounter/enc-1")], ["obs-glu"]),
        ("Task", [("focus:ServiceRequest", "sr-2")], ["task-2"]),
        (
            "Observation",
            [("subject:identifier", f"{sd.NID}|110102195003151234")],
            ["obs-bp", "obs-glu"],
        ),
        ("Observation", [("patient", "p-wang,Patient/p-zhang")], ["obs-bp", "obs-hb", "obs-glu"]),
        (
            "Observation",
            [("patient", "p-wang,p-zhang"), ("status", "final")],
            ["obs-hb", "obs-glu"],
        ),
        ("Observation", [("encounter:identifier", "ENC-2")], ["obs-hb"]),
        # chains, one level
        ("Observation", [("patient.identifier", f"{sd.NID}|11010119650505231X")], ["obs-hb"]),
        ("Observation", [("patient.name", "王")], ["obs-bp", "obs-glu"]),
        ("Observation", [("subject:Patient.gender", "male")], ["obs-hb"]),
        ("Task", [("focus:ServiceRequest.status", "active")], ["task-1"]),
        ("Task", [("focus.patient", "p-zhang")], ["task-2"]),
        ("DiagnosticReport", [("result.code", "2345-7")], ["dr-1"]),
        ("DiagnosticReport", [("based-on.status", "completed")], ["dr-2"]),
        ("Observation", [("encounter.class", "AMB")], ["obs-glu"]),
        ("Encounter", [("patient.birthdate", "lt1960")], ["enc-1"]),
        ("ImagingStudy", [("basedon.identifier", "SR-2")], ["img-1"]),
        ("Patient", [("name:contains", "e"), ("_id", "p-wang,p-muller")], ["p-muller"]),
    ],
)
def test_parameters_modifiers_chains(
    db: Store, rtype: str, params: list[tuple[str, str]], want: list[str]
) -> None:
    assert found(db, rtype, *params) == want


@pytest.mark.parametrize(
    ("params", "rule"),
    [
        ([("patient", "http://elsewhere.example/fhir/Patient/p-wang")], "another server's URL"),
        ([("_sort", "valueString")], "_sort: each key is one of"),
        ([("_summary", "maybe")], "_summary must be one of"),
        ([("name:missing", "yes")], "true or false"),
        ([("_elements", "a b")], "_elements: comma-separated"),
        ([("date", "xx2026")], "the prefix is not one of"),
    ],
)
def test_refusals_name_the_parameter_and_the_rule_not_the_value(
    params: list[tuple[str, str]], rule: str
) -> None:
    with pytest.raises(BadRequest) as exc:
        parse_query(
            "Observation" if params[0][0] != "name:missing" else "Patient", params, T, base=BASE
        )
    assert rule in exc.value.message
    for _, value in params:
        assert value not in exc.value.message or value in ("valueString",)


def test_unknown_modifiers_and_chains_are_named() -> None:
    with pytest.raises(BadRequest) as exc:
        parse_query(
            "Observation",
            [
                ("code:contains", "7"),
                ("status.x", "1"),
                ("patient.identifier.system", "2"),
                ("requester.name", "王"),
                ("subject:Group.name", "x"),
            ],
            T,
        )
    msg = exc.value.message
    assert msg.startswith(
        "unknown search parameter(s) for Observation: code:contains, "
        "status.x, (unreadable name), requester.name, subject:Group.name"
    )
    q = parse_query("Observation", [("code:contains", "7"), ("status", "final")], T, lenient=True)
    assert q.ignored == ["code:contains"] and q.used == [("status", "final")]


def test_sort_orders_and_paging(db: Store) -> None:
    newest = sd.ids_of("Observation")
    assert found(db, "Observation", ("_sort", "-_lastUpdated")) == newest
    assert found(db, "Observation", ("_sort", "_lastUpdated")) == newest[::-1]  # ascending
    assert found(db, "Observation", ("_sort", "_id")) == sorted(newest)
    assert found(db, "Observation", ("_sort", "-_id")) == sorted(newest, reverse=True)
    # date: the effective time's start (obs-glu 11-01, obs-bp 11-02, obs-hb 11-03)
    assert found(db, "Observation", ("_sort", "date")) == ["obs-glu", "obs-bp", "obs-hb"]
    assert found(db, "Observation", ("_sort", "-date")) == ["obs-hb", "obs-bp", "obs-glu"]
    # several keys: status first (final < preliminary), then date descending
    assert found(db, "Observation", ("_sort", "status,-date")) == ["obs-hb", "obs-glu", "obs-bp"]
    # absent values last in both directions
    assert found(db, "Patient", ("_sort", "birthdate")) == ["p-wang", "p-zhang", "p-muller", "p-li"]
    assert found(db, "Patient", ("_sort", "-birthdate")) == [
        "p-muller",
        "p-zhang",
        "p-wang",
        "p-li",
    ]
    # strings: by code point of the folded name (张 U+5F20 < 李 U+674E < 王 U+738B), not pinyin
    assert found(db, "Patient", ("_sort", "family")) == ["p-muller", "p-zhang", "p-li", "p-wang"]
    # pages of 2 in a sorted order: by position, every match once, total on each page
    got: list[str] = []
    params = [("_sort", "-birthdate"), ("_count", "2")]
    with db.read() as conn:
        while True:
            q = parse_query("Patient", params, T)
            rows, total, nxt = fhir_api._page(conn, q)
            assert total == 4
            got += [r.id for r in rows]
            if nxt is None:
                break
            params = [("_sort", "-birthdate"), ("_count", "2"), ("_cursor", nxt)]
    assert got == ["p-muller", "p-zhang", "p-wang", "p-li"]
    # a cursor of one order is refused in the other
    with db.read() as conn:
        q = parse_query("Patient", [("_count", "1")], T)
        _, _, keyset = fhir_api._page(conn, q)
        with pytest.raises(BadRequest):
            fhir_api._page(
                conn, parse_query("Patient", [("_sort", "birthdate"), ("_cursor", keyset)], T)
            )


def _with_includes(s: Store, rtype: str, *params: tuple[str, str]) -> list[tuple[str, str]]:
    with s.read() as conn:
        q = parse_query(rtype, list(params), T)
        rows, _, _ = fhir_api._page(conn, q)
        inc, w1 = included(conn, q, rows)
        rev, w2 = revincluded(conn, q, rows + inc)
    assert w1 == w2 == []
    return [("match", f"{r.rtype}/{r.id}") for r in rows] + [
        ("include", f"{r.rtype}/{r.id}") for r in inc + rev
    ]


def test_include_and_revinclude(db: Store) -> None:
    assert _with_includes(
        db, "Task", ("_id", "task-1"), ("_include", "Task:focus"), ("_include", "Task:patient")
    ) == [
        ("match", "Task/task-1"),
        ("include", "ServiceRequest/sr-1"),
        ("include", "Patient/p-wang"),
    ]
    assert _with_includes(
        db,
        "ServiceRequest",
        ("_id", "sr-2"),
        ("_revinclude", "Task:focus"),
        ("_revinclude", "DiagnosticReport:based-on"),
        ("_revinclude", "ImagingStudy:basedon"),
        ("_revinclude", "Observation:based-on"),
    ) == [
        ("match", "ServiceRequest/sr-2"),
        ("include", "Task/task-2"),
        ("include", "DiagnosticReport/dr-2"),
        ("include", "ImagingStudy/img-1"),
        ("include", "Observation/obs-hb"),
    ]
    # a report with its results and its patient; the patient's encounters back
    assert _with_includes(
        db,
        "DiagnosticReport",
        ("_id", "dr-1"),
        ("_include", "DiagnosticReport:result"),
        ("_include", "DiagnosticReport:patient:Patient"),
    ) == [
        ("match", "DiagnosticReport/dr-1"),
        ("include", "Observation/obs-glu"),
        ("include", "Patient/p-wang"),
    ]
    assert _with_includes(
        db,
        "Patient",
        ("_id", "p-wang"),
        ("_revinclude", "Observation:patient"),
        ("_revinclude", "Encounter:patient"),
    ) == [
        ("match", "Patient/p-wang"),
        ("include", "Observation/obs-bp"),
        ("include", "Observation/obs-glu"),
        ("include", "Encounter/enc-1"),
    ]
    assert _with_includes(
        db,
        "Encounter",
        ("_id", "enc-1"),
        ("_revinclude", "Observation:encounter"),
        ("_revinclude", "DiagnosticReport:encounter"),
        ("_revinclude", "ServiceRequest:encounter"),
    ) == [
        ("match", "Encounter/enc-1"),
        ("include", "Observation/obs-glu"),
        ("include", "DiagnosticReport/dr-1"),
        ("include", "ServiceRequest/sr-1"),
    ]
    # an included resource already on the page comes once
    assert _with_includes(
        db, "Observation", ("patient", "p-wang"), ("_include", "Observation:patient")
    ) == [
        ("match", "Observation/obs-bp"),
        ("match", "Observation/obs-glu"),
        ("include", "Patient/p-wang"),
    ]
    for rtype, name, value in (
        ("Task", "_include", "Task:owner"),
        ("Patient", "_revinclude", "Consent:patient"),
        ("Observation", "_include", "Observation:patient:Group"),
    ):
        with pytest.raises(BadRequest) as exc:
            parse_query(rtype, [(name, value)], T)
        assert exc.value.message.startswith(f"{name}: not one this server follows on {rtype}")


def test_summary_and_elements_subsets(db: Store) -> None:
    with db.read() as conn:
        body = orjson.loads(store.get_row(conn, "Patient", "p-wang").body)
    q = parse_query("Patient", [("_summary", "true")], T)
    s = subset(copy.deepcopy(body), q)
    assert set(s) == {"resourceType", "id", "meta", "identifier", "name", "gender", "birthDate"}
    assert s["meta"]["tag"] == [SUBSETTED] and s["name"] == body["name"]
    validate_resource(s)
    s = subset(copy.deepcopy(body), parse_query("Patient", [("_summary", "text")], T))
    assert set(s) == {"resourceType", "id", "meta", "text"} and s["text"] == body["text"]
    s = subset(copy.deepcopy(body), parse_query("Patient", [("_summary", "data")], T))
    assert set(s) == set(body) - {"text"} and s["meta"]["tag"] == [SUBSETTED]
    assert subset(copy.deepcopy(body), parse_query("Patient", [("_summary", "false")], T)) == body
    s = subset(copy.deepcopy(body), parse_query("Patient", [("_elements", "gender,name")], T))
    assert s == {
        "resourceType": "Patient",
        "id": "p-wang",
        "gender": "female",
        "name": body["name"],
        "meta": {**body["meta"], "tag": [SUBSETTED]},
    }
    # the elements R4 requires stay (Observation.status and .code)
    with db.read() as conn:
        obs = orjson.loads(store.get_row(conn, "Observation", "obs-hb").body)
    s = subset(obs, parse_query("Observation", [("_elements", "subject")], T))
    assert set(s) == {"resourceType", "id", "meta", "status", "code", "subject"}
    validate_resource(s)
    # _summary=count: the total only
    rows, total, nxt = page(db, "Observation", ("_summary", "count"), ("status", "final"))
    assert rows == [] and total == 2 and nxt is None


def test_an_update_moves_codes_references_dates_and_names(fresh: Store) -> None:
    obs = copy.deepcopy(next(r for r in sd.RESOURCES if r["id"] == "obs-hb"))
    obs["code"] = sd._cc(sd.LOINC, "2345-7")
    obs["encounter"] = {"reference": "Encounter/enc-1"}
    obs["effectiveDateTime"] = "2026-12-24"
    pat = copy.deepcopy(next(r for r in sd.RESOURCES if r["id"] == "p-li"))
    pat["name"] = [{"family": "Łukasz"}]
    with fresh.write() as conn:
        store.put(conn, obs, at=sd.T0 + timedelta(days=1))
        store.put(conn, pat, at=sd.T0 + timedelta(days=1))
    assert found(fresh, "Observation", ("code", "718-7")) == []
    assert found(fresh, "Observation", ("code", "2345-7")) == ["obs-hb", "obs-glu"]
    assert found(fresh, "Observation", ("encounter", "enc-2")) == []
    assert found(fresh, "Observation", ("date", "2026-12")) == ["obs-hb"]
    assert found(fresh, "Patient", ("family", "李")) == []
    assert found(fresh, "Patient", ("family", "lu")) == []  # Ł has no decomposition: kept
    assert found(fresh, "Patient", ("family", "łu")) == ["p-li"]


def test_rows_of_a_resource() -> None:
    pat = next(r for r in sd.RESOURCES if r["id"] == "p-muller")
    rows = store.string_rows(pat)
    whole = sorted((r["param"], r["norm"], r["raw"]) for r in rows if r["pos"] == 0)
    assert whole == [
        ("family", "muller", "Müller"),
        ("given", "anna", "Anna"),
        ("given", "maria", "Maria"),
        ("name", "anna", "Anna"),
        ("name", "dr.", "Dr."),
        ("name", "maria", "Maria"),
        ("name", "muller", "Müller"),
    ]
    assert {r["norm"] for r in rows if r["param"] == "family"} == {
        "muller",
        "uller",
        "ller",
        "ler",
        "er",
        "r",
    }
    dr = next(r for r in sd.RESOURCES if r["id"] == "dr-1")
    assert sorted((t["param"], t["system"], t["value"]) for t in store.token_rows(dr)) == [
        ("based-on", "", "ServiceRequest/sr-1"),
        ("category", sd.V2_0074, "LAB"),
        ("code", sd.LOINC, "24323-8"),
        ("encounter", "", "Encounter/enc-1"),
        ("identifier", "urn:hutong:lis:fuxing", "DR-1"),
        ("result", "", "Observation/obs-glu"),
    ]


def test_a_schema_3_store_gains_the_new_rows_on_open(fresh: Store) -> None:
    want = {
        (rtype, name): found(fresh, rtype, (name, value))
        for (rtype, name), (value, _) in sd.EXAMPLES.items()
    }
    with fresh.write() as conn:  # as a store of schema 3 looked
        conn.execute(delete(FHIR_STRING))
        conn.execute(delete(FHIR_DATE).where(FHIR_DATE.c.rtype != "Encounter"))
        conn.execute(delete(FHIR_TOKEN).where(FHIR_TOKEN.c.param.not_in(["identifier", "class"])))
        state.put(conn, schema.MARKER, "3", sd.T0)
    assert found(fresh, "Patient", ("family", "王")) == []
    schema.upgrade(fresh)
    got = {
        (rtype, name): found(fresh, rtype, (name, value))
        for (rtype, name), (value, _) in sd.EXAMPLES.items()
    }
    assert got == want
    with fresh.read() as conn:
        assert state.get(conn, schema.MARKER) == schema.SCHEMA_VERSION


def _plan(conn: Connection, stmt: Any) -> str:
    sql = str(stmt.compile(conn, compile_kwargs={"literal_binds": True}))
    if conn.dialect.name == "sqlite":
        return "\n".join(r[-1] for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql))
    conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
    return "\n".join(r[0] for r in conn.exec_driver_sql("EXPLAIN " + sql))


@pytest.mark.parametrize(
    ("rtype", "params", "index"),
    [
        ("Patient", [("name", "王")], "ix_fhir_string_value"),
        ("Patient", [("family:exact", "Müller")], "ix_fhir_string_value"),
        ("Patient", [("given:contains", "ar")], "ix_fhir_string_value"),
        ("Patient", [("gender", "female")], "fhir_token"),
        ("Patient", [("birthdate", "lt1970")], "fhir_date"),
        # a day is looked up on the start index; beside a patient, the patient index drives
        ("Patient", [("birthdate", "1965-05-05"), ("gender", "male")], "ix_fhir_date_start"),
        (
            "Observation",
            [("patient", "p-wang"), ("date", "2026-11-02")],
            "ix_fhir_type_patient_newest",
        ),
        # a name of one character is broad (a family name): the day drives; two characters drive
        ("Patient", [("given", "秀"), ("birthdate", "1950-03-15")], "ix_fhir_date_start"),
        ("Patient", [("given", "秀英"), ("birthdate", "1950-03-15")], "ix_fhir_string_value"),
        ("Patient", [("birthdate", "1950-03"), ("gender", "female")], "ix_fhir_date_start"),
        ("Observation", [("code", f"{sd.LOINC}|718-7")], "fhir_token"),
        ("Observation", [("patient", "p-wang"), ("code", "718-7")], "ix_fhir_type_patient_newest"),
        ("Observation", [("patient", "p-wang,Patient/p-zhang")], "ix_fhir_type_patient_newest"),
        (
            "Observation",
            [("_id", "obs-hb,obs-bp")],
            "sqlite_autoindex_fhir_resource_1 (rtype=? AND id=?)",
        ),
        ("Observation", [("category", "laboratory"), ("date", "ge2026-11-02")], "fhir_date"),
        ("Observation", [("encounter", "enc-1")], "ix_fhir_token_value"),
        ("Observation", [("based-on", "sr-1")], "ix_fhir_token_value"),
        ("Observation", [("code:not", "718-7")], "fhir_token"),
        ("Observation", [("encounter:missing", "true")], "fhir_token"),
        (
            "Observation",
            [("patient.identifier", f"{sd.NID}|110102195003151234")],
            "ix_fhir_token_system",
        ),
        ("Observation", [("patient.name", "王")], "ix_fhir_string_value"),
        ("Task", [("focus:ServiceRequest.status", "active")], "ix_fhir_token_value"),
        ("DiagnosticReport", [("result.code", "2345-7")], "ix_fhir_token_value"),
        ("Observation", [("_sort", "_lastUpdated")], "ix_fhir_type_newest"),
        ("Observation", [("_sort", "_id")], "fhir_resource"),
        ("Observation", [("patient", "p-wang"), ("_sort", "-date")], "ix_fhir_type_patient_newest"),
    ],
)
def test_plans_use_indexes_never_a_table_scan(
    db: Store, rtype: str, params: list[tuple[str, str]], index: str
) -> None:
    q = parse_query(rtype, params, T)
    typed = not q.by_token
    stmts = {
        "page": store.page_query(rtype, q.where, 21, typed=typed, order=sort_order(q)),
        "count": store.count_query(rtype, q.where, typed=typed, up_to=1000),
    }
    for kind, stmt in stmts.items():
        with db.read() as conn:
            plan = _plan(conn, stmt)
        what = f"{rtype}?{params} {kind}:\n{plan}"
        if db.is_sqlite:
            # (the bounded count's "SCAN anon_1" reads its own subquery, not a table)
            assert not any(line.lstrip().startswith("SCAN fhir_") for line in plan.splitlines()), (
                what
            )
            assert index in plan or kind == "count", what
        else:
            assert "Seq Scan" not in plan and "Index" in plan, what
    if db.is_sqlite and q.sort == [("_lastUpdated", False)]:  # read backwards: no sort
        with db.read() as conn:
            assert "TEMP B-TREE" not in _plan(conn, stmts["page"])


@pytest.mark.parametrize(
    ("params", "want"),
    [
        ([("patient.identifier", f"{sd.NID}|110102195003151234")], ["obs-bp", "obs-glu"]),
        ([("subject:identifier", "110102195003151234")], ["obs-bp", "obs-glu"]),
        ([("patient.name", "王秀英"), ("code", "2345-7")], ["obs-glu"]),
    ],
)
def test_a_narrow_chain_drives_the_search(
    db: Store, params: list[tuple[str, str]], want: list[str]
) -> None:
    """The patients found first, then their Observations by the patient index: never a walk
    of every Observation in page order testing each against the chain."""
    q = parse_query("Observation", params, T)
    assert q.by_token
    with db.read() as conn:
        plan = _plan(conn, store.page_query("Observation", q.where, 21, typed=False))
    if db.is_sqlite:
        assert "ix_fhir_type_patient_newest (rtype=? AND patient=?)" in plan, plan
        assert "ix_fhir_type_newest" not in plan and "SCAN fhir_" not in plan, plan
    else:
        assert "Seq Scan" not in plan, plan
    assert found(db, "Observation", *params) == want


@pytest.mark.parametrize("spec", sorted({s for v in REVINCLUDES.values() for s in v}))
def test_revinclude_lookups_use_indexes(db: Store, spec: str) -> None:
    """Several targets (a page): the ids are looked up, never a walk of the type's rows."""
    target = {
        "Task:focus": "ServiceRequest",
        "DiagnosticReport:based-on": "ServiceRequest",
        "Observation:based-on": "ServiceRequest",
        "ImagingStudy:basedon": "ServiceRequest",
        "DiagnosticReport:result": "Observation",
    }.get(spec)
    if target is None:
        target = "Encounter" if spec.endswith(":encounter") else "Patient"
    targets = [f"{target}/a", f"{target}/b", f"{target}/c"]
    with db.read() as conn:
        plan = _plan(conn, revinclude_query(spec, targets))
    if db.is_sqlite:
        index = (
            "ix_fhir_token_value"
            if spec.split(":")[1] != "patient"
            else "ix_fhir_type_patient_newest"
        )
        assert index in plan and "SCAN fhir_" not in plan, plan
        assert "ix_fhir_type_newest" not in plan, plan
    else:
        assert "Seq Scan" not in plan, plan
