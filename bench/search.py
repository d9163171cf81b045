"""Local FHIR API searches/s on a store of N resources (10 k, 100 k, 1 M by default).

One node (``hutong run``, SQLite) is stopped, its ``fhir_resource`` table is topped up to N
rows (one Patient per ten resources, nine Observations per Patient) together with their index
rows (``fhir_token``: identifiers, codes, categories, genders; ``fhir_date``: effective times and
birth dates; ``fhir_string``: names), exactly as ``bridge.fhirstore.store.put`` would write them
(search columns from ``search_columns``, index rows from ``token_rows``, ``date_rows``,
``string_rows``; no ``fhir_history`` rows, which search does not read). The loader writes
finished rows with ``executemany`` on the raw sqlite3 connection, 250 k rows per transaction, with
``synchronous=OFF`` and a large page cache for the load only (the node reopens the file with
its own settings). Loading through the API would take hours at 1 M. Then the node is started
and one keep-alive client (clinician token) asks each query for ``SECONDS_PER_QUERY``:

* ``Observation?patient=Patient/<id>``: a patient's results (index ``rtype, patient,
  last_updated DESC, id``: already in page order);
* ``Patient?identifier=<system>|<value>``: a patient by ID number (``fhir_token`` index);
* ``Observation?_count=20``: the newest page, with the total count (counted on
  ``ix_fhir_type_newest``, no bodies read);

and the parameters of issue #19 (``NEW_QUERIES``): a given name, a birth date with a gender, a
patient's results of one code sorted by date, the newest of a code every Observation has with
an open date range, a chain (``patient.identifier``), a ``_revinclude``, an ascending
``_lastUpdated`` page, ``_summary=count`` and ``_elements``.

Every search is audited (one durable commit per request), as in production.
"""

from __future__ import annotations

import http.client
import os
import random
import shutil
import sqlite3
import time
import uuid
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import exchange as ex
import orjson
from sqlalchemy import create_engine, func, insert, select

from bridge.fhirstore.store import date_rows, search_columns, string_rows, token_rows
from bridge.fhirstore.tables import FHIR_DATE, FHIR_RESOURCE, FHIR_STRING, FHIR_TOKEN
from tests.harness import Alliance

CHUNK = 250_000
ID_SYSTEM = "urn:oid:2.16.156.10011.1.3"
SECONDS_PER_QUERY = 1.5
#: fhir_resource columns in the order the loader writes them
COLUMNS = (
    "rtype",
    "id",
    "version",
    "last_updated",
    "patient",
    "patient_hash",
    "status",
    "requester",
    "performer",
    "owner",
    "focus",
    "identifiers",
    "thread",
    "origin",
    "body",
)
TOKEN_COLUMNS = ("rtype", "id", "param", "system", "value")
DATE_COLUMNS = ("rtype", "id", "param", "start", "end")
STRING_COLUMNS = ("rtype", "id", "param", "norm", "pos", "raw")
OBS_CAT = "http://terminology.hl7.org/CodeSystem/observation-category"
GENDER = "http://hl7.org/fhir/administrative-gender"
#: family names by patient number (p % 20): one in twenty patients shares each
SURNAMES = "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗"
BIRTH0 = datetime(1940, 1, 1, tzinfo=UTC)


def pid_of(i: int) -> str:
    return str(uuid.UUID(int=i + 1))


def resource_for(j: int, base: datetime) -> tuple[dict[str, Any], datetime]:
    """Resource j: a Patient every 10th, else an Observation of the last Patient."""
    p = j // 10
    at = base + timedelta(seconds=j)
    lu = at.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    if j % 10 == 0:
        res: dict[str, Any] = {
            "resourceType": "Patient",
            "id": pid_of(p),
            "meta": {"versionId": "1", "lastUpdated": lu},
            "identifier": [{"system": ID_SYSTEM, "value": f"1101021950{p:08d}"}],
            "name": [{"family": SURNAMES[p % 20], "given": [f"{p:06d}"]}],
            "gender": "female" if p % 2 == 0 else "male",
            "birthDate": (BIRTH0 + timedelta(days=p % 25000)).strftime("%Y-%m-%d"),
        }
    else:
        res = {
            "resourceType": "Observation",
            "id": str(uuid.UUID(int=(1 << 64) + j)),
            "meta": {"versionId": "1", "lastUpdated": lu},
            "status": "final",
            "category": [{"coding": [{"system": OBS_CAT, "code": "laboratory"}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "718-7"}]},
            "subject": {"reference": f"Patient/{pid_of(p)}"},
            "effectiveDateTime": at.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "valueQuantity": {"value": 120 + j % 40, "unit": "g/L"},
        }
    return res, at


def row_for(j: int, base: datetime) -> dict[str, Any]:
    """The fhir_resource row of resource j (as ``store.put`` writes it)."""
    res, at = resource_for(j, base)
    return {
        "rtype": res["resourceType"],
        "id": res["id"],
        "version": 1,
        "last_updated": at,
        "body": orjson.dumps(res),
        "thread": None,
        "patient_hash": None,
        "origin": "bench",
        **search_columns(res),
    }


BASE = datetime(2025, 1, 1, tzinfo=UTC)
_EPOCH = int(BASE.timestamp())

# The same rows as ``row_for`` / ``token_rows``, made by SQLite itself (a Python loop that builds
# and serialises each row costs 30-200 us a row on the shared VM: minutes at 1 M). ``_check``
# compares sampled rows, column by column and body byte by byte, with the Python path.
_SQL_RESOURCES = f"""
WITH RECURSIVE n(j) AS (SELECT :start UNION ALL SELECT j + 1 FROM n WHERE j + 1 < :stop),
r(j, p, t) AS (SELECT j, j / 10, {_EPOCH} + j FROM n)
INSERT INTO fhir_resource ({", ".join(COLUMNS)})
SELECT CASE WHEN j % 10 = 0 THEN 'Patient' ELSE 'Observation' END,
       CASE WHEN j % 10 = 0 THEN printf('00000000-0000-0000-0000-%012x', p + 1)
            ELSE printf('00000000-0000-0001-0000-%012x', j) END,
       1, datetime(t, 'unixepoch') || '.000000',
       printf('Patient/00000000-0000-0000-0000-%012x', p + 1),
       NULL, CASE WHEN j % 10 = 0 THEN NULL ELSE 'final' END, NULL, NULL, NULL, NULL,
       CASE WHEN j % 10 = 0 THEN printf('|{ID_SYSTEM}|1101021950%08d|', p) END,
       NULL, 'bench',
       CAST(CASE WHEN j % 10 = 0 THEN printf(
         '{{"resourceType":"Patient","id":"00000000-0000-0000-0000-%012x",'
         || '"meta":{{"versionId":"1","lastUpdated":"%s.000Z"}},'
         || '"identifier":[{{"system":"{ID_SYSTEM}","value":"1101021950%08d"}}],'
         || '"name":[{{"family":"%s","given":["%06d"]}}],"gender":"%s","birthDate":"%s"}}',
         p + 1, strftime('%Y-%m-%dT%H:%M:%S', t, 'unixepoch'), p,
         substr('{SURNAMES}', p % 20 + 1, 1), p,
         CASE WHEN p % 2 = 0 THEN 'female' ELSE 'male' END,
         date('1940-01-01', '+' || (p % 25000) || ' days'))
       ELSE printf(
         '{{"resourceType":"Observation","id":"00000000-0000-0001-0000-%012x",'
         || '"meta":{{"versionId":"1","lastUpdated":"%s.000Z"}},"status":"final",'
         || '"category":[{{"coding":[{{"system":"{OBS_CAT}","code":"laboratory"}}]}}],'
         || '"code":{{"coding":[{{"system":"http://loinc.org","code":"718-7"}}]}},'
         || '"subject":{{"reference":"Patient/00000000-0000-0000-0000-%012x"}},'
         || '"effectiveDateTime":"%sZ",'
         || '"valueQuantity":{{"value":%d,"unit":"g/L"}}}}',
         j, strftime('%Y-%m-%dT%H:%M:%S', t, 'unixepoch'), p + 1,
         strftime('%Y-%m-%dT%H:%M:%S', t, 'unixepoch'), 120 + j % 40)
       END AS BLOB)
FROM r"""
_SQL_TOKENS = f"""
WITH RECURSIVE n(p) AS (SELECT :first UNION ALL SELECT p + 1 FROM n WHERE p + 1 < :end)
INSERT INTO fhir_token ({", ".join(TOKEN_COLUMNS)})
SELECT 'Patient', printf('00000000-0000-0000-0000-%012x', p + 1), 'identifier', '{ID_SYSTEM}',
       printf('1101021950%08d', p)
FROM n
UNION ALL
SELECT 'Patient', printf('00000000-0000-0000-0000-%012x', p + 1), 'gender', '{GENDER}',
       CASE WHEN p % 2 = 0 THEN 'female' ELSE 'male' END
FROM n"""
_SQL_OBS_TOKENS = f"""
WITH RECURSIVE n(j) AS (SELECT :start UNION ALL SELECT j + 1 FROM n WHERE j + 1 < :stop)
INSERT INTO fhir_token ({", ".join(TOKEN_COLUMNS)})
SELECT 'Observation', printf('00000000-0000-0001-0000-%012x', j), k.param, k.system, k.value
FROM n, (SELECT 'code' AS param, 'http://loinc.org' AS system, '718-7' AS value
         UNION ALL SELECT 'category', '{OBS_CAT}', 'laboratory') AS k
WHERE j % 10 != 0"""
#: fhir_date rows: an Observation's effective second, a Patient's birth day
_SQL_DATES = f"""
WITH RECURSIVE n(j) AS (SELECT :start UNION ALL SELECT j + 1 FROM n WHERE j + 1 < :stop)
INSERT INTO fhir_date ({", ".join(DATE_COLUMNS)})
SELECT CASE WHEN j % 10 = 0 THEN 'Patient' ELSE 'Observation' END,
       CASE WHEN j % 10 = 0 THEN printf('00000000-0000-0000-0000-%012x', j / 10 + 1)
            ELSE printf('00000000-0000-0001-0000-%012x', j) END,
       CASE WHEN j % 10 = 0 THEN 'birthdate' ELSE 'date' END,
       CASE WHEN j % 10 = 0 THEN date('1940-01-01', '+' || (j / 10 % 25000) || ' days')
                                 || ' 00:00:00.000000'
            ELSE datetime({_EPOCH} + j, 'unixepoch') || '.000000' END,
       CASE WHEN j % 10 = 0 THEN date('1940-01-01', '+' || (j / 10 % 25000 + 1) || ' days')
                                 || ' 00:00:00.000000'
            ELSE datetime({_EPOCH} + j + 1, 'unixepoch') || '.000000' END
FROM n"""
#: fhir_string rows of a Patient: the family name (one character), the given name (six
#: digits) whole and by suffix, under name, family and given
_SQL_STRINGS = f"""
WITH RECURSIVE n(p) AS (SELECT :first UNION ALL SELECT p + 1 FROM n WHERE p + 1 < :end),
parts(param, part) AS (VALUES ('name', 'family'), ('name', 'given'), ('family', 'family'),
                              ('given', 'given')),
pos(i) AS (VALUES (0), (1), (2), (3), (4), (5))
INSERT INTO fhir_string ({", ".join(STRING_COLUMNS)})
SELECT 'Patient', printf('00000000-0000-0000-0000-%012x', p + 1), param,
       substr(CASE part WHEN 'family' THEN substr('{SURNAMES}', p % 20 + 1, 1)
                        ELSE printf('%06d', p) END, i + 1), i,
       CASE WHEN i = 0 THEN CASE part WHEN 'family' THEN substr('{SURNAMES}', p % 20 + 1, 1)
                                      ELSE printf('%06d', p) END ELSE '' END
FROM n, parts, pos
WHERE part = 'given' OR i = 0"""


def _check(db: sqlite3.Connection, js: list[int]) -> None:
    """Loaded rows are what ``store.put`` writes: every column, and the token rows."""
    for j in js:
        want = row_for(j, BASE)
        got = db.execute(
            f"SELECT {', '.join(COLUMNS)} FROM fhir_resource WHERE rtype = ? AND id = ?",
            (want["rtype"], want["id"]),
        ).fetchone()
        want["last_updated"] = (
            want["last_updated"].replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f")
        )
        if got != tuple(want[c] for c in COLUMNS):
            raise RuntimeError(
                f"bench loader: resource {j} differs from store.put's row: {got!r} != {want!r}"
            )
        body = orjson.loads(want["body"])
        for table, cols, made in (
            ("fhir_token", TOKEN_COLUMNS, token_rows(body)),
            ("fhir_date", DATE_COLUMNS, date_rows(body)),
            ("fhir_string", STRING_COLUMNS, string_rows(body)),
        ):
            got_rows = sorted(
                db.execute(
                    f"SELECT {', '.join(cols)} FROM {table} WHERE rtype = ? AND id = ?",
                    (want["rtype"], want["id"]),
                ).fetchall()
            )
            want_rows = sorted(tuple(_sqlite_value(r[c]) for c in cols) for r in made)
            if got_rows != want_rows:
                raise RuntimeError(
                    f"bench loader: {table} rows of resource {j}: {got_rows} != {want_rows}"
                )


def _sqlite_value(v: Any) -> Any:
    """A value as SQLAlchemy keeps it in SQLite (naive UTC datetimes as text)."""
    if isinstance(v, datetime):
        return v.replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f")
    return v


def _fill_sqlite(path: str, have: int, target: int) -> None:
    db = sqlite3.connect(path, isolation_level=None)
    try:
        # bulk load only: the node reopens the file with WAL and synchronous=FULL
        db.execute("PRAGMA synchronous=OFF")
        db.execute("PRAGMA cache_size=-400000")  # 400 MB
        db.execute("PRAGMA temp_store=MEMORY")
        db.execute("PRAGMA journal_mode=OFF")  # no WAL copy of every page; back to WAL below
        i = have
        while i < target:
            stop = min(target, i + CHUNK)
            db.execute("BEGIN")
            db.execute(_SQL_RESOURCES, {"start": i, "stop": stop})
            patients = {"first": (i + 9) // 10, "end": (stop + 9) // 10}
            db.execute(_SQL_TOKENS, patients)
            db.execute(_SQL_OBS_TOKENS, {"start": i, "stop": stop})
            db.execute(_SQL_DATES, {"start": i, "stop": stop})
            db.execute(_SQL_STRINGS, patients)
            db.execute("COMMIT")
            i = stop
        first_patient = have + (-have % 10)
        _check(
            db,
            sorted(
                j
                for j in {have, (have + target) // 2, target - 1, first_patient}
                if have <= j < target
            ),
        )
        db.execute("PRAGMA journal_mode=WAL")
    finally:
        db.close()
    # the load wrote with synchronous=OFF: flush it now, or the node's first WAL checkpoint
    # fsyncs ~1 GB of dirty pages in the middle of the measured searches (a 1.7 s stall at 1 M)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fill(dsn: str, target: int) -> float:
    """Top the store up to ``target`` resources; seconds taken."""
    t0 = time.perf_counter()
    if dsn.startswith("sqlite"):
        path = dsn.split("///", 1)[1]
        with closing(sqlite3.connect(path)) as db:
            have = db.execute("SELECT count(*) FROM fhir_resource").fetchone()[0]
        _fill_sqlite(path, have, target)
        return time.perf_counter() - t0
    engine = create_engine(dsn)
    try:
        with engine.connect() as conn:
            have = conn.execute(select(func.count()).select_from(FHIR_RESOURCE)).scalar_one()
        for i in range(have, target, 20_000):
            rows = [row_for(j, BASE) for j in range(i, min(target, i + 20_000))]
            bodies = [orjson.loads(r["body"]) for r in rows]
            with engine.begin() as conn:
                conn.execute(insert(FHIR_RESOURCE), rows)
                for table, rows_of in (
                    (FHIR_TOKEN, token_rows),
                    (FHIR_DATE, date_rows),
                    (FHIR_STRING, string_rows),
                ):
                    made = [x for b in bodies for x in rows_of(b)]
                    if made:
                        conn.execute(insert(table), made)
    finally:
        engine.dispose()
    return time.perf_counter() - t0


def rate(
    conn: http.client.HTTPConnection, token: str, make_path: Any, seconds: float = SECONDS_PER_QUERY
) -> dict[str, float]:
    lat: list[float] = []
    end = time.perf_counter() + seconds
    t0 = time.perf_counter()
    while not lat or time.perf_counter() < end:  # at least one request
        path = make_path()
        t = time.perf_counter()
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
        r = conn.getresponse()
        body = r.read()
        if r.status != 200:
            raise RuntimeError(f"GET {path}: HTTP {r.status} {body[:200]!r}")
        lat.append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    return {
        "per_s": len(lat) / wall,
        "p50_ms": ex.pct(lat, 0.5) * 1e3,
        "p99_ms": ex.pct(lat, 0.99) * 1e3,
        "n": len(lat),
    }


def queries_for(rnd: random.Random, patients: int) -> dict[str, Any]:
    def p() -> int:
        return rnd.randrange(patients)

    def born(n: int) -> str:
        return (BIRTH0 + timedelta(days=n % 25000)).strftime("%Y-%m-%d")

    return {
        "Observation?patient": lambda: "/fhir/Observation?patient=Patient/" + pid_of(p()),
        "Patient?identifier": lambda: f"/fhir/Patient?identifier={ID_SYSTEM}|1101021950{p():08d}",
        "Observation?_count=20": lambda: "/fhir/Observation?_count=20",
        **NEW_QUERIES(p, born),
    }


def NEW_QUERIES(p: Any, born: Any) -> dict[str, Any]:
    """The parameters of issue #19, each with a value some resources have."""

    def given() -> str:
        return f"/fhir/Patient?given={p():06d}"

    def birth() -> str:
        n = p()
        return f"/fhir/Patient?birthdate={born(n)}&gender={'female' if n % 2 == 0 else 'male'}"

    return {
        "Patient?given": given,
        "Patient?birthdate&gender": birth,
        "Observation?patient&code&_sort=-date": lambda: (
            "/fhir/Observation?patient=" + pid_of(p()) + "&code=http://loinc.org|718-7&_sort=-date"
        ),
        "Observation?code&date=ge": lambda: (
            "/fhir/Observation?code=718-7&date=ge2025-01-01&_count=20"
        ),
        "Observation?patient.identifier": lambda: (
            f"/fhir/Observation?patient.identifier={ID_SYSTEM}|1101021950{p():08d}"
        ),
        "Patient?_id&_revinclude": lambda: (
            f"/fhir/Patient?_id={pid_of(p())}&_revinclude=Observation:patient"
        ),
        "Observation?_sort=_lastUpdated": lambda: "/fhir/Observation?_sort=_lastUpdated&_count=20",
        "Observation?patient&_summary=count": lambda: (
            "/fhir/Observation?patient=" + pid_of(p()) + "&_summary=count"
        ),
        "Observation?patient&_elements": lambda: (
            "/fhir/Observation?patient="
            + pid_of(p())
            + "&_elements=code,effectiveDateTime,valueQuantity"
        ),
    }


def search(root: Path, levels: tuple[int, ...]) -> list[dict[str, Any]]:
    folder = root / "alliance-search"
    a = Alliance(folder, ex.MEMBERS, ex.RULES)
    node = a.node(ex.B)
    out = []
    try:
        a.start(ex.B)  # creates the schema
        for level in levels:
            node.stop()
            load_s = fill(node.plan.storage_dsn, level)
            node.start()
            node.wait_ready(60)
            patients = level // 10
            rnd = random.Random(level)
            conn = http.client.HTTPConnection(
                node.plan.local_host, node.plan.local_port, timeout=60
            )
            token = node.token("clinician")
            try:
                queries = queries_for(rnd, patients)
                rate(conn, token, queries["Observation?patient"], 0.5)  # warm-up
                row: dict[str, Any] = {"resources": level, "load_s": load_s}
                for name, make in queries.items():
                    # the first request of a query may count every match for its total (an
                    # estimate is then reused for 60 s): reported apart from the steady rate
                    first = rate(conn, token, make, 0.0)
                    row[name] = {**rate(conn, token, make), "first_ms": first["p50_ms"]}
            finally:
                conn.close()
            db = Path(node.plan.data_dir)
            row["db_mb"] = sum(p.stat().st_size for p in db.glob("*.db*")) / 1e6
            out.append(row)
            ex.console.print(
                f"  {level:>9,} resources (loaded in {load_s:.1f} s, "
                f"{row['db_mb']:.0f} MB): "
                + ", ".join(
                    f"{k} {row[k]['per_s']:.0f}/s (p50 {row[k]['p50_ms']:.1f} ms,"
                    f" first {row[k]['first_ms']:.0f} ms)"
                    for k in queries
                )
            )
    finally:
        a.stop_all()
        shutil.rmtree(folder, ignore_errors=True)
    return out
