"""Work to do once a write transaction has committed (and never if it rolled back).

The audit chain signs checkpoints inside the caller's transaction; the anchor file outside the
database may only name a checkpoint that is durably in it, so it is written from here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_KEY = "_hutong_after_commit"


def after_commit(conn: Any, hook: Callable[[], None]) -> None:
    """Run ``hook`` after ``conn``'s transaction commits (``Store.write`` runs them)."""
    conn.__dict__.setdefault(_KEY, []).append(hook)


def run_after_commit(conn: Any) -> None:
    """Called by ``Store.write`` after the commit; a failing hook is logged, never raised (the
    data is committed: the caller must see success)."""
    import logging

    for hook in conn.__dict__.pop(_KEY, ()):
        try:
            hook()
        except Exception:  # the commit stands; the hook's failure is logged
            logging.getLogger("hutong.store").exception("after-commit hook failed")


def drop_after_commit(conn: Any) -> None:
    conn.__dict__.pop(_KEY, None)
