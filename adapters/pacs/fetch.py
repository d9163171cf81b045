"""On-demand study fetch between members: the two packet kinds and their FHIR bodies.

``imaging.fetch-request`` (B -> A): a ``collection`` Bundle holding one ``Task`` (code
``urn:hutong:task#imaging-fetch``, status ``requested``, ``focus`` the ImagingStudy by its
``urn:dicom:uid`` identifier, input ``StudyInstanceUID``) and, if B knows it, a ``Patient``
carrying only the keyed patient hash (so both sides' audit rows name the patient, never the ID).

``imaging.fetch-response`` (A -> B, same thread, one or several packets): each a ``collection``
Bundle with a ``Task`` (status ``completed`` or ``failed`` + ``statusReason``; ``groupIdentifier``
the request Task id; outputs ``part`` "i/n", ``instances-total`` and one ``dicom-instance``
attachment per instance: ``url`` Binary/<SOP Instance UID>, ``size``, ``hash`` (SHA-1, base64,
as FHIR defines it)), the instances as ``Binary`` (``application/dicom``, the Part-10 file bytes
unchanged), and in part 1 the ImagingStudy and its DiagnosticReports. Parts are cut so that each
body stays under the node's ``limits.max_body_bytes`` (base64 grows data by 4/3).

Both kinds are rule-checked by the gateway like any other kind: an alliance allows them with
``[[rules]]`` entries naming ``imaging.fetch-request`` / ``imaging.fetch-response``.
"""

from __future__ import annotations

import base64
import copy
import hashlib
from dataclasses import dataclass, field
from typing import Any

import orjson

from adapters.pacs.errors import FetchFailed
from adapters.pacs.files import path_uid
from adapters.pacs.study import study_identifier

KIND_REQUEST = "imaging.fetch-request"
KIND_RESPONSE = "imaging.fetch-response"
TASK_SYSTEM = "urn:hutong:task"
FETCH_GROUP = "urn:hutong:imaging-fetch"
MEMBER_SYSTEM = "urn:hutong:member"
HASH_SYSTEM = "urn:hutong:patient-hash"
DICOM_MIME = "application/dicom"
ENVELOPE_ALLOWANCE = 64 * 1024  # JSON around the base64 of one part


def _code() -> dict[str, Any]:
    return {
        "coding": [
            {"system": TASK_SYSTEM, "code": "imaging-fetch", "display": "Fetch imaging study"}
        ],
        "text": "调阅影像 / Fetch imaging study",
    }


def _out(code: str, **value: Any) -> dict[str, Any]:
    return {"type": {"coding": [{"system": TASK_SYSTEM, "code": code}]}, **value}


def _hash_patient(patient_hash: str | None) -> list[dict[str, Any]]:
    if not patient_hash:
        return []
    return [
        {
            "resource": {
                "resourceType": "Patient",
                "id": "patient",
                "identifier": [{"system": HASH_SYSTEM, "value": patient_hash}],
            }
        }
    ]


def hash_subject(patient_hash: str | None) -> dict[str, Any]:
    """How a resource leaving the node names its patient: by the keyed hash only."""
    if patient_hash:
        return {"identifier": {"system": HASH_SYSTEM, "value": patient_hash}}
    return {"display": "unknown patient"}


def request_task(
    task_id: str, study_uid: str, requester: str, owner: str, authored: str
) -> dict[str, Any]:
    return {
        "resourceType": "Task",
        "id": task_id,
        "status": "requested",
        "intent": "order",
        "code": _code(),
        "focus": {"type": "ImagingStudy", "identifier": study_identifier(study_uid)},
        "authoredOn": authored,
        "requester": {"identifier": {"system": MEMBER_SYSTEM, "value": requester}},
        "owner": {"identifier": {"system": MEMBER_SYSTEM, "value": owner}},
        "input": [{"type": {"text": "StudyInstanceUID"}, "valueOid": f"urn:oid:{study_uid}"}],
    }


def request_bundle(task: dict[str, Any], patient_hash: str | None) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": task}, *_hash_patient(patient_hash)],
    }


@dataclass
class FetchRequest:
    task_id: str
    study_uid: str
    patient_hash: str | None


def _resources(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    """The resources of a packet's Bundle (decoded by the dispatcher, validated against the R4
    schema at the gateway already)."""
    return [e["resource"] for e in bundle.get("entry") or () if "resource" in e]


def _study_uid_of(task: dict[str, Any]) -> str:
    for item in task.get("input") or ():
        if (item.get("type") or {}).get("text") == "StudyInstanceUID":
            value = str(item.get("valueOid") or "")
            if value.startswith("urn:oid:"):  # names folders on both sides: a UID or nothing
                return path_uid(value[8:], field="Task.input StudyInstanceUID")
    raise FetchFailed(f"record Task/{task.get('id')} field Task.input: no StudyInstanceUID")


def study_uid_of(task: dict[str, Any]) -> str:
    """The StudyInstanceUID a fetch Task asks for (checked as a UID)."""
    return _study_uid_of(task)


def _patient_hash_of(resources: list[dict[str, Any]]) -> str | None:
    for r in resources:
        if r["resourceType"] == "Patient":
            for ident in r.get("identifier") or ():
                if ident.get("system") == HASH_SYSTEM:
                    return str(ident["value"])
    return None


def parse_request(bundle: dict[str, Any]) -> FetchRequest:
    """The request a fetch-request Bundle carries (the study UID checked as a UID)."""
    resources = _resources(bundle)
    task = next((r for r in resources if r["resourceType"] == "Task"), None)
    if task is None:
        raise FetchFailed("fetch request without a Task")
    return FetchRequest(str(task["id"]), _study_uid_of(task), _patient_hash_of(resources))


def raw_budget(max_body_bytes: int, chunk_bytes: int | None) -> int:
    """Raw DICOM bytes one response packet may carry."""
    budget = (max_body_bytes - ENVELOPE_ALLOWANCE) * 3 // 4
    return min(budget, chunk_bytes) if chunk_bytes else budget


def plan_parts(sizes: list[int], budget: int, first_extra: int) -> list[list[int]]:
    """Indices of instances per part, in order; part 1 also carries ``first_extra`` bytes."""
    parts: list[list[int]] = [[]]
    used = first_extra * 3 // 4
    for i, size in enumerate(sizes):
        if size > budget:
            raise FetchFailed(
                f"instance {i + 1} is {size} bytes, more than one packet carries "
                f"({budget}); raise limits.max_body_bytes"
            )
        if parts[-1] and used + size > budget:
            parts.append([])
            used = 0
        parts[-1].append(i)
        used += size
    return parts


def response_bundles(
    request: FetchRequest,
    instances: list[tuple[str, bytes]],
    first: list[dict[str, Any]],
    budget: int,
    *,
    patient_hash: str | None,
) -> list[dict[str, Any]]:
    """The response packets: instances (SOP UID, Part-10 bytes) cut into parts; ``first``
    (ImagingStudy, DiagnosticReports) rides in part 1."""
    extra = len(orjson.dumps(first))
    parts = plan_parts([len(b) for _, b in instances], budget, extra)
    bundles = []
    for n, indices in enumerate(parts, start=1):
        outputs = [
            _out("part", valueString=f"{n}/{len(parts)}"),
            _out("instances-total", valueUnsignedInt=len(instances)),
        ]
        entries: list[dict[str, Any]] = []
        for i in indices:
            sop, data = instances[i]
            outputs.append(
                _out(
                    "dicom-instance",
                    valueAttachment={
                        "contentType": DICOM_MIME,
                        "url": f"Binary/{sop}",
                        "size": len(data),
                        "hash": base64.b64encode(hashlib.sha1(data).digest()).decode("ascii"),
                        "title": sop,
                    },
                )
            )
            entries.append(
                {
                    "resource": {
                        "resourceType": "Binary",
                        "id": sop,
                        "contentType": DICOM_MIME,
                        "data": base64.b64encode(data).decode("ascii"),
                    }
                }
            )
        task = _response_task(request, n, "completed", outputs)
        bundles.append(
            {
                "resourceType": "Bundle",
                "type": "collection",
                "entry": [
                    {"resource": task},
                    *_hash_patient(patient_hash),
                    *([{"resource": r} for r in first] if n == 1 else []),
                    *entries,
                ],
            }
        )
    return bundles


def failure_bundle(
    request: FetchRequest, reason: str, *, patient_hash: str | None
) -> dict[str, Any]:
    task = _response_task(
        request,
        1,
        "failed",
        [_out("part", valueString="1/1"), _out("instances-total", valueUnsignedInt=0)],
    )
    task["statusReason"] = {"text": reason}
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": task}, *_hash_patient(patient_hash)],
    }


def _response_task(
    request: FetchRequest, part: int, status: str, outputs: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "resourceType": "Task",
        "id": f"{request.task_id}-{part}",
        "status": status,
        "intent": "order",
        "code": _code(),
        "groupIdentifier": {"system": FETCH_GROUP, "value": request.task_id},
        "focus": {"type": "ImagingStudy", "identifier": study_identifier(request.study_uid)},
        "input": [
            {"type": {"text": "StudyInstanceUID"}, "valueOid": f"urn:oid:{request.study_uid}"}
        ],
        "output": outputs,
    }


@dataclass
class FetchResponse:
    task_id: str
    study_uid: str
    status: str
    reason: str | None
    part: str
    total: int
    patient_hash: str | None
    resources: list[dict[str, Any]] = field(default_factory=list)  # ImagingStudy, reports
    instances: list[tuple[str, bytes]] = field(default_factory=list)


def parse_response(bundle: dict[str, Any]) -> FetchResponse:
    """Read and check a response part's Bundle: every instance against its attachment's size
    and SHA-1; anything missing or different is a FetchFailed naming the instance. The
    resources returned are copies (the caller rewrites their subject)."""
    resources = _resources(bundle)
    task = next((r for r in resources if r["resourceType"] == "Task"), None)
    if task is None or not task.get("groupIdentifier"):
        raise FetchFailed("fetch response without its Task")
    outputs = task.get("output") or []

    def value(code: str, key: str) -> Any:
        for o in outputs:
            if o["type"]["coding"][0]["code"] == code:
                return o.get(key)
        return None

    binaries = {r["id"]: r for r in resources if r["resourceType"] == "Binary"}
    instances = []
    for o in outputs:
        if o["type"]["coding"][0]["code"] != "dicom-instance":
            continue
        att = o["valueAttachment"]
        sop = str(att.get("title") or "")
        binary = binaries.get(str(att.get("url", "")).removeprefix("Binary/"))
        if binary is None or "data" not in binary:
            raise FetchFailed(f"instance {sop}: announced but not in the packet")
        data = base64.b64decode(binary["data"])
        digest = base64.b64encode(hashlib.sha1(data).digest()).decode("ascii")
        if len(data) != att.get("size") or digest != att.get("hash"):
            raise FetchFailed(f"instance {sop}: size or SHA-1 differs from the manifest")
        instances.append((sop, data))
    others = [
        copy.deepcopy(r)
        for r in resources
        if r["resourceType"] in ("ImagingStudy", "DiagnosticReport")
    ]
    reason = (task.get("statusReason") or {}).get("text")
    return FetchResponse(
        str(task["groupIdentifier"]["value"]),
        _study_uid_of(task),
        str(task["status"]),
        reason,
        str(value("part", "valueString") or "1/1"),
        int(value("instances-total", "valueUnsignedInt") or 0),
        _patient_hash_of(resources),
        others,
        instances,
    )
