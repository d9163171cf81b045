"""The hospital-facing app on the node's local port (never reachable from the peer port).

``main``-style assembly only: routes live in small routers; errors from the tree become JSON
(or FHIR OperationOutcome under /fhir) in one handler.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from fastapi import FastAPI, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel
from sqlalchemy import select

from bridge import ops
from bridge.api import paging
from bridge.api.auth import (
    AnyRole,
    ClinicianRole,
    ITRole,
    SenderRole,
    actor_of,
    token_known,
    who,
)
from bridge.api.body_limit import LocalBodyGuard
from bridge.api.docs import docs_router
from bridge.api.fhir_api import fhir_router
from bridge.api.fhir_http import FhirHttp
from bridge.api.outcome import RequestInvalid, request_invalid_response
from bridge.api.outcome import local_responses as errs
from bridge.consult.tables import CONSULTATION
from bridge.delivery.queue import Outgoing, queue_packets
from bridge.errors import Forbidden, HutongError
from bridge.fhir.validate import validate_bundle
from bridge.gateway.guard import Admission
from bridge.referral.tables import REFERRAL
from bridge.store import quarantine
from bridge.store.tables import OUTBOX, QUARANTINE
from bridge.web import web_router
from bridge.web.layout import CSS
from bridge.web.security import SecurityHeaders, refusal_html

if TYPE_CHECKING:
    from bridge.node import Node


class StepIn(BaseModel):
    reason: str | None = None
    outputs: list[dict[str, Any]] = []


#: packet kinds that carry patient care (a referral step, a result, an image): queued by a
#: clinician, the referral workflow or an adapter, never by IT (bridge.api.auth: IT sees queues
#: but no patients). IT may queue the alliance's operational kinds, e.g. a connectivity probe.
CLINICAL_KIND_PREFIXES = ("referral.", "result.", "imaging.", "consult.")
#: packets only the node itself makes (a receipt answers a received packet)
NODE_ONLY_KINDS = ("receipt",)


def check_sender_kinds(role: str, kinds: list[str]) -> None:
    """IT may not queue clinical packets; nobody queues what only the node makes."""
    for i, kind in enumerate(kinds):
        if kind in NODE_ONLY_KINDS:
            raise Forbidden(f"body[{i}].kind: receipts are made by the node, not queued")
        if role == "it" and kind.startswith(CLINICAL_KIND_PREFIXES):
            raise Forbidden(
                f"body[{i}].kind: role 'it' may not queue clinical packets "
                f"({', '.join(p + '*' for p in CLINICAL_KIND_PREFIXES)})"
            )


class PacketIn(BaseModel):
    to: str
    kind: str
    thread: str | None = None
    bundle: dict[str, Any]


def create_local_app(node: Node) -> FastAPI:
    ctx = node.ctx
    # the docs page is served from the installed Swagger UI package (bridge.api.docs)
    app = FastAPI(
        title=f"Hutong node {ctx.node_id}",
        docs_url=None,
        redoc_url=None,
        swagger_ui_oauth2_redirect_url=None,
    )
    # the shared per-role tokens log in and call the API only while [web] shared_role_tokens
    # is on (one release, flagged on the accounts page); personal tokens: bridge.accounts
    app.state.tokens = dict(ctx.plan.tokens) if ctx.plan.web.shared_role_tokens else {}
    app.state.node = node
    limits = ctx.plan.limits
    # /fhir formats (406/415), HEAD and trailing slashes; inside the guard: token first
    app.add_middleware(FhirHttp)
    # no body is read before the token, none over the limit (bridge/api/body_limit.py)
    tokens = app.state.tokens
    app.add_middleware(
        LocalBodyGuard,
        known=lambda header: token_known(node, tokens, header),
        max_body=limits.local_max_body_bytes,
        admission=Admission(
            limits.max_requests,
            max(limits.max_inflight_bytes, limits.local_max_body_bytes),
            limits.admit_wait_s,
        ),
    )
    # added last, so outermost: headers + origin check on every answer, the guard's included
    app.add_middleware(SecurityHeaders, css=CSS)
    app.include_router(docs_router(app.title))
    app.include_router(web_router(node))  # /ui pages (and the node's alert job)
    from bridge.metrics import metrics_router

    app.include_router(metrics_router(node, getattr(node, "alerter", None)))  # Prometheus
    app.include_router(fhir_router(node))  # /fhir: errors are OperationOutcomes (FhirRoute)

    @app.exception_handler(HutongError)
    async def _error(req: Request, exc: HutongError) -> JSONResponse | HTMLResponse:
        if req.url.path.startswith("/ui/") or req.url.path == "/ui":
            return HTMLResponse(refusal_html(exc), status_code=exc.http_status)
        return JSONResponse(exc.as_dict(), status_code=exc.http_status)

    # a request that does not bind: field and rule, not FastAPI's echo of the input
    app.add_exception_handler(RequestValidationError, request_invalid_response)

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "node": ctx.node_id, "role": ctx.plan.role}

    @app.post("/local/v1/packets", responses=errs(400, 401, 403))
    async def send(items: list[PacketIn], role: SenderRole, request: Request) -> dict[str, Any]:
        check_sender_kinds(role, [i.kind for i in items])
        try:
            outgoing = [Outgoing(i.to, i.kind, orjson.dumps(i.bundle), i.thread) for i in items]
        except TypeError:  # orjson: an integer beyond 64 bits (FHIR integers are 32-bit)
            raise RequestInvalid("body[].bundle: an integer out of the 64-bit range") from None

        def work() -> list[Any]:
            with ctx.store.write() as conn:
                return queue_packets(ctx, conn, outgoing, actor=actor_of(request, role))

        results = await run_in_threadpool(work)
        node.wake_all_senders()
        return {
            "results": [
                {"packet_id": r.packet_id} if r.error is None else r.error.as_dict()
                for r in results
            ]
        }

    @app.get("/local/v1/outbox", responses=errs(401))
    def outbox(
        role: AnyRole,
        request: Request,
        response: Response,
        state: str | None = None,
        peer: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> list[dict[str, Any]]:
        """Oldest first; ``X-Total-Count`` and a ``Link`` to the next page (keyset)."""
        stmt, where = ops.outbox_query(state=state, peer=peer)
        with ctx.store.read() as conn:
            rows, total, nxt = paging.page(
                conn, stmt, where=where, order=[OUTBOX.c.id], desc=False, limit=limit, after=after
            )
        paging.headers(request, response, total, nxt)
        return ops.with_age(ctx, rows)

    @app.get("/local/v1/queues", responses=errs(401))
    def queues(role: AnyRole) -> dict[str, Any]:
        return ops.queue_summary(ctx)

    @app.post("/local/v1/outbox/retry", responses=errs(401, 403))
    def retry(role: ITRole, request: Request, peer: str | None = None) -> dict[str, int]:
        n = ops.outbox_retry(ctx, peer=peer, actor=actor_of(request, role))
        node.wake_all_senders()
        return {"requeued": n}

    @app.get("/local/v1/quarantine", responses=errs(401, 403))
    def quarantine_list(
        role: ITRole,
        request: Request,
        response: Response,
        state: str | None = "held",
        limit: int = 100,
        after: str | None = None,
    ) -> list[dict[str, Any]]:
        """Newest first; ``state=`` (empty) for every state; paged as ``/outbox``."""
        stmt, where = quarantine.list_query(state=state or None)
        with ctx.store.read() as conn:
            rows, total, nxt = paging.page(
                conn,
                stmt,
                where=where,
                order=[QUARANTINE.c.id],
                desc=True,
                limit=limit,
                after=after,
            )
        paging.headers(request, response, total, nxt)
        return rows

    @app.post("/local/v1/quarantine/{item_id}/replay", responses=errs(401, 403, 404))
    def replay(item_id: int, role: ITRole, request: Request) -> dict[str, Any]:
        ok, result = ops.quarantine_replay(
            ctx, node.intake, item_id, actor=actor_of(request, role), adapters=node.adapters
        )
        node.wake_all_senders()
        node.wake("deliver")
        return {"ok": ok, "result": result}

    @app.get("/local/v1/packets/{packet_id}", responses=errs(401, 403, 404))
    def packet(packet_id: str, role: ITRole) -> dict[str, Any]:
        return ops.find_packet(ctx, packet_id)

    def referral_page(
        request: Request, response: Response, where: list[Any], limit: int, after: str | None
    ) -> list[dict[str, Any]]:
        with ctx.store.read() as conn:
            rows, total, nxt = paging.page(
                conn,
                select(REFERRAL),
                where=where,
                order=[REFERRAL.c.updated_at, REFERRAL.c.thread],
                desc=True,
                limit=limit,
                after=after,
            )
        paging.headers(request, response, total, nxt)
        return rows

    @app.get("/local/v1/referrals", responses=errs(401))
    def referrals(
        role: AnyRole,
        request: Request,
        response: Response,
        status: str | None = None,
        limit: int = 200,
        after: str | None = None,
    ) -> list[dict[str, Any]]:
        """Where each referral stands on this side (no patient data: hashes only), the most
        recently changed first; paged as ``/outbox``."""
        return referral_page(
            request, response, [REFERRAL.c.status == status] if status else [], limit, after
        )

    @app.post("/local/v1/referrals", responses=errs(400, 401, 403, 409))
    async def submit(
        bundle: dict[str, Any], role: ClinicianRole, request: Request
    ) -> dict[str, Any]:
        """A new referral (or a return) as a FHIR transaction Bundle; same as POST /fhir."""
        validate_bundle(bundle)
        return await run_in_threadpool(node.workflow.submit, bundle, actor_of(request, role))

    @app.post("/local/v1/referrals/{thread}/steps/{event}", responses=errs(400, 401, 403, 404, 409))
    async def take_step(
        thread: str, event: str, body: StepIn, role: ClinicianRole, request: Request
    ) -> dict[str, Any]:
        """accept (with slip outputs) / reject / arrive / cancel (with a reason)."""
        return await run_in_threadpool(
            lambda: node.workflow.step(
                thread,
                event,
                actor_of(request, role),
                reason=body.reason,
                outputs=body.outputs or None,
            )
        )

    @app.get("/local/v1/consultations", responses=errs(401))
    def consultations(
        role: AnyRole,
        request: Request,
        response: Response,
        step: str | None = None,
        status: str | None = None,
        side: str | None = None,
        limit: int = 200,
        after: str | None = None,
    ) -> list[dict[str, Any]]:
        """Where each consultation stands on this side (no patient data: hashes only), the
        most recently changed first; the centre's queue is ``?side=centre``; paged as
        ``/outbox``. Steps are taken on /fhir (bridge/consult)."""
        c = CONSULTATION.c
        where = [col == v for col, v in ((c.step, step), (c.status, status), (c.side, side)) if v]
        with ctx.store.read() as conn:
            rows, total, nxt = paging.page(
                conn,
                select(CONSULTATION),
                where=where,
                order=[c.updated_at, c.thread],
                desc=True,
                limit=limit,
                after=after,
            )
        paging.headers(request, response, total, nxt)
        return rows

    @app.get("/local/v1/reminders", responses=errs(401))
    def reminders(
        role: AnyRole,
        request: Request,
        response: Response,
        limit: int = 200,
        after: str | None = None,
    ) -> list[dict[str, Any]]:
        """Unaccepted referrals past their time (reminded), paged as ``/referrals``."""
        return referral_page(
            request,
            response,
            [REFERRAL.c.reminded_at.is_not(None), REFERRAL.c.status.in_(("requested", "received"))],
            limit,
            after,
        )

    @app.get("/local/v1/patients/{patient_hash}/results", responses=errs(401, 403))
    def patient_results(
        patient_hash: str,
        role: ClinicianRole,
        request: Request,
        response: Response,
        limit: int = 200,
        after: str | None = None,
    ) -> dict[str, Any]:
        """Mutual-recognition view (结果互认): the patient's results known here, with where and
        when each was produced (bridge/results/recognition.py), newest first; ``results`` is
        one page, the headers say how many in all and where the next page is (as
        ``/outbox``). The read is audited, page by page."""
        from bridge.api.fhir_audit import read_entries
        from bridge.results.recognition import results_for

        with ctx.store.write() as conn:
            items, total, nxt = results_for(
                conn,
                patient_hash,
                node_id=ctx.node_id,
                directory=ctx.plan.directory,
                limit=limit,
                after=after,
            )
            ctx.audit.append(
                conn,
                read_entries(
                    role,
                    f"/local/v1/patients/{patient_hash}/results",
                    # an empty answer is still a look at this patient
                    [(i["report"], patient_hash) for i in items] or [("results", patient_hash)],
                    ctx.now(),
                    interaction="search-type",
                    **who(request, role),
                ),
            )
        paging.headers(request, response, total, nxt)
        return {"patient_hash": patient_hash, "node": ctx.node_id, "results": items}

    for adapter in node.adapters.values():  # an adapter may offer routes of its own (no import)
        routes = getattr(adapter, "local_routes", None)
        if routes is not None:
            app.include_router(routes(), prefix=f"/local/v1/adapters/{adapter.name}")

    return app
