"""A lab message's write into the FHIR store when its Patient and Organization are the ones
already stored (``store.put_many`` keeps them as they are) against the cost of a new version
of each per message (what every message paid before): two SQLite stores in one process,
chunks of 50 messages alternating, so the ratio is one run's.

    .venv/bin/python bench/lis_versions.py --rounds 8

Each message: a Patient, an Organization, a DiagnosticReport and 20 Observations (the 20-OBX
message's shape), one transaction. ``bumped``: the Patient's and Organization's narrative
changes each message, so each is written as a new version (history row, search rows);
``same``: they are sent unchanged.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import func, select

from bridge.fhirstore import store
from bridge.fhirstore.tables import FHIR_HISTORY
from bridge.store.db import Store

T0 = datetime(2026, 12, 7, tzinfo=UTC)
H = "h" * 64


def message(k: int, bump: bool) -> list[tuple[dict[str, Any], str | None, str | None]]:
    text = {"text": {"status": "generated", "div": f"<div>{k if bump else 0}</div>"}}
    patient = {
        "resourceType": "Patient",
        "id": "p-1",
        "identifier": [{"system": "urn:mrn", "value": "FX1"}],
        "name": [{"family": "王", "given": ["秀英"]}],
        "gender": "female",
        "birthDate": "1950-03-15",
        **text,
    }
    org = {"resourceType": "Organization", "id": "org-1", "name": "检验科", **text}
    obs = [
        {
            "resourceType": "Observation",
            "id": str(uuid.uuid4()),
            "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": f"{700 + i}-1"}]},
            "subject": {"reference": "Patient/p-1"},
            "effectiveDateTime": "2026-12-07T08:00:00Z",
            "valueQuantity": {"value": i, "unit": "g/L"},
        }
        for i in range(20)
    ]
    report = {
        "resourceType": "DiagnosticReport",
        "id": str(uuid.uuid4()),
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "58410-2"}]},
        "subject": {"reference": "Patient/p-1"},
        "effectiveDateTime": "2026-12-07T08:00:00Z",
        "result": [{"reference": f"Observation/{o['id']}"} for o in obs],
    }
    return [(patient, None, H), (org, None, None), (report, None, H)] + [(o, None, H) for o in obs]


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8, help="chunks of 50 messages per store")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="lis-versions-") as tmp:
        stores = {n: Store(f"sqlite:///{tmp}/{n}.db") for n in ("bumped", "same")}
        for s in stores.values():
            s.create_all()
        spent = dict.fromkeys(stores, 0.0)
        for r in range(args.rounds):
            for name, s in stores.items():
                t0 = time.perf_counter()
                for j in range(50):
                    k = r * 50 + j
                    with s.write() as conn:
                        store.put_many(
                            conn, message(k, name == "bumped"), at=T0 + timedelta(seconds=k),
                            origin="lis",
                        )  # fmt: skip
                spent[name] += time.perf_counter() - t0
        n = args.rounds * 50
        for name, s in stores.items():
            with s.read() as conn:
                rows = conn.execute(select(func.count()).select_from(FHIR_HISTORY)).scalar()
            s.dispose()
            size = Path(f"{tmp}/{name}.db").stat().st_size // 4096
            print(f"{name:>6}: {spent[name] / n * 1000:6.2f} ms a message, {rows:,} history rows, "
                  f"{size:,} pages")  # fmt: skip


if __name__ == "__main__":
    main()
