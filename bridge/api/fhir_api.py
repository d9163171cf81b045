"""The hospital-facing FHIR R4 REST API under /fhir (local port only; the peer gateway has none).

    GET  /fhir/metadata            CapabilityStatement (no token)
    GET  /fhir/{type}?...          search -> searchset Bundle        clinician; AuditEvent: auditor
    GET  /fhir/{type}/{id}         read                               clinician; AuditEvent: auditor
    GET  /fhir/{type}/{id}/_history[/{vid}]   history / vread         clinician
    GET  /fhir/{type}/_history     the type's history, newest first   clinician
    POST /fhir                     transaction or batch Bundle (fhir_transaction)  clinician
    PUT  /fhir/Task/{id}           Task -> node.workflow.move (a consultation's: node.consult)
    POST /fhir/Task/{id}/$<step>   a consultation step (bridge/consult)         clinician

HEAD on every GET route, 406/415 for formats not served, trailing slashes: ``fhir_http``.
Reads carry ETag and Last-Modified and answer 304 to a current ``If-None-Match`` /
``If-Modified-Since``; a PUT with ``If-Match`` of another version is refused 412.

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
from sqlalchemy import Connection, and_, or_, select
from starlette.responses import Response

from bridge.api.auth import actor_of, principal_of, who
from bridge.api.capability import (
    AUDIT_TYPE,
    CLINICAL_TYPES,
    CONSULT_DOCS,
    UPDATABLE,
    capability_statement,
)
from bridge.api.fhir_audit import (
    AUDIT,
    read_audit_event,
    read_entries,
    redacted_query,
    search_audit,
)
from bridge.api.fhir_http import (
    etag,
    if_match,
    not_modified,
    not_modified_response,
    version_headers,
    written,
)
from bridge.api.fhir_results import included, revincluded, sort_order, subset
from bridge.api.fhir_search import Query, encode_cursor, parse_query
from bridge.api.fhir_terminology import terminology_router
from bridge.api.fhir_transaction import Transactions
from bridge.api.outcome import (
    BadRequest,
    FhirResponse,
    FhirRoute,
    NotSupported,
    fhir_body,
    fhir_json,
)
from bridge.api.outcome import fhir_responses as answers
from bridge.errors import (
    ChangeNotApplied,
    Forbidden,
    HutongError,
    InvalidFhir,
    InvalidResource,
    NotFound,
)
from bridge.fhir.validate import validate_bundle, validate_resource
from bridge.fhirstore import store
from bridge.fhirstore.tables import FHIR_RESOURCE as T
from bridge.referral.workflow import check_version

if TYPE_CHECKING:
    from bridge.node import Node

#: the role allowed per type (minimum necessary)
ROLE_FOR = {**dict.fromkeys(CLINICAL_TYPES, "clinician"), AUDIT_TYPE: "auditor"}
WRITER = "clinician"


class WorkflowUnavailable(HutongError):
    code = "HT-FHIR-NO-WORKFLOW"
    http_status = 501


def _allowed(request: Request, rtype: str) -> str:
    """The caller's role, if it may read ``rtype``: 401 without a good token, then 404, 403."""
    principal = principal_of(request)
    needed = ROLE_FOR.get(rtype)
    if needed is None:
        raise NotFound("this resource type is not served here")
    if principal.acting((needed,)) is None:
        what = "the audit log" if rtype == AUDIT_TYPE else "clinical resources"
        raise Forbidden(
            f"role '{','.join(principal.roles)}' may not read {what} (minimum necessary)"
        )
    return needed


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/") + "/fhir"


def _lenient(request: Request) -> bool:
    return "handling=lenient" in request.headers.get("prefer", "").replace(" ", "")


def _entry(base: str, resource: dict[str, Any], mode: str) -> dict[str, Any]:
    return {
        "fullUrl": f"{base}/{resource['resourceType']}/{resource['id']}",
        "resource": resource,
        "search": {"mode": mode},
    }


def _searchset(
    request: Request,
    q: Query,
    entries: list[dict[str, Any]],
    total: int | None,
    nxt: str | None,
    now: str,
    warnings: list[str] | None = None,
) -> dict[str, Any]:
    base = _base(request)
    url = f"{base}/{q.rtype}"
    links = [{"relation": "self", "url": url + ("?" + urlencode(q.used) if q.used else "")}]
    if nxt:
        kept = [(k, v) for k, v in q.used if k != "_cursor"] + [("_cursor", nxt)]
        links.append({"relation": "next", "url": f"{url}?{urlencode(kept)}"})
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "meta": {"lastUpdated": now},
        "type": "searchset",
    }
    if total is not None:
        bundle["total"] = total
    bundle["link"] = links
    if entries:
        bundle["entry"] = entries
    if q.ignored:
        # handling=lenient: say what was ignored (FHIR: an OperationOutcome with mode outcome)
        bundle.setdefault("entry", []).append(
            {
                "resource": {
                    "resourceType": "OperationOutcome",
                    "issue": [
                        {
                            "severity": "warning",
                            "code": "not-supported",
                            "diagnostics": "ignored: " + ", ".join(q.ignored)[:500],
                        }
                    ],
                },
                "search": {"mode": "outcome"},
            }
        )
    if warnings:  # a bounded _include / _revinclude
        bundle.setdefault("entry", []).append(
            {
                "resource": {
                    "resourceType": "OperationOutcome",
                    "issue": [
                        {"severity": "warning", "code": "too-costly", "diagnostics": w}
                        for w in warnings
                    ],
                },
                "search": {"mode": "outcome"},
            }
        )
    return bundle


def _bundle_json(bundle: dict[str, Any], q: Query) -> Response:
    """The searchset as JSON, indented if ``_pretty=true``."""
    if not q.pretty:
        return fhir_json(bundle)
    return Response(
        orjson.dumps(bundle, option=orjson.OPT_INDENT_2),
        media_type="application/fhir+json; charset=utf-8",
    )


def _page(conn: Connection, q: Query) -> tuple[list[Any], int | None, str | None]:
    """Rows of one page, newest first; keyset paging on (last_updated desc, id).

    One row more than the page tells whether a next page exists. The total is counted only
    when it is asked for and the first page does not already hold every match (then it is the
    page's length); the count runs on the index that serves the conditions."""
    where = list(q.where)
    order = sort_order(q)
    offset = 0
    if q.cursor is not None and order:  # another order than newest first pages by position
        if not (
            isinstance(q.cursor, dict)
            and isinstance(q.cursor.get("o"), int)
            and 0 <= q.cursor["o"] <= 10**9
        ):
            raise BadRequest("_cursor is not one this server gave out")
        offset = q.cursor["o"]
    elif q.cursor is not None:
        try:
            at, rid = store_time(q.cursor[0]), str(q.cursor[1])
        except (TypeError, ValueError, IndexError, KeyError) as exc:
            raise BadRequest("_cursor is not one this server gave out") from exc
        # a range on last_updated (index order), then the tie on id
        where.append(and_(T.c.last_updated <= at, or_(T.c.last_updated < at, T.c.id > rid)))
    typed = not q.by_token
    rows, more = store.search(
        conn, q.rtype, where=where, count=q.count, typed=typed, order=order, offset=offset
    )
    total: int | None = None
    if q.total:
        key = None if q.accurate else tuple((k, v) for k, v in q.used if k not in _NOT_MATCHING)
        total = (
            offset + len(rows)
            if q.cursor is None and not more
            else store.count(conn, q.rtype, where=q.where, typed=typed, estimate_key=key)
        )
    nxt = None
    if rows and more:
        nxt = encode_cursor(
            {"o": offset + len(rows)} if order else [rows[-1].last_updated.isoformat(), rows[-1].id]
        )
    return rows, total, nxt


#: result parameters that do not change which resources match (the count's estimate key)
_NOT_MATCHING = (
    "_count",
    "_cursor",
    "_total",
    "_totalMethod",
    "_include",
    "_revinclude",
    "_sort",
    "_summary",
    "_elements",
    "_pretty",
    "_format",
)


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
    router = APIRouter(
        prefix="/fhir", route_class=FhirRoute, tags=["fhir"], default_response_class=FhirResponse
    )

    def now() -> str:
        return ctx.now().isoformat(timespec="milliseconds").replace("+00:00", "Z")

    def audited(
        role: str,
        request: Request,
        seen: list[tuple[str, str | None]],
        conn: Connection,
        query_string: str | None = None,
    ) -> None:
        query = redacted_query(
            request.url.path, request.url.query if query_string is None else query_string
        )
        interaction = "read" if request.path_params.get("rid") else "search-type"
        ctx.audit.append(
            conn,
            read_entries(
                role, query, seen, ctx.now(), interaction=interaction, **who(request, role)
            ),
        )

    @router.get("/metadata", responses=answers("CapabilityStatement"))
    def metadata(request: Request) -> Response:
        return fhir_json(capability_statement(_base(request), ctx.node_id, now()))

    router.include_router(terminology_router(node))  # ConceptMap read/search, $translate

    def history_answer(request: Request, rtype: str, rid: str | None) -> Response:
        role = _allowed(request, rtype)
        if rtype == AUDIT_TYPE:
            raise NotFound("the audit log keeps one version of each event: no history")
        count, before, since = _history_params(request)
        base = _base(request)
        with ctx.store.write() as conn:
            current = store.get_row(conn, rtype, rid) if rid is not None else None
            rows, more = store.history(conn, rtype, rid, count=count, before=before, since=since)
            hashes = (
                {current.id: current.patient_hash}
                if current is not None
                else _patient_hashes(conn, rtype, {r.id for r in rows})
            )
            audited(role, request, [(f"{rtype}/{i}", h) for i, h in hashes.items()], conn)
        url = f"{base}/{rtype}" + (f"/{rid}" if rid else "") + "/_history"
        kept = [(k, v) for k, v in request.query_params.multi_items() if k != "_cursor"]
        links = [
            {
                "relation": "self",
                "url": url
                + (
                    "?" + urlencode(list(request.query_params.multi_items()))
                    if request.url.query
                    else ""
                ),
            }
        ]
        if more and rows:
            links.append(
                {
                    "relation": "next",
                    "url": f"{url}?{urlencode(kept + [('_cursor', str(rows[-1].seq))])}",
                }
            )
        entries = [_history_entry(base, r) for r in rows]
        bundle: dict[str, Any] = {
            "resourceType": "Bundle",
            "id": str(uuid.uuid4()),
            "meta": {"lastUpdated": now()},
            "type": "history",
            "link": links,
        }
        if rid is not None and before is None and since is None and not more:
            bundle["total"] = len(rows)
        if entries:
            bundle["entry"] = entries
        return fhir_json(bundle)

    @router.get("/{rtype}/_history", responses=answers("Bundle", 403, 404))
    def type_history(rtype: str, request: Request) -> Response:
        return history_answer(request, rtype, None)

    @router.get("/{rtype}/{rid}/_history", responses=answers("Bundle", 403, 404))
    def instance_history(rtype: str, rid: str, request: Request) -> Response:
        return history_answer(request, rtype, rid)

    @router.get("/{rtype}/{rid}/_history/{vid}", responses=answers(None, 403, 404))
    def vread(rtype: str, rid: str, vid: str, request: Request) -> Response:
        role = _allowed(request, rtype)
        if rtype == AUDIT_TYPE or not vid.isdigit() or len(vid) > 9:
            raise NotFound(f"{rtype}/{rid} has no such version here")
        with ctx.store.write() as conn:
            current = store.get_row(conn, rtype, rid)
            row = store.get_version(conn, rtype, rid, int(vid))
            audited(role, request, [(f"{rtype}/{rid}", current.patient_hash)], conn)
        if not_modified(request, row.version, row.at):
            return not_modified_response(row.version, row.at)
        return fhir_json(orjson.loads(row.body), headers=version_headers(row.version, row.at))

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
            audited(
                role,
                request,
                [(f"{r.rtype}/{r.id}", r.patient_hash) for r in rows + extra],
                conn,
                query,
            )
        entries = [_entry(base, subset(orjson.loads(r.body), q), "match") for r in rows]
        entries += [_entry(base, orjson.loads(r.body), "include") for r in extra]
        return _bundle_json(
            _searchset(request, q, entries, total, nxt, now(), warnings + more_warnings), q
        )

    @router.get("/{rtype}", responses=answers("Bundle", 403, 404))
    def search(rtype: str, request: Request) -> Response:
        return run_search(rtype, request, list(request.query_params.multi_items()))

    @router.post("/{rtype}/_search", responses=answers("Bundle", 403, 404))
    async def search_post(rtype: str, request: Request) -> Response:
        """R4 ``POST [type]/_search``: parameters in the query string and the form body."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        body = await request.body()
        if body and kind != "application/x-www-form-urlencoded":
            raise BadRequest(
                "POST _search takes its parameters as application/x-www-form-urlencoded"
            )
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
        if not_modified(request, row.version, row.last_updated):
            return not_modified_response(row.version, row.last_updated)
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

    transactions = Transactions(node)

    def update_task(
        rid: str, task: dict[str, Any], actor: str, version: int | None
    ) -> dict[str, Any]:
        """PUT of a referral Task: refused whole (naming the elements) if it changes what the
        workflow would not apply; else the workflow's move, conditional on ``version``."""
        wf = workflow()
        with ctx.store.read() as conn:
            current = store.get(conn, "Task", rid)
        # the version first: a Task another writer moved since is 412, not a refusal of
        # elements the client never changed (the step re-checks it with the row locked)
        check_version(current, version)
        refuse_unapplied(current, task)
        cw = getattr(node, "consult", None)
        if cw is not None and cw.by_task(rid) is not None:
            return dict(cw.move(rid, task, actor, if_match=version))
        return dict(wf.move(rid, task, actor, if_match=version))

    def writer(request: Request) -> str:
        principal = principal_of(request)
        if principal.acting((WRITER,)) is None:
            raise Forbidden(f"role '{','.join(principal.roles)}' may not change referrals")
        return WRITER

    @router.post(
        "", responses=answers("Bundle", 403, 404, 412, 415, 501), openapi_extra=fhir_body("Bundle")
    )
    @router.post("/", include_in_schema=False)  # "[base]/" as many clients write it
    async def transaction(request: Request) -> Response:
        role = writer(request)
        bundle = await body_of(request)
        if (
            not isinstance(bundle, dict)
            or bundle.get("resourceType") != "Bundle"
            or bundle.get("type") not in ("transaction", "batch")
        ):
            raise BadRequest("POST /fhir takes a Bundle of type transaction or batch")
        if bundle.get("type") == "batch":  # each entry's resource is checked on its own
            entries = bundle.get("entry")
            checked(
                validate_bundle,
                {
                    **bundle,
                    "entry": [
                        {k: v for k, v in e.items() if k != "resource"}
                        if isinstance(e, dict)
                        else e
                        for e in entries
                    ],
                }
                if isinstance(entries, list)
                else bundle,
            )
        else:
            checked(validate_bundle, bundle)
        actor = actor_of(request, role)

        def move_task(rid: str, task: dict[str, Any], version: int | None) -> dict[str, Any]:
            checked(validate_resource, task)
            return update_task(rid, task, actor, version)

        result = await run_in_threadpool(lambda: transactions.run(bundle, actor, move_task))
        return fhir_json(result)

    @router.put(
        "/Task/{rid}",
        responses=answers("Task", 403, 404, 412, 415, 501),
        openapi_extra=fhir_body("Task"),
    )
    async def move(rid: str, request: Request) -> Response:
        role = writer(request)
        task = await body_of(request)
        if not isinstance(task, dict) or task.get("resourceType") != "Task":
            raise BadRequest("PUT /fhir/Task/{id} takes a Task")
        if task.get("id") != rid:
            raise BadRequest("Task.id must be the id in the URL")
        checked(validate_resource, task)
        version = if_match(request.headers.get("if-match"))
        before = (
            task.get("meta", {}).get("versionId") if isinstance(task.get("meta"), dict) else None
        )
        result = await run_in_threadpool(
            lambda: update_task(rid, task, actor_of(request, role), version)
        )
        at = _instant(result)
        same = before is not None and str(before) == str(result["meta"]["versionId"])
        what = (
            f"Task/{rid} unchanged at version {result['meta']['versionId']}"
            if same
            else f"Task/{rid} updated to version {result['meta']['versionId']}"
        )
        return written(request, result, _base(request), 200, at, what)

    @router.post(
        "/Task/{rid}/{operation}",
        responses=answers(None, 403, 404, 409, 412, 415, 501),
        openapi_extra=fhir_body("Parameters"),
    )
    async def consult_step(rid: str, operation: str, request: Request) -> Response:
        """A consultation step as an operation on its Task (``$return``, ``$resubmit``,
        ``$schedule``, ``$start``, ``$report``, ``$release``, ``$cancel``, ``$follow-up``,
        ``$close``; ``$referral-draft`` answers a pre-filled referral Bundle). The body: a
        Parameters (``reason`` valueString, ``resources`` a Bundle resource, ``kind`` and
        ``receiver`` for the draft), a Bundle of the step's resources, or nothing."""
        role = writer(request)
        op = operation.removeprefix("$")
        if not operation.startswith("$") or op not in CONSULT_OPERATIONS:
            raise NotFound(
                f"this path is not part of the /fhir API (Task operations: "
                f"{', '.join('$' + o for o in CONSULT_OPERATIONS)})"
            )
        cw = getattr(node, "consult", None)
        if cw is None:
            raise WorkflowUnavailable("the consultation workflow is not available on this node")
        raw = await request.body()
        body: Any = {}
        if raw.strip():
            body = await body_of(request)
        params = consult_parameters(body)
        actor = actor_of(request, role)
        version = if_match(request.headers.get("if-match"))

        def run() -> tuple[dict[str, Any], dict[str, Any] | None]:
            row = cw.by_task(rid)
            if row is None:
                raise NotFound(f"Task/{rid} is not a consultation known here")
            if op == "referral-draft":
                draft = cw.referral_draft(
                    row["thread"], params.get("kind") or "up-outpatient", params.get("receiver")
                )
                with ctx.store.write() as conn:  # shows the patient's record: audited as read
                    audited(role, request, [(f"Task/{rid}", row["patient_hash"])], conn)
                return draft, None
            event = op
            if op == "cancel":
                event = "cancel" if row["side"] == "inviter" else "cancelled"
            task = cw.step(
                row["thread"],
                event,
                actor,
                reason=params.get("reason"),
                bundle=params.get("resources"),
                if_match=version,
            )
            return task, task

        result, task = await run_in_threadpool(run)
        if task is None:
            return fhir_json(result)
        return written(
            request,
            result,
            _base(request),
            200,
            _instant(result),
            f"Task/{rid} moved by ${op} to version {result['meta']['versionId']}",
        )

    @router.api_route("", methods=["GET", "PUT", "PATCH", "DELETE"], include_in_schema=False)
    @router.api_route(
        "/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False
    )
    def unknown(request: Request, path: str = "") -> Response:
        parts = [p for p in path.split("/") if p]
        if not parts:
            raise NotSupported(f"{request.method} is not supported on /fhir", allow="POST")
        if parts[0] in ROLE_FOR and (
            len(parts) <= 2
            or (parts[-1] == "_history" or (len(parts) == 4 and parts[2] == "_history"))
        ):
            allow = "GET, HEAD"
            if len(parts) == 2 and parts[0] in UPDATABLE and parts[1] != "_history":
                allow += ", PUT"
            raise NotSupported(
                f"{request.method} is not supported on /fhir/{parts[0]}", allow=allow
            )
        raise NotFound("this path is not part of the /fhir API")

    return router


#: the consultation steps served as ``POST /fhir/Task/{id}/$<step>`` (bridge/consult)
CONSULT_OPERATIONS = tuple(CONSULT_DOCS)  # listed in the CapabilityStatement as well


def consult_parameters(body: Any) -> dict[str, Any]:
    """The inputs of a consultation operation: from a Parameters (``reason``, ``kind``,
    ``receiver`` as value[x]; each ``resources`` part a Bundle or one resource), a Bundle of
    resources, or one resource (e.g. the Appointment of ``$schedule``)."""
    if not isinstance(body, dict) or not body:
        return {}
    if body.get("resourceType") == "Bundle":
        return {"resources": body}
    if body.get("resourceType") != "Parameters":
        checked(validate_resource, body)
        return {
            "resources": {
                "resourceType": "Bundle",
                "type": "collection",
                "entry": [{"resource": body}],
            }
        }
    checked(validate_resource, body)
    out: dict[str, Any] = {}
    entries: list[dict[str, Any]] = []  # every part's entries, their fullUrls kept
    for p in body.get("parameter") or []:
        name = p.get("name")
        if name == "resources" and isinstance(p.get("resource"), dict):
            r = p["resource"]
            entries += (
                [e for e in r.get("entry") or [] if isinstance(e, dict)]
                if r.get("resourceType") == "Bundle"
                else [{"resource": r}]
            )
        elif name in ("reason", "kind", "receiver"):
            value = next((v for k, v in p.items() if k.startswith("value")), None)
            if isinstance(value, str):
                out[name] = value
    if entries:
        out["resources"] = {"resourceType": "Bundle", "type": "collection", "entry": entries}
    return out


#: what a PUT of a referral Task may change, by the status it asks for (everything else the
#: workflow writes itself: businessStatus, lastModified, the acceptance slip identifier)
_MOVABLE = {
    "accepted": ("status", "output"),
    "rejected": ("status", "statusReason"),
    "cancelled": ("status", "statusReason"),
    "on-hold": ("status", "statusReason"),
}
#: meta elements the server sets (a client sends back what it read)
_SERVER_META = ("versionId", "lastUpdated", "source")


def refuse_unapplied(current: dict[str, Any], task: dict[str, Any]) -> None:
    """ChangeNotApplied naming every element the PUT changes that the workflow would not
    apply (R4 update replaces the whole resource: a change silently dropped is a lie)."""
    wanted = task.get("status")
    movable = () if wanted == current.get("status") else _MOVABLE.get(str(wanted), ("status",))
    changed = []
    for key in sorted(set(current) | set(task)):
        if key in ("resourceType", "id") or key in movable:
            continue
        a, b = current.get(key), task.get(key)
        if key == "meta":
            a = {k: v for k, v in (a or {}).items() if k not in _SERVER_META} or None
            b = (
                {k: v for k, v in (b or {}).items() if k not in _SERVER_META}
                if isinstance(b, dict)
                else b
            )
            b = b or None
        if a != b:
            changed.append(f"Task.{key}")
    if changed:
        raise ChangeNotApplied(
            f"a referral Task is moved by the workflow: this PUT may change "
            f"{', '.join('Task.' + m for m in movable) or 'nothing (same status)'}, and also "
            f"changes {', '.join(changed[:20])}, which the workflow does not apply; nothing "
            f"was changed",
            elements=changed,
        )


def _instant(resource: dict[str, Any]) -> datetime | None:
    stamp = (resource.get("meta") or {}).get("lastUpdated")
    try:
        return datetime.fromisoformat(str(stamp).replace("Z", "+00:00")) if stamp else None
    except ValueError:
        return None


def _history_params(request: Request) -> tuple[int, int | None, datetime | None]:
    """``_count`` (1-100, default 20), ``_cursor`` (from a next link), ``_since`` (instant)."""
    count, before, since = 20, None, None
    for k, v in request.query_params.multi_items():
        if k == "_count":
            if not v.isdigit() or not 1 <= int(v) <= 100:
                raise BadRequest("_count: a whole number from 1 to 100")
            count = int(v)
        elif k == "_cursor":
            if not v.isdigit():
                raise BadRequest("_cursor is not one this server gave out")
            before = int(v)
        elif k == "_since":
            try:
                since = datetime.fromisoformat(v.replace("Z", "+00:00").replace(" ", "+"))
            except ValueError as exc:
                raise BadRequest("_since: an instant, e.g. 2026-11-01T08:00:00Z") from exc
            if since.tzinfo is None:
                raise BadRequest("_since: an instant with a time zone")
        elif k != "_format":
            raise BadRequest(f"unknown history parameter: {k[:40]} (_count, _since)")
    return count, before, since


def _history_entry(base: str, row: Any) -> dict[str, Any]:
    """One version as a history entry: R4 needs ``request``; ``response`` tells the version."""
    first = row.version == 1
    return {
        "fullUrl": f"{base}/{row.rtype}/{row.id}",
        "resource": orjson.loads(row.body),
        "request": {
            "method": "POST" if first else "PUT",
            "url": row.rtype if first else f"{row.rtype}/{row.id}",
        },
        "response": {
            "status": "201 Created" if first else "200 OK",
            "etag": etag(row.version),
            "lastModified": row.at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        },
    }


def _patient_hashes(conn: Connection, rtype: str, rids: set[str]) -> dict[str, str | None]:
    if not rids:
        return {}
    return {
        r.id: r.patient_hash
        for r in conn.execute(
            select(T.c.id, T.c.patient_hash).where(T.c.rtype == rtype, T.c.id.in_(sorted(rids)))
        )
    }


def checked(validate: Any, obj: dict[str, Any]) -> None:
    """Schema check before the workflow sees it: InvalidFhir becomes a 422 InvalidResource."""
    try:
        validate(obj)
    except InvalidFhir as exc:
        raise InvalidResource(exc.message, detail=exc.detail) from exc
