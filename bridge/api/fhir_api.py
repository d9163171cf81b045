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
from urllib.parse import parse_qsl, urlencode

import orjson
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import Connection, and_, or_
from starlette.responses import Response

from bridge.api.auth import role_of
from bridge.api.capability import AUDIT_TYPE, CLINICAL_TYPES, capability_statement
from bridge.api.fhir_audit import (
    AUDIT,
    read_audit_event,
    read_entries,
    redacted_query,
    search_audit,
)
from bridge.api.fhir_results import included, revincluded, sort_order, subset
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
    return role_of(request.app.state.tokens, request.headers.get("authorization"))


def _allowed(request: Request, rtype: str) -> str:
    """The caller's role, if it may read ``rtype``: 401 without a good token, then 404, 403."""
    role = _role(request)
    needed = ROLE_FOR.get(rtype)
    if needed is None:
        raise NotFound("this resource type is not served here")
    if role != needed:
        what = "the audit log" if rtype == AUDIT_TYPE else "clinical resources"
        raise Forbidden(f"role '{role}' may not read {what} (minimum necessary)")
    return role


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/") + "/fhir"


def _lenient(request: Request) -> bool:
    return "handling=lenient" in request.headers.get("prefer", "").replace(" ", "")


def _entry(base: str, resource: dict[str, Any], mode: str) -> dict[str, Any]:
    return {"fullUrl": f"{base}/{resource['resourceType']}/{resource['id']}",
            "resource": resource, "search": {"mode": mode}}


def _searchset(request: Request, q: Query, entries: list[dict[str, Any]], total: int | None,
               nxt: str | None, now: str, warnings: list[str] | None = None) -> dict[str, Any]:
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
    if warnings:  # a bounded _include / _revinclude
        bundle.setdefault("entry", []).append({"resource": {
            "resourceType": "OperationOutcome", "issue": [{
                "severity": "warning", "code": "too-costly", "diagnostics": w}
                for w in warnings]}, "search": {"mode": "outcome"}})
    return bundle


def _bundle_json(bundle: dict[str, Any], q: Query) -> Response:
    """The searchset as JSON, indented if ``_pretty=true``."""
    if not q.pretty:
        return fhir_json(bundle)
    return Response(orjson.dumps(bundle, option=orjson.OPT_INDENT_2),
                    media_type="application/fhir+json; charset=utf-8")


def _page(conn: Connection, q: Query) -> tuple[list[Any], int | None, str | None]:
    """Rows of one page, newest first; keyset paging on (last_updated desc, id).

    One row more than the page tells whether a next page exists. The total is counted only
    when it is asked for and the first page does not already hold every match (then it is the
    page's length); the count runs on the index that serves the conditions."""
    where = list(q.where)
    order = sort_order(q)
    offset = 0
    if q.cursor is not None and order:  # another order than newest first pages by position
        if not (isinstance(q.cursor, dict) and isinstance(q.cursor.get("o"), int)
                and 0 <= q.cursor["o"] <= 10**9):
            raise BadRequest("_cursor is not one this server gave out")
        offset = q.cursor["o"]
    elif q.cursor is not None:
        try:
            at, rid = store_time(q.cursor[0]), str(q.cursor[1])
        except (TypeError, ValueError, IndexError, KeyError) as exc:
            raise BadRequest("_cursor is not one this server gave out") from exc
        # a range on last_updated (index order), then the tie on id
        where.append(and_(T.c.last_updated <= at,
                          or_(T.c.last_updated < at, T.c.id > rid)))
    typed = not q.by_token
    rows, more = store.search(conn, q.rtype, where=where, count=q.count, typed=typed,
                              order=order, offset=offset)
    total: int | None = None
    if q.total:
        key = None if q.accurate else tuple(
            (k, v) for k, v in q.used if k not in _NOT_MATCHING)
        total = offset + len(rows) if q.cursor is None and not more else store.count(
            conn, q.rtype, where=q.where, typed=typed, estimate_key=key)
    nxt = None
    if rows and more:
        nxt = encode_cursor({"o": offset + len(rows)} if order else
                            [rows[-1].last_updated.isoformat(), rows[-1].id])
    return rows, total, nxt


#: result parameters that do not change which resources match (the count's estimate key)
_NOT_MATCHING = ("_count", "_cursor", "_total", "_totalMethod", "_include", "_revinclude", "_sort", "_summary",
                 "_elements", "_pretty", "_format")


def store_time(value: Any) -> datetime:
    if not isinstance(value, str):
        raise TypeError("cursor time")
    return datetime.fromisoformat(value)


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
                conn: Connection, query_string: str | None = None) -> None:
        query = redacted_query(request.url.path, request.url.query if query_string is None
                               else query_string)
        ctx.audit.append(conn, read_entries(role, query, seen, ctx.now()))

    @router.get("/metadata", responses=answers("CapabilityStatement"))
    def metadata(request: Request) -> Response:
        return fhir_json(capability_statement(_base(request), ctx.node_id, now()))

    router.include_router(terminology_router(node))  # ConceptMap read/search, $translate

    def run_search(rtype: str, request: Request, items: list[tuple[str, str]]) -> Response:
        """One search (GET or POST _search: the same parameters, the same answer)."""
        role = _allowed(request, rtype)
        lenient = _lenient(request)
        query = urlencode(items)
        if rtype == AUDIT_TYPE:
            q = parse_query(rtype, items, AUDIT, lenient=lenient)
            with ctx.store.write() as conn:
                events, total, nxt = search_audit(conn, q)
                audited(role, request, [], conn, query)
            entries = [_entry(_base(request), e, "match") for e in events]
            return _bundle_json(_searchset(request, q, entries, total, nxt, now()), q)
        base = _base(request)
        q = parse_query(rtype, items, T, lenient=lenient, base=base)
        with ctx.store.write() as conn:
            rows, total, nxt = _page(conn, q)
            extra, warnings = included(conn, q, rows)
            more, more_warnings = revincluded(conn, q, rows + extra)
            extra += more
            audited(role, request, [(f"{r.rtype}/{r.id}", r.patient_hash) for r in rows + extra],
                    conn, query)
        entries = [_entry(base, subset(orjson.loads(r.body), q), "match") for r in rows]
        entries += [_entry(base, orjson.loads(r.body), "include") for r in extra]
        return _bundle_json(_searchset(request, q, entries, total, nxt, now(),
                                       warnings + more_warnings), q)

    @router.get("/{rtype}", responses=answers("Bundle", 403, 404))
    def search(rtype: str, request: Request) -> Response:
        return run_search(rtype, request, list(request.query_params.multi_items()))

    @router.post("/{rtype}/_search", responses=answers("Bundle", 403, 404))
    async def search_post(rtype: str, request: Request) -> Response:
        """R4 ``POST [type]/_search``: parameters in the query string and the form body."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        body = await request.body()
        if body and kind != "application/x-www-form-urlencoded":
            raise BadRequest("POST _search takes its parameters as "
                             "application/x-www-form-urlencoded")
        try:
            form = parse_qsl(body.decode("utf-8"), keep_blank_values=True)
        except UnicodeDecodeError as exc:
            raise BadRequest("POST _search: the form is not UTF-8") from exc
        items = list(request.query_params.multi_items()) + form
        return await run_in_threadpool(run_search, rtype, request, items)

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
        role = _role(request)
        if role != WRITER:
            raise Forbidden(f"role '{role}' may not change referrals")
        return role

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
        result = await run_in_threadpool(lambda: workflow().submit(bundle, actor=f"role:{role}"))
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
            lambda: workflow().move(rid, task, actor=f"role:{role}"))
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
