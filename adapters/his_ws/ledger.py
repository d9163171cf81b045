"""The adapter's own memory of documents: which thread each belongs to and what it held.

A small SQLite file in the adapter's data folder (``host.data_dir``). It links the HIS's
document ids to referral threads both ways (a referral document pulled from the HIS, or one the
node wrote into it under the packet id), and keeps the SHA-256 of every document taken, so a
second document under a taken id is told apart from a harmless re-pull. Exactly-once intake
itself is the node's (``host.submit_referral`` with the source key); this file only answers
"which thread?" and "same content?".
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    doc_id TEXT PRIMARY KEY,
    direction TEXT NOT NULL,      -- in: pulled from the HIS; out: written into it
    type TEXT NOT NULL,           -- referral | acceptance | return | cancel | lab-report
    thread TEXT,
    digest TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS documents_thread ON documents (thread, type);
-- a lab report's versions in the HIS: one per result.lab packet that carried the report
CREATE TABLE IF NOT EXISTS report_versions (
    report_id TEXT NOT NULL,
    packet_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (report_id, packet_id)
);
-- result.lab packets whose every report the HIS answered OK (gaps counted then, once)
CREATE TABLE IF NOT EXISTS results_written (packet_id TEXT PRIMARY KEY);
"""


class Ledger:
    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()

    def digest(self, doc_id: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT digest FROM documents WHERE doc_id = ?",
                                   (doc_id,)).fetchone()
        return None if row is None else str(row[0])

    def remember(self, doc_id: str, direction: str, doc_type: str, thread: str | None,
                 digest: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO documents (doc_id, direction, type, thread, digest) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (doc_id) DO UPDATE SET "
                "thread = COALESCE(excluded.thread, documents.thread), digest = excluded.digest",
                (doc_id, direction, doc_type, thread, digest))

    def thread_of(self, doc_id: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT thread FROM documents WHERE doc_id = ?",
                                   (doc_id,)).fetchone()
        return None if row is None else row[0]

    def referral_doc(self, thread: str) -> str | None:
        """The referral document of a thread as the HIS knows it (its own id or ours)."""
        with self._lock:
            row = self._db.execute("SELECT doc_id FROM documents WHERE thread = ? AND "
                                   "type = 'referral'", (thread,)).fetchone()
        return None if row is None else str(row[0])

    def report_version(self, report_id: str, packet_id: str) -> int:
        """The version of a report as ``packet_id`` carries it: the next free number the first
        time, the same number on every redelivery of that packet."""
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO report_versions (report_id, packet_id, version) "
                "SELECT ?, ?, COALESCE(MAX(version), 0) + 1 FROM report_versions "
                "WHERE report_id = ?", (report_id, packet_id, report_id))
            row = self._db.execute("SELECT version FROM report_versions WHERE report_id = ? "
                                   "AND packet_id = ?", (report_id, packet_id)).fetchone()
        return int(row[0])

    def results_written(self, packet_id: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM results_written WHERE packet_id = ?",
                                    (packet_id,)).fetchone() is not None

    def mark_results_written(self, packet_id: str) -> bool:
        """True the first time (the caller then counts the packet's mapping gaps)."""
        with self._lock:
            return self._db.execute("INSERT OR IGNORE INTO results_written VALUES (?)",
                                    (packet_id,)).rowcount == 1

    def close(self) -> None:
        with self._lock:
            self._db.close()
