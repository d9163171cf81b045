"""What the demo's clinicians, lab and CT scanner produce: slips in each HIS's own codes, the
Fuxing LIS's ORU^R01 messages (Fuxing's own lab item codes), and a CT study of the patient.

Every code here is the writing site's LOCAL code, as its catalogue in ``mappings/<site>`` lists
it; the demo checks that the receiving HIS gets the codes of ITS catalogue.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

from adapters.slips import AcceptanceSlip, LabResult, Prescription, ReferralSlip, ReturnSlip

CHINA = timezone(timedelta(hours=8))
NATIONAL_ISSUER = "2.16.156.10011.1.3"
#: the CT study's UID root (a demo-only UID under the pydicom example root)
STUDY_ROOT = "1.2.826.0.1.3680043.8.498.7701"


def now() -> str:
    return datetime.now(CHINA).isoformat(timespec="seconds")


def later(days: int, hour: int) -> str:
    d = datetime.now(CHINA) + timedelta(days=days)
    return d.replace(hour=hour, minute=0, second=0, microsecond=0).isoformat()


def referral(slip_no: str, kind: str, name: str, gender: str, birth: str, nid: str,
             diagnosis: tuple[str, str], department: str, reason: str, summary: str, *,
             mrn: str, doctor: str, urgent: bool = False,
             consent: str = "患者本人") -> ReferralSlip:
    return ReferralSlip(
        slip_no=slip_no, kind=kind, to_member="fuxing", patient_name=name, gender=gender,
        birth_date=birth, id_number=nid, phone="13901234567", mrn=mrn,
        diagnosis_code=diagnosis[0], diagnosis_name=diagnosis[1], reason=reason,
        summary=summary, department_code=department, urgent=urgent, consent_by=consent,
        doctor=doctor, written_at=now())


def acceptance(slip_no: str) -> AcceptanceSlip:
    return AcceptanceSlip(slip_no=slip_no, accepted=True, appointment_at=later(1, 10),
                          department_code="0301", bed_no="心内科 12床", doctor="张主任")


def discharge(slip_no: str) -> ReturnSlip:
    """Fuxing's return slip: its diagnosis, drug and lab codes (FXZD0101, FX-0101, FXL-GLU)."""
    return ReturnSlip(
        slip_no=slip_no, discharge=True, diagnosis_code="FXZD0101",
        diagnosis_name="原发性高血压", course="入院后调整降压方案，头颅及胸部CT未见异常，血压平稳",
        advice="继续氨氯地平 5mg qd、硝苯地平控释片 30mg qd，两周后社区复查血压", doctor="张主任",
        written_at=now(),
        prescriptions=[Prescription("FX-0101", "苯磺酸氨氯地平片 5mg", "5 mg", "qd", 14),
                       Prescription("FX-0103", "硝苯地平控释片 30mg", "30 mg", "qd", 28)],
        results=[LabResult("FXL-GLU", "葡萄糖", "8.9", "mmol/L", "H", "3.9-6.1"),
                 LabResult("FXL-CREA", "肌酐", "72", "μmol/L", "N", "44-133")])


def oru(n: int, nid: str, mrn: str, name: tuple[str, str], *, glucose: str = "8.9") -> bytes:
    """A biochemistry ORU^R01 from Fuxing's LIS, its own item codes (FXL-*)."""
    ts = datetime.now(CHINA).strftime("%Y%m%d%H%M%S")
    segs = [
        (f"MSH|^~\\&|LIS|FXLAB|HUTONG|FUXING|{ts}||ORU^R01^ORU_R01|FXLAB-DEMO-{n:06d}|P|2.5.1"
         "|||AL|NE|CHN|UNICODE UTF-8"),
        f"PID|1||{mrn}^^^FUXING^MR~{nid}^^^{NATIONAL_ISSUER}^NI||{name[0]}^{name[1]}||19500315|F",
        "PV1|1|I|0301^心内科",
        (f"OBR|1|ORD-{n}|LAB-DEMO-{n:06d}|BIOCHEM^生化全套^L|||{ts}|||||||{ts}||"
         f"DR001^张^主任||||||{ts}|||F"),
        f"OBX|1|NM|FXL-GLU^葡萄糖^L||{glucose}|mmol/L|3.9-6.1|H|||F|||{ts}",
        f"OBX|2|NM|FXL-CREA^肌酐^L||72|μmol/L|44-133|N|||F|||{ts}",
        f"OBX|3|NM|FXL-K^钾^L||4.1|mmol/L|3.5-5.3|N|||F|||{ts}",
        "NTE|1||生化全套已审核",
    ]
    return ("\r".join(segs) + "\r").encode()


def malformed_oru(n: int, nid: str, mrn: str) -> bytes:
    """An ORU whose numeric result is not a number (the LIS's bad export): NAKed, quarantined."""
    return oru(n, nid, mrn, ("王", "秀英"), glucose="8..9")


def ct_study(folder: Path, nid: str, mrn: str, name: str) -> tuple[str, list[Path]]:
    """Two CT images (copies of pydicom's CT_small.dcm) as the patient's chest CT."""
    from pydicom import dcmread
    from pydicom.data import get_testdata_file
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import UID

    folder.mkdir(parents=True, exist_ok=True)
    study = f"{STUDY_ROOT}.{datetime.now(CHINA).strftime('%Y%m%d%H%M%S')}"
    out = []
    for i in (1, 2):
        ds = dcmread(str(get_testdata_file("CT_small.dcm")))
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, f"{study}.1"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = UID(f"{study}.1.{i}")
        ds.PatientID, ds.PatientName = mrn, name
        other = Dataset()
        other.PatientID, other.IssuerOfPatientID = nid, NATIONAL_ISSUER
        ds.OtherPatientIDsSequence = Sequence([other])
        ds.StudyDate = ds.SeriesDate = datetime.now(CHINA).strftime("%Y%m%d")
        ds.StudyTime = "100000"
        ds.AccessionNumber = f"FXCT{study[-6:]}"
        ds.ReferringPhysicianName = "Zhang^Zhuren"
        ds.StudyDescription = "胸部CT平扫"
        ds.BodyPartExamined = "CHEST"
        ds.SeriesNumber, ds.InstanceNumber = 1, i
        p = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(p, enforce_file_format=True)
        out.append(p)
    return study, out
