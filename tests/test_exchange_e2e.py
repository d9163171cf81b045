"""Two and three real node processes on loopback: exactly-once, order, audit, platform relay."""

from __future__ import annotations

import signal
from collections import defaultdict
from pathlib import Path

import orjson
import pytest

from tests.factory import bundle
from tests.harness import Alliance, spooled, wait_for

pytestmark = pytest.mark.slow

MEMBERS = [
    {"id": "core", "zh": "复兴医院", "en": "Fuxing Hospital", "role": "core"},
    {"id": "chc", "zh": "月坛社区卫生服务中心", "en": "Yuetan CHC", "role": "community"},
]
RULES = [
    {"from": "chc", "to": "core", "kinds": ["result.imaging", "result.lab"]},
    {"from": "core", "to": "chc", "kinds": ["referral.return"]},
]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def pair(request: pytest.FixtureRequest, tmp_path: Path):
    """Two nodes on SQLite files, or each on its own real PostgreSQL database."""
    dsn_for = request.getfixturevalue("pg_node_dbs") if request.param == "postgres" else None
    a = Alliance(tmp_path / "alliance", MEMBERS, RULES, dsn_for=dsn_for)
    a.start("core", "chc")
    yield a
    a.stop_all()


def delivered_by_thread(node) -> dict[str, list[tuple[int, str]]]:
    out: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for f in spooled(node):
        seq, pid = f.stem.split("-", 1)
        out[f.parent.name].append((int(seq), pid))
    return out


def test_thousand_packets_exactly_once_in_order(pair: Alliance) -> None:
    chc, core = pair.node("chc"), pair.node("core")
    sent: dict[str, list[str]] = defaultdict(list)
    markers: dict[str, str] = {}
    for batch in range(5):
        bundles, threads = [], []
        for i in range(200):
            n = batch * 200 + i
            thread = f"ref-{n % 10}"
            marker = f"packet-{n}"
            bundles.append(bundle(1, marker=marker))
            threads.append(thread)
        for thread in sorted(set(threads)):
            mine = [b for b, t in zip(bundles, threads, strict=True) if t == thread]
            ids = chc.send("core", "result.imaging", mine, thread=thread)
            sent[thread].extend(ids)
            for pid, b in zip(ids, mine, strict=True):
                markers[pid] = b["entry"][1]["resource"]["note"][0]["text"]
    wait_for(lambda: len(spooled(core)) >= 1000, timeout=120, what="1000 deliveries")
    files = spooled(core)
    assert len(files) == 1000
    got = delivered_by_thread(core)
    assert set(got) == set(sent)
    for thread, ids in sent.items():
        seqs = sorted(got[thread])
        assert [pid for _, pid in seqs] == ids  # same packets, in the order they were queued
        assert [s for s, _ in seqs] == list(range(1, len(ids) + 1))
    # field by field: the body that arrived is the body that was queued
    for f in files[:50]:
        pid = f.stem.split("-", 1)[1]
        body = orjson.loads(f.read_bytes())
        assert body["entry"][1]["resource"]["note"][0]["text"] == markers[pid]
    wait_for(
        lambda: chc.api("GET", "/local/v1/queues")["outbox"][0].get("acknowledged") == 1000,
        what="all acknowledged at the sender",
    )
    for node in (chc, core):
        r = node.cli("audit", "verify")
        assert r.returncode == 0, r.stderr
        assert "verifies" in r.stdout


def test_sigkill_receiver_and_sender_mid_stream(pair: Alliance) -> None:
    chc, core = pair.node("chc"), pair.node("core")
    ids: list[str] = []
    for k in range(3):
        ids += chc.send(
            "core",
            "result.lab",
            [bundle(1, marker=f"k{k}-{i}") for i in range(150)],
            thread="t-kill",
        )
    wait_for(lambda: len(spooled(core)) >= 20, what="some deliveries")
    core.kill(signal.SIGKILL)
    ids += chc.send("core", "result.lab", [bundle(1) for _ in range(150)], thread="t-kill")
    chc.kill(signal.SIGKILL)
    core.start()
    core.wait_ready()
    chc.start()
    chc.wait_ready()
    ids += chc.send("core", "result.lab", [bundle(1) for _ in range(50)], thread="t-kill")
    wait_for(lambda: len(spooled(core)) >= len(ids), timeout=120, what="all deliveries")
    got = delivered_by_thread(core)["t-kill"]
    assert len(got) == len(ids) == 650
    assert [pid for _, pid in sorted(got)] == ids
    for node in (chc, core):
        assert node.cli("audit", "verify").returncode == 0


def test_platform_relays_sealed_packets_it_cannot_read(tmp_path: Path) -> None:
    members = [
        {"id": "core", "zh": "复兴医院", "en": "Fuxing", "role": "core", "via": "hub"},
        {"id": "chc", "zh": "月坛", "en": "Yuetan", "role": "community", "via": "hub"},
        {"id": "hub", "zh": "医联体信息平台", "en": "Alliance platform", "role": "platform"},
    ]
    a = Alliance(tmp_path / "alliance", members, RULES)
    a.start("hub", "core", "chc")
    try:
        chc, core, hub = a.node("chc"), a.node("core"), a.node("hub")
        secret = "王秀英-plaintext-marker-7731"
        ids = chc.send(
            "core",
            "result.imaging",
            [bundle(2, marker=secret) for _ in range(20)],
            thread="via-hub",
        )
        wait_for(lambda: len(spooled(core)) == 20, what="relayed deliveries")
        assert [pid for _, pid in sorted(delivered_by_thread(core)["via-hub"])] == ids
        # end-to-end receipts came back through the platform
        wait_for(
            lambda: chc.api("GET", "/local/v1/queues")["outbox"][0].get("acknowledged") == 20,
            what="end-to-end receipts at the sender",
        )
        # the platform's store holds no readable body
        hub.stop()
        db = Path(hub.plan.storage_dsn.split("///", 1)[1])
        raw = db.read_bytes() + (
            db.with_name(db.name + "-wal").read_bytes()
            if db.with_name(db.name + "-wal").exists()
            else b""
        )
        assert secret.encode() not in raw
        assert "王秀英".encode() not in raw
        # and a direct packet, bypassing the platform, is refused by the member
        r = hub.cli("audit", "verify")
        assert r.returncode == 0, r.stderr
    finally:
        a.stop_all()
