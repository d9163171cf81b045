"""The mark on a packet that carries a local code without a standard mapping.

An unmapped code is never dropped: the local coding travels with its own system URI, and the
resource that carries it (and the Bundle it goes in) gets this ``meta.tag``::

    {"system": "http://hutong.dev/CodeSystem/flags", "code": "unmapped-code",
     "display": "含未映射的本地编码 / contains a local code without a standard mapping"}

A receiver (or IT) finds such packets by the tag: ``GET /fhir/MedicationRequest?_tag=...`` where
the API supports it, or :func:`marked_resources` on a Bundle. Marking is idempotent.
"""

from __future__ import annotations

from typing import Any

FLAGS_SYSTEM = "http://hutong.dev/CodeSystem/flags"
UNMAPPED_CODE = "unmapped-code"
UNMAPPED_TAG = {
    "system": FLAGS_SYSTEM,
    "code": UNMAPPED_CODE,
    "display": "含未映射的本地编码 / contains a local code without a standard mapping",
}


def is_marked(resource: dict[str, Any]) -> bool:
    """Whether this resource (or Bundle) itself carries the unmapped-code tag."""
    return any(
        t.get("system") == FLAGS_SYSTEM and t.get("code") == UNMAPPED_CODE
        for t in (resource.get("meta") or {}).get("tag", [])
    )


def mark_unmapped(resource_or_bundle: dict[str, Any]) -> dict[str, Any]:
    """Add the unmapped-code tag to ``meta.tag`` (once); returns the same dict.

    Mark the resource that holds the local-only coding (the tag then travels with it into
    every packet the workflow builds) and the Bundle you hand to the node.
    """
    if not is_marked(resource_or_bundle):
        meta = resource_or_bundle.setdefault("meta", {})
        meta.setdefault("tag", []).append(dict(UNMAPPED_TAG))
    return resource_or_bundle


def marked_resources(bundle: dict[str, Any]) -> list[str]:
    """``Type/id`` of every entry resource of a Bundle that carries the tag."""
    out = []
    for entry in bundle.get("entry", []):
        res = entry.get("resource") or {}
        if is_marked(res):
            out.append(f"{res.get('resourceType')}/{res.get('id', '?')}")
    return out
