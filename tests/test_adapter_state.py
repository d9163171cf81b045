"""Adapters' own state lives in the node's database (bridge/local/state.py), not in files."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from adapters.his_hl7.state import State
from bridge.local.state import AdapterState
from bridge.store.db import Store


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(f"sqlite:///{tmp_path / 'node.db'}")
    s.create_all()
    yield s
    s.dispose()


def _now() -> datetime:
    return datetime(2026, 12, 7, 9, 0, tzinfo=UTC)


def test_keyed_state_per_adapter_and_namespace(store: Store) -> None:
    check_keyed_state(store)


@pytest.mark.postgres
def test_keyed_state_on_postgresql(pg_db: str) -> None:
    pg = Store(pg_db)
    try:
        pg.create_all()
        check_keyed_state(pg)
    finally:
        pg.dispose()


def check_keyed_state(store: Store) -> None:
    a, b = AdapterState(store, "his", _now), AdapterState(store, "lis", _now)
    assert a.get("slips", "k") is None
    a.put("slips", "k", {"v": 1}, thread="t1")
    a.put("slips", "k", {"v": 2}, thread="t1")  # replaced, not added
    b.put("slips", "k", {"v": 9})
    assert (a.get("slips", "k"), b.get("slips", "k"), a.get("answers", "k")) == (
        {"v": 2},
        {"v": 9},
        None,
    )
    assert a.add("sent", "p1", {"n": 1}) is True
    assert a.add("sent", "p1", {"n": 2}) is False
    assert a.get("sent", "p1") == {"n": 1}
    a.put("slips", "k2", {"v": 3}, thread="t1")
    assert a.by_thread("slips", "t1") == [{"v": 2}, {"v": 3}]
    assert b.by_thread("slips", "t1") == []
    a.delete("slips", "k")
    assert a.by_thread("slips", "t1") == [{"v": 3}]


def test_a_transaction_commits_all_or_nothing(store: Store) -> None:
    a = AdapterState(store, "his", _now)

    def crash() -> None:
        with a.tx() as kv:
            kv.put("patients", "MRN1", {"name": "x"})
            raise RuntimeError("crash in the middle")

    with pytest.raises(RuntimeError, match="crash in the middle"):
        crash()
    assert a.get("patients", "MRN1") is None
    with a.tx() as kv:
        kv.put("patients", "MRN1", {"name": "y"})
        assert kv.get("patients", "MRN1") == {"name": "y"}
    assert a.get("patients", "MRN1") == {"name": "y"}


def test_the_hl7_his_file_of_an_earlier_version_moves_into_the_node(
    store: Store, tmp_path: Path
) -> None:
    """Its patient index (names, ID numbers, phones) must not stay outside the node's backups:
    the rows are moved in one transaction and the file is deleted."""
    old = tmp_path / "his_hl7.sqlite"
    with sqlite3.connect(old) as c:
        c.executescript("""
        CREATE TABLE answers (source_key TEXT PRIMARY KEY, ack_code TEXT NOT NULL, field TEXT,
            error_code TEXT, message TEXT, quarantine_id INTEGER, at TEXT NOT NULL);
        CREATE TABLE patients (mrn TEXT PRIMARY KEY, name TEXT, gender TEXT, birth_date TEXT,
            id_number TEXT, phone TEXT, patient_class TEXT, visit_number TEXT,
            admitted_at TEXT, discharged_at TEXT, last_event TEXT NOT NULL,
            source_key TEXT NOT NULL, updated_at TEXT NOT NULL);
        CREATE TABLE slips (slip_no TEXT NOT NULL, side TEXT NOT NULL, thread TEXT,
            source_key TEXT, mrn TEXT, PRIMARY KEY (slip_no, side));
        CREATE TABLE sent (packet_id TEXT PRIMARY KEY, thread TEXT NOT NULL, what TEXT NOT NULL,
            at TEXT NOT NULL);
        CREATE TABLE controls (control_key TEXT PRIMARY KEY, digest TEXT NOT NULL,
            source_key TEXT NOT NULL, at TEXT NOT NULL);
        CREATE TABLE referral_visits (thread TEXT PRIMARY KEY, mrn TEXT NOT NULL,
            source_key TEXT NOT NULL);
        INSERT INTO answers VALUES ('k1', 'AR', 'PID-3', '204', 'no patient', 7, '2026-12-01');
        INSERT INTO patients VALUES ('MRN1', '王秀英', 'F', '1950-03-15', '110102195003151234',
            '13800000000', 'O', 'V1', NULL, NULL, 'A04', 'k2', '2026-12-01');
        INSERT INTO slips VALUES ('S1', 'referrer', 'thr-1', 'k3', 'MRN1');
        INSERT INTO sent VALUES ('pkt-1', 'thr-1', 'accept', '2026-12-01');
        INSERT INTO controls VALUES ('HIS/H1/10', 'abc', 'k3', '2026-12-01');
        INSERT INTO referral_visits VALUES ('thr-1', 'MRN1', 'k2');
        """)
    state = State(AdapterState(store, "his", _now))
    assert state.take_file(old) == 6
    assert not old.exists()
    assert state.answer("k1") == {
        "source_key": "k1",
        "ack_code": "AR",
        "field": "PID-3",
        "error_code": "204",
        "message": "no patient",
        "quarantine_id": 7,
        "at": "2026-12-01",
    }
    assert state.patient("MRN1") == {
        "mrn": "MRN1",
        "name": "王秀英",
        "gender": "F",
        "birth_date": "1950-03-15",
        "id_number": "110102195003151234",
        "phone": "13800000000",
    }
    assert state.slip("S1", "referrer") == {
        "slip_no": "S1",
        "side": "referrer",
        "thread": "thr-1",
        "source_key": "k3",
        "mrn": "MRN1",
    }
    assert state.thread_slip("thr-1") == state.slip("S1", "referrer")
    assert state.sent("pkt-1") and not state.sent("pkt-2")
    assert state.mark_sent("pkt-1", "thr-1", "accept", "x") is False
    assert state.swap_control("HIS/H1/10", "def", "k4", "x") == "abc"
    assert state.referral_visit("thr-1") == {"thread": "thr-1", "mrn": "MRN1", "source_key": "k2"}
    assert state.take_file(old) == 0  # nothing left to move


def test_the_ws_his_document_ledger_in_the_node(store: Store, tmp_path: Path) -> None:
    """The XML web-service HIS's document links (which HIS document is which referral) live in
    the node's database; an earlier version's file is moved in and deleted."""
    from adapters.his_ws.ledger import Ledger

    old = tmp_path / "documents.sqlite"
    with sqlite3.connect(old) as c:
        c.executescript("""
        CREATE TABLE documents (doc_id TEXT PRIMARY KEY, direction TEXT NOT NULL,
            type TEXT NOT NULL, thread TEXT, digest TEXT NOT NULL);
        CREATE TABLE report_versions (report_id TEXT NOT NULL, packet_id TEXT NOT NULL,
            version INTEGER NOT NULL, PRIMARY KEY (report_id, packet_id));
        CREATE TABLE results_written (packet_id TEXT PRIMARY KEY);
        INSERT INTO documents VALUES ('HIS-DOC-1', 'in', 'referral', 'thr-1', 'd1');
        INSERT INTO report_versions VALUES ('R1', 'p1', 1);
        INSERT INTO report_versions VALUES ('R1', 'p2', 2);
        INSERT INTO results_written VALUES ('p1');
        """)
    ledger = Ledger(AdapterState(store, "his", _now))
    assert ledger.take_file(old) == 4
    assert not old.exists()
    assert (
        ledger.referral_doc("thr-1"),
        ledger.thread_of("HIS-DOC-1"),
        ledger.digest("HIS-DOC-1"),
    ) == ("HIS-DOC-1", "thr-1", "d1")
    assert ledger.results_written("p1") and not ledger.results_written("p2")
    assert ledger.mark_results_written("p2") is True
    assert ledger.mark_results_written("p2") is False
    assert [ledger.report_version("R1", p) for p in ("p2", "p3", "p1", "p3")] == [2, 3, 1, 3]
    assert ledger.report_version("R2", "p3") == 1
    # a re-pull keeps the first direction and type; a known thread is not lost
    ledger.remember("HIS-DOC-1", "out", "acceptance", None, "d2")
    assert (ledger.referral_doc("thr-1"), ledger.digest("HIS-DOC-1")) == ("HIS-DOC-1", "d2")
    ledger.remember("ACC-1", "out", "acceptance", "thr-1", "d3")
    assert ledger.referral_doc("thr-1") == "HIS-DOC-1"


def test_an_old_state_file_is_deleted_only_after_its_rows_are_committed(
    store: Store, tmp_path: Path
) -> None:
    """``AdapterState.take_file``, the one move of an earlier version's private file for every
    adapter: a move that fails leaves the file and stores nothing; a move that succeeds
    counts only the rows it read and deletes the file with its -wal and -shm."""
    old = tmp_path / "old.sqlite"
    with sqlite3.connect(old) as c:
        c.executescript("""
        CREATE TABLE kept (k TEXT PRIMARY KEY, v TEXT);
        CREATE TABLE other (x INTEGER);
        INSERT INTO kept VALUES ('a', '甲'), ('b', NULL);
        INSERT INTO other VALUES (1), (2), (3);
        """)
    for suffix in ("-wal", "-shm"):
        Path(f"{old}{suffix}").write_bytes(b"")
    kv = AdapterState(store, "his", _now)

    def broken(tx: AdapterState, rows: Any) -> None:
        for r in rows("kept"):
            tx.put("kept", r["k"], r)
        raise RuntimeError("half way")

    with pytest.raises(RuntimeError):
        kv.take_file(old, broken)
    assert old.exists() and kv.get("kept", "a") is None  # rolled back, the file kept

    def move(tx: AdapterState, rows: Any) -> None:
        assert rows("missing") == []
        for r in rows("kept"):
            tx.put("kept", r["k"], r)

    assert kv.take_file(old, move) == 2  # the table it did not read is not counted
    assert [kv.get("kept", k) for k in ("a", "b")] == [{"k": "a", "v": "甲"}, {"k": "b", "v": None}]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("old")] == []
    assert kv.take_file(old, move) == 0
