"""The adapter contract: how a local system (HIS, LIS, PACS) plugs into a node.

An adapter is one kind of local system, both a *source* (local records -> FHIR -> the node)
and a *sink* (packets that arrived -> local records). The node finds it by ``type`` in the
entry-point group ``hutong.adapters`` (declared in ``pyproject.toml``), so the core never
imports an adapter, and configures it from one ``[[adapters]]`` table of the site's node file::

    [[adapters]]
    name = "his"                         # unique on the node: audit, quarantine and pages use it
    type = "his-middle-db"               # entry point name in group hutong.adapters
    mappings = "../../../mappings/fuxing"  # the site's mapping folder, relative to the node file
    receives = ["referral.*"]            # packet kinds this adapter writes into the local system
    [adapters.options]                   # the adapter's own settings, checked by its own model
    dsn = "sqlite:////var/lib/his/zhongjianku.db"

Life cycle (shaped like a Benthos input: connect, read with an ack, close):

* ``factory(host, options) -> Adapter``: validate ``options`` (raise ``ConfigError`` naming the
  key) and keep the :class:`~bridge.local.host.AdapterHost`; start nothing yet.
* ``start()``: open listeners, register poll jobs with ``host.every``. Return quickly.
* Source side: turn each local record into FHIR and hand it to the host with a ``source_key``
  (the record's stable identity: a row id, MSH-10 plus sending facility, a document id). The
  host commits the record's effect and the key in ONE transaction, so a record is acted on
  exactly once even if the adapter is killed between reading it and marking it read; a second
  call with the same key returns the first call's result and does nothing.
  Bad local data -> ``host.quarantine(error, raw=..., record=..., field=...)`` and go on with
  the next record.
* Sink side: ``deliver(item)`` writes one arrived packet into the local system; it must be
  idempotent by ``item.packet_id`` (after a crash the same packet is handed over again).
  ``flush()`` makes everything delivered so far durable. Raise ``Retry``/``HutongError`` for
  transient failures (the dispatcher backs off, keeping the thread's order).
* ``status()``: a small dict for the IT page and alerts (``last_ok_at``, ``last_error``,
  counters). Never patient data.
* ``stop()``: close listeners; must be safe to call twice.
* Optional ``replay(raw) -> str``: a record this adapter quarantined, run through intake again
  after IT fixed a mapping or the config (``hutong quarantine replay``, the node's local API).
  Raise the ``HutongError`` if it is still refused (do not quarantine it again); return a short
  line for IT (no patient data) when it was taken. Exactly-once keys hold as for a live record.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from bridge.delivery.handlers import Delivery
    from bridge.local.host import AdapterHost


class Adapter(Protocol):
    name: str

    def start(self) -> None: ...

    def deliver(self, item: Delivery) -> None: ...

    def flush(self) -> None: ...

    def status(self) -> dict[str, Any]: ...

    def stop(self) -> None: ...


class AdapterFactory(Protocol):
    def __call__(self, host: AdapterHost, options: dict[str, Any]) -> Adapter: ...


class BaseAdapter:
    """Defaults for the optional parts; a source-only adapter need not receive anything."""

    def __init__(self, host: AdapterHost, options: dict[str, Any]) -> None:
        self.host = host
        self.name = host.adapter_name
        self.options = options
        self.counters: dict[str, int] = {}
        self.last_ok_at: str | None = None
        self.last_error: str | None = None
        self.last_error_at: str | None = None

    def start(self) -> None:
        pass

    def deliver(self, item: Delivery) -> None:
        from bridge.errors import HutongError

        raise HutongError(f"adapter '{self.name}' does not receive packets ({item.kind})")

    def flush(self) -> None:
        pass

    def count(self, what: str, n: int = 1) -> None:
        self.counters[what] = self.counters.get(what, 0) + n

    def ok(self) -> None:
        self.last_ok_at = self.host.now().isoformat()

    def failed(self, message: str) -> None:
        self.last_error = message
        now = getattr(self.host, "now", None)
        if now is None:  # a bare host (unit tests): wall clock
            from datetime import UTC, datetime

            now = lambda: datetime.now(UTC)  # noqa: E731
        self.last_error_at = now().isoformat()

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "type": type(self).__name__, "last_ok_at": self.last_ok_at,
                "last_error": self.last_error, "last_error_at": self.last_error_at,
                "counters": dict(self.counters)}

    def stop(self) -> None:
        pass
