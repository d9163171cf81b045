"""HL7 v2 over MLLP HIS adapter (``type = "his-hl7"``): REF^I12 / REF^I14 (cancel) / RRI^I12 /
ADT <-> referrals, and lab and imaging results from other members (``result.lab``,
``result.imaging``) -> ORU^R01 into the HIS.

Modules: :mod:`.adapter` (options, life cycle), :mod:`.inbound` (HIS -> node),
:mod:`.adt` (ADT -> Patient + Encounter through ``host.record_encounter``),
:mod:`.outbound` (node -> HIS), :mod:`.messages` (HL7 <-> slips, the interface sheet),
:mod:`.results` (result.lab, result.imaging -> ORU^R01 v2.5.1),
:mod:`.v2` (this adapter's binding of the shared HL7 v2 kit :mod:`adapters.hl7v2`, which
does charsets, parsing, escapes, dates, ACKs and MLLP for it), :mod:`.state` (what it
remembers, in the node's database through ``host.state``), :mod:`.errors`. :data:`create` is
the type's declaration to the engine (entry point ``his-hl7``).
"""

from __future__ import annotations

from adapters.base import tls_problems
from adapters.his_hl7.adapter import HisHl7Adapter, Options
from adapters.hl7v2.mllp import split_addr
from bridge.local.contract import AdapterType

create = AdapterType(
    name="his-hl7",
    options=Options,
    build=HisHl7Adapter,
    listens=lambda o: [split_addr(o.listen)],
    check=lambda o, settings: tls_problems(o.tls, settings),
    example={"listen": "127.0.0.1:0", "his": "127.0.0.1:9"},
)
