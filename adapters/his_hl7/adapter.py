"""The HL7 v2 HIS adapter: one MLLP listener for the HIS, one MLLP sender to the HIS.

Listener: an asyncio server (python-hl7 ``start_hl7_server``) on a daemon thread; the node's
scheduler is not involved, so a slow database write delays only that connection's ACK. The
sender borrows the listener's loop (``run_coroutine_threadsafe``) from the dispatcher thread.
See :mod:`~adapters.his_hl7.inbound` (HIS -> node) and :mod:`~adapters.his_hl7.outbound`.

Options (``[adapters.options]``)::

    listen = "0.0.0.0:2575"          # where the HIS sends REF^I12 / RRI^I12 / ADT
    his = "10.1.2.3:2576"            # the HIS's own MLLP listener (what we send)
    charset = "GB 18030-2000"        # MSH-18 of what we send (UNICODE UTF-8 by default)
    default_charset = "GB 18030-2000"  # for HIS messages without MSH-18 (UNICODE UTF-8)
    facility = "yuetan-chc"          # our MSH-4 (default: the node id)
    his_application = "HIS"          # MSH-5 of what we send
    his_facility = ""                # MSH-6 of what we send
    utc_offset = "+08:00"            # for HIS times without an offset
    referral_id_field = ""           # where an ADT names the alliance referral (e.g. "PV1-50");
                                     # empty: visits are never linked to referrals
    connect_timeout_s = 5
    ack_timeout_s = 15
    idle_timeout_s = 300
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from adapters.base import BaseAdapter
from adapters.his_hl7 import charset
from adapters.his_hl7.inbound import Inbound
from adapters.his_hl7.messages import Header
from adapters.his_hl7.mllp import MllpListener, Timeouts, split_addr
from adapters.his_hl7.outbound import Outbound
from adapters.his_hl7.state import State
from bridge.errors import ConfigError

if TYPE_CHECKING:
    from bridge.delivery.handlers import Delivery
    from bridge.local.host import AdapterHost


def _addr(value: str) -> str:
    try:
        split_addr(value)
    except ValueError:
        raise ValueError("expected host:port") from None
    return value


def _charset(value: str) -> str:
    charset.codec_for(value, "utf-8")
    return value


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    listen: str
    his: str
    charset: str = "UNICODE UTF-8"
    default_charset: str = "UNICODE UTF-8"
    facility: str = ""
    his_application: str = "HIS"
    his_facility: str = ""
    utc_offset: str = "+08:00"
    connect_timeout_s: float = 5.0
    ack_timeout_s: float = 15.0
    idle_timeout_s: float = 300.0
    referral_id_field: str = ""

    _listen = field_validator("listen", "his")(_addr)

    @field_validator("charset", "default_charset")
    @classmethod
    def _known(cls, value: str) -> str:
        try:
            return _charset(value)
        except charset.CharsetError as exc:
            raise ValueError(exc.reason) from None

    @field_validator("referral_id_field")
    @classmethod
    def _field(cls, value: str) -> str:
        if value:
            from adapters.his_hl7.adt import parse_field

            parse_field(value)
        return value.strip()

    @field_validator("utc_offset")
    @classmethod
    def _offset(cls, value: str) -> str:
        if len(value) != 6 or value[0] not in "+-" or value[3] != ":":
            raise ValueError("expected +HH:MM")
        return value


class HisHl7Adapter(BaseAdapter):
    def __init__(self, host: AdapterHost, options: dict[str, Any]) -> None:
        super().__init__(host, options)
        try:
            self.opts = Options.model_validate(options)
        except ValidationError as exc:
            raise ConfigError("; ".join(
                f"adapters.{self.name}.options.{'.'.join(map(str, e['loc']))}: {e['msg']}"
                for e in exc.errors())) from None
        o = self.opts
        self.facility = o.facility or host.node_id
        self.codec = charset.codec_for(o.charset, "utf-8")
        self.default_codec = charset.codec_for(o.default_charset, "utf-8")
        self.his_host, self.his_port = split_addr(o.his)
        sign = -1 if o.utc_offset[0] == "-" else 1
        self.utc_offset = sign * timedelta(hours=int(o.utc_offset[1:3]),
                                           minutes=int(o.utc_offset[4:6]))
        self.timeouts = Timeouts(o.connect_timeout_s, o.ack_timeout_s, o.idle_timeout_s)
        self.state: State = None  # type: ignore[assignment]  # opened in start()
        self.listener: MllpListener = None  # type: ignore[assignment]
        self.inbound: Inbound | None = None
        self.outbound: Outbound | None = None

    def header(self) -> Header:
        return Header("HUTONG", self.facility, self.opts.his_application, self.opts.his_facility,
                      charset.DECLARE[self.codec])

    def start(self) -> None:
        self.state = State(self.host.data_dir / "his_hl7.sqlite")
        self.inbound = Inbound(self)
        self.outbound = Outbound(self)
        self.listener = MllpListener(self.opts.listen, self.inbound.handle, self.timeouts,
                                     name=f"his-hl7:{self.name}")
        self.listener.start()

    def deliver(self, item: Delivery) -> None:
        if self.outbound is None:
            from bridge.errors import TransportError

            raise TransportError(f"adapter '{self.name}' is not started")
        self.outbound.deliver(item)

    def replay(self, raw: bytes) -> str:
        """A quarantined message again (``hutong quarantine replay``, the node's local API):
        the site's maps are re-read first, so a code IT added to a mapping CSV counts."""
        if self.inbound is None:
            from bridge.errors import TransportError

            raise TransportError(f"adapter '{self.name}' is not started")
        self.host.reload_maps()
        return self.inbound.replay(raw)

    def status(self) -> dict[str, Any]:
        out = super().status()
        if self.listener is not None:
            out["listen"] = f"{self.listener.host}:{self.listener.port}"
        out["his"] = self.opts.his
        return out

    def stop(self) -> None:
        if self.listener is not None:
            self.listener.stop()
        if self.state is not None:
            self.state.close()
            self.state = None  # type: ignore[assignment]
