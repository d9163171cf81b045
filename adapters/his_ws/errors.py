"""Why a document from the HIS was not taken, and what a failed call to the HIS means.

    HutongError
    ├── BadDocument           HT-WS-DOC        (permanent) a document the adapter will not take
    │   ├── SchemaInvalid     HT-WS-XSD        not well-formed, or fails the bundled XSD
    │   ├── MissingElement    HT-WS-MISSING    a slip's mandatory element or value is absent
    │   ├── BadDate           HT-WS-DATE       a date or time that does not exist
    │   ├── UnknownCode       HT-WS-CODE       a code (or code system) the site does not know
    │   ├── WrongEncoding     HT-WS-ENCODING   bytes do not match the declared encoding
    │   ├── DuplicateDocument HT-WS-DUPLICATE  a document id taken before with other content
    │   └── DocumentTooLarge  HT-WS-TOO-LARGE  a document over ``max_document_bytes``
    └── TransportError
        └── HisUnavailable    HT-WS-UNAVAILABLE (transient) SOAP Fault, HTTP error, no answer

Every BadDocument carries ``field``: the readable XPath of the element at fault. Messages name
documents and elements, never patient values, since they go to quarantine reasons and logs.
"""

from __future__ import annotations

from bridge.errors import HutongError, TransportError


class BadDocument(HutongError):
    code = "HT-WS-DOC"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class SchemaInvalid(BadDocument):
    code = "HT-WS-XSD"


class MissingElement(BadDocument):
    code = "HT-WS-MISSING"


class BadDate(BadDocument):
    code = "HT-WS-DATE"


class UnknownCode(BadDocument):
    code = "HT-WS-CODE"


class WrongEncoding(BadDocument):
    code = "HT-WS-ENCODING"


class DuplicateDocument(BadDocument):
    code = "HT-WS-DUPLICATE"


class DocumentTooLarge(BadDocument):
    """Refused while it was still arriving: the rest is never read, so one huge document
    neither fills memory nor stalls the documents behind it."""

    code = "HT-WS-TOO-LARGE"


class HisUnavailable(TransportError):
    code = "HT-WS-UNAVAILABLE"
