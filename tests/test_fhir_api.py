"""The hospital-facing FHIR R4 API (/fhir on the local port) against real node processes.

The core node's store is seeded before it starts (patients, 30+ referrals, tasks, results), so
every answer can be compared with exact ids and values. Write tests (POST /fhir, PUT Task) go
last: they add a referral that flows chc -> core.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.capabilitystatement import CapabilityStatement

from bridge.audit.events import ACTOR_SYSTEM, EXTRA_EXTENSION, PATIENT_HASH_SYSTEM
from bridge.config.loader import load_node
from bridge.context import NodeContext
from bridge.fhir.validate import validate_resource
from bridge.fhirstore import store
from bridge.privacy import patient_hash
from tests.harness import Alliance, NodeProcess, wait_for
from tests.referrals import referral

pytestmark = pytest.mark.slow

MEMBERS = [
    {"id": "core", "zh": "复兴医院", "en": "Fuxing Hospital", "role": "core"},
    {"id": "chc", "zh": "月坛社区卫生服务中心", "en": "Yuetan CHC", "role": "community"},
]
KINDS = ["referral.request", "referral.status", "referral.cancel", "referral.return"]
RULES = [
    {"from": "chc", "to": "core", "kinds": KINDS},
    {"from": "core", "to": "chc", "kinds": KINDS},
]
NATIONAL_ID = "urn:oid:2.16.156.10011.1.3"
MRN = "urn:hutong:mrn:fuxing"
PLACER = "urn:hutong:placer:yuetan-chc"
T0 = datetime(2026, 11, 1, 0, 0, tzinfo=UTC)
N_SR = 30
STATUSES = ("active", "completed", "revoked")
CLINICAL = (
    "ServiceRequest",
    "Task",
    "Encounter",
    "DiagnosticReport",
    "Observation",
    "ImagingStudy",
    "Patient",
    "Consent",
    "Composition",
    "DocumentReference",
    "MedicationRequest",
    "Coverage",
    "Organization",
    "Practitioner",
    "Appointment",
    "CarePlan",
    "Condition",
    "PractitionerRole",
)


_http: httpx.Client | None = None


def http() -> httpx.Client:
    """One client while a module runs (a new httpx client per call costs ~0.1 s); the module's
    fixture closes it with ``close_http``."""
    global _http
    if _http is None or _http.is_closed:
        _http = httpx.Client(timeout=30)
    return _http


def close_http() -> None:
    if _http is not None:
        _http.close()


@dataclass
class Seed:
    """What was put in core's store, to compare answers with."""

    patients: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> Patient
    hashes: dict[str, str] = field(default_factory=dict)  # patient id -> patient hash
    srs: list[dict[str, Any]] = field(default_factory=list)  # index i = lastUpdated T0 + i min
    tasks: list[dict[str, Any]] = field(default_factory=list)
    observations: list[dict[str, Any]] = field(default_factory=list)


def sr_patient(i: int) -> str:
    return "pat-wang" if i % 2 == 0 else "pat-zhang"


def seed_store(config: Path) -> Seed:
    """Realistic resources in the node's store, written before the node process starts."""
    ctx = NodeContext.open(load_node(config))
    key = ctx.plan.patient_hash_key
    out = Seed()
    people = [
        ("pat-wang", "王秀英", "110102195003151234", "FX0001", "female", "1950-03-15"),
        ("pat-zhang", "张伟", "11010119650505231X", "FX0002", "male", "1965-05-05"),
    ]
    try:
        with ctx.store.write() as conn:

            def put(resource: dict[str, Any], at: datetime, pid: str | None = None) -> None:
                validate_resource(resource)
                store.put(conn, resource, at=at, patient_hash=out.hashes.get(pid or ""))

            for org, name in (
                ("core", "首都医科大学附属复兴医院"),
                ("chc", "西城区月坛社区卫生服务中心"),
            ):
                put(
                    {
                        "resourceType": "Organization",
                        "id": org,
                        "name": name,
                        "identifier": [{"system": "urn:hutong:node", "value": org}],
                    },
                    T0,
                )
            put(
                {
                    "resourceType": "Practitioner",
                    "id": "dr-li",
                    "name": [{"text": "李医生"}],
                    "identifier": [{"system": "urn:hutong:staff:chc", "value": "D-017"}],
                },
                T0,
            )
            for pid, name, nid, mrn, gender, born in people:
                out.hashes[pid] = patient_hash(key, nid)
                p = {
                    "resourceType": "Patient",
                    "id": pid,
                    "identifier": [
                        {"system": NATIONAL_ID, "value": nid},
                        {"system": MRN, "value": mrn},
                    ],
                    "name": [{"text": name, "family": name[0], "given": [name[1:]]}],
                    "gender": gender,
                    "birthDate": born,
                }
                put(p, T0, pid)
                out.patients[pid] = p
            for i in range(N_SR):
                pid = sr_patient(i)
                sr = {
                    "resourceType": "ServiceRequest",
                    "id": f"sr-{i:02d}",
                    "identifier": [{"system": PLACER, "value": f"ZZ-2026-{i:04d}"}],
                    "status": STATUSES[i % 3],
                    "intent": "order",
                    "code": {
                        "coding": [
                            {
                                "system": "http://snomed.info/sct",
                                "code": "3457005",
                                "display": "Patient referral",
                            }
                        ]
                    },
                    "subject": {"reference": f"Patient/{pid}"},
                    "requester": {
                        "reference": "Practitioner/dr-li" if i < 20 else "Organization/chc"
                    },
                    "performer": [{"reference": "Organization/core"}],
                    "reasonCode": [
                        {
                            "coding": [{"system": "http://hl7.org/fhir/sid/icd-10", "code": "I10"}],
                            "text": "原发性高血压",
                        }
                    ],
                }
                put(sr, T0 + timedelta(minutes=i + 1), pid)
                out.srs.append(sr)
            for j, (sr_i, status) in enumerate(
                ((3, "requested"), (4, "accepted"), (5, "in-progress"))
            ):
                pid = sr_patient(sr_i)
                task = {
                    "resourceType": "Task",
                    "id": f"task-{j}",
                    "status": status,
                    "intent": "order",
                    "code": {
                        "coding": [
                            {
                                "system": "http://hl7.org/fhir/CodeSystem/task-code",
                                "code": "fulfill",
                            }
                        ]
                    },
                    "focus": {"reference": f"ServiceRequest/sr-{sr_i:02d}"},
                    "for": {"reference": f"Patient/{pid}"},
                    "requester": {"reference": "Organization/chc"},
                    "owner": {"reference": "Organization/core"},
                    "authoredOn": "2026-11-01T08:00:00+08:00",
                }
                put(task, T0 + timedelta(hours=2, minutes=j), pid)
                out.tasks.append(task)
            for k, value in enumerate((7.8, 5.6)):
                obs = {
                    "resourceType": "Observation",
                    "id": f"obs-{k}",
                    "status": "final",
                    "code": {
                        "coding": [{"system": "http://loinc.org", "code": "2345-7"}],
                        "text": "血糖",
                    },
                    "subject": {"reference": "Patient/pat-wang"},
                    "performer": [{"reference": "Organization/core"}],
                    "valueQuantity": {
                        "value": value,
                        "unit": "mmol/L",
                        "system": "http://unitsofmeasure.org",
                        "code": "mmol/L",
                    },
                }
                put(obs, T0 + timedelta(hours=3, minutes=k), "pat-wang")
                out.observations.append(obs)
            put(
                {
                    "resourceType": "Encounter",
                    "id": "enc-1",
                    "status": "finished",
                    "class": {
                        "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                        "code": "AMB",
                    },
                    "subject": {"reference": "Patient/pat-wang"},
                    "serviceProvider": {"reference": "Organization/core"},
                },
                T0 + timedelta(hours=4),
                "pat-wang",
            )
            put(
                {
                    "resourceType": "Consent",
                    "id": "consent-1",
                    "status": "active",
                    "scope": {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/consentscope",
                                "code": "treatment",
                            }
                        ]
                    },
                    "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
                    "patient": {"reference": "Patient/pat-zhang"},
                    "policyRule": {"text": "患者本人同意转诊"},
                },
                T0 + timedelta(hours=4),
                "pat-zhang",
            )
    finally:
        ctx.store.dispose()
    return out


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory):
    a = Alliance(tmp_path_factory.mktemp("fhirapi") / "alliance", MEMBERS, RULES)
    seed = seed_store(a.files["core"])
    a.start("core", "chc")
    yield a, seed
    close_http()
    a.stop_all()


@pytest.fixture(scope="module")
def core(env) -> NodeProcess:
    return env[0].node("core")


@pytest.fixture(scope="module")
def seed(env) -> Seed:
    return env[1]


def call(
    node: NodeProcess,
    method: str,
    path: str,
    role: str | None = "clinician",
    params: Any = None,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    h = {"Accept": "application/fhir+json", **(headers or {})}
    if role:
        h["Authorization"] = f"Bearer {node.token(role)}"
    url = path if path.startswith("http") else node.local_url + path
    return http().request(
        method,
        url,
        params=params,
        headers=h,
        content=json.dumps(body).encode() if body is not None else None,
    )


def ok(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/fhir+json")
    return r.json()


def search(node: NodeProcess, rtype: str, params: Any, role: str = "clinician") -> dict[str, Any]:
    return ok(call(node, "GET", f"/fhir/{rtype}", role, params))


def ids(bundle: dict[str, Any], mode: str = "match") -> list[str]:
    return [e["resource"]["id"] for e in bundle.get("entry", []) if e["search"]["mode"] == mode]


def link(bundle: dict[str, Any], rel: str) -> str | None:
    return next((x["url"] for x in bundle["link"] if x["relation"] == rel), None)


def outcome(r: httpx.Response, status: int, issue: str, code: str) -> str:
    """Assert an OperationOutcome answer; returns its diagnostics."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/fhir+json")
    body = r.json()
    assert body["resourceType"] == "OperationOutcome"
    validate_resource(body)
    (iss,) = body["issue"]
    assert iss["severity"] == "error" and iss["code"] == issue
    assert iss["details"]["coding"] == [
        {"system": "http://hutong.dev/CodeSystem/error", "code": code}
    ]
    return iss["diagnostics"]


def newest_first(srs: list[dict[str, Any]]) -> list[str]:
    return [s["id"] for s in reversed(srs)]


# -------------------------------------------------------------------------------------------
# metadata, peer port


def test_metadata_is_a_valid_truthful_capability_statement(core: NodeProcess) -> None:
    cs = ok(call(core, "GET", "/fhir/metadata", role=None))
    validate_resource(cs)
    CapabilityStatement.model_validate(cs)
    assert cs["fhirVersion"] == "4.0.1" and cs["format"] == ["json"] and cs["kind"] == "instance"
    (rest,) = cs["rest"]
    by_type = {r["type"]: r for r in rest["resource"]}
    assert set(by_type) == {*CLINICAL, "AuditEvent", "ConceptMap"}
    # the site's code maps: read, search and $translate (detail: tests/test_mapping.py)
    assert [i["code"] for i in by_type["ConceptMap"]["interaction"]] == ["read", "search-type"]
    assert [o["name"] for o in by_type["ConceptMap"]["operation"]] == ["translate"]
    history = ["vread", "history-instance", "history-type"]
    assert [i["code"] for i in by_type["Task"]["interaction"]] == [
        "read",
        *history,
        "search-type",
        "update",
    ]
    assert [o["name"] for o in by_type["Task"]["operation"]] == [  # consultation steps
        "return",
        "resubmit",
        "schedule",
        "start",
        "report",
        "release",
        "cancel",
        "follow-up",
        "close",
        "referral-draft",
    ]
    assert [i["code"] for i in by_type["Patient"]["interaction"]] == [
        "read",
        *history,
        "search-type",
    ]
    assert by_type["Task"]["searchInclude"] == ["Task:focus", "Task:patient"]
    assert by_type["ServiceRequest"]["searchRevInclude"] == [
        "Task:focus",
        "DiagnosticReport:based-on",
        "Observation:based-on",
        "ImagingStudy:basedon",
    ]
    sr_params = {p["name"] for p in by_type["ServiceRequest"]["searchParam"]}
    assert sr_params == {
        "_id",
        "_lastUpdated",
        "patient",
        "subject",
        "status",
        "requester",
        "performer",
        "identifier",
        "encounter",
        "code",
        "category",
        "authored",
        "expert",
        "_count",
        "_cursor",
        "_total",
        "_totalMethod",
        "_sort",
        "_summary",
        "_elements",
        "_pretty",
        "_format",
    }
    assert {p["name"] for p in by_type["AuditEvent"]["searchParam"]} & {
        "_sort",
        "_summary",
        "_elements",
    } == set()
    # every listed parameter answers: tests/test_fhir_search_api.py walks the statement
    assert {p["name"] for p in by_type["AuditEvent"]["searchParam"]} >= {
        "date",
        "subtype",
        "action",
        "entity-identifier",
        "patient-hash",
    }
    assert [i["code"] for i in rest["interaction"]] == ["transaction", "batch"]
    assert "Bearer" in rest["security"]["description"]
    assert cs["implementation"]["url"] == core.local_url + "/fhir"


def test_peer_port_never_exposes_fhir(core: NodeProcess) -> None:
    for path in ("/fhir/metadata", "/fhir/ServiceRequest", "/fhir/Patient/pat-wang"):
        r = http().get(
            core.peer_url + path, headers={"Authorization": f"Bearer {core.token('clinician')}"}
        )
        assert r.status_code == 404, path


# -------------------------------------------------------------------------------------------
# read


def test_read_returns_the_stored_resource(core: NodeProcess, seed: Seed) -> None:
    r = call(core, "GET", "/fhir/Patient/pat-wang")
    p = ok(r)
    want = seed.patients["pat-wang"]
    assert p["identifier"] == want["identifier"] and p["name"] == want["name"]
    assert p["meta"] == {"versionId": "1", "lastUpdated": "2026-11-01T00:00:00.000Z"}
    assert r.headers["etag"] == 'W/"1"'
    assert r.headers["last-modified"] == "Sun, 01 Nov 2026 00:00:00 GMT"
    task = ok(call(core, "GET", "/fhir/Task/task-1"))
    assert task["focus"] == {"reference": "ServiceRequest/sr-04"} and task["status"] == "accepted"


def test_unknown_id_type_and_method(core: NodeProcess) -> None:
    msg = outcome(call(core, "GET", "/fhir/ServiceRequest/nope"), 404, "not-found", "HT-NOT-FOUND")
    assert "ServiceRequest/nope" in msg
    outcome(call(core, "GET", "/fhir/Specimen/x"), 404, "not-found", "HT-NOT-FOUND")
    outcome(call(core, "GET", "/fhir/Specimen"), 404, "not-found", "HT-NOT-FOUND")
    outcome(call(core, "GET", "/fhir/Task/task-0/_history/9"), 404, "not-found", "HT-NOT-FOUND")
    outcome(call(core, "DELETE", "/fhir/Task/task-0"), 405, "not-supported", "HT-FHIR-UNSUPPORTED")
    outcome(
        call(core, "POST", "/fhir/ServiceRequest", body={}),
        405,
        "not-supported",
        "HT-FHIR-UNSUPPORTED",
    )


# -------------------------------------------------------------------------------------------
# search


def test_paging_follows_next_to_the_end_without_gaps_or_duplicates(
    core: NodeProcess, seed: Seed
) -> None:
    params = {"patient": "Patient/pat-wang,Patient/pat-zhang", "_count": "7"}
    page = search(core, "ServiceRequest", params)
    validate_resource(page)
    Bundle.model_validate(page)
    assert page["type"] == "searchset" and page["total"] == N_SR
    assert link(page, "self") == (
        core.local_url + "/fhir/ServiceRequest?patient=Patient%2F"
        "pat-wang%2CPatient%2Fpat-zhang&_count=7"
    )
    got, pages = [], 0
    while True:
        pages += 1
        assert page["total"] == N_SR
        assert all(
            e["fullUrl"] == f"{core.local_url}/fhir/ServiceRequest/{e['resource']['id']}"
            for e in page["entry"]
        )
        got += ids(page)
        nxt = link(page, "next")
        if nxt is None:
            break
        assert nxt.startswith(core.local_url + "/fhir/ServiceRequest?") and "_cursor=" in nxt
        page = ok(call(core, "GET", nxt))
    assert pages == 5 and len(got) == N_SR
    assert got == newest_first(seed.srs)  # newest first, each exactly once


def test_paging_is_stable_while_new_resources_arrive(core: NodeProcess, seed: Seed) -> None:
    params = {"patient": "pat-zhang", "_count": "4"}
    first = search(core, "ServiceRequest", params)
    # a newer referral for the same patient lands between page 1 and page 2
    ctx = NodeContext.open(core.plan, create=False)
    try:
        with ctx.store.write() as conn:
            extra = dict(
                seed.srs[1], id="sr-late", identifier=[{"system": PLACER, "value": "ZZ-LATE"}]
            )
            store.put(conn, extra, at=datetime.now(UTC), patient_hash=seed.hashes["pat-zhang"])
        got = ids(first)
        page = first
        while nxt := link(page, "next"):
            page = ok(call(core, "GET", nxt))
            got += ids(page)
        assert got == newest_first(
            [s for s in seed.srs if s["subject"]["reference"] == "Patient/pat-zhang"]
        )
        again = search(core, "ServiceRequest", {"patient": "pat-zhang", "_count": "1"})
        assert ids(again) == ["sr-late"] and again["total"] == N_SR // 2 + 1
    finally:
        with ctx.store.write() as conn:
            from bridge.fhirstore.tables import FHIR_RESOURCE as T

            conn.execute(T.delete().where(T.c.id == "sr-late"))
        ctx.store.dispose()


def test_status_comma_is_or(core: NodeProcess, seed: Seed) -> None:
    b = search(
        core,
        "ServiceRequest",
        {"status": "active,revoked", "_count": "200", "requester": "Practitioner/dr-li"},
    )
    want = [s for s in seed.srs[:20] if s["status"] in ("active", "revoked")]
    assert ids(b) == newest_first(want) and b["total"] == len(want) == 13
    b = search(core, "ServiceRequest", {"status": "completed", "requester": "dr-li"})
    assert ids(b) == newest_first([s for s in seed.srs[:20] if s["status"] == "completed"])


def test_last_updated_ranges(core: NodeProcess, seed: Seed) -> None:
    # sr-i was written at T0 + (i+1) minutes
    rng = [
        ("_lastUpdated", "ge2026-11-01T00:05:00Z"),
        ("_lastUpdated", "lt2026-11-01T00:09:00Z"),
        ("_count", "50"),
    ]
    assert ids(search(core, "ServiceRequest", rng)) == ["sr-07", "sr-06", "sr-05", "sr-04"]
    # the same instant written in Beijing time
    rng = [
        ("_lastUpdated", "gt2026-11-01T08:05:00+08:00"),
        ("_lastUpdated", "le2026-11-01T08:08:00+08:00"),
    ]
    assert ids(search(core, "ServiceRequest", rng)) == ["sr-07", "sr-06", "sr-05"]
    # eq at minute precision is that whole minute; a day takes all 30
    assert ids(search(core, "ServiceRequest", {"_lastUpdated": "2026-11-01T00:11Z"})) == ["sr-10"]
    day = search(core, "ServiceRequest", {"_lastUpdated": "eq2026-11-01", "_count": "0"})
    assert day["total"] == N_SR and "entry" not in day and link(day, "next") is None
    assert search(core, "ServiceRequest", {"_lastUpdated": "lt2026-11-01"})["total"] == 0


def test_identifier_search(core: NodeProcess, seed: Seed) -> None:
    b = search(core, "Patient", {"identifier": f"{NATIONAL_ID}|11010119650505231X"})
    assert ids(b) == ["pat-zhang"]
    assert ids(search(core, "Patient", {"identifier": "FX0001"})) == ["pat-wang"]
    # same lastUpdated: then by id
    assert ids(search(core, "Patient", {"identifier": f"{MRN}|FX0002,{MRN}|FX0001"})) == [
        "pat-wang",
        "pat-zhang",
    ]
    assert ids(search(core, "Patient", {"identifier": f"{MRN}|"})) == ["pat-wang", "pat-zhang"]
    assert ids(search(core, "Patient", {"identifier": f"{MRN}|110102195003151234"})) == []
    assert ids(search(core, "ServiceRequest", {"identifier": f"{PLACER}|ZZ-2026-0007"})) == [
        "sr-07"
    ]
    assert ids(search(core, "Practitioner", {"identifier": "D-017"})) == ["dr-li"]


def test_reference_parameters(core: NodeProcess, seed: Seed) -> None:
    zhang = newest_first([s for s in seed.srs if s["subject"]["reference"] == "Patient/pat-zhang"])
    for params in (
        {"patient": "Patient/pat-zhang"},
        {"patient": "pat-zhang"},
        {"subject": "Patient/pat-zhang"},
    ):
        assert ids(search(core, "ServiceRequest", {**params, "_count": "50"})) == zhang, params
    assert ids(
        search(core, "ServiceRequest", {"requester": "Organization/chc", "_count": "50"})
    ) == newest_first(seed.srs[20:])
    assert search(core, "ServiceRequest", {"performer": "core"})["total"] == N_SR
    assert ids(search(core, "Task", {"owner": "Organization/core"})) == [
        "task-2",
        "task-1",
        "task-0",
    ]
    assert ids(search(core, "Task", {"focus": "ServiceRequest/sr-04"})) == ["task-1"]
    assert ids(search(core, "Observation", {"patient": "pat-wang", "status": "final"})) == [
        "obs-1",
        "obs-0",
    ]
    assert ids(search(core, "Encounter", {"service-provider": "core"})) == ["enc-1"]
    assert ids(search(core, "Consent", {"patient": "pat-zhang"})) == ["consent-1"]
    assert ids(search(core, "ServiceRequest", {"_id": "sr-01,sr-02,nope"})) == ["sr-02", "sr-01"]


def test_include_task_focus(core: NodeProcess, seed: Seed) -> None:
    b = search(core, "Task", {"_include": "Task:focus", "status": "requested,in-progress"})
    validate_resource(b)
    assert ids(b) == ["task-2", "task-0"] and b["total"] == 2
    assert ids(b, "include") == ["sr-05", "sr-03"]
    inc = {
        e["resource"]["id"]: e["resource"] for e in b["entry"] if e["search"]["mode"] == "include"
    }
    assert inc["sr-05"]["identifier"] == seed.srs[5]["identifier"]
    assert inc["sr-03"]["status"] == STATUSES[0]
    # typed form too; without _include nothing is included
    assert ids(search(core, "Task", {"_include": "Task:focus:ServiceRequest"}), "include") == [
        "sr-05",
        "sr-04",
        "sr-03",
    ]
    assert ids(search(core, "Task", {}), "include") == []


def test_total_none_and_bad_values(core: NodeProcess) -> None:
    assert "total" not in search(core, "ServiceRequest", {"_total": "none"})
    outcome(
        call(core, "GET", "/fhir/ServiceRequest", params={"_count": "many"}),
        400,
        "invalid",
        "HT-FHIR-REQUEST",
    )
    outcome(
        call(core, "GET", "/fhir/ServiceRequest", params={"_lastUpdated": "ap2026"}),
        400,
        "not-supported",
        "HT-FHIR-REQUEST",
    )
    msg = outcome(
        call(core, "GET", "/fhir/ServiceRequest", params={"_lastUpdated": "2026-11-01T08:00"}),
        400,
        "invalid",
        "HT-FHIR-REQUEST",
    )
    assert "zone" in msg
    outcome(
        call(core, "GET", "/fhir/ServiceRequest", params={"_cursor": "garbage!"}),
        400,
        "invalid",
        "HT-FHIR-REQUEST",
    )
    outcome(
        call(core, "GET", "/fhir/Patient", params={"_include": "Task:focus"}),
        400,
        "not-supported",
        "HT-FHIR-REQUEST",
    )
    big = search(core, "ServiceRequest", {"_count": "1000", "performer": "core"})
    assert len(big["entry"]) == N_SR


def test_unknown_parameters_are_refused_by_name(core: NodeProcess) -> None:
    r = call(
        core,
        "GET",
        "/fhir/ServiceRequest",
        params=[
            ("status", "active"),
            ("name", "王"),
            ("status:contains", "revoked"),
            ("reason", "3457005"),
            ("requester.name", "李"),
            ("_has:Task:focus:status", "accepted"),
        ],
    )
    msg = outcome(r, 400, "not-supported", "HT-FHIR-REQUEST")
    assert (
        "unknown search parameter(s) for ServiceRequest: name, status:contains, reason, "
        "requester.name, (unreadable name)" in msg
    )
    assert "王" not in msg and "李" not in msg and "revoked" not in msg
    # what issue #19 added is accepted: status:not, _sort, _summary, _elements, _pretty
    b = search(
        core,
        "ServiceRequest",
        [
            ("status:not", "revoked"),
            ("_sort", "-_lastUpdated"),
            ("_summary", "false"),
            ("_pretty", "false"),
        ],
    )
    assert b["total"] == 20
    # Prefer: handling=lenient ignores them, says so, and leaves them out of the self link
    b = ok(
        call(
            core,
            "GET",
            "/fhir/ServiceRequest",
            params=[("status", "revoked"), ("name", "王")],
            headers={"Prefer": "handling=lenient"},
        )
    )
    assert link(b, "self") == core.local_url + "/fhir/ServiceRequest?status=revoked"
    assert b["total"] == 10
    (oo,) = [e for e in b["entry"] if e["search"]["mode"] == "outcome"]
    assert oo["resource"]["issue"][0]["diagnostics"] == "ignored: name"


# -------------------------------------------------------------------------------------------
# roles


def test_roles_minimum_necessary(core: NodeProcess) -> None:
    r = call(core, "GET", "/fhir/ServiceRequest", role=None)
    outcome(r, 401, "login", "HT-AUTH")
    assert r.headers["www-authenticate"].startswith("Bearer")
    r = http().get(
        core.local_url + "/fhir/Patient/pat-wang", headers={"Authorization": "Bearer not-a-token"}
    )
    outcome(r, 401, "login", "HT-AUTH")
    for path in ("/fhir/ServiceRequest", "/fhir/Patient/pat-wang", "/fhir/AuditEvent"):
        outcome(call(core, "GET", path, role="it"), 403, "forbidden", "HT-FORBIDDEN")
    for path in ("/fhir/ServiceRequest", "/fhir/Patient/pat-wang", "/fhir/Observation/obs-0"):
        msg = outcome(call(core, "GET", path, role="auditor"), 403, "forbidden", "HT-FORBIDDEN")
        assert "minimum necessary" in msg
    outcome(
        call(core, "GET", "/fhir/AuditEvent", role="clinician"), 403, "forbidden", "HT-FORBIDDEN"
    )
    outcome(
        call(core, "GET", "/fhir/AuditEvent/1", role="clinician"), 403, "forbidden", "HT-FORBIDDEN"
    )
    for role in ("it", "auditor"):
        outcome(
            call(core, "PUT", "/fhir/Task/task-0", role=role, body={"resourceType": "Task"}),
            403,
            "forbidden",
            "HT-FORBIDDEN",
        )
        outcome(
            call(core, "POST", "/fhir", role=role, body={"resourceType": "Bundle"}),
            403,
            "forbidden",
            "HT-FORBIDDEN",
        )
    assert call(core, "GET", "/fhir/metadata", role="it").status_code == 200


# -------------------------------------------------------------------------------------------
# who looked at what


def extra_of(event: dict[str, Any]) -> dict[str, Any]:
    for ext in event.get("extension", []):
        if ext["url"] == EXTRA_EXTENSION:
            return {
                x["url"]: next(v for k, v in x.items() if k.startswith("value"))
                for x in ext["extension"]
            }
    return {}


def actor_of(event: dict[str, Any]) -> str | None:
    return next(
        (
            a["who"]["identifier"]["value"]
            for a in event["agent"]
            if a["who"]["identifier"]["system"] == ACTOR_SYSTEM
        ),
        None,
    )


def test_reads_are_audited_per_patient_and_found_by_patient_hash(
    core: NodeProcess, seed: Seed
) -> None:
    h_zhang, h_wang = seed.hashes["pat-zhang"], seed.hashes["pat-wang"]
    ok(call(core, "GET", "/fhir/ServiceRequest/sr-01"))
    b = search(
        core,
        "AuditEvent",
        {"patient-hash": h_zhang, "subtype": "read", "_count": "1"},
        role="auditor",
    )
    validate_resource(b)
    (event,) = [e["resource"] for e in b["entry"]]
    assert actor_of(event) == "role:clinician" and event["action"] == "R"
    assert {
        "what": {"identifier": {"system": PATIENT_HASH_SYSTEM, "value": h_zhang}},
        "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "1"},
        "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "1"},
    } in event["entity"]
    extra = extra_of(event)
    assert extra["resources"] == "ServiceRequest/sr-01"
    assert extra["query"] == "/fhir/ServiceRequest/sr-01" and extra["resource_count"] == 1
    # the same record by entity-identifier, and read by its id
    same = search(
        core,
        "AuditEvent",
        {"entity-identifier": f"{PATIENT_HASH_SYSTEM}|{h_zhang}", "_count": "1", "action": "R"},
        role="auditor",
    )
    assert ids(same) == [event["id"]]
    assert ok(call(core, "GET", f"/fhir/AuditEvent/{event['id']}", role="auditor")) == event

    # a search over two patients: one audit entry per patient, each listing that patient's
    # resources
    search(core, "ServiceRequest", {"_id": "sr-02,sr-03,sr-05"})
    for h, want in (
        (h_zhang, "ServiceRequest/sr-05 ServiceRequest/sr-03"),
        (h_wang, "ServiceRequest/sr-02"),
    ):
        got = search(core, "AuditEvent", {"patient-hash": h, "_count": "1"}, role="auditor")
        (ev,) = [e["resource"] for e in got["entry"]]
        assert extra_of(ev)["resources"] == want
        # the names searched by, never the values (bridge.api.fhir_audit.redacted_query)
        assert extra_of(ev)["query"] == "/fhir/ServiceRequest?_id=***"
    # a search by national ID number: audited with the patient's hash, the number masked
    nid = "11010119650505231X"
    assert ids(search(core, "Patient", {"identifier": f"{NATIONAL_ID}|{nid}"})) == ["pat-zhang"]
    got = search(core, "AuditEvent", {"patient-hash": h_zhang, "_count": "1"}, role="auditor")
    (ev,) = [e["resource"] for e in got["entry"]]
    assert extra_of(ev)["query"] == f"/fhir/Patient?identifier={NATIONAL_ID}|***"
    assert extra_of(ev)["resources"] == "Patient/pat-zhang"
    # an empty result still records who searched for what (no patient)
    search(core, "Patient", {"identifier": "no-such-mrn"})
    got = search(core, "AuditEvent", {"subtype": "read", "_count": "5"}, role="auditor")
    empty = [
        e["resource"]
        for e in got["entry"]
        if extra_of(e["resource"]).get("query") == "/fhir/Patient?identifier=***"
    ]
    assert len(empty) == 1 and extra_of(empty[0])["resource_count"] == 0
    assert actor_of(empty[0]) == "role:clinician"
    assert not any(
        e.get("what", {}).get("identifier", {}).get("system") == PATIENT_HASH_SYSTEM
        for e in empty[0].get("entity", [])
    )
    # the CLI export finds the same trail, and the chain still verifies
    lines = core.cli("audit", "export", "--patient", h_zhang).stdout.splitlines()
    reads = [e for e in map(orjson.loads, lines) if actor_of(e) == "role:clinician"]
    assert any(extra_of(e).get("resources") == "ServiceRequest/sr-01" for e in reads)
    full = core.cli("audit", "export").stdout
    assert nid not in full and "110102195003151234" not in full
    assert core.cli("audit", "verify").returncode == 0


def test_audit_event_search_by_date_and_paging(core: NodeProcess) -> None:
    ok(call(core, "GET", "/fhir/Observation/obs-1"))
    now = datetime.now(UTC)
    start = (now - timedelta(hours=1)).isoformat(timespec="seconds").replace("+00:00", "Z")
    b = search(core, "AuditEvent", {"date": f"ge{start}", "_count": "7"}, role="auditor")
    total = b["total"]
    assert total >= 3
    seen = ids(b)
    while nxt := link(b, "next"):
        b = ok(call(core, "GET", nxt, role="auditor"))
        seen += ids(b)
    assert len(seen) == len(set(seen)) == total  # later reads (these pages') come after
    assert [int(s) for s in seen] == sorted((int(s) for s in seen), reverse=True)
    later = (now + timedelta(hours=1)).isoformat(timespec="seconds").replace("+00:00", "Z")
    assert search(core, "AuditEvent", {"date": f"gt{later}"}, role="auditor")["total"] == 0
    # the node's own start is in the log as a config event
    assert search(core, "AuditEvent", {"subtype": "config"}, role="auditor")["total"] >= 1
    outcome(
        call(core, "GET", "/fhir/AuditEvent", "auditor", {"patient": "x"}),
        400,
        "not-supported",
        "HT-FHIR-REQUEST",
    )
    outcome(
        call(core, "GET", "/fhir/AuditEvent/999999", "auditor"), 404, "not-found", "HT-NOT-FOUND"
    )


# -------------------------------------------------------------------------------------------
# writes: POST /fhir (transaction) and PUT /fhir/Task/{id} go to the referral workflow


def referrals(node: NodeProcess) -> dict[str, dict[str, Any]]:
    return {r["thread"]: r for r in node.api("GET", "/local/v1/referrals")}


def test_post_transaction_then_put_task_moves_the_referral(env, core: NodeProcess) -> None:
    chc = env[0].node("chc")
    before = set(referrals(chc))
    resp = ok(call(chc, "POST", "/fhir", body=referral("up-outpatient", "core")))
    validate_resource(resp)
    assert resp["type"] == "transaction-response"
    assert {e["response"]["status"] for e in resp["entry"]} == {"201 Created"}
    assert sorted(e["response"]["location"].split("/")[0] for e in resp["entry"]) == [
        "Composition",
        "Consent",
        "Coverage",
        "Patient",
        "ServiceRequest",
    ]
    (thread,) = set(referrals(chc)) - before
    here = wait_for(
        lambda: (
            referrals(core).get(thread, {}).get("status") == "received" and referrals(core)[thread]
        ),
        what="core to receive the referral",
    )
    task = ok(call(core, "GET", f"/fhir/Task/{here['task_id']}"))
    assert task["status"] == "received"
    # matched by patient hash to the record core already had (seeded, same national ID)
    assert task["for"] == {"reference": "Patient/pat-wang"}
    b = search(core, "Task", {"_id": task["id"], "_include": "Task:focus"})
    assert ids(b) == [task["id"]] and ids(b, "include") == [here["sr_id"]]
    # the referrer may not move the fulfiller's Task (read once core's "received" has reached
    # the referrer too: a Task read before that lands is stale, and its PUT is refused as one)
    wait_for(
        lambda: referrals(chc)[thread].get("status") == "received",
        what="the referrer to see the referral received",
    )
    theirs = ok(call(chc, "GET", f"/fhir/Task/{referrals(chc)[thread]['task_id']}"))
    msg = outcome(
        call(chc, "PUT", f"/fhir/Task/{theirs['id']}", body={**theirs, "status": "accepted"}),
        422,
        "business-rule",
        "HT-REF-TRANSITION",
    )
    assert "receiver" in msg
    # the receiver accepts by PUT, with the acceptance slip as outputs
    task["status"] = "accepted"
    task["output"] = [
        {"type": {"text": "bed"}, "valueString": "心内科 12床"},
        {"type": {"text": "doctor"}, "valueString": "张主任"},
    ]
    r = call(core, "PUT", f"/fhir/Task/{task['id']}", body=task)
    moved = ok(r)
    validate_resource(moved)
    assert moved["id"] == task["id"] and moved["status"] == "accepted"
    assert int(moved["meta"]["versionId"]) > int(task["meta"]["versionId"])
    assert r.headers["etag"] == f'W/"{moved["meta"]["versionId"]}"'
    assert ok(call(core, "GET", f"/fhir/Task/{task['id']}"))["status"] == "accepted"
    # ... and the referrer's side follows, slip included
    wait_for(
        lambda: ok(call(chc, "GET", f"/fhir/Task/{theirs['id']}"))["status"] == "accepted",
        what="the referrer to see the acceptance",
    )
    slip = ok(call(chc, "GET", f"/fhir/Task/{theirs['id']}"))["output"]
    assert [o["valueString"] for o in slip] == ["心内科 12床", "张主任"]
    # an illegal move is refused with a business-rule OperationOutcome and changes nothing
    for status in ("requested", "completed"):
        outcome(
            call(core, "PUT", f"/fhir/Task/{task['id']}", body={**moved, "status": status}),
            422,
            "business-rule",
            "HT-REF-TRANSITION",
        )
    assert ok(call(core, "GET", f"/fhir/Task/{task['id']}"))["meta"] == moved["meta"]


def test_write_requests_are_checked_before_the_workflow(env, core: NodeProcess) -> None:
    chc = env[0].node("chc")
    n = len(referrals(chc))
    task = ok(call(core, "GET", "/fhir/Task/task-0"))
    diag = outcome(
        call(core, "PUT", "/fhir/Task/task-0", body={**task, "status": "bogus"}),
        422,
        "invalid",
        "HT-FHIR-INVALID",
    )
    assert "status" in diag
    r = call(core, "PUT", "/fhir/Task/task-0", body={**task, "status": "bogus"})
    assert r.json()["issue"][0]["expression"] == ["status"]
    outcome(call(core, "PUT", "/fhir/Task/task-1", body=task), 400, "invalid", "HT-FHIR-REQUEST")
    outcome(
        call(core, "PUT", "/fhir/Task/task-0", body={"resourceType": "Patient", "id": "task-0"}),
        400,
        "invalid",
        "HT-FHIR-REQUEST",
    )
    r = http().put(
        core.local_url + "/fhir/Task/task-0",
        content=b"{not json",
        headers={"Authorization": f"Bearer {core.token('clinician')}"},
    )
    outcome(r, 400, "structure", "HT-FHIR-REQUEST")
    # a Task that is not a referral this node tracks
    outcome(
        call(core, "PUT", "/fhir/Task/task-0", body={**task, "status": "accepted"}),
        404,
        "not-found",
        "HT-NOT-FOUND",
    )
    # transactions
    outcome(
        call(chc, "POST", "/fhir", body={"resourceType": "Bundle", "type": "collection"}),
        400,
        "invalid",
        "HT-FHIR-REQUEST",
    )
    bad = referral("up-exam", "core")
    bad["entry"][1]["resource"]["authoredOn"] = "yesterday"
    diag = outcome(call(chc, "POST", "/fhir", body=bad), 422, "invalid", "HT-FHIR-INVALID")
    assert "entry[1].resource(ServiceRequest).authoredOn" in diag
    outcome(
        call(chc, "POST", "/fhir", body=referral("up-exam", "core", consent=False)),
        422,
        "business-rule",
        "HT-REF-CONSENT",
    )
    outcome(
        call(chc, "POST", "/fhir", body=referral("up-exam", "nowhere")),
        422,
        "processing",
        "HT-REF-UNKNOWN",
    )
    assert len(referrals(chc)) == n  # nothing was created by any of these
