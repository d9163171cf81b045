"""Realistic FHIR R4 test bundles, built from values the tests then compare against."""

from __future__ import annotations

import uuid
from typing import Any

import orjson

NATIONAL_ID = "urn:oid:2.16.156.10011.1.3"


def patient(
    national_id: str = "110102195003151234", name: str = "王秀英", mrn: str = "YT0001"
) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": str(uuid.uuid4()),
        "identifier": [
            {"system": NATIONAL_ID, "value": national_id},
            {"system": "urn:hutong:mrn:yuetan-chc", "value": mrn},
        ],
        "name": [{"text": name, "family": name[0], "given": [name[1:]]}],
        "gender": "female",
        "birthDate": "1950-03-15",
    }


def observation(i: int, patient_ref: str, value: float = 7.2) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": str(uuid.uuid4()),
        "status": "final",
        "code": {
            "coding": [
                {
                    "system": "http://loinc.org",
                    "code": "2345-7",
                    "display": "Glucose [Mass/volume] in Serum or Plasma",
                }
            ],
            "text": f"血糖 {i}",
        },
        "subject": {"reference": patient_ref},
        "effectiveDateTime": "2026-11-20T08:30:00+08:00",
        "valueQuantity": {
            "value": value,
            "unit": "mmol/L",
            "system": "http://unitsofmeasure.org",
            "code": "mmol/L",
        },
        "referenceRange": [
            {"low": {"value": 3.9, "unit": "mmol/L"}, "high": {"value": 6.1, "unit": "mmol/L"}}
        ],
        "interpretation": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
                        "code": "H",
                    }
                ]
            }
        ],
    }


def bundle(
    n_obs: int = 3, *, national_id: str = "110102195003151234", marker: str = "", pad_to: int = 0
) -> dict[str, Any]:
    """A collection Bundle: a Patient and n Observations; ``marker`` lands in a note so a test
    can recognise the packet at the receiving side; ``pad_to`` grows it to about that size."""
    p = patient(national_id)
    ref = f"urn:uuid:{p['id']}"
    entries = [{"fullUrl": ref, "resource": p}]
    for i in range(n_obs):
        o = observation(i, ref)
        entries.append({"fullUrl": f"urn:uuid:{o['id']}", "resource": o})
    b: dict[str, Any] = {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "type": "collection",
        "entry": entries,
    }
    if marker:
        entries[1]["resource"]["note"] = [{"text": marker}]
    if pad_to:
        size = len(orjson.dumps(b))
        if size < pad_to:
            entries[1]["resource"].setdefault("note", []).append(
                {"text": "x" * (pad_to - size - 20)}
            )
    return b


def bundle_bytes(**kw: Any) -> bytes:
    return orjson.dumps(bundle(**kw))
