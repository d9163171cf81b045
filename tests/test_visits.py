"""The neutral visit record (``adapters/visits.py``): checks naming the field, and the Encounter
each event gives through the engine's ``apply`` (no processes)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from adapters import slips_fhir as sf
from adapters import visits as V
from bridge.fhir.validate import errors
from bridge.mapping import is_marked, load_site
from tests.harness import ROOT

MAPS = load_site(ROOT / "mappings" / "fuxing")
BASE = V.Visit(
    visit_no="ZY1",
    event="admit",
    visit_class="inpatient",
    mrn="FX1",
    patient_name="王秀英",
    gender="female",
    birth_date="1950-03-15",
    admitted_at="2026-11-21T10:00:00+08:00",
    id_number="11010219500315123x",
    department_code="0301",
    ward="心内科一病区",
    bed="12床",
    doctor="张主任",
)


def visit(**kw: Any) -> V.Visit:
    return V.check(replace(BASE, **kw))


BAD = [  # (changes, error class, field named)
    ({"visit_no": " "}, sf.MissingField, "visit_no"),
    ({"event": "admitted"}, sf.BadValue, "event"),
    ({"visit_class": "home"}, sf.BadValue, "visit_class"),
    ({"mrn": ""}, sf.MissingField, "mrn"),
    ({"gender": "m"}, sf.BadValue, "gender"),
    ({"birth_date": "1950-02-30"}, sf.BadDate, "birth_date"),
    ({"admitted_at": "2026-11-21T10:00:00"}, sf.BadDate, "admitted_at"),  # no offset
    ({"id_number": "1101"}, sf.BadValue, "id_number"),
    ({"event": "transfer"}, sf.MissingField, "transferred_at"),
    (
        {"event": "discharge", "discharged_at": "2026-11-20T10:00:00+08:00"},
        sf.BadDate,
        "discharged_at",
    ),
    (
        {
            "event": "discharge",
            "discharged_at": "2026-11-25T10:00:00+08:00",
            "status": "in-progress",
        },
        sf.BadValue,
        "status",
    ),
    ({"event": "update"}, sf.BadValue, "status"),
    (
        {"event": "transfer", "transferred_at": "2026-11-22T10:00:00+08:00", "status": "cancelled"},
        sf.BadValue,
        "status",
    ),
    ({"status": "booked"}, sf.BadValue, "status"),
]


@pytest.mark.parametrize(
    ("changes", "error", "field"), BAD, ids=[f"{b[2]}-{n}" for n, b in enumerate(BAD)]
)
def test_check_names_the_field(changes: dict[str, str], error: type, field: str) -> None:
    with pytest.raises(error) as exc:
        visit(**changes)
    assert exc.value.field == field
    assert "王秀英" not in exc.value.message and "1101" not in exc.value.message


def test_check_normalises() -> None:
    v = visit(
        event="cancel-discharge", discharged_at="2026-11-25T10:00:00+08:00", ward=" 心内科一病区 "
    )
    assert v.id_number == "11010219500315123X" and v.status == "in-progress"
    assert v.discharged_at == "" and v.ward == "心内科一病区"  # the old time no longer holds


def build(
    v: V.Visit, current: dict[str, Any] | None = None, gaps: list[Any] | None = None
) -> dict[str, Any]:
    enc = V.builder(v, sf.Codes(MAPS, "fuxing", gaps if gaps is not None else []), "fuxing")(
        current
    )
    enc["subject"] = {"reference": "Patient/p1"}
    assert errors(enc, limit=3) == []
    return enc


def test_registration_shown_under_way_is_in_progress() -> None:
    reg = visit(event="register", visit_class="outpatient", ward="", bed="")
    assert build(reg)["status"] == "arrived"
    assert build(replace(reg, status="in-progress"))["status"] == "in-progress"


def test_department_as_service_type_and_unmapped_one_is_a_gap() -> None:
    enc = build(visit())
    assert enc["serviceType"]["coding"] == [
        {
            "system": "http://hutong.dev/CodeSystem/xicheng-alliance/department",
            "code": "03.04",
            "display": "心血管内科专业",
        },
        {"system": "http://hutong.dev/CodeSystem/fuxing/department", "code": "0301"},
    ]
    assert not is_marked(enc)
    gaps: list[Any] = []
    odd = build(visit(department_code="9999"), gaps=gaps)
    assert odd["serviceType"]["coding"] == [
        {"system": "http://hutong.dev/CodeSystem/fuxing/department", "code": "9999"}
    ]
    assert is_marked(odd) and [(g.map, g.code) for g in gaps] == [("department", "9999")]


def test_patient_as_the_record_describes_it() -> None:
    p = V.patient_of(visit(phone="13900000000"), "fuxing", "urn:oid:2.16.156.10011.1.3")
    assert p["identifier"] == [
        {"system": "urn:oid:2.16.156.10011.1.3", "value": "11010219500315123X"},
        {"system": "urn:hutong:mrn:fuxing", "value": "FX1"},
    ]
    assert (p["name"], p["gender"], p["birthDate"]) == (
        [{"text": "王秀英"}],
        "female",
        "1950-03-15",
    )
    assert p["telecom"] == [{"system": "phone", "value": "13900000000", "use": "mobile"}]
    assert errors(p, limit=3) == []
