"""Neutral slips <-> FHIR: every emitted Bundle is valid R4, and slip -> FHIR -> slip round-trips
field by field, with codes translated from the writer's catalogue to the reader's."""

from __future__ import annotations

import copy
import uuid
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B.bundle import Bundle

from adapters import slips_fhir as sf
from adapters.slips import AcceptanceSlip, Prescription, ReferralSlip
from bridge.fhir.validate import errors, validate_bundle
from bridge.mapping import Observed, is_marked, load_site
from bridge.privacy import NATIONAL_ID_SYSTEM
from bridge.referral import resources as R
from bridge.referral.codes import PATIENT_HASH_SYSTEM
from tests.slip_samples import return_slip

ROOT = Path(__file__).resolve().parents[1]
CHC = load_site(ROOT / "mappings" / "yuetan-chc")
CORE = load_site(ROOT / "mappings" / "fuxing")


def slip(**kw: Any) -> ReferralSlip:
    base = ReferralSlip(
        slip_no="YTZZ20261120001",
        kind="up-inpatient",
        to_member="fuxing",
        patient_name="王秀英",
        gender="female",
        birth_date="1950-03-15",
        id_number="110102195003151234",
        phone="13901234567",
        mrn="YT0001",
        diagnosis_code="YTZ-01",
        diagnosis_name="原发性高血压",
        reason="血压控制不佳 <160/100>",
        summary="头晕两周。\n既往高血压十年 & 糖尿病",
        department_code="KS01",
        urgent=True,
        consent_by="患者本人",
        doctor="李医生",
        written_at="2026-11-20T09:00:00+08:00",
    )
    return replace(base, **kw)


back_slip = return_slip


def valid(bundle: dict[str, Any]) -> None:
    validate_bundle(bundle)
    Bundle.model_validate(copy.deepcopy(bundle))
    for e in bundle["entry"]:
        assert errors(e["resource"]) == [], e["resource"]["resourceType"]


def unpack(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    """What the workflow stores: ids given, urn:uuid references rewritten to Type/id."""
    mapping, out = {}, []
    for e in copy.deepcopy(bundle)["entry"]:
        r = e["resource"]
        r["id"] = str(uuid.uuid4())
        mapping[e["fullUrl"]] = R.ref(r)
        out.append(r)
    return [R.rewrite_refs(r, mapping) for r in out]


def arrived_referral(bundle: dict[str, Any], referrer: str = "yuetan-chc") -> dict[str, Any]:
    """The receiver's view: the Patient without the national ID number, a Task owning it."""
    resources = unpack(bundle)
    patient = next(r for r in resources if r["resourceType"] == "Patient")
    idx = resources.index(patient)
    resources[idx] = R.for_the_wire(patient, "f" * 32, NATIONAL_ID_SYSTEM)
    sr = next(r for r in resources if r["resourceType"] == "ServiceRequest")
    task = {
        "resourceType": "Task",
        "id": str(uuid.uuid4()),
        "status": "requested",
        "intent": "order",
        "for": {"reference": R.ref(patient)},
    }
    return {
        "referral": {"sr_id": sr["id"], "task_id": task["id"], "referrer": referrer},
        "resources": [*resources, task],
    }


# -- referral -----------------------------------------------------------------------------------


def test_referral_bundle_valid_and_carries_every_field() -> None:
    s = slip()
    b = sf.referral_bundle(s, CHC, "yuetan-chc")
    valid(b)
    res = {e["resource"]["resourceType"]: e["resource"] for e in b["entry"]}
    assert set(res) == {"Patient", "ServiceRequest", "Composition", "Consent"}
    p, sr = res["Patient"], res["ServiceRequest"]
    assert {"system": NATIONAL_ID_SYSTEM, "value": s.id_number} in p["identifier"]
    assert {"system": "urn:hutong:mrn:yuetan-chc", "value": "YT0001"} in p["identifier"]
    assert p["telecom"][0]["value"] == "13901234567"
    assert sr["priority"] == "urgent"
    assert sr["performer"] == [{"reference": "Organization/fuxing"}]
    assert sr["requisition"]["value"] == sr["identifier"][0]["value"] == s.slip_no
    assert sr["identifier"][0]["type"]["coding"][0]["code"] == "PLAC"
    assert sr["code"]["coding"][0]["code"] == "up-inpatient"
    dx = sr["reasonCode"][0]["coding"]
    assert dx[0] == {
        "system": "http://hl7.org/fhir/sid/icd-10",
        "code": "I10",
        "display": "特发性(原发性)高血压",
    }
    assert dx[1] == {
        "system": "http://hutong.dev/CodeSystem/yuetan-chc/diagnosis",
        "code": "YTZ-01",
        "display": "原发性高血压",
    }
    assert sr["performerType"]["coding"][0]["code"] == "02"
    assert res["Consent"]["performer"] == [{"display": "患者本人"}]
    assert "&amp; 糖尿病" in res["Composition"]["section"][0]["text"]["div"]


def test_referral_round_trip_translates_to_receiver_codes() -> None:
    s = slip()
    view = arrived_referral(sf.referral_bundle(s, CHC, "yuetan-chc"))
    gaps: list[Observed] = []
    got = sf.referral_from_fhir(view, CORE, me="fuxing", gaps=gaps)
    want = replace(s, id_number="", diagnosis_code="FXZD0101", department_code="0200")
    assert asdict(got) == asdict(want)
    assert gaps == []
    hashed = [i for i in view["resources"][0]["identifier"] if i["system"] == PATIENT_HASH_SYSTEM]
    assert hashed  # the national ID number travelled only as the hash


def test_no_consent_means_no_consent_resource() -> None:
    b = sf.referral_bundle(slip(consent_by=" "), CHC, "yuetan-chc", gaps=[])
    valid(b)
    assert "Consent" not in {e["resource"]["resourceType"] for e in b["entry"]}


def test_unmapped_optional_code_travels_local_and_marked() -> None:
    gaps: list[Observed] = []
    b = sf.referral_bundle(slip(department_code="KS99", urgent=False), CHC, "yuetan-chc", gaps=gaps)
    valid(b)
    sr = next(
        e["resource"] for e in b["entry"] if e["resource"]["resourceType"] == "ServiceRequest"
    )
    assert sr["priority"] == "routine"
    assert sr["performerType"]["coding"] == [
        {"system": "http://hutong.dev/CodeSystem/yuetan-chc/department", "code": "KS99"}
    ]
    assert is_marked(sr) and is_marked(b)
    local = "http://hutong.dev/CodeSystem/yuetan-chc/department"
    assert gaps == [Observed("yuetan-chc", "department", local, "KS99", "")]
    # the receiver cannot translate it: it gets the sender's local code and a gap
    seen: list[Observed] = []
    got = sf.referral_from_fhir(arrived_referral(b), CORE, me="fuxing", gaps=seen)
    assert got.department_code == "KS99"
    assert seen == [Observed("fuxing", "department", local, "KS99", "")]


def test_shared_code_without_local_entry_reaches_reader_as_shared_code() -> None:
    b = sf.referral_bundle(slip(department_code="KS03"), CHC, "yuetan-chc")  # -> 50 中医科
    seen: list[Observed] = []
    got = sf.referral_from_fhir(arrived_referral(b), CORE, me="fuxing", gaps=seen)
    assert got.department_code == "5000"  # fuxing lists 5000 -> 50
    b = sf.referral_bundle(slip(department_code="KS06"), CHC, "yuetan-chc")  # -> 05 (wider)
    got = sf.referral_from_fhir(arrived_referral(b), CORE, me="fuxing", gaps=seen)
    assert got.department_code == "0500"


@pytest.mark.parametrize(
    ("change", "error", "field"),
    [
        ({"patient_name": ""}, sf.MissingField, "patient_name"),
        ({"slip_no": "  "}, sf.MissingField, "slip_no"),
        ({"diagnosis_code": ""}, sf.MissingField, "diagnosis_code"),
        ({"birth_date": "1950-13-40"}, sf.BadDate, "birth_date"),
        ({"birth_date": "19500315"}, sf.BadDate, "birth_date"),
        ({"written_at": "2026-11-20 09:00"}, sf.BadDate, "written_at"),
        ({"written_at": "yesterday"}, sf.BadDate, "written_at"),
        ({"gender": "1"}, sf.BadValue, "gender"),
        ({"kind": "up-somewhere"}, sf.BadValue, "kind"),
        ({"id_number": "11010219500315"}, sf.BadValue, "id_number"),
        ({"diagnosis_code": "YTZ-999"}, sf.UnknownCode, "diagnosis_code"),
    ],
)
def test_bad_slip_names_the_field(
    change: dict[str, Any], error: type[sf.SlipError], field: str
) -> None:
    with pytest.raises(error) as exc:
        sf.referral_bundle(slip(**change), CHC, "yuetan-chc")
    assert exc.value.field == field
    assert field in exc.value.message
    assert "王秀英" not in exc.value.message and "110102" not in exc.value.message


def test_without_maps_codes_travel_local() -> None:
    b = sf.referral_bundle(slip(), None, "yuetan-chc")
    valid(b)
    got = sf.referral_from_fhir(arrived_referral(b), None)
    assert got.diagnosis_code == "YTZ-01" and got.department_code == "KS01"


# -- acceptance -----------------------------------------------------------------------------------


def test_acceptance_round_trip() -> None:
    a = AcceptanceSlip(
        slip_no="YTZZ20261120001",
        accepted=True,
        appointment_at="2026-11-21T10:00:00+08:00",
        department_code="0301",
        bed_no="心内科 12床",
        doctor="张主任",
    )
    outputs = sf.acceptance_outputs(a, CORE, me="fuxing")
    task = {
        "resourceType": "Task",
        "id": "t1",
        "status": "accepted",
        "intent": "order",
        "output": outputs,
    }
    assert errors(task) == []
    got = sf.acceptance_from_task(task, a.slip_no, CHC, me="yuetan-chc")
    # 0301 心内科 -> 03.04, which the community centre's catalogue does not list
    assert asdict(got) == asdict(replace(a, department_code="03.04"))
    got = sf.acceptance_from_task(task, a.slip_no, CORE, me="fuxing")
    assert asdict(got) == asdict(a)


def test_rejection_round_trip() -> None:
    a = AcceptanceSlip(slip_no="S1", accepted=False, reason="本院暂无床位")
    assert sf.acceptance_outputs(a) == []
    task = {"resourceType": "Task", "status": "rejected", "statusReason": {"text": a.reason}}
    assert asdict(sf.acceptance_from_task(task, "S1")) == asdict(a)


def test_acceptance_bad_time_names_field() -> None:
    with pytest.raises(sf.BadDate) as exc:
        sf.acceptance_outputs(AcceptanceSlip("S1", True, appointment_at="明天上午"))
    assert exc.value.field == "appointment_at"


# -- return ---------------------------------------------------------------------------------------


def arrived_return(bundle: dict[str, Any], up_sr: dict[str, Any]) -> dict[str, Any]:
    """The referrer's view after the return: its own request, the receiver's Task with the
    return outputs (as the workflow lists them), and the return resources."""
    resources = unpack(bundle)
    outputs = [
        R.output(
            "return-" + r["resourceType"].lower(),
            r["resourceType"],
            valueReference={"reference": R.ref(r)},
        )
        for r in resources
        if r["resourceType"]
        in ("ServiceRequest", "Encounter", "Composition", "DiagnosticReport", "MedicationRequest")
    ]
    task = {
        "resourceType": "Task",
        "id": "t1",
        "status": "completed",
        "intent": "order",
        "output": outputs,
    }
    return {
        "referral": {"sr_id": up_sr["id"], "task_id": "t1", "referrer": "yuetan-chc"},
        "resources": [up_sr, *reversed(resources), task],
    }


def test_return_bundle_valid_and_round_trip() -> None:
    up = next(
        r
        for r in unpack(sf.referral_bundle(slip(), CHC, "yuetan-chc"))
        if r["resourceType"] == "ServiceRequest"
    )
    r = back_slip()
    b = sf.return_bundle(r, up["id"], "Patient/p1", CORE, me="fuxing")
    valid(b)
    kinds = [e["resource"]["resourceType"] for e in b["entry"]]
    assert kinds == [
        "ServiceRequest",
        "Encounter",
        "Composition",
        "MedicationRequest",
        "MedicationRequest",
        "DiagnosticReport",
        "Observation",
        "Observation",
        "Observation",
    ]
    down = b["entry"][0]["resource"]
    assert down["basedOn"] == [{"reference": f"ServiceRequest/{up['id']}"}]
    assert down["code"]["coding"][0]["code"] == "down-discharge"
    med = b["entry"][3]["resource"]["medicationCodeableConcept"]["coding"]
    assert med[0]["code"] == "XC-YP-001" and med[1]["code"] == "FX-0101"
    obs = [e["resource"] for e in b["entry"][6:]]
    assert obs[0]["code"]["coding"][0] == {
        "system": "http://loinc.org",
        "code": "2345-7",
        "display": "Glucose [Mass/volume] in Serum or Plasma",
    }
    assert obs[0]["valueQuantity"] == {"value": 8.9, "unit": "mmol/L"}
    assert obs[1]["valueQuantity"] == {"value": 72, "unit": "μmol/L"}
    assert obs[2]["valueString"] == "7.20"  # kept as written, not re-rounded
    gaps: list[Observed] = []
    got = sf.return_from_fhir(arrived_return(b, up), CHC, me="yuetan-chc", gaps=gaps)
    want = replace(
        r,
        diagnosis_code="YTZ-01",
        prescriptions=[
            replace(r.prescriptions[0], drug_code="YT2037"),
            replace(r.prescriptions[1], drug_code="YT2111"),
        ],
        results=[
            replace(r.results[0], item_code="3001"),
            replace(r.results[1], item_code="3003"),
            replace(r.results[2], item_code="3002"),
        ],
    )
    assert asdict(got) == asdict(want)
    assert gaps == []


def test_outpatient_return_without_results() -> None:
    r = back_slip(discharge=False, results=[], prescriptions=[])
    b = sf.return_bundle(r, "sr1", "Patient/p1", CORE, me="fuxing")
    valid(b)
    up = {
        "resourceType": "ServiceRequest",
        "id": "sr1",
        "requisition": {"value": "YTZZ20261120001"},
    }
    got = sf.return_from_fhir(arrived_return(b, up), CORE, me="fuxing")
    assert asdict(got) == asdict(r)
    assert b["entry"][1]["resource"]["class"]["code"] == "AMB"


def test_return_bad_prescription_names_line() -> None:
    r = back_slip(prescriptions=[Prescription("FX-0101", "氨氯地平", "", "qd", 14)])
    with pytest.raises(sf.MissingField) as exc:
        sf.return_bundle(r, "sr1", "Patient/p1", CORE, me="fuxing")
    assert exc.value.field == "prescriptions[0].dose"
