"""The node's local FHIR resource store: what the hospital-facing FHIR API reads and searches.

One row per (type, id) with its current version as the exact JSON bytes, plus a few extracted
search columns (patient, status, requester, performer, owner, focus, identifiers) so searches are
indexed SQL, not JSON scans. History is kept in ``fhir_history`` (every version, for audit).

Indexes that serve the searches (``EXPLAIN QUERY PLAN`` in tests/test_fhir_search_index.py):

* ``ix_fhir_type_newest`` (rtype, last_updated DESC, id): a type's newest page in the API's
  order, and its count, without a sort;
* ``ix_fhir_type_patient_newest`` (rtype, patient, last_updated DESC, id): a patient's resources
  of a type, already in page order; the count is a range of this index;
* ``ix_fhir_type_patient_hash`` (rtype, patient_hash, last_updated DESC, id): a patient found by
  keyed hash (results filed from another member, a clinician's result list), newest first. It
  replaced ``ix_fhir_resource_patient_hash`` on the hash alone, which made finding a patient's
  Patient row walk every resource of that patient (48.8 ms with 95,000 Observations of one
  patient, against 0.003 ms);
* ``fhir_token``: one row per business identifier (system, value) of a resource, so
  ``identifier=`` is an index lookup instead of a ``LIKE '%|system|value|%'`` over every row
  (and an Encounter's ``class``, param ``class``). Written in the same transaction as the
  resource (``store.put``);
* ``fhir_date``: an Encounter's period for ``date=`` (range conditions on its two indexes), an
  Observation's or DiagnosticReport's effective time, a Patient's birth date;
* ``fhir_string``: a Patient's names (``name``, ``family``, ``given``), normalised (case and
  accents folded) with one row per suffix, so starts-with, ``:exact`` and ``:contains`` are
  index ranges.

Further token rows (``fhir_token``): codes (``code``, ``category``, ``gender``), and the
references ``_revinclude`` and chains follow (``focus``, ``encounter``, ``based-on``, ``result``)
with the reference as ``value`` and no system.

Stores made before these existed are upgraded on open (``bridge.fhirstore.schema``).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Column, Index, LargeBinary, String
from sqlmodel import Field, SQLModel

from bridge.store.types import UTCDateTime


class FhirResource(SQLModel, table=True):
    __tablename__ = "fhir_resource"
    __table_args__ = (Index("ix_fhir_thread", "thread"),)

    rtype: str = Field(primary_key=True, max_length=40)
    id: str = Field(primary_key=True, max_length=64)
    version: int = 1
    last_updated: datetime = Field(sa_type=UTCDateTime)
    patient: str | None = Field(default=None, max_length=110)  # "Patient/<id>"
    patient_hash: str | None = Field(default=None, max_length=64)
    status: str | None = Field(default=None, max_length=32)
    requester: str | None = Field(default=None, max_length=110)
    performer: str | None = Field(default=None, max_length=110)
    owner: str | None = Field(default=None, max_length=110)
    focus: str | None = Field(default=None, max_length=110)
    identifiers: str | None = None  # "|system|value|system|value|": what fhir_token was made of
    thread: str | None = Field(default=None, max_length=64)
    origin: str | None = Field(default=None, max_length=32)  # member the data came from
    body: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


class FhirToken(SQLModel, table=True):
    """One token of one resource: ``param`` is the search parameter (``identifier``), ``system``
    is '' when the identifier has none. Values longer than ``TOKEN_CHARS`` are cut (both when
    stored and when searched)."""

    __tablename__ = "fhir_token"
    __table_args__ = (
        Index("ix_fhir_token_value", "rtype", "param", "value", "id"),
        Index("ix_fhir_token_system", "rtype", "param", "system", "value", "id"),
        {"sqlite_with_rowid": False},
    )

    rtype: str = Field(primary_key=True, max_length=40)
    id: str = Field(primary_key=True, max_length=64)
    param: str = Field(primary_key=True, max_length=32)
    system: str = Field(primary_key=True, max_length=256)
    value: str = Field(primary_key=True, max_length=256)


class FhirDate(SQLModel, table=True):
    """One date range of one resource for a date search parameter (``param``: ``date`` of an
    Encounter = its period): ``start`` inclusive, ``end`` exclusive, each at the precision the
    resource wrote it; NULL = open on that side (an ongoing visit has no end)."""

    __tablename__ = "fhir_date"
    __table_args__ = (
        Index("ix_fhir_date_start", "rtype", "param", "start", "id"),
        Index("ix_fhir_date_end", "rtype", "param", "end", "id"),
    )

    rtype: str = Field(primary_key=True, max_length=40)
    id: str = Field(primary_key=True, max_length=64)
    param: str = Field(primary_key=True, max_length=32)
    start: datetime | None = Field(default=None, sa_type=UTCDateTime)
    end: datetime | None = Field(default=None, sa_type=UTCDateTime)


#: byte order on PostgreSQL too (a prefix is a range ``[x, next(x))`` under any locale)
_BYTEWISE = String(64).with_variant(String(64, collation="C"), "postgresql")


class FhirString(SQLModel, table=True):
    """One string of one resource for a string search parameter: ``norm`` is the string case-
    and accent-folded and cut to ``STRING_CHARS``; ``pos`` 0 is the whole string (``raw`` the
    original, for ``:exact``), ``pos`` n > 0 its suffix from character n (for ``:contains``)."""

    __tablename__ = "fhir_string"
    __table_args__ = (
        Index("ix_fhir_string_value", "rtype", "param", "norm", "pos", "id"),
        {"sqlite_with_rowid": False},
    )

    rtype: str = Field(primary_key=True, max_length=40)
    id: str = Field(primary_key=True, max_length=64)
    param: str = Field(primary_key=True, max_length=32)
    norm: str = Field(primary_key=True, sa_type=_BYTEWISE)
    pos: int = Field(primary_key=True)
    raw: str = Field(primary_key=True, max_length=256)


class FhirHistory(SQLModel, table=True):
    """Every version of every resource, kept (vread, ``_history``, audit). ``seq`` orders them
    as written; ``ix_fhir_history_type_seq`` serves a type's history newest first."""

    __tablename__ = "fhir_history"
    __table_args__ = (Index("ix_fhir_history_type_seq", "rtype", "seq"),)

    seq: int | None = Field(default=None, primary_key=True)
    # no index on rtype alone: ix_fhir_history_type_seq (rtype, seq) serves every read by type,
    # and a second B-tree per version written cost LIS intake pages (schema.HISTORY_VERSION 2)
    rtype: str = Field(max_length=40)
    id: str = Field(max_length=64, index=True)
    version: int
    at: datetime = Field(sa_type=UTCDateTime)
    body: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


FHIR_RESOURCE = FhirResource.__table__  # type: ignore[attr-defined]
FHIR_TOKEN = FhirToken.__table__  # type: ignore[attr-defined]
FHIR_HISTORY = FhirHistory.__table__  # type: ignore[attr-defined]
FHIR_DATE = FhirDate.__table__  # type: ignore[attr-defined]
FHIR_STRING = FhirString.__table__  # type: ignore[attr-defined]
TOKEN_CHARS = 256
STRING_CHARS = 64

#: page order of the API (newest first, then id), for a type and for a patient's resources
IX_NEWEST = Index(
    "ix_fhir_type_newest",
    FHIR_RESOURCE.c.rtype,
    FHIR_RESOURCE.c.last_updated.desc(),
    FHIR_RESOURCE.c.id,
)
IX_PATIENT_NEWEST = Index(
    "ix_fhir_type_patient_newest",
    FHIR_RESOURCE.c.rtype,
    FHIR_RESOURCE.c.patient,
    FHIR_RESOURCE.c.last_updated.desc(),
    FHIR_RESOURCE.c.id,
)
#: a patient's resources of a type by keyed hash, newest first (``find_patient_by_hash``,
#: ``results_for``, the clinician's imaging list)
IX_PATIENT_HASH = Index(
    "ix_fhir_type_patient_hash",
    FHIR_RESOURCE.c.rtype,
    FHIR_RESOURCE.c.patient_hash,
    FHIR_RESOURCE.c.last_updated.desc(),
    FHIR_RESOURCE.c.id,
)
#: a type's history in write order (``GET /fhir/Type/_history``); made on open for older stores
IX_HISTORY_TYPE_SEQ = next(
    ix for ix in FHIR_HISTORY.indexes if ix.name == "ix_fhir_history_type_seq"
)
#: indexes of earlier versions that the three above replace (dropped on upgrade)
OLD_INDEXES = ("ix_fhir_type_updated", "ix_fhir_type_patient", "ix_fhir_resource_patient_hash")
