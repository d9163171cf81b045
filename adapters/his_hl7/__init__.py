"""HL7 v2 over MLLP HIS adapter (``type = "his-hl7"``): REF^I12 / REF^I14 (cancel) / RRI^I12 /
ADT <-> referrals, and lab results from other members (``result.lab``) -> ORU^R01 into the HIS.

Modules: :mod:`.adapter` (options, life cycle), :mod:`.inbound` (HIS -> node),
:mod:`.adt` (ADT -> Patient + Encounter through ``host.record_encounter``),
:mod:`.outbound` (node -> HIS), :mod:`.messages` (HL7 <-> slips, the interface sheet),
:mod:`.results` (result.lab -> ORU^R01 v2.5.1),
:mod:`.v2` (this adapter's binding of the shared HL7 v2 kit :mod:`adapters.hl7v2`, which
does charsets, parsing, escapes, dates, ACKs and MLLP for it), :mod:`.state` (the adapter's own
SQLite file), :mod:`.errors`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from adapters.his_hl7.adapter import HisHl7Adapter
    from bridge.local.host import AdapterHost


def create(host: AdapterHost, options: dict[str, Any]) -> HisHl7Adapter:
    from adapters.his_hl7.adapter import HisHl7Adapter

    return HisHl7Adapter(host, options)
