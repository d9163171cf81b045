"""Honest transaction and batch answers on POST /fhir, against real node processes (issue 19,
findings 3, 4 and 8): real statuses, versioned locations that resolve, etag/lastModified,
conditional create (ifNoneExist), ifMatch, transactions of any stored types, batches.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from fhir.resources.R4B.bundle import Bundle

from bridge.fhir.validate import validate_resource
from tests.harness import Alliance, NodeProcess, wait_for
from tests.referrals import referral
from tests.test_fhir_api import MEMBERS, MRN, NATIONAL_ID, RULES, close_http, referrals, seed_store
from tests.test_fhir_versions import call, ok, refused

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory):
    a = Alliance(tmp_path_factory.mktemp("fhirtx") / "alliance", MEMBERS, RULES)
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


def u() -> str:
    return f"urn:uuid:{uuid.uuid4()}"


def coverage(beneficiary: str, status: str = "active", **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Coverage",
        "status": status,
        "beneficiary": {"reference": beneficiary},
        "payor": [{"reference": "Organization/core"}],
        **extra,
    }


def tx(*entries: dict[str, Any], kind: str = "transaction") -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "entry": list(entries)}


def post(resource: dict[str, Any], full_url: str | None = None, **request: Any) -> dict[str, Any]:
    e: dict[str, Any] = {
        "resource": resource,
        "request": {"method": "POST", "url": resource["resourceType"], **request},
    }
    if full_url:
        e["fullUrl"] = full_url
    return e


def put(resource: dict[str, Any], **request: Any) -> dict[str, Any]:
    return {
        "resource": resource,
        "request": {
            "method": "PUT",
            "url": f"{resource['resourceType']}/{resource['id']}",
            **request,
        },
    }


def receipts_resolve(node: NodeProcess, answer: dict[str, Any], kind: str) -> list[dict]:
    """Every response.location resolves with GET to that version: same etag, versionId and
    lastModified. Returns the resources read."""
    validate_resource(answer)
    Bundle.model_validate(answer)
    assert answer["type"] == f"{kind}-response"
    got = []
    for e in answer["entry"]:
        resp = e["response"]
        rtype, rid, hist, vid = resp["location"].split("/")
        assert hist == "_history" and vid.isdigit()
        assert (
            resp["status"] == ("201 Created" if vid == "1" else "200 OK")
            or resp["status"] == "200 OK"
        )
        r = call(node, "GET", f"/fhir/{resp['location']}")
        res = ok(r)
        assert r.headers["etag"] == resp["etag"] == f'W/"{vid}"'
        assert (
            res["meta"]["versionId"] == vid and res["meta"]["lastUpdated"] == resp["lastModified"]
        )
        assert (res["resourceType"], res["id"]) == (rtype, rid)
        got.append(res)
    return got


def test_referral_transaction_answers_are_receipts(core: NodeProcess, chc: NodeProcess) -> None:
    before = set(referrals(chc))
    sent = referral("up-outpatient", "core", national_id="110101198001010011")
    answer = ok(call(chc, "POST", "/fhir", body=sent))
    got = receipts_resolve(chc, answer, "transaction")
    # one answer per entry, in the request's order
    assert [g["resourceType"] for g in got] == [
        e["resource"]["resourceType"] for e in sent["entry"]
    ]
    assert all(e["response"]["status"] == "201 Created" for e in answer["entry"])
    (thread,) = set(referrals(chc)) - before
    wait_for(
        lambda: referrals(core).get(thread, {}).get("status") == "received",
        what="core to receive the referral",
    )


def test_put_of_a_client_id_twice_is_200_version_2(core: NodeProcess) -> None:
    pid = f"p-{uuid.uuid4().hex[:8]}"
    patient = {
        "resourceType": "Patient",
        "id": pid,
        "gender": "male",
        "identifier": [{"system": MRN, "value": pid}],
    }
    first = ok(call(core, "POST", "/fhir", body=tx(put(patient))))
    assert first["entry"][0]["response"]["status"] == "201 Created"
    assert first["entry"][0]["response"]["location"] == f"Patient/{pid}/_history/1"
    second = ok(call(core, "POST", "/fhir", body=tx(put({**patient, "gender": "female"}))))
    assert second["entry"][0]["response"]["status"] == "200 OK"
    assert second["entry"][0]["response"]["location"] == f"Patient/{pid}/_history/2"
    (now,) = receipts_resolve(core, second, "transaction")
    assert now["gender"] == "female"
    assert ok(call(core, "GET", f"/fhir/Patient/{pid}/_history/1"))["gender"] == "male"


def test_if_none_exist_does_not_duplicate(core: NodeProcess, chc: NodeProcess) -> None:
    p = u()
    dup = {
        "resourceType": "Patient",
        "identifier": [{"system": MRN, "value": "FX0001"}],
        "name": [{"text": "王秀英"}],
    }
    answer = ok(
        call(
            core,
            "POST",
            "/fhir",
            body=tx(post(dup, p, ifNoneExist=f"identifier={MRN}|FX0001"), post(coverage(p), u())),
        )
    )
    patient_resp, cov_resp = (e["response"] for e in answer["entry"])
    assert patient_resp["status"] == "200 OK"
    assert patient_resp["location"] == "Patient/pat-wang/_history/1"
    assert cov_resp["status"] == "201 Created"
    got = receipts_resolve(core, answer, "transaction")
    assert got[1]["beneficiary"] == {"reference": "Patient/pat-wang"}  # the existing one
    same = ok(call(core, "GET", "/fhir/Patient", params={"identifier": f"{MRN}|FX0001"}))
    assert [e["resource"]["id"] for e in same["entry"]] == ["pat-wang"]
    # no match: created
    fresh = ok(
        call(
            core,
            "POST",
            "/fhir",
            body=tx(
                post(
                    {**dup, "identifier": [{"system": MRN, "value": "FX9001"}]},
                    u(),
                    ifNoneExist=f"Patient?identifier={MRN}|FX9001",
                )
            ),
        )
    )
    assert fresh["entry"][0]["response"]["status"] == "201 Created"
    again = ok(
        call(
            core,
            "POST",
            "/fhir",
            body=tx(
                post(
                    {**dup, "identifier": [{"system": MRN, "value": "FX9001"}]},
                    u(),
                    ifNoneExist=f"identifier={MRN}|FX9001",
                )
            ),
        )
    )
    assert again["entry"][0]["response"] == {**fresh["entry"][0]["response"], "status": "200 OK"}
    refused(
        call(core, "POST", "/fhir", body=tx(post(dup, u(), ifNoneExist="name=王"))),
        422,
        "HT-FHIR-INVALID",
    )

    # in a referral transaction too: the second referral of one patient adds no Patient
    def patients_on_chc() -> list[str]:
        b = ok(
            call(
                chc,
                "GET",
                "/fhir/Patient",
                params={"identifier": f"{NATIONAL_ID}|110101199202020022"},
            )
        )
        return [e["resource"]["id"] for e in b.get("entry", [])]

    for n in range(2):
        r = referral("up-exam", "core", national_id="110101199202020022")
        r["entry"][0]["request"] = {
            "method": "POST",
            "url": "Patient",
            "ifNoneExist": f"identifier={NATIONAL_ID}|110101199202020022",
        }
        answer = ok(call(chc, "POST", "/fhir", body=r))
        receipts_resolve(chc, answer, "transaction")
        assert answer["entry"][0]["response"]["status"] == ("201 Created" if n == 0 else "200 OK")
    assert len(patients_on_chc()) == 1


def test_if_match_in_a_transaction(core: NodeProcess) -> None:
    pid = f"p-{uuid.uuid4().hex[:8]}"
    patient = {"resourceType": "Patient", "id": pid, "gender": "male"}
    ok(call(core, "POST", "/fhir", body=tx(put(patient))))
    ok(call(core, "POST", "/fhir", body=tx(put({**patient, "gender": "female"}))))
    cov = u()
    issue = refused(
        call(
            core,
            "POST",
            "/fhir",
            body=tx(
                post(coverage(f"Patient/{pid}"), cov),
                put({**patient, "gender": "other"}, ifMatch='W/"1"'),
            ),
        ),
        412,
        "HT-FHIR-VERSION",
    )
    assert issue["code"] == "conflict" and "entry[1]" in issue["diagnostics"]
    assert ok(call(core, "GET", f"/fhir/Patient/{pid}"))["gender"] == "female"
    none = ok(call(core, "GET", "/fhir/Coverage", params={"patient": pid}))
    assert "entry" not in none  # all or nothing: the Coverage was not stored either
    answer = ok(
        call(
            core,
            "POST",
            "/fhir",
            body=tx(
                post(coverage(f"Patient/{pid}"), cov),
                put({**patient, "gender": "other"}, ifMatch='W/"2"'),
            ),
        )
    )
    got = receipts_resolve(core, answer, "transaction")
    assert got[1]["gender"] == "other" and got[1]["meta"]["versionId"] == "3"


def test_transactions_of_any_stored_types_are_all_or_nothing(core: NodeProcess) -> None:
    p = u()
    good = tx(
        post(
            {
                "resourceType": "Patient",
                "gender": "female",
                "identifier": [{"system": MRN, "value": "FX7001"}],
            },
            p,
        ),
        post(coverage(p), u()),
    )
    # a required binding the schema leaves open: refused naming the element, nothing stored
    bad = tx(good["entry"][0], post(coverage(p, status="bogus"), u()))
    issue = refused(call(core, "POST", "/fhir", body=bad), 422, "HT-FHIR-INVALID")
    assert issue["expression"] == ["entry[1].resource(Coverage).status"]
    assert "bogus" not in issue["diagnostics"]
    # a reference to nothing: refused, nothing stored
    dangling = tx(good["entry"][0], post(coverage("Patient/nobody"), u()))
    refused(call(core, "POST", "/fhir", body=dangling), 422, "HT-REF-UNKNOWN")
    # a Task is the workflow's
    task = {"resourceType": "Task", "status": "requested", "intent": "order"}
    refused(call(core, "POST", "/fhir", body=tx(post(task, u()))), 422, "HT-FHIR-INVALID")
    found = ok(call(core, "GET", "/fhir/Patient", params={"identifier": f"{MRN}|FX7001"}))
    assert "entry" not in found
    answer = ok(call(core, "POST", "/fhir", body=good))
    patient, cov = receipts_resolve(core, answer, "transaction")
    assert cov["beneficiary"] == {"reference": f"Patient/{patient['id']}"}
    assert cov["status"] == "active"


def test_batch_each_entry_on_its_own(core: NodeProcess, chc: NodeProcess) -> None:
    before = set(referrals(chc))
    ok(
        call(
            chc,
            "POST",
            "/fhir",
            body=referral("up-outpatient", "core", national_id="110101197707070077"),
        )
    )
    (thread,) = set(referrals(chc)) - before
    row = wait_for(
        lambda: (
            referrals(core).get(thread, {}).get("status") == "received" and referrals(core)[thread]
        ),
        what="core to receive the referral",
    )
    task = ok(call(core, "GET", f"/fhir/Task/{row['task_id']}"))
    v = int(task["meta"]["versionId"])
    accept = {
        **task,
        "status": "accepted",
        "output": [{"type": {"text": "bed"}, "valueString": "心内科 1床"}],
    }
    answer = ok(
        call(
            core,
            "POST",
            "/fhir",
            body=tx(
                post(coverage("Patient/pat-zhang"), u()),
                post(coverage("Patient/pat-zhang", status="bogus"), u()),
                put(accept, ifMatch=f'W/"{v + 5}"'),
                put(accept, ifMatch=f'W/"{v}"'),
                put({**task, "note": [{"text": "x"}]}),
                kind="batch",
            ),
        )
    )
    validate_resource(answer)
    Bundle.model_validate(answer)
    assert answer["type"] == "batch-response"
    statuses = [e["response"]["status"] for e in answer["entry"]]
    assert statuses == ["201 Created", "422", "412", "200 OK", "422"]
    assert answer["entry"][1]["response"]["outcome"]["issue"][0]["expression"] == ["status"]
    assert (
        answer["entry"][2]["response"]["outcome"]["issue"][0]["details"]["coding"][0]["code"]
        == "HT-FHIR-VERSION"
    )
    # (entry 4 was written against the version before entry 3's move: every change it
    # would make is named, the note among them)
    assert "Task.note" in answer["entry"][4]["response"]["outcome"]["issue"][0]["expression"]
    cov = ok(call(core, "GET", f"/fhir/{answer['entry'][0]['response']['location']}"))
    assert cov["beneficiary"] == {"reference": "Patient/pat-zhang"}
    moved = ok(call(core, "GET", f"/fhir/{answer['entry'][3]['response']['location']}"))
    assert moved["status"] == "accepted" and moved["meta"]["versionId"] == str(v + 1)
    assert answer["entry"][3]["response"]["etag"] == f'W/"{v + 1}"'
    wait_for(
        lambda: referrals(chc)[thread]["status"] == "accepted",
        what="the referrer to see the acceptance made in a batch",
    )
    # reads in a batch: the current resource, an older version, refusals per entry
    reads = ok(
        call(
            core,
            "POST",
            "/fhir",
            body=tx(
                {"request": {"method": "GET", "url": f"Task/{task['id']}"}},
                {"request": {"method": "GET", "url": f"Task/{task['id']}/_history/{v}"}},
                {"request": {"method": "GET", "url": "Task/nope"}},
                {"request": {"method": "GET", "url": "Task?status=accepted"}},
                kind="batch",
            ),
        )
    )
    validate_resource(reads)
    now, old, missing, search = reads["entry"]
    assert now["resource"] == moved and now["response"]["etag"] == f'W/"{v + 1}"'
    assert now["response"]["lastModified"] == moved["meta"]["lastUpdated"]
    assert old["resource"] == task and old["response"]["etag"] == f'W/"{v}"'
    assert missing["response"]["status"] == "404" and search["response"]["status"] == "400"
    audit = ok(
        call(
            core,
            "GET",
            "/fhir/AuditEvent",
            role="auditor",
            params={"subtype": "read", "_count": "50"},
        )
    )
    queries = [x["extension"] for e in audit["entry"] for x in [e["resource"]]]
    assert any(f"batch GET Task/{task['id']}" in str(q) for q in queries)


def concurrent_conditional_creates(node: NodeProcess) -> None:
    """Two clients create "the patient with MRN x, if none exists" at once: one creates, the
    other is answered with that one (no duplicate)."""
    import threading

    import httpx

    mrn = f"FX-{uuid.uuid4().hex[:8]}"
    body = tx(
        post(
            {"resourceType": "Patient", "identifier": [{"system": MRN, "value": mrn}]},
            u(),
            ifNoneExist=f"identifier={MRN}|{mrn}",
        )
    )
    answers: list[httpx.Response] = []
    go = threading.Barrier(2)

    def create() -> None:
        with httpx.Client(timeout=30) as client:
            go.wait()
            answers.append(
                client.post(
                    node.local_url + "/fhir",
                    json=body,
                    headers={"Authorization": f"Bearer {node.token('clinician')}"},
                )
            )

    threads = [threading.Thread(target=create) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    responses = [ok(r)["entry"][0]["response"] for r in answers]
    assert sorted(r["status"] for r in responses) == ["200 OK", "201 Created"]
    assert responses[0]["location"] == responses[1]["location"]
    found = ok(call(node, "GET", "/fhir/Patient", params={"identifier": f"{MRN}|{mrn}"}))
    assert len(found["entry"]) == 1


def test_concurrent_conditional_creates_make_one(core: NodeProcess) -> None:
    concurrent_conditional_creates(core)


@pytest.mark.postgres
def test_concurrent_conditional_creates_on_postgresql(tmp_path, pg_node_dbs) -> None:
    a = Alliance(tmp_path / "alliance", MEMBERS, RULES, dsn_for=pg_node_dbs)
    try:
        a.start("core")
        for _ in range(3):
            concurrent_conditional_creates(a.node("core"))
    finally:
        a.stop_all()
