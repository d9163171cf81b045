"""What a node offers one adapter: referral steps, exactly-once intake, quarantine, audit, jobs.

One :class:`AdapterHost` per configured adapter; the adapter never reaches into the node's
internals beyond it, so an adapter written against this class runs on any node.
"""

from __future__ import annotations

import copy
import logging
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from bridge.audit.events import AuditEntry
from bridge.errors import HutongError
from bridge.fhirstore import store as fhirstore
from bridge.fhirstore.tables import FHIR_RESOURCE
from bridge.local import encounters, intake
from bridge.privacy import patient_hash as _patient_hash
from bridge.referral.tables import REFERRAL
from bridge.store.quarantine import known_patient, quarantine_row
from bridge.store.tables import QUARANTINE

if TYPE_CHECKING:
    from bridge.config.models import AdapterSettings
    from bridge.node import Node

log = logging.getLogger("hutong.adapters")


class AdapterHost:
    def __init__(self, node: Node, settings: AdapterSettings) -> None:
        self._node = node  # closed: an adapter reaches the node only through these methods
        self._ctx = node.ctx
        self.settings = settings
        self.adapter_name = settings.name
        self.node_id = node.plan.node_id
        self.plan = node.plan
        self._maps: Any = None
        self._jobs: list[tuple[str, Callable[[], Any], float]] = []

    # -- basics -------------------------------------------------------------------------------

    def now(self) -> datetime:
        return self._ctx.now()

    @property
    def state(self) -> Any:
        """This adapter's keyed state in the node's database (:mod:`bridge.local.state`)."""
        from bridge.local.state import AdapterState

        return AdapterState(self._ctx.store, self.adapter_name, self._ctx.now)

    @property
    def data_dir(self) -> Path:
        folder = self.plan.data_dir / "adapters" / self.adapter_name
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def path(self, value: str) -> Path:
        """An option's path, relative to the node file's folder."""
        p = Path(value)
        return p if p.is_absolute() else (self.settings.base_dir / p).resolve()

    @property
    def maps(self) -> Any:
        """The site's code maps (``bridge.mapping.SiteMaps``), loaded once; None if unset."""
        if self._maps is None and self.settings.mappings is not None:
            from bridge.mapping import load_site

            self._maps = load_site(self.settings.mappings)
        return self._maps

    def reload_maps(self) -> None:
        """Re-read the site's mapping folder (before a quarantine replay: IT fixed a CSV).
        A bad file raises here and the maps loaded before stay in use."""
        if self.settings.mappings is not None:
            from bridge.mapping import load_site

            self._maps = load_site(self.settings.mappings)

    # -- source side: local record -> node, exactly once ---------------------------------------

    def submit_referral(
        self, bundle: dict[str, Any], *, source_key: str, actor: str | None = None
    ) -> dict[str, Any]:
        """A new referral (or the return of one received) from a local record."""
        return self._node.workflow.submit(
            bundle, actor or f"adapter:{self.adapter_name}", once=(self.adapter_name, source_key)
        )

    def referral_step(
        self,
        thread: str,
        event: str,
        *,
        source_key: str,
        reason: str | None = None,
        outputs: list[dict[str, Any]] | None = None,
        actor: str | None = None,
    ) -> dict[str, Any]:
        """accept / reject / arrive / cancel taken in the local system."""
        return self._node.workflow.step(
            thread,
            event,
            actor or f"adapter:{self.adapter_name}",
            reason=reason,
            outputs=outputs,
            once=(self.adapter_name, source_key),
        )

    def submit_consultation(
        self, bundle: dict[str, Any], *, source_key: str, actor: str | None = None
    ) -> dict[str, Any]:
        """A new consultation (远程会诊申请) from a local record (bridge/consult)."""
        return self._node.consult.submit(
            bundle, actor or f"adapter:{self.adapter_name}", once=(self.adapter_name, source_key)
        )

    def consultation_step(
        self,
        thread: str,
        event: str,
        *,
        source_key: str,
        reason: str | None = None,
        bundle: dict[str, Any] | None = None,
        actor: str | None = None,
    ) -> dict[str, Any]:
        """A consultation step taken in the local system (resubmit, cancel, follow-up, ...)."""
        return self._node.consult.step(
            thread,
            event,
            actor or f"adapter:{self.adapter_name}",
            reason=reason,
            bundle=bundle,
            once=(self.adapter_name, source_key),
        )

    def seen(self, source_key: str) -> dict[str, Any] | None:
        with self._ctx.store.read() as conn:
            return intake.seen(conn, self.adapter_name, source_key)

    def seen_under(self, prefix: str) -> list[str]:
        """The keys taken in so far that start with ``prefix`` (an adapter whose keys are
        ``<record id>:<content digest>`` finds earlier, different contents of one record)."""
        with self._ctx.store.read() as conn:
            return intake.keys_under(conn, self.adapter_name, prefix)

    def thread_for(self, source_key: str) -> str | None:
        """The referral thread a local record (taken in earlier) started or belongs to."""
        with self._ctx.store.read() as conn:
            return intake.thread_of(conn, self.adapter_name, source_key)

    def send(
        self,
        recipient: str,
        kind: str,
        bundles: list[dict[str, Any]],
        *,
        thread: str | None = None,
        source_key: str | None = None,
        write: Callable[[HostTx], None] | None = None,
    ) -> list[str]:
        """Queue packets (validated, rule-checked, audited like any packet) in ONE transaction
        with ``write(tx)`` (the adapter's own writes, :class:`HostTx`); exactly once by
        ``source_key``.

        Returns the packet ids; a refusal (no rule, too large, invalid FHIR) is quarantined and
        audited by the queue, then raised here after the commit.
        """
        import orjson

        from bridge.delivery.queue import Outgoing, queue_packets

        actor = f"adapter:{self.adapter_name}"
        with self._ctx.store.write() as conn:
            if source_key is not None:
                done = intake.seen(conn, self.adapter_name, source_key)
                if done is not None:
                    return list(done.get("packets") or [])
            results = queue_packets(
                self._ctx,
                conn,
                [Outgoing(recipient, kind, orjson.dumps(b), thread) for b in bundles],
                actor=actor,
            )
            ids = [r.packet_id for r in results if r.packet_id is not None]
            refused = next((r.error for r in results if r.error is not None), None)
            if refused is None:
                if write is not None:
                    write(HostTx(self, conn))
                if source_key is not None:
                    intake.remember(
                        conn,
                        self.adapter_name,
                        source_key,
                        {"packets": ids},
                        self._ctx.now(),
                        thread=thread,
                    )
        if refused is not None:
            raise refused
        self._node.wake_all_senders()
        return ids

    def share_results(
        self,
        bundle: dict[str, Any],
        *,
        source_key: str,
        patient_hash: str | None,
        answer: dict[str, Any] | None = None,
        raw: bytes | None = None,
        kind: str = "result.lab",
        notes: list[dict[str, Any]] | None = None,
        staged: bool = False,
    ) -> dict[str, Any]:
        """Results from a local system (an already validated collection Bundle): stored in the
        node's FHIR store and sent to the other side of every open referral of the patient
        (:mod:`bridge.results.routing`), with ``raw`` and the exactly-once key, in ONE
        transaction. A repeated ``source_key`` returns the first answer (e.g. the stored ACK)
        and changes nothing. ``notes``: extra audit entries (AuditEntry keyword arguments,
        the actor is this adapter) committed with the results, never without them.

        ``staged``: the Bundle, ``raw`` and the key with ``answer`` are committed as one
        results-journal row and the call returns (``answer`` with ``staged: True``); the
        node's ``results-journal`` job stores and routes them moments later, exactly once
        (:mod:`bridge.results.journal`). Over the journal's bound it waits, then raises
        :class:`~bridge.errors.Backlogged` (transient: nothing stored).
        """
        from bridge.results.routing import store_and_route

        if staged:
            return self._stage_results(bundle, source_key, patient_hash, answer, raw, kind, notes)

        def work(conn: Any) -> dict[str, Any]:
            prior = intake.seen(conn, self.adapter_name, source_key)
            if prior is not None:
                return {**prior, "repeated": True}
            out = store_and_route(
                self._ctx,
                conn,
                bundle,
                adapter=self.adapter_name,
                source_key=source_key,
                answer=answer or {},
                patient_hash=patient_hash,
                raw=raw,
                kind=kind,
                at=self._ctx.now(),
            )
            if notes:
                self._ctx.audit.append(
                    conn,
                    [
                        AuditEntry(
                            **{"kind": kind, **n},
                            at=self._ctx.now(),
                            actor=f"adapter:{self.adapter_name}",
                        )
                        for n in notes
                    ],
                )
            return out

        # several connections' messages may share one commit (Store.write_grouped); each
        # returns only once its own rows are durable
        out = self._ctx.store.write_grouped(work)
        if out.get("repeated"):
            return out
        if out["routed"]:
            self._node.wake_all_senders()
        return out

    def _stage_results(
        self,
        bundle: dict[str, Any],
        source_key: str,
        patient_hash: str | None,
        answer: dict[str, Any] | None,
        raw: bytes | None,
        kind: str,
        notes: list[dict[str, Any]] | None,
    ) -> dict[str, Any]:
        journal = self._node.journal
        journal.admit()
        actor = f"adapter:{self.adapter_name}"

        def work(conn: Any) -> dict[str, Any]:
            prior = intake.seen(conn, self.adapter_name, source_key)
            if prior is not None:
                return {**prior, "repeated": True}
            at = self._ctx.now()
            return journal.stage(
                conn,
                adapter=self.adapter_name,
                source_key=source_key,
                bundle=bundle,
                patient_hash=patient_hash,
                answer=answer or {},
                raw=raw,
                kind=kind,
                notes=[AuditEntry(**{"kind": kind, **n}, at=at, actor=actor) for n in notes or ()],
                at=at,
            )

        out = self._ctx.store.write_grouped(work)
        if not out.get("repeated"):
            journal.staged()
        return out

    def requeue_staged(self, source_key: str) -> bool:
        """A staged message whose expansion failed back in the journal's queue (IT replayed
        its quarantine item); False if it has no failed journal row."""
        return bool(self._node.journal.requeue(self.adapter_name, source_key))

    def record_encounter(
        self,
        build: Callable[[dict[str, Any] | None], dict[str, Any]] | None,
        *,
        source_key: str,
        visit: tuple[str, str] | None = None,
        patient: dict[str, Any] | None = None,
        referral_thread: str | None = None,
        kind: str | None = None,
        answer: dict[str, Any] | None = None,
        without_visit: str = "new",
        must_exist: bool = False,
    ) -> dict[str, Any]:
        """A visit event from the local system: its Patient and Encounter stored or updated in
        the node's FHIR store, in ONE transaction with the exactly-once intake key; audited.

        Contract (every HIS style uses it the same way):

        * ``source_key``: the local record; a repeated key changes nothing and returns the
          first answer with ``repeated: True``.
        * ``visit`` = (system, value): the HIS's visit number (e.g.
          ``bridge.local.encounters.VISIT_SYSTEM``); the Encounter already stored under it is
          the one updated; ``visit=None`` (the record has no visit number): a new Encounter
          (``without_visit="new"``) or the patient's one open Encounter from this node
          (``"open"``; none or several -> :class:`~bridge.errors.UnknownReference`).
          ``must_exist``: an unknown visit is refused (a cancel of a visit never seen). A visit
          number that names another patient's Encounter: :class:`~bridge.errors.VisitConflict`.
          ``build(current)`` gets that Encounter (None if new) and returns
          the Encounter after the event (``bridge.local.encounters.apply``); the host sets
          ``id`` (kept), ``subject`` and, when linked, ``basedOn``. ``build=None``: Patient only.
        * ``patient``: an R4 Patient as the HIS describes it now (MRN under
          ``urn:hutong:mrn:<member>``, the national ID number under the alliance's system,
          kept in clear in this node's store as the referral workflow keeps it, and hashed
          for the ``patient_hash`` column and the audit). Matched by MRN, else by keyed hash,
          else the linked referral's patient; else created. Given fields replace stored ones,
          identifiers are merged by system.
        * ``referral_thread``: only when the local record says which referral this visit is
          (an option naming the field: never guessed). It must be a referral received here
          (else :class:`~bridge.errors.UnknownReference`, nothing stored). If it is open: an
          ``arrived`` / ``in-progress`` Encounter of an accepted referral takes the "arrive"
          step (sent to the referrer in the same transaction), and the Task gets
          ``encounter`` and the ServiceRequest a ``supportingInfo`` reference to it; a closed
          referral (rejected, cancelled, completed) is left as it is.
        * Invalid R4 -> :class:`~bridge.errors.InvalidResource`, nothing stored.

        Returns ``{"encounter", "patient", "status", "created", "referral", "arrived"}`` plus
        ``answer`` (e.g. the ACK to give a re-send).
        """
        from bridge.errors import InvalidResource, UnknownReference, VisitConflict
        from bridge.fhir.validate import errors as fhir_errors
        from bridge.privacy import patient_hash

        now = self._ctx.now()
        actor = f"adapter:{self.adapter_name}"
        system = self.plan.alliance.national_id_system
        woke = False
        with self._ctx.store.write() as conn:
            prior = intake.seen(conn, self.adapter_name, source_key)
            if prior is not None:
                return {**prior, "repeated": True}
            row = None
            if referral_thread:
                row = conn.execute(
                    select(REFERRAL).where(REFERRAL.c.thread == referral_thread)
                ).first()
                if row is None or row.side != "receiver":
                    raise UnknownReference("no referral received here with that id")
            current = (
                fhirstore.find_by_identifier(conn, "Encounter", *visit)
                if visit and build is not None
                else None
            )
            # -- the patient
            phash = None
            stored_patient = None
            if patient is not None:
                nid = next(
                    (
                        i.get("value")
                        for i in patient.get("identifier") or []
                        if i.get("system") == system and i.get("value")
                    ),
                    None,
                )
                phash = patient_hash(self.plan.patient_hash_key, nid) if nid else None
                for ident in patient.get("identifier") or []:
                    if str(ident.get("system", "")).startswith("urn:hutong:mrn:") and ident.get(
                        "value"
                    ):
                        stored_patient = fhirstore.find_by_identifier(
                            conn, "Patient", ident["system"], ident["value"]
                        )
                        if stored_patient is not None:
                            break
                if stored_patient is None and phash:
                    stored_patient = fhirstore.find_patient_by_hash(conn, phash)
            if stored_patient is None and patient is None and current is not None:
                ref = (current.get("subject") or {}).get("reference", "")
                if ref.startswith("Patient/"):
                    stored_patient = fhirstore.get(conn, "Patient", ref.split("/", 1)[1])
            if stored_patient is None and row is not None:
                task = fhirstore.get(conn, "Task", row.task_id)
                ref = (task.get("for") or {}).get("reference", "")
                if ref.startswith("Patient/") and fhirstore.exists(
                    conn, "Patient", ref.split("/", 1)[1]
                ):
                    stored_patient = fhirstore.get(conn, "Patient", ref.split("/", 1)[1])
            if patient is None and stored_patient is None:
                raise InvalidResource("a new Encounter needs its Patient")
            merged = _merge_patient(stored_patient, patient)
            problems = fhir_errors(merged, limit=3)
            if problems:
                raise InvalidResource(f"Patient is not valid FHIR R4: {'; '.join(problems)}")
            if phash is None and stored_patient is not None:
                phash = (
                    fhirstore.get_row(conn, "Patient", stored_patient["id"]).patient_hash
                    if "id" in stored_patient
                    else None
                )
            if patient is not None:
                fhirstore.put(conn, merged, at=now, origin=self.node_id, patient_hash=phash)
            pref = f"Patient/{merged['id']}"
            if build is not None and visit is None and without_visit == "open":
                rows = conn.execute(
                    select(FHIR_RESOURCE.c.id)
                    .where(
                        FHIR_RESOURCE.c.rtype == "Encounter",
                        FHIR_RESOURCE.c.patient == pref,
                        FHIR_RESOURCE.c.status.in_(encounters.OPEN),
                        FHIR_RESOURCE.c.origin == self.node_id,
                    )
                    .limit(2)
                ).all()
                if len(rows) != 1:
                    raise UnknownReference(
                        f"no visit number, and the patient has "
                        f"{'no' if not rows else 'several'} open visits here"
                    )
                current = fhirstore.get(conn, "Encounter", rows[0].id)
            if current is not None and (current.get("subject") or {}).get("reference") not in (
                None,
                pref,
            ):
                raise VisitConflict(
                    "the visit number already names a visit of another patient here"
                )
            if build is not None and current is None and must_exist:
                raise UnknownReference("no visit known here with that visit number")
            # -- the encounter
            enc = None
            if build is not None:
                enc = build(copy.deepcopy(current) if current else None)
                enc["resourceType"] = "Encounter"
                if current is not None:
                    enc["id"] = current["id"]
                enc["subject"] = {"reference": pref}
                if row is not None:
                    based = {"reference": f"ServiceRequest/{row.sr_id}"}
                    if based not in (enc.get("basedOn") or []):
                        enc.setdefault("basedOn", []).append(based)
                enc.setdefault("id", str(uuid.uuid4()))
                problems = fhir_errors(enc, limit=3)
                if problems:
                    raise InvalidResource(f"Encounter is not valid FHIR R4: {'; '.join(problems)}")
                fhirstore.put(conn, enc, at=now, origin=self.node_id, patient_hash=phash)
            # -- the referral it belongs to (only when the record said so)
            arrived = False
            if (
                row is not None
                and enc is not None
                and row.status not in ("rejected", "cancelled", "completed")
            ):
                if row.status == "accepted" and enc.get("status") in ("arrived", "in-progress"):
                    self._node.workflow.step_in(conn, row.thread, "arrive", actor)
                    arrived = woke = True
                eref = {"reference": f"Encounter/{enc['id']}"}
                task = fhirstore.get(conn, "Task", row.task_id)
                if task.get("encounter") != eref:
                    task["encounter"] = eref
                    fhirstore.put(
                        conn,
                        task,
                        at=now,
                        thread=row.thread,
                        origin=self.node_id,
                        patient_hash=row.patient_hash,
                    )
                sr = fhirstore.get(conn, "ServiceRequest", row.sr_id)
                if eref not in (sr.get("supportingInfo") or []):
                    sr.setdefault("supportingInfo", []).append(eref)
                    fhirstore.put(
                        conn, sr, at=now, thread=row.thread, patient_hash=row.patient_hash
                    )
            result = {
                "encounter": enc["id"] if enc else None,
                "patient": merged["id"],
                "status": enc.get("status") if enc else None,
                "created": enc is not None and current is None,
                "referral": row.thread if row is not None else None,
                "arrived": arrived,
                **(answer or {}),
            }
            intake.remember(
                conn,
                self.adapter_name,
                source_key,
                result,
                now,
                thread=row.thread if row is not None else None,
            )
            what = (
                f"Encounter/{enc['id']} {'created' if current is None else 'updated'} "
                f"({enc.get('status')})"
                if enc
                else f"Patient/{merged['id']} updated"
            )
            self._ctx.audit.append(
                conn,
                [
                    AuditEntry(
                        action="encounter",
                        message=what,
                        kind=kind,
                        at=now,
                        actor=actor,
                        patient_hash=phash,
                        thread=row.thread if row is not None else None,
                    )
                ],
            )
        if woke:
            self._node.wake_all_senders()
        return result

    # -- sink side: what the node knows of a referral -----------------------------------------

    def referral(self, thread: str) -> dict[str, Any] | None:
        """This side's referral row and every FHIR resource of the thread, or None."""
        from bridge.referral.workflow import thread_view

        with self._ctx.store.read() as conn:
            return thread_view(conn, thread)

    def consultation(self, thread: str) -> dict[str, Any] | None:
        """This side's consultation row, its steps and every FHIR resource of the thread, or
        None (``bridge/consult``)."""
        return self._node.consult.view(thread)

    def resource(self, rtype: str, rid: str) -> dict[str, Any]:
        with self._ctx.store.read() as conn:
            return fhirstore.get(conn, rtype, rid)

    # -- codes the site's maps do not know ------------------------------------------------------

    def record_gap(
        self, map_id: str | None, coding: dict[str, Any], *, site: str | None = None
    ) -> None:
        """Count one unmapped local code for IT (the mapping-gaps page): codes and code names
        only, never patient data. ``site``: default the site of the adapter's maps."""
        from bridge.mapping import record_gap

        where = site or (self.maps.site if self.maps is not None else self.node_id)
        record_gap(self._ctx.store, where, map_id, coding, at=self.now())

    def record_gaps(self, gaps: Any) -> None:
        """The gaps (``bridge.mapping.Observed``) met while converting one record."""
        from bridge.mapping import record_gap

        at = self.now()
        for g in gaps:
            record_gap(
                self._ctx.store,
                g.site,
                g.map,
                {"system": g.system, "code": g.code, "display": g.display},
                at=at,
            )

    # -- the node's FHIR store, as an adapter may use it ---------------------------------------

    def find(
        self,
        rtype: str,
        *,
        identifier: tuple[str, str] | None = None,
        patient_hash: str | None = None,
    ) -> dict[str, Any] | None:
        """The stored resource with this identifier (system, value), or the Patient with this
        keyed hash; None if there is none."""
        with self._ctx.store.read() as conn:
            if identifier is not None:
                return fhirstore.find_by_identifier(conn, rtype, *identifier)
            if patient_hash is not None and rtype == "Patient":
                return fhirstore.find_patient_by_hash(conn, patient_hash)
        return None

    def resource_info(self, rtype: str, rid: str) -> dict[str, Any] | None:
        """What the store keeps beside a resource (``patient_hash``, ``origin``, ``thread``),
        or None if it is not stored."""
        from bridge.errors import NotFound

        with self._ctx.store.read() as conn:
            try:
                row = fhirstore.get_row(conn, rtype, rid)
            except NotFound:
                return None
        return {"patient_hash": row.patient_hash, "origin": row.origin, "thread": row.thread}

    def own_resources(self, rtype: str) -> list[dict[str, Any]]:
        """Every stored resource of ``rtype`` this node made (not received from a peer)."""
        import orjson

        with self._ctx.store.read() as conn:
            rows = conn.execute(
                select(FHIR_RESOURCE.c.body).where(
                    FHIR_RESOURCE.c.rtype == rtype, FHIR_RESOURCE.c.origin == self.node_id
                )
            ).all()
        return [orjson.loads(r.body) for r in rows]

    def transaction(self) -> Any:
        """A :class:`HostTx`: resources, audit entries and intake keys in ONE transaction."""
        from contextlib import contextmanager

        @contextmanager
        def tx() -> Any:
            with self._ctx.store.write() as conn:
                yield HostTx(self, conn)

        return tx()

    # -- bad local data -----------------------------------------------------------------------

    def quarantine(
        self,
        error: HutongError,
        *,
        raw: bytes,
        record: str | None = None,
        field: str | None = None,
        kind: str | None = None,
        thread: str | None = None,
        national_id: str | None = None,
        patient_hash: str | None = None,
    ) -> int:
        """Keep a local record we cannot take, with a reason naming record and field; audited.

        ``national_id``: the patient's ID number as the adapter read it from the record, if
        it could; only its keyed hash is kept (on the item and the audit row), so the message
        browser's patient search finds the item. Without it, ``patient_hash``: the keyed hash
        the adapter already holds for the record's patient (e.g. of the study a report is
        on); without either, the patient of a known ``thread``. Returns the quarantine id
        (shown to IT, replayable through ``hutong quarantine``).
        """
        where = " ".join(
            p
            for p in (f"record {record}" if record else "", f"field {field}" if field else "")
            if p
        )
        if where and where not in error.message:
            error.message = f"{where}: {error.message}"
        now = self._ctx.now()
        source = f"adapter:{self.adapter_name}"
        phash = (
            _patient_hash(self.plan.patient_hash_key, national_id)
            if national_id and national_id.strip()
            else patient_hash
        )
        with self._ctx.store.write() as conn:
            if phash is None and thread:
                phash = known_patient(conn, thread=thread)
            inserted = conn.execute(
                QUARANTINE.insert().values(
                    **quarantine_row(
                        now,
                        source,
                        error,
                        raw=raw,
                        sender=self.adapter_name,
                        kind=kind,
                        thread=thread,
                        patient_hash=phash,
                    )
                )
            ).inserted_primary_key
            assert inserted is not None
            qid = inserted[0]
            self._ctx.audit.append(
                conn,
                [
                    AuditEntry(
                        action="quarantined",
                        outcome="4",
                        kind=kind,
                        thread=thread,
                        at=now,
                        patient_hash=phash,
                        actor=source,
                        code=error.code,
                        message=error.message,
                        extra={"quarantine_id": int(qid)},
                    )
                ],
            )
        log.warning("%s quarantined a local record (%s, quarantine id %s)", source, error.code, qid)
        return int(qid)

    def audit(
        self,
        action: str,
        *,
        outcome: str = "0",
        message: str | None = None,
        thread: str | None = None,
        patient_hash: str | None = None,
        kind: str | None = None,
        code: str | None = None,
    ) -> None:
        with self._ctx.store.write() as conn:
            self._ctx.audit.append(
                conn,
                [
                    AuditEntry(
                        action=action,
                        outcome=outcome,
                        message=message,
                        thread=thread,
                        patient_hash=patient_hash,
                        kind=kind,
                        code=code,
                        at=self._ctx.now(),
                        actor=f"adapter:{self.adapter_name}",
                    )
                ],
            )

    # -- jobs ---------------------------------------------------------------------------------

    def every(self, seconds: float, func: Callable[[], Any], job_id: str = "poll") -> None:
        """Run ``func`` every ``seconds`` in the node's scheduler (one at a time); an exception
        is logged (without patient data) and the job keeps its schedule."""
        name = f"adapter:{self.adapter_name}:{job_id}"

        def run() -> None:
            pauses = getattr(self._node, "pauses", None)
            if pauses is not None and pauses.has(f"adapter:{self.adapter_name}"):
                return  # paused by IT on the dashboard
            try:
                func()
            except Exception as exc:  # noqa: BLE001 - a job must survive a bad round
                log.error("%s failed: %s", name, type(exc).__name__)

        self._node.add_job(name, run, seconds)


class HostTx:
    """One write transaction of the node's store, as an adapter may use it (from
    ``host.transaction()`` or a ``host.send(write=...)`` callback)."""

    def __init__(self, host: AdapterHost, conn: Any) -> None:
        self._host = host
        self._conn = conn
        self.now = host.now()

    def put(
        self,
        resource: dict[str, Any],
        *,
        patient_hash: str | None = None,
        thread: str | None = None,
    ) -> None:
        """Store one resource of this node's own (validated before: ``validate_resource``)."""
        fhirstore.put(
            self._conn,
            resource,
            at=self.now,
            origin=self._host.node_id,
            patient_hash=patient_hash,
            thread=thread,
        )

    def put_foreign(
        self, resource: dict[str, Any], *, sender: str, thread: str, patient_hash: str | None = None
    ) -> None:
        """Store a resource a peer sent on ``thread``: refused if its id names a resource
        that is not that peer's (``bridge.referral.workflow.foreign_resource``)."""
        from bridge.referral.workflow import foreign_resource

        foreign_resource(self._conn, resource, thread, sender)
        fhirstore.put(self._conn, resource, at=self.now, origin=sender, patient_hash=patient_hash)

    def audit(self, action: str, *, actor: str | None = None, **fields: Any) -> None:
        """One audit entry (AuditEntry fields; the actor defaults to this adapter)."""
        self._host._ctx.audit.append(
            self._conn,
            [
                AuditEntry(
                    action=action,
                    at=self.now,
                    actor=actor or f"adapter:{self._host.adapter_name}",
                    **fields,
                )
            ],
        )

    def remember(
        self, source_key: str, result: dict[str, Any], *, thread: str | None = None
    ) -> None:
        """The exactly-once intake key of a record, with this transaction's effect."""
        intake.remember(
            self._conn, self._host.adapter_name, source_key, result, self.now, thread=thread
        )


def _merge_patient(stored: dict[str, Any] | None, given: dict[str, Any] | None) -> dict[str, Any]:
    """The stored Patient with what the local system said now: fields it gives replace the
    stored ones; identifiers are merged by system (a new value replaces the old of its system)."""
    out: dict[str, Any] = (
        copy.deepcopy(stored) if stored else {"resourceType": "Patient", "id": str(uuid.uuid4())}
    )
    out.pop("meta", None)
    for key, value in (given or {}).items():
        if key in ("resourceType", "id", "meta", "identifier"):
            continue
        if value not in (None, "", [], {}):
            out[key] = copy.deepcopy(value)
    idents = list(out.get("identifier") or [])
    for ident in (given or {}).get("identifier") or []:
        same = [i for i, old in enumerate(idents) if old.get("system") == ident.get("system")]
        if same:
            idents[same[0]] = copy.deepcopy(ident)
        else:
            idents.append(copy.deepcopy(ident))
    if idents:
        out["identifier"] = idents
    return out
