"""Printable slips: referral slip (转诊单), acceptance slip (接诊单), return slip (转回单).

Each is one page with print CSS (the header and links are hidden on paper); ``/slip`` alone
prints the latest slip the referral has reached.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from bridge.web import fhirview as fv
from bridge.web.clinician import available_slips, load_thread, shown_refs
from bridge.web.i18n import kind_name, step_name, t
from bridge.web.layout import Web, e, fmt_time, table
from bridge.web.words import priority_name


def slip_routes(web: Web) -> APIRouter:
    router = APIRouter()

    def fields(lang: str, rows: list[tuple[str, Any]]) -> str:
        return table(
            [t(lang, "item"), t(lang, "value")],
            [[e(t(lang, k)), e(v)] for k, v in rows],
            "",
            "slip-fields",
        )

    def render(request: Request, role: str, thread: str, which: str | None) -> Response:
        lang = web.lang(request)
        d = load_thread(web, thread)
        if d is None:
            return web.not_found(request, role, thread)
        row, sr, task = d["row"], d["sr"], d["task"]
        have = available_slips(row)
        which = which or have[-1]
        if which not in have:
            return web.not_found(request, role, f"{thread}: {which}")
        sent, back = fv.split_returned(task, d["res"])
        number = f"{fv.identifiers(sr, 'PLAC')} {fv.identifiers(task, 'FILL')}".strip()
        common = [
            ("slip_no", number),
            ("kind", kind_name(lang, row["kind"])),
            ("from", web.member_name(lang, row["referrer"])),
            ("to", web.member_name(lang, row["receiver"])),
            ("insurance", ", ".join(fv.coverage_ids(d["res"])) or t(lang, "none")),
        ]
        if which == "referral":
            heading = t(lang, "slip_referral")
            body = fields(
                lang,
                [
                    *common,
                    ("created", fmt_time(row["created_at"])),
                    ("priority", priority_name(lang, sr.get("priority"))),
                    ("reason", fv.reasons(sr)),
                    ("notes", fv.notes(sr)),
                ],
            )
            body += f"<h3>{e(t(lang, 'documents'))}</h3>{fv.documents(lang, sent)}"
            labs = fv.lab_tables(lang, sent)
            if labs:
                body += f"<h3>{e(t(lang, 'reports'))}</h3>{labs}"
            date = row["created_at"]
        elif which == "accept":
            heading = t(lang, "slip_accept")
            body = fields(
                lang,
                [
                    *common,
                    ("step", step_name(lang, row["step"])),
                    ("accepted_at", fmt_time(row["accepted_at"])),
                ],
            )
            body += f"<h3>{e(t(lang, 'acceptance'))}</h3>{fv.acceptance(lang, task)}"
            date = row["accepted_at"] or row["updated_at"]
        else:
            heading = t(lang, "slip_return")
            down = next((r for r in back.get("ServiceRequest", [])), {})
            enc = next((r for r in back.get("Encounter", [])), {})
            period = enc.get("period") or {}
            body = fields(
                lang,
                [
                    *common,
                    ("reason", fv.reasons(sr)),
                    (
                        "stay",
                        (
                            f"{fv.when(period.get('start'), lang)} – "
                            f"{fv.when(period.get('end'), lang)}"
                        ),
                    ),
                    ("instructions", fv.notes(down)),
                    ("completed_at", fmt_time(row["completed_at"])),
                ],
            )
            body += f"<h3>{e(t(lang, 'documents'))}</h3>{fv.documents(lang, back)}"
            labs, img = fv.lab_tables(lang, back), fv.imaging(lang, back)
            if labs:
                body += f"<h3>{e(t(lang, 'reports'))}</h3>{labs}"
            if img:
                body += f"<h3>{e(t(lang, 'imaging'))}</h3>{img}"
            body += f"<h3>{e(t(lang, 'meds'))}</h3>{fv.medications(lang, back)}"
            date = row["completed_at"] or row["updated_at"]
        web.audit_read(request, role, shown_refs(d), f"/ui/referrals/{thread}/slip/{which}")
        page = (
            f'<div class="slip slip-{which}"><h1>{e(heading)}</h1>'
            + fv.patient_line(lang, d["patient"])
            + body
            + f"<p>{e(t(lang, 'signature'))}: ________ &nbsp; {e(t(lang, 'date'))}: "
            f"{e(fmt_time(date)[:10])}</p></div>"
            f'<p class="noprint"><button type="button" class="print">{e(t(lang, "print"))}'
            f'</button> &nbsp; <a href="/ui/referrals/{e(thread)}">{e(t(lang, "back"))}</a>'
            f'</p><script src="/ui/static/print.js"></script>'
        )
        return web.page(request, heading, page, role=role)

    @router.get("/referrals/{thread}/slip")
    def latest_slip(request: Request, thread: str) -> Response:
        role = web.gate(request, "clinician")
        if not isinstance(role, str):
            return role
        return render(request, role, thread, None)

    @router.get("/referrals/{thread}/slip/{which}")
    def one_slip(request: Request, thread: str, which: str) -> Response:
        role = web.gate(request, "clinician")
        if not isinstance(role, str):
            return role
        return render(request, role, thread, which)

    return router
