"""Work to do just before a write transaction commits, or once it has committed (and never if
it rolled back).

The audit chain signs checkpoints inside the caller's transaction; the anchor file outside the
database may only name a checkpoint that is durably in it, so it is written after the commit.
Before the commit, inside the transaction, the audit rows a transaction gathered are chained in
one append (``AuditChain.append_at_commit``): the chain's head is read and, on PostgreSQL, its
lock taken once a transaction, at its end, not at its first audited step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_KEY = "_hutong_after_commit"
_BEFORE = "_hutong_before_commit"


def before_commit(conn: Any, hook: Callable[[], None]) -> bool:
    """Run ``hook`` in ``conn``'s transaction just before it commits; an error it raises rolls
    the transaction back. False (nothing registered) if ``conn`` is not a ``Store.write``
    transaction, which alone runs these hooks: the caller must then do the work now."""
    hooks = conn.__dict__.get(_BEFORE)
    if hooks is None:
        return False
    hooks.append(hook)
    return True


def open_before_commit(conn: Any) -> None:
    """``Store.write``: this transaction runs its before-commit hooks."""
    conn.__dict__[_BEFORE] = []


def run_before_commit(conn: Any) -> None:
    """``Store.write``, at the end of the block, before the commit: every hook, in order (a
    hook may register another; it runs too)."""
    hooks = conn.__dict__.get(_BEFORE) or []
    while hooks:
        hooks.pop(0)()
    conn.__dict__.pop(_BEFORE, None)


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
    conn.__dict__.pop(_BEFORE, None)
