"""Put, read and search FHIR resources in the node's store (SQL core, no model round-trips).

Resources arrive already validated (at intake or by the API), so this module only extracts
search columns and writes bytes: nothing is parsed or validated twice.
"""

from __future__ import annotations

import time
import unicodedata
import uuid
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import (
    ColumnElement,
    Connection,
    LargeBinary,
    Text,
    and_,
    bindparam,
    cast,
    delete,
    func,
    insert,
    literal,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.types import Boolean

from bridge.errors import NotFound
from bridge.fhirstore.tables import (
    FHIR_DATE,
    FHIR_HISTORY,
    FHIR_RESOURCE,
    FHIR_STRING,
    FHIR_TOKEN,
    STRING_CHARS,
    TOKEN_CHARS,
)
from bridge.store import bulk

T = FHIR_RESOURCE
TOK = FHIR_TOKEN
S = FHIR_STRING
IDENTIFIER = "identifier"  # the token parameter every type keeps in fhir_token
_OBS_CODED = {
    "code": ("concept", "code"),
    "category": ("concept", "category"),
    "encounter": ("ref", "encounter"),
    "based-on": ("ref", "basedOn"),
}
#: further token parameters kept in fhir_token: type -> {param: (kind, element)}; kind
#: ``coding`` (a Coding), ``concept`` (CodeableConcept or a list of them), ``ref`` (Reference
#: or a list: the reference string as value, no system), ``code`` (a code of the system
#: ``CODE_SYSTEMS[(type, param)]``)
CODED: dict[str, dict[str, tuple[str, str]]] = {
    "Encounter": {"class": ("coding", "class")},
    "Observation": _OBS_CODED,
    "DiagnosticReport": {**_OBS_CODED, "result": ("ref", "result")},
    "Patient": {"gender": ("code", "gender")},
    "Task": {"focus": ("ref", "focus"), "business-status": ("concept", "businessStatus")},
    "ImagingStudy": {"basedon": ("ref", "basedOn"), "encounter": ("ref", "encounter")},
    "ServiceRequest": {
        "encounter": ("ref", "encounter"),
        "category": ("concept", "category"),
        "code": ("concept", "code"),
        "expert": ("ref", "performer"),
    },
    "Appointment": {"based-on": ("ref", "basedOn")},
    "Condition": {"code": ("concept", "code")},
}
CODE_SYSTEMS = {("Patient", "gender"): "http://hl7.org/fhir/administrative-gender"}
#: date parameters kept in fhir_date: type -> {param: elements, the first present wins (a
#: Period, or a date/dateTime/instant as a range at its precision)}
DATED: dict[str, dict[str, tuple[str, ...]]] = {
    "Encounter": {"date": ("period",)},
    "Observation": {"date": ("effectiveDateTime", "effectivePeriod", "effectiveInstant")},
    "DiagnosticReport": {"date": ("effectiveDateTime", "effectivePeriod")},
    "Patient": {"birthdate": ("birthDate",)},
    "ServiceRequest": {"authored": ("authoredOn",)},
    "Appointment": {"date": ("start",)},
}
#: string parameters kept in fhir_string: type -> {param: HumanName parts it searches}
STRINGS: dict[str, dict[str, tuple[str, ...]]] = {
    "Patient": {
        "name": ("text", "family", "given", "prefix", "suffix"),
        "family": ("family",),
        "given": ("given",),
    },
}
D = FHIR_DATE

#: where each search column comes from, per resource type (first path found wins)
_PATIENT_PATHS = ("subject", "patient", "for", "beneficiary")
_REQUESTER_PATHS = ("requester", "author", "recorder")
_PERFORMER_PATHS = ("performer", "owner", "serviceProvider")


def _ref(value: Any) -> str | None:
    if isinstance(value, list):
        value = value[0] if value else None
    if isinstance(value, dict):
        if "reference" in value:
            return str(value["reference"])[:110]
        actor = value.get("actor")
        if isinstance(actor, dict) and "reference" in actor:
            return str(actor["reference"])[:110]
    return None


def _first_ref(resource: dict[str, Any], paths: Iterable[str]) -> str | None:
    for p in paths:
        r = _ref(resource.get(p))
        if r:
            return r
    return None


def _identifiers(resource: dict[str, Any]) -> list[dict[str, Any]]:
    idents = resource.get("identifier") or []
    if isinstance(idents, dict):
        idents = [idents]
    return [i for i in idents if isinstance(i, dict)]


def search_columns(resource: dict[str, Any]) -> dict[str, Any]:
    rtype = resource["resourceType"]
    patient = (
        f"Patient/{resource['id']}" if rtype == "Patient" else _first_ref(resource, _PATIENT_PATHS)
    )
    idents = _identifiers(resource)
    token = (
        "".join(f"|{i.get('system', '')}|{i.get('value', '')}" for i in idents) + "|"
        if idents
        else None
    )
    status = resource.get("status")
    return {
        "patient": patient,
        "status": status if isinstance(status, str) else None,
        "requester": _first_ref(resource, _REQUESTER_PATHS),
        "performer": _first_ref(resource, _PERFORMER_PATHS),
        "owner": _ref(resource.get("owner")),
        "focus": _ref(resource.get("focus")),
        "identifiers": token,
    }


def token_key(text: Any) -> str:
    """How a token's system or value is stored and searched (cut to TOKEN_CHARS)."""
    return str(text)[:TOKEN_CHARS]


def token_rows(resource: dict[str, Any]) -> list[dict[str, str]]:
    """The ``fhir_token`` rows of a resource: each distinct (system, value) identifier once,
    then the codes of its ``CODED`` parameters."""
    rtype, rid = resource["resourceType"], resource["id"]
    seen: set[tuple[str, str]] = set()
    seen_coded: set[tuple[str, str, str]] = set()
    rows = []
    for ident in _identifiers(resource):
        key = (token_key(ident.get("system") or ""), token_key(ident.get("value") or ""))
        if key != ("", "") and key not in seen:
            seen.add(key)
            rows.append(
                {"rtype": rtype, "id": rid, "param": IDENTIFIER, "system": key[0], "value": key[1]}
            )
    for param, (kind, path) in CODED.get(rtype, {}).items():
        for system, code in _coded_values(rtype, param, kind, resource.get(path)):
            coded = (param, token_key(system), token_key(code))
            if coded not in seen_coded:
                seen_coded.add(coded)
                rows.append(
                    {
                        "rtype": rtype,
                        "id": rid,
                        "param": param,
                        "system": coded[1],
                        "value": coded[2],
                    }
                )
    return rows


def _listed(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _coded_values(rtype: str, param: str, kind: str, value: Any) -> list[tuple[str, str]]:
    """(system, code) pairs of one element for a ``CODED`` parameter ('' = no system)."""
    out: list[tuple[str, str]] = []
    for v in _listed(value):
        if kind == "code" and isinstance(v, str) and v:
            out.append((CODE_SYSTEMS.get((rtype, param), ""), v))
        elif kind == "ref" and isinstance(v, dict) and isinstance(v.get("reference"), str):
            out.append(("", v["reference"]))
        elif kind == "coding" and isinstance(v, dict) and v.get("code"):
            out.append((str(v.get("system") or ""), str(v["code"])))
        elif kind == "concept" and isinstance(v, dict):
            out += [
                (str(c.get("system") or ""), str(c["code"]))
                for c in _listed(v.get("coding") or [])
                if isinstance(c, dict) and c.get("code")
            ]
    return out


def fold(text: str) -> str:
    """A string as string search compares it: accents dropped, case folded, spaces single."""
    decomposed = unicodedata.normalize("NFKD", text)
    bare = "".join(c for c in decomposed if not unicodedata.combining(c))
    return " ".join(bare.casefold().split())


def string_rows(resource: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``fhir_string`` rows of a resource: each name part of each ``STRINGS`` parameter,
    whole (pos 0, with the original) and by suffix (pos n)."""
    rtype, rid = resource["resourceType"], resource["id"]
    seen: set[tuple[str, str, int, str]] = set()
    rows = []
    for param, parts in STRINGS.get(rtype, {}).items():
        for name in _listed(resource.get("name") or []):
            if not isinstance(name, dict):
                continue
            for part in parts:
                for text in _listed(name.get(part) or []):
                    if not isinstance(text, str) or not fold(text):
                        continue
                    norm = fold(text)[:STRING_CHARS]
                    keys = [(param, norm, 0, text[:TOKEN_CHARS])]
                    keys += [
                        (param, norm[i:], i, "") for i in range(1, len(norm)) if norm[i] != " "
                    ]
                    for key in keys:
                        if key not in seen:
                            seen.add(key)
                            rows.append(
                                {
                                    "rtype": rtype,
                                    "id": rid,
                                    "param": key[0],
                                    "norm": key[1],
                                    "pos": key[2],
                                    "raw": key[3],
                                }
                            )
    return rows


def instant_range(value: str) -> tuple[datetime, datetime] | None:
    """[start, end) in UTC of a FHIR date or dateTime at its precision (a date without a time
    is a UTC day, as the search parser reads it); None if unreadable."""
    try:
        if len(value) <= 10:
            y, m, d = int(value[:4]), int(value[5:7] or 1), int(value[8:10] or 1)
            start = datetime(y, m, d, tzinfo=UTC)
            if len(value) == 10:
                return start, start + timedelta(days=1)
            if len(value) == 7:
                return start, datetime(y + m // 12, m % 12 + 1, 1, tzinfo=UTC)
            return start, datetime(y + 1, 1, 1, tzinfo=UTC)
        at = datetime.fromisoformat(value.replace("Z", "+00:00"))
        if at.tzinfo is None:
            return None
        step = timedelta(microseconds=1) if at.microsecond else timedelta(seconds=1)
        return at.astimezone(UTC), at.astimezone(UTC) + step
    except ValueError:
        return None


def date_rows(resource: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``fhir_date`` rows of a resource: one per ``DATED`` parameter it has a value for."""
    rtype, rid = resource["resourceType"], resource["id"]
    rows = []
    for param, paths in DATED.get(rtype, {}).items():
        value = next((resource[p] for p in paths if resource.get(p)), None)
        if isinstance(value, str):  # a date, dateTime or instant: its precision's range
            lo = hi = instant_range(value)
        elif isinstance(value, dict):  # a Period
            lo = instant_range(str(value["start"])) if value.get("start") else None
            hi = instant_range(str(value["end"])) if value.get("end") else None
        else:
            continue
        if lo or hi:
            rows.append(
                {
                    "rtype": rtype,
                    "id": rid,
                    "param": param,
                    "start": lo[0] if lo else None,
                    "end": hi[1] if hi else None,
                }
            )
    return rows


# Every index condition below comes in two forms over ``fhir_resource`` (or an alias,
# ``table``): a *probe* (``lookup=False``), a correlated EXISTS on the index table's primary
# key, which a page walking a page-order index evaluates row by row (a condition most rows meet
# costs a page, not every match), and a *lookup* (``lookup=True``), ``(rtype, id) IN (index
# range)``, which finds the few matches of a selective condition first (it implies the type:
# ``page_query(typed=False)``). ``bridge.api.fhir_search.combine`` picks one lookup per search.


def _lookup(t: Any, sub: Any) -> ColumnElement[bool]:
    return tuple_(t.c.rtype, t.c.id).in_(sub)


def _t(table: Any) -> Any:
    return T if table is None else table


def _token_conds(values: Sequence[str]) -> list[ColumnElement[bool]]:
    conds = []
    for raw in values:
        if "|" not in raw:
            conds.append(TOK.c.value == token_key(raw))
            continue
        system, _, code = raw.partition("|")
        if not code:
            conds.append(TOK.c.system == token_key(system))
        else:
            conds.append(and_(TOK.c.system == token_key(system), TOK.c.value == token_key(code)))
    return conds


def token_match(
    rtype: str,
    param: str,
    values: Sequence[str],
    table: Any = None,
    *,
    negate: bool = False,
    lookup: bool = False,
) -> ColumnElement[bool]:
    """A ``CODED`` parameter's code is one of ``values`` (``code``, ``system|code``, ``|code``
    (no system), ``system|`` (any code of the system)); ``negate``: none is (``:not``)."""
    cond = or_(*_token_conds(values))
    if lookup and not negate:
        return _lookup(
            _t(table),
            select(TOK.c.rtype, TOK.c.id).where(TOK.c.rtype == rtype, TOK.c.param == param, cond),
        )
    found = _token_exists(rtype, param, table, cond)
    return ~found if negate else found


def _token_exists(rtype: str, param: str, table: Any, *conds: Any) -> ColumnElement[bool]:
    return (
        select(TOK.c.id)
        .where(TOK.c.rtype == rtype, TOK.c.id == _t(table).c.id, TOK.c.param == param, *conds)
        .exists()
    )


def has_token(rtype: str, param: str, table: Any = None) -> ColumnElement[bool]:
    """Condition: the resource has some value for a ``fhir_token`` parameter (``:missing``)."""
    return _token_exists(rtype, param, table)


def has_date(rtype: str, param: str, table: Any = None) -> ColumnElement[bool]:
    return (
        select(D.c.id)
        .where(D.c.rtype == rtype, D.c.id == _t(table).c.id, D.c.param == param)
        .exists()
    )


def has_string(rtype: str, param: str, table: Any = None) -> ColumnElement[bool]:
    return (
        select(S.c.id)
        .where(S.c.rtype == rtype, S.c.id == _t(table).c.id, S.c.param == param, S.c.pos == 0)
        .exists()
    )


def ref_match(
    rtype: str, param: str, refs: Any, table: Any = None, *, lookup: bool = True
) -> ColumnElement[bool]:
    """A reference kept as tokens (``focus``, ``encounter``, ``based-on``, ...) is one of
    ``refs`` (a list of ``Type/id``, or a subquery of them: a chain)."""
    match = TOK.c.value.in_(refs if not isinstance(refs, list) else [token_key(r) for r in refs])
    if not lookup:
        return _token_exists(rtype, param, table, match)
    return _lookup(
        _t(table),
        select(TOK.c.rtype, TOK.c.id).where(TOK.c.rtype == rtype, TOK.c.param == param, match),
    )


def _next_string(text: str) -> str | None:
    """The first string after every string that starts with ``text`` (None: no bound)."""
    last = ord(text[-1])
    return None if last >= 0x10FFFF else text[:-1] + chr(last + 1)


def string_match(
    rtype: str,
    param: str,
    values: Sequence[str],
    modifier: str = "",
    table: Any = None,
    *,
    lookup: bool = True,
) -> ColumnElement[bool]:
    """A ``STRINGS`` parameter starts with (default), equals (``exact``: the original, case
    and accents kept) or contains (``contains``) one of ``values``: a range or an equality on
    ``ix_fhir_string_value``."""
    conds = []
    for raw in values:
        norm = fold(raw)[:STRING_CHARS]
        if modifier == "exact":
            conds.append(and_(S.c.norm == norm, S.c.pos == 0, S.c.raw == raw[:TOKEN_CHARS]))
            continue
        upper = _next_string(norm) if norm else None
        rng = and_(S.c.norm >= norm, S.c.norm < upper) if upper else S.c.norm >= norm
        conds.append(rng if modifier == "contains" else and_(rng, S.c.pos == 0))
    if not lookup:
        return (
            select(S.c.id)
            .where(S.c.rtype == rtype, S.c.id == _t(table).c.id, S.c.param == param, or_(*conds))
            .exists()
        )
    return _lookup(
        _t(table),
        select(S.c.rtype, S.c.id).where(S.c.rtype == rtype, S.c.param == param, or_(*conds)),
    )


def period_match(
    rtype: str,
    param: str,
    prefix: str,
    lo: datetime,
    hi: datetime,
    table: Any = None,
    *,
    lookup: bool = False,
) -> ColumnElement[bool]:
    """The resource's period for ``param`` against the search range [lo, hi) under a FHIR
    prefix (R4 search: ``eq`` the period lies within the range; ``ge``/``gt``/``le``/``lt`` it
    overlaps the range above/below; ``sa``/``eb`` it starts after / ends before). An open side
    (no start, no end) reaches to infinity. ``lookup`` (``eq`` only): a range of
    ``ix_fhir_date_start``."""
    s, e = D.c.start, D.c.end
    ops: dict[str, Callable[[], ColumnElement[bool]]] = {
        "eq": lambda: and_(s >= lo, s < hi, e <= hi),
        "ne": lambda: or_(s.is_(None), e.is_(None), s < lo, e > hi),
        "ge": lambda: or_(e.is_(None), e > lo),
        "gt": lambda: or_(e.is_(None), e > hi),
        "le": lambda: or_(s.is_(None), s < hi),
        "lt": lambda: or_(s.is_(None), s < lo),
        "sa": lambda: s >= hi,
        "eb": lambda: e <= lo,
    }
    cond = ops[prefix]()
    if lookup and prefix == "eq":
        return _lookup(
            _t(table), select(D.c.rtype, D.c.id).where(D.c.rtype == rtype, D.c.param == param, cond)
        )
    return (
        select(D.c.id)
        .where(D.c.rtype == rtype, D.c.id == _t(table).c.id, D.c.param == param, cond)
        .exists()
    )


def date_key(rtype: str, param: str, table: Any = None) -> Any:
    """A resource's date for ``param`` as a sort key (its start; NULL if it has none)."""
    t = T if table is None else table
    return (
        select(func.coalesce(D.c.start, D.c.end))
        .where(D.c.rtype == rtype, D.c.id == t.c.id, D.c.param == param)
        .scalar_subquery()
    )


def string_key(rtype: str, param: str, table: Any = None) -> Any:
    """A resource's first (folded) string for ``param`` as a sort key."""
    t = T if table is None else table
    return (
        select(func.min(S.c.norm))
        .where(S.c.rtype == rtype, S.c.id == t.c.id, S.c.param == param, S.c.pos == 0)
        .scalar_subquery()
    )


# constant statements with bound parameters: ``.values(**row)`` built a new statement per call
# and SQLAlchemy spent ~2 ms a resource on its cache key (measured in bench/results.py)
_CURRENT = select(T.c.version, T.c.thread, T.c.patient_hash, T.c.identifiers).where(
    T.c.rtype == bindparam("_rt"), T.c.id == bindparam("_id")
)
_UPDATE = update(T).where(T.c.rtype == bindparam("_rt"), T.c.id == bindparam("_id"))
_INSERT = insert(T)
_HISTORY = insert(FHIR_HISTORY)
_TOKENS = insert(TOK)
_TOKENS_GONE = delete(TOK).where(TOK.c.rtype == bindparam("_rt"), TOK.c.id == bindparam("_id"))
_DATES = insert(D)
_DATES_GONE = delete(D).where(D.c.rtype == bindparam("_rt"), D.c.id == bindparam("_id"))
_STRINGS = insert(S)
_STRINGS_GONE = delete(S).where(S.c.rtype == bindparam("_rt"), S.c.id == bindparam("_id"))


def put(
    conn: Connection,
    resource: dict[str, Any],
    *,
    at: datetime,
    thread: str | None = None,
    origin: str | None = None,
    patient_hash: str | None = None,
) -> dict[str, Any]:
    """Create or update (new version); sets id, meta.versionId and meta.lastUpdated."""
    rtype = resource["resourceType"]
    rid = resource.setdefault("id", str(uuid.uuid4()))
    current = conn.execute(_CURRENT, {"_rt": rtype, "_id": rid}).first()
    version = (current.version + 1) if current else 1
    meta = dict(resource.get("meta") or {})
    meta["versionId"] = str(version)
    meta["lastUpdated"] = at.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    resource["meta"] = meta
    data = orjson.dumps(resource)
    values = {
        "version": version,
        "last_updated": at,
        "body": data,
        "thread": thread or (current.thread if current else None),
        "patient_hash": patient_hash or (current.patient_hash if current else None),
        "origin": origin,
        **search_columns(resource),
    }
    if current:
        conn.execute(_UPDATE, [{"_rt": rtype, "_id": rid, **values}])
        # the tokens change with the identifiers only (and with a coded parameter's value)
        if current.identifiers != values["identifiers"] or rtype in CODED:
            conn.execute(_TOKENS_GONE, [{"_rt": rtype, "_id": rid}])
            _put_tokens(conn, resource)
        if rtype in DATED:
            conn.execute(_DATES_GONE, [{"_rt": rtype, "_id": rid}])
            _put_dates(conn, resource)
        if rtype in STRINGS:
            conn.execute(_STRINGS_GONE, [{"_rt": rtype, "_id": rid}])
            _put_strings(conn, resource)
    else:
        conn.execute(_INSERT, [{"rtype": rtype, "id": rid, **values}])
        _put_tokens(conn, resource)
        if rtype in DATED:
            _put_dates(conn, resource)
        if rtype in STRINGS:
            _put_strings(conn, resource)
    conn.execute(
        _HISTORY, [{"rtype": rtype, "id": rid, "version": version, "at": at, "body": data}]
    )
    return resource


# two IN lists, not a row-value IN of (type, id) pairs: SQLite probes the primary key for
# each type x id combination, where it scanned the table for the row values
_CURRENT_MANY = select(
    T.c.rtype,
    T.c.id,
    T.c.version,
    T.c.thread,
    T.c.patient_hash,
    T.c.identifiers,
    T.c.origin,
    T.c.body,
).where(
    T.c.rtype.in_(bindparam("_types", expanding=True)),
    T.c.id.in_(bindparam("_ids", expanding=True)),
)


_STAMPS = ("versionId", "lastUpdated")


def content(resource: dict[str, Any]) -> dict[str, Any]:
    """The resource without what a write stamps (meta.versionId, meta.lastUpdated): two
    versions with equal content are the same resource (dict equality ignores key order)."""
    meta = {k: v for k, v in (resource.get("meta") or {}).items() if k not in _STAMPS}
    out = {k: v for k, v in resource.items() if k != "meta"}
    if meta:
        out["meta"] = meta
    return out


def _same_row(cur: Any, thread: Any, patient_hash: Any, origin: Any) -> bool:
    """A write of these columns would leave the current row's as they are."""
    return (
        cur.origin == origin
        and (not thread or thread == cur.thread)
        and (not patient_hash or patient_hash == cur.patient_hash)
    )


def put_many(
    conn: Connection,
    items: Sequence[tuple[dict[str, Any], str | None, str | None]],
    *,
    at: datetime,
    origin: str | None = None,
) -> list[dict[str, Any]]:
    """``put`` of several resources (each with its ``thread`` and ``patient_hash``) in a
    constant number of statements: one read of the current versions, then one executemany per
    table, whatever the number of resources (a lab message's 10-30). Same rows as ``put``
    one by one; a (type, id) twice in ``items`` falls back to that.

    One difference from ``put``: a resource whose content (all but meta.versionId and
    meta.lastUpdated) and row columns equal its current version's is not written again; it is
    returned as stored, with that version's meta. A lab message names its Patient and
    Organization each time, and a new version of each per message cost two history rows and
    their search rows for nothing (bench/README.md, ``lis``); versionId, lastUpdated and
    ``_history`` move only when something changed."""
    keys = [(r["resourceType"], r.setdefault("id", str(uuid.uuid4()))) for r, _, _ in items]
    if len(set(keys)) != len(keys):
        return [
            put(conn, r, at=at, thread=th, origin=origin, patient_hash=ph) for r, th, ph in items
        ]
    current = (
        {
            (c.rtype, c.id): c
            for c in conn.execute(
                _CURRENT_MANY,
                {"_types": sorted({t for t, _ in keys}), "_ids": sorted({i for _, i in keys})},
            )
        }
        if keys
        else {}
    )
    stamp = at.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    inserts: list[dict[str, Any]] = []
    updates: list[dict[str, Any]] = []
    history: list[dict[str, Any]] = []
    gone_tokens: list[dict[str, Any]] = []
    gone_dates: list[dict[str, Any]] = []
    gone_strings: list[dict[str, Any]] = []
    tokens: list[dict[str, Any]] = []
    dates: list[dict[str, Any]] = []
    strings: list[dict[str, Any]] = []
    for (resource, thread, patient_hash), (rtype, rid) in zip(items, keys, strict=True):
        cur = current.get((rtype, rid))
        if cur is not None and _same_row(cur, thread, patient_hash, origin):
            stored = orjson.loads(cur.body)
            if content(stored) == content(resource):  # unchanged: kept as it is
                resource["meta"] = stored.get("meta") or {}
                continue
        version = (cur.version + 1) if cur else 1
        meta = dict(resource.get("meta") or {})
        meta["versionId"] = str(version)
        meta["lastUpdated"] = stamp
        resource["meta"] = meta
        data = orjson.dumps(resource)
        values = {
            "version": version,
            "last_updated": at,
            "body": data,
            "thread": thread or (cur.thread if cur else None),
            "patient_hash": patient_hash or (cur.patient_hash if cur else None),
            "origin": origin,
            **search_columns(resource),
        }
        key = {"_rt": rtype, "_id": rid}
        if cur:
            updates.append({**key, **values})
            if cur.identifiers != values["identifiers"] or rtype in CODED:
                gone_tokens.append(key)
                tokens += token_rows(resource)
            if rtype in DATED:
                gone_dates.append(key)
            if rtype in STRINGS:
                gone_strings.append(key)
        else:
            inserts.append({"rtype": rtype, "id": rid, **values})
            tokens += token_rows(resource)
        if rtype in DATED:
            dates += date_rows(resource)
        if rtype in STRINGS:
            strings += string_rows(resource)
        history.append({"rtype": rtype, "id": rid, "version": version, "at": at, "body": data})
    bulk.run(
        conn,
        [
            (_UPDATE, updates),
            (_INSERT, inserts),
            (_TOKENS_GONE, gone_tokens),
            (_DATES_GONE, gone_dates),
            (_STRINGS_GONE, gone_strings),
            (_TOKENS, tokens),
            (_DATES, dates),
            (_STRINGS, strings),
            (_HISTORY, history),
        ],
    )
    return [r for r, _, _ in items]


def _put_tokens(conn: Connection, resource: dict[str, Any]) -> None:
    rows = token_rows(resource)
    if rows:
        conn.execute(_TOKENS, rows)


def _put_dates(conn: Connection, resource: dict[str, Any]) -> None:
    rows = date_rows(resource)
    if rows:
        conn.execute(_DATES, rows)


def _put_strings(conn: Connection, resource: dict[str, Any]) -> None:
    rows = string_rows(resource)
    if rows:
        conn.execute(_STRINGS, rows)


def get(conn: Connection, rtype: str, rid: str) -> dict[str, Any]:
    row = conn.execute(select(T.c.body).where(T.c.rtype == rtype, T.c.id == rid)).first()
    if row is None:
        raise NotFound(f"{rtype}/{rid} is not known here")
    body: dict[str, Any] = orjson.loads(row.body)
    return body


def get_row(conn: Connection, rtype: str, rid: str) -> Any:
    row = conn.execute(select(T).where(T.c.rtype == rtype, T.c.id == rid)).first()
    if row is None:
        raise NotFound(f"{rtype}/{rid} is not known here")
    return row


H = FHIR_HISTORY


def get_version(conn: Connection, rtype: str, rid: str, version: int) -> Any:
    """One stored version (vread): a ``fhir_history`` row with ``body``, ``version``, ``at``."""
    row = conn.execute(
        select(H.c.version, H.c.at, H.c.body).where(
            H.c.rtype == rtype, H.c.id == rid, H.c.version == version
        )
    ).first()
    if row is None:
        raise NotFound(f"{rtype}/{rid} has no version {version} here")
    return row


def history(
    conn: Connection,
    rtype: str,
    rid: str | None = None,
    *,
    count: int = 20,
    before: int | None = None,
    since: datetime | None = None,
) -> tuple[list[Any], bool]:
    """Versions newest first (of one resource, or of a whole type) and whether more follow;
    ``before``: keyset paging on ``seq`` (the last row's seq of the previous page)."""
    stmt = select(H.c.seq, H.c.rtype, H.c.id, H.c.version, H.c.at, H.c.body).where(
        H.c.rtype == rtype
    )
    if rid is not None:
        stmt = stmt.where(H.c.id == rid)
    if before is not None:
        stmt = stmt.where(H.c.seq < before)
    if since is not None:
        stmt = stmt.where(H.c.at >= since)
    rows = conn.execute(stmt.order_by(H.c.seq.desc()).limit(count + 1)).all()
    return list(rows[:count]), len(rows) > count


def current_version(conn: Connection, rtype: str, rid: str) -> int | None:
    """The current version number of a resource, or None if it is not here."""
    row = conn.execute(select(T.c.version).where(T.c.rtype == rtype, T.c.id == rid)).first()
    return int(row.version) if row else None


def lock_version(conn: Connection, rtype: str, rid: str) -> int:
    """The current version, its row locked until the transaction ends (PostgreSQL ``FOR
    UPDATE``; SQLite's write transactions are serial already): a version check and the write
    it guards cannot interleave with another writer's."""
    row = conn.execute(
        select(T.c.version).where(T.c.rtype == rtype, T.c.id == rid).with_for_update()
    ).first()
    if row is None:
        raise NotFound(f"{rtype}/{rid} is not known here")
    return int(row.version)


def exists(conn: Connection, rtype: str, rid: str) -> bool:
    return conn.execute(select(T.c.id).where(T.c.rtype == rtype, T.c.id == rid)).first() is not None


def by_thread(conn: Connection, thread: str, rtype: str | None = None) -> list[dict[str, Any]]:
    stmt = select(T.c.body).where(T.c.thread == thread).order_by(T.c.last_updated)
    if rtype:
        stmt = stmt.where(T.c.rtype == rtype)
    return [orjson.loads(r.body) for r in conn.execute(stmt)]


class _TokenMatch(ColumnElement[bool]):
    """The same condition written for each planner: ``any_of`` (one ``(rtype, id) IN (...)``
    per value, ORed) on SQLite, ``one_in`` (one ``IN`` whose subquery ORs the values) elsewhere.
    SQLite looks each OR branch up on its own index ("MULTI-INDEX OR") but reads an OR inside
    one subquery as a range over (rtype, param); PostgreSQL turns one ``IN`` into a semi-join
    but an OR of several into a sequential scan with hashed subplans."""

    type = Boolean()
    inherit_cache = False  # built per request; never cached
    _is_implicitly_boolean = True  # a condition as it stands (no "= 1" on SQLite)

    def __init__(self, any_of: ColumnElement[bool], one_in: ColumnElement[bool]) -> None:
        self.any_of = any_of
        self.one_in = one_in


@compiles(_TokenMatch)
def _token_match(element: _TokenMatch, compiler: Any, **kw: Any) -> str:
    return str(compiler.process(element.one_in, **kw))


@compiles(_TokenMatch, "sqlite")
def _token_match_sqlite(element: _TokenMatch, compiler: Any, **kw: Any) -> str:
    return "(" + str(compiler.process(element.any_of, **kw)) + ")"


class _BodyHas(ColumnElement[bool]):
    """The stored JSON bytes contain a text: LIKE on the bytes themselves in PostgreSQL
    (``bytea LIKE bytea``); SQLite's LIKE matches no BLOB operand, so there it reads them as
    text first."""

    type = Boolean()
    inherit_cache = False
    _is_implicitly_boolean = True

    def __init__(self, body: Any, pattern: str) -> None:
        self.body = body
        self.pattern = pattern


@compiles(_BodyHas)
def _body_has(element: _BodyHas, compiler: Any, **kw: Any) -> str:
    cond = element.body.op("LIKE", is_comparison=True)(
        literal(element.pattern.encode(), LargeBinary)
    )
    return str(compiler.process(cond, **kw))


@compiles(_BodyHas, "sqlite")
def _body_has_sqlite(element: _BodyHas, compiler: Any, **kw: Any) -> str:
    return str(compiler.process(cast(element.body, Text).like(element.pattern), **kw))


def body_has(text: str, table: Any = None) -> ColumnElement[bool]:
    """Condition: the resource's stored JSON (orjson's compact bytes) contains ``text``, e.g.
    a key as ``'"imagingStudy":'`` (a value quoting it would have escaped quotes). No index
    serves it: for the few rows other conditions leave (one patient's reports). ``text`` is
    a literal fragment: no ``%`` or ``_``."""
    if "%" in text or "_" in text:
        raise ValueError("body_has: a literal fragment, no % or _")
    return _BodyHas(_t(table).c.body, f"%{text}%")


def identifier_match(
    rtype: str, values: Sequence[str], table: Any = None, *, lookup: bool = True
) -> ColumnElement[bool]:
    """Condition on ``fhir_resource``: one of its identifiers matches one of ``values``, each
    FHIR token syntax: ``system|value``, ``|value`` (no system), ``system|`` (any value) or
    ``value`` (any system). Index lookups in ``fhir_token``, then the primary key.

    It implies ``rtype``: give it to ``page_query`` / ``count_query`` with ``typed=False``.
    With ``fhir_resource.rtype = ?`` beside it, SQLite (no statistics) walks the type's page-
    order index and tests every row against the token list (measured: 100 ms at 100 k
    Patients); without it, it looks each token up (``_TokenMatch``)."""
    conds = []
    for raw in values:
        if "|" not in raw:
            conds.append(TOK.c.value == token_key(raw))
            continue
        system, _, value = raw.partition("|")
        conds.append(
            and_(TOK.c.system == token_key(system), TOK.c.value == token_key(value))
            if value
            else TOK.c.system == token_key(system)
        )
    t = T if table is None else table
    if not lookup:
        return _token_exists(rtype, IDENTIFIER, table, or_(*conds))
    key = tuple_(t.c.rtype, t.c.id)

    def tokens(cond: ColumnElement[bool]) -> Any:
        return select(TOK.c.rtype, TOK.c.id).where(
            TOK.c.rtype == rtype, TOK.c.param == IDENTIFIER, cond
        )

    if len(conds) == 1:
        return key.in_(tokens(conds[0]))
    return _TokenMatch(or_(*(key.in_(tokens(c)) for c in conds)), key.in_(tokens(or_(*conds))))


def find_by_identifier(
    conn: Connection, rtype: str, system: str, value: str
) -> dict[str, Any] | None:
    row = conn.execute(
        select(T.c.body).where(identifier_match(rtype, [f"{system}|{value}"]))
    ).first()
    return orjson.loads(row.body) if row else None


_PATIENT_BY_HASH = select(T.c.body).where(
    T.c.rtype == "Patient", T.c.patient_hash == bindparam("_ph")
)


_OWNERS = select(T.c.rtype, T.c.id, T.c.thread, T.c.origin).where(
    T.c.rtype.in_(bindparam("_types", expanding=True)),
    T.c.id.in_(bindparam("_ids", expanding=True)),
)


def owners(
    conn: Connection, keys: Iterable[tuple[str, str]]
) -> dict[tuple[str, str], tuple[str | None, str | None]]:
    """(type, id) -> (thread, origin) of those of ``keys`` stored here, in one statement."""
    keys = set(keys)
    if not keys:
        return {}
    rows = conn.execute(
        _OWNERS,
        {"_types": sorted({t for t, _ in keys}), "_ids": sorted({i for _, i in keys})},
    )
    return {(r.rtype, r.id): (r.thread, r.origin) for r in rows if (r.rtype, r.id) in keys}


def find_patient_by_hash(conn: Connection, phash: str) -> dict[str, Any] | None:
    row = conn.execute(_PATIENT_BY_HASH, {"_ph": phash}).first()
    return orjson.loads(row.body) if row else None


def _typed(rtype: str, where: Sequence[Any], typed: bool) -> list[Any]:
    return [T.c.rtype == rtype, *where] if typed else list(where)


def page_query(
    rtype: str,
    where: Sequence[Any] = (),
    limit: int = 20,
    *,
    typed: bool = True,
    order: Sequence[Any] | None = None,
    offset: int = 0,
) -> Any:
    """Rows matching SQL conditions on the search columns, newest first (then id): the order of
    ``ix_fhir_type_newest`` / ``ix_fhir_type_patient_newest``, so no sort and no scan.
    ``typed=False``: the conditions already imply the type (``identifier_match``).
    ``order``/``offset``: another order (``_sort``), paged by position."""
    stmt = (
        select(T)
        .where(*_typed(rtype, where, typed))
        .order_by(*(order if order else (T.c.last_updated.desc(), T.c.id)))
        .limit(limit)
    )
    return stmt.offset(offset) if offset else stmt


def count_query(
    rtype: str, where: Sequence[Any] = (), *, typed: bool = True, up_to: int | None = None
) -> Any:
    """How many rows match, on the index that serves the conditions (no bodies read);
    ``up_to``: stop counting after that many (plus one)."""
    cond = _typed(rtype, where, typed)
    if up_to is None:
        return select(func.count()).select_from(T).where(*cond)
    return select(func.count()).select_from(select(T.c.id).where(*cond).limit(up_to + 1).subquery())


def search(
    conn: Connection,
    rtype: str,
    *,
    where: Sequence[Any] = (),
    count: int = 20,
    typed: bool = True,
    order: Sequence[Any] | None = None,
    offset: int = 0,
) -> tuple[list[Any], bool]:
    """One page of matching rows, newest first, and whether more rows follow it."""
    rows = list(
        conn.execute(
            page_query(rtype, where, count + 1, typed=typed, order=order, offset=offset)
        ).all()
    )
    return rows[:count], len(rows) > count


#: ``_total=estimate``: exact up to this many matches; above, an exact count at most
#: ESTIMATE_MAX_AGE seconds old (counting every Observation of a 1 M store takes 0.4-0.7 s)
EXACT_UP_TO = 1_000
ESTIMATE_MAX_AGE = 60.0
_ESTIMATES: dict[tuple[Any, ...], tuple[float, int]] = {}


def count(
    conn: Connection,
    rtype: str,
    *,
    where: Sequence[Any] = (),
    typed: bool = True,
    estimate_key: tuple[Any, ...] | None = None,
) -> int:
    """Matching rows. With ``estimate_key`` (what identifies the conditions, e.g. the query's
    parameters): exact if at most EXACT_UP_TO, else the last exact count of the same key in
    this process if younger than ESTIMATE_MAX_AGE, else counted now and remembered."""
    if estimate_key is None:
        return conn.execute(count_query(rtype, where, typed=typed)).scalar() or 0
    few = conn.execute(count_query(rtype, where, typed=typed, up_to=EXACT_UP_TO)).scalar() or 0
    if few <= EXACT_UP_TO:
        return few
    key = (str(conn.engine.url), rtype, *estimate_key)
    hit = _ESTIMATES.get(key)
    if hit is not None and time.monotonic() - hit[0] < ESTIMATE_MAX_AGE:
        return hit[1]
    n = conn.execute(count_query(rtype, where, typed=typed)).scalar() or 0
    if len(_ESTIMATES) > 1_000:
        _ESTIMATES.clear()
    _ESTIMATES[key] = (time.monotonic(), n)
    return n


__all__ = [
    "by_thread",
    "count",
    "date_rows",
    "exists",
    "find_by_identifier",
    "find_patient_by_hash",
    "get",
    "get_row",
    "get_version",
    "history",
    "identifier_match",
    "or_",
    "period_match",
    "put",
    "put_many",
    "search",
    "search_columns",
    "string_match",
    "string_rows",
    "token_match",
    "token_rows",
]
