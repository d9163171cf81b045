"""ORU^R01 -> FHIR, in process: every field of the fixtures checked against the message, every
refusal class with its ACK code and ERR location; R4 schema and fhir.resources R4B validity."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import hl7
import pytest
from fhir.resources.R4B import get_fhir_model_class

from adapters.hl7v2.ack import Answering, ack_code_of, build_ack
from adapters.lis import errors as E
from adapters.lis.intake import decode
from adapters.lis.oru import Settings, header, parse, to_fhir
from bridge.fhir.validate import validate_bundle, validate_resource
from bridge.mapping import Translator
from bridge.privacy import patient_hash

FIX = Path(__file__).parent / "fixtures" / "hl7" / "lis"
KEY = bytes(range(32))
NID = "urn:oid:2.16.156.10011.1.3"
LOCAL = "http://hutong.dev/CodeSystem/fxlab/lab"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"

#: a ConceptMap like the site's lab map (only some codes mapped)
LAB_MAP = {
    "resourceType": "ConceptMap",
    "group": [
        {
            "source": LOCAL,
            "target": LOINC,
            "element": [
                {"code": c, "target": [{"code": t, "equivalence": "equivalent"}]}
                for c, t in (
                    ("WBC", "6690-2"),
                    ("HGB", "718-7"),
                    ("PLT", "777-3"),
                    ("NEUT%", "770-8"),
                    ("CBC", "58410-2"),
                    ("BIOCHEM", "24323-8"),
                    ("CRP", "1988-5"),
                    ("HBSAG", "5196-1"),
                    ("GLU", "2345-7"),
                )
            ],
        }
    ],
}


def settings(**kw: Any) -> Settings:
    return Settings(
        node_id="core",
        hash_key=KEY,
        national_id_system=NID,
        local_system=LOCAL,
        translator=Translator({"lab": LAB_MAP}),
        **kw,
    )


def convert(raw: bytes, default: str = "UTF-8", **kw: Any) -> Any:
    text, cs = decode(raw, default)
    msg = parse(text, cs)
    return to_fhir(msg, header(msg), settings(**kw))


def by_type(bundle: dict[str, Any], rtype: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == rtype]


def obs_by_code(bundle: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for o in by_type(bundle, "Observation"):
        local = [c for c in o["code"]["coding"] if c["system"] == LOCAL]
        out[local[0]["code"]] = o
    return out


def check_valid(bundle: dict[str, Any]) -> None:
    validate_bundle(bundle)
    for e in bundle["entry"]:
        r = e["resource"]
        validate_resource(r)
        get_fhir_model_class(r["resourceType"]).model_validate(r)
    get_fhir_model_class("Bundle").model_validate(bundle)


# the v2.5.1 message, OBX by OBX: (value-kind, value, unit text, UCUM, low, high, range text,
# flag, status, effective, LOINC or None)
EXPECTED_251 = {
    "WBC": (
        "q",
        11.2,
        "10^9/L",
        "10*9/L",
        3.5,
        9.5,
        "3.5-9.5",
        "H",
        "final",
        "2026-11-20T09:00:00+08:00",
        "6690-2",
    ),
    "HGB": (
        "q",
        128,
        "g/L",
        "g/L",
        115,
        150,
        "115-150",
        "N",
        "final",
        "2026-11-20T09:00:00+08:00",
        "718-7",
    ),
    "PLT": (
        "q",
        86,
        "10^9/L",
        "10*9/L",
        125,
        350,
        "125-350",
        "L",
        "final",
        "2026-11-20T09:00:00+08:00",
        "777-3",
    ),
    "NEUT%": (
        "q",
        78.5,
        "%",
        "%",
        40,
        75,
        "40-75",
        "H",
        "final",
        "2026-11-20T09:00:00+08:00",
        "770-8",
    ),
    "GLU": (
        "q",
        6.85,
        "mmol/L",
        "mmol/L",
        3.9,
        6.1,
        "3.9-6.1",
        "H",
        "preliminary",
        "2026-11-20T09:10:00+08:00",
        "2345-7",
    ),
    "CRP": (
        "q<",
        5,
        "mg/L",
        "mg/L",
        None,
        10,
        "<10",
        "N",
        "preliminary",
        "2026-11-20T09:10:00+08:00",
        "1988-5",
    ),
    "HBSAG": (
        "cc",
        "NEG",
        None,
        None,
        None,
        None,
        None,
        "N",
        "preliminary",
        "2026-11-20T09:10:00+08:00",
        "5196-1",
    ),
    "XYZ99": (
        "s",
        "弱阳性(+)",
        None,
        None,
        None,
        None,
        "阴性",
        "A",
        "preliminary",
        "2026-11-20T09:10:00+08:00",
        None,
    ),
    "TITER": (
        "ratio",
        (1, 320),
        None,
        None,
        None,
        None,
        "<1:80",
        "H",
        "preliminary",
        "2026-11-20T09:10:00+08:00",
        None,
    ),
}


def check_observation(o: dict[str, Any], exp: tuple[Any, ...]) -> None:
    kind, val, unit, ucum, low, high, rtext, flag, status, effective, loinc = exp
    if kind in ("q", "q<"):
        q = o["valueQuantity"]
        assert q["value"] == val and q["unit"] == unit
        assert q["system"] == UCUM and q["code"] == ucum
        assert q.get("comparator") == ("<" if kind == "q<" else None)
    elif kind == "cc":
        assert o["valueCodeableConcept"]["coding"][0]["code"] == val
    elif kind == "s":
        assert o["valueString"] == val
    elif kind == "ratio":
        assert (
            o["valueRatio"]["numerator"]["value"],
            o["valueRatio"]["denominator"]["value"],
        ) == val
    rr = o.get("referenceRange", [{}])[0]
    assert rr.get("text") == rtext
    assert (rr.get("low") or {}).get("value") == low
    assert (rr.get("high") or {}).get("value") == high
    if low is not None:
        assert rr["low"]["code"] == ucum
    assert o["interpretation"][0]["coding"][0]["code"] == flag
    assert o["status"] == status
    assert o["effectiveDateTime"] == effective
    loincs = [c["code"] for c in o["code"]["coding"] if c["system"] == LOINC]
    assert loincs == ([loinc] if loinc else [])
    tagged = any(t["code"] == "unmapped-code" for t in (o.get("meta") or {}).get("tag", []))
    assert tagged == (loinc is None)


def test_v251_utf8_two_groups_field_by_field() -> None:
    r = convert((FIX / "oru_r01_v251_utf8.hl7").read_bytes())
    check_valid(r.bundle)
    obs = obs_by_code(r.bundle)
    assert sorted(obs) == sorted(EXPECTED_251)
    for code, exp in EXPECTED_251.items():
        check_observation(obs[code], exp)
    # NTE after an OBX is that Observation's note; the escape \T\ is '&'
    assert obs["PLT"]["note"] == [{"text": "已复查，请结合临床 & 随访"}]
    assert "note" not in obs["WBC"]
    # performing lab from OBX-23 (name, XON-10 id)
    org = by_type(r.bundle, "Organization")
    assert [(o["name"], o["identifier"][0]["value"]) for o in org] == [("复兴医院检验科", "FXLAB")]
    assert obs["WBC"]["performer"][0]["display"] == "复兴医院检验科"
    # two OBR groups -> two reports, each with its own observations and specimen
    reports = by_type(r.bundle, "DiagnosticReport")
    assert [d["identifier"][0]["value"] for d in reports] == ["LAB-2026-0001", "LAB-2026-0002"]
    assert [d["status"] for d in reports] == ["final", "preliminary"]
    assert [len(d["result"]) for d in reports] == [4, 5]
    assert reports[0]["conclusion"] == "标本轻度溶血，结果仅供参考"
    assert reports[0]["effectiveDateTime"] == "2026-11-20T08:15:00+08:00"
    assert reports[0]["issued"] == "2026-11-20T09:25:00+08:00"
    assert [c["code"] for c in reports[0]["code"]["coding"]] == ["58410-2", "CBC"]
    specimens = by_type(r.bundle, "Specimen")
    assert [
        (
            s["identifier"][0]["value"],
            s["type"]["coding"][0]["code"],
            s["type"]["text"],
            s["collection"]["collectedDateTime"],
            s["receivedTime"],
        )
        for s in specimens
    ] == [
        ("SP-0001", "BLD", "全血", "2026-11-20T08:15:00+08:00", "2026-11-20T08:30:00+08:00"),
        ("SP-0002", "SER", "血清", "2026-11-20T08:15:00+08:00", "2026-11-20T08:35:00+08:00"),
    ]
    assert obs["GLU"]["specimen"]["reference"] == f"Specimen/{specimens[1]['id']}"
    # patient: MRN and national ID from PID-3; the hash is the keyed one
    p = by_type(r.bundle, "Patient")[0]
    assert {i["system"]: i["value"] for i in p["identifier"]} == {
        "urn:hutong:mrn:core": "FX0012345",
        NID: "110102195003151234",
    }
    assert p["name"][0]["text"] == "王秀英" and p["gender"] == "female"
    assert p["birthDate"] == "1950-03-15"
    assert r.patient_hash == patient_hash(KEY, "110102195003151234")
    # unmapped local codes travel with their local system and are reported
    assert [u["code"] for u in r.unmapped] == ["XYZ99", "TITER"]
    assert obs["XYZ99"]["code"]["coding"] == [
        {"system": LOCAL, "code": "XYZ99", "display": "未映射项目"}
    ]


def test_v23_gb18030_decodes_before_splitting() -> None:
    raw = (FIX / "oru_r01_v23_gb18030.hl7").read_bytes()
    assert b"\x83|" in raw  # 億: its trail byte is '|', a byte-level split would cut it
    r = convert(raw, default="UTF-8")
    check_valid(r.bundle)
    obs = obs_by_code(r.bundle)
    assert obs["GLU"]["valueQuantity"]["value"] == 7.9
    assert obs["GLU"]["note"] == [{"text": "患者诉近期饮食不规律；億元(测试字符)"}]
    assert obs["GLU"]["performer"][0]["display"] == "月坛社区检验室"
    assert obs["HBA1C"]["valueQuantity"] == {"value": 8.1, "unit": "%", "system": UCUM, "code": "%"}
    # v2.3: specimen from OBR-15 (SPS component 1 subcomponents) and OBR-14
    sp = by_type(r.bundle, "Specimen")[0]
    assert sp["type"]["coding"][0]["code"] == "SER" and sp["type"]["text"] == "血清"
    assert sp["receivedTime"] == "2026-11-21T07:45:00+08:00"
    assert r.patient_hash == patient_hash(KEY, "110102195003151234")


def test_correction_keeps_ids_and_marks_corrected() -> None:
    first = convert((FIX / "oru_r01_v251_utf8.hl7").read_bytes())
    fixed = convert((FIX / "oru_r01_v251_corrected.hl7").read_bytes())
    check_valid(fixed.bundle)
    a, b = obs_by_code(first.bundle), obs_by_code(fixed.bundle)
    assert {c: o["id"] for c, o in b.items()} == {c: a[c]["id"] for c in b}
    assert b["GLU"]["status"] == "corrected" and b["GLU"]["valueQuantity"]["value"] == 7.25
    assert b["GLU"]["note"] == [{"text": "复测后更正"}]
    assert fixed.corrected == 1
    assert (
        by_type(fixed.bundle, "DiagnosticReport")[0]["id"]
        == by_type(first.bundle, "DiagnosticReport")[1]["id"]
    )
    assert by_type(fixed.bundle, "DiagnosticReport")[0]["status"] == "corrected"


def _mutate(old: bytes, new: bytes) -> bytes:
    raw = (FIX / "oru_r01_v251_utf8.hl7").read_bytes()
    assert old in raw
    return raw.replace(old, new, 1)


BAD = [
    # (bytes, error class, ACK code, ERR location prefix)
    (b"hello, this is not HL7\r", E.Rejected, "AR", "MSH"),
    (_mutate(b"|2.5.1|", b"|2.9|"), E.UnsupportedVersion, "AR", "MSH-12"),
    (_mutate(b"ORU^R01^ORU_R01", b"ADT^A01^ADT_A01"), E.UnsupportedMessage, "AR", "MSH-9"),
    ((FIX / "oru_r01_v251_utf8.hl7").read_bytes()[:60], E.Rejected, "AR", "MSH-12"),
    (
        (FIX / "oru_r01_v23_gb18030.hl7").read_bytes().replace(b"GB18030", b"UNICODE UTF-8"),
        E.EncodingError,
        "AR",
        "MSH-18",
    ),
    (_mutate(b"|UNICODE UTF-8", b"|KOI8-R"), E.EncodingError, "AR", "MSH-18"),
    (_mutate(b"||11.2|", b"||eleven|"), E.BadField, "AE", "OBX[1]-5"),
    (_mutate(b"|78.5|%|40-75|H|||F", b"|78.5|%|40-75|H|||Q"), E.BadField, "AE", "OBX[4]-11"),
    (
        _mutate(b"|LAB-2026-0001|", b"||")
        .replace(b"|ORD-7781|", b"||")
        .replace(b"ORC|RE||LAB-2026-0001\r", b"ORC|RE\r"),
        E.MissingField,
        "AE",
        "OBR[1]-3",
    ),
    (
        _mutate(b"|128|g/L|115-150|N|||F|||20261120090000", b"|128|g/L|115-150|N|||F|||2026132"),
        E.BadField,
        "AE",
        "OBX[2]-14",
    ),
]


@pytest.mark.parametrize("raw,cls,code,location", BAD)
def test_refusals_name_field_and_ack_code(raw: bytes, cls: type, code: str, location: str) -> None:
    with pytest.raises(E.LisMessageError) as info:
        convert(raw)
    exc = info.value
    assert type(exc) is cls and exc.ack_code == code
    assert (exc.field or "").startswith(location)
    assert "110102195003151234" not in exc.message and "王" not in exc.message
    nak = build_ack(Answering.from_raw(raw), exc.ack_code, at=datetime.now(UTC), error=exc)
    parsed = hl7.parse(nak)
    assert ack_code_of(nak) == code
    assert str(parsed.segment("MSA")(3)).startswith(location.split("[")[0])
    err = parsed.segment("ERR")
    if Answering.from_raw(raw).version in ("2.3", "2.4"):  # ERR-1: seg^seq^field^code&text
        assert err.extract_field(1, 1, 1, 4, 1) == exc.hl7_error
    else:  # v2.5: ERR-3 is the table 0357 code
        assert err.extract_field(1, 3, 1, 1, 1) == exc.hl7_error


def test_truncated_inside_obx_is_a_missing_status() -> None:
    raw = (FIX / "oru_r01_v251_utf8.hl7").read_bytes()
    cut = raw[: raw.index(b"|%|40-75|")]
    with pytest.raises(E.MissingField) as info:
        convert(cut)
    assert info.value.field == "OBX[4]-11" and info.value.ack_code == "AE"


def test_v23_nak_uses_err1() -> None:
    raw = (FIX / "oru_r01_v23_gb18030.hl7").read_bytes().replace(b"|7.9|", b"|7,9|")
    with pytest.raises(E.BadField) as info:
        convert(raw)
    nak = build_ack(Answering.from_raw(raw), "AE", at=datetime.now(UTC), error=info.value)
    err = hl7.parse(nak).segment("ERR")
    assert str(err(1)) == "OBX^1^5^102&Data type error"
    assert "|GB18030" in nak.split("\r")[0]  # MSH-18 echoed: the ACK is in the same charset
