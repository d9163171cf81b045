"""Consultations (远程会诊, MDT, 远程影像诊断) in the intermediate database, both ways.

Source side, polled with the same watermark, holes and exactly-once source keys as referrals:

* ``ZZ_HZSQ`` 会诊申请 (``fields/consult.csv``, :class:`~adapters.consult_slips.ConsultSlip`)
  -> ``host.submit_consultation`` (source key ``ZZ_HZSQ:<id>``). A row whose slip number was
  already sent from another row is a duplicate; a missing signed consent (``TYR``) is refused
  by the engine (HT-REF-CONSENT) and quarantined naming ``TYR``; a shared report id (``GXBG``)
  this node does not hold, naming ``GXBG``.
* ``ZZ_HZBC`` 补充资料 (``fields/consult_resubmit.csv``) -> ``consultation_step(thread,
  "resubmit")`` with the records as a DocumentReference. The thread is the row's ``LSH`` (the
  HIS copies it from the status row that returned the request), else the one the request row
  with the same ``HZDH`` started.

* ``ZZ_HZSQ`` rows marked withdrawn (``ZT`` 9, ``CXYY``, polled by their ``CXXH`` as referral
  withdrawals are; ``fields/consult_cancel.csv``) -> ``consultation_step(thread, "cancel")``
  (source key ``ZZ_HZSQ:<id>:cancel``); after the meeting began: quarantined naming ``ZT``.

Sink side (``receives`` includes ``consult.*``), on the inviting member only: every step the
centre took is a ``ZZ_JS_HZZT`` row (``fields/consult_status.csv``: event, step, what is
missing / why cancelled, the meeting's time, experts and video link), one per packet (unique
``XXID``). With the released report, in the same transaction, one ``ZZ_JS_HZBG`` row per
report (``fields/consult_report.csv``, keyed by ``BGID``: diagnosis in the site's own codes,
advice, referral recommendation; an imaging reading's conclusion, study UID and its PDF in
``BGWJ``), and an imaging reading also goes into ``ZZ_JS_JCBG`` like any imaging report
(:mod:`adapters.imaging`), so the exam-report screen shows it beside the others.

A site without ``fields/consult.csv`` (or without the tables) has no consultations from its HIS.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Table, insert, select
from sqlalchemy.exc import IntegrityError

from adapters import consult_slips as cs
from adapters import slips_fhir as sf
from adapters.imaging import ImagingReport, imaging_reports_from_bundle, with_local_studies
from bridge.delivery.handlers import Delivery
from bridge.errors import UnknownReference
from bridge.local.contract import ConsultEvent

if TYPE_CHECKING:
    from adapters.his_db.adapter import HisDbAdapter

RECORD = "consult"
RESUBMIT = "consult_resubmit"
CANCEL = "consult_cancel"
STATUS = "consult_status"
REPORT = "consult_report"
RECORDS: dict[str, type] = {
    RECORD: cs.ConsultSlip,
    RESUBMIT: cs.ResubmitSlip,
    STATUS: cs.ConsultStatus,
    REPORT: cs.ConsultReport,
    CANCEL: cs.ConsultCancel,
}
#: the inviting side's events the HIS is told about (the centre's steps)
SHOWN = (
    "received",
    "return",
    "schedule",
    "start",
    "report",
    "release",
    "cancelled",
    "cancel-refused",
)


def has_map(fields_folder: Path, record: str = RECORD) -> bool:
    return (Path(fields_folder) / "fields" / f"{record}.csv").is_file()


def slip_of(a: HisDbAdapter, record: str, row: dict[str, Any]) -> Any:
    from adapters.his_db.adapter import _slip

    return _slip(RECORDS[record], a.fm[record].apply(a._decode(row)))


def take(
    a: HisDbAdapter, table: Table, rid: int, row: dict[str, Any], replay: bool = False
) -> None:
    def work(key: str, gaps: list[Any]) -> None:
        slip = slip_of(a, RECORD, row)
        a._check_duplicate(table, rid, RECORD, slip.slip_no)
        study = None
        if slip.study_uid.strip():  # the PACS adapter's record of it, if this node holds it
            study = a.host.find(
                "ImagingStudy", identifier=(cs.DICOM_UID, f"urn:oid:{slip.study_uid.strip()}")
            )
        for rid_ in cs._split(slip.shared_results):
            if a.host.resource_info("DiagnosticReport", rid_) is None:
                raise UnknownReference(f"shared report {rid_} is not held by this node")
        bundle = cs.consult_bundle(
            slip,
            a.host.maps,
            a.me,
            gaps=gaps,
            study=study,
            national_id_system=a.host.plan.alliance.national_id_system,
        )
        a.host.submit_consultation(bundle, source_key=key)

    a._guard(table, rid, row, RECORD, work, replay)


def take_cancel(
    a: HisDbAdapter, table: Table, rid: int, row: dict[str, Any], replay: bool = False
) -> None:
    """A request row the HIS marked withdrawn (``ZT`` 9, ``CXYY`` the reason, polled by its
    ``CXXH``): the inviter's ``cancel`` step, which the centre answers with ``cancelled`` (or
    ``cancel-refused`` once the meeting has begun): both come back as status rows."""

    def work(key: str, gaps: list[Any]) -> None:
        slip = slip_of(a, CANCEL, row)
        thread = a.host.thread_for(f"{table.name}:{rid}")
        if thread is None:
            raise UnknownReference(
                f"no consultation was sent for this row ({slip.slip_no}), "
                "so there is none to withdraw"
            )
        a.host.consultation_step(thread, "cancel", source_key=key, reason=slip.reason)

    a._guard(table, rid, row, CANCEL, work, replay, suffix=":cancel")


def _thread(a: HisDbAdapter, row: dict[str, Any], slip_no: str) -> str:
    thread = str(row.get(a.opts.thread_column) or "").strip()
    requests = a.table("consult_out")
    if not thread and requests is not None:
        with a.engine.connect() as conn:
            ids = (
                conn.execute(
                    select(requests.c[a.opts.id_column])
                    .where(requests.c[a._column(RECORD, "slip_no")] == slip_no)
                    .order_by(requests.c[a.opts.id_column].desc())
                )
                .scalars()
                .all()
            )
        thread = next((t for i in ids if (t := a.host.thread_for(f"{requests.name}:{i}"))), "")
    if not thread or a.host.consultation(thread) is None:
        raise UnknownReference(
            f"no consultation was sent for this record "
            f"({a.opts.thread_column} / consultation number)"
        )
    return thread


def take_resubmit(
    a: HisDbAdapter, table: Table, rid: int, row: dict[str, Any], replay: bool = False
) -> None:
    def work(key: str, gaps: list[Any]) -> None:
        slip = slip_of(a, RESUBMIT, row)
        thread = _thread(a, row, slip.slip_no)
        view = a.host.consultation(thread) or {}
        task = a.host.resource("Task", view["consultation"]["task_id"])
        bundle = cs.resubmit_bundle(slip, task["for"]["reference"])
        a.host.consultation_step(thread, "resubmit", source_key=key, bundle=bundle)

    a._guard(table, rid, row, RESUBMIT, work, replay)


def on_consult(a: HisDbAdapter, ev: ConsultEvent) -> bool:
    """Write the step (and the released report) into the inbox tables; False: not for the
    HIS (the centre's side, an inviter's own step) or already written."""
    if ev.side != "inviter" or ev.event not in SHOWN or STATUS not in a.fm:
        return False
    gaps: list[Any] = []
    codes = sf.Codes(a.host.maps, a.me, gaps)
    status = a._need("consult_status_in")
    values = {
        **a._vendor_row(status, STATUS, cs.status_of(ev.event, ev.view, ev.task)),
        **a._stamp(status, ev.packet),
    }
    if a.opts.read_flag_column in status.c:
        values[a.opts.read_flag_column] = "0"  # unread: the doctor must see it
    reports: list[cs.ConsultReport] = []
    imaging: list[ImagingReport] = []
    if ev.event == "release":
        reports = cs.reports_of(ev.view, codes, a.host)
        if ev.view["consultation"]["kind"] == "imaging-reading":
            imaging = imaging_reports_from_bundle(
                with_local_studies(cs.imaging_bundle(ev.view), a.host),
                codes,
                slip_no=cs.slip_no_of(cs.request_of(ev.view)),
                sender=ev.packet.sender,
                patient_id=a._patient_id(ev.view),
            )
    try:
        with a.engine.begin() as conn:
            conn.execute(insert(status).values(**values))
            if reports:
                _write_reports(a, conn, ev.packet, reports)
            if imaging:
                head = a._need("imaging_in")
                a._result_maps(("imaging_report", ImagingReport))
                for report in imaging:
                    a._upsert_report(conn, head, "imaging_report", report, ev.packet)
    except IntegrityError:
        with a.engine.connect() as conn:
            if not a._packet_written(conn, status, ev.packet):
                raise
        a.count("redelivered")
        return False
    if gaps:
        a.host.record_gaps(gaps)
    return True


def _write_reports(
    a: HisDbAdapter, conn: Any, item: Delivery, reports: list[cs.ConsultReport]
) -> None:
    head = a._need("consult_report_in")
    pdf = a.opts.report_pdf_column
    for report in reports:
        a._upsert_report(conn, head, REPORT, report, item)
        if report.pdf and pdf in head.c:
            key = head.c[a._column(REPORT, "report_id")]
            conn.execute(head.update().where(key == report.report_id).values({pdf: report.pdf}))
