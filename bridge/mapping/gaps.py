"""Mapping gaps: codes a site lists or meets that its maps cannot translate.

Two sources, one report (``hutong mapping check``):

* the site folder itself: a row with an empty ``target_code`` is a known local code that is not
  mapped yet (kind ``no-target``);
* the node's store: every time an adapter meets a code it cannot map it calls
  :func:`record_gap`, which counts it in the ``mapping_gap`` table (site, map, system, code,
  display, count, first_seen, last_seen). Kinds: ``unmapped`` (a local code not in the map),
  ``no-local`` (an arriving shared code this site has no local code for), ``unknown-map`` (a
  code of a system no map of the site covers).

Adapter usage (``host`` is the adapter's :class:`~bridge.local.host.AdapterHost`)::

    codings, unmapped = map_coding(host.maps, "drug", {"code": row.drug_code, "display": name})
    if unmapped:
        note_unmapped(host, "drug", codings[-1], medication_request, bundle)
        # = host.record_gap("drug", codings[-1])
        #   + mark_unmapped(medication_request) + mark_unmapped(bundle)

:func:`find_gaps` is pure (maps + observations in, gaps out), so it runs without a database.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, select
from sqlalchemy.dialects import postgresql, sqlite

from bridge.mapping.conceptmap import NO_MATCH, SiteMaps
from bridge.mapping.marker import mark_unmapped
from bridge.mapping.tables import MAPPING_GAP

KINDS = ("no-target", "unmapped", "no-local", "unknown-map")


@dataclass(frozen=True)
class Observed:
    """One code an adapter met ``count`` times without a mapping (a ``mapping_gap`` row)."""

    site: str
    map: str
    system: str
    code: str
    display: str = ""
    count: int = 1
    first_seen: datetime | None = None
    last_seen: datetime | None = None


@dataclass(frozen=True)
class Gap:
    site: str
    map: str
    code: str
    display: str
    count: int  # times observed in the node's store (0: only listed in the map)
    kind: str  # no-target | unmapped | no-local | unknown-map
    system: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- recording -------------------------------------------------------------------------------


def _upsert(conn: Connection, values: dict[str, Any]) -> None:
    dialect = conn.dialect.name
    mod = postgresql if dialect == "postgresql" else sqlite
    stmt = mod.insert(MAPPING_GAP).values(**values)
    excluded = stmt.excluded
    stmt = stmt.on_conflict_do_update(
        index_elements=["site", "map", "system", "code"],
        set_={
            "count": MAPPING_GAP.c.count + excluded.count,
            "last_seen": excluded.last_seen,
            "display": excluded.display,
        },
    )
    conn.execute(stmt)


def record_gap(
    target: Any,
    site: str,
    map_id: str | None,
    coding: Mapping[str, Any],
    *,
    at: datetime,
    count: int = 1,
) -> None:
    """Count one unmapped code in the node's ``mapping_gap`` table.

    ``target`` is the node's store (``host.store``: its own short write transaction) or an open
    write ``Connection`` (to count in the adapter's own transaction). ``coding`` needs ``system``
    and ``code``; ``display`` is kept (the latest non-empty one). No patient data belongs here:
    codes and code names only.
    """
    values = {
        "site": site[:48],
        "map": (map_id or "")[:48],
        "system": str(coding.get("system", ""))[:200],
        "code": str(coding["code"])[:100],
        "display": str(coding.get("display", ""))[:200],
        "count": count,
        "first_seen": at,
        "last_seen": at,
    }
    if isinstance(target, Connection):
        _upsert_keep_display(target, values)
    else:
        with target.write() as conn:
            _upsert_keep_display(conn, values)


def _upsert_keep_display(conn: Connection, values: dict[str, Any]) -> None:
    if not values["display"]:
        # an empty display must not wipe a known one: read it back first (same transaction)
        held = conn.execute(
            select(MAPPING_GAP.c.display).where(
                MAPPING_GAP.c.site == values["site"],
                MAPPING_GAP.c.map == values["map"],
                MAPPING_GAP.c.system == values["system"],
                MAPPING_GAP.c.code == values["code"],
            )
        ).scalar()
        if held:
            values = {**values, "display": held}
    _upsert(conn, values)


def note_unmapped(
    host: Any, map_id: str | None, coding: Mapping[str, Any], *resources: dict[str, Any]
) -> None:
    """The adapter's one call for an unmapped code: count it in the node's store (under the
    site of ``host.maps``) and put the unmapped-code tag on each resource / Bundle given."""
    host.record_gap(map_id, dict(coding))
    for resource in resources:
        mark_unmapped(resource)


def observed_gaps(target: Any, site: str | None = None) -> list[Observed]:
    """The ``mapping_gap`` rows (of one site, or all), most-seen first."""

    def run(conn: Connection) -> list[Observed]:
        q = select(MAPPING_GAP).order_by(
            MAPPING_GAP.c.count.desc(), MAPPING_GAP.c.site, MAPPING_GAP.c.map, MAPPING_GAP.c.code
        )
        if site is not None:
            q = q.where(MAPPING_GAP.c.site == site)
        return [
            Observed(
                r.site,
                r.map,
                r.system,
                r.code,
                r.display,
                r._mapping["count"],
                r.first_seen,
                r.last_seen,
            )
            for r in conn.execute(q)
        ]

    if isinstance(target, Connection):
        return run(target)
    with target.read() as conn:
        return run(conn)


# -- finding ---------------------------------------------------------------------------------


def find_gaps(maps: SiteMaps, observed: Iterable[Observed] = ()) -> list[Gap]:
    """Every gap of one site, grouped by map (maps.csv order, unknown maps last).

    Within a map: most-observed first, then by code. An observed code that the map now
    translates (someone fixed the CSV since) is no longer a gap.
    """
    counts: dict[tuple[str, str, str], int] = {}
    displays: dict[tuple[str, str, str], str] = {}
    for o in observed:
        if o.site != maps.site:
            continue
        map_id = o.map if o.map in maps.info else (maps.map_for_system(o.system) or o.map)
        key = (map_id, o.system, o.code)
        counts[key] = counts.get(key, 0) + o.count
        if o.display and not displays.get(key):
            displays[key] = o.display
    translator = maps.translator()
    gaps: list[Gap] = []
    for map_id, rows in maps.rows.items():
        info = maps.info[map_id]
        by_code = {r.source_code: r for r in rows}
        found: list[Gap] = []
        for r in rows:
            if not r.target_code or r.equivalence in NO_MATCH:
                n = counts.get((map_id, info.source_system, r.source_code), 0)
                found.append(
                    Gap(
                        maps.site,
                        map_id,
                        r.source_code,
                        r.source_display,
                        n,
                        "no-target",
                        info.source_system,
                    )
                )
        for (m, system, code), n in counts.items():
            if m != map_id:
                continue
            shown = displays.get((m, system, code), "")
            if system == info.source_system and code not in by_code:
                found.append(Gap(maps.site, map_id, code, shown, n, "unmapped", system))
            elif system == info.target_system and translator.reverse(map_id, code) is None:
                found.append(Gap(maps.site, map_id, code, shown, n, "no-local", system))
            elif system not in (info.source_system, info.target_system):
                found.append(Gap(maps.site, map_id, code, shown, n, "unknown-map", system))
        gaps.extend(sorted(found, key=lambda g: (-g.count, g.code)))
    unknown = [
        Gap(maps.site, m, code, displays.get((m, system, code), ""), n, "unknown-map", system)
        for (m, system, code), n in counts.items()
        if m not in maps.rows
    ]
    gaps.extend(sorted(unknown, key=lambda g: (g.map, g.system, -g.count, g.code)))
    return gaps


def gaps_without_folder(site: str, observed: Iterable[Observed]) -> list[Gap]:
    """Observed gaps of a site whose mapping folder is not at hand (reported as recorded)."""
    out = [
        Gap(
            o.site,
            o.map,
            o.code,
            o.display,
            o.count,
            "unmapped" if o.map else "unknown-map",
            o.system,
        )
        for o in observed
        if o.site == site
    ]
    return sorted(out, key=lambda g: (g.map, -g.count, g.code))


# -- reporting -------------------------------------------------------------------------------


def report_lines(sites: Mapping[str, tuple[SiteMaps | None, list[Gap]]]) -> list[str]:
    """The text ``hutong mapping check`` prints: per site, per map, every gap with its count.

    ::

        fuxing/drug: 2 gaps, seen 7 times
          unmapped    FX-9001  seen 5  丹参滴丸
          no-target   FX-0999  seen 0  某药
        fuxing/lab: ok (12 codes)
        total: 2 gaps in 1 of 2 maps (1 site)
    """
    lines: list[str] = []
    total = maps_with = maps_all = 0
    for site, (maps, gaps) in sites.items():
        ids = list(maps.rows) if maps is not None else []
        ids += sorted({g.map for g in gaps} - set(ids))
        for map_id in ids:
            maps_all += 1
            mine = [g for g in gaps if g.map == map_id]
            label = f"{site}/{map_id or '?'}"
            if not mine:
                n_codes = len(maps.rows.get(map_id, [])) if maps is not None else 0
                lines.append(f"{label}: ok ({n_codes} codes)")
                continue
            maps_with += 1
            total += len(mine)
            seen = sum(g.count for g in mine)
            lines.append(
                f"{label}: {len(mine)} gap{'s' if len(mine) != 1 else ''}, "
                f"seen {seen} time{'s' if seen != 1 else ''}"
            )
            width = max(len(g.code) for g in mine)
            for g in mine:
                system = f"  [{g.system}]" if g.kind == "unknown-map" else ""
                lines.append(
                    f"  {g.kind:<12}{g.code:<{width}}  seen {g.count}"
                    f"{'  ' + g.display if g.display else ''}{system}".rstrip()
                )
    n_sites = len(sites)
    lines.append(
        f"total: {total} gap{'s' if total != 1 else ''} in {maps_with} of {maps_all} "
        f"map{'s' if maps_all != 1 else ''} ({n_sites} site{'s' if n_sites != 1 else ''})"
    )
    return lines


def report_json(sites: Mapping[str, tuple[SiteMaps | None, list[Gap]]]) -> str:
    """The same report as JSON: ``{"sites": {site: {"maps": {map: [gap...]}}}, "total": n}``."""
    body: dict[str, Any] = {"sites": {}, "total": 0}
    for site, (maps, gaps) in sites.items():
        per: dict[str, list[dict[str, Any]]] = {m: [] for m in (maps.rows if maps else {})}
        for g in gaps:
            per.setdefault(g.map, []).append(g.as_dict())
        body["sites"][site] = {
            "folder": str(maps.folder) if maps and maps.folder else None,
            "maps": per,
            "gaps": len(gaps),
        }
        body["total"] += len(gaps)
    return json.dumps(body, ensure_ascii=False, indent=2)
