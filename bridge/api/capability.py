"""The CapabilityStatement of the /fhir API, built from the same tables the routes use.

Truthful by construction: the resource types, interactions and search parameters listed are
``fhir_search.SEARCH_PARAMS`` / ``AUDIT_PARAMS`` / ``RESULT_PARAMS`` / ``INCLUDES``, which are the
only ones the query parser accepts.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

from bridge.api import fhir_terminology
from bridge.api.fhir_search import (
    AUDIT_PARAMS,
    AUDIT_RESULT_PARAMS,
    INCLUDES,
    RESULT_PARAMS,
    REVINCLUDES,
    SEARCH_PARAMS,
    Param,
)

#: types the clinician role may read and search (everything but AuditEvent)
CLINICAL_TYPES = tuple(SEARCH_PARAMS)
AUDIT_TYPE = "AuditEvent"
#: the only type with an update interaction (PUT moves a referral's Task via the workflow)
UPDATABLE = ("Task",)

try:
    HUTONG_VERSION = version("hutong")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    HUTONG_VERSION = "0.0.0"

_RESULT_TYPES = {
    "_count": "number",
    "_cursor": "string",
    "_total": "token",
    "_totalMethod": "token",
    "_sort": "string",
    "_summary": "token",
    "_elements": "string",
    "_pretty": "token",
    "_format": "token",
}
#: what no served type supports: history reads, client ids, conditional interactions
_NO_CONDITIONALS: dict[str, Any] = {
    "readHistory": False,
    "updateCreate": False,
    "conditionalCreate": False,
    "conditionalRead": "not-supported",
    "conditionalUpdate": False,
    "conditionalDelete": "not-supported",
}
#: versioned clinical types: every version kept and readable, ETag / If-None-Match /
#: If-Modified-Since (304), If-Match on update, ifNoneExist in transactions (fhir_api)
_VERSIONED: dict[str, Any] = {
    **_NO_CONDITIONALS,
    "readHistory": True,
    "conditionalCreate": True,
    "conditionalRead": "full-support",
}
_HISTORY = [{"code": "vread"}, {"code": "history-instance"}, {"code": "history-type"}]


def _search_params(params: tuple[Param, ...], audit: bool = False) -> list[dict[str, Any]]:
    out = [{"name": p.name, "type": p.type, "documentation": p.doc} for p in params]
    out += [
        {"name": n, "type": _RESULT_TYPES[n], "documentation": doc}
        for n, doc in RESULT_PARAMS.items()
        if not audit or n in AUDIT_RESULT_PARAMS
    ]
    return out


def _resource(rtype: str, params: tuple[Param, ...], roles: str) -> dict[str, Any]:
    interactions = [
        {"code": "read"},
        {
            "code": "search-type",
            "documentation": "GET [type]?... or POST [type]/_search (form-encoded): the same answer",
        },
    ]
    if rtype != AUDIT_TYPE:
        interactions[1:1] = _HISTORY
    if rtype in UPDATABLE:
        interactions.append(
            {
                "code": "update",
                "documentation": "clinician only: moves the referral or consultation through "
                "its workflow",
            }
        )
    res: dict[str, Any] = {
        "type": rtype,
        "documentation": f"Roles: {roles}. Every read and search is itself audited.",
        "interaction": interactions,
        "versioning": "versioned" if rtype != AUDIT_TYPE else "no-version",
        **(
            _NO_CONDITIONALS
            if rtype == AUDIT_TYPE
            else {**_VERSIONED, "conditionalCreate": rtype not in UPDATABLE}
        ),
        "searchParam": _search_params(params, rtype == AUDIT_TYPE),
    }
    if rtype == "Task":
        res["operation"] = _consult_operations()
    if rtype in INCLUDES:
        res["searchInclude"] = list(INCLUDES[rtype])
    if rtype in REVINCLUDES:
        res["searchRevInclude"] = list(REVINCLUDES[rtype])
    return res


#: the consultation steps on a Task (``POST /fhir/Task/{id}/$<step>``, bridge/consult)
CONSULT_OPERATION = "http://hutong.dev/OperationDefinition/consult-"
CONSULT_DOCS = {
    "return": "centre: return for completion; Parameters reason = what is missing",
    "resubmit": "inviting side: the completed records (Bundle)",
    "schedule": "centre: the Appointment with the experts' PractitionerRoles (Bundle)",
    "start": "centre: the consultation meeting has begun",
    "report": "centre: the draft report (Bundle: Composition LOINC 11488-4 or DiagnosticReport)",
    "release": "centre: quality control passed; the report goes to the inviting side",
    "cancel": "either side before the meeting; Parameters reason",
    "follow-up": "inviting side: the follow-up CarePlan or Task (Bundle)",
    "close": "inviting side: the consultation is closed",
    "referral-draft": "inviting side: a referral Bundle pre-filled from a released report "
    "that recommends referral (audited as a read)",
}


def _consult_operations() -> list[dict[str, Any]]:
    return [
        {"name": name, "definition": CONSULT_OPERATION + name, "documentation": doc}
        for name, doc in CONSULT_DOCS.items()
    ]


#: the site's code maps (``fhir_terminology``): read, search and ``$translate``, any role
CONCEPTMAP_TYPE = "ConceptMap"
_CONCEPTMAP_PARAMS = {
    "url": ("uri", "the map's canonical url (comma: any of)"),
    "_id": ("token", "the map's id (comma: any of)"),
    "name": ("string", "the map's name starts with (case-insensitive)"),
    "source-system": ("uri", "a group's source code system"),
    "target-system": ("uri", "a group's target code system"),
}
TRANSLATE = "http://hl7.org/fhir/OperationDefinition/ConceptMap-translate"


def _conceptmap_resource() -> dict[str, Any]:
    """What ``fhir_terminology`` serves; a search parameter added there without a line in
    ``_CONCEPTMAP_PARAMS`` fails here (KeyError) rather than going unlisted."""
    params = [
        {"name": n, "type": _CONCEPTMAP_PARAMS[n][0], "documentation": _CONCEPTMAP_PARAMS[n][1]}
        for n in fhir_terminology.SEARCH_PARAMS
    ]
    return {
        "type": CONCEPTMAP_TYPE,
        "documentation": "Roles: any. The site's code maps (catalogue codes, no patient "
        "data), loaded from its mapping folder; not audited.",
        "interaction": [{"code": "read"}, {"code": "search-type"}],
        "versioning": "no-version",
        **_NO_CONDITIONALS,
        "searchParam": params,
        "operation": [
            {
                "name": "translate",
                "definition": TRANSLATE,
                "documentation": "GET (query) or POST (Parameters), on all maps or "
                "one (/ConceptMap/{id}/$translate); parameters: "
                + ", ".join(fhir_terminology.TRANSLATE_PARAMS),
            }
        ],
    }


def capability_statement(base_url: str, node_id: str, date: str) -> dict[str, Any]:
    resources = [_resource(t, SEARCH_PARAMS[t], "clinician") for t in CLINICAL_TYPES]
    resources.append(_resource(AUDIT_TYPE, AUDIT_PARAMS, "auditor"))
    resources.append(_conceptmap_resource())
    return {
        "resourceType": "CapabilityStatement",
        "id": "hutong-node",
        "name": "HutongNodeFhirApi",
        "title": f"Hutong node {node_id}: hospital-facing FHIR R4 API",
        "status": "active",
        "experimental": False,
        "date": date,
        "publisher": "Hutong",
        "description": "Read and search of this node's FHIR store for the hospital's own "
        "systems (never exposed to peers); referral writes go through the "
        "workflow. Search handling is strict unless Prefer: handling=lenient.",
        "kind": "instance",
        "software": {"name": "Hutong", "version": HUTONG_VERSION},
        "implementation": {"description": f"Hutong node {node_id}", "url": base_url},
        "fhirVersion": "4.0.1",
        "format": ["json"],
        "rest": [
            {
                "mode": "server",
                "documentation": "Paging: Bundle.link next carries an opaque _cursor; results are "
                "newest first (_lastUpdated descending) unless _sort says "
                "otherwise. Modifiers: :missing (all types), :not (token), "
                ":exact and :contains (string), :identifier and :[Type] "
                "(reference). Chains one level deep on reference parameters "
                "(patient.identifier=..., focus:ServiceRequest.status=...).",
                "security": {
                    "cors": False,
                    "description": "Authorization: Bearer <token>, one static token per role from "
                    "the site config: clinician (clinical resources, Task update, "
                    "transaction), auditor (AuditEvent only), it (no FHIR data). "
                    "/fhir/metadata needs no token.",
                },
                "resource": resources,
                "interaction": [
                    {
                        "code": "transaction",
                        "documentation": "clinician only: a referral or its return (with a "
                        "ServiceRequest) through the workflow, or any stored types; "
                        "all or nothing; ifNoneExist and ifMatch honoured",
                    },
                    {
                        "code": "batch",
                        "documentation": "clinician only: each entry on its own; a Task PUT moves the "
                        "referral as PUT /fhir/Task/{id} does; GET Type/id and "
                        "Type/id/_history/vid read (audited)",
                    },
                ],
            }
        ],
    }
