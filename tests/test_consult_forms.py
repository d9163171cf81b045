"""The consultation pages' forms turned into FHIR (bridge/web/consult_forms.py), in process:
what each form field becomes, field by field, every resource valid R4, and the inputs refused
(a time that is none, a video link that is not a web address)."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from bridge.consult import codes as C
from bridge.consult import resources as CR
from bridge.errors import InvalidResource
from bridge.fhir.validate import errors as fhir_errors
from bridge.web import consult_forms as forms

PATIENT = "Patient/p1"
NOW = "2026-12-05T15:10:00+08:00"


def resources(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "collection"
    out = [e["resource"] for e in bundle["entry"]]
    for r in out:
        assert fhir_errors(r, limit=3) == [], r
    return out


def test_experts_one_per_line_name_then_department() -> None:
    assert forms.experts("张主任 呼吸内科\n\n  王主任\u3000胸外科 \n赵主任\n") == [
        ("张主任", "呼吸内科"),
        ("王主任", "胸外科"),
        ("赵主任", ""),
    ]


def test_datetime_local_fields_become_beijing_instants() -> None:
    assert forms.local_time("2026-12-05T14:00") == "2026-12-05T14:00:00+08:00"
    assert forms.local_time("2026-12-05T14:00:30") == "2026-12-05T14:00:30+08:00"
    assert forms.local_time("2026-12-05T06:00:00+00:00") == "2026-12-05T06:00:00+00:00"
    for bad in ("", "  ", "tomorrow", "2026-13-05T14:00"):
        with pytest.raises(ValueError, match="not a date and time"):
            forms.local_time(bad)


def test_schedule_names_each_expert_and_the_meeting() -> None:
    bundle = forms.schedule(
        "core",
        [("张主任", "呼吸内科"), ("王主任", "")],
        "2026-12-05T14:00",
        "2026-12-05T15:00",
        " https://meet.example/r/1 ",
    )
    appt, doc1, role1, doc2, role2 = resources(bundle)
    assert appt["start"] == "2026-12-05T14:00:00+08:00"
    assert appt["end"] == "2026-12-05T15:00:00+08:00"
    assert appt["extension"] == [{"url": C.VIDEO_EXTENSION, "valueUrl": "https://meet.example/r/1"}]
    urls = [e["fullUrl"] for e in bundle["entry"]]
    assert [p["actor"]["reference"] for p in appt["participant"]] == [urls[2], urls[4]]
    assert all(CR.typed(p, C.EXPERT_ROLE) for p in appt["participant"])
    assert doc1["name"] == [{"text": "张主任"}] and doc2["name"] == [{"text": "王主任"}]
    assert role1["specialty"] == [{"text": "呼吸内科"}] and "specialty" not in role2
    assert role1["practitioner"]["reference"] == urls[1]
    assert role1["organization"] == {"reference": "Organization/core"}
    # no link: no extension; a link that is not a web address: refused
    assert (
        "extension"
        not in resources(
            forms.schedule("core", [("张主任", "")], "2026-12-05T14:00", "2026-12-05T15:00", "")
        )[0]
    )
    for bad in ("javascript:alert(1)", "file:///etc/passwd", "meet.example/r/1", "https://"):
        with pytest.raises(InvalidResource):
            forms.schedule("core", [("张主任", "")], "2026-12-05T14:00", "2026-12-05T15:00", bad)


def test_report_editor_builds_the_consult_note_diagnosis_and_recommendation() -> None:
    bundle = forms.report(
        PATIENT,
        {
            "icd10": "C34.1",
            "diagnosis": "右肺上叶恶性肿瘤",
            "advice": "建议手术\n术后随访",
            "refer": "1",
            "refer_to": "core",
            "referral_note": "建议上转胸外科",
            "author": "张主任",
        },
        now=NOW,
    )
    comp, cond, rec = resources(bundle)
    urls = [e["fullUrl"] for e in bundle["entry"]]
    assert comp["type"]["coding"][0] == {
        "system": "http://loinc.org",
        "code": C.CONSULT_NOTE,
        "display": "Consult note",
    }
    assert comp["status"] == "preliminary" and comp["date"] == NOW
    assert comp["author"] == [{"display": "张主任"}] and comp["subject"]["reference"] == PATIENT
    diag, advice, referral = comp["section"]
    assert diag["entry"] == [{"reference": urls[1]}] and "右肺上叶恶性肿瘤" in diag["text"]["div"]
    assert advice["text"]["div"] == (
        '<div xmlns="http://www.w3.org/1999/xhtml">建议手术<br/>术后随访</div>'
    )
    assert referral["entry"] == [{"reference": urls[2]}]
    assert cond["code"]["coding"] == [
        {"system": "http://hl7.org/fhir/sid/icd-10", "code": "C34.1", "display": "右肺上叶恶性肿瘤"}
    ]
    assert CR.recommends(rec) and rec["performer"] == [{"reference": "Organization/core"}]
    assert rec["note"] == [{"text": "建议上转胸外科"}] and rec["intent"] == "proposal"
    CR.check_report([comp, cond, rec], "mdt", "ServiceRequest/s1")  # what the workflow checks
    # without a recommendation and a code: the note and a text diagnosis only
    comp2, cond2 = resources(
        forms.report(PATIENT, {"diagnosis": "肺结节", "advice": "随访"}, now=NOW)
    )
    assert cond2["code"] == {"text": "肺结节"} and len(comp2["section"]) == 2
    assert comp2["author"] == [{"display": "会诊专家"}]
    # markup typed into the editor is text in the narrative, never markup
    comp3, _ = resources(
        forms.report(PATIENT, {"diagnosis": "<b>x</b>", "advice": "a & b"}, now=NOW)
    )
    assert "&lt;b&gt;x&lt;/b&gt;" in comp3["section"][0]["text"]["div"]
    assert "a &amp; b" in comp3["section"][1]["text"]["div"]


def test_imaging_reading_records_and_follow_up() -> None:
    study = {
        "resourceType": "ImagingStudy",
        "id": "s9",
        "description": "胸部CT平扫",
        "started": "2026-12-01T08:10:00+08:00",
    }
    [dr] = resources(
        forms.imaging_report(
            PATIENT,
            study,
            {"conclusion": " Lung-RADS 4A ", "findings": "磨玻璃结节", "author": "孙主任"},
            now=NOW,
        )
    )
    assert dr["imagingStudy"] == [{"reference": "ImagingStudy/s9"}]
    assert dr["conclusion"] == "Lung-RADS 4A" and dr["code"]["text"] == "胸部CT平扫"
    assert dr["effectiveDateTime"] == "2026-12-01T08:10:00+08:00" and dr["issued"] == NOW
    assert dr["resultsInterpreter"] == [{"display": "孙主任"}]
    CR.check_report([dr], "imaging-reading", "ServiceRequest/s1")
    [doc] = resources(forms.records(PATIENT, " 肺功能：FEV1 78% ", now=NOW))
    assert doc["description"] == "肺功能：FEV1 78%"
    assert base64.b64decode(doc["content"][0]["attachment"]["data"]).decode() == "肺功能：FEV1 78%"
    [plan] = resources(forms.follow_up(PATIENT, "两周后随访", "2026-12-20"))
    assert plan["period"] == {"start": "2026-12-20"} and plan["description"] == "两周后随访"
    consent = forms.referral_consent({"reference": PATIENT}, NOW)
    assert consent["request"] == {"method": "POST", "url": "Consent"}
    assert fhir_errors(consent["resource"], limit=3) == []
    assert consent["resource"]["patient"] == {"reference": PATIENT}
