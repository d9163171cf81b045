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
    idle_timeout_s = 300             # listener: a connection with no frame in progress
    frame_timeout_s = 120            # listener: first byte of a frame to its end
    max_message_bytes = 10485760     # listener: MLLP frame limit (AR + quarantine above it)
    charset_override = "GB 18030-2000"  # optional: what the HIS really sends, whatever
                                        # MSH-18 says
    tls = { cert = "...", key = "...", client_ca = "..." }   # optional, listener
    rate_limit = { per_second = 50, burst = 200, hold_s = 2 }  # optional, listener

Framing, limits, timeouts, TLS, rate limit, charsets, field readers and ACKs are the HL7 v2
kit's (:mod:`adapters.hl7v2`), the same as the LIS's.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from adapters.base import BaseAdapter
from adapters.his_hl7 import v2
from adapters.his_hl7.errors import Hl7DataError
from adapters.his_hl7.inbound import Inbound
from adapters.his_hl7.messages import Header
from adapters.his_hl7.outbound import Outbound
from adapters.his_hl7.state import State
from adapters.hl7v2 import ack, charset
from adapters.hl7v2.fields import Message
from adapters.hl7v2.listener import RateOptions, TlsOptions, open_listener
from adapters.hl7v2.mllp import (
    Fault,
    Handlers,
    MllpListener,
    Timeouts,
    split_addr,
)
from bridge.errors import HutongError

if TYPE_CHECKING:
    from bridge.local.contract import ConsultEvent, ReferralEvent, ResultEvent
    from bridge.local.host import AdapterHost

log = logging.getLogger("hutong.adapters.his_hl7")


def _addr(value: str) -> str:
    try:
        split_addr(value)
    except ValueError:
        raise ValueError("expected host:port") from None
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
    idle_timeout_s: float = Field(300.0, gt=0, le=86_400)
    frame_timeout_s: float = Field(120.0, gt=0, le=86_400)
    max_message_bytes: int = Field(10 * 1_048_576, ge=1024)
    charset_override: str | None = None
    tls: TlsOptions | None = None
    rate_limit: RateOptions | None = None
    referral_id_field: str = ""

    _listen = field_validator("listen", "his")(_addr)

    @field_validator("charset", "default_charset", "charset_override")
    @classmethod
    def _known(cls, value: str | None) -> str | None:
        return charset.check_name(value) if value is not None else None

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
    def __init__(self, host: AdapterHost, opts: Options) -> None:
        super().__init__(host, opts)
        self.opts = opts
        o = self.opts
        self.facility = o.facility or host.node_id
        self.charset = charset.lookup(o.charset)  # what we write
        self.his_host, self.his_port = split_addr(o.his)
        sign = -1 if o.utc_offset[0] == "-" else 1
        self.utc_offset = sign * timedelta(
            hours=int(o.utc_offset[1:3]), minutes=int(o.utc_offset[4:6])
        )
        self.timeouts = Timeouts(o.connect_timeout_s, o.ack_timeout_s, o.idle_timeout_s)
        self.state: State = None  # type: ignore[assignment]  # opened in start()
        self.listener: MllpListener = None  # type: ignore[assignment]
        self.inbound: Inbound | None = None
        self.outbound: Outbound | None = None

    def decode(self, raw: bytes) -> tuple[str, charset.Charset]:
        """(text, charset) of a message from the HIS: MSH-18, else ``default_charset``;
        ``charset_override`` wins (the kit's table and checks; refusals as Hl7Rejected)."""
        return v2.kit_errors(charset.decode)(
            raw, self.opts.default_charset, self.opts.charset_override
        )

    def answer(
        self,
        code: str,
        control: str,
        cs: charset.Charset | None,
        msg: Message | None,
        error: Hl7DataError | None = None,
        raw: bytes = b"",
    ) -> bytes:
        """The kit's ACK (MSA/ERR by the message's version), in the charset it was read in;
        from the parsed message, else from what can be sniffed of the raw bytes."""
        to = ack.Answering.from_message(msg) if msg is not None else ack.Answering.from_raw(raw)
        return ack.encode(
            ack.build_ack(
                replace(to, control_id=control),
                code,
                at=self.host.now(),
                error=error,
                app="HUTONG",
                facility=self.facility,
            ),
            cs,
        )

    def frame_fault(self, fault: Fault) -> bytes | None:
        """An MLLP frame not handled (oversize, truncated, too slow, no <VT>): its bounded
        prefix and digest are quarantined; the HIS gets AR unless it is gone."""
        exc = v2.from_kit(fault.error())
        head = fault.prefix.lstrip(b"\x0b")
        record = ack.Answering.from_raw(head).control_id.strip() or "?"
        nak = self.answer("AR", record, None, None, exc, raw=head)
        try:
            qid = self.host.quarantine(
                exc, raw=fault.prefix, record=f"MSH-10 {record}", field=exc.field, kind="hl7"
            )
            self.failed(f"{exc.code} MLLP {fault.kind} (quarantine {qid})")
        except HutongError as store_exc:
            log.error("his-hl7 %s: could not quarantine (%s)", self.name, store_exc.code)
        self.count(f"frame-{fault.kind}")
        return None if fault.kind == "truncated" else nak

    def over_rate(self, raw: bytes) -> bytes:
        """Over the listener's rate limit: AE, not quarantined (the HIS keeps it, resends)."""
        self.count("rate-limited")
        return self.answer(
            "AE",
            ack.Answering.from_raw(raw).control_id or "?",
            None,
            None,
            Hl7DataError("rate limit exceeded on this channel; resend later", hl7_error="207"),
            raw=raw,
        )

    def header(self) -> Header:
        return Header(
            "HUTONG",
            self.facility,
            self.opts.his_application,
            self.opts.his_facility,
            self.charset.name,
        )

    def start(self) -> None:
        self.state = State(self.host.state)
        moved = self.state.take_file(self.host.data_dir / "his_hl7.sqlite")
        if moved:
            log.info(
                "his-hl7 %s: %d rows of its old state file moved into the node's database",
                self.name,
                moved,
            )
        self.inbound = Inbound(self)
        self.outbound = Outbound(self)
        self.listener = open_listener(
            self.host,
            split_addr(self.opts.listen),
            self.opts,
            Handlers(self.inbound.handle, self.frame_fault, self.over_rate),
            name=f"his-hl7:{self.name}",
        )
        self.listener.start()

    def _out(self) -> Outbound:
        if self.outbound is None:
            from bridge.errors import TransportError

            raise TransportError(f"adapter '{self.name}' is not started")
        return self.outbound

    def on_referral(self, ev: ReferralEvent) -> None:
        self._out().on_referral(ev)

    def on_result(self, ev: ResultEvent) -> None:
        self._out().on_result(ev)

    def on_consult(self, ev: ConsultEvent) -> None:
        self._out().on_consult(ev)

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
