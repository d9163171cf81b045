"""Real node processes on loopback for tests: scaffold an alliance, start, kill, restart."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bridge.config.scaffold import write_alliance
from simulators.ports import free_port_block

ROOT = Path(__file__).resolve().parents[1]


def wait_for(
    cond: Callable[[], Any], timeout: float = 30.0, every: float = 0.05, what: str = "condition"
) -> Any:
    """Poll until cond() is truthy; no sleep-based waits in tests."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = cond()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - keep polling, report the last one
            last_exc = exc
        time.sleep(every)
    raise TimeoutError(
        f"timed out waiting for {what}" + (f" (last error: {last_exc})" if last_exc else "")
    )


class Alliance:
    """A throwaway alliance folder with node files, keys and secrets.

    A member dict may carry ``"adapters": [{"name", "type", "mappings", "receives", "options"}]``:
    they are written as ``[[adapters]]`` tables into its node file
    (``bridge.config.scaffold.adapters_toml``); a relative ``mappings`` path resolves from
    ``<folder>/nodes``.
    """

    def __init__(
        self,
        folder: Path,
        members: Sequence[dict[str, Any]],
        rules: Sequence[dict[str, Any]],
        dsn_for: Callable[[str], str] | None = None,
        national_id_egress: bool = False,
    ) -> None:
        self.folder = folder
        n = len(members)
        # the scaffold gives member i the ports base+i (i from 1), so check base..base+n
        base_local = free_port_block(n + 1)
        base_peer = free_port_block(n + 1)
        while abs(base_peer - base_local) <= n:
            base_peer = free_port_block(n + 1)
        self.files = write_alliance(
            folder,
            members,
            rules,
            base_port_local=base_local,
            base_port_peer=base_peer,
            dsn_for=dsn_for,
            national_id_egress=national_id_egress,
        )
        self.nodes: dict[str, NodeProcess] = {}

    def node(self, node_id: str) -> NodeProcess:
        if node_id not in self.nodes:
            self.nodes[node_id] = NodeProcess(node_id, self.files[node_id])
        return self.nodes[node_id]

    def start(self, *ids: str) -> None:
        for i in ids:
            self.node(i).start()
        for i in ids:
            self.node(i).wait_ready()

    def stop_all(self) -> None:
        """SIGTERM to every running node at once, then wait for each (a graceful stop takes
        ~0.6 s a node: one after another, a six-member alliance waited 3-4 s)."""
        live = [n.proc for n in self.nodes.values() if n.proc is not None and n.proc.poll() is None]
        for proc in live:
            proc.send_signal(signal.SIGTERM)
        for proc in live:
            proc.wait(timeout=30)


class ApiError(Exception):
    """An HTTP error answer from a node, with its status and body (the socket is closed)."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:300]!r}")
        self.status = status
        self.body = body
        self.json = json.loads(body) if body[:1] in (b"{", b"[") else None


class NodeProcess:
    def __init__(self, node_id: str, config: Path) -> None:
        from bridge.config.loader import load_node

        self.node_id = node_id
        self.config = config
        self.plan = load_node(config)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = config.parent.parent / f"{node_id}.log"

    @property
    def local_url(self) -> str:
        return f"http://{self.plan.local_host}:{self.plan.local_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.plan.peer_host}:{self.plan.peer_port}"

    def token(self, role: str = "it") -> str:
        return self.plan.tokens[role]

    def start(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bridge.cli", "run", "--config", str(self.config)],
                stdout=fh,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=env,
            )

    def wait_ready(self, timeout: float = 30.0) -> None:
        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.node_id} exited: {self.log.read_text()[-2000:]}")
            for url in (self.local_url + "/health", self.peer_url + "/exchange/v1/health"):
                with urllib.request.urlopen(url, timeout=1) as r:
                    if r.status != 200:
                        return False
            return True

        wait_for(up, timeout, what=f"{self.node_id} to start")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)

    def restart(self) -> None:
        self.kill()
        self.start()
        self.wait_ready()

    def api(self, method: str, path: str, body: Any = None, role: str = "it") -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            self.local_url + path,
            data=data,
            method=method,
            headers={
                "Authorization": f"Bearer {self.token(role)}",
                "Content-Type": "application/json",
            },
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:
            with exc:
                raise ApiError(exc.code, exc.read()) from None

    def send(
        self, to: str, kind: str, bundles: Sequence[dict[str, Any]], thread: str | None = None
    ) -> list[str]:
        items = [{"to": to, "kind": kind, "thread": thread, "bundle": b} for b in bundles]
        res = self.api("POST", "/local/v1/packets", items, role="clinician")["results"]
        ids = [r.get("packet_id") for r in res]
        if None in ids:
            raise AssertionError(f"queue refused: {res}")
        return ids  # type: ignore[return-value]

    def cli(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "bridge.cli", *args, "--config", str(self.config)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=check,
            timeout=120,
        )


def spooled(node: NodeProcess) -> list[Path]:
    """Files the receiving side's local drop folder holds (what 'the HIS' got)."""
    root = node.plan.delivery.spool_dir
    return sorted(root.rglob("*.json")) if root.exists() else []


def lis_send(port: int, message: bytes) -> str:
    """Send one HL7 v2 message as an LIS would (python-hl7's MLLP client); the ACK code."""
    from hl7.client import MLLPClient

    with MLLPClient("127.0.0.1", port) as client:
        client.socket.settimeout(30)
        ack = client.send_message(message)
    return ack.decode().split("MSA|")[1][:2]


def results_stored(where: Any, timeout: float = 30.0) -> None:
    """Wait until every lab message a node acknowledged so far is in its FHIR store: its
    results journal holds no queued row (``bridge/results/journal.py``: the ACK follows the
    journal's commit, the resources a few ms later). ``where``: a NodeProcess or a Store."""
    from sqlalchemy import create_engine, text

    dsn = where.plan.storage_dsn if hasattr(where, "plan") else where.dsn
    engine = create_engine(dsn)
    sql = text("SELECT count(*) FROM result_journal WHERE state = 'queued'")

    def empty() -> bool:
        with engine.connect() as conn:
            return conn.execute(sql).scalar() == 0

    try:
        wait_for(empty, timeout, what="the results journal to be expanded")
    finally:
        engine.dispose()


def lab_gaps(node: NodeProcess) -> dict[str, int]:
    """The node's counted lab-code mapping gaps: code -> count."""
    out: dict[str, int] = {}
    for code, count in db_rows(node, "SELECT code, count FROM mapping_gap WHERE map = 'lab'"):
        out[code] = out.get(code, 0) + count
    return out


def db_rows(node: NodeProcess, sql: str, **params: object) -> list[tuple]:
    """Rows of a read-only SQL query against a node's own store (SQLite or PostgreSQL)."""
    from sqlalchemy import create_engine, text

    engine = create_engine(node.plan.storage_dsn)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(sql), params)]
    finally:
        engine.dispose()
