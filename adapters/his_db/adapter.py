"""The intermediate-database adapter: vendor rows -> referral steps, arrived packets -> inbox rows.

Source side (a poll job every ``poll_every_s``): new rows of the HIS's outbound tables, found by
:class:`~adapters.his_db.watermark.Watermark`, are read through the site's field maps
(``fields/<record>.csv``, :mod:`bridge.mapping.fields`) into neutral slips and handed to the node
with the row as source key (``ZZ_SQD:<id>``), so each row acts exactly once:

* ``ZZ_SQD`` (referral)   -> ``host.submit_referral`` (:func:`~adapters.slips_fhir.referral_bundle`)
* ``ZZ_JZD`` (acceptance) -> ``host.referral_step(thread, "accept" | "reject")``
* ``ZZ_ZHD`` (+ lines)    -> ``arrive`` if not yet taken, then ``host.submit_referral`` of the
  return bundle. The thread is the row's ``LSH`` (流水号, which the adapter wrote into the inbox
  row the HIS answered), or else found through the slip number in the referral inbox.
* ``ZZ_SQD`` rows marked withdrawn (``ZT`` 9, polled by their ``CXXH`` number, source key
  ``ZZ_SQD:<id>:cancel``) -> ``host.referral_step(thread, "cancel", reason=CXYY)``
  (:mod:`~adapters.his_db.cancel`); a row whose referral was never sent, or that can no longer
  be withdrawn (the patient arrived), is quarantined naming ``ZZDH`` / ``ZT``.
* ``ZZ_JZJL`` (visit events: admission, registration, transfer, discharge, update, cancels;
  ``fields/visit.csv``) -> ``host.record_encounter``: one Encounter per visit number, moved on
  by each row once, linked to a referral received here only through the column the option
  ``visit_referral_column`` names (:mod:`~adapters.his_db.visits`).

Consultations (远程会诊, MDT, imaging reading): ``ZZ_HZSQ`` requests and ``ZZ_HZBC`` completed
records in, the centre's steps (``ZZ_JS_HZZT``) and the released report (``ZZ_JS_HZBG``) out,
in :mod:`~adapters.his_db.consult`.

Bad rows are quarantined (``record`` ``ZZ_SQD#<id>``, ``field`` the vendor column) and the poll
goes on with the next row: missing mandatory field, unparseable date, value not in the field
map's value list, unknown diagnosis code (see :mod:`adapters.slips_fhir` for which code gaps
travel and which are quarantined), bytes that do not decode in ``encoding`` (GBK BLOBs), and
duplicate rows (a second row with the slip number of a row already sent). A transient failure
(node store busy, vendor database down) ends the round; the next poll starts again there.

GBK-era text: BLOB columns are decoded with the site's ``encoding`` option (default ``gbk``);
text is stripped of leading/trailing whitespace including the full-width spaces (U+3000) that
pad CHAR columns; full-width spaces inside text are kept (valid FHIR R4 strings).

Sink side (``receives = ["referral.*"]``): after the workflow has applied a packet, the slip is
written into the inbox tables (``ZZ_JS_SQD`` on the receiver; ``ZZ_JS_JZD`` and ``ZZ_JS_ZHD``
with lines on the referrer), codes in the site's own catalogue, one transaction per packet,
idempotent by the unique packet-id column ``XXID``. A cancellation the receiver confirmed marks
the received referral's ``ZZ_JS_SQD`` row (``ZT`` 9, ``CXSJ``, ``CXYY``, unread again).

Lab results from another member (``receives = ["result.*"]``, packets ``result.lab``): each
report goes into ``ZZ_JS_JYBG`` and its results into ``ZZ_JS_JYBG_MX`` through the field maps
``fields/lab_report.csv`` and ``fields/lab_report_item.csv`` (:mod:`adapters.his_db.results`),
item codes in the site's own lab catalogue, ``LSH`` the thread and ``ZZDH`` the referrer's slip
number. Rows are keyed by the report's and the result's ids (stable at the producing LIS), so a
corrected result updates its line in place and sets the report's read flag back to unread; a
packet already written (its id in a report row's ``XXID``) is left alone.

Imaging reports from another member (``result.imaging``, 检查结果互认): each DiagnosticReport
with its ImagingStudy goes into ``ZZ_JS_JCBG`` through ``fields/imaging_report.csv``
(:func:`~adapters.his_db.results.imaging_reports_from_bundle`): the exam code in the site's own
``exam`` catalogue (unmapped: the sender's code and its system, counted as a gap), the HIS's own
record number of the patient (from the referral's Patient), modality, body site, Study Instance
UID, exam and report times, findings (the report text), conclusion, the reporting doctor and
the status. Same ledger rule as lab reports: keyed by the report's id, a correction updates the
row in place (unread again, ``version_column`` + 1); a packet already written is left alone.
The images stay in the producing PACS (``imaging.fetch-request``).

Quarantine replay (``replay``, :mod:`adapters.his_db.replay`): a held row is kept as its
vendor columns plus the table name; IT fixes the mapping CSV (re-read first) or the HIS fixes
the row, and ``hutong quarantine replay <id>`` re-reads the row by its id (the kept copy if the
HIS deleted it) and runs it through the same intake under the same source key. The fault point
``his_db.after_quarantine`` (after a row's quarantine commit, before the watermark moves) lets
the fault suite show that a row quarantined twice is still sent once.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import MISSING, asdict, fields
from datetime import timedelta, timezone
from typing import Any

import orjson
from sqlalchemy import MetaData, Table, create_engine, insert, or_, select, update
from sqlalchemy.exc import IntegrityError, NoSuchTableError, SQLAlchemyError
from sqlalchemy.types import LargeBinary

from adapters import slips_fhir as sf
from adapters.base import BaseAdapter
from adapters.his_db import cancel as cx
from adapters.his_db import consult as hz
from adapters.his_db import visits as vz
from adapters.his_db.options import Resolved
from adapters.his_db.replay import (
    RECORD_KEY,
    TABLE_KEY,
    BadQuarantineItem,
    kept_record,
    kept_row,
    named,
)
from adapters.his_db.results import (
    ImagingReport,
    LabReport,
    LabReportItem,
    imaging_reports_from_bundle,
    reports_from_bundle,
)
from adapters.his_db.watermark import Watermark
from adapters.imaging import with_local_studies
from adapters.slips import AcceptanceSlip, LabResult, Prescription, ReferralSlip, ReturnSlip
from adapters.visits import Visit
from bridge import faults
from bridge.delivery.handlers import Delivery
from bridge.errors import (
    HutongError,
    IllegalTransition,
    MissingConsent,
    Retry,
    StoreError,
    UnknownReference,
)
from bridge.local.contract import ConsultEvent, ReferralEvent, ResultEvent
from bridge.mapping import FieldMapError, load_field_map

log = logging.getLogger("hutong.adapters.his_db")
CHINA = timezone(timedelta(hours=8))
RECORDS: dict[str, type] = {
    "referral": ReferralSlip,
    "acceptance": AcceptanceSlip,
    "return": ReturnSlip,
    "prescription": Prescription,
    "lab_result": LabResult,
}


def _slip(cls: type, values: dict[str, Any]) -> Any:
    """A slip from field-mapped values; fields the map leaves out get empty values."""
    out = dict(values)
    for f in fields(cls):
        if f.name not in out and f.default is MISSING and f.default_factory is MISSING:
            out[f.name] = {"bool": False, "int": 0}.get(str(f.type), "")
    return cls(**out)


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes | memoryview):
        return {"bytes_hex": bytes(value).hex()}
    return str(value)


def field_maps(folder: Any) -> dict[str, Any]:
    """The vendor tables' field maps under ``folder`` (ConfigError naming file and line)."""
    fm = {rec: load_field_map(folder, rec, fields=cls) for rec, cls in RECORDS.items()}
    if cx.has_map(folder):
        fm[cx.RECORD] = load_field_map(folder, cx.RECORD, fields=cx.CancelSlip)
    if vz.has_map(folder):
        fm[vz.RECORD] = load_field_map(folder, vz.RECORD, fields=Visit)
    for record, cls in hz.RECORDS.items():
        if hz.has_map(folder, record):
            fm[record] = load_field_map(folder, record, fields=cls)
    return fm


class HisDbAdapter(BaseAdapter):
    def __init__(self, host: Any, opts: Resolved) -> None:
        super().__init__(host, {})
        self.opts = opts
        self.me = host.node_id
        self.fm = field_maps(opts.fields)
        self.engine: Any = None
        self._tables: dict[str, Table | None] = {}
        self._meta = MetaData()  # this vendor database's reflected tables
        self._lock = threading.Lock()  # a poll round and a quarantine replay, one at a time

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        args = {"timeout": 30} if self.opts.dsn.startswith("sqlite") else {}
        self.engine = create_engine(self.opts.dsn, pool_pre_ping=True, connect_args=args)
        self.host.every(self.opts.poll_every_s, self.poll)

    def stop(self) -> None:
        if self.engine is not None:
            self.engine.dispose()

    def table(self, logical: str) -> Table | None:
        """The vendor table behind a logical name, reflected once; None if the HIS has none."""
        if logical not in self._tables:
            name = getattr(self.opts.tables, logical)
            try:
                self._tables[logical] = Table(name, self._meta, autoload_with=self.engine)
            except NoSuchTableError:
                log.warning("adapter %s: vendor table %s does not exist", self.name, name)
                self._tables[logical] = None
        return self._tables[logical]

    # -- source side --------------------------------------------------------------------------

    def poll(self) -> None:
        """One round over the outbound tables (the node's scheduler runs one at a time)."""
        with self._lock:
            self._poll()

    def _poll(self) -> None:
        try:
            for logical, take in (
                ("referral_out", self._take_referral),
                ("acceptance_out", self._take_acceptance),
                ("return_out", self._take_return),
            ):
                self._poll_table(logical, take)
            self._poll_cancels()
            if vz.RECORD in self.fm:  # after acceptances: an admission may name the referral
                self._poll_table("visit_out", self._take_visit)
            if hz.RECORD in self.fm:
                self._poll_table("consult_out", self._take_consult)
            if hz.RESUBMIT in self.fm:  # after requests: a resubmission names one
                self._poll_table("consult_resubmit_out", self._take_consult_resubmit)
            self._poll_cancels("consult_out", hz.CANCEL, self._take_consult_cancel)
            self.ok()
        except SQLAlchemyError as exc:  # the vendor database, not the node's
            self.failed(f"vendor database: {type(exc).__name__}")
            raise StoreError(f"vendor database unavailable ({type(exc).__name__})") from exc
        except HutongError as exc:
            self.failed(exc.code)
            raise

    def _poll_table(self, logical: str, take: Any) -> None:
        table = self.table(logical)
        if table is None:
            return
        store = self.host.state
        wm = Watermark.load(store, table.name)
        idc = table.c[self.opts.id_column]
        cond = idc > wm.high
        if wm.holes:
            cond = or_(cond, idc.in_(sorted(wm.holes)))
        with self.engine.connect() as conn:
            rows = [
                dict(r._mapping)
                for r in conn.execute(
                    select(table).where(cond).order_by(idc).limit(self.opts.batch)
                )
            ]
        if rows:
            faults.point("his_db.after_poll")
        for row in rows:
            rid = int(row[self.opts.id_column])
            take(table, rid, row)
            now = self.host.now()
            wm.taken(rid, now)
            wm.save(store, now)
        expired = wm.expire(self.host.now(), self.opts.hole_keep_s)
        if expired:
            wm.save(store, self.host.now())
            self.count("holes_expired", len(expired))
            log.info(
                "adapter %s: %d id(s) of %s never committed, no longer watched",
                self.name,
                len(expired),
                table.name,
            )

    def _poll_cancels(
        self, logical: str = "referral_out", record: str = cx.RECORD, take: Any = None
    ) -> None:
        """Referral rows (or, with ``logical``/``record``/``take``, consultation rows) the HIS
        marked withdrawn, by their withdrawal number (watermark and holes as for new rows: the
        number comes from a sequence, so it can commit late)."""
        table = self.table(logical)
        o = self.opts
        take = take or self._take_cancel
        if (
            table is None
            or record not in self.fm
            or o.cancel_seq_column not in table.c
            or o.status_column not in table.c
        ):
            return
        store = self.host.state
        wm = Watermark.load(store, f"{table.name}:cancel")
        seq = table.c[o.cancel_seq_column]
        cond = seq > wm.high
        if wm.holes:
            cond = or_(cond, seq.in_(sorted(wm.holes)))
        with self.engine.connect() as conn:
            rows = [
                dict(r._mapping)
                for r in conn.execute(
                    select(table)
                    .where(cond, table.c[o.status_column] == o.cancelled_value)
                    .order_by(seq)
                    .limit(o.batch)
                )
            ]
        for row in rows:
            take(table, int(row[o.id_column]), row)
            now = self.host.now()
            wm.taken(int(row[o.cancel_seq_column]), now)
            wm.save(store, now)
        if wm.expire(self.host.now(), o.hole_keep_s):
            wm.save(store, self.host.now())

    def _decode(self, row: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for column, value in row.items():
            if isinstance(value, bytes | memoryview):
                try:
                    value = bytes(value).decode(self.opts.encoding)
                except UnicodeDecodeError:
                    raise sf.BadEncoding(
                        column, f"bytes do not decode as {self.opts.encoding}"
                    ) from None
            if isinstance(value, str):
                value = value.strip()  # str.strip() also removes U+3000 padding
            out[column] = value
        return out

    def _column(self, record: str, field: str) -> str:
        head = field.split("[", 1)[0].split(".")[-1]
        for rule in self.fm[record].rules:
            if rule.field in (field, head):
                return rule.column or field
        return field

    def _guard(
        self,
        table: Table,
        rid: int,
        row: dict[str, Any],
        record: str,
        work: Any,
        replay: bool = False,
        suffix: str = "",
    ) -> None:
        """Run ``work``; a permanent failure quarantines the row (naming column), then go on.

        ``replay``: the row comes from a quarantine replay; a failure is raised (its message
        naming record and column) instead of being quarantined a second time.
        """
        key = f"{table.name}:{rid}{suffix}"
        if self.host.seen(key) is not None:
            return  # taken before a crash that came before the watermark was saved
        gaps: list[Any] = []
        where, column = f"{table.name}#{rid}", None
        try:
            work(key, gaps)
        except FieldMapError as exc:
            column = exc.column or exc.field
            error: HutongError = exc
        except sf.SlipError as exc:
            column = exc.field if exc.field.isupper() else self._column(record, exc.field)
            error = exc
            where = getattr(exc, "record", None) or where
        except MissingConsent as exc:
            column = self._column(hz.RECORD if record == hz.RECORD else "referral", "consent_by")
            error = exc
        except UnknownReference as exc:
            error = exc
            column = (
                self.opts.visit_referral_column
                if record == vz.RECORD
                else self._column(
                    record,
                    {"referral": "to_member", hz.RECORD: "shared_results"}.get(record, "slip_no"),
                )
            )
        except IllegalTransition as exc:  # e.g. a withdrawal after the patient arrived
            error = exc
            column = self.opts.status_column if record in (cx.RECORD, hz.CANCEL) else None
        except HutongError as exc:
            if exc.retry is not Retry.PERMANENT:
                raise
            error = exc
        except SQLAlchemyError:
            raise
        except Exception as exc:  # noqa: BLE001 - one odd row must not stop the others
            error = HutongError(f"cannot read the record ({type(exc).__name__})")
        else:
            faults.point("his_db.after_submit")
            if gaps:
                self.host.record_gaps(gaps)
            self.count(f"{record}_sent")
            return
        if replay:
            raise named(error, where, column)
        self.count(f"{record}_quarantined")
        marks = {TABLE_KEY: table.name, **({RECORD_KEY: record} if suffix else {})}
        raw = orjson.dumps({**marks, **{str(k): v for k, v in row.items()}}, default=_jsonable)
        nid = row.get(self._column(record, "id_number")) if record in self.fm else None
        self.host.quarantine(
            error,
            raw=raw,
            record=where,
            field=column,
            kind=f"his-db.{record}",
            national_id=str(nid) if nid not in (None, "") else None,
        )
        faults.point("his_db.after_quarantine")

    def _check_duplicate(self, table: Table, rid: int, record: str, slip_no: str) -> None:
        column = self._column(record, "slip_no")
        with self.engine.connect() as conn:
            earlier = (
                conn.execute(
                    select(table.c[self.opts.id_column])
                    .where(table.c[column] == slip_no, table.c[self.opts.id_column] != rid)
                    .order_by(table.c[self.opts.id_column])
                )
                .scalars()
                .all()
            )
        for other in earlier:
            if self.host.seen(f"{table.name}:{other}") is not None:
                raise sf.DuplicateRecord(
                    column, f"slip number already sent as {table.name}#{other} (duplicate row)"
                )

    def _take_referral(
        self, table: Table, rid: int, row: dict[str, Any], replay: bool = False
    ) -> None:
        def work(key: str, gaps: list[Any]) -> None:
            slip = _slip(ReferralSlip, self.fm["referral"].apply(self._decode(row)))
            self._check_duplicate(table, rid, "referral", slip.slip_no)
            bundle = sf.referral_bundle(
                slip,
                self.host.maps,
                self.me,
                gaps=gaps,
                national_id_system=self.host.plan.alliance.national_id_system,
            )
            self.host.submit_referral(bundle, source_key=key)

        self._guard(table, rid, row, "referral", work, replay)

    def _thread(self, row: dict[str, Any], record: str, slip_no: str) -> str:
        thread = str(row.get(self.opts.thread_column) or "").strip()
        inbox = self.table("referral_in")
        if not thread and inbox is not None:
            with self.engine.connect() as conn:
                thread = str(
                    conn.execute(
                        select(inbox.c[self.opts.thread_column])
                        .where(inbox.c[self._column("referral", "slip_no")] == slip_no)
                        .order_by(inbox.c[self.opts.id_column].desc())
                    ).scalar()
                    or ""
                )
        if not thread or self.host.referral(thread) is None:
            raise UnknownReference(
                f"no referral received here for this slip ({self.opts.thread_column} / slip number)"
            )
        return thread

    def _take_acceptance(
        self, table: Table, rid: int, row: dict[str, Any], replay: bool = False
    ) -> None:
        def work(key: str, gaps: list[Any]) -> None:
            slip = _slip(AcceptanceSlip, self.fm["acceptance"].apply(self._decode(row)))
            thread = self._thread(row, "acceptance", slip.slip_no)
            if slip.accepted:
                outputs = sf.acceptance_outputs(slip, self.host.maps, me=self.me, gaps=gaps)
                self.host.referral_step(thread, "accept", source_key=key, outputs=outputs)
            else:
                if not slip.reason:
                    raise sf.MissingField("reason", "a rejection needs a reason")
                self.host.referral_step(thread, "reject", source_key=key, reason=slip.reason)

        self._guard(table, rid, row, "acceptance", work, replay)

    def _lines(self, logical: str, record: str, rid: int) -> list[Any]:
        table = self.table(logical)
        if table is None:
            return []
        with self.engine.connect() as conn:
            rows = [
                dict(r._mapping)
                for r in conn.execute(
                    select(table)
                    .where(table.c[self.opts.line_parent_column] == rid)
                    .order_by(table.c[self.opts.line_order_column])
                )
            ]
        out = []
        for line in rows:
            try:
                out.append(_slip(RECORDS[record], self.fm[record].apply(self._decode(line))))
            except (FieldMapError, sf.SlipError) as exc:
                column = getattr(exc, "column", None) or exc.field
                err = sf.BadValue(column, exc.message)
                err.record = f"{table.name}#{line[self.opts.id_column]}"  # type: ignore[attr-defined]
                raise err from None
        return out

    def _take_return(
        self, table: Table, rid: int, row: dict[str, Any], replay: bool = False
    ) -> None:
        def work(key: str, gaps: list[Any]) -> None:
            slip = _slip(ReturnSlip, self.fm["return"].apply(self._decode(row)))
            slip.prescriptions = self._lines("return_out_drugs", "prescription", rid)
            slip.results = self._lines("return_out_labs", "lab_result", rid)
            thread = self._thread(row, "return", slip.slip_no)
            view = self.host.referral(thread)
            ref = view["referral"]
            if ref["status"] == "accepted":  # the return shows the patient came
                self.host.referral_step(thread, "arrive", source_key=f"{key}:arrive")
            task = self.host.resource("Task", ref["task_id"])
            bundle = sf.return_bundle(
                slip, ref["sr_id"], task["for"]["reference"], self.host.maps, me=self.me, gaps=gaps
            )
            self.host.submit_referral(bundle, source_key=key)

        self._guard(table, rid, row, "return", work, replay)

    def _take_cancel(
        self, table: Table, rid: int, row: dict[str, Any], replay: bool = False
    ) -> None:
        def work(key: str, gaps: list[Any]) -> None:
            slip = _slip(cx.CancelSlip, self.fm[cx.RECORD].apply(self._decode(row)))
            thread = self.host.thread_for(f"{table.name}:{rid}")
            if thread is None:
                raise UnknownReference(
                    f"no referral was sent for this row (slip "
                    f"{slip.slip_no}), so there is none to withdraw"
                )
            self.host.referral_step(thread, "cancel", source_key=key, reason=slip.reason)

        self._guard(table, rid, row, cx.RECORD, work, replay, suffix=":cancel")

    def _take_visit(
        self, table: Table, rid: int, row: dict[str, Any], replay: bool = False
    ) -> None:
        vz.take(self, table, rid, row, replay)

    def _take_consult(
        self, table: Table, rid: int, row: dict[str, Any], replay: bool = False
    ) -> None:
        hz.take(self, table, rid, row, replay)

    def _take_consult_resubmit(
        self, table: Table, rid: int, row: dict[str, Any], replay: bool = False
    ) -> None:
        hz.take_resubmit(self, table, rid, row, replay)

    def _take_consult_cancel(
        self, table: Table, rid: int, row: dict[str, Any], replay: bool = False
    ) -> None:
        hz.take_cancel(self, table, rid, row, replay)

    # -- quarantine replay --------------------------------------------------------------------

    def replay(self, raw: bytes) -> str:
        """A quarantined row through intake again (``hutong quarantine replay``, the local API).

        The site's maps are re-read first (IT added a code to a CSV); the row is re-read from
        the vendor table by its id (the HIS may have corrected it), or taken from the kept copy
        if the HIS deleted it. Same source key as a polled row, so a row already taken is not
        sent twice. Still refused: the error is raised naming record and column (the item
        stays held; nothing is quarantined again). Returns a line for IT (no patient data).
        """
        if self.engine is None:
            from bridge.errors import TransportError

            raise TransportError(f"adapter '{self.name}' is not started")
        name, kept = kept_row(raw)
        withdrawal = kept_record(raw) in (cx.RECORD, hz.CANCEL)
        with self._lock:
            self.host.reload_maps()
            try:
                logical, table = self._source_table(name, kept)
                rid = int(kept[self.opts.id_column])
                record = f"{table.name}#{rid}"
                if (
                    self.host.seen(f"{table.name}:{rid}{':cancel' if withdrawal else ''}")
                    is not None
                ):
                    self.count("replayed")
                    return f"{record} was already taken"
                with self.engine.connect() as conn:
                    fresh = conn.execute(
                        select(table).where(table.c[self.opts.id_column] == rid)
                    ).first()
            except SQLAlchemyError as exc:
                self.failed(f"vendor database: {type(exc).__name__}")
                raise StoreError(f"vendor database unavailable ({type(exc).__name__})") from exc
            except (KeyError, TypeError, ValueError):
                raise BadQuarantineItem(
                    f"the held item has no usable {self.opts.id_column}"
                ) from None
            if fresh is None and logical == "return_out" and not withdrawal:
                # its drug and lab lines are separate rows, gone with it and not kept: a
                # return slip without them would reach the GP incomplete
                raise BadQuarantineItem(
                    f"{record} is gone from the HIS and a return slip's "
                    "drug and lab lines are not kept: enter it again in "
                    "the HIS"
                )
            row = dict(fresh._mapping) if fresh is not None else kept
            take = {
                "referral_out": self._take_referral,
                "acceptance_out": self._take_acceptance,
                "return_out": self._take_return,
                "visit_out": self._take_visit,
                "consult_out": self._take_consult,
                "consult_resubmit_out": self._take_consult_resubmit,
            }[logical]
            if withdrawal:
                take = self._take_consult_cancel if logical == "consult_out" else self._take_cancel
            try:
                take(table, rid, row, replay=True)
            except SQLAlchemyError as exc:
                self.failed(f"vendor database: {type(exc).__name__}")
                raise StoreError(f"vendor database unavailable ({type(exc).__name__})") from exc
            except HutongError as exc:
                raise named(exc, record, None) from None
        self.count("replayed")
        source = (
            "row re-read from the HIS"
            if fresh is not None
            else "kept copy: the row is gone from the HIS"
        )
        return f"{record} taken ({source})"

    def _source_table(self, name: str | None, kept: dict[str, Any]) -> tuple[str, Table]:
        """The outbound table a held row came from: named in the item, or (items kept before
        the name was recorded) the one whose columns are exactly the row's."""
        for logical in (
            "referral_out",
            "acceptance_out",
            "return_out",
            "visit_out",
            "consult_out",
            "consult_resubmit_out",
        ):
            table = self.table(logical)
            if table is None:
                continue
            if table.name == name or (name is None and set(table.c.keys()) == set(kept)):
                return logical, table
        raise BadQuarantineItem(
            f"the held row's table {name or '(not recorded)'} is not an "
            "outbound table of this adapter"
        )

    # -- sink side ----------------------------------------------------------------------------

    def on_referral(self, ev: ReferralEvent) -> None:
        """A referral step the workflow applied: the slip written into the inbox tables."""
        item, event, view, side = ev.packet, ev.event, ev.view, ev.side
        gaps: list[Any] = []
        try:
            if event == "request" and side == "receiver":
                self._write_referral(item, view, gaps)
            elif event in ("accept", "reject") and side == "referrer":
                self._write_acceptance(item, view, ev.task, gaps)
            elif event == "return" and side == "referrer":
                self._write_return(item, view, gaps)
            elif event == "cancel" and side == "receiver":
                if not self._write_cancel(item, view):
                    return
            else:
                self.count("ignored")
                return
        except SQLAlchemyError as exc:
            self.failed(f"vendor database: {type(exc).__name__}")
            raise StoreError(f"vendor database write failed ({type(exc).__name__})") from exc
        if gaps:
            self.host.record_gaps(gaps)
        self.count(f"{event}_written")
        self.ok()

    def on_consult(self, ev: ConsultEvent) -> None:
        """A consultation step the centre took (and its released report): into the inbox
        tables of the inviting HIS (:mod:`adapters.his_db.consult`)."""
        try:
            written = hz.on_consult(self, ev)
        except SQLAlchemyError as exc:
            self.failed(f"vendor database: {type(exc).__name__}")
            raise StoreError(f"vendor database write failed ({type(exc).__name__})") from exc
        self.count(f"consult_{ev.event}_written" if written else "ignored")
        self.ok()

    def _vendor_row(self, table: Table, record: str, slip: Any) -> dict[str, Any]:
        values = self.fm[record].unapply(asdict(slip))
        out: dict[str, Any] = {}
        for column, value in values.items():
            if column not in table.c:
                continue
            out[column] = (
                value.encode(self.opts.encoding)
                if isinstance(table.c[column].type, LargeBinary)
                else value
            )
        return out

    def _stamp(self, table: Table, item: Delivery) -> dict[str, Any]:
        extra = {
            self.opts.packet_column: item.packet_id,
            self.opts.thread_column: item.thread,
            self.opts.received_at_column: self.host.now()
            .astimezone(CHINA)
            .strftime("%Y%m%d%H%M%S"),
        }
        return {k: v for k, v in extra.items() if k in table.c}

    def _insert_once(
        self,
        table: Table,
        item: Delivery,
        values: dict[str, Any],
        lines: list[tuple[Table, list[dict[str, Any]]]] | None = None,
    ) -> None:
        """One transaction; a packet already written (unique packet column) is left alone."""
        try:
            with self.engine.begin() as conn:
                head = conn.execute(insert(table).values(**values, **self._stamp(table, item)))
                parent = head.inserted_primary_key[0]
                for line_table, rows in lines or []:
                    for n, line in enumerate(rows, 1):
                        conn.execute(
                            insert(line_table).values(
                                **line,
                                **{
                                    self.opts.line_parent_column: parent,
                                    self.opts.line_order_column: n,
                                },
                            )
                        )
        except IntegrityError:
            with self.engine.connect() as conn:
                there = conn.execute(
                    select(table.c[self.opts.id_column]).where(
                        table.c[self.opts.packet_column] == item.packet_id
                    )
                ).first()
            if there is None:
                raise
            self.count("redelivered")

    def _write_referral(self, item: Delivery, view: dict[str, Any], gaps: list[Any]) -> None:
        table = self._need("referral_in")
        ref = view["referral"]
        task = next(
            (
                r
                for r in view["resources"]
                if r["resourceType"] == "Task" and r["id"] == ref["task_id"]
            ),
            None,
        )
        patient = None
        if task is not None:
            pid = task["for"]["reference"].split("/", 1)[1]
            if not any(
                r["resourceType"] == "Patient" and r["id"] == pid for r in view["resources"]
            ):
                patient = self.host.resource("Patient", pid)
        slip = sf.referral_from_fhir(view, self.host.maps, patient=patient, me=self.me, gaps=gaps)
        self._insert_once(table, item, self._vendor_row(table, "referral", slip))

    def _write_cancel(self, item: Delivery, view: dict[str, Any]) -> bool:
        """Mark the received referral withdrawn, if the cancellation was confirmed here (not
        when refused: the patient arrived). Idempotent: a row already marked is left alone."""
        ref, o = view["referral"], self.opts
        if ref["status"] != "cancelled":
            self.count("cancel_refused")
            return False
        table = self._need("referral_in")
        values: dict[str, Any] = {}
        if cx.RECORD in self.fm:
            at = ref.get("updated_at")
            values = self.fm[cx.RECORD].unapply(
                {"reason": ref.get("reason") or "", "cancelled_at": at.isoformat() if at else ""}
            )
        values[o.status_column] = o.cancelled_value
        values[o.read_flag_column] = "0"  # unread: the doctor must see it
        values = {k: v for k, v in values.items() if k in table.c}
        if o.status_column not in values:
            self.count("cancel_not_written")  # the vendor table has no status column
            return False
        status, lsh = table.c[o.status_column], table.c[o.thread_column]
        with self.engine.begin() as conn:
            n = conn.execute(
                update(table)
                .where(lsh == item.thread, or_(status.is_(None), status != o.cancelled_value))
                .values(**values)
            ).rowcount
            there = (
                n
                or conn.execute(select(table.c[o.id_column]).where(lsh == item.thread)).first()
                is not None
            )
        if not there:
            raise HutongError(
                f"no received referral row with {o.thread_column} of this thread to mark withdrawn"
            )
        if not n:
            self.count("redelivered")
            return False
        return True

    def _slip_no(self, view: dict[str, Any]) -> str:
        sr = next(
            (
                r
                for r in view["resources"]
                if r["resourceType"] == "ServiceRequest" and r["id"] == view["referral"]["sr_id"]
            ),
            {},
        )
        return sf.slip_no_of(sr)

    def _write_acceptance(
        self, item: Delivery, view: dict[str, Any], task: dict[str, Any], gaps: list[Any]
    ) -> None:
        table = self._need("acceptance_in")
        slip = sf.acceptance_from_task(
            task, self._slip_no(view), self.host.maps, me=self.me, gaps=gaps
        )
        self._insert_once(table, item, self._vendor_row(table, "acceptance", slip))

    def _write_return(self, item: Delivery, view: dict[str, Any], gaps: list[Any]) -> None:
        table = self._need("return_in")
        slip = sf.return_from_fhir(view, self.host.maps, me=self.me, gaps=gaps)
        lines = []
        for logical, record, items in (
            ("return_in_drugs", "prescription", slip.prescriptions),
            ("return_in_labs", "lab_result", slip.results),
        ):
            line_table = self.table(logical)
            if line_table is not None:
                lines.append((line_table, [self._vendor_row(line_table, record, x) for x in items]))
        self._insert_once(table, item, self._vendor_row(table, "return", slip), lines)

    # -- lab results from other members -------------------------------------------------------

    def _result_maps(self, *records: tuple[str, type]) -> None:
        """The results field maps, loaded on the first result (sites without them still run)."""
        for record, cls in records:
            if record not in self.fm:
                self.fm[record] = load_field_map(self.opts.fields, record, fields=cls)

    def _patient_id(self, view: dict[str, Any] | None) -> str:
        """The HIS's own record number of the patient of a referral or a consultation thread
        ("" if it has none here)."""
        if view is None:
            return ""
        task = self.host.resource("Task", (view.get("referral") or view["consultation"])["task_id"])
        patient = self.host.resource("Patient", task["for"]["reference"].split("/", 1)[1])
        return sf._mrn(patient, self.me)

    def on_result(self, ev: ResultEvent) -> None:
        """Results from another member, as the node stored them: into the results tables."""
        item, view, body = ev.packet, ev.view, ev.bundle
        if item.kind not in ("result.lab", "result.imaging"):
            self.count("ignored")
            return
        gaps: list[Any] = []
        codes = sf.Codes(self.host.maps, self.me, gaps)
        slip_no = self._slip_no(view) if view is not None else ""
        write: Any
        if item.kind == "result.lab":
            self._result_maps(("lab_report", LabReport), ("lab_report_item", LabReportItem))
            reports: list[Any] = reports_from_bundle(
                body, codes, slip_no=slip_no, sender=item.sender
            )
            write = self._write_reports
        else:
            self._result_maps(("imaging_report", ImagingReport))
            reports = imaging_reports_from_bundle(
                with_local_studies(body, self.host),
                codes,
                slip_no=slip_no,
                sender=item.sender,
                patient_id=self._patient_id(view),
            )
            write = self._write_imaging
        if not reports:
            self.count("ignored")
            return
        try:
            written = write(item, reports)
        except SQLAlchemyError as exc:
            self.failed(f"vendor database: {type(exc).__name__}")
            raise StoreError(f"vendor database write failed ({type(exc).__name__})") from exc
        if gaps and written:
            self.host.record_gaps(gaps)
        self.count("results_written" if written else "redelivered")
        self.ok()

    def _write_reports(self, item: Delivery, reports: list[LabReport]) -> bool:
        """Upsert the packet's reports and lines in one transaction; False if already written."""
        head, lines = self._need("results_in"), self._need("results_in_items")
        lid = lines.c[self.opts.id_column]
        line_key = lines.c[self._column("lab_report_item", "result_id")]
        with self.engine.begin() as conn:
            if self._packet_written(conn, head, item):
                return False
            for report in reports:
                parent = self._upsert_report(conn, head, "lab_report", report, item)
                for n, result in enumerate(report.items, 1):
                    row = {
                        **self._vendor_row(lines, "lab_report_item", result),
                        self.opts.result_parent_column: parent,
                    }
                    there = conn.execute(select(lid).where(line_key == result.result_id)).scalar()
                    if there is None:
                        conn.execute(
                            insert(lines).values(**row, **{self.opts.line_order_column: n})
                        )
                    else:
                        conn.execute(update(lines).where(lid == there).values(**row))
        return True

    def _packet_written(self, conn: Any, head: Table, item: Delivery) -> bool:
        return (
            conn.execute(
                select(head.c[self.opts.id_column]).where(
                    head.c[self.opts.packet_column] == item.packet_id
                )
            ).first()
            is not None
        )

    def _upsert_report(
        self, conn: Any, head: Table, record: str, report: Any, item: Delivery
    ) -> Any:
        """Insert a report row, or update the row of the same report id (a correction, or more
        results): unread again and, if the table keeps one, its version + 1. Returns the id."""
        hid, flag, version = (
            head.c[self.opts.id_column],
            self.opts.read_flag_column,
            self.opts.version_column,
        )
        values = self._vendor_row(head, record, report)
        values.update(
            {self.opts.packet_column: item.packet_id, self.opts.thread_column: item.thread}
        )
        if flag in head.c:
            values[flag] = "0"  # unread (again, after a correction)
        values = {k: v for k, v in values.items() if k in head.c}
        key = head.c[self._column(record, "report_id")]
        parent = conn.execute(select(hid).where(key == report.report_id)).scalar()
        if parent is None:
            if version in head.c:
                values[version] = 1
            return conn.execute(
                insert(head).values({**values, **self._stamp(head, item)})
            ).inserted_primary_key[0]
        if version in head.c:
            values[version] = head.c[version] + 1
        conn.execute(update(head).where(hid == parent).values(**values))
        return parent

    def _write_imaging(self, item: Delivery, reports: list[ImagingReport]) -> bool:
        """Upsert the packet's imaging reports in one transaction; False if already written."""
        head = self._need("imaging_in")
        with self.engine.begin() as conn:
            if self._packet_written(conn, head, item):
                return False
            for report in reports:
                self._upsert_report(conn, head, "imaging_report", report, item)
        return True

    def _need(self, logical: str) -> Table:
        table = self.table(logical)
        if table is None:
            raise HutongError(f"vendor table {getattr(self.opts.tables, logical)} is missing")
        return table
