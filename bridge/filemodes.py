"""Private files: what a node writes is readable by its own account only.

``hutong run``, ``worker`` and ``demo`` start with umask 077, so the database and its WAL, the
spool, DICOM files, logs and every folder they make are 0600/0700 from the first byte.
``open_to_others`` names files and folders that are not (made before, or by another tool);
``hutong config check`` reports them for a node's data folder, keys and secret files, and
``hutong run`` warns about its data folder at start.
"""

from __future__ import annotations

import os
import stat
import tomllib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

PRIVATE_UMASK = 0o077
#: most paths named in one report (a data folder can hold many files)
MAX_REPORTED = 50


def private_umask() -> int:
    """Set umask 077 for this process and its children; return the previous one."""
    return os.umask(PRIVATE_UMASK)


def _walk(path: Path) -> Iterator[Path]:
    yield path
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            for name in sorted(dirs) + sorted(files):
                yield Path(root) / name


def open_to_others(paths: Iterable[Path], limit: int | None = None) -> list[tuple[Path, int]]:
    """(path, mode) of every existing file or folder under ``paths`` that group or others may
    read, write or enter (symlinks are not followed); the first ``limit`` only, if given."""
    found: list[tuple[Path, int]] = []
    seen: set[Path] = set()
    for top in paths:
        if not top.exists():
            continue
        for p in _walk(top):
            if p in seen:
                continue
            seen.add(p)
            try:
                st = p.lstat()
            except OSError:
                continue
            if stat.S_ISLNK(st.st_mode):
                continue
            mode = stat.S_IMODE(st.st_mode)
            if mode & 0o077:
                found.append((p, mode))
                if limit is not None and len(found) >= limit:
                    return found
    return found


def describe(path: Path, mode: int) -> str:
    fix = "chmod 700" if path.is_dir() else "chmod 600"
    what = "folder" if path.is_dir() else "file"
    return f"{what} {path} is open to group/others (mode {mode:o}); {fix}"


def _secret_refs(data: Any) -> Iterator[tuple[str, str]]:
    """(key path, file path) of every ``file:`` secret reference in a node file's raw TOML."""
    tokens = data.get("tokens") if isinstance(data, dict) else None
    for role, ref in (tokens or {}).items() if isinstance(tokens, dict) else ():
        if isinstance(ref, str) and ref.startswith("file:"):
            yield f"tokens.{role}", ref[5:]
    for where, ref in (
        ("storage_dsn", data.get("storage_dsn")),
        ("keys.passphrase", (data.get("keys") or {}).get("passphrase")),
        ("alerts.webhook_url", (data.get("alerts") or {}).get("webhook_url")),
    ):
        if isinstance(ref, str) and ref.startswith("file:"):
            yield where, ref[5:]


def node_file_problems(node_file: Path) -> list[str]:
    """Files and folders of one node that others may read: its data folder (database, WAL,
    spool, adapters' files), SQLite file and ``file:`` secrets, and the
    alliance's patient-hash key. One line per path: ``<node file>: <key>: <what>``."""
    try:
        data = tomllib.loads(node_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return []  # the config check reports an unreadable node file itself
    base = node_file.parent
    node_id = str(data.get("node_id") or "")
    checks: list[tuple[str, Path]] = []
    data_dir = data.get("data_dir") or (f"../data/{node_id}" if node_id else None)
    if isinstance(data_dir, str):
        checks.append(("data_dir", (base / data_dir).resolve()))
    dsn = data.get("storage_dsn")
    if isinstance(dsn, str) and dsn.startswith("sqlite:///") and len(dsn) > 10:
        db = Path(dsn[10:])
        db = db if db.is_absolute() else (base / db).resolve()
        checks += [
            ("storage_dsn", db),
            ("storage_dsn", Path(f"{db}-wal")),
            ("storage_dsn", Path(f"{db}-shm")),
        ]
    spool = (data.get("delivery") or {}).get("spool_dir")
    if isinstance(spool, str):
        checks.append(("delivery.spool_dir", (base / spool).resolve()))
    # private key files: the loader's own check (keys.signing / keys.encryption) names them
    for where, rel in _secret_refs(data):
        checks.append((where, (base / rel).resolve()))
    alliance = data.get("alliance")
    if isinstance(alliance, str):
        try:
            adata = tomllib.loads((base / alliance).read_text(encoding="utf-8"))
            ref = (adata.get("alliance") or {}).get("patient_hash_key")
            if isinstance(ref, str) and ref.startswith("file:"):
                checks.append(
                    ("alliance.patient_hash_key", ((base / alliance).parent / ref[5:]).resolve())
                )
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            pass
    label = f"{node_file.parent.name}/{node_file.name}"  # as the loader names it: nodes/x.toml
    lines: list[str] = []
    seen: set[Path] = set()
    for where, path in checks:
        for p, mode in open_to_others([path]):
            if p in seen:
                continue
            seen.add(p)
            lines.append(f"{label}: {where}: {describe(p, mode)}")
    if len(lines) > MAX_REPORTED:
        lines = [
            *lines[:MAX_REPORTED],
            (f"{label}: ... and {len(lines) - MAX_REPORTED} more paths open to group/others"),
        ]
    return lines
