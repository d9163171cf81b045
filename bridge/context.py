"""What every part of a running node shares: its plan, store, audit chain, keys and clock."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from bridge.audit.anchor import ANCHOR_NAME, AnchorFile
from bridge.audit.chain import AuditChain
from bridge.config.models import NodePlan
from bridge.crypto.keys import load_encryption_key, load_signing_key
from bridge.store.db import Store


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class NodeContext:
    plan: NodePlan
    store: Store
    audit: AuditChain
    signing_key: Ed25519PrivateKey
    encryption_keys: tuple[X25519PrivateKey, ...]
    now: Callable[[], datetime] = field(default=utcnow)

    @classmethod
    def open(cls, plan: NodePlan, *, create: bool = True) -> NodeContext:
        signing = load_signing_key(plan.keys.signing, plan.keys.passphrase)
        encryption = load_encryption_key(plan.keys.encryption, plan.keys.passphrase)
        store = Store(plan.storage_dsn)
        if create:
            store.create_all()
        audit = AuditChain(
            plan.node_id,
            signing,
            checkpoint_every=plan.audit.checkpoint_every,
            anchor_file=AnchorFile(plan.data_dir / ANCHOR_NAME),
        )
        return cls(plan, store, audit, signing, (encryption,))

    @property
    def node_id(self) -> str:
        return self.plan.node_id
