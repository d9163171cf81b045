"""LIS adapter (``lis-hl7``): HL7 v2 ORU^R01 lab results over MLLP -> FHIR R4 results.

Modules: :mod:`errors` (why a message is refused and which ACK that earns), :mod:`intake`
(bytes -> checked message), :mod:`vocab` (status/flag/unit tables), :mod:`oru` (one parse, one
Bundle), :mod:`adapter` (commit-then-ACK), :mod:`sender` (send ORU files over MLLP, for a LIS
that only exports). Charsets, field readers, ACKs and the MLLP listener (frame limit, timeouts,
TLS, rate limit) are the shared HL7 v2 kit's, :mod:`adapters.hl7v2`. :data:`create` is the
type's declaration to the engine (entry point ``lis-hl7``).
"""

from __future__ import annotations

from adapters.base import tls_problems
from adapters.lis.adapter import LisAdapter, LisOptions
from bridge.local.contract import AdapterType

create = AdapterType(
    name="lis-hl7",
    options=LisOptions,
    build=LisAdapter,
    listens=lambda o: [(o.host, o.port)],
    check=lambda o, settings: tls_problems(o.tls, settings),
    example={"port": 0},
)

__all__ = ["LisAdapter", "create"]
