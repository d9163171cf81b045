"""Referral state on this side: one row per referral thread, one row per applied step."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Connection, inspect, text
from sqlmodel import Field, SQLModel

from bridge.store.types import UTCDateTime


class Referral(SQLModel, table=True):
    __tablename__ = "referral"

    thread: str = Field(primary_key=True, max_length=64)  # = the referral's id everywhere
    side: str = Field(max_length=8)  # referrer | receiver
    kind: str = Field(max_length=24)
    referrer: str = Field(max_length=32, index=True)
    receiver: str = Field(max_length=32, index=True)
    status: str = Field(max_length=16, index=True)
    step: str = Field(max_length=24)
    green_channel: bool = False
    pilot: str | None = Field(default=None, max_length=24)
    patient_hash: str | None = Field(default=None, max_length=64, index=True)
    patient_match: str | None = Field(default=None, max_length=16)  # matched|registered|manual
    #: the receiver: the referrer's Patient reference, how packets to it name the patient
    #: (bridge/referral/naming.py); None on the referrer's side and on older rows
    peer_patient: str | None = Field(default=None, max_length=80)
    task_id: str = Field(max_length=64)
    sr_id: str = Field(max_length=64)
    based_on: str | None = Field(default=None, max_length=64)  # thread this one returns
    reason: str | None = None
    created_at: datetime = Field(sa_type=UTCDateTime)
    updated_at: datetime = Field(sa_type=UTCDateTime)
    accepted_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    completed_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    reminded_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    last_seq_in: int = 0


class ReferralStep(SQLModel, table=True):
    __tablename__ = "referral_step"

    id: int | None = Field(default=None, primary_key=True)
    thread: str = Field(max_length=64, index=True)
    event: str = Field(max_length=24)
    packet_id: str | None = Field(default=None, max_length=64, unique=True)
    from_status: str = Field(max_length=16)
    to_status: str = Field(max_length=16)
    actor: str | None = Field(default=None, max_length=64)
    at: datetime = Field(sa_type=UTCDateTime)


REFERRAL = Referral.__table__  # type: ignore[attr-defined]
REFERRAL_STEP = ReferralStep.__table__  # type: ignore[attr-defined]


def upgrade_schema(conn: Connection) -> None:
    """Stores made before ``peer_patient`` get the column on the referral and consultation
    tables (once, on open); their threads name the patient by the hash only."""
    found = inspect(conn)
    for table in ("referral", "consultation"):
        if not found.has_table(table):
            continue
        if "peer_patient" not in {c["name"] for c in found.get_columns(table)}:
            conn.execute(text(f"ALTER TABLE {table} ADD COLUMN peer_patient VARCHAR(80)"))
