"""Field maps: a vendor's column names and value conventions <-> the neutral slip fields.

Every HIS names its columns its own way (often pinyin initials: ``HZXM`` 患者姓名, ``XB`` 性别,
``CSRQ`` 出生日期, ``SFZH`` 身份证号, ``ZDDM`` 诊断代码, ``ZZYY`` 转诊原因) and codes values its own
way (性别 1/2, dates as ``yyyyMMdd``). A field map says it once, as data, in
``mappings/<site>/fields/<record>.csv`` (record: ``referral``, ``acceptance``, ``return``,
``prescription``, ``lab_result``: the records of ``adapters/slips.py``)::

    field,column,label,type,format,values,required,default
    patient_name,HZXM,患者姓名,,,,yes,
    gender,XB,性别,,,1=male;2=female;9=unknown,yes,
    birth_date,CSRQ,出生日期,date,yyyyMMdd,,yes,
    urgent,JZBZ,急诊标志,bool,,1=true;0=false,,false
    kind,,转诊类型,,,,,up-outpatient

Columns of the field map:

``field``     the neutral field (a slip attribute); each at most once
``column``    the vendor's column / element name; empty: the field is the constant ``default``
``label``     what the column means (documentation only)
``type``      ``str`` (default), ``int``, ``bool``, ``date`` (-> ``YYYY-MM-DD``), ``datetime``
              (-> ISO 8601 with offset; vendor times without a zone are China time, +08:00)
``format``    for date/datetime: the vendor's pattern in Java/.NET letters (``yyyyMMdd``,
              ``yyyy-MM-dd``, ``yyyyMMddHHmmss``, ``yyyy/MM/dd HH:mm``); default ISO
``values``    vendor value = neutral value pairs separated by ``;`` (required for ``bool``:
              ``1=true;0=false``); the first pair for a neutral value is used when writing back
``required``  ``yes``: an empty value is an error (the record is quarantined)
``default``   the neutral value used when the column is empty or absent

API (all errors name the record, field and column, never the value: values are patient data)::

    fm = load_field_map("mappings/fuxing", "referral", fields=ReferralSlip)  # FieldMap
    values = apply(fm, row)        # {field: neutral value} from a vendor row (dict-like)
    slip = ReferralSlip(**values)
    row = unapply(fm, values)      # {column: vendor string} to write a record back

``apply`` leaves out fields whose column is empty and that have no default (the caller's slip
defaults apply); columns of the row that the map does not name are ignored. Bad data raises
:class:`FieldMapError` (``.record``, ``.field``, ``.column``): hand it to ``host.quarantine``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from bridge.errors import ConfigError, HutongError
from bridge.mapping.csvfile import read_rows

FIELDS_DIR = "fields"
COLUMNS = ("field", "column")
OPTIONAL = ("label", "type", "format", "values", "required", "default")
TYPES = ("str", "int", "bool", "date", "datetime")
CHINA = timezone(timedelta(hours=8))
_PATTERN = re.compile(r"yyyy|MM|dd|HH|mm|ss|SSS")
_STRP = {"yyyy": "%Y", "MM": "%m", "dd": "%d", "HH": "%H", "mm": "%M", "ss": "%S", "SSS": "%f"}
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class FieldMapError(HutongError):
    """A vendor record that does not fit its field map: names record, field and column."""

    code = "HT-MAP-FIELD"

    def __init__(self, record: str, field_name: str, column: str, what: str) -> None:
        where = f"column {column} ({field_name})" if column else f"field {field_name}"
        super().__init__(f"{record}: {where}: {what}")
        self.record = record
        self.field = field_name
        self.column = column


@dataclass(frozen=True)
class FieldRule:
    field: str
    column: str
    label: str = ""
    type: str = "str"
    format: str = ""
    values: tuple[tuple[str, str], ...] = ()  # (vendor, neutral) in file order
    required: bool = False
    default: str = ""
    line: int = 0

    @property
    def strptime(self) -> str:
        return _PATTERN.sub(lambda m: _STRP[m.group(0)], self.format)


@dataclass
class FieldMap:
    record: str
    path: Path
    rules: list[FieldRule] = field(default_factory=list)

    def apply(self, row: Mapping[str, Any]) -> dict[str, Any]:
        return apply(self, row)

    def unapply(self, values: Mapping[str, Any]) -> dict[str, str]:
        return unapply(self, values)

    @property
    def columns(self) -> list[str]:
        return [r.column for r in self.rules if r.column]


# -- loading ---------------------------------------------------------------------------------


def _allowed(fields: Any) -> set[str] | None:
    if fields is None:
        return None
    if dataclasses.is_dataclass(fields):
        return {f.name for f in dataclasses.fields(fields)}
    return set(fields)


def _parse_values(text: str) -> tuple[tuple[str, str], ...] | str:
    pairs: list[tuple[str, str]] = []
    for part in text.split(";"):
        if not part.strip():
            continue
        vendor, eq, neutral = part.partition("=")
        if not eq:
            return f"{part.strip()!r} is not vendor=neutral"
        pairs.append((vendor.strip(), neutral.strip()))
    seen = [v for v, _ in pairs]
    dupes = sorted({v for v in seen if seen.count(v) > 1})
    if dupes:
        return f"vendor value(s) {', '.join(dupes)} listed twice"
    return tuple(pairs)


def load_field_map(
    folder: str | Path, record: str, fields: type | Iterable[str] | None = None
) -> FieldMap:
    """``<folder>/fields/<record>.csv`` as a :class:`FieldMap`.

    ``fields`` (a slip dataclass or a list of names) checks that every ``field`` exists. Raises
    ConfigError naming file, line and column for every problem at once.
    """
    path = Path(folder) / FIELDS_DIR / f"{record}.csv"
    allowed = _allowed(fields)
    problems: list[str] = []
    fm = FieldMap(record, path)
    seen_fields: dict[str, int] = {}
    seen_columns: dict[str, int] = {}
    for r in read_rows(path, COLUMNS, OPTIONAL):
        name, column = r["field"], r["column"]
        ftype = r["type"] or "str"
        if not _NAME.match(name):
            problems.append(f"{r.where('field')}: {name!r} is not a field name")
        elif allowed is not None and name not in allowed:
            problems.append(
                f"{r.where('field')}: unknown field {name!r} for {record} "
                f"(known: {', '.join(sorted(allowed))})"
            )
        elif name in seen_fields:
            problems.append(
                f"{r.where('field')}: field {name!r} is mapped twice "
                f"(first on line {seen_fields[name]})"
            )
        else:
            seen_fields[name] = r.line
        if column:
            if column in seen_columns:
                problems.append(
                    f"{r.where('column')}: column {column!r} is used twice "
                    f"(first on line {seen_columns[column]})"
                )
            seen_columns.setdefault(column, r.line)
        elif not r["default"]:
            problems.append(f"{r.where('column')}: no column and no default for {name!r}")
        if ftype not in TYPES:
            problems.append(
                f"{r.where('type')}: unknown type {ftype!r} (one of: {', '.join(TYPES)})"
            )
        fmt = r["format"]
        if fmt and ftype not in ("date", "datetime"):
            problems.append(f"{r.where('format')}: a format is for date and datetime only")
        elif fmt and not _PATTERN.search(fmt):
            problems.append(
                f"{r.where('format')}: {fmt!r} has no date letters (yyyy MM dd HH mm ss)"
            )
        values = _parse_values(r["values"])
        if isinstance(values, str):
            problems.append(f"{r.where('values')}: {values}")
            values = ()
        if ftype == "bool" and values and {n for _, n in values} - {"true", "false"}:
            problems.append(f"{r.where('values')}: a bool maps to true or false")
        if ftype == "bool" and not values:
            problems.append(f"{r.where('values')}: a bool needs values, e.g. 1=true;0=false")
        req = r["required"].lower()
        if req not in ("", "yes", "no", "y", "n", "true", "false", "1", "0"):
            problems.append(f"{r.where('required')}: {r['required']!r} is not yes or no")
        fm.rules.append(
            FieldRule(
                name,
                column,
                r["label"],
                ftype,
                fmt,
                values,
                req in ("yes", "y", "true", "1"),
                r["default"],
                r.line,
            )
        )
    if problems:
        raise ConfigError(f"{path}: {len(problems)} problem(s)", problems=problems)
    for rule in fm.rules:  # defaults must themselves be valid neutral values
        if rule.default:
            try:
                _typed(fm.record, rule, rule.default)
            except FieldMapError as e:
                problems.append(f"{path}:{rule.line}: default: {e.message}")
    if problems:
        raise ConfigError(f"{path}: {len(problems)} problem(s)", problems=problems)
    return fm


# -- vendor -> neutral -----------------------------------------------------------------------


def _typed(record: str, rule: FieldRule, neutral: str) -> Any:
    """A neutral text value as the field's type (defaults and mapped values)."""
    try:
        if rule.type == "int":
            return int(neutral)
        if rule.type == "bool":
            if neutral not in ("true", "false"):
                raise ValueError
            return neutral == "true"
        if rule.type == "date":
            return date.fromisoformat(neutral).isoformat()
        if rule.type == "datetime":
            t = datetime.fromisoformat(neutral)
            return (t if t.tzinfo else t.replace(tzinfo=CHINA)).isoformat()
    except ValueError:
        raise FieldMapError(record, rule.field, rule.column, f"not a {rule.type} value") from None
    return neutral


def _from_vendor(record: str, rule: FieldRule, raw: str) -> Any:
    if rule.values:
        for vendor, neutral in rule.values:
            if raw == vendor:
                return _typed(record, rule, neutral)
        known = ", ".join(v for v, _ in rule.values)
        raise FieldMapError(
            record, rule.field, rule.column, f"value not in the value map (known: {known})"
        )
    if rule.type in ("date", "datetime") and rule.format:
        if len(raw) != len(rule.format):
            raise FieldMapError(
                record,
                rule.field,
                rule.column,
                f"not a {rule.type} in format {rule.format} "
                f"({len(raw)} characters, expected {len(rule.format)})",
            )
        try:
            t = datetime.strptime(raw, rule.strptime)  # noqa: DTZ007 - China time attached below
        except ValueError:
            raise FieldMapError(
                record, rule.field, rule.column, f"not a {rule.type} in format {rule.format}"
            ) from None
        if rule.type == "date":
            return t.date().isoformat()
        return t.replace(tzinfo=CHINA).isoformat()
    return _typed(record, rule, raw)


def apply(field_map: FieldMap, row: Mapping[str, Any]) -> dict[str, Any]:
    """``{field: neutral value}`` from one vendor row (a dict, a SQLAlchemy row mapping ...)."""
    out: dict[str, Any] = {}
    for rule in field_map.rules:
        value = row.get(rule.column) if rule.column else None
        raw = "" if value is None else (value.strip() if isinstance(value, str) else str(value))
        if isinstance(value, datetime | date) and rule.type in ("date", "datetime"):
            t = (
                value
                if isinstance(value, datetime)
                else datetime(  # noqa: DTZ001 - a date
                    value.year,
                    value.month,
                    value.day,
                )
            )
            if rule.type == "date":
                out[rule.field] = t.date().isoformat()
            else:
                out[rule.field] = (t if t.tzinfo else t.replace(tzinfo=CHINA)).isoformat()
            continue
        if raw == "":
            if rule.default:
                out[rule.field] = _typed(field_map.record, rule, rule.default)
            elif rule.required:
                raise FieldMapError(field_map.record, rule.field, rule.column, "is empty")
            continue
        out[rule.field] = _from_vendor(field_map.record, rule, raw)
    return out


# -- neutral -> vendor -----------------------------------------------------------------------


def _to_vendor(record: str, rule: FieldRule, value: Any) -> str:
    if rule.type == "bool":
        neutral = "true" if value else "false"
    elif rule.type in ("date", "datetime") and value != "":
        try:
            if rule.type == "date":
                t = datetime.combine(date.fromisoformat(str(value)[:10]), datetime.min.time())
            else:
                t = datetime.fromisoformat(str(value))
                t = (t if t.tzinfo else t.replace(tzinfo=CHINA)).astimezone(CHINA)
        except ValueError:
            raise FieldMapError(
                record, rule.field, rule.column, f"not an ISO {rule.type}"
            ) from None
        if not rule.format:
            return t.date().isoformat() if rule.type == "date" else t.isoformat(timespec="seconds")
        text = t.strftime(rule.strptime)
        return text[:-3] if "SSS" in rule.format else text  # %f is microseconds
    else:
        neutral = str(value)
    if rule.values:
        for vendor, mapped in rule.values:
            if mapped == neutral:
                return vendor
        raise FieldMapError(
            record, rule.field, rule.column, "value has no vendor value in the value map"
        )
    return neutral


def unapply(field_map: FieldMap, values: Mapping[str, Any]) -> dict[str, str]:
    """``{column: vendor text}`` from neutral values (a slip's ``as_dict``): the way back.

    Fields missing from ``values`` (or None) are left out; constant fields (no column) too.
    """
    out: dict[str, str] = {}
    for rule in field_map.rules:
        if not rule.column:
            continue
        value = values.get(rule.field)
        if value is None:
            continue
        out[rule.column] = _to_vendor(field_map.record, rule, value)
    return out
