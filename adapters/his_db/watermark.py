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
whose insert was rolled back never gets a row). The state is one JSON value in ``node_state``
(``adapter:<name>:watermark:<table>``), written after each row is taken.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import orjson

from bridge.store import state

MAX_HOLES = 5000  # a jump larger than this (a resequenced table) keeps only the newest holes


@dataclass
class Watermark:
    key: str
    high: int = 0
    holes: dict[int, str] = field(default_factory=dict)  # id -> first noticed (ISO)

    @classmethod
    def load(cls, store: Any, key: str) -> Watermark:
        with store.read() as conn:
            raw = state.get(conn, key)
        if not raw:
            return cls(key)
        data = orjson.loads(raw)
        return cls(key, int(data["high"]), {int(k): v for k, v in data["holes"].items()})

    def save(self, store: Any, at: datetime) -> None:
        value = orjson.dumps({"high": self.high,
                              "holes": {str(k): v for k, v in self.holes.items()}}).decode()
        with store.write() as conn:
            state.put(conn, self.key, value, at)

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
