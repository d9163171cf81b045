"""The hospital-facing FHIR R4 REST API under /fhir (local port only; the peer gateway has none).

    GET  /fhir/metadata            CapabilityStatement (no token)
    GET  /fhir/{type}?...          search -> searchset Bundle        clinician; AuditEvent: auditor
    GET  /fhir/{type}/{id}         read                               clinician; AuditEvent: auditor
    POST /fhir                     transaction Bundle -> node.workflow.submit   clinician
    PUT  /fhir/Task/{id}           Task -> node.workflow.move                   clinician

Minimum necessary: clinicians see clinical resources and never the audit log; auditors see only
AuditEvent; IT sees no FHIR data (queues live under /local/v1). Every read and search is audited
in the same write transaction (see ``fhir_audit``). Errors are OperationOutcomes (``outcome``).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from email.utils import format_datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import orjson
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import Connection, and_, or_, select
from starlette.responses import Response

from bridge.api.auth import actor_of, principal_of, who
from bridge.api.capability import AUDIT_TYPE, CLINICAL_TYPES, capability_statement
from bridge.api.fhir_audit import (
    AUDIT,
    read_audit_event,
    read_entries,
    redacted_query,
    search_audit,
)
from bridge.api.fhir_search import Query, encode_cursor, parse_query
from bridge.api.fhir_terminology import terminology_router
from bridge.api.outcome import (
    BadRequest,
    FhirResponse,
    FhirRoute,
    NotSupported,
    fhir_body,
    fhir_json,
)
from bridge.api.outcome import fhir_responses as answers
from bridge.errors import Forbidden, HutongError, InvalidFhir, InvalidResource, NotFound
from bridge.fhir.validate import validate_bundle, validate_resource
from bridge.fhirstore import store
from bridge.fhirstore.tables import FHIR_RESOURCE as T

if TYPE_CHECKING:
    from bridge.node import Node

#: the role allowed per type (minimum necessary)
ROLE_FOR = {**dict.fromkeys(CLINICAL_TYPES, "clinician"), AUDIT_TYPE: "auditor"}
WRITER = "clinician"


class WorkflowUnavailable(HutongError):
    code = "HT-FHIR-NO-WORKFLOW"
    http_status = 501


def _role(request: Request) -> str:
    """The caller's first role (401 without a good token); personal tokens name the person
    on ``request.state.principal`` (bridge.api.auth)."""
    return principal_of(request).roles[0]


def _allowed(request: Request, rtype: str) -> str:
    """The caller's role, if it may read ``rtype``: 401 without a good token, then 404, 403."""
    principal = principal_of(request)
    needed = ROLE_FOR.get(rtype)
    if needed is None:
        raise NotFound("this resource type is not served here")
    if principal.acting((needed,)) is None:
        what = "the audit log" if rtype == AUDIT_TYPE else "clinical resources"
        raise Forbidden(f"role '{','.join(principal.roles)}' may not read {what} "
                        "(minimum necessary)")
    return needed


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/") + "/fhir"


def _lenient(request: Request) -> bool:
    return "handling=lenient" in request.headers.get("prefer", "").replace(" ", "")


def _entry(base: str, resource: dict[str, Any], mode: str) -> dict[str, Any]:
    return {"fullUrl": f"{base}/{resource['resourceType']}/{resource['id']}",
            "resource": resource, "search": {"mode": mode}}


def _searchset(request: Request, q: Query, entries: list[dict[str, Any]], total: int | None,
               nxt: str | None, now: str) -> dict[str, Any]:
    base = _base(request)
    url = f"{base}/{q.rtype}"
    links = [{"relation": "self", "url": url + ("?" + urlencode(q.used) if q.used else "")}]
    if nxt:
        kept = [(k, v) for k, v in q.used if k != "_cursor"] + [("_cursor", nxt)]
        links.append({"relation": "next", "url": f"{url}?{urlencode(kept)}"})
    bundle: dict[str, Any] = {"resourceType": "Bundle", "id": str(uuid.uuid4()),
                              "meta": {"lastUpdated": now}, "type": "searchset"}
    if total is not None:
        bundle["total"] = total
    bundle["link"] = links
    if entries:
        bundle["entry"] = entries
    if q.ignored:
        # handling=lenient: say what was ignored (FHIR: an OperationOutcome with mode outcome)
        bundle.setdefault("entry", []).append({"resource": {
            "resourceType": "OperationOutcome", "issue": [{
                "severity": "warning", "code": "not-supported",
                "diagnostics": "ignored: " + ", ".join(q.ignored)[:500]}]},
            "search": {"mode": "outcome"}})
    return bundle


def _page(conn: Connection, q: Query) -> tuple[list[Any], int | None, str | None]:
    """Rows of one page, newest first; keyset paging on (last_updated desc, id).

    One row more than the page tells whether a next page exists. The total is counted only
    when it is asked for and the first page does not already hold every match (then it is the
    page's length); the count runs on the index that serves the conditions."""
    where = list(q.where)
    if q.cursor is not None:
        try:
            at, rid = store_time(q.cursor[0]), str(q.cursor[1])
        except (TypeError, ValueError, IndexError, KeyError) as exc:
            raise BadRequest("_cursor is not one this server gave out") from exc
        # a range on last_updated (index order), then the tie on id
        where.append(and_(T.c.last_updated <= at,
                          or_(T.c.last_updated < at, T.c.id > rid)))
    typed = not q.by_token
    rows, more = store.search(conn, q.rtype, where=where, count=q.count, typed=typed)
    total: int | None = None
    if q.total:
        key = None if q.accurate else tuple(
            (k, v) for k, v in q.used if k not in ("_count", "_cursor", "_total", "_include"))
        total = len(rows) if q.cursor is None and not more else store.count(
            conn, q.rtype, where=q.where, typed=typed, estimate_key=key)
    nxt = None
    if rows and more:
        nxt = encode_cursor([rows[-1].last_updated.isoformat(), rows[-1].id])
    return rows, total, nxt


def store_time(value: Any) -> datetime:
    if not isinstance(value, str):
        raise TypeError("cursor time")
    return datetime.fromisoformat(value)


def _focus_rows(conn: Connection, rows: list[Any]) -> list[Any]:
    """Rows that ``_include=Task:focus`` adds: each focused clinical resource once, in order."""
    seen = {(r.rtype, r.id) for r in rows}
    wanted: list[tuple[str, str]] = []
    for r in rows:
        rtype, _, rid = (r.focus or "").partition("/")
        if rtype in CLINICAL_TYPES and rid and (rtype, rid) not in seen:
            seen.add((rtype, rid))
            wanted.append((rtype, rid))
    if not wanted:
        return []
    found = {(r.rtype, r.id): r for r in conn.execute(select(T).where(or_(
        *(and_(T.c.rtype == t, T.c.id == i) for t, i in wanted))))}
    return [found[k] for k in wanted if k in found]


def _headers(resource: dict[str, Any]) -> dict[str, str]:
    meta = resource.get("meta") or {}
    headers = {}
    if "versionId" in meta:
        headers["ETag"] = f'W/"{meta["versionId"]}"'
    return headers


def fhir_router(node: Node) -> APIRouter:
    ctx = node.ctx
    router = APIRouter(prefix="/fhir", route_class=FhirRoute, tags=["fhir"],
                       default_response_class=FhirResponse)

    def now() -> str:
        return ctx.now().isoformat(timespec="milliseconds").replace("+00:00", "Z")

    def audited(role: str, request: Request, seen: list[tuple[str, str | None]],
                conn: Connection) -> None:
        query = redacted_query(request.url.path, request.url.query)
        interaction = "read" if request.path_params.get("rid") else "search-type"
        ctx.audit.append(conn, read_entries(role, query, seen, ctx.now(),
                                            interaction=interaction, **who(request, role)))

    @router.get("/metadata", responses=answers("CapabilityStatement"))
    def metadata(request: Request) -> Response:
        return fhir_json(capability_statement(_base(request), ctx.node_id, now()))

    router.include_router(terminology_router(node))  # ConceptMap read/search, $translate

    @router.get("/{rtype}", responses=answers("Bundle", 403, 404))
    def search(rtype: str, request: Request) -> Response:
        role = _allowed(request, rtype)
        items = list(request.query_params.multi_items())
        lenient = _lenient(request)
        if rtype == AUDIT_TYPE:
            q = parse_query(rtype, items, AUDIT, lenient=lenient)
            with ctx.store.write() as conn:
                events, total, nxt = search_audit(conn, q)
                audited(role, request, [], conn)
            entries = [_entry(_base(request), e, "match") for e in events]
            return fhir_json(_searchset(request, q, entries, total, nxt, now()))
        q = parse_query(rtype, items, T, lenient=lenient)
        base = _base(request)
        with ctx.store.write() as conn:
            rows, total, nxt = _page(conn, q)
            extra = _focus_rows(conn, rows) if q.include_focus else []
            audited(role, request, [(f"{r.rtype}/{r.id}", r.patient_hash) for r in rows + extra],
                    conn)
        entries = [_entry(base, orjson.loads(r.body), "match") for r in rows]
        entries += [_entry(base, orjson.loads(r.body), "include") for r in extra]
        return fhir_json(_searchset(request, q, entries, total, nxt, now()))

    @router.get("/{rtype}/{rid}", responses=answers(None, 403, 404))
    def read(rtype: str, rid: str, request: Request) -> Response:
        role = _allowed(request, rtype)
        with ctx.store.write() as conn:
            if rtype == AUDIT_TYPE:
                resource = read_audit_event(conn, rid)
                audited(role, request, [], conn)
                return fhir_json(resource)
            row = store.get_row(conn, rtype, rid)
            audited(role, request, [(f"{rtype}/{rid}", row.patient_hash)], conn)
        resource = orjson.loads(row.body)
        headers = _headers(resource)
        headers["Last-Modified"] = format_datetime(row.last_updated, usegmt=True)
        return fhir_json(resource, headers=headers)

    def workflow() -> Any:
        wf = getattr(node, "workflow", None)
        if wf is None:
            raise WorkflowUnavailable("the referral workflow is not available on this node")
        return wf

    async def body_of(request: Request) -> Any:
        try:
            return orjson.loads(await request.body())
        except orjson.JSONDecodeError as exc:
            raise BadRequest("the body is not JSON", issue="structure") from exc

    def writer(request: Request) -> str:
        principal = principal_of(request)
        if principal.acting((WRITER,)) is None:
            raise Forbidden(f"role '{','.join(principal.roles)}' may not change referrals")
        return WRITER

    @router.post("", responses=answers("Bundle", 403, 404, 409, 501),
                 openapi_extra=fhir_body("Bundle"))
    @router.post("/", include_in_schema=False)  # "[base]/" as many clients write it
    async def transaction(request: Request) -> Response:
        role = writer(request)
        bundle = await body_of(request)
        if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle" \
                or bundle.get("type") != "transaction":
            raise BadRequest("POST /fhir takes a Bundle of type transaction")
        checked(validate_bundle, bundle)
        result = await run_in_threadpool(lambda: workflow().submit(bundle, actor=actor_of(request, role)))
        return fhir_json(result)

    @router.put("/Task/{rid}", responses=answers("Task", 403, 404, 409, 501),
                openapi_extra=fhir_body("Task"))
    async def move(rid: str, request: Request) -> Response:
        role = writer(request)
        task = await body_of(request)
        if not isinstance(task, dict) or task.get("resourceType") != "Task":
            raise BadRequest("PUT /fhir/Task/{id} takes a Task")
        if task.get("id") != rid:
            raise BadRequest("Task.id must be the id in the URL")
        checked(validate_resource, task)
        result = await run_in_threadpool(
            lambda: workflow().move(rid, task, actor=actor_of(request, role)))
        return fhir_json(result, headers=_headers(result))

    @router.api_route("", methods=["GET", "PUT", "PATCH", "DELETE"], include_in_schema=False)
    @router.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
                      include_in_schema=False)
    def unknown(request: Request, path: str = "") -> Response:
        parts = [p for p in path.split("/") if p]
        if parts and len(parts) <= 2 and parts[0] in ROLE_FOR:
            raise NotSupported(f"{request.method} is not supported on /fhir/{parts[0]}")
        raise NotFound("this path is not part of the /fhir API")

    return router


def checked(validate: Any, obj: dict[str, Any]) -> None:
    """Schema check before the workflow sees it: InvalidFhir becomes a 422 InvalidResource."""
    try:
        validate(obj)
    except InvalidFhir as exc:
        raise InvalidResource(exc.message, detail=exc.detail) from exc
