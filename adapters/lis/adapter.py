"""The ``lis-hl7`` adapter: ORU^R01 over MLLP -> validated FHIR -> node store -> ACK.

Per message (``handle``): decode by MSH-18 -> python-hl7 parse -> MSH checks -> a message seen
before (same MSH-3/MSH-4/MSH-10 *and* the same content, MSH-7 aside: :mod:`adapters.lis.once`)
gets its stored ACK and nothing else happens; a different message under a used control id is a
new message (stored, acknowledged, the reuse audited) -> one Bundle ->
R4 schema validation (once) -> ``host.share_results(staged=True)``, which commits the Bundle and
the raw message as one results-journal row with the key and the AA ACK -> only then the ACK is
returned to be written to the socket; the node's ``results-journal`` job stores the resources
and the raw message and routes them moments later, exactly once (:mod:`bridge.results.journal`;
option ``staged = false``: all of it before the ACK, in one transaction). Anything refused
gets AR/AE with the reason in MSA-3 and ERR, and its raw bytes go to quarantine (audited)
before the NAK is sent.

Node file::

    [[adapters]]
    name = "lis"
    type = "lis-hl7"
    mappings = "../../../mappings/fuxing"   # map "lab": local test codes -> LOINC
    [adapters.options]
    port = 2575
    default_charset = "GB18030"             # when MSH-18 is empty
    tls = { cert = "../secrets/lis.crt", key = "../secrets/lis.key" }   # optional
    rate_limit = { per_second = 50, burst = 200, hold_s = 2 }
    charset_override = "UNICODE UTF-8"     # optional: what this LIS really sends, whatever
                                            # MSH-18 says (see adapters.hl7v2.charset)
    max_message_bytes = 10485760            # MLLP frame limit (AR + quarantine above it)
    idle_timeout_s = 600                    # a connection with no frame in progress
    frame_timeout_s = 120                   # first byte of a frame to its end

Framing, limits, timeouts, TLS and the rate limit are the HL7 v2 kit's
(:mod:`adapters.hl7v2.mllp`), as are charsets, field readers and ACKs.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from adapters.base import BaseAdapter
from adapters.hl7v2 import ack as v2ack
from adapters.hl7v2 import charset as v2charset
from adapters.hl7v2.ack import Answering, build_ack
from adapters.hl7v2.charset import Charset
from adapters.hl7v2.fields import Message
from adapters.hl7v2.listener import RateOptions, TlsOptions, open_listener
from adapters.hl7v2.mllp import Fault, Handlers, MllpListener
from adapters.lis import once
from adapters.lis.errors import LisMessageError, RateLimited, from_kit
from adapters.lis.intake import decode
from adapters.lis.oru import Settings, header, national_id, parse, to_fhir
from bridge.errors import HutongError, InvalidFhir
from bridge.fhir.validate import validate_bundle

log = logging.getLogger("hutong.adapters.lis")


class LisOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    host: str = "127.0.0.1"
    port: int = Field(ge=0, le=65535)
    default_charset: str = "UTF-8"
    map: str = "lab"
    local_system: str | None = None  # default: the map's source system, else per node
    mrn_system: str | None = None
    timezone: str = Field("+0800", pattern=r"^[+-]\d{4}$")
    max_message_bytes: int = Field(10 * 1_048_576, ge=1024)
    idle_timeout_s: float = Field(600.0, gt=0, le=86_400)
    frame_timeout_s: float = Field(120.0, gt=0, le=86_400)
    charset_override: str | None = None
    tls: TlsOptions | None = None
    rate_limit: RateOptions | None = RateOptions()
    kind: str = "result.lab"
    #: ACK after one results-journal commit; the resources reach the FHIR store moments
    #: later (bridge/results/journal.py). false: stored in the FHIR store before the ACK
    staged: bool = True

    @field_validator("default_charset", "charset_override")
    @classmethod
    def _known_charset(cls, value: str | None) -> str | None:
        return v2charset.check_name(value) if value is not None else None


class LisAdapter(BaseAdapter):
    def __init__(self, host: Any, opts: LisOptions) -> None:
        super().__init__(host, opts)
        self.opts = opts
        maps = host.maps
        translator = maps.translator() if maps is not None and self.opts.map in maps.info else None
        local = (
            self.opts.local_system
            or (translator.source_system(self.opts.map) if translator else None)
            or f"http://hutong.dev/CodeSystem/{host.node_id}/lab"
        )
        plan = host.plan
        self.settings = Settings(
            node_id=host.node_id,
            hash_key=plan.patient_hash_key,
            national_id_system=plan.alliance.national_id_system,
            local_system=local,
            translator=translator,
            map_id=self.opts.map,
            mrn_system=self.opts.mrn_system or "",
            default_zone=self.opts.timezone,
        )
        self.site = maps.site if maps is not None else host.node_id
        self.listener: MllpListener | None = None

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> None:
        o = self.opts
        self.listener = open_listener(
            self.host,
            (o.host, o.port),
            o,
            Handlers(self.handle, self.frame_fault, self.over_limit),
            name=f"lis:{self.name}",
        )
        self.listener.start()
        log.info(
            "LIS adapter %s listening on %s:%s%s",
            self.name,
            o.host,
            o.port,
            " (TLS)" if o.tls is not None else "",
        )

    def stop(self) -> None:
        if self.listener is not None:
            self.listener.stop()
            self.listener = None

    def status(self) -> dict[str, Any]:
        out = super().status()
        out["port"] = self.opts.port
        out["tls"] = self.opts.tls is not None
        out["connections"] = self.listener.connections if self.listener else 0
        return out

    # -- one message ------------------------------------------------------------------------

    def replay(self, raw: bytes) -> str:
        """A quarantined message through intake again (``hutong quarantine replay``, the
        node's local API), after IT fixed the config or the map and restarted the node.

        Still refused: the error is raised (the item stays held, nothing is quarantined
        again). Taken: stored and routed with its AA ACK exactly as if the LIS had sent it now
        (the LIS got its NAK back then; this ACK goes nowhere), so a later resend by the LIS
        gets that ACK and changes nothing. Returns a line for IT (no patient data).
        """
        self.handle(raw, replaying=True)
        self.count("replayed")
        return f"MSH-10 {Answering.from_raw(raw).control_id or '?'} taken"

    def handle(self, raw: bytes, *, replaying: bool = False) -> bytes:
        """The ACK bytes for one MLLP payload; never raises (``replaying``: a refusal or a
        store failure is raised instead of being quarantined or NAKed)."""
        at = self.host.now()
        to = Answering.from_raw(raw)
        cs: Charset | None = None
        msg: Message | None = None
        try:
            text, cs = decode(raw, self.opts.default_charset, self.opts.charset_override)
            msg = parse(text, cs)  # a refusal from here on is answered in the sender's charset
            to = Answering.from_message(msg)
            head = header(msg)
            key = once.source_key(head.sending_app, head.facility, head.control_id, str(msg))
            # one read for both: the keys of this sender + control id (a re-send is among them)
            earlier = self.host.seen_under(
                once.sender_prefix(head.sending_app, head.facility, head.control_id)
            )
            prior = self.host.seen(key) if key in earlier else None
            if prior is not None:
                if replaying and prior.get("staged") and self.host.requeue_staged(key):
                    return v2ack.encode(str(prior["ack"]), cs)  # expanded again by the job
                self.count("repeated")
                return v2ack.encode(str(prior["ack"]), cs)
            reused = self._reused(head, earlier)
            results = to_fhir(msg, head, self.settings)
            try:
                validate_bundle(results.bundle)
            except InvalidFhir as exc:
                raise LisMessageError(
                    f"the results are not valid FHIR R4: {exc.message}", hl7_error="207"
                ) from None
            # counted before the results' commit and audited with it: nothing is written
            # between that commit and the ACK (the journal's next filing would hold the ACK)
            notes = reused + self._record_gaps(results.unmapped)
            ack = build_ack(to, "AA", at=at)
            out = self.host.share_results(
                results.bundle,
                source_key=key,
                patient_hash=results.patient_hash,
                answer={"ack": ack, "control_id": head.control_id},
                raw=raw,
                kind=self.opts.kind,
                notes=notes,
                staged=self.opts.staged and not replaying,
            )
        except LisMessageError as exc:
            if replaying:
                raise
            return self._refuse(exc, raw, to, cs, at, msg)
        except HutongError as exc:  # the store failed: nothing was kept, the LIS resends
            if replaying:
                raise
            log.error("LIS adapter %s could not store a message: %s", self.name, exc.code)
            self.failed(exc.code)
            err = LisMessageError(
                f"temporarily unable to store the message ({exc.code}); resend later"
            )
            return v2ack.encode(build_ack(to, "AE", at=at, error=err), cs)
        if out.get("repeated"):
            self.count("repeated")
        else:
            self.count("accepted")
            if reused:
                self.count("control_id_reused")
            self.count("observations", results.observations)
            self.count("corrected", results.corrected)
            if results.unmapped:
                self.count("unmapped_codes", len(results.unmapped))
            if results.units_not_ucum:
                self.count("units_not_ucum", len(results.units_not_ucum))
            if out.get("routed"):
                self.count("routed", len(out["routed"]))
        self.ok()
        return v2ack.encode(str(out["ack"]), cs)

    def _reused(self, head: Any, earlier: list[str]) -> list[dict[str, Any]]:
        """The audit note for a different message under a used sender + control id (none if
        the id is new; ``earlier``: the keys taken under it, this message's not among them):
        it is stored as a new message; IT sees the reuse on its page."""
        if not earlier:
            return []
        return [
            {
                "action": once.REUSED_ACTION,
                "outcome": "4",
                "code": "HT-LIS-CONTROL-ID",
                "message": f"MSH-10 {head.control_id[:40]} from {head.sending_app[:40]}/"
                f"{head.facility[:40]} reused by a different message "
                f"({len(earlier)} earlier); stored as a new message",
                "extra": {"control_id": head.control_id[:64], "earlier": len(earlier)},
            }
        ]

    def _refuse(
        self,
        exc: LisMessageError,
        raw: bytes,
        to: Answering,
        cs: Charset | None,
        at: Any,
        msg: Message | None = None,
    ) -> bytes:
        nak = build_ack(to, exc.ack_code, at=at, error=exc)
        record = f"MSH-10 {to.control_id}" if to.control_id else None
        nid = None
        if msg is not None:
            try:
                nid = national_id(msg, self.settings.national_id_system)
            except Exception:  # noqa: BLE001 - a malformed PID: the item is kept without it
                nid = None
        try:
            self.host.quarantine(exc, raw=raw, record=record, kind=self.opts.kind, national_id=nid)
        except HutongError as store_exc:
            log.error("LIS adapter %s could not quarantine: %s", self.name, store_exc.code)
        self.count("rejected" if exc.ack_code == "AR" else "errors")
        self.failed(exc.code)
        return v2ack.encode(nak, cs)

    def _record_gaps(self, unmapped: list[dict[str, str]]) -> list[dict[str, Any]]:
        """Unmapped local codes are counted in the node's mapping-gap table (now: a crash
        before the results' commit and the LIS's re-send count them twice) and audited with
        the results (the note returned)."""
        if not unmapped:
            return []
        try:
            for coding in unmapped:
                self.host.record_gap(self.opts.map, coding, site=self.site)
        except Exception as exc:  # noqa: BLE001 - the report must not fail the message
            log.warning(
                "LIS adapter %s could not record mapping gaps: %s", self.name, type(exc).__name__
            )
        return [
            {
                "action": "unmapped-codes",
                "outcome": "4",
                "message": f"{self.opts.map}: no LOINC mapping for "
                + ", ".join(c["code"] for c in unmapped)[:200],
            }
        ]

    def over_limit(self, raw: bytes) -> bytes:
        self.count("rate_limited")
        err = RateLimited(
            f"rate limit exceeded ({self.opts.rate_limit.per_second:g}/s on "
            f"channel {self.name}); resend later"
            if self.opts.rate_limit
            else "rate limit exceeded; resend later"
        )
        return v2ack.encode(
            build_ack(Answering.from_raw(raw), "AE", at=self.host.now(), error=err), None
        )

    def frame_fault(self, fault: Fault) -> bytes | None:
        """An MLLP frame not handled (oversize, truncated, too slow, no <VT>): its bounded
        prefix and digest are quarantined; the sender gets AR unless it is gone."""
        exc = from_kit(fault.error())
        to = Answering.from_raw(fault.prefix.lstrip(b"\x0b"))
        nak = build_ack(to, "AR", at=self.host.now(), error=exc)
        try:
            self.host.quarantine(
                exc,
                raw=fault.prefix,
                kind=self.opts.kind,
                record=f"MSH-10 {to.control_id}" if to.control_id else None,
            )
        except HutongError as store_exc:
            log.error("LIS adapter %s could not quarantine: %s", self.name, store_exc.code)
        self.count(f"frame-{fault.kind}")
        self.failed(exc.code)
        return None if fault.kind == "truncated" else v2ack.encode(nak, None)
