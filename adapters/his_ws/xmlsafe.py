"""Careful XML in: a hardened lxml parser, the bundled XSDs, encoding checks, readable XPaths.

Everything the HIS sends is untrusted. The parser never resolves entities, never touches the
network, keeps lxml's size limits (``huge_tree`` off) and drops DTDs; a document must also decode
strictly with the encoding its XML declaration names (a GB18030 document labelled UTF-8, or a
UTF-8 one labelled GB18030, is refused rather than read as mojibake).
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

from lxml import etree

from adapters.his_ws.errors import SchemaInvalid, WrongEncoding

SCHEMAS = Path(__file__).with_name("schemas")
_DECL = re.compile(rb"""^\s*<\?xml[^>]*?encoding\s*=\s*["']([A-Za-z0-9._\-]+)["']""")


def parser() -> etree.XMLParser:
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        huge_tree=False,
        load_dtd=False,
        dtd_validation=False,
        remove_comments=True,
        remove_pis=True,
    )


@cache
def schema(name: str) -> etree.XMLSchema:
    """A bundled XSD (``his-ws.xsd`` for envelopes, ``cda-slip.xsd`` for documents)."""
    return etree.XMLSchema(etree.parse(str(SCHEMAS / name), parser()))


def declared_encoding(raw: bytes) -> str:
    m = _DECL.match(raw[:200])
    return m.group(1).decode("ascii") if m else "UTF-8"


def check_encoding(raw: bytes, record: str) -> str:
    """The declared encoding, if the bytes really are in it; WrongEncoding otherwise."""
    declared = declared_encoding(raw)
    name = declared.lower().replace("_", "-")
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise WrongEncoding(
            f"document {record} is UTF-16; the service takes UTF-8 or GB18030",
            field="xml-declaration/@encoding",
        )
    try:
        raw.decode(declared)
    except LookupError:
        raise WrongEncoding(
            f"document {record} declares an unknown encoding '{declared}'",
            field="xml-declaration/@encoding",
        ) from None
    except UnicodeDecodeError as exc:
        raise WrongEncoding(
            f"document {record} declares {declared} but byte {exc.start} is not {declared}",
            field="xml-declaration/@encoding",
        ) from None
    if name not in ("utf-8", "utf8", "us-ascii", "ascii") and not raw.isascii():
        # GB text that also decodes as UTF-8 is vanishingly rare; UTF-8 labelled GBK is common
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            pass
        else:
            raise WrongEncoding(
                f"document {record} declares {declared} but its bytes are UTF-8",
                field="xml-declaration/@encoding",
            )
    return declared


def parse(raw: bytes, record: str) -> etree._Element:
    """Parse bytes (after the encoding check); malformed XML is SchemaInvalid at its line."""
    try:
        root = etree.fromstring(raw, parser())
    except etree.XMLSyntaxError as exc:
        raise SchemaInvalid(
            f"document {record} is not well-formed XML (line {exc.lineno}): {_clean(exc.msg)}",
            field=f"line {exc.lineno}",
        ) from None
    if root.getroottree().docinfo.doctype:  # as defusedxml: no DTDs, so no entity tricks
        raise SchemaInvalid(
            f"document {record} carries a DOCTYPE, which is not accepted", field="/!DOCTYPE"
        )
    return root


def validate(root: etree._Element, schema_name: str, record: str) -> None:
    """Check against a bundled XSD; the first problem names the element's readable XPath."""
    xsd = schema(schema_name)
    if xsd.validate(root):
        return
    err = xsd.error_log[0]
    field = f"line {err.line}"
    try:
        found = root.getroottree().xpath(err.path) if err.path else []
        if found and isinstance(found[0], etree._Element):
            field = readable_path(found[0])
    except etree.XPathError:
        pass
    raise SchemaInvalid(
        f"document {record} fails {schema_name}: {_clean(err.message)}", field=field
    )


def readable_path(el: etree._Element) -> str:
    """``/ClinicalDocument/recordTarget/patientRole/patient/birthTime``: local names, with a
    position only where same-named siblings make one necessary."""
    parts: list[str] = []
    node: etree._Element | None = el
    while node is not None:
        name = etree.QName(node).localname
        parent = node.getparent()
        if parent is not None:
            same = [c for c in parent if isinstance(c.tag, str) and c.tag == node.tag]
            if len(same) > 1:
                name += f"[{same.index(node) + 1}]"
        parts.append(name)
        node = parent
    return "/" + "/".join(reversed(parts))


def _clean(msg: str) -> str:
    """lxml messages name elements in Clark notation and quote offending values: drop the
    namespaces for readers and the values (they may be patient data) for logs and quarantine."""
    msg = re.sub(r"\{[^}]*\}", "", msg)
    msg = re.sub(r"The value '[^']*'", "The value", msg)
    return re.sub(r"'[^']*' is not a valid value", "The value is not a valid value", msg)
