"""bridge.fhir.validate: official R4 JSON schema, fast per-type dispatch, clear error paths.

Fixtures are official FHIR R4 examples (tests/fixtures/fhir, see PROVENANCE.md there); the lab
bundle below is built from realistic values for a county hospital's CBC result. Everything the
schema accepts here is cross-checked against fhir.resources' R4B models, and so is everything
clearly invalid.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema_rs
import orjson
import pytest
from fhir.resources.R4B import get_fhir_model_class

from bridge.errors import InvalidFhir
from bridge.fhir import validate as fv

FIXTURES = Path(__file__).parent / "fixtures" / "fhir"
FIXTURE_FILES = sorted(FIXTURES.glob("*.json"))
ROOT = Path(__file__).resolve().parents[1]


def load(name: str) -> dict:
    return orjson.loads((FIXTURES / name).read_bytes())


def r4b_validate(obj: dict) -> None:
    """Raise if fhir.resources (R4B models) rejects obj."""
    get_fhir_model_class(obj["resourceType"]).model_validate(obj)


def r4b_rejects(obj: Any) -> bool:
    try:
        r4b_validate(obj)
    except Exception:  # noqa: BLE001 - ValidationError, or KeyError for an unknown resourceType
        return True
    return False


# ---------------------------------------------------------------------------------------------
# a realistic lab result: Patient + DiagnosticReport (CBC) + 20 Observations

# LOINC, English display, Chinese name, value, UCUM unit, reference low, reference high
CBC = [
    ("6690-2", "Leukocytes [#/volume] in Blood by Automated count", "白细胞计数", 11.2, "10*9/L", 3.5, 9.5),
    ("789-8", "Erythrocytes [#/volume] in Blood by Automated count", "红细胞计数", 4.62, "10*12/L", 4.3, 5.8),
    ("718-7", "Hemoglobin [Mass/volume] in Blood", "血红蛋白", 138, "g/L", 130, 175),
    ("4544-3", "Hematocrit [Volume Fraction] of Blood by Automated count", "红细胞压积", 41.5, "%", 40, 50),
    ("787-2", "MCV [Entitic volume] by Automated count", "平均红细胞体积", 89.8, "fL", 82, 100),
    ("785-6", "MCH [Entitic mass] by Automated count", "平均红细胞血红蛋白含量", 29.9, "pg", 27, 34),
    ("786-4", "MCHC [Mass/volume] by Automated count", "平均红细胞血红蛋白浓度", 333, "g/L", 316, 354),
    ("777-3", "Platelets [#/volume] in Blood by Automated count", "血小板计数", 236, "10*9/L", 125, 350),
    ("770-8", "Neutrophils/100 leukocytes in Blood by Automated count", "中性粒细胞百分比", 78.4, "%", 40, 75),
    ("736-9", "Lymphocytes/100 leukocytes in Blood by Automated count", "淋巴细胞百分比", 14.1, "%", 20, 50),
    ("5905-5", "Monocytes/100 leukocytes in Blood by Automated count", "单核细胞百分比", 6.2, "%", 3, 10),
    ("713-8", "Eosinophils/100 leukocytes in Blood by Automated count", "嗜酸性粒细胞百分比", 1.0, "%", 0.4, 8),
    ("706-2", "Basophils/100 leukocytes in Blood by Automated count", "嗜碱性粒细胞百分比", 0.3, "%", 0, 1),
    ("751-8", "Neutrophils [#/volume] in Blood by Automated count", "中性粒细胞绝对值", 8.78, "10*9/L", 1.8, 6.3),
    ("731-0", "Lymphocytes [#/volume] in Blood by Automated count", "淋巴细胞绝对值", 1.58, "10*9/L", 1.1, 3.2),
    ("742-7", "Monocytes [#/volume] in Blood by Automated count", "单核细胞绝对值", 0.69, "10*9/L", 0.1, 0.6),
    ("711-2", "Eosinophils [#/volume] in Blood by Automated count", "嗜酸性粒细胞绝对值", 0.11, "10*9/L", 0.02, 0.52),
    ("704-7", "Basophils [#/volume] in Blood by Automated count", "嗜碱性粒细胞绝对值", 0.03, "10*9/L", 0, 0.06),
    ("788-0", "Erythrocyte distribution width [Ratio] by Automated count", "红细胞分布宽度-CV", 12.8, "%", 11.5, 14.5),
    ("32623-1", "Platelet mean volume [Entitic volume] in Blood by Automated count", "平均血小板体积", 10.4, "fL", 7.4, 12.5),
]  # fmt: skip
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
LAB_OID = "urn:oid:2.16.156.10011.1.12.330127"


def quantity(value: float, unit: str) -> dict:
    return {"value": value, "unit": unit, "system": UCUM, "code": unit}


def cbc_bundle() -> dict:
    """Collection Bundle: DiagnosticReport, 20 Observations, Patient (entries 0, 1-20, 21)."""
    patient_url, report_url = f"urn:uuid:{uuid.uuid4()}", f"urn:uuid:{uuid.uuid4()}"
    when, issued = "2024-05-20T08:15:00+08:00", "2024-05-20T10:02:31.000+08:00"
    lab = {"reference": "Organization/hx-county-lab", "display": "华溪县人民医院检验科"}
    subject = {"reference": patient_url, "display": "张伟"}
    observations, results = [], []
    for i, (code, display, zh, value, unit, low, high) in enumerate(CBC, start=1):
        url = f"urn:uuid:{uuid.uuid4()}"
        flag = "H" if value > high else "L" if value < low else "N"
        obs = {
            "resourceType": "Observation",
            "id": f"obs-0173-{i:02d}",
            "identifier": [{"system": f"{LAB_OID}.4", "value": f"L240520-0173-{i:02d}"}],
            "status": "final",
            "category": [{"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                "code": "laboratory", "display": "Laboratory",
            }]}],
            "code": {"coding": [{"system": LOINC, "code": code, "display": display}], "text": zh},
            "subject": subject,
            "effectiveDateTime": when,
            "issued": issued,
            "performer": [lab],
            "valueQuantity": quantity(value, unit),
            "interpretation": [{"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
                "code": flag,
            }]}],
            "referenceRange": [{"low": quantity(low, unit), "high": quantity(high, unit)}],
        }  # fmt: skip
        observations.append({"fullUrl": url, "resource": obs})
        results.append({"reference": url, "display": zh})
    report = {
        "resourceType": "DiagnosticReport",
        "id": "dr-L240520-0173",
        "identifier": [{"system": f"{LAB_OID}.3", "value": "L240520-0173"}],
        "status": "final",
        "category": [{"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/v2-0074",
            "code": "HM", "display": "Hematology",
        }]}],
        "code": {
            "coding": [{"system": LOINC, "code": "58410-2",
                        "display": "CBC panel - Blood by Automated count"}],
            "text": "血常规",
        },
        "subject": subject,
        "effectiveDateTime": when,
        "issued": issued,
        "performer": [lab],
        "result": results,
        "conclusion": "白细胞及中性粒细胞升高，提示细菌感染可能，请结合临床。",
    }  # fmt: skip
    patient = {
        "resourceType": "Patient",
        "id": "pat-20240520-0173",
        "identifier": [{
            "use": "usual",
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                 "code": "MR"}]},
            "system": LAB_OID,
            "value": "0001734521",
        }],
        "active": True,
        "name": [{"use": "official", "text": "张伟", "family": "张", "given": ["伟"]}],
        "telecom": [{"system": "phone", "value": "13800000000", "use": "mobile"}],
        "gender": "male",
        "birthDate": "1968-03-14",
        "address": [{
            "use": "home",
            "text": "浙江省杭州市淳安县千岛湖镇新安东路 88 号",
            "city": "杭州市", "district": "淳安县", "state": "浙江省", "country": "CN",
        }],
    }  # fmt: skip
    return {
        "resourceType": "Bundle",
        "id": "bundle-L240520-0173",
        "meta": {"lastUpdated": issued},
        "identifier": {"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{uuid.uuid4()}"},
        "type": "collection",
        "timestamp": issued,
        "entry": [
            {"fullUrl": report_url, "resource": report},
            *observations,
            {"fullUrl": patient_url, "resource": patient},
        ],
    }


def res(bundle: dict, i: int) -> dict:
    return bundle["entry"][i]["resource"]


# ---------------------------------------------------------------------------------------------
# valid data


def test_fixtures_present():
    names = {p.name for p in FIXTURE_FILES}
    kinds = {load(n)["resourceType"] for n in names}
    wanted = {"Bundle", "DiagnosticReport", "Observation", "ServiceRequest", "Task", "Patient"}
    assert wanted <= kinds


@pytest.mark.parametrize("path", FIXTURE_FILES, ids=lambda p: p.name)
def test_spec_example_is_valid(path: Path):
    obj = orjson.loads(path.read_bytes())
    assert fv.errors(obj) == []
    fv.validate_resource(obj)
    r4b_validate(obj)  # fhir.resources agrees


@pytest.mark.parametrize(
    "name", [p.name for p in FIXTURE_FILES if load(p.name)["resourceType"] == "Bundle"]
)
def test_spec_example_bundles_parse_and_validate(name: str):
    data = (FIXTURES / name).read_bytes()
    assert fv.parse_and_validate_bundle(data) == orjson.loads(data)


def test_lab_bundle_is_valid_here_and_in_fhir_resources():
    bundle = cbc_bundle()
    assert len(bundle["entry"]) == 22
    assert fv.parse_and_validate_bundle(orjson.dumps(bundle)) == bundle
    assert fv.errors(bundle) == []
    r4b_validate(bundle)


def test_valid_fhir_that_the_raw_schema_gets_wrong():
    edge = load("json-edge-cases.json")  # `_given: [null, ...]` and U+202F in a display
    assert fv.errors(edge) == []
    bundle = cbc_bundle()
    res(bundle, 21)["name"][0]["text"] = "欧阳\u3000娜娜"  # U+3000: common in Chinese text
    res(bundle, 21)["address"][0]["line"] = ["新安东路\u00a088 号"]
    assert fv.errors(bundle) == []
    r4b_validate(bundle)


def test_fhir_version_4_0_1_accepted():
    cap = {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2024-05-20",
        "kind": "instance",
        "fhirVersion": "4.0.1",
        "format": ["json"],
    }
    assert fv.errors(cap) == []
    r4b_validate(cap)
    assert fv.errors({**cap, "fhirVersion": "4.0.0"}) == []
    [problem] = fv.errors({**cap, "fhirVersion": "4.0.9"})
    assert problem.startswith("fhirVersion: not one of the allowed codes [")


# ---------------------------------------------------------------------------------------------
# invalid data: each rejected, with the path in the message

Mutation = Callable[[dict], None]


def set_in(i: int, key: str, value: Any) -> Mutation:
    return lambda b: res(b, i).__setitem__(key, value)


# (id, mutation, expected start of the first problem, fhir.resources also rejects it)
MUTATIONS: list[tuple[str, Mutation, str, bool]] = [
    ("bad-status-code", set_in(3, "status", "finalx"),
     "entry[3].resource(Observation).status: not one of the allowed codes ['registered', ",
     False),
    ("object-as-string", set_in(3, "code", "718-7"),
     "entry[3].resource(Observation).code: expected object, got string", True),
    ("reference-as-string", set_in(5, "subject", "Patient/1"),
     "entry[5].resource(Observation).subject: expected object, got string", True),
    ("number-as-string", lambda b: res(b, 3)["valueQuantity"].__setitem__("value", "6.3"),
     "entry[3].resource(Observation).valueQuantity.value: expected number, got string",
     False),  # pydantic coerces "6.3" to a Decimal
    ("unknown-resourceType", set_in(3, "resourceType", "Observatoin"),
     "entry[3].resource.resourceType: unknown resourceType (not an R4 type)", True),
    ("missing-resourceType", lambda b: res(b, 3).pop("resourceType"),
     "entry[3].resource: resourceType is missing", True),
    ("extra-property", set_in(3, "colour", "red"),
     "entry[3].resource(Observation).colour: unknown property", True),
    ("missing-required", lambda b: res(b, 0).pop("code"),
     "entry[0].resource(DiagnosticReport).code: required property is missing", True),
    ("bad-date", set_in(21, "birthDate", "1968-13-14"),
     "entry[21].resource(Patient).birthDate: not a valid FHIR date", True),
    ("empty-string", lambda b: res(b, 21)["name"][0].__setitem__("text", ""),
     "entry[21].resource(Patient).name[0].text: empty string", True),
    ("fractional-integer", lambda b: b.__setitem__("total", 1.5),
     "total: expected integer, got number", True),
    ("bundle-type", lambda b: b.__setitem__("type", "collectionx"),
     "type: not one of the allowed codes ['document', 'message', ", False),
    ("entry-not-object", lambda b: b["entry"].append(5),
     "entry[22]: expected object, got number", True),
    ("div-not-string", set_in(21, "text", {"status": "generated", "div": 5}),
     "entry[21].resource(Patient).text.div: expected string, got number", True),
]  # fmt: skip


@pytest.mark.parametrize(
    "mutate,expected,r4b_too", [m[1:] for m in MUTATIONS], ids=[m[0] for m in MUTATIONS]
)
def test_mutation_rejected_with_path(mutate: Mutation, expected: str, r4b_too: bool):
    bundle = cbc_bundle()
    mutate(bundle)
    with pytest.raises(InvalidFhir) as caught:
        fv.parse_and_validate_bundle(orjson.dumps(bundle))
    err = caught.value
    assert err.code == "HT-PKT-INVALID-FHIR" and err.http_status == 422
    assert err.message.startswith(f"invalid FHIR: {expected}"), err.message
    assert "\n" not in err.message
    assert fv.errors(bundle)[0].startswith(expected)
    with pytest.raises(InvalidFhir):
        fv.validate_bundle(bundle)
    if r4b_too:
        assert r4b_rejects(bundle), "fhir.resources accepted it"


def test_fhir_resources_does_not_check_required_code_bindings():
    """Why the schema is worth running even where fhir.resources models are used."""
    bundle = cbc_bundle()
    res(bundle, 3)["status"] = "finalx"
    assert not r4b_rejects(bundle)
    assert fv.errors(bundle)


def test_not_json():
    with pytest.raises(InvalidFhir, match=r"^HT-PKT-INVALID-FHIR: body is not JSON: "):
        fv.parse_and_validate_bundle(b'{"resourceType": "Bundle",')
    with pytest.raises(InvalidFhir, match="body is not JSON"):
        fv.parse_and_validate_bundle(b"\xff\xfe")


def test_not_a_bundle():
    obs = (FIXTURES / "observation-example-f001-glucose.json").read_bytes()
    with pytest.raises(InvalidFhir, match=r"not a Bundle: resourceType is Observation$"):
        fv.parse_and_validate_bundle(obs)
    with pytest.raises(InvalidFhir, match=r"\(root\): expected a Bundle object, got array"):
        fv.parse_and_validate_bundle(b"[1, 2]")
    with pytest.raises(InvalidFhir, match="not a Bundle: resourceType is missing"):
        fv.parse_and_validate_bundle(b'{"type": "collection"}')
    fv.validate_resource(orjson.loads(obs))  # fine as a resource


def test_embedded_resources_get_paths():
    bundle = cbc_bundle()
    res(bundle, 0)["contained"] = [{"resourceType": "Specimen", "status": "nope"}]
    bundle["entry"].append({"resource": {
        "resourceType": "Bundle", "type": "collection",
        "entry": [{"resource": {"resourceType": "Patient", "gender": "m"}}],
    }})  # fmt: skip
    bundle["entry"][1]["response"] = {"status": "201 Created", "outcome": {"resourceType": "Foo"}}
    assert fv.errors(bundle) == [
        (
            "entry[0].resource(DiagnosticReport).contained[0](Specimen).status: not one of the "
            "allowed codes ['available', 'unavailable', 'unsatisfactory', 'entered-in-error']"
        ),
        "entry[1].response.outcome.resourceType: unknown resourceType (not an R4 type)",
        (
            "entry[22].resource(Bundle).entry[0].resource(Patient).gender: not one of the allowed "
            "codes ['male', 'female', 'other', 'unknown']"
        ),
    ]
    params = {
        "resourceType": "Parameters",
        "parameter": [{"name": "a", "part": [{"name": "b", "resource": {"resourceType": "X"}}]}],
    }
    assert fv.errors(params) == [
        "parameter[0].part[0].resource.resourceType: unknown resourceType (not an R4 type)"
    ]
    with pytest.raises(InvalidFhir):
        fv.validate_resource(params)


def test_all_problems_listed_and_message_stays_short():
    bundle = cbc_bundle()
    for i in range(1, 21):
        res(bundle, i)["status"] = "bad"
    problems = fv.errors(bundle)
    assert len(problems) == 20
    assert problems[19].startswith("entry[20].resource(Observation).status: not one of")
    with pytest.raises(InvalidFhir) as caught:
        fv.validate_bundle(bundle)
    assert caught.value.message.endswith("(and 17 more)")
    assert caught.value.message.count("status: not one of") == 3
    assert caught.value.detail == "\n".join(problems)


def test_offending_values_never_quoted_long_names_truncated():
    """Problems name path and rule only: values may be patient data (they reach the caller,
    quarantine reasons, the audit trail and logs); property names are cut short."""
    bundle = cbc_bundle()
    secret = "张" * 30 + "X" * 100
    res(bundle, 21)["birthDate"] = secret
    res(bundle, 3)["status"] = "qq\nzz'\x00王五"
    res(bundle, 4)["status"] = {"note": "Y" * 500}
    res(bundle, 6)["valueQuantity"]["value"] = "赵六-110101"
    res(bundle, 5)["k" * 300] = 1
    problems = fv.errors(bundle)
    text = "\n".join(problems)
    status_codes = (
        "['registered', 'preliminary', 'final', 'amended', 'corrected', 'cancelled', "
        "'entered-in-error', 'unknown']"
    )
    assert problems == [
        f"entry[3].resource(Observation).status: not one of the allowed codes {status_codes}",
        f"entry[4].resource(Observation).status: not one of the allowed codes {status_codes}",
        "entry[5].resource(Observation)." + "k" * 40 + "...: unknown property",
        "entry[6].resource(Observation).valueQuantity.value: expected number, got string",
        "entry[6].resource(Observation).valueQuantity.value: not a valid FHIR decimal",
        "entry[21].resource(Patient).birthDate: not a valid FHIR date",
    ]
    for planted in ("张", "X", "Y", "王五", "qq", "zz", "赵六", "110101"):
        assert planted not in text
    assert all("\n" not in p for p in problems)


def test_deep_nesting_is_an_error_not_a_crash():
    depth = 500  # close to orjson's nesting limit
    inner = '{"resourceType":"Patient","gender":"x"}'
    nested = '{"resourceType":"Patient","contained":[' * depth + inner + "]}" * depth
    data = f'{{"resourceType":"Bundle","type":"collection","entry":[{{"resource":{nested}}}]}}'
    with pytest.raises(InvalidFhir) as caught:
        fv.parse_and_validate_bundle(data.encode())
    assert caught.value.message.endswith(
        "(Patient).gender: not one of the allowed codes ['male', 'female', 'other', 'unknown']"
    )
    assert len(caught.value.message) < 500


def test_allowed_types():
    data = orjson.dumps(cbc_bundle())
    fv.parse_and_validate_bundle(data, allowed_types="DiagnosticReport,Observation, Patient")
    fv.parse_and_validate_bundle(data, allowed_types=["DiagnosticReport", "Observation", "Patient"])
    with pytest.raises(InvalidFhir) as caught:
        fv.parse_and_validate_bundle(data, allowed_types="Observation Patient")
    assert caught.value.message == (
        "invalid FHIR: entry[0].resource(DiagnosticReport): type not allowed here "
        "(allowed: Observation, Patient)"
    )


def test_errors_on_non_resources():
    assert fv.errors([1]) == ["(root): expected a resource (JSON object), got array"]
    assert fv.errors({}) == ["(root): resourceType is missing"]
    assert fv.errors({"resourceType": ["Patient"]}) == ["resourceType: expected string, got array"]
    with pytest.raises(InvalidFhir, match=r"unknown resourceType \(not an R4 type\)$"):
        fv.validate_resource({"resourceType": "Patent"})


# ---------------------------------------------------------------------------------------------
# the schema copy, the load-time fixes, and the dispatch


def test_schema_copy_matches_provenance():
    schema_dir = ROOT / "bridge" / "fhir" / "schema"
    digest = hashlib.sha256((schema_dir / "fhir.schema.json").read_bytes()).hexdigest()
    assert digest in (schema_dir / "PROVENANCE.md").read_text()
    assert (schema_dir / "LICENSE-asymmetrik").read_text().startswith("The MIT License")


def raw_schema() -> dict:
    return orjson.loads(fv.SCHEMA_PATH.read_bytes())


def test_dispatch_covers_every_resource_list_use():
    """ResourceList is replaced by {"type": "object"}; the walker must visit every place it was."""
    uses = set()
    for name, definition in raw_schema()["definitions"].items():
        for prop, schema in definition.get("properties", {}).items():
            if "#/definitions/ResourceList" in orjson.dumps(schema).decode():
                uses.add(prop if prop == "contained" else f"{name}.{prop}")
    assert uses == {
        "contained",
        "Bundle_Entry.resource",
        "Bundle_Response.outcome",
        "Parameters_Parameter.resource",
    }


def test_load_time_fixes_still_apply():
    raw = orjson.dumps(raw_schema()).decode()
    assert '"4.0.1"' not in raw  # if upstream fixes it, fix 1 can go
    assert raw.count(orjson.dumps(fv._XSD_STRING_PATTERN).decode()) > 50
    for pattern in fv._INTEGER_PATTERNS:
        assert orjson.dumps(pattern).decode() in raw
    patched = raw_schema()
    fv._patch(patched)
    text = orjson.dumps(patched).decode()
    assert text.count('"4.0.1"') == 4
    assert fv._XSD_STRING_PATTERN not in text
    assert all(p not in text for p in fv._INTEGER_PATTERNS)


def test_same_verdicts_as_the_full_schema_oneof():
    """Per-type dispatch must agree with validating through the (patched) schema's root oneOf."""
    patched = raw_schema()
    fv._patch(patched)
    full = jsonschema_rs.validator_for(patched)
    cases: list[Any] = [orjson.loads(p.read_bytes()) for p in FIXTURE_FILES]
    for _, mutate, _, _ in MUTATIONS:
        bundle = cbc_bundle()
        mutate(bundle)
        cases.append(bundle)
    cases += [cbc_bundle(), {"resourceType": "Nope"}, {}]
    for case in cases:
        assert full.is_valid(case) == (fv.errors(case) == []), fv.errors(case)


@pytest.mark.slow  # a fresh interpreter, as a child process
def test_nothing_compiled_at_import():
    code = (
        "import bridge.fhir.validate as v, sys; "
        "assert v._state is None; "
        "assert 'fhir.resources' not in sys.modules; print('ok')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert out.stdout.strip() == "ok", out.stderr


def test_validators_are_compiled_once_per_type(monkeypatch: pytest.MonkeyPatch) -> None:
    """Speed is measured in bench/ (exchange.py's ceiling rows); this checks what keeps it fast:
    compiling a validator (~30 ms) happens once per resource type, never per call."""
    data = orjson.dumps(cbc_bundle())
    fv.parse_and_validate_bundle(data)  # compiles what the lab bundle needs
    compiled: list[str] = []
    real = fv.jsonschema_rs.validator_for

    def counting(schema, *args, **kwargs):  # type: ignore[no-untyped-def]
        compiled.append(schema["$ref"])
        return real(schema, *args, **kwargs)

    monkeypatch.setattr(fv.jsonschema_rs, "validator_for", counting)
    for _ in range(20):
        assert fv.parse_and_validate_bundle(data) == orjson.loads(data)
    assert compiled == []
    fv.validate_resource(
        {
            "resourceType": "Flag",
            "status": "active",
            "code": {"text": "x"},
            "subject": {"reference": "Patient/p"},
        }
    )
    assert compiled == ["#/definitions/Flag"]
