"""FHIR search parameters of the /fhir API: what each type supports, parsed into SQL conditions.

``SEARCH_PARAMS`` is the single source of truth: the query parser accepts exactly these (plus
the result parameters in ``RESULT_PARAMS``) and the CapabilityStatement lists exactly these.
Handling is strict by default: an unknown parameter or modifier is a 400 listing every such
name; with ``Prefer: handling=lenient`` they are ignored (and left out of the ``self`` link).

Value syntax (FHIR R4 search):
  token      ``code``, ``system|code``, ``|code`` (no system), ``system|`` (any code); comma = OR
  reference  ``Type/id`` or a bare ``id`` (absolute URLs are refused); comma = OR
  date       prefix ``eq ne gt ge lt le sa eb`` + ``YYYY[-MM[-DD[Thh:mm[:ss[.f+]]]]]`` with ``Z``
             or ``±hh:mm`` when a time is given (dates without a time are UTC days); the value's
             precision makes a range (``eq2026-11`` is all of November). Repeat to AND.
A parameter given twice is ANDed. Results are newest first (``_lastUpdated`` descending, then
id); paging is keyset-based (``_cursor``), so no result is skipped or repeated while paging.
``Bundle.total`` is exact when the first page holds every match or up to 1,000 matches; above
that (``_total=estimate``, the default) it may be a count up to 60 s old (``_total=accurate``
counts every time: 0.4-0.7 s for all Observations of a 1 M-resource store).
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import ColumnElement, Table, and_, not_, or_

from bridge.api.outcome import BadRequest
from bridge.fhirstore.store import identifier_match, period_match, token_match


@dataclass(frozen=True)
class Param:
    name: str
    type: str  # token | reference | date
    column: str
    doc: str
    target: str | None = None  # reference: the type a bare id names


_ID = Param("_id", "token", "id", "Logical id; comma-separated ids = OR")
_UPDATED = Param("_lastUpdated", "date", "last_updated", "meta.lastUpdated, with prefixes "
                 "eq ne gt ge lt le sa eb; repeat for a range")
_IDENT = Param("identifier", "token", "identifiers", "Business identifier: system|value or value")
_STATUS = Param("status", "token", "status", "Status code; comma-separated codes = OR")
_PATIENT = Param("patient", "reference", "patient", "The patient: Patient/id or id", "Patient")
_SUBJECT = Param("subject", "reference", "patient", "The subject (Task: for): Type/id or id")
_REQUESTER = Param("requester", "reference", "requester", "Who asked: Type/id or id")
_AUTHOR = Param("author", "reference", "requester", "Who wrote it: Type/id or id")
_PERFORMER = Param("performer", "reference", "performer", "Who performs: Type/id or id")


def _types(*params: Param) -> tuple[Param, ...]:
    return (_ID, _UPDATED, *params)


#: search parameters per resource type (AuditEvent: see AUDIT_PARAMS)
SEARCH_PARAMS: dict[str, tuple[Param, ...]] = {
    "ServiceRequest": _types(_PATIENT, _SUBJECT, _STATUS, _REQUESTER, _PERFORMER, _IDENT),
    "Task": _types(_PATIENT, _SUBJECT, _STATUS, _REQUESTER, _IDENT,
                   Param("owner", "reference", "owner", "Receiving member: Type/id or id"),
                   Param("focus", "reference", "focus", "What the task is about (the referral)")),
    "Encounter": _types(_PATIENT, _SUBJECT, _STATUS, _IDENT,
                        Param("service-provider", "reference", "performer",
                              "Organization providing the encounter", "Organization"),
                        Param("date", "date", "@period", "The period overlaps (ge gt le lt), "
                              "lies within (eq) or lies after/before (sa/eb) the value"),
                        Param("class", "token", "@token", "Encounter.class code (v3 ActCode: "
                              "IMP AMB EMER ...), system|code or code")),
    "DiagnosticReport": _types(_PATIENT, _SUBJECT, _STATUS, _PERFORMER, _IDENT),
    "Observation": _types(_PATIENT, _SUBJECT, _STATUS, _PERFORMER, _IDENT),
    "ImagingStudy": _types(_PATIENT, _SUBJECT, _STATUS, _IDENT),
    "Patient": _types(_IDENT),
    "Consent": _types(_PATIENT, _STATUS, _IDENT),
    "Composition": _types(_PATIENT, _SUBJECT, _STATUS, _AUTHOR, _IDENT),
    "DocumentReference": _types(_PATIENT, _SUBJECT, _STATUS, _AUTHOR, _IDENT),
    "MedicationRequest": _types(_PATIENT, _SUBJECT, _STATUS, _REQUESTER, _IDENT),
    "Coverage": _types(_PATIENT, _STATUS, _IDENT,
                       Param("beneficiary", "reference", "patient", "Covered party", "Patient")),
    "Organization": _types(_IDENT),
    "Practitioner": _types(_IDENT),
}

#: AuditEvent is served from the audit chain (columns of bridge.audit.tables.AuditRecord)
AUDIT_PARAMS: tuple[Param, ...] = (
    Param("_id", "token", "seq", "The audit record's sequence number in this node's chain"),
    Param("date", "date", "at", "When recorded, with prefixes; repeat for a range"),
    Param("subtype", "token", "action", "Hutong action (http://hutong.dev/CodeSystem/"
          "audit-action): queued, sent, received, read, ..."),
    Param("action", "token", "action", "FHIR action code C, R, U, D or E"),
    Param("outcome", "token", "outcome", "0 success, 4 minor, 8 serious, 12 major failure"),
    Param("entity-identifier", "token", "patient_hash", "urn:hutong:patient-hash|<hash>, "
          "urn:hutong:packet|<packet id>, or a bare patient hash"),
    Param("patient-hash", "token", "patient_hash", "The keyed patient hash (Hutong extension)"),
)

#: result parameters: name -> documentation (also listed in the CapabilityStatement)
RESULT_PARAMS = {
    "_count": "Page size, default 20, at most 200 (0 = total only)",
    "_cursor": "Opaque page position; use the Bundle's next link",
    "_total": "none | estimate (default: exact up to 1,000 matches, above that a count at "
              "most 60 s old) | accurate (counted at each request)",
}
INCLUDES = {"Task": ("Task:focus",)}
#: accepted and ignored: JSON is the only format
_FORMATS = {"json", "application/json", "application/fhir+json"}

DEFAULT_COUNT = 20
MAX_COUNT = 200
_ID_RE = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_TYPE_RE = re.compile(r"[A-Z][A-Za-z]{1,63}")
_DATE_RE = re.compile(
    r"(?P<y>\d{4})(?:-(?P<m>\d{2})(?:-(?P<d>\d{2})(?:T(?P<H>\d{2}):(?P<M>\d{2})"
    r"(?::(?P<S>\d{2})(?:\.(?P<f>\d{1,6}))?)?(?P<tz>Z|[+-]\d{2}:\d{2}))?)?)?")
_PREFIXES = ("eq", "ne", "gt", "ge", "lt", "le", "sa", "eb")


@dataclass
class Query:
    rtype: str
    where: list[Any] = field(default_factory=list)
    count: int = DEFAULT_COUNT
    cursor: Any = None
    total: bool = True
    accurate: bool = False  # _total=accurate: count at every request, never from the estimate
    by_token: bool = False  # an identifier condition (it implies the type: store.page_query)
    include_focus: bool = False
    used: list[tuple[str, str]] = field(default_factory=list)  # (name, value) for links
    ignored: list[str] = field(default_factory=list)


def params_for(rtype: str) -> tuple[Param, ...]:
    return AUDIT_PARAMS if rtype == "AuditEvent" else SEARCH_PARAMS[rtype]


def parse_query(rtype: str, items: list[tuple[str, str]], table: Table, *,
                lenient: bool = False) -> Query:
    """Check every (name, value) of the query string; build SQL conditions on ``table``."""
    known = {p.name: p for p in params_for(rtype)}
    q = Query(rtype)
    unknown: list[str] = []
    for name, value in items:
        base, _, modifier = name.partition(":")
        if name == "_format":
            if value not in _FORMATS:
                raise BadRequest(f"_format {value!r} is not supported: only JSON",
                                 issue="not-supported")
            continue
        if name in RESULT_PARAMS:
            _result_param(q, name, value)
        elif name == "_include":
            if value not in ("Task:focus", "Task:focus:ServiceRequest") or rtype != "Task":
                if lenient:
                    q.ignored.append(f"{name}={value}")
                    continue
                raise BadRequest(f"_include={value} is not supported here (only Task:focus on "
                                 "Task)", issue="not-supported")
            q.include_focus = True
        elif base in known and not modifier:
            if value == "":
                continue  # FHIR: an empty parameter value is ignored
            q.where.append(condition(known[base], value, table, rtype))
            q.by_token = q.by_token or (base == "identifier" and rtype != "AuditEvent")
        else:
            unknown.append(name)
            continue
        q.used.append((name, value))
    if unknown and not lenient:
        supported = ", ".join(sorted(known) + sorted(RESULT_PARAMS)
                              + (["_include"] if rtype in INCLUDES else []))
        raise BadRequest(f"unknown search parameter(s) for {rtype}: {', '.join(unknown)} "
                         f"(supported: {supported})", issue="not-supported")
    q.ignored.extend(unknown)
    return q


def _result_param(q: Query, name: str, value: str) -> None:
    if name == "_count":
        if not value.isdigit():
            raise BadRequest(f"_count must be a whole number 0..{MAX_COUNT}")
        q.count = min(int(value), MAX_COUNT)
    elif name == "_cursor":
        q.cursor = decode_cursor(value)
    elif name == "_total":
        if value not in ("none", "estimate", "accurate"):
            raise BadRequest("_total must be none, estimate or accurate")
        q.total = value != "none"
        q.accurate = value == "accurate"


def condition(p: Param, raw: str, table: Table, rtype: str) -> ColumnElement[bool]:
    values = [v.strip() for v in raw.split(",")] if p.type != "date" else [raw]
    if p.column == "@token":  # kept in fhir_token under the parameter's name
        return token_match(rtype, p.name, values)
    if p.column == "@period":  # kept in fhir_date
        prefix, value = _date_prefix(raw, p.name)
        lo, hi = parse_date(value, p.name)
        return period_match(rtype, p.name, prefix, lo, hi)
    col = table.c[p.column]
    if p.type == "date":
        return date_condition(col, raw, p.name)
    if p.type == "reference":
        return or_(*(_reference(col, v, p) for v in values))
    if p.name == "identifier":
        return identifier_match(rtype, values)  # via the fhir_token index
    if rtype == "AuditEvent":
        return or_(*(_audit_token(table, p, v) for v in values))
    if p.name == "_id":
        for v in values:
            _check_id(v, p.name)
    codes = [v.rpartition("|")[2] for v in values]
    return col.in_(codes)


def _check_id(value: str, name: str) -> str:
    if not _ID_RE.fullmatch(value):
        raise BadRequest(f"{name}: not a valid FHIR id (1-64 of A-Z a-z 0-9 - .)")
    return value


def _reference(col: Any, value: str, p: Param) -> ColumnElement[bool]:
    if "://" in value:
        raise BadRequest(f"{p.name}: give Type/id or an id, not a URL", issue="not-supported")
    parts = value.split("/_history/", 1)[0].split("/")
    if len(parts) > 2:
        raise BadRequest(f"{p.name}: not Type/id or an id")
    if len(parts) == 1:
        rid = _check_id(parts[0], p.name)
        return col == f"{p.target}/{rid}" if p.target else col.endswith(f"/{rid}")
    rtype, rid = parts
    if not _TYPE_RE.fullmatch(rtype):
        raise BadRequest(f"{p.name}: not Type/id or an id")
    if p.target and rtype != p.target:
        raise BadRequest(f"{p.name} refers to {p.target}, not {rtype}")
    return col == f"{rtype}/{_check_id(rid, p.name)}"


def _audit_token(table: Table, p: Param, value: str) -> ColumnElement[bool]:
    from bridge.audit.events import ACTIONS, PACKET_SYSTEM, PATIENT_HASH_SYSTEM

    system, bar, code = value.rpartition("|")
    if p.name == "_id":
        if not code.isdigit():
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
        raise BadRequest(f"{name}: not a FHIR date or dateTime (a time needs "
                         "a zone: Z or +08:00)")
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
            f".{frac.ljust(6, '0')}{tz}").astimezone(UTC)
        step = (timedelta(microseconds=10 ** (6 - len(frac))) if frac else
                timedelta(seconds=1) if g["S"] else timedelta(minutes=1))
        return start, start + step
    except ValueError as exc:
        raise BadRequest(f"{name}: not a real date or time") from exc


def _date_prefix(raw: str, name: str) -> tuple[str, str]:
    if raw[:2] in _PREFIXES:
        return raw[:2], raw[2:]
    if raw[:2].isalpha():
        raise BadRequest(f"{name}: prefix {raw[:2]!r} is not supported", issue="not-supported")
    return "eq", raw


def date_condition(col: Any, raw: str, name: str) -> ColumnElement[bool]:
    prefix, value = _date_prefix(raw, name)
    lo, hi = parse_date(value, name)
    return {
        "eq": lambda: and_(col >= lo, col < hi),
        "ne": lambda: not_(and_(col >= lo, col < hi)),
        "gt": lambda: col >= hi,
        "sa": lambda: col >= hi,
        "ge": lambda: col >= lo,
        "lt": lambda: col < lo,
        "eb": lambda: col < lo,
        "le": lambda: col < hi,
    }[prefix]()


def encode_cursor(position: Any) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(position)).decode().rstrip("=")


def decode_cursor(token: str) -> Any:
    try:
        return orjson.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (ValueError, orjson.JSONDecodeError) as exc:
        raise BadRequest("_cursor is not one this server gave out") from exc
