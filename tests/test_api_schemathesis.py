"""Schemathesis against the local API's own OpenAPI document, served by a real node process.

The schema is loaded over HTTP from ``/openapi.json`` of a running ``hutong run`` (so what is
checked is what a hospital's client would download), and every operation in it is called with
generated requests, once per role token (clinician, it, auditor) and once with none. Each answer
goes through schemathesis's checks:

- ``not_a_server_error``: no 5xx, whatever the input;
- ``status_code_conformance``: every status answered is declared for that operation (401, 403,
  404, ... are part of the contract, see ``bridge/api/outcome.py``: ``fhir_errors`` and
  ``local_errors``);
- ``content_type_conformance``: ``application/fhir+json`` under /fhir, ``application/json``
  elsewhere, as declared;
- ``response_schema_conformance``: the body matches the declared model.

Bounded: few examples per operation, derandomized (the same requests every run, no example
database), no deadline (a loaded CI machine must not turn into a failure here; speed belongs
in ``bench/``). A crash found here gets a plain regression test in ``test_api_regressions.py``.

POST /local/v1/packets is exercised by generation (refusals: random bodies are never valid FHIR)
and by one explicit case with a valid lab Bundle, which is queued for the peer and checked the
same way.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.factory import bundle
from tests.harness import Alliance, NodeProcess

pytestmark = pytest.mark.slow

MEMBERS = [
    {"id": "core", "zh": "复兴医院", "en": "Fuxing Hospital", "role": "core"},
    {"id": "chc", "zh": "月坛社区卫生服务中心", "en": "Yuetan CHC", "role": "community"},
]
KINDS = ["referral.request", "referral.status", "referral.cancel", "referral.return", "result.lab"]
RULES = [
    {"from": "chc", "to": "core", "kinds": KINDS},
    {"from": "core", "to": "chc", "kinds": KINDS},
]
#: each role's token, and no token at all (None)
ROLES = ("clinician", "it", "auditor", None)
#: the four conformance checks. Not run: positive_data_acceptance (schema-valid input is refused
#: by design: the OpenAPI document describes bodies loosely, e.g. POST /fhir as "an object with
#: resourceType Bundle", and {"resourceType": "Bundle"} is rightly refused as not a transaction;
#: tried, it fails only that way), negative_data_rejection (judged against the same loose
#: schemas), ignored_auth (no OpenAPI security scheme is declared; each role is sent explicitly)
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
#: examples per operation (each sent with 4 tokens); keeps the file well under 90 s
MAX_EXAMPLES = 5

_session: requests.Session | None = None


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """The core node only: packets queued for chc stay in its outbox (chc is down)."""
    global _session
    alliance = Alliance(Path(tmp_path_factory.mktemp("schemathesis")) / "alliance", MEMBERS, RULES)
    _session = requests.Session()
    try:
        alliance.start("core")
        yield alliance.node("core")
    finally:
        _session.close()
        alliance.stop_all()


@pytest.fixture(scope="module")
def local_api(node: NodeProcess) -> schemathesis.schemas.BaseSchema:
    return schemathesis.openapi.from_url(node.local_url + "/openapi.json")


schema = schemathesis.pytest.from_fixture("local_api")


@pytest.fixture(autouse=True)
def _node_id_for_schemathesis(request: pytest.FixtureRequest) -> None:
    """schemathesis 4.32's lazy (fixture-loaded) schema reads and rewrites ``node._nodeid`` to
    name each operation; pytest 9 keeps the id elsewhere, so give it the attribute it expects
    (pytest's own reporting is unaffected)."""
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


def headers_for(node: NodeProcess, role: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {node.token(role)}"} if role else {}


@schema.parametrize()
# derandomize: the examples derive from the test itself (a fixed seed, same requests each run);
# health checks (too slow, filtered) would fail on a loaded CI machine, not on a defect
@settings(
    max_examples=MAX_EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_every_operation_every_role(case: schemathesis.Case, node: NodeProcess) -> None:
    """Each generated request is sent once per role token and once without one."""
    for role in ROLES:
        try:
            case.call_and_validate(session=_session, headers=headers_for(node, role), checks=CHECKS)
        except Exception as exc:  # re-raised, with the role named
            exc.add_note(f"as role: {role or 'no token'}")
            raise


def test_valid_packet_is_queued_and_answer_conforms(
    local_api: schemathesis.schemas.BaseSchema, node: NodeProcess
) -> None:
    """The POST that sends: a valid Bundle is queued (the answer names its packet id); IT may
    not queue a clinical kind (a 403, as documented)."""
    body = [
        {
            "to": "chc",
            "kind": "result.lab",
            "thread": "schemathesis",
            "bundle": bundle(1, marker="schemathesis"),
        }
    ]
    case = local_api["/local/v1/packets"]["POST"].Case(body=body)
    response = case.call_and_validate(
        session=_session, headers=headers_for(node, "it"), checks=CHECKS
    )
    assert response.status_code == 403 and response.json()["code"] == "HT-FORBIDDEN"
    for role in ("clinician",):
        case = local_api["/local/v1/packets"]["POST"].Case(body=body)
        response = case.call_and_validate(
            session=_session, headers=headers_for(node, role), checks=CHECKS
        )
        assert response.status_code == 200
        [result] = response.json()["results"]
        assert set(result) == {"packet_id"}
        queued = node.api("GET", f"/local/v1/packets/{result['packet_id']}")
        assert (
            queued["packet_id"],
            queued["direction"],
            queued["recipient"],
            queued["kind"],
            queued["thread"],
        ) == (result["packet_id"], "out", "chc", "result.lab", "schemathesis")
