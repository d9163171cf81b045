"""What makes a first ``hutong demo`` safe: one demo per folder, ports moved by ``--port-base``
and checked free before any process starts (naming the port and, where the system tells, the
process holding it)."""

from __future__ import annotations

import re
from pathlib import Path

from bridge.errors import DemoLocked
from bridge.portcheck import check_free, holder_of
from bridge.startup import pid_lock, release

__all__ = ["check_free", "holder_of", "lock_folder", "ports_in", "release", "shift_ports"]

#: the shipped Fuxing files use 8101-8107 (local), 9101-9107 (peer), 8200-8299 (vendor systems)
SHIPPED_BASE = 8000
_ADDR = re.compile(r"(127\.0\.0\.1:)(\d{4,5})\b")
_PORT = re.compile(r"^(\s*\"?port\"?\s*=\s*)(\d{4,5})\b", re.MULTILINE)


def lock_folder(folder: Path) -> int:
    """An exclusive lock beside the folder (the folder itself is wiped and recreated); a
    second demo on the same folder gets DemoLocked at once, before anything is touched."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    got = pid_lock(folder.parent / f".{folder.name}.demo.lock")
    if isinstance(got, str):
        raise DemoLocked(
            f"demo folder {folder} is in use by another 'hutong demo' (pid {got});"
            f" stop it first or use --folder elsewhere (and --port-base)"
        )
    return got


def shift_ports(text: str, shift: int) -> str:
    """Every loopback port and ``port = N`` of a shipped file moved by ``shift``."""
    if shift == 0:
        return text
    text = _ADDR.sub(lambda m: f"{m.group(1)}{int(m.group(2)) + shift}", text)
    return _PORT.sub(lambda m: f"{m.group(1)}{int(m.group(2)) + shift}", text)


def ports_in(text: str) -> set[int]:
    """The ports a node/alliance file makes something listen on or connect to (comments
    ignored)."""
    live = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    return {int(m.group(2)) for m in _ADDR.finditer(live)} | {
        int(m.group(2)) for m in _PORT.finditer(live)
    }
