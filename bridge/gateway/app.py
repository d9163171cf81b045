"""The peer-facing app: the only thing on the port that crosses the firewall.

It exposes ``POST /exchange/v1/packets`` and ``GET /exchange/v1/health`` and nothing else: no
docs, no OpenAPI, no hospital-facing route. A batch whose framing is broken is answered 400 and
quarantined whole; a batch that could not be committed is answered 503 so the sender retries.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from sqlalchemy import insert

from bridge.audit.events import AuditEntry
from bridge.context import NodeContext
from bridge.crypto import envelope as env
from bridge.errors import HutongError, MalformedPacket, PacketRefused, PacketTooLarge, RateLimited
from bridge.gateway.intake import Intake
from bridge.gateway.ratelimit import PeerRateLimit, Verdict, peers_of, retry_after_header
from bridge.store.quarantine import quarantine_row
from bridge.store.tables import QUARANTINE

BATCH_TYPE = "application/x-hutong-batch"
log = logging.getLogger("hutong.gateway")


def create_gateway(ctx: NodeContext, intake: Intake, on_received: object = None) -> FastAPI:
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None, title="hutong-gateway")
    limits = ctx.plan.limits
    max_request = limits.max_body_bytes * 2 + (8 << 20)
    limiter = None
    if limits.peer_rate_per_s:
        limiter = PeerRateLimit(limits.peer_rate_per_s, limits.peer_burst
                                or max(1, int(limits.peer_rate_per_s * 2)))

    @app.get("/exchange/v1/health")
    def health() -> dict[str, str]:
        return {"status": "ok", "node": ctx.node_id, "time": datetime.now(UTC).isoformat()}

    @app.post("/exchange/v1/packets")
    async def packets(request: Request) -> Response:
        declared = int(request.headers.get("content-length") or 0)
        if declared > max_request:
            return _refuse_whole(ctx, PacketTooLarge(f"request of {declared} bytes is over "
                                                     f"the limit of {max_request}"), b"")
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > max_request:
                return _refuse_whole(ctx, PacketTooLarge(
                    f"request is over the limit of {max_request} bytes"), b"")
        raw = bytes(data)
        try:
            frames = [raw] if raw[:4] == b"HTP1" else env.decode_batch(
                raw, max_items=limits.max_batch, max_total=max_request)
        except PacketRefused as exc:
            return await run_in_threadpool(_refuse_whole, ctx, exc, raw)
        if limiter is not None:
            verdict = limiter.charge(peers_of(frames, limits.max_body_bytes))
            if verdict.retry_after is not None:
                return await run_in_threadpool(_over_rate, ctx, limiter, verdict)
            if verdict.episode:
                _rate_episode_over(verdict.episode)
        try:
            answers = await run_in_threadpool(intake.receive, frames)
        except HutongError as exc:  # store unavailable: nothing was committed, sender retries
            return JSONResponse(exc.as_dict(), status_code=503)
        if callable(on_received):
            on_received()
        return Response(env.encode_batch(answers), media_type=BATCH_TYPE)

    return app


def _refuse_whole(ctx: NodeContext, exc: PacketRefused, raw: bytes) -> Response:
    """A request that is not even a batch: quarantine its bytes (bounded), audit, answer."""
    now = ctx.now()
    with ctx.store.write() as conn:
        conn.execute(insert(QUARANTINE), [quarantine_row(now, "peer", exc, raw=raw[: 1 << 20])])
        ctx.audit.append(conn, [AuditEntry(action="refused", outcome="4", code=exc.code,
                                           message=exc.message, at=now)])
    status = 413 if isinstance(exc, PacketTooLarge) else 400
    if not isinstance(exc, (MalformedPacket, PacketTooLarge)):
        status = exc.http_status
    return JSONResponse(exc.as_dict(), status_code=status)


def _over_rate(ctx: NodeContext, limiter: PeerRateLimit, verdict: Verdict) -> Response:
    """429 for a batch over its peer's rate; nothing of it is stored. Audited and logged once
    per episode (the first refusal), not per batch or per packet."""
    exc = RateLimited(
        f"peer '{verdict.peer}' is over its rate of {limiter.rate:g} packets/s (burst "
        f"{limiter.burst:g}); batch of {verdict.packets} not taken, send it again in "
        f"{verdict.retry_after:.2f} s", retry_after=verdict.retry_after or 1.0)
    if verdict.first:
        now = ctx.now()
        with ctx.store.write() as conn:
            ctx.audit.append(conn, [AuditEntry(
                action="refused", outcome="4", peer=verdict.peer, code=exc.code,
                message=exc.message, at=now,
                extra={"rate_per_s": limiter.rate, "burst": limiter.burst})])
        log.warning("%s peer=%s over %g packets/s; refusing its batches until it slows down",
                    exc.code, verdict.peer, limiter.rate)
    body = exc.as_dict() | {"retry_after_s": round(verdict.retry_after or 1.0, 3)}
    return JSONResponse(body, status_code=exc.http_status,
                        headers={"Retry-After": retry_after_header(verdict.retry_after or 1.0)})


def _rate_episode_over(episode: dict[str, int]) -> None:
    for peer, batches in episode.items():
        log.info("%s peer=%s back under its rate after %d refused batch(es)",
                 RateLimited.code, peer, batches)
