"""Build and reshape the FHIR R4 resources of a referral as plain dicts (payload, not tables).

Packets are FHIR messages: a ``message`` Bundle whose MessageHeader names the step and focuses
the Task, with every resource the other side needs inside (BSeR's messaging option).
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from bridge.referral.codes import (
    EVENT_SYSTEM,
    MEMBER_SYSTEM,
    PATIENT_HASH_SYSTEM,
    SNOMED,
    TASK_CODE,
    step_codeable,
)

Resource = dict[str, Any]


def iso(t: datetime) -> str:
    return t.isoformat(timespec="seconds").replace("+00:00", "Z")


def ref(resource: Resource) -> str:
    return f"{resource['resourceType']}/{resource['id']}"


def organization(member: Any) -> Resource:
    """A member as an Organization whose id is its member id."""
    return {
        "resourceType": "Organization",
        "id": member.id,
        "identifier": [{"system": MEMBER_SYSTEM, "value": member.id}],
        "active": True,
        "name": member.names.zh,
        "alias": [member.names.en],
    }


def referral_category() -> list[dict[str, Any]]:
    return [{"coding": [{"system": SNOMED, "code": "3457005", "display": "Patient referral"}]}]


def new_task(
    sr: Resource,
    *,
    referrer: str,
    receiver: str,
    patient_ref: str,
    at: datetime,
    task_id: str | None = None,
) -> Resource:
    return {
        "resourceType": "Task",
        "id": task_id or str(uuid.uuid4()),
        "basedOn": [{"reference": ref(sr)}],
        "status": "draft",
        "businessStatus": step_codeable("draft"),
        "intent": "order",
        "priority": sr.get("priority", "routine"),
        "code": {"coding": [{"system": TASK_CODE, "code": "fulfill"}]},
        "focus": {"reference": ref(sr)},
        "for": {"reference": patient_ref},
        "authoredOn": iso(at),
        "lastModified": iso(at),
        "requester": {"reference": f"Organization/{referrer}"},
        "owner": {"reference": f"Organization/{receiver}"},
    }


def message(
    event: str,
    *,
    sender: str,
    receiver: str,
    task: Resource,
    resources: Iterable[Resource],
    at: datetime,
) -> Resource:
    """A FHIR message Bundle for one referral step."""
    header = {
        "resourceType": "MessageHeader",
        "id": str(uuid.uuid4()),
        "eventCoding": {"system": EVENT_SYSTEM, "code": event},
        "destination": [
            {
                "endpoint": f"urn:hutong:node:{receiver}",
                "receiver": {"reference": f"Organization/{receiver}"},
            }
        ],
        "sender": {"reference": f"Organization/{sender}"},
        "source": {"endpoint": f"urn:hutong:node:{sender}", "software": "Hutong"},
        "focus": [{"reference": ref(task)}],
    }
    seen: set[str] = set()
    entries = []
    for r in (header, task, *resources):
        key = ref(r)
        if key in seen:
            continue
        seen.add(key)
        entries.append({"fullUrl": f"https://{sender}.hutong.invalid/fhir/{key}", "resource": r})
    return {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "type": "message",
        "timestamp": at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "entry": entries,
    }


def for_the_wire(
    patient: Resource, phash: str | None, national_id_system: str, clear_id: bool = False
) -> Resource:
    """The Patient as it leaves: the national ID number replaced by its keyed hash."""
    out = copy.deepcopy(patient)
    idents = [
        i for i in out.get("identifier") or [] if clear_id or i.get("system") != national_id_system
    ]
    idents = [i for i in idents if i.get("system") != PATIENT_HASH_SYSTEM]
    if phash:
        idents.append({"system": PATIENT_HASH_SYSTEM, "value": phash})
    out["identifier"] = idents
    out.pop("meta", None)
    return out


def hash_of(patient: Resource) -> str | None:
    for i in patient.get("identifier") or []:
        if i.get("system") == PATIENT_HASH_SYSTEM:
            return str(i.get("value"))
    return None


def rewrite_refs(obj: Any, mapping: dict[str, str]) -> Any:
    """Replace every ``reference`` found in ``mapping`` (e.g. urn:uuid -> Type/id)."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if k == "reference" and isinstance(v, str) and v in mapping:
                out[k] = mapping[v]
            else:
                out[k] = rewrite_refs(v, mapping)
        return out
    if isinstance(obj, list):
        return [rewrite_refs(v, mapping) for v in obj]
    return obj


def references(obj: Any) -> Iterable[str]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "reference" and isinstance(v, str):
                yield v
            else:
                yield from references(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from references(v)


def output(code: str, zh: str, **value: Any) -> dict[str, Any]:
    from bridge.referral.codes import OUTPUT_SYSTEM

    return {"type": {"coding": [{"system": OUTPUT_SYSTEM, "code": code, "display": zh}]}, **value}
