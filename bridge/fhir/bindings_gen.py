"""Generate ``bindings.json``: the allowed codes of required bindings the R4 JSON schema leaves
open, for the resource types the node accepts and emits.

Why: the R4 JSON schema spells out the codes of most ``code`` elements as an ``enum`` (e.g.
``Task.status``), but leaves 268 of them as a plain ``code`` (e.g. ``Coverage.status``, bound
to the required value set ``fm-status``), so ``"status": "bogus"`` passed structural checks.

Source: for every ``code`` element (or array of codes) the schema leaves without an ``enum``,
in a resource or one of its backbone elements, the codes are the ``enum_values`` that the
``fhir.resources`` package (its ``R4B`` model classes, generated from the HL7 specification's
StructureDefinitions and ValueSets) records for the element's required binding. R4B (4.3.0)
made no change to these value sets of the types listed in ``TYPES``; elements whose codes the
schema already enumerates are left to the schema. Elements without recorded codes (a binding
that is not required, e.g. ``language``, or a large code system) are not in the table.

Run (needs the test extras; the output is checked in):
    .venv/bin/python -m bridge.fhir.bindings_gen > bridge/fhir/bindings.json
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Any

SCHEMA = Path(__file__).with_name("schema") / "fhir.schema.json"
#: what the node accepts (the API's clinical types, what a referral carries, results, images)
#: and what it emits (messages, outcomes, audit, its CapabilityStatement and code maps)
TYPES = (
    "Appointment",
    "AuditEvent",
    "Bundle",
    "CapabilityStatement",
    "Composition",
    "ConceptMap",
    "Condition",
    "Consent",
    "Coverage",
    "DiagnosticReport",
    "DocumentReference",
    "Encounter",
    "ImagingStudy",
    "Location",
    "Medication",
    "MedicationRequest",
    "MedicationStatement",
    "MessageHeader",
    "Observation",
    "OperationOutcome",
    "Organization",
    "Parameters",
    "Patient",
    "Practitioner",
    "PractitionerRole",
    "Procedure",
    "Provenance",
    "ServiceRequest",
    "Specimen",
    "Task",
)


def _is_code(prop: dict[str, Any]) -> bool:
    if "enum" in prop:
        return False
    if prop.get("$ref") == "#/definitions/code":
        return True
    items = prop.get("items")
    return (
        isinstance(items, dict)
        and items.get("$ref") == "#/definitions/code"
        and "enum" not in items
    )


def _model(definition: str) -> Any:
    rtype = definition.split("_", 1)[0]
    module = importlib.import_module(f"fhir.resources.R4B.{rtype.lower()}")
    return getattr(module, definition.replace("_", ""), None)


def _codes(model: Any, prop: str) -> list[str] | None:
    for field in model.model_fields.values():
        if field.alias == prop:
            extra = field.json_schema_extra or {}
            codes = extra.get("enum_values") if isinstance(extra, dict) else None
            return list(codes) if codes else None
    return None


def _paths(defs: dict[str, Any], name: str, prefix: str) -> dict[str, list[str]]:
    """Dotted path -> codes, for the resource ``name`` and its backbone elements."""
    out: dict[str, list[str]] = {}
    model = _model(name)
    for prop, spec in sorted((defs[name].get("properties") or {}).items()):
        if prop.startswith("_"):
            continue
        path = f"{prefix}{prop}"
        if _is_code(spec) and model is not None:
            codes = _codes(model, prop)
            if codes:
                out[path] = codes
        ref = spec.get("$ref") or (spec.get("items") or {}).get("$ref", "")
        sub = ref.rsplit("/", 1)[-1]
        if sub.startswith(name.split("_", 1)[0] + "_") and sub in defs and sub != name:
            out.update(_paths(defs, sub, f"{path}."))
    return out


def generate() -> dict[str, Any]:
    from importlib.metadata import version

    defs = json.loads(SCHEMA.read_text())["definitions"]
    table = {t: _paths(defs, t, "") for t in TYPES}
    return {
        "source": "codes of required bindings from fhir.resources "
        f"{version('fhir.resources')} (R4B model enum_values, generated from the HL7 "
        "FHIR ValueSets), for the R4 code elements that bridge/fhir/schema/"
        "fhir.schema.json leaves without an enum; generator: "
        "bridge/fhir/bindings_gen.py",
        "bindings": {t: p for t, p in table.items() if p},
    }


if __name__ == "__main__":
    json.dump(generate(), sys.stdout, ensure_ascii=False, indent=1, sort_keys=True)
    sys.stdout.write("\n")
