"""``hutong audit verify`` and ``hutong audit export`` on nodes that really exchanged packets.

verify: a stopped node's SQLite audit table is tampered with directly (an edited resource, a
deleted row, two rows swapped), each on its own copy of the database; verify exits 1 and names
the exact record, the untouched copy exits 0. export: ndjson and csv with --since/--until hold
the expected AuditEvents, and patients appear only as the keyed hash, never a name or ID number.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from fhir.resources.R4B.auditevent import AuditEvent

from bridge.audit import canonical, link_hash, unwrap
from bridge.audit.export import CSV_COLUMNS
from bridge.privacy import patient_hash
from tests.factory import bundle
from tests.harness import ROOT, Alliance, NodeProcess, spooled, wait_for

pytestmark = pytest.mark.slow

MEMBERS = [
    {"id": "core", "zh": "复兴医院", "en": "Fuxing Hospital", "role": "core"},
    {"id": "chc", "zh": "月坛社区卫生服务中心", "en": "Yuetan CHC", "role": "community"},
]
RULES = [{"from": "chc", "to": "core", "kinds": ["result.lab"]}]
# planted patients: none of these strings may reach an audit export
PATIENTS = [
    ("李建国", "110101198001011234"),
    ("张桂兰", "11010219451212876X"),
    ("王淑珍", "110104196703150027"),
    ("刘德明", "110105197208084411"),
    ("陈秀云", "11010819550505332x"),  # lower-case check digit: hashed as upper case
]


def patient_bundle(name: str, national_id: str) -> dict:
    b = bundle(1, national_id=national_id)
    b["entry"][0]["resource"]["name"] = [{"text": name, "family": name[0], "given": [name[1:]]}]
    return b


def cli_many(*calls: tuple) -> list[subprocess.CompletedProcess[str]]:
    """``hutong <args> --config <file>`` as real processes, side by side."""
    procs = []
    for config, *args in calls:
        cmd = [sys.executable, "-m", "bridge.cli", *args, "--config", str(config)]
        procs.append(
            (
                cmd,
                subprocess.Popen(
                    cmd,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    cwd=ROOT,
                    env=dict(os.environ),
                ),
            )
        )
    done = []
    for cmd, proc in procs:
        out, err = proc.communicate(timeout=120)
        done.append(subprocess.CompletedProcess(cmd, proc.returncode, out, err))
    return done


def action_of(event: dict) -> str:
    return event["subtype"][0]["code"]


def entity_value(event: dict, system: str) -> str | None:
    for entity in event.get("entity", ()):
        ident = entity.get("what", {}).get("identifier", {})
        if ident.get("system") == system:
            return ident["value"]
    return None


def details(event: dict) -> dict[str, str]:
    for entity in event.get("entity", ()):
        if entity.get("detail"):
            return {d["type"]: d["valueString"] for d in entity["detail"]}
    return {}


def recorded(event_or_row: dict) -> datetime:
    text = event_or_row.get("recorded") or event_or_row["at"]
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@pytest.fixture(scope="module")
def exchanged(tmp_path_factory: pytest.TempPathFactory):
    """chc sent five packets to core in two batches (mid = the time between); both stopped."""
    a = Alliance(tmp_path_factory.mktemp("auditcli") / "alliance", MEMBERS, RULES)
    a.start("core", "chc")
    try:
        chc, core = a.node("chc"), a.node("core")
        t0 = datetime.now(UTC)

        def exchange(patients: list[tuple[str, str]], thread: str, total: int) -> list[str]:
            ids = chc.send(
                "core", "result.lab", [patient_bundle(*p) for p in patients], thread=thread
            )
            wait_for(
                lambda: (
                    core.api("GET", "/local/v1/queues")["inbox"].get("delivered", {}).get("count")
                    == total
                ),
                what="delivered at core",
            )
            wait_for(
                lambda: (
                    chc.api("GET", "/local/v1/queues")["outbox"][0].get("acknowledged") == total
                ),
                what="acknowledged at chc",
            )
            return ids

        first = exchange(PATIENTS[:3], "t-first", 3)
        mid = datetime.now(UTC)
        second = exchange(PATIENTS[3:], "t-second", 5)
        end = datetime.now(UTC)
        assert len(spooled(core)) == 5
    finally:
        a.stop_all()
    nid_of = dict(zip(first + second, (nid for _, nid in PATIENTS), strict=True))
    return a, t0, mid, end, first, second, nid_of


def db_file(node: NodeProcess) -> Path:
    return Path(node.plan.storage_dsn.split("///", 1)[1])


def copy_with_db(node: NodeProcess, name: str) -> tuple[Path, Path]:
    """A second node file for the same node, on its own copy of the database."""
    src = db_file(node)
    with sqlite3.connect(src) as conn:  # fold any WAL into the file before copying it
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    db = src.with_name(f"{name}.db")
    shutil.copyfile(src, db)
    text = node.config.read_text()
    marker = "\n[keys]"
    config = node.config.with_name(f"{node.node_id}-{name}.toml")
    config.write_text(text.replace(marker, f'storage_dsn = "sqlite:///{db}"\n{marker}', 1))
    return config, db


def audit_rows(db: Path) -> list[sqlite3.Row]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute("SELECT * FROM audit ORDER BY seq").fetchall()
    finally:
        conn.close()


def tamper(db: Path, *statements: tuple[str, tuple]) -> None:
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("BEGIN")
        for sql, args in statements:
            assert conn.execute(sql, args).rowcount == 1, sql
        conn.execute("COMMIT")
    finally:
        conn.close()


def test_verify_names_the_exact_record_of_each_tampering(exchanged) -> None:
    a, *_ = exchanged
    core = a.node("core")
    intact, _ = copy_with_db(core, "intact")
    edited, edited_db = copy_with_db(core, "edited")
    deleted, deleted_db = copy_with_db(core, "deleted")
    swapped, swapped_db = copy_with_db(core, "swapped")

    rows = audit_rows(edited_db)
    seqs = [r["seq"] for r in rows]
    assert seqs == list(range(1, len(rows) + 1))
    actions = [r["action"] for r in rows]
    assert actions.count("received") == 5 and actions.count("delivered") == 5
    n = len(rows)
    assert n >= 11
    # (a) one row's AuditEvent JSON edited: a received event now says it failed
    k = [r["seq"] for r in rows if r["action"] == "received"][1]
    resource = rows[k - 1]["resource"]
    assert '"outcome":"0"' in resource
    tamper(
        edited_db,
        (
            "UPDATE audit SET resource = ? WHERE seq = ?",
            (resource.replace('"outcome":"0"', '"outcome":"4"'), k),
        ),
    )
    # (b) a middle row deleted
    d = n // 2
    tamper(deleted_db, ("DELETE FROM audit WHERE seq = ?", (d,)))
    # (c) two rows' contents swapped (every column but seq): the log is reordered
    i, j = 3, n - 2
    cols = [c for c in rows[0].keys() if c != "seq"]
    sets = ", ".join(f"{c} = ?" for c in cols)
    tamper(
        swapped_db,
        (f"UPDATE audit SET {sets} WHERE seq = ?", (*[rows[j - 1][c] for c in cols], i)),
        (f"UPDATE audit SET {sets} WHERE seq = ?", (*[rows[i - 1][c] for c in cols], j)),
    )

    ok, bad_a, bad_b, bad_c = cli_many(
        *((c, "audit", "verify") for c in (intact, edited, deleted, swapped))
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith(f"audit chain of core verifies: {n} records, ")
    assert ok.stderr == ""
    expected = {
        "edited": (
            bad_a,
            (
                f"audit chain of core is BROKEN at record {k}: seq {k}: hash "
                "mismatch, resource or hash was edited"
            ),
        ),
        "deleted": (
            bad_b,
            (
                f"audit chain of core is BROKEN at record {d + 1}: seq {d + 1}: "
                f"follows seq {d - 1}, row {d} missing"
            ),
        ),
        "swapped": (
            bad_c,
            (
                f"audit chain of core is BROKEN at record {i}: seq {i}: prev_hash "
                f"does not link to seq {i - 1} (row deleted, moved or reordered)"
            ),
        ),
    }
    for case, (r, line) in expected.items():
        assert r.returncode == 1, (case, r.stdout, r.stderr)
        assert r.stderr.splitlines() == [line], case  # one line, no traceback
        assert r.stdout == "", case


def test_export_windows_hold_the_expected_events_and_only_keyed_patient_hashes(
    exchanged,
) -> None:
    a, t0, mid, end, first, second, nid_of = exchanged
    chc, core = a.node("chc"), a.node("core")
    key = chc.plan.patient_hash_key
    assert key == core.plan.patient_hash_key  # one alliance key, the same hash on both sides
    hash_of = {pid: patient_hash(key, nid) for pid, nid in nid_of.items()}
    # no offset: read in the node's display zone ([web] display_zone, Asia/Shanghai)
    naive_mid = mid.astimezone(ZoneInfo("Asia/Shanghai")).replace(tzinfo=None).isoformat()
    calls = [
        (
            chc.config,
            "audit",
            "export",
            "--format",
            "ndjson",
            "--since",
            t0.isoformat(),
            "--until",
            mid.isoformat(),
        ),
        (
            core.config,
            "audit",
            "export",
            "--format",
            "ndjson",
            "--since",
            t0.isoformat(),
            "--until",
            mid.isoformat(),
        ),
        (chc.config, "audit", "export", "--format", "csv", "--since", naive_mid),
        (
            core.config,
            "audit",
            "export",
            "--format",
            "csv",
            "--since",
            mid.isoformat(),
            "--until",
            end.isoformat(),
        ),
        (chc.config, "audit", "export", "--format", "ndjson"),
        (core.config, "audit", "export", "--format", "csv"),
    ]
    results = cli_many(*calls)
    for r in results:
        assert r.returncode == 0, (r.args, r.stderr)
        assert r.stderr == ""
    chc_nd, core_nd, chc_csv, core_csv, chc_all, core_all_csv = (r.stdout for r in results)

    # --- ndjson, first batch only: FHIR AuditEvents that re-hash offline ---------------------
    # core stores each result packet in its FHIR store before handing it on (ResultsInbox, the
    # dispatcher's result.* hook): "results", between "received" and "delivered"
    for text, node, peer, want in (
        (chc_nd, "chc", "core", ("queued", "sent")),
        (core_nd, "core", "chc", ("received", "results", "delivered")),
    ):
        events = [json.loads(line) for line in text.splitlines()]
        assert sorted(
            (action_of(e), entity_value(e, "urn:hutong:packet")) for e in events
        ) == sorted((action, pid) for action in want for pid in first), node
        for e in events:
            resource, prev, hash_ = unwrap(e)
            assert link_hash(prev, canonical(resource)) == hash_
            assert AuditEvent.model_validate(e).subtype[0].code == action_of(e)
            pid = entity_value(e, "urn:hutong:packet")
            assert e["outcome"] == "0"
            assert e["source"]["observer"]["identifier"] == {
                "system": "urn:hutong:node",
                "value": node,
            }
            assert details(e) == {"kind": "result.lab", "thread": "t-first", "peer": peer}
            assert entity_value(e, "urn:hutong:patient-hash") == hash_of[pid]
            assert t0 <= recorded(e) < mid
            if action_of(e) == "results":  # the bundle's Patient and Observation, no referral
                assert e["outcomeDesc"] == (
                    "2 result resource(s) stored (no referral known for the thread)"
                )
        # one row per (action, packet), in the order things happened
        for pid in first:
            assert [
                action_of(e) for e in events if entity_value(e, "urn:hutong:packet") == pid
            ] == list(want)

    # --- csv, second batch only ---------------------------------------------------------------
    for text, peer, want, until in (
        (chc_csv, "core", ("queued", "sent"), None),
        (core_csv, "chc", ("received", "results", "delivered"), end),
    ):
        table = list(csv.reader(io.StringIO(text)))
        assert tuple(table[0]) == CSV_COLUMNS
        rows = [dict(zip(CSV_COLUMNS, r, strict=True)) for r in table[1:]]
        # the exports running beside this one are audited too, naming the OS user
        exports = [r for r in rows if r["action"] == "export"]
        assert all(r["actor"].startswith("cli:") for r in exports)
        rows = [r for r in rows if r["action"] != "export"]
        assert sorted((r["action"], r["packet_id"]) for r in rows) == sorted(
            (action, pid) for action in want for pid in second
        )
        for r in rows:
            assert (r["outcome"], r["kind"], r["peer"], r["thread"]) == (
                "0",
                "result.lab",
                peer,
                "t-second",
            )
            assert r["patient_hash"] == hash_of[r["packet_id"]]
            assert r["code"] == "" and len(r["hash"]) == 64
            assert recorded(r) >= mid and (until is None or recorded(r) < until)
        assert [int(r["seq"]) for r in rows] == sorted(int(r["seq"]) for r in rows)

    # --- nothing identifying, anywhere: only the keyed hash -----------------------------------
    every = {
        "chc ndjson": chc_nd,
        "core ndjson": core_nd,
        "chc csv": chc_csv,
        "core csv": core_csv,
        "chc all": chc_all,
        "core all csv": core_all_csv,
    }
    for label, text in every.items():
        assert text.strip(), label
        for name, nid in PATIENTS:
            for planted in (
                name,
                name[1:],
                nid,
                nid.upper(),
                nid.lower(),
                hashlib.sha256(nid.upper().encode()).hexdigest()[:32],
            ):
                assert planted not in text, (label, planted)
    all_events = [json.loads(line) for line in chc_all.splitlines()]
    with_patient = [e for e in all_events if entity_value(e, "urn:hutong:patient-hash")]
    assert sorted(
        (action_of(e), entity_value(e, "urn:hutong:patient-hash")) for e in with_patient
    ) == sorted((action, hash_of[pid]) for action in ("queued", "sent") for pid in first + second)
    assert {action_of(e) for e in all_events} - {"export"} == {"config", "queued", "sent"}
    core_rows = list(csv.DictReader(io.StringIO(core_all_csv)))
    assert sorted(
        (r["action"], r["patient_hash"]) for r in core_rows if r["patient_hash"]
    ) == sorted(
        (action, hash_of[pid])
        for action in ("received", "results", "delivered")
        for pid in first + second
    )
    # the second batch's lower-case check digit hashes like the upper-case one
    assert hash_of[second[-1]] == patient_hash(key, PATIENTS[-1][1].upper())
