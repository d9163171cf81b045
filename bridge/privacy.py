"""Keyed patient hashes: the only form in which a patient appears in audit rows and headers.

A national ID number (18 characters, MOD 11-2 check digit) has so few possible values that a plain
digest is reversed by enumeration in seconds, so the hash is an HMAC under an alliance-held key.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

NATIONAL_ID_SYSTEM = "urn:oid:2.16.156.10011.1.3"


def normalise_national_id(value: str) -> str:
    return value.strip().upper().replace(" ", "")


def patient_hash(key: bytes, national_id: str) -> str:
    """HMAC-SHA256 of the normalised ID number, hex, truncated to 32 chars (128 bits)."""
    digest = hmac.new(key, normalise_national_id(national_id).encode(), hashlib.sha256)
    return digest.hexdigest()[:32]


def national_id_in(bundle: dict[str, Any], system: str = NATIONAL_ID_SYSTEM) -> str | None:
    """The first Patient's national ID number in a Bundle, if it carries one."""
    for entry in bundle.get("entry") or ():
        resource = entry.get("resource") or {}
        if resource.get("resourceType") != "Patient":
            continue
        for ident in resource.get("identifier") or ():
            if ident.get("system") == system and ident.get("value"):
                return str(ident["value"])
    return None


def bundle_patient_hash(
    key: bytes, bundle: dict[str, Any], system: str = NATIONAL_ID_SYSTEM
) -> str | None:
    """The keyed hash for the bundle's patient, or a hash already carried as an identifier."""
    found = national_id_in(bundle, system)
    if found:
        return patient_hash(key, found)
    for entry in bundle.get("entry") or ():
        resource = entry.get("resource") or {}
        if resource.get("resourceType") != "Patient":
            continue
        for ident in resource.get("identifier") or ():
            if ident.get("system") == "urn:hutong:patient-hash" and ident.get("value"):
                return str(ident["value"])
    return None
