"""Check a node file's ``[[adapters]]`` tables against the installed adapter types, before
anything starts: ``hutong config check`` and node loading (bridge/config/loader.py) share it.

Kept apart from :mod:`bridge.local.registry` (which builds adapters on a node) so the config
loader depends only on the contract and the entry points, not on the node.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from bridge.config.models import AdapterSettings
from bridge.errors import ConfigError
from bridge.local.contract import AdapterType

GROUP = "hutong.adapters"


def adapter_types() -> dict[str, Any]:
    """{type name: entry point} of every installed adapter type."""
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def adapter_type(name: str) -> AdapterType[Any]:
    """The installed adapter type ``name``; ConfigError if it is not installed or not a type."""
    types = adapter_types()
    if name not in types:
        raise ConfigError(
            f"unknown adapter type '{name}' (installed: {', '.join(sorted(types)) or 'none'})"
        )
    found = types[name].load()
    if not isinstance(found, AdapterType):
        raise ConfigError(
            f"entry point '{name}' ({types[name].value}) is not an AdapterType "
            f"(bridge.local.contract)"
        )
    return found


def check_adapters(
    entries: Any, base_dir: Path, node_binds: Mapping[str, tuple[str, int]] | None = None
) -> list[tuple[str, str]]:
    """Every problem of a node file's ``[[adapters]]`` tables (as read from TOML), as
    ``(where, what)`` with ``where`` like ``adapters.<name>.options.<key>``: the type is
    installed, its options pass its model and its own check, the mapping folder exists, and no
    two listeners (the adapters' and the node's ``node_binds``) share a port."""
    out: list[tuple[str, str]] = []
    if not isinstance(entries, list):
        return out
    binds: list[tuple[tuple[str, int], str]] = [(b, k) for k, b in (node_binds or {}).items()]
    received: dict[str, str] = {}
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("enabled", True) is False:
            continue
        name, kind = entry.get("name"), entry.get("type")
        if not isinstance(name, str) or not isinstance(kind, str) or not kind:
            continue  # the node file's own model names these
        where = f"adapters.{name}"
        for pattern in entry.get("receives") or []:
            if pattern in received:
                out.append(
                    (
                        f"{where}.receives",
                        (f"'{pattern}' is already received by adapters.{received[pattern]}"),
                    )
                )
            received.setdefault(pattern, name)
        mappings = entry.get("mappings")
        folder = None
        if isinstance(mappings, str) and mappings:
            folder = (base_dir / mappings).resolve()
            if not folder.is_dir():
                out.append((f"{where}.mappings", f"no mapping folder {mappings}"))
                folder = None
        try:
            atype = adapter_type(kind)
        except ConfigError as exc:
            out.append((f"{where}.type", exc.problems[0]))
            continue
        raw = entry.get("options", {})
        if not isinstance(raw, dict):
            continue  # the node file's own model names it
        settings = AdapterSettings(
            name=name,
            type=kind,
            mappings=folder,
            receives=tuple(entry.get("receives") or ()),
            options=raw,
            base_dir=base_dir,
        )
        opts, problems = atype.validate(raw, settings)
        out.extend(
            (f"{where}.options.{key}" if key else f"{where}.options", what)
            for key, what in problems
        )
        if opts is None:
            continue
        for host, port in atype.listens(opts):
            if not port:
                continue  # an ephemeral port (tests) clashes with nothing
            other = next((who for b, who in binds if clash((host, port), b)), None)
            if other is not None:
                out.append(
                    (
                        f"{where}.options",
                        (f"listens on {host}:{port}, which is also {other}'s port"),
                    )
                )
            binds.append(((host, port), f"adapters.{name}"))
    return out


def clash(a: tuple[str, int], b: tuple[str, int]) -> bool:
    """Two binds collide on the same port if the hosts match or either is a wildcard."""
    wildcard = ("0.0.0.0", "::", "")
    return a[1] == b[1] and (a[0] == b[0] or a[0] in wildcard or b[0] in wildcard)
