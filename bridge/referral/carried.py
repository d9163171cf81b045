"""What the packets and transaction Bundles of a referral or a consultation carry, read the
same way by both workflows (``bridge/referral/workflow.py``, ``bridge/consult/workflow.py``):
ids and ``urn:uuid`` references of POSTed entries, the member a ServiceRequest names as
performer and the Patient it names as subject, references that must resolve, R4 validity, the
patient's keyed hash, and the match of a carried patient to this node's record. Holds only the
node's plan."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import Connection

from bridge.config.models import NodePlan
from bridge.errors import InvalidResource, NotFound, UnknownReference
from bridge.fhir.validate import errors as fhir_errors
from bridge.fhirstore import store
from bridge.privacy import patient_hash
from bridge.referral import naming
from bridge.referral import resources as R
from bridge.referral.codes import MEMBER_SYSTEM


class Carried:
    def __init__(self, plan: NodePlan) -> None:
        self.plan = plan
        self.me = plan.node_id

    def unpack(self, bundle: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Give POSTed entries ids and turn their urn:uuid references into Type/id."""
        mapping: dict[str, str] = {}
        resources = []
        for e in bundle.get("entry") or []:
            r = e.get("resource")
            if not isinstance(r, dict) or "resourceType" not in r:
                raise InvalidResource("every transaction entry needs a resource")
            method = (e.get("request") or {}).get("method", "POST")
            if method not in ("POST", "PUT"):
                raise InvalidResource(f"transaction entries may POST or PUT, not {method}")
            if method == "POST" or "id" not in r:
                r["id"] = str(uuid.uuid4())
            if e.get("fullUrl"):
                mapping[e["fullUrl"]] = R.ref(r)
            resources.append(r)
        resources = [R.rewrite_refs(r, mapping) for r in resources]
        return resources, resources

    def performer(self, sr: dict[str, Any]) -> str:
        for p in sr.get("performer") or []:
            reference = p.get("reference", "")
            ident = p.get("identifier") or {}
            member = (
                reference.split("/", 1)[1]
                if reference.startswith("Organization/")
                else ident.get("value")
                if ident.get("system") == MEMBER_SYSTEM
                else None
            )
            if member in self.plan.directory and member != self.me:
                return str(member)
            raise UnknownReference(
                f"performer '{reference or ident.get('value')}' is not "
                f"another member of the alliance"
            )
        raise UnknownReference(
            "ServiceRequest.performer must name the receiving member (Organization/<member id>)"
        )

    def patient(
        self, conn: Connection, sr: dict[str, Any], resources: list[dict[str, Any]]
    ) -> dict[str, Any]:
        subject = (sr.get("subject") or {}).get("reference", "")
        for r in resources:
            if R.ref(r) == subject and r["resourceType"] == "Patient":
                return r
        if subject.startswith("Patient/"):
            try:
                return store.get(conn, "Patient", subject.split("/", 1)[1])
            except NotFound:
                pass
        raise UnknownReference(
            f"ServiceRequest.subject '{subject}' is not a Patient in the bundle or known here"
        )

    def check_refs(self, conn: Connection, resources: list[dict[str, Any]]) -> None:
        here = {R.ref(r) for r in resources}
        for r in resources:
            for target in R.references(r):
                if target in here or "/" not in target or target.startswith(("http", "urn:")):
                    continue
                rtype, rid = target.split("/", 1)
                if rtype == "Organization" and rid in self.plan.directory:
                    continue
                if not store.exists(conn, rtype, rid):
                    raise UnknownReference(
                        f"{R.ref(r)} refers to {target}, which is neither "
                        "in the bundle nor known here"
                    )

    def validate(self, resources: list[dict[str, Any]]) -> None:
        for r in resources:
            problems = fhir_errors(r, limit=3)
            if problems:
                raise InvalidResource(f"{R.ref(r)} is not valid FHIR R4: {'; '.join(problems)}")

    def hash(self, patient: dict[str, Any]) -> str | None:
        system = self.plan.alliance.national_id_system
        for i in patient.get("identifier") or []:
            if i.get("system") == system and i.get("value"):
                return patient_hash(self.plan.patient_hash_key, i["value"])
        return R.hash_of(patient)

    def match_patient(
        self, conn: Connection, carried: list[dict[str, Any]]
    ) -> tuple[list[dict[str, Any]], str, str | None]:
        """Match by keyed hash, else register the patient here, else flag for manual match.

        A patient registered here gets an id of this node's own: the sender's id is its own
        (a core that centres refer one patient to must never name her to one centre by
        another's id, nor by an id that once was another's). What is returned names this
        node's record everywhere (naming.incoming)."""
        patient = next((r for r in carried if r["resourceType"] == "Patient"), None)
        if patient is None:
            return carried, "manual", None
        phash = R.hash_of(patient)
        local = store.find_patient_by_hash(conn, phash) if phash else None
        if local is not None:
            return naming.incoming(R.ref(local), phash, carried), "matched", phash
        fresh = {**patient, "id": str(uuid.uuid4())}
        rest = naming.incoming(R.ref(fresh), phash, carried)
        return [fresh, *rest], "registered" if phash else "manual", phash

    def ours(
        self, conn: Connection, row: Any, carried: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """What a step of the other side carries, naming this side's record of the patient
        (Patient resources left out: ours stays as it is)."""
        mine = store.get(conn, "Task", row.task_id)["for"]["reference"]
        return naming.incoming(mine, row.patient_hash, carried)
