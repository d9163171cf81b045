"""bench/growth.py's bulk-loaded history is what the node's own code reads, bench/statements.py
counts every statement of the round, bench/delivery.py's top-up of result packets copies each
Observation whole under a new id, and bench/summary_md.py renders a run's JSON into the
README table (no node processes)."""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import func, select

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import delivery  # bench/ is not a package
import growth
import summary_md

from bridge.fhirstore import store as fhir
from bridge.fhirstore.tables import FHIR_DATE, FHIR_HISTORY, FHIR_RESOURCE, FHIR_TOKEN
from bridge.results.tables import RESULT_PACKET
from bridge.store.db import Store
from bridge.store.tables import INBOX, OUTBOX
from tests.factory import observation


def test_history_rows_read_back_through_the_node_tables(tmp_path: Path) -> None:
    dsn = f"sqlite:///{tmp_path / 'a.db'}"
    store = Store(dsn)
    store.create_all()
    try:
        before = datetime.now(UTC)
        wall, cpu = growth.fill(dsn, "outbox", 1200)
        assert wall >= 0 and cpu >= 0
        growth.fill(dsn, "outbox", 3000)  # a top-up continues the numbering
        growth.fill(dsn, "inbox", 700)
        with store.read() as conn:
            assert conn.execute(select(func.count()).select_from(OUTBOX)).scalar_one() == 3000
            assert conn.execute(select(func.count()).select_from(INBOX)).scalar_one() == 700
            ids = conn.execute(select(OUTBOX.c.packet_id).order_by(OUTBOX.c.id)).scalars().all()
            assert len(set(ids)) == 3000
            assert ids[0] == "hist-00000000" and ids[1200] == "hist-00001200"
            row = conn.execute(select(OUTBOX).where(OUTBOX.c.packet_id == "hist-00001234")).one()
            inrow = conn.execute(select(INBOX).where(INBOX.c.packet_id == "hist-00000699")).one()
    finally:
        store.dispose()
    base = row.created_at - timedelta(seconds=1234)
    # one packet a second from 90 days ago, read back as aware UTC datetimes by UTCDateTime
    assert base.tzinfo is not None
    assert abs((before - timedelta(days=90)) - base) < timedelta(seconds=5)
    assert (row.sender, row.recipient, row.next_hop, row.kind) == (
        "chc",
        "core",
        "core",
        "result.lab",
    )
    assert (row.origin, row.state, row.attempts, row.size) == ("local", "acknowledged", 1, 4096)
    assert (row.thread, row.seq) == ("hist-t1234", 1)
    assert row.next_try_at == row.sent_at == row.acked_at == row.created_at
    assert row.body is None and row.frame is None and row.receipt == growth.RECEIPT
    assert len(row.digest) == 64 and int(row.digest, 16) >= 0
    assert row.patient_hash == f"{1234:064x}"
    assert (inrow.sender, inrow.kind, inrow.state, inrow.thread) == (
        "chc",
        "result.lab",
        "delivered",
        "hist-t699",
    )
    assert inrow.received_at == inrow.delivered_at == inrow.created_at
    assert inrow.created_at.microsecond == 0
    assert abs(inrow.created_at - timedelta(seconds=699) - base) < timedelta(seconds=5)
    assert inrow.body is None and inrow.receipt == growth.RECEIPT


def test_summary_md_renders_every_section_present() -> None:
    run = {
        "when": "2026-11-24T08:00:00+00:00",
        "elapsed_s": 401.4,
        "git": "abc1234",
        "machine": {
            "cpu": "AMD EPYC",
            "cores": 2,
            "ram_gib": 23.5,
            "python": "3.11.7",
            "sqlite": "3.40.1",
            "postgresql": "15.18",
            "disk": {"device": "/dev/vda", "fs": "ext4", "size_gb": 271.0, "rotational": True},
        },
        "loadavg": {"start": [0.4, 0.5, 0.6], "end": [1.9, 1.0, 0.8]},
        "sections_s": {"exchange": 81.2, "growth": 70.4},
        "exchange": {
            "ceiling": {
                "best_s": {"seal 4 KiB": 0.000355},
                "pipeline": {"sqlite:4096": {"packets_per_s": 884.2}},
            },
            "throughput": [
                {
                    "backend": "sqlite",
                    "size": 4096,
                    "threads": 50,
                    "steady_pps": 505.3,
                    "delivered_pps": 71.4,
                    "rss_a_peak_mib": 133.3,
                    "rss_b_peak_mib": 140.2,
                },
                {
                    "backend": "sqlite",
                    "size": 4096,
                    "threads": 1,
                    "steady_pps": 410.0,
                    "delivered_pps": None,
                    "rss_a_peak_mib": 137.0,
                    "rss_b_peak_mib": 150.6,
                },
            ],
            "latency": [
                {
                    "backend": "sqlite",
                    "achieved_rate": 99.6,
                    "received_p50_ms": 21.4,
                    "received_p99_ms": 80.2,
                    "acked_p50_ms": 40.0,
                    "acked_p99_ms": 120.9,
                }
            ],
            "errors": [],
        },
        "scaleout": [
            {"processes": 1, "steady_pps": 300.0, "all_received_once": True, "duplicates_at_b": 0},
            {"processes": 4, "steady_pps": 450.0, "all_received_once": True, "duplicates_at_b": 0},
        ],
        "growth": [
            {"history": 10_000, "steady_pps": 505.0, "b_db_mb": 21.4},
            {"history": 1_000_000, "steady_pps": 380.0, "b_db_mb": 681.2},
        ],
        "errors": [],
    }
    md = summary_md.markdown(run)
    lines = md.splitlines()
    assert lines[0] == "## Figures of 2026-11-24 (`make bench`, 401 s)"
    assert lines[2] == (
        "AMD EPYC, 2 cores, 24 GiB RAM; disk /dev/vda (ext4, 271 GB, kernel: "
        "rotational); Python 3.11.7, SQLite 3.40.1, PostgreSQL 15.18; load "
        "average 0.4 → 1.9; git abc1234."
    )
    end = lines.index("", 6)  # the figures' table, then issue 17's aims
    table = dict(line.strip("|").split(" | ", 1) for line in lines[6:end])
    table = {k.strip(): v.strip() for k, v in table.items()}
    assert table["SQLite 4 KiB, 50 / 1 threads"] == "505 / 410 packets/s (ceiling 884)"
    assert table["end to end, B's local side has stored the results"] == (
        "SQLite 4 KiB 50 threads: 71 packets/s"
    )
    assert table["latency SQLite at 100 packets/s (created → received, → acked)"] == (
        "p50 21 / p99 80 ms; acked p50 40 / p99 121 ms"
    )
    assert table["scale-out PostgreSQL 1 / 4 processes"] == (
        "300 / 450 packets/s, received once, 0 duplicates"
    )
    assert table["peak RSS per node, receiver (VmHWM)"] == (
        "140–151 MiB (highest: SQLite 4 KiB 1 threads)"
    )
    assert table["store growth: 10 k / 1 M packets stored"] == (
        "505 / 380 packets/s (B's database 21 / 681 MB)"
    )
    assert table["machine ceiling, same run (µs per op)"] == "seal 4 KiB 355"
    assert table["run time by section (s)"] == "exchange 81, growth 70"
    assert not any(k.startswith(("ORU", "FHIR", "platform relay")) for k in table)
    # issue 17's aims: each row's figure from the same JSON, judged; absent sections say so
    assert lines[end + 1] == "Issue 17's aims (the soak's are judged by `make soak`):"
    aims = [
        [c.strip() for c in line.strip("|").split(" | ")]
        for line in lines[end + 5 :]
        if line.startswith("| ")
    ]
    by_what = {a[0]: a[1:] for a in aims}
    assert by_what["packets received A -> B (SQLite, 4 KiB, 50 threads)"] == [
        "505/s",
        ">= 1,500/s",
        "NOT MET",
    ]
    assert by_what["... and stored by B's local side (results in B's FHIR store)"] == [
        "71/s = 14%",
        ">= 80 % of received",
        "NOT MET",
    ]
    assert by_what[
        "exchange with the most packets already stored vs the fewest (1,000,000 vs 10,000)"
    ] == [
        "75%",
        ">= 90 %",
        "NOT MET",
    ]
    assert by_what["created -> acked p99 at ~100 packets/s (SQLite)"] == [
        "121 ms at 100/s",
        "< 50 ms",
        "NOT MET",
    ]
    assert by_what["created -> acked p99 at ~100 packets/s (PostgreSQL)"] == [
        "-",
        "< 50 ms",
        "not measured",
    ]
    assert by_what["PostgreSQL scale-out 1 -> 2 processes"][2] == "not measured"  # 1 and 4 only
    assert by_what["peak RSS per node process (every exchange run and the platform)"] == [
        "151 MiB",
        "< 150 MiB",
        "NOT MET",
    ]
    assert (
        by_what["LIS ORU^R01 (8 OBX), one MLLP connection, vs a plain store-and-ACK receiver"][2]
        == "not measured"
    )
    assert len(aims) == 11


def test_the_aims_say_met_where_the_figure_reaches_the_aim() -> None:
    import aims

    run = {
        "lis": {
            "runs": [
                {"obx": 8, "conns": 1, "ratio": 0.61, "hutong": {"per_s": 100.0}},
                {"obx": 8, "conns": 4, "ratio": 0.5, "hutong": {"per_s": 159.0}},
            ]
        },
        "scaleout": [{"processes": 1, "steady_pps": 100.0}, {"processes": 2, "steady_pps": 170.0}],
        "relay": {"steady_pps": 2000.0, "p99_ms": 100.0, "lat_rate": 1000.0},
    }
    got = {a["what"]: (a["measured"], a["verdict"]) for a in aims.aims(run)}
    assert got["LIS ORU^R01 (8 OBX), one MLLP connection, vs a plain store-and-ACK receiver"] == (
        "0.61x",
        "MET",
    )
    assert got["LIS intake, 4 connections vs one"] == ("1.59x", "NOT MET")
    assert got["PostgreSQL scale-out 1 -> 2 processes"] == ("1.70x", "MET")
    assert got["platform relay, 50 members, one platform process (SQLite)"] == (
        "2,000/s",
        "MET",
    )
    assert got["platform relay p99 at half its rate"] == ("100 ms at 1000/s", "NOT MET")


def test_message_browser_bench_finds_every_patient_in_every_box(tmp_path: Path) -> None:
    import messages

    (r,) = messages.messages(tmp_path, (12_000,))
    assert r["packets"] == 12_000
    # ten packets per patient, plus the quarantined item every tenth patient has
    assert r["rows_per_patient"] in ([10, 11], [10], [11])
    assert r["boxes_found"] == ["inbox", "outbox", "quarantine"] or set(r["boxes_found"]) == {
        "inbox",
        "outbox",
    }
    assert r["plans"] == {
        "outbox": "SEARCH outbox USING INDEX ix_outbox_patient_time (patient_hash=?)",
        "inbox": "SEARCH inbox USING INDEX ix_inbox_patient_time (patient_hash=?)",
        "quarantine": "SEARCH quarantine USING INDEX ix_quarantine_patient (patient_hash=?)",
    }


def test_statements_bench_times_every_statement_of_the_round_at_each_level(tmp_path: Path) -> None:
    """bench/statements.py: in process, two small levels; every packet is queued, sent,
    received and delivered once per level, and each statement row counts its calls."""
    import statements

    r = statements.statements(tmp_path, (300, 600), 30)
    assert r["levels"] == [300, 600] and r["n"] == 30
    rows = {(s["node"], s["part"], s["sql"].split(" (")[0]): s for s in r["statements"]}
    inbox = rows[("B", "send + intake (A, B)", "INSERT INTO inbox")]
    assert inbox["calls"] == {300: 1, 600: 1}  # 30 packets: one batch, one executemany
    outbox = rows[("A", "queue (A)", "INSERT INTO outbox")]
    assert outbox["calls"] == {300: 1, 600: 1}
    claims = [
        s
        for (node, part, sql), s in rows.items()
        if node == "A" and sql.startswith("SELECT outbox.id") and part.startswith("send")
    ]
    assert claims and all(
        s["plan"].startswith("SEARCH outbox USING INDEX ix_outbox_due") for s in claims
    )
    facts = [
        s
        for (node, part, sql), s in rows.items()
        if part == "alert facts (A, B)" and "ix_outbox_open" in s["plan"]
    ]
    assert {s["node"] for s in facts} == {"A", "B"}
    for s in r["statements"]:
        assert all(v is None or v > 0 for v in s["us_per_call"].values())
    # both levels ran every part
    assert set(r["walls_s"][300]) == set(r["walls_s"][600]) == set(statements.PARTS)


def test_the_results_fill_copies_each_observation_whole_under_a_new_id(tmp_path: Path) -> None:
    dsn = f"sqlite:///{tmp_path / 'b.db'}"
    store = Store(dsn)
    store.create_all()
    at = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)
    try:
        with store.write() as conn:
            obs = [observation(i, "Patient/p1", value=5.0 + i) for i in range(2)]
            fhir.put_many(conn, [(o, None, "ph1") for o in obs], at=at, origin="chc")
            conn.execute(
                RESULT_PACKET.insert().values(
                    packet_id="pk1", sender="chc", kind="result.lab", resources=2, at=at
                )
            )
        store.dispose()  # the fill runs on a closed store
        assert delivery.fill_results(dsn, 10) >= 0
        with store.read() as conn:
            rows = conn.execute(select(FHIR_RESOURCE).order_by(FHIR_RESOURCE.c.id)).all()
            history = conn.execute(select(FHIR_HISTORY.c.id, FHIR_HISTORY.c.body)).all()
            tokens = conn.execute(select(FHIR_TOKEN)).all()
            dates = conn.execute(select(FHIR_DATE)).all()
            packets = conn.execute(select(RESULT_PACKET.c.packet_id)).scalars().all()
            inbox = conn.execute(select(func.count()).select_from(INBOX)).scalar_one()
    finally:
        store.dispose()
    assert len(rows) == 10 and len({r.id for r in rows}) == 10
    originals = {o["id"]: o for o in obs}
    by_body = {r.body: r for r in rows if r.id in originals}
    for r in rows:  # each copy: its original's row but the id (the body keeps the old id)
        src = by_body[r.body]
        assert (r.rtype, r.version, r.patient, r.patient_hash, r.status, r.origin) == (
            src.rtype,
            src.version,
            src.patient,
            src.patient_hash,
            src.status,
            src.origin,
        )
        assert [h.body for h in history if h.id == r.id] == [r.body]
        mine = sorted((t.param, t.system, t.value) for t in tokens if t.id == r.id)
        assert mine == sorted((t.param, t.system, t.value) for t in tokens if t.id == src.id)
        assert mine  # the code at least
        assert [(d.param, d.start) for d in dates if d.id == r.id] == [
            (d.param, d.start) for d in dates if d.id == src.id
        ]
    assert len(packets) == len(set(packets)) == 3  # 1, doubled, topped up to a third of 10
    assert inbox == 3
