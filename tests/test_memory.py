"""What bounds a node's memory: a sender's batch holds at most MAX_BATCH_BYTES of bodies, the
heap trim hands freed memory back, and no argon2 run at start-up (bench/README.md, "Peak RSS",
has the figures)."""

from __future__ import annotations

import threading
from pathlib import Path

import orjson
import pytest

from bridge.config.loader import load_node
from bridge.context import NodeContext
from bridge.delivery.queue import Outgoing, queue_packets
from bridge.delivery.sender import MAX_BATCH_BYTES, PeerSender
from bridge.memory import trim_heap
from tests.factory import bundle
from tests.harness import Alliance

MEMBERS = [
    {"id": "core", "zh": "复兴医院", "en": "Fuxing Hospital", "role": "core"},
    {"id": "chc", "zh": "月坛社区卫生服务中心", "en": "Yuetan CHC", "role": "community"},
]
RULES = [{"from": "chc", "to": "core", "kinds": ["result.lab"]}]


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_batch_of_64_kib_packets_holds_at_most_max_batch_bytes(tmp_path: Path) -> None:
    """150 queued 64 KiB packets: one claim takes the oldest that fit in MAX_BATCH_BYTES, in
    queue order, and no more, reading only one body more than it takes; with 3 partitions
    each holds at most as much."""
    a = Alliance(tmp_path / "alliance", MEMBERS, RULES)
    ctx = NodeContext.open(load_node(a.files["chc"]))
    try:
        body = orjson.dumps(bundle(80, pad_to=65536))
        assert 64_000 < len(body) < 70_000
        items = [Outgoing("core", "result.lab", body, f"t-{i % 50}") for i in range(150)]
        with ctx.store.write() as conn:
            ids = [r.packet_id for r in queue_packets(ctx, conn, items)]
        assert MAX_BATCH_BYTES == 4 << 20
        fits = MAX_BATCH_BYTES // len(body)
        sender = PeerSender(ctx, "core")
        try:
            rows = sender.claim(ctx.now())
            assert [r.packet_id for r in rows] == ids[:fits]
            assert sum(len(r.body) for r in rows) <= MAX_BATCH_BYTES
            # the head read holds no more bodies than the batch takes, plus the one that is over
            assert len(sender._head(ctx.plan.delivery.batch_size)) == fits + 1
            sender.concurrency = 3
            parts = sender.claim_partitions(ctx.now())
            assert len(parts) == 3
            for _, part in parts:
                assert 0 < sum(len(r.body) for r in part) <= MAX_BATCH_BYTES
            # threads fall unevenly into partitions: the fullest is cut at the cap
            assert max(len(part) for _, part in parts) == fits
        finally:
            sender.close()
    finally:
        ctx.store.dispose()


def test_trim_hands_a_threads_freed_bodies_back_to_the_system() -> None:
    """80 MiB of 64 KiB bodies made on another thread (its own glibc arena), each followed by a
    small block that stays (so the freed bodies are holes the heap cannot shrink away): after
    they are dropped they stay resident until the trim, and at least 40 MiB go with it."""
    pins: list[bytes] = []

    def work() -> None:
        bodies = []
        for i in range(1280):
            bodies.append(bytes([i % 251]) * 65536)
            pins.append(bytes(1024))  # from malloc too (over pymalloc's 512 bytes)
        del bodies

    t = threading.Thread(target=work)
    t.start()
    t.join()
    before = _rss_kib()
    assert trim_heap() is True
    after = _rss_kib()
    assert before - after >= 40 * 1024, (before, after)


def test_accounts_run_argon2_at_the_first_unknown_name_not_at_start(tmp_path: Path) -> None:
    """One argon2 run touches 64 MiB (the library's memory cost): made when the web pages start,
    the dummy hash set every node's peak RSS. It is made at the first login with an unknown
    name, with the hasher's own parameters (so that path costs what a known name's does)."""

    from bridge.accounts.service import Accounts
    from bridge.errors import Unauthorized

    a = Alliance(tmp_path / "alliance", MEMBERS, RULES)
    ctx = NodeContext.open(load_node(a.files["chc"]))
    try:
        accounts = Accounts(ctx)
        assert accounts._dummy is None
        with pytest.raises(Unauthorized):
            accounts.login("nobody.here", "some password 1")
        dummy = accounts._dummy
        assert dummy is not None and dummy.startswith("$argon2id$")
        assert accounts.hasher.memory_cost == 65536  # KiB: what the start-up used to spend
        assert not accounts.hasher.check_needs_rehash(dummy)  # the hasher's parameters
        assert accounts.dummy_hash() is dummy  # made once
    finally:
        ctx.store.dispose()
