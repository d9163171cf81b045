"""Calls to the HIS web service over HTTP, every driver failure translated to HisUnavailable.

One short-lived connection per call with explicit connect and read timeouts (a vendor service
behind IIS or WebLogic drops idle keep-alive connections without telling anyone).
"""

from __future__ import annotations

import http.client
from urllib.parse import urlsplit

from lxml import etree

from adapters.his_ws import soap
from adapters.his_ws.errors import BadDocument, HisUnavailable


class HisClient:
    def __init__(self, url: str, timeout_s: float = 10.0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url}")
        self.url = url
        self.parts = parts
        self.timeout_s = timeout_s

    def call(self, action: str, body: bytes) -> etree._Element:
        """POST one envelope; the response's operation element, or HisUnavailable."""
        cls = http.client.HTTPSConnection if self.parts.scheme == "https" \
            else http.client.HTTPConnection
        conn = cls(self.parts.hostname, self.parts.port, timeout=self.timeout_s)
        try:
            conn.request("POST", self.parts.path or "/", body, {
                "Content-Type": "text/xml; charset=utf-8",
                "SOAPAction": f'"urn:hutong:his-ws:1#{action}"'})
            resp = conn.getresponse()
            data = resp.read()
            status = resp.status
        except (OSError, http.client.HTTPException) as exc:  # timeouts are OSError
            raise HisUnavailable(f"HIS {action}: {type(exc).__name__}") from exc
        finally:
            conn.close()
        try:
            return soap.operation(data, f"HIS {action} response")
        except soap.Fault as fault:
            raise HisUnavailable(f"HIS {action} answered a SOAP Fault {fault.code}: "
                                 f"{fault.text[:200]}") from None
        except BadDocument as exc:
            raise HisUnavailable(f"HIS {action} answered HTTP {status} without a valid "
                                 f"envelope ({exc.code})") from None

    def receive(self, doc_type: str, doc_id: str, raw: bytes) -> str:
        op = self.call(soap.RECEIVE[doc_type], soap.receive(doc_type, doc_id, raw))
        return soap.text(op, "Status")

    def pending(self, since: int, max_docs: int) -> list[soap.Pending]:
        return soap.read_pending(self.call("GetPendingDocuments",
                                           soap.get_pending(since, max_docs)))

    def ack(self, seqs: list[int]) -> int:
        return int(soap.text(self.call("AckDocuments", soap.ack(seqs)), "Acked") or 0)
