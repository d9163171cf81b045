"""Why an inbound LIS message was not accepted, and which HL7 acknowledgement that deserves.

These are v2-side outcomes: the ACK code (AR/AE) and the table 0357 error code travel back to the
lab system in MSA/ERR, and the same error (with its stable ``HT-LIS-*`` code) names the reason in
quarantine and audit. Messages never quote patient data, since they go into ACKs and quarantine
reasons: they name the segment, the field and the record (MSH-10), never a value of a patient.

AR (reject) means "this message will fail the same way if resent: fix it"; AE (error) means "we
could not take it now or one field is wrong"; a rate-limited message gets AE so the LIS resends.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from adapters.hl7v2.errors import V2Error

P = ParamSpec("P")
T = TypeVar("T")


class LisMessageError(V2Error):
    """A message this adapter will not turn into results (a kit error with the LIS's code)."""

    code = "HT-LIS"
    #: MSA-1 answered for this problem
    ack_code = "AE"
    #: HL7 table 0357 message error condition code, for ERR-3 (v2.5) / ERR-1 (v2.3, v2.4)
    hl7_error = "207"  # application internal error
    http_status = 400


class Rejected(LisMessageError):
    """The message itself is unacceptable (framing, encoding, version, structure): AR."""

    code = "HT-LIS-STRUCTURE"
    ack_code = "AR"
    hl7_error = "100"  # segment sequence error


class EncodingError(Rejected):
    """The bytes do not decode with the declared (or channel default) character set."""

    code = "HT-LIS-ENCODING"
    hl7_error = "102"  # data type error


class UnsupportedVersion(Rejected):
    """MSH-12 names an HL7 version the kit does not read (2.1 to 2.8 are read)."""

    code = "HT-LIS-VERSION"
    hl7_error = "203"  # unsupported version id


class UnsupportedMessage(Rejected):
    """MSH-9 is not ORU^R01."""

    code = "HT-LIS-TYPE"
    hl7_error = "200"  # unsupported message type


class BadField(LisMessageError):
    """A field's content cannot be read (a number that is not one, an unknown status): AE."""

    code = "HT-LIS-FIELD"
    hl7_error = "102"  # data type error


class MissingField(LisMessageError):
    """A field the results need is empty (OBR-3 filler number, OBX-3 code, OBX-11 status)."""

    code = "HT-LIS-REQUIRED"
    hl7_error = "101"  # required field missing


class RateLimited(LisMessageError):
    """The channel's rate limit is exceeded: resend later (AE, not quarantined)."""

    code = "HT-LIS-RATE"
    hl7_error = "207"


def from_kit(exc: V2Error) -> LisMessageError:
    """The LIS's error for a refusal of the HL7 v2 kit: same reason, field and ERR code."""
    cls: type[LisMessageError] = {
        "charset": EncodingError,
        "version": UnsupportedVersion,
        "type": UnsupportedMessage,
        "field": BadField,
        "required": MissingField,
    }.get(exc.kind, Rejected)
    if exc.ack_code == "AR" and not issubclass(cls, Rejected):
        cls = Rejected
    return cls(exc.reason, field=exc.field, hl7_error=exc.hl7_error)


def kit_errors(fn: Callable[P, T]) -> Callable[P, T]:
    """Raise the LIS's own errors for refusals coming from the kit's readers."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return fn(*args, **kwargs)
        except LisMessageError:
            raise
        except V2Error as exc:
            raise from_kit(exc) from None

    return wrapper
