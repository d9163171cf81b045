"""PACS adapter (``type = "pacs-dicom"``): DICOM C-STORE in, C-FIND/C-GET out, ImagingStudy and
DiagnosticReport into the node store, on-demand study fetch between members.

See :mod:`adapters.pacs.adapter` for the design, :mod:`adapters.pacs.fetch` for the packets.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from adapters.pacs.adapter import PacsAdapter
    from bridge.local.host import AdapterHost


def create(host: AdapterHost, options: dict[str, Any]) -> PacsAdapter:
    from adapters.pacs.adapter import PacsAdapter

    return PacsAdapter(host, options)
