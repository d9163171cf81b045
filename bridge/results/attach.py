"""Imaging reports to the adapters that keep them with their studies (the PACS side of remote
imaging reading, 远程影像诊断).

A report another member's radiologist wrote on a study comes back as a DiagnosticReport with
``imagingStudy`` (the study in the same Bundle, or only a reference whose ``identifier`` is the
Study Instance UID when the study is this node's own). :func:`imaging_events` finds each
report's study UID; :func:`to_imaging_sinks` hands each event to every adapter that is an
:class:`~bridge.local.contract.ImagingReportSink` (the PACS adapter stores it referring to the
study it holds, or answers None). The results inbox does this for every ``result.imaging``
packet (node wiring, after the packet is stored); a workflow that brings a report back in
another packet kind (the consultation loop's report step) calls :func:`to_imaging_sinks` the
same way. A sink's error propagates: the packet is retried and the sink, idempotent by the
event's key, does nothing twice.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from bridge.local.contract import ImagingReportEvent, ImagingReportSink

DICOM_UID = "urn:dicom:uid"


def _uid(identifiers: Iterable[dict[str, Any]]) -> str:
    for ident in identifiers:
        if ident.get("system") == DICOM_UID and ident.get("value"):
            return str(ident["value"]).removeprefix("urn:oid:")
    return ""


def imaging_events(
    bundle: dict[str, Any],
    *,
    key: str,
    sender: str,
    thread: str | None,
    patient: str | None = None,
    party: bool = False,
) -> list[ImagingReportEvent]:
    """One event per DiagnosticReport of ``bundle`` that names a DICOM study; ``patient``
    (``Patient/<id>``, this node's record) replaces the report's subject when given;
    ``party``: the caller checked that ``sender`` is the other party of ``thread``."""
    resources = [e.get("resource") or {} for e in bundle.get("entry") or ()]
    studies = {
        f"ImagingStudy/{r.get('id')}": r
        for r in resources
        if r.get("resourceType") == "ImagingStudy"
    }
    out = []
    for dr in (r for r in resources if r.get("resourceType") == "DiagnosticReport"):
        uid = ""
        for ref in dr.get("imagingStudy") or ():
            study = studies.get(str(ref.get("reference", "")))
            uid = _uid((study or {}).get("identifier") or ()) or _uid([ref.get("identifier") or {}])
            if uid:
                break
        if not uid:
            continue
        report = dict(dr)
        if patient:
            report["subject"] = {"reference": patient}
        out.append(
            ImagingReportEvent(
                key=f"{key}:{dr.get('id')}",
                sender=sender,
                thread=thread,
                study_uid=uid,
                report=report,
                party=party,
            )
        )
    return out


def to_imaging_sinks(
    adapters: Mapping[str, Any], events: list[ImagingReportEvent]
) -> list[dict[str, Any]]:
    """Hand every event to every ImagingReportSink; what they kept (None answers left out)."""
    kept: list[dict[str, Any]] = []
    sinks = [a for a in adapters.values() if isinstance(a, ImagingReportSink)]
    for ev in events:
        for sink in sinks:
            done = sink.on_imaging_report(ev)
            if done is not None:
                kept.append(done)
    return kept
