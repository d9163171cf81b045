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
from tests.harness import ROOT, Alliance, NodeProcess, spooled, wait_for

pytestmark = pytest.mark.slow

MEMBERS = [
    {"id": "core", "zh": "复兴医院", "en": "Fuxing Hospital", "role": "core"},
    {"id": "chc", "zh": "月坛社区卫生服务中心", "en": "Yuetan CHC", "role": "community"},
    {"id": "sec", "zh": "广外医院", "en": "Guangwai Hospital", "role": "secondary"},
]
RULES = [
    {"from": "chc", "to": "core", "kinds": ["result.lab"]},
    {"from": "chc", "to": "sec", "kinds": ["result.lab", "result.imaging"]},
]
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def with_delivery(a: Alliance, node_id: str, settings: str) -> None:
    """Give a node file a [delivery] section before the node first starts."""
    path = a.files[node_id]
    assert "[delivery]" not in path.read_text()
    path.write_text(path.read_text() + "\n[delivery]\n" + settings + "\n")


def cli(node: NodeProcess, *args: str) -> subprocess.CompletedProcess[str]:
    """``hutong <args> --config <node file>`` as a real process, wide enough not to cut columns."""
    env = dict(os.environ, COLUMNS="250")
    return subprocess.run(
        [sys.executable, "-m", "bridge.cli", *args, "--config", str(node.config)],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)


def spooled_ids(node: NodeProcess) -> list[str]:
    return [f.stem.split("-", 1)[1] for f in spooled(node)]


def outbox(node: NodeProcess, **query: str) -> list[dict]:
    qs = "&".join(f"{k}={v}" for k, v in query.items())
    return node.api("GET", "/local/v1/outbox" + (f"?{qs}" if qs else ""))


def peer_counts(node: NodeProcess) -> dict[str, dict]:
    return {p["peer"]: p for p in node.api("GET", "/local/v1/queues")["outbox"]}


def audit_ndjson(node: NodeProcess) -> list[dict]:
    r = cli(node, "audit", "export", "--format", "ndjson")
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


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


def test_down_peer_waits_in_its_own_queue_then_everything_arrives_once(tmp_path: Path) -> None:
    a = Alliance(tmp_path / "alliance", MEMBERS, RULES)
    # short backoff so the backlog drains within a second of the peer coming back
    with_delivery(a, "chc", "backoff_base_s = 0.2\nbackoff_max_s = 1.0")
    a.start("core", "chc")  # sec is never started: its port refuses connections
    try:
        chc, core, sec = a.node("chc"), a.node("core"), a.node("sec")
        to_sec = chc.send("sec", "result.lab", [bundle(1, marker=f"s{i}") for i in range(12)],
                          thread="t-sec")
        to_sec += chc.send("sec", "result.imaging", [bundle(1) for _ in range(3)],
                           thread="t-sec-ref")
        to_core = chc.send("core", "result.lab", [bundle(1, marker=f"c{i}") for i in range(25)],
                           thread="t-core")

        # the up peer gets all of its packets although sec's queue is stuck
        wait_for(lambda: len(spooled(core)) >= 25, what="core's 25 packets")
        assert sorted(spooled_ids(core)) == sorted(to_core)
        wait_for(lambda: peer_counts(chc)["core"].get("acknowledged") == 25,
                 what="core's receipts")
        # and sec's queue has tried (and failed) more than once on every packet
        wait_for(lambda: (rows := outbox(chc, peer="sec")) and len(rows) == 15
                 and all(r["attempts"] >= 2 for r in rows), what="sec retries")

        # --- IT's view, as a real CLI process ------------------------------------------------
        sec_url = sec.plan.directory["sec"].exchange_url
        expected_error = f"HT-TRANSPORT: cannot connect to {sec_url}: Connection refused"
        r = cli(chc, "outbox", "list", "--json")
        assert r.returncode == 0, r.stderr
        rows = json.loads(r.stdout)
        assert [row["packet_id"] for row in rows] == to_sec  # queue order; no core packet left
        seq_in = {"t-sec": 0, "t-sec-ref": 0}
        for row, pid in zip(rows, to_sec, strict=True):
            thread = "t-sec" if to_sec.index(pid) < 12 else "t-sec-ref"
            seq_in[thread] += 1
            assert set(row) == {"id", "packet_id", "origin", "recipient", "next_hop", "kind",
                                "thread", "seq", "state", "attempts", "created_at",
                                "next_try_at", "last_error", "age_s"}
            assert isinstance(row["id"], int)
            assert row["origin"] == "local"
            assert row["recipient"] == "sec"
            assert row["next_hop"] == "sec"
            assert row["kind"] == ("result.lab" if thread == "t-sec" else "result.imaging")
            assert row["thread"] == thread
            assert row["seq"] == seq_in[thread]
            assert row["state"] == "queued"
            assert row["attempts"] >= 2
            assert row["last_error"] == expected_error
            assert isinstance(row["age_s"], float) and 0 < row["age_s"] < 120
            created = datetime.fromisoformat(row["created_at"])
            assert created.utcoffset() is not None and created.utcoffset().total_seconds() == 0
            assert datetime.fromisoformat(row["next_try_at"]) > created
        assert seq_in == {"t-sec": 12, "t-sec-ref": 3}

        r = cli(chc, "outbox", "list", "--state", "acknowledged", "--peer", "core", "--json")
        acked = json.loads(r.stdout)
        assert [row["packet_id"] for row in acked] == to_core
        assert {(row["state"], row["attempts"], row["last_error"]) for row in acked} == {
            ("acknowledged", 1, None)}

        r = cli(chc, "outbox", "list")
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        per_peer = {cells[0]: cells for line in lines
                    if (cells := [c.strip() for c in line.strip("│┃ ").split("│")])
                    and cells[0] in ("core", "sec") and len(cells) == 7}
        assert per_peer["core"][1:6] == ["0", "0", "0", "0", "25"]  # queued..acknowledged
        assert per_peer["sec"][1:6] == ["15", "0", "0", "0", "0"]
        assert float(per_peer["sec"][6]) > 0  # oldest waiting, seconds
        waiting = [cells for line in lines
                   if (cells := [c.strip() for c in line.strip("│┃ ").split("│")])
                   and len(cells) == 10 and cells[0].isdigit()]
        assert [c[1] for c in waiting] == [pid[:8] for pid in to_sec]
        for c in waiting:
            assert c[2:4] == ["sec", "sec"]
            assert c[6] == "queued"
            assert int(c[7]) >= 2
            assert float(c[8]) > 0
            assert c[9] == expected_error[:60]
            assert "cannot connect to" in c[9]

        # --- the peer comes back: the backlog drains, each packet exactly once ---------------
        a.start("sec")
        wait_for(lambda: len(spooled(sec)) >= 15, what="sec's backlog")
        wait_for(lambda: peer_counts(chc)["sec"].get("acknowledged") == 15,
                 what="sec's receipts")
        got = spooled_ids(sec)
        assert sorted(got) == sorted(to_sec)
        assert Counter(got).most_common(1)[0][1] == 1
        by_thread: dict[str, list[tuple[int, str]]] = {}
        for f in spooled(sec):
            seq, pid = f.stem.split("-", 1)
            by_thread.setdefault(f.parent.name, []).append((int(seq), pid))
        assert [pid for _, pid in sorted(by_thread["t-sec"])] == to_sec[:12]
        assert [pid for _, pid in sorted(by_thread["t-sec-ref"])] == to_sec[12:]
        for f in spooled(sec):
            if f.parent.name == "t-sec":
                i = to_sec.index(f.stem.split("-", 1)[1])
                assert json.loads(f.read_bytes())["entry"][1]["resource"]["note"][0]["text"] \
                    == f"s{i}"
        assert sorted(spooled_ids(core)) == sorted(to_core)  # nothing went twice to core
        assert outbox(chc) == []  # nothing waits, nothing dead
        counts = peer_counts(chc)
        assert {p: {k: v for k, v in c.items() if k not in ("peer", "oldest_waiting_s")}
                for p, c in counts.items()} == {"core": {"acknowledged": 25},
                                                "sec": {"acknowledged": 15}}
        # the receiver audited each packet once as received (a resend would be "duplicate")
        events = audit_ndjson(sec)
        received = Counter(packet_of(e) for e in events if action_of(e) == "received")
        assert received == Counter({pid: 1 for pid in to_sec})
        assert not [e for e in events if action_of(e) == "duplicate"]
    finally:
        a.stop_all()


def test_dead_packets_wait_for_it_then_retry_delivers_and_is_audited(tmp_path: Path) -> None:
    a = Alliance(tmp_path / "alliance", MEMBERS, RULES)
    with_delivery(a, "chc", "max_attempts = 2\nbackoff_base_s = 0.1\nbackoff_max_s = 0.2")
    a.start("chc")
    try:
        chc, sec = a.node("chc"), a.node("sec")
        dead = chc.send("sec", "result.lab", [bundle(1) for _ in range(3)], thread="t-dead")
        wait_for(lambda: len(outbox(chc, state="dead")) == 3, what="three dead packets")

        sec_url = sec.plan.directory["sec"].exchange_url
        r = cli(chc, "outbox", "list", "--state", "dead", "--json")
        assert r.returncode == 0, r.stderr
        rows = json.loads(r.stdout)
        assert [row["packet_id"] for row in rows] == dead
        for i, row in enumerate(rows, start=1):
            assert (row["state"], row["attempts"], row["recipient"], row["seq"]) == (
                "dead", 2, "sec", i)
            assert row["last_error"] == (
                f"HT-TRANSPORT: cannot connect to {sec_url}: Connection refused")
        dead_lettered = [e for e in audit_ndjson(chc) if action_of(e) == "dead-lettered"]
        assert [packet_of(e) for e in dead_lettered] == dead
        assert {e["outcome"] for e in dead_lettered} == {"8"}

        # sec comes back; a fresh packet goes through, the dead ones stay dead
        a.start("sec")
        fresh = chc.send("sec", "result.lab", [bundle(1)], thread="t-fresh")
        wait_for(lambda: spooled_ids(sec) == fresh, what="the fresh packet")
        wait_for(lambda: peer_counts(chc)["sec"].get("acknowledged") == 1, what="its receipt")
        assert [row["packet_id"] for row in outbox(chc, state="dead")] == dead

        # retry one by outbox id, then all the rest
        r = cli(chc, "outbox", "retry", str(rows[1]["id"]))
        assert (r.returncode, r.stdout.strip()) == (0, "re-queued 1 packet(s)"), r.stderr
        wait_for(lambda: dead[1] in spooled_ids(sec), what="the retried packet")
        assert [row["packet_id"] for row in outbox(chc, state="dead")] == [dead[0], dead[2]]
        r = cli(chc, "outbox", "retry")
        assert (r.returncode, r.stdout.strip()) == (0, "re-queued 2 packet(s)"), r.stderr
        wait_for(lambda: len(spooled(sec)) == 4, what="all retried packets")
        wait_for(lambda: peer_counts(chc)["sec"].get("acknowledged") == 4, what="all receipts")
        assert sorted(spooled_ids(sec)) == sorted(fresh + dead)
        r = cli(chc, "outbox", "retry")
        assert (r.returncode, r.stdout.strip()) == (0, "re-queued 0 packet(s)")

        acked = {row["packet_id"]: row for row in json.loads(
            cli(chc, "outbox", "list", "--state", "acknowledged", "--json").stdout)}
        for pid in dead:
            assert acked[pid]["attempts"] == 1  # counted afresh from the retry
            assert acked[pid]["last_error"] is None

        events = audit_ndjson(chc)
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
                "queued", "dead-lettered", "replayed", "sent"]
        r = cli(chc, "audit", "verify")
        assert r.returncode == 0, r.stderr
    finally:
        a.stop_all()
