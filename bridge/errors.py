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
    │   ├── RouteDenied              HT-PKT-ROUTE-DENIED no allow rule for (from, to, kind)
    │   └── NationalIdEgress         HT-PKT-NATIONAL-ID a packet queued to leave carries a national ID
    ├── TransportError               (transient)        peer unreachable, timed out, 5xx (HT-TRANSPORT)
    │   ├── NotTaken                 (no attempt)       not taken this time: resend after Retry-After
    │   │   ├── RateLimited          HT-PKT-RATE        over a rate
    │   │   ├── Backlogged           HT-PKT-BACKLOG     the receiver's local delivery is behind
    │   │   └── Busy                 HT-BUSY            a port at its bound of requests/bytes in flight
    ├── AmbiguousDelivery            (ambiguous)        sent, but no answer: resend, receiver dedupes
    ├── StoreError                   (transient)        database unavailable or locked (HT-STORE)
    ├── NotFound                     HT-NOT-FOUND       asked-for item does not exist
    ├── Unauthorized                 HT-AUTH            missing or unknown token
    ├── Forbidden                    HT-FORBIDDEN       a token of the wrong role
    │   ├── CrossOriginRefused       HT-WEB-ORIGIN      a /ui post from another origin
    │   └── CsrfRefused              HT-WEB-CSRF        a /ui post without the session's token
    ├── WorkflowError                (permanent)        a referral step that cannot be taken
    │   ├── IllegalTransition        HT-REF-TRANSITION  e.g. accept a cancelled referral
    │   ├── MissingConsent           HT-REF-CONSENT     a referral without the patient's consent
    │   ├── UnknownReference         HT-REF-UNKNOWN     a reference to nothing in the bundle/store
    │   ├── InvalidResource          HT-FHIR-INVALID    a resource that is not valid FHIR R4
    │   └── VisitConflict            HT-VISIT-CONFLICT  a visit number that names another patient's visit
    ├── AuditAnchorMismatch          HT-AUDIT-ANCHOR    the store is younger than, or differs from, its anchor
    ├── StoreCorrupt                 HT-STORE-CORRUPT   the SQLite file fails quick_check
    ├── DataDirLocked                HT-DATA-LOCKED     another `hutong run` holds the data folder
    ├── ThreadRefused                (permanent)        a packet its thread does not take
    │   ├── NotThreadParty           HT-THREAD-PARTY    sender is not the thread's other party
    │   └── StaleSequence            HT-THREAD-SEQ      a seq whose turn has passed
    └── UnsafePath                   HT-UNSAFE-PATH     an id used as a path fails its grammar or
                                                        would leave its folder

Adapters keep their own subtrees under HutongError (adapters/hl7v2/errors.py ``HT-V2-*``,
adapters/lis/errors.py ``HT-LIS-*``, adapters/his_hl7/errors.py ``HT-HL7-*``,
adapters/his_ws/errors.py ``HT-WS-*``, adapters/pacs/errors.py ``HT-DICOM-*``/``HT-IMAGING-*``...).

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


class NotTaken(TransportError):
    """The receiver did not take the batch this time and said when to try again: send it
    again after ``retry_after`` seconds (the sender does not count this as a failed attempt,
    so it never leads to a dead letter)."""

    def __init__(
        self, message: str, *, retry_after: float = 1.0, detail: str | None = None
    ) -> None:
        super().__init__(message, detail=detail)
        self.retry_after = retry_after


class RateLimited(NotTaken):
    """A peer sent more packets than its rate allows."""

    code = "HT-PKT-RATE"
    http_status = 429


class Backlogged(NotTaken):
    """The receiver's received packets waiting for local delivery are at its bound
    (``[limits] max_inbox_backlog``): new batches are refused unread until it drains."""

    code = "HT-PKT-BACKLOG"
    http_status = 503


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


class Busy(NotTaken):
    """A port is at its bound of requests or bytes in flight: nothing of the request was read
    or taken; send it again later (``Retry-After``). A sender counts no attempt for it, so a
    busy receiver never turns a packet into a dead letter."""

    code = "HT-BUSY"
    http_status = 503


class VisitConflict(WorkflowError):
    """A local system's visit number already names a visit of another patient here."""

    code = "HT-VISIT-CONFLICT"
    http_status = 409


class ThreadRefused(HutongError):
    """A packet its thread does not take (issue 13): quarantined and audited at delivery."""

    code = "HT-THREAD"
    http_status = 403


class NotThreadParty(ThreadRefused):
    """The (authenticated, original) sender is not the thread's other party: a member may
    speak only on the threads it opened with us or we opened with it."""

    code = "HT-THREAD-PARTY"


class StaleSequence(ThreadRefused):
    """A new packet with a sequence number whose turn has passed on its thread."""

    code = "HT-THREAD-SEQ"
    http_status = 409


class UnsafePath(HutongError):
    """An identifier that would become part of a file path fails its grammar, or its path
    would leave the folder it belongs in (``..``, a symlink out)."""

    code = "HT-UNSAFE-PATH"
    http_status = 422


class VersionConflict(HutongError):
    """A write conditional on a version (``If-Match``, a transaction entry's ``ifMatch``) whose
    resource is at another version now: nothing was changed; read it again and retry."""

    code = "HT-FHIR-VERSION"
    http_status = 412


class ChangeNotApplied(WorkflowError):
    """An update whose change the workflow would not apply (e.g. ``Task.note`` on a referral
    Task): refused whole, naming the elements, instead of answered 200 without them."""

    code = "HT-FHIR-UNAPPLIED"
    http_status = 422

    def __init__(self, message: str, *, elements: list[str]) -> None:
        super().__init__(message)
        self.elements = elements


class DemoLocked(HutongError):
    """Another ``hutong demo`` is using this demo folder (issue 15: it would wipe it)."""

    code = "HT-DEMO-LOCKED"


class PortInUse(HutongError):
    """A port the command is about to listen on is taken (checked before anything starts)."""

    code = "HT-PORT-IN-USE"


class CliInputError(HutongError):
    """A command-line argument or file the CLI cannot use (one line, never a traceback)."""

    code = "HT-CLI-INPUT"
