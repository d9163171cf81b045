"""Export and search the audit log (for auditors, regulators and the web pages).

ndjson: one FHIR R4 AuditEvent per line, exactly the stored (hashed) resource plus one more
extension, ``http://hutong.dev/StructureDefinition/audit-chain`` with sub-extensions ``prevHash``
and ``hash``; the seq is already in the ``audit-seq`` extension. Each line stays a valid
AuditEvent for FHIR tools, and ``unwrap`` strips the chain extension so anyone can re-hash the
lines offline: ``link_hash(prev_hash, canonical(resource)) == hash``.

csv: flat columns ``CSV_COLUMNS`` (``at`` as a UTC FHIR instant; the person's role, address,
the RESTful interaction and what was shown at the end). Write to a file opened with
``newline=""``; add a UTF-8 BOM yourself if it is for Excel.

Time filters: ``since`` inclusive, ``until`` exclusive, both timezone-aware. Rows are only ever
what the caller logged: no patient data beyond the keyed ``patient_hash``.
"""

from __future__ import annotations

import csv
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

import orjson
from sqlalchemy import Connection, Select, select

from .events import event_fields, who_fields
from .tables import AuditRecord

CHAIN_EXTENSION = "http://hutong.dev/StructureDefinition/audit-chain"
CSV_COLUMNS = (
    "seq",
    "at",
    "action",
    "outcome",
    "kind",
    "peer",
    "thread",
    "packet_id",
    "patient_hash",
    "actor",
    "code",
    "message",
    "hash",
    # who and what, for "who looked at this patient" (events.who_fields)
    "actor_role",
    "address",
    "interaction",
    "shown",
    "resources",
)
MAX_LIMIT = 1000
_BATCH = 2000

_audit = AuditRecord.__table__  # type: ignore[attr-defined]


def _utc(value: datetime | None, name: str) -> datetime | None:
    if value is None:
        return None
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware")
    return value.astimezone(UTC)


def _select(
    since: datetime | None,
    until: datetime | None,
    patient_hash: str | None,
    peer: str | None,
    action: str | None,
    outcome: str | None,
    packet_id: str | None,
    actor: str | None = None,
    kind: str | None = None,
) -> Select[Any]:
    stmt = select(_audit.c.seq, _audit.c.resource, _audit.c.prev_hash, _audit.c.hash)
    if (start := _utc(since, "since")) is not None:
        stmt = stmt.where(_audit.c.at >= start)
    if (end := _utc(until, "until")) is not None:
        stmt = stmt.where(_audit.c.at < end)
    if patient_hash is not None and len(patient_hash) < 32:
        # the pages show the first 16 hex digits: a copied prefix finds the patient's rows
        stmt = stmt.where(_audit.c.patient_hash.startswith(patient_hash, autoescape=True))
        patient_hash = None
    for column, value in (
        ("patient_hash", patient_hash),
        ("peer", peer),
        ("action", action),
        ("outcome", outcome),
        ("packet_id", packet_id),
        ("actor", actor),
        ("kind", kind),
    ):
        if value is not None:
            stmt = stmt.where(_audit.c[column] == value)
    return stmt


def _flat(seq: int, resource: dict[str, Any], hash_: str) -> dict[str, Any]:
    fields = {**event_fields(resource), **who_fields(resource)}
    fields["seq"] = seq
    fields["hash"] = hash_
    return {name: fields[name] for name in CSV_COLUMNS}


def export(
    conn: Connection,
    out: TextIO,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    fmt: Literal["ndjson", "csv"] = "ndjson",
    patient_hash: str | None = None,
    peer: str | None = None,
    action: str | None = None,
    outcome: str | None = None,
    packet_id: str | None = None,
    actor: str | None = None,
    kind: str | None = None,
) -> int:
    """Write matching records to ``out`` in seq order, streaming; returns how many."""
    if fmt not in ("ndjson", "csv"):
        raise ValueError(f"export format must be ndjson or csv, got {fmt!r}")
    stmt = _select(since, until, patient_hash, peer, action, outcome, packet_id, actor, kind)
    result = conn.execute(stmt.order_by(_audit.c.seq).execution_options(yield_per=_BATCH))
    count = 0
    try:
        if fmt == "csv":
            writer = csv.writer(out)
            writer.writerow(CSV_COLUMNS)
            for row in result:
                flat = _flat(row.seq, orjson.loads(row.resource), row.hash)
                writer.writerow(["" if flat[c] is None else flat[c] for c in CSV_COLUMNS])
                count += 1
        else:
            for row in result:
                resource = orjson.loads(row.resource)
                resource.setdefault("extension", []).append(
                    {
                        "url": CHAIN_EXTENSION,
                        "extension": [
                            {"url": "prevHash", "valueString": row.prev_hash},
                            {"url": "hash", "valueString": row.hash},
                        ],
                    }
                )
                out.write(orjson.dumps(resource).decode())
                out.write("\n")
                count += 1
    finally:
        result.close()
    return count


def unwrap(exported: dict[str, Any]) -> tuple[dict[str, Any], str, str]:
    """Split an exported ndjson AuditEvent into (stored resource, prev_hash, hash)."""
    resource = dict(exported)
    extensions = list(resource.get("extension", ()))
    chain = next(e for e in extensions if e.get("url") == CHAIN_EXTENSION)
    extensions.remove(chain)
    if extensions:
        resource["extension"] = extensions
    else:
        resource.pop("extension", None)
    values = {e["url"]: e["valueString"] for e in chain["extension"]}
    return resource, values["prevHash"], values["hash"]


def query(
    conn: Connection,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    patient_hash: str | None = None,
    peer: str | None = None,
    action: str | None = None,
    outcome: str | None = None,
    packet_id: str | None = None,
    limit: int = 100,
    offset: int = 0,
    newest_first: bool = True,
    actor: str | None = None,
    before_seq: int | None = None,
    kind: str | None = None,
) -> list[dict[str, Any]]:
    """One page of matching records as flat dicts (keys ``CSV_COLUMNS``), for the web pages."""
    if not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit must be 1..{MAX_LIMIT}")
    if offset < 0:
        raise ValueError("offset must be >= 0")
    order = _audit.c.seq.desc() if newest_first else _audit.c.seq
    stmt = _select(since, until, patient_hash, peer, action, outcome, packet_id, actor, kind)
    if before_seq is not None:  # keyset paging: the page after the one ending at before_seq
        stmt = stmt.where(_audit.c.seq < before_seq)
    rows = conn.execute(stmt.order_by(order).limit(limit).offset(offset))
    return [_flat(row.seq, orjson.loads(row.resource), row.hash) for row in rows]


__all__ = ["CHAIN_EXTENSION", "CSV_COLUMNS", "MAX_LIMIT", "export", "query", "unwrap"]


def count(
    conn: Connection,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    patient_hash: str | None = None,
    peer: str | None = None,
    action: str | None = None,
    outcome: str | None = None,
    packet_id: str | None = None,
    actor: str | None = None,
    kind: str | None = None,
) -> int:
    """How many records match (the pages say how many there are, not just how many shown)."""
    from sqlalchemy import func

    stmt = _select(since, until, patient_hash, peer, action, outcome, packet_id, actor, kind)
    return conn.execute(select(func.count()).select_from(stmt.subquery())).scalar() or 0
