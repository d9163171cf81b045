"""A vendor HIS with its own intermediate database (中间库), as hospitals actually run them.

The vendor's conventions (hard-coded here on purpose: this is the vendor, not Hutong) are what
the site's field maps (``simulators/his_db_fields/*.csv``) must describe:

* outbound tables the HIS writes and the adapter polls: ``ZZ_SQD`` 转诊申请单 (referrals sent),
  ``ZZ_JZD`` 接诊单 (acceptances of referrals received), ``ZZ_ZHD`` 转回单 (returns) with lines
  ``ZZ_ZHD_YP`` (drugs) and ``ZZ_ZHD_JY`` (lab results);
* inbox tables the adapter writes: ``ZZ_JS_SQD``, ``ZZ_JS_JZD``, ``ZZ_JS_ZHD`` (+ ``_YP``,
  ``_JY``), and lab results from other members ``ZZ_JS_JYBG`` (+ ``_MX`` lines, updated in
  place by the report's and the result's ids when a correction comes) and imaging reports
  ``ZZ_JS_JCBG`` (检查报告, updated in place by the report's id); the slip tables each
  with a unique ``XXID`` (the packet id: a re-delivery never adds a row) and ``LSH``
  (流水号: the referral thread, which the HIS copies into its acceptance and return);
* consultations (远程会诊): outbound ``ZZ_HZSQ`` 会诊申请 and ``ZZ_HZBC`` 补充资料, inbox
  ``ZZ_JS_HZZT`` 会诊状态 (one row per step the centre took) and ``ZZ_JS_HZBG`` 会诊报告 (the
  released report, the PDF of an imaging reading in ``BGWJ``): see the tables below;
* pinyin column names, 性别 ``XB`` 1/2/9, dates ``CSRQ`` as ``yyyyMMdd`` text, times ``TXSJ``
  as ``yyyyMMddHHmmss`` (China time), flags 1/0, referral type ``ZZLX`` 1..5;
* row ids come from a sequence table ``ZZ_XH`` (like an Oracle sequence), so an id can be taken
  early and its row committed after rows with higher ids ("late commit");
* states: outbound slips carry ``ZT`` (状态: 1 valid, 9 withdrawn/作废). A referral the doctor
  withdraws (患者/家属撤回) keeps its row: ``ZT`` becomes ``9`` with ``CXSJ`` (撤销时间), ``CXYY``
  (撤销原因) and ``CXXH`` (撤销序号, from ``ZZ_XH`` like an update trigger's sequence), so the
  adapter finds withdrawals the way it finds new rows. A received referral that the referrer
  withdrew is marked the same way in ``ZZ_JS_SQD`` (``ZT`` 9, ``CXSJ``, ``CXYY``, ``CLBZ`` back
  to 0 = unread);
* GBK era: ``BLZY`` (病历摘要) and ``ZLJG`` (诊疗经过) are BLOBs holding GBK bytes, and CHAR
  columns come padded with full-width spaces (U+3000);
* visits (就诊记录 ``ZZ_JZJL``, outbound): the admission office and the outpatient registry
  write one row per event of a visit, as the vendor's triggers on 住院登记/门诊挂号 copy them
  out (ids from ``ZZ_XH``, so late commits happen here too): ``JZH`` 就诊号 (the visit number:
  住院号 + 次数 or 门诊流水号, the same on every row of a visit), ``BLH`` 病历号, the patient
  (``HZXM`` padded, ``XB``, ``CSRQ``, ``SFZH``, ``LXDH``), ``JZLX`` 就诊类型 (1 门诊, 2 急诊,
  3 住院), ``SJLX`` 事件类型 (1 入院登记, 2 转科/转床, 3 出院, 4 信息修改, 5 取消入院/退号,
  6 取消转科, 7 取消出院, 8 门急诊挂号), ``KSDM`` 科室代码 (the visit's department after the
  event), ``BQMC`` 病区名称 (a GBK BLOB), ``CWH`` 床位号, ``RYSJ`` 入院/挂号时间 (on every
  row), ``ZKSJ`` 转科时间 (transfer rows), ``CYSJ`` 出院时间 (discharge rows and after), ``ZT``
  就诊状态 after the event (0 候诊, 1 在院/就诊中, 2 已出院/已结束, 9 作废), ``YSXM`` 主治医生,
  ``CZSJ`` 操作时间 (when the clerk saved it), and ``ZZDH`` 转诊单号: the referrer's slip
  number of a referral this hospital received (``ZZ_JS_SQD.ZZDH``), which the admission clerk
  copies into the admission of a referred patient (empty otherwise).

CLI (a clinician-simulating process)::

    python -m simulators.his_db --dsn sqlite:///his.db init
    python -m simulators.his_db --dsn ... refer --json slip.json [--late-hold-s 5]
    python -m simulators.his_db --dsn ... received      # inbox referrals as JSON lines
    python -m simulators.his_db --dsn ... consult --json slip.json   # a 会诊申请 row (ZZ_HZSQ)
    python -m simulators.his_db --dsn ... consult-records --json records.json  # 补充资料
    python -m simulators.his_db --dsn ... consult-states   # ZZ_JS_HZZT rows as JSON lines
    python -m simulators.his_db --dsn ... consult-reports  # ZZ_JS_HZBG rows (PDF: its size)

``refer --late-hold-s N`` allocates the id, then holds the row for N seconds before committing
it (meanwhile other writers commit rows with higher ids).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, fields
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Column,
    Connection,
    Engine,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    insert,
    select,
    update,
)

from adapters.consult_slips import ConsultSlip, ResubmitSlip
from adapters.slips import AcceptanceSlip, LabResult, Prescription, ReferralSlip, ReturnSlip
from adapters.visits import IMPLIED_STATUS, Visit

CHINA = timezone(timedelta(hours=8))
PAD = "\u3000"  # full-width space: how GBK-era CHAR columns are padded
ENCODING = "gbk"
KIND_CODES = {
    "up-outpatient": "1",
    "up-inpatient": "2",
    "up-exam": "3",
    "down-outpatient": "4",
    "down-discharge": "5",
}
GENDER_CODES = {"male": "1", "female": "2", "unknown": "9", "other": "9"}

metadata = MetaData()


def _id(auto: bool = False) -> Column[int]:
    """Outbound ids come from ``ZZ_XH``; inbox ids are the database's own."""
    return Column("ID", Integer, primary_key=True, autoincrement=auto)


def _s(name: str, n: int = 64) -> Column[str]:
    return Column(name, String(n))


ZZ_XH = Table(
    "ZZ_XH",
    metadata,
    Column("MC", String(32), primary_key=True),
    Column("DQZ", Integer, nullable=False),
)

_REFERRAL_COLS = (
    "ZZDH",
    "ZZLX",
    "JSJG",
    "HZXM",
    "XB",
    "CSRQ",
    "SFZH",
    "LXDH",
    "BLH",
    "ZDDM",
    "ZDMC",
    "ZZYY",
    "KSDM",
    "JZBZ",
    "TYR",
    "YSXM",
    "TXSJ",
)


def _referral_table(name: str, inbox: bool) -> Table:
    cols: list[Any] = [_id(inbox), *(_s(c, 200 if c == "ZZYY" else 64) for c in _REFERRAL_COLS)]
    if inbox:
        cols += [
            Column("BLZY", Text),
            Column("XXID", String(64), unique=True, nullable=False),
            _s("LSH"),
            _s("JSSJ", 14),
            Column("CLBZ", String(1), default="0"),
        ]
    else:
        cols += [Column("BLZY", LargeBinary), Column("CXXH", Integer, index=True)]
    # ZT 1 valid / 9 withdrawn (撤销), with when and why
    cols += [
        Column("ZT", String(1), default="1", server_default="1"),
        _s("CXSJ", 14),
        _s("CXYY", 200),
    ]
    return Table(name, metadata, *cols)


ZZ_SQD = _referral_table("ZZ_SQD", inbox=False)
ZZ_JS_SQD = _referral_table("ZZ_JS_SQD", inbox=True)

_ACCEPT_COLS = ("ZZDH", "SFJS", "JJYY", "YYSJ", "KSDM", "CWH", "YSXM")


def _accept_table(name: str, inbox: bool) -> Table:
    extra = (
        [Column("XXID", String(64), unique=True, nullable=False), _s("JSSJ", 14)]
        if inbox
        else [Column("ZT", String(1), default="1")]
    )
    return Table(
        name,
        metadata,
        _id(inbox),
        _s("LSH"),
        *(_s(c, 200 if c == "JJYY" else 64) for c in _ACCEPT_COLS),
        *extra,
    )


ZZ_JZD = _accept_table("ZZ_JZD", inbox=False)
ZZ_JS_JZD = _accept_table("ZZ_JS_JZD", inbox=True)

_RETURN_COLS = ("ZZDH", "CYBZ", "ZDDM", "ZDMC", "KFZD", "YSXM", "TXSJ")


def _return_tables(name: str, inbox: bool) -> tuple[Table, Table, Table]:
    extra = (
        [
            Column("ZLJG", Text),
            Column("XXID", String(64), unique=True, nullable=False),
            _s("JSSJ", 14),
        ]
        if inbox
        else [Column("ZLJG", LargeBinary), Column("ZT", String(1), default="1")]
    )
    head = Table(
        name,
        metadata,
        _id(inbox),
        _s("LSH"),
        *(_s(c, 1000 if c == "KFZD" else 64) for c in _RETURN_COLS),
        *extra,
    )
    drugs = Table(
        f"{name}_YP",
        metadata,
        _id(inbox),
        Column("ZHD_ID", Integer, index=True),
        Column("XH", Integer),
        *(_s(c) for c in ("YPDM", "YPMC", "YL", "PC", "TS")),
    )
    labs = Table(
        f"{name}_JY",
        metadata,
        _id(inbox),
        Column("ZHD_ID", Integer, index=True),
        Column("XH", Integer),
        *(_s(c) for c in ("XMDM", "XMMC", "JG", "DW", "BZ", "CKFW")),
    )
    return head, drugs, labs


ZZ_ZHD, ZZ_ZHD_YP, ZZ_ZHD_JY = _return_tables("ZZ_ZHD", inbox=False)
ZZ_JS_ZHD, ZZ_JS_ZHD_YP, ZZ_JS_ZHD_JY = _return_tables("ZZ_JS_ZHD", inbox=True)

# lab results from another member (result.lab packets): one header row per report (BGID: the
# report's stable id, so a corrected report updates its row; XXID: the packet that wrote it
# last), one line per result (JGID: the result's stable id). CLBZ 0 = not yet read by the HIS
# (set back to 0 when a correction updates the row).
ZZ_JS_JYBG = Table(
    "ZZ_JS_JYBG",
    metadata,
    _id(True),
    Column("BGID", String(64), unique=True, nullable=False),
    Column("XXID", String(64), nullable=False),
    _s("LSH"),
    _s("ZZDH"),
    _s("FSJG", 32),
    _s("BGDM"),
    _s("BGMC"),
    _s("BGZT", 1),
    _s("CJSJ", 14),
    _s("BGSJ", 14),
    _s("JYJG", 100),
    Column("BGJL", Text),
    _s("JSSJ", 14),
    Column("CLBZ", String(1), default="0"),
)
ZZ_JS_JYBG_MX = Table(
    "ZZ_JS_JYBG_MX",
    metadata,
    _id(True),
    Column("BG_ID", Integer, index=True),
    Column("XH", Integer),
    Column("JGID", String(64), unique=True, nullable=False),
    *(_s(c) for c in ("XMDM", "XMMC", "JG", "DW", "CKFW", "BZ")),
    _s("JGZT", 1),
    _s("JCSJ", 14),
)

# imaging reports from another member (result.imaging, 检查结果互认): one row per report, keyed
# by BGID (the report's stable id: a corrected report updates its row, BBH + 1, CLBZ back to 0);
# BLH the HIS's own record number of the patient; DMXT the code system of JCDM when the exam
# could not be mapped to the HIS's own catalogue (the sender's code travels as it is).
ZZ_JS_JCBG = Table(
    "ZZ_JS_JCBG",
    metadata,
    _id(True),
    Column("BGID", String(64), unique=True, nullable=False),
    Column("XXID", String(64), nullable=False),
    _s("LSH"),
    _s("ZZDH"),
    _s("FSJG", 32),
    _s("BLH"),
    _s("JCDM"),
    _s("DMXT", 200),
    _s("JCMC", 100),
    _s("JCLX", 32),
    _s("JCBW", 100),
    _s("JCUID"),
    _s("BGZT", 1),
    _s("JCSJ", 14),
    _s("BGSJ", 14),
    Column("YXSJ", Text),
    Column("ZDYJ", Text),
    _s("BGYS", 32),
    Column("BBH", Integer),
    _s("JSSJ", 14),
    Column("CLBZ", String(1), default="0"),
)


# consultations (远程会诊, MDT, 远程影像诊断), issue 16. Outbound: ZZ_HZSQ 会诊申请 (ids from ZZ_XH;
# HZLX 1 普通会诊 general, 2 多学科会诊 MDT, 3 远程影像诊断 imaging reading; SQKS the requested
# specialties, ';'-separated department codes; ZT 9 with CXSJ/CXYY/CXXH a request the doctor
# withdrew, as a referral row is marked; TYR/TYSBH who signed the consent and its document
# number; JCUID the study to read; GXBG ids of shared reports, ';'-separated; HZWT/BLZY GBK
# BLOBs like the referral's summary) and ZZ_HZBC 补充资料 (the records the centre asked for,
# LSH copied from the status row that returned it). Inbox: ZZ_JS_HZZT 会诊状态 (one row per
# step the centre took: SJLX the event, HZZT the step, ZTSM what is missing / why cancelled,
# HZKS/HZJS the meeting, HZZJ the experts, SPLJ the video link) and ZZ_JS_HZBG 会诊报告 (one
# row per released report, keyed by BGID; BGWJ the PDF of an imaging reading).
ZZ_HZSQ = Table(
    "ZZ_HZSQ",
    metadata,
    _id(),
    _s("HZDH"),
    _s("HZLX", 1),
    _s("HZJG", 32),
    _s("HZXM", 32),
    _s("XB", 1),
    _s("CSRQ", 8),
    _s("SFZH", 18),
    _s("LXDH", 20),
    _s("BLH", 32),
    _s("ZDDM", 32),
    _s("ZDMC", 100),
    _s("HZMD", 200),
    Column("HZWT", LargeBinary),
    Column("BLZY", LargeBinary),
    _s("SQKS", 200),
    _s("JJBZ", 1),
    _s("TYR", 32),
    _s("TYSBH", 64),
    _s("JCUID", 64),
    _s("GXBG", 500),
    _s("YSXM", 32),
    _s("TXSJ", 14),
    Column("ZT", String(1), default="1", server_default="1"),
    _s("CXSJ", 14),
    _s("CXYY", 200),
    Column("CXXH", Integer, index=True),
)
ZZ_HZBC = Table(
    "ZZ_HZBC",
    metadata,
    _id(),
    _s("LSH"),
    _s("HZDH"),
    _s("ZLMC", 100),
    Column("ZLNR", LargeBinary),
    _s("YSXM", 32),
    _s("TXSJ", 14),
)
ZZ_JS_HZZT = Table(
    "ZZ_JS_HZZT",
    metadata,
    _id(True),
    Column("XXID", String(64), unique=True, nullable=False),
    _s("LSH"),
    _s("HZDH"),
    _s("SJLX", 32),
    _s("HZZT", 32),
    _s("RWZT", 32),
    Column("ZTSM", Text),
    _s("HZKS", 14),
    _s("HZJS", 14),
    Column("HZZJ", Text),
    _s("SPLJ", 500),
    _s("CZSJ", 14),
    _s("JSSJ", 14),
    Column("CLBZ", String(1), default="0"),
)
ZZ_JS_HZBG = Table(
    "ZZ_JS_HZBG",
    metadata,
    _id(True),
    Column("BGID", String(64), unique=True, nullable=False),
    Column("XXID", String(64), nullable=False),
    _s("LSH"),
    _s("HZDH"),
    _s("HZLX", 1),
    _s("BGZT", 1),
    _s("ZDDM", 32),
    _s("ZDMC", 100),
    Column("ZDMS", Text),
    Column("ZLJY", Text),
    _s("JYZZ", 1),
    _s("ZZJG", 32),
    Column("ZZSM", Text),
    Column("YXJL", Text),
    _s("JCUID"),
    Column("BGWJ", LargeBinary),
    _s("BGYS", 64),
    _s("BGSJ", 14),
    _s("JSSJ", 14),
    Column("CLBZ", String(1), default="0"),
)
CONSULT_KINDS = {"general": "1", "mdt": "2", "imaging-reading": "3"}


# visit events (就诊记录): one row per admission, registration, transfer, discharge, update or
# cancellation of a visit, ids from ZZ_XH; BQMC (病区名称) is a GBK BLOB like BLZY
ZZ_JZJL = Table(
    "ZZ_JZJL",
    metadata,
    _id(),
    _s("JZH", 32),
    _s("BLH", 32),
    _s("HZXM", 32),
    _s("XB", 1),
    _s("CSRQ", 8),
    _s("SFZH", 18),
    _s("LXDH", 20),
    _s("JZLX", 1),
    _s("SJLX", 1),
    _s("KSDM", 16),
    Column("BQMC", LargeBinary),
    _s("CWH", 16),
    _s("RYSJ", 14),
    _s("ZKSJ", 14),
    _s("CYSJ", 14),
    _s("ZT", 1),
    _s("YSXM", 32),
    _s("CZSJ", 14),
    _s("ZZDH", 64),
)
VISIT_EVENTS = {
    "admit": "1",
    "transfer": "2",
    "discharge": "3",
    "update": "4",
    "cancel-admit": "5",
    "cancel-transfer": "6",
    "cancel-discharge": "7",
    "register": "8",
}
VISIT_CLASSES = {"outpatient": "1", "emergency": "2", "inpatient": "3"}
VISIT_STATES = {"arrived": "0", "in-progress": "1", "finished": "2", "cancelled": "9"}


# -- vendor value conventions -----------------------------------------------------------------


def vendor_time(iso: str) -> str:
    return datetime.fromisoformat(iso).astimezone(CHINA).strftime("%Y%m%d%H%M%S") if iso else ""


def iso_time(text: str) -> str:
    return datetime.strptime(text, "%Y%m%d%H%M%S").replace(tzinfo=CHINA).isoformat() if text else ""


def padded(text: str, width: int) -> str:
    """A CHAR(n) column as the GBK-era HIS stores it: padded with full-width spaces."""
    return text + PAD * max(0, width - len(text))


def _clean(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode(ENCODING)
    return str(value).strip().strip(PAD)


class HisDb:
    """The vendor database: the HIS's writes (Python API for tests and the CLI) and reads."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.engine: Engine = create_engine(dsn)

    def close(self) -> None:
        self.engine.dispose()

    def init(self) -> HisDb:
        metadata.create_all(self.engine)
        return self

    @contextmanager
    def tx(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
            yield conn

    # -- ids ------------------------------------------------------------------------------------

    def allocate_id(self, table: str) -> int:
        """Take the next id for ``table`` from the sequence, committed at once (like nextval)."""
        with self.tx() as conn:
            cur = conn.execute(
                select(ZZ_XH.c.DQZ).where(ZZ_XH.c.MC == table).with_for_update()
            ).scalar()
            if cur is None:
                conn.execute(insert(ZZ_XH).values(MC=table, DQZ=1))
                return 1
            conn.execute(update(ZZ_XH).where(ZZ_XH.c.MC == table).values(DQZ=cur + 1))
            return int(cur) + 1

    # -- the referring doctor ---------------------------------------------------------------------

    def referral_row(self, slip: ReferralSlip) -> dict[str, Any]:
        """A referral slip as the vendor stores it (before any quirk a test adds)."""
        return {
            "ZZDH": slip.slip_no,
            "ZZLX": KIND_CODES.get(slip.kind, slip.kind),
            "JSJG": slip.to_member,
            "HZXM": padded(slip.patient_name, 10),
            "XB": GENDER_CODES.get(slip.gender, slip.gender),
            "CSRQ": slip.birth_date.replace("-", ""),
            "SFZH": slip.id_number,
            "LXDH": slip.phone,
            "BLH": slip.mrn,
            "ZDDM": slip.diagnosis_code,
            "ZDMC": slip.diagnosis_name,
            "ZZYY": slip.reason,
            "BLZY": slip.summary.encode(ENCODING),
            "KSDM": slip.department_code,
            "JZBZ": "1" if slip.urgent else "0",
            "TYR": slip.consent_by,
            "YSXM": slip.doctor,
            "TXSJ": vendor_time(slip.written_at),
            "ZT": "1",
        }

    def write_referral(
        self, slip: ReferralSlip | dict[str, Any], *, row_id: int | None = None, **override: Any
    ) -> int:
        """Insert one ``ZZ_SQD`` row (a slip, or raw vendor columns); returns its id."""
        row = self.referral_row(slip) if isinstance(slip, ReferralSlip) else dict(slip)
        row.update(override)
        rid = row_id if row_id is not None else self.allocate_id("ZZ_SQD")
        with self.tx() as conn:
            conn.execute(insert(ZZ_SQD).values(ID=rid, **row))
        return rid

    def cancel_referral(self, row_id: int, reason: str, *, at: str = "") -> int:
        """The doctor withdraws referral ``row_id`` (患者/家属撤回): ``ZT`` 9 with time, reason
        and a fresh ``CXXH`` from the sequence (again on a second edit); returns the CXXH."""
        seq = self.allocate_id("ZZ_SQD_CX")
        when = vendor_time(at) if at else datetime.now(CHINA).strftime("%Y%m%d%H%M%S")
        with self.tx() as conn:
            conn.execute(
                update(ZZ_SQD)
                .where(ZZ_SQD.c.ID == row_id)
                .values(ZT="9", CXSJ=when, CXYY=reason, CXXH=seq)
            )
        return seq

    # -- the admission office and the outpatient registry (visits) ---------------------------

    def visit_row(self, v: Visit) -> dict[str, Any]:
        """A visit event as the vendor stores it (before any quirk a test adds)."""
        status = v.status or IMPLIED_STATUS[v.event]
        return {
            "JZH": v.visit_no,
            "BLH": v.mrn,
            "HZXM": padded(v.patient_name, 10),
            "XB": GENDER_CODES.get(v.gender, v.gender),
            "CSRQ": v.birth_date.replace("-", ""),
            "SFZH": v.id_number,
            "LXDH": v.phone,
            "JZLX": VISIT_CLASSES.get(v.visit_class, v.visit_class),
            "SJLX": VISIT_EVENTS.get(v.event, v.event),
            "KSDM": v.department_code,
            "BQMC": v.ward.encode(ENCODING),
            "CWH": v.bed,
            "RYSJ": vendor_time(v.admitted_at),
            "ZKSJ": vendor_time(v.transferred_at),
            "CYSJ": vendor_time(v.discharged_at),
            "ZT": VISIT_STATES.get(status, status),
            "YSXM": v.doctor,
            "CZSJ": vendor_time(v.recorded_at) or datetime.now(CHINA).strftime("%Y%m%d%H%M%S"),
            "ZZDH": v.referral_no,
        }

    def write_visit(
        self, v: Visit | dict[str, Any], *, row_id: int | None = None, **override: Any
    ) -> int:
        """Insert one ``ZZ_JZJL`` row (a visit event, or raw vendor columns); returns its id."""
        row = self.visit_row(v) if isinstance(v, Visit) else dict(v)
        row.update(override)
        rid = row_id if row_id is not None else self.allocate_id("ZZ_JZJL")
        with self.tx() as conn:
            conn.execute(insert(ZZ_JZJL).values(ID=rid, **row))
        return rid

    def visit_rows(self, visit_no: str) -> list[dict[str, Any]]:
        """A visit's event rows as stored (padding stripped, BLOBs decoded), oldest first."""
        with self.engine.connect() as conn:
            return [
                {k: _clean(v) if k != "ID" else v for k, v in r._mapping.items()}
                for r in conn.execute(
                    select(ZZ_JZJL).where(ZZ_JZJL.c.JZH == visit_no).order_by(ZZ_JZJL.c.ID)
                )
            ]

    # -- the receiving doctor -----------------------------------------------------------------

    def received_rows(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return [
                dict(r._mapping) for r in conn.execute(select(ZZ_JS_SQD).order_by(ZZ_JS_SQD.c.ID))
            ]

    def received_referrals(self) -> list[ReferralSlip]:
        out = []
        for r in self.received_rows():
            kinds = {v: k for k, v in KIND_CODES.items()}
            out.append(
                ReferralSlip(
                    slip_no=_clean(r["ZZDH"]),
                    kind=kinds.get(_clean(r["ZZLX"]), ""),
                    to_member=_clean(r["JSJG"]),
                    patient_name=_clean(r["HZXM"]),
                    gender={"1": "male", "2": "female"}.get(_clean(r["XB"]), "unknown"),
                    birth_date=_date(_clean(r["CSRQ"])),
                    id_number=_clean(r["SFZH"]),
                    phone=_clean(r["LXDH"]),
                    mrn=_clean(r["BLH"]),
                    diagnosis_code=_clean(r["ZDDM"]),
                    diagnosis_name=_clean(r["ZDMC"]),
                    reason=_clean(r["ZZYY"]),
                    summary=_clean(r["BLZY"]),
                    department_code=_clean(r["KSDM"]),
                    urgent=_clean(r["JZBZ"]) == "1",
                    consent_by=_clean(r["TYR"]),
                    doctor=_clean(r["YSXM"]),
                    written_at=iso_time(_clean(r["TXSJ"])),
                )
            )
        return out

    def received_states(self) -> list[dict[str, str]]:
        """Each received referral's state as the receiving doctor's screen shows it: slip
        number, 流水号, ``ZT``, withdrawal time (ISO) and reason, and the unread flag."""
        return [
            {
                "slip_no": _clean(r["ZZDH"]),
                "thread": _clean(r["LSH"]),
                "state": _clean(r["ZT"]),
                "cancelled_at": iso_time(_clean(r["CXSJ"])),
                "reason": _clean(r["CXYY"]),
                "unread": _clean(r["CLBZ"]),
            }
            for r in self.received_rows()
        ]

    def thread_of(self, slip_no: str) -> str:
        """The 流水号 the adapter stored with a received referral (the HIS copies it)."""
        with self.engine.connect() as conn:
            return str(
                conn.execute(
                    select(ZZ_JS_SQD.c.LSH)
                    .where(ZZ_JS_SQD.c.ZZDH == slip_no)
                    .order_by(ZZ_JS_SQD.c.ID.desc())
                ).scalar()
                or ""
            )

    def accept(self, slip: AcceptanceSlip) -> int:
        rid = self.allocate_id("ZZ_JZD")
        with self.tx() as conn:
            conn.execute(
                insert(ZZ_JZD).values(
                    ID=rid,
                    LSH=self.thread_of(slip.slip_no),
                    ZZDH=slip.slip_no,
                    SFJS="1" if slip.accepted else "0",
                    JJYY=slip.reason,
                    YYSJ=vendor_time(slip.appointment_at),
                    KSDM=slip.department_code,
                    CWH=slip.bed_no,
                    YSXM=slip.doctor,
                    ZT="1",
                )
            )
        return rid

    def write_return(self, slip: ReturnSlip) -> int:
        rid = self.allocate_id("ZZ_ZHD")
        with self.tx() as conn:
            conn.execute(
                insert(ZZ_ZHD).values(
                    ID=rid,
                    LSH=self.thread_of(slip.slip_no),
                    ZZDH=slip.slip_no,
                    CYBZ="1" if slip.discharge else "0",
                    ZDDM=slip.diagnosis_code,
                    ZDMC=slip.diagnosis_name,
                    ZLJG=slip.course.encode(ENCODING),
                    KFZD=slip.advice,
                    YSXM=slip.doctor,
                    TXSJ=vendor_time(slip.written_at),
                    ZT="1",
                )
            )
            for n, p in enumerate(slip.prescriptions, 1):
                conn.execute(
                    insert(ZZ_ZHD_YP).values(
                        ID=rid * 1000 + n,
                        ZHD_ID=rid,
                        XH=n,
                        YPDM=p.drug_code,
                        YPMC=p.drug_name,
                        YL=p.dose,
                        PC=p.frequency,
                        TS=str(p.days),
                    )
                )
            for n, lab in enumerate(slip.results, 1):
                conn.execute(
                    insert(ZZ_ZHD_JY).values(
                        ID=rid * 1000 + n,
                        ZHD_ID=rid,
                        XH=n,
                        XMDM=lab.item_code,
                        XMMC=lab.item_name,
                        JG=lab.value,
                        DW=lab.unit,
                        BZ=lab.flag,
                        CKFW=lab.reference_range,
                    )
                )
        return rid

    # -- what came back to the referrer -------------------------------------------------------

    def received_acceptances(self) -> list[AcceptanceSlip]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(ZZ_JS_JZD).order_by(ZZ_JS_JZD.c.ID)).all()
        return [
            AcceptanceSlip(
                slip_no=_clean(r.ZZDH),
                accepted=_clean(r.SFJS) == "1",
                reason=_clean(r.JJYY),
                appointment_at=iso_time(_clean(r.YYSJ)),
                department_code=_clean(r.KSDM),
                bed_no=_clean(r.CWH),
                doctor=_clean(r.YSXM),
            )
            for r in rows
        ]

    def received_returns(self) -> list[ReturnSlip]:
        out = []
        with self.engine.connect() as conn:
            for r in conn.execute(select(ZZ_JS_ZHD).order_by(ZZ_JS_ZHD.c.ID)).all():
                drugs = conn.execute(
                    select(ZZ_JS_ZHD_YP)
                    .where(ZZ_JS_ZHD_YP.c.ZHD_ID == r.ID)
                    .order_by(ZZ_JS_ZHD_YP.c.XH)
                ).all()
                labs = conn.execute(
                    select(ZZ_JS_ZHD_JY)
                    .where(ZZ_JS_ZHD_JY.c.ZHD_ID == r.ID)
                    .order_by(ZZ_JS_ZHD_JY.c.XH)
                ).all()
                out.append(
                    ReturnSlip(
                        slip_no=_clean(r.ZZDH),
                        discharge=_clean(r.CYBZ) == "1",
                        diagnosis_code=_clean(r.ZDDM),
                        diagnosis_name=_clean(r.ZDMC),
                        course=_clean(r.ZLJG),
                        advice=_clean(r.KFZD),
                        doctor=_clean(r.YSXM),
                        written_at=iso_time(_clean(r.TXSJ)),
                        prescriptions=[
                            Prescription(
                                _clean(d.YPDM),
                                _clean(d.YPMC),
                                _clean(d.YL),
                                _clean(d.PC),
                                int(_clean(d.TS) or 0),
                            )
                            for d in drugs
                        ],
                        results=[
                            LabResult(
                                _clean(x.XMDM),
                                _clean(x.XMMC),
                                _clean(x.JG),
                                _clean(x.DW),
                                _clean(x.BZ),
                                _clean(x.CKFW),
                            )
                            for x in labs
                        ],
                    )
                )
        return out

    def received_results(self) -> list[dict[str, Any]]:
        """Lab reports written into ``ZZ_JS_JYBG`` with their lines (``items``), as the HIS
        stores them (vendor columns, padding stripped), oldest first, lines by ``XH``."""
        out = []
        with self.engine.connect() as conn:
            for r in conn.execute(select(ZZ_JS_JYBG).order_by(ZZ_JS_JYBG.c.ID)).all():
                head = {k: _clean(v) if k != "ID" else v for k, v in r._mapping.items()}
                head["items"] = [
                    {
                        k: _clean(v) if k not in ("ID", "BG_ID", "XH") else v
                        for k, v in x._mapping.items()
                    }
                    for x in conn.execute(
                        select(ZZ_JS_JYBG_MX)
                        .where(ZZ_JS_JYBG_MX.c.BG_ID == r.ID)
                        .order_by(ZZ_JS_JYBG_MX.c.XH)
                    ).all()
                ]
                out.append(head)
        return out

    def received_imaging(self) -> list[dict[str, Any]]:
        """Imaging reports written into ``ZZ_JS_JCBG`` (vendor columns, padding stripped)."""
        with self.engine.connect() as conn:
            return [
                {k: _clean(v) if k not in ("ID", "BBH") else v for k, v in r._mapping.items()}
                for r in conn.execute(select(ZZ_JS_JCBG).order_by(ZZ_JS_JCBG.c.ID)).all()
            ]

    # -- consultations (远程会诊) ----------------------------------------------------------------

    def consult_row(self, slip: ConsultSlip) -> dict[str, Any]:
        """A consultation request as the vendor stores it (before any quirk a test adds)."""
        return {
            "HZDH": slip.slip_no,
            "HZLX": CONSULT_KINDS.get(slip.kind, slip.kind),
            "HZJG": slip.to_member,
            "HZXM": padded(slip.patient_name, 10),
            "XB": GENDER_CODES.get(slip.gender, slip.gender),
            "CSRQ": slip.birth_date.replace("-", ""),
            "SFZH": slip.id_number,
            "LXDH": slip.phone,
            "BLH": slip.mrn,
            "ZDDM": slip.diagnosis_code,
            "ZDMC": slip.diagnosis_name,
            "HZMD": slip.reason,
            "HZWT": slip.question.encode(ENCODING),
            "BLZY": slip.summary.encode(ENCODING),
            "SQKS": slip.specialties,
            "JJBZ": "1" if slip.urgent else "0",
            "TYR": slip.consent_by,
            "TYSBH": slip.consent_doc,
            "JCUID": slip.study_uid,
            "GXBG": slip.shared_results,
            "YSXM": slip.doctor,
            "TXSJ": vendor_time(slip.written_at),
            "ZT": "1",
        }

    def write_consult(
        self, slip: ConsultSlip | dict[str, Any], *, row_id: int | None = None, **override: Any
    ) -> int:
        """Insert one ``ZZ_HZSQ`` row (a slip, or raw vendor columns); returns its id."""
        row = self.consult_row(slip) if isinstance(slip, ConsultSlip) else dict(slip)
        row.update(override)
        rid = row_id if row_id is not None else self.allocate_id("ZZ_HZSQ")
        with self.tx() as conn:
            conn.execute(insert(ZZ_HZSQ).values(ID=rid, **row))
        return rid

    def cancel_consult(self, row_id: int, reason: str, *, at: str = "") -> int:
        """The doctor withdraws consultation request ``row_id`` (患者/家属撤回): ``ZT`` 9 with
        time, reason and a fresh ``CXXH``; returns the CXXH."""
        seq = self.allocate_id("ZZ_HZSQ_CX")
        when = vendor_time(at) if at else datetime.now(CHINA).strftime("%Y%m%d%H%M%S")
        with self.tx() as conn:
            conn.execute(
                update(ZZ_HZSQ)
                .where(ZZ_HZSQ.c.ID == row_id)
                .values(ZT="9", CXSJ=when, CXYY=reason, CXXH=seq)
            )
        return seq

    def consult_thread(self, slip_no: str) -> str:
        """The 流水号 the adapter wrote with the consultation's status rows (the HIS copies it
        into a 补充资料 row)."""
        with self.engine.connect() as conn:
            return str(
                conn.execute(
                    select(ZZ_JS_HZZT.c.LSH)
                    .where(ZZ_JS_HZZT.c.HZDH == slip_no)
                    .order_by(ZZ_JS_HZZT.c.ID.desc())
                ).scalar()
                or ""
            )

    def resubmit_consult(self, slip: ResubmitSlip, *, with_thread: bool = True) -> int:
        """The doctor adds the records the centre asked for (``ZZ_HZBC``); returns the row id."""
        rid = self.allocate_id("ZZ_HZBC")
        with self.tx() as conn:
            conn.execute(
                insert(ZZ_HZBC).values(
                    ID=rid,
                    LSH=self.consult_thread(slip.slip_no) if with_thread else "",
                    HZDH=slip.slip_no,
                    ZLMC=slip.title,
                    ZLNR=slip.text.encode(ENCODING),
                    YSXM=slip.doctor,
                    TXSJ=vendor_time(slip.written_at),
                )
            )
        return rid

    def consult_states(self, slip_no: str | None = None) -> list[dict[str, Any]]:
        """The status rows (``ZZ_JS_HZZT``) as stored (padding stripped), oldest first."""
        with self.engine.connect() as conn:
            q = select(ZZ_JS_HZZT).order_by(ZZ_JS_HZZT.c.ID)
            if slip_no is not None:
                q = q.where(ZZ_JS_HZZT.c.HZDH == slip_no)
            return [
                {k: _clean(v) if k != "ID" else v for k, v in r._mapping.items()}
                for r in conn.execute(q).all()
            ]

    def consult_reports(self, slip_no: str | None = None) -> list[dict[str, Any]]:
        """The report rows (``ZZ_JS_HZBG``): text columns stripped, the PDF as bytes."""
        with self.engine.connect() as conn:
            q = select(ZZ_JS_HZBG).order_by(ZZ_JS_HZBG.c.ID)
            if slip_no is not None:
                q = q.where(ZZ_JS_HZBG.c.HZDH == slip_no)
            return [
                {k: v if k in ("ID", "BGWJ") else _clean(v) for k, v in r._mapping.items()}
                for r in conn.execute(q).all()
            ]

    def count(self, table: Table) -> int:
        with self.engine.connect() as conn:
            return len(conn.execute(select(table.c.ID)).all())


def _date(text: str) -> str:
    return f"{text[:4]}-{text[4:6]}-{text[6:8]}" if len(text) == 8 else text


# -- CLI --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m simulators.his_db", description=__doc__)
    ap.add_argument("--dsn", required=True, help="SQLAlchemy DSN of the vendor database")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("init", help="create the vendor tables")
    refer = sub.add_parser("refer", help="write a referral row (ZZ_SQD) from a slip as JSON")
    refer.add_argument(
        "--json", required=True, help="file with a ReferralSlip as JSON ('-': stdin)"
    )
    refer.add_argument(
        "--late-hold-s",
        type=float,
        default=0.0,
        help="allocate the id now, commit the row after this many seconds",
    )
    sub.add_parser("received", help="print received referrals (ZZ_JS_SQD) as JSON lines")
    consult = sub.add_parser(
        "consult", help="write a consultation request row (ZZ_HZSQ) from a ConsultSlip as JSON"
    )
    consult.add_argument("--json", required=True, help="file with the slip ('-': stdin)")
    records = sub.add_parser(
        "consult-records", help="write a 补充资料 row (ZZ_HZBC) from a ResubmitSlip as JSON"
    )
    records.add_argument("--json", required=True, help="file with the slip ('-': stdin)")
    sub.add_parser("consult-states", help="print consultation status rows (ZZ_JS_HZZT)")
    sub.add_parser(
        "consult-reports", help="print consultation report rows (ZZ_JS_HZBG; the PDF as its size)"
    )
    args = ap.parse_args(argv)
    db = HisDb(args.dsn)
    try:
        if args.cmd == "init":
            db.init()
        elif args.cmd == "refer":
            text = (
                sys.stdin.read()
                if args.json == "-"
                else Path(args.json).read_text(encoding="utf-8")
            )
            data = json.loads(text)
            slip = ReferralSlip(**{f.name: data[f.name] for f in fields(ReferralSlip)})
            rid = db.allocate_id("ZZ_SQD")
            print(json.dumps({"allocated": rid}), flush=True)
            if args.late_hold_s:
                time.sleep(args.late_hold_s)  # the clinician is still typing
            db.write_referral(slip, row_id=rid)
            print(json.dumps({"committed": rid}), flush=True)
        elif args.cmd == "received":
            for s in db.received_referrals():
                print(json.dumps(asdict(s), ensure_ascii=False))
        elif args.cmd in ("consult", "consult-records"):
            text = (
                sys.stdin.read()
                if args.json == "-"
                else Path(args.json).read_text(encoding="utf-8")
            )
            if args.cmd == "consult":
                print(json.dumps({"id": db.write_consult(ConsultSlip(**json.loads(text)))}))
            else:
                print(json.dumps({"id": db.resubmit_consult(ResubmitSlip(**json.loads(text)))}))
        elif args.cmd == "consult-states":
            for st in db.consult_states():
                print(json.dumps(st, ensure_ascii=False))
        elif args.cmd == "consult-reports":
            for rep in db.consult_reports():
                pdf = rep.pop("BGWJ")
                print(json.dumps({**rep, "BGWJ": len(pdf or b"")}, ensure_ascii=False))
    finally:
        db.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
