"""`hutong demo`: the Fuxing alliance on this machine, playing a referral scenario.

Copies the shipped alliance into a fresh demo folder (keys and secrets generated there), starts
the seven nodes as separate processes on loopback, plays the scenario through each member's
local API, checks every step landed on both sides, prints where to look, and (without --once)
keeps running until Ctrl-C.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from bridge.config.loader import load_node
from bridge.config.scaffold import init_keys_and_secrets
from bridge.errors import HutongError

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "config" / "alliances" / "fuxing"
NATIONAL_ID = "urn:oid:2.16.156.10011.1.3"


@dataclass
class Member:
    node_id: str
    config: Path
    plan: Any
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.plan.local_host}:{self.plan.local_port}"

    def api(self, method: str, path: str, body: Any = None, role: str = "clinician") -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method, headers={
            "Authorization": f"Bearer {self.plan.tokens[role]}",
            "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:
            with exc:
                raise HutongError(f"{self.node_id} {method} {path}: HTTP {exc.code} "
                                  f"{exc.read()[:200].decode('utf-8', 'replace')}") from None


@dataclass
class Demo:
    folder: Path
    console: Console
    members: dict[str, Member] = field(default_factory=dict)
    results: list[tuple[str, bool, str]] = field(default_factory=list)

    def prepare(self) -> None:
        if self.folder.exists():
            shutil.rmtree(self.folder)  # re-running starts clean
        shutil.copytree(SHIPPED, self.folder, ignore=shutil.ignore_patterns(
            "keys", "secrets", "data"))
        init_keys_and_secrets(self.folder)
        for f in sorted((self.folder / "nodes").glob("*.toml")):
            plan = load_node(f)
            self.members[plan.node_id] = Member(plan.node_id, f, plan)

    def start(self) -> None:
        logs = self.folder / "logs"
        logs.mkdir(exist_ok=True)
        for m in self.members.values():
            log = open(logs / f"{m.node_id}.log", "ab")  # noqa: SIM115 - lives with the process
            m.proc = subprocess.Popen([sys.executable, "-m", "bridge.cli", "run", "--config",
                                       str(m.config)], stdout=log, stderr=subprocess.STDOUT)
        for m in self.members.values():
            self._wait(lambda m=m: _up(m.url + "/health"), f"{m.node_id} to start", 60)
            self.console.print(f"  [green]started[/] {m.plan.names.zh} ({m.node_id}) "
                               f"local {m.url}")

    def stop(self) -> None:
        for m in self.members.values():
            if m.proc and m.proc.poll() is None:
                m.proc.send_signal(signal.SIGTERM)
        for m in self.members.values():
            if m.proc:
                try:
                    m.proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    m.proc.kill()

    def _wait(self, cond: Callable[[], Any], what: str, timeout: float = 30) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                got = cond()
                if got:
                    return got
            except (OSError, HutongError):
                pass
            time.sleep(0.1)
        raise HutongError(f"timed out waiting for {what}")

    def check(self, name: str, cond: Callable[[], Any], timeout: float = 30) -> None:
        try:
            self._wait(cond, name, timeout)
            self.results.append((name, True, ""))
            self.console.print(f"  [green]✓[/] {name}")
        except HutongError as exc:
            self.results.append((name, False, str(exc)))
            self.console.print(f"  [red]✗[/] {name}: {exc}")

    # -- scenario -----------------------------------------------------------------------------

    def state(self, node: str, thread: str) -> dict[str, Any] | None:
        rows = [r for r in self.members[node].api("GET", "/local/v1/referrals", role="it")
                if r["thread"] == thread]
        return rows[0] if rows else None

    def both(self, a: str, b: str, thread: str, status: str) -> bool:
        sa, sb = self.state(a, thread), self.state(b, thread)
        return bool(sa and sb and sa["status"] == sb["status"] == status)

    def refer(self, src: str, dst: str, kind: str, name: str, nid: str, icd10: str) -> str:
        before = {r["thread"] for r in self.members[src].api("GET", "/local/v1/referrals",
                                                            role="it")}
        self.members[src].api("POST", "/local/v1/referrals",
                              referral_bundle(kind, dst, name, nid, icd10))
        new = [r for r in self.members[src].api("GET", "/local/v1/referrals", role="it")
               if r["thread"] not in before]
        return str(new[0]["thread"])

    def play(self) -> None:
        c = self.console
        core = "fuxing"
        c.print("[bold]1. 上转·专科住院 Yuetan CHC refers a hypertensive patient up for admission")
        t1 = self.refer("yuetan-chc", core, "up-inpatient", "王秀英", "110102195003151234", "I10")
        self.check("referral received at Fuxing through the platform (both sides: received)",
                   lambda: self.both("yuetan-chc", core, t1, "received"))
        self.members[core].api("POST", f"/local/v1/referrals/{t1}/steps/accept", {"outputs": [
            {"type": {"text": "bed"}, "valueString": "心内科 12床"},
            {"type": {"text": "doctor"}, "valueString": "张主任"}]})
        self.check("acceptance slip (接诊单) with bed back at Yuetan",
                   lambda: self.both("yuetan-chc", core, t1, "accepted"))
        self.members[core].api("POST", f"/local/v1/referrals/{t1}/steps/arrive", {})
        self.check("patient admitted (both sides: in-progress)",
                   lambda: self.both("yuetan-chc", core, t1, "in-progress"))
        row = self.state(core, t1)
        assert row is not None
        self.members[core].api("POST", "/local/v1/referrals",
                               return_bundle(row["sr_id"], row["task_id"], self.members[core]))
        self.check("return slip (转回单) with discharge summary and prescriptions received",
                   lambda: self.both("yuetan-chc", core, t1, "completed")
                   and (self.state("yuetan-chc", t1) or {}).get("step") == "return-received")
        c.print("[bold]2. 上转·特殊检查 Guangwai Hospital asks for an exam; Fuxing declines")
        t2 = self.refer("guangwai-hosp", core, "up-exam", "李建国", "110102196207082345", "I25.1")
        self._wait(lambda: self.both("guangwai-hosp", core, t2, "received"), "t2 received")
        self.members[core].api("POST", f"/local/v1/referrals/{t2}/steps/reject",
                               {"reason": "本院该项检查已约满，请改约"})
        self.check("rejection with reason seen by Guangwai Hospital",
                   lambda: self.both("guangwai-hosp", core, t2, "rejected"))
        c.print("[bold]3. 上转·专科门诊 Zhanlanlu CHC refers, then the family withdraws")
        t3 = self.refer("zhanlanlu-chc", core, "up-outpatient", "赵淑芬", "110102195811113456",
                        "E11.9")
        self._wait(lambda: self.both("zhanlanlu-chc", core, t3, "received"), "t3 received")
        self.members["zhanlanlu-chc"].api("POST", f"/local/v1/referrals/{t3}/steps/cancel",
                                          {"reason": "家属决定暂不转诊"})
        self.check("cancellation confirmed by Fuxing (both sides: cancelled)",
                   lambda: self.both("zhanlanlu-chc", core, t3, "cancelled"))
        c.print("[bold]4. Audit chains of every member verify")
        for m in self.members.values():
            self.check(f"audit chain of {m.node_id} verifies", lambda m=m: subprocess.run(
                [sys.executable, "-m", "bridge.cli", "audit", "verify", "--config",
                 str(m.config)], capture_output=True).returncode == 0)

    def summary(self) -> bool:
        ok = all(r[1] for r in self.results)
        self.console.print(f"\n[bold]{sum(r[1] for r in self.results)}/{len(self.results)} "
                           f"steps landed where they should[/]")
        self.console.print("\nWhere to look (tokens are in "
                           f"{self.folder / 'secrets'}):")
        for m in self.members.values():
            self.console.print(f"  {m.plan.names.zh:<24} {m.url}/docs   {m.url}/fhir/metadata")
        return ok


def _up(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=1) as r:
        return r.status == 200


def referral_bundle(kind: str, receiver: str, name: str, nid: str, icd10: str) -> dict[str, Any]:
    p, sr, c = (f"urn:uuid:{uuid.uuid4()}" for _ in range(3))
    return {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": p, "request": {"method": "POST", "url": "Patient"}, "resource": {
            "resourceType": "Patient", "name": [{"text": name}],
            "identifier": [{"system": NATIONAL_ID, "value": nid}]}},
        {"fullUrl": sr, "request": {"method": "POST", "url": "ServiceRequest"}, "resource": {
            "resourceType": "ServiceRequest", "status": "active", "intent": "order",
            "code": {"coding": [{"system": "http://hutong.dev/CodeSystem/referral-kind",
                                 "code": kind}]},
            "subject": {"reference": p},
            "reasonCode": [{"coding": [{"system": "http://hl7.org/fhir/sid/icd-10",
                                        "code": icd10}]}],
            "performer": [{"reference": f"Organization/{receiver}"}]}},
        {"fullUrl": c, "request": {"method": "POST", "url": "Consent"}, "resource": {
            "resourceType": "Consent", "status": "active",
            "scope": {"coding": [{"system":
                                  "http://terminology.hl7.org/CodeSystem/consentscope",
                                  "code": "treatment"}]},
            "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
            "patient": {"reference": p}, "policyRule": {"text": "患者本人同意转诊"}}},
    ]}


def return_bundle(sr_id: str, task_id: str, core: Member) -> dict[str, Any]:
    task = core.api("GET", f"/fhir/Task/{task_id}")
    patient = task["for"]["reference"]
    down, comp, med = (f"urn:uuid:{uuid.uuid4()}" for _ in range(3))
    return {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": down, "request": {"method": "POST", "url": "ServiceRequest"}, "resource": {
            "resourceType": "ServiceRequest", "status": "active", "intent": "order",
            "basedOn": [{"reference": f"ServiceRequest/{sr_id}"}],
            "subject": {"reference": patient},
            "note": [{"text": "继续降压治疗，两周后社区复查血压"}]}},
        {"fullUrl": comp, "request": {"method": "POST", "url": "Composition"}, "resource": {
            "resourceType": "Composition", "status": "final",
            "type": {"coding": [{"system": "http://loinc.org", "code": "18842-5"}]},
            "subject": {"reference": patient}, "date": "2026-11-25T09:00:00+08:00",
            "author": [{"display": "张主任"}], "title": "出院小结"}},
        {"fullUrl": med, "request": {"method": "POST", "url": "MedicationRequest"}, "resource": {
            "resourceType": "MedicationRequest", "status": "active", "intent": "order",
            "medicationCodeableConcept": {"text": "氨氯地平片 5mg"},
            "subject": {"reference": patient}, "dosageInstruction": [{"text": "每日一次"}]}},
    ]}


def run_demo(folder: Path, once: bool) -> int:
    console = Console()
    demo = Demo(folder, console)
    console.print("[bold]Hutong demo: the Fuxing medical alliance (复兴医院医联体)[/]")
    demo.prepare()
    try:
        demo.start()
        demo.play()
        ok = demo.summary()
        if once:
            return 0 if ok else 1
        console.print("\nRunning until Ctrl-C.")
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            return 0
    finally:
        demo.stop()
