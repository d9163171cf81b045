"""The members' vendor systems for the demo, started from what each node file's adapters name.

* ``his-hl7``: ``simulators.his_hl7 serve`` as a process on the adapter's ``his`` address; the
  doctors' side is :class:`simulators.his_hl7.VendorHis` (REF^I12, RRI^I12, ADT over MLLP);
* ``his-xml-ws``: ``simulators.his_ws serve`` as a process on the adapter's ``url`` port; the
  doctors' side is :class:`simulators.his_ws.HisWs` (documents in its SQLite file);
* ``his-middle-db``: the vendor database itself (:class:`simulators.his_db.HisDb`, SQLite);
* ``lis-hl7``: the LIS is ``simulators.lis send`` (python-hl7's MLLP client), one process a run;
* ``pacs-dicom``: the modality is ``simulators.pacs push`` (pynetdicom C-STORE), one process a
  run, of copies of pydicom's test files made into the demo patient's CT study.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bridge.errors import HutongError
from demo.world import ROOT, World, wait
from simulators.his_db import HisDb
from simulators.his_hl7 import VendorHis
from simulators.his_ws import HisWs


@dataclass
class Vendors:
    world: World
    his: dict[str, Any] = field(default_factory=dict)  # node id -> VendorHis | HisWs | HisDb
    style: dict[str, str] = field(default_factory=dict)  # node id -> adapter type of its HIS
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    ports: list[tuple[str, int]] = field(default_factory=list)

    @property
    def folder(self) -> Path:
        return self.world.folder / "his"

    def start(self) -> None:
        """Every vendor process at once (before the nodes, which talk to them)."""
        logs = self.world.folder / "logs"
        logs.mkdir(exist_ok=True)
        for m in self.world.members.values():
            for a in m.plan.adapters:
                o = a.options
                if a.type == "his-hl7":
                    db = self.folder / f"{m.node_id}.sqlite"
                    self.his[m.node_id] = VendorHis(
                        db,
                        o["listen"],
                        application=f"{m.node_id.upper()}-HIS",
                        facility=f"{m.node_id}-his",
                        charset_name=o.get("charset", "UNICODE UTF-8"),
                    )
                    self._spawn(
                        m.node_id,
                        ["simulators.his_hl7", "serve", "--db", str(db), "--listen", o["his"]],
                    )
                    self.ports.append((o["his"].rsplit(":", 1)[0], int(o["his"].rsplit(":", 1)[1])))
                elif a.type == "his-xml-ws":
                    db = self.folder / f"{m.node_id}.sqlite"
                    url = urllib.parse.urlsplit(o["url"])
                    self.his[m.node_id] = HisWs(db, m.node_id, site_name=o.get("site_name", ""))
                    self._spawn(
                        m.node_id,
                        [
                            "simulators.his_ws",
                            "serve",
                            "--db",
                            str(db),
                            "--host",
                            url.hostname or "127.0.0.1",
                            "--port",
                            str(url.port),
                        ],
                    )
                    self.ports.append((url.hostname or "127.0.0.1", int(url.port or 80)))
                elif a.type == "his-middle-db":
                    secret = m.config.parent / o["dsn"].removeprefix("file:")
                    dsn = secret.read_text(encoding="utf-8").strip()
                    self.his[m.node_id] = HisDb(dsn).init()
                else:
                    continue
                self.style[m.node_id] = a.type

    def _spawn(self, node_id: str, args: list[str]) -> None:
        with open(self.world.folder / "logs" / f"{node_id}-his.log", "ab") as log:
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
                )
            )

    def wait(self) -> None:
        for (host, port), proc in zip(self.ports, self.procs, strict=True):

            def listening(
                host: str = host, port: int = port, proc: subprocess.Popen[bytes] = proc
            ) -> bool:
                if proc.poll() is not None:
                    raise HutongError(
                        f"vendor simulator on port {port} exited "
                        f"({proc.returncode}); see {self.world.folder / 'logs'}"
                    )
                with socket.create_connection((host, port), timeout=1):
                    return True

            wait(listening, f"the vendor system on {host}:{port}", 60)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        for h in self.his.values():
            if isinstance(h, HisDb):
                h.close()


# -- LIS and modality: one real process a run -------------------------------------------------


def lis_send(port: int, messages: list[bytes], folder: Path) -> list[str]:
    """Send ORU^R01 messages with ``simulators.lis send``; return each MSA-1 (AA, AE, AR)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n, raw in enumerate(messages):
        p = folder / f"oru-{len(list(folder.iterdir())) + n:04d}.hl7"
        p.write_bytes(raw)
        paths.append(str(p))
    r = subprocess.run(
        [sys.executable, "-m", "simulators.lis", "send", "--port", str(port), *paths],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if r.returncode != 0:
        raise HutongError(f"simulators.lis send failed: {r.stderr[-300:]}")
    return [line.rsplit(" ", 1)[1] for line in r.stdout.splitlines() if line.strip()]


def modality_push(
    files: Path, bind: str, called_ae: str, calling_ae: str = "FX-CT-01"
) -> dict[str, Any]:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "simulators.pacs",
            "push",
            "--dir",
            str(files),
            "--to",
            bind,
            "--called-ae",
            called_ae,
            "--ae",
            calling_ae,
        ],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    try:
        return dict(json.loads(r.stdout))
    except ValueError:
        raise HutongError(f"simulators.pacs push failed: {r.stderr[-300:]}") from None
