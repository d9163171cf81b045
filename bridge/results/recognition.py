"""The mutual-recognition view (检查检验结果互认): a patient's results known here, with where and
when each was produced, so a clinician sees that an exam need not be repeated.

"Known here" is what this node holds: results its own LIS/PACS produced and those that reached
it from other members (routed along a referral, or carried in a referral's return). There is no
alliance-wide query: a member never reads another member's store, results travel as packets.
The view pages by keyset (``bridge/api/paging.py``) and says how many reports there are in all:
it never stops silently at a page size.
"""

from __future__ import annotations

from typing import Any

import orjson
from sqlalchemy import Connection, select

from bridge.api import paging
from bridge.fhirstore.tables import FHIR_RESOURCE as T

#: statuses a result can be recognised in (a preliminary one may still change)
RECOGNISABLE = ("final", "amended", "corrected", "appended")


def _coding(concept: dict[str, Any] | None) -> tuple[str | None, str | None, str | None]:
    """(LOINC code, local code, text) of a CodeableConcept."""
    concept = concept or {}
    loinc = next(
        (
            c.get("code")
            for c in concept.get("coding") or ()
            if c.get("system") == "http://loinc.org"
        ),
        None,
    )
    local = next(
        (
            c.get("code")
            for c in concept.get("coding") or ()
            if c.get("system") != "http://loinc.org"
        ),
        None,
    )
    return (
        loinc,
        local,
        concept.get("text")
        or next((c.get("display") for c in concept.get("coding") or () if c.get("display")), None),
    )


def _value(obs: dict[str, Any]) -> dict[str, Any]:
    if "valueQuantity" in obs:
        q = obs["valueQuantity"]
        return {
            "value": q.get("value"),
            "comparator": q.get("comparator"),
            "unit": q.get("unit") or q.get("code"),
        }
    if "valueString" in obs:
        return {"value": obs["valueString"]}
    if "valueCodeableConcept" in obs:
        return {"value": _coding(obs["valueCodeableConcept"])[2]}
    if "valueRatio" in obs:
        r = obs["valueRatio"]
        return {"value": f"{r['numerator'].get('value')}:{r['denominator'].get('value')}"}
    if "valueRange" in obs:
        r = obs["valueRange"]
        return {
            "value": f"{r.get('low', {}).get('value')}-{r.get('high', {}).get('value')}",
            "unit": r.get("low", {}).get("unit"),
        }
    return {"value": None}


def results_for(
    conn: Connection,
    patient_hash: str,
    *,
    node_id: str,
    directory: Any = None,
    limit: int = 200,
    after: str | None = None,
) -> tuple[list[dict[str, Any]], int, str | None]:
    """One page of the patient's DiagnosticReports, newest first, each with its Observations'
    values: (items, how many reports in all, cursor of the next page or None). The order is
    ``ix_fhir_type_patient_hash``'s own (last_updated DESC, id), so a page is one index range."""
    rows, total, nxt = paging.page(
        conn,
        select(T.c.id, T.c.body, T.c.origin, T.c.thread, T.c.last_updated),
        where=[T.c.rtype == "DiagnosticReport", T.c.patient_hash == patient_hash],
        order=[T.c.last_updated, T.c.id],
        desc=(True, False),
        limit=limit,
        after=after,
    )
    out = []
    for row in rows:
        dr = orjson.loads(row["body"])
        ids = [
            r["reference"].split("/", 1)[1]
            for r in dr.get("result") or ()
            if r.get("reference", "").startswith("Observation/")
        ]
        obs_rows = (
            conn.execute(
                select(T.c.id, T.c.body).where(T.c.rtype == "Observation", T.c.id.in_(ids))
            ).all()
            if ids
            else []
        )
        by_id = {r.id: orjson.loads(r.body) for r in obs_rows}
        member = row["origin"] or node_id
        names = getattr(directory.get(member), "names", None) if directory else None
        loinc, local, text = _coding(dr.get("code"))
        out.append(
            {
                "report": f"DiagnosticReport/{row['id']}",
                "status": dr.get("status"),
                "recognisable": dr.get("status") in RECOGNISABLE,
                "loinc": loinc,
                "local_code": local,
                "name": text,
                "effective": dr.get("effectiveDateTime"),
                "issued": dr.get("issued"),
                "produced_by": member,
                "produced_by_zh": getattr(names, "zh", None),
                "produced_by_en": getattr(names, "en", None),
                "performer": [p.get("display") for p in dr.get("performer") or ()],
                "here": member == node_id,
                "thread": row["thread"],
                "last_updated": row["last_updated"].isoformat(),
                "observations": [
                    {
                        "id": i,
                        "status": by_id[i].get("status"),
                        **dict(
                            zip(
                                ("loinc", "local_code", "name"),
                                _coding(by_id[i].get("code")),
                                strict=True,
                            )
                        ),
                        **_value(by_id[i]),
                        "flags": [
                            c.get("code")
                            for f in by_id[i].get("interpretation") or ()
                            for c in f.get("coding") or ()
                        ],
                        "effective": by_id[i].get("effectiveDateTime"),
                    }
                    for i in ids
                    if i in by_id
                ],
            }
        )
    return out, total, nxt
