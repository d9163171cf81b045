"""Plain regression tests for what tests/test_api_schemathesis.py and the planted-value
security test found in the local API, against one real node process.

- Refusals name the path and the rule, never the caller's value (it may be patient data):
  the queue refusal, its quarantine reason, a /fhir 422 OperationOutcome, and a request that
  does not bind (FastAPI's own 422 echoed the whole input back).
- The OpenAPI document says what the routes really answer: FHIR JSON and OperationOutcomes
  under /fhir, error bodies in the local shape elsewhere.

(No 5xx was found by schemathesis at the seed it runs with; each declaration fix is checked
here against the live answer it documents.)
"""

from __future__ import annotations

import csv
import io
import json
import re
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bridge.privacy import patient_hash
from tests.factory import NATIONAL_ID, bundle
from tests.harness import Alliance, ApiError, NodeProcess
from tests.referrals import referral
from tests.test_api_schemathesis import MEMBERS, RULES  # the same two-member alliance

pytestmark = pytest.mark.slow

PLANTED_NAME = "司马青云"
PLANTED_ID = "110105198811230041"
OBS_STATUS = (
    "['registered', 'preliminary', 'final', 'amended', 'corrected', 'cancelled', "
    "'entered-in-error', 'unknown']"
)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    alliance = Alliance(Path(tmp_path_factory.mktemp("regressions")) / "alliance", MEMBERS, RULES)
    try:
        alliance.start("core")
        yield alliance.node("core")
    finally:
        alliance.stop_all()


def post(
    node: NodeProcess,
    path: str,
    content: bytes,
    role: str = "clinician",
    ctype: str = "application/json",
) -> httpx.Response:
    with httpx.Client(timeout=30) as client:
        return client.post(
            node.local_url + path,
            content=content,
            headers={"Authorization": f"Bearer {node.token(role)}", "Content-Type": ctype},
        )


def planted_bundle() -> dict[str, Any]:
    bad = bundle(1, national_id=PLANTED_ID)
    bad["entry"][0]["resource"]["name"] = [{"text": PLANTED_NAME}]
    bad["entry"][1]["resource"]["status"] = f"{PLANTED_NAME}-{PLANTED_ID}"
    bad["entry"][1]["resource"]["valueQuantity"]["value"] = PLANTED_ID
    return bad


def test_queue_refusal_and_quarantine_reason_name_path_and_rule_only(node: NodeProcess) -> None:
    [refused] = node.api(
        "POST",
        "/local/v1/packets",
        [{"to": "chc", "kind": "result.lab", "thread": "regress-1", "bundle": planted_bundle()}],
        role="clinician",
    )["results"]
    expected = (
        "invalid FHIR: "
        f"entry[1].resource(Observation).status: not one of the allowed codes {OBS_STATUS}; "
        "entry[1].resource(Observation).valueQuantity.value: expected number, got string"
    )
    assert refused == {"code": "HT-PKT-INVALID-FHIR", "message": expected, "retry": "permanent"}
    [held] = [
        q for q in node.api("GET", "/local/v1/quarantine") if q["code"] == "HT-PKT-INVALID-FHIR"
    ]
    assert (
        held["source"],
        held["code"],
        held["message"],
        held["recipient"],
        held["kind"],
        held["state"],
    ) == ("local", "HT-PKT-INVALID-FHIR", expected, "chc", "result.lab", "held")
    assert PLANTED_NAME not in json.dumps(held, ensure_ascii=False)
    assert PLANTED_ID not in json.dumps(held, ensure_ascii=False)


def test_fhir_transaction_refusal_names_path_and_rule_only(node: NodeProcess) -> None:
    bad = referral("up-exam", "chc", national_id=PLANTED_ID, name=PLANTED_NAME)
    bad["entry"][0]["resource"]["gender"] = PLANTED_NAME
    bad["entry"][1]["resource"]["authoredOn"] = PLANTED_ID
    r = post(node, "/fhir", json.dumps(bad).encode())
    assert r.status_code == 422
    assert r.headers["content-type"] == "application/fhir+json; charset=utf-8"
    [issue] = r.json()["issue"]
    assert issue == {
        "severity": "error",
        "code": "invalid",
        "details": {
            "coding": [{"system": "http://hutong.dev/CodeSystem/error", "code": "HT-FHIR-INVALID"}],
            "text": "HT-FHIR-INVALID",
        },
        "diagnostics": "invalid FHIR: entry[0].resource(Patient).gender: not one of the allowed "
        "codes ['male', 'female', 'other', 'unknown']; "
        "entry[1].resource(ServiceRequest).authoredOn: not a valid FHIR dateTime",
        "expression": [
            "entry[0].resource(Patient).gender",
            "entry[1].resource(ServiceRequest).authoredOn",
        ],
    }
    assert PLANTED_NAME not in r.text and PLANTED_ID not in r.text


def test_local_request_that_does_not_bind_is_not_echoed(node: NodeProcess) -> None:
    """FastAPI's default 422 quoted the input: here a whole Bundle with a name and ID."""
    body = [
        {"kind": "result.lab", "bundle": planted_bundle()},
        {"to": 5, "kind": "result.lab", "bundle": "x"},
    ]
    r = post(node, "/local/v1/packets", json.dumps(body).encode())
    assert r.status_code == 422
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {
        "code": "HT-REQUEST-INVALID",
        "retry": "permanent",
        "message": "request does not match this endpoint: body[0].to: missing; "
        "body[1].to: string_type; body[1].bundle: dict_type",
    }
    assert PLANTED_NAME not in r.text and PLANTED_ID not in r.text
    with pytest.raises(ApiError) as caught:
        node.api("GET", "/local/v1/outbox?limit=lots", role="it")
    assert caught.value.status == 422
    assert caught.value.json == {
        "code": "HT-REQUEST-INVALID",
        "retry": "permanent",
        "message": "request does not match this endpoint: query.limit: int_parsing",
    }


def test_numbers_out_of_range_are_refused_not_a_server_error(node: NodeProcess) -> None:
    """Found by schemathesis: an integer beyond 64 bits in a bundle (orjson cannot write it) and
    a quarantine id beyond SQLite's INTEGER were answered 500."""
    body = b'[{"to": "chc", "kind": "result.lab", "bundle": {"resourceType": "Bundle", "n": '
    body += str(2**70).encode() + b"}}]"
    r = post(node, "/local/v1/packets", body)
    assert r.status_code == 422
    assert r.json() == {
        "code": "HT-REQUEST-INVALID",
        "retry": "permanent",
        "message": "body[].bundle: an integer out of the 64-bit range",
    }
    for item in (-(2**90), 2**63, 0):
        with pytest.raises(ApiError) as caught:
            node.api("POST", f"/local/v1/quarantine/{item}/replay", role="it")
        assert caught.value.status == 404
        assert caught.value.json["code"] == "HT-NOT-FOUND"


def test_unparsable_body_answer_is_the_documented_one(node: NodeProcess) -> None:
    r = post(node, "/local/v1/referrals", b"x\x0c\xff\xfepF")
    assert r.status_code == 400
    assert r.json() == {"detail": "There was an error parsing the body"}
    doc = openapi(node)
    declared = doc["paths"]["/local/v1/referrals"]["post"]["responses"]["400"]
    assert declared["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/BodyUnreadable"
    }
    assert doc["components"]["schemas"]["BodyUnreadable"]["required"] == ["detail"]


def openapi(node: NodeProcess) -> dict[str, Any]:
    with urllib.request.urlopen(node.local_url + "/openapi.json", timeout=30) as r:
        return json.loads(r.read())


def test_openapi_declares_fhir_json_and_outcomes(node: NodeProcess) -> None:
    paths = openapi(node)["paths"]
    metadata = paths["/fhir/metadata"]["get"]["responses"]
    assert list(metadata) == ["200", "400", "401", "406", "422"]
    assert metadata["200"]["content"] == {
        "application/fhir+json": {
            "schema": {
                "type": "object",
                "required": ["resourceType"],
                "properties": {"resourceType": {"const": "CapabilityStatement"}},
            }
        }
    }
    search = paths["/fhir/{rtype}"]["get"]["responses"]
    assert sorted(search) == ["200", "400", "401", "403", "404", "406", "422"]
    for status in ("400", "401", "403", "404", "406", "422"):
        [(media, body)] = search[status]["content"].items()
        assert media == "application/fhir+json"
        assert body["schema"]["properties"]["resourceType"] == {"const": "OperationOutcome"}
    transaction = paths["/fhir"]["post"]
    assert sorted(transaction["responses"]) == [
        "200",
        "400",
        "401",
        "403",
        "404",
        "406",
        "412",
        "415",
        "422",
        "501",
    ]
    assert transaction["requestBody"]["content"]["application/fhir+json"]["schema"]["properties"][
        "resourceType"
    ] == {"const": "Bundle"}
    packets = paths["/local/v1/packets"]["post"]["responses"]
    assert sorted(packets) == ["200", "400", "401", "403", "422"]
    assert packets["401"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorOut"
    }
    assert packets["422"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorOut"
    }
    # the answers those declarations describe
    r = post(node, "/local/v1/packets", b"[]", role="auditor")
    assert (r.status_code, r.json()) == (
        403,
        {
            "code": "HT-FORBIDDEN",
            "message": "role 'auditor' may not use this endpoint",
            "retry": "permanent",
        },
    )
    with httpx.Client(timeout=30) as client:
        r = client.get(node.local_url + "/fhir/Patient")
    assert r.status_code == 401
    assert r.headers["content-type"] == "application/fhir+json; charset=utf-8"
    assert r.json()["issue"][0]["details"]["coding"][0]["code"] == "HT-AUTH"


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (
            f"Observation?patient=Patient/{PLANTED_NAME}",
            "patient: not a valid FHIR id (1-64 of A-Z a-z 0-9 - .)",
        ),
        (f"Observation?subject=a/b/{PLANTED_ID}", "subject: not Type/id or an id"),
        (
            f"Task?_lastUpdated=ge{PLANTED_ID}",
            "_lastUpdated: not a FHIR date or dateTime (a time needs a zone: Z or +08:00)",
        ),
        ("Task?_lastUpdated=ge1988-11-32", "_lastUpdated: not a real date or time"),
        (f"Task?_count=-{PLANTED_ID}", "_count must be a whole number 0..200"),
    ],
)
def test_search_refusal_names_the_parameter_not_the_value(
    node: NodeProcess, query: str, expected: str
) -> None:
    with httpx.Client(timeout=30) as client:
        r = client.get(
            f"{node.local_url}/fhir/{query}",
            headers={"Authorization": f"Bearer {node.token('clinician')}"},
        )
    assert r.status_code == 400
    [issue] = r.json()["issue"]
    assert (issue["severity"], issue["code"], issue["diagnostics"]) == (
        "error",
        "invalid",
        expected,
    )
    assert PLANTED_ID not in r.text and PLANTED_NAME not in r.text


def _get(node: NodeProcess, path: str, role: str = "it") -> httpx.Response:
    with httpx.Client(timeout=30) as client:
        return client.get(
            node.local_url + path, headers={"Authorization": f"Bearer {node.token(role)}"}
        )


def _all_pages(node: NodeProcess, path: str, key: str) -> tuple[list[Any], set[int]]:
    """Follow the Link headers from ``path``: every item's ``key`` and each page's total."""
    seen: list[Any] = []
    totals: set[int] = set()
    url: str | None = path
    while url is not None:
        r = _get(node, url)
        assert r.status_code == 200, r.text
        totals.add(int(r.headers["X-Total-Count"]))
        page = r.json()
        seen += [item[key] for item in page]
        link = r.headers.get("Link")
        if link is None:
            assert "X-Next-Cursor" not in r.headers
            break
        assert link.endswith('>; rel="next"') and r.headers["X-Next-Cursor"] in link
        url = link[1 : link.index(">")]
        assert len(page) == 2  # a full page before every next link
    return seen, totals


def test_every_local_list_counts_its_items_and_pages_through_all_of_them(node: NodeProcess) -> None:
    # 5 packets wait for chc (not running), 4 refusals are held, 3 referrals go out
    node.send("chc", "result.lab", [bundle(1) for _ in range(5)], thread="paging-1")
    node.api(
        "POST",
        "/local/v1/packets",
        [
            {"to": "nowhere", "kind": "result.lab", "thread": None, "bundle": bundle(1)}
            for _ in range(4)
        ],
        role="clinician",
    )
    for _ in range(3):
        node.api("POST", "/local/v1/referrals", referral("up-exam", "chc"), role="clinician")
    for path, key, order in (
        ("/local/v1/outbox?limit=2", "id", "asc"),
        ("/local/v1/quarantine?limit=2", "id", "desc"),
        ("/local/v1/referrals?limit=2", "thread", None),
    ):
        whole = node.api("GET", path.replace("limit=2", "limit=1000"))
        seen, totals = _all_pages(node, path, key)
        assert totals == {len(whole)}, path  # every page says how many there are in all
        assert seen == [w[key] for w in whole], path  # each once, in the one order
        if order:
            assert seen == sorted(seen, reverse=order == "desc"), path
    assert len(node.api("GET", "/local/v1/outbox?limit=1000")) >= 5 + 3
    assert len(node.api("GET", "/local/v1/quarantine?limit=1000")) >= 4
    assert len(node.api("GET", "/local/v1/referrals?limit=1000")) >= 3
    # a cursor this API did not give, a page size out of range: 422, the parameter named
    for bad in (
        "/local/v1/outbox?after=bm90LWEtY3Vyc29y",
        "/local/v1/quarantine?limit=0",
        "/local/v1/referrals?limit=1001",
    ):
        r = _get(node, bad)
        assert r.status_code == 422, (bad, r.text)
        assert r.json()["code"] == "HT-REQUEST-INVALID", r.text
        assert r.json()["message"].split(":")[0] in ("after", "limit"), r.text


COUNT_LINE = re.compile(r"([\d,]+) (.+) in all, (\d+) shown(?:; next page: --after (\S+))?")


def _cli_pages(node: NodeProcess, *args: str, limit: int = 2) -> tuple[list[Any], set[str]]:
    """Run a CLI list with ``--json`` page by page from the first to the last ``--after``:
    every row's id, and the count lines' "<total> <what>" (one per list)."""
    seen: list[Any] = []
    counted: set[str] = set()
    after: list[str] = []
    while True:
        r = node.cli(*args, "--json", "--limit", str(limit), *after)
        assert r.returncode == 0, r.stderr
        page = json.loads(r.stdout)
        m = COUNT_LINE.fullmatch(r.stderr.strip())
        assert m is not None, r.stderr  # the rows on stdout, how many in all on stderr
        assert int(m[3]) == len(page)
        counted.add(f"{m[1]} {m[2]}")
        seen += [row["id"] for row in page]
        if m[4] is None:
            return seen, counted
        assert len(page) == limit  # a full page before every next page
        after = ["--after", m[4]]


def test_cli_lists_count_their_items_and_page_through_all_of_them(node: NodeProcess) -> None:
    """``hutong quarantine list``, ``outbox list`` and ``audit who`` say how many there are in
    all and page (keyset, as /local/v1) to the last item; none stops silently at 100."""
    node.api(
        "POST",
        "/local/v1/packets",
        [
            {"to": "nowhere", "kind": "result.lab", "thread": None, "bundle": bundle(1)}
            for _ in range(3)
        ],
        role="clinician",
    )  # 3 refusals held
    node.send("chc", "result.lab", [bundle(1) for _ in range(3)], thread="cli-paging")
    for args in (("quarantine", "list", "--state", "all"), ("outbox", "list")):
        whole = json.loads(node.cli(*args, "--json", "--limit", "1000", check=True).stdout)
        seen, counted = _cli_pages(node, *args)
        what = "items" if args[0] == "quarantine" else "packets"
        assert counted == {f"{len(whole)} {what}"}, args
        assert seen == [w["id"] for w in whole], args  # each once, in the one order
        assert seen == sorted(seen, reverse=args[0] == "quarantine"), args
    held = json.loads(node.cli("quarantine", "list", "--json", check=True).stdout)
    assert len(held) >= 3 and {h["state"] for h in held} == {"held"}
    # the table form says it too, on the same stream as the table
    r = node.cli("quarantine", "list", "--limit", "1", check=True)
    m = COUNT_LINE.search(r.stdout)
    assert m is not None and m[2] == "held items" and int(m[1]) == len(held) and m[3] == "1"
    assert m[4] is not None and r.stdout.rstrip().endswith(m[4])
    # a token the list did not give, a page size out of range: one line, exit 2
    for bad in (
        ("quarantine", "list", "--after", "bm90LWEtY3Vyc29y"),
        ("outbox", "list", "--limit", "0"),
        ("audit", "who", "--after", "x"),
    ):
        r = node.cli(*bad)
        assert r.returncode == 2 and r.stderr.startswith("error: "), (bad, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr

    # audit who: reads of patient data, newest first, page by page to the oldest
    node.api("POST", "/local/v1/referrals", referral("up-exam", "chc"), role="clinician")
    newest = node.api("GET", "/local/v1/referrals?limit=1")[0]
    for _ in range(4):
        node.api("GET", f"/fhir/Task/{newest['task_id']}", role="clinician")
    export = node.cli("audit", "who", "--format", "csv", check=True).stdout
    want = [int(row["seq"]) for row in csv.DictReader(io.StringIO(export))]
    assert len(want) >= 4
    seqs: list[int] = []
    after: list[str] = []
    while True:
        r = node.cli("audit", "who", "--limit", "3", *after, check=True)
        m = COUNT_LINE.search(r.stdout)
        assert m is not None and m[2] == "reads" and int(m[1].replace(",", "")) == len(want)
        page = [int(s) for s in re.findall(r"^\S\s*(\d+)\s*\S", r.stdout, re.M)]
        assert len(page) == int(m[3])
        seqs += page
        if m[4] is None:
            break
        after = ["--after", m[4]]
    assert seqs == sorted(want, reverse=True)


def test_results_view_counts_the_patients_reports_and_pages_through_all_of_them(
    node: NodeProcess,
) -> None:
    """``/local/v1/patients/{hash}/results`` (结果互认) no longer stops silently at 200: it
    says how many reports the patient has and pages, as the lists above, to the last one;
    each page is audited as a look at the patient."""
    national_id = "110105197304150027"
    pid = f"urn:uuid:{uuid.uuid4()}"
    entries: list[dict[str, Any]] = [
        {
            "fullUrl": pid,
            "request": {"method": "POST", "url": "Patient"},
            "resource": {
                "resourceType": "Patient",
                "identifier": [{"system": NATIONAL_ID, "value": national_id}],
                "gender": "male",
            },
        }
    ]
    for i in range(5):
        entries.append(
            {
                "fullUrl": f"urn:uuid:{uuid.uuid4()}",
                "request": {"method": "POST", "url": "DiagnosticReport"},
                "resource": {
                    "resourceType": "DiagnosticReport",
                    "status": "final",
                    "code": {"text": f"血常规 {i}"},
                    "subject": {"reference": pid},
                },
            }
        )
    with httpx.Client(timeout=30) as client:
        r = client.post(
            node.local_url + "/fhir",
            json={"resourceType": "Bundle", "type": "transaction", "entry": entries},
            headers={"Authorization": f"Bearer {node.token('clinician')}"},
        )
    assert r.status_code == 200, r.text
    made = [e["response"]["location"].split("/_history")[0] for e in r.json()["entry"][1:]]
    phash = patient_hash(node.plan.patient_hash_key, national_id)
    path = f"/local/v1/patients/{phash}/results"

    def audited() -> int:  # AuditEvents of reads of this view of this patient
        found = node.api(
            "GET", f"/fhir/AuditEvent?patient-hash={phash}&_count=200", role="auditor"
        ).get("entry", [])
        return sum(path in json.dumps(e) for e in found)

    assert audited() == 0
    seen: list[str] = []
    url: str | None = f"{path}?limit=2"
    pages = 0
    while url is not None:
        r = _get(node, url, role="clinician")
        assert r.status_code == 200, r.text
        pages += 1
        assert r.headers["X-Total-Count"] == "5"
        body = r.json()
        assert (body["patient_hash"], body["node"]) == (phash, "core")
        seen += [item["report"] for item in body["results"]]
        link = r.headers.get("Link")
        if link is None:
            assert "X-Next-Cursor" not in r.headers and len(body["results"]) == 1
            break
        assert link.endswith('>; rel="next"') and r.headers["X-Next-Cursor"] in link
        assert len(body["results"]) == 2
        url = link[1 : link.index(">")]
    # one transaction, one lastUpdated: the reports in id order, each once, the last reached
    assert pages == 3 and seen == sorted(made) and len(set(seen)) == 5
    whole = _get(node, path, role="clinician")
    assert whole.headers["X-Total-Count"] == "5" and "Link" not in whole.headers
    assert [i["report"] for i in whole.json()["results"]] == seen
    assert {i["name"] for i in whole.json()["results"]} == {f"血常规 {i}" for i in range(5)}
    assert audited() == 4  # the three pages and the whole list, each a look at the patient
    # a cursor the view did not give, a page size out of range: 422 naming the parameter
    for bad in (f"{path}?after=bm90LWEtY3Vyc29y", f"{path}?limit=0", f"{path}?limit=1001"):
        r = _get(node, bad, role="clinician")
        assert r.status_code == 422 and r.json()["code"] == "HT-REQUEST-INVALID", (bad, r.text)
        assert r.json()["message"].split(":")[0] in ("after", "limit"), r.text
