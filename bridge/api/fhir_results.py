"""What a search page returns besides its matches: the order (``_sort``), the resources that
``_include`` and ``_revinclude`` add, and the subset of each match (``_summary``, ``_elements``).

Includes are primary-key reads of the references on the page; revincludes are index lookups
(``fhir_token`` for references kept as tokens, ``ix_fhir_type_patient_newest`` for a patient;
``revinclude_query``),
each bounded by ``MAX_INCLUDED`` (past it the Bundle carries a warning). Subsets follow R4:
``_summary=true`` keeps the elements the R4 definitions mark as summary (read from the
``fhir.resources`` R4B models, whose flags are R4's for the types served here), ``text`` keeps
the narrative and the required elements (min 1, from the same models), ``data`` drops the
narrative, ``_elements`` keeps the listed elements and the required ones; each subset is
tagged ``SUBSETTED``.
"""

from __future__ import annotations

import importlib
from functools import cache
from typing import Any

import orjson
from sqlalchemy import Connection, select, tuple_

from bridge.api.fhir_search import MAX_INCLUDED, SEARCH_PARAMS, Param, Query
from bridge.fhirstore import store
from bridge.fhirstore.tables import FHIR_RESOURCE as T
from bridge.fhirstore.tables import FHIR_TOKEN as TOK

SUBSETTED = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "SUBSETTED",
}
_ALWAYS = ("resourceType", "id", "meta")


def _param(rtype: str, name: str) -> Param:
    return next(p for p in SEARCH_PARAMS[rtype] if p.name == name)


def sort_order(q: Query) -> list[Any]:
    """ORDER BY of a ``_sort`` (empty for the default newest-first order). Keys that may be
    absent sort last in both directions; ``id`` breaks ties (descending after an ascending
    ``_lastUpdated`` alone: the page-order index read backwards)."""
    if q.default_order:
        return []
    out: list[Any] = []
    for key, desc in q.sort:
        if key == "_lastUpdated":
            expr = T.c.last_updated
        elif key == "_id":
            expr = T.c.id
        else:
            p = _param(q.rtype, key)
            expr = (
                T.c.status
                if p.column == "status"
                else store.date_key(q.rtype, key)
                if p.column == "@period"
                else store.string_key(q.rtype, key)
            )
            out.append(expr.is_(None))
        out.append(expr.desc() if desc else expr.asc())
    if not any(k == "_id" for k, _ in q.sort):
        out.append(T.c.id.desc() if q.sort == [("_lastUpdated", False)] else T.c.id.asc())
    return out


def _references(row: Any, p: Param) -> list[str]:
    """The references a page row holds for reference parameter ``p``."""
    if p.column != "@ref":
        value = getattr(row, p.column)
        return [value] if value else []
    kind, path = store.CODED[row.rtype][p.name]
    body = orjson.loads(row.body)
    return [code for _, code in store._coded_values(row.rtype, p.name, kind, body.get(path))]


def included(conn: Connection, q: Query, rows: list[Any]) -> tuple[list[Any], list[str]]:
    """Rows ``_include`` adds (each once, not already on the page) and warnings."""
    seen = {(r.rtype, r.id) for r in rows}
    wanted: dict[str, list[str]] = {}
    for spec in q.include:
        src, _, name = spec.partition(":")
        p = _param(src, name)
        for r in rows:
            for ref in _references(r, p):
                rtype, _, rid = ref.partition("/")
                if rtype in SEARCH_PARAMS and rid and "/" not in rid and (rtype, rid) not in seen:
                    seen.add((rtype, rid))
                    wanted.setdefault(rtype, []).append(rid)
    out: list[Any] = []
    for rtype, ids in wanted.items():
        found = {
            r.id: r for r in conn.execute(select(T).where(T.c.rtype == rtype, T.c.id.in_(ids)))
        }
        out += [found[i] for i in ids if i in found]
    warnings = (
        [f"_include added the first {MAX_INCLUDED} resources only"]
        if len(out) > MAX_INCLUDED
        else []
    )
    return out[:MAX_INCLUDED], warnings


def revinclude_query(spec: str, targets: list[str]) -> Any:
    """The rows of ``_revinclude=spec`` pointing at ``targets`` (``Type/id``), newest first,
    one more than MAX_INCLUDED: an index lookup of their ids, then the primary key."""
    src, _, name = spec.partition(":")
    p = _param(src, name)
    if p.column == "@ref":
        ids = select(TOK.c.rtype, TOK.c.id).where(
            TOK.c.rtype == src, TOK.c.param == name, TOK.c.value.in_(targets)
        )
    else:
        # through the patient index: with the page order asked of the same table, SQLite
        # would walk every row of the type in that order instead
        by_ref = T.alias("by_ref")
        ids = select(by_ref.c.rtype, by_ref.c.id).where(
            by_ref.c.rtype == src, by_ref.c[p.column].in_(targets)
        )
    return (
        select(T)
        .where(tuple_(T.c.rtype, T.c.id).in_(ids))
        .order_by(T.c.last_updated.desc(), T.c.id)
        .limit(MAX_INCLUDED + 1)
    )


def revincluded(conn: Connection, q: Query, rows: list[Any]) -> tuple[list[Any], list[str]]:
    """Rows ``_revinclude`` adds: resources whose reference points at a page row."""
    seen = {(r.rtype, r.id) for r in rows}
    targets = [f"{r.rtype}/{r.id}" for r in rows]
    out: list[Any] = []
    warnings: list[str] = []
    if not targets:
        return out, warnings
    for spec in q.revinclude:
        stmt = revinclude_query(spec, targets)
        found = conn.execute(stmt).all()
        if len(found) > MAX_INCLUDED:
            warnings.append(f"_revinclude={spec} added the newest {MAX_INCLUDED} only")
        for r in found[:MAX_INCLUDED]:
            if (r.rtype, r.id) not in seen:
                seen.add((r.rtype, r.id))
                out.append(r)
    return out, warnings


@cache
def _model_fields(rtype: str) -> dict[str, dict[str, Any]]:
    """The R4B model's elements of a type: JSON name -> its R4 flags."""
    module = importlib.import_module(f"fhir.resources.R4B.{rtype.lower()}")
    model = getattr(module, rtype)
    return {
        (f.alias or name): {**f.json_schema_extra, "_required": f.is_required()}
        for name, f in model.model_fields.items()
        if isinstance(f.json_schema_extra, dict)
    }


@cache
def summary_elements(rtype: str) -> frozenset[str]:
    """The elements R4 marks as summary (``isSummary``) for a type."""
    return frozenset(
        n for n, f in _model_fields(rtype).items() if f.get("summary_element_property")
    )


@cache
def required_elements(rtype: str) -> frozenset[str]:
    """The elements R4 requires of a type (min 1, a required choice's every form)."""
    return frozenset(
        n
        for n, f in _model_fields(rtype).items()
        if f["_required"] or f.get("element_required") or f.get("one_of_many_required")
    )


def subset(resource: dict[str, Any], q: Query) -> dict[str, Any]:
    """A match as ``_summary`` / ``_elements`` ask (the resource itself if neither does)."""
    rtype = resource["resourceType"]
    if q.elements:
        keep = {*_ALWAYS, *required_elements(rtype), *q.elements}
    elif q.summary == "true":
        keep = {*_ALWAYS, *summary_elements(rtype)}
    elif q.summary == "text":
        keep = {*_ALWAYS, "text", *required_elements(rtype)}
    elif q.summary == "data":
        keep = set(resource) - {"text"}
    else:
        return resource
    out = {k: v for k, v in resource.items() if k in keep}
    meta = dict(out.get("meta") or {})
    meta["tag"] = [*meta.get("tag", []), SUBSETTED]
    out["meta"] = meta
    return out
