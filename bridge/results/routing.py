"""Store results taken in from a local system and route them to open referrals, in one go.

Routing rule: a result for a patient (matched by the keyed patient hash) who has an *open*
referral on this node - status ``requested``, ``received``, ``accepted`` or ``in-progress``,
either side - is queued as one ``result.lab`` (or ``result.imaging``) packet to the referral's
other side, on the referral's thread, so the receiver links it to the referral. A corrected
result is routed again and updates the same resources there. Other sharing needs a packet sent
by someone (``POST /local/v1/packets``) and, like every packet, an allowing gateway rule; a
refused route is quarantined and audited by the queue and reported in the answer, while the
results stay stored here (the lab message was still taken in).

Everything - the resources, the raw message, the packets, the audit row and the exactly-once
key with its answer (the stored ACK) - commits in the caller's single transaction.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import Connection, bindparam, insert, select

from bridge.audit.events import AuditEntry
from bridge.context import NodeContext
from bridge.delivery.queue import Outgoing, queue_packets
from bridge.fhirstore import store
from bridge.local import intake
from bridge.referral import naming
from bridge.referral import resources as R
from bridge.referral.tables import REFERRAL
from bridge.results.tables import RESULT_MESSAGE

#: referral statuses under which results follow the patient to the other side
OPEN_STATUSES = ("requested", "received", "accepted", "in-progress")
# constant statements (bound parameters): built once, not per message
_RAW = insert(RESULT_MESSAGE)
_OPEN = (
    select(REFERRAL)
    .where(REFERRAL.c.patient_hash == bindparam("_ph"), REFERRAL.c.status.in_(OPEN_STATUSES))
    .order_by(REFERRAL.c.created_at)
)


def open_referrals(conn: Connection, patient_hash: str) -> list[Any]:
    return list(conn.execute(_OPEN, {"_ph": patient_hash}))


def store_and_route(
    ctx: NodeContext,
    conn: Connection,
    bundle: dict[str, Any],
    *,
    adapter: str,
    source_key: str,
    answer: dict[str, Any],
    patient_hash: str | None,
    raw: bytes | None,
    kind: str,
    at: datetime,
    remembered: bool = False,
    received_at: datetime | None = None,
) -> dict[str, Any]:
    """Store the Bundle's resources, route them, remember ``source_key`` with ``answer``
    (``remembered``: the key was committed before, with ``answer``, when the message was
    staged (:mod:`bridge.results.journal`); its result is completed instead).

    Returns ``answer`` extended with ``routed`` ([{to, thread, packet_id}]) and ``refused``
    ([{to, thread, code, message}]). A Patient already known here by the same hash is kept as it
    is and the results point at it.
    """
    # shallow copies: put_many sets only top-level keys (id, meta) and rewrite_refs builds
    # new objects, so the caller's Bundle is left as it was without copying every Observation
    resources = [dict(e["resource"]) for e in bundle.get("entry") or ()]
    patient = next((r for r in resources if r["resourceType"] == "Patient"), None)
    alias: dict[str, str] = {}
    if patient is not None and patient_hash:
        local = store.find_patient_by_hash(conn, patient_hash)
        if local is not None and local["id"] != patient["id"]:
            alias[R.ref(patient)] = R.ref(local)
            resources = [r for r in resources if r is not patient]
            patient = local
    referrals = open_referrals(conn, patient_hash) if patient_hash else []
    thread = referrals[0].thread if referrals else None
    items = []
    for r in resources:
        r = R.rewrite_refs(r, alias) if alias else r
        personal = r["resourceType"] != "Organization"
        items.append((r, thread if personal else None, patient_hash if personal else None))
    stored = store.put_many(conn, items, at=at, origin=ctx.node_id)
    routed: list[dict[str, Any]] = []
    refused: list[dict[str, Any]] = []
    if referrals and patient is not None:
        results = [_strip_meta(r) for r in stored if r["resourceType"] != "Patient"]
        targets: list[tuple[str, str]] = []
        bodies: list[bytes] = []
        for row in referrals:
            other = row.receiver if row.side == "referrer" else row.referrer
            if (other, row.thread) in targets:
                continue
            targets.append((other, row.thread))
            # one body per thread: each names the patient the way that thread's other side
            # knows her, and nothing another member told this node about her (naming)
            mine = store.get(conn, "Task", row.task_id)["for"]["reference"]
            wire = naming.outgoing(
                naming.of_row(row, mine, opener=row.side == "referrer"),
                results,
                me=ctx.node_id,
                peer=other,
                members=ctx.plan.directory,
                national_id_system=ctx.plan.alliance.national_id_system,
                patient=patient,
            )
            bodies.append(
                orjson.dumps(
                    {
                        "resourceType": "Bundle",
                        "type": "collection",
                        "entry": [{"fullUrl": f"urn:uuid:{r['id']}", "resource": r} for r in wire],
                    }
                )
            )
        queued = queue_packets(
            ctx,
            conn,
            [Outgoing(to, kind, body, th) for (to, th), body in zip(targets, bodies, strict=True)],
            actor=f"adapter:{adapter}",
        )
        for (to, th), q in zip(targets, queued, strict=True):
            if q.error is None:
                routed.append({"to": to, "thread": th, "packet_id": q.packet_id})
            else:
                refused.append(
                    {"to": to, "thread": th, "code": q.error.code, "message": q.error.message}
                )
    reports = [r["id"] for r in stored if r["resourceType"] in ("DiagnosticReport", "ImagingStudy")]
    if raw is not None:
        conn.execute(
            _RAW,
            [
                {
                    "adapter": adapter,
                    "source_key": source_key,
                    "received_at": received_at or at,
                    "patient_hash": patient_hash,
                    "reports": len(reports),
                    "routed": len(routed),
                    "raw": raw,
                }
            ],
        )
    # chained with the transaction's other rows just before its commit: a filing of several
    # messages takes the chain's lock (PostgreSQL) and reads its head once, not per message
    ctx.audit.append_at_commit(
        conn,
        [
            AuditEntry(
                action="results",
                actor=f"adapter:{adapter}",
                kind=kind,
                thread=thread,
                patient_hash=patient_hash,
                at=at,
                message=f"{len(reports)} report(s) stored, routed to {len(routed)} referral side(s)",
                extra={"resources": len(stored), "routed": len(routed), "refused": len(refused)},
            )
        ],
    )
    out = {**answer, "reports": reports, "routed": routed, "refused": refused}
    if remembered:
        intake.amend(conn, adapter, source_key, out, thread=thread)
    else:
        intake.remember(conn, adapter, source_key, out, at, thread=thread)
    return out


def _strip_meta(resource: dict[str, Any]) -> dict[str, Any]:
    """The resource as it leaves: our version/lastUpdated do not travel, tags do."""
    out = dict(resource)
    meta = {
        k: v
        for k, v in (out.pop("meta", None) or {}).items()
        if k not in ("versionId", "lastUpdated")
    }
    if meta:
        out["meta"] = meta
    return out
