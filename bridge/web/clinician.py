"""Clinician pages: referral inbox and outbox, referral detail, and the step forms.

Steps go through ``Workflow.step`` exactly as the JSON API's do, so only the steps the state
machine allows on this side are offered, and a refused one renders its error code.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse, Response
from sqlalchemy import or_, select

from bridge.errors import HutongError, InvalidResource, NotFound
from bridge.fhirstore import store
from bridge.privacy import patient_hash
from bridge.referral.states import check
from bridge.referral.tables import REFERRAL, REFERRAL_STEP
from bridge.timeinput import TIME_RULE
from bridge.web import fhirview as fv
from bridge.web import referral_list
from bridge.web.i18n import STATUS, kind_name, pilot_name, status_name, step_name, t
from bridge.web.layout import Web, e, fmt_time, parse_time, read_form, table
from bridge.web.returns import return_bundle
from bridge.web.words import actor_name, event_name, priority_name

ACTIONS = ("accept", "reject", "arrive", "cancel")


#: the patient's imaging listed on a referral page: this many of each type a page, newest first
IMAGING_PAGE = 20
IMAGING_TYPES = ("ImagingStudy", "DiagnosticReport")


def load_thread(
    web: Web,
    thread: str,
    imaging_after: Mapping[str, str | None] | None = None,
) -> dict[str, Any] | None:
    """This side's referral row, Task, ServiceRequest, Patient, steps and resources by type,
    with a page of the patient's imaging of each type held here (``imaging_after``: the
    cursor of each type's page) and how many there are (``imaging``: total and next page)."""
    with web.ctx.store.read() as conn:
        row = conn.execute(select(REFERRAL).where(REFERRAL.c.thread == thread)).first()
        if row is None:
            return None
        task = store.get(conn, "Task", row.task_id)
        sr = store.get(conn, "ServiceRequest", row.sr_id)
        patient = None
        pref = ((task.get("for") or {}).get("reference") or "").split("/")
        if len(pref) == 2 and store.exists(conn, "Patient", pref[1]):
            patient = store.get(conn, "Patient", pref[1])
        res = store.by_thread(conn, thread)
        steps = [
            dict(s._mapping)
            for s in conn.execute(
                select(REFERRAL_STEP)
                .where(REFERRAL_STEP.c.thread == thread)
                .order_by(REFERRAL_STEP.c.id)
            )
        ]
    by_type: dict[str, list[dict[str, Any]]] = {}
    for r in res:
        by_type.setdefault(r["resourceType"], []).append(r)
    mine = {fv.ref(r) for r in res}
    imaging: dict[str, dict[str, Any]] = {}
    for rtype in IMAGING_TYPES if row.patient_hash else ():  # this patient's, other threads
        items, total, nxt = patient_imaging_page(
            web, row.patient_hash, rtype, after=(imaging_after or {}).get(rtype)
        )
        imaging[rtype] = {"total": total, "shown": len(items), "next": nxt}
        for r in items:
            if fv.ref(r) not in mine:
                by_type.setdefault(r["resourceType"], []).append(r)
    return {
        "row": dict(row._mapping),
        "task": task,
        "sr": sr,
        "patient": patient,
        "res": by_type,
        "steps": steps,
        "imaging": imaging,
    }


def imaging_where(rtype: str, patient_hash: str) -> list[Any]:
    """A patient's imaging of one type held here, by keyed hash, as SQL: every ImagingStudy;
    a DiagnosticReport when it is an imaging report (``fv.is_imaging_report``: it names a
    study or is coded RAD/IMG, and holds no lab results), so counts and pages are exact."""
    from bridge.fhirstore.tables import FHIR_RESOURCE as T

    where = [T.c.rtype == rtype, T.c.patient_hash == patient_hash]
    if rtype == "DiagnosticReport":
        where += [
            ~store.has_token(rtype, "result"),
            or_(
                store.token_match(rtype, "category", ["RAD", "IMG"]),
                store.body_has('"imagingStudy":'),
            ),
        ]
    return where


def patient_imaging_page(
    web: Web, patient_hash: str, rtype: str, *, after: str | None = None, limit: int = IMAGING_PAGE
) -> tuple[list[dict[str, Any]], int, str | None]:
    """One page of a patient's imaging studies or imaging reports held here (a CT done before
    the referral, or at the receiver after it, whether it travelled in the thread or not),
    newest first: (resources, how many in all, next page's cursor). Keyset paging as the
    /local/v1 lists (bridge/api/paging.py), in the order of ``ix_fhir_type_patient_hash``."""
    import orjson

    from bridge.api import paging
    from bridge.fhirstore.tables import FHIR_RESOURCE as T

    with web.ctx.store.read() as conn:
        rows, total, nxt = paging.page(
            conn,
            select(T.c.body, T.c.origin, T.c.last_updated, T.c.id),
            where=imaging_where(rtype, patient_hash),
            order=[T.c.last_updated, T.c.id],
            desc=(True, False),
            limit=limit,
            after=after,
        )
    out = []
    for row in rows:
        r = orjson.loads(row["body"])
        r.setdefault("_origin", row["origin"])  # shown, never stored
        out.append(r)
    return out, total, nxt


def patient_imaging(
    web: Web, patient_hash: str | None, limit: int = IMAGING_PAGE
) -> list[dict[str, Any]]:
    """The first page of each type of the patient's imaging held here (newest first)."""
    if not patient_hash:
        return []
    return [
        r
        for rtype in IMAGING_TYPES
        for r in patient_imaging_page(web, patient_hash, rtype, limit=limit)[0]
    ]


def imaging_counts(lang: str, thread: str, d: dict[str, Any], query: Mapping[str, str]) -> str:
    """How many imaging studies and reports of the patient this node holds, how many are on
    this page, and the links to the next page and back to the first: no silent cap."""
    out = []
    for rtype, c in d.get("imaging", {}).items():
        if not c["total"]:
            continue
        key = f"imaging_after_{rtype}"
        keep = {k: v for k, v in query.items() if k.startswith("imaging_after_") and v}
        links = []
        if c["next"]:
            links.append(
                f'<a class="next-page" href="/ui/referrals/{e(thread)}?'
                f'{e(urlencode({**keep, key: c["next"]}))}#imaging">'
                f"{e(t(lang, 'next_page'))} →</a>"
            )
        if keep.get(key):
            first = {k: v for k, v in keep.items() if k != key}
            links.append(
                f'<a class="first-page" href="/ui/referrals/{e(thread)}'
                f'{"?" + e(urlencode(first)) if first else ""}#imaging">'
                f"{e(t(lang, 'first_page'))}</a>"
            )
        out.append(
            f'<p class="count imaging-count" data-type="{e(rtype)}">'
            f"{e(t(lang, 'patient_imaging_' + rtype))}: "
            f'<span class="total">{c["total"]}</span>, {c["shown"]} '
            f"{e(t(lang, 'on_page'))} {' '.join(links)}</p>"
        )
    return "".join(out)


def shown_refs(d: dict[str, Any]) -> list[tuple[str, str | None]]:
    """What a referral page shows, as (``Type/id``, patient hash) for its audit entry."""
    phash = d["row"].get("patient_hash")
    refs = [f"Task/{d['row']['task_id']}", f"ServiceRequest/{d['row']['sr_id']}"]
    if d["patient"] is not None:
        refs.append(f"Patient/{d['patient'].get('id')}")
    return [(r, phash) for r in refs]


def allowed(row: dict[str, Any], event: str) -> bool:
    try:
        check(event, row["status"], row["side"])
    except HutongError:
        return False
    return True


def available_slips(row: dict[str, Any]) -> list[str]:
    """Which printable slips exist yet: the referral slip always, then acceptance, return."""
    out = ["referral"]
    if row["accepted_at"] is not None or row["status"] in ("accepted", "in-progress", "completed"):
        out.append("accept")
    if row["status"] == "completed":
        out.append("return")
    return out


def clinician_routes(web: Web) -> APIRouter:
    router = APIRouter()
    node = web.node

    @router.get("/referrals")
    def referrals(request: Request) -> Response:
        """Inbox and outbox in one list with filters, patient search, counts and keyset
        paging; each patient shown is audited (one entry per patient on the page)."""
        role = web.gate(request, "clinician")
        if not isinstance(role, str):
            return role
        lang = web.lang(request)
        q = request.query_params
        error = ""
        filters: dict[str, Any]
        overdue = q.get("overdue") == "1"  # not accepted in time (the IT page's reminders)
        try:
            filters = {
                k: (q.get(k) or "").strip() or None
                for k in ("side", "status", "kind", "peer", "q", "after", "patient_hash")
            }
            since, until = parse_time(q.get("since")), parse_time(q.get("until"))
            with web.ctx.store.read() as conn:
                rows, total, nxt = referral_list.page(
                    conn,
                    web.plan.patient_hash_key,
                    since=since,
                    until=until,
                    overdue=overdue,
                    **filters,
                )
        except ValueError:  # a time or page token not understood: the rule, not the input
            error, rows, total, nxt, filters = TIME_RULE, [], 0, None, {}
        heads = [
            t(lang, "patient"),
            t(lang, "record_no"),
            t(lang, "kind"),
            t(lang, "peer"),
            t(lang, "status"),
            t(lang, "step"),
            t(lang, "green"),
            t(lang, "updated"),
            "",
        ]

        def cells(r: dict[str, Any]) -> list[str]:
            peer = r["referrer"] if r["side"] == "receiver" else r["receiver"]
            green = (
                f'<span class="green">✚ {e(t(lang, "green"))}</span>' if r["green_channel"] else ""
            )
            return [
                f'<span class="name">{e(r["patient_name"])}</span>',
                e(r["record_no"]),
                e(kind_name(lang, r["kind"])),
                e(web.member_name(lang, peer)),
                e(status_name(lang, r["status"])),
                f'<span class="step-{e(r["step"])}">{e(step_name(lang, r["step"]))}</span>',
                green,
                e(fmt_time(r["updated_at"])),
                f'<a href="/ui/referrals/{e(r["thread"])}">{e(t(lang, "open"))}</a>',
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
            "/ui/referrals",
            interaction="search-type",
        )

        def opts(values: list[tuple[str, str]], current: str | None) -> str:
            return '<option value=""></option>' + "".join(
                f'<option value="{e(v)}"{" selected" if v == current else ""}>{e(label)}</option>'
                for v, label in values
            )

        members = [(m, web.member_name(lang, m)) for m in sorted(web.plan.directory)]
        sides = [("receiver", t(lang, "inbox")), ("referrer", t(lang, "outbox"))]
        # a POST: an ID number typed here never becomes part of a URL (it is turned into the
        # patient's keyed hash first, see search_post)
        form = (
            f'<form method="post" action="/ui/referrals/search" '
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
            f"{opts(sides, filters.get('side'))}"
            f"</select></label>"
            f'<label>{e(t(lang, "status"))} <select name="status">'
            f"{opts([(k, status_name(lang, k)) for k in STATUS], filters.get('status'))}"
            f"</select></label>"
            f'<label>{e(t(lang, "peer"))} <select name="peer">'
            f"{opts(members, filters.get('peer'))}</select></label>"
            f'<label><input type="checkbox" name="overdue" value="1"'
            f"{' checked' if overdue else ''}> {e(t(lang, 'overdue'))}</label>"
            f'<label>{e(t(lang, "since"))} <input name="since" size="16" '
            f'value="{e(q.get("since") if not error else "")}"></label>'
            f'<label>{e(t(lang, "until"))} <input name="until" size="16" '
            f'value="{e(q.get("until") if not error else "")}"></label>'
            f'<button type="submit">{e(t(lang, "filter"))}</button></form>'
        )
        keep = {k: v for k, v in q.items() if k not in ("after", "lang") and v}
        more = (
            f' <a class="next-page" href="/ui/referrals?'
            f'{e(urlencode({**keep, "after": nxt}))}">{e(t(lang, "next_page"))} →</a>'
            if nxt
            else ""
        )
        body = (
            (f'<p class="bad">{e(error)}</p>' if error else "")
            + form
            + f'<p class="count"><span class="total">{total}</span> '
            f"{e(t(lang, 'matching'))}, {len(rows)} {e(t(lang, 'on_page'))}{more}</p>"
            + f"<h3>{e(t(lang, 'inbox'))}</h3>"
            + table(
                heads, [cells(r) for r in rows if r["side"] == "receiver"], t(lang, "none"), "inbox"
            )
            + f"<h3>{e(t(lang, 'outbox'))}</h3>"
            + table(
                heads,
                [cells(r) for r in rows if r["side"] == "referrer"],
                t(lang, "none"),
                "outbox",
            )
        )
        return web.page(
            request, t(lang, "referrals"), body, role=role, status=400 if error else 200
        )

    @router.post("/referrals/search")
    async def search_post(request: Request) -> Response:
        """The list's filter form: an ID number becomes the patient's keyed hash here, so it
        is never in a URL, the browser history or a log; other filters become the query."""
        role = web.gate(request, "clinician")
        if not isinstance(role, str):
            return role
        f = await read_form(request)
        keep = {
            k: f[k].strip()
            for k in ("side", "status", "peer", "since", "until", "q", "patient_hash", "overdue")
            if f.get(k, "").strip()
        }
        if referral_list.is_national_id(keep.get("q", "")):
            keep["patient_hash"] = patient_hash(web.plan.patient_hash_key, keep.pop("q"))
        return RedirectResponse("/ui/referrals?" + urlencode(keep), status_code=303)

    def action_forms(lang: str, row: dict[str, Any]) -> str:
        base = f"/ui/referrals/{e(row['thread'])}/steps"
        out = []
        if allowed(row, "accept"):
            out.append(
                f'<form method="post" action="{base}/accept" class="inline accept">'
                f'<label>{e(t(lang, "bed"))} <input name="bed"></label>'
                f'<label>{e(t(lang, "department"))} <input name="department"></label>'
                f'<label>{e(t(lang, "doctor"))} <input name="doctor"></label>'
                f"<label>{e(t(lang, 'appointment'))} "
                f'<input type="datetime-local" name="appointment"></label>'
                f'<button type="submit">{e(t(lang, "accept"))}</button></form>'
            )
        for ev in ("reject", "cancel"):
            if allowed(row, ev):
                out.append(
                    f'<form method="post" action="{base}/{ev}" class="inline {ev}">'
                    f'<label>{e(t(lang, "reason_text"))} <input name="reason" required>'
                    f'</label><button type="submit">{e(t(lang, ev))}</button></form>'
                )
        if allowed(row, "arrive"):
            out.append(
                f'<form method="post" action="{base}/arrive" class="inline arrive">'
                f'<button type="submit">{e(t(lang, "arrive"))}</button></form>'
            )
        if allowed(row, "return"):
            out.append(
                f'<form method="post" action="/ui/referrals/{e(row["thread"])}/return" '
                f'class="inline return"><p><small>{e(t(lang, "return_hint"))}</small></p>'
                f'<label>{e(t(lang, "doctor"))} <input name="doctor" required></label>'
                f'<label>{e(t(lang, "diagnosis"))} <input name="diagnosis" size="30"></label>'
                f'<br><label>{e(t(lang, "course"))}<br><textarea name="summary" rows="3" '
                f'cols="70" required></textarea></label><br>'
                f'<label>{e(t(lang, "instructions"))}<br><textarea name="instructions" '
                f'rows="2" cols="70" required></textarea></label><br>'
                f'<button type="submit">{e(t(lang, "discharge_return"))}</button></form>'
            )
        if not out:
            return ""
        return f'<h3>{e(t(lang, "actions"))}</h3><div class="noprint">{"".join(out)}</div>'

    @router.get("/referrals/{thread}")
    def detail(request: Request, thread: str) -> Response:
        role = web.gate(request, "clinician")
        if not isinstance(role, str):
            return role
        lang = web.lang(request)
        try:
            d = load_thread(
                web,
                thread,
                {k: request.query_params.get(f"imaging_after_{k}") for k in IMAGING_TYPES},
            )
        except HutongError as exc:  # an imaging page's cursor this page did not give
            return web.error_page(request, role, exc, f"/ui/referrals/{thread}")
        if d is None:
            return web.not_found(request, role, thread)
        row, sr = d["row"], d["sr"]
        green = (
            f' <span class="green">✚ {e(t(lang, "green"))}</span>' if row["green_channel"] else ""
        )
        cov = fv.coverage_ids(d["res"])
        slips = " ".join(
            f'<a class="slip-link" href="/ui/referrals/{e(thread)}/slip/{k}">'
            f"{e(t(lang, 'print'))}: {e(t(lang, 'slip_' + k))}</a>"
            for k in available_slips(row)
        )
        summary = (
            f"<p><b>{e(t(lang, 'kind'))}:</b> {e(kind_name(lang, row['kind']))}{green} &nbsp; "
            f'<b>{e(t(lang, "status"))}:</b> <span class="status">'
            f"{e(status_name(lang, row['status']))}</span> &nbsp; "
            f'<b>{e(t(lang, "step"))}:</b> <span class="step">'
            f"{e(step_name(lang, row['step']))}</span></p>"
            f"<p><b>{e(t(lang, 'from'))}:</b> {e(web.member_name(lang, row['referrer']))} "
            f"&nbsp; <b>{e(t(lang, 'to'))}:</b> {e(web.member_name(lang, row['receiver']))} "
            f"&nbsp; <b>{e(t(lang, 'updated'))}:</b> {e(fmt_time(row['updated_at']))}</p>"
            + fv.patient_line(lang, d["patient"])
            + f'<p><b>{e(t(lang, "reason"))}:</b> <span class="reason">'
            f"{e(fv.reasons(sr))}</span>"
            + (f" ({e(pilot_name(lang, row['pilot']))})" if row.get("pilot") else "")
            + "</p>"
            + f'<p><b>{e(t(lang, "notes"))}:</b> <span class="notes">{e(fv.notes(sr))}</span>'
            + (
                f" &nbsp; <b>{e(t(lang, 'reason_text'))}:</b> {e(row['reason'])}"
                if row.get("reason")
                else ""
            )
            + "</p>"
            + f"<p><b>{e(t(lang, 'priority'))}:</b> "
            f"{e(priority_name(lang, sr.get('priority')))} &nbsp; "
            f"<b>{e(t(lang, 'slip_no'))}:</b> {e(fv.identifiers(sr, 'PLAC'))} "
            f"{e(fv.identifiers(d['task'], 'FILL'))}"
            + (f" &nbsp; <b>{e(t(lang, 'insurance'))}:</b> {e(', '.join(cov))}" if cov else "")
            + "</p>"
            + f'<p class="noprint">{slips}</p>'
        )
        history = table(
            [t(lang, "at"), t(lang, "step"), t(lang, "status"), t(lang, "actor")],
            [
                [
                    e(fmt_time(s["at"])),
                    e(event_name(lang, s["event"])),
                    e(
                        f"{status_name(lang, s['from_status'])} → {status_name(lang, s['to_status'])}"
                    ),
                    e(actor_name(lang, s["actor"], web.member_name)),
                ]
                for s in d["steps"]
            ],
            t(lang, "none"),
            "history",
        )
        web.audit_read(request, role, shown_refs(d), f"/ui/referrals/{thread}")
        msg = web.sessions.pop_flash(request)  # e.g. "fetch requested"
        body = (
            (f'<p class="msg">{e(msg)}</p>' if msg else "")
            + summary
            + action_forms(lang, row)
            + fv.clinical(
                lang,
                d["task"],
                d["res"],
                thread,
                imaging_counts(lang, thread, d, request.query_params),
            )
            + f"<h3>{e(t(lang, 'history'))}</h3>{history}"
        )
        return web.page(request, t(lang, "detail"), body, role=role)

    @router.post("/referrals/{thread}/steps/{event}")
    async def take_step(request: Request, thread: str, event: str) -> Response:
        role = web.gate(request, "clinician")
        if not isinstance(role, str):
            return role
        back = f"/ui/referrals/{thread}"
        if event not in ACTIONS:
            return web.error_page(request, role, NotFound("no such referral step here"), back)
        f = await read_form(request)
        outputs: list[dict[str, Any]] = []
        try:
            if event == "accept":
                for key in ("bed", "department", "doctor"):
                    if f.get(key, "").strip():
                        outputs.append({"type": {"text": key}, "valueString": f[key].strip()})
                when = f.get("appointment", "").strip()
                if when:
                    if len(when) == 16:  # datetime-local has no seconds and no offset
                        when += ":00"
                    if datetime.fromisoformat(when).tzinfo is None:
                        when += "+08:00"  # the alliance's wall clock is China Standard Time
                    outputs.append({"type": {"text": "appointment"}, "valueDateTime": when})
            reason = f.get("reason", "").strip() or None
            if event in ("reject", "cancel") and reason is None:  # the form says required too
                raise InvalidResource("reason: required to decline or withdraw a referral")
            await run_in_threadpool(
                lambda: node.workflow.step(
                    thread, event, web.actor(request, role), reason=reason, outputs=outputs or None
                )
            )
        except HutongError as exc:
            return web.error_page(request, role, exc, back)
        except ValueError:  # the only parse here; its text would quote the input
            return web.error_page(
                request,
                role,
                InvalidResource("appointment: not a date and time (YYYY-MM-DDThh:mm)"),
                back,
            )
        return RedirectResponse(back, status_code=303)

    @router.post("/referrals/{thread}/imaging/fetch")
    def fetch_imaging(request: Request, thread: str, peer: str, study: str) -> Response:
        """Ask the member holding a study of this referral's patient for its images (the
        node's PACS adapter, ``imaging.fetch-request``); audited there."""
        role = web.gate(request, "clinician")
        if not isinstance(role, str):
            return role
        back = f"/ui/referrals/{thread}"
        pacs = next((a for a in node.adapters.values() if hasattr(a, "request_fetch")), None)
        try:
            if pacs is None:
                raise NotFound("no PACS adapter on this node")
            if peer not in web.plan.directory or peer == web.plan.node_id:
                raise NotFound("no such member to fetch from")
            if load_thread(web, thread) is None:
                raise NotFound("no such referral")
            pacs.request_fetch(peer, study, f"role:{role}")
        except HutongError as exc:
            return web.error_page(request, role, exc, back)
        web.sessions.flash(request, t(web.lang(request), "imaging_fetched"))
        return RedirectResponse(back, status_code=303)

    @router.post("/referrals/{thread}/return")
    async def discharge_and_return(request: Request, thread: str) -> Response:
        role = web.gate(request, "clinician")
        if not isinstance(role, str):
            return role
        back = f"/ui/referrals/{thread}"
        f = await read_form(request)
        d = load_thread(web, thread)
        if d is None:
            return web.not_found(request, role, thread)
        arrived = next((s["at"] for s in d["steps"] if s["event"] == "arrive"), None)
        try:
            bundle = return_bundle(d["row"], d["task"], arrived, web.ctx.now(), f)
            await run_in_threadpool(node.workflow.submit, bundle, web.actor(request, role))
        except HutongError as exc:
            return web.error_page(request, role, exc, back)
        except ValueError as exc:
            return web.error_page(request, role, InvalidResource(str(exc)), back)
        return RedirectResponse(back, status_code=303)

    return router
