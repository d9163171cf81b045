"""The PACS adapter: a DICOM peer on the hospital LAN and the imaging side of the node.

* **Store SCP.** Modalities or the vendor PACS C-STORE studies to us. Each instance is written
  to ``<data_dir>/studies/<study>/<series>/<sop>.dcm`` exactly as received (``encoded_dataset``:
  the peer's data set bytes, never decoded and re-encoded, behind the File Meta Information
  pynetdicom derives from the presentation context), fsynced, and only then answered with
  Success. A study is *complete* when an association that stored into it ends (released or
  aborted), or when no instance arrived for ``complete_after_s`` while an association stays
  open; completing builds the ImagingStudy from every stored header (a later association
  adding instances gives a new version, never a second study). Files found at start without
  an up-to-date ImagingStudy are completed then, so an ack given before a crash is not lost.
* **Query.** C-FIND (Study Root, study and series level) against the vendor PACS by patient ID
  and/or date: each answer becomes an ImagingStudy (counts from the PACS) in the node store.
* **Reports.** A DICOM SR stored with the study, or an HL7 v2 ORU^R01 text report, becomes a
  DiagnosticReport referring to the ImagingStudy, with the conclusion. A RIS (ORU) report for a
  patient with an open referral goes, with its Patient and ImagingStudy, to the referral's other
  side as ``result.imaging`` (``host.share_results``: stored and queued in one transaction; an
  identical re-sent message changes nothing). SR reports stay on the node for now.
* **Reports from another member** (remote imaging reading, 远程影像诊断:
  :class:`~bridge.local.contract.ImagingReportSink`). A centre's radiologist reports on a
  study this PACS holds: the DiagnosticReport is stored in the node's FHIR store (the
  radiologist's member as its origin) referring to our ImagingStudy and its patient, and
  listed with the study's own reports (:meth:`PacsAdapter.reports_for`, ``GET
  .../studies/{study_uid}/reports``). Not done yet: writing it back into the vendor PACS
  (a DICOM SR or encapsulated PDF C-STOREd into the study, or an ORU to the RIS); the report
  stays on the node.
* **On-demand fetch** (:mod:`adapters.pacs.fetch`). Images stay in the producing PACS. A member
  asks for a study with ``imaging.fetch-request``; we answer from our files, or first C-GET the
  study from the vendor PACS, with ``imaging.fetch-response`` packets carrying the files
  unchanged. The asking side checks each file's size and SHA-1, writes it to
  ``<data_dir>/fetched/...`` and serves the study as a zip on the local API.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from pydicom.dataset import Dataset
from pydicom.uid import UID

from adapters.base import BaseAdapter
from adapters.pacs import dimse, fetch
from adapters.pacs.errors import DicomRejected, FetchFailed, PacsFailed, ReportRejected
from adapters.pacs.files import InstanceStore, check_structure, check_uid, path_uid, read_header
from adapters.pacs.options import PacsOptions
from adapters.pacs.report import OruReport, parse_oru, report_from_oru, report_from_sr
from adapters.pacs.study import (
    imaging_study,
    imaging_study_from_find,
    patient_info,
    patient_resource,
    study_resource_id,
    text,
)
from bridge.errors import ConfigError, HutongError, InvalidFhir, NotFound, Retry, UnsafePath
from bridge.fhir.validate import validate_resource
from bridge.privacy import patient_hash

if TYPE_CHECKING:
    from bridge.local.contract import Delivery, ImagingReportEvent, PacketEvent
    from bridge.local.host import AdapterHost

log = logging.getLogger("hutong.adapters.pacs")

SUCCESS, OUT_OF_RESOURCES, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xC000
#: adapter state: ImagingStudy id -> the ids of reports other members wrote on it
ATTACHED = "attached_reports"
#: adapter state: ImagingStudy id -> the members this PACS served the study to (a fetch)
SERVED = "served_studies"
#: of a data set refused for its size, quarantine keeps this much (the header is at the start)
KEEP_OF_OVERSIZE = 1 << 20


class PacsAdapter(BaseAdapter):
    def __init__(self, host: AdapterHost, opts: PacsOptions) -> None:
        super().__init__(host, opts)
        self.opts = opts
        self.pacs_id_system = (
            self.opts.patient_id_system or f"urn:hutong:{host.node_id}:pacs-patient-id"
        )
        self.accession_system = self.opts.accession_system or f"urn:hutong:{host.node_id}:accession"
        self.instances = InstanceStore(host.data_dir / "studies")
        self.fetched = InstanceStore(host.data_dir / "fetched")
        self.listener = dimse.StoreListener(
            self.opts, self._on_store, self._complete_all, on_cut=self._on_cut
        )
        self._pending: dict[str, float] = {}  # study UID -> monotonic time of its last instance
        self._lock = threading.Lock()  # one study build at a time (SCP threads, jobs, fetches)

    # -- life cycle -----------------------------------------------------------------------------

    def start(self) -> None:
        for study in self.instances.studies():  # recovered on the first idle round
            self._pending[study] = 0.0
        self.listener.start()
        self.host.every(
            min(max(self.opts.complete_after_s / 3, 0.5), 10.0), self._complete_idle, "complete"
        )

    def stop(self) -> None:
        self.listener.stop()

    def status(self) -> dict[str, Any]:
        out = super().status()
        out["pending_studies"] = len(self._pending)
        return out

    # -- Store SCP ------------------------------------------------------------------------------

    def _on_store(self, event: Any) -> tuple[int, str | None]:
        """Commit one received instance, then give the status to answer (never raises)."""
        raw: bytes = event.encoded_dataset()
        hint = str(getattr(event.request, "AffectedSOPInstanceUID", "") or "unknown")
        ds: Any = None
        try:
            self._bounded(raw, hint, event.context.transfer_syntax)
            ds = read_header(raw)
            sop = check_uid(
                ds.get("SOPInstanceUID"), record=hint, field="SOPInstanceUID (0008,0018)"
            )
            if sop != hint:
                raise DicomRejected(
                    f"instance {hint}: SOPInstanceUID (0008,0018) differs from "
                    "the C-STORE's Affected SOP Instance UID"
                )
            study = check_uid(
                ds.get("StudyInstanceUID"), record=sop, field="StudyInstanceUID (0020,000D)"
            )
            series = check_uid(
                ds.get("SeriesInstanceUID"), record=sop, field="SeriesInstanceUID (0020,000E)"
            )
            if not text(ds, "PatientID"):
                raise DicomRejected(f"instance {sop}: PatientID (0010,0020) is missing")
            self.instances.write(study, series, sop, raw)
        except (DicomRejected, UnsafePath) as exc:
            self.count("instances_rejected")
            log.warning("pacs: C-STORE refused (%s): %s", exc.code, exc.message)  # UIDs only
            if len(raw) > self.opts.max_dataset_bytes:  # keep the head, where the header is
                raw = raw[:KEEP_OF_OVERSIZE]
            try:
                nid = (
                    None
                    if ds is None
                    else patient_info(
                        ds,
                        national_id_issuer=self.opts.national_id_issuer,
                        id_is_national=self.opts.patient_id_is_national_id,
                    ).national_id
                )
            except Exception:  # noqa: BLE001 - a header too broken to name its patient
                nid = None
            try:
                self.host.quarantine(exc, raw=raw, kind="imaging.instance", national_id=nid)
            except Exception:
                log.exception("quarantine of a rejected instance failed")
                return OUT_OF_RESOURCES, None
            return CANNOT_UNDERSTAND, None
        except OSError as exc:
            self.failed(f"cannot write an instance: {exc.strerror or type(exc).__name__}")
            return OUT_OF_RESOURCES, None
        with self._lock:
            self._pending[study] = time.monotonic()
        self.count("instances_received")
        return SUCCESS, study

    def _on_cut(self, sop: str, received: int) -> None:
        """A C-STORE cut off while arriving (far over the limit): nothing of it is kept."""
        exc = DicomRejected(
            f"instance {sop}: data set over twice the "
            f"{self.opts.max_dataset_bytes}-byte limit "
            f"(options.max_dataset_bytes): cut off after {received} bytes, "
            "association aborted, nothing kept"
        )
        self.count("instances_rejected")
        log.warning("pacs: C-STORE cut off (%s): %s", exc.code, exc.message)
        self.host.quarantine(exc, raw=b"", kind="imaging.instance")

    def _bounded(self, raw: bytes, hint: str, transfer_syntax: Any) -> None:
        """Size and nesting caps, judged before pydicom (which recurses) reads anything."""
        o = self.opts
        if len(raw) > o.max_dataset_bytes:
            raise DicomRejected(
                f"instance {hint}: data set of {len(raw)} bytes is over the "
                f"{o.max_dataset_bytes}-byte limit (options.max_dataset_bytes)"
                f"; the first {KEEP_OF_OVERSIZE} bytes are kept"
            )
        ts = UID(str(transfer_syntax))
        check_structure(
            raw,
            implicit=ts.is_implicit_VR,
            little=ts.is_little_endian,
            deflated=ts.is_deflated,
            max_depth=o.max_sequence_depth,
            max_bytes=o.max_dataset_bytes,
            record=hint,
        )

    def _complete_all(self, studies: set[str]) -> None:
        for study in sorted(studies):
            self.complete(study)

    def _complete_idle(self) -> None:
        now = time.monotonic()
        with self._lock:
            due = [s for s, at in self._pending.items() if now - at >= self.opts.complete_after_s]
        for study in due:
            if self._pending.get(study) == 0.0 and self._is_current(study):
                self._pending.pop(study, None)
                continue
            self.complete(study)

    def _is_current(self, study: str) -> bool:
        """At start: does the stored ImagingStudy already count every file on disk?"""
        try:
            res = self.host.resource("ImagingStudy", study_resource_id(study))
        except NotFound:
            return False
        return res.get("numberOfInstances") == len(self.instances.study_files(study))

    # -- building resources ---------------------------------------------------------------------

    def _subject(self, ds: Dataset) -> tuple[dict[str, Any], str | None, dict[str, Any] | None]:
        """(subject reference, patient hash, new Patient to store or None) for a header."""
        info = patient_info(
            ds,
            national_id_issuer=self.opts.national_id_issuer,
            id_is_national=self.opts.patient_id_is_national_id,
        )
        phash = (
            patient_hash(self.host.plan.patient_hash_key, info.national_id)
            if info.national_id
            else None
        )
        found = self.host.find("Patient", patient_hash=phash) if phash else None
        if found is None and info.pacs_id:
            found = self.host.find("Patient", identifier=(self.pacs_id_system, info.pacs_id))
            if found is not None and phash is None:
                phash = (self.host.resource_info("Patient", found["id"]) or {}).get("patient_hash")
        if found is not None:
            return {"reference": f"Patient/{found['id']}"}, phash, None
        patient = patient_resource(
            info,
            pacs_id_system=self.pacs_id_system,
            national_system=self.host.plan.alliance.national_id_system,
        )
        return {"reference": f"Patient/{patient['id']}"}, phash, patient

    def _put(
        self,
        resources: list[dict[str, Any]],
        phash: str | None,
        action: str,
        message: str,
        thread: str | None = None,
    ) -> None:
        for r in resources:
            validate_resource(r)  # once, before it is stored (InvalidFhir names the path)
        with self.host.transaction() as tx:
            for r in resources:
                tx.put(r, patient_hash=phash, thread=thread)
            tx.audit(action, patient_hash=phash, thread=thread, message=message)

    def complete(self, study_uid: str) -> dict[str, Any] | None:
        """(Re)build and store the ImagingStudy (+ Patient, + SR reports) of a stored study."""
        with self._lock:
            self._pending.pop(study_uid, None)
            files = self.instances.study_files(study_uid)
            if not files:
                return None
            headers = [read_header(p) for p in files]
            subject, phash, patient = self._subject(headers[0])
            study = imaging_study(
                headers,
                study_uid=study_uid,
                subject=subject,
                tz=self.opts.timezone,
                accession_system=self.accession_system,
            )
            ref = {"reference": f"ImagingStudy/{study['id']}"}
            reports = [
                report_from_sr(h, subject=subject, study_ref=ref, tz=self.opts.timezone)
                for h in headers
                if text(h, "Modality") == "SR"
            ]
            self._put(
                [*([patient] if patient else []), study, *reports],
                phash,
                "imaging-study-stored",
                f"{study['numberOfSeries']} series, {study['numberOfInstances']} instances, "
                f"{len(reports)} SR reports",
            )
        self.count("studies_completed")
        self.ok()
        return study

    # -- C-FIND ---------------------------------------------------------------------------------

    def _pacs(self) -> Any:
        if self.opts.pacs is None:
            raise ConfigError(f"adapters.{self.name}.options.pacs: no vendor PACS configured")
        return self.opts.pacs

    def query(
        self, *, patient_id: str | None, study_date: str | None, actor: str
    ) -> list[dict[str, Any]]:
        """C-FIND the vendor PACS; every study found becomes (or stays) an ImagingStudy."""
        pacs, o = self._pacs(), self.opts
        found = dimse.find_studies(
            pacs, o.ae_title, o.timeout_s, patient_id=patient_id, study_date=study_date
        )
        out = []
        for ds in found:
            uid = check_uid(
                ds.get("StudyInstanceUID"),
                record="C-FIND answer",
                field="StudyInstanceUID (0020,000D)",
            )
            if self.instances.study_files(uid):  # we hold the instances: the full one stands
                study = self.host.resource("ImagingStudy", study_resource_id(uid))
            else:
                series = dimse.find_series(pacs, o.ae_title, o.timeout_s, uid)
                subject, phash, patient = self._subject(ds)
                study = imaging_study_from_find(
                    ds,
                    series,
                    study_uid=uid,
                    subject=subject,
                    tz=o.timezone,
                    accession_system=self.accession_system,
                )
                self._put(
                    [*([patient] if patient else []), study],
                    phash,
                    "imaging-query",
                    f"C-FIND by {actor}: study known from the PACS",
                )
            out.append(
                {
                    "id": study["id"],
                    "study_uid": uid,
                    "number_of_series": study.get("numberOfSeries"),
                    "number_of_instances": study.get("numberOfInstances"),
                }
            )
        self.ok()
        return out

    def retrieve(self, study_uid: str) -> list[Path]:
        """C-GET a study from the vendor PACS into our files, then complete it."""
        pacs, o = self._pacs(), self.opts
        classes = dimse.find_sop_classes(pacs, o.ae_title, o.timeout_s, study_uid)
        if classes:
            dimse.get_study(
                pacs,
                o.ae_title,
                o.timeout_s,
                study_uid,
                classes,
                lambda event: self._on_store(event)[0],
            )
            self.complete(study_uid)
        return self.instances.study_files(study_uid)

    # -- HL7 ORU report -------------------------------------------------------------------------

    def take_report(self, message: bytes | str, actor: str) -> dict[str, Any]:
        """An ORU^R01 report from the RIS (bytes as received: decoded by MSH-18, else the
        adapter's ``default_charset``; ``charset_override`` wins)."""
        raw = message.encode("utf-8") if isinstance(message, str) else message
        oru: OruReport | None = None
        try:
            oru = parse_oru(
                raw,
                self.opts.timezone,
                default_charset=self.opts.default_charset,
                charset_override=self.opts.charset_override,
            )
            study = None
            if oru.study_uid:
                rid = study_resource_id(oru.study_uid)
                study = (
                    self.host.resource("ImagingStudy", rid)
                    if self.host.resource_info("ImagingStudy", rid)
                    else None
                )
            if study is None and oru.accession:
                study = self.host.find(
                    "ImagingStudy", identifier=(self.accession_system, oru.accession)
                )
            if study is None:
                raise ReportRejected(
                    f"record {oru.control_id} field ZDS-1/OBR-3: no "
                    "ImagingStudy here for this report's study"
                )
            phash = (self.host.resource_info("ImagingStudy", study["id"]) or {}).get("patient_hash")
        except ReportRejected as exc:
            self.host.quarantine(exc, raw=raw, kind="imaging.report", **self._oru_patient(oru))
            raise
        report = report_from_oru(
            oru, subject=study["subject"], study_ref={"reference": f"ImagingStudy/{study['id']}"}
        )
        answer = {"id": report["id"], "imaging_study": study["id"], "status": report["status"]}
        patient = self._patient_of(study)
        if patient is None or phash is None:  # nobody to route to: stored here only
            self._put([report], phash, "imaging-report-stored", f"ORU report by {actor}")
            return answer
        # the report (with its study) follows the patient's open referrals as result.imaging,
        # stored and queued in one transaction; an identical re-sent message changes nothing.
        # Only the report is new: the Patient and the study were validated when stored.
        validate_resource(report)
        bundle = {
            "resourceType": "Bundle",
            "type": "collection",
            "entry": [
                {"fullUrl": f"urn:uuid:{r['id']}", "resource": r} for r in (patient, study, report)
            ],
        }
        key = f"oru:{oru.control_id}:{hashlib.sha256(raw).hexdigest()[:16]}"
        return self.host.share_results(
            bundle, source_key=key, patient_hash=phash, answer=answer, kind="result.imaging"
        )

    def _oru_patient(self, oru: OruReport | None) -> dict[str, str | None]:
        """Whom a refused ORU is about, as far as its PID-3 tells (nothing if it was not read
        that far): the ID number where this PACS keeps it as PatientID, else the keyed hash
        of the Patient this PACS's patient ID names here."""
        pid = oru.patient_id if oru is not None else None
        if not pid:
            return {}
        if self.opts.patient_id_is_national_id:
            return {"national_id": pid}
        found = self.host.find("Patient", identifier=(self.pacs_id_system, pid))
        info = self.host.resource_info("Patient", found["id"]) if found is not None else None
        return {"patient_hash": (info or {}).get("patient_hash")}

    def _patient_of(self, study: dict[str, Any]) -> dict[str, Any] | None:
        ref = (study.get("subject") or {}).get("reference") or ""
        rtype, _, rid = ref.partition("/")
        if rtype != "Patient" or not rid:
            return None
        if self.host.resource_info("Patient", rid) is None:
            return None
        patient = self.host.resource("Patient", rid)
        patient.pop("meta", None)
        return patient

    # -- on-demand fetch: both sides ------------------------------------------------------------

    def request_fetch(self, peer: str, study_uid: str, actor: str) -> dict[str, Any]:
        """Ask ``peer`` for a study; a Task here tracks it (requested -> completed/failed)."""
        uid = check_uid(study_uid, record="fetch request", field="study_uid")
        phash = (self.host.resource_info("ImagingStudy", study_resource_id(uid)) or {}).get(
            "patient_hash"
        )
        now = self.host.now()
        task_id, thread = str(uuid.uuid4()), str(uuid.uuid4())
        task = fetch.request_task(
            task_id, uid, self.host.node_id, peer, now.isoformat(timespec="seconds")
        )
        validate_resource(task)

        def write(tx: Any) -> None:
            tx.put(copy.deepcopy(task), thread=thread, patient_hash=phash)
            tx.audit(
                "imaging-fetch-requested",
                actor=actor,
                peer=peer,
                kind=fetch.KIND_REQUEST,
                thread=thread,
                patient_hash=phash,
            )

        self.host.send(
            peer,
            fetch.KIND_REQUEST,
            [fetch.request_bundle(task, phash)],
            thread=thread,
            write=write,
        )
        self.count("fetches_requested")
        return {"task_id": task_id, "thread": thread}

    def on_packet(self, ev: PacketEvent) -> None:
        """The fetch packets (the dispatcher decoded the Bundle; errors propagate to it)."""
        kind = ev.packet.kind
        if kind == fetch.KIND_REQUEST:
            self._serve(ev.packet, fetch.parse_request(ev.bundle))
        elif kind == fetch.KIND_RESPONSE:
            self._receive(ev.packet, ev.bundle)
        else:
            raise HutongError(f"adapter '{self.name}' does not take kind {kind}")

    def _reports_for(self, study_id: str) -> list[dict[str, Any]]:
        """This node's own reports on the study (SR, RIS): what a fetch sends with it. Reports
        other members wrote stay out: the asker may be their author, and a peer's resource
        must not come back to it as ours."""
        ref = f"ImagingStudy/{study_id}"
        found = self.host.own_resources("DiagnosticReport")
        return [
            r for r in found if any(s.get("reference") == ref for s in r.get("imagingStudy") or ())
        ]

    def reports_for(self, study_id: str) -> list[dict[str, Any]]:
        """Every report on the study: our own, then those other members attached, oldest
        first (:meth:`on_imaging_report`)."""
        attached = (self.host.state.get(ATTACHED, study_id) or {}).get("reports") or []
        theirs = [
            self.host.resource("DiagnosticReport", rid)
            for rid in attached
            if self.host.resource_info("DiagnosticReport", rid) is not None
        ]
        return [*self._reports_for(study_id), *theirs]

    def on_imaging_report(self, ev: ImagingReportEvent) -> dict[str, Any] | None:
        """A report another member wrote on a study: kept with the study when this PACS holds
        it (our own ImagingStudy), else None. Only from a member that may report on it: the
        other party of the thread it came on (``ev.party``, checked by the engine) or a member
        this PACS served the study to; anyone else's is quarantined. Stored referring to our
        study and patient, once per ``ev.key`` (a redelivery changes nothing; a correction in a
        later packet is a new version of the same report). A report it cannot keep is
        quarantined and None returned: the packet goes on (the HIS still gets it)."""
        try:
            uid = check_uid(ev.study_uid, record=f"report from {ev.sender}", field="study UID")
        except DicomRejected:
            return None
        rid = study_resource_id(uid)
        info = self.host.resource_info("ImagingStudy", rid)
        if info is None or info["origin"] != self.host.node_id:
            return None  # not a study of ours (a peer's study fetched or shared here)
        report_id = str(ev.report.get("id") or "")
        answer = {"study": rid, "report": report_id}
        key = f"report:{ev.key}"
        if not report_id:
            return None
        prior = self.host.seen(key)
        if prior is not None:
            if prior.get("refused"):
                return None  # refused and quarantined on an earlier delivery
            self._attach(rid, report_id, ev.thread)  # a crash after the commit: list it now
            return answer
        served = (self.host.state.get(SERVED, rid) or {}).get("members") or []
        if not ev.party and ev.sender not in served:
            return self._refuse(
                ev,
                f"report {report_id} from {ev.sender} on ImagingStudy/"
                f"{rid}, which this node neither shared with it nor "
                "asked it to report on",
                info["patient_hash"],
            )
        study = self.host.resource("ImagingStudy", rid)
        report = copy.deepcopy(ev.report)
        report.pop("meta", None)
        report["subject"] = study["subject"]
        report["imagingStudy"] = [
            {
                "reference": f"ImagingStudy/{rid}",
                "identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{uid}"},
            }
        ]
        try:
            validate_resource(report)
        except InvalidFhir:
            return self._refuse(
                ev,
                f"report {report_id} from {ev.sender} is not valid FHIR "
                f"R4 once attached to ImagingStudy/{rid}",
                info["patient_hash"],
            )
        try:
            with self.host.transaction() as tx:
                tx.put_foreign(
                    report,
                    sender=ev.sender,
                    thread=ev.thread or "",
                    patient_hash=info["patient_hash"],
                )
                tx.remember(key, answer, thread=ev.thread)
                tx.audit(
                    "imaging-report-attached",
                    peer=ev.sender,
                    kind="result.imaging",
                    thread=ev.thread,
                    patient_hash=info["patient_hash"],
                    message=f"DiagnosticReport/{report_id} from {ev.sender} attached to "
                    f"ImagingStudy/{rid}",
                )
        except HutongError as exc:
            if exc.retry is not Retry.PERMANENT:
                raise
            # e.g. the id names a resource of this node's or of another thread
            return self._refuse(
                ev, f"report {report_id} from {ev.sender}: {exc.message}", info["patient_hash"]
            )
        self._attach(rid, report_id, ev.thread)
        self.count("reports_attached")
        self.ok()
        return answer

    def _attach(self, rid: str, report_id: str, thread: str | None) -> None:
        with self.host.state.tx() as kv:
            known = list((kv.get(ATTACHED, rid) or {}).get("reports") or [])
            if report_id not in known:
                kv.put(ATTACHED, rid, {"reports": [*known, report_id]}, thread=thread)

    def _refuse(self, ev: ImagingReportEvent, why: str, phash: str | None) -> None:
        """Kept for IT (quarantined, audited), not attached; the packet goes on. Filed under
        the patient of the study it is on (``phash``, as the study is stored), so the message
        browser's patient search finds it. Remembered under the event's key, so a redelivery
        does not quarantine it again."""
        qid = self.host.quarantine(
            ReportRejected(why),
            raw=orjson.dumps(ev.report),
            kind="imaging.report",
            thread=ev.thread,
            patient_hash=phash,
        )
        with self.host.transaction() as tx:
            tx.remember(f"report:{ev.key}", {"refused": qid}, thread=ev.thread)
        self.count("reports_refused")

    def _serve(self, item: Delivery, req: fetch.FetchRequest) -> None:
        key = f"fetch:{item.packet_id}"
        if self.host.seen(key) is not None:
            return  # redelivered after a crash: the answer was already queued
        phash, reason, files = req.patient_hash, None, self.instances.study_files(req.study_uid)
        rid = study_resource_id(req.study_uid)
        try:
            expected = self.host.resource("ImagingStudy", rid).get("numberOfInstances")
        except NotFound:
            expected = None
        if self.opts.pacs is not None and (not files or (expected or 0) > len(files)):
            try:
                files = self.retrieve(req.study_uid)  # PacsUnavailable: retried with backoff
            except PacsFailed as exc:
                reason = exc.message
        bundles: list[dict[str, Any]] = []
        if files and expected is None:  # instances held, study not completed yet: do it now
            self.complete(req.study_uid)
        if files:
            study = self.host.resource("ImagingStudy", rid)
            phash = (self.host.resource_info("ImagingStudy", rid) or {}).get(
                "patient_hash"
            ) or phash
            first = [study, *self._reports_for(rid)]
            for r in first:
                r.pop("meta", None)
                r["subject"] = fetch.hash_subject(phash)
            instances = [(p.stem, p.read_bytes()) for p in files]
            budget = fetch.raw_budget(
                self.host.plan.limits.max_body_bytes, self.opts.fetch_chunk_bytes
            )
            try:
                bundles = fetch.response_bundles(req, instances, first, budget, patient_hash=phash)
            except FetchFailed as exc:
                reason = exc.message
        elif reason is None:
            reason = "study not held here"
        if reason is not None:
            bundles = [fetch.failure_bundle(req, reason, patient_hash=phash)]
        served = sum(
            1 for b in bundles for e in b["entry"] if e["resource"]["resourceType"] == "Binary"
        )
        if reason is None:  # it may report on the study (remote imaging reading); kept
            # before the answer is queued, so a crash in between cannot lose it
            with self.host.state.tx() as kv:
                members = list((kv.get(SERVED, rid) or {}).get("members") or [])
                if item.sender not in members:
                    kv.put(SERVED, rid, {"members": [*members, item.sender]})

        def write(tx: Any) -> None:
            tx.audit(
                "imaging-fetch-served",
                outcome="0" if reason is None else "4",
                peer=item.sender,
                kind=fetch.KIND_RESPONSE,
                thread=item.thread,
                patient_hash=phash,
                message=reason or f"{served} instances in {len(bundles)} packets",
            )

        self.host.send(
            item.sender,
            fetch.KIND_RESPONSE,
            bundles,
            thread=item.thread,
            source_key=key,
            write=write,
        )
        self.count("fetches_served" if reason is None else "fetches_refused")

    def _open_fetch(self, task_id: str, item: Delivery) -> dict[str, Any]:
        """The node's own open fetch Task this response answers, asked of its sender on this
        very thread; FetchFailed for anything else (never asked, asked of someone else or on
        another thread, or already completed or failed)."""
        row = self.host.resource_info("Task", task_id)
        if row is None:
            raise FetchFailed(f"response for Task/{task_id}, which was never asked for here")
        task = self.host.resource("Task", task_id)
        code = [c.get("code") for c in (task.get("code") or {}).get("coding") or ()]
        requester = ((task.get("requester") or {}).get("identifier") or {}).get("value")
        owner = ((task.get("owner") or {}).get("identifier") or {}).get("value")
        if (
            "imaging-fetch" not in code
            or requester != self.host.node_id
            or row["origin"] != self.host.node_id
        ):
            raise FetchFailed(
                f"response for Task/{task_id}, which is not a fetch this node asked for"
            )
        if owner != item.sender or row["thread"] != item.thread:
            raise FetchFailed(
                f"response for Task/{task_id} came from {item.sender} on thread "
                f"{item.thread}; it was asked of {owner} on another thread"
            )
        if task.get("status") not in ("requested", "in-progress"):
            raise FetchFailed(f"response for Task/{task_id}, which is {task.get('status')}")
        return dict(task)

    def _receive(self, item: Delivery, bundle: dict[str, Any]) -> None:
        key = f"fetch-in:{item.packet_id}"
        if self.host.seen(key) is not None:
            return  # applied before a crash: the Task is already past it
        resp = fetch.parse_response(bundle)  # sizes, SHA-1s, the study UID's grammar
        task = self._open_fetch(resp.task_id, item)
        asked = fetch.study_uid_of(task)
        if resp.study_uid != asked:
            raise FetchFailed(f"response for Task/{resp.task_id} is for another study")
        checked: list[tuple[str, str, bytes]] = []
        for sop, data in resp.instances:  # every instance checked before any is written
            path_uid(sop, field="dicom-instance title (SOPInstanceUID)")
            try:
                ds = read_header(data)
            except DicomRejected:
                raise FetchFailed(f"instance {sop}: not a readable DICOM file") from None
            path_uid(str(ds.get("SOPInstanceUID", "")), field="SOPInstanceUID (0008,0018)")
            path_uid(str(ds.get("StudyInstanceUID", "")), field="StudyInstanceUID (0020,000D)")
            series = path_uid(
                str(ds.get("SeriesInstanceUID", "")), field="SeriesInstanceUID (0020,000E)"
            )
            if (
                str(ds.get("SOPInstanceUID")) != sop
                or str(ds.get("StudyInstanceUID")) != resp.study_uid
            ):
                raise FetchFailed(f"instance {sop}: UIDs differ from the manifest")
            checked.append((series, sop, data))
        for series, sop, data in checked:
            self.fetched.write(resp.study_uid, series, sop, data)
        have = len(self.fetched.study_files(resp.study_uid))
        now = self.host.now()
        task = dict(task)
        if resp.status == "failed":
            task["status"] = "failed"
            task["statusReason"] = {"text": resp.reason or "refused by the holder"}
        else:
            task["status"] = "completed" if have >= resp.total else "in-progress"
        task["businessStatus"] = {"text": f"{have}/{resp.total} instances"}
        task["lastModified"] = now.isoformat(timespec="seconds")
        local = (
            self.host.find("Patient", patient_hash=resp.patient_hash) if resp.patient_hash else None
        )
        for r in resp.resources:
            if local is not None:
                r["subject"] = {"reference": f"Patient/{local['id']}"}
        validate_resource(task)  # what arrived was validated at the gateway; only ours is new
        with self.host.transaction() as tx:
            for r in resp.resources:
                tx.put_foreign(
                    r, sender=item.sender, thread=item.thread, patient_hash=resp.patient_hash
                )
            tx.put(task, thread=item.thread)
            tx.remember(key, {"task": task["id"]}, thread=item.thread)
            tx.audit(
                "imaging-fetch-received",
                peer=item.sender,
                kind=item.kind,
                thread=item.thread,
                packet_id=item.packet_id,
                patient_hash=resp.patient_hash,
                outcome="0" if resp.status != "failed" else "4",
                message=f"part {resp.part}: {len(resp.instances)} instances, "
                f"{have}/{resp.total} held",
            )
        self.count("instances_fetched", len(resp.instances))
        self.ok()

    def fetched_files(self, task_id: str) -> tuple[dict[str, Any], list[Path]]:
        task = self.host.resource("Task", task_id)
        ident = ((task.get("focus") or {}).get("identifier") or {}).get("value", "")
        uid = str(ident).removeprefix("urn:oid:")
        return task, self.fetched.study_files(uid) if task.get("status") == "completed" else []

    def fetched_patient_hash(self, task_id: str) -> str | None:
        task = self.host.resource("Task", task_id)
        uid = str(task["input"][0]["valueOid"]).removeprefix("urn:oid:")
        info = self.host.resource_info("ImagingStudy", study_resource_id(uid))
        return info["patient_hash"] if info is not None else None

    def local_routes(self) -> Any:
        from adapters.pacs.routes import pacs_router

        return pacs_router(self)
