"""The node's local FHIR resource store: what the hospital-facing FHIR API reads and searches.

One row per (type, id) with its current version as the exact JSON bytes, plus a few extracted
search columns (patient, status, requester, performer, owner, focus, identifiers) so searches are
indexed SQL, not JSON scans. History is kept in ``fhir_history`` (every version, for audit).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Column, Index, LargeBinary
from sqlmodel import Field, SQLModel

from bridge.store.types import UTCDateTime


class FhirResource(SQLModel, table=True):
    __tablename__ = "fhir_resource"
    __table_args__ = (
        Index("ix_fhir_type_updated", "rtype", "last_updated"),
        Index("ix_fhir_type_patient", "rtype", "patient"),
        Index("ix_fhir_thread", "thread"),
    )

    rtype: str = Field(primary_key=True, max_length=40)
    id: str = Field(primary_key=True, max_length=64)
    version: int = 1
    last_updated: datetime = Field(sa_type=UTCDateTime)
    patient: str | None = Field(default=None, max_length=110)  # "Patient/<id>"
    patient_hash: str | None = Field(default=None, max_length=64, index=True)
    status: str | None = Field(default=None, max_length=32)
    requester: str | None = Field(default=None, max_length=110)
    performer: str | None = Field(default=None, max_length=110)
    owner: str | None = Field(default=None, max_length=110)
    focus: str | None = Field(default=None, max_length=110)
    identifiers: str | None = None  # "|system|value|system|value|" for token search
    thread: str | None = Field(default=None, max_length=64)
    origin: str | None = Field(default=None, max_length=32)  # member the data came from
    body: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


class FhirHistory(SQLModel, table=True):
    __tablename__ = "fhir_history"

    seq: int | None = Field(default=None, primary_key=True)
    rtype: str = Field(max_length=40, index=True)
    id: str = Field(max_length=64, index=True)
    version: int
    at: datetime = Field(sa_type=UTCDateTime)
    body: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


FHIR_RESOURCE = FhirResource.__table__  # type: ignore[attr-defined]
FHIR_HISTORY = FhirHistory.__table__  # type: ignore[attr-defined]
