"""The XML web-service HIS adapter (``type = "his-xml-ws"``): pull documents, push packets.

Source: every ``poll_s`` the adapter asks the HIS for pending documents (``GetPendingDocuments``),
checks each (encoding, XSD, mandatory parts, dates, codes, duplicate ids), turns it into the
referral step it records (referral -> ``host.submit_referral``; acceptance -> accept/reject;
return -> arrive if needed, then the return bundle; cancel (转诊撤销单, the referring doctor
withdraws a referral written in this HIS, with a reason) -> the workflow's ``cancel`` step, once:
a second cancel document for a referral already withdrawn is taken without a second step) keyed
``doc:<document id>``, and only then acks it. A crash between commit and ack re-pulls the
document and the key makes it a no-op.
Visit documents (type ``visit``: admission, registration, transfer, discharge, update and the
cancels, :mod:`adapters.his_ws.visit_doc`, ``schemas/cda-visit.xsd``) -> ``host.record_encounter``
keyed ``doc:<document id>``: one Encounter per visit number moved on by each document once,
linked to a referral only when ``visit_referral`` says which element names it.
Consultation documents (``consult``: 远程会诊申请单 -> ``host.submit_consultation``;
``consult-records``: 补充资料 -> ``resubmit``; :mod:`adapters.his_ws.consult_doc`,
``schemas/consult.xsd``) keyed ``doc:<document id>``; the centre's steps and the released
report go back as ConsultStatus / ConsultReport documents (``on_consult``).
A bad document is quarantined (record = document id, field = XPath) and acked; the next one
goes on. A transient failure stops the round there, unacked, so order is kept.
Quarantine replay (``replay``): the held item is the document's bytes; after IT fixed the
site's mapping CSV, ``hutong quarantine replay <id>`` runs it through the same checks, maps and
exactly-once key again (a document the HIS corrected is a new document: it comes by the poll).

Sink: ``deliver`` writes the referral (at the receiver), acceptance and return (at the referrer)
into the HIS as documents whose id is the packet id, so a redelivery is a duplicate the HIS
recognises; so is a cancellation notice (CXD with its reason and ``cancelled`` or ``refused``:
at the receiver when the referrer withdrew, at the referrer when the receiver confirmed or
refused). ``result.lab`` packets (``receives = ["result.*"]``) become one lab report document
per DiagnosticReport (:mod:`adapters.his_ws.lab_report`, ``ReceiveLabReport``), id
``<report id>-v<version>``: a correction is the next version of the same report, a redelivery
the same document; item codes in this HIS's lab catalogue, unmapped codes counted as gaps once
the HIS has stored every report of the packet. ``result.imaging`` packets become one exam
report document per DiagnosticReport (:mod:`adapters.his_ws.exam_report`,
``ReceiveExamReport``): same ids, versions and gaps rule, the exam code in this HIS's exam
catalogue, the study UID, findings, conclusion and the PDF's exact bytes. Results for a
referral this HIS never got a document for stay in the node (the recognition view) and are
counted ``skipped:result``. A SOAP
Fault or a connection failure is :class:`HisUnavailable` (transient): the
dispatcher retries with backoff, keeping the thread's order.

Options (``[adapters.options]``)::

    url = "http://his.example:8080/his-ws"   # the HIS service endpoint
    poll_s = 1.0          # how often to ask for pending documents
    batch = 50            # documents per GetPendingDocuments
    timeout_s = 10.0      # connect/read timeout per call
    call_deadline_s = 120.0  # a whole call (a service that trickles bytes is cut off)
    max_document_bytes = 4194304  # a pulled document over this is refused while it arrives
                          # (HT-WS-TOO-LARGE: quarantined naming it, acked, the next go on)
    encoding = "UTF-8"    # documents written into the HIS: UTF-8 or GB18030
    site_name = "..."     # custodian name in documents written here
    oids = { diagnosis = "...", drug = "...", lab = "...", exam = "...", department = "...", ... }
    visit_referral = "referral-document"  # visit documents name their referral there
                                          # (default "": visits are never linked)
"""

from __future__ import annotations

import hashlib
import threading
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from adapters import consult_slips, slips_fhir, visits
from adapters.base import BaseAdapter
from adapters.his_ws import cda, consult_doc, exam_report, lab_report, visit_doc
from adapters.his_ws.client import DEFAULT_MAX_DOCUMENT, HisClient
from adapters.his_ws.errors import (
    BadDocument,
    DocumentTooLarge,
    DuplicateDocument,
    HisUnavailable,
    SchemaInvalid,
)
from adapters.his_ws.ledger import Ledger
from adapters.his_ws.soap import Pending
from adapters.imaging import imaging_reports_from_bundle, with_local_studies
from bridge.errors import HutongError, MissingConsent, Retry, WorkflowError
from bridge.local.contract import AdapterType, ConsultEvent, ReferralEvent, ResultEvent

#: which element a workflow refusal points at, by document type
WORKFLOW_FIELD = {
    "referral": "/ClinicalDocument/informationRecipient/intendedRecipient/receivedOrganization",
    "acceptance": "/ClinicalDocument/inFulfillmentOf/order",
    "return": "/ClinicalDocument/inFulfillmentOf/order",
    "cancel": "/ClinicalDocument/inFulfillmentOf/order",
    "visit": "/ClinicalDocument/inFulfillmentOf/order",
    "consult": "/ConsultRequest/to_member",
    "consult-records": "/ConsultRecords/consult_doc",
    "consult-cancel": "/ConsultCancel/consult_doc",
}
#: the centre's steps the inviting HIS is told about (ConsultStatus documents)
CONSULT_SHOWN = (
    "received",
    "return",
    "schedule",
    "start",
    "report",
    "release",
    "cancelled",
    "cancel-refused",
)
#: the message event of a delivered packet -> the document written into the HIS
WRITES = {
    "request": "referral",
    "accept": "acceptance",
    "reject": "acceptance",
    "return": "return",
    "cancel": "cancel",
    "cancelled": "cancel",
    "cancel-refused": "cancel",
}
#: a cancellation notice's reason when the Task carries none (the receiver refused: too late)
REFUSED_REASON = (
    "患者已到诊，转诊不能撤销 (the patient has arrived: the referral cannot be cancelled)"
)
CANCELLED_REASON = "转诊已撤销 (the referral was withdrawn)"
OID_KEYS = (
    "org_oid",
    "doc_oid",
    "slip_oid",
    "mrn_oid",
    "items",
    "doc_types",
    "diagnosis",
    "drug",
    "lab",
    "department",
    "visit_oid",
    "exam",
    "accession",
)


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str
    poll_s: float = Field(1.0, gt=0)
    batch: int = Field(50, gt=0, le=1000)
    timeout_s: float = Field(10.0, gt=0)
    call_deadline_s: float = Field(120.0, gt=0)
    max_document_bytes: int = Field(DEFAULT_MAX_DOCUMENT, gt=0, le=64 * 1024 * 1024)
    encoding: str = "UTF-8"
    site_name: str = ""
    oids: dict[str, str] = {}
    #: which part of a visit document names the referral it fulfils: "" = none is read (visits
    #: are never linked), "referral-document" = inFulfillmentOf/order/id under the document
    #: OID, the referral document the node wrote into this HIS (as acceptances name it)
    visit_referral: Literal["", "referral-document"] = ""

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("not an http(s) URL")
        return value

    @field_validator("encoding")
    @classmethod
    def _encoding(cls, value: str) -> str:
        if value.upper() not in ("UTF-8", "GB18030"):
            raise ValueError("must be UTF-8 or GB18030")
        return value.upper()

    @field_validator("oids")
    @classmethod
    def _oids(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(value) - set(OID_KEYS))
        if unknown:
            raise ValueError(f"unknown key(s) {', '.join(unknown)} (known: {', '.join(OID_KEYS)})")
        return value


def _named(error: HutongError, record: str, field: str | None) -> HutongError:
    """The error's message prefixed with record and field, as ``host.quarantine`` words it."""
    where = " ".join(p for p in (f"record {record}", f"field {field}" if field else "") if p)
    if where not in error.message:
        error.message = f"{where}: {error.message}"
    return error


class WsAdapter(BaseAdapter):
    def __init__(self, host: Any, opts: Options) -> None:
        super().__init__(host, opts)
        self.opts = opts
        self.client = HisClient(
            self.opts.url,
            self.opts.timeout_s,
            max_document_bytes=self.opts.max_document_bytes,
            call_deadline_s=self.opts.call_deadline_s,
        )
        self.me = host.node_id
        self.site = cda.Site(member=self.me, name=self.opts.site_name, **self.opts.oids)
        self.ledger: Ledger | None = None
        self.cursor = 0
        self._lock = threading.Lock()  # one poll round at a time, beside deliveries

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._ledger()
        self.host.every(self.opts.poll_s, self.poll)

    def stop(self) -> None:
        if self.ledger is not None:
            self.ledger.close()
            self.ledger = None

    def _ledger(self) -> Ledger:
        if self.ledger is None:
            ledger = Ledger(self.host.state)
            ledger.take_file(self.host.data_dir / "documents.sqlite")  # an earlier version's
            self.ledger = ledger
        return self.ledger

    # -- source: documents the HIS wrote --------------------------------------------------------

    def poll(self) -> int:
        """One round: pull, take or quarantine in order, ack what was settled. Returns acks."""
        with self._lock:
            try:
                docs = self.client.pending(self.cursor, self.opts.batch)
            except HisUnavailable as exc:
                self.failed(exc.message)
                self.count("poll_failed")
                return 0
            settled: list[int] = []
            for d in sorted(docs, key=lambda p: p.seq):
                if d.too_large:  # cut off while arriving: never stalls the ones behind it
                    self._too_large(d)
                    settled.append(d.seq)
                    continue
                try:
                    self.take(d)
                    self.count("taken")
                except (BadDocument, slips_fhir.SlipError, WorkflowError) as exc:
                    self._quarantine(d, exc)
                except HutongError as exc:
                    if exc.retry is Retry.PERMANENT:
                        self._quarantine(d, exc)
                    else:  # the node's store is busy: stop here, keep the order
                        self.failed(exc.message)
                        break
                settled.append(d.seq)
            if settled:
                try:
                    self.client.ack(settled)
                except HisUnavailable as exc:  # re-pulled next round; the keys make it harmless
                    self.failed(exc.message)
                    return 0
                self.cursor = max(self.cursor, *settled)
                self.ok()
            elif not docs:
                self.ok()
            return len(settled)

    @staticmethod
    def _field_of(d: Pending, exc: HutongError) -> str | None:
        """The XPath a refusal points at (quarantine reasons, replay answers)."""
        field = getattr(exc, "field", None)
        if isinstance(exc, slips_fhir.SlipError):
            field = (
                visit_doc.field_path(exc.field)
                if d.type == visit_doc.DOC_TYPE
                else consult_doc.field_path(d.type, exc.field)
                if d.type in consult_doc.ROOTS
                else cda.field_path(exc.field)
            )
        elif isinstance(exc, MissingConsent) and d.type == "consult":
            field = "/ConsultRequest/consent_by"
        elif isinstance(exc, WorkflowError):
            field = WORKFLOW_FIELD.get(d.type, "/ClinicalDocument")
        return field

    def _too_large(self, d: Pending) -> None:
        limit = self.opts.max_document_bytes
        exc = DocumentTooLarge(
            f"document {d.doc_id} ({d.type}, seq {d.seq}) is over the {limit}-byte limit "
            f"(options.max_document_bytes): refused after {d.too_large} bytes, the rest not "
            "read; the HIS must send it again smaller, or IT raises the limit",
            field="/Envelope/Body/GetPendingDocumentsResponse/PendingDocument",
        )
        self._quarantine(d, exc)
        self.count("too_large")
        self.failed(exc.message)  # shown as the adapter's last error on the IT page

    def _quarantine(self, d: Pending, exc: HutongError) -> None:
        self.host.quarantine(
            exc,
            raw=d.raw,
            record=d.doc_id,
            field=self._field_of(d, exc),
            kind=f"his-ws.{d.type}",
            national_id=cda.id_number_in(d.raw),
        )
        self.count("quarantined")

    # -- quarantine replay ----------------------------------------------------------------------

    def replay(self, raw: bytes) -> str:
        """A quarantined document through the same read/check/map path again (``hutong
        quarantine replay``, the node's local API), after IT fixed a mapping CSV (the maps are
        re-read first). The held item is the document's own bytes; its id and type come from
        the document. Same source key ``doc:<id>`` as a pulled document, so one taken before
        (another copy the HIS offered) is not sent twice. Still refused: the error is raised
        naming document and element (the item stays held; nothing is quarantined again).
        Returns a line for IT (no patient data).
        """
        doc_id, dtype = cda.identify(raw)
        if dtype is None:
            doc_id, dtype = consult_doc.identify(raw)
        if dtype is None:
            vid, is_visit = visit_doc.identify(raw)
            if is_visit:
                doc_id, dtype = vid, visit_doc.DOC_TYPE
        d = Pending(0, doc_id or "(unreadable id)", dtype or "", raw)
        with self._lock:
            self.host.reload_maps()
            key = f"doc:{d.doc_id}"
            digest = hashlib.sha256(raw).hexdigest()
            prior = self._ledger().digest(d.doc_id) if doc_id is not None else None
            # taken before with these bytes; other bytes under a taken id stay a duplicate
            done = prior == digest or (
                prior is None and doc_id is not None and self.host.seen(key) is not None
            )
            if prior != digest:
                try:
                    self.take(d)
                except HutongError as exc:  # refused, or the node's store busy: still held
                    raise _named(exc, d.doc_id, self._field_of(d, exc)) from None
                except Exception as exc:  # noqa: BLE001 - as a pulled document: held, named
                    raise _named(
                        HutongError(f"cannot read the document ({type(exc).__name__})"),
                        d.doc_id,
                        None,
                    ) from None
        self.count("replayed")
        return f"document {d.doc_id} ({d.type}) " + ("was already taken" if done else "taken")

    def take(self, d: Pending) -> None:
        ledger = self._ledger()
        if d.type == visit_doc.DOC_TYPE:
            self._take_visit(d)
            return
        if d.type in ("consult", "consult-records", "consult-cancel"):
            self._take_consult(d)
            return
        doc = cda.read(d.raw, self.site, record=d.doc_id, known=self._known, expect=d.type or None)
        digest = self._new_content(d, doc.doc_id)
        if digest is None:
            return  # the same document again (acked late): nothing to do
        key = f"doc:{doc.doc_id}"
        if self.host.seen(key) is None:
            gaps: list[Any] = []
            if doc.type == "referral":
                self._take_referral(doc, key, gaps)
            else:
                self._take_answer(doc, key, gaps)
            if gaps:
                self.host.record_gaps(gaps)
        thread = self.host.thread_for(key)
        ledger.remember(doc.doc_id, "in", doc.type, thread, digest)

    def _new_content(self, d: Pending, doc_id: str) -> str | None:
        """The SHA-256 of a listed document not taken before; None for the same bytes again.
        A document whose own id differs from the listed one, or other bytes under a taken id,
        is refused (the ledger answers "same content?")."""
        if doc_id != d.doc_id:
            raise SchemaInvalid(
                f"document listed as {d.doc_id} carries id {doc_id}",
                field="/ClinicalDocument/id/@extension",
            )
        digest = hashlib.sha256(d.raw).hexdigest()
        prior = self._ledger().digest(doc_id)
        if prior is None:
            return digest
        if prior != digest:
            raise DuplicateDocument(
                f"document id {doc_id} was taken before with other content",
                field="/ClinicalDocument/id/@extension",
            )
        return None

    def _take_visit(self, d: Pending) -> None:
        """A visit document -> the visit's Encounter and Patient, once per document id (the
        same bytes again change nothing; other bytes under a taken id are a duplicate)."""
        ledger = self._ledger()
        doc = visit_doc.read(d.raw, self.site, record=d.doc_id, known=self._known)
        digest = self._new_content(d, doc.doc_id)
        if digest is None:
            return
        v = visits.check(doc.visit)
        key = f"doc:{doc.doc_id}"
        thread = None
        if self.host.seen(key) is None:
            if self.opts.visit_referral and doc.referral_doc:
                thread = ledger.thread_of(doc.referral_doc)
                if thread is None or ledger.referral_doc(thread) != doc.referral_doc:
                    raise BadDocument(
                        f"document {doc.doc_id} names referral document {doc.referral_doc}, "
                        "which this node never wrote into the HIS",
                        field=f"/ClinicalDocument/inFulfillmentOf/order/id[@root="
                        f"'{self.site.doc_oid}']/@extension",
                    )
                v.referral_no = doc.referral_doc
            gaps: list[Any] = []
            visits.record(
                self.host,
                v,
                source_key=key,
                referral_thread=thread,
                kind="his-ws.visit",
                codes=slips_fhir.Codes(self.host.maps, self.me, gaps),
            )
            if gaps:
                self.host.record_gaps(gaps)
        ledger.remember(
            doc.doc_id, "in", visit_doc.DOC_TYPE, thread or self.host.thread_for(key), digest
        )

    # -- consultations (adapters.his_ws.consult_doc) -------------------------------------------

    def _take_consult(self, d: Pending) -> None:
        """A 远程会诊申请单 -> a new consultation; 补充资料 -> resubmit; once per document id."""
        ledger = self._ledger()
        doc = consult_doc.read(d.raw, d.doc_id, expect=d.type)
        digest = self._new_content(d, doc.doc_id)
        if digest is None:
            return
        key = f"doc:{doc.doc_id}"
        if self.host.seen(key) is None:
            if doc.type == "consult":
                slip = doc.record
                for rid in consult_slips._split(slip.shared_results):
                    if self.host.resource_info("DiagnosticReport", rid) is None:
                        raise BadDocument(
                            f"shared report {rid} is not held by this node",
                            field="/ConsultRequest/shared_report",
                        )
                study = (
                    self.host.find(
                        "ImagingStudy",
                        identifier=(consult_slips.DICOM_UID, f"urn:oid:{slip.study_uid}"),
                    )
                    if slip.study_uid
                    else None
                )
                gaps: list[Any] = []
                bundle = consult_slips.consult_bundle(
                    slip,
                    self.host.maps,
                    self.me,
                    gaps=gaps,
                    study=study,
                    national_id_system=self.host.plan.alliance.national_id_system,
                )
                self.host.submit_consultation(bundle, source_key=key)
                if gaps:
                    self.host.record_gaps(gaps)
            else:
                thread = ledger.thread_of(doc.consult_doc)
                view = self.host.consultation(thread) if thread else None
                if view is None or ledger.referral_doc(thread or "", "consult") != doc.consult_doc:
                    raise BadDocument(
                        f"document {doc.doc_id} names consultation request "
                        f"{doc.consult_doc}, which this node never took",
                        field=f"/{consult_doc.ROOTS[doc.type]}/consult_doc",
                    )
                if doc.type == "consult-cancel":
                    self.host.consultation_step(
                        str(thread), "cancel", source_key=key, reason=doc.record.reason
                    )
                else:
                    task = self.host.resource("Task", view["consultation"]["task_id"])
                    self.host.consultation_step(
                        str(thread),
                        "resubmit",
                        source_key=key,
                        bundle=consult_slips.resubmit_bundle(doc.record, task["for"]["reference"]),
                    )
        ledger.remember(doc.doc_id, "in", doc.type, self.host.thread_for(key), digest)

    def on_consult(self, ev: ConsultEvent) -> None:
        """A step the consultation centre took: a ConsultStatus document into the inviting HIS;
        with the released report, a ConsultReport document (and for an imaging reading also
        the exam report document, as for ``result.imaging``)."""
        item, view = ev.packet, ev.view
        if ev.side != "inviter" or ev.event not in CONSULT_SHOWN:
            self.count("not_written")
            return
        ledger = self._ledger()
        request_doc = ledger.referral_doc(item.thread, "consult")
        if request_doc is None:  # not asked for from this HIS (the web page, the API)
            self.count("not_written")
            return
        row = view["consultation"]
        status = consult_slips.status_of(ev.event, view, ev.task)
        out: list[tuple[str, str, bytes]] = [
            (
                "consult-status",
                item.packet_id,
                consult_doc.write(
                    consult_doc.Doc(
                        item.packet_id,
                        "consult-status",
                        status,
                        consult_doc=request_doc,
                        thread=item.thread,
                    ),
                    self.opts.encoding,
                ),
            )
        ]
        gaps: list[Any] = []
        if ev.event == "release":
            codes = slips_fhir.Codes(self.host.maps, self.me, gaps)
            for rep in consult_slips.reports_of(view, codes, self.host):
                doc_id = f"{rep.report_id}-R"
                out.append(
                    (
                        "consult-report",
                        doc_id,
                        consult_doc.write(
                            consult_doc.Doc(doc_id, "consult-report", rep, consult_doc=request_doc),
                            self.opts.encoding,
                        ),
                    )
                )
            if row["kind"] == "imaging-reading":
                task = self.host.resource("Task", row["task_id"])
                patient = self.host.resource("Patient", task["for"]["reference"].split("/")[1])
                mrn = slips_fhir._mrn(patient, self.me)
                for doc in exam_report.from_reports(
                    imaging_reports_from_bundle(
                        with_local_studies(consult_slips.imaging_bundle(view), self.host),
                        codes,
                        slip_no=status.slip_no,
                        sender=item.sender,
                        patient_id=mrn,
                    ),
                    codes,
                    self.site,
                    producer=item.sender,
                    referral_doc=request_doc,
                    mrn=mrn,
                    mrn_authority=self.me if mrn else "",
                    received_at=item.received_at.isoformat(),
                ):
                    doc.version = ledger.report_version(doc.report_id, item.packet_id)
                    doc.doc_id = exam_report.doc_id_of(doc.report_id, doc.version)
                    out.append(
                        (
                            "exam-report",
                            doc.doc_id,
                            exam_report.write(doc, self.site, self.opts.encoding),
                        )
                    )
        for doc_type, doc_id, raw in out:
            ledger.remember(doc_id, "out", doc_type, item.thread, hashlib.sha256(raw).hexdigest())
            try:
                self.client.receive(doc_type, doc_id, raw)
            except HisUnavailable as exc:
                self.failed(exc.message)
                self.count("deliver_failed")
                raise
            self.count(f"wrote_{doc_type.replace('-', '_')}")
        if gaps:
            self.host.record_gaps(gaps)
        self.ok()

    def _known(self, category: str, code: str) -> bool:
        """Strict maps only (slips_fhir.STRICT): other unlisted codes travel as mapping gaps."""
        maps = self.host.maps
        if maps is None or category not in slips_fhir.STRICT or category not in maps.rows:
            return True
        return any(r.source_code == code for r in maps.rows[category])

    def _take_referral(self, doc: cda.Document, key: str, gaps: list[Any]) -> None:
        bundle = slips_fhir.referral_bundle(
            doc.slip,
            self.host.maps,
            self.me,
            gaps=gaps,
            national_id_system=self.host.plan.alliance.national_id_system,
        )
        self.host.submit_referral(bundle, source_key=key)

    def _take_answer(self, doc: cda.Document, key: str, gaps: list[Any]) -> None:
        thread = self._ledger().thread_of(doc.referral_doc)
        view = self.host.referral(thread) if thread else None
        if view is None:
            raise BadDocument(
                f"document {doc.doc_id} answers referral document "
                f"{doc.referral_doc}, which this node never wrote into the HIS",
                field=f"/ClinicalDocument/inFulfillmentOf/order/id[@root="
                f"'{self.site.doc_oid}']/@extension",
            )
        row = view["referral"]
        slip = doc.slip
        if doc.type == "cancel":
            self._take_cancel(doc, key, thread, row)
            return
        if doc.type == "acceptance":
            if slip.accepted:
                self.host.referral_step(
                    thread,
                    "accept",
                    source_key=key,
                    outputs=slips_fhir.acceptance_outputs(
                        slip, self.host.maps, me=self.me, gaps=gaps
                    ),
                )
            else:
                self.host.referral_step(thread, "reject", source_key=key, reason=slip.reason)
            return
        if row["status"] == "accepted":  # a return slip means the patient came
            self.host.referral_step(thread, "arrive", source_key=f"{key}:arrive")
        task = self.host.resource("Task", row["task_id"])
        bundle = slips_fhir.return_bundle(
            slip, row["sr_id"], task["for"]["reference"], self.host.maps, me=self.me, gaps=gaps
        )
        self.host.submit_referral(bundle, source_key=key)

    def _take_cancel(self, doc: cda.Document, key: str, thread: str, row: dict[str, Any]) -> None:
        """The referring doctor withdraws the referral: the workflow's cancel step, once."""
        if row["side"] != "referrer":
            raise BadDocument(
                f"document {doc.doc_id} withdraws referral document "
                f"{doc.referral_doc}, which this hospital received: only the "
                "referrer may cancel (the receiver rejects)",
                field=WORKFLOW_FIELD["cancel"],
            )
        if row["status"] == "cancelled" or row["step"] == "cancel-requested":
            # the doctor withdrew it twice: applied once, the second one noted for the audit
            self.host.audit(
                "referral",
                message=f"cancel document {doc.doc_id}: referral already withdrawn, no second step",
                thread=thread,
                kind="referral.cancel",
            )
            self.count("cancel_repeated")
            return
        self.host.referral_step(thread, "cancel", source_key=key, reason=doc.slip.reason)

    # -- sink: packets that arrived -------------------------------------------------------------

    def on_referral(self, ev: ReferralEvent) -> None:
        """A referral step the workflow applied: one CDA-like document into the HIS."""
        item, event, view = ev.packet, ev.event, ev.view
        doc_type = WRITES.get(event)
        if doc_type is None:
            self.count("not_written")  # received, arrive, return-received: no document
            return
        ledger = self._ledger()
        row = view["referral"]
        gaps: list[Any] = []
        maps = self.host.maps
        if doc_type == "referral":
            task = self.host.resource("Task", row["task_id"])
            patient = self.host.resource("Patient", task["for"]["reference"].split("/", 1)[1])
            slip: Any = slips_fhir.referral_from_fhir(
                view, maps, patient=patient, me=self.me, gaps=gaps
            )
            doc = cda.Document(item.packet_id, "referral", slip, slip.written_at, row["referrer"])
        else:
            referral_doc = ledger.referral_doc(item.thread)
            if referral_doc is None:  # the referral was not written in this HIS (web page, API)
                self.count("not_written")
                return
            refs = {f"{r['resourceType']}/{r['id']}": r for r in view["resources"]}
            slip_no = slips_fhir.slip_no_of(refs.get(f"ServiceRequest/{row['sr_id']}", {}))
            if doc_type == "cancel":
                task = ev.task
                done = row["status"] == "cancelled" and event != "cancel-refused"
                reason = str((task.get("statusReason") or {}).get("text") or "")
                slip = cda.CancelSlip(
                    slip_no,
                    reason or (CANCELLED_REASON if done else REFUSED_REASON),
                    "cancelled" if done else "refused",
                )
                written = task.get("lastModified") or item.received_at.isoformat()
                doc = cda.Document(
                    item.packet_id,
                    doc_type,
                    slip,
                    written,
                    row["referrer"],
                    referral_doc=referral_doc,
                )
            elif doc_type == "acceptance":
                task = ev.task
                slip = slips_fhir.acceptance_from_task(task, slip_no, maps, me=self.me, gaps=gaps)
                written = task.get("lastModified") or item.received_at.isoformat()
            else:
                slip = slips_fhir.return_from_fhir(view, maps, me=self.me, gaps=gaps)
                written = slip.written_at
            if doc_type != "cancel":
                doc = cda.Document(
                    item.packet_id,
                    doc_type,
                    slip,
                    written,
                    row["receiver"],
                    referral_doc=referral_doc,
                )
        raw = cda.write(doc, self.site, self.opts.encoding)
        ledger.remember(
            item.packet_id, "out", doc_type, item.thread, hashlib.sha256(raw).hexdigest()
        )
        try:
            self.client.receive(doc_type, item.packet_id, raw)
        except HisUnavailable as exc:
            self.failed(exc.message)
            self.count("deliver_failed")
            raise
        if gaps:
            self.host.record_gaps(gaps)
        self.count(f"wrote_{doc_type}")
        self.ok()

    # -- sink: lab results from another member ----------------------------------------------------

    def on_result(self, ev: ResultEvent) -> None:
        """``result.lab`` -> one lab report document per DiagnosticReport, ``result.imaging``
        -> one exam report document per DiagnosticReport, each sent until the HIS answers
        stored or duplicate (a SOAP Fault raises: the dispatcher retries)."""
        item = ev.packet
        if item.kind not in ("result.lab", "result.imaging"):
            self.count(f"skipped:{item.kind}")
            return
        ledger = self._ledger()
        if ledger.results_written(item.packet_id):
            self.count("redelivered")
            return
        referral_doc = ledger.referral_doc(item.thread) if item.thread else None
        view = ev.view if referral_doc else None
        if view is None or referral_doc is None:
            # no referral document in this HIS to file them under: they stay in the node's
            # FHIR store and the recognition view (counted for IT, no patient data)
            self.count("skipped:result")
            return
        row = view["referral"]
        refs = {f"{r['resourceType']}/{r['id']}": r for r in view["resources"]}
        slip_no = slips_fhir.slip_no_of(refs.get(f"ServiceRequest/{row['sr_id']}", {}))
        task = refs.get(f"Task/{row['task_id']}") or self.host.resource("Task", row["task_id"])
        pref = task["for"]["reference"]
        patient = refs.get(pref) or self.host.resource("Patient", pref.split("/", 1)[1])
        mrn = slips_fhir._mrn(patient, row["referrer"])
        gaps: list[Any] = []
        codes = slips_fhir.Codes(self.host.maps, self.me, gaps)
        docs: list[Any]
        if item.kind == "result.lab":
            doc_type, module = "lab-report", lab_report
            docs = lab_report.from_bundle(
                ev.bundle,
                codes,
                self.site,
                producer=item.sender,
                slip_no=slip_no,
                referral_doc=referral_doc,
                mrn=mrn,
                mrn_authority=row["referrer"] if mrn else "",
                received_at=item.received_at.isoformat(),
            )
        else:
            doc_type, module = "exam-report", exam_report
            docs = exam_report.from_reports(
                imaging_reports_from_bundle(
                    with_local_studies(ev.bundle, self.host),
                    codes,
                    slip_no=slip_no,
                    sender=item.sender,
                    patient_id=mrn,
                ),
                codes,
                self.site,
                producer=item.sender,
                referral_doc=referral_doc,
                mrn=mrn,
                mrn_authority=row["referrer"] if mrn else "",
                received_at=item.received_at.isoformat(),
            )
        for doc in docs:
            doc.version = ledger.report_version(doc.report_id, item.packet_id)
            doc.doc_id = module.doc_id_of(doc.report_id, doc.version)
            if doc.version > 1:
                doc.replaces = module.doc_id_of(doc.report_id, doc.version - 1)
            raw = module.write(doc, self.site, self.opts.encoding)
            ledger.remember(
                doc.doc_id, "out", doc_type, item.thread, hashlib.sha256(raw).hexdigest()
            )
            try:
                self.client.receive(doc_type, doc.doc_id, raw)
            except HisUnavailable as exc:
                self.failed(exc.message)
                self.count("deliver_failed")
                raise
            self.count(f"wrote_{doc_type.replace('-', '_')}")
        if ledger.mark_results_written(item.packet_id) and gaps:
            self.host.record_gaps(gaps)
            self.count("unmapped_codes", len(gaps))
        self.ok()


#: this type's declaration to the engine (entry point ``his-xml-ws``)
create = AdapterType(
    name="his-xml-ws", options=Options, build=WsAdapter, example={"url": "http://127.0.0.1:9/his"}
)
