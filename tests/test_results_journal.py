"""The results journal (bridge/results/journal.py) in process: lab messages staged with their
exactly-once key and ACK, expanded into the FHIR store by the job in order, several a
transaction, each once; a row whose expansion fails is kept, quarantined and audited while
the others are stored, and goes back to the queue when IT replays it; the bound refuses new
messages (transient) until the job has drained it.

A scaffolded node's real NodeContext (SQLite and PostgreSQL), real LIS messages (``simulators.lis``) converted
by the adapter's own converter; the node process, the ACKs and the crash guarantees are in
tests/test_lis_exactly_once.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import func, select

from adapters.lis.intake import read
from adapters.lis.oru import Settings, to_fhir
from bridge.audit.tables import AuditRecord
from bridge.config.loader import load_node
from bridge.config.scaffold import write_alliance
from bridge.context import NodeContext
from bridge.errors import Backlogged
from bridge.fhirstore.tables import FHIR_RESOURCE
from bridge.local import intake
from bridge.results.journal import Journal, counts
from bridge.results.tables import RESULT_JOURNAL, RESULT_MESSAGE
from bridge.store.tables import QUARANTINE
from simulators.lis import oru_message

AUDIT = AuditRecord.__table__  # type: ignore[attr-defined]
MEMBERS = [{"id": "core", "zh": "复兴医院", "en": "Fuxing Hospital", "role": "core"}]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def ctx(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[NodeContext]:
    files = write_alliance(tmp_path / "alliance", MEMBERS, [])
    if request.param == "postgres":
        monkeypatch.setenv("HUTONG_TEST_CORE_DSN", str(request.getfixturevalue("pg_db")))
        text = files["core"].read_text()
        files["core"].write_text(
            text.replace("[keys]", 'storage_dsn = "env:HUTONG_TEST_CORE_DSN"\n[keys]', 1)
        )
    c = NodeContext.open(load_node(files["core"]))
    try:
        yield c
    finally:
        c.store.dispose()


def converted(ctx: NodeContext, n: int) -> tuple[bytes, dict[str, Any], str | None]:
    """(raw, Bundle, patient hash) of ``oru_message(n)`` as the LIS adapter converts it."""
    raw = oru_message(n)
    msg, head, _ = read(raw)
    plan = ctx.plan
    settings = Settings(
        node_id=plan.node_id,
        hash_key=plan.patient_hash_key,
        national_id_system=plan.alliance.national_id_system,
        local_system="http://hutong.dev/CodeSystem/core/lab",
        translator=None,
        map_id="lab",
        mrn_system="",
        default_zone="+0800",
    )
    out = to_fhir(msg, head, settings)
    return raw, out.bundle, out.patient_hash


def stage(journal: Journal, ctx: NodeContext, key: str, raw: bytes, b: dict[str, Any], ph: Any):  # type: ignore[no-untyped-def]
    with ctx.store.write() as conn:
        out = journal.stage(
            conn,
            adapter="lis",
            source_key=key,
            bundle=b,
            patient_hash=ph,
            answer={"ack": f"ACK {key}"},
            raw=raw,
            kind="result.lab",
            notes=[],
            at=ctx.now(),
        )
    journal.staged()
    return out


def drain(journal: Journal) -> int:
    total = 0
    while True:
        n, failed = journal.run_once()
        assert not failed
        if n == 0:
            return total
        total += n


def reports(ctx: NodeContext) -> list[str]:
    with ctx.store.read() as conn:
        return sorted(
            orjson.loads(r.body)["identifier"][0]["value"]
            for r in conn.execute(
                select(FHIR_RESOURCE.c.body).where(FHIR_RESOURCE.c.rtype == "DiagnosticReport")
            )
        )


def test_staged_messages_are_expanded_once_in_order_with_their_ack(ctx: NodeContext) -> None:
    journal = Journal(ctx, bound=100)
    msgs = [converted(ctx, n) for n in (1, 2, 3)]
    for i, (raw, b, ph) in enumerate(msgs):
        out = stage(journal, ctx, f"k{i}", raw, b, ph)
        assert out == {"ack": f"ACK k{i}", "staged": True}
    assert journal.queued() == 3
    with ctx.store.read() as conn:
        assert counts(conn)["queued"][0] == 3
        assert conn.execute(select(func.count()).select_from(FHIR_RESOURCE)).scalar() == 0
        # the key is taken with the ACK before anything reaches the FHIR store
        assert intake.seen(conn, "lis", "k0") == {"ack": "ACK k0", "staged": True}
    assert drain(journal) == 3
    assert journal.queued() == 0
    with ctx.store.read() as conn:
        assert counts(conn) == {}  # expanded rows are deleted with their expansion
        kept = [
            (r.source_key, bytes(r.raw))
            for r in conn.execute(select(RESULT_MESSAGE).order_by(RESULT_MESSAGE.c.id))
        ]
        results = [intake.seen(conn, "lis", f"k{i}") for i in range(3)]
        observations = conn.execute(
            select(func.count(), func.max(FHIR_RESOURCE.c.version)).where(
                FHIR_RESOURCE.c.rtype == "Observation"
            )
        ).one()
        audited = conn.execute(
            select(func.count()).select_from(AUDIT).where(AUDIT.c.action == "results")
        ).scalar()
    assert kept == [(f"k{i}", raw) for i, (raw, _, _) in enumerate(msgs)]  # in staging order
    for i, r in enumerate(results):
        assert r is not None and r["ack"] == f"ACK k{i}" and "staged" not in r
        assert len(r["reports"]) == 2 and r["routed"] == [] and r["stored_at"]
    assert observations == (24, 1)  # 8 OBX each, written once
    assert audited == 3
    assert len(reports(ctx)) == 6
    assert journal.run_once() == (0, False)  # nothing twice


def test_a_row_that_cannot_be_expanded_is_kept_quarantined_and_replayable(
    ctx: NodeContext,
) -> None:
    journal = Journal(ctx, bound=100)
    good1, good2 = converted(ctx, 11), converted(ctx, 12)
    raw, b, ph = converted(ctx, 13)
    broken = {**b, "entry": [*b["entry"], {"resource": {"id": "x"}}]}  # no resourceType
    stage(journal, ctx, "a", *good1)
    stage(journal, ctx, "b", raw, broken, ph)
    stage(journal, ctx, "c", *good2)
    assert drain(journal) == 2  # the batch failed, then row by row: the two good ones
    assert journal.queued() == 0
    with ctx.store.read() as conn:
        assert counts(conn)["failed"][0] == 1
        [row] = conn.execute(select(RESULT_JOURNAL)).all()
        [q] = conn.execute(select(QUARANTINE)).all()
        [audit] = conn.execute(select(AUDIT).where(AUDIT.c.action == "quarantined")).all()
        kept = [r.source_key for r in conn.execute(select(RESULT_MESSAGE.c.source_key))]
        seen_b = intake.seen(conn, "lis", "b")
    assert row.source_key == "b" and row.state == "failed" and row.error == "KeyError"
    assert q.code == "HT-RESULTS-EXPAND" and bytes(q.raw) == raw and q.source == "adapter:lis"
    assert "not stored in the FHIR store" in q.message and "110102" not in q.message
    assert audit.actor == "adapter:lis" and audit.patient_hash == ph
    assert sorted(kept) == ["a", "c"]
    assert seen_b == {"ack": "ACK b", "staged": True}  # a re-send still gets its ACK
    # IT fixed the cause and replays: the row goes back to the queue, once
    assert journal.requeue("lis", "b") is True
    assert journal.requeue("lis", "b") is False
    assert journal.requeue("lis", "a") is False  # expanded: nothing to requeue
    assert journal.queued() == 1
    with ctx.store.write() as conn:  # the cause fixed (here: the stored Bundle itself)
        from bridge.results.journal import pack

        conn.execute(RESULT_JOURNAL.update().values(bundle=pack(b)))
    assert drain(journal) == 1
    with ctx.store.read() as conn:
        assert counts(conn) == {}
        assert intake.seen(conn, "lis", "b")["ack"] == "ACK b"  # type: ignore[index]
    assert len(reports(ctx)) == 6


def test_the_bound_refuses_new_messages_until_the_job_drains(ctx: NodeContext) -> None:
    journal = Journal(ctx, bound=2, wait_s=0.05)
    journal.admit()
    for n in (21, 22):
        stage(journal, ctx, f"k{n}", *converted(ctx, n))
    with pytest.raises(Backlogged) as err:
        journal.admit()
    assert err.value.code == "HT-PKT-BACKLOG" and "max_results_journal = 2" in err.value.message
    assert drain(journal) == 2
    journal.admit()  # under the bound again
    # a new Journal (a restarted node) counts the table's queued rows
    stage(journal, ctx, "k23", *converted(ctx, 23))
    assert Journal(ctx, bound=2).queued() == 1


def test_the_job_defers_to_a_busy_intake_only_until_the_oldest_row_is_due(
    ctx: NodeContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the LIS keeps sending (here: always, QUIET_S of an hour) the job waits, but only
    until the oldest waiting row is DEFER_MAX_S old: a row staged long ago is filed at once,
    a fresh one after about DEFER_MAX_S, never later."""
    import time
    from datetime import timedelta

    from bridge.results import journal as J

    monkeypatch.setattr(J, "QUIET_S", 3600.0)
    journal = Journal(ctx, bound=100)
    raw, b, ph = converted(ctx, 1)
    monkeypatch.setattr(J, "DEFER_MAX_S", 30.0)
    with ctx.store.write() as conn:  # staged 31 s ago: due
        journal.stage(
            conn,
            adapter="lis",
            source_key="old",
            bundle=b,
            patient_hash=ph,
            answer={"ack": "ACK old"},
            raw=raw,
            kind="result.lab",
            notes=[],
            at=ctx.now() - timedelta(seconds=31),
        )
    journal.staged()
    t = time.monotonic()
    assert journal.run_once() == (1, False)
    assert time.monotonic() - t < 10  # not the 30 s a fresh row may wait
    monkeypatch.setattr(J, "DEFER_MAX_S", 1.0)
    raw, b, ph = converted(ctx, 2)
    stage(journal, ctx, "new", raw, b, ph)
    t = time.monotonic()
    assert journal.run_once() == (1, False)
    waited = time.monotonic() - t
    assert 0.8 <= waited < 20, waited  # deferred to the busy intake, then filed
    with ctx.store.read() as conn:
        filed = select(RESULT_MESSAGE.c.source_key).order_by(RESULT_MESSAGE.c.id)
        assert [r.source_key for r in conn.execute(filed)] == ["old", "new"]


def test_keys_under_a_prefix_are_found_oldest_first_whatever_its_characters(
    ctx: NodeContext,
) -> None:
    """``intake.keys_under`` (the LIS's re-send and reused-MSH-10 lookup, every message): the
    keys of that adapter that extend the prefix, in arrival order; LIKE's own characters in a
    prefix (``%``, ``_``, the escape ``/``) match only themselves."""
    at = ctx.now()
    keys = ["p%_/:b1", "p%_/:a2", "px_/:c3", "p%x/:d4", "p%_/", "p%_/:e5"]
    with ctx.store.write() as conn:
        for k in keys:
            intake.remember(conn, "lis", k, {"ack": k}, at)
        intake.remember(conn, "other", "p%_/:f6", {"ack": "f6"}, at)
    with ctx.store.read() as conn:
        assert intake.keys_under(conn, "lis", "p%_/:") == ["p%_/:b1", "p%_/:a2", "p%_/:e5"]
        assert intake.keys_under(conn, "lis", "p%_/") == ["p%_/:b1", "p%_/:a2", "p%_/", "p%_/:e5"]
        assert intake.keys_under(conn, "lis", "q") == []
