"""Intermediate-database HIS style (中间库): vendor tables polled by watermark, inbox tables
written.

Entry point ``his-middle-db`` (``pyproject.toml``). See :mod:`adapters.his_db.adapter` for what
it does and :mod:`adapters.his_db.options` for the ``[adapters.options]`` keys.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from adapters.his_db.adapter import HisDbAdapter
    from bridge.local.host import AdapterHost


def create(host: AdapterHost, options: dict[str, Any]) -> HisDbAdapter:
    from adapters.his_db.adapter import HisDbAdapter
    from adapters.his_db.options import parse_options

    return HisDbAdapter(host, parse_options(host, options))
