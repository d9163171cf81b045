"""One ORU^R01 (v2.1 to v2.8) -> one FHIR R4 collection Bundle of lab results.

Per OBR group: a ``DiagnosticReport`` (OBR-4 code, OBR-25 status, OBR-7 collection time, OBR-22
issued, NTE after the OBR as its conclusion), a ``Specimen`` (SPM in v2.5+, else OBR-15/OBR-14),
and one ``Observation`` per OBX (OBX-2 value type -> value[x], OBX-6 unit as UCUM where known,
OBX-7 reference range, OBX-8 abnormal flags, OBX-11 status, OBX-14 time, OBX-23/OBX-15 performing
lab, NTE after the OBX as notes). The patient comes from PID (PID-3 MRN and national ID number,
PID-5, PID-7, PID-8) and is the only patient of the message.

Identity: ids are UUIDv5 of (sending facility, filler order number OBR-3, OBX-3 code, OBX-4
sub-id), so a corrected result (OBX-11 = C) sent later gets the *same* Observation id and
updates it in place; re-numbered OBX set ids do not matter. Local test codes are mapped to LOINC
through the site's ConceptMap (map ``lab``); an unmapped code keeps its local system and is
listed in :attr:`Results.unmapped` (and the resource is tagged, see ``bridge.mapping.marker``).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from adapters.hl7v2 import fields as v2
from adapters.hl7v2.charset import UTF8, Charset
from adapters.hl7v2.fields import Message, fhir_datetime, rep_values, reps, value, where
from adapters.lis import vocab
from adapters.lis.errors import (
    BadField,
    MissingField,
    Rejected,
    UnsupportedMessage,
    kit_errors,
)
from bridge.mapping import mark_unmapped
from bridge.privacy import normalise_national_id, patient_hash

#: HL7 versions read (the kit's: 2.1 to 2.8; ORU^R01 differs between them field by field)
SUPPORTED_VERSIONS = frozenset(v2.VERSIONS)
#: PID-3 identifier types (CX.5) that mean the resident ID card number
NATIONAL_ID_TYPES = frozenset({"NI", "NNCHN", "PRC", "RI"})
_NS = uuid.UUID("6b1c4c8e-2f7e-5d7a-9b63-4c1f3e0a9d21")
_NUMBER = re.compile(r"^([<>]=?)?\s*([+-]?(?:\d+\.?\d*|\.\d+))$")
_RANGE = re.compile(r"^\s*([+-]?\d+(?:\.\d+)?)\s*(?:-|~|－|—|–)\s*([+-]?\d+(?:\.\d+)?)\s*$")
_BOUND = re.compile(r"^\s*(<=|>=|<|>|≤|≥)\s*([+-]?\d+(?:\.\d+)?)\s*$")


@dataclass(frozen=True)
class Header:
    sending_app: str
    facility: str  # MSH-4 (HD.1), or MSH-3 when MSH-4 is empty
    control_id: str  # MSH-10
    version: str  # MSH-12
    message_type: str  # MSH-9 as "ORU^R01"

    @property
    def source_key(self) -> str:
        """Same MSH-10 from the same sender = the same message (the exactly-once key)."""
        return f"{self.sending_app}|{self.facility}|{self.control_id}"[:200]


@dataclass
class Settings:
    node_id: str
    hash_key: bytes
    national_id_system: str
    local_system: str  # the LIS's own test-code system URI
    translator: Any = None  # bridge.mapping.Translator or None (no site maps)
    map_id: str = "lab"
    mrn_system: str = ""
    default_zone: str = "+0800"


@dataclass
class Results:
    bundle: dict[str, Any]
    patient_hash: str | None
    reports: list[str] = field(default_factory=list)  # DiagnosticReport ids
    observations: int = 0
    unmapped: list[dict[str, str]] = field(default_factory=list)  # local codings not mapped
    units_not_ucum: list[str] = field(default_factory=list)
    corrected: int = 0


@kit_errors
def parse(text: str, charset: Charset = UTF8) -> Message:
    """The kit's parse (MSH-1/MSH-2 checked); anything it cannot make sense of is an AR."""
    return v2.parse(text, charset)


@kit_errors
def header(msg: Message) -> Header:
    """MSH fields, checked: ORU^R01, version 2.1-2.8 (the kit's), MSH-10 present."""
    msh = msg.segment("MSH")
    version = v2.header(msg).version
    mtype = f"{value(msh, 9, 1)}^{value(msh, 9, 2)}"
    if mtype != "ORU^R01":
        raise UnsupportedMessage(f"message type {mtype} is not ORU^R01", field="MSH-9")
    control = value(msh, 10)
    if not control:
        raise MissingField("message control id is empty", field="MSH-10")
    app = value(msh, 3)
    facility = value(msh, 4) or app
    if not facility:
        raise MissingField("sending facility and application are empty", field="MSH-4")
    return Header(app, facility, control, version, mtype)


def _id(*parts: str) -> str:
    return str(uuid.uuid5(_NS, "|".join(parts)))


def _num(text: str) -> int | float:
    return float(text) if any(c in text for c in ".eE") else int(text)


class _Builder:
    def __init__(self, msg: Message, head: Header, cfg: Settings) -> None:
        self.msg = msg
        self.head = head
        self.cfg = cfg
        self.out = Results(bundle={}, patient_hash=None)
        self.resources: list[dict[str, Any]] = []
        self.orgs: dict[str, dict[str, Any]] = {}
        self._unit_of: Any = None
        self._unit_cache: tuple[str, str, str] = ("", "", "")

    # -- coded values -----------------------------------------------------------------------

    def concept(self, seg: Any, f: int, at: str, *, mapped: bool = True,
                rep: int = 1) -> tuple[dict[str, Any], bool]:
        """(CodeableConcept, unmapped) for a CE/CWE field: local code -> LOINC via the map."""
        code, text, system = (value(seg, f, c, rep) for c in (1, 2, 3))
        alt_code, alt_text, alt_system = (value(seg, f, c, rep) for c in (4, 5, 6))
        if not code and not text:
            raise MissingField("code is empty", field=at)
        codings: list[dict[str, Any]] = []
        unmapped = False
        uri = vocab.CODE_SYSTEMS.get(system.upper())
        if code and uri:
            codings.append({"system": uri, "code": code, **({"display": text} if text else {})})
        elif code:
            local = {"system": self.cfg.local_system, "code": code,
                     **({"display": text} if text else {})}
            if mapped and self.cfg.translator is not None:
                from bridge.mapping import map_coding

                codings, unmapped = map_coding(self.cfg.translator, self.cfg.map_id, local)
            else:
                codings, unmapped = [local], mapped
        alt_uri = vocab.CODE_SYSTEMS.get(alt_system.upper())
        if alt_code and alt_uri and not any(c["system"] == alt_uri and c["code"] == alt_code
                                            for c in codings):
            codings.insert(0, {"system": alt_uri, "code": alt_code,
                               **({"display": alt_text} if alt_text else {})})
            unmapped = unmapped and alt_uri != vocab.LOINC
        if unmapped and code and not any(u["code"] == code for u in self.out.unmapped):
            self.out.unmapped.append({"system": self.cfg.local_system, "code": code,
                                      "display": text})
        cc: dict[str, Any] = {"coding": codings} if codings else {}
        if text or not codings:
            cc["text"] = text or code
        return cc, unmapped

    def organization(self, name: str, ident: str = "") -> dict[str, str]:
        key = ident or name
        if key not in self.orgs:
            org: dict[str, Any] = {"resourceType": "Organization",
                                   "id": _id("org", self.head.facility, key), "name": name}
            if ident:
                org["identifier"] = [{"system": f"urn:hutong:lab:{self.cfg.node_id}",
                                      "value": ident}]
            self.orgs[key] = org
        elif ident and self.orgs[key]["name"] == key and name != key:
            self.orgs[key]["name"] = name  # the facility id seen first, its lab's name now
            self.orgs[key]["identifier"] = [{"system": f"urn:hutong:lab:{self.cfg.node_id}",
                                             "value": ident}]
        return {"reference": f"Organization/{self.orgs[key]['id']}"}

    # -- patient ----------------------------------------------------------------------------

    def patient(self, pid: Any) -> dict[str, Any]:
        idents: list[dict[str, Any]] = []
        national = None
        for r in range(1, reps(pid, 3) + 1):
            ident, authority, kind = value(pid, 3, 1, r), value(pid, 3, 4, r), value(pid, 3, 5, r)
            if not ident:
                continue
            is_national = kind.upper() in NATIONAL_ID_TYPES or authority in (
                self.cfg.national_id_system, self.cfg.national_id_system.removeprefix("urn:oid:"))
            if is_national:
                national = normalise_national_id(ident)
                idents.append({"system": self.cfg.national_id_system, "value": national})
            else:
                idents.append({"type": {"coding": [{"system": vocab.V2_0203,
                                                    "code": kind or "MR"}]},
                               "system": self.cfg.mrn_system or
                               f"urn:hutong:mrn:{self.cfg.node_id}", "value": ident})
        if not idents:
            raise MissingField("no patient identifier", field="PID-3")
        phash = patient_hash(self.cfg.hash_key, national) if national else None
        self.out.patient_hash = phash
        first = idents[0]["value"] if phash is None else phash
        p: dict[str, Any] = {"resourceType": "Patient", "id": _id("patient", phash or first),
                             "identifier": idents}
        family, given = value(pid, 5, 1), value(pid, 5, 2)
        if family or given:
            name: dict[str, Any] = {"text": f"{family}{given}"}
            if family:
                name["family"] = family
            if given:
                name["given"] = [given]
            p["name"] = [name]
        gender = {"M": "male", "F": "female", "O": "other", "U": "unknown", "A": "other",
                  "N": "unknown"}.get(value(pid, 8).upper())
        if gender:
            p["gender"] = gender
        born = fhir_datetime(value(pid, 7), "PID-7", self.cfg.default_zone)
        if born:
            p["birthDate"] = born[:10]
        return p

    # -- values -----------------------------------------------------------------------------

    def quantity(self, number: str, obx: Any, at: str, comparator: str = "") -> dict[str, Any]:
        q: dict[str, Any] = {"value": _num(number)}
        if comparator:
            q["comparator"] = comparator
        unit_code, unit_text, unit_system = self._unit(obx)
        printed = unit_text or unit_code
        if printed:
            q["unit"] = printed
            code = vocab.ucum(unit_code, unit_text, unit_system)
            if code:
                q["system"] = vocab.UCUM
                q["code"] = code
            elif printed not in self.out.units_not_ucum:
                self.out.units_not_ucum.append(printed)
        return q

    def _unit(self, obx: Any) -> tuple[str, str, str]:
        """OBX-6 (code, text, system), read once per OBX (value and range share it)."""
        if self._unit_of is not obx:
            self._unit_cache = (value(obx, 6, 1), value(obx, 6, 2), value(obx, 6, 3))
            self._unit_of = obx
        return self._unit_cache

    def obx_value(self, obx: Any, n: int, vtype: str) -> dict[str, Any]:
        at = where("OBX", n, 5)
        count = reps(obx, 5)
        if count == 0:
            return {}
        if vtype in ("NM", "SN") and count > 1:
            raise BadField(f"value type {vtype} does not repeat", field=at)
        if vtype == "NM":
            m = _NUMBER.match(value(obx, 5))
            if m is None:
                raise BadField("value type NM but the value is not a number", field=at)
            return {"valueQuantity": self.quantity(m.group(2), obx, at, m.group(1) or "")}
        if vtype == "SN":
            comp, n1, sep, n2 = (value(obx, 5, c) for c in (1, 2, 3, 4))
            for text in (n1, n2):
                if text and not _NUMBER.match(text.lstrip("<>=")):
                    raise BadField("structured numeric part is not a number", field=at)
            if comp not in ("", "=", "<", ">", "<=", ">="):
                raise BadField(f"structured numeric comparator {comp!r} is not supported",
                               field=at)
            if not sep and n1:
                return {"valueQuantity": self.quantity(n1, obx, at, "" if comp == "=" else comp)}
            if sep == "-" and n1 and n2:
                return {"valueRange": {"low": self.quantity(n1, obx, at),
                                       "high": self.quantity(n2, obx, at)}}
            if sep in (":", "/") and n1 and n2:
                return {"valueRatio": {"numerator": {"value": _num(n1)},
                                       "denominator": {"value": _num(n2)}}}
            if sep == "+" and n1 and not n2:
                return {"valueString": f"{n1}+"}
            raise BadField("structured numeric value is incomplete", field=at)
        if vtype in ("ST", "TX", "FT"):
            return {"valueString": "\n".join(value(obx, 5, 1, r) for r in range(1, count + 1))}
        if vtype in ("CE", "CWE", "CNE", "CF"):
            cc, _ = self.concept(obx, 5, at, mapped=False)
            return {"valueCodeableConcept": cc}
        if vtype in ("TS", "DT", "DTM"):
            return {"valueDateTime": fhir_datetime(value(obx, 5), at, self.cfg.default_zone)}
        if vtype == "TM":
            t = value(obx, 5)
            if not re.fullmatch(r"\d{2}(\d{2}(\d{2})?)?", t):
                raise BadField("value type TM but not HHMM[SS]", field=at)
            t = t.ljust(6, "0")
            return {"valueTime": f"{t[:2]}:{t[2:4]}:{t[4:6]}"}
        raise BadField(f"value type {vtype!r} is not supported", field=where("OBX", n, 2))

    def reference_range(self, obx: Any, at: str) -> list[dict[str, Any]]:
        text = value(obx, 7)
        if not text:
            return []
        rr: dict[str, Any] = {}
        m = _RANGE.match(text)
        b = _BOUND.match(text)
        if m:
            rr["low"] = self._simple(m.group(1), obx, at)
            rr["high"] = self._simple(m.group(2), obx, at)
        elif b:
            side = "high" if b.group(1) in ("<", "<=", "≤") else "low"
            rr[side] = self._simple(b.group(2), obx, at)
        rr["text"] = text
        return [rr]

    def _simple(self, number: str, obx: Any, at: str) -> dict[str, Any]:
        return self.quantity(number, obx, at)

    def interpretation(self, obx: Any) -> list[dict[str, Any]]:
        out = []
        for flag in rep_values(obx, 8):
            if flag in vocab.V3_FLAGS:
                coding = {"system": vocab.V3_INTERPRETATION, "code": flag,
                          "display": vocab.V3_FLAGS[flag]}
            else:
                coding = {"system": vocab.V2_0078, "code": flag}
            out.append({"coding": [coding]})
        return out

    # -- groups -----------------------------------------------------------------------------

    def build(self) -> Results:
        segments = list(self.msg)
        pids = [s for s in segments if str(s[0]) == "PID"]
        if not pids:
            raise Rejected("no PID segment", field="PID")
        if len(pids) > 1:
            raise Rejected("one patient per message is supported (more than one PID)",
                           field="PID")
        patient = self.patient(pids[0])
        subject = {"reference": f"Patient/{patient['id']}"}
        groups: list[dict[str, Any]] = []
        current: dict[str, Any] | None = None
        last: dict[str, Any] | None = None  # the resource an NTE belongs to
        seen_obr = 0
        for seg in segments:
            name = str(seg[0])
            if name == "OBR":
                seen_obr += 1
                current = {"obr": seg, "n": seen_obr, "obx": [], "spm": None, "notes": []}
                groups.append(current)
                last = current
            elif name == "OBX":
                if current is None:
                    raise Rejected("OBX before any OBR", field="OBX")
                entry = {"obx": seg, "n": sum(len(g["obx"]) for g in groups) + 1, "notes": []}
                current["obx"].append(entry)
                last = entry
            elif name == "NTE" and last is not None:
                text = "\n".join(value(seg, 3, 1, r) for r in range(1, reps(seg, 3) + 1))
                if text:
                    last["notes"].append(text)
            elif name == "SPM" and current is not None:
                current["spm"] = seg
        if not groups:
            raise Rejected("no OBR segment", field="OBR")
        resources: list[dict[str, Any]] = [patient]
        for g in groups:
            resources.extend(self.group(g, subject))
        resources.extend(self.orgs.values())
        names = {f"Organization/{o['id']}": o["name"] for o in self.orgs.values()}
        for r in resources:
            for p in r.get("performer", ()):
                p["display"] = names[p["reference"]]
        self.out.bundle = {
            "resourceType": "Bundle", "type": "collection",
            "entry": [{"fullUrl": f"urn:uuid:{r['id']}", "resource": r} for r in resources],
        }
        if self.out.unmapped:
            mark_unmapped(self.out.bundle)
        return self.out

    def group(self, g: dict[str, Any], subject: dict[str, str]) -> list[dict[str, Any]]:
        obr, n = g["obr"], g["n"]
        filler = value(obr, 3) or value(obr, 2)
        if not filler:
            raise MissingField("filler (or placer) order number is empty",
                               field=where("OBR", n, 3))
        key = (self.head.facility, filler)
        code, dr_unmapped = self.concept(obr, 4, where("OBR", n, 4))
        collected = fhir_datetime(value(obr, 7), where("OBR", n, 7), self.cfg.default_zone)
        issued = fhir_datetime(value(obr, 22), where("OBR", n, 22), self.cfg.default_zone,
                               instant=True)
        specimen = self.specimen(g, subject, key, collected)
        lab = self.organization(self.head.facility)
        observations: list[dict[str, Any]] = []
        seen: set[str] = set()
        for entry in g["obx"]:
            obs = self.observation(entry, subject, key, collected, issued, specimen, lab)
            if obs["id"] in seen:
                raise BadField("the same test (OBX-3 code and OBX-4 sub-id) appears twice "
                               "under one order", field=where("OBX", entry["n"], 3))
            seen.add(obs["id"])
            observations.append(obs)
        status_code = value(obr, 25).upper()
        if status_code:
            status = vocab.REPORT_STATUS.get(status_code)
            if status is None:
                raise BadField(f"result status {status_code!r} is not in table 0123",
                               field=where("OBR", n, 25))
        else:
            kinds = {o["status"] for o in observations}
            status = ("corrected" if "corrected" in kinds else
                      "final" if kinds <= {"final", "amended"} and kinds else "preliminary")
        dr: dict[str, Any] = {
            "resourceType": "DiagnosticReport", "id": _id("report", *key),
            "identifier": [{"type": {"coding": [{"system": vocab.V2_0203, "code": "FILL"}]},
                            "system": f"urn:hutong:lis:{self.cfg.node_id}:{self.head.facility}",
                            "value": filler}],
            "status": status,
            "category": [{"coding": [{"system": vocab.V2_0074, "code": "LAB",
                                      "display": "Laboratory"}]}],
            "code": code, "subject": subject,
        }
        placer = value(obr, 2)
        if placer:
            dr["identifier"].append({
                "type": {"coding": [{"system": vocab.V2_0203, "code": "PLAC"}]},
                "system": f"urn:hutong:order:{self.cfg.node_id}", "value": placer})
        if collected:
            dr["effectiveDateTime"] = collected
        if issued:
            dr["issued"] = issued
        performers = {o["performer"][0]["reference"]: o["performer"][0] for o in observations
                      if o.get("performer")}
        dr["performer"] = list(performers.values()) or [lab]
        if specimen:
            dr["specimen"] = [{"reference": f"Specimen/{specimen['id']}"}]
        if observations:
            dr["result"] = [{"reference": f"Observation/{o['id']}"} for o in observations]
        if g["notes"]:
            dr["conclusion"] = "\n".join(g["notes"])
        if dr_unmapped:
            mark_unmapped(dr)
        self.out.reports.append(dr["id"])
        return [dr, *([specimen] if specimen else []), *observations]

    def specimen(self, g: dict[str, Any], subject: dict[str, str], key: tuple[str, str],
                 collected: str | None) -> dict[str, Any] | None:
        obr, spm, n = g["obr"], g["spm"], g["n"]
        sp: dict[str, Any] = {"resourceType": "Specimen", "subject": subject}
        if spm is not None:
            ident = value(spm, 2, 2) or value(spm, 2, 1)
            type_code, type_text = value(spm, 4, 1), value(spm, 4, 2)
            when = fhir_datetime(value(spm, 17, 1), "SPM-17", self.cfg.default_zone) or collected
            received = fhir_datetime(value(spm, 18), "SPM-18", self.cfg.default_zone,
                                     instant=False)
        else:
            ident = ""
            type_code, type_text = value(obr, 15, 1, 1, 1), value(obr, 15, 1, 1, 2)
            when = collected
            received = fhir_datetime(value(obr, 14), where("OBR", n, 14), self.cfg.default_zone)
        if not (ident or type_code or type_text or when):
            return None
        sp["id"] = _id("specimen", *key, ident)
        if ident:
            sp["identifier"] = [{"system": f"urn:hutong:specimen:{self.cfg.node_id}",
                                 "value": ident}]
        if type_code or type_text:
            coding = [{"system": vocab.V2_0487, "code": type_code,
                       **({"display": type_text} if type_text else {})}] if type_code else []
            sp["type"] = {**({"coding": coding} if coding else {}),
                          **({"text": type_text} if type_text else {})}
        if when:
            sp["collection"] = {"collectedDateTime": when}
        if received and "T" in received:
            sp["receivedTime"] = received
        return sp

    def observation(self, entry: dict[str, Any], subject: dict[str, str], key: tuple[str, str],
                    collected: str | None, issued: str | None, specimen: dict[str, Any] | None,
                    lab: dict[str, str]) -> dict[str, Any]:
        obx, n = entry["obx"], entry["n"]
        vtype = value(obx, 2).upper()
        local_code = value(obx, 3, 1) or value(obx, 3, 2)
        code, unmapped = self.concept(obx, 3, where("OBX", n, 3))
        status_code = value(obx, 11).upper()
        if not status_code:
            raise MissingField("result status is empty", field=where("OBX", n, 11))
        status = vocab.OBSERVATION_STATUS.get(status_code)
        if status is None:
            raise BadField(f"result status {status_code!r} is not in table 0085",
                           field=where("OBX", n, 11))
        if status == "corrected":
            self.out.corrected += 1
        obs: dict[str, Any] = {
            "resourceType": "Observation",
            "id": _id("observation", *key, local_code, value(obx, 4)),
            "status": status,
            "category": [{"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                "code": "laboratory", "display": "Laboratory"}]}],
            "code": code, "subject": subject,
        }
        if not vtype and reps(obx, 5):
            raise MissingField("value type is empty but there is a value",
                               field=where("OBX", n, 2))
        obs.update(self.obx_value(obx, n, vtype) if vtype else {})
        if not any(k.startswith("value") for k in obs) and status == "cancelled":
            obs["dataAbsentReason"] = {"coding": [{"system": vocab.DATA_ABSENT,
                                                   "code": "not-performed"}]}
        when = fhir_datetime(value(obx, 14), where("OBX", n, 14), self.cfg.default_zone)
        if when or collected:
            obs["effectiveDateTime"] = when or collected
        if issued:
            obs["issued"] = issued
        lab_name = value(obx, 23, 1) or value(obx, 15, 2) or value(obx, 15, 1)
        obs["performer"] = [self.organization(lab_name, value(obx, 23, 10))
                            if lab_name else lab]
        flags = self.interpretation(obx)
        if flags:
            obs["interpretation"] = flags
        ranges = self.reference_range(obx, where("OBX", n, 7))
        if ranges:
            obs["referenceRange"] = ranges
        if entry["notes"]:
            obs["note"] = [{"text": t} for t in entry["notes"]]
        if specimen:
            obs["specimen"] = {"reference": f"Specimen/{specimen['id']}"}
        if unmapped:
            mark_unmapped(obs)
        self.out.observations += 1
        return obs


@kit_errors
def to_fhir(msg: Message, head: Header, cfg: Settings) -> Results:
    """The Bundle (type collection) for one checked message; LisMessageError when it cannot."""
    return _Builder(msg, head, cfg).build()
