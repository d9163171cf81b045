"""SQLite WAL checkpoints off the committing thread.

With SQLite's default (``wal_autocheckpoint`` = 1,000 pages) the commit that crosses the limit
copies the whole WAL into the database file and fsyncs it before it returns. A lab message
writes 200-450 WAL pages (a resource row, its history and its index-table rows land on pages
spread over a dozen B-trees), so every second to fifth message paid for a checkpoint before
its ACK (bench/lis.py; 20 OBX: commit 9 ms without, 18 ms mean with).

Instead, the node's writer connections run with ``wal_autocheckpoint=0`` and this thread runs
``PRAGMA wal_checkpoint(PASSIVE)`` on its own connection after commits, at most every
``interval_s``: a passive checkpoint takes no write lock, so commits go on while it copies.
It changes nothing for durability (a committed transaction is in the WAL, fsynced, either
way). The log starts over at the first commit that begins after a checkpoint caught up; when
writers never leave it the moment to (the log holds over ``restart_frames`` frames, copied or
not), the thread takes the store's writer lock for a ``RESTART`` checkpoint: the remainder is
copied while commits wait, and the log starts over. The file is cut back to
``JOURNAL_SIZE_LIMIT`` when it starts over (``PRAGMA journal_size_limit``).

A ``RESTART`` also waits for every reader of an older snapshot, and commits wait for it. A
reader that lasts seconds (an export, a long page, another process reading the file) would
then hold every writer for seconds, and again at each retry. So a ``RESTART`` waits at most
``RESTART_WAIT_S`` (0.1 s) and, when a reader still holds it off, the next one is tried only
after a back-off that doubles up to ``RESTART_BACKOFF_MAX_S``; passive checkpoints go on
meanwhile and the log grows until the reader is gone (the soak found writers held 2 s of every
2.2 s while a reader held a snapshot).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager

log = logging.getLogger(__name__)

INTERVAL_S = 0.2
RESTART_FRAMES = 4096  # 16 MiB of 4 KiB pages
JOURNAL_SIZE_LIMIT = 64 << 20  # the -wal file is cut back to this when the log starts over
RESTART_WAIT_S = 0.1  # how long commits may wait for a RESTART (readers of older snapshots)
RESTART_BACKOFF_S = 0.5  # after a RESTART that readers held off: the first wait before another
RESTART_BACKOFF_MAX_S = 8.0


class Checkpointer:
    """One per SQLite store of a process; its thread starts on the first commit."""

    def __init__(
        self,
        path: str,
        writer_lock: Callable[[], AbstractContextManager[object]],
        *,
        interval_s: float = INTERVAL_S,
        restart_frames: int = RESTART_FRAMES,
    ) -> None:
        self.path = path
        self.writer_lock = writer_lock
        self.interval_s = interval_s
        self.restart_frames = restart_frames
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._guard = threading.Lock()
        self.runs = 0
        self.restarts = 0  # RESTART attempts (each held the writers up to RESTART_WAIT_S)
        self.restarts_busy = 0  # ... of which a reader held off
        self._backoff = 0.0  # 0: no RESTART held off since the last that went through
        self._next_restart = 0.0  # time.monotonic() before which no RESTART is tried

    def committed(self) -> None:
        """After a commit (cheap: sets an event; starts the thread the first time)."""
        if self._thread is None:
            with self._guard:
                if self._stop.is_set():
                    return
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, daemon=True, name="sqlite-checkpoint"
                    )
                    self._thread.start()
        self._wake.set()

    def close(self) -> None:
        with self._guard:
            self._stop.set()
            thread = self._thread
        self._wake.set()
        if thread is not None:
            thread.join(timeout=30)

    def _run(self) -> None:
        conn: sqlite3.Connection | None = None
        try:
            # a short busy timeout: RESTART waits for readers of older snapshots while the
            # writers wait for it; it gives up after this and backs off (see _checkpoint)
            conn = sqlite3.connect(
                self.path, timeout=RESTART_WAIT_S, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA synchronous=FULL")  # the database file fsynced by the copy
            conn.execute("PRAGMA wal_autocheckpoint=0")
            conn.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT}")
            while not self._stop.is_set():
                self._wake.wait()
                self._wake.clear()
                if self._stop.is_set():
                    return
                self._checkpoint(conn)
                self._stop.wait(self.interval_s)  # commits meanwhile: one checkpoint for all
        except sqlite3.Error as exc:  # the next commit starts a new thread
            log.warning("WAL checkpoint failed: %s", type(exc).__name__)
        finally:
            if conn is not None:
                conn.close()
            with self._guard:
                self._thread = None

    def _checkpoint(self, conn: sqlite3.Connection) -> None:
        _busy, frames, _copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        self.runs += 1
        if frames < self.restart_frames:
            return
        # Also when all is copied: a writer starts the log over only if its transaction began
        # with nothing left to copy. Commits back to back (the LIS: one every 10-20 ms) each
        # begin before the copy of the last one ends, so the log grew to 2.5 GB, every frame
        # copied, never restarted (soak, 10 minutes at 50 msg/s), and every read walked its index.
        if time.monotonic() < self._next_restart:
            return  # a reader held the last one off: passive copies until the back-off ends
        with self.writer_lock():
            busy, _frames, _copied = conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
        self.restarts += 1
        if busy:
            self.restarts_busy += 1
            self._backoff = min(max(self._backoff * 2, RESTART_BACKOFF_S), RESTART_BACKOFF_MAX_S)
            self._next_restart = time.monotonic() + self._backoff
        else:
            self._backoff = self._next_restart = 0.0
