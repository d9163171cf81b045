"""LIS adapter (``lis-hl7``): HL7 v2 ORU^R01 lab results over MLLP -> FHIR R4 results.

Modules: :mod:`errors` (why a message is refused and which ACK that earns), :mod:`decode`
(bytes -> str, charset from MSH-18 before any parsing), :mod:`fields` (reading fields through
python-hl7), :mod:`vocab` (status/flag/unit tables), :mod:`oru` (one parse, one Bundle),
:mod:`ack` (AA/AE/AR with ERR), :mod:`listener` (MLLP server, TLS, rate limit),
:mod:`adapter` (commit-then-ACK), :mod:`sender` (send ORU files over MLLP, for a LIS that only
exports).
"""

from __future__ import annotations

from typing import Any

from adapters.lis.adapter import LisAdapter


def create(host: Any, options: dict[str, Any]) -> LisAdapter:
    return LisAdapter(host, options)


__all__ = ["LisAdapter", "create"]
