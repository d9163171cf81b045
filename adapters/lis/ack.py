"""HL7 v2 acknowledgements (original mode): AA, or AE/AR with the reason in MSA-3 and ERR.

ERR follows the message's version: v2.5+ fills ERR-2 (location), ERR-3 (table 0357 code),
ERR-4 (severity) and ERR-8 (user message); v2.3/v2.4 put ``segment^sequence^field^code&text``
in ERR-1. Free text is escaped with python-hl7's escaping, so a reason holding ``|`` or ``^``
cannot break the ACK. The ACK is encoded with the same character set as the message it answers
(its MSH-18 is echoed).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

import hl7
from hl7.util import generate_message_control_id

from adapters.lis.decode import sniff_msh
from adapters.lis.errors import LisMessageError

_ESCAPER = hl7.parse("MSH|^~\\&|")
_LOCATION = re.compile(r"^([A-Z0-9]{3})(?:\[(\d+)\])?(?:-(\d+))?")
#: table 0357 texts for the codes this adapter answers with
ERROR_TEXT = {"0": "Message accepted", "100": "Segment sequence error",
              "101": "Required field missing", "102": "Data type error",
              "200": "Unsupported message type", "203": "Unsupported version id",
              "207": "Application internal error"}


@dataclass(frozen=True)
class Answering:
    """What an ACK echoes from the message it answers (from MSH, parsed or sniffed)."""

    sending_app: str = ""
    sending_facility: str = ""
    receiving_app: str = ""
    receiving_facility: str = ""
    control_id: str = ""
    processing_id: str = "P"
    version: str = "2.5.1"
    trigger: str = "R01"
    charset: str = ""

    @classmethod
    def from_raw(cls, raw: bytes) -> Answering:
        """Best effort from undecoded bytes (the message may be unreadable)."""
        f = sniff_msh(raw)
        if f is None or len(f[2]) < 1:
            return cls()
        comp = f[2][0]
        return cls(f[3], f[4], f[5], f[6], f[10], f[11] or "P", f[12].split(comp)[0] or "2.5.1",
                   (f[9].split(comp) + ["", ""])[1] or "R01", f[18])

    @classmethod
    def from_message(cls, msg: hl7.Message) -> Answering:
        msh = msg.segment("MSH")

        def v(field: int) -> str:
            try:
                return str(msh.extract_field(1, field, 1, 1, 1))
            except IndexError:
                return ""
        try:
            trigger = str(msh.extract_field(1, 9, 1, 2, 1))
        except IndexError:
            trigger = ""
        return cls(str(msh(3)) if len(msh) > 3 else "", str(msh(4)) if len(msh) > 4 else "",
                   str(msh(5)) if len(msh) > 5 else "", str(msh(6)) if len(msh) > 6 else "",
                   v(10), v(11) or "P", v(12) or "2.5.1", trigger or "R01",
                   str(msh(18)) if len(msh) > 18 else "")


def _esc(text: str) -> str:
    return str(_ESCAPER.escape(text))


def build_ack(to: Answering, code: str, *, at: datetime, error: LisMessageError | None = None,
              control_id: str | None = None) -> str:
    """The ACK message text (segments joined by CR)."""
    stamp = at.strftime("%Y%m%d%H%M%S") + at.strftime("%z")
    msh = ["MSH", "^~\\&", to.receiving_app, to.receiving_facility, to.sending_app,
           to.sending_facility, stamp, "", f"ACK^{_esc(to.trigger)}^ACK",
           control_id or generate_message_control_id(), to.processing_id, to.version]
    if to.charset:
        msh += ["", "", "", "", "", to.charset]
    msa = ["MSA", code, _esc(to.control_id)]
    segments = [msh, msa]
    if error is not None:
        msa.append(_esc(error.message[:200]))
        segments.append(_err(to.version, error))
    return "\r".join("|".join(s) for s in segments) + "\r"


def _err(version: str, error: LisMessageError) -> list[str]:
    seg, seq, field = "", "", ""
    m = _LOCATION.match(error.field or "")
    if m:
        seg, seq, field = m.group(1), m.group(2) or "1", m.group(3) or ""
    code = error.hl7_error
    text = ERROR_TEXT.get(code, "")
    if version in ("2.3", "2.3.1", "2.4"):
        return ["ERR", f"{seg}^{seq}^{field}^{code}&{text}"]
    location = f"{seg}^{seq}^{field}" if seg else ""
    return ["ERR", "", location, f"{code}^{text}^HL70357", "E", "", "", "",
            _esc(error.reason[:200])]


def ack_code_of(ack: str) -> str:
    """MSA-1 of an ACK (for logs, tests and the simulator)."""
    return str(hl7.parse(ack).segment("MSA")(1))
