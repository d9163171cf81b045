"""ACK / NAK answers (original mode) with an ERR segment naming what was wrong."""

from __future__ import annotations

from datetime import datetime

from adapters.his_hl7 import charset, v2
from adapters.his_hl7.errors import ERROR_TEXT, Hl7DataError


def build(code: str, control_id: str, at: datetime, *, codec: str, facility: str,
          his_app: str = "", his_facility: str = "", trigger: str = "",
          error: Hl7DataError | None = None) -> bytes:
    """MSH + MSA (+ ERR); encoded with the charset of the message it answers."""
    fields = ["HUTONG", v2.esc(facility), v2.esc(his_app), v2.esc(his_facility), v2.ts(at), "",
              v2.comp("ACK", trigger, "ACK"), v2.control_id(), "P", "2.5", "", "", "", "",
              "CHN", charset.DECLARE.get(codec, "UNICODE UTF-8")]
    segs = ["MSH|" + v2.ENCODING_CHARS + "|" + "|".join(fields),
            v2.segment("MSA", code, v2.esc(control_id),
                       v2.esc(error.message[:80]) if error else "")]
    if error is not None:
        segs.append(err_segment(error))
    return charset.encode(v2.message(segs), codec)


def err_segment(error: Hl7DataError) -> str:
    """ERR-2 location (segment^1^field), ERR-3 table 0357 code, ERR-4 severity, ERR-8 text."""
    location = ""
    if error.field:
        seg, _, rest = error.field.partition("-")
        field_no, _, component = rest.partition(".")
        if field_no.isdigit():
            location = v2.comp(v2.esc(seg), "1", field_no, "1" if component else "",
                               component)
        else:
            location = v2.esc(seg)
    code = error.hl7_error
    return v2.segment("ERR", "", location,
                      v2.comp(code, v2.esc(ERROR_TEXT.get(code, "")), "HL70357"), "E",
                      "", "", "", v2.esc(error.message))


def read(raw: bytes) -> tuple[str, str, str]:
    """(MSA-1, MSA-2, ERR-8 or MSA-3) of an ACK we received."""
    text, _ = charset.decode(raw)
    msg = v2.parse(text)
    msa = v2.one(msg, "MSA")
    errs = v2.segments(msg, "ERR")
    why = v2.get(msg, errs[0], 8) if errs else v2.get(msg, msa, 3)
    return v2.get(msg, msa, 1), v2.get(msg, msa, 2), why
