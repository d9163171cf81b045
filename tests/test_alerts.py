"""Alerts: rules over real node state, shown on the IT page, POSTed to a webhook, audited once.

The node-process test stops a peer and queues packets for it, then watches a tiny stdlib HTTP
server (the webhook receiver) get one "raised" document per alert and, after the peer returns,
one "cleared" document; the audit log holds exactly one raise and one clear per alert however
many rounds ran. Tampering with the running node's audit table raises ``audit-chain``.
The rules themselves are also checked directly on :func:`bridge.alerts.evaluate` (a pure
function of the facts), including the adapter rule, whose facts come from ``status()``.
"""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from bridge.alerts import ACTIVE_KEY, Facts, PeerFacts, evaluate
from bridge.config.models import AlertsConfig
from bridge.store.db import Store
from bridge.store.tables import NODE_STATE
from tests.factory import bundle
from tests.harness import Alliance, NodeProcess, wait_for
from tests.test_web import Browser, section

MEMBERS = [
    {"id": "core", "zh": "复兴医院", "en": "Fuxing Hospital", "role": "core"},
    {"id": "chc", "zh": "月坛社区卫生服务中心", "en": "Yuetan CHC", "role": "community"},
]
RULES = [
    {"from": "core", "to": "chc", "kinds": ["result.lab"]},
    {"from": "chc", "to": "core", "kinds": ["result.lab"]},
]


# -- the rules, directly ----------------------------------------------------------------------

T0 = datetime(2026, 11, 20, 8, 0, tzinfo=UTC)
CFG = AlertsConfig(queue_depth=10, queue_age_s=60, peer_silent_s=300, adapter_silent_s=600)


def facts(**kw: Any) -> Facts:
    base: dict[str, Any] = {
        "now": T0 + timedelta(hours=1),
        "started_at": T0,
        "peers": {},
        "chain_ok": True,
    }
    return Facts(**{**base, **kw})


def test_quiet_node_has_no_alerts() -> None:
    now = T0 + timedelta(hours=1)
    peer = PeerFacts(
        "chc", waiting=10, oldest_waiting_s=60.0, last_probe_ok=now - timedelta(seconds=300)
    )
    assert (
        evaluate(
            facts(
                peers={"chc": peer},
                inbox_waiting=2,
                inbox_oldest_s=60.0,
                adapters={"his": {"last_ok_at": (now - timedelta(seconds=600)).isoformat()}},
            ),
            CFG,
        )
        == []
    )


def test_results_journal_lagging_or_at_its_bound() -> None:
    """Lab messages acknowledged and not yet in the FHIR store (bridge/results/journal.py):
    older than queue_age_s, and at [limits] max_results_journal."""
    assert evaluate(facts(journal_waiting=3, journal_oldest_s=60.0, journal_bound=2000), CFG) == []
    got = {
        a.key: a
        for a in evaluate(
            facts(journal_waiting=2000, journal_oldest_s=90.5, journal_bound=2000), CFG
        )
    }
    assert sorted(got) == ["queue-age:results-journal", "queue-depth:results-journal"]
    age, depth = got["queue-age:results-journal"], got["queue-depth:results-journal"]
    assert (age.rule, age.subject, age.value, age.threshold) == (
        "queue-age",
        "results-journal",
        90.5,
        60,
    )
    assert "2000 acknowledged lab messages" in age.message
    assert (depth.rule, depth.value, depth.threshold) == ("queue-depth", 2000, 2000)
    assert "max_results_journal" in depth.message and "AE" in depth.message
    # no bound: no depth alert
    assert [a.key for a in evaluate(facts(journal_waiting=5000, journal_bound=0), CFG)] == []


def test_each_rule_over_its_threshold() -> None:
    now = T0 + timedelta(hours=1)
    peer = PeerFacts(
        "chc",
        waiting=11,
        oldest_waiting_s=61.5,
        last_ack=now - timedelta(seconds=900),
        last_probe_error="health probe failed: ConnectionRefusedError",
    )
    never = PeerFacts("sec")  # never heard from since the node started an hour ago
    got = {
        a.key: a
        for a in evaluate(
            facts(
                peers={"chc": peer, "sec": never},
                inbox_waiting=4,
                inbox_oldest_s=75.0,
                adapters={
                    "his": {
                        "last_ok_at": (now - timedelta(seconds=601)).isoformat(),
                        "last_error": "HIS database unreachable",
                    },
                    "lis": {"last_ok_at": None},
                },
                chain_ok=False,
                chain_problem="record #7: hash mismatch",
            ),
            CFG,
        )
    }
    assert sorted(got) == [
        "adapter-silent:his",
        "adapter-silent:lis",
        "audit-chain",
        "peer-silent:chc",
        "peer-silent:sec",
        "queue-age:chc",
        "queue-age:inbox",
        "queue-depth:chc",
    ]
    assert (got["queue-depth:chc"].value, got["queue-depth:chc"].threshold) == (11, 10)
    assert (got["queue-age:chc"].value, got["queue-age:chc"].subject) == (61.5, "chc")
    assert got["peer-silent:chc"].value == 900.0
    assert got["peer-silent:chc"].message.endswith("ConnectionRefusedError")
    assert "never" in got["peer-silent:sec"].message and got["peer-silent:sec"].value == 3600.0
    assert got["queue-age:inbox"].value == 75.0 and "4 received" in got["queue-age:inbox"].message
    assert got["adapter-silent:his"].value == 601.0
    assert got["adapter-silent:his"].message.endswith("HIS database unreachable")
    assert got["adapter-silent:lis"].value == 3600.0  # never succeeded: since start
    assert got["audit-chain"].message == "audit chain fails to verify: record #7: hash mismatch"


# -- a real node, a real webhook receiver -----------------------------------------------------


class Hook:
    """A stdlib HTTP server that keeps every POSTed JSON document."""

    def __init__(self) -> None:
        self.docs: list[dict[str, Any]] = []
        self.types: list[str] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                hook.types.append(self.headers["Content-Type"])
                hook.docs.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hutong/alerts"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def events(self, event: str) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        for d in list(self.docs):
            if d["event"] == event:
                out.setdefault(d["alert"]["key"], []).append(d)
        return out

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def hook() -> Iterator[Hook]:
    h = Hook()
    yield h
    h.close()


@pytest.fixture
def watched(tmp_path: Path, hook: Hook) -> Iterator[Alliance]:
    a = Alliance(tmp_path / "alliance", MEMBERS, RULES)
    # the webhook URL is read from a secret file (a robot URL carries its access key)
    (a.files["core"].parent.parent / "secrets" / "core.alerts-url").write_text(hook.url + "\n")
    with open(a.files["core"], "a", encoding="utf-8") as f:
        f.write(
            "\n[alerts]\nevery_s = 0.3\nqueue_depth = 3\nqueue_age_s = 2\n"
            "peer_silent_s = 2\nchain_every_s = 0.3\nprobe_timeout_s = 0.5\n"
            'webhook_url = "file:../secrets/core.alerts-url"\n'
        )
    a.start("core", "chc")
    yield a
    a.stop_all()


def active(node: NodeProcess) -> dict[str, Any]:
    s = Store(node.plan.storage_dsn)
    try:
        with s.read() as conn:
            value = conn.execute(
                select(NODE_STATE.c.value).where(NODE_STATE.c.key == ACTIVE_KEY)
            ).scalar()
    finally:
        s.dispose()
    return json.loads(value or "{}")


def alert_audit(node: NodeProcess) -> list[dict[str, str]]:
    auditor = Browser(node).login("auditor")
    status, _url, text = auditor.open("/ui/audit/export.csv?action=alert")
    assert status == 200
    return list(csv.DictReader(io.StringIO(text.lstrip("\ufeff"))))


@pytest.mark.slow
def test_peer_down_raises_once_clears_once_and_posts_the_webhook(
    watched: Alliance, hook: Hook
) -> None:
    core, chc = watched.node("core"), watched.node("chc")
    it = Browser(core).login("it")

    # core is started first and its alert job probes chc at once, often before chc listens:
    # the page then rightly shows that failed probe until the next round reaches chc.
    def quiet_and_answered() -> str | None:
        page = it.get("/ui/it")
        return page if ('class="ok no-alerts"' in page and "✔" in section(page, "peers")) else None

    page = wait_for(quiet_and_answered, what="a quiet start with chc's health answered")
    peers = section(page, "peers")
    assert "月坛社区卫生服务中心 (chc)" in peers and "<small>" not in peers
    # a slow start (loaded machine) may already have raised and cleared peer-silent once
    before = {k: len(v) for k, v in hook.events("raised").items()}

    chc.stop()
    core.send("chc", "result.lab", [bundle(1) for _ in range(5)])
    keys = {"peer-silent:chc", "queue-depth:chc", "queue-age:chc"}
    wait_for(
        lambda: keys <= set(hook.events("raised")), timeout=30, what="three alerts at the webhook"
    )
    raised = hook.events("raised")
    depth = raised["queue-depth:chc"][0]
    assert {k: depth[k] for k in ("source", "node", "node_name", "alliance", "event")} == {
        "source": "hutong",
        "node": "core",
        "node_name": "复兴医院",
        "alliance": "demo",
        "event": "raised",
    }
    assert datetime.fromisoformat(depth["at"]).tzinfo is not None
    a = depth["alert"]
    assert (a["rule"], a["subject"], a["value"], a["threshold"]) == ("queue-depth", "chc", 5, 3)
    assert a["message"] == "5 packets waiting for chc (threshold 3)"
    assert raised["queue-age:chc"][0]["alert"]["threshold"] == 2.0
    # rounded to 0.1 s: 2.04 shows as 2.0
    assert raised["queue-age:chc"][0]["alert"]["value"] >= 2.0
    silent = raised["peer-silent:chc"][-1]["alert"]
    # silent past the 2 s threshold, shown rounded to 0.1 s (2.04 s shows as 2.0)
    assert silent["rule"] == "peer-silent" and silent["value"] >= 2.0
    assert "health probe failed" in silent["message"]
    assert set(hook.types) == {"application/json; charset=utf-8"}

    page = it.get("/ui/it")
    for key in keys:
        assert f'data-key="{key}"' in page
    assert "✘" in section(page, "peers")

    # several more rounds run (the shown value is refreshed) without a second raise or POST
    seen: set[str] = set()
    wait_for(
        lambda: seen.add(active(core)["peer-silent:chc"]["updated_at"]) or len(seen) >= 4,
        what="four more alert rounds",
    )
    assert {
        k: len(v) - before.get(k, 0) for k, v in hook.events("raised").items()
    } == dict.fromkeys(keys, 1)

    chc.start()
    chc.wait_ready()
    wait_for(
        lambda: keys <= set(hook.events("cleared")),
        timeout=60,
        what="the alerts to clear at the webhook",
    )
    cleared = hook.events("cleared")
    assert {k: len(v) - before.get(k, 0) for k, v in cleared.items()} == dict.fromkeys(keys, 1)
    assert cleared["queue-depth:chc"][0]["alert"]["raised_at"] == a["raised_at"]
    assert "cleared_at" in cleared["queue-depth:chc"][0]["alert"]
    wait_for(lambda: 'class="ok no-alerts"' in it.get("/ui/it"), what="a quiet IT page")

    rows = alert_audit(core)
    expected = [
        (o, f"{w} {k}")
        for k in keys
        for o, w in (("4", "raised"), ("0", "cleared"))
        for _ in range(1 + before.get(k, 0))
    ]
    assert sorted(
        (r["outcome"], " ".join(r["message"].split(" ")[:2]).rstrip(":"))
        for r in rows
        if "chc" in r["message"]
    ) == sorted(expected)
    assert {r["code"] for r in rows} == {"peer-silent", "queue-depth", "queue-age"}


@pytest.mark.slow
def test_tampered_audit_chain_raises_an_alert(watched: Alliance, hook: Hook) -> None:
    core = watched.node("core")
    it = Browser(core).login("it")
    wait_for(lambda: 'class="ok no-alerts"' in it.get("/ui/it"), what="a quiet start")
    db = Path(core.plan.storage_dsn.removeprefix("sqlite:///"))
    with sqlite3.connect(db, timeout=30) as conn:
        (resource,) = conn.execute("SELECT resource FROM audit WHERE seq = 1").fetchone()
        conn.execute(
            "UPDATE audit SET resource = ? WHERE seq = 1",
            (resource.replace("node started", "node started!"),),
        )
    conn.close()
    wait_for(lambda: "audit-chain" in hook.events("raised"), what="the chain alert")
    doc = hook.events("raised")["audit-chain"][0]["alert"]
    assert doc["rule"] == "audit-chain" and doc["subject"] == "audit"
    assert doc["message"].startswith("audit chain fails to verify: record #1")
    assert 'data-key="audit-chain"' in it.get("/ui/it")
    auditor = Browser(core).login("auditor")
    assert 'class="chain bad"' in auditor.get("/ui/audit")
