"""Every ORU^R01 of the third-party corpus (tests/fixtures/hl7v2-corpus) sent unchanged, in
sequence on one connection, by python-hl7's MLLP client to a real LIS listener in a node
process; the outcome of each message (stored with N reports / N observations, an identical
re-send answered from the store, or refused with its error class and ACK code) must equal the
row pinned in ``tests/fixtures/hl7v2-corpus/outcomes-lis.tsv``, and every refusal there carries
its justification from the message itself. Every stored message is then checked against the
stored resources field by field: one DiagnosticReport per OBR, one Observation per OBX (or the
report's presentedForm for ED/RP and code-less report text), values, codes, units, ranges.

``HUTONG_WRITE_OUTCOMES=1`` rewrites the table from a run (justifications kept by file and
index; new refusals get an empty one, which the test then refuses), for review in the diff.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import hl7
import orjson
import pytest
from hl7.client import MLLPClient
from sqlalchemy import select

from adapters.lis.vocab import OBSERVATION_STATUS, REPORT_STATUS
from bridge.fhirstore.tables import FHIR_HISTORY
from bridge.local.tables import ADAPTER_INTAKE
from bridge.results.tables import RESULT_MESSAGE
from bridge.store.db import Store
from bridge.store.tables import QUARANTINE
from tests.harness import Alliance, free_port_block, results_stored
from tests.lis_corpus import CorpusMessage, oru_messages, read_outcomes, write_outcomes
from tests.lis_site import write_site

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One node with one LIS listener; the whole corpus sent once; what it answered/kept."""
    root = tmp_path_factory.mktemp("lis-corpus")
    site = write_site(root / "mappings" / "fxlab")
    port = free_port_block(1)
    members = [
        {
            "id": "core",
            "zh": "复兴医院",
            "en": "Fuxing Hospital",
            "role": "core",
            "adapters": [
                {
                    "type": "lis-hl7",
                    "name": "lis",
                    "mappings": str(site),
                    "options": {
                        "port": port,
                        "rate_limit": {"per_second": 1000, "burst": 1000, "hold_s": 5},
                    },
                }
            ],
        }
    ]
    a = Alliance(root / "alliance", members, [])
    a.start("core")
    node = a.node("core")
    store = Store(node.plan.storage_dsn)
    msgs = oru_messages()
    acks: list[hl7.Message] = []
    with MLLPClient("127.0.0.1", port) as client:
        client.socket.settimeout(60)
        for m in msgs:
            raw = client.send_message(m.raw)
            while not raw.endswith(b"\x1c\r"):  # MLLPClient returns one recv()
                more = client.socket.recv(65536)
                assert more, "connection closed before the ACK ended"
                raw += more
            acks.append(hl7.parse(raw.strip(b"\x0b\x1c\r").decode("utf-8", "replace")))
    results_stored(store)
    try:
        yield {"store": store, "messages": msgs, "acks": acks}
    finally:
        store.dispose()
        a.stop_all()


def _kept(store: Store) -> tuple[dict[bytes, tuple[list[str], datetime]], dict[bytes, str]]:
    """raw -> (DiagnosticReport ids, when it was stored) of stored messages in arrival order,
    raw -> error code."""
    with store.read() as conn:
        results = {
            r.source_key: (orjson.loads(r.result), r.at)
            for r in conn.execute(
                select(
                    ADAPTER_INTAKE.c.source_key, ADAPTER_INTAKE.c.result, ADAPTER_INTAKE.c.at
                ).where(ADAPTER_INTAKE.c.adapter == "lis")
            )
        }
        # when its resources reached the FHIR store: the results journal's expansion (the
        # key's ``stored_at``), after the key itself was committed with the ACK
        stored = {
            bytes(r.raw): (
                results[r.source_key][0]["reports"],
                datetime.fromisoformat(results[r.source_key][0]["stored_at"]),
            )
            for r in conn.execute(
                select(RESULT_MESSAGE.c.raw, RESULT_MESSAGE.c.source_key)
                .where(RESULT_MESSAGE.c.adapter == "lis")
                .order_by(RESULT_MESSAGE.c.id)
            )
        }
        refused = {
            bytes(r.raw): r.code
            for r in conn.execute(
                select(QUARANTINE.c.raw, QUARANTINE.c.code).where(
                    QUARANTINE.c.source == "adapter:lis"
                )
            )
        }
    return stored, refused


def _history(store: Store, rtype: str, rid: str, at: datetime) -> dict[str, Any]:
    """The version current when a message was stored at ``at``: the one it wrote, or the one
    it left as it was because it said the same (store.put_many keeps an unchanged resource);
    the field-by-field checks then hold the message against it either way."""
    with store.read() as conn:
        row = conn.execute(
            select(FHIR_HISTORY.c.body)
            .where(
                FHIR_HISTORY.c.rtype == rtype,
                FHIR_HISTORY.c.id == rid,
                FHIR_HISTORY.c.at <= at,
            )
            .order_by(FHIR_HISTORY.c.version.desc())
            .limit(1)
        ).first()
    assert row is not None, f"{rtype}/{rid} not stored by {at}"
    return orjson.loads(row.body)


def test_corpus_outcomes_match_the_table(run: dict[str, Any]) -> None:
    store: Store = run["store"]
    stored, refused = _kept(store)
    observed: list[dict[str, str]] = []
    seen_raw: set[bytes] = set()
    run["checked"] = []
    for m, ack in zip(run["messages"], run["acks"], strict=True):
        msa = ack.segment("MSA")
        code, echoed = str(msa(1)), str(msa(2))
        assert echoed == m.msh_field(10), f"{m.file}#{m.index}: MSA-2 echoes MSH-10"
        row = {
            "file": m.file,
            "index": str(m.index),
            "control_id": m.msh_field(10),
            "version": m.msh_field(12),
            "ack": code,
        }
        if code == "AA":
            assert m.raw in stored, f"{m.file}#{m.index}: AA but nothing stored"
            if m.raw in seen_raw:
                row.update(outcome="repeated")
            else:
                reports, at = stored[m.raw]
                drs = [_history(store, "DiagnosticReport", rid, at) for rid in reports]
                obs = sum(len(dr.get("result", ())) for dr in drs)
                row.update(outcome="stored", reports=str(len(drs)), observations=str(obs))
                run["checked"].append((m, drs, at))
            seen_raw.add(m.raw)
        else:
            assert m.raw in refused, f"{m.file}#{m.index}: {code} but not quarantined"
            assert m.raw not in stored
            row.update(outcome="refused", code=refused[m.raw])
        observed.append(row)
    if os.environ.get("HUTONG_WRITE_OUTCOMES"):
        old = {(r["file"], r["index"]): r for r in read_outcomes()} if _exists() else {}
        for r in observed:
            was = old.get((r["file"], r["index"]), {})
            r["justification"] = (
                was.get("justification", "")
                if r["outcome"] == "refused" and was.get("code") == r["code"]
                else ""
            )
        write_outcomes(observed)
    table = read_outcomes()
    fields = (
        "file",
        "index",
        "control_id",
        "version",
        "outcome",
        "ack",
        "reports",
        "observations",
        "code",
    )
    assert [{k: r.get(k, "") or "" for k in fields} for r in observed] == [
        {k: r[k] or "" for k in fields} for r in table
    ]
    for r in table:
        if r["outcome"] == "refused":
            assert len(r["justification"]) > 20, f"{r['file']}#{r['index']}: why refused?"


def _exists() -> bool:
    from tests.lis_corpus import OUTCOMES

    return OUTCOMES.exists()


# -- field by field: the stored resources against the message ---------------------------------


def _v(seg: Any, f: int, c: int = 1, r: int = 1) -> str:
    try:
        return str(seg.extract_field(1, f, r, c, 1)).strip()
    except IndexError:
        return ""


def _reps(seg: Any, f: int) -> int:
    if f >= len(seg) or not str(seg(f)):
        return 0
    field = seg(f)
    return len(field) if len(field) and isinstance(field[0], hl7.Repetition) else 1


def _rep(obx: Any, r: int) -> str:
    """Repetition r of OBX-5 whole (a text value may hold separators), escapes replaced."""
    raw = str(obx(5)).split("~")[r - 1] if len(obx) > 5 else ""
    return str(_UNESCAPE.unescape(raw)) if raw != '""' else ""


_UNESCAPE = hl7.parse("MSH|^~\\&|")


def _parse(m: CorpusMessage) -> hl7.Message:
    return hl7.parse(m.raw.decode("utf-8", "replace"))


def _codes(cc: dict[str, Any]) -> set[str]:
    return {c["code"] for c in cc.get("coding", ())}


def _check_obx(obx: Any, o: dict[str, Any], where: str) -> None:
    vtype = _v(obx, 2).upper()
    for c in (1, 4, 10):
        if _v(obx, 3, c):
            assert " ".join(_v(obx, 3, c).split()) in _codes(o["code"]), f"{where} OBX-3.{c}"
    assert o["status"] == OBSERVATION_STATUS[_v(obx, 11).upper()], f"{where} OBX-11"
    value = _v(obx, 5)
    n = _reps(obx, 5)
    if vtype == "NM" and n == 1:
        q = o["valueQuantity"]
        number = value.lstrip("<>=").strip()
        assert q["value"] == float(number), f"{where} OBX-5"
        assert q.get("comparator", "") == value[: len(value) - len(value.lstrip("<>="))]
        unit = _v(obx, 6, 2) or _v(obx, 6, 1)
        assert q.get("unit", "") == unit, f"{where} OBX-6"
    elif vtype in ("CE", "CWE", "CNE") and n == 1 and value:
        assert value in _codes(o["valueCodeableConcept"]), f"{where} OBX-5"
    elif vtype in ("ST", "TX", "FT") and n:
        lines = [_rep(obx, r) for r in range(1, n + 1)]
        text = "\n".join(x.replace("\r\n", "\n").replace("\r", "\n") for x in lines)
        assert o.get("valueString", "") == (text if text.strip() else ""), f"{where} OBX-5"
    elif n and vtype not in ("SN", "DT", "DTM", "TS", "TM", "DR", "NR", "IS", "CF"):
        assert o["valueString"] == str(obx(5)).strip(), f"{where} OBX-5 as text"
    rr = str(obx(7)).strip() if len(obx) > 7 else ""
    if rr:
        assert o["referenceRange"][0]["text"] == rr, f"{where} OBX-7"
    else:
        assert "referenceRange" not in o, f"{where} OBX-7"
    flags = [_v(obx, 8, 1, r) for r in range(1, _reps(obx, 8) + 1)]
    assert [i["coding"][0]["code"] for i in o.get("interpretation", ())] == [
        f for f in flags if f
    ], f"{where} OBX-8"


def test_corpus_stored_messages_field_by_field(run: dict[str, Any]) -> None:
    if "checked" not in run:
        test_corpus_outcomes_match_the_table(run)
    store: Store = run["store"]
    assert run["checked"], "no corpus message was stored"
    checked = {"OBR": 0, "OBX": 0}
    for m, drs, when in run["checked"]:
        msg = _parse(m)
        obrs: list[tuple[Any, list[Any], Any]] = []
        orc = None
        for seg in msg:
            name = str(seg[0])
            if name == "ORC":
                orc = seg
            elif name == "OBR":
                obrs.append((seg, [], orc))
                orc = None
            elif name == "OBX" and obrs:
                obrs[-1][1].append(seg)
        where = f"{m.file}#{m.index}"
        assert len(drs) == len(obrs), f"{where}: one DiagnosticReport per OBR"
        for k, ((obr, obxs, orc), dr) in enumerate(zip(obrs, drs, strict=True), 1):
            at = f"{where} OBR[{k}]"
            filler = _v(obr, 3) or _v(obr, 2) or (_v(orc, 3) or _v(orc, 2) if orc else "")
            assert dr["identifier"][0]["value"] == filler, f"{at}-3"
            assert " " not in dr["identifier"][0]["system"]
            code = _v(obr, 4) or _v(obr, 4, 4)
            if code:
                assert " ".join(code.split()) in _codes(dr["code"]), f"{at}-4"
            if _v(obr, 25):
                assert dr["status"] == REPORT_STATUS[_v(obr, 25).upper()], f"{at}-25"
            results = [r["reference"].split("/")[1] for r in dr.get("result", ())]
            forms = list(dr.get("presentedForm", ()))
            text_form = (
                forms.pop(0)
                if forms
                and forms[0].get("contentType", "").startswith("text/plain;")
                and "title" not in forms[0]
                else None
            )
            text_lines: list[str] = []
            i = 0
            for j, obx in enumerate(obxs, 1):
                vtype = _v(obx, 2).upper()
                ow = f"{at} OBX[{j}]"
                if vtype == "ED" and _v(obx, 5, 5):
                    form = forms.pop(0)
                    data = str(obx.extract_field(1, 5, 1, 5, 1)).strip()
                    if _v(obx, 5, 4).upper() in ("BASE64", ""):
                        assert form["data"] == "".join(data.split()), f"{ow} ED byte for byte"
                    continue
                if vtype == "RP" and _v(obx, 5, 1):
                    assert forms.pop(0)["url"].startswith(_v(obx, 5, 1)[:4]), ow
                    continue
                if vtype in ("TX", "FT", "ST") and not any(
                    _v(obx, 3, c) for c in (1, 2, 4, 5, 9, 10, 11)
                ):
                    text_lines.append(
                        "\n".join(
                            _rep(obx, r).replace("\r", "\n")
                            for r in range(1, max(_reps(obx, 5), 1) + 1)
                        )
                    )
                    continue
                oid = results[i]
                i += 1
                _check_obx(obx, _history(store, "Observation", oid, when), ow)
                checked["OBX"] += 1
            assert i == len(results), f"{at}: one Observation per OBX"
            assert not forms, f"{at}: no attachment without its OBX"
            if text_lines:
                assert text_form is not None
                assert base64.b64decode(text_form["data"]).decode() == "\n".join(text_lines)
            checked["OBR"] += 1
    # every report and Observation the table counts was checked against its message
    table = [r for r in read_outcomes() if r["outcome"] == "stored"]
    assert checked == {
        "OBR": sum(int(r["reports"]) for r in table),
        "OBX": sum(int(r["observations"]) for r in table),
    }
