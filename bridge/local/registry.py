"""Build a node's adapters from its ``[[adapters]]`` tables via the ``hutong.adapters`` group.

Each entry point names an :class:`~bridge.local.contract.AdapterType`;
:func:`bridge.local.check.check_adapters` reads those declarations to check every table before
anything starts (``hutong config check`` and node loading share it), so :func:`load_adapters`
never refuses what the check passed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from bridge.errors import ConfigError
from bridge.local.check import GROUP, adapter_type, adapter_types, check_adapters
from bridge.local.contract import Adapter, AdapterType
from bridge.local.host import AdapterHost

if TYPE_CHECKING:
    from bridge.node import Node

__all__ = ["GROUP", "adapter_type", "adapter_types", "check_adapters", "load_adapters", "receivers"]


def load_adapters(node: Node) -> dict[str, Adapter]:
    """One adapter per enabled ``[[adapters]]`` table, built from its type's checked options."""
    problems: list[str] = []
    types: dict[str, AdapterType[Any]] = {}
    for a in node.plan.adapters:
        try:
            types[a.type] = adapter_type(a.type)
        except ConfigError as exc:
            problems.append(f"adapters.{a.name}.type: {exc.problems[0]}")
    if problems:
        raise ConfigError("; ".join(problems), problems=problems)
    return {
        a.name: types[a.type](AdapterHost(node, a), dict(a.options)) for a in node.plan.adapters
    }


def receivers(node: Node, adapters: Mapping[str, Adapter]) -> dict[str, Any]:
    """{kind pattern: adapter} for the dispatcher, from each adapter's ``receives`` list."""
    found: dict[str, Any] = {}
    for a in node.plan.adapters:
        for pattern in a.receives:
            if pattern in found:
                raise ConfigError(
                    f"adapters.{a.name}.receives: '{pattern}' is already "
                    f"received by another adapter"
                )
            found[pattern] = adapters[a.name]
    return found
