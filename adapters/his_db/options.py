"""``[adapters.options]`` of a ``his-middle-db`` adapter, checked before anything starts.

::

    [adapters.options]
    dsn = "sqlite:////var/lib/his/zhongjianku.db"   # or "file:../secrets/his.dsn" (PostgreSQL)
    poll_every_s = 2.0
    fields = "../../../mappings/yuetan-chc"          # folder holding fields/*.csv (default:
                                                     # the adapter's ``mappings`` folder)
    encoding = "gbk"                                 # BLOB text columns are bytes in this
    visit_referral_column = "ZZDH"                   # visits: which column names a referral
    [adapters.options.tables]                        # logical name -> vendor table name
    referral_out = "ZZ_SQD"
    visit_out = "ZZ_JZJL"                            # visit events (fields/visit.csv)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from bridge.local.contract import Problem

if TYPE_CHECKING:
    from bridge.config.models import AdapterSettings

TABLES = {
    "referral_out": "ZZ_SQD",
    "acceptance_out": "ZZ_JZD",
    "return_out": "ZZ_ZHD",
    "return_out_drugs": "ZZ_ZHD_YP",
    "return_out_labs": "ZZ_ZHD_JY",
    "referral_in": "ZZ_JS_SQD",
    "acceptance_in": "ZZ_JS_JZD",
    "return_in": "ZZ_JS_ZHD",
    "return_in_drugs": "ZZ_JS_ZHD_YP",
    "return_in_labs": "ZZ_JS_ZHD_JY",
    "results_in": "ZZ_JS_JYBG",
    "results_in_items": "ZZ_JS_JYBG_MX",
    "imaging_in": "ZZ_JS_JCBG",
    "visit_out": "ZZ_JZJL",
    "consult_out": "ZZ_HZSQ",
    "consult_resubmit_out": "ZZ_HZBC",
    "consult_status_in": "ZZ_JS_HZZT",
    "consult_report_in": "ZZ_JS_HZBG",
}


class Tables(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    referral_out: str = TABLES["referral_out"]
    acceptance_out: str = TABLES["acceptance_out"]
    return_out: str = TABLES["return_out"]
    return_out_drugs: str = TABLES["return_out_drugs"]
    return_out_labs: str = TABLES["return_out_labs"]
    referral_in: str = TABLES["referral_in"]
    acceptance_in: str = TABLES["acceptance_in"]
    return_in: str = TABLES["return_in"]
    return_in_drugs: str = TABLES["return_in_drugs"]
    return_in_labs: str = TABLES["return_in_labs"]
    results_in: str = TABLES["results_in"]  # lab reports from other members (result.lab)
    results_in_items: str = TABLES["results_in_items"]
    imaging_in: str = TABLES["imaging_in"]  # imaging reports from other members (result.imaging)
    visit_out: str = TABLES["visit_out"]  # visit events (就诊记录): admissions, transfers, ...
    consult_out: str = TABLES["consult_out"]  # 会诊申请 (fields/consult.csv)
    consult_resubmit_out: str = TABLES["consult_resubmit_out"]  # 补充资料 of a returned request
    consult_status_in: str = TABLES["consult_status_in"]  # the centre's steps (会诊状态)
    consult_report_in: str = TABLES["consult_report_in"]  # released reports (会诊报告)


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    dsn: str = Field(min_length=1)
    poll_every_s: float = Field(default=2.0, gt=0)
    batch: int = Field(default=100, ge=1, le=10_000)
    fields: str | None = None
    encoding: str = "gbk"
    #: how long an id below the watermark that has no row yet is watched for a late commit
    hole_keep_s: float = Field(default=3600.0, gt=0)
    id_column: str = "ID"
    # the 流水号 the adapter writes to inbox rows, copied back by the HIS
    thread_column: str = "LSH"
    packet_column: str = "XXID"  # unique column of inbox rows: the packet id
    line_parent_column: str = "ZHD_ID"
    line_order_column: str = "XH"
    received_at_column: str = "JSSJ"
    result_parent_column: str = "BG_ID"  # a result line's link to its report row's id
    read_flag_column: str = "CLBZ"  # 处理标志: set back to "0" when a correction updates a row
    version_column: str = "BBH"  # 版本号 of a result report row: 1, + 1 per correction written
    status_column: str = "ZT"  # 状态 of a referral row, outbound and inbox
    cancelled_value: str = "9"  # ZT of a withdrawn referral (撤销)
    cancel_seq_column: str = "CXXH"  # 撤销序号: the sequence number a withdrawal takes
    #: the visit-event column holding the slip number of a referral received here, which the
    #: admission clerk copies into a referred patient's admission; "" = visits are never
    #: linked to referrals (the adapter does not guess from the patient)
    visit_referral_column: str = ""
    report_pdf_column: str = "BGWJ"  # the consultation report row's PDF (an imaging reading)
    tables: Tables = Tables()


class Resolved:
    """Options with paths and the DSN resolved against the node file's folder."""

    def __init__(self, opts: Options, dsn: str, fields: Path) -> None:
        self.opts = opts
        self.dsn = dsn
        self.fields = fields

    def __getattr__(self, name: str) -> Any:
        return getattr(self.opts, name)


def resolve(opts: Options, settings: AdapterSettings) -> tuple[Resolved | None, list[Problem]]:
    """The options with the DSN read and the field-map folder found, or what is wrong (named by
    key); ``config check`` and the node's start both come through here."""
    problems: list[Problem] = []
    try:
        "".encode(opts.encoding)
    except LookupError:
        problems.append(("encoding", f"unknown encoding {opts.encoding!r}"))
    dsn = opts.dsn
    if dsn.startswith("file:"):
        path = _path(settings, dsn[5:])
        try:
            dsn = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            problems.append(("dsn", f"cannot read {path} ({exc.strerror})"))
    fields: Path | None = None
    if opts.fields is not None:
        fields = _path(settings, opts.fields)
    elif settings.mappings is not None:
        fields = Path(settings.mappings)
    else:
        problems.append(
            ("fields", ("no field map folder (set 'fields' or the adapter's 'mappings')"))
        )
    if fields is not None and not (fields / "fields").is_dir():
        problems.append(("fields", f"{fields} has no fields/ folder"))
    if fields is not None and not problems:
        from adapters.his_db.adapter import field_maps
        from bridge.errors import HutongError

        try:
            field_maps(fields)
        except HutongError as exc:
            problems.extend(("fields", p) for p in getattr(exc, "problems", [exc.message]))
    if problems or fields is None:
        return None, problems
    return Resolved(opts, dsn, fields), []


def check(opts: Options, settings: AdapterSettings) -> list[Problem]:
    return resolve(opts, settings)[1]


def _path(settings: AdapterSettings, value: str) -> Path:
    p = Path(value)
    return p if p.is_absolute() else (settings.base_dir / p).resolve()
