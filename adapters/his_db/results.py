"""Lab results that arrived from another member (``result.lab`` packets) as vendor records.

The results inbox (:mod:`bridge.results.inbox`) has already stored the packet's resources in the
local FHIR store, linked to the referral; this module reads the same Bundle into neutral records
the intermediate-database adapter writes through the site's field maps
(``fields/lab_report.csv``, ``fields/lab_report_item.csv``; imaging reports: the shared
reader :mod:`adapters.imaging`):

* :class:`LabReport`, one per ``DiagnosticReport`` (检验报告): keyed by the report's id, which the
  producing LIS keeps stable across corrections;
* :class:`LabReportItem`, one per ``Observation`` (检验结果明细): keyed by the Observation's id
  (the LIS derives it from the order and the test, so a corrected result has the same id and
  updates the line in place).

Item codes are the READER's local lab codes, translated back from the shared LOINC coding by
:class:`adapters.slips_fhir.Codes` (reverse of the site's ``lab`` ConceptMap). A code that cannot
be translated falls back to the LOINC code, else to the producer's local code, and the gap is
recorded, as for lab lines of a return slip.

Values are kept as text the way the lab reported them: a quantity with its comparator (``<5``),
a ratio as ``1:320``, a range as ``low-high``, a coded value by its text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from adapters.imaging import (  # imaging reports: shared by every HIS style
    NON_IMAGE_MODALITIES,
    ImagingReport,
    imaging_reports_from_bundle,
)
from adapters.slips_fhir import Codes

__all__ = [
    "NON_IMAGE_MODALITIES",
    "ImagingReport",
    "LabReport",
    "LabReportItem",
    "imaging_reports_from_bundle",
    "reports_from_bundle",
    "value_text",
]

Resource = dict[str, Any]


@dataclass
class LabReportItem:
    """One result line: what the receiving HIS shows in its lab result list."""

    result_id: str  # the Observation id (stable across corrections)
    item_code: str  # the reader's local lab item code (or LOINC / the producer's code)
    item_name: str
    value: str
    unit: str = ""
    reference_range: str = ""
    flag: str = ""  # H | L | N | A ... (first interpretation code)
    status: str = ""  # FHIR Observation.status
    measured_at: str = ""  # ISO 8601


@dataclass
class LabReport:
    """One lab report (检验报告) from another member, for the patient under referral."""

    report_id: str  # the DiagnosticReport id (stable across corrections)
    slip_no: str  # the referrer's slip number, when the thread is a known referral
    from_member: str  # the member whose lab produced it
    report_code: str  # the reader's local code of the panel (or LOINC / producer's code)
    report_name: str
    status: str  # FHIR DiagnosticReport.status
    collected_at: str = ""  # specimen collection time (effectiveDateTime)
    issued_at: str = ""
    performer: str = ""  # performing lab's name
    conclusion: str = ""
    items: list[LabReportItem] = field(default_factory=list)


def _num(value: Any) -> str:
    return "" if value is None else str(value)


def value_text(obs: Resource) -> tuple[str, str]:
    """(value, unit) of an Observation as the lab printed them."""
    if "valueQuantity" in obs:
        q = obs["valueQuantity"]
        return f"{q.get('comparator', '')}{_num(q.get('value'))}", str(
            q.get("unit") or q.get("code") or ""
        )
    if "valueString" in obs:
        return str(obs["valueString"]), ""
    if "valueCodeableConcept" in obs:
        cc = obs["valueCodeableConcept"]
        return str(
            cc.get("text")
            or next((c.get("display") or c.get("code") for c in cc.get("coding") or []), "")
        ), ""
    if "valueRatio" in obs:
        r = obs["valueRatio"]
        return (
            f"{_num(r.get('numerator', {}).get('value'))}:"
            f"{_num(r.get('denominator', {}).get('value'))}"
        ), ""
    if "valueRange" in obs:
        low, high = obs["valueRange"].get("low", {}), obs["valueRange"].get("high", {})
        return f"{_num(low.get('value'))}-{_num(high.get('value'))}", str(
            low.get("unit") or high.get("unit") or ""
        )
    for key in ("valueDateTime", "valueTime", "valueInteger", "valueBoolean"):
        if key in obs:
            return str(obs[key]), ""
    return "", ""


def reports_from_bundle(
    bundle: Resource, codes: Codes, *, slip_no: str, sender: str
) -> list[LabReport]:
    """The lab reports of a ``result.lab`` Bundle, lines in the order the report lists them."""
    resources = [e.get("resource") or {} for e in bundle.get("entry") or []]
    by_ref = {f"{r.get('resourceType')}/{r.get('id')}": r for r in resources if r.get("id")}
    out = []
    for dr in (r for r in resources if r.get("resourceType") == "DiagnosticReport"):
        code, name = codes.local("lab", dr.get("code"))
        lab = (
            next(
                (
                    by_ref.get(p.get("reference", ""), {}).get("name") or p.get("display")
                    for p in dr.get("performer") or []
                ),
                "",
            )
            or ""
        )
        report = LabReport(
            report_id=str(dr["id"]),
            slip_no=slip_no,
            from_member=sender,
            report_code=code,
            report_name=name,
            status=str(dr.get("status", "")),
            collected_at=str(dr.get("effectiveDateTime", "")),
            issued_at=str(dr.get("issued", "")),
            performer=str(lab),
            conclusion=str(dr.get("conclusion", "")),
        )
        for ref in dr.get("result") or []:
            obs = by_ref.get(ref.get("reference", ""))
            if obs is None:
                continue
            item_code, item_name = codes.local("lab", obs.get("code"))
            value, unit = value_text(obs)
            report.items.append(
                LabReportItem(
                    result_id=str(obs["id"]),
                    item_code=item_code,
                    item_name=item_name,
                    value=value,
                    unit=unit,
                    reference_range=str(((obs.get("referenceRange") or [{}])[0]).get("text", "")),
                    flag=next(
                        (
                            str(c.get("code", ""))
                            for i in obs.get("interpretation") or []
                            for c in i.get("coding") or []
                        ),
                        "",
                    ),
                    status=str(obs.get("status", "")),
                    measured_at=str(obs.get("effectiveDateTime", "")),
                )
            )
        out.append(report)
    return out
