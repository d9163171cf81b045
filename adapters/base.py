"""Adapter-side helpers: defaults and status counters for an adapter, checks its options share.

The contract itself (the protocols, the adapter type an entry point declares, the failure
classes a sink raises) is the engine's: :mod:`bridge.local.contract`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from bridge.errors import HutongError

if TYPE_CHECKING:
    from bridge.config.models import AdapterSettings
    from bridge.local.contract import Delivery, Problem
    from bridge.local.host import AdapterHost


def tls_problems(tls: Any, settings: AdapterSettings, key: str = "tls") -> list[Problem]:
    """A listener's ``tls = {cert, key, client_ca}``: every file it names exists."""
    if tls is None:
        return []
    out: list[Problem] = []
    for name in ("cert", "key", "client_ca"):
        value = getattr(tls, name, None)
        if value and not _path(settings, value).is_file():
            out.append((f"{key}.{name}", f"no file {value}"))
    return out


def _path(settings: AdapterSettings, value: str) -> Path:
    p = Path(value)
    return p if p.is_absolute() else (settings.base_dir / p).resolve()


class BaseAdapter:
    """Defaults for the optional parts; a source-only adapter need not receive anything."""

    def __init__(self, host: AdapterHost, options: Any) -> None:
        self.host = host
        self.name = host.adapter_name
        self.options = options
        self.counters: dict[str, int] = {}
        self.last_ok_at: str | None = None
        self.last_error: str | None = None
        self.last_error_at: str | None = None

    def start(self) -> None:
        pass

    def deliver(self, item: Delivery) -> None:
        raise HutongError(f"adapter '{self.name}' does not receive packets ({item.kind})")

    def flush(self) -> None:
        pass

    def count(self, what: str, n: int = 1) -> None:
        self.counters[what] = self.counters.get(what, 0) + n

    def ok(self) -> None:
        self.last_ok_at = self.host.now().isoformat()

    def failed(self, message: str) -> None:
        self.last_error = message
        now = getattr(self.host, "now", None)
        if now is None:  # a bare host (unit tests): wall clock
            from datetime import UTC, datetime

            now = lambda: datetime.now(UTC)  # noqa: E731
        self.last_error_at = now().isoformat()

    def status(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": type(self).__name__,
            "last_ok_at": self.last_ok_at,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "counters": dict(self.counters),
        }

    def stop(self) -> None:
        pass
