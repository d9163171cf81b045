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

import base64
import binascii
import re
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from adapters.hl7v2 import fields as v2
from adapters.hl7v2.charset import UTF8, Charset
from adapters.hl7v2.fields import (
    Message,
    fhir_datetime,
    rep_text,
    rep_values,
    reps,
    value,
    where,
)
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
_PLAIN = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)$")
#: ED type of data (table 0191) -> MIME top-level type
_MIME_TOP = {
    "AP": "application",
    "APPLICATION": "application",
    "TEXT": "text",
    "TX": "text",
    "IM": "image",
    "IMAGE": "image",
    "AU": "audio",
    "AUDIO": "audio",
    "VIDEO": "video",
    "MULTIPART": "multipart",
}


def _content_type(kind: str, sub: str) -> str:
    """A MIME type from ED.2/ED.3 (RP.3/RP.4): ``AP^PDF`` -> ``application/pdf``."""
    sub = sub.strip().lower()
    if re.fullmatch(r"[a-z0-9.+-]+/[a-z0-9.+-]+", sub):
        return sub
    top = _MIME_TOP.get(kind.strip().upper())
    if top and sub and re.fullmatch(r"[a-z0-9.+-]+", sub):
        return f"{top}/{sub}"
    if top == "text":
        return "text/plain"
    return "application/octet-stream" if kind or sub else ""


def _lines(text: str) -> str:
    """A TX/FT repetition with its line breaks (\\.br\\ arrives as CR) as LF, nothing cut."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


@dataclass(frozen=True)
class Header:
    sending_app: str
    facility: str  # MSH-4 (HD.1), or MSH-3 when MSH-4 is empty
    control_id: str  # MSH-10
    version: str  # MSH-12
    message_type: str  # MSH-9 as "ORU^R01"
    # the exactly-once key also needs the content: adapters.lis.once.source_key


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
    mtype = f"{value(msh, 9, 1)}^{value(msh, 9, 2) or 'R01'}"  # "ORU" alone: R01, the only
    if mtype != "ORU^R01":  # unsolicited result trigger of the versions that omit it
        raise UnsupportedMessage(f"message type {mtype} is not ORU^R01", field="MSH-9")
    control = value(msh, 10)
    if not control:
        raise MissingField("message control id is empty", field="MSH-10")
    app = value(msh, 3) or value(msh, 3, 2)
    # MSH-3/MSH-4 are optional in v2: without them the channel itself is the sender
    facility = value(msh, 4) or value(msh, 4, 2) or app
    return Header(app, facility, control, version, mtype)


def system_uri(kind: str, *parts: str) -> str:
    """``urn:hutong:<kind>:<part>:<part>``, every part percent-encoded (UTF-8, RFC 3986): a
    valid URI whatever MSH-3/MSH-4 hold (spaces, Chinese, ``:``), one-to-one with the parts,
    and unchanged for plain ASCII names such as ``LIS`` (so existing identifiers keep theirs)."""
    return ":".join(["urn:hutong", kind, *(quote(p, safe="") for p in parts if p)])


def raw_value(seg: Any, field: int, component: int = 1, rep: int = 1, sub: int = 1) -> str:
    """One leaf unescaped but not stripped: TX/FT lines and ED data exactly as sent."""
    return value(seg, field, component, rep, sub, strip=False)


def field_text(seg: Any, field: int) -> str:
    """A whole field as sent (components and repetitions with their separators)."""
    return str(seg(field)).strip() if field < len(seg) else ""


def _code(text: str) -> str:
    """A v2 code as a FHIR ``code`` (no leading, trailing or doubled whitespace)."""
    return " ".join(text.split())


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

    def concept(
        self, seg: Any, f: int, at: str, *, mapped: bool = True, rep: int = 1
    ) -> tuple[dict[str, Any], bool]:
        """(CodeableConcept, unmapped) for a CE/CWE field, every triplet kept.

        The identifier (components 1-3), the alternate (4-6) and, in CWE, the second alternate
        (10-12) each become a coding (CWE.7/8 their versions, CWE.9 the text): a named standard
        system (LN, SCT, ...) gets its URI, any other name is the LIS's own code system and goes
        through the site's map (local code -> LOINC). A code carried only in an alternate
        triplet is read from there. ``unmapped``: a local code and no LOINC coding.
        """
        triplets = [
            tuple(value(seg, f, c, rep) for c in (a, a + 1, a + 2))
            + (value(seg, f, v, rep) if v else "",)
            for a, v in ((1, 7), (4, 8), (10, 0))
        ]
        original = value(seg, f, 9, rep)
        if not any(code or text for code, text, _, _ in triplets):
            raise MissingField("code is empty", field=at)
        codings: list[dict[str, Any]] = []
        local_codes: list[dict[str, str]] = []
        for code, text, system, version in triplets:
            code = _code(code)
            if not code:
                continue
            uri = vocab.coding_system(system)
            coding = {
                "system": uri or self.cfg.local_system,
                "code": code,
                **({"version": version} if version and uri else {}),
                **({"display": text} if text else {}),
            }
            if uri is None:
                local_codes.append(coding)
                if mapped and self.cfg.translator is not None:
                    from bridge.mapping import map_coding

                    found, _ = map_coding(self.cfg.translator, self.cfg.map_id, coding)
                else:
                    found = [coding]
            else:
                found = [coding]
            for c in found:
                if not any(c["system"] == o["system"] and c["code"] == o["code"] for o in codings):
                    codings.append(c)
        unmapped = (
            mapped and bool(local_codes) and not any(c["system"] == vocab.LOINC for c in codings)
        )
        if unmapped:
            for c in local_codes:
                if not any(u["code"] == c["code"] for u in self.out.unmapped):
                    self.out.unmapped.append(
                        {
                            "system": self.cfg.local_system,
                            "code": c["code"],
                            "display": c.get("display", ""),
                        }
                    )
        cc: dict[str, Any] = {"coding": codings} if codings else {}
        text = original or next((t for _, t, _, _ in triplets if t), "")
        if text or not codings:
            cc["text"] = text or next(c for c, _, _, _ in triplets if c)
        return cc, unmapped

    def organization(self, name: str, ident: str = "") -> dict[str, str]:
        key = ident or name
        if key not in self.orgs:
            org: dict[str, Any] = {
                "resourceType": "Organization",
                "id": _id("org", self.head.facility, key),
                "name": name,
            }
            if ident:
                org["identifier"] = [
                    {"system": f"urn:hutong:lab:{self.cfg.node_id}", "value": ident}
                ]
            self.orgs[key] = org
        elif ident and self.orgs[key]["name"] == key and name != key:
            self.orgs[key]["name"] = name  # the facility id seen first, its lab's name now
            self.orgs[key]["identifier"] = [
                {"system": f"urn:hutong:lab:{self.cfg.node_id}", "value": ident}
            ]
        return {"reference": f"Organization/{self.orgs[key]['id']}"}

    # -- patient ----------------------------------------------------------------------------

    def patient(self, pid: Any) -> dict[str, Any]:
        idents: list[dict[str, Any]] = []
        national = None
        for r in range(1, reps(pid, 3) + 1):
            ident, kind = value(pid, 3, 1, r), value(pid, 3, 5, r)
            if not ident:
                continue
            if is_national_id(pid, r, self.cfg.national_id_system):
                national = normalise_national_id(ident)
                idents.append({"system": self.cfg.national_id_system, "value": national})
            else:
                idents.append(
                    {
                        "type": {
                            "coding": [{"system": vocab.V2_0203, "code": _code(kind) or "MR"}]
                        },
                        "system": self.cfg.mrn_system or f"urn:hutong:mrn:{self.cfg.node_id}",
                        "value": ident,
                    }
                )
        if not idents:
            raise MissingField("no patient identifier", field="PID-3")
        phash = patient_hash(self.cfg.hash_key, national) if national else None
        self.out.patient_hash = phash
        first = idents[0]["value"] if phash is None else phash
        p: dict[str, Any] = {
            "resourceType": "Patient",
            "id": _id("patient", phash or first),
            "identifier": idents,
        }
        family, given = value(pid, 5, 1), value(pid, 5, 2)
        if family or given:
            name: dict[str, Any] = {"text": f"{family}{given}"}
            if family:
                name["family"] = family
            if given:
                name["given"] = [given]
            p["name"] = [name]
        gender = {
            "M": "male",
            "F": "female",
            "O": "other",
            "U": "unknown",
            "A": "other",
            "N": "unknown",
        }.get(value(pid, 8).upper())
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
                q["code"] = _code(code)
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
        """OBX-5 as value[x], by OBX-2, after the V2-to-FHIR OBX[Observation] map: NM
        (comparators too) -> Quantity; SN -> Quantity/Range/Ratio, else its text; CE/CWE/CNE/
        CF/IS -> CodeableConcept; DT/DTM/TS -> dateTime; TM -> time; DR -> Period; NR ->
        Range; ST/TX/FT -> string, repetitions and line breaks kept as sent; any other type
        (ID, MED, EI, XCN ...) -> its text. ED/RP never get here (report attachments)."""
        at = where("OBX", n, 5)
        count = reps(obx, 5)
        if count == 0 or (
            count == 1
            and not field_text(obx, 5)
            .replace('""', "")
            .strip("".join((obx.d.component, obx.d.subcomponent, " ")))
        ):
            return {}  # no value, only separators, or the v2 null "": no value[x]
        if vtype == "NM" and count == 1:
            m = _NUMBER.match(value(obx, 5))
            if m is None:
                raise BadField("value type NM but the value is not a number", field=at)
            return {"valueQuantity": self.quantity(m.group(2), obx, at, m.group(1) or "")}
        if vtype == "SN" and count == 1:
            found = self.structured_numeric(obx, at)
            if found is not None:
                return found
        if vtype in ("CE", "CWE", "CNE", "CF", "IS") and count == 1 and value(obx, 5):
            cc, _ = self.concept(obx, 5, at, mapped=False)
            return {"valueCodeableConcept": cc}
        if vtype in ("TS", "DT", "DTM") and count == 1:
            return {"valueDateTime": fhir_datetime(value(obx, 5), at, self.cfg.default_zone)}
        if vtype == "TM" and count == 1:
            t = value(obx, 5)
            m = re.fullmatch(r"(\d{2})(\d{2})?(\d{2})?(\.\d{1,4})?", t.split("+")[0].split("-")[0])
            if (
                m is None
                or int(m.group(1)) > 23
                or int(m.group(2) or 0) > 59
                or int(m.group(3) or 0) > 59
            ):
                raise BadField("value type TM but not HH[MM[SS[.S]]]", field=at)
            frac = m.group(4) or ""
            return {"valueTime": f"{m.group(1)}:{m.group(2) or '00'}:{m.group(3) or '00'}{frac}"}
        if vtype == "DR" and count == 1:
            start = fhir_datetime(value(obx, 5, 1), at, self.cfg.default_zone)
            end = fhir_datetime(value(obx, 5, 2), at, self.cfg.default_zone)
            if start or end:
                return {
                    "valuePeriod": {
                        **({"start": start} if start else {}),
                        **({"end": end} if end else {}),
                    }
                }
        if vtype == "NR" and count == 1:
            low, high = value(obx, 5, 1), value(obx, 5, 2)
            if all(not x or (_NUMBER.fullmatch(x) and x[0] not in "<>") for x in (low, high)) and (
                low or high
            ):
                return {
                    "valueRange": {
                        **({"low": self.quantity(low, obx, at)} if low else {}),
                        **({"high": self.quantity(high, obx, at)} if high else {}),
                    }
                }
        if vtype in ("ST", "TX", "FT"):
            text = "\n".join(_lines(rep_text(obx, 5, r, strip=False)) for r in range(1, count + 1))
            return {"valueString": text} if text.strip() else {}
        text = field_text(obx, 5)  # any other type: the value as sent
        return {"valueString": text} if text else {}

    def structured_numeric(self, obx: Any, at: str) -> dict[str, Any] | None:
        """SN (comparator ^ num1 ^ separator ^ num2) as Quantity, Range or Ratio; None when it
        is none of them (the caller keeps it as text)."""
        comp, n1, sep, n2 = (value(obx, 5, c) for c in (1, 2, 3, 4))
        numeric = all(not t or _PLAIN.fullmatch(t) for t in (n1, n2))
        if not numeric or comp not in ("", "=", "<", ">", "<=", ">="):
            return None
        if not sep and n1 and not n2:
            return {"valueQuantity": self.quantity(n1, obx, at, "" if comp == "=" else comp)}
        if comp in ("", "=") and sep == "-" and n1 and n2:
            return {
                "valueRange": {
                    "low": self.quantity(n1, obx, at),
                    "high": self.quantity(n2, obx, at),
                }
            }
        if comp in ("", "=") and sep in (":", "/") and n1 and n2:
            return {
                "valueRatio": {"numerator": {"value": _num(n1)}, "denominator": {"value": _num(n2)}}
            }
        if comp in ("", "=") and sep == "+" and n1 and not n2:
            return {"valueString": f"{n1}+"}
        return None

    def attachment(self, obx: Any, n: int, vtype: str) -> dict[str, Any] | None:
        """An ED (embedded data, e.g. a PDF report) or RP (reference pointer) OBX as an
        Attachment for ``DiagnosticReport.presentedForm`` (R4 Observation has no Attachment
        value): ED base64 data is kept exactly as sent, byte for byte; ED in other encodings
        (A = text, Hex) is base64-encoded; RP gives ``url``. Title: OBX-3 text or code."""
        at = where("OBX", n, 5)
        title = value(obx, 3, 2) or value(obx, 3, 1) or value(obx, 3, 5) or value(obx, 3, 4)
        att: dict[str, Any] = {}
        if vtype == "ED":
            kind, sub, enc = value(obx, 5, 2), value(obx, 5, 3), value(obx, 5, 4).upper()
            data = raw_value(obx, 5, 5).strip()
            if enc in ("BASE64", "B64", ""):
                compact = "".join(data.split())
                try:
                    base64.b64decode(compact, validate=True)
                except (binascii.Error, ValueError):
                    raise BadField("ED data is not valid base64", field=f"{at}.5") from None
                payload = compact
            elif enc == "HEX":
                try:
                    payload = base64.b64encode(bytes.fromhex(data)).decode("ascii")
                except ValueError:
                    raise BadField("ED data is not valid hex", field=f"{at}.5") from None
            else:  # A (ASCII text) or anything else: the text itself
                payload = base64.b64encode(data.encode("utf-8")).decode("ascii")
            ctype = _content_type(kind, sub)
            if ctype:
                att["contentType"] = ctype
            if payload:
                att["data"] = payload
        else:  # RP: pointer ^ application ^ type ^ subtype
            pointer = value(obx, 5, 1)
            if pointer:
                att["url"] = quote(pointer, safe=":/?#[]@!$&'()*+,;=%~")
            ctype = _content_type(value(obx, 5, 3), value(obx, 5, 4))
            if ctype:
                att["contentType"] = ctype
        if not att:
            return None
        if title:
            att["title"] = title
        return att

    def reference_range(self, obx: Any, at: str) -> list[dict[str, Any]]:
        """OBX-7 kept whole as ``text`` (components too: ``35-150^35^150``); low/high from
        the components when numeric, else from a ``a-b`` / ``<b`` / ``>a`` text."""
        text = field_text(obx, 7)
        if not text:
            return []
        first, low_c, high_c = value(obx, 7, 1), value(obx, 7, 2), value(obx, 7, 3)
        rr: dict[str, Any] = {}
        if (low_c or high_c) and all(not x or _PLAIN.fullmatch(x) for x in (low_c, high_c)):
            if low_c:
                rr["low"] = self._simple(low_c, obx, at)
            if high_c:
                rr["high"] = self._simple(high_c, obx, at)
        else:
            m = _RANGE.match(first)
            b = _BOUND.match(first)
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
                coding = {
                    "system": vocab.V3_INTERPRETATION,
                    "code": flag,
                    "display": vocab.V3_FLAGS[flag],
                }
            else:
                coding = {"system": vocab.V2_0078, "code": _code(flag)}
            out.append({"coding": [coding]})
        return out

    # -- groups -----------------------------------------------------------------------------

    def build(self) -> Results:
        segments = list(self.msg)
        pids = [s for s in segments if str(s[0]) == "PID"]
        if not pids:
            raise Rejected("no PID segment", field="PID")
        if len(pids) > 1:
            raise Rejected("one patient per message is supported (more than one PID)", field="PID")
        if not any(str(s[0]) == "OBR" for s in segments):
            raise Rejected("no OBR segment", field="OBR")
        patient = self.patient(pids[0])
        subject = {"reference": f"Patient/{patient['id']}"}
        groups: list[dict[str, Any]] = []
        orc: Any = None
        current: dict[str, Any] | None = None
        last: dict[str, Any] | None = None  # the resource an NTE belongs to
        seen_obr = 0
        for seg in segments:
            name = str(seg[0])
            if name == "ORC":
                orc = seg
            elif name == "OBR":
                seen_obr += 1
                current = {
                    "obr": seg,
                    "n": seen_obr,
                    "obx": [],
                    "spm": None,
                    "notes": [],
                    "orc": orc,
                }
                orc = None
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
        self.report_keys(groups)
        resources: list[dict[str, Any]] = [patient]
        for g in groups:
            resources.extend(self.group(g, subject))
        resources.extend(self.orgs.values())
        names = {f"Organization/{o['id']}": o["name"] for o in self.orgs.values()}
        for r in resources:
            for p in r.get("performer", ()):
                p["display"] = names[p["reference"]]
        self.out.bundle = {
            "resourceType": "Bundle",
            "type": "collection",
            "entry": [{"fullUrl": f"urn:uuid:{r['id']}", "resource": r} for r in resources],
        }
        if self.out.unmapped:
            mark_unmapped(self.out.bundle)
        return self.out

    def report_keys(self, groups: list[dict[str, Any]]) -> None:
        """Each OBR's identity: (sending facility, filler number), which a later correction
        repeats. Some senders repeat a filler number over several OBRs of one message: those
        reports are told apart by OBR-4 (the test) and then OBR-1 (set id), else by position,
        so every OBR gets its own DiagnosticReport (none merged, none lost)."""
        for g in groups:
            obr, n = g["obr"], g["n"]
            orc = g["orc"]  # ORC-3/ORC-2 when the OBR leaves its order numbers to the ORC
            filler = (
                value(obr, 3)
                or value(obr, 2)
                or (value(orc, 3) or value(orc, 2) if orc is not None else "")
            )
            if not filler:
                raise MissingField(
                    "filler (or placer) order number is empty", field=where("OBR", n, 3)
                )
            g["filler"] = filler
            g["key"] = (self.head.facility, filler)
        for extra in (
            lambda g: value(g["obr"], 4, 1) or value(g["obr"], 4, 4) or value(g["obr"], 4, 2),
            lambda g: value(g["obr"], 1),
            lambda g: f"#{g['n']}",
        ):
            counts: dict[tuple[str, ...], int] = {}
            for g in groups:
                counts[g["key"]] = counts.get(g["key"], 0) + 1
            repeated = [g for g in groups if counts[g["key"]] > 1]
            if not repeated:
                return
            for g in repeated:
                g["key"] = (*g["key"], extra(g))

    def group(self, g: dict[str, Any], subject: dict[str, str]) -> list[dict[str, Any]]:
        obr, n = g["obr"], g["n"]
        filler, key = g["filler"], g["key"]
        code, dr_unmapped = self.concept(obr, 4, where("OBR", n, 4))
        collected = fhir_datetime(value(obr, 7), where("OBR", n, 7), self.cfg.default_zone)
        issued = fhir_datetime(
            value(obr, 22), where("OBR", n, 22), self.cfg.default_zone, instant=True
        )
        specimen = self.specimen(g, subject, key, collected)
        lab = self.organization(self.head.facility or f"{self.cfg.node_id} LIS")
        observations: list[dict[str, Any]] = []
        forms: list[dict[str, Any]] = []
        text_lines: list[str] = []
        seen: dict[str, int] = {}
        for entry in g["obx"]:
            obx = entry["obx"]
            vtype = value(obx, 2).upper()
            if vtype in ("ED", "RP"):
                att = self.attachment(obx, entry["n"], vtype)
                if att is not None:
                    forms.append(att)
                    entry["form"] = len(forms)
                    continue
            if vtype in ("TX", "FT", "ST") and not any(
                value(obx, 3, c) for c in (1, 2, 4, 5, 9, 10, 11)
            ):
                # report text sent as code-less lines: the report's own text, in order
                text_lines.append(
                    "\n".join(
                        _lines(rep_text(obx, 5, r, strip=False))
                        for r in range(1, max(reps(obx, 5), 1) + 1)
                    )
                )
                entry["text_line"] = len(text_lines)
                continue
            obs = self.observation(entry, subject, key, collected, issued, specimen, lab)
            if obs["id"] in seen:  # same test and sub-id again: its own result, by position
                seen[obs["id"]] += 1
                obs["id"] = _id("observation", obs["id"], str(seen[obs["id"]]))
            seen.setdefault(obs["id"], 1)
            entry["observation"] = obs["id"]
            observations.append(obs)
        if text_lines:
            forms.insert(
                0,
                {
                    "contentType": "text/plain;charset=utf-8",
                    "data": base64.b64encode("\n".join(text_lines).encode("utf-8")).decode("ascii"),
                },
            )
        status_code = value(obr, 25).upper()
        if status_code:
            status = vocab.REPORT_STATUS.get(status_code)
            if status is None:
                raise BadField(
                    f"result status {status_code!r} is not in table 0123", field=where("OBR", n, 25)
                )
        else:
            kinds = {o["status"] for o in observations}
            status = (
                "corrected"
                if "corrected" in kinds
                else "final"
                if kinds <= {"final", "amended"} and kinds
                else "preliminary"
            )
        dr: dict[str, Any] = {
            "resourceType": "DiagnosticReport",
            "id": _id("report", *key),
            "identifier": [
                {
                    "type": {"coding": [{"system": vocab.V2_0203, "code": "FILL"}]},
                    "system": system_uri("lis", self.cfg.node_id, self.head.facility),
                    "value": filler,
                }
            ],
            "status": status,
            "category": [
                {"coding": [{"system": vocab.V2_0074, "code": "LAB", "display": "Laboratory"}]}
            ],
            "code": code,
            "subject": subject,
        }
        placer = value(obr, 2)
        if placer:
            dr["identifier"].append(
                {
                    "type": {"coding": [{"system": vocab.V2_0203, "code": "PLAC"}]},
                    "system": f"urn:hutong:order:{self.cfg.node_id}",
                    "value": placer,
                }
            )
        if collected:
            dr["effectiveDateTime"] = collected
        if issued:
            dr["issued"] = issued
        performers = {
            o["performer"][0]["reference"]: o["performer"][0]
            for o in observations
            if o.get("performer")
        }
        dr["performer"] = list(performers.values()) or [lab]
        if specimen:
            dr["specimen"] = [{"reference": f"Specimen/{specimen['id']}"}]
        if observations:
            dr["result"] = [{"reference": f"Observation/{o['id']}"} for o in observations]
        if forms:
            dr["presentedForm"] = forms
        if g["notes"]:
            dr["conclusion"] = "\n".join(g["notes"])
        if dr_unmapped:
            mark_unmapped(dr)
        self.out.reports.append(dr["id"])
        return [dr, *([specimen] if specimen else []), *observations]

    def specimen(
        self,
        g: dict[str, Any],
        subject: dict[str, str],
        key: tuple[str, str],
        collected: str | None,
    ) -> dict[str, Any] | None:
        obr, spm, n = g["obr"], g["spm"], g["n"]
        sp: dict[str, Any] = {"resourceType": "Specimen", "subject": subject}
        if spm is not None:
            ident = value(spm, 2, 2) or value(spm, 2, 1)
            type_code, type_text = value(spm, 4, 1), value(spm, 4, 2)
            when = fhir_datetime(value(spm, 17, 1), "SPM-17", self.cfg.default_zone) or collected
            received = fhir_datetime(value(spm, 18), "SPM-18", self.cfg.default_zone, instant=False)
        else:
            ident = ""
            type_code, type_text = value(obr, 15, 1, 1, 1), value(obr, 15, 1, 1, 2)
            when = collected
            received = fhir_datetime(value(obr, 14), where("OBR", n, 14), self.cfg.default_zone)
        if not (ident or type_code or type_text or when):
            return None
        sp["id"] = _id("specimen", *key, ident)
        if ident:
            sp["identifier"] = [
                {"system": f"urn:hutong:specimen:{self.cfg.node_id}", "value": ident}
            ]
        if type_code or type_text:
            coding = (
                [
                    {
                        "system": vocab.V2_0487,
                        "code": _code(type_code),
                        **({"display": type_text} if type_text else {}),
                    }
                ]
                if type_code
                else []
            )
            sp["type"] = {
                **({"coding": coding} if coding else {}),
                **({"text": type_text} if type_text else {}),
            }
        if when:
            sp["collection"] = {"collectedDateTime": when}
        if received and "T" in received:
            sp["receivedTime"] = received
        return sp

    def observation(
        self,
        entry: dict[str, Any],
        subject: dict[str, str],
        key: tuple[str, str],
        collected: str | None,
        issued: str | None,
        specimen: dict[str, Any] | None,
        lab: dict[str, str],
    ) -> dict[str, Any]:
        obx, n = entry["obx"], entry["n"]
        vtype = value(obx, 2).upper()
        local_code = value(obx, 3, 1) or value(obx, 3, 4) or value(obx, 3, 10) or value(obx, 3, 2)
        code, unmapped = self.concept(obx, 3, where("OBX", n, 3))
        status_code = value(obx, 11).upper()
        if not status_code:
            raise MissingField("result status is empty", field=where("OBX", n, 11))
        status = vocab.OBSERVATION_STATUS.get(status_code)
        if status is None:
            raise BadField(
                f"result status {status_code!r} is not in table 0085", field=where("OBX", n, 11)
            )
        if status == "corrected":
            self.out.corrected += 1
        obs: dict[str, Any] = {
            "resourceType": "Observation",
            # OBX-4 whole: structured sub-ids (1^1, 3^2) tell apart repeated tests
            "id": _id("observation", *key, local_code, field_text(obx, 4)),
            "status": status,
            "category": [
                {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                            "code": "laboratory",
                            "display": "Laboratory",
                        }
                    ]
                }
            ],
            "code": code,
            "subject": subject,
        }
        if not vtype and reps(obx, 5):
            raise MissingField("value type is empty but there is a value", field=where("OBX", n, 2))
        obs.update(self.obx_value(obx, n, vtype) if vtype else {})
        if not any(k.startswith("value") for k in obs) and status == "cancelled":
            obs["dataAbsentReason"] = {
                "coding": [{"system": vocab.DATA_ABSENT, "code": "not-performed"}]
            }
        when = fhir_datetime(value(obx, 14), where("OBX", n, 14), self.cfg.default_zone)
        if when or collected:
            obs["effectiveDateTime"] = when or collected
        if issued:
            obs["issued"] = issued
        lab_name = value(obx, 23, 1) or value(obx, 15, 2) or value(obx, 15, 1)
        obs["performer"] = [self.organization(lab_name, value(obx, 23, 10)) if lab_name else lab]
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
def is_national_id(pid: Any, r: int, national_id_system: str) -> bool:
    """Whether PID-3 repetition ``r`` is the resident ID card number (by CX.5 type or CX.4
    assigning authority)."""
    authority, kind = value(pid, 3, 4, r), value(pid, 3, 5, r)
    return kind.upper() in NATIONAL_ID_TYPES or authority in (
        national_id_system,
        national_id_system.removeprefix("urn:oid:"),
    )


def national_id(msg: Message, national_id_system: str) -> str | None:
    """The national ID of the message's (first) PID as intake reads it, or None: a refused
    message's quarantine item is hashed under it so IT finds it by patient."""
    for seg in msg:
        if str(seg[0]) != "PID":
            continue
        for r in range(1, reps(seg, 3) + 1):
            ident = value(seg, 3, 1, r)
            if ident and is_national_id(seg, r, national_id_system):
                return normalise_national_id(ident)
        return None
    return None


@kit_errors
def to_fhir(msg: Message, head: Header, cfg: Settings) -> Results:
    """The Bundle (type collection) for one checked message; LisMessageError when it cannot."""
    return _Builder(msg, head, cfg).build()
