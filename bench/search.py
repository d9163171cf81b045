"""Local FHIR API searches/s on a store of N resources (10 k, 100 k, 1 M by default).

One node (``hutong run``, SQLite) is stopped, its ``fhir_resource`` table is topped up to N
rows (one Patient per ten resources, nine Observations per Patient) together with the
``fhir_token`` rows of the Patients' identifiers, exactly as ``bridge.fhirstore.store.put``
would write them (search columns from ``search_columns``, tokens from ``token_rows``; no
``fhir_history`` rows, which search does not read). The loader writes finished rows with
``executemany`` on the raw sqlite3 connection, 250 k rows per transaction, with
``synchronous=OFF`` and a large page cache for the load only (the node reopens the file with
its own settings). Loading through the API would take hours at 1 M. Then the node is started
and one keep-alive client (clinician token) asks each query for ``SECONDS_PER_QUERY``:

* ``Observation?patient=Patient/<id>``: a patient's results (index ``rtype, patient,
  last_updated DESC, id``: already in page order);
* ``Patient?identifier=<system>|<value>``: a patient by ID number (``fhir_token`` index);
* ``Observation?_count=20``: the newest page, with the total count (counted on
  ``ix_fhir_type_newest``, no bodies read).

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

from bridge.fhirstore.store import search_columns, token_rows
from bridge.fhirstore.tables import FHIR_RESOURCE, FHIR_TOKEN
from tests.harness import Alliance

CHUNK = 250_000
ID_SYSTEM = "urn:oid:2.16.156.10011.1.3"
SECONDS_PER_QUERY = 1.5
#: fhir_resource columns in the order the loader writes them
COLUMNS = ("rtype", "id", "version", "last_updated", "patient", "patient_hash", "status",
           "requester", "performer", "owner", "focus", "identifiers", "thread", "origin", "body")
TOKEN_COLUMNS = ("rtype", "id", "param", "system", "value")


def pid_of(i: int) -> str:
    return str(uuid.UUID(int=i + 1))


def resource_for(j: int, base: datetime) -> tuple[dict[str, Any], datetime]:
    """Resource j: a Patient every 10th, else an Observation of the last Patient."""
    p = j // 10
    at = base + timedelta(seconds=j)
    lu = at.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    if j % 10 == 0:
        res: dict[str, Any] = {
            "resourceType": "Patient", "id": pid_of(p),
            "meta": {"versionId": "1", "lastUpdated": lu},
            "identifier": [{"system": ID_SYSTEM, "value": f"1101021950{p:08d}"}],
            "name": [{"text": "测试"}], "gender": "female"}
    else:
        res = {"resourceType": "Observation", "id": str(uuid.UUID(int=(1 << 64) + j)),
               "meta": {"versionId": "1", "lastUpdated": lu}, "status": "final",
               "code": {"coding": [{"system": "http://loinc.org", "code": "718-7"}]},
               "subject": {"reference": f"Patient/{pid_of(p)}"},
               "valueQuantity": {"value": 120 + j % 40, "unit": "g/L"}}
    return res, at


def row_for(j: int, base: datetime) -> dict[str, Any]:
    """The fhir_resource row of resource j (as ``store.put`` writes it)."""
    res, at = resource_for(j, base)
    return {"rtype": res["resourceType"], "id": res["id"], "version": 1, "last_updated": at,
            "body": orjson.dumps(res), "thread": None, "patient_hash": None, "origin": "bench",
            **search_columns(res)}


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
         || '"name":[{{"text":"测试"}}],"gender":"female"}}',
         p + 1, strftime('%Y-%m-%dT%H:%M:%S', t, 'unixepoch'), p)
       ELSE printf(
         '{{"resourceType":"Observation","id":"00000000-0000-0001-0000-%012x",'
         || '"meta":{{"versionId":"1","lastUpdated":"%s.000Z"}},"status":"final",'
         || '"code":{{"coding":[{{"system":"http://loinc.org","code":"718-7"}}]}},'
         || '"subject":{{"reference":"Patient/00000000-0000-0000-0000-%012x"}},'
         || '"valueQuantity":{{"value":%d,"unit":"g/L"}}}}',
         j, strftime('%Y-%m-%dT%H:%M:%S', t, 'unixepoch'), p + 1, 120 + j % 40)
       END AS BLOB)
FROM r"""
_SQL_TOKENS = f"""
WITH RECURSIVE n(p) AS (SELECT :first UNION ALL SELECT p + 1 FROM n WHERE p + 1 < :end)
INSERT INTO fhir_token ({", ".join(TOKEN_COLUMNS)})
SELECT 'Patient', printf('00000000-0000-0000-0000-%012x', p + 1), 'identifier', '{ID_SYSTEM}',
       printf('1101021950%08d', p)
FROM n"""


def _check(db: sqlite3.Connection, js: list[int]) -> None:
    """Loaded rows are what ``store.put`` writes: every column, and the token rows."""
    for j in js:
        want = row_for(j, BASE)
        got = db.execute(f"SELECT {', '.join(COLUMNS)} FROM fhir_resource WHERE rtype = ? AND "
                         "id = ?", (want["rtype"], want["id"])).fetchone()
        want["last_updated"] = want["last_updated"].replace(tzinfo=None).strftime(
            "%Y-%m-%d %H:%M:%S.%f")
        if got != tuple(want[c] for c in COLUMNS):
            raise RuntimeError(f"bench loader: resource {j} differs from store.put's row: "
                               f"{got!r} != {want!r}")
        toks = db.execute(f"SELECT {', '.join(TOKEN_COLUMNS)} FROM fhir_token WHERE rtype = ? "
                          "AND id = ?", (want["rtype"], want["id"])).fetchall()
        want_toks = [tuple(t[c] for c in TOKEN_COLUMNS)
                     for t in token_rows(orjson.loads(want["body"]))]
        if toks != want_toks:
            raise RuntimeError(f"bench loader: tokens of resource {j}: {toks} != {want_toks}")


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
            db.execute(_SQL_TOKENS, {"first": (i + 9) // 10, "end": (stop + 9) // 10})
            db.execute("COMMIT")
            i = stop
        first_patient = have + (-have % 10)
        _check(db, sorted(j for j in {have, (have + target) // 2, target - 1, first_patient}
                          if have <= j < target))
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
            tokens = [t for r in rows for t in token_rows(orjson.loads(r["body"]))]
            with engine.begin() as conn:
                conn.execute(insert(FHIR_RESOURCE), rows)
                if tokens:
                    conn.execute(insert(FHIR_TOKEN), tokens)
    finally:
        engine.dispose()
    return time.perf_counter() - t0


def rate(conn: http.client.HTTPConnection, token: str, make_path: Any,
         seconds: float = SECONDS_PER_QUERY) -> dict[str, float]:
    lat: list[float] = []
    end = time.perf_counter() + seconds
    t0 = time.perf_counter()
    while time.perf_counter() < end:
        path = make_path()
        t = time.perf_counter()
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
        r = conn.getresponse()
        body = r.read()
        if r.status != 200:
            raise RuntimeError(f"GET {path}: HTTP {r.status} {body[:200]!r}")
        lat.append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    return {"per_s": len(lat) / wall, "p50_ms": ex.pct(lat, 0.5) * 1e3,
            "p99_ms": ex.pct(lat, 0.99) * 1e3, "n": len(lat)}


def queries_for(rnd: random.Random, patients: int) -> dict[str, Any]:
    return {
        "Observation?patient": lambda: "/fhir/Observation?patient=Patient/"
        + pid_of(rnd.randrange(patients)),
        "Patient?identifier": lambda: f"/fhir/Patient?identifier={ID_SYSTEM}|"
        f"1101021950{rnd.randrange(patients):08d}",
        "Observation?_count=20": lambda: "/fhir/Observation?_count=20",
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
            conn = http.client.HTTPConnection(node.plan.local_host, node.plan.local_port,
                                              timeout=60)
            token = node.token("clinician")
            try:
                queries = queries_for(rnd, patients)
                rate(conn, token, queries["Observation?patient"], 0.5)  # warm-up
                row: dict[str, Any] = {"resources": level, "load_s": load_s}
                for name, make in queries.items():
                    row[name] = rate(conn, token, make)
            finally:
                conn.close()
            db = Path(node.plan.data_dir)
            row["db_mb"] = sum(p.stat().st_size for p in db.glob("*.db*")) / 1e6
            out.append(row)
            ex.console.print(f"  {level:>9,} resources (loaded in {load_s:.1f} s, "
                             f"{row['db_mb']:.0f} MB): " + ", ".join(
                                 f"{k} {row[k]['per_s']:.0f}/s (p50 {row[k]['p50_ms']:.1f} ms)"
                                 for k in queries))
    finally:
        a.stop_all()
        shutil.rmtree(folder, ignore_errors=True)
    return out
