"""Imaging reports (``result.imaging``, 检查报告) reach the HL7 v2 HIS, the web-service HIS and
the PACS of the member that asked for them.

Two community centres refer patients up to the core hospital from their own HIS: Yuetan's
speaks HL7 v2 over MLLP (a simulated vendor process), Zhanlanlu's is an XML web service (a
simulated vendor process over real HTTP SOAP). The core's radiologists report: one report on
the core's own CT (the ImagingStudy travels with it) and one remote reading (远程影像诊断) of a
study Yuetan's own PACS holds (the report names the study by its UID only, and carries a PDF).
Yuetan's HIS files one ORU^R01 (OBR-4 the exam code, ZDS the study UID, findings and
impression as OBX TX, the PDF as OBX ED), Zhanlanlu's HIS one exam report document per report
(cda-exam-report.xsd); each is checked field by field against the FHIR report the core sent,
the PDF byte for byte. Yuetan's PACS adapter (real pynetdicom C-STORE of the study first)
shows the remote reading attached to its study; the report on the core's study is not
attached (not a study Yuetan's PACS holds). The radiologist then finalises the reading: Yuetan's
HIS gets a second ORU (status F), Zhanlanlu's HIS version 2 of the document (replacing version
1), and the PACS still lists the reading once, now final. A report on Yuetan's study from a
thread Yuetan does not know is quarantined by its PACS adapter, not attached.

The pure part first: the ORU and the document built from a Bundle and read back, what the XSD
refuses, and how a report's study UID is found.
"""

from __future__ import annotations

import base64
import copy
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B.diagnosticreport import DiagnosticReport

from adapters.his_hl7 import messages, results, v2
from adapters.his_ws import cda, exam_report
from adapters.his_ws.errors import SchemaInvalid
from adapters.hl7v2 import charset
from adapters.imaging import imaging_reports_from_bundle
from adapters.pacs.report import parse_oru
from adapters.pacs.study import study_resource_id
from adapters.slips import ReferralSlip
from adapters.slips_fhir import Codes
from bridge.fhir.validate import validate_resource
from bridge.results.attach import imaging_events
from simulators.his_hl7 import VendorHis, read_results
from simulators.his_ws import HisWsProcess
from tests.harness import ROOT, Alliance, db_rows, free_port_block, wait_for
from tests.test_pacs import NID1, NID2, S1, push, write_modality_files

CORE, HL7C, WSC = "fuxing", "yuetan-chc", "zhanlanlu-chc"
KINDS = [
    "referral.request",
    "referral.status",
    "referral.cancel",
    "referral.return",
    "result.imaging",
]
HIS_APP = "YTHIS"
CORE_UID = "1.2.826.0.1.3680043.8.498.7001"  # the core's own CT
DCM = "http://dicom.nema.org/resources/ontology/DCM"
#: a small but real PDF (the bytes must arrive unchanged, binary part included)
PDF = (
    b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n"
    b"2 0 obj<</Type/Pages/Kids[]/Count 0>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n"
)
FINDINGS_CT = "右下肺见一枚约4mm结节。\n纵隔未见肿大淋巴结。"
FINDINGS_READ = "左肺上叶见磨玻璃影|约8mm^边界清。"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def study(subject: dict[str, str]) -> dict[str, Any]:
    ct = {"system": DCM, "code": "CT"}
    return {
        "resourceType": "ImagingStudy",
        "id": study_resource_id(CORE_UID),
        "status": "available",
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{CORE_UID}"}],
        "subject": subject,
        "started": "2026-11-20T09:20:00+08:00",
        "modality": [ct],
        "numberOfSeries": 1,
        "numberOfInstances": 2,
        "series": [
            {
                "uid": f"{CORE_UID}.1",
                "modality": ct,
                "numberOfInstances": 2,
                "bodySite": {
                    "system": "http://snomed.info/sct",
                    "code": "51185008",
                    "display": "胸部",
                },
            }
        ],
    }


def reports(subject: dict[str, str], tag: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The core's report on its own CT, and its remote reading of S1 (Yuetan's study)."""
    ct = {
        "resourceType": "DiagnosticReport",
        "id": f"rpt-ct-{tag}",
        "status": "final",
        "identifier": [
            {
                "type": {
                    "coding": [
                        {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}
                    ]
                },
                "value": "ACC-7001",
            }
        ],
        "category": [
            {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD"}]}
        ],
        "code": {
            "coding": [{"system": "http://loinc.org", "code": "24627-2", "display": "胸部CT平扫"}],
            "text": "胸部CT平扫",
        },
        "subject": subject,
        "effectiveDateTime": "2026-11-20T09:30:00+08:00",
        "issued": "2026-11-20T11:00:00+08:00",
        "resultsInterpreter": [{"display": "张影像"}],
        "imagingStudy": [{"reference": f"ImagingStudy/{study_resource_id(CORE_UID)}"}],
        "conclusion": "右下肺小结节，建议3个月复查。",
        "presentedForm": [
            {"contentType": "text/plain; charset=utf-8", "data": _b64(FINDINGS_CT.encode())}
        ],
    }
    reading = {
        "resourceType": "DiagnosticReport",
        "id": f"rpt-read-{tag}",
        "status": "preliminary",
        "code": {
            "coding": [
                {"system": "urn:hutong:ris:exam-code", "code": "CT-CH-02", "display": "胸部CT增强"}
            ],
            "text": "胸部CT增强",
        },
        "subject": subject,
        "effectiveDateTime": "2026-11-20T10:00:00+08:00",
        "issued": "2026-11-20T12:30:00+08:00",
        "resultsInterpreter": [{"display": "王主任"}],
        "imagingStudy": [
            {
                "reference": f"ImagingStudy/{study_resource_id(S1)}",
                "identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{S1}"},
            }
        ],
        "conclusion": "左肺上叶磨玻璃结节\n考虑早期病变，建议随访。",
        "presentedForm": [
            {"contentType": "text/plain; charset=utf-8", "data": _b64(FINDINGS_READ.encode())},
            {"contentType": "application/pdf", "title": "远程影像诊断报告", "data": _b64(PDF)},
        ],
    }
    return ct, reading


def bundle(subject: dict[str, str], tag: str) -> dict[str, Any]:
    patient = {"resourceType": "Patient", "id": subject["reference"].split("/", 1)[1]}
    resources = [patient, study(subject), *reports(subject, tag)]
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"fullUrl": f"urn:uuid:{r['id']}", "resource": r} for r in resources],
    }


def lines(value: list[list[str]]) -> str:
    """An OBX-5 of TX lines (one repetition per line) as text."""
    return "\n".join(rep[0] for rep in value)


def assert_oru_report(
    got: dict[str, Any],
    dr: dict[str, Any],
    *,
    code: list[str],
    uid: str,
    findings: str,
    modality: str,
    body_site: str,
    pdf: bytes | None,
) -> None:
    """One OBR group of the imaging ORU against the FHIR report it was made from."""
    status = {"final": "F", "preliminary": "P", "corrected": "C"}[dr["status"]]
    assert got["filler"] == dr["id"] and got["code"] == code
    assert (got["study_uid"], got["modality"], got["status"]) == (uid, modality, status)
    assert got["interpreter"] == dr["resultsInterpreter"][0]["display"]
    assert got["issued"] == results.ts(dr["issued"])
    items = {x["code"][0]: x for x in got["items"]}
    assert lines(items["59776-5"]["value"]) == findings
    assert lines(items["19005-8"]["value"]) == dr["conclusion"]
    assert all(x["status"] == status for x in got["items"])
    if body_site:
        assert items["123014"]["value"] == [[body_site]]
    if pdf is None:
        assert "18748-4" not in items
    else:
        ed = items["18748-4"]
        assert ed["vtype"] == "ED" and ed["value"][0][:4] == ["", "AP", "PDF", "Base64"]
        assert base64.b64decode(ed["value"][0][4]) == pdf


# -- pure -----------------------------------------------------------------------------------


HEADER = messages.Header("HUTONG", HL7C, HIS_APP, "", "GB 18030-2000")
TO = results.Addressee("YT0001", HIS_APP, "YTZZ-IMG-1", "thread-1")
SUBJECT = {"reference": "Patient/p1"}


def test_imaging_oru_reads_back_field_by_field_and_as_a_ris_report() -> None:
    b = bundle(SUBJECT, "x")
    ct, reading = reports(SUBJECT, "x")
    for r in (ct, reading, study(SUBJECT)):
        validate_resource(r)
    gaps: list[Any] = []
    text = results.imaging_oru_message(
        HEADER, b, TO, Codes(None, HL7C, gaps), "PKT-9", datetime(2026, 11, 20, 4, tzinfo=UTC)
    )
    assert text is not None
    msg = v2.parse(text)
    msh = msg.segment("MSH")
    assert (
        v2.get(msg, msh, 9, 1),
        v2.get(msg, msh, 9, 2),
        v2.get(msg, msh, 10),
        v2.get(msg, msh, 12),
    ) == ("ORU", "R01", "PKT-9", "2.5.1")
    got = read_results(msg)
    assert (got["mrn"], got["mrn_authority"], got["thread"]) == ("YT0001", HIS_APP, "thread-1")
    first, second = got["reports"]
    assert first["placer"] == second["placer"] == TO.slip_no
    assert first["accession"] == "ACC-7001" and second["accession"] == ""
    assert first["collected"] == "20261120092000+0800"  # the study's start
    assert_oru_report(
        first,
        ct,
        code=["24627-2", "胸部CT平扫", "LN"],
        uid=CORE_UID,
        findings=FINDINGS_CT,
        modality="CT",
        body_site="胸部",
        pdf=None,
    )
    assert_oru_report(
        second,
        reading,
        code=["CT-CH-02", "胸部CT增强", "urn:hutong:ris:exam-code"],
        uid=S1,
        findings=FINDINGS_READ,
        modality="",
        body_site="",
        pdf=PDF,
    )
    assert gaps == []  # no maps at all: nothing to count
    # the PACS adapter's RIS reader (one report per message) takes the first report back
    raw = charset.encode(text, "gb18030")  # as it goes on the wire (MSH-18 GB 18030-2000)
    assert "王主任".encode("gb18030") in raw
    oru = parse_oru(raw, "+08:00")
    assert (oru.study_uid, oru.status, oru.accession) == (CORE_UID, "final", ct["id"])
    assert next(t for c, t in oru.texts if c == "19005-8") == ct["conclusion"]


def test_imaging_oru_codes_from_the_sites_exam_map(tmp_path: Path) -> None:
    """With the site's exam map, OBR-4 is its own code (LOCALEXAM); an unmapped one is the
    sender's code and system, counted once as a gap."""
    maps = _exam_maps(tmp_path, HL7C)
    from bridge.mapping.conceptmap import load_site

    gaps: list[Any] = []
    text = results.imaging_oru_message(
        HEADER,
        bundle(SUBJECT, "x"),
        TO,
        Codes(load_site(maps), HL7C, gaps),
        "PKT-10",
        datetime(2026, 11, 20, tzinfo=UTC),
    )
    assert text is not None
    first, second = read_results(v2.parse(text))["reports"]
    assert first["code"] == ["JC4001", "胸部CT平扫", "LOCALEXAM", "24627-2", "胸部CT平扫", "LN"]
    assert second["code"] == ["CT-CH-02", "胸部CT增强", "urn:hutong:ris:exam-code"]
    assert [g.code for g in gaps] == ["CT-CH-02"]


def test_exam_report_document_reads_back_and_its_xsd_refuses_a_bad_uid() -> None:
    site = cda.Site(member=WSC, name="展览路社区卫生服务中心")
    ct, reading = reports(SUBJECT, "x")
    neutral = imaging_reports_from_bundle(
        bundle(SUBJECT, "x"), Codes(None, WSC, []), slip_no="ZL-1", sender=CORE, patient_id="ZL0001"
    )
    docs = exam_report.from_reports(
        neutral,
        Codes(None, WSC, []),
        site,
        producer=CORE,
        referral_doc="ZL-ZZD-1",
        mrn="ZL0001",
        mrn_authority=WSC,
        received_at="2026-11-20T13:00:00+08:00",
    )
    for d in docs:
        d.version, d.doc_id = 1, exam_report.doc_id_of(d.report_id, 1)
        back = exam_report.read(exam_report.write(d, site), site, record=d.doc_id)
        assert back == d
    a, b = docs
    assert (a.code, a.code_system, a.study_uid, a.modality, a.body_site, a.accession) == (
        "24627-2",
        cda.LOINC_OID,
        CORE_UID,
        "CT",
        "胸部",
        "ACC-7001",
    )
    assert (b.code, b.code_system, b.study_uid, b.pdf, b.conclusion, b.findings) == (
        "CT-CH-02",
        "urn:hutong:ris:exam-code",
        S1,
        PDF,
        reading["conclusion"],
        FINDINGS_READ,
    )
    assert (a.pdf, a.conclusion, a.doctor, b.doctor) == (b"", ct["conclusion"], "张影像", "王主任")
    with pytest.raises(SchemaInvalid) as err:
        exam_report.write(replace(a, study_uid="1.2.x.3"), site)
    assert "serviceEvent" in (err.value.field or err.value.message)


def test_a_reports_study_uid_from_the_bundle_or_its_reference() -> None:
    events = imaging_events(
        bundle(SUBJECT, "x"), key="PKT", sender=CORE, thread="t", patient="Patient/mine"
    )
    assert [(e.key, e.study_uid, e.report["subject"]) for e in events] == [
        ("PKT:rpt-ct-x", CORE_UID, {"reference": "Patient/mine"}),
        ("PKT:rpt-read-x", S1, {"reference": "Patient/mine"}),
    ]
    lone = copy.deepcopy(reports(SUBJECT, "y")[0])
    lone.pop("imagingStudy")
    assert imaging_events({"entry": [{"resource": lone}]}, key="P", sender=CORE, thread=None) == []


def _exam_maps(root: Path, member: str) -> Path:
    """The member's shipped maps plus an exam catalogue (24627-2 is its JC4001)."""
    import shutil

    maps = root / "mappings" / member
    shutil.copytree(ROOT / "mappings" / member, maps)
    with (maps / "codes" / "maps.csv").open("a", encoding="utf-8") as f:
        f.write(
            f"exam,{member} 检查项目→LOINC,{member} exams to LOINC,"
            f"http://hutong.dev/CodeSystem/{member}/exam,http://loinc.org,2017.1\n"
        )
    (maps / "codes" / "exam.csv").write_text(
        "source_code,source_display,target_code,target_display,equivalence,comment\n"
        "JC4001,胸部CT平扫,24627-2,CT Chest,equivalent,\n",
        encoding="utf-8",
    )
    return maps


# -- real processes -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("imaging-hl7-ws")
    adapter, his_port, scp = (free_port_block(3) + i for i in range(3))
    modality = root / "modality"
    write_modality_files(modality)
    ws = HisWsProcess(root / "his-ws.sqlite", WSC, site_name="展览路社区卫生服务中心")
    members = [
        {"id": CORE, "zh": "复兴医院", "en": "Fuxing Hospital", "role": "core"},
        {
            "id": HL7C,
            "zh": "月坛社区卫生服务中心",
            "en": "Yuetan CHC",
            "role": "community",
            "adapters": [
                {
                    "name": "his",
                    "type": "his-hl7",
                    "mappings": str(_exam_maps(root, HL7C)),
                    "receives": ["referral.*", "result.*"],
                    "options": {
                        "listen": f"127.0.0.1:{adapter}",
                        "his": f"127.0.0.1:{his_port}",
                        "charset": "GB 18030-2000",
                        "his_application": HIS_APP,
                        "ack_timeout_s": 5,
                        "connect_timeout_s": 2,
                    },
                },
                {
                    "name": "pacs",
                    "type": "pacs-dicom",
                    "receives": ["imaging.*"],
                    "options": {
                        "bind": f"127.0.0.1:{scp}",
                        "ae_title": "YUETAN",
                        "complete_after_s": 120,
                    },
                },
            ],
        },
        {
            "id": WSC,
            "zh": "展览路社区卫生服务中心",
            "en": "Zhanlanlu CHC",
            "role": "community",
            "adapters": [
                {
                    "name": "his",
                    "type": "his-xml-ws",
                    "mappings": str(_exam_maps(root, WSC)),
                    "receives": ["referral.*", "result.*"],
                    "options": {"url": ws.url, "poll_s": 0.2, "timeout_s": 5.0},
                }
            ],
        },
    ]
    rules = [
        r
        for m in (HL7C, WSC)
        for r in ({"from": m, "to": CORE, "kinds": KINDS}, {"from": CORE, "to": m, "kinds": KINDS})
    ]
    a = Alliance(root / "alliance", members, rules)
    his = VendorHis(
        root / "chc-his.sqlite",
        f"127.0.0.1:{adapter}",
        application=HIS_APP,
        facility="yuetan-his",
        charset_name="GB 18030-2000",
    )
    log = open(root / "chc-his.log", "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "simulators.his_hl7",
            "serve",
            "--db",
            str(his.db),
            "--listen",
            f"127.0.0.1:{his_port}",
        ],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        ws.start()
        a.start(CORE, HL7C, WSC)
        yield {"a": a, "his": his, "ws": ws.his, "scp": scp, "modality": modality}
    finally:
        a.stop_all()
        ws.stop()
        proc.terminate()
        proc.wait(30)
        log.close()


def slip(
    slip_no: str, mrn: str, diagnosis: str, department: str, id_number: str = NID1
) -> ReferralSlip:
    """A referral slip in the centre's own codes (its diagnosis and department catalogues)."""
    return ReferralSlip(
        slip_no=slip_no,
        kind="up-exam",
        to_member=CORE,
        patient_name="张三",
        gender="male",
        birth_date="1980-01-01",
        id_number=id_number,
        phone="13901230000",
        mrn=mrn,
        diagnosis_code=diagnosis,
        diagnosis_name="原发性高血压",
        reason="胸部CT复核",
        summary="咳嗽两周",
        department_code=department,
        urgent=False,
        consent_by="患者本人",
        doctor="李医生",
        written_at="2026-11-20T07:30:00+08:00",
    )


def thread_from(core: Any, member: str) -> str:
    return wait_for(
        lambda: next(
            (
                r["thread"]
                for r in core.api("GET", "/local/v1/referrals")
                if r["status"] == "received" and r["referrer"] == member
            ),
            None,
        ),
        timeout=60,
        what=f"referral from {member} at the core",
    )


@pytest.mark.slow
def test_imaging_reports_in_the_hl7_his_the_ws_his_and_the_pacs(site: dict[str, Any]) -> None:
    a = site["a"]
    core, hl7c, wsc = a.node(CORE), a.node(HL7C), a.node(WSC)
    # Yuetan's own CT (S1) is in its PACS adapter (a real C-STORE association)
    pushed = push(site["modality"], site["scp"], study=S1, called="YUETAN")
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    s1 = wait_for(
        lambda: _get(hl7c, "ImagingStudy", study_resource_id(S1)),
        what="S1 in Yuetan's PACS adapter",
    )
    # both centres refer the patient up from their own HIS
    hl7_slip = slip("YTZZ-IMG-1", "YT0001", "YTZ-01", "KS01")
    ws_slip = slip("ZLZZ-IMG-1", "ZL0001", "ZLS001", "01", NID2)  # another patient
    assert site["his"].refer(hl7_slip, control_id="YT-REF-IMG-1").code == "AA"
    ref_doc = site["ws"].write_referral(ws_slip)
    hl7_thread, ws_thread = thread_from(core, HL7C), thread_from(core, WSC)
    # the core's radiology reports go back on each referral's thread
    sent: dict[str, tuple[str, dict[str, Any]]] = {}
    for member, thread, tag in ((HL7C, hl7_thread, "yt"), (WSC, ws_thread, "zl")):
        subject = core.api("GET", f"/fhir/Task/{thread}", role="clinician")["for"]
        b = bundle(subject, tag)
        (packet,) = core.send(member, "result.imaging", [b], thread=thread)
        sent[member] = (packet, b)
    ct_yt, read_yt = (e["resource"] for e in sent[HL7C][1]["entry"][2:])
    ct_zl, read_zl = (e["resource"] for e in sent[WSC][1]["entry"][2:])

    # -- the HL7 v2 HIS: one ORU^R01 over MLLP, MSH-10 the packet id
    ((control, oru, raw),) = wait_for(
        lambda: site["his"].imaging_reports() or None,
        timeout=60,
        what="the imaging ORU in Yuetan's HIS",
    )
    assert control == sent[HL7C][0]
    assert b"|ORU^R01^ORU_R01|" in raw and "王主任".encode("gb18030") in raw
    assert NID1.encode() not in raw and "张三".encode("gb18030") not in raw
    assert (oru["mrn"], oru["mrn_authority"], oru["thread"]) == ("YT0001", HIS_APP, hl7_thread)
    first, second = oru["reports"]
    assert first["placer"] == second["placer"] == hl7_slip.slip_no
    assert_oru_report(
        first,
        ct_yt,
        code=["JC4001", "胸部CT平扫", "LOCALEXAM", "24627-2", "胸部CT平扫", "LN"],
        uid=CORE_UID,
        findings=FINDINGS_CT,
        modality="CT",
        body_site="胸部",
        pdf=None,
    )
    # the reading names S1 by its UID only: modality, body site and exam time are those of
    # Yuetan's own study (its PACS adapter's ImagingStudy)
    held = {
        "modality": "/".join(m["code"] for m in s1["modality"] if m["code"] != "SR"),
        "sites": "/".join(
            dict.fromkeys(
                x["bodySite"].get("display") or x["bodySite"]["code"]
                for x in s1["series"]
                if x.get("bodySite")
            )
        ),
    }
    assert held["modality"] and held["sites"]
    assert_oru_report(
        second,
        read_yt,
        code=["CT-CH-02", "胸部CT增强", "urn:hutong:ris:exam-code"],
        uid=S1,
        findings=FINDINGS_READ,
        modality=held["modality"],
        body_site=held["sites"],
        pdf=PDF,
    )
    assert second["collected"] == results.ts(s1["started"])
    assert site["his"].attempts()[control] == (1, "AA")

    # -- the web-service HIS: one exam report document per report, over HTTP SOAP
    docs = wait_for(
        lambda: r if len(r := site["ws"].exam_reports()) == 2 else None,
        timeout=60,
        what="two exam reports in Zhanlanlu's HIS",
    )
    by_id = {d.report_id: d for d in docs}
    for dr in (ct_zl, read_zl):
        d = by_id[dr["id"]]
        assert (d.doc_id, d.version, d.replaces) == (f"{dr['id']}-v1", 1, "")
        assert (d.referral_doc, d.slip_no, d.mrn, d.mrn_authority, d.producer) == (
            ref_doc,
            ws_slip.slip_no,
            ws_slip.mrn,
            WSC,
            CORE,
        )
        assert (d.conclusion, d.status, d.doctor) == (
            dr["conclusion"],
            dr["status"],
            dr["resultsInterpreter"][0]["display"],
        )
        assert d.written_at == results.ts(dr["issued"])
        assert site["ws"].deliveries(d.doc_id) == 1
    c, r = by_id[ct_zl["id"]], by_id[read_zl["id"]]
    assert (c.code, c.code_system, c.name) == ("JC4001", cda.Site(member=WSC).exam, "胸部CT平扫")
    assert (c.study_uid, c.modality, c.body_site, c.accession, c.findings, c.pdf) == (
        CORE_UID,
        "CT",
        "胸部",
        "ACC-7001",
        FINDINGS_CT,
        b"",
    )
    assert c.exam_at == "20261120092000+0800"
    assert (r.code, r.code_system, r.study_uid, r.findings, r.pdf) == (
        "CT-CH-02",
        "urn:hutong:ris:exam-code",
        S1,
        FINDINGS_READ,
        PDF,
    )

    # -- Yuetan's PACS: the remote reading is attached to its study, the CT report is not
    def attached() -> Any:
        got = hl7c.api("GET", f"/local/v1/adapters/pacs/studies/{S1}/reports", role="clinician")
        return got if any(x["id"] == read_yt["id"] for x in got["reports"]) else None

    shown = wait_for(attached, what="the reading attached to S1")
    (mine,) = [x for x in shown["reports"] if x["id"] == read_yt["id"]]
    assert (shown["study"], mine["from"], mine["conclusion"], mine["status"]) == (
        s1["id"],
        CORE,
        read_yt["conclusion"],
        "preliminary",
    )
    assert mine["presented_form"] == ["text/plain; charset=utf-8", "application/pdf"]
    stored = hl7c.api("GET", f"/fhir/DiagnosticReport/{read_yt['id']}", role="clinician")
    DiagnosticReport.model_validate(stored)
    assert stored["subject"] == s1["subject"]  # the PACS's patient of the study
    assert stored["imagingStudy"][0]["reference"] == f"ImagingStudy/{s1['id']}"
    assert base64.b64decode(stored["presentedForm"][1]["data"]) == PDF
    assert stored["code"] == read_yt["code"] and stored["issued"] == read_yt["issued"]
    assert all(x["id"] != ct_yt["id"] for x in shown["reports"])
    audits = db_rows(
        hl7c, "SELECT peer, thread FROM audit WHERE action = 'imaging-report-attached'"
    )
    assert audits == [(CORE, hl7_thread)]
    wait_for(
        lambda: (
            db_rows(hl7c, "SELECT state FROM inbox WHERE packet_id = :p", p=sent[HL7C][0])
            == [("delivered",)]
        ),
        what="the packet delivered",
    )
    assert r.exam_at == "20261120100000+0800"  # Zhanlanlu holds no S1: the report's time
    assert (r.modality, r.body_site) == ("", "")

    # -- the reading is finalised: a correction of the same report, in a new packet
    for member, thread in ((HL7C, hl7_thread), (WSC, ws_thread)):
        b = copy.deepcopy(sent[member][1])
        fixed = b["entry"][3]["resource"]
        fixed["status"], fixed["conclusion"] = "final", "左肺上叶磨玻璃结节，考虑原位腺癌可能。"
        b["entry"][2:] = [b["entry"][3]]  # the reading alone
        core.send(member, "result.imaging", [b], thread=thread)
    (_, again, _) = wait_for(
        lambda: r[1] if len(r := site["his"].imaging_reports()) == 2 else None,
        timeout=60,
        what="the final reading in Yuetan's HIS",
    )
    (final,) = again["reports"]
    assert (final["filler"], final["status"], lines(final["items"][1]["value"])) == (
        read_yt["id"],
        "F",
        "左肺上叶磨玻璃结节，考虑原位腺癌可能。",
    )
    v2doc = wait_for(
        lambda: r[2] if len(r := site["ws"].exam_reports()) == 3 else None,
        timeout=60,
        what="version 2 in Zhanlanlu's HIS",
    )
    assert (v2doc.report_id, v2doc.version, v2doc.replaces, v2doc.status, v2doc.pdf) == (
        read_zl["id"],
        2,
        f"{read_zl['id']}-v1",
        "final",
        PDF,
    )

    def final_reading() -> Any:
        got = hl7c.api("GET", f"/local/v1/adapters/pacs/studies/{S1}/reports", role="clinician")
        return got if any(x["status"] == "final" for x in got["reports"]) else None

    shown = wait_for(final_reading, what="the final reading on S1")
    assert [(x["id"], x["status"]) for x in shown["reports"] if x["from"] == CORE] == [
        (read_yt["id"], "final")
    ]
    assert len(db_rows(hl7c, "SELECT 1 FROM audit WHERE action = 'imaging-report-attached'")) == 2

    # -- a report on S1 on a thread Yuetan does not know (not a party, never served the study):
    # quarantined by the PACS adapter, not attached; the HIS has no patient to file it under
    b = copy.deepcopy(sent[HL7C][1])
    stray = b["entry"][3]["resource"]
    stray["id"], stray["conclusion"] = "rpt-stray", "未经邀请的报告"
    b["entry"] = [b["entry"][3]]  # the report alone
    (stray_packet,) = core.send(HL7C, "result.imaging", [b])
    wait_for(
        lambda: (
            db_rows(hl7c, "SELECT state FROM inbox WHERE packet_id = :p", p=stray_packet)
            == [("delivered",)]
        ),
        what="the stray packet",
    )
    held = db_rows(
        hl7c,
        "SELECT kind, code, message, patient_hash FROM quarantine WHERE kind = 'imaging.report'",
    )
    assert len(held) == 1 and held[0][1] == "HT-REPORT-REJECTED"
    assert "rpt-stray" in held[0][2] and "neither shared" in held[0][2]
    # filed under the patient of the study it is on: the message browser's patient search
    assert db_rows(
        hl7c,
        "SELECT patient_hash FROM fhir_resource WHERE rtype = 'ImagingStudy' AND id = :i",
        i=study_resource_id(S1),
    ) == [(held[0][3],)]
    assert held[0][3] is not None
    got = hl7c.api("GET", f"/local/v1/adapters/pacs/studies/{S1}/reports", role="clinician")
    assert all(x["id"] != "rpt-stray" for x in got["reports"])
    assert len(site["his"].imaging_reports()) == 2
    for node in (core, hl7c, wsc):
        text = node.log.read_text(encoding="utf-8", errors="replace")
        assert NID1 not in text and NID2 not in text and "张三" not in text


def _get(node: Any, rtype: str, rid: str) -> dict[str, Any] | None:
    from tests.harness import ApiError

    try:
        return dict(node.api("GET", f"/fhir/{rtype}/{rid}", role="clinician"))
    except ApiError:
        return None
