"""Results that arrive from another member: into the local FHIR store, linked to the referral.

Runs as the dispatcher hook for ``result.*`` kinds, before the packet is handed to the local
handler (the HIS adapter, or the spool), so by the time the HIS gets the Bundle the results are
also readable through the local FHIR API. Idempotent by packet id. The sender's Patient is
replaced by this side's own record of the patient: the referral's patient when the packet is on
a referral thread known here, else the patient with the same keyed hash (every Patient
reference and hash-only subject mapped to it, bridge/referral/naming.py), else the sender's
Patient is registered (with the hash, never an ID number: none travels).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import insert, select

from bridge.audit.events import AuditEntry
from bridge.context import NodeContext
from bridge.delivery.handlers import Delivery
from bridge.errors import InvalidResource, NotFound, NotThreadParty
from bridge.fhirstore import store
from bridge.local.contract import ResultEvent, decode_bundle
from bridge.referral import naming
from bridge.referral import resources as R
from bridge.referral.tables import REFERRAL
from bridge.referral.workflow import foreign_resource, thread_view
from bridge.results.tables import RESULT_PACKET


class ResultsInbox:
    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx

    def apply_packet(self, item: Delivery) -> ResultEvent:
        """Store one result packet (dispatcher hook, idempotent by packet id); the event as
        stored, for the local sink (bridge.local.contract): this node's patient and referral."""
        bundle = decode_bundle(item)  # decoded once, for the hook and the sink alike
        self._apply(item, bundle)
        with self.ctx.store.read() as conn:
            view = thread_view(conn, item.thread)
            mine: str | None = None
            if view is not None:
                mine = store.get(conn, "Task", view["referral"]["task_id"])["for"]["reference"]
            elif item.patient_hash:
                local = store.find_patient_by_hash(conn, item.patient_hash)
                mine = R.ref(local) if local else None
        return ResultEvent(item, bundle, mine, view)

    def _apply(self, item: Delivery, bundle: dict[str, Any]) -> None:
        resources = [e.get("resource") or {} for e in bundle.get("entry") or ()]
        if not any(
            r.get("resourceType") in ("DiagnosticReport", "Observation", "ImagingStudy")
            for r in resources
        ):
            raise InvalidResource(
                "a result packet needs a DiagnosticReport, Observation or ImagingStudy"
            )
        now = self.ctx.now()
        with self.ctx.store.write() as conn:
            if conn.execute(
                select(RESULT_PACKET.c.packet_id).where(RESULT_PACKET.c.packet_id == item.packet_id)
            ).first():
                return
            row = conn.execute(select(REFERRAL).where(REFERRAL.c.thread == item.thread)).first()
            if row is not None and item.sender != (
                row.receiver if row.side == "referrer" else row.referrer
            ):
                # the dispatcher's gate refuses these first; kept as a guard
                raise NotThreadParty(
                    f"result on referral thread {row.thread} from "
                    f"'{item.sender}', which is not a party of that referral"
                )
            phash = row.patient_hash if row is not None else item.patient_hash
            mine: str | None = None
            if row is not None:
                mine = store.get(conn, "Task", row.task_id)["for"]["reference"]
            elif phash:
                local = store.find_patient_by_hash(conn, phash)
                mine = R.ref(local) if local else None
            if mine:  # named our way; our own record of the patient stays as it is (naming)
                resources = naming.incoming(mine, phash, resources)
            thread = row.thread if row is not None else None
            items: list[tuple[dict[str, Any], str | None, str | None]] = []
            for r in resources:
                if r.get("resourceType") == "Organization":
                    if _others(conn, r, item.sender):
                        continue  # another member's (or our own) record of an organisation
                    items.append((r, None, None))
                else:
                    foreign_resource(conn, r, item.thread, item.sender)
                    items.append((r, thread, phash))
            # one statement per table for the packet's resources (bench/README.md, lis.py)
            store.put_many(conn, items, at=now, origin=item.sender)
            count = len(items)
            conn.execute(
                insert(RESULT_PACKET).values(
                    packet_id=item.packet_id,
                    sender=item.sender,
                    kind=item.kind,
                    thread=thread,
                    patient_hash=phash,
                    resources=count,
                    at=now,
                )
            )
            self.ctx.audit.append(
                conn,
                [
                    AuditEntry(
                        action="results",
                        packet_id=item.packet_id,
                        kind=item.kind,
                        peer=item.sender,
                        thread=item.thread,
                        patient_hash=phash,
                        at=now,
                        message=f"{count} result resource(s) stored"
                        + ("" if row is not None else " (no referral known for the thread)"),
                        extra={"linked": row is not None},
                    )
                ],
            )


def _others(conn: Any, resource: dict[str, Any], sender: str) -> bool:
    """Is there a record of this resource here that ``sender`` did not make?"""
    try:
        return bool(
            store.get_row(conn, resource["resourceType"], str(resource.get("id"))).origin != sender
        )
    except NotFound:
        return False
