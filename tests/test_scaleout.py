"""Scale-out on PostgreSQL: several processes of one node share its store (``hutong worker``).

Counted at the receiving side: every packet received once (no ``duplicate`` in the receiver's
audit, so nothing was sent twice), delivered once, in thread order; the sender's lanes really
were split between processes (seen in ``pg_locks``); a SIGKILLed worker's lanes are taken over.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from bridge.delivery.lanes import LANES, Lanes, job_class
from bridge.delivery.wakeups import Wakeups
from tests.factory import bundle
from tests.harness import ROOT, Alliance, NodeProcess, spooled, wait_for
from tests.harness import db_rows as _scalar

MEMBERS = [
    {"id": "core", "zh": "复兴医院", "en": "Fuxing Hospital", "role": "core"},
    {"id": "chc", "zh": "月坛社区卫生服务中心", "en": "Yuetan CHC", "role": "community"},
]
RULES = [{"from": "chc", "to": "core", "kinds": ["result.lab"]}]


class Worker:
    """One ``hutong worker`` process of a node."""

    def __init__(self, node: NodeProcess, n: int) -> None:
        self.log = node.log.with_name(f"{node.node_id}-worker{n}.log")
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bridge.cli", "worker", "--config", str(node.config)],
                stdout=fh,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)


@pytest.fixture
def pg_pair(tmp_path: Path, pg_node_dbs) -> Iterator[Alliance]:
    a = Alliance(tmp_path / "alliance", MEMBERS, RULES, dsn_for=pg_node_dbs)
    a.start("core", "chc")
    yield a
    a.stop_all()


def lane_holders(node: NodeProcess, job: str) -> dict[int, int]:
    """{backend pid: lanes held} for one job of a node, from PostgreSQL's lock table."""
    rows = _scalar(
        node,
        "SELECT pid, count(*) FROM pg_locks WHERE locktype = 'advisory' "
        "AND granted AND objsubid = 2 AND classid = CAST(:c AS bigint)::oid "
        "AND objid::bigint < :lanes AND database = (SELECT oid FROM pg_database "
        "WHERE datname = current_database()) GROUP BY pid",
        c=job_class(job),
        lanes=LANES,
    )
    return {int(pid): int(n) for pid, n in rows}


def audit_actions(node: NodeProcess, action: str) -> Counter[str]:
    return Counter(
        pid for (pid,) in _scalar(node, "SELECT packet_id FROM audit WHERE action = :a", a=action)
    )


def queue(chc: NodeProcess, n: int, threads: int, tag: str) -> dict[str, list[str]]:
    sent: dict[str, list[str]] = defaultdict(list)
    for t in range(threads):
        thread = f"{tag}-{t}"
        sent[thread] += chc.send(
            "core",
            "result.lab",
            [bundle(1, marker=f"{tag}-{t}-{i}") for i in range(n // threads)],
            thread=thread,
        )
    return sent


def check_exactly_once_in_order(core: NodeProcess, sent: dict[str, list[str]]) -> None:
    got: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for f in spooled(core):
        seq, pid = f.stem.split("-", 1)
        got[f.parent.name].append((int(seq), pid))
    total = sum(len(v) for v in sent.values())
    assert sum(len(v) for v in got.values()) == total
    for thread, ids in sent.items():
        assert [pid for _, pid in sorted(got[thread])] == ids  # each once, in queue order
    received = audit_actions(core, "received")
    assert len(received) == total and set(received.values()) == {1}
    # a spool file is written before its 'delivered' audit row commits: wait for the rows
    wait_for(
        lambda: len(audit_actions(core, "delivered")) >= total,
        timeout=60,
        what="every delivery audited",
    )
    delivered = audit_actions(core, "delivered")
    assert len(delivered) == total and set(delivered.values()) == {1}


@pytest.mark.slow  # runs the CLI as a child process
def test_worker_is_refused_on_sqlite(tmp_path: Path) -> None:
    a = Alliance(tmp_path / "alliance", MEMBERS, RULES)
    r = subprocess.run(
        [sys.executable, "-m", "bridge.cli", "worker", "--config", str(a.files["chc"])],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert r.returncode == 2
    assert "hutong worker needs a PostgreSQL store: chc uses SQLite" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow
@pytest.mark.postgres
def test_four_processes_share_one_store_without_double_send(pg_pair: Alliance) -> None:
    chc, core = pg_pair.node("chc"), pg_pair.node("core")
    workers = [Worker(chc, n) for n in range(3)] + [Worker(core, 9)]
    try:
        # the sender's four processes split its 64 lanes; the receiver's two split delivery
        wait_for(
            lambda: sorted(lane_holders(chc, "send:core").values()) == [LANES // 4] * 4,
            timeout=60,
            what="four processes holding a quarter of the send lanes each",
        )
        wait_for(
            lambda: sorted(lane_holders(core, "deliver").values()) == [LANES // 2] * 2,
            timeout=60,
            what="two processes holding half the deliver lanes each",
        )
        sent = queue(chc, 240, 24, "w4")
        wait_for(lambda: len(spooled(core)) >= 240, timeout=120, what="240 deliveries")
        check_exactly_once_in_order(core, sent)
        assert not audit_actions(core, "duplicate")  # nothing was sent twice
        # every process took part: each sender worker's lanes carried some of the threads
        assert all(w.proc.poll() is None for w in workers)
        for node in (chc, core):
            r = node.cli("audit", "verify")
            assert r.returncode == 0, r.stderr
    finally:
        for w in workers:
            w.kill(signal.SIGTERM)


@pytest.mark.slow
@pytest.mark.postgres
def test_sigkill_of_a_worker_mid_run_loses_and_repeats_nothing(pg_pair: Alliance) -> None:
    chc, core = pg_pair.node("chc"), pg_pair.node("core")
    workers = [Worker(chc, n) for n in range(3)]
    try:
        wait_for(
            lambda: len(lane_holders(chc, "send:core")) == 4,
            timeout=60,
            what="four processes holding send lanes",
        )
        sent = queue(chc, 300, 20, "kill")
        wait_for(lambda: len(spooled(core)) >= 40, timeout=60, what="some deliveries")
        workers[1].kill(signal.SIGKILL)
        # its lanes are free at once (the session died) and the others take them up
        wait_for(
            lambda: (
                sum(lane_holders(chc, "send:core").values()) == LANES
                and len(lane_holders(chc, "send:core")) == 3
            ),
            timeout=60,
            what="the dead worker's lanes taken over",
        )
        more = queue(chc, 60, 20, "kill")  # same threads: seq continues after the kill
        for thread, ids in more.items():
            sent[thread] += ids
        wait_for(lambda: len(spooled(core)) >= 360, timeout=120, what="360 deliveries")
        check_exactly_once_in_order(core, sent)
        # a batch the dead worker had sent but not recorded may be re-sent: the receiver
        # answers it with the original receipt ("duplicate"), and delivers it only once (above)
        wait_for(
            lambda: chc.api("GET", "/local/v1/queues")["outbox"][0].get("acknowledged") == 360,
            what="all acknowledged at the sender",
        )
        assert chc.cli("audit", "verify").returncode == 0
    finally:
        for w in workers:
            w.kill(signal.SIGTERM)


@pytest.mark.postgres
def test_many_jobs_rebalance_on_one_read_of_the_lock_table(pg_db: str) -> None:
    """A platform has a send job per member: their rounds read who holds which lane once per
    ``refresh_s`` for all jobs, and a round that changes nothing sends no statement. Two
    processes (two ``Lanes``, two connections) split every job's lanes, none held twice."""
    jobs = [f"send:m-{i}" for i in range(50)] + ["receipts"]
    first = Lanes(pg_db, refresh_s=3600)
    second = Lanes(pg_db, refresh_s=3600)
    try:
        assert all(first.hold(job) is None for job in jobs)  # alone: every lane, no filter
        sent = first.statements
        # per job a registration, a read of its busy lanes, the lanes; one read of who works
        assert sent == len(jobs) * 3 + 1
        assert all(first.hold(job) is None for job in jobs)
        assert first.statements == sent  # nothing changed: no round trip at all
        assert all(second.hold(job) == frozenset() for job in jobs)  # all lanes are taken
        first._read_at = second._read_at = None  # as if refresh_s had passed
        halves = [first.hold(job) for job in jobs]
        assert first.statements == sent + 1 + len(jobs)  # one read; each job gives up half
        first_lanes = {job: lanes for job, lanes in zip(jobs, halves, strict=True)}
        second._read_at = None
        for job in jobs:
            mine, theirs = first_lanes[job], second.hold(job)
            assert mine is not None and theirs is not None
            assert len(mine) == len(theirs) == LANES // 2
            assert not mine & theirs
        with psycopg.connect(first.url, autocommit=True) as conn:
            holders = conn.execute(
                "SELECT classid::bigint, objid::bigint, count(*) FROM pg_locks "
                "WHERE locktype = 'advisory' AND objsubid = 2 AND granted AND objid::bigint < %s "
                "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
                "GROUP BY 1, 2",
                (LANES,),
            ).fetchall()
        assert len(holders) == len(jobs) * LANES  # every lane of every job held ...
        assert {n for _, _, n in holders} == {1}  # ... by one process, once
    finally:
        first.close()
        second.close()


def test_a_wake_up_reaches_the_other_processes_not_the_sender(pg_db: str) -> None:
    """``Wakeups`` (LISTEN/NOTIFY): what one process notifies wakes those jobs in the others,
    once each, after the notifying statement; the notifying process does not wake itself
    again (it woke its own jobs already). ``Lanes.alone`` says when a notification is needed:
    only once another process has registered for a job."""
    woke: dict[str, list[str]] = {"a": [], "b": []}
    a = Wakeups(pg_db, on_wake=woke["a"].append)
    b = Wakeups(pg_db, on_wake=woke["b"].append)
    first, second = Lanes(pg_db, refresh_s=3600), Lanes(pg_db, refresh_s=3600)
    try:
        a.start()
        b.start()
        assert a.wait_listening(10) and b.wait_listening(10)
        a.notify(["send:recv-a", "receipts", "send:recv-a"])
        assert a.flush()
        wait_for(lambda: len(woke["b"]) == 2, 10, what="b woken for both jobs")
        assert sorted(woke["b"]) == ["receipts", "send:recv-a"]
        b.notify(["deliver"])
        assert b.flush()
        wait_for(lambda: woke["a"] == ["deliver"], 10, what="a woken by b")
        assert sorted(woke["b"]) == ["receipts", "send:recv-a"]  # b did not wake itself
        assert (a.sent, a.received, b.sent, b.received) == (2, 1, 1, 2)
        first.hold("deliver")
        assert first.alone()
        second.hold("deliver")
        first._read_at = None  # as if refresh_s had passed
        first.hold("deliver")
        assert not first.alone()
    finally:
        a.close()
        b.close()
        first.close()
        second.close()
