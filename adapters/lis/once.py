"""Exactly-once for v2 messages: the key is sender + control id + content, MSH-7 left out.

Why not sender + MSH-10 alone: control ids repeat in real life (a LIS restarted with its
counter reset, two interfaces behind one MSH-3/MSH-4, test suites reusing ``MSG00001``). Keyed
by MSH-10 alone, a *different* message under a used control id got the earlier message's
stored AA and was never stored. Keyed by content too:

- an identical re-send (same sender, same MSH-10, same bytes apart from MSH-7, which a sender
  restamps on every attempt) finds its key and gets the original ACK; nothing is stored twice;
- a different message under a used control id has a new key: it is stored and acknowledged
  like any message, and :func:`sender_prefix` finds the earlier one so the reuse is audited
  (action :data:`REUSED_ACTION`, shown on the IT page).

The key is ``v2:<sender digest>:<content digest>`` (hex): fixed length whatever MSH-3/4/10
hold, and every message of one sender + control id shares the prefix.
"""

from __future__ import annotations

import hashlib

from bridge.local.intake import RECORD_ID_REUSED

#: audit action of a different message received under an already used sender + control id
REUSED_ACTION = RECORD_ID_REUSED


def sender_prefix(sending_app: str, facility: str, control_id: str) -> str:
    """The key prefix shared by every message of one sender (MSH-3, MSH-4) and MSH-10."""
    who = "\x1f".join((sending_app, facility, control_id)).encode("utf-8")
    return f"v2:{hashlib.sha256(who).hexdigest()[:32]}:"


def content_digest(text: str) -> str:
    """SHA-256 of the decoded message with MSH-7 emptied (segments already ended by CR)."""
    segments = text.split("\r")
    msh = segments[0]
    if msh.startswith("MSH") and len(msh) > 3:
        sep = msh[3]
        fields = msh.split(sep)
        if len(fields) > 6:  # fields[0] "MSH", fields[1] MSH-2, ... fields[6] MSH-7
            fields[6] = ""
            segments[0] = sep.join(fields)
    body = "\r".join(s for s in segments if s)
    return hashlib.sha256(body.encode("utf-8")).hexdigest()[:48]


def source_key(sending_app: str, facility: str, control_id: str, text: str) -> str:
    return sender_prefix(sending_app, facility, control_id) + content_digest(text)
