"""``hutong mapping``: check a site's maps for gaps, translate a code, export the ConceptMaps."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from bridge.errors import ConfigError

mapping_app = typer.Typer(
    no_args_is_help=True, help="Code maps: gaps per site, $translate, ConceptMap export"
)

NodeOpt = Annotated[
    Path | None,
    typer.Option(
        "--node",
        "--config",
        "-c",
        help="a node file: its site maps and the gaps its store has seen",
    ),
]
SiteOpt = Annotated[
    list[Path] | None,
    typer.Option("--site", help="a site mapping folder (mappings/<site>); may be repeated"),
]


def _echo(lines: list[str]) -> None:
    for line in lines:
        sys.stdout.write(line + "\n")


def _sites(node: Path | None, site: list[Path] | None) -> tuple[list[Path], Any]:
    if (node is None) == (not site):
        raise ConfigError("give either --node NODE_FILE or --site FOLDER")
    if node is None:
        return list(site or []), None
    from bridge.config.loader import load_node
    from bridge.mapping.sites import site_folders

    plan = load_node(node)
    return site_folders(plan), plan


@mapping_app.command("check")
def check(
    node: NodeOpt = None,
    site: SiteOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="the report as JSON")] = False,
) -> None:
    """List every gap per site and map, with counts; exit 1 when there is any.

    With --site: rows with an empty target (known local codes not mapped yet). With --node:
    also the codes the node's adapters met without a mapping, and how many times.
    """
    from bridge.mapping.conceptmap import load_site
    from bridge.mapping.gaps import (
        find_gaps,
        gaps_without_folder,
        observed_gaps,
        report_json,
        report_lines,
    )

    folders, plan = _sites(node, site)
    observed = []
    if plan is not None:
        from bridge.store.db import Store

        store = Store(plan.storage_dsn)
        try:
            store.create_all()
            observed = observed_gaps(store)
        finally:
            store.dispose()
    report: dict[str, Any] = {}
    for folder in folders:
        maps = load_site(folder)
        report[maps.site] = (maps, find_gaps(maps, observed))
    for name in sorted({o.site for o in observed} - set(report)):
        report[name] = (None, gaps_without_folder(name, observed))
    if not report:
        raise ConfigError(
            f"{node}: the node has no site mapping folder (an [[adapters]] "
            'table with mappings = "..." holding codes/maps.csv)'
        )
    if as_json:
        sys.stdout.write(report_json(report) + "\n")
    else:
        _echo(report_lines(report))
    if any(gaps for _, gaps in report.values()):
        raise typer.Exit(1)


@mapping_app.command("translate")
def translate_cmd(
    map_id: Annotated[str, typer.Argument(help="map id: drug, lab, diagnosis, department")],
    code: Annotated[str, typer.Argument(help="the code to translate")],
    site: Annotated[Path, typer.Option("--site", help="the site mapping folder")],
    reverse: Annotated[bool, typer.Option(help="shared code -> this site's local code")] = False,
) -> None:
    """Translate one code with a site's map; prints the R4 Parameters ($translate output)."""
    from bridge.mapping.conceptmap import load_site, translate

    maps = load_site(site)
    if map_id not in maps.conceptmaps:
        raise ConfigError(f"{site}: no map {map_id!r} (maps: {', '.join(maps.conceptmaps)})")
    info = maps.info[map_id]
    system = info.target_system if reverse else info.source_system
    out = translate(maps.conceptmaps[map_id], system, code, reverse=reverse)
    sys.stdout.write(json.dumps(out, ensure_ascii=False, indent=2) + "\n")
    if not out["parameter"][0]["valueBoolean"]:
        raise typer.Exit(1)


@mapping_app.command("export")
def export(
    site: Annotated[Path, typer.Option("--site", help="the site mapping folder")],
    out: Annotated[Path, typer.Option("--out", help="folder for ConceptMap-<id>.json files")],
) -> None:
    """Write the site's ConceptMaps as FHIR R4 JSON (for a terminology server or review)."""
    from bridge.mapping.conceptmap import load_site

    maps = load_site(site)
    out.mkdir(parents=True, exist_ok=True)
    for cm in maps.conceptmaps.values():
        path = out / f"ConceptMap-{cm['id']}.json"
        path.write_text(json.dumps(cm, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        sys.stdout.write(f"{path}\n")
