"""Intermediate-database HIS style (中间库): vendor tables polled by watermark, inbox tables
written.

Entry point ``his-middle-db`` (``pyproject.toml``) names :data:`create`, this type's declaration
to the engine. See :mod:`adapters.his_db.adapter` for what it does and
:mod:`adapters.his_db.options` for the ``[adapters.options]`` keys.
"""

from __future__ import annotations

from typing import Any

from adapters.his_db.options import Options, check, resolve
from bridge.local.contract import AdapterType


def _build(host: Any, opts: Options) -> Any:
    from adapters.his_db.adapter import HisDbAdapter

    resolved, _ = resolve(opts, host.settings)  # checked before (AdapterType.validate)
    return HisDbAdapter(host, resolved)


create = AdapterType(
    name="his-middle-db",
    options=Options,
    build=_build,
    check=check,
    example={"dsn": "sqlite:///his.db"},
)
