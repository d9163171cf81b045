"""Visit documents from the XML web-service HIS (入院/挂号/转科/出院/修改/取消) -> FHIR Encounter.

Documents (no processes): written and read back field by field (UTF-8 and GB18030); each bad
class raises its own error naming the element's XPath. Alliance (slow): two real node processes
with real simulated HIS processes; the core hospital's admission office writes visit documents,
the node's ``/fhir`` API shows one Encounter per visit number with its history, field by field;
a referred patient's admission (the document names the referral document the HIS received, and
the core's ``visit_referral`` option says to read it) links the referral's Task and
ServiceRequest; a re-sent document is stored once; bad documents are quarantined and audited
naming document and element, and the next one is taken.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from adapters.his_ws import cda, visit_doc
from adapters.his_ws.errors import BadDate, MissingElement, SchemaInvalid, UnknownCode
from adapters.visits import Visit
from simulators.his_ws import HisWsProcess
from tests.harness import Alliance, NodeProcess, db_rows, wait_for
from tests.test_his_ws import arrived, referral_slip

ROOT = Path(__file__).resolve().parents[1]
SITE = cda.Site(member="fuxing", name="复兴医院")
VISITS = "urn:hutong:visit:fuxing"
ENC = visit_doc.ENCOUNTER


def visit(no: str, event: str = "admit", **kw: Any) -> Visit:
    """An event of visit ``no``; each visit number is its own patient (record number and ID)."""
    person = int("".join(c for c in no if c.isdigit()))
    return replace(
        Visit(
            visit_no=no,
            event=event,
            visit_class="inpatient",
            mrn=f"FX{no}",
            patient_name="李淑珍",
            gender="female",
            birth_date="1948-06-02",
            admitted_at="2026-11-21T10:00:00+08:00",
            status="",
            id_number=f"110102194806{person:06d}",
            phone="13812345678",
            department_code="0301",
            ward="心内科一病区",
            bed="12床",
            recorded_at="2026-11-21T10:05:00+08:00",
            doctor="张主任",
        ),
        **kw,
    )


# -- documents ------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["UTF-8", "GB18030"])
def test_visit_document_round_trip_field_by_field(encoding: str) -> None:
    for v in (
        visit("ZY1"),
        visit(
            "ZY1",
            "transfer",
            ward="心内科CCU",
            bed="3床",
            transferred_at="2026-11-22T08:30:00+08:00",
        ),
        visit("ZY1", "discharge", status="finished", discharged_at="2026-11-25T09:15:00+08:00"),
        visit(
            "MZ2",
            "register",
            visit_class="outpatient",
            ward="",
            bed="",
            department_code="",
            doctor="",
            id_number="",
            phone="",
            status="arrived",
        ),
        visit("ZY1", "cancel-admit", status="cancelled"),
    ):
        raw = visit_doc.write(
            visit_doc.VisitDoc("FX-DOC-1", v, "fuxing", referral_doc="p-1", slip_no="YTZZ1"),
            SITE,
            encoding,
        )
        assert raw.startswith(f"<?xml version='1.0' encoding='{encoding}'?>".encode())
        got = visit_doc.read(raw, SITE, record="FX-DOC-1")
        assert asdict(got.visit) == asdict(v)
        assert (got.doc_id, got.custodian, got.referral_doc, got.slip_no) == (
            "FX-DOC-1",
            "fuxing",
            "p-1",
            "YTZZ1",
        )
    if encoding == "GB18030":
        assert "李淑珍".encode("gb18030") in raw and "李淑珍".encode() not in raw


def _edit(raw: bytes, path: str, action: str, value: str = "") -> bytes:
    root = etree.fromstring(raw)
    el = root.xpath(path, namespaces=cda.NS)[0]
    if action == "drop":
        el.getparent().remove(el)
    else:
        el.set(action, value)
    return bytes(etree.tostring(root, xml_declaration=True, encoding="UTF-8"))


ADMIT = visit_doc.write(visit_doc.VisitDoc("FX-RYDJ-1", visit("ZY9"), "fuxing"), SITE)
BAD = {  # case -> (bytes, error, XPath named)
    "xsd-class": (
        _edit(ADMIT, "//v3:encompassingEncounter/v3:code", "code", "HOME"),
        SchemaInvalid,
        f"{ENC}/code",
    ),
    "xsd-event": (_edit(ADMIT, "v3:code", "code", "RYXX"), SchemaInvalid, "/ClinicalDocument/code"),
    "missing-mrn": (
        _edit(ADMIT, f"//v3:patientRole/v3:id[@root='{SITE.mrn_oid}']", "drop"),
        MissingElement,
        (f"/ClinicalDocument/recordTarget/patientRole/id[@root='{SITE.mrn_oid}']/@extension"),
    ),
    "date-admitted": (
        _edit(
            ADMIT,
            "//v3:encompassingEncounter/v3:effectiveTime/v3:low",
            "value",
            "20261131100000+0800",
        ),
        BadDate,
        f"{ENC}/effectiveTime/low/@value",
    ),
    "code-department": (
        _edit(ADMIT, "//v3:healthCareFacility/v3:code", "codeSystem", "2.16.156.10011.2.3.3.11"),
        UnknownCode,
        f"{ENC}/location/healthCareFacility/code/@code",
    ),
    "visit-oid": (
        _edit(ADMIT, "//v3:encompassingEncounter/v3:id", "root", "2.999.1"),
        SchemaInvalid,
        f"{ENC}/id/@root",
    ),
    "doctype": (
        ADMIT.replace(b"?>\n", b'?>\n<!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]>\n', 1),
        SchemaInvalid,
        "/!DOCTYPE",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_visit_document_names_element(case: str) -> None:
    raw, error, field = BAD[case]
    with pytest.raises(error) as exc:
        visit_doc.read(raw, SITE, record="DOC-9")
    assert "DOC-9" in exc.value.message
    assert exc.value.field == field
    assert "李淑珍" not in exc.value.message and "110102" not in exc.value.message


def test_pending_list_takes_every_type_the_service_schema_allows() -> None:
    """The streaming GetPendingDocuments reader checks each document's type before the XSD sees
    the answer: its list must be the XSD's, or visit documents are refused as unusable."""
    from adapters.his_ws import soap
    from adapters.his_ws.client import _pending
    from adapters.his_ws.errors import HisUnavailable
    from adapters.his_ws.xmlsafe import SCHEMAS

    xsd = etree.parse(str(SCHEMAS / "his-ws.xsd"))
    allowed = xsd.xpath(
        "//xs:simpleType[@name='DocumentType']//xs:enumeration/@value",
        namespaces={"xs": "http://www.w3.org/2001/XMLSchema"},
    )
    assert sorted(soap.PENDING_TYPES) == sorted(allowed)
    assert visit_doc.DOC_TYPE in allowed
    got = _pending({"seq": "7", "id": "FX-RYDJ-1", "type": visit_doc.DOC_TYPE}, b"<x/>", 0)
    assert (got.seq, got.doc_id, got.type, got.raw, got.too_large) == (
        7,
        "FX-RYDJ-1",
        "visit",
        b"<x/>",
        0,
    )
    with pytest.raises(HisUnavailable):
        _pending({"seq": "8", "id": "X-1", "type": "lab-report"}, b"", 0)


# -- two nodes, two simulated HIS processes ------------------------------------------------------

KINDS = ["referral.request", "referral.status", "referral.cancel", "referral.return"]
MEMBERS = [
    ("fuxing", "复兴医院", "Fuxing Hospital", "core"),
    ("yuetan-chc", "月坛社区卫生服务中心", "Yuetan CHC", "community"),
]


class World:
    def __init__(self, folder: Path) -> None:
        self.sims = {
            m[0]: HisWsProcess(folder / f"his-{m[0]}.sqlite", m[0], site_name=m[1]) for m in MEMBERS
        }
        members = [
            {
                "id": i,
                "zh": zh,
                "en": en,
                "role": role,
                "adapters": [
                    {
                        "name": "his",
                        "type": "his-xml-ws",
                        "mappings": str(ROOT / "mappings" / i),
                        "receives": ["referral.*"],
                        "options": {
                            "url": self.sims[i].url,
                            "poll_s": 0.2,
                            "timeout_s": 5.0,
                            "site_name": zh,
                            **({"visit_referral": "referral-document"} if i == "fuxing" else {}),
                        },
                    }
                ],
            }
            for i, zh, en, role in MEMBERS
        ]
        rules = [
            {"from": "fuxing", "to": "yuetan-chc", "kinds": KINDS},
            {"from": "yuetan-chc", "to": "fuxing", "kinds": KINDS},
        ]
        for sim in self.sims.values():
            sim.start()
        self.alliance = Alliance(folder / "alliance", members, rules)
        self.alliance.start("fuxing", "yuetan-chc")

    def stop(self) -> None:
        self.alliance.stop_all()
        for sim in self.sims.values():
            sim.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    w = World(tmp_path_factory.mktemp("his-ws-visits"))
    try:
        yield w
    finally:
        w.stop()


def encounters(node: NodeProcess, visit_no: str) -> list[dict[str, Any]]:
    found = node.api("GET", f"/fhir/Encounter?identifier={VISITS}|{visit_no}", role="clinician")
    return [e["resource"] for e in found.get("entry") or []]


def encounter_when(node: NodeProcess, visit_no: str, cond: Any, what: str) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        found = encounters(node, visit_no)
        assert len(found) <= 1, f"{len(found)} Encounters for visit {visit_no}"
        return found[0] if found and cond(found[0]) else None

    return wait_for(ready, timeout=60, what=what)


def history(enc: dict[str, Any]) -> list[tuple[str, str, str, str | None]]:
    return [
        (
            loc["location"]["display"],
            loc["status"],
            loc["period"]["start"],
            loc["period"].get("end"),
        )
        for loc in enc.get("location") or []
    ]


@pytest.mark.slow
def test_admit_transfer_discharge_one_encounter_field_by_field(world: World) -> None:
    his = world.sims["fuxing"].his
    core = world.alliance.node("fuxing")
    his.write_visit(visit("ZY0001"))
    encounter_when(core, "ZY0001", lambda e: e["status"] == "in-progress", "admission")
    his.write_visit(
        visit(
            "ZY0001",
            "transfer",
            ward="心内科CCU",
            bed="3床",
            transferred_at="2026-11-22T08:30:00+08:00",
        )
    )
    encounter_when(core, "ZY0001", lambda e: len(e.get("location") or []) == 2, "transfer")
    his.write_visit(
        visit(
            "ZY0001",
            "discharge",
            ward="心内科CCU",
            bed="3床",
            discharged_at="2026-11-25T09:15:00+08:00",
        )
    )
    enc = encounter_when(core, "ZY0001", lambda e: e["status"] == "finished", "discharge")
    assert enc["identifier"][0]["system"] == VISITS and enc["identifier"][0]["value"] == "ZY0001"
    assert enc["class"]["code"] == "IMP"
    assert enc["period"] == {
        "start": "2026-11-21T10:00:00+08:00",
        "end": "2026-11-25T09:15:00+08:00",
    }
    assert history(enc) == [
        (
            "心内科一病区 12床",
            "completed",
            "2026-11-21T10:00:00+08:00",
            "2026-11-22T08:30:00+08:00",
        ),
        ("心内科CCU 3床", "completed", "2026-11-22T08:30:00+08:00", "2026-11-25T09:15:00+08:00"),
    ]
    assert enc["statusHistory"] == [
        {
            "status": "in-progress",
            "period": {"start": "2026-11-21T10:00:00+08:00", "end": "2026-11-25T09:15:00+08:00"},
        }
    ]
    assert ("http://hutong.dev/CodeSystem/xicheng-alliance/department", "03.04") in {
        (c["system"], c["code"]) for c in enc["serviceType"]["coding"]
    }
    assert enc["participant"][0]["individual"]["display"] == "张主任"
    assert enc["meta"]["versionId"] == "3"
    assert core.api("GET", f"/fhir/Encounter/{enc['id']}", role="clinician") == enc
    pid = enc["subject"]["reference"].split("/", 1)[1]
    found = core.api("GET", f"/fhir/Encounter?patient={pid}", role="clinician")
    assert [e["resource"]["id"] for e in found["entry"]] == [enc["id"]]
    patient = core.api("GET", f"/fhir/Patient/{pid}", role="clinician")
    assert patient["name"] == [{"text": "李淑珍"}]
    assert (patient["gender"], patient["birthDate"]) == ("female", "1948-06-02")
    assert {"system": "urn:hutong:mrn:fuxing", "value": "FXZY0001"} in patient["identifier"]


@pytest.mark.slow
def test_cancelled_admission(world: World) -> None:
    his = world.sims["fuxing"].his
    core = world.alliance.node("fuxing")
    his.write_visit(visit("ZY0002"))
    encounter_when(core, "ZY0002", lambda e: e["status"] == "in-progress", "admission")
    his.write_visit(visit("ZY0002", "cancel-admit", recorded_at="2026-11-21T11:00:00+08:00"))
    enc = encounter_when(core, "ZY0002", lambda e: e["status"] == "cancelled", "取消入院")
    assert enc["statusHistory"] == [
        {
            "status": "in-progress",
            "period": {"start": "2026-11-21T10:00:00+08:00", "end": "2026-11-21T11:00:00+08:00"},
        }
    ]
    assert history(enc) == [("心内科一病区 12床", "active", "2026-11-21T10:00:00+08:00", None)]


def _accepted(core: NodeProcess) -> dict[str, Any] | None:
    return next(
        (
            r
            for r in core.api("GET", "/local/v1/referrals")
            if r["side"] == "receiver" and r["status"] == "accepted"
        ),
        None,
    )


@pytest.mark.slow
def test_referred_patient_admission_on_the_referral(world: World) -> None:
    chc_his, core_his = world.sims["yuetan-chc"].his, world.sims["fuxing"].his
    chc, core = world.alliance.node("yuetan-chc"), world.alliance.node("fuxing")
    written = referral_slip(
        slip_no="YTZZ-VISIT-1", patient_name="李淑珍", id_number="110102194806007001"
    )
    chc_his.write_referral(written)
    got = arrived(core_his, "referral", written.slip_no)
    core_his.accept(
        got.doc_id,
        appointment_at="2026-11-21T10:00:00+08:00",
        department_code="0301",
        bed_no="心内科 12床",
        doctor="张主任",
    )
    row = wait_for(lambda: _accepted(core), timeout=60, what="accepted")
    core_his.write_visit(visit("ZY7001", id_number=written.id_number), referral_doc=got.doc_id)
    enc = encounter_when(core, "ZY7001", lambda e: e["status"] == "in-progress", "admission")
    eref = {"reference": f"Encounter/{enc['id']}"}
    assert enc["basedOn"] == [{"reference": f"ServiceRequest/{row['sr_id']}"}]
    task = core.api("GET", f"/fhir/Task/{row['task_id']}", role="clinician")
    assert task["status"] == "in-progress" and task["encounter"] == eref
    sr = core.api("GET", f"/fhir/ServiceRequest/{row['sr_id']}", role="clinician")
    assert eref in sr["supportingInfo"]
    assert enc["subject"] == task["for"]  # the referral's patient, matched by the ID number
    wait_for(
        lambda: any(
            r["thread"] == row["thread"] and r["status"] == "in-progress"
            for r in chc.api("GET", "/local/v1/referrals")
        ),
        timeout=60,
        what="arrival at the centre",
    )
    core_his.write_visit(
        visit(
            "ZY7001",
            "discharge",
            id_number=written.id_number,
            discharged_at="2026-11-25T10:00:00+08:00",
        )
    )
    enc = encounter_when(core, "ZY7001", lambda e: e["status"] == "finished", "discharge")
    assert enc["basedOn"] == [{"reference": f"ServiceRequest/{row['sr_id']}"}]
    assert core.api("GET", f"/fhir/Task/{row['task_id']}", role="clinician")["encounter"] == eref


@pytest.mark.slow
def test_resent_document_stored_once(world: World) -> None:
    his = world.sims["fuxing"].his
    core = world.alliance.node("fuxing")
    doc_id = his.write_visit(visit("ZY0004"))
    raw = visit_doc.write(visit_doc.VisitDoc(doc_id, visit("ZY0004"), "fuxing"), his.site)
    his.write_raw(doc_id, "visit", raw)  # the HIS offers the same document again
    his.write_visit(visit("ZY0005"))
    wait_for(lambda: his.pending() == [], timeout=60, what="every document acked")
    enc = encounter_when(core, "ZY0005", lambda e: True, "the next document")
    enc = encounter_when(core, "ZY0004", lambda e: True, "the re-sent document")
    assert enc["meta"]["versionId"] == "1"
    audits = db_rows(
        core,
        "SELECT seq FROM audit WHERE action = 'encounter' AND resource LIKE :ref",
        ref=f"%Encounter/{enc['id']}%",
    )
    assert len(audits) == 1


@pytest.mark.slow
def test_bad_visit_documents_quarantined_and_next_taken(world: World) -> None:
    his = world.sims["fuxing"].his
    core = world.alliance.node("fuxing")
    his.write_visit(visit("ZY0990"))
    encounter_when(core, "ZY0990", lambda e: True, "the visit another document's number names")

    def doc(n: int, v: Visit, **kw: Any) -> bytes:
        return visit_doc.write(visit_doc.VisitDoc(f"BADV-{n}", v, "fuxing", **kw), his.site)

    cases = {  # document id -> (bytes, code, XPath)
        "BADV-0": (
            doc(
                0,
                visit(
                    "ZY0900",
                    "discharge",
                    status="in-progress",
                    discharged_at="2026-11-25T10:00:00+08:00",
                ),
            ),
            "HT-LOCAL-VALUE",
            visit_doc.FIELD_PATHS["status"],
        ),
        "BADV-1": (
            doc(1, visit("ZY0901", "transfer")),
            "HT-LOCAL-MISSING",
            visit_doc.FIELD_PATHS["transferred_at"],
        ),
        "BADV-2": (
            doc(2, visit("ZY0902"), referral_doc="NO-SUCH-REFERRAL"),
            "HT-WS-DOC",
            (f"/ClinicalDocument/inFulfillmentOf/order/id[@root='{his.site.doc_oid}']/@extension"),
        ),
        "BADV-3": (
            doc(3, visit("ZY0903", "discharge", discharged_at="2026-11-20T10:00:00+08:00")),
            "HT-LOCAL-DATE",
            visit_doc.FIELD_PATHS["discharged_at"],
        ),
        "BADV-4": (
            BAD["missing-mrn"][0].replace(b"FX-RYDJ-1", b"BADV-4"),
            "HT-WS-MISSING",
            BAD["missing-mrn"][2],
        ),
        "BADV-5": (
            doc(5, visit("ZY0905", "cancel-discharge")),
            "HT-REF-UNKNOWN",
            visit_doc.FIELD_PATHS["visit_no"],
        ),  # a cancel of a visit never seen
        "BADV-6": (
            doc(
                6,
                replace(
                    visit("ZY0906", "transfer", transferred_at="2026-11-22T10:00:00+08:00"),
                    visit_no="ZY0990",
                ),
            ),
            "HT-VISIT-CONFLICT",
            visit_doc.FIELD_PATHS["visit_no"],
        ),
    }
    for doc_id, (raw, _, _) in cases.items():
        his.write_raw(doc_id, "visit", raw)
    his.write_visit(visit("ZY0999"))
    encounter_when(core, "ZY0999", lambda e: True, "the good document after the bad ones")
    wait_for(lambda: his.pending() == [], timeout=30, what="every document acked")
    held = core.api("GET", "/local/v1/quarantine")
    for doc_id, (_, code, field) in cases.items():
        mine = [h for h in held if f"record {doc_id} " in h["message"]]
        assert len(mine) == 1, (doc_id, held)
        assert mine[0]["code"] == code
        assert f"record {doc_id} field {field}:" in mine[0]["message"]
        assert "李淑珍" not in mine[0]["message"] and "110102" not in mine[0]["message"]
    for n in range(7):
        assert encounters(core, f"ZY090{n}") == []
    assert encounters(core, "ZY0990")[0]["meta"]["versionId"] == "1"
    export = core.cli("audit", "export", "--format", "ndjson").stdout
    for doc_id in cases:
        assert f"record {doc_id} field" in export
    assert core.cli("audit", "verify").returncode == 0


@pytest.mark.slow
def test_cancel_before_its_admission_replayed_once_the_admission_came(world: World) -> None:
    """The admission office's cancel reached the node before the admission (held: no such
    visit); once the admission is taken, IT replays the held cancel and it applies, once."""
    his = world.sims["fuxing"].his
    core = world.alliance.node("fuxing")
    cancel_id = his.write_visit(
        visit("ZY0950", "cancel-admit", recorded_at="2026-11-21T12:00:00+08:00")
    )
    item = wait_for(
        lambda: next(
            (
                q
                for q in core.api("GET", "/local/v1/quarantine")
                if f"record {cancel_id} " in q["message"]
            ),
            None,
        ),
        timeout=60,
        what="the cancel held",
    )
    assert item["code"] == "HT-REF-UNKNOWN" and item["kind"] == "his-ws.visit"
    his.write_visit(visit("ZY0950"))
    encounter_when(core, "ZY0950", lambda e: e["status"] == "in-progress", "the admission")
    res = core.api("POST", f"/local/v1/quarantine/{item['id']}/replay")
    assert res["ok"] and res["result"] == f"document {cancel_id} (visit) taken", res
    enc = encounter_when(core, "ZY0950", lambda e: e["status"] == "cancelled", "the cancel")
    assert enc["statusHistory"] == [
        {
            "status": "in-progress",
            "period": {"start": "2026-11-21T10:00:00+08:00", "end": "2026-11-21T12:00:00+08:00"},
        }
    ]
    assert core.api("POST", f"/local/v1/quarantine/{item['id']}/replay")["ok"] is False
    assert encounters(core, "ZY0950")[0]["meta"]["versionId"] == "2"
