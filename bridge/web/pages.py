"""Server-rendered pages on the node's local port: clinician, auditor and IT views.

Plain HTML built with ``html.escape`` (no template engine, no JavaScript). Login takes the
role's bearer token from the site config and swaps it for a random session id kept in memory
(HttpOnly, SameSite=Strict cookie scoped to /ui); a node restart logs everyone out. Forms are
parsed from the urlencoded body by hand so no multipart dependency is needed.

Every page reads the node's own store through the same functions the JSON API uses
(``Workflow``, ``ops``, ``quarantine``, ``audit.export``), so the pages never show anything the
API would not.
"""

from __future__ import annotations

import html
import io
import re
import secrets
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlencode

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import select

from bridge import ops
from bridge.api.auth import role_of
from bridge.audit.export import export as export_audit
from bridge.audit.export import query as query_audit
from bridge.errors import HutongError, InvalidResource, NotFound, Unauthorized
from bridge.fhirstore import store
from bridge.referral.codes import ICD10
from bridge.referral.states import check
from bridge.referral.tables import REFERRAL, REFERRAL_STEP
from bridge.store import quarantine
from bridge.web.i18n import (
    LANG_COOKIE,
    kind_name,
    pick_lang,
    pilot_name,
    status_name,
    step_name,
    t,
)

if TYPE_CHECKING:
    from bridge.node import Node

SESSION_COOKIE = "hutong_session"
HOME = {"clinician": "/ui/referrals", "auditor": "/ui/audit", "it": "/ui/it"}
ACTIONS = ("accept", "reject", "arrive", "cancel")
_TAGS = re.compile(r"<[^>]+>")

CSS = """
body{font-family:"Noto Sans CJK SC","PingFang SC","Microsoft YaHei",sans-serif;margin:0;
 color:#222;background:#f6f7f9}
header{background:#1d4e89;color:#fff;padding:.5em 1em;display:flex;gap:1em;align-items:center}
header a{color:#fff}header .sp{flex:1}
main{padding:1em;max-width:1200px}
table{border-collapse:collapse;background:#fff;margin:.5em 0 1.5em;width:100%}
th,td{border:1px solid #ccd;padding:.3em .5em;text-align:left;vertical-align:top;font-size:.92em}
th{background:#e8edf4}
.flag-H,.flag-HH{color:#b00;font-weight:bold}.flag-L,.flag-LL{color:#0050b0;font-weight:bold}
.green{color:#087a2c;font-weight:bold}.ok{color:#087a2c;font-weight:bold}
.bad{color:#b00;font-weight:bold}.msg{background:#fff8d6;padding:.5em;border:1px solid #e0c860}
form.inline{display:inline-block;margin:.3em 1em .3em 0;padding:.5em;background:#fff;
 border:1px solid #ccd}
label{display:inline-block;margin-right:.6em}
.slip{background:#fff;padding:2em;max-width:800px;border:1px solid #999}
.slip h1{text-align:center;letter-spacing:.3em}
@media print{header,.noprint{display:none}body{background:#fff}.slip{border:none}}
"""


def e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _fmt_time(value: Any) -> str:
    if isinstance(value, datetime):
        v = value if value.tzinfo else value.replace(tzinfo=UTC)
        return v.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return "" if value is None else str(value)


def _table(headers: Iterable[str], rows: Iterable[Iterable[str]], empty: str,
           cls: str = "") -> str:
    """Rows are already-escaped HTML cells."""
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    head = "".join(f"<th>{e(h)}</th>" for h in headers)
    if not body:
        body = f'<tr><td colspan="{len(list(headers)) or 1}">{e(empty)}</td></tr>'
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _text(cc: dict[str, Any] | None) -> str:
    """A CodeableConcept as a person reads it."""
    if not cc:
        return ""
    codings = cc.get("coding") or []
    if cc.get("text"):
        return str(cc["text"])
    for c in codings:
        if c.get("display"):
            return str(c["display"])
    return ", ".join(str(c.get("code", "")) for c in codings)


def _plain(div: str | None) -> str:
    return html.unescape(_TAGS.sub(" ", div or "")).strip()


def _flag(obs: dict[str, Any]) -> str:
    for cc in obs.get("interpretation") or []:
        for c in cc.get("coding") or []:
            if c.get("code") in ("H", "HH", "L", "LL", "A", "AA", "N"):
                return str(c["code"])
    q = obs.get("valueQuantity") or {}
    v = q.get("value")
    for rr in obs.get("referenceRange") or []:
        low, high = (rr.get("low") or {}).get("value"), (rr.get("high") or {}).get("value")
        if isinstance(v, int | float):
            if high is not None and v > high:
                return "H"
            if low is not None and v < low:
                return "L"
    return ""


def _range(obs: dict[str, Any]) -> str:
    out = []
    for rr in obs.get("referenceRange") or []:
        if rr.get("text"):
            out.append(str(rr["text"]))
            continue
        low, high = (rr.get("low") or {}).get("value"), (rr.get("high") or {}).get("value")
        out.append(f"{'' if low is None else low}–{'' if high is None else high}")
    return "; ".join(out)


def _value(obs: dict[str, Any]) -> tuple[str, str]:
    if "valueQuantity" in obs:
        q = obs["valueQuantity"]
        return str(q.get("value", "")), str(q.get("unit") or q.get("code") or "")
    for key in ("valueString", "valueInteger", "valueBoolean", "valueDateTime"):
        if key in obs:
            return str(obs[key]), ""
    if "valueCodeableConcept" in obs:
        return _text(obs["valueCodeableConcept"]), ""
    return "", ""


def _output_label(o: dict[str, Any]) -> str:
    return _text(o.get("type")) or ""


def _output_value(o: dict[str, Any]) -> str:
    for key, v in o.items():
        if key.startswith("value"):
            if isinstance(v, dict):
                return str(v.get("reference") or v.get("display") or v)
            return str(v)
    return ""


def _parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    dt = datetime.fromisoformat(value.strip())
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def web_router(node: Node) -> APIRouter:
    ctx = node.ctx
    plan = ctx.plan
    router = APIRouter(prefix="/ui", include_in_schema=False)
    sessions: dict[str, str] = {}

    def lang_of(request: Request) -> str:
        return pick_lang(request.query_params.get("lang"), request.cookies.get(LANG_COOKIE))

    def member_name(lang: str, member_id: str | None) -> str:
        m = plan.directory.get(member_id or "")
        if m is None:
            return member_id or ""
        return f"{m.names.en if lang == 'en' else m.names.zh} ({member_id})"

    def page(request: Request, title: str, body: str, *, role: str | None = None,
             status: int = 200) -> HTMLResponse:
        lang = lang_of(request)
        other = "en" if lang == "zh" else "zh"
        switch = f'<a href="{e(request.url.path)}?{e(urlencode({"lang": other}))}">' \
                 f'{"English" if other == "en" else "中文"}</a>'
        nav = ""
        if role:
            nav = (f'<span>{e(t(lang, "role"))}: {e(t(lang, "role_" + role))}</span>'
                   f'<a href="{HOME[role]}">{e(t(lang, {"clinician": "referrals", "auditor": "audit", "it": "it"}[role]))}</a>'
                   f'<a href="/ui/logout">{e(t(lang, "logout"))}</a>')
        doc = (f'<!DOCTYPE html><html lang="{"en" if lang == "en" else "zh-CN"}"><head>'
               f'<meta charset="utf-8"><title>{e(title)} · {e(t(lang, "app"))}</title>'
               f'<style>{CSS}</style></head><body><header><strong>{e(t(lang, "app"))}</strong>'
               f'<span>{e(member_name(lang, plan.node_id))}</span><span class="sp"></span>'
               f'{nav}{switch}</header><main><h2>{e(title)}</h2>{body}</main></body></html>')
        resp = HTMLResponse(doc, status_code=status)
        if request.query_params.get("lang") in ("zh", "en"):
            resp.set_cookie(LANG_COOKIE, lang, max_age=365 * 86400, samesite="lax", path="/ui")
        return resp

    def gate(request: Request, *allowed: str) -> str | Response:
        """The session's role, or the response to send instead (login redirect or 403)."""
        role = sessions.get(request.cookies.get(SESSION_COOKIE) or "")
        if role is None:
            return RedirectResponse("/ui/login", status_code=303)
        if role not in allowed:
            lang = lang_of(request)
            return page(request, t(lang, "forbidden"),
                        f'<p class="bad">{e(t(lang, "forbidden_text"))}</p>'
                        f'<p><a href="{HOME[role]}">{e(t(lang, "back"))}</a></p>',
                        role=role, status=403)
        return role

    def error_page(request: Request, role: str, exc: HutongError, back: str) -> HTMLResponse:
        lang = lang_of(request)
        return page(request, t(lang, "error"),
                    f'<p class="bad">{e(exc.code)}: {e(exc.message)}</p>'
                    f'<p><a href="{e(back)}">{e(t(lang, "back"))}</a></p>',
                    role=role, status=exc.http_status)

    async def form(request: Request) -> dict[str, str]:
        raw = (await request.body()).decode("utf-8", "replace")
        return {k: v[0] for k, v in parse_qs(raw, keep_blank_values=True).items()}

    # -- login -----------------------------------------------------------------------------

    def login_form(request: Request, error: str | None = None, status: int = 200) -> Response:
        lang = lang_of(request)
        msg = f'<p class="bad">{e(error)}</p>' if error else ""
        body = (f'{msg}<form method="post" action="/ui/login" class="inline">'
                f'<label>{e(t(lang, "token"))} <input type="password" name="token" '
                f'autocomplete="off" size="40" required></label>'
                f'<button type="submit">{e(t(lang, "login"))}</button>'
                f'<p><small>{e(t(lang, "token_help"))}</small></p></form>')
        return page(request, t(lang, "login"), body, status=status)

    @router.get("/login")
    def login_get(request: Request) -> Response:
        return login_form(request)

    @router.post("/login")
    async def login_post(request: Request) -> Response:
        token = (await form(request)).get("token", "").strip()
        try:
            role = role_of(request.app.state.tokens, f"Bearer {token}")
        except Unauthorized:
            return login_form(request, t(lang_of(request), "bad_token"), 401)
        sid = secrets.token_urlsafe(32)
        sessions[sid] = role
        resp = RedirectResponse(HOME[role], status_code=303)
        resp.set_cookie(SESSION_COOKIE, sid, httponly=True, samesite="strict", path="/ui")
        return resp

    @router.get("/logout")
    def logout(request: Request) -> Response:
        sessions.pop(request.cookies.get(SESSION_COOKIE) or "", None)
        resp = RedirectResponse("/ui/login", status_code=303)
        resp.delete_cookie(SESSION_COOKIE, path="/ui")
        return resp

    @router.get("")
    @router.get("/")
    def home(request: Request) -> Response:
        role = sessions.get(request.cookies.get(SESSION_COOKIE) or "")
        return RedirectResponse(HOME[role] if role else "/ui/login", status_code=303)

    # -- clinician -------------------------------------------------------------------------

    @router.get("/referrals")
    def referrals(request: Request) -> Response:
        role = gate(request, "clinician")
        if not isinstance(role, str):
            return role
        lang = lang_of(request)
        rows = node.workflow.list(limit=500)
        heads = [t(lang, "kind"), t(lang, "status"), t(lang, "step"), t(lang, "peer"),
                 t(lang, "green"), t(lang, "updated"), ""]

        def cells(r: dict[str, Any]) -> list[str]:
            peer = r["referrer"] if r["side"] == "receiver" else r["receiver"]
            green = f'<span class="green">✚ {e(t(lang, "green"))}</span>' \
                if r["green_channel"] else ""
            return [e(kind_name(lang, r["kind"])), e(status_name(lang, r["status"])),
                    f'<span class="step-{e(r["step"])}">{e(step_name(lang, r["step"]))}</span>',
                    e(member_name(lang, peer)), green, e(_fmt_time(r["updated_at"])),
                    f'<a href="/ui/referrals/{e(r["thread"])}">{e(t(lang, "open"))}</a>']

        inbox = [cells(r) for r in rows if r["side"] == "receiver"]
        outbox = [cells(r) for r in rows if r["side"] == "referrer"]
        body = (f'<h3>{e(t(lang, "inbox"))}</h3>{_table(heads, inbox, t(lang, "none"), "inbox")}'
                f'<h3>{e(t(lang, "outbox"))}</h3>'
                f'{_table(heads, outbox, t(lang, "none"), "outbox")}')
        return page(request, t(lang, "referrals"), body, role=role)

    def load(thread: str) -> dict[str, Any] | None:
        with ctx.store.read() as conn:
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
            steps = [dict(s._mapping) for s in conn.execute(
                select(REFERRAL_STEP).where(REFERRAL_STEP.c.thread == thread)
                .order_by(REFERRAL_STEP.c.id))]
        by_type: dict[str, list[dict[str, Any]]] = {}
        for r in res:
            by_type.setdefault(r["resourceType"], []).append(r)
        return {"row": dict(row._mapping), "task": task, "sr": sr, "patient": patient,
                "res": by_type, "steps": steps}

    def patient_block(lang: str, p: dict[str, Any] | None) -> str:
        if p is None:
            return ""
        name = next((n.get("text") or "".join([*(n.get("family") or ""),
                                               *(n.get("given") or [])])
                     for n in p.get("name") or []), "")
        return (f'<p class="patient"><b>{e(t(lang, "patient"))}:</b> {e(name)} &nbsp; '
                f'<b>{e(t(lang, "gender"))}:</b> {e(p.get("gender"))} &nbsp; '
                f'<b>{e(t(lang, "birth"))}:</b> {e(p.get("birthDate"))}</p>')

    def reasons(sr: dict[str, Any]) -> str:
        out = []
        for rc in sr.get("reasonCode") or []:
            for c in rc.get("coding") or []:
                sys = "ICD-10 " if c.get("system") == ICD10 else ""
                out.append(f"{sys}{c.get('code', '')} {c.get('display', '')}".strip())
            if rc.get("text") and not rc.get("coding"):
                out.append(str(rc["text"]))
        return "; ".join(out)

    def identifiers(resource: dict[str, Any], code: str) -> str:
        return ", ".join(str(i.get("value")) for i in resource.get("identifier") or []
                         if any(c.get("code") == code
                                for c in (i.get("type") or {}).get("coding") or []))

    def coverage_ids(d: dict[str, Any]) -> list[str]:
        return [str(i.get("value")) for c in d["res"].get("Coverage", [])
                for i in c.get("identifier") or [] if i.get("value")]

    def clinical(lang: str, d: dict[str, Any]) -> str:
        """Acceptance slip, documents, reports with results, medications."""
        task, res = d["task"], d["res"]
        slip = [o for o in task.get("output") or [] if "valueReference" not in o]
        html_ = f'<h3>{e(t(lang, "acceptance"))}</h3>' + _table(
            [t(lang, "item"), t(lang, "value")],
            [[e(_output_label(o)), e(_output_value(o))] for o in slip], t(lang, "none"),
            "acceptance")
        docs = []
        for c in res.get("Composition", []):
            secs = "".join(f'<p><b>{e(s.get("title"))}</b>: '
                           f'{e(_plain((s.get("text") or {}).get("div")))}</p>'
                           for s in c.get("section") or [])
            docs.append(f'<div class="doc"><h4>{e(c.get("title"))} '
                        f'<small>{e(c.get("date"))}</small></h4>{secs}</div>')
        html_ += f'<h3>{e(t(lang, "documents"))}</h3>' + ("".join(docs) or
                                                           f'<p>{e(t(lang, "none"))}</p>')
        obs = {f"Observation/{o['id']}": o for o in res.get("Observation", [])}
        used: set[str] = set()
        heads = [t(lang, "item"), t(lang, "value"), t(lang, "unit"), t(lang, "range"),
                 t(lang, "flag")]

        def obs_row(o: dict[str, Any]) -> list[str]:
            v, u = _value(o)
            f = _flag(o)
            return [e(_text(o.get("code"))), f'<span class="flag-{e(f)}">{e(v)}</span>', e(u),
                    e(_range(o)), f'<span class="flag-{e(f)}">{e(f)}</span>']

        reports = []
        for dr in res.get("DiagnosticReport", []):
            refs = [r.get("reference") for r in dr.get("result") or []]
            used.update(r for r in refs if r)
            rows = [obs_row(obs[r]) for r in refs if r in obs]
            concl = f'<p>{e(dr.get("conclusion"))}</p>' if dr.get("conclusion") else ""
            reports.append(f'<h4>{e(_text(dr.get("code")))}</h4>{concl}'
                           + _table(heads, rows, t(lang, "none"), "results"))
        loose = [obs_row(o) for k, o in obs.items() if k not in used]
        if loose:
            reports.append(_table(heads, loose, t(lang, "none"), "results"))
        html_ += f'<h3>{e(t(lang, "reports"))}</h3>' + ("".join(reports) or
                                                         f'<p>{e(t(lang, "none"))}</p>')
        meds = [[e(_text(m.get("medicationCodeableConcept")) or
                   (m.get("medicationReference") or {}).get("display")),
                 e("; ".join(str(di.get("text", "")) for di in m.get("dosageInstruction") or [])),
                 e(m.get("status"))]
                for m in res.get("MedicationRequest", [])]
        html_ += f'<h3>{e(t(lang, "meds"))}</h3>' + _table(
            [t(lang, "item"), t(lang, "dosage"), t(lang, "status")], meds, t(lang, "none"),
            "meds")
        return html_

    def allowed(row: dict[str, Any], event: str) -> bool:
        try:
            check(event, row["status"], row["side"])
        except HutongError:
            return False
        return True

    def action_forms(lang: str, row: dict[str, Any]) -> str:
        base = f'/ui/referrals/{e(row["thread"])}/steps'
        out = []
        if allowed(row, "accept"):
            out.append(
                f'<form method="post" action="{base}/accept" class="inline accept">'
                f'<label>{e(t(lang, "bed"))} <input name="bed"></label>'
                f'<label>{e(t(lang, "department"))} <input name="department"></label>'
                f'<label>{e(t(lang, "doctor"))} <input name="doctor"></label>'
                f'<label>{e(t(lang, "appointment"))} '
                f'<input type="datetime-local" name="appointment"></label>'
                f'<button type="submit">{e(t(lang, "accept"))}</button></form>')
        for ev in ("reject", "cancel"):
            if allowed(row, ev):
                out.append(
                    f'<form method="post" action="{base}/{ev}" class="inline {ev}">'
                    f'<label>{e(t(lang, "reason_text"))} <input name="reason" required>'
                    f'</label><button type="submit">{e(t(lang, ev))}</button></form>')
        if allowed(row, "arrive"):
            out.append(f'<form method="post" action="{base}/arrive" class="inline arrive">'
                       f'<button type="submit">{e(t(lang, "arrive"))}</button></form>')
        if not out:
            return ""
        return f'<h3>{e(t(lang, "actions"))}</h3><div class="noprint">{"".join(out)}</div>'

    @router.get("/referrals/{thread}")
    def detail(request: Request, thread: str) -> Response:
        role = gate(request, "clinician")
        if not isinstance(role, str):
            return role
        lang = lang_of(request)
        d = load(thread)
        if d is None:
            return page(request, t(lang, "not_found"), f"<p>{e(thread)}</p>", role=role,
                        status=404)
        row, sr = d["row"], d["sr"]
        msg = request.query_params.get("msg")
        notes = "; ".join(str(n.get("text", "")) for n in sr.get("note") or [])
        green = f' <span class="green">✚ {e(t(lang, "green"))}</span>' \
            if row["green_channel"] else ""
        cov = coverage_ids(d)
        summary = (
            (f'<p class="msg">{e(msg)}</p>' if msg else "")
            + f'<p><b>{e(t(lang, "kind"))}:</b> {e(kind_name(lang, row["kind"]))}{green} &nbsp; '
            f'<b>{e(t(lang, "status"))}:</b> <span class="status">'
            f'{e(status_name(lang, row["status"]))}</span> &nbsp; '
            f'<b>{e(t(lang, "step"))}:</b> <span class="step">'
            f'{e(step_name(lang, row["step"]))}</span></p>'
            f'<p><b>{e(t(lang, "from"))}:</b> {e(member_name(lang, row["referrer"]))} &nbsp; '
            f'<b>{e(t(lang, "to"))}:</b> {e(member_name(lang, row["receiver"]))} &nbsp; '
            f'<b>{e(t(lang, "updated"))}:</b> {e(_fmt_time(row["updated_at"]))}</p>'
            + patient_block(lang, d["patient"])
            + f'<p><b>{e(t(lang, "reason"))}:</b> <span class="reason">{e(reasons(sr))}</span>'
            + (f' ({e(pilot_name(lang, row["pilot"]))})' if row.get("pilot") else "") + "</p>"
            + f'<p><b>{e(t(lang, "notes"))}:</b> <span class="notes">{e(notes)}</span></p>'
            + f'<p><b>{e(t(lang, "priority"))}:</b> {e(sr.get("priority"))} &nbsp; '
            f'<b>{e(t(lang, "slip_no"))}:</b> {e(identifiers(sr, "PLAC"))} '
            f'{e(identifiers(d["task"], "FILL"))}'
            + (f' &nbsp; <b>{e(t(lang, "insurance"))}:</b> {e(", ".join(cov))}' if cov else "")
            + "</p>"
            + f'<p class="noprint"><a href="/ui/referrals/{e(thread)}/slip">'
            f'{e(t(lang, "print"))}</a></p>')
        history = _table(
            [t(lang, "at"), t(lang, "step"), t(lang, "status"), t(lang, "actor")],
            [[e(_fmt_time(s["at"])), e(s["event"]),
              e(f'{status_name(lang, s["from_status"])} → {status_name(lang, s["to_status"])}'),
              e(s["actor"])] for s in d["steps"]], t(lang, "none"), "history")
        body = (summary + action_forms(lang, row) + clinical(lang, d)
                + f'<h3>{e(t(lang, "history"))}</h3>{history}')
        return page(request, t(lang, "detail"), body, role=role)

    @router.get("/referrals/{thread}/slip")
    def slip(request: Request, thread: str) -> Response:
        role = gate(request, "clinician")
        if not isinstance(role, str):
            return role
        lang = lang_of(request)
        d = load(thread)
        if d is None:
            return page(request, t(lang, "not_found"), f"<p>{e(thread)}</p>", role=role,
                        status=404)
        row, sr = d["row"], d["sr"]
        if row["status"] == "completed" or row["step"] in ("completed", "return-received"):
            heading = t(lang, "slip_return")
        elif row["status"] in ("accepted", "in-progress"):
            heading = t(lang, "slip_accept")
        else:
            heading = t(lang, "slip_referral")
        cov = coverage_ids(d)
        notes = "; ".join(str(n.get("text", "")) for n in sr.get("note") or [])
        rows = [
            [e(t(lang, "slip_no")), e(f'{identifiers(sr, "PLAC")} {identifiers(d["task"], "FILL")}')],
            [e(t(lang, "kind")), e(kind_name(lang, row["kind"]))],
            [e(t(lang, "from")), e(member_name(lang, row["referrer"]))],
            [e(t(lang, "to")), e(member_name(lang, row["receiver"]))],
            [e(t(lang, "step")), e(step_name(lang, row["step"]))],
            [e(t(lang, "reason")), e(reasons(sr))],
            [e(t(lang, "notes")), e(notes)],
            [e(t(lang, "insurance")), e(", ".join(cov) or t(lang, "none"))],
        ]
        body = (f'<div class="slip"><h1>{e(heading)}</h1>'
                + patient_block(lang, d["patient"])
                + _table([t(lang, "item"), t(lang, "value")], rows, "", "slip-fields")
                + clinical(lang, d)
                + f'<p>{e(t(lang, "signature"))}: ________ &nbsp; {e(t(lang, "date"))}: '
                f'{e(_fmt_time(row["updated_at"])[:10])}</p></div>'
                f'<p class="noprint"><a href="/ui/referrals/{e(thread)}">'
                f'{e(t(lang, "back"))}</a></p>')
        return page(request, heading, body, role=role)

    @router.post("/referrals/{thread}/steps/{event}")
    async def take_step(request: Request, thread: str, event: str) -> Response:
        role = gate(request, "clinician")
        if not isinstance(role, str):
            return role
        back = f"/ui/referrals/{thread}"
        if event not in ACTIONS:
            return error_page(request, role, NotFound(f"no referral step '{event}' here"), back)
        f = await form(request)
        outputs: list[dict[str, Any]] = []
        if event == "accept":
            for key in ("bed", "department", "doctor"):
                if f.get(key, "").strip():
                    outputs.append({"type": {"text": key}, "valueString": f[key].strip()})
            when = f.get("appointment", "").strip()
            if when:
                if len(when) == 16:  # datetime-local has no seconds and no offset
                    when += ":00"
                if _parse_time(when) and datetime.fromisoformat(when).tzinfo is None:
                    when += "+08:00"  # the alliance's wall clock is China Standard Time
                outputs.append({"type": {"text": "appointment"}, "valueDateTime": when})
        reason = f.get("reason", "").strip() or None
        try:
            await run_in_threadpool(lambda: node.workflow.step(
                thread, event, f"role:{role}", reason=reason, outputs=outputs or None))
        except HutongError as exc:
            return error_page(request, role, exc, back)
        except ValueError as exc:
            return error_page(request, role, InvalidResource(str(exc)), back)
        return RedirectResponse(back, status_code=303)

    # -- auditor ---------------------------------------------------------------------------

    FILTERS = ("since", "until", "peer", "action", "outcome", "patient_hash")

    def audit_filters(request: Request) -> dict[str, Any]:
        q = request.query_params
        out: dict[str, Any] = {}
        for k in ("peer", "action", "outcome", "patient_hash"):
            if q.get(k):
                out[k] = q[k].strip()
        for k in ("since", "until"):
            if q.get(k):
                out[k] = _parse_time(q[k])
        return out

    @router.get("/audit")
    def audit(request: Request) -> Response:
        role = gate(request, "auditor")
        if not isinstance(role, str):
            return role
        lang = lang_of(request)
        q = request.query_params
        error = ""
        try:
            filters = audit_filters(request)
        except ValueError as exc:
            filters, error = {}, str(exc)
        from bridge.node import own_signing_keys

        with ctx.store.read() as conn:
            rows = query_audit(conn, limit=500, **filters)
            result = ctx.audit.verify(conn, [*plan.me.signing_keys, *own_signing_keys(conn)])
        if result.ok:
            chain = (f'<p class="chain ok">✔ {e(t(lang, "verified"))}: {result.checked} '
                     f'{e(t(lang, "records"))}, {result.checkpoints_checked} '
                     f'{e(t(lang, "checkpoints"))}, head <code>{e(result.last_hash[:16])}</code>'
                     f'</p>')
        else:
            chain = (f'<p class="chain bad">✘ {e(t(lang, "broken"))}: #{result.first_bad_seq} '
                     f'{e(result.reason)}</p>')

        def opts(values: Iterable[str], current: str | None) -> str:
            return '<option value=""></option>' + "".join(
                f'<option value="{e(v)}"{" selected" if v == current else ""}>{e(v)}</option>'
                for v in values)

        peers = sorted(plan.directory)
        actions = ["sent", "received", "delivered", "refused", "quarantined", "replayed",
                   "referral", "reminder", "fhir"]
        form_ = (f'<form method="get" action="/ui/audit" class="inline noprint">'
                 f'<label>{e(t(lang, "since"))} <input name="since" value="{e(q.get("since"))}" '
                 f'placeholder="2026-11-20T00:00"></label>'
                 f'<label>{e(t(lang, "until"))} <input name="until" value="{e(q.get("until"))}">'
                 f'</label><label>{e(t(lang, "peer"))} <select name="peer">'
                 f'{opts(peers, q.get("peer"))}</select></label>'
                 f'<label>{e(t(lang, "action"))} <input name="action" list="actions" '
                 f'value="{e(q.get("action"))}"></label><datalist id="actions">'
                 f'{"".join(f"<option value={chr(34)}{a}{chr(34)}>" for a in actions)}'
                 f'</datalist><label>{e(t(lang, "outcome"))} <select name="outcome">'
                 f'{opts(["0", "4", "8", "12"], q.get("outcome"))}</select></label>'
                 f'<label>{e(t(lang, "patient_hash"))} <input name="patient_hash" '
                 f'value="{e(q.get("patient_hash"))}"></label>'
                 f'<button type="submit">{e(t(lang, "filter"))}</button>'
                 f'<p><small>{e(t(lang, "utc_hint"))}</small></p></form>')
        keep = {k: q[k] for k in FILTERS if q.get(k)}
        links = " ".join(
            f'<a class="export" href="/ui/audit/export.{fmt}?{e(urlencode(keep))}">'
            f'{e(t(lang, "export"))} {fmt}</a>' for fmt in ("ndjson", "csv"))
        table = _table(
            [t(lang, "seq"), t(lang, "at"), t(lang, "action"), t(lang, "outcome"),
             t(lang, "kind"), t(lang, "peer"), t(lang, "thread"), t(lang, "packet"),
             t(lang, "patient_hash"), t(lang, "actor"), t(lang, "message")],
            [[e(r["seq"]), e(r["at"]), e(r["action"]), e(r["outcome"]), e(r["kind"]),
              e(r["peer"]), e(r["thread"]), e(r["packet_id"]),
              e((r["patient_hash"] or "")[:16]), e(r["actor"]),
              e(" ".join(x for x in (r["code"], r["message"]) if x))] for r in rows],
            t(lang, "none"), "audit")
        body = (f'<h3>{e(t(lang, "chain"))}</h3>{chain}'
                + (f'<p class="bad">{e(error)}</p>' if error else "")
                + form_ + f"<p>{links}</p>" + table)
        return page(request, t(lang, "audit"), body, role=role)

    @router.get("/audit/export.{fmt}")
    def audit_download(request: Request, fmt: str) -> Response:
        role = gate(request, "auditor")
        if not isinstance(role, str):
            return role
        if fmt not in ("ndjson", "csv"):
            return Response(status_code=404)
        try:
            filters = audit_filters(request)
        except ValueError as exc:
            return Response(str(exc), status_code=400)
        buf = io.StringIO(newline="")
        with ctx.store.read() as conn:
            export_audit(conn, buf, fmt=fmt, **filters)  # type: ignore[arg-type]
        data = buf.getvalue().encode()
        if fmt == "csv":
            data = b"\xef\xbb\xbf" + data  # BOM so Excel reads the Chinese text
        media = "text/csv; charset=utf-8" if fmt == "csv" else "application/x-ndjson"
        stamp = ctx.now().strftime("%Y%m%dT%H%M%SZ")
        return Response(data, media_type=media, headers={
            "Content-Disposition": f'attachment; filename="audit-{plan.node_id}-{stamp}.{fmt}"'})

    # -- IT --------------------------------------------------------------------------------

    @router.get("/it")
    def it(request: Request) -> Response:
        role = gate(request, "it")
        if not isinstance(role, str):
            return role
        lang = lang_of(request)
        summary = ops.queue_summary(ctx)
        states = sorted({k for p in summary["outbox"] for k in p
                         if k not in ("peer", "oldest_waiting_s")})
        queues = _table(
            [t(lang, "peer"), *states, t(lang, "oldest")],
            [[e(member_name(lang, p["peer"])), *(e(p.get(s, 0)) for s in states),
              e(p["oldest_waiting_s"] if p["oldest_waiting_s"] is not None else "")]
             for p in summary["outbox"]], t(lang, "none"), "queues")
        inbound = _table(
            [t(lang, "status"), t(lang, "count"), t(lang, "oldest")],
            [[e(st), e(v["count"]), e(v["oldest_s"])] for st, v in summary["inbox"].items()],
            t(lang, "none"), "inbound")
        with ctx.store.read() as conn:
            held = quarantine.list_items(conn, state=None, limit=200)

        def replay_cell(item: dict[str, Any]) -> str:
            if item["state"] != "held":
                return ""
            return (f'<form method="post" action="/ui/it/quarantine/{item["id"]}/replay" '
                    f'class="replay"><button type="submit">{e(t(lang, "replay"))}</button>'
                    f'</form>')

        quar = _table(
            ["#", t(lang, "at"), t(lang, "source"), t(lang, "code"), t(lang, "message"),
             t(lang, "sender"), t(lang, "kind"), t(lang, "status"), t(lang, "replay_result"),
             ""],
            [[e(i["id"]), e(_fmt_time(i["at"])), e(i["source"]), e(i["code"]),
              e(i["message"]), e(i["sender"]), e(i["kind"]), e(i["state"]),
              e(i["replay_result"]), replay_cell(i)] for i in held],
            t(lang, "none"), "quarantine")
        rules = _table(
            ["#", t(lang, "from"), t(lang, "to"), t(lang, "kinds"), t(lang, "senders"),
             t(lang, "recipients"), t(lang, "notes")],
            [[e(r["index"]), e(r["from"]), e(r["to"]), e(", ".join(r["kinds"])),
              e(", ".join(r["senders"])), e(", ".join(r["recipients"])), e(r["note"])]
             for r in plan.rules.describe()], t(lang, "none"), "rules")
        due = [r for r in node.workflow.list(limit=500) if r["reminded_at"] is not None
               and r["status"] in ("requested", "received")]
        reminders = _table(
            [t(lang, "thread"), t(lang, "kind"), t(lang, "peer"), t(lang, "green"),
             t(lang, "created"), t(lang, "reminded")],
            [[e(r["thread"]), e(kind_name(lang, r["kind"])),
              e(member_name(lang, r["referrer"] if r["side"] == "receiver" else r["receiver"])),
              e(t(lang, "yes") if r["green_channel"] else t(lang, "no")),
              e(_fmt_time(r["created_at"])), e(_fmt_time(r["reminded_at"]))] for r in due],
            t(lang, "none"), "reminders")
        msg = request.query_params.get("msg")
        body = ((f'<p class="msg">{e(msg)}</p>' if msg else "")
                + f'<h3>{e(t(lang, "queues"))}</h3>{queues}'
                f'<h3>{e(t(lang, "inbound"))}</h3>{inbound}'
                f'<h3>{e(t(lang, "quarantine"))}</h3>{quar}'
                f'<h3>{e(t(lang, "reminders"))}</h3>{reminders}'
                f'<h3>{e(t(lang, "rules"))}</h3>{rules}')
        return page(request, t(lang, "it"), body, role=role)

    @router.post("/it/quarantine/{item_id}/replay")
    def replay(request: Request, item_id: int) -> Response:
        role = gate(request, "it")
        if not isinstance(role, str):
            return role
        try:
            ok, result = ops.quarantine_replay(ctx, node.intake, item_id, actor=f"role:{role}")
        except HutongError as exc:
            return error_page(request, role, exc, "/ui/it")
        node.wake_all_senders()
        node.wake("deliver")
        msg = f"#{item_id}: {'OK' if ok else 'FAILED'} {result}"
        return RedirectResponse(f"/ui/it?{urlencode({'msg': msg})}", status_code=303)

    return router


__all__ = ["web_router"]
