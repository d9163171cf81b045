"""Server-rendered web pages for clinicians, auditors and IT on the node's local port."""

from bridge.web.pages import web_router

__all__ = ["web_router"]
