"""A peer that is down: its packets wait in their own queue without holding up anyone else,
IT sees why and for how long (``hutong outbox list``), and everything arrives exactly once when
the peer comes back; dead packets go again only when IT says so (``hutong outbox retry``)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from datetime import datetime
from pathlib import Path

import pytest

from tests.factory import bundle
from tests.harness import ROOT, Alliance, NodeProcess, db_rows, spooled, wait_for

pytestmark = pytest.mark.slow

MEMBERS = [
    {"id": "core", "zh": "复兴医院", "en": "Fuxing Hospital", "role": "core"},
    {"id": "chc", "zh": "月坛社区卫生服务中心", "en": "Yuetan CHC", "role": "community"},
    {"id": "sec", "zh": "广外医院", "en": "Guangwai Hospital", "role": "secondary"},
    {"id": "gwc", "zh": "广外社区卫生服务中心", "en": "Guangwai CHC", "role": "community"},
]
RULES = [
    {"from": "chc", "to": "core", "kinds": ["result.lab"]},
    {"from": "role:community", "to": "sec", "kinds": ["result.lab", "result.imaging"]},
]
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def with_delivery(a: Alliance, node_id: str, settings: str) -> None:
    """Give a node file a [delivery] section before the node first starts."""
    path = a.files[node_id]
    assert "[delivery]" not in path.read_text()
    path.write_text(path.read_text() + "\n[delivery]\n" + settings + "\n")


def cli(node: NodeProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return cli_many((node, *args))[0]


def cli_many(*calls: tuple) -> list[subprocess.CompletedProcess[str]]:
    """``hutong <args> --config <node file>`` as real processes, run side by side, wide enough
    that rich does not cut table columns."""
    env = dict(os.environ, COLUMNS="250")
    procs = []
    for node, *args in calls:
        cmd = [sys.executable, "-m", "bridge.cli", *args, "--config", str(node.config)]
        procs.append(
            (
                cmd,
                subprocess.Popen(
                    cmd,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    cwd=ROOT,
                    env=env,
                ),
            )
        )
    done = []
    for cmd, proc in procs:
        out, err = proc.communicate(timeout=120)
        done.append(subprocess.CompletedProcess(cmd, proc.returncode, out, err))
    return done


def spooled_ids(node: NodeProcess) -> list[str]:
    return [f.stem.split("-", 1)[1] for f in spooled(node)]


def outbox(node: NodeProcess, **query: str) -> list[dict]:
    qs = "&".join(f"{k}={v}" for k, v in query.items())
    return node.api("GET", "/local/v1/outbox" + (f"?{qs}" if qs else ""))


def peer_counts(node: NodeProcess) -> dict[str, dict]:
    return {p["peer"]: p for p in node.api("GET", "/local/v1/queues")["outbox"]}


def action_of(event: dict) -> str:
    return event["subtype"][0]["code"]


def packet_of(event: dict) -> str | None:
    for entity in event.get("entity", ()):
        ident = entity.get("what", {}).get("identifier", {})
        if ident.get("system") == "urn:hutong:packet":
            return ident["value"]
    return None


def actor_of(event: dict) -> str | None:
    for agent in event["agent"]:
        ident = agent["who"]["identifier"]
        if ident["system"] == "urn:hutong:actor":
            return ident["value"]
    return None


def test_down_peer_waits_in_its_own_queue_then_drains_once_and_dead_ones_wait_for_it(
    tmp_path: Path,
) -> None:
    a = Alliance(tmp_path / "alliance", MEMBERS, RULES)
    # chc: short backoff, so its backlog drains within a second of sec coming back.
    # gwc: gives up after two tries, so its packets for sec go dead and wait for IT.
    with_delivery(a, "chc", "backoff_base_s = 0.2\nbackoff_max_s = 1.0")
    with_delivery(a, "gwc", "max_attempts = 2\nbackoff_base_s = 0.1\nbackoff_max_s = 0.2")
    a.start("core", "chc", "gwc")  # sec is not started: its port refuses connections
    try:
        chc, core, sec, gwc = a.node("chc"), a.node("core"), a.node("sec"), a.node("gwc")
        sec_url = sec.plan.directory["sec"].exchange_url
        refused = f"HT-TRANSPORT: cannot connect to {sec_url}: Connection refused"
        to_sec = chc.send(
            "sec", "result.lab", [bundle(1, marker=f"s{i}") for i in range(12)], thread="t-sec"
        )
        to_sec += chc.send(
            "sec", "result.imaging", [bundle(1) for _ in range(3)], thread="t-sec-img"
        )
        to_core = chc.send(
            "core", "result.lab", [bundle(1, marker=f"c{i}") for i in range(25)], thread="t-core"
        )
        dead = gwc.send("sec", "result.lab", [bundle(1) for _ in range(3)], thread="t-dead")

        # the up peer gets all of its packets although sec's queue is stuck
        wait_for(lambda: len(spooled(core)) >= 25, what="core's 25 packets")
        assert sorted(spooled_ids(core)) == sorted(to_core)
        wait_for(lambda: peer_counts(chc)["core"].get("acknowledged") == 25, what="core's receipts")
        acked = outbox(chc, state="acknowledged", peer="core")
        assert [row["packet_id"] for row in acked] == to_core
        assert {(row["state"], row["attempts"], row["last_error"]) for row in acked} == {
            ("acknowledged", 1, None)
        }
        # sec's queue has tried (and failed) more than once on every packet
        wait_for(
            lambda: (
                (rows := outbox(chc, peer="sec"))
                and len(rows) == 15
                and all(r["attempts"] >= 2 for r in rows)
            ),
            what="chc's retries to sec",
        )
        wait_for(lambda: len(outbox(gwc, state="dead")) == 3, what="gwc's dead packets")

        # --- IT's view, as real CLI processes ------------------------------------------------
        listed, table, dead_listed = cli_many(
            (chc, "outbox", "list", "--json"),
            (chc, "outbox", "list"),
            (gwc, "outbox", "list", "--state", "dead", "--json"),
        )
        for r in (listed, table, dead_listed):
            assert r.returncode == 0, r.stderr
        rows = json.loads(listed.stdout)
        assert [row["packet_id"] for row in rows] == to_sec  # queue order; no core packet left
        seq_in = {"t-sec": 0, "t-sec-img": 0}
        for i, row in enumerate(rows):
            thread = "t-sec" if i < 12 else "t-sec-img"
            seq_in[thread] += 1
            assert set(row) == {
                "id",
                "packet_id",
                "origin",
                "recipient",
                "next_hop",
                "kind",
                "thread",
                "seq",
                "state",
                "attempts",
                "created_at",
                "next_try_at",
                "last_error",
                "age_s",
            }
            assert isinstance(row["id"], int)
            assert row["origin"] == "local"
            assert row["recipient"] == "sec"
            assert row["next_hop"] == "sec"
            assert row["kind"] == ("result.lab" if thread == "t-sec" else "result.imaging")
            assert row["thread"] == thread
            assert row["seq"] == seq_in[thread]
            assert row["state"] == "queued"
            assert row["attempts"] >= 2
            assert row["last_error"] == refused
            assert isinstance(row["age_s"], float) and 0 < row["age_s"] < 120
            created = datetime.fromisoformat(row["created_at"])
            assert created.utcoffset() is not None and created.utcoffset().total_seconds() == 0
            assert datetime.fromisoformat(row["next_try_at"]) > created
        assert seq_in == {"t-sec": 12, "t-sec-img": 3}

        lines = table.stdout.splitlines()
        cells = [[c.strip() for c in line.strip("│┃ ").split("│")] for line in lines]
        per_peer = {c[0]: c for c in cells if len(c) == 7 and c[0] in ("core", "sec")}
        assert per_peer["core"][1:6] == ["0", "0", "0", "0", "25"]  # queued .. acknowledged
        assert per_peer["sec"][1:6] == ["15", "0", "0", "0", "0"]
        assert float(per_peer["sec"][6]) > 0  # oldest waiting, seconds
        assert per_peer["core"][6] == "-"
        waiting = [c for c in cells if len(c) == 10 and c[0].isdigit()]
        assert [c[1] for c in waiting] == [pid[:8] for pid in to_sec]
        for c in waiting:
            assert c[2:4] == ["sec", "sec"]
            assert c[6] == "queued"
            assert int(c[7]) >= 2
            assert float(c[8]) > 0
            assert c[9] == refused[:60]
            assert c[9].startswith("HT-TRANSPORT: cannot connect to http://127.0.0.1:")

        dead_rows = json.loads(dead_listed.stdout)
        assert [row["packet_id"] for row in dead_rows] == dead
        for i, row in enumerate(dead_rows, start=1):
            assert (
                row["state"],
                row["attempts"],
                row["recipient"],
                row["thread"],
                row["seq"],
                row["last_error"],
            ) == ("dead", 2, "sec", "t-dead", i, refused)

        # --- sec comes back: chc's backlog drains, each packet exactly once ------------------
        a.start("sec")
        fresh = gwc.send("sec", "result.lab", [bundle(1)], thread="t-fresh")
        wait_for(lambda: len(spooled(sec)) >= 16, what="the backlog and gwc's fresh packet")
        wait_for(
            lambda: peer_counts(chc)["sec"].get("acknowledged") == 15, what="sec's receipts at chc"
        )
        wait_for(
            lambda: peer_counts(gwc)["sec"].get("acknowledged") == 1, what="sec's receipt at gwc"
        )
        got = spooled_ids(sec)
        assert sorted(got) == sorted(to_sec + fresh)
        assert Counter(got).most_common(1)[0][1] == 1
        by_thread: dict[str, list[tuple[int, str]]] = {}
        for f in spooled(sec):
            seq, pid = f.stem.split("-", 1)
            by_thread.setdefault(f"{f.parent.parent.name}/{f.parent.name}", []).append(
                (int(seq), pid)
            )
        assert by_thread == {
            "chc/t-sec": [(i + 1, pid) for i, pid in enumerate(to_sec[:12])],
            "chc/t-sec-img": [(i + 1, pid) for i, pid in enumerate(to_sec[12:])],
            "gwc/t-fresh": [(1, fresh[0])],
        }
        for f in spooled(sec):
            if f.parent.name == "t-sec":
                i = to_sec.index(f.stem.split("-", 1)[1])
                note = json.loads(f.read_bytes())["entry"][1]["resource"]["note"][0]["text"]
                assert note == f"s{i}"
        assert sorted(spooled_ids(core)) == sorted(to_core)  # nothing went twice to core
        assert outbox(chc) == []  # nothing waits, nothing dead
        assert {
            p: {k: v for k, v in c.items() if k not in ("peer", "oldest_waiting_s")}
            for p, c in peer_counts(chc).items()
        } == {"core": {"acknowledged": 25}, "sec": {"acknowledged": 15}}
        # gwc's dead packets did not go by themselves although sec is up and took a fresh one
        assert [row["packet_id"] for row in outbox(gwc, state="dead")] == dead

        # --- IT retries the dead ones: one by outbox id, then all the rest -------------------
        r = cli(gwc, "outbox", "retry", str(dead_rows[1]["id"]))
        assert (r.returncode, r.stdout.strip()) == (0, "re-queued 1 packet(s)"), r.stderr
        # sec takes it (its receipt comes back) but holds it: its thread's seq 1 has not
        # arrived, and a gap is held, never skipped over (bridge/delivery/threads.py)
        wait_for(
            lambda: peer_counts(gwc)["sec"].get("acknowledged") == 2,
            what="the retried packet's receipt",
        )
        wait_for(
            lambda: (
                db_rows(sec, "SELECT state, last_error FROM inbox WHERE packet_id = :p", p=dead[1])
                == [("held", ("held: seq 2 waits for seq 1 from gwc on its thread"))]
            ),
            what="the retried packet held at sec",
        )
        assert dead[1] not in spooled_ids(sec)
        assert [row["packet_id"] for row in outbox(gwc, state="dead")] == [dead[0], dead[2]]
        r = cli(gwc, "outbox", "retry")
        assert (r.returncode, r.stdout.strip()) == (0, "re-queued 2 packet(s)"), r.stderr
        wait_for(lambda: peer_counts(gwc)["sec"].get("acknowledged") == 4, what="all receipts")
        assert outbox(gwc) == []

        # a receipt says "stored"; the hand-over to sec's local side follows on its own round,
        # and its audit rows commit after the spool files are written
        def delivered() -> list[str]:
            return [
                pid
                for (pid,) in db_rows(
                    sec,
                    "SELECT packet_id FROM audit WHERE action = "
                    "'delivered' AND thread = 't-dead' ORDER BY seq",
                )
            ]

        wait_for(lambda: len(delivered()) == 3, what="the three retried packets handed over")
        assert sorted(
            f.stem.split("-", 1)[1] for f in spooled(sec) if f.parent.name == "t-dead"
        ) == sorted(dead)
        assert delivered() == dead  # in the sender's order although they arrived 2, 1, 3
        acked = {row["packet_id"]: row for row in outbox(gwc, state="acknowledged")}
        for pid in dead:
            assert acked[pid]["attempts"] == 1  # counted afresh from the retry
            assert acked[pid]["last_error"] is None

        # --- the audit trails -----------------------------------------------------------------
        sec_audit, gwc_audit = cli_many(
            (sec, "audit", "export", "--format", "ndjson"),
            (gwc, "audit", "export", "--format", "ndjson"),
        )
        for r in (sec_audit, gwc_audit):
            assert r.returncode == 0, r.stderr
        sec_events = [json.loads(line) for line in sec_audit.stdout.splitlines()]
        received = Counter(packet_of(e) for e in sec_events if action_of(e) == "received")
        assert received == Counter(dict.fromkeys(to_sec + fresh + dead, 1))
        assert [e for e in sec_events if action_of(e) == "duplicate"] == []

        events = [json.loads(line) for line in gwc_audit.stdout.splitlines()]
        dead_lettered = [e for e in events if action_of(e) == "dead-lettered"]
        assert [packet_of(e) for e in dead_lettered] == dead
        for e in dead_lettered:
            assert (e["outcome"], e["outcomeDesc"]) == ("8", refused)
        replayed = [e for e in events if action_of(e) == "replayed"]
        assert [packet_of(e) for e in replayed] == [dead[1], dead[0], dead[2]]
        for e in replayed:
            assert actor_of(e) == "cli"
            assert e["outcomeDesc"] == "outbox retry"
            assert e["outcome"] == "0"
            details = {d["type"]: d["valueString"] for d in e["entity"][0]["detail"]}
            assert details == {"kind": "result.lab", "thread": "t-dead", "peer": "sec"}
        # each dead packet: queued, dead-lettered, replayed, then sent, in that order
        for pid in dead:
            assert [action_of(e) for e in events if packet_of(e) == pid] == [
                "queued",
                "dead-lettered",
                "replayed",
                "sent",
            ]
    finally:
        a.stop_all()
