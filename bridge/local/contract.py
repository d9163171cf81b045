"""The adapter contract, owned by the engine: what a local system (HIS, LIS, PACS) plugs into.

An adapter *type* is registered in the entry-point group ``hutong.adapters`` (``pyproject.toml``)
as an :class:`AdapterType`: its name, its options model (pydantic, ``extra="forbid"``), the
listeners its options open, any further check of its options, and its constructor. The engine
reads that declaration to check every ``[[adapters]]`` table before anything starts
(``hutong config check`` and node loading alike, :func:`bridge.local.registry.check_adapters`),
then builds each adapter from its already validated options. The engine imports no adapter: it
finds them by entry point, and adapters import this module. (The shape Redpanda Connect uses
to register a connector with its config spec.)

A node file's table::

    [[adapters]]
    name = "his"                         # unique on the node: audit, quarantine and pages use it
    type = "his-middle-db"               # entry point name in group hutong.adapters
    mappings = "../../../mappings/fuxing"  # the site's mapping folder, relative to the node file
    receives = ["referral.*"]            # packet kinds this adapter writes into the local system
    [adapters.options]                   # the adapter's own settings, checked by its type
    dsn = "sqlite:////var/lib/his/zhongjianku.db"

Life cycle (shaped like a Benthos input: connect, read with an ack, close):

* ``AdapterType.build(host, options)``: keep the :class:`~bridge.local.host.AdapterHost` and the
  validated options model; start nothing yet. Every refusal of an option belongs in the options
  model or in ``check`` (so ``config check`` finds it), never here.
* ``start()``: open listeners, register poll jobs with ``host.every``. Return quickly.
* Source side: turn each local record into FHIR and hand it to the host with a ``source_key``
  (the record's stable identity: a row id, MSH-10 plus sending facility, a document id). The
  host commits the record's effect and the key in ONE transaction, so a record is acted on
  exactly once even if the adapter is killed between reading it and marking it read; a second
  call with the same key returns the first call's result and does nothing.
  Bad local data -> ``host.quarantine(error, raw=..., record=..., field=...)`` and go on with
  the next record.
* Sink side: the dispatcher decodes and applies a packet once (the referral workflow, the
  results inbox), then hands the adapter the typed event: ``on_referral(ev)``
  (:class:`ReferralSink`, :class:`ReferralEvent`: event, side, thread, the stored view of the
  thread, the Task), ``on_result(ev)`` (:class:`ResultSink`, :class:`ResultEvent`: the
  results Bundle and this node's patient reference) or ``on_consult(ev)`` (:class:`ConsultSink`,
  :class:`ConsultEvent`; a referral or result sink without it is not handed consultation
  packets); any other kind (one the engine has no
  step for, e.g. the PACS adapter's ``imaging.fetch-*``) goes to ``on_packet(ev)``
  (:class:`PacketSink`, :class:`PacketEvent`: the packet's Bundle, decoded once by the
  dispatcher; the gateway checked it against the R4 schema on arrival). ``deliver(item)``
  (:class:`Sink`, the raw bytes) is what the engine's own handlers take (the spool folder); no
  adapter reads ``item.body`` (``tests/test_engine_imports.py`` walks them). An imaging report
  another member wrote on a study (remote imaging reading, 远程影像诊断) is also handed, as an
  :class:`ImagingReportEvent`, to every adapter that is an :class:`ImagingReportSink` (the PACS
  adapter: it keeps the report attached to the study when it holds that study, and answers
  None otherwise), whatever ``receives`` says: by the results inbox for ``result.imaging``
  packets (:func:`bridge.results.attach.to_imaging_sinks`), and by any workflow that brings a
  report back (the consultation loop calls the same function). Every handler
  writes into the local system and must be idempotent by packet id (after a crash the same
  packet is handed over again). ``flush()`` makes everything delivered so far durable.
  Failures, by class (:func:`retry_class`; the dispatcher acts on the class, never on a flag):

  - :class:`~bridge.errors.TransportError` (or any error whose ``retry`` is ``TRANSIENT``):
    nothing was written (the local system is down, refused the connection, timed out before
    sending). Retried with backoff; later packets of the thread wait behind it.
  - :class:`~bridge.errors.AmbiguousDelivery`: it may have been written (sent, no answer).
    Retried like a transient failure; the sink's idempotency by packet id makes it safe.
  - any other :class:`~bridge.errors.HutongError` (``retry = PERMANENT``): this packet will
    never be taken as it is (the local system refused its content). Dead-lettered at once,
    kept in quarantine (``source = "delivery"``), and the thread moves on.
  - any other exception (a bug, an ``OSError`` of a socket): treated as ambiguous, retried up
    to ``[delivery] max_attempts``, then dead-lettered.

* ``status()``: a small dict for the IT page and alerts (``last_ok_at``, ``last_error``,
  counters). Never patient data.
* ``stop()``: close listeners; must be safe to call twice, and before ``start()``.
* Optional (:class:`Replayable`) ``replay(raw) -> str``: a record this adapter quarantined,
  run through intake again after IT fixed a mapping or the config (``hutong quarantine
  replay``, the node's local API). Raise the ``HutongError`` if it is still refused (do not
  quarantine it again); return a short line for IT (no patient data) when it was taken.
* Optional (:class:`ServesRoutes`) ``local_routes() -> fastapi.APIRouter``: routes served under
  ``/local/v1/adapters/<name>`` on the node's local API (behind its tokens).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, runtime_checkable

import orjson
from pydantic import BaseModel, ValidationError

from bridge.delivery.handlers import Delivery
from bridge.errors import (
    AmbiguousDelivery,
    ConfigError,
    HutongError,
    MalformedPacket,
    Retry,
    TransportError,
)

if TYPE_CHECKING:
    from bridge.config.models import AdapterSettings

#: the :class:`bridge.local.host.AdapterHost` an adapter is built with (named, not imported:
#: the host reaches into the node, and the contract stays below both)
AdapterHost = Any

__all__ = [
    "Adapter",
    "AdapterType",
    "AmbiguousDelivery",
    "ConsultEvent",
    "ConsultSink",
    "Delivery",
    "ImagingReportEvent",
    "ImagingReportSink",
    "PacketEvent",
    "PacketSink",
    "Problem",
    "ReferralEvent",
    "ReferralSink",
    "Replayable",
    "ResultEvent",
    "ResultSink",
    "ServesRoutes",
    "Sink",
    "TransportError",
    "as_failure",
    "decode_bundle",
    "options_problems",
    "retry_class",
]

#: one thing wrong with an adapter's options: (key under ``options``, e.g. ``tls.cert``; what)
Problem = tuple[str, str]

Opts = TypeVar("Opts", bound=BaseModel)


@runtime_checkable
class Adapter(Protocol):
    """Every adapter: a name, a life cycle and a status without patient data."""

    name: str

    def start(self) -> None: ...

    def status(self) -> dict[str, Any]: ...

    def stop(self) -> None: ...


@runtime_checkable
class Sink(Protocol):
    """An adapter that receives packets (its ``[[adapters]] receives`` patterns)."""

    def deliver(self, item: Delivery) -> None: ...

    def flush(self) -> None: ...


@runtime_checkable
class Replayable(Protocol):
    """An adapter that can take a record it quarantined again (``hutong quarantine replay``)."""

    def replay(self, raw: bytes) -> str: ...


@runtime_checkable
class ServesRoutes(Protocol):
    """An adapter that serves routes of its own under ``/local/v1/adapters/<name>``."""

    def local_routes(self) -> Any: ...


@dataclass(frozen=True, slots=True)
class ReferralEvent:
    """A ``referral.*`` packet as the referral workflow applied it (the dispatcher's hook ran
    first): what happened, on which side, and the thread as stored after it."""

    packet: Delivery  # the header fields (packet id, sender, kind, thread, seq, received_at)
    event: str  # the MessageHeader's event: request, accept, reject, return, cancel, ...
    side: str  # this node's side of the referral: "referrer" or "receiver"
    thread: str
    view: dict[str, Any]  # {"referral": the row, "resources": every FHIR resource of the thread}
    task: dict[str, Any]  # the Task the packet carried


@dataclass(frozen=True, slots=True)
class ConsultEvent:
    """A ``consult.*`` packet as the consultation workflow applied it (``bridge/consult``):
    what happened, on which side, and the consultation as stored after it. Adapters that do
    not implement :class:`ConsultSink` are not handed these (the step is applied already)."""

    packet: Delivery
    event: str  # the MessageHeader's event: request, received, return, schedule, release, ...
    side: str  # this node's side of the consultation: "inviter" or "centre"
    thread: str
    view: dict[str, Any]  # {"consultation": the row, "steps": [...], "resources": [...]}
    task: dict[str, Any]  # the Task the packet carried


@dataclass(frozen=True, slots=True)
class ResultEvent:
    """A ``result.*`` packet as the results inbox stored it."""

    packet: Delivery
    bundle: dict[str, Any]  # the results Bundle as it arrived (the sender's references)
    patient: str | None  # this node's Patient the results are about ("Patient/<id>"), if known
    view: dict[str, Any] | None  # the referral the results belong to, if any


@dataclass(frozen=True, slots=True)
class PacketEvent:
    """A packet of a kind no in-node step applies (the adapter's own kinds): its Bundle,
    decoded once by the dispatcher (:func:`decode_bundle`)."""

    packet: Delivery
    bundle: dict[str, Any]  # the Bundle as it arrived (validated at the gateway)


@dataclass(frozen=True, slots=True)
class ImagingReportEvent:
    """One imaging report (a DiagnosticReport on a DICOM study) another member wrote, as this
    node stored it: for the PACS side of remote imaging reading."""

    key: str  # what makes it once: "<packet id>:<report id>" (a redelivery has the same key)
    sender: str  # the member whose radiologist wrote the report
    thread: str | None  # the thread it came on (a referral, a consultation)
    study_uid: str  # the DICOM Study Instance UID the report is on
    report: dict[str, Any]  # the DiagnosticReport (subject: this node's patient when known)
    #: the engine checked that ``sender`` is the other party of ``thread`` (a referral or a
    #: consultation of this node); False: a packet on a thread this node does not know
    party: bool = False


@runtime_checkable
class ImagingReportSink(Protocol):
    """An adapter that keeps imaging reports with the studies it holds. Returns what it did
    (e.g. ``{"study": <ImagingStudy id>}``) or None when it does not hold the study or cannot
    keep the report (then it quarantines it itself: the packet's other handlers go on).
    Idempotent by ``ev.key``. An error it raises (a transient one: the store is busy) fails
    the packet, which is retried."""

    def on_imaging_report(self, ev: ImagingReportEvent) -> dict[str, Any] | None: ...


@runtime_checkable
class ReferralSink(Protocol):
    """A sink of referral events: one handler, whose errors propagate to the dispatcher."""

    def on_referral(self, ev: ReferralEvent) -> None: ...


@runtime_checkable
class ResultSink(Protocol):
    """A sink of result events: one handler, whose errors propagate to the dispatcher."""

    def on_result(self, ev: ResultEvent) -> None: ...


@runtime_checkable
class PacketSink(Protocol):
    """A sink of packets of its own kinds: one handler, whose errors propagate."""

    def on_packet(self, ev: PacketEvent) -> None: ...


def decode_bundle(item: Delivery) -> dict[str, Any]:
    """The Bundle a stored packet carries. The gateway validated it before storing, so a body
    that is not one is a permanent refusal (it would never decode on a retry either)."""
    try:
        bundle = orjson.loads(item.body)
    except orjson.JSONDecodeError:
        raise MalformedPacket(f"packet {item.packet_id}: body is not JSON") from None
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise MalformedPacket(f"packet {item.packet_id}: body is not a FHIR Bundle")
    return bundle


@runtime_checkable
class ConsultSink(Protocol):
    """A sink of consultation events (status changes, the released report into the HIS)."""

    def on_consult(self, ev: ConsultEvent) -> None: ...


def _no_listeners(options: Any) -> list[tuple[str, int]]:
    return []


def _no_problems(options: Any, settings: AdapterSettings) -> list[Problem]:
    return []


@dataclass(frozen=True)
class AdapterType(Generic[Opts]):
    """What an adapter type declares to the engine (the entry point's object).

    ``listens(options)``: the ``host:port`` binds its listeners will open (checked against each
    other and the node's own ports). ``check(options, settings)``: what the model alone cannot
    see (a file the options name, a folder under the mappings), as :data:`Problem` lines.
    ``example``: options a node could start with (the conformance suite and the docs use it).
    Calling the type validates and builds: ``TYPE(host, raw_options) -> Adapter``.
    """

    name: str
    options: type[Opts]
    build: Callable[[AdapterHost, Opts], Adapter]
    listens: Callable[[Opts], list[tuple[str, int]]] = _no_listeners
    check: Callable[[Opts, AdapterSettings], list[Problem]] = _no_problems
    example: Mapping[str, Any] = field(default_factory=dict)

    def validate(
        self, raw: Mapping[str, Any], settings: AdapterSettings | None = None
    ) -> tuple[Opts | None, list[Problem]]:
        """The options model and every problem of ``raw`` (model first, then ``check``)."""
        opts, problems = options_problems(self.options, raw)
        if opts is not None and settings is not None:
            problems.extend(self.check(opts, settings))
        return (opts if not problems else None), problems

    def __call__(self, host: AdapterHost, raw: Mapping[str, Any]) -> Adapter:
        opts, problems = self.validate(raw, host.settings)
        if opts is None:
            where = f"adapters.{host.adapter_name}.options"
            lines = [
                f"{where}.{key}: {what}" if key else f"{where}: {what}" for key, what in problems
            ]
            raise ConfigError("; ".join(lines), problems=lines)
        return self.build(host, opts)


def options_problems(
    model: type[Opts], raw: Mapping[str, Any]
) -> tuple[Opts | None, list[Problem]]:
    """Validate ``raw`` against ``model``: the model, or every problem named by its key."""
    try:
        return model.model_validate(dict(raw)), []
    except ValidationError as exc:
        out: list[Problem] = []
        for e in exc.errors(include_url=False):
            key = ".".join(str(p) for p in e["loc"])
            msg = e["msg"].removeprefix("Value error, ")
            out.append((key, msg))
        return None, out


def retry_class(exc: BaseException) -> Retry:
    """How the dispatcher treats a sink's failure (see the module text): a HutongError by its
    ``retry``; an ``OSError`` (a socket, a disk) as transient; anything else as ambiguous."""
    if isinstance(exc, HutongError):
        return exc.retry
    if isinstance(exc, OSError):
        return Retry.TRANSIENT
    return Retry.AMBIGUOUS


def as_failure(exc: BaseException) -> HutongError:
    """A sink's exception as the error the dispatcher records: a HutongError as it is, anything
    else by :func:`retry_class`, named by its type only (its text may carry patient data)."""
    if isinstance(exc, HutongError):
        return exc
    what = f"local handler failed: {type(exc).__name__}"
    return TransportError(what) if retry_class(exc) is Retry.TRANSIENT else AmbiguousDelivery(what)
