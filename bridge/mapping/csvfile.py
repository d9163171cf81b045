"""Reading the mapping CSVs with problems that name file, line and column.

Mapping files are edited by hand (often in a spreadsheet), so every problem is reported with
``path:line:column`` and the column's name, all problems of a file at once. Lines starting with
``#`` (before or after the header) are comments; blank lines are skipped; a UTF-8 BOM (what
Excel writes) is accepted.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from bridge.errors import ConfigError


@dataclass(frozen=True)
class CsvRow:
    """One data row: its values by column name and where it is."""

    path: Path
    line: int
    values: dict[str, str]
    columns: tuple[str, ...]

    def __getitem__(self, column: str) -> str:
        return self.values.get(column, "")

    def get(self, column: str, default: str = "") -> str:
        return self.values.get(column, default) or default

    def where(self, column: str | None = None) -> str:
        """``path:line:col (column)`` for a problem in this row (column number 1-based)."""
        if column is None or column not in self.columns:
            return f"{self.path}:{self.line}"
        return f"{self.path}:{self.line}:{self.columns.index(column) + 1} ({column})"


def read_rows(path: Path, required: Iterable[str], optional: Iterable[str] = ()) -> list[CsvRow]:
    """Every data row of ``path``; ConfigError listing every structural problem at once."""
    required = tuple(required)
    known = set(required) | set(optional)
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            return _rows(path, csv.reader(f), required, known)
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: file not found") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (save the CSV as UTF-8)") from e
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from e
    except csv.Error as e:
        raise ConfigError(f"{path}: not a readable CSV ({e})") from e


def _records(reader: Iterator[list[str]]) -> Iterator[tuple[int, list[str]]]:
    start = 1
    for record in reader:
        line = start
        start = reader.line_num + 1  # type: ignore[attr-defined]
        if not record or not any(c.strip() for c in record):
            continue
        if record[0].lstrip().startswith("#"):
            continue
        yield line, [c.strip() for c in record]


def _rows(
    path: Path, reader: Iterator[list[str]], required: tuple[str, ...], known: set[str]
) -> list[CsvRow]:
    records = _records(reader)
    first = next(records, None)
    if first is None:
        raise ConfigError(f"{path}: empty file (expected a header: {', '.join(required)})")
    header_line, header = first
    columns = tuple(header)
    problems: list[str] = []
    for col in required:
        if col not in columns:
            problems.append(
                f"{path}:{header_line}: missing column {col!r} "
                f"(the header has: {', '.join(columns)})"
            )
    for i, col in enumerate(columns, start=1):
        if not col:
            problems.append(f"{path}:{header_line}:{i}: empty column name")
        elif known and col not in known:
            problems.append(
                f"{path}:{header_line}:{i}: unknown column {col!r} "
                f"(known: {', '.join(sorted(known))})"
            )
        elif columns.index(col) != i - 1:
            problems.append(f"{path}:{header_line}:{i}: column {col!r} appears twice")
    if problems:
        raise ConfigError(f"{path}: bad header", problems=problems)
    out: list[CsvRow] = []
    for line, record in records:
        if len(record) > len(columns) and any(record[len(columns) :]):
            problems.append(
                f"{path}:{line}:{len(columns) + 1}: {len(record)} fields, "
                f"the header has {len(columns)} (a comma inside a value needs quotes)"
            )
            continue
        values = {c: (record[i] if i < len(record) else "") for i, c in enumerate(columns)}
        out.append(CsvRow(path, line, values, columns))
    if problems:
        raise ConfigError(f"{path}: bad rows", problems=problems)
    return out
