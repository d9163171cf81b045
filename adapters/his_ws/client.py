"""Calls to the HIS web service over HTTP, every driver failure translated to HisUnavailable.

One short-lived connection per call with explicit connect and read timeouts (a vendor service
behind IIS or WebLogic drops idle keep-alive connections without telling anyone), and an overall
deadline per call (a service that trickles bytes cannot hold a poll round forever).

Sizes are judged while reading, never after: a ``GetPendingDocuments`` answer is parsed as it
streams in, and a document whose text grows past ``max_document_bytes`` is cut off there (the
connection is closed, the rest never read): it comes back as a ``Pending`` with ``too_large``
set, after the documents that preceded it, so the adapter quarantines and acks it and the next
documents come in the next round. Every other answer is refused past 1 MiB.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import time
from typing import Any
from urllib.parse import urlsplit

from lxml import etree

from adapters.his_ws import soap, xmlsafe
from adapters.his_ws.errors import BadDocument, HisUnavailable

#: default per-document limit: base64 of it stays under libxml2's 10 MB text-node ceiling
DEFAULT_MAX_DOCUMENT = 4 * 1024 * 1024
_SMALL_ANSWER = 1 << 20  # Receive*/Ack answers and faults are a few hundred bytes
_CHUNK = 64 * 1024
_PENDING = f"{{{soap.HWS}}}PendingDocument"


class HisClient:
    def __init__(
        self,
        url: str,
        timeout_s: float = 10.0,
        *,
        max_document_bytes: int = DEFAULT_MAX_DOCUMENT,
        call_deadline_s: float = 120.0,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url}")
        self.url = url
        self.parts = parts
        self.timeout_s = timeout_s
        self.max_document_bytes = max_document_bytes
        self.call_deadline_s = call_deadline_s

    def _open(self, action: str, body: bytes) -> tuple[Any, Any]:
        cls = (
            http.client.HTTPSConnection
            if self.parts.scheme == "https"
            else http.client.HTTPConnection
        )
        conn = cls(self.parts.hostname, self.parts.port, timeout=self.timeout_s)
        try:
            conn.request(
                "POST",
                self.parts.path or "/",
                body,
                {
                    "Content-Type": "text/xml; charset=utf-8",
                    "SOAPAction": f'"urn:hutong:his-ws:1#{action}"',
                },
            )
            return conn, conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:  # timeouts are OSError
            conn.close()
            raise HisUnavailable(f"HIS {action}: {type(exc).__name__}") from exc

    def _read(self, action: str, resp: Any, limit: int, deadline: float) -> bytes:
        """The whole answer, refused past ``limit`` bytes or the call's deadline."""
        parts: list[bytes] = []
        size = 0
        try:
            while True:
                if time.monotonic() > deadline:
                    raise HisUnavailable(
                        f"HIS {action}: answer not complete within {self.call_deadline_s:g} s"
                    )
                chunk = resp.read1(_CHUNK)
                if not chunk:
                    return b"".join(parts)
                size += len(chunk)
                if size > limit:
                    raise HisUnavailable(f"HIS {action}: answer over {limit} bytes, not read")
                parts.append(chunk)
        except (OSError, http.client.HTTPException) as exc:
            raise HisUnavailable(f"HIS {action}: {type(exc).__name__}") from exc

    def _operation(self, action: str, data: bytes, status: int) -> etree._Element:
        try:
            return soap.operation(data, f"HIS {action} response")
        except soap.Fault as fault:
            raise HisUnavailable(
                f"HIS {action} answered a SOAP Fault {fault.code}: {fault.text[:200]}"
            ) from None
        except BadDocument as exc:
            raise HisUnavailable(
                f"HIS {action} answered HTTP {status} without a valid envelope ({exc.code})"
            ) from None

    def call(self, action: str, body: bytes) -> etree._Element:
        """POST one envelope; the response's operation element, or HisUnavailable."""
        deadline = time.monotonic() + self.call_deadline_s
        conn, resp = self._open(action, body)
        try:
            data = self._read(action, resp, _SMALL_ANSWER, deadline)
            status = resp.status
        finally:
            conn.close()
        return self._operation(action, data, status)

    def receive(self, doc_type: str, doc_id: str, raw: bytes) -> str:
        op = self.call(soap.RECEIVE[doc_type], soap.receive(doc_type, doc_id, raw))
        return soap.text(op, "Status")

    def pending(self, since: int, max_docs: int) -> list[soap.Pending]:
        """Pending documents, oldest first; one over the limit ends the list as ``too_large``
        (the answer is not read further). Anything else wrong: HisUnavailable."""
        action = "GetPendingDocuments"
        deadline = time.monotonic() + self.call_deadline_s
        conn, resp = self._open(action, soap.get_pending(since, max_docs))
        try:
            if resp.status != 200:  # a Fault: small, read whole
                return soap.read_pending(
                    self._operation(
                        action, self._read(action, resp, _SMALL_ANSWER, deadline), resp.status
                    )
                )
            return self._stream_pending(action, resp, max_docs, deadline)
        finally:
            conn.close()

    def _stream_pending(
        self, action: str, resp: Any, max_docs: int, deadline: float
    ) -> list[soap.Pending]:
        limit = self.max_document_bytes
        per_doc = (limit + 2) // 3 * 4 + 256  # base64 text of a document at the limit
        total_cap = max_docs * (per_doc + 1024) + _SMALL_ANSWER
        # huge_tree only lifts libxml2's own text ceiling: sizes are bounded here instead
        parser = etree.XMLPullParser(
            events=("start", "end"),
            resolve_entities=False,
            no_network=True,
            huge_tree=True,
            load_dtd=False,
            remove_comments=True,
            remove_pis=True,
        )
        fed = 0
        open_at: int | None = None
        open_attrs: dict[str, str] = {}
        done: list[soap.Pending] = []
        try:
            while True:
                if time.monotonic() > deadline:
                    raise HisUnavailable(
                        f"HIS {action}: answer not complete within {self.call_deadline_s:g} s"
                    )
                chunk = resp.read1(_CHUNK)
                if not chunk:
                    break
                fed += len(chunk)
                parser.feed(chunk)
                for ev, el in parser.read_events():
                    if el.tag != _PENDING:
                        continue
                    if ev == "start":
                        open_at, open_attrs = fed, dict(el.attrib)
                    else:
                        open_at = None
                        done.append(self._one(el.attrib, el.text or "", limit))
                if open_at is not None and fed - open_at > per_doc:
                    done.append(_pending(open_attrs, b"", fed - open_at + _CHUNK))
                    return done  # the rest of the answer is never read
                if fed > total_cap:
                    raise HisUnavailable(f"HIS {action}: answer over {total_cap} bytes, not read")
            root = parser.close()
        except (OSError, http.client.HTTPException) as exc:
            raise HisUnavailable(f"HIS {action}: {type(exc).__name__}") from exc
        except etree.XMLSyntaxError as exc:
            raise HisUnavailable(
                f"HIS {action} answered an envelope that is not well-formed (line {exc.lineno})"
            ) from None
        try:  # a complete answer is checked against the XSD as before
            if root.tag != f"{{{soap.SOAP}}}Envelope":
                raise BadDocument("not a SOAP 1.1 envelope")
            xmlsafe.validate(root, soap.XSD, f"HIS {action} response")
        except BadDocument as exc:
            raise HisUnavailable(
                f"HIS {action} answered HTTP 200 without a valid envelope ({exc.code})"
            ) from None
        body = root.find(f"{{{soap.SOAP}}}Body")
        if body is None or body[0].tag != f"{{{soap.HWS}}}GetPendingDocumentsResponse":
            raise HisUnavailable(f"HIS {action} answered without a GetPendingDocumentsResponse")
        return done

    @staticmethod
    def _one(attrib: Any, text: str, limit: int) -> soap.Pending:
        if len(text) > (limit + 2) // 3 * 4 + 256:
            return _pending(dict(attrib), b"", len(text))
        try:
            raw = base64.b64decode(text, validate=False)
        except (binascii.Error, ValueError):
            raise HisUnavailable("HIS GetPendingDocuments: a document is not base64") from None
        if len(raw) > limit:
            return _pending(dict(attrib), b"", len(raw))
        return _pending(dict(attrib), raw, 0)

    def ack(self, seqs: list[int]) -> int:
        return int(soap.text(self.call("AckDocuments", soap.ack(seqs)), "Acked") or 0)


def _pending(attrs: dict[str, str], raw: bytes, too_large: int) -> soap.Pending:
    """A listed document; its seq, id and type must be readable (they are what is acked and
    quarantined), else the whole answer is unusable."""
    try:
        seq = int(attrs.get("seq", ""))
    except ValueError:
        raise HisUnavailable("HIS GetPendingDocuments: a document without a numeric seq") from None
    doc_id, dtype = attrs.get("id") or "", attrs.get("type") or ""
    if not doc_id or len(doc_id) > 128 or dtype not in soap.PENDING_TYPES:
        raise HisUnavailable(
            f"HIS GetPendingDocuments: document seq {seq} has no usable id or type"
        )
    return soap.Pending(seq, doc_id, dtype, raw, too_large)
