"""Required bindings the R4 JSON schema leaves open, checked by the validator from the
generated table bridge/fhir/bindings.json (issue 19, finding 8)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bridge.errors import InvalidFhir
from bridge.fhir import bindings_gen
from bridge.fhir.validate import BINDINGS_PATH, errors, validate_bundle, validate_resource

FIXTURES = Path(__file__).parent / "fixtures" / "fhir"


def coverage(status: str = "active") -> dict[str, Any]:
    return {
        "resourceType": "Coverage",
        "status": status,
        "beneficiary": {"reference": "Patient/p1"},
        "payor": [{"reference": "Organization/core"}],
    }


def test_the_checked_in_table_is_what_the_generator_makes() -> None:
    table = json.loads(BINDINGS_PATH.read_text())
    assert table == json.loads(json.dumps(bindings_gen.generate()))
    assert "fhir.resources" in table["source"] and "bindings_gen.py" in table["source"]
    b = table["bindings"]
    assert b["Coverage"]["status"] == ["active", "cancelled", "draft", "entered-in-error"]
    assert b["ServiceRequest"]["status"] == [
        "draft",
        "active",
        "on-hold",
        "revoked",
        "completed",
        "entered-in-error",
        "unknown",
    ]
    assert b["Task"]["priority"] == ["routine", "urgent", "asap", "stat"]
    # what the schema enumerates itself stays the schema's (not duplicated here)
    assert "status" not in b.get("Task", {}) and "Observation" not in b


def test_an_unknown_code_is_refused_naming_the_element_not_the_value() -> None:
    validate_resource(coverage())
    with pytest.raises(InvalidFhir) as exc:
        validate_resource(coverage("bogus"))
    assert exc.value.detail == (
        "status: not one of the allowed codes ['active', 'cancelled', "
        "'draft', 'entered-in-error'] (required binding)"
    )
    assert "bogus" not in exc.value.message
    # in a bundle, and in a backbone element's list
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": coverage()}, {"resource": coverage("Cancelled")}],
    }
    assert [p.split(":")[0] for p in errors(bundle)] == ["entry[1].resource(Coverage).status"]
    with pytest.raises(InvalidFhir):
        validate_bundle(bundle)
    loc = {
        "resourceType": "Location",
        "hoursOfOperation": [{"daysOfWeek": ["mon", "tue"]}, {"daysOfWeek": ["sat", "Sunday"]}],
    }
    assert [p.split(":")[0] for p in errors(loc)] == ["hoursOfOperation[1].daysOfWeek[1]"]
    sr = {
        "resourceType": "ServiceRequest",
        "status": "active",
        "intent": "order",
        "priority": "soon",
        "subject": {"reference": "Patient/p1"},
    }
    assert [p.split(":")[0] for p in errors(sr)] == ["priority"]


@pytest.mark.parametrize(
    "name", sorted(p.name for p in FIXTURES.glob("*.json") if p.name != "json-edge-cases.json")
)
def test_official_examples_still_pass(name: str) -> None:
    doc = json.loads((FIXTURES / name).read_text())
    assert not [p for p in errors(doc) if "required binding" in p]
