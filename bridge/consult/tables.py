"""Consultation state on this side: one row per consultation thread, one row per applied step."""

from __future__ import annotations

from datetime import datetime

from sqlmodel import Field, SQLModel

from bridge.store.types import UTCDateTime


class Consultation(SQLModel, table=True):
    __tablename__ = "consultation"

    thread: str = Field(primary_key=True, max_length=64)  # = the consultation's id everywhere
    side: str = Field(max_length=8)  # inviter | centre
    kind: str = Field(max_length=24)  # general | mdt | imaging-reading
    inviter: str = Field(max_length=32, index=True)
    centre: str = Field(max_length=32, index=True)
    status: str = Field(max_length=16, index=True)  # Task.status
    step: str = Field(max_length=24, index=True)  # Task.businessStatus (consult-step)
    priority: str = Field(default="routine", max_length=8)
    patient_hash: str | None = Field(default=None, max_length=64, index=True)
    patient_match: str | None = Field(default=None, max_length=16)
    #: the centre: the inviter's Patient reference (bridge/referral/naming.py)
    peer_patient: str | None = Field(default=None, max_length=80)
    task_id: str = Field(max_length=64, index=True)
    sr_id: str = Field(max_length=64, index=True)
    appointment_id: str | None = Field(default=None, max_length=64)
    experts: str | None = None  # the experts' PractitionerRole references, space-separated
    scheduled_start: datetime | None = Field(default=None, sa_type=UTCDateTime)
    report_refs: str | None = None  # the report's resources (Type/id), space-separated
    recommends_referral: bool = False
    referral_thread: str | None = Field(default=None, max_length=64)  # the referral made of it
    pending: str | None = Field(default=None, max_length=16)  # "cancel": asked, not answered
    reason: str | None = None  # what is missing, why cancelled
    created_at: datetime = Field(sa_type=UTCDateTime)
    updated_at: datetime = Field(sa_type=UTCDateTime)
    step_at: datetime = Field(sa_type=UTCDateTime)  # when the current step was reached
    released_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    reminded_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    last_seq_in: int = 0


class ConsultationStep(SQLModel, table=True):
    __tablename__ = "consultation_step"

    id: int | None = Field(default=None, primary_key=True)
    thread: str = Field(max_length=64, index=True)
    event: str = Field(max_length=24)
    packet_id: str | None = Field(default=None, max_length=64, unique=True)
    from_step: str = Field(max_length=24)
    to_step: str = Field(max_length=24)
    actor: str | None = Field(default=None, max_length=64)
    at: datetime = Field(sa_type=UTCDateTime)


CONSULTATION = Consultation.__table__  # type: ignore[attr-defined]
CONSULTATION_STEP = ConsultationStep.__table__  # type: ignore[attr-defined]
