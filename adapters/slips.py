"""The alliance's paper trail as neutral records: referral, acceptance and return slips.

Every HIS style (intermediate database, HL7 v2, XML web service) reads its vendor's format into
these records and writes them back out; :mod:`adapters.slips_fhir` turns them into FHIR and
back. So the three styles share one FHIR mapping, and a test can compare what one HIS wrote with
what another HIS received field by field.

Codes in a slip are the hospital's LOCAL codes (department, diagnosis, drug, lab item); the
site's ConceptMaps translate them on the way out and back in.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class ReferralSlip:
    """双向转诊单: written by the referring doctor in the local HIS."""

    slip_no: str  # the HIS's own referral number (unique in that HIS)
    kind: str  # up-outpatient | up-inpatient | up-exam | down-outpatient | down-discharge
    to_member: str  # receiving member id (alliance.toml)
    patient_name: str
    gender: str  # male | female | other | unknown
    birth_date: str  # YYYY-MM-DD
    id_number: str  # 居民身份证号 (never travels in clear: hashed by the node)
    phone: str
    mrn: str  # the patient's record number in this HIS
    diagnosis_code: str  # local diagnosis code
    diagnosis_name: str
    reason: str  # 转诊原因
    summary: str  # 病历摘要
    department_code: str  # local code of the department asked for
    urgent: bool  # green channel (绿色通道)
    consent_by: str  # who signed consent: 患者本人 / 家属 (empty = no consent: refused)
    doctor: str
    written_at: str  # ISO 8601 with offset


@dataclass
class AcceptanceSlip:
    """接诊单: the receiver's answer (accepted with appointment/bed, or rejected with reason)."""

    slip_no: str  # the REFERRER's slip number it answers
    accepted: bool
    reason: str = ""  # why rejected
    appointment_at: str = ""  # ISO 8601: outpatient appointment or admission date
    department_code: str = ""  # receiver's local department code
    bed_no: str = ""
    doctor: str = ""


@dataclass
class Prescription:
    drug_code: str  # local drug code (mapped through the alliance drug catalogue)
    drug_name: str
    dose: str  # e.g. "5 mg"
    frequency: str  # e.g. "qd"
    days: int


@dataclass
class LabResult:
    item_code: str  # local lab item code (mapped to LOINC)
    item_name: str
    value: str
    unit: str
    flag: str = ""  # H | L | N | ""
    reference_range: str = ""


@dataclass
class ReturnSlip:
    """转回单: the receiver sends the patient back with record, results and guidance for the GP."""

    slip_no: str  # the REFERRER's slip number it closes
    discharge: bool  # True: after discharge (inpatient course); False: after outpatient visit
    diagnosis_code: str  # receiver's local diagnosis code
    diagnosis_name: str
    course: str  # 诊疗经过 / 住院经过
    advice: str  # 康复指导 / guidance for the community doctor
    doctor: str
    written_at: str
    prescriptions: list[Prescription] = field(default_factory=list)
    results: list[LabResult] = field(default_factory=list)


def as_dict(slip: Any) -> dict[str, Any]:
    return asdict(slip)
