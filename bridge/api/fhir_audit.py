"""The audit side of the /fhir API: AuditEvent search over the chain, and "who looked at what".

Every read or search that returns FHIR data is itself appended to the node's audit chain, in the
same write transaction as the read: one ``read`` entry per distinct patient (by the store's
``patient_hash`` column) with ``actor = role:<role>``, the query string (identifier values
redacted: they can be national ID numbers) and the ``Type/id`` list of what was returned. An
auditor finds "who viewed this patient" with ``/fhir/AuditEvent?patient-hash=<h>`` or
``hutong audit export --patient <h>``. An auditor's own AuditEvent searches are recorded as one
``read`` entry without a patient (the query is kept).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode

import orjson
from sqlalchemy import Connection, and_, func, select

from bridge.api.fhir_search import Query, encode_cursor, safe_name
from bridge.api.outcome import BadRequest
from bridge.audit.events import AuditEntry
from bridge.audit.tables import AuditRecord

AUDIT = AuditRecord.__table__  # type: ignore[attr-defined]
#: longest query string kept in an audit entry (the audit layer bounds free text further)
MAX_QUERY = 300
#: most resources named in one audit entry
MAX_RESOURCES = 50
#: AuditEntry.extra values are one bounded line (bridge.audit.events: 256 characters)
_EXTRA_CHARS = 256
#: parameters whose values are kept in the audit: closed vocabularies, dates and page sizes
#: (never a person). Every other value, including any a lenient search ignored, becomes ***;
#: the names stay (identifier keeps its system: ``identifier=urn:oid:...|***``).
_CODES = re.compile(r"[a-z][a-z\-]{0,30}(,[a-z][a-z\-]{0,30}){0,9}")
#: ``Type:param[:Target]`` (what ``_include`` / ``_revinclude`` name: no person)
_INCLUDE = re.compile(r"[A-Z][A-Za-z]{1,40}:[a-z][a-z\-]{0,40}(:[A-Z][A-Za-z]{1,40})?")
_DATES = re.compile(r"([a-z]{2})?\d{4}(-\d\d(-\d\d(T[0-9:.]{5,15}(Z|[+\- ]\d\d:\d\d)?)?)?)?")
_KEEP_VALUE: dict[str, re.Pattern[str]] = {
    "_count": re.compile(r"\d{1,4}"),
    "_total": _CODES,
    "_format": re.compile(r"[a-z/+]{1,30}"),
    "_include": _INCLUDE,
    "_revinclude": _INCLUDE,
    "status": _CODES,
    "gender": _CODES,
    "_sort": re.compile(r"-?[_a-zA-Z][a-zA-Z\-]{0,30}(,-?[_a-zA-Z][a-zA-Z\-]{0,30}){0,9}"),
    "_summary": _CODES,
    "_pretty": _CODES,
    "_totalMethod": _CODES,
    "_elements": re.compile(r"[a-z][A-Za-z0-9]{0,63}(,[a-z][A-Za-z0-9]{0,63}){0,19}"),
    "subtype": _CODES,
    "action": re.compile(r"[CRUDE]"),
    "outcome": re.compile(r"\d{1,2}"),
    "_lastUpdated": _DATES,
    "date": _DATES,
}
_REDACT = ("identifier",)
#: what AuditEntry accepts as a patient hash (bridge.privacy output)
_HASH_RE = re.compile(r"[0-9a-f]{32,128}")


def redacted_query(path: str, query: str) -> str:
    """``path?query`` with the parameter names and no value a person could be found by:
    only values of ``_KEEP_VALUE`` parameters stay (they are checked before the search runs,
    so they are what this API accepts), identifier values are masked with the system kept,
    every other value (a name, an ID number, a lenient search's ignored parameter) is ***."""
    items = parse_qsl(query, keep_blank_values=True)
    safe = [(safe_name(k), _redact(k, v)) for k, v in items]
    text = path + ("?" + urlencode(safe, safe="|:,/*") if safe else "")
    return text[:MAX_QUERY]


def _redact(name: str, value: str) -> str:
    keep = _KEEP_VALUE.get(name)
    if keep is not None and keep.fullmatch(value):
        return value
    if name.split(":")[0] in _REDACT:
        return _mask(value)
    return "***" if value else ""


def _mask(value: str) -> str:
    return ",".join(
        f"{_system(v.partition('|')[0])}|***" if "|" in v else "***" for v in value.split(",")
    )


def _system(system: str) -> str:
    """An identifier system as the audit keeps it: a URI, not free text."""
    return system[:100] if re.fullmatch(r"[A-Za-z][A-Za-z0-9+.\-]*:[^\s|,]*", system) else "***"


def _names(refs: Sequence[str]) -> str:
    """As many whole ``Type/id`` as fit in one audit extra value."""
    text = ""
    for ref in refs[:MAX_RESOURCES]:
        longer = f"{text} {ref}" if text else ref
        if len(longer) > _EXTRA_CHARS:
            break
        text = longer
    return text


def read_entries(
    role: str,
    query: str,
    seen: Iterable[tuple[str, str | None]],
    at: datetime,
    *,
    actor: str | None = None,
    actor_role: str | None = None,
    address: str | None = None,
    interaction: str | None = None,
    message: str = "FHIR API read",
) -> list[AuditEntry]:
    """One ``read`` entry per distinct patient hash among ``seen`` (``Type/id``, hash) pairs;
    an empty result still records who searched for what. ``actor`` names the person or client
    (default: the shared ``role:<role>``); ``query`` says what was asked or shown."""
    by_patient: dict[str | None, list[str]] = {}
    for ref, phash in seen:
        if phash is not None and not _HASH_RE.fullmatch(phash):
            phash = None  # not a keyed hash (bad data from elsewhere): still record the read
        refs = by_patient.setdefault(phash, [])
        if ref not in refs:
            refs.append(ref)
    if not by_patient:
        by_patient[None] = []
    return [
        AuditEntry(
            action="read",
            actor=actor or f"role:{role}",
            patient_hash=phash,
            at=at,
            actor_role=actor_role or role,
            address=address,
            interaction=interaction or ("search-type" if "?" in query else "read"),
            message=message,
            extra={"query": query, "resources": _names(refs) or None, "resource_count": len(refs)},
        )
        for phash, refs in by_patient.items()
    ]


# ---------------------------------------------------------------------------------------------
# AuditEvent search and read


def audit_event(seq: int, resource: str) -> dict[str, Any]:
    """The stored (hashed) AuditEvent with its chain position as the FHIR id."""
    event: dict[str, Any] = orjson.loads(resource)
    event["id"] = str(seq)
    return event


def read_audit_event(conn: Connection, rid: str) -> dict[str, Any]:
    from bridge.errors import NotFound

    if not (rid.isascii() and rid.isdigit()) or len(rid) > 18:
        raise NotFound("no such AuditEvent here (ids are sequence numbers)")
    row = conn.execute(select(AUDIT.c.seq, AUDIT.c.resource).where(AUDIT.c.seq == int(rid))).first()
    if row is None:
        raise NotFound("no such AuditEvent here")
    return audit_event(row.seq, row.resource)


def search_audit(conn: Connection, q: Query) -> tuple[list[dict[str, Any]], int | None, str | None]:
    """(page of AuditEvents newest first, total or None, next cursor or None)."""
    where = list(q.where)
    page_where = list(where)
    if q.cursor is not None:
        if not isinstance(q.cursor, int) or isinstance(q.cursor, bool) or not 0 < q.cursor < 2**63:
            raise BadRequest("_cursor is not one this server gave out")
        page_where.append(AUDIT.c.seq < q.cursor)
    rows = conn.execute(
        select(AUDIT.c.seq, AUDIT.c.resource)
        .where(and_(True, *page_where))
        .order_by(AUDIT.c.seq.desc())
        .limit(q.count + 1)
    ).all()
    more = len(rows) > q.count
    rows = rows[: q.count]
    total = None
    if q.total:
        total = (
            conn.execute(select(func.count()).select_from(AUDIT).where(and_(True, *where))).scalar()
            or 0
        )
    nxt = encode_cursor(rows[-1].seq) if more and rows else None
    return [audit_event(r.seq, r.resource) for r in rows], total, nxt
