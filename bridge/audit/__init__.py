"""Tamper-evident audit log: FHIR R4 AuditEvents in a sha256 hash chain with signed checkpoints.

Callers pass patients only as ``bridge.privacy.patient_hash(...)`` output, never names or IDs.
"""

from .chain import GENESIS_HASH, AuditChain, VerifyResult, canonical, checkpoint_message, link_hash
from .events import AuditEntry, event_fields, to_audit_event
from .export import export, query, unwrap
from .tables import AUDIT_TABLES, AuditCheckpoint, AuditRecord

__all__ = [
    "AUDIT_TABLES",
    "GENESIS_HASH",
    "AuditChain",
    "AuditCheckpoint",
    "AuditEntry",
    "AuditRecord",
    "VerifyResult",
    "canonical",
    "checkpoint_message",
    "event_fields",
    "export",
    "link_hash",
    "query",
    "to_audit_event",
    "unwrap",
]
