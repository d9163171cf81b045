"""PACS adapter: DICOM in over a real pynetdicom association, ImagingStudy and reports out, and a
study fetched on demand by another node process, byte for byte.

The vendor PACS is ``simulators/pacs.py`` running as its own process; a "modality" (the same
CLI's ``push``) stores a coherent multi-series study, made from copies of pydicom's test files
with rewritten UIDs, into it. The PACS's files are the originals every comparison uses.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pynetdicom.dsutils import split_dataset
from sqlalchemy import select

from adapters.pacs import fetch
from adapters.pacs.errors import PacsFailed, PacsUnavailable, ReportRejected, status_error
from adapters.pacs.report import parse_oru, report_from_oru
from adapters.pacs.study import fhir_datetime, study_resource_id
from bridge.audit.tables import AuditRecord
from bridge.fhir.validate import validate_resource
from bridge.fhirstore import store as fstore
from bridge.privacy import patient_hash
from bridge.store.db import Store
from tests.harness import ROOT, Alliance, ApiError, NodeProcess, free_port_block, wait_for
from tests.referrals import referral

NATIONAL_ISSUER = "2.16.156.10011.1.3"
S1, S2 = "1.2.826.0.1.3680043.8.498.1001", "1.2.826.0.1.3680043.8.498.2002"
NID1, NID2 = "110102198001010011", "110102197505050022"
REPORT_TEXT = "双肺纹理清晰，未见实质性病变。No acute cardiopulmonary abnormality."
ORU_IMPRESSION = "右下肺小结节，建议3个月复查。"

MEMBERS = [
    {"id": "core", "zh": "复兴医院", "en": "Fuxing Hospital", "role": "core"},
    {"id": "chc", "zh": "月坛社区卫生服务中心", "en": "Yuetan CHC", "role": "community"},
]
REFERRAL_KINDS = ["referral.request", "referral.status", "referral.cancel", "referral.return"]
RULES = [
    {
        "from": "chc",
        "to": "core",
        "kinds": ["imaging.fetch-request", "result.imaging", *REFERRAL_KINDS],
    },
    {
        "from": "core",
        "to": "chc",
        "kinds": ["imaging.fetch-response", "result.imaging", *REFERRAL_KINDS],
    },
]


# -- the study: copies of pydicom test files made into two coherent studies ---------------------


def _instance(
    src: str,
    *,
    study: str,
    series: str,
    sop: str,
    series_no: int,
    inst_no: int,
    patient: tuple[str, str, str],
    extra: dict[str, Any] | None = None,
) -> Dataset:
    ds = dcmread(get_testdata_file(src))
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, sop
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.PatientID, ds.PatientName = patient[0], patient[1]
    other = Dataset()
    other.PatientID, other.IssuerOfPatientID = patient[2], NATIONAL_ISSUER
    ds.OtherPatientIDsSequence = Sequence([other])
    ds.StudyDate, ds.StudyTime = "20261120", "093000"
    ds.AccessionNumber = "ACC-" + study[-4:]
    ds.ReferringPhysicianName = "Li^Si"
    ds.StudyDescription = "胸部CT+头颅MR"
    ds.SeriesNumber, ds.InstanceNumber = series_no, inst_no
    for k, v in (extra or {}).items():
        setattr(ds, k, v)
    return ds


def _sr(study: str, series: str, sop: str, patient: tuple[str, str, str]) -> Dataset:
    ds = _instance(
        "reportsi.dcm",
        study=study,
        series=series,
        sop=sop,
        series_no=3,
        inst_no=1,
        patient=patient,
        extra={
            "CompletionFlag": "COMPLETE",
            "VerificationFlag": "VERIFIED",
            "ContentDate": "20261120",
            "ContentTime": "101500",
        },
    )
    section = ds.ContentSequence[-1]
    section.ContentSequence[0].TextValue = REPORT_TEXT
    return ds


def write_modality_files(folder: Path) -> None:
    folder.mkdir(parents=True)
    p1 = ("FX0001", "Zhang^San=张^三", NID1)
    p2 = ("FX0002", "Wang^Wu=王^五", NID2)
    items = [
        _instance(
            "CT_small.dcm",
            study=S1,
            series=S1 + ".1",
            sop=S1 + ".1.1",
            series_no=1,
            inst_no=1,
            patient=p1,
            extra={"BodyPartExamined": "CHEST"},
        ),
        _instance(
            "MR_small.dcm",
            study=S1,
            series=S1 + ".2",
            sop=S1 + ".2.1",
            series_no=2,
            inst_no=1,
            patient=p1,
            extra={"BodyPartExamined": "HEAD"},
        ),
        _instance(
            "MR_small_implicit.dcm",
            study=S1,
            series=S1 + ".2",
            sop=S1 + ".2.2",
            series_no=2,
            inst_no=2,
            patient=p1,
            extra={"BodyPartExamined": "HEAD"},
        ),
        _sr(S1, S1 + ".3", S1 + ".3.1", p1),
        _instance(
            "CT_small.dcm",
            study=S2,
            series=S2 + ".1",
            sop=S2 + ".1.1",
            series_no=1,
            inst_no=1,
            patient=p2,
            extra={"BodyPartExamined": "ABDOMEN"},
        ),
        _instance(
            "MR_small_padded.dcm",
            study=S2,
            series=S2 + ".2",
            sop=S2 + ".2.1",
            series_no=2,
            inst_no=1,
            patient=p2,
        ),
    ]
    for ds in items:
        ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def dataset_bytes(path: Path) -> bytes:
    _meta, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def push(
    folder: Path, port: int, study: str | None = None, called: str = "HUTONG"
) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable,
        "-m",
        "simulators.pacs",
        "push",
        "--dir",
        str(folder),
        "--to",
        f"127.0.0.1:{port}",
        "--called-ae",
        called,
    ]
    if study:
        cmd += ["--study", study]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=ROOT, timeout=120)


# -- the alliance: core holds the PACS adapter + vendor PACS, chc fetches ----------------------


class Site:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        base = free_port_block(3)
        self.vendor_port, self.core_scp, self.chc_scp = base, base + 1, base + 2
        self.modality = tmp / "modality"
        write_modality_files(self.modality)
        self.pacs_dir = tmp / "vendor-pacs"
        self.pacs_log = open(tmp / "vendor-pacs.log", "wb")  # noqa: SIM115 - closed in close()
        self.pacs = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "simulators.pacs",
                "serve",
                "--dir",
                str(self.pacs_dir),
                "--port",
                str(self.vendor_port),
                "--ae",
                "VENDORPACS",
            ],
            stdout=subprocess.PIPE,
            stderr=self.pacs_log,
            cwd=ROOT,
        )
        assert self.pacs.stdout is not None
        assert self.pacs.stdout.readline().decode().strip() == f"READY {self.vendor_port}"
        pushed = push(self.modality, self.vendor_port, called="VENDORPACS")
        assert pushed.returncode == 0, pushed.stdout + pushed.stderr
        members = [
            dict(
                MEMBERS[0],
                adapters=[
                    {
                        "name": "pacs",
                        "type": "pacs-dicom",
                        "receives": ["imaging.*"],
                        "options": {
                            "bind": f"127.0.0.1:{self.core_scp}",
                            "ae_title": "HUTONG",
                            "pacs": {
                                "host": "127.0.0.1",
                                "port": self.vendor_port,
                                "ae_title": "VENDORPACS",
                            },
                            "complete_after_s": 120,
                            "fetch_chunk_bytes": 45000,
                        },
                    }
                ],
            ),
            dict(
                MEMBERS[1],
                adapters=[
                    {
                        "name": "pacs",
                        "type": "pacs-dicom",
                        "receives": ["imaging.*"],
                        "options": {"bind": f"127.0.0.1:{self.chc_scp}", "ae_title": "YUETAN"},
                    }
                ],
            ),
        ]
        self.alliance = Alliance(tmp / "alliance", members, RULES)
        self.alliance.start("core", "chc")
        self.core, self.chc = self.alliance.node("core"), self.alliance.node("chc")
        self.s1_push: subprocess.CompletedProcess[str] | None = None

    def s1_at_core(self) -> dict[str, Any]:
        """Study S1 pushed from the vendor PACS's copy to the core node (once per site) and its
        ImagingStudy there: a test that starts from it passes alone and in any order."""
        if self.s1_push is None:
            self.s1_push = push(self.pacs_dir, self.core_scp, study=S1)
        return wait_for(
            lambda: get(self.core, "ImagingStudy", study_resource_id(S1)), what="study at core"
        )

    def originals(self, study: str) -> dict[str, Path]:
        """SOP Instance UID -> the vendor PACS's file (the bytes every copy must equal)."""
        out = {}
        for p in sorted(self.pacs_dir.glob("*.dcm")):
            ds = dcmread(p, stop_before_pixels=True)
            if ds.StudyInstanceUID == study:
                out[str(ds.SOPInstanceUID)] = p
        return out

    def close(self) -> None:
        self.alliance.stop_all()
        self.pacs.terminate()
        self.pacs.wait(timeout=30)
        assert self.pacs.stdout is not None
        self.pacs.stdout.close()
        self.pacs_log.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory):
    s = Site(tmp_path_factory.mktemp("pacs"))
    yield s
    s.close()


def read(node: NodeProcess, fn: Any) -> Any:
    s = Store(node.plan.storage_dsn)
    try:
        with s.read() as conn:
            return fn(conn)
    finally:
        s.dispose()


def get(node: NodeProcess, rtype: str, rid: str) -> dict[str, Any]:
    return read(node, lambda c: fstore.get(c, rtype, rid))


def row_hash(node: NodeProcess, rtype: str, rid: str) -> str | None:
    return read(node, lambda c: fstore.get_row(c, rtype, rid).patient_hash)


def audits(node: NodeProcess, action: str) -> list[Any]:
    t = AuditRecord.__table__  # type: ignore[attr-defined]
    return read(node, lambda c: c.execute(select(t).where(t.c.action == action)).all())


def r4b(resource: dict[str, Any]) -> None:
    """The second, independent check every emitted resource passes: fhir.resources R4B."""
    from fhir.resources.R4B.binary import Binary
    from fhir.resources.R4B.diagnosticreport import DiagnosticReport
    from fhir.resources.R4B.imagingstudy import ImagingStudy
    from fhir.resources.R4B.patient import Patient
    from fhir.resources.R4B.task import Task

    models = {
        "ImagingStudy": ImagingStudy,
        "DiagnosticReport": DiagnosticReport,
        "Patient": Patient,
        "Task": Task,
        "Binary": Binary,
    }
    validate_resource(resource)
    models[resource["resourceType"]].model_validate(resource)


def subject_at(node: NodeProcess, phash: str) -> dict[str, Any]:
    """How a fetched copy at ``node`` names its patient: the node's own Patient with that
    keyed hash if it has one, else the hash alone."""
    local = read(node, lambda c: fstore.find_patient_by_hash(c, phash))
    if local is not None:
        return {"reference": f"Patient/{local['id']}"}
    return {"identifier": {"system": fetch.HASH_SYSTEM, "value": phash}}


def clinician(node: NodeProcess, method: str, path: str, body: Any = None) -> Any:
    return node.api(method, "/local/v1/adapters/pacs" + path, body, role="clinician")


def fetch_zip(node: NodeProcess, task_id: str) -> dict[str, bytes]:
    req = urllib.request.Request(
        f"{node.local_url}/local/v1/adapters/pacs/fetches/{task_id}/study.zip",
        headers={"Authorization": f"Bearer {node.token('clinician')}"},
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        data = r.read()
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return {Path(n).stem: zf.read(n) for n in zf.namelist()}


def fetched(node: NodeProcess, peer: str, study: str) -> dict[str, Any]:
    asked = clinician(node, "POST", "/fetches", {"from": peer, "study_uid": study})

    def finished() -> dict[str, Any] | None:
        state = clinician(node, "GET", f"/fetches/{asked['task_id']}")
        return state if state["status"] in ("completed", "failed") else None

    return wait_for(finished, timeout=60, what="fetch to finish") | {
        "task_id": asked["task_id"],
        "thread": asked["thread"],
    }


# -- store, ImagingStudy, SR report --------------------------------------------------------------


@pytest.mark.slow
def test_pushed_study_becomes_imaging_study(site: Site) -> None:
    originals = site.originals(S1)
    assert len(originals) == 4
    for sop, path in originals.items():  # the PACS kept what the modality sent, unchanged
        assert dataset_bytes(path) == dataset_bytes(site.modality / f"{sop}.dcm")

    site.s1_at_core()
    done = site.s1_push
    assert done is not None and done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout) == {"sent": 4, "failed": 0, "statuses": [0, 0, 0, 0]}

    sid = study_resource_id(S1)
    study = wait_for(lambda: get(site.core, "ImagingStudy", sid), what="ImagingStudy")
    r4b(study)
    assert study["identifier"][0] == {"system": "urn:dicom:uid", "value": f"urn:oid:{S1}"}
    assert study["identifier"][1]["value"] == "ACC-1001"
    assert study["status"] == "available"
    assert study["numberOfSeries"] == 3 and study["numberOfInstances"] == 4
    assert [m["code"] for m in study["modality"]] == ["CT", "MR", "SR"]
    assert study["started"] == "2026-11-20T09:30:00+08:00"
    assert study["referrer"] == {"display": "Si Li"}
    assert study["description"] == "胸部CT+头颅MR"
    headers = {sop: dcmread(p, stop_before_pixels=True) for sop, p in originals.items()}
    by_series: dict[str, set[str]] = {}
    for sop, ds in headers.items():
        by_series.setdefault(str(ds.SeriesInstanceUID), set()).add(sop)
    assert {s["uid"]: {i["uid"] for i in s["instance"]} for s in study["series"]} == by_series
    series = {s["uid"]: s for s in study["series"]}
    ct, mr, sr = series[S1 + ".1"], series[S1 + ".2"], series[S1 + ".3"]
    assert (ct["number"], ct["modality"]["code"], ct["numberOfInstances"]) == (1, "CT", 1)
    assert ct["bodySite"] == {
        "system": "http://snomed.info/sct",
        "code": "51185008",
        "display": "Thoracic structure",
    }
    assert (mr["number"], mr["modality"]["code"], mr["numberOfInstances"]) == (2, "MR", 2)
    assert mr["bodySite"]["code"] == "69536005"
    assert [i["number"] for i in mr["instance"]] == [1, 2]
    assert sr["instance"][0]["sopClass"]["code"] == f"urn:oid:{headers[S1 + '.3.1'].SOPClassUID}"
    assert ct["instance"][0]["sopClass"]["code"] == "urn:oid:1.2.840.10008.5.1.4.1.1.2"

    # the patient: local record with the PACS id and national ID; keyed hash on every row
    key = site.core.plan.patient_hash_key
    patient = get(site.core, "Patient", study["subject"]["reference"].split("/")[1])
    r4b(patient)
    assert {i["value"] for i in patient["identifier"]} == {"FX0001", NID1}
    assert patient["name"][0]["text"] == "张三"
    assert row_hash(site.core, "ImagingStudy", sid) == patient_hash(key, NID1)

    # the SR became the radiology report
    from adapters.pacs.study import report_resource_id

    report = get(site.core, "DiagnosticReport", report_resource_id(f"sr:{S1}.3.1"))
    r4b(report)
    assert report["conclusion"] == REPORT_TEXT
    assert report["status"] == "final"
    assert report["imagingStudy"] == [{"reference": f"ImagingStudy/{sid}"}]
    assert report["subject"] == study["subject"]
    assert report["effectiveDateTime"] == "2026-11-20T10:15:00+08:00"

    # what the node holds is byte-identical to the PACS's files
    held = site.core.plan.data_dir / "adapters" / "pacs" / "studies" / S1
    assert {p.stem: sha(p.read_bytes()) for p in held.glob("*/*.dcm")} == {
        sop: sha(p.read_bytes()) for sop, p in originals.items()
    }
    # (other tests store other studies: this study's row is the one that counts its files)
    stored = [
        r
        for r in audits(site.core, "imaging-study-stored")
        if "3 series, 4 instances, 1 SR reports" in r.resource
    ]
    assert stored and {r.patient_hash for r in stored} == {patient_hash(key, NID1)}


@pytest.mark.slow
def test_another_node_fetches_the_study_byte_identical(site: Site) -> None:
    site.s1_at_core()
    result = fetched(site.chc, "core", S1)
    assert result["status"] == "completed", result
    assert result["progress"] == "4/4 instances" and result["files"] == 4

    got = fetch_zip(site.chc, result["task_id"])
    assert {sop: sha(b) for sop, b in got.items()} == {
        sop: sha(p.read_bytes()) for sop, p in site.originals(S1).items()
    }

    # chunked: the 39 KB CT and the rest travelled in several sealed packets on one thread
    t = AuditRecord.__table__  # type: ignore[attr-defined]
    queued = read(
        site.core,
        lambda c: c.execute(
            select(t).where(
                t.c.action == "queued",
                t.c.kind == "imaging.fetch-response",
                t.c.thread == result["thread"],
            )
        ).all(),
    )
    assert len(queued) >= 2
    key = site.core.plan.patient_hash_key
    assert {r.patient_hash for r in queued} == {patient_hash(key, NID1)}
    served = [r for r in audits(site.core, "imaging-fetch-served") if r.thread == result["thread"]]
    assert len(served) == 1 and served[0].peer == "chc" and served[0].outcome == "0"
    received = [
        r for r in audits(site.chc, "imaging-fetch-received") if r.thread == result["thread"]
    ]
    assert len(received) == len(queued)
    assert {r.patient_hash for r in received} == {patient_hash(key, NID1)}

    # chc's copies of the ImagingStudy and report name the patient by hash only, or by chc's
    # own record of the patient if it has one (a referral of another test may have made it)
    study = get(site.chc, "ImagingStudy", study_resource_id(S1))
    r4b(study)
    assert study["subject"] == subject_at(site.chc, patient_hash(key, NID1))
    assert study["numberOfInstances"] == 4
    task = get(site.chc, "Task", result["task_id"])
    r4b(task)
    assert task["status"] == "completed"
    assert NID1 not in orjson.dumps(study).decode()


@pytest.mark.slow
def test_a_reading_by_the_member_served_the_study_is_attached_to_it(site: Site) -> None:
    """Remote imaging reading with the fetch as the invitation: chc fetched S1 from core and
    reports on it (result.imaging on a thread core does not know, the study named by its UID
    only). Core's PACS adapter keeps the reading with S1 beside its own SR report, the reporting
    member as origin; a later fetch by chc still completes (the reading is not sent back)."""
    site.s1_at_core()
    assert fetched(site.chc, "core", S1)["status"] == "completed"
    rid = study_resource_id(S1)
    reading = {
        "resourceType": "DiagnosticReport",
        "id": "chc-reading-1",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "24627-2"}], "text": "胸部CT"},
        "subject": get(site.chc, "ImagingStudy", rid)["subject"],
        "imagingStudy": [
            {
                "reference": f"ImagingStudy/{rid}",
                "identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{S1}"},
            }
        ],
        "conclusion": "双肺未见明显异常（远程阅片）。",
    }
    site.chc.send(
        "core",
        "result.imaging",
        [{"resourceType": "Bundle", "type": "collection", "entry": [{"resource": reading}]}],
    )

    def shown() -> Any:
        got = clinician(site.core, "GET", f"/studies/{S1}/reports")
        return got if any(r["id"] == reading["id"] for r in got["reports"]) else None

    got = wait_for(shown, what="the reading attached to S1 at core")
    mine = [r for r in got["reports"] if r["from"] == "core"]
    theirs = [r for r in got["reports"] if r["from"] == "chc"]
    assert mine  # core's own reports on S1 (its SR, RIS reports) are listed beside it
    assert [(r["id"], r["conclusion"], r["status"]) for r in theirs] == [
        (reading["id"], reading["conclusion"], "final")
    ]
    stored = get(site.core, "DiagnosticReport", reading["id"])
    r4b(stored)
    assert stored["subject"] == get(site.core, "ImagingStudy", rid)["subject"]
    assert stored["imagingStudy"][0]["reference"] == f"ImagingStudy/{rid}"
    assert [a.peer for a in audits(site.core, "imaging-report-attached")] == ["chc"]
    assert fetched(site.chc, "core", S1)["status"] == "completed"  # not choked by its own


@pytest.mark.slow
def test_query_then_fetch_retrieves_from_the_vendor_pacs(site: Site) -> None:
    found = clinician(site.core, "POST", "/query", {"patient_id": "FX0002"})["studies"]
    assert found == [
        {
            "id": study_resource_id(S2),
            "study_uid": S2,
            "number_of_series": 2,
            "number_of_instances": 2,
        }
    ]
    study = get(site.core, "ImagingStudy", study_resource_id(S2))
    r4b(study)
    assert [m["code"] for m in study["modality"]] == ["CT", "MR"]
    assert {s["uid"]: s["numberOfInstances"] for s in study["series"]} == {
        S2 + ".1": 1,
        S2 + ".2": 1,
    }
    assert study["series"][0]["bodySite"]["code"] == "113345001"
    key = site.core.plan.patient_hash_key
    assert row_hash(site.core, "ImagingStudy", study["id"]) == patient_hash(key, NID2)
    held = site.core.plan.data_dir / "adapters" / "pacs" / "studies" / S2
    assert not held.exists()  # images stay in the PACS until someone asks

    result = fetched(site.chc, "core", S2)
    assert result["status"] == "completed", result
    got = fetch_zip(site.chc, result["task_id"])
    assert {sop: sha(b) for sop, b in got.items()} == {
        sop: sha(p.read_bytes()) for sop, p in site.originals(S2).items()
    }
    # chc never had a record of this patient: its copy names the patient by the keyed hash
    at_chc = get(site.chc, "ImagingStudy", study_resource_id(S2))
    assert at_chc["subject"] == {
        "identifier": {"system": fetch.HASH_SYSTEM, "value": patient_hash(key, NID2)}
    }
    full = get(site.core, "ImagingStudy", study_resource_id(S2))  # now from the C-GET files
    assert [len(s["instance"]) for s in full["series"]] == [1, 1]


@pytest.mark.slow
def test_unknown_study_fails_and_rules_are_checked(site: Site) -> None:
    result = fetched(site.chc, "core", "1.2.3.999")
    assert result["status"] == "failed"
    assert result["reason"] == "study not held here"
    with pytest.raises(ApiError) as err:  # no rule lets core ask chc
        clinician(site.core, "POST", "/fetches", {"from": "chc", "study_uid": S1})
    assert err.value.json["code"] == "HT-PKT-ROUTE-DENIED"


@pytest.mark.slow
def test_bad_instance_is_refused_and_quarantined(site: Site, tmp_path: Path) -> None:
    ds = dcmread(site.modality / f"{S1}.2.1.dcm")
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = S1 + ".9.9"
    del ds.PatientID
    (tmp_path / "bad").mkdir()
    ds.save_as(tmp_path / "bad" / "bad.dcm", enforce_file_format=True)
    done = push(tmp_path / "bad", site.core_scp)
    assert done.returncode == 1
    assert json.loads(done.stdout)["statuses"] == [0xC000]
    held = site.core.api("GET", "/local/v1/quarantine")
    mine = [q for q in held if q["source"] == "adapter:pacs" and q["kind"] == "imaging.instance"]
    assert mine and mine[0]["code"] == "HT-DICOM-REJECTED"
    assert mine[0]["message"] == f"instance {S1}.9.9: PatientID (0010,0020) is missing"
    assert not (
        site.core.plan.data_dir
        / "adapters"
        / "pacs"
        / "studies"
        / S1
        / (S1 + ".2")
        / f"{S1}.9.9.dcm"
    ).exists()


ORU = (
    "MSH|^~\\&|RIS|FUXING|HUTONG|FUXING|20261120110000||ORU^R01|RIS-77|P|2.5.1||||||"
    "UNICODE UTF-8\r"
    "PID|||FX0001||Zhang^San\r"
    "OBR|1||{acc}|71250^CT Chest^LN|||20261120093000|||||||||||||||||F\r"
    "OBX|1|TX|59776-5^Findings^LN||右下肺见一枚约4mm结节。||||||F\r"
    "OBX|2|TX|19005-8^Impression^LN||{imp}||||||F\r"
)


@pytest.mark.slow
def test_hl7_oru_report_attaches_to_the_study(site: Site) -> None:
    site.s1_at_core()
    answer = _post_text(site.core, ORU.format(acc="ACC-1001", imp=ORU_IMPRESSION))
    report = get(site.core, "DiagnosticReport", answer["id"])
    r4b(report)
    assert report["conclusion"] == ORU_IMPRESSION
    assert report["imagingStudy"] == [{"reference": f"ImagingStudy/{study_resource_id(S1)}"}]
    assert report["code"]["coding"][0] == {
        "system": "http://loinc.org",
        "code": "71250",
        "display": "CT Chest",
    }
    assert report["status"] == "final"
    assert report["effectiveDateTime"] == "2026-11-20T09:30:00+08:00"

    with pytest.raises(ApiError) as err:  # a report for a study nobody stored here
        _post_text(site.core, ORU.format(acc="ACC-NONE", imp="x"))
    assert err.value.status == 422 and err.value.json["code"] == "HT-REPORT-REJECTED"
    assert "record RIS-77" in err.value.json["message"]


@pytest.mark.slow
def test_ris_report_is_read_by_its_msh18(site: Site) -> None:
    """The RIS reader decodes by MSH-18 (the HL7 v2 kit), not as UTF-8 whatever it says:
    a GB 18030 report keeps its text; UTF-8 declared 8859/1 is refused naming the field."""
    site.s1_at_core()
    gb = ORU.replace("UNICODE UTF-8", "GB 18030-2000").replace("RIS-77", "RIS-80")
    answer = _post_text(
        site.core, gb.format(acc="ACC-1001", imp="右下肺億结节。").encode("gb18030")
    )
    assert get(site.core, "DiagnosticReport", answer["id"])["conclusion"] == "右下肺億结节。"
    latin = ORU.replace("UNICODE UTF-8", "8859/1").replace("RIS-77", "RIS-81")
    with pytest.raises(ApiError) as err:
        _post_text(site.core, latin.format(acc="ACC-1001", imp="张无忌").encode("utf-8"))
    assert err.value.status == 422 and err.value.json["code"] == "HT-REPORT-REJECTED"
    assert "OBX-5" in err.value.json["message"] and "8859/1" in err.value.json["message"]
    assert "张" not in err.value.json["message"]


@pytest.mark.slow
def test_report_follows_an_open_referral_as_result_imaging(site: Site) -> None:
    """A RIS report for a patient the centre has referred goes to the centre with its study
    (result.imaging, on the referral's thread); an identical re-sent message goes once."""
    site.s1_at_core()
    chc = site.alliance.node("chc")
    chc.api(
        "POST",
        "/local/v1/referrals",
        referral("up-exam", "core", national_id=NID1),
        role="clinician",
    )
    thread = wait_for(
        lambda: next(
            (
                r["thread"]
                for r in site.core.api("GET", "/local/v1/referrals")
                if r["status"] == "received"
            ),
            None,
        ),
        what="referral received at core",
    )
    text = ORU.replace("RIS-77", "RIS-78").format(acc="ACC-1001", imp="右下肺结节较前无变化。")
    answer = _post_text(site.core, text)
    assert [(r["to"], r["thread"]) for r in answer["routed"]] == [("chc", thread)]
    report = wait_for(
        lambda: read(chc, lambda c: _on_thread(c, answer["id"], thread)),
        what="the report at chc, on the referral's thread",
    )
    r4b(report)
    mine = get(site.core, "DiagnosticReport", answer["id"])
    for field in ("status", "code", "conclusion", "effectiveDateTime", "imagingStudy"):
        assert report[field] == mine[field], field
    assert report["conclusion"] == "右下肺结节较前无变化。"
    task = get(chc, "Task", thread)
    assert report["subject"] == task["for"]  # the centre's own record of the patient
    study = get(chc, "ImagingStudy", study_resource_id(S1))
    at_core = get(site.core, "ImagingStudy", study_resource_id(S1))
    for field in ("identifier", "numberOfSeries", "numberOfInstances", "modality", "started"):
        assert study.get(field) == at_core.get(field), field
    assert read(chc, lambda c: fstore.get_row(c, "DiagnosticReport", answer["id"]).thread) == thread
    again = _post_text(site.core, text)
    assert again["repeated"] is True and again["routed"] == answer["routed"]
    sent = [a for a in audits(site.core, "queued") if a.kind == "result.imaging"]
    assert len(sent) == 1 and sent[0].thread == thread


def _on_thread(conn: Any, report_id: str, thread: str) -> dict[str, Any] | None:
    """The report as stored from the referral's thread (a fetch of the study by another test
    may have brought an earlier version of the same report, keyed by the accession)."""
    if (
        not fstore.exists(conn, "DiagnosticReport", report_id)
        or fstore.get_row(conn, "DiagnosticReport", report_id).thread != thread
    ):
        return None
    return fstore.get(conn, "DiagnosticReport", report_id)


def _post_text(node: NodeProcess, text: str | bytes) -> Any:
    import urllib.error

    data = text.encode() if isinstance(text, str) else text
    req = urllib.request.Request(
        f"{node.local_url}/local/v1/adapters/pacs/reports",
        method="POST",
        data=data,
        headers={
            "Authorization": f"Bearer {node.token('clinician')}",
            "Content-Type": "application/hl7-v2",
        },
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        with exc:
            raise ApiError(exc.code, exc.read()) from None


@pytest.mark.slow
def test_instances_held_before_a_crash_are_completed_at_start(site: Site) -> None:
    """C-STORE success is answered once the file is synced; if the node dies before the
    association ends, the next start builds the ImagingStudy from the files."""
    s3 = "1.2.826.0.1.3680043.8.498.3003"
    ds = _instance(
        "CT_small.dcm",
        study=s3,
        series=s3 + ".1",
        sop=s3 + ".1.1",
        series_no=1,
        inst_no=1,
        patient=("FX0001", "Zhang^San=张^三", NID1),
    )
    site.s1_at_core()
    site.core.kill()
    folder = site.core.plan.data_dir / "adapters" / "pacs" / "studies" / s3 / (s3 + ".1")
    folder.mkdir(parents=True)
    ds.save_as(folder / f"{s3}.1.1.dcm", enforce_file_format=True)
    site.core.start()
    site.core.wait_ready()
    study = wait_for(
        lambda: get(site.core, "ImagingStudy", study_resource_id(s3)),
        what="ImagingStudy rebuilt at start",
    )
    r4b(study)
    assert (study["numberOfSeries"], study["numberOfInstances"]) == (1, 1)
    first = get(site.core, "ImagingStudy", study_resource_id(S1))
    assert study["subject"] == first["subject"]  # the same patient, found by the keyed hash
    assert (
        get(site.core, "ImagingStudy", study_resource_id(S1))["meta"]["versionId"]
        == first["meta"]["versionId"]
    )  # an up-to-date study is left alone


# -- pure parts, no sockets ----------------------------------------------------------------------


def test_dimse_status_translation_is_complete() -> None:
    assert status_error(0x0000, "C-STORE") is None
    assert status_error(0xFF00, "C-FIND") is None
    assert status_error(0xB000, "C-GET") is None
    assert isinstance(status_error(None, "C-FIND"), PacsUnavailable)
    assert isinstance(status_error(0xA701, "C-STORE"), PacsUnavailable)
    for code in (0xA900, 0xC000, 0xC211, 0xFE00, 0x0122, 0xA801):
        assert isinstance(status_error(code, "C-GET"), PacsFailed), hex(code)


def test_parts_respect_the_budget() -> None:
    assert fetch.plan_parts([10, 10, 10, 25], 25, 0) == [[0, 1], [2], [3]]
    assert fetch.plan_parts([10, 10], 25, 8) == [[0], [1]]  # part 1 also carries the study
    with pytest.raises(Exception, match="more than one packet carries"):
        fetch.plan_parts([30], 25, 0)
    assert fetch.raw_budget(20 * 1024 * 1024, None) == (20 * 1024 * 1024 - 65536) * 3 // 4


def test_fhir_datetime_and_oru_parsing() -> None:
    assert fhir_datetime("20261120", "0930", "+08:00") == "2026-11-20T09:30:00+08:00"
    assert fhir_datetime("20261120", "", "+08:00") == "2026-11-20"
    assert fhir_datetime("", "0930", "+08:00") is None
    oru = parse_oru(ORU.format(acc="A-1", imp="结论"), "+08:00")
    assert (oru.control_id, oru.accession, oru.status) == ("RIS-77", "A-1", "final")
    report = report_from_oru(oru, subject={"reference": "Patient/x"}, study_ref=None)
    r4b(report)
    assert report["conclusion"] == "结论"
    # bytes are decoded by MSH-18; escapes are replaced after splitting; \.br\ is a newline
    gb = (
        ORU.replace("UNICODE UTF-8", "GB 18030-2000")
        .format(acc="A\\T\\2", imp="第一行\\.br\\第二行 \\S\\ 億")
        .encode("gb18030")
    )
    oru = parse_oru(gb, "+08:00")
    assert oru.accession == "A&2" and oru.texts[-1] == ("19005-8", "第一行\n第二行 ^ 億")
    utf8 = ORU.replace("UNICODE UTF-8", "8859/1").format(acc="A-1", imp="结论").encode()
    with pytest.raises(ReportRejected, match="OBX-5 holds multi-byte UTF-8"):
        parse_oru(utf8, "+08:00")
    assert parse_oru(utf8, "+08:00", charset_override="UNICODE UTF-8").texts[-1][1] == "结论"


def test_fetch_packets_are_valid_fhir_and_tampering_is_caught() -> None:
    from bridge.fhir.validate import validate_bundle

    task = fetch.request_task("t-1", S1, "chc", "core", "2026-11-20T10:00:00+08:00")
    request = fetch.request_bundle(task, "ab12")
    validate_bundle(request)
    for e in request["entry"]:
        r4b(e["resource"])
    req = fetch.parse_request(request)  # the Bundle as the dispatcher decoded it
    assert (req.task_id, req.study_uid, req.patient_hash) == ("t-1", S1, "ab12")

    files = [(f"{S1}.1.{i}", bytes([i]) * (40 + i)) for i in range(1, 4)]
    bundles = fetch.response_bundles(req, files, [], 90, patient_hash="ab12")
    assert len(bundles) == 2
    got: list[tuple[str, bytes]] = []
    for b in bundles:
        validate_bundle(b)
        for e in b["entry"]:
            r4b(e["resource"])
        resp = fetch.parse_response(b)
        assert (resp.task_id, resp.study_uid, resp.total) == ("t-1", S1, 3)
        got += resp.instances
    assert got == files

    bad = orjson.loads(orjson.dumps(bundles[0]))
    binary = next(e["resource"] for e in bad["entry"] if e["resource"]["resourceType"] == "Binary")
    binary["data"] = "AAAA" + binary["data"][4:]
    with pytest.raises(Exception, match=f"instance {S1}.1.1: size or SHA-1 differs"):
        fetch.parse_response(bad)


def test_refused_imaging_reports_are_quarantined_under_their_patient(tmp_path: Path) -> None:
    """A report the PACS adapter refuses is filed under the patient it is about, so the message
    browser's patient search finds it: one from a member it did not serve, or not valid FHIR
    once on our study, under the study's patient hash; a RIS ORU for a study it does not hold,
    under the hash of the Patient its PID-3 names here; one not read as far as PID-3, none."""
    from bridge.config.loader import load_node
    from bridge.local.contract import ImagingReportEvent
    from bridge.node import Node
    from bridge.store.tables import QUARANTINE

    members = [
        dict(
            MEMBERS[0],
            adapters=[
                {
                    "name": "pacs",
                    "type": "pacs-dicom",
                    "options": {"bind": f"127.0.0.1:{free_port_block(1)}", "ae_title": "HUTONG"},
                }
            ],
        ),
        MEMBERS[1],
    ]
    node = Node(load_node(Alliance(tmp_path / "alliance", members, RULES).files["core"]))
    try:
        pacs: Any = node.adapters["pacs"]
        host = pacs.host
        phash = patient_hash(node.plan.patient_hash_key, NID1)
        rid = study_resource_id(S1)
        patient = {
            "resourceType": "Patient",
            "id": "p-fx1",
            "identifier": [{"system": pacs.pacs_id_system, "value": "FX0001"}],
        }
        with host.transaction() as tx:
            tx.put(patient, patient_hash=phash)
            tx.put(
                {
                    "resourceType": "ImagingStudy",
                    "id": rid,
                    "status": "available",
                    "subject": {"reference": "Patient/p-fx1"},
                },
                patient_hash=phash,
            )
        report = {
            "resourceType": "DiagnosticReport",
            "id": "rpt-1",
            "status": "final",
            "code": {"text": "CT"},
        }

        def held() -> list[tuple[str, str | None, str | None]]:
            with node.ctx.store.read() as conn:
                return [
                    (r.message, r.patient_hash, r.kind)
                    for r in conn.execute(select(QUARANTINE).order_by(QUARANTINE.c.id))
                ]

        def quarantine_audits() -> list[tuple[str | None, str]]:
            audit = AuditRecord.__table__  # type: ignore[attr-defined]
            with node.ctx.store.read() as conn:
                return [
                    (a.patient_hash, a.actor)
                    for a in conn.execute(
                        select(audit).where(audit.c.action == "quarantined").order_by(audit.c.seq)
                    )
                ]

        # a member this PACS neither served the study to nor is a party of the thread
        stray = ImagingReportEvent(
            key="P1:rpt-1", sender="chc", thread=None, study_uid=S1, report=report
        )
        assert pacs.on_imaging_report(stray) is None
        assert pacs.on_imaging_report(stray) is None  # redelivered: not quarantined again
        # the party of the thread, but the report is not R4 once on our study
        bad = ImagingReportEvent(
            key="P2:rpt-2",
            sender="chc",
            thread="t-1",
            study_uid=S1,
            report={**report, "id": "rpt-2", "status": "nonsense"},
            party=True,
        )
        assert pacs.on_imaging_report(bad) is None
        # RIS reports: on a study not held here (PID-3 names our Patient), and one unreadable
        for text in (ORU.format(acc="ACC-NONE", imp="x"), "MSH|^~\\&|RIS"):
            with pytest.raises(ReportRejected):
                pacs.take_report(text, "ris")
        assert [(h, k) for _m, h, k in held()] == [
            (phash, "imaging.report"),
            (phash, "imaging.report"),
            (phash, "imaging.report"),
            (None, "imaging.report"),
        ]
        messages = [m for m, _h, _k in held()]
        assert "rpt-1 from chc" in messages[0] and "neither shared" in messages[0]
        assert "rpt-2 from chc is not valid FHIR R4" in messages[1]
        assert "record RIS-77" in messages[2] and "no ImagingStudy here" in messages[2]
        assert quarantine_audits() == [(phash, "adapter:pacs")] * 3 + [(None, "adapter:pacs")]
        assert host.resource_info("DiagnosticReport", "rpt-1") is None
        # where the PACS keeps the ID number as PatientID, the ORU's PID-3 is hashed
        pacs.opts = pacs.opts.model_copy(update={"patient_id_is_national_id": True})
        with pytest.raises(ReportRejected):
            pacs.take_report(ORU.format(acc="ACC-NONE", imp="x").replace("FX0001", NID2), "ris")
        assert held()[-1][1] == patient_hash(node.plan.patient_hash_key, NID2)
    finally:
        node.close()
