"""ORU^R01 -> FHIR without loss, in process: each case a message as real senders write it,
checked field by field against what it says; every Bundle valid R4 (schema and R4B)."""

from __future__ import annotations

import base64
import hashlib
from typing import Any
from urllib.parse import unquote

import pytest

from adapters.lis import errors as E
from tests.test_lis_oru import LOCAL, LOINC, UCUM, by_type, check_valid, convert

SNOMED = "http://snomed.info/sct"
MSH = (
    "MSH|^~\\&|LIS-T|{fac}|HUTONG|FUXING|20261120093000||ORU^R01^ORU_R01|{ctl}|P|2.5.1|||"
    "AL|NE|CHN|UNICODE UTF-8"
)
PID = "PID|1||FX0099^^^FUXING^MR||测试^患者||19700101|M"


def oru(*segments: str, fac: str = "FXLAB", ctl: str = "T-1") -> bytes:
    return "\r".join([MSH.format(fac=fac, ctl=ctl), PID, *segments]).encode("utf-8") + b"\r"


def obr(n: int, filler: str, code: str = "PANEL^检验组合^L") -> str:
    return f"OBR|{n}||{filler}|{code}|||20261120081500|||||||||||||||20261120092500|||F"


def results(raw: bytes) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    r = convert(raw)
    check_valid(r.bundle)
    return by_type(r.bundle, "DiagnosticReport"), by_type(r.bundle, "Observation")


def observations_of(dr: dict[str, Any], obs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_id = {o["id"]: o for o in obs}
    return [by_id[r["reference"].split("/")[1]] for r in dr.get("result", ())]


def test_ed_pdf_kept_byte_for_byte_and_rp_as_url() -> None:
    pdf = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj<</Type/Catalog>>endobj\ntrailer<<>>\n%%EOF\n"
    data = base64.b64encode(pdf).decode()
    raw = oru(
        obr(1, "RPT-1"),
        "OBX|1|NM|GLU^葡萄糖^L||5.2|mmol/L|3.9-6.1|N|||F",
        f"OBX|2|ED|PDF^检验报告单^L||LIS^AP^PDF^Base64^{data}||||||F",
        "OBX|3|RP|IMG^图像^L||http://lis.example/img/1 2.png^LIS^IM^PNG||||||F",
    )
    [dr], obs = results(raw)
    assert [o["code"]["coding"][0]["code"] for o in observations_of(dr, obs)] == ["2345-7"]
    pdf_form, img_form = dr["presentedForm"]
    assert pdf_form["data"] == data  # the base64 text exactly as sent
    assert base64.b64decode(pdf_form["data"]) == pdf
    assert (
        hashlib.sha256(base64.b64decode(pdf_form["data"])).digest() == hashlib.sha256(pdf).digest()
    )
    assert pdf_form["contentType"] == "application/pdf" and pdf_form["title"] == "检验报告单"
    assert img_form == {
        "url": "http://lis.example/img/1%202.png",
        "contentType": "image/png",
        "title": "图像",
    }
    # one ED with bad base64 is that field's error (AE naming OBX-5), not a silent loss
    with pytest.raises(E.BadField) as info:
        convert(oru(obr(1, "RPT-1"), "OBX|1|ED|PDF^报告^L||LIS^AP^PDF^Base64^@@@@||||||F"))
    assert info.value.field == "OBX[1]-5.5" and info.value.ack_code == "AE"


def test_structured_sub_ids_are_distinct_observations() -> None:
    # newborn-screening style: the same test code under structured OBX-4 sub-ids
    raw = oru(
        obr(1, "NBS-1"),
        "OBX|1|NM|HGB^血红蛋白^L|1^1|120|g/L|||||F",
        "OBX|2|NM|HGB^血红蛋白^L|1^2|125|g/L|||||F",
        "OBX|3|NM|HGB^血红蛋白^L|3^2|130|g/L|||||F",
        "OBX|4|ST|NOTE^说明^L||第一行||||||F",
        "OBX|5|ST|NOTE^说明^L||第二行||||||F",
    )  # no sub-id at all: kept, by position
    [dr], obs = results(raw)
    got = observations_of(dr, obs)
    assert len(got) == 5 and len({o["id"] for o in got}) == 5
    assert [o.get("valueQuantity", {}).get("value") for o in got[:3]] == [120, 125, 130]
    assert [o["valueString"] for o in got[3:]] == ["第一行", "第二行"]
    # the same message again gives the same ids (a correction updates them in place)
    [dr2], obs2 = results(raw)
    assert [o["id"] for o in observations_of(dr2, obs2)] == [o["id"] for o in got]


def test_code_only_in_the_alternate_triplet_and_both_codings_kept() -> None:
    raw = oru(
        obr(1, "ALT-1"),
        "OBX|1|CWE|^^^HAVM^甲肝IgM抗体^L||260385009^Negative^SCT^NEG^阴性^L||||||F",
        "OBX|2|NM|22316-4^HBc Ab^LN^HBCQ^乙肝核心抗体定量^L^2.52||0.70|[IU]/mL^IU/mL^UCUM"
        "|<0.50|H|||F",
        "OBX|3|NM|GLU^葡萄糖^L^2345-7^Glucose^LN||6.1|mmol/L|||||F",
    )
    [dr], obs = results(raw)
    a, b, c = observations_of(dr, obs)
    assert a["code"] == {
        "coding": [{"system": LOCAL, "code": "HAVM", "display": "甲肝IgM抗体"}],
        "text": "甲肝IgM抗体",
    }
    assert a["valueCodeableConcept"]["coding"] == [
        {"system": SNOMED, "code": "260385009", "display": "Negative"},
        {"system": LOCAL, "code": "NEG", "display": "阴性"},
    ]
    assert b["code"]["coding"] == [
        {"system": LOINC, "code": "22316-4", "version": "2.52", "display": "HBc Ab"},
        {"system": LOCAL, "code": "HBCQ", "display": "乙肝核心抗体定量"},
    ]
    assert b["valueQuantity"] == {"value": 0.70, "unit": "IU/mL", "system": UCUM, "code": "[IU]/mL"}
    assert [x["system"] for x in c["code"]["coding"]][:1] == [LOINC]
    assert {(x["system"], x["code"]) for x in c["code"]["coding"]} >= {
        (LOINC, "2345-7"),
        (LOCAL, "GLU"),
    }


def test_reference_range_components_kept() -> None:
    raw = oru(
        obr(1, "RR-1"),
        "OBX|1|NM|TC^总胆固醇^L||180|mg/dL|35-150^35^150|H|||F",
        "OBX|2|NM|GLU^葡萄糖^L||5.0|mmol/L|^3.9^6.1|N|||F",
        "OBX|3|NM|CRP^C反应蛋白^L||3|mg/L|<10|N|||F",
    )
    [dr], obs = results(raw)
    tc, glu, crp = observations_of(dr, obs)
    assert tc["referenceRange"] == [
        {
            "low": {"value": 35, "unit": "mg/dL", "system": UCUM, "code": "mg/dL"},
            "high": {"value": 150, "unit": "mg/dL", "system": UCUM, "code": "mg/dL"},
            "text": "35-150^35^150",
        }
    ]
    assert glu["referenceRange"][0]["text"] == "^3.9^6.1"
    assert (
        glu["referenceRange"][0]["low"]["value"],
        glu["referenceRange"][0]["high"]["value"],
    ) == (3.9, 6.1)
    assert crp["referenceRange"][0]["text"] == "<10"
    assert crp["referenceRange"][0]["high"]["value"] == 10
    assert "low" not in crp["referenceRange"][0]


@pytest.mark.parametrize("facility", ["EHR Facility", "复兴医院 检验科", "LAB:1/2#x"])
def test_any_facility_gives_a_valid_identifier_system(facility: str) -> None:
    [dr], _ = results(
        oru(obr(1, "F-1"), "OBX|1|NM|GLU^葡萄糖^L||5.0|mmol/L|||||F", fac=facility)
    )  # check_valid: the R4 schema accepts the system
    system = dr["identifier"][0]["system"]
    assert system.startswith("urn:hutong:lis:core:")
    assert system.isascii() and " " not in system and "#" not in system
    assert unquote(system.removeprefix("urn:hutong:lis:core:")) == facility  # one to one
    # plain names keep their former system
    [plain], _ = results(oru(obr(1, "F-1"), "OBX|1|NM|GLU^葡萄糖^L||5.0|mmol/L|||||F"))
    assert plain["identifier"][0]["system"] == "urn:hutong:lis:core:FXLAB"


def test_repeated_filler_numbers_are_separate_reports() -> None:
    raw = oru(
        obr(1, "SAME-1", "CBC^血常规^L"),
        "OBX|1|NM|WBC^白细胞计数^L||6.1|10^9/L|||||F",
        obr(2, "SAME-1", "CBC^血常规^L"),
        "OBX|1|NM|WBC^白细胞计数^L||7.3|10^9/L|||||F",
        obr(3, "SAME-1", "CRP^C反应蛋白^L"),
        "OBX|1|NM|CRP^C反应蛋白^L||2|mg/L|||||F",
    )
    drs, obs = results(raw)
    assert len(drs) == 3 and len({d["id"] for d in drs}) == 3
    assert [d["identifier"][0]["value"] for d in drs] == ["SAME-1"] * 3
    values = [[o["valueQuantity"]["value"] for o in observations_of(d, obs)] for d in drs]
    assert values == [[6.1], [7.3], [2]]
    assert len(obs) == 3  # every Observation is referenced by its own report


def test_value_types_carried() -> None:
    raw = oru(
        obr(1, "VT-1"),
        "OBX|1|TX|RPT^报告^L||第一行~  缩进第二行~~||||||F",
        "OBX|2|FT|IMP^印象^L||结论\\.br\\\\.br\\||||||F",
        "OBX|3|NM|PH^pH^L||>=7.45||||||F",
        "OBX|4|SN|TITER^滴度^L||^1^:^40||||||F",
        "OBX|5|SN|RNG^范围^L||^10^-^20|mg/L|||||F",
        "OBX|6|SN|ODD^奇怪^L||<>^5||||||F",
        "OBX|7|DT|DOB^日期^L||20261120||||||F",
        "OBX|8|TM|TIME^时间^L||0930||||||F",
        "OBX|9|MED|DEV^设备^L||20090505||||||F",
        "OBX|10|IS|BLOOD^血型^L||A||||||F",
        "OBX|11||NV^无值^L||||||||X",
        'OBX|12|NM|DEL^已删除^L||""|mmol/L|||||D',
        "OBX|13|CWE|EMPTY^空^L||^^||||||F",
        "OBX|14|TX|CMT^备注^L||比值 A^B 正常~第二行||||||F",
    )
    [dr], obs = results(raw)
    o = observations_of(dr, obs)
    assert o[0]["valueString"] == "第一行\n  缩进第二行\n\n"  # repetitions, indent, trailing
    assert o[1]["valueString"] == "结论\n\n"  # \.br\ line breaks, trailing ones too
    assert o[2]["valueQuantity"] == {"value": 7.45, "comparator": ">="}
    assert o[3]["valueRatio"] == {"numerator": {"value": 1}, "denominator": {"value": 40}}
    assert (o[4]["valueRange"]["low"]["value"], o[4]["valueRange"]["high"]["value"]) == (10, 20)
    assert o[5]["valueString"] == "<>^5"  # not a number form: its text, never a refusal
    assert o[6]["valueDateTime"] == "2026-11-20"
    assert o[7]["valueTime"] == "09:30:00"
    assert o[8]["valueString"] == "20090505"  # unknown type MED: as text
    assert o[9]["valueCodeableConcept"]["coding"][0]["code"] == "A"
    assert not any(k.startswith("value") for k in o[10]) and o[10]["status"] == "cancelled"
    # the v2 null "" and a value of separators only: no value, not a refused number
    assert [[k for k in x if k.startswith("value")] for x in o[11:13]] == [[], []]
    assert o[11]["status"] == "entered-in-error"
    assert o[13]["valueString"] == "比值 A^B 正常\n第二行"  # a text keeps a '^' written in it


def test_codeless_report_text_lines_become_the_report_text() -> None:
    raw = oru(
        obr(1, "TXT-1"),
        "OBX|1|TX|||超声所见：||||||F",
        "OBX|2|TX|||  肝脏大小正常||||||F",
        "OBX|3|TX|||||||||F",
        "OBX|4|NM|LIVER^肝右叶斜径^L||120|mm|||||F",
    )
    [dr], obs = results(raw)
    [form] = dr["presentedForm"]
    assert form["contentType"] == "text/plain;charset=utf-8"
    assert base64.b64decode(form["data"]).decode() == "超声所见：\n  肝脏大小正常\n"
    assert [o["valueQuantity"]["value"] for o in observations_of(dr, obs)] == [120]
