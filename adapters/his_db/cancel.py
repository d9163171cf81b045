"""Withdrawn referrals (撤销) in the intermediate database, both ways.

The vendor keeps a withdrawn referral's row and marks it: ``ZT`` (status) becomes ``9`` with the
time and reason (``CXSJ``, ``CXYY``) and a number from the HIS's sequence (``CXXH``, as an
update trigger would take it). The adapter polls ``ZT = 9`` rows by that number with a
watermark and holes (:mod:`~adapters.his_db.watermark`) exactly as it polls new rows by id, and
takes each as the workflow's ``cancel`` step with the source key ``<table>:<id>:cancel``, so a
row edited again (a new number) is not sent twice. On the receiving side the inbox row of the
referral (found by its 流水号) gets the same marks once the cancellation is confirmed.

Which columns: ``fields/cancel.csv`` of the site (``slip_no``, ``reason``, ``cancelled_at``) and
the options ``status_column``, ``cancelled_value``, ``cancel_seq_column``. A site without
``fields/cancel.csv`` or without the number column simply has no cancellations from its HIS.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

RECORD = "cancel"


@dataclass
class CancelSlip:
    slip_no: str
    reason: str = ""
    cancelled_at: str = ""


def has_map(fields_folder: Path) -> bool:
    return (Path(fields_folder) / "fields" / f"{RECORD}.csv").is_file()
