"""Put, read and search FHIR resources in the node's store (SQL core, no model round-trips).

Resources arrive already validated (at intake or by the API), so this module only extracts
search columns and writes bytes: nothing is parsed or validated twice.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import Connection, and_, bindparam, func, insert, or_, select, update

from bridge.errors import NotFound
from bridge.fhirstore.tables import FHIR_HISTORY, FHIR_RESOURCE

T = FHIR_RESOURCE

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


def search_columns(resource: dict[str, Any]) -> dict[str, Any]:
    rtype = resource["resourceType"]
    patient = f"Patient/{resource['id']}" if rtype == "Patient" else _first_ref(
        resource, _PATIENT_PATHS)
    idents = resource.get("identifier") or []
    if isinstance(idents, dict):
        idents = [idents]
    token = "".join(f"|{i.get('system', '')}|{i.get('value', '')}" for i in idents) + "|" \
        if idents else None
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


# constant statements with bound parameters: ``.values(**row)`` built a new statement per call
# and SQLAlchemy spent ~2 ms a resource on its cache key (measured in bench/results.py)
_CURRENT = select(T.c.version, T.c.thread, T.c.patient_hash).where(
    T.c.rtype == bindparam("_rt"), T.c.id == bindparam("_id"))
_UPDATE = update(T).where(T.c.rtype == bindparam("_rt"), T.c.id == bindparam("_id"))
_INSERT = insert(T)
_HISTORY = insert(FHIR_HISTORY)


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
        "version": version, "last_updated": at, "body": data,
        "thread": thread or (current.thread if current else None),
        "patient_hash": patient_hash or (current.patient_hash if current else None),
        "origin": origin, **search_columns(resource),
    }
    if current:
        conn.execute(_UPDATE, [{"_rt": rtype, "_id": rid, **values}])
    else:
        conn.execute(_INSERT, [{"rtype": rtype, "id": rid, **values}])
    conn.execute(_HISTORY, [{"rtype": rtype, "id": rid, "version": version, "at": at,
                             "body": data}])
    return resource


def get(conn: Connection, rtype: str, rid: str) -> dict[str, Any]:
    row = conn.execute(select(T.c.body).where(T.c.rtype == rtype, T.c.id == rid)).first()
    if row is None:
        raise NotFound(f"{rtype}/{rid} is not known here")
    return orjson.loads(row.body)


def get_row(conn: Connection, rtype: str, rid: str) -> Any:
    row = conn.execute(select(T).where(T.c.rtype == rtype, T.c.id == rid)).first()
    if row is None:
        raise NotFound(f"{rtype}/{rid} is not known here")
    return row


def exists(conn: Connection, rtype: str, rid: str) -> bool:
    return conn.execute(select(T.c.id).where(T.c.rtype == rtype, T.c.id == rid)).first() is not None


def by_thread(conn: Connection, thread: str, rtype: str | None = None) -> list[dict[str, Any]]:
    stmt = select(T.c.body).where(T.c.thread == thread).order_by(T.c.last_updated)
    if rtype:
        stmt = stmt.where(T.c.rtype == rtype)
    return [orjson.loads(r.body) for r in conn.execute(stmt)]


def find_by_identifier(conn: Connection, rtype: str, system: str, value: str) -> dict[str, Any] | None:
    row = conn.execute(
        select(T.c.body).where(T.c.rtype == rtype,
                               T.c.identifiers.contains(f"|{system}|{value}|"))
    ).first()
    return orjson.loads(row.body) if row else None


def find_patient_by_hash(conn: Connection, phash: str) -> dict[str, Any] | None:
    row = conn.execute(
        select(T.c.body).where(T.c.rtype == "Patient", T.c.patient_hash == phash)
    ).first()
    return orjson.loads(row.body) if row else None


def search(
    conn: Connection,
    rtype: str,
    *,
    where: Sequence[Any] = (),
    count: int = 20,
    offset: int = 0,
) -> tuple[list[dict[str, Any]], int, list[Any]]:
    """Rows matching SQL conditions on the search columns, newest first; (page, total, rows)."""
    cond = and_(T.c.rtype == rtype, *where)
    total = conn.execute(select(func.count()).select_from(T).where(cond)).scalar() or 0
    rows = conn.execute(
        select(T).where(cond).order_by(T.c.last_updated.desc(), T.c.id).limit(count).offset(offset)
    ).all()
    return [orjson.loads(r.body) for r in rows], total, rows


__all__ = [
    "by_thread",
    "exists",
    "find_by_identifier",
    "find_patient_by_hash",
    "get",
    "get_row",
    "or_",
    "put",
    "search",
    "search_columns",
]
