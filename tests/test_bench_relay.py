"""bench/relay.py counts what it reports: members -> a real platform -> two real receivers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import relay as relay_bench  # bench/ is not a package

pytestmark = pytest.mark.slow


def test_relay_bench_every_packet_once_at_the_receiver_it_was_addressed_to(tmp_path: Path) -> None:
    r = relay_bench.relay(
        tmp_path, members=6, n=60, procs=2, batch=5, lat_rate=10.0, lat_seconds=1.0
    )
    assert (r["members"], r["n"]) == (6, 60)
    # round robin over 6 members, 10 packets each; odd members' rule names recv-a, even recv-b
    assert r["per_sender"] == {
        "recv-a": {"member-01": 10, "member-03": 10, "member-05": 10},
        "recv-b": {"member-02": 10, "member-04": 10, "member-06": 10},
    }
    assert r["per_receiver"] == {
        "recv-a": {"addressed": 30, "received": 30, "distinct": 30},
        "recv-b": {"addressed": 30, "received": 30, "distinct": 30},
    }
    assert r["received_once"] is True  # same packet ids as sent, in the addressed inbox
    assert r["lat_received_once"] is True
    assert r["lat_n"] == 10
    assert r["duplicates"] == 0
    # the platform answered every throughput packet 'relayed' with its signed receipt, and
    # every receiver's end-to-end receipt came back to the member through the platform
    assert r["platform_answers"] == {"relayed": 60}
    assert r["receipts_back"] == r["receipts_expected"] == 70
    assert set(r["receipt_statuses"]) == {"accepted"}  # none refused or unverifiable
    assert r["platform_rss_mib"] > 0


@pytest.mark.postgres
def test_relay_bench_on_postgresql_with_a_worker(tmp_path: Path, pg_db: str) -> None:
    """The platform on PostgreSQL, one process then two (``hutong run`` + a ``hutong worker``
    holding half the lanes): the send jobs woken by the one read a round of the hops with
    packets queued and by the other process's NOTIFY, every packet once where addressed, every
    end-to-end receipt back."""
    rounds = relay_bench.relay_pg(
        tmp_path,
        pg_db,
        members=6,
        n=60,
        processes=(1, 2),
        procs=2,
        batch=5,
        lat_frac=0.5,
        lat_seconds=1.0,
    )
    assert [r["processes"] for r in rounds] == [1, 2]
    for r in rounds:
        assert r["per_receiver"] == {
            "recv-a": {"addressed": 30, "received": 30, "distinct": 30},
            "recv-b": {"addressed": 30, "received": 30, "distinct": 30},
        }
        assert r["received_once"] is True
        assert r["lat_received_once"] is True
        assert r["duplicates"] == 0
        assert r["platform_answers"] == {"relayed": 60}
    assert set(rounds[0]["receipt_statuses"]) == {"accepted"}
    assert rounds[-1]["receipts_back"] == sum(60 + r["lat_n"] for r in rounds)
