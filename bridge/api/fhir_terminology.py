"""Terminology on the local FHIR API: the site's ConceptMaps and ``$translate``.

    GET  /fhir/ConceptMap                       search: url, _id, name, source-system,
                                                target-system -> searchset Bundle
    GET  /fhir/ConceptMap/{id}                  read
    GET  /fhir/ConceptMap/$translate?...        R4 $translate (query parameters)
    POST /fhir/ConceptMap/$translate            R4 $translate (a Parameters body)
    GET|POST /fhir/ConceptMap/{id}/$translate   the same, on one map

``$translate`` takes ``url`` (or ``conceptMap`` in a POST, or the map id in the path),
``system`` + ``code`` (or ``coding``, or ``codeableConcept``: each coding is tried), optional
``source`` / ``target`` (the maps' value sets), ``targetsystem`` and ``reverse``; it answers
a ``Parameters`` with ``result``, ``message`` when nothing matched, and a ``match`` (equivalence,
concept, source) per target found. Without ``url`` every map of the site is searched.

The maps are the node's site maps (``bridge.mapping.sites``), loaded on first use. Any role may
read them (they hold catalogue codes, no patient data), so nothing here is audited.
"""

from __future__ import annotations

import threading
import uuid
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from bridge.api.auth import principal_of
from bridge.api.fhir_search import safe_name
from bridge.api.outcome import BadRequest, FhirResponse, FhirRoute, fhir_body, fhir_json
from bridge.api.outcome import fhir_responses as answers
from bridge.errors import InvalidFhir, InvalidResource, NotFound
from bridge.fhir.validate import validate_resource
from bridge.mapping.conceptmap import translate_many

if TYPE_CHECKING:
    from bridge.node import Node

SEARCH_PARAMS = ("url", "_id", "name", "source-system", "target-system")
TRANSLATE_PARAMS = (
    "url",
    "conceptMapVersion",
    "system",
    "code",
    "version",
    "source",
    "target",
    "targetsystem",
    "reverse",
    "coding",
    "codeableConcept",
    "conceptMap",
)


def _lenient(request: Request) -> bool:
    return "handling=lenient" in request.headers.get("prefer", "").replace(" ", "")


def _bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value in ("true", "false"):
        return value == "true"
    raise BadRequest(f"{name} must be true or false")


def _from_parameters(body: Any) -> dict[str, Any]:
    """The $translate inputs of a Parameters resource, by name."""
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise BadRequest("POST $translate takes a Parameters resource")
    try:
        validate_resource(body)
    except InvalidFhir as exc:
        raise InvalidResource(exc.message, detail=exc.detail) from exc
    out: dict[str, Any] = {}
    for p in body.get("parameter", []):
        name = p.get("name")
        if name not in TRANSLATE_PARAMS:
            raise BadRequest(
                f"$translate has no parameter {safe_name(str(name))!r}", issue="not-supported"
            )
        if name in out:
            raise BadRequest(f"parameter {name} is given twice")
        if name == "conceptMap":
            out[name] = p.get("resource")
            continue
        values = [v for k, v in p.items() if k.startswith("value")]
        if len(values) != 1:
            raise BadRequest(f"parameter {name} needs one value[x]")
        out[name] = values[0]
    return out


def _from_query(request: Request) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in request.query_params.multi_items():
        if name in ("coding", "codeableConcept", "conceptMap"):
            raise BadRequest(f"{name} is given in a POST Parameters body", issue="not-supported")
        if name not in TRANSLATE_PARAMS:
            if _lenient(request):
                continue
            raise BadRequest(
                f"$translate has no parameter {safe_name(name)!r}", issue="not-supported"
            )
        if name in out:
            raise BadRequest(f"parameter {name} is given twice")
        out[name] = value
    return out


def _codings(args: dict[str, Any]) -> list[tuple[str, str]]:
    """(system, code) pairs to translate, in the order given."""
    pairs: list[tuple[str, str]] = []
    if "code" in args:
        if "system" not in args:
            raise BadRequest("code needs system")
        pairs.append((str(args["system"]), str(args["code"])))
    if "coding" in args:
        c = args["coding"]
        if not isinstance(c, dict) or "system" not in c or "code" not in c:
            raise BadRequest("coding needs system and code")
        pairs.append((c["system"], c["code"]))
    if "codeableConcept" in args:
        cc = args["codeableConcept"]
        pairs += [
            (c["system"], c["code"])
            for c in (cc or {}).get("coding", [])
            if "system" in c and "code" in c
        ]
    if not pairs:
        raise BadRequest("$translate needs system and code, coding or codeableConcept")
    return pairs


def terminology_router(node: Node) -> APIRouter:
    router = APIRouter(route_class=FhirRoute, tags=["fhir"], default_response_class=FhirResponse)
    state: dict[str, dict[str, dict[str, Any]]] = {}
    lock = threading.Lock()

    def conceptmaps() -> dict[str, dict[str, Any]]:
        """{ConceptMap id: ConceptMap} of the node's site maps, loaded once."""
        if "maps" not in state:
            with lock:
                if "maps" not in state:
                    from bridge.mapping.sites import load_node_maps

                    state["maps"] = {
                        cm["id"]: cm
                        for maps in load_node_maps(node.plan)
                        for cm in maps.conceptmaps.values()
                    }
        return state["maps"]

    def authorised(request: Request) -> None:
        principal_of(request)

    def base(request: Request) -> str:
        return str(request.base_url).rstrip("/") + "/fhir"

    def by_id(cid: str) -> dict[str, Any]:
        cm = conceptmaps().get(cid)
        if cm is None:
            raise NotFound("no such ConceptMap among this site's maps")
        return cm

    def run_translate(args: dict[str, Any], cid: str | None) -> Response:
        if cid is not None:
            maps = [by_id(cid)]
        elif isinstance(args.get("conceptMap"), dict):
            cm = args["conceptMap"]
            if cm.get("resourceType") != "ConceptMap":
                raise BadRequest("conceptMap must be a ConceptMap")
            maps = [cm]
        else:
            maps = list(conceptmaps().values())
        if "url" in args:
            maps = [m for m in maps if m.get("url") == args["url"]]
            if not maps:
                raise NotFound("no ConceptMap with that url")
        if "conceptMapVersion" in args:
            maps = [m for m in maps if m.get("version") == args["conceptMapVersion"]]
        if "source" in args:
            maps = [m for m in maps if m.get("sourceUri") == args["source"]]
        if "target" in args:
            maps = [m for m in maps if m.get("targetUri") == args["target"]]
        reverse = _bool("reverse", args.get("reverse", False))
        target_system = args.get("targetsystem")
        result: dict[str, Any] | None = None
        for system, code in _codings(args):
            result = translate_many(
                maps, system, code, reverse=reverse, target_system=target_system
            )
            if result["parameter"][0]["valueBoolean"]:
                break
        assert result is not None
        return fhir_json(result)

    @router.get("/ConceptMap/$translate", responses=answers("Parameters", 404))
    def translate_get(request: Request) -> Response:
        authorised(request)
        return run_translate(_from_query(request), None)

    @router.post(
        "/ConceptMap/$translate",
        responses=answers("Parameters", 404),
        openapi_extra=fhir_body("Parameters"),
    )
    async def translate_post(request: Request) -> Response:
        authorised(request)
        return run_translate(_from_parameters(await _json(request)), None)

    @router.get("/ConceptMap/{cid}/$translate", responses=answers("Parameters", 404))
    def translate_one_get(cid: str, request: Request) -> Response:
        authorised(request)
        return run_translate(_from_query(request), cid)

    @router.post(
        "/ConceptMap/{cid}/$translate",
        responses=answers("Parameters", 404),
        openapi_extra=fhir_body("Parameters"),
    )
    async def translate_one_post(cid: str, request: Request) -> Response:
        authorised(request)
        return run_translate(_from_parameters(await _json(request)), cid)

    @router.get("/ConceptMap", responses=answers("Bundle"))
    def search(request: Request) -> Response:
        authorised(request)
        items = list(request.query_params.multi_items())
        lenient = _lenient(request)
        found = list(conceptmaps().values())
        used: list[tuple[str, str]] = []
        for name, value in items:
            if name not in SEARCH_PARAMS:
                if lenient:
                    continue
                raise BadRequest(
                    f"unknown search parameter {safe_name(name)!r} for ConceptMap "
                    f"(supported: {', '.join(SEARCH_PARAMS)})"
                )
            used.append((name, value))
            wanted = set(value.split(","))
            if name == "url":
                found = [m for m in found if m.get("url") in wanted]
            elif name == "_id":
                found = [m for m in found if m["id"] in wanted]
            elif name == "name":
                found = [
                    m
                    for m in found
                    if any(str(m.get("name", "")).lower().startswith(w.lower()) for w in wanted)
                ]
            else:
                key = "source" if name == "source-system" else "target"
                found = [m for m in found if any(g.get(key) in wanted for g in m.get("group", []))]
        b = base(request)
        query = urlencode(used)
        bundle: dict[str, Any] = {
            "resourceType": "Bundle",
            "id": str(uuid.uuid4()),
            "type": "searchset",
            "total": len(found),
            "link": [
                {"relation": "self", "url": f"{b}/ConceptMap" + (f"?{query}" if query else "")}
            ],
        }
        if found:
            bundle["entry"] = [
                {"fullUrl": f"{b}/ConceptMap/{m['id']}", "resource": m, "search": {"mode": "match"}}
                for m in found
            ]
        return fhir_json(bundle)

    @router.get("/ConceptMap/{cid}", responses=answers("ConceptMap", 404))
    def read(cid: str, request: Request) -> Response:
        authorised(request)
        return fhir_json(by_id(cid))

    return router


async def _json(request: Request) -> Any:
    try:
        return orjson.loads(await request.body())
    except orjson.JSONDecodeError as exc:
        raise BadRequest("the body is not JSON", issue="structure") from exc
