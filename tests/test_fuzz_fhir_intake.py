"""Bad-input suite, FHIR intake: arbitrary bytes and JSON, and valid Bundles with one thing
changed, go through ``parse_and_validate_bundle`` and through the receive pipeline as sealed,
correctly signed packets. Only ``InvalidFhir`` may come out; a sealed body is accepted exactly
when the validator accepts it, and then it is stored byte for byte."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from bridge.crypto import envelope as env
from bridge.errors import InvalidFhir
from bridge.fhir.validate import parse_and_validate_bundle
from bridge.store.tables import INBOX
from tests.factory import bundle
from tests.fuzzkit import Receiver, mutated, receiver

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=20,
)
FHIR_KEYS = [
    "resourceType",
    "type",
    "entry",
    "resource",
    "fullUrl",
    "id",
    "status",
    "code",
    "subject",
    "identifier",
    "valueQuantity",
    "value",
    "meta",
    "text",
    "note",
]


def validated(data: bytes) -> dict[str, Any] | None:
    """The validator's verdict; anything but InvalidFhir escaping is a crash."""
    try:
        return parse_and_validate_bundle(data)
    except InvalidFhir as exc:
        assert exc.message  # a refusal says what is wrong
        return None


@FUZZ
@given(data=st.binary(max_size=300))
@example(
    data=b'{"resourceType": "Bundle", "type": "collection", "total": 123456789012345678901234}'
)
@example(data=b'{"resourceType": "Bundle", "type": "collection", "entry": [' * 200)
@example(data=b'{"resourceType": "Bundle", "type": "collection", "id": "\\ud800"}')
def test_arbitrary_bytes(data: bytes) -> None:
    validated(data)


@FUZZ
@given(value=JSON)
def test_arbitrary_json(value: Any) -> None:
    assert validated(orjson.dumps(value)) is None or value["resourceType"] == "Bundle"


@st.composite
def edited_bundle(draw: st.DrawFn) -> dict[str, Any]:
    """A valid Bundle with one to three values replaced, keys dropped or keys added."""
    doc = bundle(2, marker="fuzz")
    for _ in range(draw(st.integers(1, 3))):
        node: Any = doc
        path = []
        while isinstance(node, (dict, list)) and node and draw(st.booleans()):
            key = draw(
                st.sampled_from(sorted(node) if isinstance(node, dict) else list(range(len(node))))
            )
            path.append(key)
            node = node[key]
        parent: Any = doc
        for key in path[:-1]:
            parent = parent[key]
        op = draw(st.sampled_from(["replace", "drop", "add"]))
        if path and op == "replace":
            parent[path[-1]] = draw(JSON)
        elif path and op == "drop" and isinstance(parent, dict):
            del parent[path[-1]]
        elif isinstance(node, dict):
            node[draw(st.sampled_from(FHIR_KEYS) | st.text(max_size=8))] = draw(JSON)
    return doc


@FUZZ
@given(doc=edited_bundle())
def test_edited_bundles(doc: dict[str, Any]) -> None:
    before = copy.deepcopy(doc)
    validated(orjson.dumps(doc))
    assert doc == before  # the validator never changes what it judges


@pytest.fixture(scope="module")
def core(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Receiver]:
    r = receiver(tmp_path_factory.mktemp("fuzz-fhir") / "alliance")
    yield r
    r.close()


@FUZZ
@given(
    body=st.one_of(
        edited_bundle().map(orjson.dumps),
        mutated(orjson.dumps(bundle(1, marker="m"))),
        JSON.map(orjson.dumps),
    )
)
def test_sealed_bodies_are_taken_exactly_when_valid(core: Receiver, body: bytes) -> None:
    frame = core.seal(body)
    pid = env.decode(frame, max_body=1 << 20).header.id
    [answer] = core.intake.receive([frame])
    fields = env.verify_receipt(answer, lambda _n: core.ctx.plan.directory["core"].signing_keys)
    if validated(body) is None:
        assert (fields["status"], fields["code"]) == ("refused", InvalidFhir.code)
    else:
        assert fields["status"] == "accepted"
        with core.ctx.store.read() as conn:
            stored = conn.execute(select(INBOX.c.body).where(INBOX.c.packet_id == pid)).scalar()
        assert bytes(stored) == body
