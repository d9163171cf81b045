"""An HL7 v2 adapter's MLLP listener built from its options, in one place (the HIS and the LIS
adapters both listen): the TLS files and the rate limit an adapter's options model declares,
and the :class:`~adapters.hl7v2.mllp.MllpListener` made of them.

An options model that listens has ``max_message_bytes``, ``idle_timeout_s``,
``frame_timeout_s``, ``tls: TlsOptions | None`` and ``rate_limit: RateOptions | None``
(:class:`ListenerOptions`); its type's ``check`` runs :func:`adapters.base.tls_problems` over
``tls`` so that ``hutong config check`` names a missing certificate file.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from pydantic import BaseModel, ConfigDict, Field

from adapters.hl7v2.mllp import Handlers, Limits, MllpListener, TokenBucket, server_tls

if TYPE_CHECKING:
    from bridge.local.host import AdapterHost


class TlsOptions(BaseModel):
    """``tls = { cert = "...", key = "...", client_ca = "..." }``: the listener's certificate
    and key, and the CA its clients' certificates must chain to (optional), relative to the
    node file."""

    model_config = ConfigDict(extra="forbid")
    cert: str
    key: str
    client_ca: str | None = None


class RateOptions(BaseModel):
    """``rate_limit = { per_second, burst, hold_s }``: a token bucket per listener; a frame over
    it waits up to ``hold_s`` for a token, then gets the adapter's answer for it."""

    model_config = ConfigDict(extra="forbid")
    per_second: float = Field(50.0, gt=0)
    burst: int = Field(200, ge=1)
    hold_s: float = Field(2.0, ge=0)


class ListenerOptions(Protocol):
    """What :func:`open_listener` reads of an adapter's options model."""

    max_message_bytes: int
    idle_timeout_s: float
    frame_timeout_s: float
    tls: TlsOptions | None
    rate_limit: RateOptions | None


def open_listener(
    host: AdapterHost, bind: tuple[str, int], o: ListenerOptions, handlers: Handlers, name: str
) -> MllpListener:
    """The listener on ``bind`` with the options' limits, TLS (files resolved against the node
    file) and rate limit; not started yet."""
    tls = None
    if o.tls is not None:
        tls = server_tls(
            str(host.path(o.tls.cert)),
            str(host.path(o.tls.key)),
            str(host.path(o.tls.client_ca)) if o.tls.client_ca else None,
        )
    rate = o.rate_limit
    return MllpListener(
        bind[0],
        bind[1],
        handlers,
        limits=Limits(
            max_bytes=o.max_message_bytes,
            idle_timeout_s=o.idle_timeout_s,
            frame_timeout_s=o.frame_timeout_s,
        ),
        ssl_context=tls,
        bucket=TokenBucket(rate.per_second, rate.burst) if rate else None,
        hold_s=rate.hold_s if rate else 0.0,
        name=name,
    )
