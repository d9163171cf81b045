"""Fixed v2 -> FHIR vocabularies for lab results: statuses, abnormal flags, units, code systems.

The status and flag tables follow the HL7 V2-to-FHIR concept maps (``ResultStatus[Non-Queries]``,
``ObservationResultStatusCodesInterpretation``, ``InterpretationCodes``; copies are in
``/work/shared/fhir-r4/v2-to-fhir``). Units: Chinese LIS send the printed unit ("mmol/L",
"10^9/L", "μmol/L"); the common ones are given their UCUM code here; any other unit keeps its
text without claiming a UCUM code (and is counted, so IT can extend this table).
"""

from __future__ import annotations

UCUM = "http://unitsofmeasure.org"
LOINC = "http://loinc.org"
V3_INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
V2_0078 = "http://terminology.hl7.org/CodeSystem/v2-0078"
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
V2_0487 = "http://terminology.hl7.org/CodeSystem/v2-0487"
DATA_ABSENT = "http://terminology.hl7.org/CodeSystem/data-absent-reason"

#: OBX-11 (table 0085) -> Observation.status
OBSERVATION_STATUS = {
    "F": "final",
    "C": "corrected",
    "P": "preliminary",
    "R": "preliminary",
    "S": "preliminary",
    "A": "amended",
    "D": "entered-in-error",
    "W": "entered-in-error",
    "X": "cancelled",
    "I": "registered",
    "O": "registered",
    "U": "final",
    "V": "final",
    "B": "amended",
}

#: OBR-25 (table 0123) -> DiagnosticReport.status
REPORT_STATUS = {
    "O": "registered",
    "I": "registered",
    "S": "registered",
    "A": "partial",
    "P": "preliminary",
    "C": "corrected",
    "M": "corrected",
    "R": "partial",
    "F": "final",
    "X": "cancelled",
    "N": "partial",
}

#: OBX-8 (table 0078) codes that have a v3 ObservationInterpretation code of the same spelling
V3_FLAGS = {
    "<": "Off scale low",
    ">": "Off scale high",
    "A": "Abnormal",
    "AA": "Critical abnormal",
    "B": "Better",
    "CAR": "Carrier",
    "D": "Significant change down",
    "DET": "Detected",
    "E": "Equivocal",
    "EX": "outside threshold",
    "EXP": "Expected",
    "H": "High",
    "HH": "Critical high",
    "HU": "Significantly high",
    "I": "Intermediate",
    "IE": "Insufficient evidence",
    "IND": "Indeterminate",
    "L": "Low",
    "LL": "Critical low",
    "LU": "Significantly low",
    "MS": "moderately susceptible",
    "N": "Normal",
    "NCL": "No CLSI defined breakpoint",
    "ND": "Not detected",
    "NEG": "Negative",
    "NR": "Non-reactive",
    "NS": "Non-susceptible",
    "POS": "Positive",
    "R": "Resistant",
    "RR": "Reactive",
    "S": "Susceptible",
    "SDD": "Susceptible-dose dependent",
    "SYN-R": "Synergy - resistant",
    "SYN-S": "Synergy - susceptible",
    "U": "Significant change up",
    "VS": "very susceptible",
    "UNE": "Unexpected",
    "W": "Worse",
    "WR": "Weakly reactive",
}

#: CE/CWE coding system names (component 3) -> FHIR system URIs
CODE_SYSTEMS = {
    "LN": LOINC,
    "LOINC": LOINC,
    "SCT": "http://snomed.info/sct",
    "SNOMED": "http://snomed.info/sct",
    "UCUM": UCUM,
    "ICD10": "http://hl7.org/fhir/sid/icd-10",
    "I10": "http://hl7.org/fhir/sid/icd-10",
    "HL70078": V2_0078,
    "HL70487": V2_0487,
}

#: more v2 table 0396 coding system names -> FHIR system URIs (V2-to-FHIR code system map)
CODE_SYSTEMS.update(
    {
        "SNOMED-CT": "http://snomed.info/sct",
        "SNM": "http://snomed.info/sct",
        "SCT2": "http://snomed.info/sct",
        "UCUM_CS": UCUM,
        "MDC": "urn:iso:std:iso:11073:10101",
        "I9": "http://hl7.org/fhir/sid/icd-9-cm",
        "I9C": "http://hl7.org/fhir/sid/icd-9-cm",
        "I9CDX": "http://hl7.org/fhir/sid/icd-9-cm",
        "ICD9": "http://hl7.org/fhir/sid/icd-9-cm",
        "I10C": "http://hl7.org/fhir/sid/icd-10-cm",
        "ICD10CM": "http://hl7.org/fhir/sid/icd-10-cm",
        "C4": "http://www.ama-assn.org/go/cpt",
        "CPT": "http://www.ama-assn.org/go/cpt",
        "CVX": "http://hl7.org/fhir/sid/cvx",
        "NDC": "http://hl7.org/fhir/sid/ndc",
        "RXNORM": "http://www.nlm.nih.gov/research/umls/rxnorm",
        "RXN": "http://www.nlm.nih.gov/research/umls/rxnorm",
    }
)


def coding_system(name: str) -> str | None:
    """The FHIR system URI of a v2 coding system name (CWE.3/6/12), or None for the LIS's own
    codes: an empty, local (``L``, ``99zzz``) or unknown name (those are the site's to map).
    ``HL7nnnn`` is v2 table nnnn."""
    n = name.strip().upper()
    if n in CODE_SYSTEMS:
        return CODE_SYSTEMS[n]
    if len(n) == 7 and n.startswith("HL7") and n[3:].isdigit():
        return f"http://terminology.hl7.org/CodeSystem/v2-{n[3:]}"
    return None


#: printed lab units -> UCUM (keys compared after normalise_unit)
_UNITS = {
    "mmol/L": "mmol/L",
    "umol/L": "umol/L",
    "nmol/L": "nmol/L",
    "pmol/L": "pmol/L",
    "mol/L": "mol/L",
    "g/L": "g/L",
    "mg/L": "mg/L",
    "ug/L": "ug/L",
    "ng/L": "ng/L",
    "g/dL": "g/dL",
    "mg/dL": "mg/dL",
    "ng/mL": "ng/mL",
    "pg/mL": "pg/mL",
    "ug/mL": "ug/mL",
    "U/L": "U/L",
    "IU/L": "[IU]/L",
    "IU/mL": "[IU]/mL",
    "mIU/mL": "m[IU]/mL",
    "mIU/L": "m[IU]/L",
    "uIU/mL": "u[IU]/mL",
    "kU/L": "k[IU]/L",
    "U/mL": "U/mL",
    "10*9/L": "10*9/L",
    "10*12/L": "10*12/L",
    "10*6/L": "10*6/L",
    "10*3/uL": "10*3/uL",
    "10*6/uL": "10*6/uL",
    "/uL": "/uL",
    "/L": "/L",
    "fL": "fL",
    "pg": "pg",
    "%": "%",
    "s": "s",
    "sec": "s",
    "min": "min",
    "h": "h",
    "mm/h": "mm/h",
    "mmHg": "mm[Hg]",
    "mL/min": "mL/min",
    "mL/min/1.73m2": "mL/min/{1.73_m2}",
    "/HP": "/[HPF]",
    "/HPF": "/[HPF]",
    "/LP": "/[LPF]",
    "/LPF": "/[LPF]",
    "g/24h": "g/(24.h)",
    "mg/24h": "mg/(24.h)",
    "mOsm/kg": "mosm/kg",
    "ratio": "{ratio}",
    "1": "1",
    "kg": "kg",
    "g": "g",
    "cm": "cm",
    "mm": "mm",
    "mL": "mL",
    "L": "L",
    "Cel": "Cel",
    "℃": "Cel",
    "index": "{index}",
    "S/CO": "{s_co_ratio}",
    "COI": "{COI}",
    "AU/mL": "[arb'U]/mL",
}
_BY_LOWER = {k.lower(): v for k, v in _UNITS.items()}


def normalise_unit(text: str) -> str:
    """The printed unit with the usual variants folded: micro signs, ``^`` powers, ``×``."""
    u = text.strip().replace("μ", "u").replace("µ", "u").replace("^", "*").replace(" ", "")
    for prefix in ("×", "x", "X"):
        if u.startswith(prefix + "10*"):
            u = u[len(prefix) :]
    return u


def ucum(unit_code: str, unit_text: str, coding_system: str) -> str | None:
    """The UCUM code for OBX-6 (identifier, text, coding system), or None if not known."""
    if coding_system.upper() in ("UCUM", "UCUM_CS") and unit_code:
        return unit_code
    for candidate in (unit_code, unit_text):
        if candidate:
            u = normalise_unit(candidate)
            found = _UNITS.get(u) or _BY_LOWER.get(u.lower())
            if found:
                return found
    return None
