"""The peer-facing app: the only thing on the port that crosses the firewall.

It exposes ``POST /exchange/v1/packets`` and ``GET /exchange/v1/health`` and nothing else: no
docs, no OpenAPI, no hospital-facing route. Everything that reaches it is untrusted until a
frame's signature verifies, so a refusal must cost the sender more than the node:

* a source address over its refusal rate is turned away before its body is read (429);
* a request must declare its length, at most the limit (413 from the header alone), and
  gets its share of the port's requests and bytes in flight or waits, then 503 ``HT-BUSY``;
* while the node's local delivery is behind (``[limits] max_inbox_backlog`` received packets
  waiting), a batch is refused unread with 503 ``HT-PKT-BACKLOG`` and ``Retry-After``
  (``backlog.py``): the senders keep their packets and back off;
* the body is judged while it arrives (``FramePeek``): bad framing, an oversize part or an
  unknown sender stops the read at once (400/413/403, connection closed);
* refusals before a signature verified are answered unsigned and keep only a prefix, the
  digest and length of what arrived, and the source address (``untrusted_row``).

A batch that could not be committed is answered 503 so the sender retries.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from sqlalchemy import insert
from starlette.requests import ClientDisconnect

from bridge.audit.events import AuditEntry
from bridge.config.models import LimitsConfig
from bridge.context import NodeContext
from bridge.crypto import envelope as env
from bridge.delivery.transport import RECEIPTS_HEADER, RECEIPTS_V2
from bridge.errors import (
    Backlogged,
    Busy,
    HutongError,
    MalformedPacket,
    PacketRefused,
    PacketTooLarge,
    RateLimited,
)
from bridge.gateway.backlog import RETRY_AFTER_S, BacklogVerdict, InboxBacklog
from bridge.gateway.guard import Admission
from bridge.gateway.intake import UNSIGNED, Intake, quota_entries
from bridge.gateway.ratelimit import (
    PeerRateLimit,
    SourceRefusals,
    Verdict,
    peers_of,
    retry_after_header,
)
from bridge.gateway.stream import FramePeek
from bridge.store.quarantine import enforce_quota, untrusted_row
from bridge.store.tables import QUARANTINE

BATCH_TYPE = "application/x-hutong-batch"
CLOSE = {"Connection": "close"}
log = logging.getLogger("hutong.gateway")


def max_request_bytes(limits: LimitsConfig) -> int:
    """The largest request the peer port reads: a batch of up to two largest bodies."""
    return limits.max_body_bytes * 2 + (8 << 20)


def create_gateway(ctx: NodeContext, intake: Intake, on_received: object = None) -> FastAPI:
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None, title="hutong-gateway")
    limits = ctx.plan.limits
    max_request = max_request_bytes(limits)
    limiter = None
    if limits.peer_rate_per_s:
        limiter = PeerRateLimit(
            limits.peer_rate_per_s, limits.peer_burst or max(1, int(limits.peer_rate_per_s * 2))
        )
    refusals = SourceRefusals(
        limits.refusal_rate_per_s, limits.refusal_burst, total_per_s=limits.refusal_total_per_s
    )

    # a request holds about twice its length at its peak (the bytes, then its frames)
    def keep(remote: str) -> bool:
        """Whether one more unauthenticated refusal of ``remote`` is kept (its rate, and that
        of all addresses together: past the latter it is logged every 1000, not kept)."""
        before = refusals.unkept
        kept = refusals.charge(remote)
        if refusals.unkept != before and refusals.unkept % 1000 == 1:
            log.warning(
                "%s %d refusal(s) not kept: over %g kept refusals/s from all addresses",
                RateLimited.code,
                refusals.unkept,
                limits.refusal_total_per_s,
            )
        return kept

    admission = Admission(
        limits.max_requests, max(limits.max_inflight_bytes, 2 * max_request), limits.admit_wait_s
    )
    directory = ctx.plan.directory
    batch_receipts = ctx.plan.delivery.batch_receipts
    backlog = (
        InboxBacklog(ctx.store, limits.max_inbox_backlog) if limits.max_inbox_backlog else None
    )

    @app.get("/exchange/v1/health")
    def health() -> dict[str, str]:
        return {"status": "ok", "node": ctx.node_id, "time": datetime.now(UTC).isoformat()}

    @app.post("/exchange/v1/packets")
    async def packets(request: Request) -> Response:
        remote = request.client.host if request.client else "unknown"
        away = refusals.turned_away(remote)
        if away is not None and away.retry_after is not None:
            if away.first:
                await run_in_threadpool(_source_over_rate, ctx, refusals, away)
            return _unsigned(
                RateLimited(
                    "too many refused requests from this address; try again later",
                    retry_after=away.retry_after,
                ),
                429,
                {"Retry-After": retry_after_header(away.retry_after)},
            )
        if away is not None and away.episode:
            log.info(
                "HT-PKT-RATE source=%s back under its refusal rate after %d request(s) turned away",
                remote,
                away.episode[remote],
            )
        length = request.headers.get("content-length")
        if length is None or not length.isdigit():
            return await _refuse_early(
                ctx,
                keep,
                remote,
                MalformedPacket("a request must declare its Content-Length"),
                b"",
                0,
                status=411,
            )
        declared = int(length)
        if declared > max_request:
            return await _refuse_early(
                ctx,
                keep,
                remote,
                PacketTooLarge(f"request of {declared} bytes is over the limit of {max_request}"),
                b"",
                0,
            )
        if backlog is not None:
            if backlog.due:
                await run_in_threadpool(backlog.refresh)
            judged = backlog.check()
            if judged.refuse:
                if judged.first:
                    await run_in_threadpool(_over_backlog, ctx, backlog, judged, remote)
                return _unsigned(
                    Backlogged(
                        f"{judged.backlog} received packets wait for local delivery (bound "
                        f"{backlog.bound}); batch not read, send it again later",
                        retry_after=RETRY_AFTER_S,
                    ),
                    503,
                    {"Retry-After": retry_after_header(RETRY_AFTER_S)},
                )
            if judged.ended is not None:
                log.info(
                    "%s backlog %d, at most %d: taking batches again after %d refused",
                    Backlogged.code,
                    judged.backlog,
                    backlog.resume,
                    judged.ended,
                )
        async with admission.admit(2 * declared) as admitted:
            if not admitted:
                return _unsigned(
                    Busy("the port is at its bound of requests in flight; try again later"),
                    503,
                    {"Retry-After": "1"},
                )
            peek = FramePeek(
                declared,
                known=directory.__contains__,
                max_body=limits.max_body_bytes,
                max_items=limits.max_batch,
            )
            buf = bytearray(declared)
            have = 0
            try:
                async for chunk in request.stream():
                    if not chunk:
                        continue
                    if have + len(chunk) > declared:  # h11 enforces the length; belt and braces
                        raise MalformedPacket("request is longer than its Content-Length")
                    buf[have : have + len(chunk)] = chunk
                    have += len(chunk)
                    peek.feed(buf, have)
                peek.finish(buf, have)
            except PacketRefused as exc:
                received = memoryview(buf)[:have]
                return await _refuse_early(ctx, keep, remote, exc, received, have)
            except ClientDisconnect:
                return Response(status_code=400)
            view = memoryview(buf)
            frames = [bytes(view[a:b]) for a, b in peek.items]
            del view, buf
            if limiter is not None:
                verdict = limiter.charge(peers_of(frames, limits.max_body_bytes))
                if verdict.retry_after is not None:
                    return await run_in_threadpool(_over_rate, ctx, limiter, verdict)
                if verdict.episode:
                    _rate_episode_over(verdict.episode)
            try:
                answers = await run_in_threadpool(
                    partial(
                        intake.receive,
                        frames,
                        remote=remote,
                        admit_refusal=lambda: keep(remote),
                        receipts_v2=batch_receipts
                        and request.headers.get(RECEIPTS_HEADER) == RECEIPTS_V2,
                    )
                )
            except HutongError as exc:  # store unavailable: nothing was committed, sender retries
                return JSONResponse(exc.as_dict(), status_code=503)
            if backlog is not None:
                backlog.taken(len(frames))  # an upper bound: receipts and refusals add none
            del frames
        if callable(on_received):
            on_received()
        if answers and all(a[:1] == UNSIGNED for a in answers):
            # nothing in it authenticated: an unsigned HTTP error, no receipt of any kind
            return Response(answers[0], status_code=403, media_type="application/json")
        return Response(env.encode_batch(answers), media_type=BATCH_TYPE)

    return app


def _unsigned(exc: HutongError, status: int, headers: dict[str, str] | None = None) -> Response:
    """An unsigned HTTP error that also closes the connection (the rest of the body, if any,
    is never read)."""
    body = exc.as_dict() | {"retry": "transient"}
    return JSONResponse(body, status_code=status, headers=CLOSE | (headers or {}))


async def _refuse_early(
    ctx: NodeContext,
    keep: Callable[[str], bool],
    remote: str,
    exc: PacketRefused,
    received: bytes | memoryview,
    size: int,
    status: int | None = None,
) -> Response:
    """A request refused before any signature could be checked: if its source is within its
    refusal rate, keep a prefix, the digest and length of what arrived, and audit it."""
    if keep(remote):
        digest = hashlib.sha256(received).hexdigest()
        await run_in_threadpool(
            _keep_refusal,
            ctx,
            exc,
            bytes(received[: ctx.plan.retention.quarantine_prefix_bytes]),
            size,
            digest,
            remote,
        )
    if status is None:
        status = exc.http_status if isinstance(exc, PacketRefused) else 400
        if isinstance(exc, MalformedPacket):
            status = 400
    return _unsigned(exc, status)


def _keep_refusal(
    ctx: NodeContext, exc: PacketRefused, prefix: bytes, size: int, digest: str, remote: str
) -> None:
    now = ctx.now()
    quota = ctx.plan.retention.quarantine_max_bytes
    with ctx.store.write() as conn:
        conn.execute(
            insert(QUARANTINE),
            [
                untrusted_row(
                    now, exc, prefix, prefix=len(prefix), remote=remote, size=size, digest=digest
                )
            ],
        )
        entries = [
            AuditEntry(
                action="refused",
                outcome="4",
                code=exc.code,
                message=exc.message,
                at=now,
                extra={"authenticated": False, "remote": remote, "size": size},
            )
        ]
        entries += quota_entries(enforce_quota(conn, quota), quota, now)
        ctx.audit.append(conn, entries)


def _audit_episode(
    ctx: NodeContext, code: str, message: str, extra: dict[str, object], peer: str | None = None
) -> None:
    """The first request of an episode turned away (rate of refusals, inbox backlog, peer's
    packet rate): one audit row ``refused``/4 and one warning, never one per request."""
    with ctx.store.write() as conn:
        ctx.audit.append(
            conn,
            [
                AuditEntry(
                    action="refused",
                    outcome="4",
                    peer=peer,
                    code=code,
                    message=message,
                    at=ctx.now(),
                    extra=extra,
                )
            ],
        )
    log.warning("%s %s", code, message)


def _source_over_rate(ctx: NodeContext, refusals: SourceRefusals, verdict: Verdict) -> None:
    """The first request of an address turned away for its refusal rate: audited and logged
    once per episode."""
    message = (
        f"address {verdict.peer} is over its rate of {refusals.rate:g} refusals/s "
        f"(burst {refusals.burst:g}); its requests are turned away unread until it "
        "slows down"
    )
    _audit_episode(ctx, RateLimited.code, message, {"remote": verdict.peer, "authenticated": False})


def _over_backlog(
    ctx: NodeContext, backlog: InboxBacklog, judged: BacklogVerdict, remote: str
) -> None:
    """The first batch refused for the backlog: audited and logged once per episode (counts
    and the bound only; the peer is not known, the batch was not read)."""
    message = (
        f"{judged.backlog} received packets wait for local delivery, at the bound of "
        f"{backlog.bound} ([limits] max_inbox_backlog): new batches are refused until at most "
        f"{backlog.resume} wait"
    )
    _audit_episode(
        ctx,
        Backlogged.code,
        message,
        {"remote": remote, "backlog": judged.backlog, "bound": backlog.bound},
    )


def _over_rate(ctx: NodeContext, limiter: PeerRateLimit, verdict: Verdict) -> Response:
    """429 for a batch over its peer's rate; nothing of it is stored. Audited and logged once
    per episode (the first refusal), not per batch or per packet."""
    exc = RateLimited(
        f"peer '{verdict.peer}' is over its rate of {limiter.rate:g} packets/s (burst "
        f"{limiter.burst:g}); batch of {verdict.packets} not taken, send it again in "
        f"{verdict.retry_after:.2f} s",
        retry_after=verdict.retry_after or 1.0,
    )
    if verdict.first:
        _audit_episode(
            ctx,
            exc.code,
            exc.message,
            {"rate_per_s": limiter.rate, "burst": limiter.burst},
            peer=verdict.peer,
        )
    body = exc.as_dict() | {"retry_after_s": round(verdict.retry_after or 1.0, 3)}
    return JSONResponse(
        body,
        status_code=exc.http_status,
        headers={"Retry-After": retry_after_header(verdict.retry_after or 1.0)},
    )


def _rate_episode_over(episode: dict[str, int]) -> None:
    for peer, batches in episode.items():
        log.info(
            "%s peer=%s back under its rate after %d refused batch(es)",
            RateLimited.code,
            peer,
            batches,
        )
