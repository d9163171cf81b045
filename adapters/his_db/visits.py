"""Visit events (就诊记录) from the intermediate database: each row -> the visit's Encounter.

The HIS writes one ``ZZ_JZJL`` row per admission, registration, transfer, discharge, update or
cancellation of a visit (ids from its sequence, polled by watermark + holes like the slip
tables). Each row is read through the site's ``fields/visit.csv`` into a
:class:`~adapters.visits.Visit` (the field meanings are documented there and in
:mod:`simulators.his_db`), checked, and recorded with the row as source key
(``ZZ_JZJL:<id>``): Patient and Encounter stored or moved on once, however often the row is
read. A site without ``fields/visit.csv`` sends no visits.

A referral is linked only when the option ``visit_referral_column`` names the column carrying
the slip number of a referral received here (the admission clerk copies it from the received
slip, ``ZZ_JS_SQD``); its 流水号 there is the thread. An admission naming a slip this hospital
never received is quarantined naming that column; so is any row whose values the field map or
:func:`~adapters.visits.check` refuse (naming the vendor column).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapters import slips_fhir as sf
from adapters import visits

if TYPE_CHECKING:
    from sqlalchemy import Table

    from adapters.his_db.adapter import HisDbAdapter

RECORD = "visit"
KIND = "his-db.visit"


def has_map(fields_folder: Path) -> bool:
    return (Path(fields_folder) / "fields" / f"{RECORD}.csv").is_file()


def take(
    adapter: HisDbAdapter, table: Table, rid: int, row: dict[str, Any], replay: bool = False
) -> None:
    """One visit row into the node (or quarantined naming its column), exactly once."""
    from adapters.his_db.adapter import _slip

    def work(key: str, gaps: list[Any]) -> None:
        values = adapter._decode(row)
        v = visits.check(_slip(visits.Visit, adapter.fm[RECORD].apply(values)))
        thread = None
        column = adapter.opts.visit_referral_column
        if column:
            if column not in table.c:
                raise sf.MissingField(
                    column, f"the visit table has no column {column} (option visit_referral_column)"
                )
            v.referral_no = str(values.get(column) or "").strip()
            if v.referral_no:
                thread = adapter._thread({}, RECORD, v.referral_no)
        visits.record(
            adapter.host,
            v,
            source_key=key,
            referral_thread=thread,
            kind=KIND,
            codes=sf.Codes(adapter.host.maps, adapter.me, gaps),
        )

    adapter._guard(table, rid, row, RECORD, work, replay)
