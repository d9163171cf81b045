"""Audit log tables: one hash-chained row per audited event, plus signed checkpoints.

The FHIR AuditEvent JSON in ``resource`` is what is hashed; the other columns are copies kept
only so the log can be searched by index, and ``AuditChain.verify`` checks they still agree.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, Integer, Text
from sqlmodel import Field, SQLModel

#: 64-bit ids: at ~1,500 packets/s with several events each, 32 bits run out within days.
#: On SQLite the column stays INTEGER so the primary key is the (already 64-bit) rowid.
BigId = BigInteger().with_variant(Integer(), "sqlite")

#: datetimes are always written as UTC; SQLite drops the offset, so readers treat naive as UTC
UtcDateTime = DateTime(timezone=True)


class AuditRecord(SQLModel, table=True):
    """One audited event; ``hash = sha256(prev_hash + "\\n" + resource)`` links it to the last."""

    __tablename__ = "audit"

    seq: int = Field(sa_type=BigId, primary_key=True, sa_column_kwargs={"autoincrement": False})
    at: datetime = Field(sa_type=UtcDateTime, index=True)
    action: str = Field(index=True)
    outcome: str  # FHIR AuditEvent outcome: "0" success, "4" minor, "8" serious, "12" major
    packet_id: str | None = Field(default=None, index=True)
    kind: str | None = None
    peer: str | None = Field(default=None, index=True)
    thread: str | None = None
    patient_hash: str | None = Field(default=None, index=True)  # keyed HMAC, never a name or ID
    actor: str | None = Field(default=None, index=True)  # "what did this person look at"
    resource: str = Field(sa_type=Text)  # canonical AuditEvent JSON (sorted keys), the hashed bytes
    prev_hash: str = Field(max_length=64)
    hash: str = Field(max_length=64)


class AuditCheckpoint(SQLModel, table=True):
    """An Ed25519 signature over the chain head, so a cut-off tail or rewritten chain shows."""

    __tablename__ = "audit_checkpoint"

    id: int | None = Field(default=None, sa_type=BigId, primary_key=True)
    seq: int = Field(sa_type=BigInteger, index=True)
    hash: str = Field(max_length=64)
    at: datetime = Field(sa_type=UtcDateTime)
    key_id: str
    signature: str  # base64 of the 64-byte Ed25519 signature over chain.checkpoint_message(...)


class PeerAnchor(SQLModel, table=True):
    """The highest signed checkpoint a peer showed us (in its receipts): kept so that the
    peer's own audit chain can be checked against it after a truncation (``anchor.py``)."""

    __tablename__ = "peer_anchor"

    node: str = Field(primary_key=True)  # whose chain
    seq: int = Field(sa_type=BigInteger)
    hash: str = Field(max_length=64)
    at: str  # the checkpoint time exactly as signed
    key_id: str
    signature: str
    received_at: datetime = Field(sa_type=UtcDateTime)
    #: "seq:hash" of the last anchor from this peer that went back behind the one kept here
    regressed: str | None = None


#: the tables this package owns, for ``SQLModel.metadata.create_all(engine, tables=AUDIT_TABLES)``
AUDIT_TABLES = [AuditRecord.__table__, AuditCheckpoint.__table__, PeerAnchor.__table__]  # type: ignore[attr-defined]
