"""Consultation pages (远程会诊, MDT, remote imaging reading) for both sides of the loop.

The centre's staff and experts: the queue with pre-review (the application, the shared
records and results), return for completion, expert assignment and schedule, the report
editor beside the shared records, quality control and release. The inviting side: its
consultations with their step, resubmission, the released report, the referral pre-filled
from a report that recommends one, cancellation before the meeting, follow-up and close.

Steps go through ``ConsultWorkflow.step`` as the FHIR API's operations do, so only the steps
the state machine (``bridge/consult/states.py``) allows on this side are offered, and a
refused one renders its error code. Every page showing the patient audits the look by name.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse, Response
from sqlalchemy import select

from bridge.consult import codes as CC
from bridge.consult import resources as CR
from bridge.consult.states import CENTRE, INVITER, check
from bridge.consult.tables import CONSULTATION, CONSULTATION_STEP
from bridge.consult.workflow import REPORTED
from bridge.errors import HutongError, InvalidResource, NotFound
from bridge.fhirstore import store
from bridge.privacy import patient_hash
from bridge.referral import codes as RC
from bridge.referral.resources import iso
from bridge.referral.tables import REFERRAL
from bridge.timeinput import TIME_RULE
from bridge.web import consult_forms as forms
from bridge.web import consult_list, referral_list
from bridge.web import fhirview as fv
from bridge.web.i18n import (
    STATUS,
    consult_event_name,
    consult_kind_name,
    consult_step_name,
    kind_name,
    status_name,
    t,
)
from bridge.web.layout import CST, Web, e, fmt_time, parse_time, read_form, table
from bridge.web.words import actor_name, priority_name, resource_status

#: the steps a person takes on these pages (the others are taken by the nodes themselves)
ACTIONS = {CENTRE: ("return", "schedule", "start", "report", "release", "cancelled"),
           INVITER: ("resubmit", "cancel", "follow-up", "close")}
#: what a consultation's record shows of the thread (the rest is the loop's machinery)
RECORD_TYPES = ("Composition", "DocumentReference", "DiagnosticReport", "Observation",
                "ImagingStudy", "Condition")


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
                    if target.startswith("Observation/") and target not in have \
                            and store.exists(conn, *target.split("/", 1)):
                        res.append(store.get(conn, *target.split("/", 1)))
                        have.add(target)
        def known(reference: str) -> dict[str, Any] | None:
            """A person the page names (the inviting doctor, an expert), from the store when
            the thread does not hold them (e.g. a PractitionerRole the centre had before)."""
            rtype, _, rid = reference.partition("/")
            if reference in have or rtype not in ("Practitioner", "PractitionerRole") \
                    or not store.exists(conn, rtype, rid):
                return None
            r = store.get(conn, rtype, rid)
            res.append(r)
            have.add(reference)
            return r

        appt_ref = f"Appointment/{row.appointment_id}"
        people = [str((sr.get("requester") or {}).get("reference") or "")] + [
            str((p.get("actor") or {}).get("reference") or "")
            for a in res if fv.ref(a) == appt_ref for p in a.get("participant") or []]
        for reference in people:
            role = known(reference) or next((r for r in res if fv.ref(r) == reference), None)
            if role is not None and role["resourceType"] == "PractitionerRole":
                known(str((role.get("practitioner") or {}).get("reference") or ""))
        ptype, _, pid = pref.partition("/")
        if ptype == "Patient" and pref not in have and store.exists(conn, "Patient", pid):
            res.append(store.get(conn, "Patient", pid))  # matched to a patient known here
        steps = [dict(s._mapping) for s in conn.execute(
            select(CONSULTATION_STEP).where(CONSULTATION_STEP.c.thread == thread)
            .order_by(CONSULTATION_STEP.c.id))]
        referral = None
        if row.referral_thread:
            referral = conn.execute(select(REFERRAL.c.thread).where(
                REFERRAL.c.thread == row.referral_thread)).scalar()
    by_ref = {fv.ref(r): r for r in res}
    report_refs = (row.report_refs or "").split()
    report = [by_ref[r] for r in report_refs if r in by_ref]
    records: dict[str, list[dict[str, Any]]] = {}
    for r in res:
        if r["resourceType"] in RECORD_TYPES and fv.ref(r) not in report_refs \
                and not is_report(r, f"ServiceRequest/{row.sr_id}"):
            records.setdefault(r["resourceType"], []).append(r)
    appt = by_ref.get(f"Appointment/{row.appointment_id}") if row.appointment_id else None
    return {"row": dict(row._mapping), "task": task, "sr": sr, "patient": by_ref.get(pref),
            "by_ref": by_ref, "report": report, "records": records, "steps": steps,
            "appointment": appt, "referral": referral,
            "consent": next((r for r in res if r["resourceType"] == "Consent"), None)}


def is_report(r: dict[str, Any], focus: str) -> bool:
    """A report of this consultation (an earlier draft included): a Consult note, or a
    DiagnosticReport based on the consultation; not part of the shared record."""
    if r["resourceType"] == "Composition":
        return any(c.get("code") == CC.CONSULT_NOTE
                   for c in (r.get("type") or {}).get("coding") or [])
    return r["resourceType"] == "DiagnosticReport" and {"reference": focus} in (
        r.get("basedOn") or [])


def shown_refs(d: dict[str, Any]) -> list[tuple[str, str | None]]:
    """What a consultation page shows, as (``Type/id``, patient hash) for its audit entry."""
    phash = d["row"].get("patient_hash")
    refs = [f'Task/{d["row"]["task_id"]}', f'ServiceRequest/{d["row"]["sr_id"]}']
    if d["patient"] is not None:
        refs.append(f'Patient/{d["patient"].get("id")}')
    return [(r, phash) for r in refs]


def allowed(row: dict[str, Any], event: str) -> bool:
    if event == "cancel" and row.get("pending") == "cancel":
        return False  # asked once; the centre answers
    try:
        check(event, row["step"], row["side"])
    except HutongError:
        return False
    return True


def person_name(r: dict[str, Any] | None) -> str:
    if not r:
        return ""
    return next((str(n.get("text") or "".join([*(n.get("family") or ""),
                                                *(n.get("given") or [])]))
                 for n in r.get("name") or []), "")


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
    return next((str(x.get("valueUrl")) for x in (appt or {}).get("extension") or []
                 if x.get("url") == CC.VIDEO_EXTENSION and x.get("valueUrl")), "")


def study_of(d: dict[str, Any]) -> dict[str, Any] | None:
    studies = d["records"].get("ImagingStudy") or []
    return studies[0] if studies else None


def report_html(lang: str, d: dict[str, Any],
                member: Callable[[str, str], str] | None = None) -> str:
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
                cls = ("diagnosis" if "29548-5" in codes else "advice" if "18776-5" in codes
                       else "referral" if any(x and CR.recommends(x) for x in entries)
                       else "section")
                txt = fv.plain((s.get("text") or {}).get("div"))
                icd = [f"ICD-10 {c.get('code')}" for x in entries if x
                       and x["resourceType"] == "Condition"
                       for c in (x.get("code") or {}).get("coding") or []
                       if c.get("system") == RC.ICD10]
                if cls == "referral":
                    to = next((CR.member_of(x.get("performer")) for x in entries
                               if x and CR.recommends(x)), None)
                    if to:
                        txt += f" → {member(lang, to) if member else to}"
                parts.append(f'<p><b>{e(s.get("title"))}:</b> <span class="{cls}">{e(txt)}'
                             f'</span>{(" (" + e(", ".join(icd)) + ")") if icd else ""}</p>')
            authors = "、".join(str(a.get("display") or "") for a in r.get("author") or [])
            out.append(f'<div class="report-box consult-note"><h4>{e(r.get("title"))} '
                       f'<small>{e(fv.when(r.get("date"), lang))} · '
                       f'<span class="report-status">{e(resource_status(lang, r.get("status")))}'
                       f'</span></small></h4>{"".join(parts)}'
                       f'<p><b>{e(t(lang, "author"))}:</b> <span class="author">{e(authors)}'
                       f'</span></p></div>')
        elif r["resourceType"] == "DiagnosticReport":
            studies = [by_ref.get(str(s.get("reference"))) for s in r.get("imagingStudy") or []]
            readers = "、".join(str(a.get("display") or "")
                               for a in r.get("resultsInterpreter") or [])
            findings = fv.plain((r.get("text") or {}).get("div"))
            out.append(
                f'<div class="report-box imaging-reading"><h4>{e(fv.text(r.get("code")))} '
                f'<small><span class="report-status">{e(resource_status(lang, r.get("status")))}'
                f'</span></small></h4>'
                + (f'<p><b>{e(t(lang, "findings"))}:</b> {e(findings)}</p>' if findings else "")
                + f'<p><b>{e(t(lang, "conclusion"))}:</b> <span class="conclusion">'
                f'{e(r.get("conclusion"))}</span></p>'
                + (f'<p><b>{e(t(lang, "author"))}:</b> <span class="author">{e(readers)}'
                   f'</span></p>' if readers else "")
                + "".join(fv.study(lang, s) for s in studies if s) + "</div>")
    return "".join(out)


def records_html(lang: str, d: dict[str, Any]) -> str:
    """The application's record: documents, completed records, lab and imaging results."""
    rec = d["records"]
    docs = []
    for r in rec.get("DocumentReference", []):
        body = str(r.get("description") or "")
        for c in r.get("content") or []:
            att = c.get("attachment") or {}
            if not body and str(att.get("contentType", "")).startswith("text/") \
                    and att.get("data"):
                import base64

                body = base64.b64decode(att["data"]).decode("utf-8", "replace")
        docs.append(f'<div class="doc docref"><h4>{e(fv.text(r.get("type")))} '
                    f'<small>{e(fv.when(r.get("date"), lang))}</small></h4><p>{e(body)}</p>'
                    f'</div>')
    labs = fv.lab_tables(lang, rec)
    img = fv.imaging(lang, rec)
    consent = d["consent"]
    signed = (f'<p class="consent-line"><b>{e(t(lang, "print_consent"))}:</b> '
              f'{e(resource_status(lang, consent.get("status")))} '
              f'{e(fv.when(consent.get("dateTime"), lang))}</p>' if consent else "")
    none = f'<p>{e(t(lang, "none"))}</p>'
    return (signed + f'<h4>{e(t(lang, "documents"))}</h4>'
            + (fv.documents(lang, rec) if rec.get("Composition") else "") + "".join(docs)
            + ("" if rec.get("Composition") or docs else none)
            + f'<h4>{e(t(lang, "reports"))}</h4>{labs or none}'
            + f'<h4>{e(t(lang, "imaging"))}</h4>{img or none}')


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
        [t(lang, "item"), t(lang, "value")], [[e(t(lang, k)), v] for k, v in rows],
        "", "consult-summary")
    if row.get("pending") == "cancel":
        out += f'<p class="msg pending">{e(t(lang, "cancel_asked"))}</p>'
    if d["appointment"]:
        appt = d["appointment"]
        link = video_link(appt)
        out += (f'<h3>{e(t(lang, "meeting"))}</h3>' + table(
            [t(lang, "item"), t(lang, "value")],
            [[e(t(lang, "meeting")), (f'<span class="meeting">'
                                      f'{e(fv.when(appt.get("start"), lang))} – '
                                      f'{e(fv.when(appt.get("end"), lang))}</span>')],
             [e(t(lang, "experts")), '<span class="experts">'
              + e("；".join(experts(d))) + "</span>"],
             [e(t(lang, "video_link")),
              (f'<a class="video" href="{e(link)}" rel="noopener noreferrer" '
               f'target="_blank">{e(link)}</a>') if forms.is_web_link(link) else e(link)]],
            "", "meeting"))
    return out


def print_links(lang: str, d: dict[str, Any]) -> str:
    thread = d["row"]["thread"]
    which = ["application", "consent"] + (["report"] if d["report"] else [])
    return (f'<p class="prints noprint">{e(t(lang, "prints"))}: ' + " / ".join(
        f'<a class="print-{w}" href="/ui/consultations/{e(thread)}/print/{w}">'
        f'{e(t(lang, "print_" + w))}</a>' for w in which) + "</p>")


def consult_routes(web: Web) -> APIRouter:
    router = APIRouter()
    node = web.node

    @router.get("/consultations")
    def consultations(request: Request) -> Response:
        """The centre's queue and the inviting side's consultations: filters, patient search,
        counts and keyset paging; each patient shown is audited."""
        role = web.gate(request, "clinician")
        if not isinstance(role, str):
            return role
        lang = web.lang(request)
        q = request.query_params
        error = ""
        filters: dict[str, Any]
        try:
            filters = {k: (q.get(k) or "").strip() or None
                       for k in ("side", "step", "kind", "peer", "q", "after", "patient_hash")}
            since, until = parse_time(q.get("since")), parse_time(q.get("until"))
            with web.ctx.store.read() as conn:
                rows, total, nxt = consult_list.page(
                    conn, web.plan.patient_hash_key, since=since, until=until, **filters)
        except ValueError:  # a time or page token not understood: the rule, not the input
            error, rows, total, nxt, filters = TIME_RULE, [], 0, None, {}
        heads = [t(lang, "patient"), t(lang, "record_no"), t(lang, "kind"), t(lang, "peer"),
                 t(lang, "priority"), t(lang, "step"), t(lang, "meeting"), t(lang, "created"),
                 t(lang, "updated"), ""]

        def cells(r: dict[str, Any]) -> list[str]:
            peer = r["inviter"] if r["side"] == CENTRE else r["centre"]
            return [f'<span class="name">{e(r["patient_name"])}</span>', e(r["record_no"]),
                    e(consult_kind_name(lang, r["kind"])), e(web.member_name(lang, peer)),
                    e(priority_name(lang, r["priority"])),
                    (f'<span class="step step-{e(r["step"])}">'
                     f'{e(consult_step_name(lang, r["step"]))}</span>'),
                    e(fmt_time(r["scheduled_start"])), e(fmt_time(r["created_at"])),
                    e(fmt_time(r["updated_at"])),
                    f'<a href="/ui/consultations/{e(r["thread"])}">{e(t(lang, "open"))}</a>']

        web.audit_read(request, role, [
            (f'Patient/{r["patient_id"]}' if r["patient_id"] else f'Task/{r["task_id"]}',
             r["patient_hash"]) for r in rows], "/ui/consultations", interaction="search-type")

        def opts(values: list[tuple[str, str]], current: str | None) -> str:
            return '<option value=""></option>' + "".join(
                f'<option value="{e(v)}"{" selected" if v == current else ""}>{e(label)}'
                f'</option>' for v, label in values)

        members = [(m, web.member_name(lang, m)) for m in sorted(web.plan.directory)]
        sides = [(CENTRE, t(lang, "consult_queue")), (INVITER, t(lang, "consult_mine"))]
        step_opts = opts([(k, consult_step_name(lang, k)) for k in CC.STEPS if k != "draft"],
                         filters.get("step"))
        kind_opts = opts([(k, consult_kind_name(lang, k)) for k in CC.KINDS],
                         filters.get("kind"))
        form = (f'<form method="post" action="/ui/consultations/search" '
                f'class="inline noprint filter">'
                f'<label>{e(t(lang, "search_patient"))} <input name="q" size="18" '
                f'value="{e(filters.get("q"))}"></label>'
                + (f'<input type="hidden" name="patient_hash" '
                   f'value="{e(filters.get("patient_hash"))}">'
                   if filters.get("patient_hash") else "")
                + f'<label>{e(t(lang, "direction"))} <select name="side">'
                f'{opts(sides, filters.get("side"))}</select></label>'
                f'<label>{e(t(lang, "step"))} <select name="step">'
                f'{step_opts}</select></label>'
                f'<label>{e(t(lang, "kind"))} <select name="kind">'
                f'{kind_opts}</select></label>'
                f'<label>{e(t(lang, "peer"))} <select name="peer">'
                f'{opts(members, filters.get("peer"))}</select></label>'
                f'<label>{e(t(lang, "since"))} <input name="since" size="16" '
                f'value="{e(q.get("since") if not error else "")}"></label>'
                f'<label>{e(t(lang, "until"))} <input name="until" size="16" '
                f'value="{e(q.get("until") if not error else "")}"></label>'
                f'<button type="submit">{e(t(lang, "filter"))}</button></form>')
        keep = {k: v for k, v in q.items() if k not in ("after", "lang") and v}
        more = (f' <a class="next-page" href="/ui/consultations?'
                f'{e(urlencode({**keep, "after": nxt}))}">{e(t(lang, "next_page"))} →</a>'
                if nxt else "")
        body = ((f'<p class="bad">{e(error)}</p>' if error else "") + form
                + f'<p class="count"><span class="total">{total}</span> '
                f'{e(t(lang, "matching"))}, {len(rows)} {e(t(lang, "on_page"))}{more}</p>'
                + f'<h3>{e(t(lang, "consult_queue"))}</h3>'
                + table(heads, [cells(r) for r in rows if r["side"] == CENTRE],
                        t(lang, "none"), "queue")
                + f'<h3>{e(t(lang, "consult_mine"))}</h3>'
                + table(heads, [cells(r) for r in rows if r["side"] == INVITER],
                        t(lang, "none"), "mine"))
        return web.page(request, t(lang, "consultations"), body, role=role,
                        status=400 if error else 200)

    @router.post("/consultations/search")
    async def search_post(request: Request) -> Response:
        """The list's filter form: an ID number becomes the patient's keyed hash here, so it
        is never in a URL, the browser history or a log."""
        role = web.gate(request, "clinician")
        if not isinstance(role, str):
            return role
        f = await read_form(request)
        keep = {k: f[k].strip() for k in ("side", "step", "kind", "peer", "since", "until", "q",
                                          "patient_hash") if f.get(k, "").strip()}
        if referral_list.is_national_id(keep.get("q", "")):
            keep["patient_hash"] = patient_hash(web.plan.patient_hash_key, keep.pop("q"))
        return RedirectResponse("/ui/consultations?" + urlencode(keep), status_code=303)

    def step_forms(lang: str, d: dict[str, Any]) -> tuple[str, str]:
        """(the step forms, the report editor) this side may use now."""
        row = d["row"]
        base = f'/ui/consultations/{e(row["thread"])}/steps'
        out = []

        def button(event: str, fields: str = "") -> str:
            return (f'<form method="post" action="{base}/{event}" class="inline step {event}">'
                    f'{fields}<button type="submit">{e(t(lang, "step_" + event))}</button>'
                    f'</form>')

        def reason(label: str) -> str:
            return (f'<label>{e(t(lang, label))} <textarea name="reason" rows="2" cols="40" '
                    f'required></textarea></label>')

        if allowed(row, "return"):
            out.append(button("return", reason("missing")))
        if allowed(row, "schedule"):
            low, high = CC.KINDS[row["kind"]].experts
            names = "\n".join(experts(d))
            appt = d["appointment"] or {}
            out.append(button("schedule", (
                f'<label>{e(t(lang, "experts"))} ({e(t(lang, "experts_n"))}: {low}–{high}; '
                f'{e(t(lang, "experts_hint"))})<br><textarea name="experts" rows="{high}" '
                f'cols="40" required>{e(names)}</textarea></label><br>'
                f'<label>{e(t(lang, "start_time"))} <input type="datetime-local" name="start" '
                f'value="{e(wall(appt.get("start")))}" required></label>'
                f'<label>{e(t(lang, "end_time"))} <input type="datetime-local" name="end" '
                f'value="{e(wall(appt.get("end")))}" required></label>'
                f'<label>{e(t(lang, "video_link"))} <input type="url" name="link" size="40" '
                f'value="{e(video_link(appt))}"></label>')))
        if allowed(row, "start"):
            out.append(button("start"))
        if allowed(row, "release"):
            out.append(button("release"))
        if allowed(row, "cancelled"):
            out.append(button("cancelled", reason("reason_text")))
        if allowed(row, "resubmit"):
            out.append(button("resubmit", (
                f'<label>{e(t(lang, "records_text"))}<br><textarea name="records" rows="4" '
                f'cols="60" required></textarea></label>')))
        if allowed(row, "cancel"):
            out.append(button("cancel", reason("reason_text")))
        if allowed(row, "follow-up"):
            out.append(button("follow-up", (
                f'<label>{e(t(lang, "follow_up_text"))} <textarea name="plan" rows="2" '
                f'cols="40" required></textarea></label>'
                f'<label>{e(t(lang, "follow_up_start"))} <input type="date" name="from">'
                f'</label>')))
        if allowed(row, "close"):
            out.append(button("close"))
        editor = report_editor(lang, d, base) if allowed(row, "report") else ""
        return "".join(out), editor

    def report_editor(lang: str, d: dict[str, Any], base: str) -> str:
        row, draft = d["row"], d["report"]
        if row["kind"] == "imaging-reading":
            dr: dict[str, Any] = next(
                (r for r in draft if r["resourceType"] == "DiagnosticReport"), {})
            readers = "、".join(str(a.get("display") or "")
                               for a in dr.get("resultsInterpreter") or [])
            fields = (
                f'<label>{e(t(lang, "findings"))}<br><textarea name="findings" rows="4" '
                f'cols="60">{e(fv.plain((dr.get("text") or {}).get("div")))}</textarea>'
                f'</label><br><label>{e(t(lang, "conclusion"))}<br><textarea '
                f'name="conclusion" rows="3" cols="60" required>{e(dr.get("conclusion"))}'
                f'</textarea></label><br><label>{e(t(lang, "author"))} <input name="author" '
                f'value="{e(readers)}"></label>')
        else:
            comp: dict[str, Any] = next(
                (r for r in draft if r["resourceType"] == "Composition"), {})
            cond: dict[str, Any] = next(
                (r for r in draft if r["resourceType"] == "Condition"), {})
            rec = next((r for r in draft if CR.recommends(r)), None)
            code: dict[str, Any] = next(
                (c for c in (cond.get("code") or {}).get("coding") or []), {})
            advice = next((fv.plain((s.get("text") or {}).get("div"))
                           for s in comp.get("section") or []
                           if any(c.get("code") == "18776-5"
                                  for c in (s.get("code") or {}).get("coding") or [])), "")
            author = "、".join(str(a.get("display") or "") for a in comp.get("author") or [])
            to = CR.member_of((rec or {}).get("performer")) or ""
            members = "".join(
                f'<option value="{e(m)}"{" selected" if m == to else ""}>'
                f'{e(web.member_name(lang, m))}</option>' for m in sorted(web.plan.directory))
            fields = (
                f'<label>{e(t(lang, "icd10"))} <input name="icd10" size="10" '
                f'value="{e(code.get("code"))}"></label>'
                f'<label>{e(t(lang, "consult_diagnosis"))} <input name="diagnosis" size="40" '
                f'value="{e(fv.text(cond.get("code")) if cond else "")}" required></label><br>'
                f'<label>{e(t(lang, "advice"))}<br><textarea name="advice" rows="5" cols="60" '
                f'required>{e(advice)}</textarea></label><br>'
                f'<label><input type="checkbox" name="refer" value="1"'
                f'{" checked" if rec else ""}> {e(t(lang, "recommend_referral"))}</label>'
                f'<label>{e(t(lang, "refer_to"))} <select name="refer_to">{members}</select>'
                f'</label><br><label>{e(t(lang, "referral_note"))} <input name="referral_note" '
                f'size="50" value="{e(fv.notes(rec) if rec else "")}"></label><br>'
                f'<label>{e(t(lang, "author"))} <input name="author" value="{e(author)}">'
                f'</label>')
        return (f'<form method="post" action="{base}/report" class="step report">'
                f'<h3>{e(t(lang, "report_editor"))}</h3>{fields}<p><button type="submit">'
                f'{e(t(lang, "step_report"))}</button></p></form>')

    def referral_form(lang: str, d: dict[str, Any]) -> str:
        row = d["row"]
        if row["side"] != INVITER or row["step"] not in REPORTED \
                or not row["recommends_referral"]:
            return ""
        if d["referral"]:
            return (f'<p class="referral-made">{e(t(lang, "referral_made"))}: '
                    f'<a href="/ui/referrals/{e(d["referral"])}">{e(t(lang, "open_referral"))}'
                    f'</a></p>')
        kinds = "".join(f'<option value="{e(k)}">{e(kind_name(lang, k))}</option>'
                        for k, v in RC.KINDS.items() if v.direction == "up")
        return (f'<form method="post" action="/ui/consultations/{e(row["thread"])}/referral" '
                f'class="inline referral"><label>{e(t(lang, "referral_kind"))} '
                f'<select name="kind">{kinds}</select></label>'
                f'<label><input type="checkbox" name="consent" value="1" required> '
                f'{e(t(lang, "referral_consent"))}</label>'
                f'<button type="submit">{e(t(lang, "make_referral"))}</button></form>')

    def who(lang: str, actor: str | None) -> str:
        kind, _, rest = str(actor or "").partition(":")
        if kind == "node" and rest:  # a step the node took itself, on a packet's arrival
            return f'{t(lang, "actor_node")} {web.member_name(lang, rest)}'
        return actor_name(lang, actor, web.member_name)

    @router.get("/consultations/{thread}")
    def detail(request: Request, thread: str) -> Response:
        role = web.gate(request, "clinician")
        if not isinstance(role, str):
            return role
        lang = web.lang(request)
        d = load(web, thread)
        if d is None:
            return web.not_found(request, role, thread)
        row = d["row"]
        actions, editor = step_forms(lang, d)
        report = report_html(lang, d, web.member_name)
        draft = row["side"] == CENTRE and row["step"] in ("in-consultation", "reported")
        report_part = ""
        if report:
            head = t(lang, "report_draft") if draft else t(lang, "report")
            report_part = f'<h3>{e(head)}</h3>{report}{referral_form(lang, d)}'
        records = f'<h3>{e(t(lang, "shared_records"))}</h3>{records_html(lang, d)}'
        if editor:  # the editor with the shared records and results beside it
            work = f'<div class="beside"><div>{editor}</div><div>{records}</div></div>'
        else:
            work = records
        history = table(
            [t(lang, "at"), t(lang, "action"), t(lang, "step"), t(lang, "actor")],
            [[e(fmt_time(s["at"])), e(consult_event_name(lang, s["event"])),
              e(consult_step_name(lang, s["to_step"])),
              e(who(lang, s["actor"]))]
             for s in d["steps"]], t(lang, "none"), "history")
        web.audit_read(request, role, shown_refs(d), f"/ui/consultations/{thread}")
        msg = web.sessions.pop_flash(request)
        body = ((f'<p class="msg">{e(msg)}</p>' if msg else "") + summary_html(web, lang, d)
                + print_links(lang, d) + report_part
                + (f'<h3>{e(t(lang, "actions"))}</h3><div class="actions">{actions}</div>'
                   if actions else "")
                + work + f'<h3>{e(t(lang, "history"))}</h3>{history}')
        return web.page(request, t(lang, "consult_detail"), body, role=role)

    @router.post("/consultations/{thread}/steps/{event}")
    async def take_step(request: Request, thread: str, event: str) -> Response:
        role = web.gate(request, "clinician")
        if not isinstance(role, str):
            return role
        back = f"/ui/consultations/{thread}"
        f = await read_form(request)
        d = load(web, thread)
        if d is None:
            return web.not_found(request, role, thread)
        if event not in ACTIONS[d["row"]["side"]]:
            return web.error_page(request, role, NotFound("no such consultation step here"),
                                  back)
        patient = str(d["task"]["for"]["reference"])
        now = iso(web.ctx.now())
        bundle: dict[str, Any] | None = None
        reason: str | None = None
        try:
            if event in ("return", "cancel", "cancelled"):
                reason = f.get("reason", "").strip()
                if not reason:
                    raise InvalidResource("reason: required (what is missing, why cancelled)")
            elif event == "schedule":
                names = forms.experts(f.get("experts", ""))
                bundle = forms.schedule(d["row"]["centre"], names, f.get("start", ""),
                                        f.get("end", ""), f.get("link", ""))
            elif event == "report":
                if d["row"]["kind"] == "imaging-reading":
                    if not f.get("conclusion", "").strip():
                        raise InvalidResource("conclusion: required")
                    bundle = forms.imaging_report(patient, study_of(d), f, now=now)
                else:
                    if not f.get("advice", "").strip():
                        raise InvalidResource("advice: required")
                    bundle = forms.report(patient, f, now=now)
            elif event == "resubmit":
                if not f.get("records", "").strip():
                    raise InvalidResource("records: required")
                bundle = forms.records(patient, f["records"], now=now)
            elif event == "follow-up":
                bundle = forms.follow_up(patient, f.get("plan", ""), f.get("from", ""))
            actor = web.actor(request, role)
            await run_in_threadpool(lambda: node.consult.step(
                thread, event, actor, reason=reason, bundle=bundle))
        except HutongError as exc:
            return web.error_page(request, role, exc, back)
        except ValueError:  # a time field not understood; its text would quote the input
            return web.error_page(request, role, InvalidResource(
                "start, end: a date and time (YYYY-MM-DDThh:mm)"), back)
        return RedirectResponse(back, status_code=303)

    @router.post("/consultations/{thread}/referral")
    async def make_referral(request: Request, thread: str) -> Response:
        """The referral pre-filled from a released report that recommends one (``basedOn``
        the consultation), with the Consent the clinician confirmed: the referral workflow
        sends it; the page then opens the new referral."""
        role = web.gate(request, "clinician")
        if not isinstance(role, str):
            return role
        back = f"/ui/consultations/{thread}"
        f = await read_form(request)
        kind = f.get("kind", "up-outpatient")
        try:
            if f.get("consent") != "1":
                raise InvalidResource("consent: the patient's or family's consent to the "
                                      "referral is required")
            draft = await run_in_threadpool(node.consult.referral_draft, thread, kind)
            subject = draft["entry"][0]["resource"]["subject"]
            draft["entry"].append(forms.referral_consent(subject, iso(web.ctx.now())))
            await run_in_threadpool(node.workflow.submit, draft, web.actor(request, role))
        except HutongError as exc:
            return web.error_page(request, role, exc, back)
        d = load(web, thread)
        if d is not None and d["referral"]:
            return RedirectResponse(f'/ui/referrals/{d["referral"]}', status_code=303)
        return RedirectResponse(back, status_code=303)

    return router
