"""Routing of lab results: a patient under referral gets the results on the referral's other side
(local FHIR store linked to the referral, the local drop folder, the recognition view); a
correction updates there in place; a patient without an open referral's results stay home."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from fhir.resources.R4B import get_fhir_model_class
from sqlalchemy import select

from bridge.fhir.validate import validate_bundle
from bridge.fhirstore.tables import FHIR_RESOURCE
from bridge.privacy import patient_hash
from bridge.store.db import Store
from bridge.store.tables import OUTBOX
from tests.harness import (
    Alliance,
    NodeProcess,
    free_port_block,
    lis_send,
    results_stored,
    spooled,
    wait_for,
)
from tests.lis_site import write_site
from tests.referrals import referral

pytestmark = pytest.mark.slow

FIX = Path(__file__).parent / "fixtures" / "hl7" / "lis"
UTF8 = (FIX / "oru_r01_v251_utf8.hl7").read_bytes()
CORRECTED = (FIX / "oru_r01_v251_corrected.hl7").read_bytes()
NATIONAL_ID = "110102195003151234"  # the fixtures' patient (PID-3, type NI)
KINDS = ["referral.request", "referral.status", "referral.cancel", "referral.return", "result.lab"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("routing")
    site = write_site(root / "mappings" / "fxlab")
    port = free_port_block(1)
    members = [
        {
            "id": "core",
            "zh": "复兴医院",
            "en": "Fuxing Hospital",
            "role": "core",
            "adapters": [
                {"name": "lis", "type": "lis-hl7", "mappings": str(site), "options": {"port": port}}
            ],
        },
        {"id": "chc", "zh": "月坛社区卫生服务中心", "en": "Yuetan CHC", "role": "community"},
    ]
    rules = [
        {"from": "chc", "to": "core", "kinds": KINDS},
        {"from": "core", "to": "chc", "kinds": KINDS},
    ]
    a = Alliance(root / "alliance", members, rules)
    a.start("core", "chc")
    stores = {n: Store(a.node(n).plan.storage_dsn) for n in ("core", "chc")}
    yield {"a": a, "port": port, "stores": stores}
    for s in stores.values():
        s.dispose()
    a.stop_all()


def rows(store: Store, rtype: str, **where: Any) -> list[Any]:
    stmt = select(FHIR_RESOURCE).where(FHIR_RESOURCE.c.rtype == rtype)
    for k, v in where.items():
        stmt = stmt.where(getattr(FHIR_RESOURCE.c, k) == v)
    with store.read() as conn:
        return list(conn.execute(stmt))


def test_results_follow_the_referral(pair: dict[str, Any]) -> None:
    a: Alliance = pair["a"]
    chc: NodeProcess = a.node("chc")
    core: NodeProcess = a.node("core")
    stores = pair["stores"]
    # the community centre refers the patient up to the core hospital
    chc.api(
        "POST",
        "/local/v1/referrals",
        referral("up-inpatient", "core", national_id=NATIONAL_ID),
        role="clinician",
    )
    thread = wait_for(
        lambda: next(
            (
                r["thread"]
                for r in core.api("GET", "/local/v1/referrals")
                if r["status"] == "received"
            ),
            None,
        ),
        what="referral received at core",
    )
    # the core hospital's LIS reports; the results go to chc on the referral's thread
    assert lis_send(pair["port"], UTF8) == "AA"
    reports = wait_for(
        lambda: (
            rows(stores["chc"], "DiagnosticReport", thread=thread)
            if len(rows(stores["chc"], "DiagnosticReport", thread=thread)) == 2
            else None
        ),
        what="reports at chc",
    )
    assert {r.origin for r in reports} == {"core"}
    at_core = {r.id: orjson.loads(r.body) for r in rows(stores["core"], "Observation")}
    at_chc = {r.id: orjson.loads(r.body) for r in rows(stores["chc"], "Observation", thread=thread)}
    assert sorted(at_chc) == sorted(at_core)
    chc_patient = orjson.loads(rows(stores["chc"], "Task", id=thread)[0].body)["for"]
    for rid, o in at_chc.items():
        mine = at_core[rid]
        for field in (
            "status",
            "code",
            "interpretation",
            "referenceRange",
            "effectiveDateTime",
            "issued",
            "performer",
            "note",
            "valueQuantity",
            "valueString",
            "valueCodeableConcept",
            "valueRatio",
        ):
            assert o.get(field) == mine.get(field), (rid, field)
        assert o["subject"] == chc_patient  # chc's own record of the patient
        get_fhir_model_class("Observation").model_validate(o)
    # the drop folder (what chc's HIS reads) got the packet, a valid R4 Bundle without the
    # national ID number
    files = wait_for(
        lambda: [
            f
            for f in spooled(chc)
            if f.parent.name == thread and b"DiagnosticReport" in f.read_bytes()
        ],
        what="spool file",
    )
    body = orjson.loads(files[0].read_bytes())
    validate_bundle(body)
    get_fhir_model_class("Bundle").model_validate(body)
    assert NATIONAL_ID.encode() not in files[0].read_bytes()
    # recognition view on chc: where and when each result was produced
    phash = patient_hash(chc.plan.patient_hash_key, NATIONAL_ID)
    view = chc.api("GET", f"/local/v1/patients/{phash}/results", role="clinician")
    got = {v["name"]: v for v in view["results"]}
    assert set(got) == {"血常规", "生化全套"}
    cbc = got["血常规"]
    assert (cbc["produced_by"], cbc["produced_by_zh"], cbc["here"]) == ("core", "复兴医院", False)
    assert cbc["effective"] == "2026-11-20T08:15:00+08:00" and cbc["status"] == "final"
    assert cbc["recognisable"] is True and got["生化全套"]["recognisable"] is False
    assert cbc["loinc"] == "58410-2" and cbc["thread"] == thread
    assert {o["local_code"]: (o["value"], o["unit"], o["flags"]) for o in cbc["observations"]} == {
        "WBC": (11.2, "10^9/L", ["H"]),
        "HGB": (128, "g/L", ["N"]),
        "PLT": (86, "10^9/L", ["L"]),
        "NEUT%": (78.5, "%", ["H"]),
    }
    # the read is audited with the patient hash
    audit = chc.api("GET", f"/fhir/AuditEvent?patient-hash={phash}&_count=200", role="auditor")
    assert any("/results" in orjson.dumps(e).decode() for e in audit.get("entry", []))
    # a correction at the lab updates the same resources on the other side
    assert lis_send(pair["port"], CORRECTED) == "AA"

    def corrected() -> dict[str, Any] | None:
        glu = [
            orjson.loads(r.body)
            for r in rows(stores["chc"], "Observation", thread=thread)
            if orjson.loads(r.body).get("status") == "corrected"
        ]
        return glu[0] if glu else None

    glu = wait_for(corrected, what="corrected result at chc")
    assert glu["valueQuantity"]["value"] == 7.25 and glu["meta"]["versionId"] == "2"
    assert len(rows(stores["chc"], "Observation", thread=thread)) == len(at_chc)


def test_no_open_referral_no_routing(pair: dict[str, Any]) -> None:
    stores = pair["stores"]
    other = (
        UTF8.replace(b"110102195003151234", b"11010219600101002X")
        .replace(b"-0001|P|", b"-0901|P|")
        .replace(b"LAB-2026-000", b"LAB-2026-090")
    )
    assert lis_send(pair["port"], other) == "AA"
    results_stored(stores["core"])
    phash = patient_hash(pair["a"].node("core").plan.patient_hash_key, "11010219600101002X")
    assert len(rows(stores["core"], "DiagnosticReport", patient_hash=phash)) == 2
    with stores["core"].read() as conn:
        sent = (
            conn.execute(select(OUTBOX.c.patient_hash).where(OUTBOX.c.kind == "result.lab"))
            .scalars()
            .all()
        )
    referred = patient_hash(pair["a"].node("core").plan.patient_hash_key, NATIONAL_ID)
    assert sent == [referred, referred]  # the first test's two messages, nothing for this one
    assert rows(stores["chc"], "DiagnosticReport", patient_hash=phash) == []
