"""Fault suite: real node processes on loopback, killed or hindered on purpose (bridge/faults.py).

Every case ends the same way: each packet the sending side accepted reaches the receiving HIS
(the spool folder) exactly once, in thread order, the receiver audited exactly one ``received``
and one ``delivered`` per packet, its results inbox stored each packet's resources once
(``results``), and every node's audit chain verifies.
"""

from __future__ import annotations

import glob
import http.client
import os
import shutil
import signal
import subprocess
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.factory import bundle
from tests.harness import Alliance, ApiError, NodeProcess, spooled, wait_for
from tests.harness import db_rows as rows

pytestmark = pytest.mark.slow

VIA_HUB = [
    {"id": "core", "zh": "复兴医院", "en": "Fuxing Hospital", "role": "core", "via": "hub"},
    {
        "id": "chc",
        "zh": "月坛社区卫生服务中心",
        "en": "Yuetan CHC",
        "role": "community",
        "via": "hub",
    },
    {"id": "hub", "zh": "医联体信息平台", "en": "Alliance platform", "role": "platform"},
]
DIRECT = [
    {"id": "core", "zh": "复兴医院", "en": "Fuxing Hospital", "role": "core"},
    {"id": "chc", "zh": "月坛社区卫生服务中心", "en": "Yuetan CHC", "role": "community"},
    {"id": "gw", "zh": "广外医院", "en": "Guangwai Hospital", "role": "secondary"},
]
RULES = [
    {"from": "chc", "to": "core", "kinds": ["result.lab"]},
    {"from": "chc", "to": "gw", "kinds": ["result.lab"]},
]


class Ledger:
    """What the sending side confirmed, per thread in queue order, and each packet's marker."""

    def __init__(self) -> None:
        self.ids: dict[str, list[str]] = defaultdict(list)
        self.marker: dict[str, str] = {}

    def send(
        self, node: NodeProcess, to: str, thread: str, markers: list[str], pad_to: int = 0
    ) -> bool:
        """Queue; False when the node died before answering (nothing confirmed)."""
        try:
            ids = node.send(
                to,
                "result.lab",
                [bundle(1, marker=m, pad_to=pad_to) for m in markers],
                thread=thread,
            )
        except (ApiError, OSError, http.client.HTTPException):  # e.g. died mid-answer
            return False
        self.ids[thread] += ids
        self.marker.update(zip(ids, markers, strict=True))
        return True

    def adopt(self, thread: str, ids: list[str], markers: list[str]) -> None:
        """Packets the node committed though its answer was lost (it died right after)."""
        self.ids[thread] += ids
        self.marker.update(zip(ids, markers, strict=True))

    @property
    def total(self) -> int:
        return sum(len(v) for v in self.ids.values())

    @property
    def threads(self) -> set[str]:
        return set(self.ids)


def in_threads(node: NodeProcess, sql: str, threads: set[str], **params: object) -> list[tuple]:
    """``sql`` selects ``thread, ...``: the rows of these threads, without the thread."""
    return [r[1:] for r in rows(node, sql, **params) if r[0] in threads]


def verify_chains(nodes: tuple[NodeProcess, ...]) -> None:
    """Every node's audit chain verifies, checked as ``hutong audit verify`` checks it (the
    same calls, in this process: a CLI process per node cost ~2 s of imports; the command
    itself is covered by test_audit_cli)."""
    from bridge.context import NodeContext
    from bridge.node import own_signing_keys

    for node in nodes:
        ctx = NodeContext.open(node.plan, create=False)
        try:
            me = ctx.plan.directory[ctx.node_id]
            with ctx.store.read() as conn:
                result = ctx.audit.verify(conn, [*me.signing_keys, *own_signing_keys(conn)])
        finally:
            ctx.store.dispose()
        assert result.ok, f"{node.node_id}: {result.reason}"
        assert result.checked > 0


def check_delivered_once(
    receiver: NodeProcess, ledger: Ledger, *nodes: NodeProcess, shared: bool = False
) -> None:
    """Counted at the receiving HIS: every confirmed packet once, in order, body intact.

    On an alliance ``shared`` by several cases, only the ledger's threads are counted (each
    case uses threads of its own); otherwise the receiver must hold nothing else at all."""
    threads = ledger.threads
    # The dispatcher hands a batch over (spool files), syncs, THEN commits the 'delivered'
    # marks with their audit rows; a full spool folder does not mean that commit is done yet.
    wait_for(
        lambda: (
            len(
                in_threads(
                    receiver, "SELECT thread, id FROM inbox WHERE state = 'delivered'", threads
                )
            )
            >= ledger.total
        ),
        timeout=60,
        every=0.1,
        what="the receiver to mark every packet delivered",
    )
    got: dict[str, list[tuple[int, str]]] = defaultdict(list)
    markers: Counter[str] = Counter()
    files = spooled(receiver)
    if not shared:
        assert {f.parent.name for f in files} <= threads
    for f in files:
        if f.parent.name not in threads:
            continue
        seq, pid = f.stem.split("-", 1)
        got[f.parent.name].append((int(seq), pid))
        markers[orjson.loads(f.read_bytes())["entry"][1]["resource"]["note"][0]["text"]] += 1
    assert sum(len(v) for v in got.values()) == ledger.total
    for thread, ids in ledger.ids.items():
        assert [pid for _, pid in sorted(got[thread])] == ids
    assert markers == Counter(ledger.marker.values())  # no marker twice, none missing
    assert set(markers.values()) == {1}
    # "results": the results inbox stored each packet's resources once (result_packet), also
    # when the node died after that commit and delivered the packet again
    for action in ("received", "delivered", "results"):
        found = rows(receiver, "SELECT thread, packet_id FROM audit WHERE action = :a", a=action)
        if not shared:
            assert {t for t, _ in found} <= threads, action
        counted = Counter(p for t, p in found if t in threads)
        assert counted == Counter(set(ledger.marker)), action
    verify_chains(nodes)


def start_with(node: NodeProcess, monkeypatch: pytest.MonkeyPatch, **env: str) -> None:
    with monkeypatch.context() as m:
        for k, v in env.items():
            m.setenv(k, v)
        node.start()  # the child copies the environment now


def dead(node: NodeProcess) -> bool:
    return node.proc is not None and node.proc.poll() is not None


def stop_together(alliance: Alliance) -> None:
    """SIGTERM every node at once, then wait for each (shutdowns overlap)."""
    running = [n.proc for n in alliance.nodes.values() if n.proc and n.proc.poll() is None]
    for proc in running:
        proc.send_signal(signal.SIGTERM)
    for proc in running:
        proc.wait(timeout=30)


def quick_retries(alliance: Alliance) -> None:
    """Backoff capped at 1 s (default 0.5 s doubling up to 300 s): a peer back from a restart
    is tried again within a second. Not for tests about backoff itself."""
    for path in alliance.files.values():
        with open(path, "a", encoding="utf-8") as fh:
            fh.write("\n[delivery]\nbackoff_base_s = 0.2\nbackoff_max_s = 1.0\n")


def nothing_waiting(*nodes: NodeProcess) -> bool:
    """No outbox row (packets, relays, forwarded receipts) queued, sent, dead or refused."""
    return not any(n.api("GET", "/local/v1/outbox?limit=1") for n in nodes)


class SharedAlliance:
    """One via-hub alliance for all SIGKILL cases: each case re-arms only its victim (restart
    with the fault) and uses threads of its own. A case that did not finish cleanly leaves it
    to be replaced, so a failure cannot leak into the next case."""

    def __init__(self, folder: pytest.TempPathFactory) -> None:
        self.folder = folder
        self.alliance: Alliance | None = None
        self.clean = False

    def take(self) -> Alliance:
        if self.alliance is None or not self.clean:
            if self.alliance is not None:
                stop_together(self.alliance)
            self.alliance = Alliance(self.folder.mktemp("alliance"), VIA_HUB, RULES[:1])
            quick_retries(self.alliance)
            self.alliance.start("hub", "core", "chc")
        self.clean = False
        return self.alliance


@pytest.fixture(scope="module")
def via_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedAlliance]:
    shared = SharedAlliance(tmp_path_factory)
    yield shared
    if shared.alliance is not None:
        stop_together(shared.alliance)


STAGES = [
    ("chc", "queue.before_commit"),
    ("chc", "sender.after_commit_before_send"),
    ("chc", "sender.after_send_before_receipt"),
    ("hub", "intake.before_commit"),
    ("hub", "intake.after_commit"),
    ("hub", "sender.after_commit_before_send"),
    ("hub", "sender.after_send_before_receipt"),
    ("core", "intake.before_commit"),
    ("core", "intake.after_commit"),
    ("core", "dispatcher.after_batch_applied"),
    ("core", "dispatcher.during_delivery"),
]


@pytest.mark.parametrize(("victim", "point"), STAGES, ids=[f"{v}-{p}" for v, p in STAGES])
def test_sigkill_at_every_stage(
    via_hub: SharedAlliance, monkeypatch: pytest.MonkeyPatch, victim: str, point: str
) -> None:
    """Sender, platform and receiver, each killed at each stage of a packet's way."""
    alliance = via_hub.take()
    chc, core = alliance.node("chc"), alliance.node("core")
    nodes = tuple(alliance.nodes.values())
    wait_for(lambda: nothing_waiting(*nodes), what="a quiet alliance")
    killed = alliance.node(victim)
    killed.kill(signal.SIGKILL)  # re-armed: it dies the first time it passes `point`
    start_with(killed, monkeypatch, HUTONG_FAULT=point)
    killed.wait_ready()
    t1, t2 = f"{victim}-{point}-t1", f"{victim}-{point}-t2"
    ledger = Ledger()
    first = [f"{point}-a{i}" for i in range(12)]
    answered = ledger.send(chc, "core", t1, first)
    wait_for(lambda: dead(killed), timeout=60, what=f"{victim} to die at {point}")
    killed.start()
    killed.wait_ready()
    if not answered:  # chc died before its answer went out: what did it commit?
        committed = [
            p
            for (p,) in rows(
                chc,
                "SELECT packet_id FROM outbox WHERE thread = :t AND origin = 'local' ORDER BY id",
                t=t1,
            )
        ]
        if point == "queue.before_commit":
            assert committed == []  # died before the commit: nothing was accepted
            assert ledger.send(chc, "core", t1, first)  # the client retries it
        else:  # died after the commit (the sender woke before the answer was written)
            assert len(committed) == len(first)  # all of the request, in its order
            ledger.adopt(t1, committed, first)
    assert ledger.send(chc, "core", t1, [f"{point}-b{i}" for i in range(8)])
    assert ledger.send(chc, "core", t2, [f"{point}-c{i}" for i in range(5)])

    def acknowledged() -> int:
        return len(
            in_threads(
                chc,
                "SELECT thread, id FROM outbox WHERE origin = 'local' AND state = 'acknowledged'",
                ledger.threads,
            )
        )

    wait_for(
        lambda: acknowledged() == ledger.total,
        timeout=60,
        every=0.1,
        what="end-to-end receipts at the sender",
    )
    check_delivered_once(core, ledger, *nodes, shared=True)
    wait_for(lambda: nothing_waiting(*nodes), what="every outbox to drain")
    via_hub.clean = True


@pytest.fixture
def direct(tmp_path: Path) -> Iterator[Alliance]:
    a = Alliance(tmp_path / "alliance", DIRECT, RULES)
    yield a
    stop_together(a)


def test_slow_peer_delays_only_itself(direct: Alliance, monkeypatch: pytest.MonkeyPatch) -> None:
    chc, core, gw = direct.node("chc"), direct.node("core"), direct.node("gw")
    start_with(core, monkeypatch, HUTONG_FAULT_DELAY="intake.before_commit:0.5")
    direct.start("chc", "gw")
    core.wait_ready()
    slow, fast = Ledger(), Ledger()
    for k in range(3):
        assert slow.send(chc, "core", "slow", [f"slow-{k}-{i}" for i in range(6)])
        assert fast.send(chc, "gw", "fast", [f"fast-{k}-{i}" for i in range(6)])
    wait_for(lambda: len(spooled(gw)) >= 18, timeout=60, what="the fast peer's deliveries")
    wait_for(lambda: len(spooled(core)) >= 18, timeout=120, what="the slow peer's deliveries")
    check_delivered_once(gw, fast, gw)
    check_delivered_once(core, slow, chc, core)


def test_full_disk_on_the_receiver(direct: Alliance, monkeypatch: pytest.MonkeyPatch) -> None:
    """The receiver's database cannot grow: it answers 503, nothing is acknowledged or lost;
    once there is room again (restart without the limit) everything arrives once."""
    quick_retries(direct)  # the refused packets go again within a second of the restart
    chc, core = direct.node("chc"), direct.node("core")
    start_with(core, monkeypatch, HUTONG_FAULT_DB_GROW_PAGES="12")
    direct.start("chc")
    core.wait_ready()
    ledger = Ledger()
    for k in range(4):
        assert ledger.send(chc, "core", "full", [f"full-{k}-{i}" for i in range(10)], pad_to=4096)

    def refused_for_room() -> bool:
        waiting = chc.api("GET", "/local/v1/outbox?state=queued")
        return any(
            "HTTP 503" in (r["last_error"] or "") and "HT-STORE" in r["last_error"] for r in waiting
        )

    wait_for(refused_for_room, timeout=60, what="the receiver refusing for lack of room")
    assert len(spooled(core)) < ledger.total
    core.kill(signal.SIGKILL)
    core.start()
    core.wait_ready()
    wait_for(lambda: len(spooled(core)) >= ledger.total, timeout=120, what="all deliveries")
    check_delivered_once(core, ledger, chc, core)


def test_clock_skew_beyond_the_window(direct: Alliance, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sender 15 minutes fast is refused with HT-PKT-CLOCK and keeps its packets queued;
    after its clock is fixed and IT retries, each arrives once."""
    chc, core = direct.node("chc"), direct.node("core")
    start_with(chc, monkeypatch, HUTONG_CLOCK_OFFSET_S="900")
    direct.start("core")
    chc.wait_ready()
    ledger = Ledger()
    assert ledger.send(chc, "core", "skew", [f"skew-{i}" for i in range(5)])

    def refused_for_clock() -> list[dict]:
        waiting = chc.api("GET", "/local/v1/outbox?state=queued")
        return [r for r in waiting if "HT-PKT-CLOCK" in (r["last_error"] or "")]

    wait_for(lambda: len(refused_for_clock()) == 5, timeout=60, what="clock refusals")
    held = core.api("GET", "/local/v1/quarantine")
    assert {h["code"] for h in held} == {"HT-PKT-CLOCK"} and spooled(core) == []
    chc.kill(signal.SIGTERM)
    chc.start()  # clock fixed
    chc.wait_ready()
    r = chc.cli("outbox", "retry", "--waiting")
    assert r.returncode == 0 and "re-queued 5" in r.stdout, r.stderr
    wait_for(lambda: len(spooled(core)) >= 5, timeout=60, what="deliveries after the fix")
    check_delivered_once(core, ledger, chc, core)


def test_peer_down_for_an_hour_of_simulated_time(
    direct: Alliance, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both clocks read one offset file; the receiver stays down while an hour passes."""
    chc, core = direct.node("chc"), direct.node("core")
    clock = tmp_path / "clock-offset"
    clock.write_text("0")
    start_with(chc, monkeypatch, HUTONG_CLOCK_FILE=str(clock))
    chc.wait_ready()
    ledger = Ledger()
    assert ledger.send(chc, "core", "outage", [f"outage-{i}" for i in range(10)])

    def attempts() -> int:
        return min(r["attempts"] for r in chc.api("GET", "/local/v1/outbox?state=queued"))

    wait_for(lambda: attempts() >= 1, what="a first failed try")
    for minute in range(5, 61, 5):  # twelve 5-minute steps; backoff tops out at 300 s
        before = attempts()
        clock.write_text(str(minute * 60))
        wait_for(lambda b=before: attempts() > b, timeout=30, what=f"a retry at +{minute} min")
    waiting = chc.api("GET", "/local/v1/outbox?state=queued")
    assert len(waiting) == 10 and all("cannot connect" in r["last_error"] for r in waiting)
    assert all(r["age_s"] >= 3600 for r in waiting)  # an hour old by the node's clock, not dead
    start_with(core, monkeypatch, HUTONG_CLOCK_FILE=str(clock))
    core.wait_ready()
    clock.write_text(str(3600 + 300))  # the next try is due within the longest backoff
    assert ledger.send(chc, "core", "outage", [f"after-{i}" for i in range(3)])
    wait_for(lambda: len(spooled(core)) >= 13, timeout=60, what="deliveries after the outage")
    check_delivered_once(core, ledger, chc, core)


# -- PostgreSQL -----------------------------------------------------------------------------


def restart_postgres(dsn: str, dbnames: list[str]) -> str:
    """Restart the server behind ``dsn`` when we can reach its data directory (the suite's own
    throwaway cluster); otherwise end every session of the nodes' databases. Returns which."""
    import psycopg

    url = dsn.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(url, autocommit=True) as conn:
        data = conn.execute("SHOW data_directory").fetchone()[0]
    bindirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    pg_ctl = shutil.which("pg_ctl") or next(
        (os.path.join(b, "pg_ctl") for b in bindirs if os.path.exists(os.path.join(b, "pg_ctl"))),
        None,
    )
    if pg_ctl and os.path.isdir(data):
        log = os.path.join(os.path.dirname(data), "restart.log")  # the server's own output
        cmd = [pg_ctl, "-D", data, "-l", log, "-m", "fast", "-w", "-t", "60", "restart"]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(
            cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=90
        )
        return "restarted"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = ANY(%s) AND pid <> pg_backend_pid()",
            (dbnames,),
        )
    return "sessions ended"


@pytest.mark.postgres
def test_restarted_database(tmp_path: Path, pg_node_dbs) -> None:
    a = Alliance(tmp_path / "alliance", DIRECT[:2], RULES[:1], dsn_for=pg_node_dbs)
    a.start("core", "chc")
    try:
        chc, core = a.node("chc"), a.node("core")
        ledger = Ledger()
        assert ledger.send(chc, "core", "pg", [f"pg-a{i}" for i in range(30)])
        wait_for(lambda: len(spooled(core)) >= 5, timeout=60, what="some deliveries")
        names = [n.plan.storage_dsn.rsplit("/", 1)[1] for n in (chc, core)]
        restart_postgres(chc.plan.storage_dsn, names)
        attempt = iter(range(1000))
        # the local API answers again once its pool has reconnected; an attempt that fails
        # confirmed nothing, so the next one simply uses new markers
        wait_for(
            lambda: ledger.send(chc, "core", "pg", [f"pg-b{next(attempt)}-{i}" for i in range(10)]),
            timeout=60,
            what="chc accepting packets again",
        )
        wait_for(
            lambda: len(spooled(core)) >= ledger.total,
            timeout=120,
            what="all deliveries after the restart",
        )
        assert not dead(chc) and not dead(core)  # the nodes rode it out, no restart of theirs
        check_delivered_once(core, ledger, chc, core)
    finally:
        a.stop_all()
