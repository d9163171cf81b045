"""``POST /fhir``: transaction and batch Bundles, answered with receipts a client can rely on.

Transaction (all or nothing, one database transaction):

* with a ServiceRequest: a referral or its return, through the referral workflow (consent,
  references, state machine, the packet to the other member) as before; a ServiceRequest of
  category Consultation (SNOMED 11429006) starts a consultation instead (``bridge/consult``);
* without one: any resources the node stores (``STORABLE``), e.g. a Patient and its Coverage,
  validated, their ``urn:uuid`` references resolved, their references checked.

Both honour ``request.ifNoneExist`` (conditional create: ``identifier=system|value`` and/or
``_id=``; one match answers ``200 OK`` with the existing version and the entry's ``fullUrl``
then means that resource, several matches 412) and ``request.ifMatch`` on a PUT (another
current version: 412, nothing stored). Each response entry has the real status (201 for a
first version, 200 otherwise), the versioned location that ``GET`` resolves, ``etag`` and
``lastModified``.

Batch: each entry on its own (its own transaction): a PUT of a referral Task moves it through
the workflow as ``PUT /fhir/Task/{id}`` does; a GET reads ``Type/id`` or a version (audited);
other entries are stored as above. A refused entry answers with its status and an
OperationOutcome; the others are kept.
"""

from __future__ import annotations

import copy
import hashlib
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import orjson
from sqlalchemy import Connection, select, text

from bridge.api.capability import CLINICAL_TYPES
from bridge.api.outcome import BadRequest, fhir_status, operation_outcome
from bridge.consult.codes import is_consultation
from bridge.errors import (
    HutongError,
    InvalidResource,
    NotFound,
    UnknownReference,
    VersionConflict,
)
from bridge.fhir.validate import validate_resource
from bridge.fhirstore import store
from bridge.fhirstore.tables import FHIR_RESOURCE as T
from bridge.privacy import patient_hash
from bridge.referral import resources as R
from bridge.referral.workflow import response_of

if TYPE_CHECKING:
    from bridge.node import Node

#: what a transaction or batch may store directly: referral Tasks are the workflow's
#: (``PUT /fhir/Task/{id}``), ServiceRequests make a referral (the workflow's path)
STORABLE = tuple(t for t in CLINICAL_TYPES if t not in ("Task", "ServiceRequest"))


@dataclass
class Entry:
    index: int
    resource: dict[str, Any]
    method: str
    url: str
    full_url: str | None
    if_none_exist: str | None
    if_match: int | None


def parse_entries(bundle: dict[str, Any]) -> list[Entry]:
    from bridge.api.fhir_http import if_match

    out = []
    for i, e in enumerate(bundle.get("entry") or []):
        r = e.get("resource")
        if not isinstance(r, dict) or "resourceType" not in r:
            raise InvalidResource(f"entry[{i}]: every entry needs a resource")
        req = e.get("request") or {}
        method = req.get("method", "POST")
        if method not in ("POST", "PUT"):
            raise InvalidResource(
                f"entry[{i}].request.method: entries may POST or PUT, not {method}"
            )
        url = str(req.get("url") or r["resourceType"]).split("?", 1)[0].strip("/")
        if url.split("/", 1)[0] != r["resourceType"]:
            raise InvalidResource(f"entry[{i}].request.url: names another type than the resource")
        if method == "PUT":
            parts = url.split("/")
            if len(parts) != 2 or parts[1] != r.get("id", parts[1]):
                raise InvalidResource(
                    f"entry[{i}].request.url: a PUT names Type/id, the resource's id"
                )
            r["id"] = parts[1]
        try:
            wanted = if_match(req.get("ifMatch"))
        except BadRequest as exc:
            raise InvalidResource(f"entry[{i}].request.ifMatch: {exc.message}") from exc
        if wanted is not None and method != "PUT":
            raise InvalidResource(
                f"entry[{i}].request.ifMatch: only a PUT is conditional on a version"
            )
        out.append(Entry(i, r, method, url, e.get("fullUrl"), req.get("ifNoneExist"), wanted))
    return out


def existing(conn: Connection, rtype: str, query: str, where: str) -> Any | None:
    """The one stored resource ``ifNoneExist`` matches, None if none; several: 412."""
    conds = [T.c.rtype == rtype]
    pairs = parse_qsl(query.split("?", 1)[-1], keep_blank_values=True)
    if not pairs:
        raise InvalidResource(f"{where}: an empty search")
    for k, v in pairs:
        if k == "identifier" and v:
            conds.append(store.identifier_match(rtype, [v]))
        elif k == "_id" and v:
            conds.append(T.c.id == v)
        else:
            raise InvalidResource(
                f"{where}: conditional create searches by identifier and _id only, not '{k[:40]}'"
            )
    rows = conn.execute(
        select(T.c.rtype, T.c.id, T.c.version, T.c.last_updated, T.c.body).where(*conds).limit(2)
    ).all()
    if len(rows) > 1:
        raise VersionConflict(
            f"{where}: matches more than one {rtype} (conditional create needs at most one)"
        )
    return rows[0] if rows else None


def _serialise(conn: Connection, key: str) -> None:
    """Two transactions creating "if none exist" with the same search wait for each other until
    commit (PostgreSQL: a transaction-scoped advisory lock on the search; SQLite's write
    transactions are serial already), so the second finds what the first made."""
    if conn.dialect.name != "postgresql":
        return
    k = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big", signed=True)
    conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": k})


def _stamp(at: datetime) -> str:
    return at.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def conditions(
    conn: Connection, bundle: dict[str, Any]
) -> tuple[dict[str, Any], dict[int, dict[str, Any]]]:
    """ifMatch checked and ifNoneExist resolved inside the write transaction: the bundle left
    to store (matched entries out, references to them rewritten) and the answered entries."""
    entries = parse_entries(bundle)
    answered: dict[int, dict[str, Any]] = {}
    alias: dict[str, str] = {}
    for e in entries:
        rtype = e.resource["resourceType"]
        if e.if_match is not None:
            have = store.current_version(conn, rtype, e.resource["id"])
            if have is not None:
                have = store.lock_version(conn, rtype, e.resource["id"])
            if have != e.if_match:
                raise VersionConflict(
                    f"entry[{e.index}].request.ifMatch names version "
                    f"{e.if_match}, {R.ref(e.resource)} is at "
                    f"{have if have is not None else 'none'}"
                )
        if e.if_none_exist and e.method == "POST":
            _serialise(conn, f"{rtype}?{e.if_none_exist}")
            row = existing(conn, rtype, e.if_none_exist, f"entry[{e.index}].request.ifNoneExist")
            if row is not None:
                answered[e.index] = {
                    "response": {
                        "status": "200 OK",
                        "location": f"{rtype}/{row.id}/_history/{row.version}",
                        "etag": f'W/"{row.version}"',
                        "lastModified": _stamp(row.last_updated),
                    }
                }
                if e.full_url:
                    alias[e.full_url] = f"{rtype}/{row.id}"
    if not answered:
        return bundle, answered
    kept = []
    for i, entry in enumerate(bundle.get("entry") or []):
        if i not in answered:
            entry = copy.copy(entry)
            entry["resource"] = R.rewrite_refs(entry["resource"], alias)
            kept.append(entry)
    return {**bundle, "entry": kept}, answered


class Transactions:
    """What ``POST /fhir`` runs (in a worker thread)."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.ctx = node.ctx

    def run(self, bundle: dict[str, Any], actor: str, move_task: Any = None) -> dict[str, Any]:
        if bundle.get("type") == "batch":
            return self.batch(bundle, actor, move_task)
        entries = parse_entries(bundle)
        srs = [e.resource for e in entries if e.resource["resourceType"] == "ServiceRequest"]
        if len(srs) == 1 and is_consultation(srs[0]):
            cw = getattr(self.node, "consult", None)
            if cw is None:
                from bridge.api.fhir_api import WorkflowUnavailable

                raise WorkflowUnavailable("the consultation workflow is not available on this node")
            return dict(cw.submit(bundle, actor, prepare=conditions))
        if srs:
            wf = getattr(self.node, "workflow", None)
            if wf is None:
                from bridge.api.fhir_api import WorkflowUnavailable

                raise WorkflowUnavailable("the referral workflow is not available on this node")
            return dict(wf.submit(bundle, actor, prepare=conditions))
        with self.ctx.store.write() as conn:
            rest, answered = conditions(conn, bundle)
            made = iter(self.store_plain(conn, rest))
            entries_out = [
                answered[i] if i in answered else {"response": response_of(next(made))}
                for i in range(len(entries))
            ]
        return {
            "resourceType": "Bundle",
            "id": str(uuid.uuid4()),
            "type": "transaction-response",
            "entry": entries_out,
        }

    def store_plain(self, conn: Connection, bundle: dict[str, Any]) -> list[dict[str, Any]]:
        """Store the entries of a transaction without a referral, in order; their urn:uuid
        references resolved and every other reference checked against the bundle and store."""
        entries = parse_entries(bundle)
        mapping: dict[str, str] = {}
        for e in entries:
            rtype = e.resource["resourceType"]
            if rtype == "Task":
                raise InvalidResource(
                    f"entry[{e.index}]: referral Tasks are made by the "
                    "workflow; move one with PUT /fhir/Task/{id}"
                )
            if rtype not in STORABLE:
                raise InvalidResource(f"entry[{e.index}]: {rtype} is not a type this node stores")
            if e.method == "POST":
                e.resource["id"] = str(uuid.uuid4())
            if e.full_url:
                mapping[e.full_url] = R.ref(e.resource)
        resources = [R.rewrite_refs(e.resource, mapping) for e in entries]
        here = {R.ref(r) for r in resources}
        directory = self.ctx.plan.directory
        for r in resources:
            for target in R.references(r):
                if target in here or "/" not in target or target.startswith(("http", "urn:", "#")):
                    if target.startswith("urn:"):
                        raise UnknownReference(
                            f"{R.ref(r)} refers to an urn that is no entry's fullUrl"
                        )
                    continue
                rtype, rid = target.split("/", 1)
                if rtype == "Organization" and rid in directory:
                    continue
                if not store.exists(conn, rtype, rid):
                    raise UnknownReference(
                        f"{R.ref(r)} refers to {target}, which is neither "
                        "in the bundle nor known here"
                    )
        hashes = {R.ref(r): self._hash(r) for r in resources if r["resourceType"] == "Patient"}
        now = self.ctx.now()
        out = []
        for r in resources:
            phash = hashes.get(R.ref(r)) or self._patient_hash_of(conn, r, hashes)
            out.append(store.put(conn, r, at=now, origin=self.ctx.node_id, patient_hash=phash))
        return out

    def _hash(self, patient: dict[str, Any]) -> str | None:
        plan = self.ctx.plan
        for i in patient.get("identifier") or []:
            if i.get("system") == plan.alliance.national_id_system and i.get("value"):
                return patient_hash(plan.patient_hash_key, i["value"])
        return R.hash_of(patient)

    @staticmethod
    def _patient_hash_of(
        conn: Connection, r: dict[str, Any], hashes: dict[str, str | None]
    ) -> str | None:
        cols = store.search_columns(r)
        patient = cols.get("patient")
        if not patient:
            return None
        if patient in hashes:
            return hashes[patient]
        rtype, _, rid = patient.partition("/")
        row = conn.execute(
            select(T.c.patient_hash).where(T.c.rtype == rtype, T.c.id == rid)
        ).first()
        return row.patient_hash if row else None

    def read_entry(self, i: int, url: str, actor: str) -> dict[str, Any]:
        """A batch entry ``GET Type/id`` or ``GET Type/id/_history/vid``: the resource (that
        version), its etag and lastModified; audited like any read. Searches are the search
        API's (``GET /fhir/Type?...``)."""
        from bridge.api.fhir_audit import read_entries

        path = url.split("?", 1)[0].strip("/")
        parts = path.split("/")
        if (
            "?" in url
            or len(parts) not in (2, 4)
            or (
                len(parts) == 4
                and (parts[2] != "_history" or not parts[3].isdigit() or len(parts[3]) > 9)
            )
        ):
            raise BadRequest(
                f"entry[{i}].request.url: a batch reads Type/id or "
                "Type/id/_history/vid (search with GET /fhir/Type?...)"
            )
        rtype, rid = parts[0], parts[1]
        if rtype not in CLINICAL_TYPES:
            raise NotFound(f"entry[{i}]: this resource type is not served here")
        with self.ctx.store.write() as conn:
            row = store.get_row(conn, rtype, rid)
            version, at, body = row.version, row.last_updated, row.body
            if len(parts) == 4:
                old = store.get_version(conn, rtype, rid, int(parts[3]))
                version, at, body = old.version, old.at, old.body
            self.ctx.audit.append(
                conn,
                read_entries(
                    actor.removeprefix("role:"),
                    f"batch GET {path}"[:200],
                    [(f"{rtype}/{rid}", row.patient_hash)],
                    self.ctx.now(),
                ),
            )
        return {
            "resource": orjson.loads(body),
            "response": {"status": "200 OK", "etag": f'W/"{version}"', "lastModified": _stamp(at)},
        }

    def batch(self, bundle: dict[str, Any], actor: str, move_task: Any) -> dict[str, Any]:
        from bridge.api.fhir_api import checked

        out = []
        for i, entry in enumerate(bundle.get("entry") or []):
            one = {"resourceType": "Bundle", "type": "transaction", "entry": [entry]}
            try:
                req = entry.get("request") if isinstance(entry, dict) else None
                if isinstance(req, dict) and req.get("method") == "GET":
                    out.append(self.read_entry(i, str(req.get("url") or ""), actor))
                    continue
                if isinstance(entry, dict) and "resource" in entry:
                    checked(validate_resource, entry["resource"])
                (e,) = parse_entries(one)
                e.index = i
                if (
                    e.resource["resourceType"] == "Task"
                    and e.method == "PUT"
                    and move_task is not None
                ):
                    task = move_task(e.resource["id"], e.resource, e.if_match)
                    out.append({"response": response_of(task) | {"status": "200 OK"}})
                    continue
                if e.resource["resourceType"] == "ServiceRequest":
                    raise InvalidResource(
                        f"entry[{i}]: a referral (ServiceRequest) is sent "
                        "as a transaction with its Patient and Consent"
                    )
                with self.ctx.store.write() as conn:
                    rest, answered = conditions(conn, one)
                    if answered:
                        out.append(answered[0])
                        continue
                    (made,) = self.store_plain(conn, rest)
                out.append({"response": response_of(made)})
            except HutongError as exc:
                status = fhir_status(exc)
                out.append({"response": {"status": str(status), "outcome": operation_outcome(exc)}})
        return {
            "resourceType": "Bundle",
            "id": str(uuid.uuid4()),
            "type": "batch-response",
            "entry": out,
        }
