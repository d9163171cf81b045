"""One error tree for Hutong; every error carries a stable code and a retry class.

    HutongError                      code, retry class, message (never patient data)
    ├── ConfigError                  HT-CONFIG          a config file is missing, unreadable or invalid
    ├── KeyFileError                 HT-KEY             a key file is missing, unreadable or wrongly protected
    ├── PacketRefused                (permanent)        a packet the gateway will not take
    │   ├── MalformedPacket          HT-PKT-MALFORMED   bytes are not a Hutong packet frame
    │   ├── PacketTooLarge           HT-PKT-TOO-LARGE   body over the size limit
    │   ├── UnknownSender            HT-PKT-UNKNOWN-SENDER
    │   ├── BadSignature             HT-PKT-BAD-SIGNATURE
    │   ├── WrongRecipient           HT-PKT-WRONG-RECIPIENT
    │   ├── ClockSkew                HT-PKT-CLOCK       created-at (or relayed-at) outside the window
    │   ├── ReplayedPacket           HT-PKT-REPLAY      packet id already taken with other content
    │   ├── DecryptFailed            HT-PKT-DECRYPT     body does not open with our key
    │   ├── DigestMismatch           HT-PKT-DIGEST      body does not match the header digest
    │   ├── InvalidFhir              HT-PKT-INVALID-FHIR body is not a valid FHIR R4 Bundle
    │   └── RouteDenied              HT-PKT-ROUTE-DENIED no allow rule for (from, to, kind)
    ├── TransportError               (transient)        peer unreachable, timed out, 5xx
    ├── AmbiguousDelivery            (ambiguous)        sent, but no answer: resend, receiver dedupes
    ├── StoreError                   (transient)        database unavailable or locked
    ├── NotFound                     HT-NOT-FOUND       asked-for item does not exist
    ├── Unauthorized / Forbidden     HT-AUTH / HT-FORBIDDEN  missing or wrong-role token
    └── WorkflowError                (permanent)        a referral step that cannot be taken
        ├── IllegalTransition        HT-REF-TRANSITION  e.g. accept a cancelled referral
        ├── MissingConsent           HT-REF-CONSENT     a referral without the patient's consent
        ├── UnknownReference         HT-REF-UNKNOWN     a reference to nothing in the bundle/store
        └── InvalidResource          HT-FHIR-INVALID    a resource that is not valid FHIR R4

Retry decides on ``retry`` (transient / ambiguous / permanent), never on a flag: transient and
ambiguous failures are retried with backoff; permanent ones go to quarantine or dead letter.
"""

from __future__ import annotations

from enum import Enum


class Retry(str, Enum):
    TRANSIENT = "transient"
    AMBIGUOUS = "ambiguous"
    PERMANENT = "permanent"


class HutongError(Exception):
    code = "HT-ERROR"
    retry = Retry.PERMANENT
    http_status = 500

    def __init__(self, message: str, *, detail: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message, "retry": self.retry.value}


class ConfigError(HutongError):
    code = "HT-CONFIG"
    http_status = 500

    def __init__(self, message: str, *, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or [message]

    def __str__(self) -> str:
        if len(self.problems) == 1:
            return f"{self.code}: {self.problems[0]}"
        return f"{self.code}: {len(self.problems)} problems\n" + "\n".join(
            f"  - {p}" for p in self.problems
        )


class KeyFileError(HutongError):
    code = "HT-KEY"


class PacketRefused(HutongError):
    code = "HT-PKT"
    http_status = 422


class MalformedPacket(PacketRefused):
    code = "HT-PKT-MALFORMED"
    http_status = 400


class PacketTooLarge(PacketRefused):
    code = "HT-PKT-TOO-LARGE"
    http_status = 413


class UnknownSender(PacketRefused):
    code = "HT-PKT-UNKNOWN-SENDER"
    http_status = 403


class BadSignature(PacketRefused):
    code = "HT-PKT-BAD-SIGNATURE"
    http_status = 403


class WrongRecipient(PacketRefused):
    code = "HT-PKT-WRONG-RECIPIENT"
    http_status = 421


class ClockSkew(PacketRefused):
    code = "HT-PKT-CLOCK"
    http_status = 422


class ReplayedPacket(PacketRefused):
    code = "HT-PKT-REPLAY"
    http_status = 409


class DecryptFailed(PacketRefused):
    code = "HT-PKT-DECRYPT"
    http_status = 422


class DigestMismatch(PacketRefused):
    code = "HT-PKT-DIGEST"
    http_status = 422


class InvalidFhir(PacketRefused):
    code = "HT-PKT-INVALID-FHIR"
    http_status = 422


class RouteDenied(PacketRefused):
    code = "HT-PKT-ROUTE-DENIED"
    http_status = 403


class TransportError(HutongError):
    code = "HT-TRANSPORT"
    retry = Retry.TRANSIENT
    http_status = 502


class AmbiguousDelivery(HutongError):
    code = "HT-AMBIGUOUS"
    retry = Retry.AMBIGUOUS
    http_status = 504


class RateLimited(TransportError):
    """A peer sent more packets than its rate allows: the batch was not taken; send it again
    after ``retry_after`` seconds (the sender does not count this as a failed attempt)."""

    code = "HT-PKT-RATE"
    http_status = 429

    def __init__(self, message: str, *, retry_after: float = 1.0, detail: str | None = None
                 ) -> None:
        super().__init__(message, detail=detail)
        self.retry_after = retry_after


class StoreError(HutongError):
    code = "HT-STORE"
    retry = Retry.TRANSIENT
    http_status = 503


class NotFound(HutongError):
    code = "HT-NOT-FOUND"
    http_status = 404


class Unauthorized(HutongError):
    code = "HT-AUTH"
    http_status = 401


class Forbidden(HutongError):
    code = "HT-FORBIDDEN"
    http_status = 403


#: every refusal class the gateway can answer with, by code (tests check each is produced)
REFUSALS: dict[str, type[PacketRefused]] = {
    cls.code: cls
    for cls in (
        MalformedPacket,
        PacketTooLarge,
        UnknownSender,
        BadSignature,
        WrongRecipient,
        ClockSkew,
        ReplayedPacket,
        DecryptFailed,
        DigestMismatch,
        InvalidFhir,
        RouteDenied,
    )
}


class WorkflowError(HutongError):
    code = "HT-REF"
    http_status = 422


class IllegalTransition(WorkflowError):
    code = "HT-REF-TRANSITION"
    http_status = 409


class MissingConsent(WorkflowError):
    code = "HT-REF-CONSENT"
    http_status = 422


class UnknownReference(WorkflowError):
    code = "HT-REF-UNKNOWN"
    http_status = 422


class InvalidResource(WorkflowError):
    code = "HT-FHIR-INVALID"
    http_status = 422


class NationalIdEgress(PacketRefused):
    """A packet queued to leave this node carries a national ID number (an identifier of a
    refused system, ``[egress] refuse_identifier_systems``): it may cross only as its keyed
    hash. Refused at queueing, kept in the local quarantine, audited."""

    code = "HT-PKT-NATIONAL-ID"
    http_status = 422


class CrossOriginRefused(Forbidden):
    """A state-changing request from another origin (Origin/Referer not this node's page)."""

    code = "HT-WEB-ORIGIN"


class CsrfRefused(Forbidden):
    """A /ui form post without this session's anti-forgery token (or with a wrong one)."""

    code = "HT-WEB-CSRF"


class AuditAnchorMismatch(HutongError):
    """The node's store is younger than, or differs from, its audit chain's anchor (the last
    signed checkpoint kept outside the database): truncated, deleted, replaced or restored."""

    code = "HT-AUDIT-ANCHOR"


class StoreCorrupt(HutongError):
    """The node's SQLite file fails ``PRAGMA quick_check`` (or is not a database at all)."""

    code = "HT-STORE-CORRUPT"


class DataDirLocked(HutongError):
    """Another ``hutong run`` already holds this node's data folder."""

    code = "HT-DATA-LOCKED"


class DemoLocked(HutongError):
    """Another ``hutong demo`` is using this demo folder (issue 15: it would wipe it)."""

    code = "HT-DEMO-LOCKED"


class PortInUse(HutongError):
    """A port the command is about to listen on is taken (checked before anything starts)."""

    code = "HT-PORT-IN-USE"


class CliInputError(HutongError):
    """A command-line argument or file the CLI cannot use (one line, never a traceback)."""

    code = "HT-CLI-INPUT"
