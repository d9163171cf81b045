"""The egress rule: no packet leaves carrying a national ID number in clear.

Checked in ``queue_packets``, the one place every outgoing packet passes (the local API,
``hutong send``, adapters, the referral workflow, results routing, quarantine replay): any
object of the Bundle with a ``system`` of a refused identifier system and a ``value``
(Patient.identifier, Reference.identifier, contained resources, extensions) refuses the
packet. The message names where, never the value.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from bridge.errors import NationalIdEgress


def find_refused_identifier(obj: Any, systems: Collection[str], path: str = "Bundle") -> str | None:
    """The FHIR path of the first identifier of a refused system in ``obj``, or None."""
    stack: list[tuple[Any, str]] = [(obj, path)]
    while stack:
        node, where = stack.pop()
        if isinstance(node, dict):
            system = node.get("system")
            if (
                isinstance(system, str)
                and system in systems
                and node.get("value") not in (None, "")
            ):
                return where
            for key, value in reversed(list(node.items())):
                if isinstance(value, (dict, list)):
                    label = f"{where}.{str(key)[:40]}"
                    if isinstance(value, dict) and isinstance(value.get("resourceType"), str):
                        label += f"({value['resourceType'][:40]})"
                    stack.append((value, label))
        elif isinstance(node, list):
            for i in range(len(node) - 1, -1, -1):
                item, label = node[i], f"{where}[{i}]"
                if isinstance(item, dict) and isinstance(item.get("resourceType"), str):
                    label += f"({item['resourceType'][:40]})"  # a contained resource
                stack.append((item, label))
    return None


def check_egress(
    bundle: dict[str, Any], systems: Collection[str], raw: bytes | None = None
) -> None:
    """Raise NationalIdEgress if the Bundle carries an identifier of a refused system.

    ``raw``: the Bundle's JSON bytes; when no system appears in them literally and they hold
    no escape at all (``\\u0075``, ``\\/`` could spell one) the walk is skipped."""
    if not systems:
        return
    if raw is not None and b"\\" not in raw and not any(s.encode() in raw for s in systems):
        return
    where = find_refused_identifier(bundle, frozenset(systems))
    if where is not None:
        raise NationalIdEgress(
            f"{where[:200]}: a national ID number may not leave this node (only its keyed "
            "patient hash may); remove the identifier or send it as urn:hutong:patient-hash"
        )
