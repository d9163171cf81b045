"""The search API of issue #19 over HTTP, against a real node process whose store holds
``tests/search_seed.py``: the CapabilityStatement walked (every search parameter, include and
result parameter it lists answers, checked against the expected ids), ``POST [type]/_search``
giving the GET answer, ``_summary`` / ``_elements`` / ``_pretty`` on the wire, and the audit
keeping parameter names, never a searched name or ID number.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.capabilitystatement import CapabilityStatement

from bridge.api.fhir_results import SUBSETTED
from bridge.config.loader import load_node
from bridge.context import NodeContext
from bridge.fhir.validate import validate_resource
from bridge.privacy import patient_hash
from tests import search_seed as sd
from tests.harness import Alliance, NodeProcess
from tests.test_fhir_api import MEMBERS, RULES, call, close_http, extra_of, http, ok

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def core(tmp_path_factory: pytest.TempPathFactory):
    a = Alliance(tmp_path_factory.mktemp("fhirsearch") / "alliance", MEMBERS, RULES)
    ctx = NodeContext.open(load_node(a.files["core"]))
    try:
        key = ctx.plan.patient_hash_key
        hashes = {
            r["id"]: patient_hash(key, r["identifier"][0]["value"])
            for r in sd.RESOURCES
            if r["resourceType"] == "Patient"
        }
        with ctx.store.write() as conn:
            sd.seed(conn, hashes)
    finally:
        ctx.store.dispose()
    a.start("core")
    yield a.node("core")
    close_http()
    a.stop_all()


def get(node: NodeProcess, rtype: str, params: Any) -> dict[str, Any]:
    return ok(call(node, "GET", f"/fhir/{rtype}", params=params))


def ids(bundle: dict[str, Any], mode: str = "match") -> list[str]:
    return [e["resource"]["id"] for e in bundle.get("entry", []) if e["search"]["mode"] == mode]


def included_refs(bundle: dict[str, Any]) -> list[str]:
    return [
        f"{e['resource']['resourceType']}/{e['resource']['id']}"
        for e in bundle.get("entry", [])
        if e["search"]["mode"] == "include"
    ]


def test_the_capability_statement_is_valid_and_every_listed_parameter_answers(
    core: NodeProcess,
) -> None:
    cs = ok(call(core, "GET", "/fhir/metadata", role=None))
    validate_resource(cs)  # the R4 JSON schema
    CapabilityStatement.model_validate(cs)
    walked = 0
    for res in cs["rest"][0]["resource"]:
        rtype = res["type"]
        if rtype in ("AuditEvent", "ConceptMap"):
            continue
        every = sd.ids_of(rtype)
        for sp in res["searchParam"]:
            name = sp["name"]
            if name == "_id":
                want = every[-1:]
                b = get(core, rtype, {name: want[0]})
            elif name == "_lastUpdated":
                b = get(core, rtype, {name: "ge2026-11-01"})
                want = every
            elif name.startswith("_"):
                _result_parameter(core, rtype, name, every)
                walked += 1
                continue
            else:
                assert (rtype, name) in sd.EXAMPLES, f"{rtype}?{name} is listed but untested"
                value, want = sd.EXAMPLES[(rtype, name)]
                b = get(core, rtype, {name: value})
            assert ids(b) == want and b["total"] == len(want), (rtype, name)
            assert want, (rtype, name)  # a value that matches something
            walked += 1
        for kind in ("searchInclude", "searchRevInclude"):
            for spec in res.get(kind, []):
                param = "_include" if kind == "searchInclude" else "_revinclude"
                b = get(core, rtype, {param: spec, "_count": "50"})
                refs = included_refs(b)
                assert refs, (rtype, spec)
                matches = [e["resource"] for e in b["entry"] if e["search"]["mode"] == "match"]
                src = spec.partition(":")[0]
                for e in b["entry"]:
                    if e["search"]["mode"] != "include":
                        continue
                    r = e["resource"]
                    if kind == "searchInclude":  # a match refers to it
                        ref = f'"{r["resourceType"]}/{r["id"]}"'
                        assert any(ref in json.dumps(m) for m in matches), (spec, ref)
                    else:  # it refers to a match
                        assert r["resourceType"] == src, spec
                        assert any(f'"{rtype}/{m["id"]}"' in json.dumps(r) for m in matches)
                walked += 1
    assert walked > 150


def _result_parameter(core: NodeProcess, rtype: str, name: str, every: list[str]) -> None:
    if name == "_count":
        b = get(core, rtype, {"_count": "1"})
        assert ids(b) == every[:1] and b["total"] == len(every)
    elif name == "_cursor":
        first = get(core, rtype, {"_count": "1"})
        nxt = next((x["url"] for x in first["link"] if x["relation"] == "next"), None)
        if len(every) > 1:
            assert "_cursor=" in nxt
            assert ids(ok(call(core, "GET", nxt))) == every[1:2]
        else:
            assert nxt is None
    elif name == "_total":
        assert get(core, rtype, {"_total": "accurate"})["total"] == len(every)
        assert "total" not in get(core, rtype, {"_total": "none"})
    elif name == "_totalMethod":
        b = get(core, rtype, {"_totalMethod": "count", "_count": "0"})
        assert b["total"] == len(every) and "entry" not in b
        assert "total" not in get(core, rtype, {"_totalMethod": "none"})
    elif name == "_sort":
        assert ids(get(core, rtype, {"_sort": "_id"})) == sorted(every)
        assert ids(get(core, rtype, {"_sort": "_lastUpdated"})) == every[::-1]
    elif name == "_summary":
        b = get(core, rtype, {"_summary": "count"})
        assert b["total"] == len(every) and "entry" not in b
        b = get(core, rtype, {"_summary": "true"})
        assert ids(b) == every
        assert all(SUBSETTED in e["resource"]["meta"]["tag"] for e in b["entry"])
    elif name == "_elements":
        b = get(core, rtype, {"_elements": "identifier"})
        assert ids(b) == every
        for e in b["entry"]:
            r = next(x for x in sd.RESOURCES if x["id"] == e["resource"]["id"])
            assert e["resource"].get("identifier") == r.get("identifier")
            assert "text" not in e["resource"] and SUBSETTED in e["resource"]["meta"]["tag"]
    elif name == "_pretty":
        r = call(core, "GET", f"/fhir/{rtype}", params={"_pretty": "true"})
        assert r.status_code == 200 and "\n  " in r.text and ids(r.json()) == every
    elif name == "_format":
        assert ids(get(core, rtype, {"_format": "json"})) == every
    else:
        raise AssertionError(f"result parameter {name} is listed but untested")


def _post(
    node: NodeProcess, rtype: str, form: list[tuple[str, str]], query: str = ""
) -> httpx.Response:
    return http().post(
        f"{node.local_url}/fhir/{rtype}/_search{query}",
        content=urlencode(form).encode(),
        headers={
            "Authorization": f"Bearer {node.token('clinician')}",
            "Accept": "application/fhir+json",
            "Content-Type": "application/x-www-form-urlencoded",
        },
    )


@pytest.mark.parametrize(
    ("rtype", "params"),
    [
        ("Patient", [("name", "王"), ("_summary", "true")]),
        (
            "Observation",
            [
                ("patient.identifier", f"{sd.NID}|110102195003151234"),
                ("_sort", "-date"),
                ("_include", "Observation:encounter"),
            ],
        ),
        (
            "ServiceRequest",
            [("_revinclude", "Task:focus"), ("_count", "1"), ("_total", "accurate")],
        ),
        ("Task", [("status", "requested,completed"), ("_elements", "status,focus")]),
        ("Patient", [("gender", "female"), ("gender:not", "male"), ("_sort", "birthdate")]),
    ],
)
def test_post_search_gives_the_get_answer(
    core: NodeProcess, rtype: str, params: list[tuple[str, str]]
) -> None:
    got = _post(core, rtype, params)
    assert got.status_code == 200, got.text
    post, want = got.json(), get(core, rtype, params)
    for b in (post, want):
        Bundle.model_validate(b)
        b.pop("id"), b.pop("meta")
    assert post == want and post["entry"]
    # parameters may also sit in the query string of the POST
    half = _post(core, rtype, params[1:], "?" + urlencode(params[:1])).json()
    half.pop("id"), half.pop("meta")
    assert half["entry"] == want["entry"]


def test_post_search_refusals(core: NodeProcess) -> None:
    r = http().post(
        f"{core.local_url}/fhir/Patient/_search",
        content=b'{"name": "x"}',
        headers={
            "Authorization": f"Bearer {core.token('clinician')}",
            "Content-Type": "application/json",
        },
    )
    assert r.status_code == 400 and "application/x-www-form-urlencoded" in r.text
    r = _post(core, "Patient", [("nickname", "王秀英")])
    assert r.status_code == 400 and "nickname" in r.text and "王秀英" not in r.text
    r = http().post(
        f"{core.local_url}/fhir/Patient/_search",
        content=b"name=x",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 401


def test_searches_are_audited_with_names_never_values(core: NodeProcess) -> None:
    searched = [
        ("Patient", {"name": "王秀英", "birthdate": "1950-03-15", "_sort": "-birthdate"}),
        (
            "Observation",
            {
                "patient.identifier": f"{sd.NID}|110102195003151234",
                "subject:identifier": "110102195003151234",
                "_revinclude": "DiagnosticReport:result",
            },
        ),
    ]
    for rtype, params in searched:
        assert get(core, rtype, params)["entry"]
    r = _post(core, "Patient", [("family:exact", "Müller"), ("_summary", "data")])
    assert ids(r.json()) == ["p-muller"]
    b = ok(
        call(
            core,
            "GET",
            "/fhir/AuditEvent",
            role="auditor",
            params={"subtype": "read", "_count": "10"},
        )
    )
    queries = [extra_of(e["resource"]).get("query", "") for e in b["entry"]]
    assert "/fhir/Patient/_search?family:exact=***&_summary=data" in queries
    assert "/fhir/Patient?name=***&birthdate=***&_sort=-birthdate" in queries
    assert (
        "/fhir/Observation?patient.identifier=***&subject:identifier=***"
        "&_revinclude=DiagnosticReport:result"
    ) in queries
    text = " ".join(queries)
    for secret in ("王秀英", "1950-03-15", "110102195003151234", "Müller", "M%C3%BCller"):
        assert secret not in text


def _audit(core: NodeProcess, params: Any) -> dict[str, Any]:
    return ok(call(core, "GET", "/fhir/AuditEvent", role="auditor", params=params))


def test_every_audit_event_parameter_listed_answers(core: NodeProcess) -> None:
    """The AuditEvent half of the walk: each listed parameter with a value taken from the
    chain, the ids checked against a snapshot of the chain (bounded by ``date=le`` its newest
    record: the walk's own searches are audited too)."""
    get(core, "Patient", {"_id": "p-wang"})  # a read with a patient hash in the chain
    snap: list[dict[str, Any]] = []
    b = _audit(core, {"_count": "200"})
    while True:
        snap += [e["resource"] for e in b["entry"]]
        nxt = next((x["url"] for x in b["link"] if x["relation"] == "next"), None)
        if nxt is None:
            break
        b = ok(call(core, "GET", nxt, role="auditor"))
    until = snap[0]["recorded"]

    def hashes(e: dict[str, Any]) -> list[str]:
        return [
            x["what"]["identifier"]["value"]
            for x in e.get("entity", [])
            if x.get("what", {}).get("identifier", {}).get("system") == "urn:hutong:patient-hash"
        ]

    with_patient = next(e for e in snap if hashes(e))
    h = hashes(with_patient)[0]
    examples = {
        "_id": (with_patient["id"], [with_patient["id"]]),
        "date": (
            with_patient["recorded"],
            [e["id"] for e in snap if e["recorded"] == with_patient["recorded"]],
        ),
        "subtype": ("read", [e["id"] for e in snap if e["subtype"][0]["code"] == "read"]),
        "action": ("R", [e["id"] for e in snap if e["action"] == "R"]),
        "outcome": ("0", [e["id"] for e in snap if e["outcome"] == "0"]),
        "entity-identifier": (
            f"urn:hutong:patient-hash|{h}",
            [e["id"] for e in snap if h in hashes(e)],
        ),
        "patient-hash": (h, [e["id"] for e in snap if h in hashes(e)]),
    }
    cs = ok(call(core, "GET", "/fhir/metadata", role=None))
    (res,) = [r for r in cs["rest"][0]["resource"] if r["type"] == "AuditEvent"]
    for sp in res["searchParam"]:
        name = sp["name"]
        if name in examples:
            value, want = examples[name]
            params = [(name, value)] + ([("date", f"le{until}")] if name != "_id" else [])
            got = _audit(core, params + [("_count", "200"), ("_total", "accurate")])
            assert [e["resource"]["id"] for e in got.get("entry", [])] == want[:200], name
            assert got["total"] == len(want) and want, name
        elif name == "_count":
            assert len(_audit(core, {"_count": "1"})["entry"]) == 1
        elif name == "_cursor":
            first = _audit(core, {"_count": "1", "date": f"le{until}"})
            nxt = next(x["url"] for x in first["link"] if x["relation"] == "next")
            assert (
                ok(call(core, "GET", nxt, role="auditor"))["entry"][0]["resource"]["id"]
                == snap[1]["id"]
            )
        elif name in ("_total", "_totalMethod"):
            value = "accurate" if name == "_total" else "count"
            assert _audit(core, {name: value, "date": f"le{until}"})["total"] == len(snap)
        elif name == "_pretty":
            r = call(
                core,
                "GET",
                "/fhir/AuditEvent",
                role="auditor",
                params={"_pretty": "true", "_count": "1"},
            )
            assert r.status_code == 200 and "\n  " in r.text
        elif name == "_format":
            assert len(_audit(core, {"_format": "json", "_count": "1"})["entry"]) == 1
        else:
            raise AssertionError(f"AuditEvent?{name} is listed but untested")


def test_references_as_this_servers_absolute_url(core: NodeProcess) -> None:
    base = core.local_url + "/fhir"
    assert ids(get(core, "Observation", {"patient": f"{base}/Patient/p-zhang"})) == ["obs-hb"]
    assert ids(get(core, "Task", {"focus": f"{base}/ServiceRequest/sr-1"})) == ["task-1"]
    # a full URL as a bundle's fullUrl names it, and the fullUrl of a search entry
    b = get(core, "Patient", {"_id": "p-wang"})
    assert ids(
        get(core, "Observation", {"subject": b["entry"][0]["fullUrl"], "code": "2345-7"})
    ) == ["obs-glu"]
    r = call(
        core,
        "GET",
        "/fhir/Observation",
        params={"patient": "https://elsewhere.example/fhir/Patient/p-zhang"},
    )
    assert r.status_code == 400 and "another server's URL" in r.text
    assert "elsewhere" not in r.text
