"""The demo's alliance: a fresh copy of the shipped Fuxing folder and its seven node processes.

The node files in ``config/alliances/fuxing/nodes`` name the repository's mapping folders and
simulator field maps relative to where they live (``../../../../mappings/...``); the copy in the
demo folder gets those paths made absolute. Intermediate-database HIS get a SQLite file under
``<folder>/his/`` through their ``file:`` DSN secret.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bridge.config.loader import load_node
from bridge.config.scaffold import init_keys_and_secrets
from bridge.errors import HutongError
from demo.guard import SHIPPED_BASE, ports_in, shift_ports

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "config" / "alliances" / "fuxing"
#: how the shipped node files reach the repository from config/alliances/fuxing/nodes
REPO_RELATIVE = '"../../../../'


#: where ``wait`` reports a long wait (``hutong demo`` prints; None: silent)
PROGRESS: list[Callable[[str], None]] = []
PROGRESS_EVERY_S = 5.0


def wait(cond: Callable[[], Any], what: str, timeout: float = 30) -> Any:
    """Poll ``cond`` every 0.1 s until it returns something true; HutongError on timeout.
    Every 5 s of waiting a progress line says what is awaited (no silent minute)."""
    start = time.monotonic()
    deadline = start + timeout
    next_note = start + PROGRESS_EVERY_S
    last = ""
    while time.monotonic() < deadline:
        if PROGRESS and time.monotonic() >= next_note:
            next_note += PROGRESS_EVERY_S
            for note in PROGRESS:
                note(
                    f"  … still waiting for {what} ({time.monotonic() - start:.0f} s of "
                    f"{timeout:.0f} s){last}"
                )
        try:
            got = cond()
            if got:
                return got
        except (OSError, HutongError, KeyError, IndexError, ValueError) as exc:
            last = f" (last: {exc})"[:300]
        time.sleep(0.1)
    raise HutongError(f"timed out after {timeout:.0f} s waiting for {what}{last}")


@dataclass
class Member:
    node_id: str
    config: Path
    plan: Any
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.plan.local_host}:{self.plan.local_port}"

    @property
    def zh(self) -> str:
        return str(self.plan.names.zh)

    def adapter(self, type_: str) -> Any:
        return next((a for a in self.plan.adapters if a.type == type_), None)

    def api(self, method: str, path: str, body: Any = None, role: str = "clinician") -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={
                "Authorization": f"Bearer {self.plan.tokens[role]}",
                "Content-Type": "application/json",
            },
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                raw = r.read()
                return json.loads(raw) if raw[:1] in (b"{", b"[") else raw
        except urllib.error.HTTPError as exc:
            with exc:
                raise HutongError(
                    f"{self.node_id} {method} {path}: HTTP {exc.code} "
                    f"{exc.read()[:200].decode('utf-8', 'replace')}"
                ) from None

    def referral(self, thread: str) -> dict[str, Any] | None:
        rows = [
            r for r in self.api("GET", "/local/v1/referrals", role="it") if r["thread"] == thread
        ]
        return rows[0] if rows else None


@dataclass
class World:
    folder: Path
    members: dict[str, Member] = field(default_factory=dict)

    def ports(self, port_base: int = SHIPPED_BASE) -> set[int]:
        """Every port the demo will listen on or call, after ``--port-base`` (from the shipped
        files, so it can be checked before the folder is touched)."""
        shift = port_base - SHIPPED_BASE
        return {
            p
            for f in (SHIPPED / "alliance.toml", *sorted((SHIPPED / "nodes").glob("*.toml")))
            for p in ports_in(shift_ports(f.read_text(encoding="utf-8"), shift))
        }

    def prepare(self, port_base: int = SHIPPED_BASE) -> None:
        if self.folder.exists():
            shutil.rmtree(self.folder)  # re-running starts clean (the caller holds the lock)
        shutil.copytree(
            SHIPPED, self.folder, ignore=shutil.ignore_patterns("keys", "secrets", "data")
        )
        shift = port_base - SHIPPED_BASE
        for f in [self.folder / "alliance.toml", *(self.folder / "nodes").glob("*.toml")]:
            text = shift_ports(f.read_text(encoding="utf-8"), shift)
            f.write_text(text.replace(REPO_RELATIVE, f'"{ROOT.as_posix()}/'), encoding="utf-8")
        init_keys_and_secrets(self.folder)
        (self.folder / "his").mkdir()
        for f in sorted((self.folder / "nodes").glob("*.toml")):
            # the vendor databases' DSN secrets first: loading a node checks its adapters'
            # options, and a `dsn = "file:..."` must then name a file that is there
            raw = tomllib.loads(f.read_text(encoding="utf-8"))
            node_id = raw["node_id"]
            for a in raw.get("adapters", []):
                dsn = (a.get("options") or {}).get("dsn")
                if isinstance(dsn, str) and dsn.startswith("file:"):
                    secret = (f.parent / dsn[5:]).resolve()
                    db = (self.folder / "his" / f"{node_id}.db").resolve()
                    secret.write_text(f"sqlite:///{db}\n", encoding="utf-8")
                    os.chmod(secret, 0o600)
            plan = load_node(f)
            self.members[plan.node_id] = Member(plan.node_id, f, plan)

    def start_nodes(self) -> None:
        """All seven processes at once; then wait for each one's health."""
        logs = self.folder / "logs"
        logs.mkdir(exist_ok=True)
        for m in self.members.values():
            with open(logs / f"{m.node_id}.log", "ab") as log:
                m.proc = subprocess.Popen(
                    [sys.executable, "-m", "bridge.cli", "run", "--config", str(m.config)],
                    cwd=ROOT,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )

    def wait_nodes(self, report: Callable[[Member], None]) -> None:
        for m in self.members.values():

            def up(m: Member = m) -> bool:
                if m.proc is not None and m.proc.poll() is not None:
                    raise HutongError(
                        f"{m.node_id} exited with {m.proc.returncode}; see "
                        f"{self.folder / 'logs' / (m.node_id + '.log')}"
                    )
                return _up(m.url + "/health")

            wait(up, f"{m.node_id} to start", 90)
            report(m)

    def stop_nodes(self) -> None:
        for m in self.members.values():
            if m.proc and m.proc.poll() is None:
                m.proc.send_signal(signal.SIGTERM)
        for m in self.members.values():
            if m.proc:
                try:
                    m.proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    m.proc.kill()
                    m.proc.wait(timeout=10)


def _up(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return r.status == 200
    except urllib.error.HTTPError as exc:
        exc.close()
        return False
