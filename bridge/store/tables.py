"""Store tables: one small SQLModel family per persisted thing.

FHIR models are payload, never tables: bodies are kept as the exact JSON bytes that were
validated, so nothing is parsed or serialised twice. Headers outlive bodies (retention purges
bodies only), so "packets by id" stays answerable for the audit period.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Column, Index, LargeBinary, text
from sqlmodel import Field, SQLModel

from bridge.store.types import UTCDateTime

#: the rows of the partial index ``ix_outbox_receipts`` (a query must repeat it literally: a
#: planner takes a partial index only when the query's WHERE shows it holds, which a bound
#: parameter cannot)
RECEIPTS_WHERE = "origin = 'receipt' AND state = 'queued'"
#: the rows of ``ix_outbox_open``: waiting to leave, or dead (what the alerts count)
OPEN_WHERE = "state IN ('queued', 'sent', 'dead')"


class OutboxItem(SQLModel, table=True):
    """A packet waiting to leave, in flight, or done: queued -> sent -> acknowledged | dead.

    origin: ``local`` (we are the sender; body is plaintext, sealed at each attempt so its
    created-at is fresh), ``relay`` (a platform forwarding someone else's sealed frame) or
    ``receipt`` (a platform forwarding an end-to-end receipt back to the original sender).
    """

    __tablename__ = "outbox"
    __table_args__ = (
        Index("ix_outbox_due", "next_hop", "state", "next_try_at"),
        Index("ix_outbox_thread", "thread", "seq"),
        # the receipts a platform has yet to return (bridge/delivery/receipts.py): only those
        # rows, so the job's poll reads a handful of entries whatever the outbox holds
        Index(
            "ix_outbox_receipts",
            "id",
            sqlite_where=text(RECEIPTS_WHERE),
            postgresql_where=text(RECEIPTS_WHERE),
        ),
        # the alerts' facts every 30 s (bridge/alerts.py): per hop the waiting and dead rows,
        # and the last receipt, read from index entries of those rows only; both walked every
        # outbox row before (2.3 s each at 1 M packets)
        Index(
            "ix_outbox_open",
            "next_hop",
            "state",
            "created_at",
            sqlite_where=text(OPEN_WHERE),
            postgresql_where=text(OPEN_WHERE),
        ),
        Index(
            "ix_outbox_hop_acked",
            "next_hop",
            "acked_at",
            sqlite_where=text("acked_at IS NOT NULL"),
            postgresql_where=text("acked_at IS NOT NULL"),
        ),
    )

    id: int | None = Field(default=None, primary_key=True)
    packet_id: str = Field(unique=True, max_length=64)
    origin: str = Field(default="local", max_length=8)
    sender: str = Field(max_length=32)
    recipient: str = Field(max_length=32)
    next_hop: str = Field(max_length=32)
    kind: str = Field(max_length=48)
    thread: str = Field(max_length=64)
    seq: int
    digest: str = Field(max_length=64)
    size: int
    patient_hash: str | None = Field(default=None, max_length=64)
    state: str = Field(default="queued", max_length=16)
    attempts: int = 0
    created_at: datetime = Field(sa_type=UTCDateTime)
    next_try_at: datetime = Field(sa_type=UTCDateTime)
    sent_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    acked_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    last_error: str | None = None
    body: bytes | None = Field(default=None, sa_column=Column(LargeBinary, nullable=True))
    frame: bytes | None = Field(default=None, sa_column=Column(LargeBinary, nullable=True))
    receipt: bytes | None = Field(default=None, sa_column=Column(LargeBinary, nullable=True))


class InboxItem(SQLModel, table=True):
    """A packet that arrived for us: received -> delivered (to the local side) | failed."""

    __tablename__ = "inbox"
    __table_args__ = (
        Index("ix_inbox_pending", "state", "id"),
        # the last packet in from a hop (the alerts' peer-silent rule): the newest entry of
        # the peer's range, where walking the time index back found nothing for a silent peer
        # before the whole inbox was read
        Index("ix_inbox_sender_time", "sender", "received_at"),
        Index(
            "ix_inbox_relay_time",
            "relay",
            "received_at",
            sqlite_where=text("relay IS NOT NULL"),
            postgresql_where=text("relay IS NOT NULL"),
        ),
    )

    id: int | None = Field(default=None, primary_key=True)
    packet_id: str = Field(unique=True, max_length=64)
    sender: str = Field(max_length=32)
    relay: str | None = Field(default=None, max_length=32)
    kind: str = Field(max_length=48)
    thread: str = Field(max_length=64)
    seq: int
    digest: str = Field(max_length=64)
    size: int
    patient_hash: str | None = Field(default=None, max_length=64)
    state: str = Field(default="received", max_length=16)
    attempts: int = 0
    created_at: datetime = Field(sa_type=UTCDateTime)
    received_at: datetime = Field(sa_type=UTCDateTime)
    next_try_at: datetime = Field(sa_type=UTCDateTime)
    delivered_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    last_error: str | None = None
    body: bytes | None = Field(default=None, sa_column=Column(LargeBinary, nullable=True))
    receipt: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


class QuarantineItem(SQLModel, table=True):
    """Every refused input, with its reason and raw bytes, for IT to inspect and replay."""

    __tablename__ = "quarantine"
    __table_args__ = (Index("ix_quarantine_patient", "patient_hash", "at", "id"),)

    id: int | None = Field(default=None, primary_key=True)
    at: datetime = Field(sa_type=UTCDateTime, index=True)
    source: str = Field(max_length=48)
    code: str = Field(max_length=48, index=True)
    message: str
    sender: str | None = Field(default=None, max_length=64)
    recipient: str | None = Field(default=None, max_length=64)
    packet_id: str | None = Field(default=None, max_length=64, index=True)
    kind: str | None = Field(default=None, max_length=48)
    thread: str | None = Field(default=None, max_length=64)
    state: str = Field(default="held", max_length=16)
    replayed_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    replay_result: str | None = None
    raw: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    body: bytes | None = Field(default=None, sa_column=Column(LargeBinary, nullable=True))
    # what was received, when ``raw`` holds only a prefix of it (input refused before its
    # signature verified: ``trusted`` false); the source address of a peer request
    raw_digest: str | None = Field(default=None, max_length=64)
    raw_size: int | None = None
    remote: str | None = Field(default=None, max_length=64)
    trusted: bool = True
    # the keyed hash of the patient the input names (a Patient identifier in its bundle, the
    # national ID an adapter read, or the patient of its known thread), so the message
    # browser's patient search finds it; never the plain ID
    patient_hash: str | None = Field(default=None, max_length=64)


class NodeState(SQLModel, table=True):
    """Small key/value facts a node keeps across restarts (last config hash, watermarks)."""

    __tablename__ = "node_state"

    key: str = Field(primary_key=True, max_length=64)
    value: str
    updated_at: datetime = Field(sa_type=UTCDateTime)


OUTBOX = OutboxItem.__table__  # type: ignore[attr-defined]
INBOX = InboxItem.__table__  # type: ignore[attr-defined]
QUARANTINE = QuarantineItem.__table__  # type: ignore[attr-defined]
NODE_STATE = NodeState.__table__  # type: ignore[attr-defined]


class ThreadParty(SQLModel, table=True):
    """Who may speak to this node on a thread, and the next sequence number due from them.

    A row is made when this node first sends on a thread (the recipient is its party) or when
    a peer opens a new thread with its seq 1 (the sender is). The dispatcher takes a packet
    only from a party and only at ``next_seq``; see ``bridge/delivery/threads.py``.
    """

    __tablename__ = "thread_party"

    thread: str = Field(primary_key=True, max_length=64)
    peer: str = Field(primary_key=True, max_length=32)
    next_seq: int = 1
    opened_by: str = Field(max_length=32)  # this node's id, or the peer's
    at: datetime = Field(sa_type=UTCDateTime)


THREAD_PARTY = ThreadParty.__table__  # type: ignore[attr-defined]
