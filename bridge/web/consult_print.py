"""Printable consultation papers on A4: the application form (远程会诊申请单), the consent
(远程会诊知情同意书) and the report (远程会诊报告).

Each is one page under the issuing hospital's own letterhead (its names in the alliance
directory: the inviting member for the application and the consent, the centre for the
report), with print CSS (``layout.CSS``: A4, the page header and links hidden on paper) and
lines for signatures. A report the centre has not released yet prints marked as a draft.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from bridge.web import fhirview as fv
from bridge.web.consult_view import (
    doctor,
    experts,
    load,
    records_html,
    report_html,
    shown_refs,
    video_link,
)
from bridge.web.i18n import consult_kind_name, consult_step_name, t
from bridge.web.layout import Web, e, fmt_time, table
from bridge.web.words import priority_name, resource_status

WHICH = ("application", "consent", "report")


def consult_print_routes(web: Web) -> APIRouter:
    router = APIRouter()

    def letterhead(member: str) -> str:
        m = web.plan.directory.get(member)
        zh, en = (m.names.zh, m.names.en) if m is not None else (member, "")
        return (
            f'<div class="letterhead"><div class="org">{e(zh)}</div>'
            f'<div class="org-en">{e(en)}</div></div>'
        )

    def fields(lang: str, rows: list[tuple[str, str]]) -> str:
        return table(
            [t(lang, "item"), t(lang, "value")],
            [[e(t(lang, k)), v] for k, v in rows],
            "",
            "slip-fields",
        )

    def signatures(lang: str, keys: list[str]) -> str:
        return (
            '<div class="signatures">'
            + "".join(
                f"<p>{e(t(lang, k))}: ________________ &nbsp; {e(t(lang, 'date'))}: ____________</p>"
                for k in keys
            )
            + "</div>"
        )

    def application(lang: str, d: dict[str, Any]) -> str:
        row, sr = d["row"], d["sr"]
        return (
            fields(
                lang,
                [
                    ("consult_no", e(fv.identifiers(sr, "PLAC"))),
                    ("kind", e(consult_kind_name(lang, row["kind"]))),
                    ("inviter", e(web.member_name(lang, row["inviter"]))),
                    ("inviting_doctor", e(doctor(d))),
                    ("centre", e(web.member_name(lang, row["centre"]))),
                    ("priority", e(priority_name(lang, sr.get("priority")))),
                    ("created", e(fmt_time(row["created_at"]))),
                    ("consult_reason", e(fv.reasons(sr))),
                    ("question", f'<span class="question">{e(fv.notes(sr))}</span>'),
                ],
            )
            + f"<h3>{e(t(lang, 'shared_records'))}</h3>{records_html(lang, d)}"
            + signatures(lang, ["doctor_signature"])
        )

    def consent(lang: str, d: dict[str, Any]) -> str:
        row, c = d["row"], d["consent"] or {}
        return (
            fields(
                lang,
                [
                    ("consult_no", e(fv.identifiers(d["sr"], "PLAC"))),
                    ("kind", e(consult_kind_name(lang, row["kind"]))),
                    ("centre", e(web.member_name(lang, row["centre"]))),
                    ("question", e(fv.notes(d["sr"]))),
                    (
                        "consent_recorded",
                        e(
                            str((c.get("policyRule") or {}).get("text") or "")
                            + " "
                            + resource_status(lang, c.get("status"))
                        ),
                    ),
                    ("consent_at", e(fv.when(c.get("dateTime"), lang))),
                ],
            )
            + f'<p class="consent-text">{e(t(lang, "consent_text"))}</p>'
            + signatures(lang, ["patient_signature", "relationship", "doctor_signature"])
        )

    def report(lang: str, d: dict[str, Any]) -> str:
        row, appt = d["row"], d["appointment"] or {}
        draft = not row.get("released_at")
        return (
            (f'<p class="draft-mark">{e(t(lang, "draft_mark"))}</p>' if draft else "")
            + fields(
                lang,
                [
                    ("consult_no", e(fv.identifiers(d["sr"], "PLAC"))),
                    ("kind", e(consult_kind_name(lang, row["kind"]))),
                    ("inviter", e(web.member_name(lang, row["inviter"]))),
                    ("inviting_doctor", e(doctor(d))),
                    ("consult_reason", e(fv.reasons(d["sr"]))),
                    ("question", e(fv.notes(d["sr"]))),
                    ("experts", f'<span class="experts">{e("；".join(experts(d)))}</span>'),
                    ("meeting", e(f"{fv.when(appt.get('start'), lang)}")),
                    ("video_link", e(video_link(appt))),
                    ("step", e(consult_step_name(lang, row["step"]))),
                    ("released_at", e(fmt_time(row["released_at"]))),
                ],
            )
            + f"<h3>{e(t(lang, 'report'))}</h3>{report_html(lang, d, web.member_name)}"
            + signatures(lang, ["expert_signature", "qc_signature"])
        )

    @router.get("/consultations/{thread}/print/{which}")
    def printed(request: Request, thread: str, which: str) -> Response:
        role = web.gate(request, "clinician")
        if not isinstance(role, str):
            return role
        lang = web.lang(request)
        d = load(web, thread)
        if d is None or which not in WHICH or (which == "report" and not d["report"]):
            return web.not_found(request, role, f"{thread}: {which}")
        row = d["row"]
        heading = t(lang, f"print_{which}")
        issuer = row["centre"] if which == "report" else row["inviter"]
        body = {"application": application, "consent": consent, "report": report}[which](lang, d)
        web.audit_read(request, role, shown_refs(d), f"/ui/consultations/{thread}/print/{which}")
        page = (
            f'<div class="slip consult-{which}">{letterhead(issuer)}<h1>{e(heading)}</h1>'
            + fv.patient_line(lang, d["patient"])
            + body
            + "</div>"
            f'<p class="noprint"><button type="button" class="print">{e(t(lang, "print"))}'
            f'</button> &nbsp; <a href="/ui/consultations/{e(thread)}">{e(t(lang, "back"))}'
            f'</a></p><script src="/ui/static/print.js"></script>'
        )
        return web.page(request, heading, page, role=role)

    return router
