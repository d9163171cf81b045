"""Versions, conditional requests, updates that say what they did, and HTTP manners of /fhir,
against real node processes (issue 19, findings 1, 2, 6 and 8).

core's store is seeded as in tests/test_fhir_api.py; referral Tasks are made by a real
referral chc -> core. Every JSON answer is also parsed with fhir.resources (R4B models).
"""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest
from fhir.resources.R4B import get_fhir_model_class
from fhirclient import client as smart_client
from fhirclient.models.bundle import Bundle as FcBundle
from fhirclient.models.task import Task as FcTask
from fhirpy import AsyncFHIRClient, SyncFHIRClient

from bridge.fhir.validate import validate_resource
from tests.harness import Alliance, NodeProcess, wait_for
from tests.referrals import referral
from tests.test_fhir_api import MEMBERS, RULES, close_http, http, referrals, seed_store

pytestmark = pytest.mark.slow

FHIR_JSON = "application/fhir+json"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory):
    a = Alliance(tmp_path_factory.mktemp("fhirversions") / "alliance", MEMBERS, RULES)
    seed = seed_store(a.files["core"])
    a.start("core", "chc")
    yield a, seed
    close_http()
    a.stop_all()


@pytest.fixture(scope="module")
def core(env) -> NodeProcess:
    return env[0].node("core")


@pytest.fixture(scope="module")
def chc(env) -> NodeProcess:
    return env[0].node("chc")


def call(
    node: NodeProcess,
    method: str,
    path: str,
    *,
    body: Any = None,
    role: str = "clinician",
    headers: dict[str, str] | None = None,
    content: bytes | None = None,
    params: Any = None,
) -> httpx.Response:
    """A request as a FHIR client sends it; every JSON answer is parsed with fhir.resources."""
    import json

    h = {"Accept": FHIR_JSON, "Authorization": f"Bearer {node.token(role)}"}
    if body is not None:
        h["Content-Type"] = FHIR_JSON
        content = json.dumps(body).encode()
    h.update(headers or {})
    url = path if path.startswith("http") else node.local_url + path
    r = http().request(method, url, headers=h, content=content, params=params)
    if r.content and r.headers.get("content-type", "").startswith(FHIR_JSON):
        data = r.json()
        get_fhir_model_class(data["resourceType"]).model_validate(data)
    return r


def ok(r: httpx.Response, status: int = 200) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(FHIR_JSON)
    return r.json()


def refused(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(FHIR_JSON)
    body = r.json()
    validate_resource(body)
    (issue,) = body["issue"]
    assert issue["details"]["coding"][0]["code"] == code, body
    return issue


def received_task(
    chc: NodeProcess, core: NodeProcess, kind: str = "up-outpatient"
) -> dict[str, Any]:
    """A new referral chc -> core; core's Task once it is 'received'."""
    before = set(referrals(chc))
    ok(call(chc, "POST", "/fhir", body=referral(kind, "core")))
    (thread,) = set(referrals(chc)) - before
    row = wait_for(
        lambda: (
            referrals(core).get(thread, {}).get("status") == "received" and referrals(core)[thread]
        ),
        what="core to receive the referral",
    )
    return ok(call(core, "GET", f"/fhir/Task/{row['task_id']}"))


def version(resource: dict[str, Any]) -> int:
    return int(resource["meta"]["versionId"])


# -------------------------------------------------------------------------------------------
# versions: vread, history, ETag / Last-Modified


def test_every_version_is_readable_and_listed_in_history(
    core: NodeProcess, chc: NodeProcess
) -> None:
    task = received_task(chc, core)
    v = version(task)
    assert v >= 2  # made (requested), then received: both versions kept
    moved = dict(
        task, status="accepted", output=[{"type": {"text": "bed"}, "valueString": "心内科 5床"}]
    )
    after = ok(call(core, "PUT", f"/fhir/Task/{task['id']}", body=moved))
    assert version(after) == v + 1
    # each version by vread, with its own ETag and Last-Modified
    for n in range(1, v + 2):
        r = call(core, "GET", f"/fhir/Task/{task['id']}/_history/{n}")
        got = ok(r)
        assert got["id"] == task["id"] and got["meta"]["versionId"] == str(n)
        assert r.headers["etag"] == f'W/"{n}"'
        at = datetime.fromisoformat(got["meta"]["lastUpdated"].replace("Z", "+00:00"))
        assert r.headers["last-modified"] == format_datetime(at.replace(microsecond=0), usegmt=True)
    old = ok(call(core, "GET", f"/fhir/Task/{task['id']}/_history/{v}"))
    assert old["status"] == "received" and "output" not in old
    assert ok(call(core, "GET", f"/fhir/Task/{task['id']}/_history/{v + 1}")) == after
    refused(call(core, "GET", f"/fhir/Task/{task['id']}/_history/{v + 2}"), 404, "HT-NOT-FOUND")
    refused(call(core, "GET", f"/fhir/Task/{task['id']}/_history/x"), 404, "HT-NOT-FOUND")
    # the instance's history: every version, newest first, as a history Bundle
    hist = ok(call(core, "GET", f"/fhir/Task/{task['id']}/_history"))
    validate_resource(hist)
    assert hist["type"] == "history" and hist["total"] == v + 1
    assert [e["resource"]["meta"]["versionId"] for e in hist["entry"]] == [
        str(n) for n in range(v + 1, 0, -1)
    ]
    assert [e["response"]["etag"] for e in hist["entry"]] == [
        f'W/"{n}"' for n in range(v + 1, 0, -1)
    ]
    assert hist["entry"][-1]["request"] == {"method": "POST", "url": "Task"}
    assert hist["entry"][0]["request"] == {"method": "PUT", "url": f"Task/{task['id']}"}
    # paged: _count=1 and next links, no gap, no repeat
    page = ok(call(core, "GET", f"/fhir/Task/{task['id']}/_history", params={"_count": "1"}))
    seen = []
    while True:
        seen += [e["resource"]["meta"]["versionId"] for e in page.get("entry", [])]
        nxt = next((x["url"] for x in page["link"] if x["relation"] == "next"), None)
        if nxt is None:
            break
        page = ok(call(core, "GET", nxt))
    assert seen == [str(n) for n in range(v + 1, 0, -1)]
    # the type's history: this Task's newest version is the newest Task version of all
    th = ok(call(core, "GET", "/fhir/Task/_history", params={"_count": "3"}))
    assert th["type"] == "history" and len(th["entry"]) == 3
    assert (th["entry"][0]["resource"]["id"], th["entry"][0]["resource"]["meta"]["versionId"]) == (
        task["id"],
        str(v + 1),
    )
    assert any(x["relation"] == "next" for x in th["link"])
    refused(
        call(core, "GET", "/fhir/Task/_history", params={"_count": "0"}), 400, "HT-FHIR-REQUEST"
    )
    # the auditor's AuditEvents have no history; IT sees no clinical history
    refused(call(core, "GET", f"/fhir/Task/{task['id']}/_history", role="it"), 403, "HT-FORBIDDEN")


def test_conditional_reads_answer_304(core: NodeProcess) -> None:
    r = call(core, "GET", "/fhir/Patient/pat-wang")
    ok(r)
    tag, modified = r.headers["etag"], r.headers["last-modified"]
    assert tag == 'W/"1"'
    for headers in (
        {"If-None-Match": tag},
        {"If-None-Match": '"1"'},
        {"If-None-Match": "1"},  # fhirpy's refresh() sends the bare versionId
        {"If-Modified-Since": modified},
        {"If-Modified-Since": format_datetime(datetime.now(UTC), usegmt=True)},
    ):
        r = call(core, "GET", "/fhir/Patient/pat-wang", headers=headers)
        assert r.status_code == 304, headers
        assert r.content == b"" and r.headers["etag"] == tag
    for headers in (
        {"If-None-Match": 'W/"2"'},
        {"If-Modified-Since": format_datetime(datetime(2026, 10, 31, tzinfo=UTC), usegmt=True)},
    ):
        assert ok(call(core, "GET", "/fhir/Patient/pat-wang", headers=headers))["id"] == "pat-wang"
    r = call(core, "GET", "/fhir/Patient/pat-wang/_history/1", headers={"If-None-Match": tag})
    assert r.status_code == 304


def test_head_allow_and_trailing_slash(core: NodeProcess) -> None:
    for path in (
        "/fhir/Patient/pat-wang",
        "/fhir/Patient",
        "/fhir/metadata",
        "/fhir/Patient/pat-wang/_history",
        "/fhir/Patient/pat-wang/_history/1",
    ):
        get = call(core, "GET", path)
        head = call(core, "HEAD", path)
        assert head.status_code == 200 == get.status_code, path
        assert head.content == b""
        assert head.headers["content-type"] == get.headers["content-type"]
        if "etag" in get.headers:
            assert head.headers["etag"] == get.headers["etag"]
    assert call(core, "HEAD", "/fhir/Patient/nobody").status_code == 404
    for method, path, allow in (
        ("DELETE", "/fhir/Task/task-0", "GET, HEAD, PUT"),
        ("PUT", "/fhir/Patient/pat-wang", "GET, HEAD"),
        ("POST", "/fhir/Patient", "GET, HEAD"),
        ("DELETE", "/fhir/Task/task-0/_history", "GET, HEAD"),
        ("GET", "/fhir", "POST"),
    ):
        r = call(core, method, path, body={} if method in ("PUT", "POST") else None)
        issue = refused(r, 405, "HT-FHIR-UNSUPPORTED")
        assert issue["code"] == "not-supported"
        assert r.headers["allow"] == allow, (method, path)
    slash = ok(call(core, "GET", "/fhir/Task/", params={"_count": "50"}))
    plain = ok(call(core, "GET", "/fhir/Task", params={"_count": "50"}))
    assert [e["resource"]["id"] for e in slash["entry"]] == [
        e["resource"]["id"] for e in plain["entry"]
    ]
    assert ok(call(core, "GET", "/fhir/Patient/pat-wang/"))["id"] == "pat-wang"


def test_content_negotiation(core: NodeProcess, chc: NodeProcess) -> None:
    for accept in (
        "application/fhir+json; fhirVersion=4.0",
        "application/json",
        "application/fhir+xml;q=0.9, application/fhir+json",
        "*/*",
        "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
    ):
        assert (
            ok(call(core, "GET", "/fhir/Patient/pat-wang", headers={"Accept": accept}))["id"]
            == "pat-wang"
        ), accept
    for accept in (
        "application/fhir+xml",
        "application/xml, text/xml",
        "application/fhir+json; fhirVersion=3.0",
        "application/fhir+json;q=0",
    ):
        issue = refused(
            call(core, "GET", "/fhir/Patient/pat-wang", headers={"Accept": accept}),
            406,
            "HT-FHIR-FORMAT",
        )
        assert issue["code"] == "not-supported"
    for fmt in ("json", "application/fhir+json", "application/json"):
        assert (
            ok(call(core, "GET", "/fhir/Patient/pat-wang", params={"_format": fmt}))["id"]
            == "pat-wang"
        )
    found = ok(
        call(
            core,
            "GET",
            "/fhir/Patient",
            params={"identifier": "FX0001", "_format": "application/fhir+json"},
        )
    )
    assert [e["resource"]["id"] for e in found["entry"]] == ["pat-wang"]
    refused(
        call(core, "GET", "/fhir/Patient", params={"identifier": "FX0001", "_format": "xml"}),
        406,
        "HT-FHIR-FORMAT",
    )
    for fmt in ("xml", "application/fhir+xml", "ttl"):
        refused(
            call(core, "GET", "/fhir/Patient/pat-wang", params={"_format": fmt}),
            406,
            "HT-FHIR-FORMAT",
        )
    xml = b'<Task xmlns="http://hl7.org/fhir"><id value="task-0"/></Task>'
    n = len(referrals(chc))
    for method, path in (("PUT", "/fhir/Task/task-0"), ("POST", "/fhir")):
        issue = refused(
            call(core, method, path, content=xml, headers={"Content-Type": "application/fhir+xml"}),
            415,
            "HT-FHIR-MEDIA",
        )
        assert issue["code"] == "not-supported"
    refused(
        call(chc, "POST", "/fhir", content=b"{}", headers={"Content-Type": "text/plain"}),
        415,
        "HT-FHIR-MEDIA",
    )
    assert len(referrals(chc)) == n
    assert ok(call(core, "GET", "/fhir/Task/task-0"))["meta"]["versionId"] == "1"


# -------------------------------------------------------------------------------------------
# updates that say what they did


def test_put_refuses_what_the_workflow_would_drop(core: NodeProcess, chc: NodeProcess) -> None:
    task = received_task(chc, core)
    note = [{"text": "请带既往心电图"}]
    # same status plus a note: refused naming Task.note (it was 200 with the note dropped)
    issue = refused(
        call(core, "PUT", f"/fhir/Task/{task['id']}", body={**task, "note": note}),
        422,
        "HT-FHIR-UNAPPLIED",
    )
    assert issue["code"] == "business-rule" and issue["expression"] == ["Task.note"]
    assert "Task.note" in issue["diagnostics"]
    # a legal move carrying a change the move does not apply: refused whole, nothing moved
    issue = refused(
        call(
            core,
            "PUT",
            f"/fhir/Task/{task['id']}",
            body={**task, "status": "accepted", "note": note, "priority": "urgent"},
        ),
        422,
        "HT-FHIR-UNAPPLIED",
    )
    assert issue["expression"] == ["Task.note", "Task.priority"]
    # an element removed is a change too
    issue = refused(
        call(
            core,
            "PUT",
            f"/fhir/Task/{task['id']}",
            body={k: v for k, v in task.items() if k != "authoredOn"},
        ),
        422,
        "HT-FHIR-UNAPPLIED",
    )
    assert issue["expression"] == ["Task.authoredOn"]
    now = ok(call(core, "GET", f"/fhir/Task/{task['id']}"))
    assert now == task  # nothing changed by any of these
    # a PUT of exactly what is stored: 200, same version, said so
    r = call(
        core,
        "PUT",
        f"/fhir/Task/{task['id']}",
        body=task,
        headers={"Prefer": "return=OperationOutcome"},
    )
    oo = ok(r)
    assert oo["resourceType"] == "OperationOutcome"
    assert oo["issue"][0]["severity"] == "information"
    assert "unchanged" in oo["issue"][0]["diagnostics"]
    assert r.headers["etag"] == f'W/"{version(task)}"'
    # a required binding the schema leaves open (Task.priority) is refused by name
    issue = refused(
        call(core, "PUT", f"/fhir/Task/{task['id']}", body={**task, "priority": "bogus"}),
        422,
        "HT-FHIR-INVALID",
    )
    assert issue["expression"] == ["priority"]
    # an illegal status move is 422 (R4), not 409
    issue = refused(
        call(core, "PUT", f"/fhir/Task/{task['id']}", body={**task, "status": "in-progress"}),
        422,
        "HT-REF-TRANSITION",
    )
    assert issue["code"] == "business-rule"


def test_if_match_and_prefer(core: NodeProcess, chc: NodeProcess) -> None:
    task = received_task(chc, core)
    v = version(task)
    accept = {
        **task,
        "status": "accepted",
        "output": [{"type": {"text": "bed"}, "valueString": "心内科 7床"}],
    }
    for tag in ('W/"999"', f'W/"{v - 1}"'):
        issue = refused(
            call(core, "PUT", f"/fhir/Task/{task['id']}", body=accept, headers={"If-Match": tag}),
            412,
            "HT-FHIR-VERSION",
        )
        assert issue["code"] == "conflict"
    assert ok(call(core, "GET", f"/fhir/Task/{task['id']}")) == task
    refused(
        call(
            core, "PUT", f"/fhir/Task/{task['id']}", body=accept, headers={"If-Match": "yesterday"}
        ),
        400,
        "HT-FHIR-REQUEST",
    )
    # the right version, Prefer: return=minimal -> no body, the new version in the headers
    r = call(
        core,
        "PUT",
        f"/fhir/Task/{task['id']}",
        body=accept,
        headers={"If-Match": f'W/"{v}"', "Prefer": "return=minimal"},
    )
    assert r.status_code == 200 and r.content == b""
    assert r.headers["etag"] == f'W/"{v + 1}"'
    assert r.headers["location"] == f"{core.local_url}/fhir/Task/{task['id']}/_history/{v + 1}"
    got = ok(call(core, "GET", r.headers["location"]))
    assert got["status"] == "accepted" and got["output"] == accept["output"]
    modified = datetime.strptime(r.headers["last-modified"], "%a, %d %b %Y %H:%M:%S GMT").replace(
        tzinfo=UTC
    )
    assert got["meta"]["lastUpdated"].startswith(modified.strftime("%Y-%m-%dT%H:%M:%S"))
    # return=representation (also the default): the stored resource
    r = call(
        core,
        "PUT",
        f"/fhir/Task/{task['id']}",
        body={**got, "status": "in-progress"},
        headers={"If-Match": f'W/"{v + 1}"', "Prefer": "return=representation"},
    )
    arrived = ok(r)
    assert arrived["status"] == "in-progress" and version(arrived) == v + 2
    assert arrived == ok(call(core, "GET", f"/fhir/Task/{task['id']}"))
    # a writer still holding version v (the race's loser): 412 for the version, not a 422
    # for the elements the other writer changed since
    stale = {**task, "status": "rejected", "statusReason": {"text": "床位已满"}}
    refused(
        call(core, "PUT", f"/fhir/Task/{task['id']}", body=stale, headers={"If-Match": f'W/"{v}"'}),
        412,
        "HT-FHIR-VERSION",
    )
    assert ok(call(core, "GET", f"/fhir/Task/{task['id']}")) == arrived


def test_two_writers_of_one_task_one_gets_412_nothing_lost(
    core: NodeProcess, chc: NodeProcess
) -> None:
    race(core, chc)


@pytest.mark.postgres
def test_two_writers_on_postgresql(tmp_path, pg_node_dbs) -> None:
    """The same race with core's store on PostgreSQL (READ COMMITTED: the version check
    holds only because the Task row is locked for the transaction)."""
    a = Alliance(tmp_path / "alliance", MEMBERS, RULES, dsn_for=pg_node_dbs)
    try:
        a.start("core", "chc")
        for _ in range(3):
            race(a.node("core"), a.node("chc"))
    finally:
        a.stop_all()


def race(core: NodeProcess, chc: NodeProcess) -> None:
    """Two clients PUT the same version of one Task at once (accept vs reject)."""
    task = received_task(chc, core)
    v = version(task)
    tag = f'W/"{v}"'
    bodies = {
        "his": {
            **task,
            "status": "accepted",
            "output": [{"type": {"text": "bed"}, "valueString": "心内科 9床"}],
        },
        "page": {**task, "status": "rejected", "statusReason": {"text": "床位已满"}},
    }
    answers: dict[str, httpx.Response] = {}
    start = threading.Barrier(2)

    def write(who: str) -> None:
        with httpx.Client(timeout=30) as client:
            start.wait()
            answers[who] = client.put(
                f"{core.local_url}/fhir/Task/{task['id']}",
                headers={
                    "Authorization": f"Bearer {core.token('clinician')}",
                    "Content-Type": FHIR_JSON,
                    "If-Match": tag,
                },
                content=httpx.Request("PUT", "http://x", json=bodies[who]).content,
            )

    threads = [threading.Thread(target=write, args=(w,)) for w in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = sorted(r.status_code for r in answers.values())
    assert statuses == [200, 412], {w: r.text for w, r in answers.items()}
    (winner,) = [w for w, r in answers.items() if r.status_code == 200]
    (loser,) = [w for w, r in answers.items() if r.status_code == 412]
    assert answers[loser].json()["issue"][0]["details"]["coding"][0]["code"] == "HT-FHIR-VERSION"
    stored = ok(call(core, "GET", f"/fhir/Task/{task['id']}"))
    assert stored == answers[winner].json()
    assert stored["status"] == bodies[winner]["status"] and version(stored) == v + 1
    # nothing overwritten: the history has exactly one version after the shared one
    hist = ok(call(core, "GET", f"/fhir/Task/{task['id']}/_history"))
    assert [e["resource"]["meta"]["versionId"] for e in hist["entry"]][:2] == [str(v + 1), str(v)]
    # the loser reads again and sees the winner's change instead of silently replacing it
    if winner == "his":
        assert stored["output"] == bodies["his"]["output"]
    else:
        assert stored["statusReason"] == {"text": "床位已满"}


# -------------------------------------------------------------------------------------------
# unmodified clients


def test_fhirpy_refresh_and_update_with_versions(core: NodeProcess, chc: NodeProcess) -> None:
    task = received_task(chc, core)
    auth = f"Bearer {core.token('clinician')}"
    client = SyncFHIRClient(core.local_url + "/fhir", authorization=auth)
    mine = client.reference("Task", task["id"]).to_resource()
    mine.refresh()  # If-None-Match: the current version -> 304, the object is kept
    assert mine["meta"]["versionId"] == task["meta"]["versionId"]
    assert mine["status"] == "received"
    # someone else accepts it
    other = dict(
        task, status="accepted", output=[{"type": {"text": "bed"}, "valueString": "心内科 2床"}]
    )
    ok(call(core, "PUT", f"/fhir/Task/{task['id']}", body=other))
    mine.refresh()  # now a new version: 200 and the object follows
    assert mine["status"] == "accepted" and mine["meta"]["versionId"] == str(version(task) + 1)
    mine["status"] = "in-progress"
    mine.update()  # PUT; the answer (the new version) replaces the object
    assert mine["status"] == "in-progress"
    assert mine["meta"]["versionId"] == str(version(task) + 2)

    async def run() -> None:
        aclient = AsyncFHIRClient(core.local_url + "/fhir", authorization=auth)
        atask = await aclient.reference("Task", task["id"]).to_resource()
        await atask.refresh()
        assert atask["meta"]["versionId"] == str(version(task) + 2)
        assert atask["status"] == "in-progress"
        atask["note"] = [{"text": "async"}]
        from fhirpy.base.exceptions import OperationOutcome

        with pytest.raises(OperationOutcome) as exc:
            await atask.update()  # a change the workflow does not apply: refused, not dropped
        assert "Task.note" in str(exc.value)

    asyncio.run(run())


def test_fhirclient_parses_versions_and_history(core: NodeProcess) -> None:
    fc = smart_client.FHIRClient(
        settings={"app_id": "hutong-tests", "api_base": core.local_url + "/fhir"}
    )
    fc.server.session.headers["Authorization"] = f"Bearer {core.token('clinician')}"
    try:
        old = FcTask.read_from("Task/task-0/_history/1", fc.server)
        assert old.id == "task-0" and old.meta.versionId == "1" and old.status == "requested"
        hist = FcBundle(fc.server.request_json("Task/task-0/_history"))
        assert hist.type == "history" and [e.resource.meta.versionId for e in hist.entry] == ["1"]
        assert isinstance(hist.entry[0].resource, FcTask)
        th = FcBundle(fc.server.request_json("Patient/_history?_count=5"))
        assert {e.resource.id for e in th.entry} >= {"pat-wang", "pat-zhang"}
    finally:
        fc.server.session.close()


def test_since_limits_the_history(core: NodeProcess) -> None:
    later = (datetime.now(UTC) + timedelta(days=1)).isoformat().replace("+00:00", "Z")
    empty = ok(call(core, "GET", "/fhir/Patient/_history", params={"_since": later}))
    assert empty["type"] == "history" and "entry" not in empty
    everything = ok(
        call(
            core,
            "GET",
            "/fhir/Patient/_history",
            params={"_since": "2026-01-01T00:00:00Z", "_count": "100"},
        )
    )
    assert {e["resource"]["id"] for e in everything["entry"]} >= {"pat-wang", "pat-zhang"}
    refused(
        call(core, "GET", "/fhir/Patient/_history", params={"_since": "soon"}),
        400,
        "HT-FHIR-REQUEST",
    )
    refused(
        call(core, "GET", "/fhir/Patient/_history", params={"name": "王"}), 400, "HT-FHIR-REQUEST"
    )


def test_capability_statement_says_what_versions_and_writes_do(core: NodeProcess) -> None:
    cs = ok(call(core, "GET", "/fhir/metadata"))
    validate_resource(cs)
    (rest,) = cs["rest"]
    by_type = {r["type"]: r for r in rest["resource"]}
    for rtype in ("Patient", "Task", "Coverage"):
        r = by_type[rtype]
        assert r["versioning"] == "versioned" and r["readHistory"] is True
        assert r["conditionalRead"] == "full-support"
        codes = [i["code"] for i in r["interaction"]]
        assert {"vread", "history-instance", "history-type"} <= set(codes)
    assert by_type["Patient"]["conditionalCreate"] is True
    assert by_type["Task"]["conditionalCreate"] is False  # Tasks are the workflow's
    assert by_type["AuditEvent"]["readHistory"] is False
    assert [i["code"] for i in rest["interaction"]] == ["transaction", "batch"]
