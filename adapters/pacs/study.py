"""DICOM headers -> FHIR R4 ``Patient`` and ``ImagingStudy`` (pure functions, no I/O).

From stored instances we know every series and instance; from a C-FIND we know what the PACS
answered (study and series level). Both give the same resource shape, keyed by the Study
Instance UID, so an ImagingStudy learnt from a query is replaced by the full one when the
instances arrive.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pydicom.valuerep import PersonName

DCM = "http://dicom.nema.org/resources/ontology/DCM"
DICOM_UID = "urn:dicom:uid"
RFC3986 = "urn:ietf:rfc:3986"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
SNOMED = "http://snomed.info/sct"
BODY_PART_SYSTEM = "urn:hutong:dicom:body-part-examined"  # DICOM defined terms (PS3.3 C.7.3.1)

#: Body Part Examined defined terms with an unambiguous SNOMED CT body structure
_BODY_SITES = {
    "HEAD": ("69536005", "Head structure"),
    "BRAIN": ("12738006", "Brain structure"),
    "CHEST": ("51185008", "Thoracic structure"),
    "ABDOMEN": ("113345001", "Abdominal structure"),
    "WHOLEBODY": ("38266002", "Entire body as a whole"),
}


def study_resource_id(study_uid: str) -> str:
    """The same ImagingStudy id on every node for one study (a FHIR id, not patient data)."""
    return str(uuid.uuid5(uuid.NAMESPACE_OID, f"imagingstudy:{study_uid}"))


def report_resource_id(key: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_OID, f"diagnosticreport:{key}"))


def study_identifier(study_uid: str) -> dict[str, str]:
    return {"system": DICOM_UID, "value": f"urn:oid:{study_uid}"}


def text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None:
        return None
    out = str(value).strip()
    return out or None


def integer(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def fhir_datetime(date: str | None, time: str | None, tz: str) -> str | None:
    """DICOM DA + TM (local time) -> FHIR dateTime; a time needs a zone in FHIR."""
    if not date or len(date) < 8 or not date[:8].isdigit():
        return None
    day = f"{date[:4]}-{date[4:6]}-{date[6:8]}"
    digits = (time or "").replace(":", "").split(".")[0]
    if len(digits) < 4 or not digits.isdigit():
        return day
    hh, mm, ss = digits[:2], digits[2:4], (digits[4:6] if len(digits) >= 6 else "00")
    return f"{day}T{hh}:{mm}:{ss}{tz}"


def person_name(value: Any) -> str | None:
    """A PN as people write it: the ideographic group if present (张三), else given family."""
    if not value:
        return None
    pn = value if isinstance(value, PersonName) else PersonName(str(value))
    if pn.ideographic:
        return str(pn.ideographic).replace("^", "").strip() or None
    parts = [p for p in (pn.given_name, pn.family_name) if p]
    return " ".join(parts) or str(pn).replace("^", " ").strip() or None


@dataclass(frozen=True)
class PatientInfo:
    pacs_id: str
    national_id: str | None
    family: str | None
    given: str | None
    name_text: str | None
    sex: str | None
    birth: str | None


def patient_info(ds: Dataset, *, national_id_issuer: str, id_is_national: bool) -> PatientInfo:
    pacs_id = text(ds, "PatientID") or ""
    national = pacs_id if id_is_national and pacs_id else None
    for item in ds.get("OtherPatientIDsSequence") or ():
        if text(item, "IssuerOfPatientID") == national_id_issuer and text(item, "PatientID"):
            national = text(item, "PatientID")
            break
    pn = ds.get("PatientName")
    family = given = None
    if pn:
        pn = PersonName(str(pn)) if not isinstance(pn, PersonName) else pn
        group = (pn.ideographic and PersonName(str(pn.ideographic))) or pn
        family, given = (group.family_name or None), (group.given_name or None)
    birth = text(ds, "PatientBirthDate")
    return PatientInfo(
        pacs_id,
        national,
        family,
        given,
        person_name(pn),
        text(ds, "PatientSex"),
        f"{birth[:4]}-{birth[4:6]}-{birth[6:8]}"
        if birth and len(birth) == 8 and birth.isdigit()
        else None,
    )


def patient_resource(
    info: PatientInfo, *, pacs_id_system: str, national_system: str
) -> dict[str, Any]:
    pid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{pacs_id_system}|{info.pacs_id}"))
    idents = [{"system": pacs_id_system, "value": info.pacs_id}]
    if info.national_id:
        idents.append({"system": national_system, "value": info.national_id})
    patient: dict[str, Any] = {"resourceType": "Patient", "id": pid, "identifier": idents}
    if info.name_text:
        name: dict[str, Any] = {"text": info.name_text}
        if info.family:
            name["family"] = info.family
        if info.given:
            name["given"] = [info.given]
        patient["name"] = [name]
    gender = {"M": "male", "F": "female", "O": "other"}.get((info.sex or "").upper())
    if gender:
        patient["gender"] = gender
    if info.birth:
        patient["birthDate"] = info.birth
    return patient


def _modality(code: str) -> dict[str, str]:
    return {"system": DCM, "code": code}


def body_site(value: str | None) -> dict[str, str] | None:
    if not value:
        return None
    term = value.strip().upper()
    if term in _BODY_SITES:
        code, display = _BODY_SITES[term]
        return {"system": SNOMED, "code": code, "display": display}
    return {"system": BODY_PART_SYSTEM, "code": term, "display": value.strip()}


def _study_common(
    first: Dataset, study_uid: str, subject: dict[str, Any], tz: str, accession_system: str
) -> dict[str, Any]:
    res: dict[str, Any] = {
        "resourceType": "ImagingStudy",
        "id": study_resource_id(study_uid),
        "identifier": [study_identifier(study_uid)],
        "status": "available",
        "subject": subject,
    }
    accession = text(first, "AccessionNumber")
    if accession:
        res["identifier"].append(
            {
                "type": {"coding": [{"system": V2_0203, "code": "ACSN"}]},
                "system": accession_system,
                "value": accession,
            }
        )
    started = fhir_datetime(text(first, "StudyDate"), text(first, "StudyTime"), tz)
    if started:
        res["started"] = started
    referrer = person_name(first.get("ReferringPhysicianName"))
    if referrer:
        res["referrer"] = {"display": referrer}
    description = text(first, "StudyDescription")
    if description:
        res["description"] = description
    return res


def imaging_study(
    headers: Iterable[Dataset],
    *,
    study_uid: str,
    subject: dict[str, Any],
    tz: str,
    accession_system: str,
) -> dict[str, Any]:
    """The full ImagingStudy from the headers of every stored instance of one study."""
    items = sorted(
        headers,
        key=lambda d: (
            integer(d, "SeriesNumber") or 0,
            str(d.SeriesInstanceUID),
            integer(d, "InstanceNumber") or 0,
            str(d.SOPInstanceUID),
        ),
    )
    res = _study_common(items[0], study_uid, subject, tz, accession_system)
    series: dict[str, dict[str, Any]] = {}
    for ds in items:
        uid = str(ds.SeriesInstanceUID)
        s = series.get(uid)
        if s is None:
            s = series[uid] = {"uid": uid}
            number = integer(ds, "SeriesNumber")
            if number is not None:
                s["number"] = number
            s["modality"] = _modality(text(ds, "Modality") or "OT")
            if text(ds, "SeriesDescription"):
                s["description"] = text(ds, "SeriesDescription")
            s["numberOfInstances"] = 0
            site = body_site(text(ds, "BodyPartExamined"))
            if site:
                s["bodySite"] = site
            started = fhir_datetime(text(ds, "SeriesDate"), text(ds, "SeriesTime"), tz)
            if started:
                s["started"] = started
            s["instance"] = []
        inst: dict[str, Any] = {
            "uid": str(ds.SOPInstanceUID),
            "sopClass": {"system": RFC3986, "code": f"urn:oid:{ds.SOPClassUID}"},
        }
        name = UID(str(ds.SOPClassUID)).name
        if name and name != str(ds.SOPClassUID):
            inst["sopClass"]["display"] = name
        number = integer(ds, "InstanceNumber")
        if number is not None:
            inst["number"] = number
        s["instance"].append(inst)
        s["numberOfInstances"] += 1
    modalities = sorted({s["modality"]["code"] for s in series.values()})
    res["modality"] = [_modality(m) for m in modalities]
    res["numberOfSeries"] = len(series)
    res["numberOfInstances"] = sum(s["numberOfInstances"] for s in series.values())
    res["series"] = list(series.values())
    return res


def imaging_study_from_find(
    study: Dataset,
    series: Iterable[Dataset],
    *,
    study_uid: str,
    subject: dict[str, Any],
    tz: str,
    accession_system: str,
) -> dict[str, Any]:
    """What a C-FIND told us: study-level counts and the series without their instances."""
    res = _study_common(study, study_uid, subject, tz, accession_system)
    found = sorted(
        series, key=lambda d: (integer(d, "SeriesNumber") or 0, str(d.get("SeriesInstanceUID", "")))
    )
    modalities = study.get("ModalitiesInStudy") or [text(s, "Modality") for s in found]
    if isinstance(modalities, str):
        modalities = [modalities]
    codes = sorted({str(m) for m in modalities if m})
    if codes:
        res["modality"] = [_modality(m) for m in codes]
    n_series = integer(study, "NumberOfStudyRelatedSeries")
    n_instances = integer(study, "NumberOfStudyRelatedInstances")
    if n_series is not None:
        res["numberOfSeries"] = n_series
    if n_instances is not None:
        res["numberOfInstances"] = n_instances
    out = []
    for ds in found:
        s: dict[str, Any] = {
            "uid": str(ds.SeriesInstanceUID),
            "modality": _modality(text(ds, "Modality") or "OT"),
        }
        number = integer(ds, "SeriesNumber")
        if number is not None:
            s["number"] = number
        if text(ds, "SeriesDescription"):
            s["description"] = text(ds, "SeriesDescription")
        count = integer(ds, "NumberOfSeriesRelatedInstances")
        if count is not None:
            s["numberOfInstances"] = count
        site = body_site(text(ds, "BodyPartExamined"))
        if site:
            s["bodySite"] = site
        out.append(s)
    if out:
        res["series"] = out
    return res
