"""A consultation as its pages show it (both sides): what ``load`` reads from the store (the
row, Task, ServiceRequest, the patient, the people it names, the report and the shared
records), and the HTML of its summary, meeting, report and records. Every value comes from the
node's store and is escaped; a link from the other side is made clickable only when it is a
web address. The routes are in ``consultations.py``, the printed papers in
``consult_print.py``."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import select

from bridge.consult import codes as CC
from bridge.consult import resources as CR
from bridge.consult.tables import CONSULTATION, CONSULTATION_STEP
from bridge.fhirstore import store
from bridge.referral import codes as RC
from bridge.referral.tables import REFERRAL
from bridge.web import consult_forms as forms
from bridge.web import fhirview as fv
from bridge.web.i18n import STATUS, consult_kind_name, consult_step_name, status_name, t
from bridge.web.layout import CST, Web, e, fmt_time, table
from bridge.web.words import priority_name, resource_status

#: what a consultation's record shows of the thread (the rest is the loop's machinery)
RECORD_TYPES = (
    "Composition",
    "DocumentReference",
    "DiagnosticReport",
    "Observation",
    "ImagingStudy",
    "Condition",
)


def status_word(lang: str, code: str | None) -> str:
    return status_name(lang, code) if code in STATUS else resource_status(lang, code)


def load(web: Web, thread: str) -> dict[str, Any] | None:
    """This side's consultation: row, Task, ServiceRequest, Patient, steps, the thread's
    resources by type, the report's resources and the records (shared results included,
    read from the store where the request names them)."""
    with web.ctx.store.read() as conn:
        row = conn.execute(select(CONSULTATION).where(CONSULTATION.c.thread == thread)).first()
        if row is None:
            return None
        task = store.get(conn, "Task", row.task_id)
        sr = store.get(conn, "ServiceRequest", row.sr_id)
        pref = str((task.get("for") or {}).get("reference") or "")
        res = store.by_thread(conn, thread)
        have = {fv.ref(r) for r in res}
        for s in sr.get("supportingInfo") or []:  # shared results kept outside the thread
            reference = str(s.get("reference") or "")
            rtype, _, rid = reference.partition("/")
            if reference not in have and rtype in RECORD_TYPES and store.exists(conn, rtype, rid):
                r = store.get(conn, rtype, rid)
                if (r.get("subject") or r.get("patient") or {}).get("reference") != pref:
                    continue  # only this consultation's patient's records, whatever it names
                res.append(r)
                have.add(reference)
                for o in r.get("result") or []:
                    target = str(o.get("reference") or "")
                    if (
                        target.startswith("Observation/")
                        and target not in have
                        and store.exists(conn, *target.split("/", 1))
                    ):
                        res.append(store.get(conn, *target.split("/", 1)))
                        have.add(target)

        def known(reference: str) -> dict[str, Any] | None:
            """A person the page names (the inviting doctor, an expert), from the store when
            the thread does not hold them (e.g. a PractitionerRole the centre had before)."""
            rtype, _, rid = reference.partition("/")
            if (
                reference in have
                or rtype not in ("Practitioner", "PractitionerRole")
                or not store.exists(conn, rtype, rid)
            ):
                return None
            r = store.get(conn, rtype, rid)
            res.append(r)
            have.add(reference)
            return r

        appt_ref = f"Appointment/{row.appointment_id}"
        people = [str((sr.get("requester") or {}).get("reference") or "")] + [
            str((p.get("actor") or {}).get("reference") or "")
            for a in res
            if fv.ref(a) == appt_ref
            for p in a.get("participant") or []
        ]
        for reference in people:
            role = known(reference) or next((r for r in res if fv.ref(r) == reference), None)
            if role is not None and role["resourceType"] == "PractitionerRole":
                known(str((role.get("practitioner") or {}).get("reference") or ""))
        ptype, _, pid = pref.partition("/")
        if ptype == "Patient" and pref not in have and store.exists(conn, "Patient", pid):
            res.append(store.get(conn, "Patient", pid))  # matched to a patient known here
        steps = [
            dict(s._mapping)
            for s in conn.execute(
                select(CONSULTATION_STEP)
                .where(CONSULTATION_STEP.c.thread == thread)
                .order_by(CONSULTATION_STEP.c.id)
            )
        ]
        referral = None
        if row.referral_thread:
            referral = conn.execute(
                select(REFERRAL.c.thread).where(REFERRAL.c.thread == row.referral_thread)
            ).scalar()
    by_ref = {fv.ref(r): r for r in res}
    report_refs = (row.report_refs or "").split()
    report = [by_ref[r] for r in report_refs if r in by_ref]
    records: dict[str, list[dict[str, Any]]] = {}
    for r in res:
        if (
            r["resourceType"] in RECORD_TYPES
            and fv.ref(r) not in report_refs
            and not is_report(r, f"ServiceRequest/{row.sr_id}")
        ):
            records.setdefault(r["resourceType"], []).append(r)
    appt = by_ref.get(f"Appointment/{row.appointment_id}") if row.appointment_id else None
    return {
        "row": dict(row._mapping),
        "task": task,
        "sr": sr,
        "patient": by_ref.get(pref),
        "by_ref": by_ref,
        "report": report,
        "records": records,
        "steps": steps,
        "appointment": appt,
        "referral": referral,
        "consent": next((r for r in res if r["resourceType"] == "Consent"), None),
    }


def is_report(r: dict[str, Any], focus: str) -> bool:
    """A report of this consultation (an earlier draft included): a Consult note, or a
    DiagnosticReport based on the consultation; not part of the shared record."""
    if r["resourceType"] == "Composition":
        return any(
            c.get("code") == CC.CONSULT_NOTE for c in (r.get("type") or {}).get("coding") or []
        )
    return r["resourceType"] == "DiagnosticReport" and {"reference": focus} in (
        r.get("basedOn") or []
    )


def shown_refs(d: dict[str, Any]) -> list[tuple[str, str | None]]:
    """What a consultation page shows, as (``Type/id``, patient hash) for its audit entry."""
    phash = d["row"].get("patient_hash")
    refs = [f"Task/{d['row']['task_id']}", f"ServiceRequest/{d['row']['sr_id']}"]
    if d["patient"] is not None:
        refs.append(f"Patient/{d['patient'].get('id')}")
    return [(r, phash) for r in refs]


def person_name(r: dict[str, Any] | None) -> str:
    if not r:
        return ""
    return next(
        (
            str(n.get("text") or "".join([*(n.get("family") or ""), *(n.get("given") or [])]))
            for n in r.get("name") or []
        ),
        "",
    )


def doctor(d: dict[str, Any]) -> str:
    """The inviting doctor's name (the ServiceRequest's requester)."""
    reference = str((d["sr"].get("requester") or {}).get("reference") or "")
    r = d["by_ref"].get(reference)
    if r is not None and r["resourceType"] == "PractitionerRole":
        r = d["by_ref"].get(str((r.get("practitioner") or {}).get("reference") or ""))
    return person_name(r) or str((d["sr"].get("requester") or {}).get("display") or "")


def experts(d: dict[str, Any]) -> list[str]:
    """The booked experts as ``name department``."""
    appt = d["appointment"] or {}
    out = []
    for p in appt.get("participant") or []:
        if not CR.typed(p, CC.EXPERT_ROLE):
            continue
        role = d["by_ref"].get(str((p.get("actor") or {}).get("reference") or "")) or {}
        doc = d["by_ref"].get(str((role.get("practitioner") or {}).get("reference") or ""))
        name = person_name(doc) or str((role.get("practitioner") or {}).get("display") or "")
        dept = "、".join(fv.text(s) for s in role.get("specialty") or [])
        out.append(f"{name} {dept}".strip() or str((p.get("actor") or {}).get("display") or ""))
    return out


def wall(value: Any) -> str:
    """A FHIR instant as a datetime-local field's value, in Beijing time."""
    try:
        at = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return ""
    return (at.astimezone(CST) if at.tzinfo else at).strftime("%Y-%m-%dT%H:%M")


def video_link(appt: dict[str, Any] | None) -> str:
    return next(
        (
            str(x.get("valueUrl"))
            for x in (appt or {}).get("extension") or []
            if x.get("url") == CC.VIDEO_EXTENSION and x.get("valueUrl")
        ),
        "",
    )


def study_of(d: dict[str, Any]) -> dict[str, Any] | None:
    studies = d["records"].get("ImagingStudy") or []
    return studies[0] if studies else None


def report_html(
    lang: str, d: dict[str, Any], member: Callable[[str, str], str] | None = None
) -> str:
    """The report as the inviting doctor reads it: diagnosis (with its ICD-10 code), advice,
    a referral recommendation (to ``member``'s name of the member), or an imaging reading's
    conclusion on its study."""
    out = []
    by_ref = d["by_ref"]
    for r in d["report"]:
        if r["resourceType"] == "Composition":
            parts = []
            for s in r.get("section") or []:
                codes = {c.get("code") for c in (s.get("code") or {}).get("coding") or []}
                entries = [by_ref.get(str(x.get("reference"))) for x in s.get("entry") or []]
                cls = (
                    "diagnosis"
                    if "29548-5" in codes
                    else "advice"
                    if "18776-5" in codes
                    else "referral"
                    if any(x and CR.recommends(x) for x in entries)
                    else "section"
                )
                txt = fv.plain((s.get("text") or {}).get("div"))
                icd = [
                    f"ICD-10 {c.get('code')}"
                    for x in entries
                    if x and x["resourceType"] == "Condition"
                    for c in (x.get("code") or {}).get("coding") or []
                    if c.get("system") == RC.ICD10
                ]
                if cls == "referral":
                    to = next(
                        (
                            CR.member_of(x.get("performer"))
                            for x in entries
                            if x and CR.recommends(x)
                        ),
                        None,
                    )
                    if to:
                        txt += f" → {member(lang, to) if member else to}"
                parts.append(
                    f'<p><b>{e(s.get("title"))}:</b> <span class="{cls}">{e(txt)}'
                    f"</span>{(' (' + e(', '.join(icd)) + ')') if icd else ''}</p>"
                )
            authors = "、".join(str(a.get("display") or "") for a in r.get("author") or [])
            out.append(
                f'<div class="report-box consult-note"><h4>{e(r.get("title"))} '
                f"<small>{e(fv.when(r.get('date'), lang))} · "
                f'<span class="report-status">{e(resource_status(lang, r.get("status")))}'
                f"</span></small></h4>{''.join(parts)}"
                f'<p><b>{e(t(lang, "author"))}:</b> <span class="author">{e(authors)}'
                f"</span></p></div>"
            )
        elif r["resourceType"] == "DiagnosticReport":
            studies = [by_ref.get(str(s.get("reference"))) for s in r.get("imagingStudy") or []]
            readers = "、".join(
                str(a.get("display") or "") for a in r.get("resultsInterpreter") or []
            )
            findings = fv.plain((r.get("text") or {}).get("div"))
            out.append(
                f'<div class="report-box imaging-reading"><h4>{e(fv.text(r.get("code")))} '
                f'<small><span class="report-status">{e(resource_status(lang, r.get("status")))}'
                f"</span></small></h4>"
                + (f"<p><b>{e(t(lang, 'findings'))}:</b> {e(findings)}</p>" if findings else "")
                + f'<p><b>{e(t(lang, "conclusion"))}:</b> <span class="conclusion">'
                f"{e(r.get('conclusion'))}</span></p>"
                + (
                    f'<p><b>{e(t(lang, "author"))}:</b> <span class="author">{e(readers)}'
                    f"</span></p>"
                    if readers
                    else ""
                )
                + "".join(fv.study(lang, s) for s in studies if s)
                + "</div>"
            )
    return "".join(out)


def records_html(lang: str, d: dict[str, Any]) -> str:
    """The application's record: documents, completed records, lab and imaging results."""
    rec = d["records"]
    docs = []
    for r in rec.get("DocumentReference", []):
        body = str(r.get("description") or "")
        for c in r.get("content") or []:
            att = c.get("attachment") or {}
            if not body and str(att.get("contentType", "")).startswith("text/") and att.get("data"):
                import base64

                body = base64.b64decode(att["data"]).decode("utf-8", "replace")
        docs.append(
            f'<div class="doc docref"><h4>{e(fv.text(r.get("type")))} '
            f"<small>{e(fv.when(r.get('date'), lang))}</small></h4><p>{e(body)}</p>"
            f"</div>"
        )
    labs = fv.lab_tables(lang, rec)
    img = fv.imaging(lang, rec)
    consent = d["consent"]
    signed = (
        f'<p class="consent-line"><b>{e(t(lang, "print_consent"))}:</b> '
        f"{e(resource_status(lang, consent.get('status')))} "
        f"{e(fv.when(consent.get('dateTime'), lang))}</p>"
        if consent
        else ""
    )
    none = f"<p>{e(t(lang, 'none'))}</p>"
    return (
        signed
        + f"<h4>{e(t(lang, 'documents'))}</h4>"
        + (fv.documents(lang, rec) if rec.get("Composition") else "")
        + "".join(docs)
        + ("" if rec.get("Composition") or docs else none)
        + f"<h4>{e(t(lang, 'reports'))}</h4>{labs or none}"
        + f"<h4>{e(t(lang, 'imaging'))}</h4>{img or none}"
    )


def summary_html(web: Web, lang: str, d: dict[str, Any]) -> str:
    row, sr = d["row"], d["sr"]
    reason_key = "missing" if row["step"] == "returned" else "reason_text"
    rows = [
        ("consult_no", e(fv.identifiers(sr, "PLAC"))),
        ("kind", f'<span class="kind">{e(consult_kind_name(lang, row["kind"]))}</span>'),
        ("inviter", e(web.member_name(lang, row["inviter"]))),
        ("inviting_doctor", e(doctor(d))),
        ("centre", e(web.member_name(lang, row["centre"]))),
        ("priority", e(priority_name(lang, sr.get("priority")))),
        ("status", f'<span class="status">{e(status_word(lang, row["status"]))}</span>'),
        ("step", f'<span class="step">{e(consult_step_name(lang, row["step"]))}</span>'),
        ("created", e(fmt_time(row["created_at"]))),
        ("consult_reason", f'<span class="reason">{e(fv.reasons(sr))}</span>'),
        ("question", f'<span class="question">{e(fv.notes(sr))}</span>'),
    ]
    if row.get("reason"):
        rows.append((reason_key, f'<span class="why">{e(row["reason"])}</span>'))
    if row.get("released_at"):
        rows.append(("released_at", e(fmt_time(row["released_at"]))))
    out = fv.patient_line(lang, d["patient"]) + table(
        [t(lang, "item"), t(lang, "value")],
        [[e(t(lang, k)), v] for k, v in rows],
        "",
        "consult-summary",
    )
    if row.get("pending") == "cancel":
        out += f'<p class="msg pending">{e(t(lang, "cancel_asked"))}</p>'
    if d["appointment"]:
        appt = d["appointment"]
        link = video_link(appt)
        out += f"<h3>{e(t(lang, 'meeting'))}</h3>" + table(
            [t(lang, "item"), t(lang, "value")],
            [
                [
                    e(t(lang, "meeting")),
                    (
                        f'<span class="meeting">'
                        f"{e(fv.when(appt.get('start'), lang))} – "
                        f"{e(fv.when(appt.get('end'), lang))}</span>"
                    ),
                ],
                [
                    e(t(lang, "experts")),
                    '<span class="experts">' + e("；".join(experts(d))) + "</span>",
                ],
                [
                    e(t(lang, "video_link")),
                    (
                        f'<a class="video" href="{e(link)}" rel="noopener noreferrer" '
                        f'target="_blank">{e(link)}</a>'
                    )
                    if forms.is_web_link(link)
                    else e(link),
                ],
            ],
            "",
            "meeting",
        )
    return out


def print_links(lang: str, d: dict[str, Any]) -> str:
    thread = d["row"]["thread"]
    which = ["application", "consent"] + (["report"] if d["report"] else [])
    return (
        f'<p class="prints noprint">{e(t(lang, "prints"))}: '
        + " / ".join(
            f'<a class="print-{w}" href="/ui/consultations/{e(thread)}/print/{w}">'
            f"{e(t(lang, 'print_' + w))}</a>"
            for w in which
        )
        + "</p>"
    )
