"""FHIR search parameters of the /fhir API: what each type supports, parsed into SQL conditions.

``SEARCH_PARAMS`` is the single source of truth: the query parser accepts exactly these (plus
the result parameters in ``RESULT_PARAMS``, the modifiers of ``MODIFIERS``, the chains of
``chain_targets`` and the ``INCLUDES`` / ``REVINCLUDES``) and the CapabilityStatement lists
exactly these. Handling is strict by default: an unknown parameter or modifier is a 400 listing
every such name; with ``Prefer: handling=lenient`` they are ignored (and left out of the
``self`` link). Refusals name the parameter and the rule, never the value.

Value syntax (FHIR R4 search):
  token      ``code``, ``system|code``, ``|code`` (no system), ``system|`` (any code); comma = OR;
             ``status`` codes have their R4 code system (``STATUS_SYSTEMS``)
  reference  ``Type/id``, a bare ``id``, or this server's own absolute URL of one; comma = OR
  string     starts with, case and accents ignored; ``:exact`` equal as written; ``:contains``
  date       prefix ``eq ne gt ge lt le sa eb`` + ``YYYY[-MM[-DD[Thh:mm[:ss[.f+]]]]]`` with ``Z``
             or ``±hh:mm`` when a time is given (dates without a time are UTC days); the value's
             precision makes a range (``eq2026-11`` is all of November). Repeat to AND.
Modifiers: ``:missing=true|false`` (all), ``:not`` (token), ``:exact`` / ``:contains`` (string),
``:identifier`` and ``:Type`` (reference). Chains one level deep on a reference:
``patient.identifier=...``, ``focus:ServiceRequest.status=active``.
A parameter given twice is ANDed. Results are newest first (``_lastUpdated`` descending, then
id) unless ``_sort`` says otherwise; that order pages by keyset (``_cursor``), so no result is
skipped or repeated while paging; other orders page by position.
``Bundle.total`` is exact when the first page holds every match or up to 1,000 matches; above
that (``_total=estimate``, the default) it may be a count up to 60 s old (``_total=accurate``
counts every time: 0.4-0.7 s for all Observations of a 1 M-resource store).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import ColumnElement, Table, and_, literal, not_, or_, select, tuple_

from bridge.api.outcome import BadRequest
from bridge.fhirstore import store
from bridge.fhirstore.store import identifier_match, period_match, token_match
from bridge.fhirstore.tables import FHIR_RESOURCE


@dataclass(frozen=True)
class Param:
    name: str
    type: str  # token | reference | date | string
    column: str  # a fhir_resource column, or @token @period @ref @string (the index tables)
    doc: str
    target: str | None = None  # reference: the type a bare id names
    chain: str | None = None  # reference: the type a chain (``name.param``) searches


_ID = Param("_id", "token", "id", "Logical id; comma-separated ids = OR")
_UPDATED = Param(
    "_lastUpdated",
    "date",
    "last_updated",
    "meta.lastUpdated, with prefixes eq ne gt ge lt le sa eb; repeat for a range",
)
_IDENT = Param("identifier", "token", "identifiers", "Business identifier: system|value or value")
_STATUS = Param("status", "token", "status", "Status code; comma-separated codes = OR")
_PATIENT = Param(
    "patient", "reference", "patient", "The patient: Patient/id or id", "Patient", "Patient"
)
_SUBJECT = Param(
    "subject",
    "reference",
    "patient",
    "The subject (Task: for): Type/id or id; chains search the Patient",
    chain="Patient",
)
_REQUESTER = Param("requester", "reference", "requester", "Who asked: Type/id or id")
_AUTHOR = Param("author", "reference", "requester", "Who wrote it: Type/id or id")
_PERFORMER = Param("performer", "reference", "performer", "Who performs: Type/id or id")


_ENCOUNTER = Param(
    "encounter", "reference", "@ref", "The encounter: Encounter/id or id", "Encounter", "Encounter"
)
_BASED_ON = Param(
    "based-on",
    "reference",
    "@ref",
    "The order it fulfils: ServiceRequest/id or id",
    "ServiceRequest",
    "ServiceRequest",
)
_CODE = Param("code", "token", "@token", "The code (any coding): system|code or code")
_CATEGORY = Param("category", "token", "@token", "The category (any coding): system|code or code")
_EFFECTIVE = Param(
    "date",
    "date",
    "@period",
    "The effective time (dateTime or Period) against the value, with prefixes; repeat for a range",
)


def _types(*params: Param) -> tuple[Param, ...]:
    return (_ID, _UPDATED, *params)


_CLINICAL = (
    _PATIENT,
    _SUBJECT,
    _STATUS,
    _PERFORMER,
    _IDENT,
    _CODE,
    _CATEGORY,
    _EFFECTIVE,
    _ENCOUNTER,
    _BASED_ON,
)


#: search parameters per resource type (AuditEvent: see AUDIT_PARAMS)
SEARCH_PARAMS: dict[str, tuple[Param, ...]] = {
    "ServiceRequest": _types(
        _PATIENT,
        _SUBJECT,
        _STATUS,
        _REQUESTER,
        _PERFORMER,
        _IDENT,
        _ENCOUNTER,
        _CODE,
        _CATEGORY,
        Param(
            "authored",
            "date",
            "@period",
            "When it was asked (authoredOn), with prefixes; repeat for a range",
        ),
        Param(
            "expert",
            "reference",
            "@ref",
            "Any performer, e.g. a consultation's expert: PractitionerRole/id",
            "PractitionerRole",
        ),
    ),
    "Task": _types(
        _PATIENT,
        _SUBJECT,
        _STATUS,
        _REQUESTER,
        _IDENT,
        Param(
            "business-status",
            "token",
            "@token",
            "The alliance's step (businessStatus): system|code or code",
        ),
        Param("owner", "reference", "owner", "Receiving member: Type/id or id"),
        Param(
            "focus",
            "reference",
            "@ref",
            "What the task is about (the referral): ServiceRequest/id or id",
            "ServiceRequest",
            "ServiceRequest",
        ),
    ),
    "Encounter": _types(
        _PATIENT,
        _SUBJECT,
        _STATUS,
        _IDENT,
        Param(
            "service-provider",
            "reference",
            "performer",
            "Organization providing the encounter",
            "Organization",
        ),
        Param(
            "date",
            "date",
            "@period",
            "The period overlaps (ge gt le lt), "
            "lies within (eq) or lies after/before (sa/eb) the value",
        ),
        Param(
            "class",
            "token",
            "@token",
            "Encounter.class code (v3 ActCode: IMP AMB EMER ...), system|code or code",
        ),
    ),
    "DiagnosticReport": _types(
        *_CLINICAL,
        Param(
            "result",
            "reference",
            "@ref",
            "A result it reports: Observation/id or id",
            "Observation",
            "Observation",
        ),
    ),
    "Observation": _types(*_CLINICAL),
    "ImagingStudy": _types(
        _PATIENT,
        _SUBJECT,
        _STATUS,
        _IDENT,
        _ENCOUNTER,
        Param(
            "basedon",
            "reference",
            "@ref",
            "The order it fulfils: ServiceRequest/id or id",
            "ServiceRequest",
            "ServiceRequest",
        ),
    ),
    "Patient": _types(
        _IDENT,
        Param(
            "name",
            "string",
            "@string",
            "Any part of a name (text, family, given, prefix, suffix) starts with the value",
        ),
        Param("family", "string", "@string", "The family name starts with"),
        Param("given", "string", "@string", "A given name starts with"),
        Param("birthdate", "date", "@period", "The date of birth, with prefixes"),
        Param("gender", "token", "@token", "male | female | other | unknown"),
    ),
    "Consent": _types(_PATIENT, _STATUS, _IDENT),
    "Composition": _types(_PATIENT, _SUBJECT, _STATUS, _AUTHOR, _IDENT),
    "DocumentReference": _types(_PATIENT, _SUBJECT, _STATUS, _AUTHOR, _IDENT),
    "MedicationRequest": _types(_PATIENT, _SUBJECT, _STATUS, _REQUESTER, _IDENT),
    "Coverage": _types(
        _PATIENT,
        _STATUS,
        _IDENT,
        Param("beneficiary", "reference", "patient", "Covered party", "Patient"),
    ),
    "Appointment": _types(
        _STATUS,
        _IDENT,
        Param("date", "date", "@period", "The start, with prefixes"),
        Param(
            "based-on",
            "reference",
            "@ref",
            "The order it serves: ServiceRequest/id or id",
            "ServiceRequest",
            "ServiceRequest",
        ),
    ),
    "CarePlan": _types(_PATIENT, _SUBJECT, _STATUS, _IDENT),
    "Condition": _types(_PATIENT, _SUBJECT, _IDENT, _CODE),
    "PractitionerRole": _types(_IDENT),
    "Organization": _types(_IDENT),
    "Practitioner": _types(_IDENT),
}

#: AuditEvent is served from the audit chain (columns of bridge.audit.tables.AuditRecord)
AUDIT_PARAMS: tuple[Param, ...] = (
    Param("_id", "token", "seq", "The audit record's sequence number in this node's chain"),
    Param("date", "date", "at", "When recorded, with prefixes; repeat for a range"),
    Param(
        "subtype",
        "token",
        "action",
        "Hutong action (http://hutong.dev/CodeSystem/"
        "audit-action): queued, sent, received, read, ...",
    ),
    Param("action", "token", "action", "FHIR action code C, R, U, D or E"),
    Param("outcome", "token", "outcome", "0 success, 4 minor, 8 serious, 12 major failure"),
    Param(
        "entity-identifier",
        "token",
        "patient_hash",
        "urn:hutong:patient-hash|<hash>, urn:hutong:packet|<packet id>, or a bare patient hash",
    ),
    Param("patient-hash", "token", "patient_hash", "The keyed patient hash (Hutong extension)"),
)

#: result parameters: name -> documentation (also listed in the CapabilityStatement)
RESULT_PARAMS = {
    "_count": "Page size, default 20, at most 200 (0 = total only)",
    "_cursor": "Opaque page position; use the Bundle's next link",
    "_total": "none | estimate (default: exact up to 1,000 matches, above that a count at "
    "most 60 s old) | accurate (counted at each request)",
    "_totalMethod": "count | estimate | none: the same as _total accurate | estimate | none "
    "(what fhirpy's count() sends)",
    "_sort": "Comma-separated keys, - for descending: _lastUpdated, _id, and the type's status, "
    "date and string parameters (default -_lastUpdated)",
    "_summary": "true (summary elements) | text | data | count (total only) | false",
    "_elements": "Comma-separated top-level elements to return (id, meta and the required "
    "elements are kept)",
    "_pretty": "true: indented JSON",
    "_format": "json, application/json or application/fhir+json (JSON is the only format)",
}
#: the result parameters AuditEvent searches take (the chain has its own order and no subsets)
AUDIT_RESULT_PARAMS = ("_count", "_cursor", "_total", "_totalMethod", "_pretty", "_format")
#: ``_include`` values per searched type: the references whose targets join the page
INCLUDES: dict[str, tuple[str, ...]] = {
    "Task": ("Task:focus", "Task:patient"),
    "ServiceRequest": ("ServiceRequest:patient", "ServiceRequest:encounter"),
    "DiagnosticReport": (
        "DiagnosticReport:patient",
        "DiagnosticReport:encounter",
        "DiagnosticReport:based-on",
        "DiagnosticReport:result",
    ),
    "Observation": ("Observation:patient", "Observation:encounter", "Observation:based-on"),
    "Encounter": ("Encounter:patient",),
    "ImagingStudy": ("ImagingStudy:patient", "ImagingStudy:basedon", "ImagingStudy:encounter"),
}
#: ``_revinclude`` values per searched type: resources whose reference points at a match
REVINCLUDES: dict[str, tuple[str, ...]] = {
    "ServiceRequest": (
        "Task:focus",
        "DiagnosticReport:based-on",
        "Observation:based-on",
        "ImagingStudy:basedon",
    ),
    "Encounter": (
        "Observation:encounter",
        "DiagnosticReport:encounter",
        "ImagingStudy:encounter",
        "ServiceRequest:encounter",
    ),
    "Observation": ("DiagnosticReport:result",),
    "Patient": (
        "Encounter:patient",
        "Observation:patient",
        "DiagnosticReport:patient",
        "ServiceRequest:patient",
        "Task:patient",
        "ImagingStudy:patient",
    ),
}
#: modifiers per parameter type (``identifier`` and ``Type`` on references: see ``_chain``)
MODIFIERS = {
    "token": ("missing", "not"),
    "string": ("missing", "exact", "contains"),
    "date": ("missing",),
    "reference": ("missing", "identifier"),
}
#: the R4 code system of each type's ``status`` (``status=system|code``)
STATUS_SYSTEMS = {
    "ServiceRequest": "http://hl7.org/fhir/request-status",
    "Task": "http://hl7.org/fhir/task-status",
    "Encounter": "http://hl7.org/fhir/encounter-status",
    "DiagnosticReport": "http://hl7.org/fhir/diagnostic-report-status",
    "Observation": "http://hl7.org/fhir/observation-status",
    "ImagingStudy": "http://hl7.org/fhir/imagingstudy-status",
    "Consent": "http://hl7.org/fhir/consent-state-codes",
    "Composition": "http://hl7.org/fhir/composition-status",
    "DocumentReference": "http://hl7.org/fhir/document-reference-status",
    "MedicationRequest": "http://hl7.org/fhir/CodeSystem/medicationrequest-status",
    "Coverage": "http://hl7.org/fhir/fm-status",
}
SUMMARY_MODES = ("true", "false", "text", "data", "count")
_FORMATS = {"json", "application/json", "application/fhir+json"}

DEFAULT_COUNT = 20
MAX_COUNT = 200
#: most resources one ``_include`` or ``_revinclude`` adds to a page
MAX_INCLUDED = 500
_ID_RE = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_TYPE_RE = re.compile(r"[A-Z][A-Za-z]{1,63}")
_ELEMENT_RE = re.compile(r"[a-z][A-Za-z0-9]{0,63}")
_DATE_RE = re.compile(
    r"(?P<y>\d{4})(?:-(?P<m>\d{2})(?:-(?P<d>\d{2})(?:T(?P<H>\d{2}):(?P<M>\d{2})"
    r"(?::(?P<S>\d{2})(?:\.(?P<f>\d{1,6}))?)?(?P<tz>Z|[+-]\d{2}:\d{2}))?)?)?"
)
_PREFIXES = ("eq", "ne", "gt", "ge", "lt", "le", "sa", "eb")


#: a parameter name shown as written (in errors, audit, the lenient warning); anything else
#: (a value pasted as a name) is not. A chain: ``name[:Type].name[:modifier]``.
_PART = r"[A-Za-z_][A-Za-z0-9_\-]{0,40}(:[A-Za-z][A-Za-z0-9_\-]{0,40})?"
_NAME_RE = re.compile(rf"{_PART}(\.{_PART})?")


def safe_name(name: str) -> str:
    """A query parameter's name as errors and the audit may show it."""
    return name if _NAME_RE.fullmatch(name) else "(unreadable name)"


@dataclass
class Query:
    rtype: str
    where: list[Any] = field(default_factory=list)
    count: int = DEFAULT_COUNT
    cursor: Any = None
    total: bool = True
    accurate: bool = False  # _total=accurate: count at every request, never from the estimate
    by_token: bool = False  # a condition that implies the type (store.page_query typed=False)
    include_focus: bool = False  # kept for callers of the earlier API: "Task:focus" in include
    include: list[str] = field(default_factory=list)  # _include values, as INCLUDES spells them
    revinclude: list[str] = field(default_factory=list)
    sort: list[tuple[str, bool]] = field(default_factory=list)  # (key, descending)
    summary: str = "false"
    elements: list[str] = field(default_factory=list)
    pretty: bool = False
    used: list[tuple[str, str]] = field(default_factory=list)  # (name, value) for links
    ignored: list[str] = field(default_factory=list)

    @property
    def default_order(self) -> bool:
        """Newest first (the page-order indexes; keyset paging)."""
        return self.sort in ([], [("_lastUpdated", True)], [("_lastUpdated", True), ("_id", False)])


def params_for(rtype: str) -> tuple[Param, ...]:
    return AUDIT_PARAMS if rtype == "AuditEvent" else SEARCH_PARAMS[rtype]


def sort_keys(rtype: str) -> tuple[str, ...]:
    """What ``_sort`` accepts for a type: _lastUpdated, _id and its status/date/string params."""
    return (
        "_lastUpdated",
        "_id",
        *(
            p.name
            for p in SEARCH_PARAMS.get(rtype, ())
            if p.column in ("status", "@period", "@string")
        ),
    )


class _Unknown(Exception):
    """A parameter name (or modifier, or chain) this API does not serve."""


#: how a lookup's matches are bounded, best first: ids, then an identifier or a reference
#: (a handful), a patient's resources (the patient index), a name, a day; NEVER: a code or an
#: open date range, which most rows of a type may meet (tested row by row as the page walks)
RANK_ID, RANK_TOKEN, RANK_PATIENT, RANK_STRING, RANK_DAY, NEVER = 0, 1, 2, 3, 4, 9


@dataclass
class Cond:
    """One search condition in the two forms of ``bridge.fhirstore.store``: ``probe`` tests a
    row (a column, or a correlated EXISTS on an index table's key), ``lookup`` finds the
    matches first (``(rtype, id) IN (index range)``, None if it has none); ``rank``: how few
    matches the lookup (or the patient index, for ``patient``) is expected to give."""

    probe: ColumnElement[bool]
    lookup: ColumnElement[bool] | None = None
    rank: int = NEVER


def combine(conds: list[Cond]) -> tuple[list[Any], bool]:
    """The WHERE of a search and whether it implies the type: the best-ranked condition drives
    (its lookup, or a typed walk of the patient / page-order index), the others are probes."""
    best = min(conds, key=lambda c: c.rank, default=None)
    if best is None or best.rank >= NEVER or best.lookup is None:
        return [c.probe for c in conds], False
    return [best.lookup, *(c.probe for c in conds if c is not best)], True


def parse_query(
    rtype: str,
    items: list[tuple[str, str]],
    table: Table,
    *,
    lenient: bool = False,
    base: str | None = None,
) -> Query:
    """Check every (name, value) of the query string; build SQL conditions on ``table``.
    ``base``: this server's /fhir URL (a reference may be given as an absolute URL under it)."""
    known = {p.name: p for p in params_for(rtype)}
    q = Query(rtype)
    unknown: list[str] = []
    conds: list[Cond] = []
    for name, value in items:
        base_name, _, modifier = name.partition(":")
        if name == "_format":
            if value.split(";")[0].strip() not in _FORMATS:
                raise BadRequest("_format: only JSON is supported", issue="not-supported")
        elif name in RESULT_PARAMS and (rtype != "AuditEvent" or name in AUDIT_RESULT_PARAMS):
            _result_param(q, name, value)
        elif name in ("_include", "_revinclude"):
            allowed = (INCLUDES if name == "_include" else REVINCLUDES).get(rtype, ())
            chosen = _include_value(value, allowed)
            if chosen is None:
                if lenient:
                    q.ignored.append(name)  # the name only: values never go to the audit
                    continue
                listed = ", ".join(allowed) if allowed else "none"
                raise BadRequest(
                    f"{name}: not one this server follows on {rtype} (supported: {listed})",
                    issue="not-supported",
                )
            (q.include if name == "_include" else q.revinclude).append(chosen)
            q.include_focus = q.include_focus or chosen == "Task:focus"
        elif rtype == "AuditEvent":
            if base_name in known and not modifier:
                if value != "":
                    q.where.append(condition(known[base_name], value, table, rtype))
            else:
                unknown.append(safe_name(name))
                continue
        else:
            try:
                cond = _search_param(rtype, name, value, table, base)
            except _Unknown:
                unknown.append(safe_name(name))
                continue
            if cond is not None:
                conds.append(cond)
        q.used.append((name, value))
    if conds:
        q.where, q.by_token = combine(conds)
    if unknown and not lenient:
        results = AUDIT_RESULT_PARAMS if rtype == "AuditEvent" else RESULT_PARAMS
        supported = ", ".join(
            sorted(known)
            + sorted(results)
            + (["_include"] if rtype in INCLUDES else [])
            + (["_revinclude"] if rtype in REVINCLUDES else [])
        )
        raise BadRequest(
            f"unknown search parameter(s) for {rtype}: {', '.join(unknown)} "
            f"(supported: {supported})",
            issue="not-supported",
        )
    q.ignored.extend(unknown)
    if q.summary == "count":
        q.count, q.total = 0, True
    return q


def _include_value(value: str, allowed: tuple[str, ...]) -> str | None:
    """``Type:param`` or ``Type:param:Target`` (the target the reference has here) as listed."""
    parts = value.split(":")
    if len(parts) == 3 and _TYPE_RE.fullmatch(parts[2]):
        p = _param_of(parts[0], parts[1])
        if p is None or (p.chain or p.target) != parts[2]:
            return None
        value = ":".join(parts[:2])
    return value if value in allowed else None


def _param_of(rtype: str, name: str) -> Param | None:
    return next((p for p in SEARCH_PARAMS.get(rtype, ()) if p.name == name), None)


def _search_param(rtype: str, name: str, value: str, table: Any, base: str | None) -> Cond | None:
    """The condition of one (name, value) on a clinical type (None: an empty value, which
    FHIR ignores); raises _Unknown for names it does not serve."""
    head, dot, tail = name.partition(".")
    base_name, _, modifier = head.partition(":")
    p = _param_of(rtype, base_name)
    if p is None:
        raise _Unknown
    if dot:
        return _chain(rtype, p, modifier, tail, value, table, base)
    if modifier and p.type == "reference" and modifier == "identifier":
        return _chain(rtype, p, "", "identifier", value, table, base)
    if modifier and p.type == "reference" and _TYPE_RE.fullmatch(modifier):
        if modifier not in SEARCH_PARAMS or (p.target and modifier != p.target):
            raise _Unknown
        p = Param(p.name, p.type, p.column, p.doc, modifier, modifier)
        modifier = ""
    if modifier and (
        modifier not in MODIFIERS.get(p.type, ()) or p.name in ("_id", "_lastUpdated")
    ):
        raise _Unknown
    if value == "":
        return None  # FHIR: an empty parameter value is ignored
    if modifier == "missing":
        if value not in ("true", "false"):
            raise BadRequest(f"{safe_name(name)}: the value is true or false")
        present = _present(rtype, p, table)
        return Cond(~present if value == "true" else present)
    return conditions(p, value, table, rtype, modifier=modifier, base=base)


def _present(rtype: str, p: Param, table: Table) -> ColumnElement[bool]:
    """Condition: the resource has a value for ``p`` (``:missing=false``)."""
    if p.column in ("@token", "@ref"):
        return store.has_token(rtype, p.name, table)
    if p.column == "identifiers":
        return store.has_token(rtype, "identifier", table)
    if p.column == "@period":
        return store.has_date(rtype, p.name, table)
    if p.column == "@string":
        return store.has_string(rtype, p.name, table)
    return table.c[p.column].is_not(None)


def chain_target(p: Param, modifier: str) -> str | None:
    """The type a chain through reference ``p`` searches (``:Type`` chooses one)."""
    if modifier:
        if not _TYPE_RE.fullmatch(modifier) or modifier not in SEARCH_PARAMS:
            return None
        return modifier if p.chain in (None, modifier) else None
    return p.chain


def _chain(
    rtype: str, p: Param, modifier: str, inner_name: str, value: str, table: Any, base: str | None
) -> Cond | None:
    """``ref[:Type].param=value``: the reference is one of the ``Type`` resources the inner
    search finds (one level; the inner parameter may carry its own modifier)."""
    target = chain_target(p, modifier) if p.type == "reference" else None
    if target is None or "." in inner_name:
        raise _Unknown
    alias = FHIR_RESOURCE.alias("chained")
    inner = _search_param(target, inner_name, value, alias, base)
    if inner is None:
        return None
    where, typed = combine([inner])
    refs = select(literal(f"{target}/") + alias.c.id).where(
        *([] if typed else [alias.c.rtype == target]), *where
    )
    # a chain drives when its inner search is narrow (an identifier, a name, ids)
    rank = RANK_PATIENT if inner.rank < RANK_DAY else NEVER
    if p.column == "@ref":
        return Cond(
            store.ref_match(rtype, p.name, refs, table, lookup=False),
            store.ref_match(rtype, p.name, refs, table),
            rank,
        )
    probe = table.c[p.column].in_(refs)
    if p.column != "patient":
        return Cond(probe)
    # the lookup reads the patient index for the references found (a page walk in page
    # order would test every row of the type against them)
    by_patient = FHIR_RESOURCE.alias("by_patient")
    return Cond(
        probe,
        tuple_(table.c.rtype, table.c.id).in_(
            select(by_patient.c.rtype, by_patient.c.id).where(
                by_patient.c.rtype == rtype, by_patient.c.patient.in_(refs)
            )
        ),
        rank,
    )


def _result_param(q: Query, name: str, value: str) -> None:
    if name == "_count":
        # bounded before int(): Python refuses to convert more than 4,300 digits (a 500)
        if not (value.isascii() and value.isdigit()) or len(value) > 9:
            raise BadRequest(f"_count must be a whole number 0..{MAX_COUNT}")
        q.count = min(int(value), MAX_COUNT)
    elif name == "_cursor":
        q.cursor = decode_cursor(value)
    elif name == "_total":
        if value not in ("none", "estimate", "accurate"):
            raise BadRequest("_total must be none, estimate or accurate")
        q.total = value != "none"
        q.accurate = value == "accurate"
    elif name == "_totalMethod":
        if value not in ("none", "estimate", "count"):
            raise BadRequest("_totalMethod must be none, estimate or count")
        q.total = value != "none"
        q.accurate = value == "count"
    elif name == "_sort":
        allowed = sort_keys(q.rtype)
        keys = [k.strip() for k in value.split(",") if k.strip()]
        if q.rtype == "AuditEvent" or not keys or any(k.lstrip("-") not in allowed for k in keys):
            raise BadRequest(
                f"_sort: each key is one of {', '.join(allowed)}, - for descending",
                issue="not-supported",
            )
        q.sort = [(k.lstrip("-"), k.startswith("-")) for k in keys]
    elif name == "_summary":
        if value not in SUMMARY_MODES:
            raise BadRequest(f"_summary must be one of {', '.join(SUMMARY_MODES)}")
        q.summary = value
    elif name == "_elements":
        names = [n.strip() for n in value.split(",") if n.strip()]
        if not names or not all(_ELEMENT_RE.fullmatch(n) for n in names):
            raise BadRequest("_elements: comma-separated element names")
        q.elements = names
    elif name == "_pretty":
        if value not in ("true", "false"):
            raise BadRequest("_pretty must be true or false")
        q.pretty = value == "true"


def condition(
    p: Param, raw: str, table: Table, rtype: str, *, modifier: str = "", base: str | None = None
) -> ColumnElement[bool]:
    """One parameter's condition as a row test (AuditEvent; see ``conditions``)."""
    return conditions(p, raw, table, rtype, modifier=modifier, base=base).probe


def conditions(
    p: Param, raw: str, table: Table, rtype: str, *, modifier: str = "", base: str | None = None
) -> Cond:
    """One parameter's condition, as a probe and (for the index tables) a lookup."""
    values = [v.strip() for v in raw.split(",")] if p.type != "date" else [raw]
    if p.column == "@token":  # kept in fhir_token under the parameter's name
        return Cond(token_match(rtype, p.name, values, table, negate=modifier == "not"))
    if p.column == "@period":  # kept in fhir_date
        prefix, value = _date_prefix(raw, p.name)
        lo, hi = parse_date(value, p.name)
        # a day or less is a lookup worth making first; a month or a year (eq), or an open
        # range, may hold most of a type: tested row by row unless nothing else narrows
        day = hi - lo <= timedelta(days=1)
        return Cond(
            period_match(rtype, p.name, prefix, lo, hi, table),
            period_match(rtype, p.name, prefix, lo, hi, table, lookup=True)
            if prefix == "eq"
            else None,
            NEVER if prefix != "eq" else RANK_DAY if day else NEVER - 1,
        )
    if p.column == "@string":
        if any(v == "" for v in values):
            raise BadRequest(f"{p.name}: an empty alternative in the comma list")
        # one character (a Chinese family name: 王 is one person in fifteen) is broad
        short = any(len(store.fold(v)) < 2 for v in values)
        return Cond(
            store.string_match(rtype, p.name, values, modifier, table, lookup=False),
            store.string_match(rtype, p.name, values, modifier, table),
            NEVER - 1 if short else RANK_STRING if modifier != "contains" else RANK_DAY,
        )
    if p.column == "@ref":
        refs = [_reference_text(v, p, base) for v in values]
        return Cond(
            store.ref_match(rtype, p.name, refs, table, lookup=False),
            store.ref_match(rtype, p.name, refs, table),
            RANK_TOKEN,
        )
    col = table.c[p.column]
    if p.type == "date":
        return Cond(date_condition(col, raw, p.name))
    if p.type == "reference":
        probe = or_(*(_reference(col, v, p, base) for v in values))
        if p.column != "patient":
            return Cond(probe)
        if len(values) == 1:  # the patient index, already in page order
            return Cond(probe, rank=RANK_PATIENT)
        # several patients: their ids through the patient index, then sorted (asked in page
        # order of the same table, SQLite would walk every row of the type)
        by_patient = FHIR_RESOURCE.alias("by_patient")
        return Cond(
            probe,
            tuple_(table.c.rtype, table.c.id).in_(
                select(by_patient.c.rtype, by_patient.c.id).where(
                    by_patient.c.rtype == rtype,
                    or_(*(_reference(by_patient.c.patient, v, p, base) for v in values)),
                )
            ),
            RANK_PATIENT,
        )
    if p.name == "identifier":  # via the fhir_token index
        probe = identifier_match(rtype, values, table, lookup=False)
        if modifier == "not":
            return Cond(~probe)
        broad = all(v.endswith("|") for v in values)  # system| : every value of a system
        return Cond(
            probe, identifier_match(rtype, values, table), NEVER - 1 if broad else RANK_TOKEN
        )
    if rtype == "AuditEvent":
        return Cond(or_(*(_audit_token(table, p, v) for v in values)))
    if p.name == "_id":
        for v in values:
            _check_id(v, p.name)
        wanted = [v.rpartition("|")[2] for v in values]
        if len(wanted) == 1:
            return Cond(col == wanted[0], rank=RANK_ID)
        # several: primary-key lookups (typed, with the page order asked of the same table,
        # SQLite would walk every row of the type in that order)
        by_id = FHIR_RESOURCE.alias("by_id")
        return Cond(
            col.in_(wanted),
            tuple_(table.c.rtype, table.c.id).in_(
                select(by_id.c.rtype, by_id.c.id).where(
                    by_id.c.rtype == rtype, by_id.c.id.in_(wanted)
                )
            ),
            RANK_ID,
        )
    codes = _status_codes(rtype, p, values)
    if modifier == "not":
        return Cond(or_(col.is_(None), col.not_in(codes)))
    return Cond(col.in_(codes))


def _status_codes(rtype: str, p: Param, values: list[str]) -> list[str]:
    """The codes of a ``status`` search: ``system|code`` counts only with the type's status
    code system (``STATUS_SYSTEMS``); ``|code`` (no system) never matches a status."""
    codes = []
    for v in values:
        system, bar, code = v.rpartition("|")
        if bar and system != STATUS_SYSTEMS.get(rtype, system or "-"):
            continue  # another system (or none): this alternative matches nothing
        codes.append(code)
    return codes


def _check_id(value: str, name: str) -> str:
    if not _ID_RE.fullmatch(value):
        raise BadRequest(f"{name}: not a valid FHIR id (1-64 of A-Z a-z 0-9 - .)")
    return value


def _local(value: str, p: Param, base: str | None) -> str:
    """A reference value without this server's base URL; any other URL is refused."""
    if "://" in value:
        if base and value.startswith(base.rstrip("/") + "/"):
            return value[len(base.rstrip("/")) + 1 :]
        raise BadRequest(
            f"{p.name}: give Type/id, an id or this server's URL of one, not another server's URL",
            issue="not-supported",
        )
    return value


def _split_reference(value: str, p: Param, base: str | None) -> tuple[str | None, str]:
    parts = _local(value, p, base).split("/_history/", 1)[0].split("/")
    if len(parts) > 2:
        raise BadRequest(f"{p.name}: not Type/id or an id")
    if len(parts) == 1:
        return None, _check_id(parts[0], p.name)
    rtype, rid = parts
    if not _TYPE_RE.fullmatch(rtype):
        raise BadRequest(f"{p.name}: not Type/id or an id")
    if p.target and rtype != p.target and p.column != "@ref":
        raise BadRequest(f"{p.name} refers to {p.target} only")
    return rtype, _check_id(rid, p.name)


def _reference_text(value: str, p: Param, base: str | None) -> str:
    """``Type/id`` as a reference kept in ``fhir_token`` is written (a bare id: ``p.target``)."""
    rtype, rid = _split_reference(value, p, base)
    return f"{rtype or p.target}/{rid}"


def _reference(
    col: ColumnElement[Any], value: str, p: Param, base: str | None = None
) -> ColumnElement[bool]:
    rtype, rid = _split_reference(value, p, base)
    if rtype is None:
        return col == f"{p.target}/{rid}" if p.target else col.endswith(f"/{rid}")
    return col == f"{rtype}/{rid}"


def _audit_token(table: Table, p: Param, value: str) -> ColumnElement[bool]:
    from bridge.audit.events import ACTIONS, PACKET_SYSTEM, PATIENT_HASH_SYSTEM

    system, bar, code = value.rpartition("|")
    if p.name == "_id":
        if not (code.isascii() and code.isdigit()) or len(code) > 18:
            raise BadRequest("AuditEvent ids are sequence numbers")
        return table.c.seq == int(code)
    if p.name == "action":
        chosen = [a for a, c in ACTIONS.items() if c == code]
        if code == "E":  # actions not in the map are also E
            return or_(table.c.action.in_(chosen), table.c.action.not_in(list(ACTIONS)))
        return table.c.action.in_(chosen)
    if p.name == "entity-identifier":
        if bar and system == PACKET_SYSTEM:
            return table.c.packet_id == code
        if bar and system != PATIENT_HASH_SYSTEM:
            return table.c.seq < 0  # an identifier system this log never holds
        if not bar:
            return or_(table.c.patient_hash == code, table.c.packet_id == code)
    return table.c[p.column] == code


def parse_date(value: str, name: str = "date") -> tuple[datetime, datetime]:
    """[start, end) of a FHIR date/dateTime at the precision it was written in (UTC)."""
    m = _DATE_RE.fullmatch(value.replace(" ", "+"))
    if not m:
        raise BadRequest(f"{name}: not a FHIR date or dateTime (a time needs a zone: Z or +08:00)")
    g = m.groupdict()
    try:
        if g["H"] is None:
            y, mo, d = int(g["y"]), int(g["m"] or 1), int(g["d"] or 1)
            start = datetime(y, mo, d, tzinfo=UTC)
            if g["d"]:
                end = start + timedelta(days=1)
            elif g["m"]:
                end = datetime(y + mo // 12, mo % 12 + 1, 1, tzinfo=UTC)
            else:
                end = datetime(y + 1, 1, 1, tzinfo=UTC)
            return start, end
        frac = g["f"] or ""
        tz = "+00:00" if g["tz"] == "Z" else g["tz"]
        start = datetime.fromisoformat(
            f"{g['y']}-{g['m']}-{g['d']}T{g['H']}:{g['M']}:{g['S'] or '00'}"
            f".{frac.ljust(6, '0')}{tz}"
        ).astimezone(UTC)
        step = (
            timedelta(microseconds=10 ** (6 - len(frac)))
            if frac
            else timedelta(seconds=1)
            if g["S"]
            else timedelta(minutes=1)
        )
        return start, start + step
    except ValueError as exc:
        raise BadRequest(f"{name}: not a real date or time") from exc


def _date_prefix(raw: str, name: str) -> tuple[str, str]:
    if raw[:2] in _PREFIXES:
        return raw[:2], raw[2:]
    if raw[:2].isalpha():
        raise BadRequest(
            f"{name}: the prefix is not one of {' '.join(_PREFIXES)}", issue="not-supported"
        )
    return "eq", raw


def date_condition(col: Any, raw: str, name: str) -> ColumnElement[bool]:
    prefix, value = _date_prefix(raw, name)
    lo, hi = parse_date(value, name)
    ops: dict[str, Callable[[], ColumnElement[bool]]] = {
        "eq": lambda: and_(col >= lo, col < hi),
        "ne": lambda: not_(and_(col >= lo, col < hi)),
        "gt": lambda: col >= hi,
        "sa": lambda: col >= hi,
        "ge": lambda: col >= lo,
        "lt": lambda: col < lo,
        "eb": lambda: col < lo,
        "le": lambda: col < hi,
    }
    return ops[prefix]()


def encode_cursor(position: Any) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(position)).decode().rstrip("=")


def decode_cursor(token: str) -> Any:
    try:
        return orjson.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (ValueError, orjson.JSONDecodeError) as exc:
        raise BadRequest("_cursor is not one this server gave out") from exc
