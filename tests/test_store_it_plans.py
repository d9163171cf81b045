"""IT's reads of the queues on each request (the dashboard and ``/metrics``:
``bridge/console.py`` snapshot; ``/local/v1/queues`` and the IT page: ``bridge/ops.py``
queue_summary), as ``bridge/store/counts.py`` and the console's window queries make them:
each statement an index range or a covering-index read (EXPLAIN on SQLite and PostgreSQL),
never a read of every outbox or inbox row from the table, and the answers equal the full
scans they replace. They counted every outbox row per hop and state, with its creation time
from the table, on each request (bench/README.md, ``growth``).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select
from test_store_growth_plans import T0, _plan, seed

from bridge.console import _ACKED_SINCE, _CREATED_SINCE, _OPEN_ERRORS
from bridge.store import counts
from bridge.store.db import Store
from bridge.store.tables import INBOX, OUTBOX


@pytest.fixture
def db(dsn: str) -> Iterator[Store]:
    s = Store(dsn)
    s.create_all()
    seed(s)
    yield s
    s.dispose()


SINCE = T0 + timedelta(minutes=60)


def test_each_read_of_it_is_an_index_range_or_a_covering_index(db: Store) -> None:
    cases: list[tuple[Any, dict[str, Any], str]] = [
        (counts.OPEN_COUNTS, {}, "ix_outbox_open"),
        (counts.DONE_COUNTS, {}, "ix_outbox_due"),
        (counts.INBOX_COUNTS, {}, "ix_inbox_pending"),
        (_CREATED_SINCE, {"since": SINCE}, "ix_outbox_time"),
        (_ACKED_SINCE, {"hop": "m-1", "since": SINCE}, "ix_outbox_hop_acked"),
        (_OPEN_ERRORS, {}, "ix_outbox_open"),
    ]
    with db.read() as conn:
        for stmt, params, index in cases:
            plan = _plan(conn, stmt, params)
            assert index in plan, plan
            if db.is_sqlite:
                # a whole-index read only where the index holds just what is counted
                # (COVERING: no table row read) or only the open rows (partial)
                assert "SCAN outbox\n" not in plan + "\n" and "SCAN inbox\n" not in plan + "\n"
                if "SCAN" in plan:
                    assert "COVERING INDEX" in plan or "ix_outbox_open" in plan, plan
            else:
                # (an index-only scan once VACUUM has set the visibility map; on these few
                # fresh rows PostgreSQL takes a bitmap scan of the same index)
                assert "Seq Scan" not in plan, plan
        plan = _plan(conn, counts.INBOX_AT, {"id": 1})
        assert ("PRIMARY KEY" in plan) if db.is_sqlite else ("inbox_pkey" in plan), plan


def test_the_counts_answer_what_the_full_scans_answered(db: Store) -> None:
    with db.read() as conn:
        old = {
            (hop, st): (n, oldest)
            for hop, st, n, oldest in conn.execute(
                select(
                    OUTBOX.c.next_hop, OUTBOX.c.state, func.count(), func.min(OUTBOX.c.created_at)
                ).group_by(OUTBOX.c.next_hop, OUTBOX.c.state)
            )
        }
        new = {(hop, st): (n, oldest) for hop, st, n, oldest in counts.outbox(conn)}
        assert set(new) == set(old)
        for key, (n, oldest) in new.items():
            assert n == old[key][0], key
            assert oldest == (None if key[1] in counts.DONE else old[key][1]), key
        # packet i: hop m-(i % 3 + 1), state by i % 6; receipts 200-205 alternate m-1, m-2
        assert new[("m-1", "acknowledged")][0] == 20 and new[("m-3", "refused")][0] == 20
        assert new[("m-1", "queued")][0] == 3
        old_in = {
            st: (n, at)
            for st, n, at in conn.execute(
                select(INBOX.c.state, func.count(), func.min(INBOX.c.received_at)).group_by(
                    INBOX.c.state
                )
            )
        }
        assert (
            {st: (n, at) for st, n, at in counts.inbox(conn)} == old_in == {"delivered": (40, T0)}
        )
        # the window: rows created since, plus rows acked since but created before, is
        # exactly what the old OR over the whole table returned
        scan = sorted(
            conn.execute(
                select(OUTBOX.c.id).where(
                    (OUTBOX.c.created_at >= SINCE) | (OUTBOX.c.acked_at >= SINCE)
                )
            ).scalars()
        )
        got = [r.id for r in conn.execute(_CREATED_SINCE, {"since": SINCE})]
        for hop in ("m-1", "m-2", "m-3"):
            got += [r.id for r in conn.execute(_ACKED_SINCE, {"hop": hop, "since": SINCE})]
        assert sorted(got) == scan and len(scan) == 126 - 60
