"""One patient referred to the core hospital by several community centres at once (issue: the
core's packets named the first centre's Patient id, the second centre's HIS failed them
HT-NOT-FOUND).

Three centres refer the same patient (same ID number, each with its own record number) up to the
core hospital, which keeps ONE Patient for her: two with an XML web-service HIS, one with an
intermediate-database HIS (simulated vendor systems). The core accepts all three, its LIS reports
an ORU^R01 over MLLP, and it returns all three. Every document must arrive in EVERY centre's HIS,
field by field, filed under that centre's own referral document / 流水号, slip number and record
number; each centre's node names the patient by its own record; and no centre's node ever
receives another centre's Patient id, record number, slip number or thread, nor the core's own
Patient id (isolation between members).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, replace
from typing import Any

import orjson
import pytest

from adapters.slips import AcceptanceSlip
from adapters.slips_fhir import return_bundle
from bridge.mapping.conceptmap import load_site
from simulators.his_db import HisDb
from simulators.his_ws import HisWsProcess
from tests.harness import ROOT, Alliance, NodeProcess, db_rows, free_port_block, lis_send, wait_for
from tests.lis_site import write_site
from tests.slip_samples import return_slip
from tests.test_his_cross import in_centre_codes
from tests.test_his_ws_results_cancel import ITEM, UTF8, assert_report_matches, source
from tests.test_his_ws_results_cancel import referral_slip as lab_referral_slip
from tests.test_results_his import BIOCHEM, CBC, LINE

pytestmark = pytest.mark.slow

CORE, FIRST, SECOND, THIRD = "fuxing", "zhanlanlu-chc", "yuetan-chc", "guangwai-chc"
WS = (FIRST, SECOND)  # XML web-service HIS; THIRD: an intermediate-database HIS
KINDS = ["referral.request", "referral.status", "referral.cancel", "referral.return", "result.lab"]
NAMES = {
    CORE: "复兴医院",
    FIRST: "展览路社区卫生服务中心",
    SECOND: "月坛社区卫生服务中心",
    THIRD: "广外社区卫生服务中心",
}
#: the first centre's catalogue has no lab items: LOINC where the lab's map has one
LOINC_OID = ITEM["CBC"][1]
FIRST_ITEM = {
    **ITEM,
    "WBC": ("6690-2", LOINC_OID, ITEM["WBC"][2]),
    "HGB": ("718-7", LOINC_OID, ITEM["HGB"][2]),
    "PLT": ("777-3", LOINC_OID, ITEM["PLT"][2]),
    "GLU": ("2345-7", LOINC_OID, ITEM["GLU"][2]),
}
#: the same in the database HIS's ZZ_JS_JYBG_MX (XMDM, XMMC, JG, DW, CKFW, BZ, JGZT, JCSJ)
DB_LOINC = {"3007": "6690-2", "3008": "718-7", "3009": "777-3", "3001": "2345-7"}
DB_ITEMS = {
    name: [(DB_LOINC.get(x[0], x[0]), *x[1:]) for x in rows]
    for name, rows in (("血常规", CBC), ("生化全套", BIOCHEM))
}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("two-centres")
    lab_maps = write_site(root / "mappings" / "fxlab")
    lis = free_port_block(1)
    sims = {m: HisWsProcess(root / f"his-{m}.sqlite", m, site_name=NAMES[m]) for m in WS}
    db = HisDb(f"sqlite:///{root / 'guangwai-his.db'}").init()
    members: list[dict[str, Any]] = [
        {
            "id": CORE,
            "zh": NAMES[CORE],
            "en": "Fuxing Hospital",
            "role": "core",
            "adapters": [
                {
                    "name": "lis",
                    "type": "lis-hl7",
                    "mappings": str(lab_maps),
                    "options": {"port": lis},
                }
            ],
        }
    ]
    for m, en in ((FIRST, "Zhanlanlu CHC"), (SECOND, "Yuetan CHC")):
        members.append(
            {
                "id": m,
                "zh": NAMES[m],
                "en": en,
                "role": "community",
                "adapters": [
                    {
                        "name": "his",
                        "type": "his-xml-ws",
                        "mappings": str(ROOT / "mappings" / m),
                        "receives": ["referral.*", "result.*"],
                        "options": {"url": sims[m].url, "poll_s": 0.2, "timeout_s": 5.0},
                    }
                ],
            }
        )
    members.append(
        {
            "id": THIRD,
            "zh": NAMES[THIRD],
            "en": "Guangwai CHC",
            "role": "community",
            "adapters": [
                {
                    "name": "his",
                    "type": "his-middle-db",
                    "mappings": str(ROOT / "mappings" / THIRD),
                    "receives": ["referral.*", "result.*"],
                    "options": {
                        "dsn": db.dsn,
                        "poll_every_s": 0.3,
                        "fields": str(ROOT / "simulators" / "his_db_site"),
                    },
                }
            ],
        }
    )
    rules = [
        r
        for m in (*WS, THIRD)
        for r in ({"from": m, "to": CORE, "kinds": KINDS}, {"from": CORE, "to": m, "kinds": KINDS})
    ]
    a = Alliance(root / "alliance", members, rules)
    try:
        for sim in sims.values():
            sim.start()
        a.start(CORE, FIRST, SECOND, THIRD)
        yield {"a": a, "his": {m: s.his for m, s in sims.items()}, "db": db, "lis": lis}
    finally:
        a.stop_all()
        for sim in sims.values():
            sim.stop()
        db.close()


def arrived(his: Any, doc_type: str, slip_no: str) -> Any:
    return wait_for(
        lambda: next((d for d in his.received(doc_type) if d.slip.slip_no == slip_no), None),
        timeout=60,
        what=f"{doc_type} {slip_no} in the HIS",
    )


def thread_at_core(core: NodeProcess, centre: str) -> dict[str, Any]:
    return wait_for(
        lambda: next(
            (
                r
                for r in core.api("GET", "/local/v1/referrals")
                if r["referrer"] == centre and r["status"] == "received"
            ),
            None,
        ),
        what=f"the referral from {centre} at the core",
    )


def task(node: NodeProcess, thread: str) -> dict[str, Any]:
    return node.api("GET", f"/fhir/Task/{thread}", role="clinician")


def bodies(node: NodeProcess) -> bytes:
    """Every packet body the node received, concatenated (what it could ever learn)."""
    return b"\n".join(bytes(b) for (b,) in db_rows(node, "SELECT body FROM inbox") if b is not None)


def test_same_patient_from_three_centres_reaches_each_his(world: dict[str, Any]) -> None:
    a, his, db = world["a"], world["his"], world["db"]
    core = a.node(CORE)
    slips = {
        FIRST: lab_referral_slip(
            slip_no="ZLZZ-2026-0001", mrn="ZL0042", diagnosis_code="ZLS001", department_code="01"
        ),
        SECOND: lab_referral_slip(slip_no="YTZZ-2026-0001"),
        THIRD: lab_referral_slip(
            slip_no="GWZZ-2026-0001", mrn="GW0009", diagnosis_code="GWSQ01", department_code="QK"
        ),
    }
    docs, threads = {}, {}
    for m in (FIRST, SECOND, THIRD):  # one after the other: the first is at the core first
        if m == THIRD:
            db.write_referral(slips[m])
            docs[m] = ""
        else:
            docs[m] = his[m].write_referral(slips[m])
        threads[m] = thread_at_core(core, m)["thread"]
    # the core keeps one Patient for her: all three referrals name it
    assert len({task(core, t)["for"]["reference"] for t in threads.values()}) == 1
    assert db_rows(core, "SELECT count(*) FROM fhir_resource WHERE rtype = 'Patient'") == [(1,)]
    # each centre's node names her by its own record (its only Patient), also once the core's
    # "received" has come back
    mine = {}
    for m in (FIRST, SECOND, THIRD):
        wait_for(
            lambda m=m: task(a.node(m), threads[m])["status"] == "received", what=f"received at {m}"
        )
        (own,) = node_patients(a.node(m))
        mine[m] = {"reference": f"Patient/{own['id']}"}
        assert task(a.node(m), threads[m])["for"] == mine[m]
    assert len({v["reference"] for v in mine.values()}) == 3
    # the core registered her under an id of its own, not the first centre's
    assert task(core, threads[FIRST])["for"] not in mine.values()

    # the core accepts both: each centre's HIS files its acceptance under its own document
    accepted = {
        "bed": "心内科 12床",
        "department": "心血管内科",
        "doctor": "张主任",
        "appointment": "2026-11-21T10:00:00+08:00",
    }
    for m in (FIRST, SECOND, THIRD):
        core.api(
            "POST",
            f"/local/v1/referrals/{threads[m]}/steps/accept",
            {
                "outputs": [
                    {
                        "type": {"text": k},
                        **({"valueDateTime": v} if k == "appointment" else {"valueString": v}),
                    }
                    for k, v in accepted.items()
                ]
            },
            role="clinician",
        )
    for m in (FIRST, SECOND, THIRD):
        if m == THIRD:
            got = wait_for(
                lambda: [x for x in db.received_acceptances() if x.slip_no == slips[THIRD].slip_no],
                timeout=60,
                what="acceptance in the database HIS",
            )
            assert len(got) == 1
            acc_slip = got[0]
        else:
            acc = arrived(his[m], "acceptance", slips[m].slip_no)
            assert acc.referral_doc == docs[m] and acc.custodian == CORE
            acc_slip = acc.slip
        assert asdict(acc_slip) == asdict(
            AcceptanceSlip(
                slip_no=slips[m].slip_no,
                accepted=True,
                appointment_at=accepted["appointment"],
                department_code=acc_slip.department_code,
                bed_no=accepted["bed"],
                doctor=accepted["doctor"],
            )
        )
        assert task(a.node(m), threads[m])["for"] == mine[m]

    # the core's LIS reports: both centres' HIS get both reports, field by field, each under
    # its own slip number, referral document and record number
    assert lis_send(world["lis"], UTF8) == "AA"
    src = source(UTF8)["reports"]
    for m, items in ((FIRST, FIRST_ITEM), (SECOND, ITEM)):
        got = wait_for(
            lambda m=m: r if len(r := his[m].lab_reports()) == 2 else None,
            timeout=60,
            what=f"two lab reports in {m}'s HIS",
        )
        for doc, theirs in zip(got, src, strict=True):
            saved = dict(ITEM)
            ITEM.update(items)
            try:
                assert_report_matches(doc, theirs, lab="复兴医院检验科")
            finally:
                ITEM.clear()
                ITEM.update(saved)
            assert (doc.referral_doc, doc.slip_no, doc.mrn, doc.mrn_authority) == (
                docs[m],
                slips[m].slip_no,
                slips[m].mrn,
                m,
            )
            dr = a.node(m).api("GET", f"/fhir/DiagnosticReport/{doc.report_id}", role="clinician")
            assert dr["subject"] == mine[m]
        wait_for(
            lambda m=m: (
                db_rows(a.node(m), "SELECT state FROM inbox WHERE kind = 'result.lab'")
                == [("delivered",)]
            ),
            what=f"the result packet delivered at {m}",
        )
    # the database HIS: ZZ_JS_JYBG under its 流水号 (the thread) and slip number, line by line
    rows = wait_for(
        lambda: r if len(r := db.received_results()) == 2 else None,
        timeout=60,
        what="two lab reports in the database HIS",
    )
    assert {r["BGMC"] for r in rows} == set(DB_ITEMS)
    for head in rows:
        assert (head["LSH"], head["ZZDH"], head["FSJG"]) == (
            threads[THIRD],
            slips[THIRD].slip_no,
            CORE,
        )
        assert [tuple(x[c] for c in LINE) for x in head["items"]] == DB_ITEMS[head["BGMC"]]
        dr = a.node(THIRD).api("GET", f"/fhir/DiagnosticReport/{head['BGID']}", role="clinician")
        assert dr["subject"] == mine[THIRD]

    # arrival and return on both threads: each return in its centre's HIS
    patient = task(core, threads[FIRST])["for"]["reference"]
    backs = {m: return_slip(slip_no=slips[m].slip_no) for m in (FIRST, SECOND, THIRD)}
    for m in (FIRST, SECOND, THIRD):
        core.api("POST", f"/local/v1/referrals/{threads[m]}/steps/arrive", {}, role="clinician")
        wait_for(
            lambda m=m: task(a.node(m), threads[m])["status"] == "in-progress",
            what=f"arrival at {m}",
        )
        sr_id = next(
            r for r in core.api("GET", "/local/v1/referrals") if r["thread"] == threads[m]
        )["sr_id"]
        core.api(
            "POST",
            "/local/v1/referrals",
            return_bundle(backs[m], sr_id, patient, load_site(ROOT / "mappings" / CORE), me=CORE),
            role="clinician",
        )
    for m in (FIRST, SECOND, THIRD):
        if m == THIRD:
            (got,) = wait_for(
                lambda: [x for x in db.received_returns() if x.slip_no == slips[THIRD].slip_no],
                timeout=60,
                what="return in the database HIS",
            )
        else:
            ret = arrived(his[m], "return", slips[m].slip_no)
            assert ret.referral_doc == docs[m] and ret.custodian == CORE
            got = ret.slip
        if m == SECOND:  # every field, codes in the centre's catalogue
            assert asdict(got) == asdict(in_centre_codes(backs[m]))
        else:  # the other centres' catalogues map other codes: every other field
            assert asdict(got) == asdict(
                replace(
                    backs[m],
                    diagnosis_code=got.diagnosis_code,
                    prescriptions=[
                        replace(p, drug_code=q.drug_code)
                        for p, q in zip(backs[m].prescriptions, got.prescriptions, strict=True)
                    ],
                    results=[
                        replace(x, item_code=y.item_code)
                        for x, y in zip(backs[m].results, got.results, strict=True)
                    ],
                )
            )
        wait_for(
            lambda m=m: task(a.node(m), threads[m])["status"] == "completed", what=f"return at {m}"
        )
        node = a.node(m)
        for rtype in (
            "Observation",
            "DiagnosticReport",
            "Encounter",
            "Composition",
            "MedicationRequest",
            "ServiceRequest",
        ):
            for r in node.api("GET", f"/fhir/{rtype}?_count=200", role="clinician")["entry"]:
                res = r["resource"]
                who = res.get("subject") or res.get("patient")
                assert who is None or who == mine[m], (m, rtype, res["id"])
        wait_for(
            lambda node=node: all(
                s == "delivered" for (s,) in db_rows(node, "SELECT state FROM inbox")
            ),
            what=f"every packet delivered at {m}",
        )
        if m in WS:
            assert his[m].pending() == []

    # isolation: nothing the core sent one centre names another's patient, record, slip,
    # documents or thread, nor the core's own record of her
    for m in (FIRST, SECOND, THIRD):
        got = bodies(a.node(m))
        assert patient.split("/", 1)[1].encode() not in got, m
        for other in {FIRST, SECOND, THIRD} - {m}:
            other_id = mine[other]["reference"].split("/", 1)[1]
            for secret in (
                other_id,
                slips[other].mrn,
                slips[other].slip_no,
                threads[other],
                docs[other],
                f'/{other}"',
                f':{other}"',
            ):
                assert not secret or secret.encode() not in got, (m, secret)
            # the Patient a centre holds is its own, and only its own
            pats = node_patients(a.node(m))
            assert [f"Patient/{p['id']}" for p in pats] == [mine[m]["reference"]]
            assert not any(
                i.get("value") == slips[other].mrn for p in pats for i in p.get("identifier") or []
            )


def node_patients(node: NodeProcess) -> list[dict[str, Any]]:
    return [
        orjson.loads(b)
        for (b,) in db_rows(node, "SELECT body FROM fhir_resource WHERE rtype = 'Patient'")
    ]
