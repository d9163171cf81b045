"""How a thread's patient is named in the packets of that thread (referral, consultation, results).

Each node keeps its own Patient record; two nodes' ids for one patient differ, and a core hospital
that several centres refer the same patient to keeps ONE record for all their threads. So a packet
names the patient the way the *other party of its thread* knows her:

* the side that opened the thread (referrer, inviter) sent its own Patient in the request: its
  record's id is the thread's name for her, and its Patient travels in full (hashed ID number, no
  other member's record number);
* the other side (receiver, centre) remembered that id when the request arrived
  (``peer_patient``) and names her by it, with a hash-only Patient under that id: it never shows
  its own id (which may be another member's) nor anything another member told it about her;
  a thread from before ``peer_patient`` names her by the hash only (``hash_subject``).

An arriving packet is mapped the other way (:func:`incoming`): every Patient reference, and a
hash-only subject with the thread's hash, becomes this node's own record; Patient resources are
dropped (this node's record stays as it is). A thread is about one patient, so a reference to any
other Patient id is mapped too, rather than failing or pointing at another record here.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from bridge.referral import resources as R
from bridge.referral.codes import PATIENT_HASH_SYSTEM

Resource = dict[str, Any]
MRN_PREFIX = "urn:hutong:mrn:"
_PATIENT_REF = re.compile(r"Patient/[A-Za-z0-9\-.]{1,64}")  # an R4 id: fits peer_patient


def peer_ref(carried: Iterable[Resource]) -> str | None:
    """The sender's Patient reference in a request (None: none, or not an R4 id: the thread
    then names the patient by the hash only)."""
    for r in carried:
        if r.get("resourceType") == "Patient":
            ref = f"Patient/{r.get('id')}"
            return ref if _PATIENT_REF.fullmatch(ref) else None
    return None


@dataclass(frozen=True, slots=True)
class ThreadPatient:
    """A thread's patient on this node: its record and the name the other party knows."""

    mine: str  # "Patient/<id>": this node's record
    wire: str | None  # "Patient/<id>" as the other party knows her; None: by the hash only
    phash: str | None  # the keyed patient hash
    opener: bool  # this node opened the thread: its record is the one the other party got


def of_row(row: Any, mine: str, *, opener: bool) -> ThreadPatient:
    """The naming for a referral or consultation row (``peer_patient`` on the other side)."""
    wire = mine if opener else getattr(row, "peer_patient", None)
    return ThreadPatient(mine=mine, wire=wire, phash=row.patient_hash, opener=opener)


def hash_subject(phash: str | None) -> dict[str, Any]:
    """A Reference naming a patient by the keyed hash only (no id of any node)."""
    if phash:
        return {"type": "Patient", "identifier": {"system": PATIENT_HASH_SYSTEM, "value": phash}}
    return {"type": "Patient", "display": "unknown patient"}


def _is_patient_ref(d: dict[str, Any]) -> bool:
    value = d.get("reference")
    return isinstance(value, str) and value.startswith("Patient/")


def _is_hash_ref(d: dict[str, Any], phash: str | None) -> bool:
    ident = d.get("identifier")
    return (
        "reference" not in d
        and isinstance(ident, dict)
        and ident.get("system") == PATIENT_HASH_SYSTEM
        and (phash is None or ident.get("value") == phash)
    )


def _rename(obj: Any, to: Any) -> Any:
    """Every Patient reference in ``obj`` replaced by ``to(reference dict)``."""
    if isinstance(obj, dict):
        if _is_patient_ref(obj):
            return to(obj)
        return {k: _rename(v, to) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rename(v, to) for v in obj]
    return obj


def wire_patient(
    tp: ThreadPatient,
    patient: Resource,
    *,
    me: str,
    peer: str,
    members: Iterable[str],
    national_id_system: str,
) -> Resource | None:
    """The Patient a packet to ``peer`` carries, or None (named by the hash only)."""
    if tp.wire is None:
        return None
    wire_id = tp.wire.split("/", 1)[1]
    if not tp.opener:
        out: Resource = {"resourceType": "Patient", "id": wire_id}
        if tp.phash:
            out["identifier"] = [{"system": PATIENT_HASH_SYSTEM, "value": tp.phash}]
        return out
    others = {f"{MRN_PREFIX}{m}" for m in members if m not in (me, peer)}
    out = R.for_the_wire(patient, tp.phash, national_id_system)
    out["id"] = wire_id
    out["identifier"] = [i for i in out.get("identifier") or [] if i.get("system") not in others]
    out.pop("link", None)  # links name other records of this node
    # who else cares for her is not the other party's to learn (this node itself may say so)
    out.pop("generalPractitioner", None)
    if (out.get("managingOrganization") or {}).get("reference") != f"Organization/{me}":
        out.pop("managingOrganization", None)
    return _rename(out, lambda d: {**d, "reference": tp.wire})  # type: ignore[no-any-return]


def outgoing(
    tp: ThreadPatient,
    resources: Iterable[Resource],
    *,
    me: str,
    peer: str,
    members: Iterable[str],
    national_id_system: str,
    patient: Resource | None = None,
) -> list[Resource]:
    """``resources`` (no Patient among them) as they leave on the thread, naming the patient
    the other party's way; ``patient`` (this node's record): carried as :func:`wire_patient`."""

    def to(d: dict[str, Any]) -> dict[str, Any]:
        if tp.wire is not None:
            return {**d, "reference": tp.wire}
        return {
            **{k: v for k, v in d.items() if k not in ("reference", "display")},
            **hash_subject(tp.phash),
        }

    out = [_rename(r, to) for r in resources if r.get("resourceType") != "Patient"]
    if patient is not None:
        carried = wire_patient(
            tp, patient, me=me, peer=peer, members=members, national_id_system=national_id_system
        )
        if carried is not None:
            out.append(carried)
    return out


def incoming(mine: str, phash: str | None, resources: Iterable[Resource]) -> list[Resource]:
    """Resources that arrived on the thread, naming this node's own record of the patient;
    Patient resources left out (this node's record stays as it is)."""

    def walk(obj: Any) -> Any:
        if isinstance(obj, dict):
            if _is_patient_ref(obj) or _is_hash_ref(obj, phash):
                kept = {
                    k: v
                    for k, v in obj.items()
                    if k not in ("reference", "identifier", "type", "display")
                }
                return {**kept, "reference": mine}
            return {k: walk(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [walk(v) for v in obj]
        return obj

    return [walk(copy.deepcopy(r)) for r in resources if r.get("resourceType") != "Patient"]
