"""Checks before a node serves anything: one process per data folder, a sound store, a store
no younger than its audit anchor. Each refusal is one line with a stable code (bridge/errors.py).

* ``lock_data_dir``: ``hutong run`` holds an exclusive ``flock`` on ``<data_dir>/hutong-run.lock``
  (the file names the holder's pid) for its whole life; a second ``hutong run`` on the same
  folder refuses (``HT-DATA-LOCKED``). ``hutong worker`` processes (PostgreSQL, several per
  store by design) take no lock: they run no adapter and no port.
* ``check_sqlite``: ``PRAGMA quick_check`` on the node's SQLite file before anything writes to
  it (``HT-STORE-CORRUPT`` naming the file); a missing file while an anchor exists is a deleted
  store (``HT-AUDIT-ANCHOR``).
* ``check_anchor``: the anchor file's checkpoint must verify with this node's keys and its row
  must be in the store with the same hash (``HT-AUDIT-ANCHOR`` otherwise, naming the way out:
  ``hutong audit accept-restore`` for a deliberate restore). With no anchor file yet (a store
  from before anchors), the latest checkpoint is anchored now.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from pathlib import Path
from typing import Any

from bridge.audit.anchor import ANCHOR_NAME, AnchorFile, from_checkpoint, problem
from bridge.errors import AuditAnchorMismatch, DataDirLocked, StoreCorrupt

LOCK_NAME = "hutong-run.lock"
RESTORE_HINT = "if the store was restored on purpose: hutong audit accept-restore --config <file>"

_held: list[int] = []  # lock fds kept open for the life of the process


def pid_lock(path: Path) -> int | str:
    """Take an exclusive, non-blocking ``flock`` on ``path`` for the life of this process and
    write our pid in it: the open fd, or the holder's pid (text) when another process has it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            return os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
        finally:
            os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held.append(fd)
    return fd


def release(fd: int) -> None:
    """Give back a lock taken with :func:`pid_lock` (before the process ends)."""
    if fd in _held:
        _held.remove(fd)
        os.close(fd)


def lock_data_dir(data_dir: Path, role: str = "run") -> int:
    """Take the folder's exclusive lock for ``role`` (non-blocking) and write our pid in it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / (LOCK_NAME if role == "run" else f"hutong-{role}.lock")
    got = pid_lock(path)
    if isinstance(got, str):
        raise DataDirLocked(
            f"data folder {data_dir} is in use by another 'hutong {role}' "
            f"(pid {got}, lock file {path})"
        )
    return got


def sqlite_path(dsn: str) -> Path | None:
    if not dsn.startswith("sqlite"):
        return None
    path = dsn.split("///", 1)[1] if "///" in dsn else ""
    return Path(path) if path and path != ":memory:" else None


def check_sqlite(plan: Any) -> None:
    """quick_check the node's SQLite store; refuse a deleted one that an anchor remembers."""
    path = sqlite_path(plan.storage_dsn)
    if path is None:
        return
    anchor_path = plan.data_dir / ANCHOR_NAME
    if not path.exists():
        if anchor_path.exists():
            try:
                seq = AnchorFile(anchor_path).read()
                seen = f"audit seq {seq.seq}" if seq else "an audit checkpoint"
            except ValueError:
                seen = "an audit checkpoint"
            raise AuditAnchorMismatch(
                f"store {path} is missing but {anchor_path} records "
                f"{seen}: the store was deleted or moved; {RESTORE_HINT}"
            )
        return
    try:
        conn = sqlite3.connect(path, timeout=30)
        try:
            rows = conn.execute("PRAGMA quick_check").fetchall()
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise StoreCorrupt(
            f"{path} cannot be read as a SQLite database ({exc}); restore it from a backup"
        ) from None
    if rows != [("ok",)]:
        first = str(rows[0][0]).splitlines()[0][:200] if rows else "no answer"
        raise StoreCorrupt(
            f"{path} fails PRAGMA quick_check ({len(rows)} problem(s), first: "
            f"{first}); restore it from a backup"
        ) from None


def check_anchor(ctx: Any) -> None:
    """The store holds the anchored checkpoint's row, unchanged; or there is no anchor yet."""
    from bridge.node import own_signing_keys

    with ctx.store.read() as conn:
        keys = [*ctx.plan.me.signing_keys, *own_signing_keys(conn)]
    path = ctx.plan.data_dir / ANCHOR_NAME
    anchor_file = AnchorFile(path)
    try:
        anchor = anchor_file.read()
    except ValueError as exc:
        raise AuditAnchorMismatch(
            f"audit anchor {path} is unreadable ({exc}); {RESTORE_HINT}"
        ) from None
    store = sqlite_path(ctx.plan.storage_dsn) or "(PostgreSQL store)"
    with ctx.store.read() as conn:
        if anchor is None:
            latest = _latest_checkpoint(conn)
            if latest is not None:  # a store from before anchors: anchor it from now on
                anchor_file.advance(from_checkpoint(ctx.node_id, latest))
                ctx.audit.committed(from_checkpoint(ctx.node_id, latest))
            return
        if anchor.node != ctx.node_id or not anchor.verifies(keys):
            raise AuditAnchorMismatch(
                f"audit anchor {path} is not a checkpoint signed by "
                f"{ctx.node_id}'s keys; {RESTORE_HINT}"
            )
        found = problem(conn, anchor, f"anchor {path}")
        latest = _latest_checkpoint(conn)
    if found is not None:
        raise AuditAnchorMismatch(
            f"store {store} is younger than its audit anchor: {found[1]}; {RESTORE_HINT}"
        )
    ctx.audit.committed(
        from_checkpoint(ctx.node_id, latest)
        if latest is not None and latest.seq >= anchor.seq
        else anchor
    )


def _latest_checkpoint(conn: Any) -> Any:
    from sqlalchemy import select

    from bridge.audit.tables import AuditCheckpoint

    t = AuditCheckpoint.__table__  # type: ignore[attr-defined]
    return conn.execute(select(t).order_by(t.c.seq.desc(), t.c.id.desc()).limit(1)).first()
