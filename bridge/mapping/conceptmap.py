"""Load a site's mapping CSVs into FHIR R4 ConceptMaps, answer ``$translate``, index for speed.

A site folder (``mappings/<site>/``) holds ``codes/maps.csv`` (one row per map: id, zh/en title,
source and target system URIs, optional version) and ``codes/<map>.csv`` (one row per local code:
``source_code, source_display, target_code, target_display, equivalence, comment``). Each map
becomes one ConceptMap with one group (source system -> target system), validated against the
official R4 schema. A row with an empty target is kept as an element whose target has
equivalence ``unmatched``: the code is known but not yet mapped, a gap that ``hutong mapping
check`` reports (:mod:`bridge.mapping.gaps`).

Hot paths use :class:`Translator` (one dict lookup per code, both directions), built once per
process from the ConceptMaps. What adapters call:

* ``map_coding(maps, map_id, coding) -> (codings, unmapped)``: a local coding going out. The
  local coding always travels (with its own system URI); the standard coding comes first when
  there is one.
* ``to_local(maps, map_id, codings) -> (coding | None, unmapped)``: codings arriving from
  another member, turned into THIS site's local code (via the shared code: a drug prescribed at
  Fuxing as ``FX-0101`` arrives at Yuetan as ``YT2037`` through ``XC-YP-001``).

``maps`` is a :class:`SiteMaps` (what ``host.maps`` gives an adapter) or a :class:`Translator`.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict, cast

from bridge.errors import ConfigError, InvalidFhir, InvalidResource
from bridge.fhir.validate import validate_resource
from bridge.mapping.csvfile import CsvRow, read_rows

CODES_DIR = "codes"
INDEX_FILE = "maps.csv"
INDEX_COLUMNS = ("map", "title_zh", "title_en", "source_system", "target_system")
INDEX_OPTIONAL = ("version", "description")
ROW_COLUMNS = ("source_code", "source_display", "target_code", "target_display", "equivalence")
ROW_OPTIONAL = ("comment",)
#: R4 ConceptMapEquivalence (http://hl7.org/fhir/concept-map-equivalence)
EQUIVALENCES = (
    "relatedto",
    "equivalent",
    "equal",
    "wider",
    "subsumes",
    "narrower",
    "specializes",
    "inexact",
    "unmatched",
    "disjoint",
)
#: equivalences that say "there is no usable target"
NO_MATCH = frozenset({"unmatched", "disjoint"})
#: R4 invariant cmd-1: these need a comment saying how the concepts differ
NEEDS_COMMENT = frozenset({"narrower", "inexact"})
#: reverse direction (standard -> local): when several local codes share one standard code,
#: the best-ranked equivalence wins, then the first row in the file
REVERSE_RANK = {
    "equal": 0,
    "equivalent": 0,
    "wider": 1,
    "subsumes": 1,
    "narrower": 2,
    "specializes": 2,
    "relatedto": 3,
    "inexact": 3,
}
#: an equivalence read in the other direction
INVERSE = {
    "wider": "narrower",
    "narrower": "wider",
    "subsumes": "specializes",
    "specializes": "subsumes",
}
CANONICAL_BASE = "http://hutong.dev/fhir/ConceptMap"
LOINC = "http://loinc.org"
ICD10 = "http://hl7.org/fhir/sid/icd-10"
_MAP_ID = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
_URI = re.compile(r"^(https?://\S+|urn:(oid|uuid):\S+)$")
_LOINC = re.compile(r"^(\d{1,7})-(\d)$")
_ICD10 = re.compile(r"^[A-Z][0-9]{2}(\.[0-9A-Za-z]{1,8})?$")
_CODE = re.compile(r"^[^\s]+( [^\s]+)*$")  # FHIR code: no leading/trailing/double whitespace


class Coding(TypedDict, total=False):
    """A FHIR Coding as a plain dict (what goes on the wire)."""

    system: str
    code: str
    display: str


@dataclass(frozen=True)
class MapRow:
    source_code: str
    source_display: str
    target_code: str
    target_display: str
    equivalence: str
    comment: str = ""
    line: int = 0


@dataclass(frozen=True)
class MapInfo:
    map_id: str
    title_zh: str
    title_en: str
    source_system: str
    target_system: str
    version: str = ""
    description: str = ""


@dataclass
class SiteMaps:
    """Everything loaded from one site folder: the CSV rows and the ConceptMaps built from them.

    ``conceptmaps`` is keyed by map id (``drug``, ``lab`` ...); each ConceptMap's FHIR id is
    ``<site>-<map>``.
    """

    site: str
    folder: Path | None = None
    info: dict[str, MapInfo] = field(default_factory=dict)
    rows: dict[str, list[MapRow]] = field(default_factory=dict)
    conceptmaps: dict[str, dict[str, Any]] = field(default_factory=dict)
    _translator: Translator | None = field(default=None, repr=False, compare=False)

    def translator(self) -> Translator:
        """The in-memory index, built on first use and kept."""
        if self._translator is None:
            self._translator = Translator(self.conceptmaps)
        return self._translator

    def map_for_system(self, system: str) -> str | None:
        """The map whose source (local) system is ``system``."""
        for map_id, info in self.info.items():
            if info.source_system == system:
                return map_id
        return None


# -- loading ---------------------------------------------------------------------------------


def _loinc_ok(code: str) -> bool:
    """LOINC's mod-10 check digit (catches most typing slips)."""
    m = _LOINC.match(code)
    if not m:
        return False
    total = 0
    for i, ch in enumerate(reversed(m.group(1))):
        d = int(ch)
        if i % 2 == 0:
            d *= 2
            d = d // 10 + d % 10
        total += d
    return (10 - total % 10) % 10 == int(m.group(2))


def _target_problem(system: str, code: str) -> str | None:
    if system == LOINC and not _loinc_ok(code):
        return f"target_code {code!r} is not a LOINC code (NNNNN-C with a valid check digit)"
    if system == ICD10 and not _ICD10.match(code):
        return f"target_code {code!r} is not an ICD-10 code (e.g. I10, E11.9)"
    return None


def _parse_row(r: CsvRow, info: MapInfo, first_seen: dict[str, int], problems: list[str]) -> MapRow:
    code, target = r["source_code"], r["target_code"]
    eq = r["equivalence"] or ("equivalent" if target else "unmatched")
    if not code:
        problems.append(f"{r.where('source_code')}: empty source_code")
    elif not _CODE.match(code):
        problems.append(f"{r.where('source_code')}: source_code {code!r} has stray whitespace")
    elif code in first_seen:
        problems.append(
            f"{r.where('source_code')}: duplicate source_code {code!r} "
            f"(first on line {first_seen[code]})"
        )
    else:
        first_seen[code] = r.line
    if eq not in EQUIVALENCES:
        problems.append(
            f"{r.where('equivalence')}: unknown equivalence {eq!r} "
            f"(one of: {', '.join(EQUIVALENCES)})"
        )
    elif target and eq in NO_MATCH:
        problems.append(
            f"{r.where('equivalence')}: target {target!r} with equivalence {eq} "
            "(leave target_code empty for an unmapped code)"
        )
    elif not target and eq not in NO_MATCH:
        eq = "unmatched"  # an empty target is a gap, whatever the row claims
    if target:
        bad = _target_problem(info.target_system, target)
        if bad is None and not _CODE.match(target):
            bad = f"target_code {target!r} has stray whitespace"
        if bad:
            problems.append(f"{r.where('target_code')}: {bad}")
    if eq in NEEDS_COMMENT and not r["comment"]:
        problems.append(
            f"{r.where('equivalence')}: equivalence {eq} needs a comment saying "
            "how the concepts differ (FHIR cmd-1)"
        )
    return MapRow(code, r["source_display"], target, r["target_display"], eq, r["comment"], r.line)


def read_map_rows(path: Path, info: MapInfo) -> list[MapRow]:
    """The rows of one ``codes/<map>.csv``; ConfigError listing every bad row (file:line:col)."""
    problems: list[str] = []
    first_seen: dict[str, int] = {}
    rows = [
        _parse_row(r, info, first_seen, problems)
        for r in read_rows(path, ROW_COLUMNS, ROW_OPTIONAL)
    ]
    if problems:
        raise ConfigError(f"{path}: {len(problems)} bad mapping row(s)", problems=problems)
    return rows


def read_index(root: Path) -> list[MapInfo]:
    path = root / CODES_DIR / INDEX_FILE
    problems: list[str] = []
    out: list[MapInfo] = []
    seen: dict[str, int] = {}
    for r in read_rows(path, INDEX_COLUMNS, INDEX_OPTIONAL):
        info = MapInfo(
            r["map"],
            r["title_zh"],
            r["title_en"],
            r["source_system"],
            r["target_system"],
            r["version"],
            r["description"],
        )
        if not _MAP_ID.match(info.map_id):
            problems.append(
                f"{r.where('map')}: map id {info.map_id!r} must be lower-case "
                "letters, digits and '-' (it names codes/<map>.csv)"
            )
        elif info.map_id in seen:
            problems.append(
                f"{r.where('map')}: map {info.map_id!r} is listed twice "
                f"(first on line {seen[info.map_id]})"
            )
        else:
            seen[info.map_id] = r.line
        for col in ("source_system", "target_system"):
            if not _URI.match(r[col]):
                problems.append(
                    f"{r.where(col)}: {r[col]!r} is not an absolute URI "
                    "(http(s)://... or urn:oid:...)"
                )
        if not info.title_zh:
            problems.append(f"{r.where('title_zh')}: empty title")
        out.append(info)
    if problems:
        raise ConfigError(f"{path}: {len(problems)} problem(s)", problems=problems)
    return out


def load_site(site_dir: str | Path, site: str | None = None) -> SiteMaps:
    """Read ``<site_dir>/codes/maps.csv`` and every map it lists; build and validate ConceptMaps.

    ``site`` defaults to the folder's name (``mappings/fuxing`` -> ``fuxing``). Raises
    ConfigError naming file, line and column for every bad row (all files are read, all
    problems reported at once), InvalidResource if a built ConceptMap is not valid FHIR R4.
    """
    root = Path(site_dir)
    out = SiteMaps(site=site or root.resolve().name, folder=root)
    problems: list[str] = []
    for info in read_index(root):
        try:
            rows = read_map_rows(root / CODES_DIR / f"{info.map_id}.csv", info)
        except ConfigError as e:
            problems.extend(e.problems)
            continue
        out.info[info.map_id] = info
        out.rows[info.map_id] = rows
        out.conceptmaps[info.map_id] = build_conceptmap(out.site, info, rows)
    if problems:
        raise ConfigError(f"{root}: {len(problems)} mapping problem(s)", problems=problems)
    return out


def is_site_folder(folder: str | Path) -> bool:
    return (Path(folder) / CODES_DIR / INDEX_FILE).is_file()


def build_conceptmap(site: str, info: MapInfo, rows: Iterable[MapRow]) -> dict[str, Any]:
    """One R4 ConceptMap (dict) for one map; validated before it is returned."""
    elements: list[dict[str, Any]] = []
    for row in rows:
        element: dict[str, Any] = {"code": row.source_code}
        if row.source_display:
            element["display"] = row.source_display
        target: dict[str, Any] = {}
        if row.target_code:
            target["code"] = row.target_code
            if row.target_display:
                target["display"] = row.target_display
        target["equivalence"] = row.equivalence
        if row.comment:
            target["comment"] = row.comment
        element["target"] = [target]
        elements.append(element)
    cm_id = f"{site}-{info.map_id}"
    cm: dict[str, Any] = {
        "resourceType": "ConceptMap",
        "id": cm_id,
        "url": f"{CANONICAL_BASE}/{cm_id}",
        "name": "".join(p.capitalize() for p in re.split(r"[-_]", cm_id) if p),
        "title": f"{info.title_zh} / {info.title_en}" if info.title_en else info.title_zh,
        "status": "active",
        "publisher": site,
        "sourceUri": info.source_system,
        "targetUri": info.target_system,
        "group": [
            {"source": info.source_system, "target": info.target_system, "element": elements}
        ],
    }
    if info.version:
        cm["version"] = info.version
    if info.description:
        cm["description"] = info.description
    if not elements:
        del cm["group"]  # R4: group.element is 1..*
    try:
        validate_resource(cm)
    except InvalidFhir as e:
        raise InvalidResource(f"ConceptMap {cm_id} is not valid FHIR R4", detail=e.detail) from e
    return cm


# -- $translate ------------------------------------------------------------------------------


def _match(
    equivalence: str, concept: Mapping[str, Any] | None, source: str | None
) -> dict[str, Any]:
    part: list[dict[str, Any]] = [{"name": "equivalence", "valueCode": equivalence}]
    if concept is not None:
        part.append({"name": "concept", "valueCoding": dict(concept)})
    if source:
        part.append({"name": "source", "valueUri": source})
    return {"name": "match", "part": part}


def translate_matches(
    conceptmap: Mapping[str, Any],
    system: str,
    code: str,
    *,
    reverse: bool = False,
    target_system: str | None = None,
) -> list[tuple[str, dict[str, Any] | None]]:
    """(equivalence, concept) pairs for one code in one ConceptMap.

    Forward: ``code`` of ``system`` is a source code, concepts are targets. Reverse: ``code`` of
    ``system`` is a target code, concepts are the source codes mapped to it, best first, with
    the equivalence read the other way (a local code the shared code is ``wider`` than comes
    back ``narrower``).
    """
    found: list[tuple[str, dict[str, Any] | None]] = []
    ranked: list[tuple[int, str, dict[str, Any]]] = []
    for group in conceptmap.get("group", []):
        src, tgt = group.get("source"), group.get("target")
        if reverse:
            if tgt != system or (target_system and src != target_system):
                continue
            for element in group.get("element", []):
                for target in element.get("target", []):
                    if target.get("code") == code and target["equivalence"] not in NO_MATCH:
                        concept = {"system": src, "code": element["code"]}
                        if "display" in element:
                            concept["display"] = element["display"]
                        eq = target["equivalence"]
                        ranked.append((REVERSE_RANK.get(eq, 9), INVERSE.get(eq, eq), concept))
            continue
        if src != system or (target_system and tgt != target_system):
            continue
        for element in group.get("element", []):
            if element.get("code") != code:
                continue
            for target in element.get("target", []):
                mapped: dict[str, Any] | None = None
                if "code" in target:
                    mapped = {"system": tgt, "code": target["code"]}
                    if "display" in target:
                        mapped["display"] = target["display"]
                found.append((target["equivalence"], mapped))
    if reverse:
        ranked.sort(key=lambda m: m[0])  # stable: file order within a rank
        found = [(eq, concept) for _, eq, concept in ranked]
    return found


def translate_many(
    conceptmaps: Iterable[Mapping[str, Any]],
    system: str,
    code: str,
    *,
    reverse: bool = False,
    target_system: str | None = None,
) -> dict[str, Any]:
    """``$translate`` over several ConceptMaps: an R4 ``Parameters`` resource.

    ``result`` is true when at least one match has an equivalence other than unmatched/disjoint;
    every target found (including ``unmatched`` ones) is a ``match`` with ``equivalence``,
    ``concept`` (when there is a code) and ``source`` (the map's url).
    """
    maps = list(conceptmaps)
    params: list[dict[str, Any]] = []
    ok = False
    for cm in maps:
        for eq, concept in translate_matches(
            cm, system, code, reverse=reverse, target_system=target_system
        ):
            ok = ok or eq not in NO_MATCH
            params.append(_match(eq, concept, cm.get("url")))
    head: list[dict[str, Any]] = [{"name": "result", "valueBoolean": ok}]
    if not ok:
        what = "is not mapped" if params else "is in no map"
        where = ", ".join(str(cm.get("url", cm.get("id", "?"))) for cm in maps) or "no maps"
        head.append(
            {"name": "message", "valueString": f"code {code!r} of system {system} {what} ({where})"}
        )
    out = {"resourceType": "Parameters", "parameter": head + params}
    validate_resource(out)
    return out


def translate(
    conceptmap: Mapping[str, Any],
    system: str,
    code: str,
    *,
    reverse: bool = False,
    target_system: str | None = None,
) -> dict[str, Any]:
    """The ``$translate`` operation on one ConceptMap (see :func:`translate_many`)."""
    return translate_many([conceptmap], system, code, reverse=reverse, target_system=target_system)


# -- the hot-path index ----------------------------------------------------------------------


class Translator:
    """In-memory index over ConceptMaps for hot paths: one dict lookup per code.

    Maps are keyed by the id given (a site's map names: ``drug``, ``lab`` ...). Only the first
    usable target of an element counts; ``unmatched``/``disjoint`` targets are not matches.
    Reverse lookups (standard code -> local code) prefer ``equal``/``equivalent`` rows, then
    ``wider``, then the rest, then the first row in the file.
    """

    def __init__(self, conceptmaps: Mapping[str, Mapping[str, Any]]) -> None:
        self._source: dict[str, str] = {}
        self._target: dict[str, str] = {}
        self._index: dict[str, dict[str, tuple[Coding, str]]] = {}
        self._reverse: dict[str, dict[str, tuple[Coding, str]]] = {}
        for map_id, cm in conceptmaps.items():
            idx: dict[str, tuple[Coding, str]] = {}
            rev: dict[str, tuple[Coding, str]] = {}
            for group in cm.get("group", []):
                self._source.setdefault(map_id, group["source"])
                self._target.setdefault(map_id, group["target"])
                for element in group.get("element", []):
                    for target in element.get("target", []):
                        eq = target["equivalence"]
                        if eq in NO_MATCH or "code" not in target:
                            continue
                        coding: Coding = {"system": group["target"], "code": target["code"]}
                        if "display" in target:
                            coding["display"] = target["display"]
                        idx.setdefault(element["code"], (coding, eq))
                        local: Coding = {"system": group["source"], "code": element["code"]}
                        if "display" in element:
                            local["display"] = element["display"]
                        held = rev.get(target["code"])
                        if held is None or REVERSE_RANK.get(eq, 9) < REVERSE_RANK.get(held[1], 9):
                            rev[target["code"]] = (local, eq)
                        break
            self._index[map_id] = idx
            self._reverse[map_id] = rev

    @property
    def map_ids(self) -> list[str]:
        return list(self._index)

    def source_system(self, map_id: str) -> str | None:
        """The local code system a map translates from."""
        return self._source.get(map_id)

    def target_system(self, map_id: str) -> str | None:
        """The shared code system a map translates to."""
        return self._target.get(map_id)

    def lookup(self, map_id: str, code: str) -> Coding | None:
        """The target Coding for a local code (a fresh copy), or None when not mapped."""
        hit = self._index.get(map_id, {}).get(code)
        return Coding(**hit[0]) if hit else None

    def lookup_match(self, map_id: str, code: str) -> tuple[Coding, str] | None:
        """Like :meth:`lookup`, with the equivalence (``equivalent``, ``wider`` ...)."""
        hit = self._index.get(map_id, {}).get(code)
        return (Coding(**hit[0]), hit[1]) if hit else None

    def reverse(self, map_id: str, code: str) -> Coding | None:
        """This site's local Coding for a shared (target) code, or None when it has none."""
        hit = self._reverse.get(map_id, {}).get(code)
        return Coding(**hit[0]) if hit else None


def _translator(maps: SiteMaps | Translator) -> Translator:
    return maps.translator() if isinstance(maps, SiteMaps) else maps


def map_coding(
    maps: SiteMaps | Translator, map_id: str, coding: Mapping[str, Any]
) -> tuple[list[dict[str, Any]], bool]:
    """``(codings, unmapped)`` for one local Coding going out; the local coding is never dropped.

    Mapped: ``[standard coding, local coding]`` and ``unmapped=False``. Not mapped (unknown code,
    a row with an empty target, or a coding from another system than the map's source):
    ``[local coding]`` and ``unmapped=True`` - then record the gap
    (:func:`bridge.mapping.gaps.record_gap`) and mark the resource
    (:func:`bridge.mapping.marker.mark_unmapped`). A coding without a system
    (``{"code": "FX-0101"}``) gets the map's source system, so it stays meaningful on the wire.
    A coding already in the map's shared (target) system passes through as mapped.
    """
    t = _translator(maps)
    local = copy.deepcopy(dict(coding))
    source = t.source_system(map_id)
    if "system" not in local and source:
        local = {"system": source, **local}
    code = local.get("code")
    if isinstance(code, str) and local.get("system") == t.target_system(map_id):
        return [local], False  # already the shared code: nothing to map
    if not isinstance(code, str) or local.get("system") != source:
        return [local], True
    target = t.lookup(map_id, code)
    if target is None:
        return [local], True
    return [dict(target), local], False


def map_concept(
    maps: SiteMaps | Translator, map_id: str, concept: Mapping[str, Any]
) -> tuple[dict[str, Any], bool]:
    """``(CodeableConcept, unmapped)``: :func:`map_coding` over each coding of a concept.

    The concept's ``text`` is kept; codings of other systems pass through unchanged;
    ``unmapped`` is True when no coding of the map's source system could be mapped.
    """
    t = _translator(maps)
    source = t.source_system(map_id)
    out: list[dict[str, Any]] = []
    local_seen = mapped = False
    for coding in concept.get("coding", []):
        if coding.get("system", source) != source:
            if not any(c == coding for c in out):
                out.append(copy.deepcopy(dict(coding)))
            continue
        local_seen = True
        codings, unmapped = map_coding(t, map_id, coding)
        mapped = mapped or not unmapped
        for c in codings:
            if not any(
                o.get("system") == c.get("system") and o.get("code") == c.get("code") for o in out
            ):
                out.append(c)
    result: dict[str, Any] = {k: copy.deepcopy(v) for k, v in concept.items() if k != "coding"}
    if out:
        result["coding"] = out
    return result, (not mapped) if local_seen else True


def to_local(
    maps: SiteMaps | Translator, map_id: str, codings: Sequence[Mapping[str, Any]]
) -> tuple[Coding | None, bool]:
    """``(local coding, unmapped)`` for codings that arrived, for writing into this site's HIS.

    A coding already in this site's own system wins; otherwise the first coding of the map's
    shared (target) system that this site has a local code for. ``(None, True)`` when none can
    be mapped: record the gap with the shared coding (the HIS then gets the text only).
    """
    t = _translator(maps)
    source, target = t.source_system(map_id), t.target_system(map_id)
    for c in codings:
        if c.get("system") == source and isinstance(c.get("code"), str):
            return cast(Coding, {k: c[k] for k in ("system", "code", "display") if k in c}), False
    for c in codings:
        if c.get("system") == target and isinstance(c.get("code"), str):
            local = t.reverse(map_id, c["code"])
            if local is not None:
                return local, False
    return None, True
