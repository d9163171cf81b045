"""Neutral slips (:mod:`adapters.slips`) <-> FHIR R4, shared by every HIS style.

Outbound (the local HIS wrote a slip): :func:`referral_bundle` and :func:`return_bundle` build the
transaction Bundles the referral workflow takes (``host.submit_referral``), and
:func:`acceptance_outputs` the Task outputs of an ``accept`` step (``host.referral_step``).
Inbound (a packet arrived and the workflow applied it): :func:`referral_from_fhir`,
:func:`acceptance_from_task` and :func:`return_from_fhir` read the node's view of the thread
(``host.referral(thread)``) back into slips for the local HIS.

Codes. A slip holds the WRITER's local codes. Going out, each is sent as ``[shared coding, local
coding]`` through the writer's ConceptMaps (:func:`bridge.mapping.map_coding`); coming in, the
shared coding is translated back to the READER's local code by reversing the reader's map (the
mapping module only maps forwards, so the reverse index is built here, see :class:`Codes`).

* A code the map lists but cannot translate, or an optional code (department, drug, lab item) the
  map does not list, travels as the local coding alone; the resource holding it and the Bundle
  carry the ``unmapped-code`` tag (:func:`bridge.mapping.mark_unmapped`), and the code is
  appended to the caller's ``gaps`` list (:class:`bridge.mapping.Observed`) for the adapter to
  count in the node (``host.record_gaps``; codes only, no patient data).
* A code for a MANDATORY map (``diagnosis`` by default, see ``strict``) that the site's map does
  not list at all is a typing error in the HIS, not a gap: :class:`UnknownCode` is raised and the
  adapter quarantines the record. The diagnosis drives the receiver's triage and the pilot
  chronic-disease statistics, so an unknown one must be fixed at the source.
* A reader that cannot translate a shared code back gets the shared code (e.g. the ICD-10 code)
  in the slip and records a gap; with no shared coding at all it gets the writer's local code.

Bad slips raise a :class:`SlipError` subclass naming the slip field; adapters name their own
column from it (``error.field``) when they quarantine the record. The national ID number is put
on the Patient under the alliance's national-ID system, which the workflow hashes and strips
before anything leaves the node, so an inbound slip never has it (``id_number`` is "").
"""

from __future__ import annotations

import html
import re
import uuid
from collections.abc import Iterable
from datetime import date, datetime
from typing import Any

from adapters.slips import AcceptanceSlip, LabResult, Prescription, ReferralSlip, ReturnSlip
from bridge.errors import HutongError
from bridge.mapping import Observed, SiteMaps, map_coding, mark_unmapped, to_local
from bridge.privacy import NATIONAL_ID_SYSTEM
from bridge.referral.codes import HUTONG, KIND_SYSTEM, KINDS, OUTPUT_SYSTEM, PLACER

Resource = dict[str, Any]

#: the slip number's identifier system; ``{member}`` is the HIS's member id
SLIP_SYSTEM = "urn:hutong:referral-slip:{member}"
#: the patient's record number in one member's HIS
MRN_SYSTEM = "urn:hutong:mrn:{member}"
#: sections of the return Composition
SECTION_SYSTEM = f"{HUTONG}/return-section"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
GENDERS = ("male", "female", "other", "unknown")
REFERRAL_NOTE = ("57133-1", "Referral note")
DISCHARGE_SUMMARY = ("18842-5", "Discharge summary")
CONSULT_NOTE = ("11488-4", "Consult note")
#: acceptance slip fields as Task.output types (code, Chinese label)
ACCEPT_OUTPUTS = {
    "appointment": "预约/入院时间",
    "department": "接诊科室",
    "bed": "床位",
    "doctor": "接诊医生",
}
#: mandatory maps by default: an unknown code here is quarantined, not sent unmapped
STRICT = ("diagnosis",)


# -- errors: bad slips, each naming the slip field -------------------------------------------


class SlipError(HutongError):
    """A slip that cannot become FHIR; ``field`` is the slip's field name."""

    code = "HT-LOCAL-DATA"
    http_status = 422

    def __init__(self, field: str, message: str, *, detail: str | None = None) -> None:
        super().__init__(message, detail=detail)
        self.field = field


class MissingField(SlipError):
    code = "HT-LOCAL-MISSING"


class BadDate(SlipError):
    code = "HT-LOCAL-DATE"


class BadValue(SlipError):
    code = "HT-LOCAL-VALUE"


class UnknownCode(SlipError):
    code = "HT-LOCAL-CODE"


class BadEncoding(SlipError):
    """Raised by adapters: bytes that do not decode in the site's declared encoding."""

    code = "HT-LOCAL-ENCODING"


class DuplicateRecord(SlipError):
    """Raised by adapters: a second local record for a slip number already taken."""

    code = "HT-LOCAL-DUPLICATE"


# -- codes ------------------------------------------------------------------------------------


class Codes:
    """One site's maps seen from a slip: local code -> CodeableConcept, and back.

    ``maps`` is the site's :class:`~bridge.mapping.SiteMaps` (``host.maps``) or None (no mapping
    folder: codes travel as local codings of ``urn:hutong:local:<member>:<map>``). Every code
    that could not be translated is appended to ``gaps`` (:class:`~bridge.mapping.Observed`);
    the adapter counts them in the node with ``host.record_gaps``.
    """

    def __init__(
        self, maps: SiteMaps | None, member: str = "local", gaps: list[Observed] | None = None
    ) -> None:
        self.maps = maps
        self.member = member
        self.gaps = gaps if gaps is not None else []
        self.unmapped = False  # set when a concept() went out without a shared coding
        self.any_unmapped = False

    def mark(self, resource: Resource) -> Resource:
        """Tag ``resource`` if a concept built since the last mark() went out unmapped."""
        if self.unmapped:
            mark_unmapped(resource)
            self.unmapped, self.any_unmapped = False, True
        return resource

    def _has(self, map_id: str) -> bool:
        return self.maps is not None and map_id in self.maps.info

    def source_system(self, map_id: str) -> str:
        if self.maps is not None and map_id in self.maps.info:
            return self.maps.info[map_id].source_system
        return f"urn:hutong:local:{self.member}:{map_id}"

    def _gap(self, map_id: str, coding: dict[str, Any], text: str = "") -> None:
        self.gaps.append(
            Observed(
                self.maps.site if self.maps else self.member,
                map_id,
                str(coding.get("system", "")),
                str(coding.get("code", "")),
                str(coding.get("display") or text),
            )
        )

    def concept(
        self,
        map_id: str,
        code: str,
        display: str = "",
        *,
        field: str = "",
        strict: Iterable[str] = (),
    ) -> Resource:
        """A local code as a CodeableConcept: shared coding first, local coding kept.

        Unmapped: the local coding alone; the caller marks the resource (:func:`mark_unmapped`).
        """
        local: dict[str, Any] = {"system": self.source_system(map_id), "code": code}
        if display:
            local["display"] = display
        if self.maps is not None and self._has(map_id):
            listed = any(r.source_code == code for r in self.maps.rows[map_id])
            if not listed and map_id in strict:
                raise UnknownCode(
                    field or map_id,
                    f"'{field or map_id}': {map_id} code "
                    f"{code!r} is not in the "
                    f"site's {map_id} map ({self.source_system(map_id)})",
                )
            codings, unmapped = map_coding(self.maps, map_id, local)
        else:
            codings, unmapped = [local], True
        cc: Resource = {"coding": codings}
        if display:
            cc["text"] = display
        if unmapped:
            self.unmapped = True
            self._gap(map_id, local)
        return cc

    def local(self, map_id: str, cc: Resource | None) -> tuple[str, str]:
        """(the reader's local code, display text) for a CodeableConcept that arrived.

        Not translatable: the shared code if there is one, else the writer's local code; the
        gap is recorded either way (kind ``no-local`` in ``hutong mapping check``)."""
        if not cc:
            return "", ""
        codings = cc.get("coding") or []
        text = str(
            cc.get("text")
            or next((c.get("display") for c in codings if c.get("display")), "")
            or ""
        )
        mine = self.source_system(map_id)
        for c in codings:
            if c.get("system") == mine and c.get("code"):
                return str(c["code"]), text
        if self.maps is not None and self._has(map_id):
            found, _ = to_local(self.maps, map_id, codings)
            if found is not None:
                return str(found["code"]), text
            target = self.maps.info[map_id].target_system
            shared = next((c for c in codings if c.get("system") == target and c.get("code")), None)
            if shared is not None:
                self._gap(map_id, shared, text)
                return str(shared["code"]), text
        first = next((c for c in codings if c.get("code")), None)
        if first is None:
            return "", text
        if self.maps is not None:
            self._gap(map_id, first, text)
        return str(first["code"]), text


# -- small helpers ----------------------------------------------------------------------------


def _u() -> str:
    return f"urn:uuid:{uuid.uuid4()}"


def _need(field: str, value: str) -> str:
    value = (value or "").strip()
    if not value:
        raise MissingField(field, f"mandatory field '{field}' is empty")
    return value


def _date(field: str, value: str) -> str:
    value = _need(field, value)
    try:
        if len(value) != 10:
            raise ValueError
        date.fromisoformat(value)
    except ValueError:
        raise BadDate(field, f"'{field}' is not a date YYYY-MM-DD") from None
    return value


def _datetime(field: str, value: str) -> str:
    value = _need(field, value)
    if len(value) == 10:  # a date only (an HL7 sender's YYYYMMDD): FHIR dateTime at day precision
        try:
            date.fromisoformat(value)
        except ValueError:
            raise BadDate(field, f"'{field}' is not an ISO 8601 date") from None
        return value
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise BadDate(field, f"'{field}' is not an ISO 8601 date-time") from None
    if parsed.tzinfo is None:
        raise BadDate(field, f"'{field}' has no UTC offset (write e.g. +08:00)")
    return parsed.isoformat()


def _div(text: str) -> dict[str, str]:
    return {
        "status": "generated",
        "div": f'<div xmlns="http://www.w3.org/1999/xhtml">{html.escape(text, quote=False)}</div>',
    }


_DIV = re.compile(r"^<div[^>]*>(.*)</div>$", re.DOTALL)


def _undiv(narrative: dict[str, Any] | None) -> str:
    m = _DIV.match(str((narrative or {}).get("div") or ""))
    return html.unescape(m.group(1)) if m else ""


def _entries(resources: list[tuple[str, Resource]], codes: Codes) -> Resource:
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"fullUrl": url, "resource": r, "request": {"method": "POST", "url": r["resourceType"]}}
            for url, r in resources
        ],
    }
    return mark_unmapped(bundle) if codes.any_unmapped else bundle


def _slip_identifier(member: str, slip_no: str) -> Resource:
    return {
        "type": {"coding": [{"system": PLACER, "code": "PLAC"}]},
        "system": SLIP_SYSTEM.format(member=member),
        "value": slip_no,
    }


def _number(value: str) -> int | float | None:
    """A numeric value only when JSON gives the same text back (so '7.20' stays a string)."""
    for cast in (int, float):
        try:
            n = cast(value)
        except ValueError:
            continue
        if str(n) == value:
            return n
    return None


def _by_ref(resources: Iterable[Resource]) -> dict[str, Resource]:
    return {f"{r['resourceType']}/{r['id']}": r for r in resources if r.get("id")}


def slip_no_of(sr: Resource) -> str:
    """The referrer's slip number carried by a referral ServiceRequest."""
    req = sr.get("requisition") or {}
    if req.get("value"):
        return str(req["value"])
    for i in sr.get("identifier") or []:
        if str(i.get("system", "")).startswith("urn:hutong:referral-slip:"):
            return str(i.get("value", ""))
    return ""


# -- referral (转诊单) ------------------------------------------------------------------------


def referral_bundle(
    slip: ReferralSlip,
    maps: SiteMaps | None,
    me: str,
    *,
    national_id_system: str = NATIONAL_ID_SYSTEM,
    strict: Iterable[str] = STRICT,
    gaps: list[Observed] | None = None,
) -> Resource:
    """The transaction Bundle for ``host.submit_referral``: Patient, Consent (only when someone
    signed), ServiceRequest, Composition (病历摘要). Raises :class:`SlipError` on a bad slip."""
    codes = Codes(maps, me, gaps)
    slip_no = _need("slip_no", slip.slip_no)
    if slip.kind not in KINDS:
        raise BadValue("kind", f"referral kind {slip.kind!r} is not one of {', '.join(KINDS)}")
    to_member = _need("to_member", slip.to_member)
    name = _need("patient_name", slip.patient_name)
    if slip.gender not in GENDERS:
        raise BadValue("gender", f"gender {slip.gender!r} is not one of {', '.join(GENDERS)}")
    birth = _date("birth_date", slip.birth_date)
    id_number = _need("id_number", slip.id_number).upper()
    if not re.fullmatch(r"\d{17}[\dX]", id_number):
        raise BadValue("id_number", "'id_number' is not an 18-character resident ID number")
    written = _datetime("written_at", slip.written_at)
    diagnosis = codes.concept(
        "diagnosis",
        _need("diagnosis_code", slip.diagnosis_code),
        slip.diagnosis_name.strip(),
        field="diagnosis_code",
        strict=strict,
    )
    p, sr, comp = _u(), _u(), _u()
    idents = [{"system": national_id_system, "value": id_number}]
    if slip.mrn.strip():
        idents.append({"system": MRN_SYSTEM.format(member=me), "value": slip.mrn.strip()})
    patient: Resource = {
        "resourceType": "Patient",
        "identifier": idents,
        "name": [{"text": name}],
        "gender": slip.gender,
        "birthDate": birth,
    }
    if slip.phone.strip():
        patient["telecom"] = [{"system": "phone", "value": slip.phone.strip(), "use": "mobile"}]
    request: Resource = {
        "resourceType": "ServiceRequest",
        "status": "active",
        "intent": "order",
        "identifier": [_slip_identifier(me, slip_no)],
        "requisition": {"system": SLIP_SYSTEM.format(member=me), "value": slip_no},
        "priority": "urgent" if slip.urgent else "routine",
        "code": {
            "coding": [{"system": KIND_SYSTEM, "code": slip.kind, "display": KINDS[slip.kind].zh}]
        },
        "subject": {"reference": p},
        "authoredOn": written,
        "performer": [{"reference": f"Organization/{to_member}"}],
        "reasonCode": [diagnosis],
    }
    if slip.department_code.strip():
        request["performerType"] = codes.concept("department", slip.department_code.strip())
    if slip.reason.strip():
        request["note"] = [{"text": slip.reason.strip()}]
    codes.mark(request)
    composition: Resource = {
        "resourceType": "Composition",
        "status": "final",
        "type": {
            "coding": [{"system": LOINC, "code": REFERRAL_NOTE[0], "display": REFERRAL_NOTE[1]}],
            "text": "转诊病历摘要",
        },
        "subject": {"reference": p},
        "date": written,
        "author": [{"display": slip.doctor.strip() or "未署名"}],
        "title": "病历摘要",
        "section": [{"title": "病历摘要", "text": _div(slip.summary.strip() or "无")}],
    }
    resources = [(p, patient), (sr, request), (comp, composition)]
    if slip.consent_by.strip():
        resources.append(
            (
                _u(),
                {
                    "resourceType": "Consent",
                    "status": "active",
                    "scope": {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/consentscope",
                                "code": "treatment",
                            }
                        ]
                    },
                    "category": [
                        {
                            "coding": [
                                {"system": LOINC, "code": "59284-0", "display": "Patient Consent"}
                            ]
                        }
                    ],
                    "patient": {"reference": p},
                    "dateTime": written,
                    "performer": [{"display": slip.consent_by.strip()}],
                    "policyRule": {"text": f"{slip.consent_by.strip()}同意转诊"},
                },
            )
        )
    return _entries(resources, codes)


def referral_from_fhir(
    view: dict[str, Any],
    maps: SiteMaps | None,
    *,
    patient: Resource | None = None,
    me: str = "local",
    gaps: list[Observed] | None = None,
) -> ReferralSlip:
    """The referral slip as the RECEIVER's HIS should see it, from ``host.referral(thread)``.

    ``patient``: the receiver's Patient when it is not among the thread's resources (a patient
    matched to an existing local record is not stored again under the thread).
    """
    codes = Codes(maps, me, gaps)
    row = view["referral"]
    resources = view["resources"]
    refs = _by_ref(resources)
    sr = refs[f"ServiceRequest/{row['sr_id']}"]
    subject = sr["subject"]["reference"]
    task = refs.get(f"Task/{row['task_id']}")
    if task is not None:
        subject = task["for"]["reference"]
    pat = (
        patient
        or refs.get(subject)
        or next((r for r in resources if r["resourceType"] == "Patient"), {})
    )
    comp = next(
        (
            r
            for r in resources
            if r["resourceType"] == "Composition" and _has_code(r.get("type"), REFERRAL_NOTE[0])
        ),
        {},
    )
    consent = next((r for r in resources if r["resourceType"] == "Consent"), {})
    kind = next(
        (
            c["code"]
            for c in (sr.get("code") or {}).get("coding") or []
            if c.get("system") == KIND_SYSTEM
        ),
        "",
    )
    dx_code, dx_name = codes.local("diagnosis", (sr.get("reasonCode") or [None])[0])
    dept, _ = codes.local("department", sr.get("performerType"))
    performer = ((sr.get("performer") or [{}])[0].get("reference") or "").split("/")[-1]
    return ReferralSlip(
        slip_no=slip_no_of(sr),
        kind=kind,
        to_member=performer,
        patient_name=((pat.get("name") or [{}])[0]).get("text", ""),
        gender=pat.get("gender", "unknown"),
        birth_date=pat.get("birthDate", ""),
        id_number="",
        phone=next(
            (t.get("value", "") for t in pat.get("telecom") or [] if t.get("system") == "phone"), ""
        ),
        mrn=_mrn(pat, row.get("referrer")),
        diagnosis_code=dx_code,
        diagnosis_name=dx_name,
        reason=" ".join(n.get("text", "") for n in sr.get("note") or []),
        summary=_undiv((comp.get("section") or [{}])[0].get("text")),
        department_code=dept,
        urgent=sr.get("priority") in ("urgent", "asap", "stat"),
        consent_by=((consent.get("performer") or [{}])[0]).get("display", ""),
        doctor=((comp.get("author") or [{}])[0]).get("display", ""),
        written_at=sr.get("authoredOn", ""),
    )


def _mrn(patient: Resource, member: str | None) -> str:
    """The referrer's record number if the Patient carries it, else any member's."""
    idents = [
        i
        for i in patient.get("identifier") or []
        if str(i.get("system", "")).startswith("urn:hutong:mrn:")
    ]
    for i in idents:
        if member and i["system"] == MRN_SYSTEM.format(member=member):
            return str(i.get("value", ""))
    return str(idents[0].get("value", "")) if idents else ""


def _has_code(cc: Resource | None, code: str) -> bool:
    return any(c.get("code") == code for c in (cc or {}).get("coding") or [])


# -- acceptance (接诊单) ----------------------------------------------------------------------


def _output(key: str, **value: Any) -> Resource:
    return {
        "type": {
            "coding": [
                {
                    "system": OUTPUT_SYSTEM,
                    "code": f"acceptance-{key}",
                    "display": ACCEPT_OUTPUTS[key],
                }
            ],
            "text": key,
        },
        **value,
    }


def acceptance_outputs(
    slip: AcceptanceSlip,
    maps: SiteMaps | None = None,
    *,
    me: str = "local",
    gaps: list[Observed] | None = None,
) -> list[Resource]:
    """Task.output entries for ``host.referral_step(thread, "accept", outputs=...)``.

    A rejection has no outputs: call ``referral_step(thread, "reject", reason=slip.reason)``.
    """
    if not slip.accepted:
        return []
    out: list[Resource] = []
    if slip.appointment_at.strip():
        out.append(
            _output("appointment", valueDateTime=_datetime("appointment_at", slip.appointment_at))
        )
    if slip.department_code.strip():
        out.append(
            _output(
                "department",
                valueCodeableConcept=Codes(maps, me, gaps).concept(
                    "department", slip.department_code.strip()
                ),
            )
        )
    if slip.bed_no.strip():
        out.append(_output("bed", valueString=slip.bed_no.strip()))
    if slip.doctor.strip():
        out.append(_output("doctor", valueString=slip.doctor.strip()))
    return out


def acceptance_from_task(
    task: Resource,
    slip_no: str,
    maps: SiteMaps | None = None,
    *,
    me: str = "local",
    gaps: list[Observed] | None = None,
) -> AcceptanceSlip:
    """The acceptance slip from the receiver's Task as mirrored on the REFERRER's node.

    ``department_code`` is translated to the reader's local code where its map allows.
    """
    accepted = task.get("status") not in ("rejected", "cancelled", "requested", "received", "draft")
    slip = AcceptanceSlip(slip_no=slip_no, accepted=accepted)
    if not accepted:
        slip.reason = (task.get("statusReason") or {}).get("text", "")
        return slip
    for o in task.get("output") or []:
        key = next(
            (
                c["code"].removeprefix("acceptance-")
                for c in (o.get("type") or {}).get("coding") or []
                if c.get("system") == OUTPUT_SYSTEM
                and str(c.get("code", "")).startswith("acceptance-")
            ),
            (o.get("type") or {}).get("text"),
        )
        if key == "appointment":
            slip.appointment_at = str(o.get("valueDateTime", ""))
        elif key == "department":
            cc = o.get("valueCodeableConcept")
            slip.department_code = (
                Codes(maps, me, gaps).local("department", cc)[0]
                if cc
                else str(o.get("valueString", ""))
            )
        elif key == "bed":
            slip.bed_no = str(o.get("valueString", ""))
        elif key == "doctor":
            slip.doctor = str(o.get("valueString", ""))
    return slip


# -- return (转回单) --------------------------------------------------------------------------


def return_bundle(
    slip: ReturnSlip,
    sr_id: str,
    patient_ref: str,
    maps: SiteMaps | None,
    *,
    me: str = "local",
    gaps: list[Observed] | None = None,
) -> Resource:
    """The transaction Bundle for ``host.submit_referral`` closing a referral received here:
    down ServiceRequest basedOn ``ServiceRequest/<sr_id>``, Encounter, Composition (course and
    advice), a MedicationRequest per prescription (drug codes through the alliance catalogue),
    and a DiagnosticReport with one Observation per lab result."""
    codes = Codes(maps, me, gaps)
    _need("slip_no", slip.slip_no)
    written = _datetime("written_at", slip.written_at)
    diagnosis = codes.concept(
        "diagnosis",
        _need("diagnosis_code", slip.diagnosis_code),
        slip.diagnosis_name.strip(),
        field="diagnosis_code",
        strict=STRICT,
    )
    kind = "down-discharge" if slip.discharge else "down-outpatient"
    down_u, enc_u, comp_u = _u(), _u(), _u()
    down: Resource = {
        "resourceType": "ServiceRequest",
        "status": "active",
        "intent": "order",
        "basedOn": [{"reference": f"ServiceRequest/{sr_id}"}],
        "requisition": {"system": "urn:hutong:referral-slip", "value": slip.slip_no.strip()},
        "code": {"coding": [{"system": KIND_SYSTEM, "code": kind, "display": KINDS[kind].zh}]},
        "subject": {"reference": patient_ref},
        "authoredOn": written,
        "reasonCode": [diagnosis],
    }
    if slip.advice.strip():
        down["note"] = [{"text": slip.advice.strip()}]
    codes.mark(down)
    encounter: Resource = {
        "resourceType": "Encounter",
        "status": "finished",
        "class": {"system": ACT_CODE, "code": "IMP" if slip.discharge else "AMB"},
        "subject": {"reference": patient_ref},
        "period": {"end": written},
    }
    doc = DISCHARGE_SUMMARY if slip.discharge else CONSULT_NOTE
    composition: Resource = {
        "resourceType": "Composition",
        "status": "final",
        "type": {"coding": [{"system": LOINC, "code": doc[0], "display": doc[1]}]},
        "subject": {"reference": patient_ref},
        "encounter": {"reference": enc_u},
        "date": written,
        "author": [{"display": slip.doctor.strip() or "未署名"}],
        "title": "出院小结" if slip.discharge else "门诊诊疗小结",
        "section": [
            {
                "title": "住院经过" if slip.discharge else "诊疗经过",
                "code": {"coding": [{"system": SECTION_SYSTEM, "code": "course"}]},
                "text": _div(slip.course.strip() or "无"),
            },
            {
                "title": "康复指导",
                "code": {"coding": [{"system": SECTION_SYSTEM, "code": "advice"}]},
                "text": _div(slip.advice.strip() or "无"),
            },
        ],
    }
    resources = [(down_u, down), (enc_u, encounter), (comp_u, composition)]
    for n, rx in enumerate(slip.prescriptions):
        resources.append((_u(), _medication(rx, n, codes, patient_ref, enc_u, written)))
    if slip.results:
        obs = [
            (_u(), _observation(lab, n, codes, patient_ref, written))
            for n, lab in enumerate(slip.results)
        ]
        resources.append(
            (
                _u(),
                {
                    "resourceType": "DiagnosticReport",
                    "status": "final",
                    "category": [
                        {
                            "coding": [
                                {
                                    "system": "http://terminology.hl7.org/CodeSystem/v2-0074",
                                    "code": "LAB",
                                }
                            ]
                        }
                    ],
                    "code": {
                        "coding": [
                            {"system": LOINC, "code": "11502-2", "display": "Laboratory report"}
                        ],
                        "text": "检验报告",
                    },
                    "subject": {"reference": patient_ref},
                    "encounter": {"reference": enc_u},
                    "effectiveDateTime": written,
                    "issued": written,
                    "result": [{"reference": u} for u, _ in obs],
                },
            )
        )
        resources.extend(obs)
    return _entries(resources, codes)


def _medication(
    rx: Prescription, n: int, codes: Codes, patient_ref: str, enc: str, written: str
) -> Resource:
    field = f"prescriptions[{n}]"
    code = _need(f"{field}.drug_code", rx.drug_code)
    dose = _need(f"{field}.dose", rx.dose)
    freq = _need(f"{field}.frequency", rx.frequency)
    if not isinstance(rx.days, int) or rx.days < 0:
        raise BadValue(f"{field}.days", f"'{field}.days' is not a whole number of days")
    dosage: Resource = {"sequence": 1, "text": f"{dose} {freq}", "timing": {"code": {"text": freq}}}
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(\S.*)", dose)
    if m:
        dosage["doseAndRate"] = [
            {
                "doseQuantity": {
                    "value": _number(m.group(1)) or float(m.group(1)),
                    "unit": m.group(2),
                }
            }
        ]
    return codes.mark(
        {
            "resourceType": "MedicationRequest",
            "status": "active",
            "intent": "order",
            "medicationCodeableConcept": codes.concept("drug", code, rx.drug_name.strip()),
            "subject": {"reference": patient_ref},
            "encounter": {"reference": enc},
            "authoredOn": written,
            "dosageInstruction": [dosage],
            "dispenseRequest": {
                "expectedSupplyDuration": {
                    "value": rx.days,
                    "unit": "天",
                    "system": UCUM,
                    "code": "d",
                }
            },
        }
    )


def _observation(lab: LabResult, n: int, codes: Codes, patient_ref: str, written: str) -> Resource:
    field = f"results[{n}]"
    code = _need(f"{field}.item_code", lab.item_code)
    value = _need(f"{field}.value", lab.value)
    obs: Resource = {
        "resourceType": "Observation",
        "status": "final",
        "category": [{"coding": [{"system": OBS_CATEGORY, "code": "laboratory"}]}],
        "code": codes.concept("lab", code, lab.item_name.strip()),
        "subject": {"reference": patient_ref},
        "effectiveDateTime": written,
    }
    number = _number(value)
    if number is not None:
        q: Resource = {"value": number}
        if lab.unit.strip():
            q["unit"] = lab.unit.strip()
        obs["valueQuantity"] = q
    else:
        obs["valueString"] = value
        if lab.unit.strip():
            obs["note"] = [{"text": f"unit: {lab.unit.strip()}"}]
    if lab.flag.strip():
        if lab.flag.strip() not in ("H", "L", "N", "A", "HH", "LL"):
            raise BadValue(f"{field}.flag", f"'{field}.flag' {lab.flag!r} is not H, L or N")
        obs["interpretation"] = [{"coding": [{"system": INTERPRETATION, "code": lab.flag.strip()}]}]
    if lab.reference_range.strip():
        obs["referenceRange"] = [{"text": lab.reference_range.strip()}]
    return codes.mark(obs)


def return_from_fhir(
    view: dict[str, Any],
    maps: SiteMaps | None,
    *,
    me: str = "local",
    gaps: list[Observed] | None = None,
) -> ReturnSlip:
    """The return slip as the REFERRER's HIS should see it (codes in the reader's catalogue).

    Prescriptions and results come in the order the Task's return outputs list them."""
    codes = Codes(maps, me, gaps)
    row = view["referral"]
    resources = view["resources"]
    refs = _by_ref(resources)
    up = refs.get(f"ServiceRequest/{row['sr_id']}", {})
    down = next(
        r
        for r in resources
        if r["resourceType"] == "ServiceRequest"
        and any(
            b.get("reference") == f"ServiceRequest/{row['sr_id']}" for b in r.get("basedOn") or []
        )
    )
    task = refs.get(f"Task/{row['task_id']}", {})
    listed = [
        o["valueReference"]["reference"] for o in task.get("output") or [] if "valueReference" in o
    ]
    picked = [refs[r] for r in listed if r in refs] or resources
    comp = next((r for r in picked if r["resourceType"] == "Composition"), {})
    sections = {
        c.get("code"): s
        for s in comp.get("section") or []
        for c in (s.get("code") or {}).get("coding") or []
        if c.get("system") == SECTION_SYSTEM
    }
    kind = next(
        (
            c["code"]
            for c in (down.get("code") or {}).get("coding") or []
            if c.get("system") == KIND_SYSTEM
        ),
        "",
    )
    dx_code, dx_name = codes.local("diagnosis", (down.get("reasonCode") or [None])[0])
    slip = ReturnSlip(
        slip_no=slip_no_of(up) or str((down.get("requisition") or {}).get("value", "")),
        discharge=kind == "down-discharge",
        diagnosis_code=dx_code,
        diagnosis_name=dx_name,
        course=_undiv(sections.get("course", {}).get("text")),
        advice=_undiv(sections.get("advice", {}).get("text")),
        doctor=((comp.get("author") or [{}])[0]).get("display", ""),
        written_at=down.get("authoredOn", ""),
    )
    for mr in (r for r in picked if r["resourceType"] == "MedicationRequest"):
        d = (mr.get("dosageInstruction") or [{}])[0]
        freq = str(((d.get("timing") or {}).get("code") or {}).get("text", ""))
        text = str(d.get("text", ""))
        code, name = codes.local("drug", mr.get("medicationCodeableConcept"))
        supply = (mr.get("dispenseRequest") or {}).get("expectedSupplyDuration") or {}
        slip.prescriptions.append(
            Prescription(
                drug_code=code,
                drug_name=name,
                dose=text[: -len(freq) - 1] if freq and text.endswith(" " + freq) else text,
                frequency=freq,
                days=int(supply.get("value", 0)),
            )
        )
    for dr in (r for r in picked if r["resourceType"] == "DiagnosticReport"):
        for ref in dr.get("result") or []:
            obs = refs.get(ref.get("reference", ""))
            if obs is not None:
                slip.results.append(_lab_result(obs, codes))
    return slip


def _lab_result(obs: Resource, codes: Codes) -> LabResult:
    code, name = codes.local("lab", obs.get("code"))
    if "valueQuantity" in obs:
        value, unit = (
            str(obs["valueQuantity"].get("value", "")),
            str(obs["valueQuantity"].get("unit", "")),
        )
    else:
        value = str(obs.get("valueString", ""))
        unit = next(
            (
                n["text"].removeprefix("unit: ")
                for n in obs.get("note") or []
                if str(n.get("text", "")).startswith("unit: ")
            ),
            "",
        )
    flag = next(
        (c.get("code", "") for i in obs.get("interpretation") or [] for c in i.get("coding") or []),
        "",
    )
    return LabResult(
        item_code=code,
        item_name=name,
        value=value,
        unit=unit,
        flag=flag,
        reference_range=((obs.get("referenceRange") or [{}])[0]).get("text", ""),
    )
