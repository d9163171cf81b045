"""The adapter's own small SQLite file (in the node's data folder for this adapter).

What the node does not keep for us: the answers given to messages that did not become a
referral step (ADT, refused messages), so a resent MSH-10 gets the same ACK; the patients as
the HIS's ADT feed describes them; which slip numbers were taken (duplicate detection) and the
referral thread each slip belongs to on this side; the HIS's own patient id for a referral it
received (an ADT naming the referral in the field the ``referral_id_field`` option names), for
results sent into the HIS; the content digest last seen under each control id (MSH-3/4/10), to
tell IT when a different message reuses one.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    source_key TEXT PRIMARY KEY, ack_code TEXT NOT NULL, field TEXT, error_code TEXT,
    message TEXT, quarantine_id INTEGER, at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS patients (
    mrn TEXT PRIMARY KEY, name TEXT, gender TEXT, birth_date TEXT, id_number TEXT, phone TEXT,
    patient_class TEXT, visit_number TEXT, admitted_at TEXT, discharged_at TEXT,
    last_event TEXT NOT NULL, source_key TEXT NOT NULL, updated_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS slips (
    slip_no TEXT NOT NULL, side TEXT NOT NULL, thread TEXT, source_key TEXT, mrn TEXT,
    PRIMARY KEY (slip_no, side));
CREATE TABLE IF NOT EXISTS sent (
    packet_id TEXT PRIMARY KEY, thread TEXT NOT NULL, what TEXT NOT NULL, at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS controls (
    control_key TEXT PRIMARY KEY, digest TEXT NOT NULL, source_key TEXT NOT NULL, at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS referral_visits (
    thread TEXT PRIMARY KEY, mrn TEXT NOT NULL, source_key TEXT NOT NULL);
"""
PATIENT_FIELDS = ("name", "gender", "birth_date", "id_number", "phone", "patient_class",
                  "visit_number", "admitted_at", "discharged_at")


class State:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(SCHEMA)

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def one(self, sql: str, *args: Any) -> sqlite3.Row | None:
        with self._lock:
            row: sqlite3.Row | None = self._conn.execute(sql, args).fetchone()
            return row

    def answer(self, source_key: str) -> sqlite3.Row | None:
        return self.one("SELECT * FROM answers WHERE source_key = ?", source_key)

    def patient(self, mrn: str) -> dict[str, str]:
        row = self.one("SELECT * FROM patients WHERE mrn = ?", mrn)
        if row is None:
            return {}
        return {k: row[k] for k in ("mrn", "name", "gender", "birth_date", "id_number", "phone")
                if row[k]}

    def slip(self, slip_no: str, side: str) -> sqlite3.Row | None:
        return self.one("SELECT * FROM slips WHERE slip_no = ? AND side = ?", slip_no, side)

    def thread_slip(self, thread: str) -> sqlite3.Row | None:
        return self.one("SELECT * FROM slips WHERE thread = ?", thread)

    def close(self) -> None:
        with self._lock:
            self._conn.close()
