"""PACS adapter (``type = "pacs-dicom"``): DICOM C-STORE in, C-FIND/C-GET out, ImagingStudy and
DiagnosticReport into the node store, on-demand study fetch between members.

See :mod:`adapters.pacs.adapter` for the design, :mod:`adapters.pacs.fetch` for the packets.
:data:`create` is the type's declaration to the engine (entry point ``pacs-dicom``).
"""

from __future__ import annotations

from typing import Any

from adapters.pacs.options import PacsOptions
from bridge.local.contract import AdapterType


def _build(host: Any, opts: PacsOptions) -> Any:
    from adapters.pacs.adapter import PacsAdapter

    return PacsAdapter(host, opts)


create = AdapterType(
    name="pacs-dicom",
    options=PacsOptions,
    build=_build,
    listens=lambda o: [(o.bind_host, o.bind_port)],
    example={"bind": "127.0.0.1:0"},
)
