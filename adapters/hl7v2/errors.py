"""Why an HL7 v2 message is refused by the kit, and which acknowledgement that earns.

    V2Error            HT-V2           a field's content cannot be read (AE)
    ├── V2Rejected     HT-V2-REJECTED  the message itself is unacceptable (AR)
    │   ├── FrameRefused   HT-V2-FRAME    MLLP framing: oversize, truncated, too slow, junk
    │   ├── CharsetRefused HT-V2-CHARSET  bytes do not fit the declared (or configured) charset
    │   ├── BadEncodingChars HT-V2-MSH2   MSH-1/MSH-2 are not usable delimiters
    │   ├── VersionRefused HT-V2-VERSION  MSH-12 outside 2.1 .. 2.8
    │   └── TypeRefused    HT-V2-TYPE     MSH-9 not taken by this channel
    ├── BadValue       HT-V2-VALUE     a value of the wrong data type (a date that is not one)
    └── MissingValue   HT-V2-REQUIRED  a required field is empty

Each carries ``kind`` so an adapter can turn it into its own error class (and stable code)
with the same reason and field. Texts name the segment and field, never a patient's value.
"""

from __future__ import annotations

from bridge.errors import HutongError


class V2Error(HutongError):
    code = "HT-V2"
    kind = "field"
    #: MSA-1 for this problem
    ack_code = "AE"
    #: HL7 table 0357 error condition, for ERR-3 (v2.5+) / ERR-1 (older)
    hl7_error = "207"
    http_status = 422

    def __init__(
        self,
        reason: str,
        *,
        field: str | None = None,
        hl7_error: str | None = None,
        ack_code: str | None = None,
    ) -> None:
        super().__init__(f"{field}: {reason}" if field else reason)
        self.reason = reason
        self.field = field
        if hl7_error:
            self.hl7_error = hl7_error
        if ack_code:
            self.ack_code = ack_code


class V2Rejected(V2Error):
    code = "HT-V2-REJECTED"
    kind = "structure"
    ack_code = "AR"
    hl7_error = "100"  # segment sequence error


class FrameRefused(V2Rejected):
    code = "HT-V2-FRAME"
    kind = "frame"


class CharsetRefused(V2Rejected):
    code = "HT-V2-CHARSET"
    kind = "charset"
    hl7_error = "102"  # data type error


class BadEncodingChars(V2Rejected):
    code = "HT-V2-MSH2"
    kind = "structure"
    hl7_error = "102"


class VersionRefused(V2Rejected):
    code = "HT-V2-VERSION"
    kind = "version"
    hl7_error = "203"  # unsupported version id


class TypeRefused(V2Rejected):
    code = "HT-V2-TYPE"
    kind = "type"
    hl7_error = "200"  # unsupported message type


class BadValue(V2Error):
    code = "HT-V2-VALUE"
    kind = "field"
    hl7_error = "102"


class MissingValue(V2Error):
    code = "HT-V2-REQUIRED"
    kind = "required"
    hl7_error = "101"  # required field missing


#: HL7 table 0357 texts for the codes the adapters answer with
ERROR_TEXT = {
    "0": "Message accepted",
    "100": "Segment sequence error",
    "101": "Required field missing",
    "102": "Data type error",
    "103": "Table value not found",
    "200": "Unsupported message type",
    "203": "Unsupported version id",
    "204": "Unknown key identifier",
    "205": "Duplicate key identifier",
    "206": "Application record locked",
    "207": "Application internal error",
}
