"""The clinicians' referral list: filters, search by patient, counts and keyset paging.

No silent cap: the page says how many referrals match and pages through all of them by
``(updated_at, thread)``. Search ``q`` finds a patient by national ID number (turned into the
keyed hash here, never stored), by an identifier value such as the local record number (the
store's identifier index), or by name (a substring of the stored Patient resources).
"""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, String, Table, and_, cast, func, or_, select

from bridge.fhirstore import store
from bridge.fhirstore.tables import FHIR_RESOURCE, FHIR_TOKEN
from bridge.privacy import patient_hash
from bridge.referral.tables import REFERRAL
from bridge.web import fhirview as fv

PAGE = 50
R = REFERRAL
#: overdue: not accepted in time, so reminded (``ReferralWorkflow.remind``), and still waiting;
#: the IT page's reminders and ``/local/v1/reminders`` list the same referrals
OVERDUE = (R.c.reminded_at.is_not(None), R.c.status.in_(("requested", "received")))
_NATIONAL_ID = __import__("re").compile(r"\d{17}[\dXx]")


def is_national_id(q: str) -> bool:
    return _NATIONAL_ID.fullmatch(q.strip()) is not None


def hashes_for(conn: Connection, key: bytes, q: str) -> set[str]:
    """Patient hashes a clinician's search text names (empty set: none)."""
    q = q.strip()
    if _NATIONAL_ID.fullmatch(q):
        return {patient_hash(key, q)}
    ids = {
        r.id
        for r in conn.execute(
            select(FHIR_TOKEN.c.id).where(FHIR_TOKEN.c.rtype == "Patient", FHIR_TOKEN.c.value == q)
        )
    }
    body = FHIR_RESOURCE.c.body
    text = (
        func.convert_from(body, "UTF8") if conn.dialect.name == "postgresql" else cast(body, String)
    )
    like = q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    ids |= {
        r.id
        for r in conn.execute(
            select(FHIR_RESOURCE.c.id).where(
                FHIR_RESOURCE.c.rtype == "Patient", text.like(f"%{like}%", escape="\\")
            )
        )
    }
    if not ids:
        return set()
    return {
        r.patient_hash
        for r in conn.execute(
            select(FHIR_RESOURCE.c.patient_hash).where(
                FHIR_RESOURCE.c.rtype == "Patient", FHIR_RESOURCE.c.id.in_(ids)
            )
        )
        if r.patient_hash
    }


def encode_after(row: dict[str, Any]) -> str:
    raw = f"{row['updated_at'].isoformat()}|{row['thread']}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_after(token: str) -> tuple[datetime, str]:
    """ValueError if the token is not one this page gave out."""
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    at, _, thread = raw.partition("|")
    return datetime.fromisoformat(at), thread


def page(
    conn: Connection,
    key: bytes,
    *,
    side: str | None = None,
    status: str | None = None,
    kind: str | None = None,
    peer: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    q: str | None = None,
    after: str | None = None,
    patient_hash: str | None = None,
    overdue: bool = False,
    size: int = PAGE,
) -> tuple[list[dict[str, Any]], int, str | None]:
    """(rows with ``patient_name`` and ``record_no``, total matching, next-page token);
    ``overdue``: only the referrals the IT page lists under reminders (``OVERDUE``)."""
    where: list[Any] = list(OVERDUE) if overdue else []
    if side in ("receiver", "referrer"):
        where.append(R.c.side == side)
    if status:
        where.append(R.c.status == status)
    if kind:
        where.append(R.c.kind == kind)
    if peer:
        where.append(or_(R.c.referrer == peer, R.c.receiver == peer))
    if since is not None:
        where.append(R.c.updated_at >= since)
    if until is not None:
        where.append(R.c.updated_at < until)
    return thread_page(
        conn, R, where, key=key, q=q, patient_hash=patient_hash, after=after, size=size
    )


def thread_page(
    conn: Connection,
    table: Table,
    where: list[Any],
    *,
    key: bytes,
    q: str | None,
    patient_hash: str | None,
    after: str | None,
    size: int,
) -> tuple[list[dict[str, Any]], int, str | None]:
    """One page of a referral or consultation table (``thread``, ``task_id``, ``patient_hash``,
    ``updated_at`` columns), newest change first: ``where`` and the patient (by hash, or found
    by ``q``: name, record number or national id), the total matching, the keyset token of the
    next page; each row with ``patient_name``, ``record_no`` and ``patient_id``."""
    c = table.c
    where = list(where)
    if patient_hash:
        where.append(c.patient_hash == patient_hash)
    if q and q.strip():
        hashes = hashes_for(conn, key, q)
        where.append(c.patient_hash.in_(hashes) if hashes else c.thread.is_(None))
    total = (
        conn.execute(select(func.count()).select_from(table).where(and_(True, *where))).scalar()
        or 0
    )
    if after:
        at, thread = decode_after(after)
        where.append(or_(c.updated_at < at, and_(c.updated_at == at, c.thread < thread)))
    rows = [
        dict(r._mapping)
        for r in conn.execute(
            select(table)
            .where(and_(True, *where))
            .order_by(c.updated_at.desc(), c.thread.desc())
            .limit(size + 1)
        )
    ]
    nxt = encode_after(rows[size - 1]) if len(rows) > size else None
    rows = rows[:size]
    for r in rows:
        r["patient_name"], r["record_no"], r["patient_id"] = _patient(conn, r)
    return rows, total, nxt


def _patient(conn: Connection, row: dict[str, Any]) -> tuple[str, str, str | None]:
    """(name, local record number, Patient id) of a referral's or consultation's patient, as far
    as known."""
    try:
        task = store.get(conn, "Task", row["task_id"])
    except Exception:  # noqa: BLE001 - a purged or missing Task: the row still lists
        return "", "", None
    ref = ((task.get("for") or {}).get("reference") or "").split("/")
    if len(ref) != 2 or not store.exists(conn, "Patient", ref[1]):
        return "", "", None
    p = store.get(conn, "Patient", ref[1])
    name = next(
        (
            n.get("text") or "".join([*(n.get("family") or ""), *(n.get("given") or [])])
            for n in p.get("name") or []
        ),
        "",
    )
    mrn = fv.identifiers(p, "MR") or ", ".join(
        str(i.get("value"))
        for i in p.get("identifier") or []
        if "mrn" in str(i.get("system") or "").lower() and i.get("value")
    )
    return name, mrn, ref[1]
