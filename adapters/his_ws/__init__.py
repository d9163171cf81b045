"""XML web-service HIS adapter (issue 4): CDA-like slips in SOAP envelopes; see adapter.py."""

from adapters.his_ws.adapter import WsAdapter, create

__all__ = ["WsAdapter", "create"]
