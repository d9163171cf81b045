"""What one audited event says, and how it becomes a FHIR R4 AuditEvent.

Built as a plain dict (no fhir.resources model) because this runs for every packet; the tests
check every action's output with ``fhir.resources.R4B.auditevent.AuditEvent.model_validate``.

Patient data never enters the audit log. ``AuditEntry.patient_hash`` takes only the output of
``bridge.privacy.patient_hash(...)`` (a keyed HMAC, lower-case hex, computed by the caller) and
refuses anything else, so a name or a resident ID number cannot be passed in by mistake.
``message`` is one line for operators: the caller must not put patient data in it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

#: CodeSystem of Hutong audit actions, carried as AuditEvent.subtype
ACTION_SYSTEM = "http://hutong.dev/CodeSystem/audit-action"
#: extension with the chain position (a string: FHIR R4 integers are 32-bit, seq is 64-bit)
SEQ_EXTENSION = "http://hutong.dev/StructureDefinition/audit-seq"
#: extension with the Hutong error code (HT-...), also shown at the start of outcomeDesc
CODE_EXTENSION = "http://hutong.dev/StructureDefinition/audit-error-code"
#: complex extension holding AuditEntry.extra as name/value sub-extensions
EXTRA_EXTENSION = "http://hutong.dev/StructureDefinition/audit-extra"

NODE_SYSTEM = "urn:hutong:node"
ACTOR_SYSTEM = "urn:hutong:actor"
PACKET_SYSTEM = "urn:hutong:packet"
PATIENT_HASH_SYSTEM = "urn:hutong:patient-hash"

DCM = "http://dicom.nema.org/resources/ontology/DCM"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"

#: FHIR AuditEvent.outcome: success, minor failure, serious failure, major failure
OUTCOMES = frozenset({"0", "4", "8", "12"})

#: known actions -> AuditEvent.action (Create/Read/Update/Delete/Execute); others map to "E"
ACTIONS: dict[str, str] = {
    "queued": "C",
    "refused": "E",
    "sent": "E",
    "received": "C",
    "rejected": "E",
    "relayed": "E",
    "delivered": "E",
    "dead-lettered": "U",
    "replayed": "E",
    "purged": "D",
    "config": "U",
    "key": "U",
    "read": "R",
    "checkpoint": "E",
}

#: AuditEvent.agent.role: the Hutong role a person or client acted in
ROLE_SYSTEM = "http://hutong.dev/CodeSystem/role"
#: R4 RESTful interactions (AuditEvent.subtype of a ``rest`` event)
RESTFUL_SYSTEM = "http://hl7.org/fhir/restful-interaction"
_REST_TYPE = {
    "system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
    "code": "rest",
    "display": "RESTful Operation",
}

_TYPE_DEFAULT = {"system": DCM, "code": "110100", "display": "Application Activity"}
_TYPES: dict[str, dict[str, str]] = {
    "read": {"system": DCM, "code": "110112", "display": "Query"},
    "sent": {"system": DCM, "code": "110106", "display": "Export"},
    "received": {"system": DCM, "code": "110107", "display": "Import"},
}

# Codings below the event type carry no display: the resource is stored for every packet, and
# displays alone made it ~25% bigger. Codes are from the FHIR R4 value sets named above.
_SOURCE_TYPES = [{"system": SOURCE_TYPE, "code": "4"}]  # Application Server
_PACKET_TYPE = {"system": ENTITY_TYPE, "code": "2"}  # System Object
_PERSON_TYPE = {"system": ENTITY_TYPE, "code": "1"}  # Person
_PATIENT_ROLE = {"system": OBJECT_ROLE, "code": "1"}  # Patient

_ACTION_RE = re.compile(r"[a-z][a-z0-9-]{0,63}")
_HASH_RE = re.compile(r"[0-9a-f]{32,128}")
_EXTRA_KEY_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")
_SPACE_RE = re.compile(r"[\s\x00-\x1f\x7f]+")
_MAX_TEXT = 256
_MAX_CODE = 64
_MAX_MESSAGE = 500
_INT32 = (-(2**31), 2**31 - 1)


@dataclass(slots=True)
class AuditEntry:
    """One event to append, checked on creation so a caller's mistake raises here (ValueError).

    ``patient_hash`` must be ``bridge.privacy.patient_hash(...)`` output (lower-case hex, 32-128
    chars): a raw name or ID number is refused. Free text (ids, code, message) may come from a
    peer, so it is cleaned to one bounded line instead of refused. ``at`` defaults to now (UTC).
    """

    action: str
    outcome: str = "0"
    packet_id: str | None = None
    kind: str | None = None
    peer: str | None = None
    thread: str | None = None
    patient_hash: str | None = None
    actor: str | None = None
    code: str | None = None
    message: str | None = None
    at: datetime | None = None
    extra: dict[str, Any] | None = None
    #: who acted, beyond ``actor``: the role they acted in and the network address they came
    #: from (AuditEvent.agent.role / agent.network); set for people and API clients
    actor_role: str | None = None
    address: str | None = None
    #: a FHIR RESTful interaction (read, search-type, ...): the event is then typed ``rest``
    #: with this subtype as well, as R4 asks of a RESTful read or query
    interaction: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.action, str) or not _ACTION_RE.fullmatch(self.action):
            raise ValueError(f"audit action must be a lower-case token, got {self.action!r}")
        if self.outcome not in OUTCOMES:
            raise ValueError(f"audit outcome must be one of 0/4/8/12, got {self.outcome!r}")
        if self.patient_hash is not None and not (
            isinstance(self.patient_hash, str) and _HASH_RE.fullmatch(self.patient_hash)
        ):
            # deliberately does not echo the value: it may be the very patient data we refuse
            raise ValueError("patient_hash must be bridge.privacy.patient_hash() hex output")
        # these may come from a refused packet's header or a peer's receipt: made safe, not refused
        self.packet_id = _one_line("packet_id", self.packet_id, _MAX_TEXT)
        self.kind = _one_line("kind", self.kind, _MAX_TEXT)
        self.peer = _one_line("peer", self.peer, _MAX_TEXT)
        self.thread = _one_line("thread", self.thread, _MAX_TEXT)
        self.actor = _one_line("actor", self.actor, _MAX_TEXT)
        self.code = _one_line("code", self.code, _MAX_CODE)
        self.message = _one_line("message", self.message, _MAX_MESSAGE)
        self.actor_role = _one_line("actor_role", self.actor_role, _MAX_CODE)
        self.address = _one_line("address", self.address, _MAX_CODE)
        self.interaction = _one_line("interaction", self.interaction, _MAX_CODE)
        if self.at is None:
            self.at = datetime.now(UTC)
        elif self.at.tzinfo is None or self.at.utcoffset() is None:
            raise ValueError("audit time must be timezone-aware")
        else:
            self.at = self.at.astimezone(UTC)
        if self.extra:
            for key, value in self.extra.items():
                if not isinstance(key, str) or not _EXTRA_KEY_RE.fullmatch(key):
                    raise ValueError(f"audit extra key must be a simple name, got {key!r}")
                if value is not None and not isinstance(value, str | int | float | bool):
                    raise ValueError(f"audit extra {key!r} must be str, int, float or bool")


def _one_line(name: str, value: str | None, limit: int) -> str | None:
    """A valid FHIR string: control chars and runs of whitespace become one space, cut to
    ``limit``; empty becomes None. Peer-sent junk must not stop the audit write."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"audit {name} must be a string")  # callers catch ValueError
    if len(value) <= limit and value.isprintable() and value == value.strip():
        return value or None  # fast path: the usual case
    return _SPACE_RE.sub(" ", value).strip()[:limit].rstrip() or None


def instant(at: datetime) -> str:
    """FHIR instant in UTC with microseconds; also the form signed in checkpoints, so stable."""
    if at.tzinfo is None:  # read back from SQLite, which keeps no offset: stored as UTC
        return at.isoformat(timespec="microseconds") + "Z"
    if at.tzinfo is not UTC:
        at = at.astimezone(UTC)
    return at.isoformat(timespec="microseconds")[:-6] + "Z"  # drop "+00:00"


def _extra_extension(extra: dict[str, Any]) -> dict[str, Any] | None:
    parts: list[dict[str, Any]] = []
    for key in sorted(extra):
        value = extra[key]
        if value is None:
            continue
        if isinstance(value, bool):
            parts.append({"url": key, "valueBoolean": value})
        elif isinstance(value, int) and _INT32[0] <= value <= _INT32[1]:
            parts.append({"url": key, "valueInteger": value})
        elif isinstance(value, float) and math.isfinite(value):
            parts.append({"url": key, "valueDecimal": value})
        elif text := _one_line(key, str(value), _MAX_TEXT):
            parts.append({"url": key, "valueString": text})
    return {"url": EXTRA_EXTENSION, "extension": parts} if parts else None


def to_audit_event(entry: AuditEntry, node_id: str, seq: int) -> dict[str, Any]:
    """The FHIR R4 AuditEvent for ``entry`` as the ``seq``-th record of ``node_id``'s log."""
    assert entry.at is not None  # set by __post_init__
    extensions: list[dict[str, Any]] = [{"url": SEQ_EXTENSION, "valueString": str(seq)}]
    if entry.code:
        extensions.append({"url": CODE_EXTENSION, "valueCode": entry.code})
    if entry.extra and (extra := _extra_extension(entry.extra)):
        extensions.append(extra)

    node = {"system": NODE_SYSTEM, "value": node_id}
    agents: list[dict[str, Any]] = [{"who": {"identifier": node}, "requestor": True}]
    if entry.actor:
        person: dict[str, Any] = {
            "who": {"identifier": {"system": ACTOR_SYSTEM, "value": entry.actor}},
            "requestor": True,
        }
        if entry.actor_role:
            person["role"] = [{"coding": [{"system": ROLE_SYSTEM, "code": entry.actor_role}]}]
        if entry.address:
            person["network"] = {"address": entry.address, "type": "2"}  # IP address
        agents.append(person)

    subtype = [{"system": ACTION_SYSTEM, "code": entry.action}]
    if entry.interaction:
        subtype.append({"system": RESTFUL_SYSTEM, "code": entry.interaction})
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "extension": extensions,
        "type": _REST_TYPE if entry.interaction else _TYPES.get(entry.action, _TYPE_DEFAULT),
        "subtype": subtype,
        "action": ACTIONS.get(entry.action, "E"),
        "recorded": instant(entry.at),
        "outcome": entry.outcome,
        "agent": agents,
        "source": {"observer": {"identifier": node}, "type": _SOURCE_TYPES},
    }
    if entry.code and entry.message:
        event["outcomeDesc"] = f"{entry.code}: {entry.message}"
    elif entry.code or entry.message:
        event["outcomeDesc"] = entry.code or entry.message

    entities: list[dict[str, Any]] = []
    details = [
        {"type": name, "valueString": value}
        for name, value in (("kind", entry.kind), ("thread", entry.thread), ("peer", entry.peer))
        if value
    ]
    if entry.packet_id or details:
        packet: dict[str, Any] = {"type": _PACKET_TYPE}
        if entry.packet_id:
            packet["what"] = {"identifier": {"system": PACKET_SYSTEM, "value": entry.packet_id}}
        if details:
            packet["detail"] = details
        entities.append(packet)
    if entry.patient_hash:
        entities.append(
            {
                "what": {
                    "identifier": {"system": PATIENT_HASH_SYSTEM, "value": entry.patient_hash}
                },
                "type": _PERSON_TYPE,
                "role": _PATIENT_ROLE,
            }
        )
    if entities:
        event["entity"] = entities
    return event


def event_fields(event: dict[str, Any]) -> dict[str, Any]:
    """The searchable fields an AuditEvent built by ``to_audit_event`` carries, read back.

    Used by verify (the indexed columns must agree with the hashed JSON) and by export.
    Keys: seq, at (the ``recorded`` string), action, outcome, packet_id, kind, peer, thread,
    patient_hash, actor, code, message; missing ones are None.
    """
    out: dict[str, Any] = dict.fromkeys(
        (
            "seq",
            "action",
            "packet_id",
            "kind",
            "peer",
            "thread",
            "patient_hash",
            "actor",
            "code",
            "message",
        )
    )
    out["at"] = event.get("recorded")
    out["outcome"] = event.get("outcome")
    for ext in event.get("extension", ()):
        if ext.get("url") == SEQ_EXTENSION:
            seq = ext.get("valueString")
            out["seq"] = int(seq) if isinstance(seq, str) and seq.isdigit() else None
        elif ext.get("url") == CODE_EXTENSION:
            out["code"] = ext.get("valueCode")
    for coding in event.get("subtype", ()):
        if coding.get("system") == ACTION_SYSTEM:
            out["action"] = coding.get("code")
    for agent in event.get("agent", ()):
        ident = agent.get("who", {}).get("identifier", {})
        if ident.get("system") == ACTOR_SYSTEM:
            out["actor"] = ident.get("value")
    for entity in event.get("entity", ()):
        ident = entity.get("what", {}).get("identifier", {})
        if ident.get("system") == PATIENT_HASH_SYSTEM:
            out["patient_hash"] = ident.get("value")
        elif entity.get("type", {}).get("code") == _PACKET_TYPE["code"]:
            if ident.get("system") == PACKET_SYSTEM:
                out["packet_id"] = ident.get("value")
            for detail in entity.get("detail", ()):
                if detail.get("type") in ("kind", "thread", "peer"):
                    out[detail["type"]] = detail.get("valueString")
    desc = event.get("outcomeDesc")
    if desc is not None:
        prefix = f"{out['code']}: " if out["code"] else None
        if prefix and desc.startswith(prefix):
            out["message"] = desc[len(prefix) :]
        elif desc != out["code"]:
            out["message"] = desc
    return out


def who_fields(event: dict[str, Any]) -> dict[str, Any]:
    """What ``event_fields`` leaves out about the person: ``actor_role``, ``address``,
    ``interaction`` (the RESTful subtype), ``shown`` (the page or query) and ``resources``
    (the ``Type/id`` list shown)."""
    out: dict[str, Any] = dict.fromkeys(
        ("actor_role", "address", "interaction", "shown", "resources")
    )
    for coding in event.get("subtype", ()):
        if coding.get("system") == RESTFUL_SYSTEM:
            out["interaction"] = coding.get("code")
    for agent in event.get("agent", ()):
        if agent.get("who", {}).get("identifier", {}).get("system") != ACTOR_SYSTEM:
            continue
        for role in agent.get("role", ()):
            for coding in role.get("coding", ()):
                if coding.get("system") == ROLE_SYSTEM:
                    out["actor_role"] = coding.get("code")
        out["address"] = (agent.get("network") or {}).get("address")
    for ext in event.get("extension", ()):
        if ext.get("url") == EXTRA_EXTENSION:
            parts = {p.get("url"): p for p in ext.get("extension", ())}
            for key in ("query", "shown"):  # the page or API query, or what was opened
                if key in parts:
                    out["shown"] = parts[key].get("valueString")
            if "resources" in parts:
                out["resources"] = parts["resources"].get("valueString")
    return out
