"""FHIR resources of a referral thread as a clinician reads them (HTML fragments).

Patient line, reasons, the acceptance slip (Task outputs), documents (Composition sections),
lab tables with flags (DiagnosticReport -> Observation, interpretation or reference range),
imaging reports and studies (DiagnosticReport with imagingStudy, ImagingStudy series) and
medications. Every value comes from the node's FHIR store; nothing here invents content.
"""

from __future__ import annotations

import html
import re
from typing import Any

from bridge.referral.codes import ICD10
from bridge.web.i18n import t
from bridge.web.layout import e, fmt_time, table
from bridge.web.words import resource_status

_TAGS = re.compile(r"<[^>]+>")
FLAGS = ("H", "HH", "L", "LL", "A", "AA", "N")
#: acceptance slip fields as the forms and adapters name them
SLIP_FIELDS = {
    "bed": "bed",
    "department": "department",
    "doctor": "doctor",
    "appointment": "appointment",
}


def text(cc: dict[str, Any] | None) -> str:
    """A CodeableConcept as a person reads it: its text, a coding's display, else the display
    the node's code maps give a coding (``bridge.web.words``), else the codes."""
    if not cc:
        return ""
    if not isinstance(cc, dict):
        return str(cc)
    codings = cc.get("coding") or []
    if cc.get("text"):
        return str(cc["text"])
    for c in codings:
        if c.get("display"):
            return str(c["display"])
    from bridge.web import words

    for c in codings:
        known = words.DISPLAYS.get(c.get("system"), c.get("code"))
        if known:
            return known
    return ", ".join(str(c.get("code", "")) for c in codings)


def plain(div: str | None) -> str:
    return html.unescape(_TAGS.sub(" ", div or "")).strip()


def ref(resource: dict[str, Any]) -> str:
    return f"{resource['resourceType']}/{resource.get('id', '')}"


def flag(obs: dict[str, Any]) -> str:
    """The abnormal flag: the sender's interpretation, else computed from the range."""
    for cc in obs.get("interpretation") or []:
        for c in cc.get("coding") or []:
            if c.get("code") in FLAGS:
                return str(c["code"])
    v = (obs.get("valueQuantity") or {}).get("value")
    for rr in obs.get("referenceRange") or []:
        low, high = (rr.get("low") or {}).get("value"), (rr.get("high") or {}).get("value")
        if isinstance(v, int | float):
            if high is not None and v > high:
                return "H"
            if low is not None and v < low:
                return "L"
    return ""


def ref_range(obs: dict[str, Any]) -> str:
    out = []
    for rr in obs.get("referenceRange") or []:
        if rr.get("text"):
            out.append(str(rr["text"]))
            continue
        low, high = (rr.get("low") or {}).get("value"), (rr.get("high") or {}).get("value")
        out.append(f"{'' if low is None else low}–{'' if high is None else high}")
    return "; ".join(out)


def value(obs: dict[str, Any]) -> tuple[str, str]:
    if "valueQuantity" in obs:
        q = obs["valueQuantity"]
        return str(q.get("value", "")), str(q.get("unit") or q.get("code") or "")
    for key in ("valueString", "valueInteger", "valueBoolean", "valueDateTime"):
        if key in obs:
            return str(obs[key]), ""
    if "valueCodeableConcept" in obs:
        return text(obs["valueCodeableConcept"]), ""
    return "", ""


def output_label(lang: str, o: dict[str, Any]) -> str:
    label = text(o.get("type"))
    return t(lang, SLIP_FIELDS[label]) if label in SLIP_FIELDS else label


def output_value(o: dict[str, Any], lang: str = "zh") -> str:
    """A Task output's value as written on a slip: a concept by its name, a time as people
    write it (Beijing time), a reference by its display."""
    for key, v in o.items():
        if not key.startswith("value"):
            continue
        if key == "valueCodeableConcept":
            return text(v)
        if key == "valueCoding":
            return text({"coding": [v]})
        if key in ("valueDateTime", "valueInstant"):
            return when(v, lang)
        if key == "valuePeriod" and isinstance(v, dict):
            return " – ".join(when(x, lang) for x in (v.get("start"), v.get("end")) if x)
        if isinstance(v, dict):
            return str(v.get("display") or v.get("text") or v.get("reference") or "")
        return str(v)
    return ""


def when(value: Any, lang: str = "zh") -> str:
    """A FHIR date/dateTime/instant for people: instants in Beijing time with the zone named,
    dates as they are."""
    if not value:
        return ""
    v = str(value)
    if len(v) >= 16 and "T" in v:
        shown = fmt_time(v if len(v) >= 19 else v + ":00")
        zone = "Beijing time" if lang == "en" else "北京时间"
        return f"{shown[:16]} ({zone})" if shown and shown[4:5] == "-" else v
    return v


def patient_line(lang: str, p: dict[str, Any] | None) -> str:
    if p is None:
        return ""
    name = next(
        (
            n.get("text") or "".join([*(n.get("family") or ""), *(n.get("given") or [])])
            for n in p.get("name") or []
        ),
        "",
    )
    gender = {"male": ("男", "male"), "female": ("女", "female")}.get(p.get("gender") or "")
    shown = (gender[1] if lang == "en" else gender[0]) if gender else p.get("gender")
    return (
        f'<p class="patient"><b>{e(t(lang, "patient"))}:</b> <span class="name">{e(name)}'
        f"</span> &nbsp; <b>{e(t(lang, 'gender'))}:</b> {e(shown)} &nbsp; "
        f"<b>{e(t(lang, 'birth'))}:</b> {e(p.get('birthDate'))}</p>"
    )


def reasons(sr: dict[str, Any]) -> str:
    out = []
    for rc in sr.get("reasonCode") or []:
        for c in rc.get("coding") or []:
            sys = "ICD-10 " if c.get("system") == ICD10 else ""
            out.append(f"{sys}{c.get('code', '')} {c.get('display', '')}".strip())
        if rc.get("text") and not rc.get("coding"):
            out.append(str(rc["text"]))
    return "; ".join(out)


def notes(resource: dict[str, Any]) -> str:
    return "; ".join(str(n.get("text", "")) for n in resource.get("note") or [])


def identifiers(resource: dict[str, Any], code: str) -> str:
    return ", ".join(
        str(i.get("value"))
        for i in resource.get("identifier") or []
        if any(c.get("code") == code for c in (i.get("type") or {}).get("coding") or [])
    )


def coverage_ids(res: dict[str, list[dict[str, Any]]]) -> list[str]:
    return [
        str(i.get("value"))
        for c in res.get("Coverage", [])
        for i in c.get("identifier") or []
        if i.get("value")
    ]


def acceptance(lang: str, task: dict[str, Any]) -> str:
    slip = [o for o in task.get("output") or [] if "valueReference" not in o]
    return table(
        [t(lang, "item"), t(lang, "value")],
        [[e(output_label(lang, o)), e(output_value(o, lang))] for o in slip],
        t(lang, "none"),
        "acceptance",
    )


def documents(lang: str, res: dict[str, list[dict[str, Any]]]) -> str:
    docs = []
    for c in res.get("Composition", []):
        secs = "".join(
            f"<p><b>{e(s.get('title'))}</b>: {e(plain((s.get('text') or {}).get('div')))}</p>"
            for s in c.get("section") or []
        )
        docs.append(
            f'<div class="doc"><h4>{e(c.get("title"))} '
            f"<small>{e(when(c.get('date'), lang))}</small></h4>{secs}</div>"
        )
    return "".join(docs) or f"<p>{e(t(lang, 'none'))}</p>"


def _is_imaging(dr: dict[str, Any]) -> bool:
    if dr.get("imagingStudy"):
        return True
    return any(
        c.get("code") in ("RAD", "IMG")
        for cc in dr.get("category") or []
        for c in cc.get("coding") or []
    )


def is_imaging_report(dr: dict[str, Any]) -> bool:
    """An imaging report (not a lab report with results)."""
    return _is_imaging(dr) and not dr.get("result")


def lab_tables(lang: str, res: dict[str, list[dict[str, Any]]]) -> str:
    """One table per lab report (its Observations), then Observations no report holds."""
    obs = {ref(o): o for o in res.get("Observation", [])}
    used: set[str] = set()
    heads = [t(lang, "item"), t(lang, "value"), t(lang, "unit"), t(lang, "range"), t(lang, "flag")]

    def row(o: dict[str, Any]) -> list[str]:
        v, u = value(o)
        f = flag(o)
        return [
            e(text(o.get("code"))),
            f'<span class="flag-{e(f)}">{e(v)}</span>',
            e(u),
            e(ref_range(o)),
            f'<span class="flag-{e(f)}">{e(f)}</span>',
        ]

    out = []
    for dr in res.get("DiagnosticReport", []):
        refs = [r.get("reference") for r in dr.get("result") or []]
        used.update(r for r in refs if r)
        if _is_imaging(dr) and not refs:
            continue
        rows = [row(obs[r]) for r in refs if r in obs]
        concl = f"<p>{e(dr.get('conclusion'))}</p>" if dr.get("conclusion") else ""
        at = when(dr.get("effectiveDateTime") or dr.get("issued") or "", lang)
        out.append(
            f"<h4>{e(text(dr.get('code')))} <small>{e(at)}</small></h4>{concl}"
            + table(heads, rows, t(lang, "none"), "results")
        )
    loose = [row(o) for k, o in obs.items() if k not in used]
    if loose:
        out.append(table(heads, loose, t(lang, "none"), "results"))
    return "".join(out)


def imaging(lang: str, res: dict[str, list[dict[str, Any]]], thread: str = "") -> str:
    """Imaging reports (findings, impression) and the studies they describe."""
    studies = {ref(s): s for s in res.get("ImagingStudy", [])}
    shown: set[str] = set()
    out = []
    for dr in res.get("DiagnosticReport", []):
        if not _is_imaging(dr) or dr.get("result"):
            continue
        codes = "; ".join(text(c) for c in dr.get("conclusionCode") or [])
        study_refs = [s.get("reference") for s in dr.get("imagingStudy") or []]
        shown.update(r for r in study_refs if r)
        out.append(
            f'<div class="imaging-report"><h4>{e(text(dr.get("code")))} '
            f"<small>{e(when(dr.get('effectiveDateTime') or dr.get('issued') or '', lang))}"
            f"</small></h4>"
            f'<p><b>{e(t(lang, "impression"))}:</b> <span class="conclusion">'
            f"{e(dr.get('conclusion'))}</span>"
            + (f" ({e(codes)})" if codes else "")
            + "</p>"
            + "".join(study(lang, studies[r], thread) for r in study_refs if r in studies)
            + "</div>"
        )
    out += [study(lang, s, thread) for k, s in studies.items() if k not in shown]
    return "".join(out)


def study(lang: str, s: dict[str, Any], thread: str = "") -> str:
    uid = next(
        (
            str(i.get("value", "")).removeprefix("urn:oid:")
            for i in s.get("identifier") or []
            if i.get("system") == "urn:dicom:uid"
        ),
        "",
    )
    modalities = sorted(
        {str(m.get("code")) for m in s.get("modality") or []}
        | {
            str((se.get("modality") or {}).get("code"))
            for se in s.get("series") or []
            if se.get("modality")
        }
    )
    series = [
        [
            e(se.get("number")),
            e((se.get("modality") or {}).get("code")),
            e(se.get("description")),
            e((se.get("bodySite") or {}).get("display")),
            e(se.get("numberOfInstances") or len(se.get("instance") or [])),
        ]
        for se in s.get("series") or []
    ]
    return (
        f'<div class="study"><p><b>{e(t(lang, "study"))}:</b> {e(s.get("description"))} '
        f"&nbsp; <b>{e(t(lang, 'modality'))}:</b> {e(', '.join(modalities))} &nbsp; "
        f"<b>{e(t(lang, 'started'))}:</b> {e(when(s.get('started'), lang))} &nbsp; "
        f"<b>{e(t(lang, 'instances'))}:</b> {e(s.get('numberOfInstances'))} &nbsp; "
        f'<b>Study UID:</b> <code class="study-uid">{e(uid)}</code></p>'
        + study_actions(lang, uid, s.get("_origin"), thread)
        + table(
            [
                "#",
                t(lang, "modality"),
                t(lang, "description"),
                t(lang, "body_site"),
                t(lang, "instances"),
            ],
            series,
            t(lang, "none"),
            "series",
            num=(0, 4),
        )
        + "</div>"
    )


def study_actions(lang: str, uid: str, origin: Any, thread: str) -> str:
    """A viewer link where the site has a viewer (a PACS adapter's ``viewer_url`` option with
    ``{study_uid}``), and an on-demand fetch button for a study another member holds."""
    from urllib.parse import quote, urlencode

    from bridge.web import words

    node = words.DISPLAYS.node
    if node is None or not uid:
        return ""
    out = []
    pacs = [a for a in node.plan.adapters if a.type == "pacs-dicom"]
    for a in pacs:
        viewer = a.options.get("viewer_url")
        if isinstance(viewer, str) and "{study_uid}" in viewer:
            out.append(
                f'<a class="viewer" href="{e(viewer.replace("{study_uid}", quote(uid)))}"'
                f' rel="noopener" target="_blank">{e(t(lang, "imaging_viewer"))}</a>'
            )
            break
    if (
        pacs
        and thread
        and isinstance(origin, str)
        and origin != node.plan.node_id
        and origin in node.plan.directory
    ):
        q = urlencode({"peer": origin, "study": uid})
        out.append(
            f'<form method="post" action="/ui/referrals/{e(thread)}/imaging/fetch?'
            f'{e(q)}" class="inline fetch"><button type="submit">'
            f"{e(t(lang, 'imaging_fetch'))}</button></form>"
        )
    return f'<p class="imaging-actions noprint">{" ".join(out)}</p>' if out else ""


def medications(lang: str, res: dict[str, list[dict[str, Any]]]) -> str:
    meds = [
        [
            e(
                text(m.get("medicationCodeableConcept"))
                or (m.get("medicationReference") or {}).get("display")
            ),
            e("; ".join(str(di.get("text", "")) for di in m.get("dosageInstruction") or [])),
            e(resource_status(lang, m.get("status"))),
        ]
        for m in res.get("MedicationRequest", [])
    ]
    return table(
        [t(lang, "item"), t(lang, "dosage"), t(lang, "status")], meds, t(lang, "none"), "meds"
    )


def clinical(
    lang: str,
    task: dict[str, Any],
    res: dict[str, list[dict[str, Any]]],
    thread: str = "",
    imaging_note: str = "",
) -> str:
    """Acceptance slip, documents, lab results, imaging and medications of a thread;
    ``imaging_note``: how many imaging items there are and their pages (a referral page)."""
    labs = lab_tables(lang, res)
    img = imaging(lang, res, thread)
    return (
        f"<h3>{e(t(lang, 'acceptance'))}</h3>{acceptance(lang, task)}"
        f"<h3>{e(t(lang, 'documents'))}</h3>{documents(lang, res)}"
        f"<h3>{e(t(lang, 'reports'))}</h3>{labs or '<p>' + e(t(lang, 'none')) + '</p>'}"
        f'<h3 id="imaging">{e(t(lang, "imaging"))}</h3>{imaging_note}'
        f"{img or '<p>' + e(t(lang, 'none')) + '</p>'}"
        f"<h3>{e(t(lang, 'meds'))}</h3>{medications(lang, res)}"
    )


def split_returned(
    task: dict[str, Any], res: dict[str, list[dict[str, Any]]]
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, list[dict[str, Any]]]]:
    """(what the referral carried, what the return carried), by the Task's return outputs;
    a returned report's Observations go with it."""
    returned = {
        str((o.get("valueReference") or {}).get("reference"))
        for o in task.get("output") or []
        if "valueReference" in o
    }
    for dr in res.get("DiagnosticReport", []):
        if ref(dr) in returned:
            returned.update(str(r.get("reference")) for r in dr.get("result") or [])
    sent: dict[str, list[dict[str, Any]]] = {}
    back: dict[str, list[dict[str, Any]]] = {}
    for rtype, items in res.items():
        for r in items:
            (back if ref(r) in returned else sent).setdefault(rtype, []).append(r)
    return sent, back
