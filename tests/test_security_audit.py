"""Issue 13, items 5-6: tamper evidence that survives truncation, and start-up refusals.

Two real nodes exchange packets (chc -> core, checkpoints every 3 audit rows) and stop; every
test then works on its own copy of core's whole data folder, run by a real ``hutong`` process:

* the last rows and their checkpoints deleted with sqlite3 -> ``audit verify`` names the gap
  (the local anchor file), and ``hutong run`` refuses in one line (HT-AUDIT-ANCHOR);
* ``node.db`` deleted -> the node refuses to start, ``audit verify`` reports it; the audited IT
  override (``audit accept-restore``) lets it start again, with an anchor-reset record;
* a truncation with the local anchor file also removed -> caught by the anchor chc holds for
  core (from core's receipts), exported with ``audit anchor-export``;
* a page overwritten in the middle of node.db -> refuses to start naming the file;
* a second ``hutong run`` on the same data folder -> refuses naming the first one's pid.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.factory import bundle
from tests.harness import ROOT, Alliance, NodeProcess, wait_for

pytestmark = pytest.mark.slow

MEMBERS = [
    {"id": "core", "zh": "复兴医院", "en": "Fuxing Hospital", "role": "core"},
    {"id": "chc", "zh": "月坛社区卫生服务中心", "en": "Yuetan CHC", "role": "community"},
]
RULES = [{"from": "chc", "to": "core", "kinds": ["result.lab"]}]
EVERY = 3  # a signed checkpoint every 3 audit rows, so receipts carry fresh anchors


@pytest.fixture(scope="module")
def exchanged(tmp_path_factory: pytest.TempPathFactory) -> Alliance:
    a = Alliance(tmp_path_factory.mktemp("secaudit") / "alliance", MEMBERS, RULES)
    for node_file in a.files.values():
        with open(node_file, "a", encoding="utf-8") as fh:
            fh.write(f"\n[audit]\ncheckpoint_every = {EVERY}\n")
    a.start("core", "chc")
    try:
        chc, core = a.node("chc"), a.node("core")
        for round_, n in enumerate((3, 4)):
            chc.send("core", "result.lab", [bundle(i + 1) for i in range(n)], thread=f"t{round_}")
        wait_for(
            lambda: chc.api("GET", "/local/v1/queues")["outbox"][0].get("acknowledged") == 7,
            what="acknowledged at chc",
        )
        wait_for(
            lambda: (
                core.api("GET", "/local/v1/queues")["inbox"].get("delivered", {}).get("count") == 7
            ),
            what="delivered at core",
        )
    finally:
        a.stop_all()
    return a


def clone(node: NodeProcess, name: str) -> tuple[Path, Path]:
    """A node file for ``node`` on a copy of its whole data folder: (config, data folder)."""
    src = node.plan.data_dir
    with sqlite3.connect(src / "node.db") as conn:  # fold the WAL into the file first
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    data = src.with_name(f"{node.node_id}-{name}")
    shutil.copytree(src, data, ignore=shutil.ignore_patterns("*.lock", "*-wal", "*-shm"))
    config = node.config.with_name(f"{node.node_id}-{name}.toml")
    text = node.config.read_text()
    old = f'data_dir = "../data/{node.node_id}"'
    assert old in text
    config.write_text(text.replace(old, f'data_dir = "{data}"'))
    return config, data


def hutong(*args: str, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bridge.cli", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )


def run_refused(config: Path) -> subprocess.CompletedProcess[str]:
    """``hutong run`` that must exit by itself (a node that starts is killed after 60 s, and the
    test then fails on its exit code)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bridge.cli", "run", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def head(db: Path) -> tuple[int, str]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()


def cut_after(db: Path, seq: int) -> tuple[int, int]:
    """Delete every audit row and checkpoint after ``seq``: (rows, checkpoints) deleted."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        rows = conn.execute("DELETE FROM audit WHERE seq > ?", (seq,)).rowcount
        cps = conn.execute("DELETE FROM audit_checkpoint WHERE seq > ?", (seq,)).rowcount
    finally:
        conn.close()
    return rows, cps


def anchor_of(data: Path) -> dict:
    return json.loads((data / "audit-anchor.json").read_text())


def test_dropped_tail_with_its_checkpoints_is_caught_by_the_anchor_file(exchanged) -> None:
    core = exchanged.node("core")
    config, data = clone(core, "trunc")
    db = data / "node.db"
    last, last_hash = head(db)
    anchor = anchor_of(data)
    # the anchor is the last checkpoint: the one the stopping node signed over its head
    assert (anchor["node"], anchor["seq"], anchor["hash"]) == ("core", last, last_hash)
    assert (data / "audit-anchor.json").stat().st_mode & 0o777 == 0o600
    before = hutong("audit", "verify", config=config)
    assert before.returncode == 0, before.stderr
    assert before.stdout.startswith(f"audit chain of core verifies: {last} records, ")

    n = 4
    rows, cps = cut_after(db, last - n)
    assert rows == n and cps >= 1
    # what the database alone says: still a consistent chain (the old blind spot)
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT max(seq) FROM audit").fetchone()[0] == last - n
        assert conn.execute("SELECT max(seq) FROM audit_checkpoint").fetchone()[0] <= last - n
    r = hutong("audit", "verify", config=config)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert r.stdout == ""
    assert r.stderr.splitlines() == [
        (
            f"audit chain of core is BROKEN at record {last - n + 1}: truncated: the anchor file "
            f"{data / 'audit-anchor.json'} records seq {last} (hash {last_hash[:16]}) but the log "
            f"ends at seq {last - n}, row(s) {last - n + 1}..{last} missing"
        )
    ]

    started = run_refused(config)
    assert started.returncode == 2, started.stderr[-2000:]
    lines = started.stderr.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(
        f"error: HT-AUDIT-ANCHOR: store {db} is younger than its audit anchor: truncated: "
    )
    assert lines[0].endswith(
        "if the store was restored on purpose: hutong audit accept-restore --config <file>"
    )
    assert head(db)[0] == last - n  # the refused start wrote nothing


def test_deleted_store_refuses_to_start_until_it_restores_on_purpose(exchanged) -> None:
    core = exchanged.node("core")
    config, data = clone(core, "gone")
    db = data / "node.db"
    last, _ = head(db)
    db.unlink()
    started = run_refused(config)
    assert started.returncode == 2
    assert started.stderr.splitlines() == [
        (
            f"error: HT-AUDIT-ANCHOR: store {db} is missing but {data / 'audit-anchor.json'} "
            f"records audit seq {last}: the store was deleted or moved; if the store was restored "
            "on purpose: hutong audit accept-restore --config <file>"
        )
    ]
    assert not db.exists()  # refused before anything created a fresh store
    r = hutong("audit", "verify", config=config)
    assert r.returncode == 1
    assert r.stderr.splitlines() == [
        (
            f"audit chain of core is BROKEN at record 1: store {db} is missing, the anchor file "
            f"{data / 'audit-anchor.json'} records seq {last}"
        )
    ]

    # the documented, audited IT override for a deliberate restore (here: a fresh store)
    ok = hutong("audit", "accept-restore", "--reason", "ticket 42: disk replaced", config=config)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == f"store of core accepted: anchor moved from seq {last} to seq 1"
    superseded = sorted(data.glob("audit-anchor.superseded-*.json"))
    assert len(superseded) == 1 and json.loads(superseded[0].read_text())["seq"] == last
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT seq, action, outcome, actor, resource FROM audit").fetchall()
    assert [(s, a, o, who) for s, a, o, who, _ in rows] == [(1, "anchor-reset", "4", "cli")]
    resource = rows[0][4]
    assert "ticket 42: disk replaced" in resource and f'"valueInteger":{last}' in resource
    assert anchor_of(data)["seq"] == 1
    verified = hutong("audit", "verify", config=config)
    assert verified.returncode == 0, verified.stderr
    node = NodeProcess("core", config)
    node.start()
    try:
        node.wait_ready()
    finally:
        node.stop()


def test_peer_held_anchor_catches_a_truncation_the_node_cannot_see(exchanged, tmp_path) -> None:
    chc, core = exchanged.node("chc"), exchanged.node("core")
    exported = tmp_path / "core-anchor.json"
    r = hutong(
        "audit", "anchor-export", "--peer", "core", "--out", str(exported), config=chc.config
    )
    assert r.returncode == 0, r.stderr
    held = json.loads(exported.read_text())
    assert held["node"] == "core" and held["held_by"] == "chc" and held["v"] == 1
    seq = held["seq"]
    assert seq >= EVERY  # a checkpoint core signed while receiving
    config, data = clone(core, "peer")
    db = data / "node.db"
    with sqlite3.connect(db) as conn:
        assert (
            conn.execute("SELECT hash FROM audit WHERE seq = ?", (seq,)).fetchone()[0]
            == held["hash"]
        )
    intact = hutong("audit", "verify", "--anchor", str(exported), config=config)
    assert intact.returncode == 0, intact.stderr
    assert intact.stdout.rstrip().endswith(", 2 anchor(s) held")

    cut_after(db, seq - 2)
    (data / "audit-anchor.json").unlink()  # the local anchor is gone too
    alone = hutong("audit", "verify", config=config)
    assert alone.returncode == 0, alone.stderr  # nothing on the node itself shows the cut
    r = hutong("audit", "verify", "--anchor", str(exported), config=config)
    assert r.returncode == 1, r.stdout
    assert r.stderr.splitlines() == [
        (
            f"audit chain of core is BROKEN at record {seq - 1}: truncated: the anchor in "
            f"{exported} records seq {seq} (hash {held['hash'][:16]}) but the log ends at seq "
            f"{seq - 2}, row(s) {seq - 1}..{seq} missing"
        )
    ]

    # a forged anchor (another seq under the same signature) is refused, not trusted
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps({**held, "seq": seq + 1}))
    f = hutong("audit", "verify", "--anchor", str(forged), config=config)
    assert f.returncode == 1
    assert f.stderr.splitlines() == [
        (
            f"audit chain of core is BROKEN at record {seq + 1}: the anchor in {forged}: its "
            "signature does not verify with core's keys"
        )
    ]


def test_corrupt_page_refuses_to_start_naming_the_file(exchanged) -> None:
    core = exchanged.node("core")
    config, data = clone(core, "corrupt")
    db = data / "node.db"
    with sqlite3.connect(db) as conn:
        page = conn.execute("PRAGMA page_size").fetchone()[0]
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
    assert pages >= 20
    with open(db, "r+b") as fh:  # eight pages in the middle of the file
        fh.seek(page * (pages // 2))
        fh.write(bytes([0xA5]) * page * 8)
    started = run_refused(config)
    assert started.returncode == 2, started.stderr[-2000:]
    lines = started.stderr.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: HT-STORE-CORRUPT: {db} ")
    assert lines[0].endswith("; restore it from a backup")


def test_second_run_on_the_same_data_folder_refuses_naming_the_pid(exchanged) -> None:
    core = exchanged.node("core")
    config, data = clone(core, "twice")
    first = NodeProcess("core", config)
    first.start()
    try:
        first.wait_ready()
        second = run_refused(config)
        assert second.returncode == 2
        assert second.stderr.splitlines() == [
            (
                f"error: HT-DATA-LOCKED: data folder {data} is in use by another 'hutong run' "
                f"(pid {first.proc.pid}, lock file {data / 'hutong-run.lock'})"
            )
        ]
        assert first.proc.poll() is None  # the first one serves on
        assert first.api("GET", "/local/v1/queues")["inbox"]["delivered"]["count"] == 7
    finally:
        first.stop()
    assert first.proc.returncode == 0 or first.proc.returncode == -15
    if os.name == "posix":  # the lock went with the process: the folder starts again
        again = NodeProcess("core", config)
        again.start()
        try:
            again.wait_ready()
        finally:
            again.stop()


# -- in process: the anchor file, anchors kept for peers ----------------------------------------


def test_anchor_file_moves_forward_only_atomically_0600_after_commit(tmp_path) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from bridge.audit import AuditChain, AuditEntry
    from bridge.audit.anchor import AnchorFile, problem
    from bridge.store.db import Store

    key = Ed25519PrivateKey.generate()
    store = Store(f"sqlite:///{tmp_path / 'node.db'}")
    store.create_all()
    path = tmp_path / "audit-anchor.json"
    chain = AuditChain("core", key, checkpoint_every=2, anchor_file=AnchorFile(path))
    with pytest.raises(RuntimeError):  # noqa: PT012 - the rollback is what is under test
        with store.write() as conn:
            chain.append(conn, [AuditEntry(action="config") for _ in range(2)])
            raise RuntimeError("rolled back")
    assert not path.exists() and chain.latest is None  # a rolled-back checkpoint anchors nothing
    with store.write() as conn:
        chain.append(conn, [AuditEntry(action="config") for _ in range(5)])
    first = json.loads(path.read_text())
    assert first["seq"] == 4 and path.stat().st_mode & 0o777 == 0o600
    assert chain.receipt_anchor() == first
    with store.read() as conn:
        assert (
            conn.exec_driver_sql("SELECT hash FROM audit WHERE seq = 4").scalar() == first["hash"]
        )
    stale = AnchorFile(path).read()
    assert stale is not None and stale.verifies([key.public_key()])
    assert AnchorFile(path).advance(stale) is False  # never backwards
    with store.write() as conn:
        chain.append(conn, [AuditEntry(action="config")])
        chain.checkpoint(conn)
    assert json.loads(path.read_text())["seq"] == 6
    # a store whose row at the anchored seq has another hash: replaced or rewritten
    with store.write() as conn:
        conn.exec_driver_sql("UPDATE audit SET hash = ? WHERE seq = 4", ("0" * 64,))
        assert problem(conn, stale, "the anchor") == (
            4,
            "seq 4: hash differs from the anchor's (store replaced or rewritten)",
        )
    store.dispose()


def test_peer_anchors_kept_highest_and_a_chain_that_went_back_is_audited_once(tmp_path) -> None:
    from datetime import UTC, datetime
    from types import SimpleNamespace

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from bridge.audit.anchor import Anchor, held_for, keep_from_receipts
    from bridge.audit.chain import key_id
    from bridge.store.db import Store

    core, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    directory = {
        "core": SimpleNamespace(signing_keys=(core.public_key(),)),
        "chc": SimpleNamespace(signing_keys=(other.public_key(),)),
    }

    def anchor(seq: int, h: str, signer: Ed25519PrivateKey = core) -> dict:
        a = Anchor(
            "core", seq, h * 64, "2026-12-07T01:00:00.000000Z", key_id(signer.public_key()), ""
        )
        sig = base64.b64encode(signer.sign(a.message())).decode()
        return {**a.to_dict(), "signature": sig}

    def receipt(a: dict | None, receiver: str = "core") -> dict:
        return {"receiver": receiver, "status": "accepted", **({"anchor": a} if a else {})}

    store = Store(f"sqlite:///{tmp_path / 'node.db'}")
    store.create_all()
    now = datetime.now(UTC)
    with store.write() as conn:
        got = keep_from_receipts(
            conn,
            directory,
            [
                receipt(None),
                receipt(anchor(6, "a")),
                receipt(anchor(9, "b")),
                receipt(anchor(12, "c", other)),  # not signed by core: ignored
                receipt(anchor(15, "d"), receiver="chc"),  # not the signer's own chain: ignored
                receipt({**anchor(18, "e"), "v": 2}),  # a later version: ignored, not an error
                RuntimeError("a receipt that failed its own checks"),
            ],
            now,
        )
        assert got == []
        assert held_for(conn, "core")["seq"] == 9
        back = keep_from_receipts(conn, directory, [receipt(anchor(3, "f"))], now)
        again = keep_from_receipts(conn, directory, [receipt(anchor(3, "f"))], now)
        assert held_for(conn, "core")["seq"] == 9  # the highest stays
    assert again == []  # audited once per anchor
    assert len(back) == 1
    e = back[0]
    assert (e.action, e.outcome, e.peer, e.code) == ("peer-anchor", "8", "core", "HT-AUDIT-ANCHOR")
    assert e.message == (
        f"core's audit chain went back: it now shows seq 3 (hash {'f' * 16}), "
        f"it showed seq 9 (hash {'b' * 16})"
    )
    store.dispose()


def test_running_node_shows_a_tail_cut_under_it_on_the_auditor_page(exchanged) -> None:
    from tests.test_web import Browser

    core = exchanged.node("core")
    config, data = clone(core, "live")
    anchored = anchor_of(data)["seq"]
    node = NodeProcess("core", config)
    node.start()
    try:
        node.wait_ready()
        auditor = Browser(node).login("auditor")

        def page() -> str:
            return auditor.get("/ui/audit?verify=full&lang=en")

        assert 'class="chain ok"' in page()
        rows, cps = cut_after(data / "node.db", anchored - 2)
        assert rows >= 2 and cps >= 1
        body = page()
        assert 'class="chain bad"' in body
        assert (
            "the node&#x27;s latest anchor records seq" in body
            or "hash differs from the node&#x27;s latest anchor" in body
        )
    finally:
        node.stop()
