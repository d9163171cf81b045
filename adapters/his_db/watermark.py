"""Which vendor rows are new: a watermark plus the holes below it, kept in the node store.

Correctness does not rest on the watermark: every row is handed to the node with its source key
(``ZZ_SQD:<id>``), and the node commits that key in the same transaction as the referral, so a
row read twice (a crash between the node's commit and saving the watermark) is answered from the
intake record and sent once. The watermark exists so that a poll reads only what may be new
instead of the whole table (vendor tables keep every slip for years) and so that the intake keys
are not consulted for thousands of old rows every few seconds.

Late commits. Ids come from a sequence and are taken when the clinician opens the form, so a row
with a lower id can commit after rows with higher ids. Every id skipped when the watermark moves
up is kept as a *hole* with the time it was first noticed; each poll reads ``id > watermark OR
id IN holes``; a hole is closed when its row arrives, and forgotten after ``hole_keep_s`` (an id
whose insert was rolled back never gets a row). The state is one JSON value in the adapter's
keyed state in the node's database (``host.state``, namespace ``watermark``, key the table),
written after each row is taken.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import orjson

MAX_HOLES = 5000  # a jump larger than this (a resequenced table) keeps only the newest holes


@dataclass
class Watermark:
    key: str
    high: int = 0
    holes: dict[int, str] = field(default_factory=dict)  # id -> first noticed (ISO)

    @classmethod
    def load(cls, kv: Any, key: str) -> Watermark:
        """From the adapter's keyed state (``host.state``); a value an earlier version kept in
        the node's ``node_state`` under ``adapter:<name>:watermark:<table>`` is taken over."""
        data = kv.get("watermark", key)
        if data is None:
            raw = kv.take_node_state(f"watermark:{key}")
            data = orjson.loads(raw) if raw else None
        if not data:
            return cls(key)
        return cls(key, int(data["high"]), {int(k): v for k, v in data["holes"].items()})

    def save(self, kv: Any, at: datetime) -> None:
        kv.put(
            "watermark",
            self.key,
            {"high": self.high, "holes": {str(k): v for k, v in self.holes.items()}},
        )

    def taken(self, row_id: int, at: datetime) -> None:
        """Row ``row_id`` has been taken (sent or quarantined): move up, note skipped ids."""
        if row_id > self.high:
            for hole in range(max(self.high + 1, row_id - MAX_HOLES), row_id):
                self.holes.setdefault(hole, at.isoformat())
            self.high = row_id
        self.holes.pop(row_id, None)

    def expire(self, now: datetime, keep_s: float) -> list[int]:
        """Forget holes older than ``keep_s``; returns them (for the audit)."""
        limit = now - timedelta(seconds=keep_s)
        old = [k for k, v in self.holes.items() if datetime.fromisoformat(v) < limit]
        for k in old:
            del self.holes[k]
        return old
