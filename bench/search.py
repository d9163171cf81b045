"""Local FHIR API searches/s on a store of N resources (10 k, 100 k, 300 k by default).

One node (``hutong run``, SQLite) is stopped, its ``fhir_resource`` table is topped up to N
rows by ``executemany`` (chunks of 20 k per transaction, straight into the table, with the
search columns ``bridge.fhirstore.store.search_columns`` computes; no ``fhir_history`` rows,
which search does not read): one Patient per ten resources, nine Observations per Patient.
Loading through the API would take hours at 1 M. Then the node is started and one keep-alive
client (clinician token) asks each query for a fixed time:

* ``Observation?patient=Patient/<id>``: a patient's results (index ``rtype, patient``);
* ``Patient?identifier=<system>|<value>``: a patient by ID number (token on one column);
* ``Observation?_count=20``: the newest page, with the total count.

Every search is audited (one durable commit per request), as in production.
"""

from __future__ import annotations

import http.client
import random
import shutil
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import exchange as ex
import orjson
from sqlalchemy import create_engine, func, insert, select

from bridge.fhirstore.store import search_columns
from bridge.fhirstore.tables import FHIR_RESOURCE
from tests.harness import Alliance

CHUNK = 20_000
ID_SYSTEM = "urn:oid:2.16.156.10011.1.3"
SECONDS_PER_QUERY = 2.5


def pid_of(i: int) -> str:
    return str(uuid.UUID(int=i + 1))


def row_for(j: int, base: datetime) -> dict[str, Any]:
    """Resource j: a Patient every 10th, else an Observation of the last Patient."""
    p = j // 10
    at = base + timedelta(seconds=j)
    lu = at.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    if j % 10 == 0:
        res: dict[str, Any] = {
            "resourceType": "Patient", "id": pid_of(p), "meta": {"versionId": "1", "lastUpdated": lu},
            "identifier": [{"system": ID_SYSTEM, "value": f"1101021950{p:08d}"}],
            "name": [{"text": "测试"}], "gender": "female"}
    else:
        res = {"resourceType": "Observation", "id": str(uuid.UUID(int=(1 << 64) + j)),
               "meta": {"versionId": "1", "lastUpdated": lu}, "status": "final",
               "code": {"coding": [{"system": "http://loinc.org", "code": "718-7"}]},
               "subject": {"reference": f"Patient/{pid_of(p)}"},
               "valueQuantity": {"value": 120 + j % 40, "unit": "g/L"}}
    return {"rtype": res["resourceType"], "id": res["id"], "version": 1, "last_updated": at,
            "body": orjson.dumps(res), "thread": None, "patient_hash": None, "origin": "bench",
            **search_columns(res)}


def fill(dsn: str, target: int) -> float:
    engine = create_engine(dsn)
    base = datetime.now(UTC) - timedelta(days=400)
    t0 = time.perf_counter()
    try:
        with engine.connect() as conn:
            have = conn.execute(select(func.count()).select_from(FHIR_RESOURCE)).scalar_one()
        i = have
        while i < target:
            rows = [row_for(j, base) for j in range(i, min(target, i + CHUNK))]
            with engine.begin() as conn:
                conn.execute(insert(FHIR_RESOURCE), rows)
            i += len(rows)
    finally:
        engine.dispose()
    return time.perf_counter() - t0


def rate(conn: http.client.HTTPConnection, token: str, make_path: Any) -> dict[str, float]:
    lat: list[float] = []
    end = time.perf_counter() + SECONDS_PER_QUERY
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
                rate(conn, token, queries["Observation?patient"])  # warm-up
                row: dict[str, Any] = {"resources": level, "load_s": load_s}
                for name, make in queries.items():
                    row[name] = rate(conn, token, make)
            finally:
                conn.close()
            db = Path(node.plan.data_dir)
            row["db_mb"] = sum(p.stat().st_size for p in db.glob("*.db*")) / 1e6
            out.append(row)
            ex.console.print(f"  {level:>9,} resources (loaded in {load_s:.0f} s, "
                             f"{row['db_mb']:.0f} MB): " + ", ".join(
                                 f"{k} {row[k]['per_s']:.0f}/s" for k in queries))
    finally:
        a.stop_all()
        shutil.rmtree(folder, ignore_errors=True)
    return out
