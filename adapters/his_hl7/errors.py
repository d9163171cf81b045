"""What goes wrong between the HIS and this adapter, as errors of the one Hutong tree.

    HutongError (bridge.errors)
    ├── Hl7DataError        HT-HL7-DATA        a message from the HIS we will not take (permanent):
    │   │                                      names the record (MSH-10) and field (PID-7); the
    │   │                                      HIS gets AE/AR with an ERR segment saying the same
    │   ├── Hl7Rejected     HT-HL7-REJECTED    unreadable as a message (framing, charset,
    │   │                                      missing MSH, wrong type): AR
    │   └── Hl7Duplicate    HT-HL7-DUPLICATE   a slip already taken under another message
    ├── Hl7ControlReused    HT-HL7-CONTROL-REUSED  (audit only) a different message under a
    │                                      used MSH-10: taken as new, IT told
    └── TransportError (bridge.errors, transient): the HIS listener is down, timed out or NAKed
        ├── HisUnreachable  HT-HL7-HIS-DOWN    connect refused / timed out
        └── HisNak          HT-HL7-HIS-NAK     the HIS answered AE/AR/CE/CR
    AmbiguousDelivery (bridge.errors)
        └── HisNoAck        HT-HL7-HIS-NO-ACK  sent, no ACK in time (resent; the HIS dedupes MSH-10)

Messages never quote patient data: they go into ACKs, quarantine reasons and the audit.
"""

from __future__ import annotations

from bridge.errors import AmbiguousDelivery, HutongError, Retry, TransportError


class Hl7DataError(HutongError):
    code = "HT-HL7-DATA"
    retry = Retry.PERMANENT
    http_status = 422
    #: MSA-1 for this problem
    ack_code = "AE"
    #: HL7 table 0357 error condition, for ERR-3
    hl7_error = "207"

    def __init__(self, message: str, *, field: str | None = None, hl7_error: str | None = None,
                 ack_code: str | None = None) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.reason = message
        self.field = field
        if hl7_error:
            self.hl7_error = hl7_error
        if ack_code:
            self.ack_code = ack_code


class Hl7Rejected(Hl7DataError):
    code = "HT-HL7-REJECTED"
    ack_code = "AR"
    hl7_error = "100"


class Hl7Duplicate(Hl7DataError):
    code = "HT-HL7-DUPLICATE"
    hl7_error = "205"  # duplicate key identifier


class Hl7ControlReused(HutongError):
    """Not raised: the audit code for a message that reuses another message's MSH-10 (it is
    taken as the new message it is; IT sees the reuse in the audit and the adapter counters)."""

    code = "HT-HL7-CONTROL-REUSED"
    retry = Retry.PERMANENT


class HisUnreachable(TransportError):
    code = "HT-HL7-HIS-DOWN"


class HisNak(TransportError):
    code = "HT-HL7-HIS-NAK"


#: HL7 table 0357 texts for the codes we send
ERROR_TEXT = {
    "100": "Segment sequence error",
    "101": "Required field missing",
    "102": "Data type error",
    "103": "Table value not found",
    "200": "Unsupported message type",
    "204": "Unknown key identifier",
    "205": "Duplicate key identifier",
    "207": "Application internal error",
}


class HisNoAck(AmbiguousDelivery):
    """Sent, but no ACK came in time: the HIS may hold it; resent with the same MSH-10."""

    code = "HT-HL7-HIS-NO-ACK"
