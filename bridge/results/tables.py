"""What the node keeps about results: raw source messages taken in, result packets applied."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Column, LargeBinary, UniqueConstraint
from sqlmodel import Field, SQLModel

from bridge.store.types import UTCDateTime


class ResultMessage(SQLModel, table=True):
    """One row per source message (an ORU^R01) taken in: the raw bytes, committed with the
    resources and the exactly-once key, so what the lab sent can always be shown again."""

    __tablename__ = "result_message"
    __table_args__ = (UniqueConstraint("adapter", "source_key"),)

    id: int | None = Field(default=None, primary_key=True)
    adapter: str = Field(max_length=48)
    source_key: str = Field(max_length=200)
    received_at: datetime = Field(sa_type=UTCDateTime)
    patient_hash: str | None = Field(default=None, max_length=64, index=True)
    reports: int = 0
    routed: int = 0
    raw: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


class ResultPacket(SQLModel, table=True):
    """A result packet from another member applied to the local FHIR store (idempotency)."""

    __tablename__ = "result_packet"

    packet_id: str = Field(primary_key=True, max_length=64)
    sender: str = Field(max_length=32)
    kind: str = Field(max_length=32)
    thread: str | None = Field(default=None, max_length=64, index=True)
    patient_hash: str | None = Field(default=None, max_length=64, index=True)
    resources: int = 0
    at: datetime = Field(sa_type=UTCDateTime)


class ResultJournal(SQLModel, table=True):
    """A staged source message (``AdapterHost.share_results(staged=True)``): accepted and
    acknowledged, its resources not yet in the FHIR store. Committed in one small transaction
    with the exactly-once key before the ACK; the node's ``results-journal`` job expands it
    (resources, raw message, routing, audit) and deletes it in one later transaction, so the
    table holds only the backlog and the rows whose expansion failed (``state = 'failed'``,
    kept for IT with the quarantine item that names them)."""

    __tablename__ = "result_journal"

    id: int | None = Field(default=None, primary_key=True)
    adapter: str = Field(max_length=48)
    source_key: str = Field(max_length=200)
    kind: str = Field(max_length=32)
    received_at: datetime = Field(sa_type=UTCDateTime)
    patient_hash: str | None = Field(default=None, max_length=64)
    state: str = Field(default="queued", max_length=16)
    error: str | None = Field(default=None, max_length=500)
    #: the validated collection Bundle, orjson then zlib (one or two pages, not four)
    bundle: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    raw: bytes | None = Field(default=None, sa_column=Column(LargeBinary, nullable=True))


RESULT_MESSAGE = ResultMessage.__table__  # type: ignore[attr-defined]
RESULT_PACKET = ResultPacket.__table__  # type: ignore[attr-defined]
RESULT_JOURNAL = ResultJournal.__table__  # type: ignore[attr-defined]
