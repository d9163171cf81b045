"""Wake-ups across the processes of one node on PostgreSQL (``LISTEN``/``NOTIFY``).

A process wakes its own jobs when it has queued work for them (``Node.wake``); with
``hutong worker`` processes beside it the work may be for a lane another process holds, which
found it only at its next poll (``poll_interval_s``, 0.5 s): a relayed packet waited up to that
long in the platform. Now the process also sends ``NOTIFY hutong_wake, '<job>'`` and every
process of the node listens on a connection of its own and wakes that job. Only when other
processes work the node's jobs (``Lanes.alone``): a single process sends nothing.

A wake-up is a hint, as a local one is: a lost notification (a listener reconnecting, a
process starting) costs the wait until the next poll, never a packet. PostgreSQL delivers a
notification after its transaction commits; these are sent on an autocommit connection after
the work's own commit, by a thread of their own (the caller does not wait for the round trip).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

CHANNEL = "hutong_wake"
#: how long the listener waits for a notification before it checks whether to stop
_WAIT_S = 0.5
#: a listener whose connection failed tries again after this long
_RETRY_S = 1.0

log = logging.getLogger(__name__)


class Wakeups:
    """One process's end of the node's wake-up channel: ``notify`` sends, a thread listens and
    calls ``on_wake(job)`` for every notification another process sent."""

    def __init__(self, dsn: str, on_wake: Callable[[str], None]) -> None:
        from sqlalchemy.engine import make_url

        self.url = make_url(dsn).set(drivername="postgresql").render_as_string(hide_password=False)
        self.on_wake = on_wake
        self._stop = threading.Event()
        self._send_lock = threading.Lock()  # guards what is pending
        self._send: Any = None  # the notifying connection (the sender thread's only)
        self._pending: set[str] = set()
        self._sending = False
        self._due = threading.Event()
        self._sender: threading.Thread | None = None
        self._listening = threading.Event()
        self._thread = threading.Thread(target=self._listen, name="hutong-wakeups", daemon=True)
        #: notifications sent and received (other processes' only)
        self.sent = 0
        self.received = 0

    def start(self) -> None:
        self._thread.start()

    def wait_listening(self, timeout: float) -> bool:
        """True once the listener has run ``LISTEN`` (tests, start-up)."""
        return self._listening.wait(timeout)

    def _connect(self) -> Any:
        import psycopg

        return psycopg.connect(
            self.url, autocommit=True, connect_timeout=10, application_name="hutong-wakeups"
        )

    def notify(self, jobs: Iterable[str]) -> None:
        """Tell the node's other processes that ``jobs`` have work. Returns at once: a thread
        of its own sends what is pending in one statement (the intake answered each request
        only after its round trip, one request at a time, before), so the jobs named by
        several requests meanwhile go together."""
        with self._send_lock:
            self._pending.update(jobs)
            if not self._pending:
                return
            if self._sender is None:
                self._sender = threading.Thread(
                    target=self._send_loop, name="hutong-wakeups-send", daemon=True
                )
                self._sender.start()
        self._due.set()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every wake-up asked for so far is sent (tests)."""
        self._due.set()
        deadline = threading.Event()
        for _ in range(int(timeout / 0.01)):
            with self._send_lock:
                if not self._pending and not self._sending:
                    return True
            deadline.wait(0.01)
        return False

    def _send_loop(self) -> None:
        import psycopg

        while not self._stop.is_set():
            self._due.wait(_WAIT_S)
            self._due.clear()
            with self._send_lock:
                names, self._pending = sorted(self._pending), set()
                self._sending = bool(names)
            if not names:
                continue
            try:
                if self._send is None or self._send.closed:
                    self._send = self._connect()
                self._send.execute(
                    "SELECT pg_notify(%s, j) FROM unnest(%s::text[]) j", (CHANNEL, names)
                )
                self.sent += len(names)
            except psycopg.Error as exc:  # a hint: the jobs poll anyway
                log.debug("wake-up not sent: %s", type(exc).__name__)
                self._drop_sender()
            finally:
                with self._send_lock:
                    self._sending = False

    def _own_pid(self) -> int | None:
        conn = self._send
        return conn.info.backend_pid if conn is not None and not conn.closed else None

    def _listen(self) -> None:
        import psycopg

        while not self._stop.is_set():
            try:
                with self._connect() as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self._listening.set()
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=_WAIT_S):
                            if note.pid == self._own_pid():
                                continue  # this process woke its own jobs already
                            self.received += 1
                            try:
                                self.on_wake(note.payload)
                            except Exception:  # a hint; the listener goes on
                                log.exception("wake-up of %s failed", note.payload)
            except psycopg.Error as exc:
                self._listening.clear()
                log.debug("wake-up listener: %s; again in %.0f s", type(exc).__name__, _RETRY_S)
                self._stop.wait(_RETRY_S)

    def _drop_sender(self) -> None:
        if self._send is not None:
            with contextlib.suppress(Exception):  # already broken
                self._send.close()
            self._send = None

    def close(self) -> None:
        self._stop.set()
        self._due.set()
        for thread in (self._thread, self._sender):
            if thread is not None and thread.is_alive():
                thread.join(timeout=2 * _WAIT_S + 1)
        self._drop_sender()
