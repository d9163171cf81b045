"""Which mapping folders belong to a node.

A node's site maps are the ``mappings`` folders of its ``[[adapters]]`` tables that hold a
``codes/maps.csv`` (an LIS helper's own formats are skipped). A node without such an adapter
falls back to ``mappings/<node_id>`` next to its ``alliance.toml`` when that folder exists, so
an alliance folder can carry its members' maps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bridge.mapping.conceptmap import SiteMaps, is_site_folder, load_site


def site_folders(plan: Any) -> list[Path]:
    """The node's site mapping folders, in adapter order, each once."""
    found: list[Path] = []
    for a in plan.adapters:
        if a.mappings is not None and is_site_folder(a.mappings):
            p = Path(a.mappings).resolve()
            if p not in found:
                found.append(p)
    if not found and plan.source_files:
        fallback = Path(plan.source_files[0]).parent / "mappings" / plan.node_id
        if is_site_folder(fallback):
            found.append(fallback.resolve())
    return found


def load_node_maps(plan: Any) -> list[SiteMaps]:
    """Every site folder of a node, loaded (ConfigError on a bad file)."""
    return [load_site(folder) for folder in site_folders(plan)]
