"""The adapter's routes on the node's local port, under ``/local/v1/adapters/<name>``.

POST /query                     C-FIND the vendor PACS {patient_id?, study_date?}  clinician
POST /reports                   an HL7 v2 ORU^R01 radiology report (text body)     clinician, it
POST /fetches                   ask a member for a study {from, study_uid}         clinician
GET  /fetches/{task_id}         where a fetch stands                               clinician, it
GET  /fetches/{task_id}/study.zip   the fetched files, unchanged (audited read)     clinician
GET  /studies/{study_uid}/reports   the reports on a study held here, ours and those
                                    other members attached (audited read)           clinician
"""

from __future__ import annotations

import io
import zipfile
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from bridge.api.auth import ClinicianRole, SenderRole
from bridge.errors import NotFound

if TYPE_CHECKING:
    from adapters.pacs.adapter import PacsAdapter


class QueryIn(BaseModel):
    patient_id: str | None = None
    study_date: str | None = None  # YYYYMMDD or a DICOM range YYYYMMDD-YYYYMMDD


class FetchIn(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    from_: str = Field(alias="from")  # the member holding the study
    study_uid: str


def pacs_router(adapter: PacsAdapter) -> APIRouter:
    router = APIRouter()

    @router.post("/query")
    def query(body: QueryIn, role: ClinicianRole) -> dict[str, Any]:
        return {
            "studies": adapter.query(
                patient_id=body.patient_id, study_date=body.study_date, actor=f"role:{role}"
            )
        }

    @router.post("/reports")
    async def report(request: Request, role: SenderRole) -> dict[str, Any]:
        from fastapi.concurrency import run_in_threadpool

        raw = await request.body()
        return await run_in_threadpool(adapter.take_report, raw, f"role:{role}")

    @router.post("/fetches")
    def ask(body: FetchIn, role: ClinicianRole) -> dict[str, Any]:
        return adapter.request_fetch(body.from_, body.study_uid, f"role:{role}")

    @router.get("/fetches/{task_id}")
    def state(task_id: str, role: SenderRole) -> dict[str, Any]:
        task, files = adapter.fetched_files(task_id)
        return {
            "task_id": task_id,
            "status": task["status"],
            "progress": (task.get("businessStatus") or {}).get("text"),
            "reason": (task.get("statusReason") or {}).get("text"),
            "study_uid": task["input"][0]["valueOid"].removeprefix("urn:oid:"),
            "files": len(files),
        }

    @router.get("/fetches/{task_id}/study.zip")
    def study_zip(task_id: str, role: ClinicianRole) -> Response:
        task, files = adapter.fetched_files(task_id)
        if not files:
            raise NotFound(
                f"Task/{task_id} has no completed study to give (status {task['status']})"
            )
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
            for p in files:
                zf.writestr(f"{p.parent.name}/{p.name}", p.read_bytes())
        row_hash = adapter.fetched_patient_hash(task_id)
        adapter.host.audit(
            "imaging-read",
            patient_hash=row_hash,
            message=f"study zip of Task/{task_id} read by role:{role}",
        )
        return Response(buf.getvalue(), media_type="application/zip")

    @router.get("/studies/{study_uid}/reports")
    def reports(study_uid: str, role: ClinicianRole) -> dict[str, Any]:
        from adapters.pacs.files import check_uid
        from adapters.pacs.study import study_resource_id

        rid = study_resource_id(check_uid(study_uid, record="reports", field="study_uid"))
        info = adapter.host.resource_info("ImagingStudy", rid)
        if info is None:
            raise NotFound(f"no study {study_uid} here")
        found = adapter.reports_for(rid)
        adapter.host.audit(
            "imaging-read",
            patient_hash=info["patient_hash"],
            message=f"{len(found)} report(s) of ImagingStudy/{rid} read by role:{role}",
        )
        return {
            "study": rid,
            "study_uid": study_uid,
            "reports": [
                {
                    "id": r["id"],
                    "status": r.get("status"),
                    "conclusion": r.get("conclusion"),
                    "code": r.get("code"),
                    "issued": r.get("issued"),
                    "from": (adapter.host.resource_info("DiagnosticReport", r["id"]) or {}).get(
                        "origin"
                    ),
                    "presented_form": [f.get("contentType") for f in r.get("presentedForm") or ()],
                }
                for r in found
            ],
        }

    return router
