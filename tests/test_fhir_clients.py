"""Unmodified FHIR clients from PyPI against a real node's /fhir: fhirpy (sync) and fhirclient.

fhirpy is the de-facto Python FHIR client (Beda/Aidbox); fhirclient is the SMART on FHIR Python
client with R4 (4.0.1) models that refuse unknown or mistyped elements, so every resource it
parses here (CapabilityStatement, Bundles, ServiceRequests, Tasks) is also checked against its
R4 model classes. Bearer tokens are passed as plain headers (no OAuth: the node has none).
"""

from __future__ import annotations

import pytest
from fhirclient import client as smart_client
from fhirclient.models.bundle import Bundle as FcBundle
from fhirclient.models.capabilitystatement import CapabilityStatement as FcCapability
from fhirclient.models.fhirsearch import FHIRSearch
from fhirclient.models.servicerequest import ServiceRequest as FcServiceRequest
from fhirclient.models.task import Task as FcTask
from fhirclient.server import FHIRNotFoundException, FHIRPermissionDeniedException
from fhirpy import SyncFHIRClient
from fhirpy.base.exceptions import ForbiddenError, OperationOutcome, ResourceNotFound

from tests.harness import Alliance, NodeProcess, wait_for
from tests.referrals import referral
from tests.test_fhir_api import (
    MEMBERS,
    N_SR,
    RULES,
    call,
    close_http,
    newest_first,
    ok,
    referrals,
    seed_store,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory):
    a = Alliance(tmp_path_factory.mktemp("fhirclients") / "alliance", MEMBERS, RULES)
    seed = seed_store(a.files["core"])
    a.start("core", "chc")
    yield a, seed
    close_http()
    for c in _smart_clients:
        c.server.session.close()
    a.stop_all()


def fhirpy(node: NodeProcess, role: str = "clinician") -> SyncFHIRClient:
    return SyncFHIRClient(node.local_url + "/fhir", authorization=f"Bearer {node.token(role)}")


_smart_clients: list[smart_client.FHIRClient] = []


def smart(node: NodeProcess, role: str = "clinician") -> smart_client.FHIRClient:
    c = smart_client.FHIRClient(
        settings={"app_id": "hutong-tests", "api_base": node.local_url + "/fhir"}
    )
    c.server.session.headers["Authorization"] = f"Bearer {node.token(role)}"
    _smart_clients.append(c)  # its requests.Session is closed by the module fixture
    return c


# -------------------------------------------------------------------------------------------
# fhirpy


def test_fhirpy_search_paging_include_read(env) -> None:
    a, seed = env
    core = a.node("core")
    client = fhirpy(core)
    wang = client.resources("ServiceRequest").search(patient="Patient/pat-wang").limit(4)
    got = [r.id for r in wang.fetch_all()]  # follows Bundle.link next to the end
    assert got == newest_first(
        [s for s in seed.srs if s["subject"]["reference"] == "Patient/pat-wang"]
    )
    everything = client.resources("ServiceRequest").search(performer="Organization/core")
    assert [r.id for r in everything.limit(7)] == newest_first(seed.srs)
    first = everything.limit(7).fetch()
    assert len(first) == 7 and first[0]["identifier"] == seed.srs[-1]["identifier"]
    # fhirpy writes OR as a comma list and AND as a repeated parameter
    srs = client.resources("ServiceRequest").search(requester="Practitioner/dr-li").limit(50)
    assert [r.id for r in srs.search(status="active,revoked").fetch()] == newest_first(
        [s for s in seed.srs[:20] if s["status"] != "completed"]
    )
    assert srs.search(status=["active", "revoked"]).fetch() == []
    # _include=Task:focus: fetch() keeps the Tasks, fetch_raw() has the included referrals
    tasks = client.resources("Task").include("Task", "focus").search(status="accepted")
    assert [t.id for t in tasks.fetch()] == ["task-1"]
    raw = tasks.fetch_raw()
    assert [(e.search.mode, e.resource.resourceType, e.resource.id) for e in raw.entry] == [
        ("match", "Task", "task-1"),
        ("include", "ServiceRequest", "sr-04"),
    ]
    # read, and the reference it holds
    task = client.reference("Task", "task-1").to_resource()
    assert task["status"] == "accepted" and task["owner"].reference == "Organization/core"
    sr = task["focus"].to_resource()  # fhirpy follows the reference with a read
    assert sr["identifier"] == seed.srs[4]["identifier"]
    # search().get() (a _count=2 search) and first()
    assert client.resources("Patient").search(identifier="FX0002").get().id == "pat-zhang"
    assert client.resources("Observation").search(patient="pat-wang").first().id == "obs-1"


def test_fhirpy_errors_are_its_own_exceptions(env) -> None:
    core = env[0].node("core")
    with pytest.raises(ResourceNotFound):
        fhirpy(core).reference("Task", "nope").to_resource()
    with pytest.raises(ForbiddenError):
        fhirpy(core, "auditor").resources("ServiceRequest").fetch()
    with pytest.raises(OperationOutcome) as exc:
        fhirpy(core).resources("ServiceRequest").search(name="王").fetch()
    assert "unknown search parameter(s) for ServiceRequest: name" in str(exc.value)
    # the auditor's client reads the audit trail of what the clinician's client did
    events = fhirpy(core, "auditor").resources("AuditEvent").search(subtype="read").limit(3)
    assert any(
        e["agent"][1]["who"]["identifier"]["value"] == "role:clinician" for e in events.fetch()
    )


def test_fhirpy_moves_a_referral_task(env) -> None:
    a, _ = env
    chc, core = a.node("chc"), a.node("core")
    before = set(referrals(chc))
    ok(call(chc, "POST", "/fhir/", body=referral("up-inpatient", "core")))  # trailing slash
    (thread,) = set(referrals(chc)) - before
    row = wait_for(
        lambda: (
            referrals(core).get(thread, {}).get("status") == "received" and referrals(core)[thread]
        ),
        what="core to receive the referral",
    )
    client = fhirpy(core)
    task = client.reference("Task", row["task_id"]).to_resource()
    assert task["status"] == "received"
    task["status"] = "accepted"
    task["output"] = [{"type": {"text": "bed"}, "valueString": "心内科 3床"}]
    task.save()  # PUT /fhir/Task/{id}; fhirpy refreshes the object from the answer
    assert task["status"] == "accepted" and task["meta"]["versionId"] != "1"
    assert client.reference("Task", row["task_id"]).to_resource()["status"] == "accepted"
    wait_for(
        lambda: referrals(chc)[thread]["status"] == "accepted",
        what="the referrer to see it accepted",
    )
    # an illegal move comes back as fhirpy's OperationOutcome with the Hutong code
    task["status"] = "requested"
    with pytest.raises(OperationOutcome) as exc:
        task.save()
    assert "HT-REF-TRANSITION" in str(exc.value)

    # fhirclient (R4 models) marks the patient arrived with a PUT of its own model object
    fc = smart(core)
    fc_task = FcTask.read(row["task_id"], fc.server)
    assert fc_task.status == "accepted" and fc_task.output[0].valueString == "心内科 3床"
    fc_task.status = "in-progress"
    answer = fc_task.update()
    assert FcTask(answer).status == "in-progress"
    wait_for(
        lambda: referrals(chc)[thread]["status"] == "in-progress",
        what="the referrer to see the arrival",
    )


# -------------------------------------------------------------------------------------------
# fhirclient (SMART on FHIR Python client, R4 models)


def test_fhirclient_capability_search_paging_include_read(env) -> None:
    a, seed = env
    core = a.node("core")
    fc = smart(core)
    fc.server.get_capability()  # parses /fhir/metadata with its R4 CapabilityStatement model
    cs: FcCapability = fc.server.capabilityStatement
    assert cs.fhirVersion == "4.0.1"
    assert {r.type for r in cs.rest[0].resource} >= {"ServiceRequest", "Task", "AuditEvent"}
    search = FcServiceRequest.where(struct={"patient": "Patient/pat-zhang", "_count": "4"})
    pages = list(search.perform_iter(fc.server))  # follows next links
    assert len(pages) == 4 and all(isinstance(p, FcBundle) and p.total == N_SR // 2 for p in pages)
    got = [e.resource.id for p in pages for e in p.entry]
    assert got == newest_first(
        [s for s in seed.srs if s["subject"]["reference"] == "Patient/pat-zhang"]
    )
    assert all(isinstance(e.resource, FcServiceRequest) for p in pages for e in p.entry)
    # _include through its own include() builder
    inc = FHIRSearch(FcTask, {"status": "requested,in-progress", "patient": "pat-zhang"}).include(
        "focus"
    )
    bundle = next(inc.perform_iter(fc.server))
    assert [(e.search.mode, e.resource.resource_type, e.resource.id) for e in bundle.entry] == [
        ("match", "Task", "task-2"),
        ("match", "Task", "task-0"),
        ("include", "ServiceRequest", "sr-05"),
        ("include", "ServiceRequest", "sr-03"),
    ]
    task = FcTask.read("task-0", fc.server)
    assert task.focus.reference == "ServiceRequest/sr-03" and task.status == "requested"
    assert task.as_json()["for"] == {"reference": "Patient/pat-zhang"}


def test_fhirclient_errors(env) -> None:
    core = env[0].node("core")
    with pytest.raises(FHIRNotFoundException):
        FcTask.read("nope", smart(core).server)
    with pytest.raises(FHIRPermissionDeniedException):
        FcTask.read("task-0", smart(core, "it").server)


# -------------------------------------------------------------------------------------------
# issue #19: the search calls clients make (count, sort, elements, revinclude, _summary=count)


def _dr_li(seed) -> list[dict]:
    return [s for s in seed.srs if s["requester"]["reference"] == "Practitioner/dr-li"]


def test_fhirpy_count_sort_elements_revinclude(env) -> None:
    a, seed = env
    client = fhirpy(a.node("core"))
    srs = client.resources("ServiceRequest")
    # count(): _count=0 with fhirpy's _totalMethod=count
    # (seeded referrals only: test_fhirpy_moves_a_referral_task adds one of its own)
    mine = _dr_li(seed)
    assert srs.search(requester="Practitioner/dr-li").count() == len(mine) == 20
    assert srs.search(requester="Practitioner/dr-li", status="revoked").count() == len(
        [s for s in mine if s["status"] == "revoked"]
    )
    # sort(): ascending really ascending, descending, several keys
    assert [
        r.id
        for r in srs.search(requester="Practitioner/dr-li").sort("_lastUpdated").limit(5).fetch()
    ] == [s["id"] for s in mine[:5]]
    assert [
        r.id
        for r in srs.search(requester="Practitioner/dr-li").sort("-_lastUpdated").limit(5).fetch()
    ] == newest_first(mine)[:5]
    by_status = [
        r.id
        for r in srs.search(requester="Practitioner/dr-li")
        .sort("status", "-_lastUpdated")
        .limit(50)
        .fetch_all()
    ]
    assert by_status == [
        s["id"]
        for st in sorted({s["status"] for s in mine})
        for s in reversed(mine)
        if s["status"] == st
    ]
    # elements(): only what was asked (and what R4 requires), tagged SUBSETTED
    got = srs.search(_id="sr-04").elements("status").fetch()
    assert [r.serialize() for r in got] == [
        {
            "resourceType": "ServiceRequest",
            "id": "sr-04",
            "status": seed.srs[4]["status"],
            "intent": "order",
            "subject": seed.srs[4]["subject"],
            "meta": {
                **got[0]["meta"],
                "tag": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
                        "code": "SUBSETTED",
                    }
                ],
            },
        }
    ]
    # revinclude(): the referral and the Task that points at it
    raw = srs.search(_id="sr-04").revinclude("Task", "focus").fetch_raw()
    assert [(e.search.mode, e.resource.resourceType, e.resource.id) for e in raw.entry] == [
        ("match", "ServiceRequest", "sr-04"),
        ("include", "Task", "task-1"),
    ]
    assert [r.id for r in srs.search(_id="sr-04").revinclude("Task", "focus").fetch()] == ["sr-04"]


def test_fhirpy_async_count_sort_elements_revinclude(env) -> None:
    import asyncio

    from fhirpy import AsyncFHIRClient

    a, seed = env
    core = a.node("core")
    mine = _dr_li(seed)

    async def run() -> None:
        client = AsyncFHIRClient(
            core.local_url + "/fhir", authorization=f"Bearer {core.token('clinician')}"
        )
        srs = client.resources("ServiceRequest")
        assert await srs.search(patient="pat-zhang", requester="Practitioner/dr-li").count() == len(
            [s for s in mine if s["id"][-1] in "13579"]
        )
        asc = await srs.search(requester="Practitioner/dr-li").sort("_lastUpdated").limit(3).fetch()
        assert [r.id for r in asc] == [s["id"] for s in mine[:3]]
        assert [
            r.id
            for r in await srs.search(requester="Practitioner/dr-li").sort("-_id").limit(3).fetch()
        ] == sorted((s["id"] for s in mine), reverse=True)[:3]
        got = await client.resources("Patient").search(_id="pat-zhang").elements("gender").fetch()
        assert {k: v for k, v in got[0].items() if k != "meta"} == {
            "resourceType": "Patient",
            "id": "pat-zhang",
            "gender": "male",
        }
        raw = await srs.search(_id="sr-05").revinclude("Task", "focus").fetch_raw()
        assert [(e.search.mode, e.resource.id) for e in raw.entry] == [
            ("match", "sr-05"),
            ("include", "task-2"),
        ]

    asyncio.run(run())


def test_fhirclient_summary_count_and_sort(env) -> None:
    a, seed = env
    fc = smart(a.node("core"))
    bundle = next(
        FHIRSearch(
            FcServiceRequest, {"requester": "Practitioner/dr-li", "_summary": "count"}
        ).perform_iter(fc.server)
    )
    assert isinstance(bundle, FcBundle) and bundle.total == 20 and not bundle.entry
    asc = next(
        FHIRSearch(
            FcServiceRequest,
            {"requester": "Practitioner/dr-li", "_sort": "_lastUpdated", "_count": "4"},
        ).perform_iter(fc.server)
    )
    assert [e.resource.id for e in asc.entry] == [s["id"] for s in _dr_li(seed)[:4]]
    summary = next(
        FHIRSearch(FcTask, {"_id": "task-0", "_summary": "true"}).perform_iter(fc.server)
    )
    (task,) = [e.resource for e in summary.entry]
    assert task.status == seed.tasks[0]["status"] and task.focus.reference == "ServiceRequest/sr-03"
    assert task.authoredOn is None  # not a summary element of Task
    assert [(t.system, t.code) for t in task.meta.tag] == [
        ("http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "SUBSETTED")
    ]
