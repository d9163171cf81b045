"""The check over rendered clinician pages (issue 15): what a clinician reads has no raw codes.

Over the page's text (tags and attribute values removed, entities decoded): no Python dict of a
CodeableConcept (``{'coding'``), no raw ISO timestamp (``2026-11-21T10:00``), no FHIR status or
priority word and no actor code left untranslated on a Chinese page.
"""

from __future__ import annotations

import html
import re

ISO_INSTANT = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d")
#: FHIR codes that must appear as words on a Chinese page (checked as whole words)
UNTRANSLATED = (
    "urgent",
    "routine",
    "asap",
    "stat",
    "active",
    "completed",
    "cancelled",
    "requested",
    "accepted",
    "rejected",
    "in-progress",
    "request",
    "accept",
    "reject",
    "arrive",
    "cancel",
    "return",
    "return-received",
    "final",
    "preliminary",
    "available",
    "on-hold",
    "role:clinician",
    "role:it",
    "role:auditor",
)


def page_text(page: str) -> str:
    body = re.sub(r"<(script|style)\b.*?</\1>", " ", page, flags=re.DOTALL)
    return html.unescape(re.sub(r"<[^>]+>", " ", body))


def problems(page: str) -> list[str]:
    """What a clinician would read raw on this page (empty: none)."""
    text = page_text(page)
    out = []
    if "{'coding'" in text or '{"coding"' in text:
        out.append("a CodeableConcept printed as a dict")
    out += [f"raw timestamp {m.group(0)}" for m in ISO_INSTANT.finditer(text)]
    for word in UNTRANSLATED:
        if re.search(rf"(?<![\w:/.-]){re.escape(word)}(?![\w:/.-])", text):
            out.append(f"untranslated word {word!r}")
    return out


def assert_readable(page: str, where: str = "") -> None:
    found = problems(page)
    assert not found, (where, found)
