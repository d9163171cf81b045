"""What the node remembers about local records it has taken in from its adapters."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import UniqueConstraint
from sqlmodel import Field, SQLModel

from bridge.store.types import UTCDateTime


class AdapterIntake(SQLModel, table=True):
    """One row per local record acted on: committed with the record's effect (exactly once).

    ``result`` is the JSON answer the first call returned (given again to a repeated call, e.g.
    the stored ACK for a re-sent HL7 message). ``thread`` links the record to its referral.
    """

    __tablename__ = "adapter_intake"
    __table_args__ = (UniqueConstraint("adapter", "source_key"),)

    id: int | None = Field(default=None, primary_key=True)
    adapter: str = Field(max_length=48)
    source_key: str = Field(max_length=200)
    thread: str | None = Field(default=None, max_length=64, index=True)
    at: datetime = Field(sa_type=UTCDateTime)
    result: str


ADAPTER_INTAKE = AdapterIntake.__table__  # type: ignore[attr-defined]


class AdapterStateRow(SQLModel, table=True):
    """An adapter's own keyed state (bridge.local.state), in the node's database: under its
    backups, its PostgreSQL workers and its rules for patient data, never in a private file.

    ``ns`` groups one kind of record (an HL7 HIS's answers, slips, patients); ``thread`` links
    a record to its referral, for look-up by thread; ``value`` is JSON.
    """

    __tablename__ = "adapter_state"
    __table_args__ = (UniqueConstraint("adapter", "ns", "key"),)

    id: int | None = Field(default=None, primary_key=True)
    adapter: str = Field(max_length=48)
    ns: str = Field(max_length=32)
    key: str = Field(max_length=200)
    thread: str | None = Field(default=None, max_length=64, index=True)
    at: datetime = Field(sa_type=UTCDateTime)
    value: str


ADAPTER_STATE = AdapterStateRow.__table__  # type: ignore[attr-defined]
