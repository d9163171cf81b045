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

from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse, Response

from bridge.consult import codes as CC
from bridge.consult import resources as CR
from bridge.consult.states import CENTRE, INVITER, check
from bridge.consult.workflow import REPORTED
from bridge.errors import HutongError, InvalidResource, NotFound
from bridge.privacy import patient_hash
from bridge.referral import codes as RC
from bridge.referral.resources import iso
from bridge.timeinput import TIME_RULE
from bridge.web import consult_forms as forms
from bridge.web import consult_list, referral_list
from bridge.web import fhirview as fv
from bridge.web.consult_view import (
    experts,
    load,
    print_links,
    records_html,
    report_html,
    shown_refs,
    study_of,
    summary_html,
    video_link,
    wall,
)
from bridge.web.i18n import (
    consult_event_name,
    consult_kind_name,
    consult_step_name,
    kind_name,
    t,
)
from bridge.web.layout import Web, e, fmt_time, parse_time, read_form, table
from bridge.web.words import actor_name, priority_name

#: the steps a person takes on these pages (the others are taken by the nodes themselves)
ACTIONS = {
    CENTRE: ("return", "schedule", "start", "report", "release", "cancelled"),
    INVITER: ("resubmit", "cancel", "follow-up", "close"),
}


def allowed(row: dict[str, Any], event: str) -> bool:
    if event == "cancel" and row.get("pending") == "cancel":
        return False  # asked once; the centre answers
    try:
        check(event, row["step"], row["side"])
    except HutongError:
        return False
    return True


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
            filters = {
                k: (q.get(k) or "").strip() or None
                for k in ("side", "step", "kind", "peer", "q", "after", "patient_hash")
            }
            since, until = parse_time(q.get("since")), parse_time(q.get("until"))
            with web.ctx.store.read() as conn:
                rows, total, nxt = consult_list.page(
                    conn, web.plan.patient_hash_key, since=since, until=until, **filters
                )
        except ValueError:  # a time or page token not understood: the rule, not the input
            error, rows, total, nxt, filters = TIME_RULE, [], 0, None, {}
        heads = [
            t(lang, "patient"),
            t(lang, "record_no"),
            t(lang, "kind"),
            t(lang, "peer"),
            t(lang, "priority"),
            t(lang, "step"),
            t(lang, "meeting"),
            t(lang, "created"),
            t(lang, "updated"),
            "",
        ]

        def cells(r: dict[str, Any]) -> list[str]:
            peer = r["inviter"] if r["side"] == CENTRE else r["centre"]
            return [
                f'<span class="name">{e(r["patient_name"])}</span>',
                e(r["record_no"]),
                e(consult_kind_name(lang, r["kind"])),
                e(web.member_name(lang, peer)),
                e(priority_name(lang, r["priority"])),
                (
                    f'<span class="step step-{e(r["step"])}">'
                    f"{e(consult_step_name(lang, r['step']))}</span>"
                ),
                e(fmt_time(r["scheduled_start"])),
                e(fmt_time(r["created_at"])),
                e(fmt_time(r["updated_at"])),
                f'<a href="/ui/consultations/{e(r["thread"])}">{e(t(lang, "open"))}</a>',
            ]

        web.audit_read(
            request,
            role,
            [
                (
                    f"Patient/{r['patient_id']}" if r["patient_id"] else f"Task/{r['task_id']}",
                    r["patient_hash"],
                )
                for r in rows
            ],
            "/ui/consultations",
            interaction="search-type",
        )

        def opts(values: list[tuple[str, str]], current: str | None) -> str:
            return '<option value=""></option>' + "".join(
                f'<option value="{e(v)}"{" selected" if v == current else ""}>{e(label)}</option>'
                for v, label in values
            )

        members = [(m, web.member_name(lang, m)) for m in sorted(web.plan.directory)]
        sides = [(CENTRE, t(lang, "consult_queue")), (INVITER, t(lang, "consult_mine"))]
        step_opts = opts(
            [(k, consult_step_name(lang, k)) for k in CC.STEPS if k != "draft"], filters.get("step")
        )
        kind_opts = opts([(k, consult_kind_name(lang, k)) for k in CC.KINDS], filters.get("kind"))
        form = (
            f'<form method="post" action="/ui/consultations/search" '
            f'class="inline noprint filter">'
            f'<label>{e(t(lang, "search_patient"))} <input name="q" size="18" '
            f'value="{e(filters.get("q"))}"></label>'
            + (
                f'<input type="hidden" name="patient_hash" '
                f'value="{e(filters.get("patient_hash"))}">'
                if filters.get("patient_hash")
                else ""
            )
            + f'<label>{e(t(lang, "direction"))} <select name="side">'
            f"{opts(sides, filters.get('side'))}</select></label>"
            f'<label>{e(t(lang, "step"))} <select name="step">'
            f"{step_opts}</select></label>"
            f'<label>{e(t(lang, "kind"))} <select name="kind">'
            f"{kind_opts}</select></label>"
            f'<label>{e(t(lang, "peer"))} <select name="peer">'
            f"{opts(members, filters.get('peer'))}</select></label>"
            f'<label>{e(t(lang, "since"))} <input name="since" size="16" '
            f'value="{e(q.get("since") if not error else "")}"></label>'
            f'<label>{e(t(lang, "until"))} <input name="until" size="16" '
            f'value="{e(q.get("until") if not error else "")}"></label>'
            f'<button type="submit">{e(t(lang, "filter"))}</button></form>'
        )
        keep = {k: v for k, v in q.items() if k not in ("after", "lang") and v}
        more = (
            f' <a class="next-page" href="/ui/consultations?'
            f'{e(urlencode({**keep, "after": nxt}))}">{e(t(lang, "next_page"))} →</a>'
            if nxt
            else ""
        )
        body = (
            (f'<p class="bad">{e(error)}</p>' if error else "")
            + form
            + f'<p class="count"><span class="total">{total}</span> '
            f"{e(t(lang, 'matching'))}, {len(rows)} {e(t(lang, 'on_page'))}{more}</p>"
            + f"<h3>{e(t(lang, 'consult_queue'))}</h3>"
            + table(
                heads, [cells(r) for r in rows if r["side"] == CENTRE], t(lang, "none"), "queue"
            )
            + f"<h3>{e(t(lang, 'consult_mine'))}</h3>"
            + table(
                heads, [cells(r) for r in rows if r["side"] == INVITER], t(lang, "none"), "mine"
            )
        )
        return web.page(
            request, t(lang, "consultations"), body, role=role, status=400 if error else 200
        )

    @router.post("/consultations/search")
    async def search_post(request: Request) -> Response:
        """The list's filter form: an ID number becomes the patient's keyed hash here, so it
        is never in a URL, the browser history or a log."""
        role = web.gate(request, "clinician")
        if not isinstance(role, str):
            return role
        f = await read_form(request)
        keep = {
            k: f[k].strip()
            for k in ("side", "step", "kind", "peer", "since", "until", "q", "patient_hash")
            if f.get(k, "").strip()
        }
        if referral_list.is_national_id(keep.get("q", "")):
            keep["patient_hash"] = patient_hash(web.plan.patient_hash_key, keep.pop("q"))
        return RedirectResponse("/ui/consultations?" + urlencode(keep), status_code=303)

    def step_forms(lang: str, d: dict[str, Any]) -> tuple[str, str]:
        """(the step forms, the report editor) this side may use now."""
        row = d["row"]
        base = f"/ui/consultations/{e(row['thread'])}/steps"
        out = []

        def button(event: str, fields: str = "") -> str:
            return (
                f'<form method="post" action="{base}/{event}" class="inline step {event}">'
                f'{fields}<button type="submit">{e(t(lang, "step_" + event))}</button>'
                f"</form>"
            )

        def reason(label: str) -> str:
            return (
                f'<label>{e(t(lang, label))} <textarea name="reason" rows="2" cols="40" '
                f"required></textarea></label>"
            )

        if allowed(row, "return"):
            out.append(button("return", reason("missing")))
        if allowed(row, "schedule"):
            low, high = CC.KINDS[row["kind"]].experts
            names = "\n".join(experts(d))
            appt = d["appointment"] or {}
            out.append(
                button(
                    "schedule",
                    (
                        f"<label>{e(t(lang, 'experts'))} ({e(t(lang, 'experts_n'))}: {low}–{high}; "
                        f'{e(t(lang, "experts_hint"))})<br><textarea name="experts" rows="{high}" '
                        f'cols="40" required>{e(names)}</textarea></label><br>'
                        f'<label>{e(t(lang, "start_time"))} <input type="datetime-local" name="start" '
                        f'value="{e(wall(appt.get("start")))}" required></label>'
                        f'<label>{e(t(lang, "end_time"))} <input type="datetime-local" name="end" '
                        f'value="{e(wall(appt.get("end")))}" required></label>'
                        f'<label>{e(t(lang, "video_link"))} <input type="url" name="link" size="40" '
                        f'value="{e(video_link(appt))}"></label>'
                    ),
                )
            )
        if allowed(row, "start"):
            out.append(button("start"))
        if allowed(row, "release"):
            out.append(button("release"))
        if allowed(row, "cancelled"):
            out.append(button("cancelled", reason("reason_text")))
        if allowed(row, "resubmit"):
            out.append(
                button(
                    "resubmit",
                    (
                        f'<label>{e(t(lang, "records_text"))}<br><textarea name="records" rows="4" '
                        f'cols="60" required></textarea></label>'
                    ),
                )
            )
        if allowed(row, "cancel"):
            out.append(button("cancel", reason("reason_text")))
        if allowed(row, "follow-up"):
            out.append(
                button(
                    "follow-up",
                    (
                        f'<label>{e(t(lang, "follow_up_text"))} <textarea name="plan" rows="2" '
                        f'cols="40" required></textarea></label>'
                        f'<label>{e(t(lang, "follow_up_start"))} <input type="date" name="from">'
                        f"</label>"
                    ),
                )
            )
        if allowed(row, "close"):
            out.append(button("close"))
        editor = report_editor(lang, d, base) if allowed(row, "report") else ""
        return "".join(out), editor

    def report_editor(lang: str, d: dict[str, Any], base: str) -> str:
        row, draft = d["row"], d["report"]
        if row["kind"] == "imaging-reading":
            dr: dict[str, Any] = next(
                (r for r in draft if r["resourceType"] == "DiagnosticReport"), {}
            )
            readers = "、".join(
                str(a.get("display") or "") for a in dr.get("resultsInterpreter") or []
            )
            fields = (
                f'<label>{e(t(lang, "findings"))}<br><textarea name="findings" rows="4" '
                f'cols="60">{e(fv.plain((dr.get("text") or {}).get("div")))}</textarea>'
                f"</label><br><label>{e(t(lang, 'conclusion'))}<br><textarea "
                f'name="conclusion" rows="3" cols="60" required>{e(dr.get("conclusion"))}'
                f'</textarea></label><br><label>{e(t(lang, "author"))} <input name="author" '
                f'value="{e(readers)}"></label>'
            )
        else:
            comp: dict[str, Any] = next(
                (r for r in draft if r["resourceType"] == "Composition"), {}
            )
            cond: dict[str, Any] = next((r for r in draft if r["resourceType"] == "Condition"), {})
            rec = next((r for r in draft if CR.recommends(r)), None)
            code: dict[str, Any] = next(
                (c for c in (cond.get("code") or {}).get("coding") or []), {}
            )
            advice = next(
                (
                    fv.plain((s.get("text") or {}).get("div"))
                    for s in comp.get("section") or []
                    if any(
                        c.get("code") == "18776-5"
                        for c in (s.get("code") or {}).get("coding") or []
                    )
                ),
                "",
            )
            author = "、".join(str(a.get("display") or "") for a in comp.get("author") or [])
            to = CR.member_of((rec or {}).get("performer")) or ""
            members = "".join(
                f'<option value="{e(m)}"{" selected" if m == to else ""}>'
                f"{e(web.member_name(lang, m))}</option>"
                for m in sorted(web.plan.directory)
            )
            fields = (
                f'<label>{e(t(lang, "icd10"))} <input name="icd10" size="10" '
                f'value="{e(code.get("code"))}"></label>'
                f'<label>{e(t(lang, "consult_diagnosis"))} <input name="diagnosis" size="40" '
                f'value="{e(fv.text(cond.get("code")) if cond else "")}" required></label><br>'
                f'<label>{e(t(lang, "advice"))}<br><textarea name="advice" rows="5" cols="60" '
                f"required>{e(advice)}</textarea></label><br>"
                f'<label><input type="checkbox" name="refer" value="1"'
                f"{' checked' if rec else ''}> {e(t(lang, 'recommend_referral'))}</label>"
                f'<label>{e(t(lang, "refer_to"))} <select name="refer_to">{members}</select>'
                f'</label><br><label>{e(t(lang, "referral_note"))} <input name="referral_note" '
                f'size="50" value="{e(fv.notes(rec) if rec else "")}"></label><br>'
                f'<label>{e(t(lang, "author"))} <input name="author" value="{e(author)}">'
                f"</label>"
            )
        return (
            f'<form method="post" action="{base}/report" class="step report">'
            f'<h3>{e(t(lang, "report_editor"))}</h3>{fields}<p><button type="submit">'
            f"{e(t(lang, 'step_report'))}</button></p></form>"
        )

    def referral_form(lang: str, d: dict[str, Any]) -> str:
        row = d["row"]
        if row["side"] != INVITER or row["step"] not in REPORTED or not row["recommends_referral"]:
            return ""
        if d["referral"]:
            return (
                f'<p class="referral-made">{e(t(lang, "referral_made"))}: '
                f'<a href="/ui/referrals/{e(d["referral"])}">{e(t(lang, "open_referral"))}'
                f"</a></p>"
            )
        kinds = "".join(
            f'<option value="{e(k)}">{e(kind_name(lang, k))}</option>'
            for k, v in RC.KINDS.items()
            if v.direction == "up"
        )
        return (
            f'<form method="post" action="/ui/consultations/{e(row["thread"])}/referral" '
            f'class="inline referral"><label>{e(t(lang, "referral_kind"))} '
            f'<select name="kind">{kinds}</select></label>'
            f'<label><input type="checkbox" name="consent" value="1" required> '
            f"{e(t(lang, 'referral_consent'))}</label>"
            f'<button type="submit">{e(t(lang, "make_referral"))}</button></form>'
        )

    def who(lang: str, actor: str | None) -> str:
        kind, _, rest = str(actor or "").partition(":")
        if kind == "node" and rest:  # a step the node took itself, on a packet's arrival
            return f"{t(lang, 'actor_node')} {web.member_name(lang, rest)}"
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
            report_part = f"<h3>{e(head)}</h3>{report}{referral_form(lang, d)}"
        records = f"<h3>{e(t(lang, 'shared_records'))}</h3>{records_html(lang, d)}"
        if editor:  # the editor with the shared records and results beside it
            work = f'<div class="beside"><div>{editor}</div><div>{records}</div></div>'
        else:
            work = records
        history = table(
            [t(lang, "at"), t(lang, "action"), t(lang, "step"), t(lang, "actor")],
            [
                [
                    e(fmt_time(s["at"])),
                    e(consult_event_name(lang, s["event"])),
                    e(consult_step_name(lang, s["to_step"])),
                    e(who(lang, s["actor"])),
                ]
                for s in d["steps"]
            ],
            t(lang, "none"),
            "history",
        )
        web.audit_read(request, role, shown_refs(d), f"/ui/consultations/{thread}")
        msg = web.sessions.pop_flash(request)
        body = (
            (f'<p class="msg">{e(msg)}</p>' if msg else "")
            + summary_html(web, lang, d)
            + print_links(lang, d)
            + report_part
            + (
                f'<h3>{e(t(lang, "actions"))}</h3><div class="actions">{actions}</div>'
                if actions
                else ""
            )
            + work
            + f"<h3>{e(t(lang, 'history'))}</h3>{history}"
        )
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
            return web.error_page(request, role, NotFound("no such consultation step here"), back)
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
                bundle = forms.schedule(
                    d["row"]["centre"],
                    names,
                    f.get("start", ""),
                    f.get("end", ""),
                    f.get("link", ""),
                )
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
            await run_in_threadpool(
                lambda: node.consult.step(thread, event, actor, reason=reason, bundle=bundle)
            )
        except HutongError as exc:
            return web.error_page(request, role, exc, back)
        except ValueError:  # a time field not understood; its text would quote the input
            return web.error_page(
                request,
                role,
                InvalidResource("start, end: a date and time (YYYY-MM-DDThh:mm)"),
                back,
            )
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
                raise InvalidResource(
                    "consent: the patient's or family's consent to the referral is required"
                )
            draft = await run_in_threadpool(node.consult.referral_draft, thread, kind)
            subject = draft["entry"][0]["resource"]["subject"]
            draft["entry"].append(forms.referral_consent(subject, iso(web.ctx.now())))
            await run_in_threadpool(node.workflow.submit, draft, web.actor(request, role))
        except HutongError as exc:
            return web.error_page(request, role, exc, back)
        d = load(web, thread)
        if d is not None and d["referral"]:
            return RedirectResponse(f"/ui/referrals/{d['referral']}", status_code=303)
        return RedirectResponse(back, status_code=303)

    return router
