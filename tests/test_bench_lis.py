"""bench/lis.py counts what it reports: the plain receiver stores each message once before
its AA, and a short run of the whole section gets an AA for every message on both sides."""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import lis  # bench/ is not a package

from simulators.lis import oru_message
from simulators.ports import free_port_block


@pytest.mark.slow
def test_the_plain_receiver_stores_each_message_before_its_aa(tmp_path: Path) -> None:
    port = free_port_block(1)
    db = tmp_path / "plain.db"
    proc = lis.start_plain(port, db)
    try:
        msgs = [oru_message(i, full_cbc=i % 2 == 0) for i in range(1, 9)]
        run = lis.drive(port, msgs, 2)
    finally:
        lis.stop_plain(proc)
    assert run["not_aa"] == 0 and run["n"] == 8 and len(run["lat"]) == 8
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute("SELECT control_id, raw FROM message ORDER BY control_id").fetchall()
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        conn.close()
    assert [r[0] for r in rows] == [f"FXLAB-{i:08d}" for i in range(1, 9)]
    assert sorted(r[1].count(b"OBX|") for r in rows) == [8] * 4 + [20] * 4


@pytest.mark.slow
def test_a_short_run_acknowledges_every_message_on_both_sides() -> None:
    out = lis.measure(12, (1, 2))
    assert [(r["obx"], r["conns"]) for r in out["runs"]] == [(8, 1), (8, 2), (20, 1), (20, 2)]
    for r in out["runs"]:
        assert r["plain"]["n"] == r["hutong"]["n"] == 12
        assert r["plain"]["not_aa"] == 0 and r["hutong"]["not_aa"] == 0
        assert r["ratio"] == pytest.approx(r["hutong"]["per_s"] / r["plain"]["per_s"])
