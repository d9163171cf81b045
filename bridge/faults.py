"""Fault injection for the fault suite: a node process dies or misbehaves at a named point.

Nothing here acts unless its environment variable is set; unset, ``point()`` is one dict
lookup. The variables (set by tests on the process they start, never in a site's config):

``HUTONG_FAULT=<point>[:<n>]``       SIGKILL this process the n-th time (default 1st) it passes
                                      ``<point>``. Points: ``queue.before_commit``,
                                      ``sender.after_commit_before_send``,
                                      ``sender.after_send_before_receipt``,
                                      ``intake.before_commit``, ``intake.after_commit``,
                                      ``dispatcher.after_batch_applied`` (a round's
                                      results committed, nothing handed over yet),
                                      ``dispatcher.during_delivery``,
                                      ``journal.before_expand``,
                                      ``journal.before_commit``,
                                      ``journal.after_commit`` (the results
                                      journal's job, bridge/results/journal.py);
                                      adapters:
                                      ``his_db.after_poll``, ``his_db.after_submit``,
                                      ``his_db.after_quarantine``.
``HUTONG_FAULT_DELAY=<point>:<s>``    sleep s seconds at every pass of ``<point>`` (a slow peer).
``HUTONG_CLOCK_OFFSET_S=<s>``         this node's clock runs s seconds off (clock skew).
``HUTONG_CLOCK_FILE=<path>``          the offset is read from this file whenever it changes
                                      (simulated hours: a test moves two nodes' clocks at once).
``HUTONG_FAULT_DB_GROW_PAGES=<n>``    SQLite may grow by only n pages more (a full disk: every
                                      write that needs room fails with SQLITE_FULL).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

_KILL: dict[str, int] = {}
_DELAY: dict[str, float] = {}
_hits: dict[str, int] = {}
_lock = threading.Lock()


def _load() -> None:
    spec = os.environ.get("HUTONG_FAULT", "")
    if spec:
        name, _, nth = spec.partition(":")
        _KILL[name] = int(nth or 1)
    spec = os.environ.get("HUTONG_FAULT_DELAY", "")
    if spec:
        name, _, seconds = spec.rpartition(":")
        _DELAY[name] = float(seconds)


_load()


def point(name: str) -> None:
    """A named place where the fault suite may kill or slow this process."""
    if name in _DELAY:
        time.sleep(_DELAY[name])
    nth = _KILL.get(name)
    if nth is None:
        return
    with _lock:
        _hits[name] = _hits.get(name, 0) + 1
        if _hits[name] >= nth:
            os.kill(os.getpid(), signal.SIGKILL)


def clock(base: Callable[[], datetime]) -> Callable[[], datetime]:
    """``base`` shifted by HUTONG_CLOCK_OFFSET_S or the number in HUTONG_CLOCK_FILE."""
    fixed = float(os.environ.get("HUTONG_CLOCK_OFFSET_S") or 0)
    path = os.environ.get("HUTONG_CLOCK_FILE")
    if not path:
        if not fixed:
            return base
        shift = timedelta(seconds=fixed)
        return lambda: base() + shift
    source = Path(path)
    cache: dict[str, Any] = {"mtime": None, "offset": timedelta(0)}

    def now() -> datetime:
        try:
            mtime = source.stat().st_mtime_ns
            if mtime != cache["mtime"]:
                cache["offset"] = timedelta(seconds=float(source.read_text().strip() or 0))
                cache["mtime"] = mtime
        except (OSError, ValueError):
            pass
        offset: timedelta = cache["offset"]
        return base() + timedelta(seconds=fixed) + offset

    return now


def install(ctx: Any) -> None:
    """Apply the clock and disk faults the environment asks for to a node's context."""
    if os.environ.get("HUTONG_CLOCK_OFFSET_S") or os.environ.get("HUTONG_CLOCK_FILE"):
        ctx.now = clock(ctx.now)
    grow = os.environ.get("HUTONG_FAULT_DB_GROW_PAGES")
    if grow and ctx.store.is_sqlite:
        from sqlalchemy import event

        room = int(grow)

        def _limit(dbapi_conn: Any, _rec: object) -> None:
            cur = dbapi_conn.cursor()
            pages = cur.execute("PRAGMA page_count").fetchone()[0]
            cur.execute(f"PRAGMA max_page_count={pages + room}")
            cur.close()

        event.listen(ctx.store.engine, "connect", _limit)
        ctx.store.engine.dispose()  # pooled connections opened before the limit drop out
