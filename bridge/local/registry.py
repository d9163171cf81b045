"""Build a node's adapters from its ``[[adapters]]`` tables via the ``hutong.adapters`` group."""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from bridge.errors import ConfigError
from bridge.local.host import AdapterHost

if TYPE_CHECKING:
    from adapters.base import Adapter
    from bridge.node import Node

GROUP = "hutong.adapters"


def adapter_types() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def load_adapters(node: Node) -> dict[str, Adapter]:
    """One adapter per enabled ``[[adapters]]`` table; every unknown type reported at once."""
    types = adapter_types()
    unknown = [f"adapters.{a.name}.type: unknown adapter type '{a.type}' "
               f"(installed: {', '.join(sorted(types)) or 'none'})"
               for a in node.plan.adapters if a.type not in types]
    if unknown:
        raise ConfigError("; ".join(unknown))
    built: dict[str, Adapter] = {}
    for a in node.plan.adapters:
        factory = types[a.type].load()
        built[a.name] = factory(AdapterHost(node, a), dict(a.options))
    return built


def receivers(node: Node, adapters: dict[str, Adapter]) -> dict[str, Adapter]:
    """{kind pattern: adapter} for the dispatcher, from each adapter's ``receives`` list."""
    found: dict[str, Adapter] = {}
    for a in node.plan.adapters:
        for pattern in a.receives:
            if pattern in found:
                raise ConfigError(f"adapters.{a.name}.receives: '{pattern}' is already "
                                  f"received by another adapter")
            found[pattern] = adapters[a.name]
    return found
