"""Server-rendered web pages on the node's local port, by audience.

``login`` (personal accounts, or for one release the config's role tokens -> session),
``clinician`` (referral inbox and outbox, detail, step forms, discharge-and-return), ``slips``
(printable slips), ``consultations`` (remote consultation: the centre's queue, pre-review,
schedule, report editor, release; the inviting side's view, the referral from a report; what
it shows in ``consult_view``, its forms' FHIR in ``consult_forms``) and ``consult_print`` (the
printable application, consent and report), ``auditor``
(exchange log, chain status, export), ``it`` (alerts, peers, queues, quarantine, adapters,
mapping gaps, rules), ``stats`` (the yearly-report table with SVG charts, the consultation
figures and their CSV), ``accounts`` (people, roles and API tokens; admin), ``messages`` (the
message browser; IT). ``layout`` holds the page frame; ``fhirview`` renders FHIR resources for
people. Every page that shows patient data audits the look by name (``Web.audit_read``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse

if TYPE_CHECKING:
    from bridge.node import Node


def web_router(node: Node) -> APIRouter:
    """All /ui routes for one node; also registers the node's alert job (``bridge.alerts``)."""
    from bridge.alerts import Alerter
    from bridge.web.accounts import account_routes
    from bridge.web.auditor import auditor_routes
    from bridge.web.clinician import clinician_routes
    from bridge.web.consult_print import consult_print_routes
    from bridge.web.consultations import consult_routes
    from bridge.web.it import it_routes
    from bridge.web.layout import Web
    from bridge.web.login import home_route, login_routes
    from bridge.web.messages import message_routes
    from bridge.web.slips import slip_routes
    from bridge.web.stats import stats_routes

    web = Web(node)
    from bridge.web import words

    words.install(node)  # display names of codes from this node's maps (clinical pages)
    alerter = Alerter(node)
    # /metrics reports the active alerts (local_app reads it with getattr); declaring it on Node
    # would touch bridge/node.py for a web-only attribute
    node.alerter = alerter  # type: ignore[attr-defined]
    node.add_job("alerts", alerter.run_once, node.plan.alerts.every_s)
    # every form post: the session's anti-forgery token (the origin check is the middleware's,
    # bridge.web.security.SecurityHeaders, installed by the local app)
    router = APIRouter(
        prefix="/ui", include_in_schema=False, dependencies=[Depends(web.csrf_guard)]
    )
    home = home_route(web)
    router.add_api_route("", home, methods=["GET"])
    router.add_api_route("/", home, methods=["GET"])
    router.add_api_route("/static/print.js", print_script, methods=["GET"])
    from bridge.web.dashboard import dashboard_routes, dashboard_script

    router.add_api_route("/static/dashboard.js", dashboard_script, methods=["GET"])
    router.include_router(dashboard_routes(web))  # the live part of /ui/it, pause/resume
    for part in (
        login_routes(web),
        clinician_routes(web),
        slip_routes(web),
        consult_routes(web),
        consult_print_routes(web),
        auditor_routes(web),
        it_routes(web, alerter),
        stats_routes(web),
        account_routes(web),
        message_routes(web),
    ):
        router.include_router(part)
    return router


def print_script() -> FileResponse:
    """The slips' print button (a file: the pages' policy runs no inline script)."""
    return FileResponse(
        Path(__file__).parent / "static" / "print.js", media_type="text/javascript; charset=utf-8"
    )


__all__ = ["web_router"]
