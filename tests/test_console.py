"""The operations console on real node processes: the live dashboard, pause/resume, /metrics.

Three nodes (core with a real LIS channel, two community centres). IT pauses sending to one
centre: packets for it stay queued with no attempt while packets for the other centre go (both
sender jobs are woken by the same queueing), the dashboard and /metrics say so, the pause is
audited; resumed, the packets arrive and the counts move. Pausing the LIS adapter is shown and
audited the same way. /metrics is scraped with the IT token and with the separate metrics token
and parsed by prometheus-client's own parser; the Grafana dashboard JSON in docs/it is checked
against a schema and every series it queries is one the node exports.
"""

from __future__ import annotations

import csv
import io
import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import jsonschema_rs
import pytest
from prometheus_client.parser import text_string_to_metric_families

from simulators.ports import free_port_block
from tests.factory import bundle
from tests.harness import ROOT, Alliance, NodeProcess, db_rows, wait_for
from tests.test_web import Browser, section

pytestmark = pytest.mark.slow

MEMBERS_BASE = [
    {"id": "core", "zh": "复兴医院", "en": "Fuxing Hospital", "role": "core"},
    {"id": "chc", "zh": "月坛社区卫生服务中心", "en": "Yuetan CHC", "role": "community"},
    {"id": "sec", "zh": "展览路社区卫生服务中心", "en": "Zhanlanlu CHC", "role": "community"},
]
RULES = [
    {"from": "core", "to": "chc", "kinds": ["result.lab"]},
    {"from": "core", "to": "sec", "kinds": ["result.lab"]},
]
GRAFANA = ROOT / "docs" / "it" / "grafana-hutong.json"
METRICS_TOKEN = "prom-scrape-token-0123456789abcdef"


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Alliance]:
    from tests.lis_site import write_site

    tmp = tmp_path_factory.mktemp("console")
    core, chc, sec = MEMBERS_BASE
    members = [
        {
            **core,
            "adapters": [
                {
                    "name": "lis",
                    "type": "lis-hl7",
                    "mappings": str(write_site(tmp / "mappings")),
                    "options": {"port": free_port_block(1)},
                }
            ],
        },
        chc,
        sec,
    ]
    a = Alliance(tmp / "alliance", members, RULES)
    secrets = a.files["core"].parent.parent / "secrets"
    (secrets / "core.metrics.token").write_text(METRICS_TOKEN + "\n")
    with open(a.files["core"], "a", encoding="utf-8") as f:
        f.write('\n[metrics]\ntoken = "file:../secrets/core.metrics.token"\n')
    a.start("core", "chc", "sec")
    yield a
    a.stop_all()


def scrape(node: NodeProcess, token: str | None) -> tuple[int, str, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(node.local_url + "/metrics", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers["Content-Type"], exc.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, metric: str, **labels: str) -> float | None:
    want = set(labels.items())
    for (n, ls), v in samples(text).items():
        if n == metric and want <= set(ls):
            return v
    return None


def row(page: str, cls: str, attr: str, name: str) -> list[str]:
    """The cells (tags stripped) of the dashboard row for that peer/adapter."""
    for tr in re.findall(r"<tr>(.*?)</tr>", section(page, cls), re.DOTALL):
        if f'{attr}="{name}"' in tr:
            return [
                re.sub(r"<[^>]+>", "", c).strip()
                for c in re.findall(r"<td[^>]*>(.*?)</td>", tr, re.DOTALL)
            ]
    raise AssertionError(f"no row {name} in {cls}")


def test_metrics_need_a_token_and_speak_prometheus(trio: Alliance) -> None:
    core = trio.node("core")
    assert scrape(core, None)[0] == 401
    assert scrape(core, core.token("clinician"))[0] == 401
    assert scrape(core, "wrong")[0] == 401
    status, ctype, text = scrape(core, METRICS_TOKEN)
    assert status == 200 and ctype.startswith("text/plain; version=")
    status, _, by_it = scrape(core, core.token("it"))
    assert status == 200
    assert value(by_it, "hutong_node_info", node="core", role="core") == 1.0
    assert value(text, "hutong_node_info", node="core", role="core") == 1.0
    for peer in ("chc", "sec"):
        assert value(text, "hutong_paused", kind="peer", name=peer) == 0.0
        assert value(text, "hutong_peer_queued", peer=peer) is not None
    assert value(text, "hutong_paused", kind="adapter", name="lis") == 0.0
    assert value(text, "hutong_adapter_quarantined_window", adapter="lis", window="24h") == 0.0


def test_pause_holds_one_peer_and_the_numbers_follow(trio: Alliance) -> None:
    core, chc, sec = trio.node("core"), trio.node("chc"), trio.node("sec")
    it = Browser(core).login("it")
    page = it.get("/ui/it")
    assert row(page, "live-peers", "data-peer", "chc")[1] == "▶ 运行中"
    sent_before = (
        value(scrape(core, METRICS_TOKEN)[2], "hutong_peer_sent_window", peer="chc", window="1h")
        or 0.0
    )

    status, url, page = it.open("/ui/it/pause?kind=peer&name=chc&paused=1", {})
    assert status == 200 and url.endswith("/ui/it")
    assert "已暂停: peer:chc" in page
    assert row(page, "live-peers", "data-peer", "chc")[1] == "⏸ 已暂停"
    assert row(page, "live-peers", "data-peer", "sec")[1] == "▶ 运行中"
    # a second pause changes nothing and is not audited again
    it.open("/ui/it/pause?kind=peer&name=chc&paused=1", {})

    held = core.send("chc", "result.lab", [bundle(1 + i) for i in range(3)])
    went = core.send("sec", "result.lab", [bundle(2)])
    wait_for(
        lambda: (
            db_rows(core, "SELECT state FROM outbox WHERE packet_id = :p", p=went[0])
            == [("acknowledged",)]
        ),
        what="sec's packet acknowledged",
    )
    assert (
        sorted(
            db_rows(
                core,
                "SELECT state, attempts FROM outbox WHERE next_hop = 'chc' "
                "AND packet_id IN ('" + "','".join(held) + "')",
            )
        )
        == [("queued", 0)] * 3
    )
    live = it.get("/ui/it/live")
    assert "<html" not in live and 'name="csrf"' in live
    cells = row(live, "live-peers", "data-peer", "chc")
    assert cells[1] == "⏸ 已暂停" and cells[4] == "3"
    text = scrape(core, METRICS_TOKEN)[2]
    assert value(text, "hutong_paused", kind="peer", name="chc") == 1.0
    assert value(text, "hutong_peer_queued", peer="chc") == 3.0
    assert value(text, "hutong_peer_oldest_waiting_seconds", peer="chc") > 0.0

    it.get("/ui/it")
    status, _url, page = it.open("/ui/it/pause?kind=peer&name=chc&paused=0", {})
    assert "已恢复: peer:chc" in page
    wait_for(
        lambda: (
            sorted(
                db_rows(
                    core, "SELECT state FROM outbox WHERE packet_id IN ('" + "','".join(held) + "')"
                )
            )
            == [("acknowledged",)] * 3
        ),
        what="the held packets acknowledged after resume",
    )
    text = scrape(core, METRICS_TOKEN)[2]
    assert value(text, "hutong_peer_queued", peer="chc") == 0.0
    assert value(text, "hutong_peer_sent_window", peer="chc", window="1h") == sent_before + 3
    cells = row(it.get("/ui/it"), "live-peers", "data-peer", "chc")
    assert cells[1] == "▶ 运行中" and cells[3].split(" / ")[0] == str(int(sent_before + 3))
    # the centre's own dashboard counts what it received from core
    chc_it = Browser(chc).login("it")
    assert int(row(chc_it.get("/ui/it"), "live-peers", "data-peer", "core")[2].split(" / ")[0]) >= 3
    assert sec.api("GET", "/health")["node"] == "sec"

    rows = audit_rows(core, "paused") + audit_rows(core, "resumed")
    assert [(r["action"], r["message"]) for r in rows if "peer:chc" in r["message"]] == [
        ("paused", "paused peer:chc"),
        ("resumed", "resumed peer:chc"),
    ]


def test_pause_an_adapter_and_refuse_unknown_names(trio: Alliance) -> None:
    from tests.test_lis_mllp import GBK, msa, send

    core = trio.node("core")
    it = Browser(core).login("it")
    # a lab message in an undeclared charset: NAKed and quarantined by the LIS channel
    port = int(next(a for a in core.plan.adapters if a.name == "lis").options["port"])
    (ack,) = send(port, GBK.replace(b"|CHN|GB18030\r", b"|CHN|\r"))
    assert msa(ack)[0] == "AR"
    cells = row(it.get("/ui/it"), "live-adapters", "data-adapter", "lis")
    assert cells[6] == "1 / 1" and cells[4] == "0"  # quarantined last hour / day; queued
    text = scrape(core, METRICS_TOKEN)[2]
    assert value(text, "hutong_adapter_quarantined_window", adapter="lis", window="1h") == 1.0
    assert value(text, "hutong_adapter_received_window", adapter="lis", window="24h") == 0.0
    assert value(text, "hutong_adapter_queued", adapter="lis") == 0.0
    it.get("/ui/it")
    _s, _u, page = it.open("/ui/it/pause?kind=adapter&name=lis&paused=1", {})
    assert row(page, "live-adapters", "data-adapter", "lis")[1] == "⏸ 已暂停"
    assert value(scrape(core, METRICS_TOKEN)[2], "hutong_paused", kind="adapter", name="lis") == 1.0
    _s, _u, page = it.open("/ui/it/pause?kind=adapter&name=lis&paused=0", {})
    assert row(page, "live-adapters", "data-adapter", "lis")[1] == "▶ 运行中"
    status, _u, page = it.open("/ui/it/pause?kind=adapter&name=..%2Fetc&paused=1", {})
    assert status == 404 and "..%2Fetc" not in page
    status, _u, _p = it.open("/ui/it/pause?kind=peer&name=chc&paused=1", {}, csrf=False)
    assert status == 403  # no anti-forgery token: refused, nothing paused
    clinician = Browser(core).login("clinician")
    clinician.get("/ui/")
    status, _u, _p = clinician.open("/ui/it/pause?kind=peer&name=chc&paused=1", {})
    assert status == 403
    assert value(scrape(core, METRICS_TOKEN)[2], "hutong_paused", kind="peer", name="chc") == 0.0
    actions = [
        (r["action"], r["message"])
        for r in audit_rows(core, "paused") + audit_rows(core, "resumed")
        if "adapter:lis" in r["message"]
    ]
    assert actions == [("paused", "paused adapter:lis"), ("resumed", "resumed adapter:lis")]


def audit_rows(node: NodeProcess, action: str) -> list[dict[str, str]]:
    auditor = Browser(node).login("auditor")
    status, _url, text = auditor.open(f"/ui/audit/export.csv?action={action}")
    assert status == 200
    return list(csv.DictReader(io.StringIO(text.lstrip("\ufeff"))))


# -- the Grafana dashboard ----------------------------------------------------------------------

# The parts of Grafana's dashboard model (schemaVersion 39) an import needs: checked so the file
# in the repository loads, not only parses.
GRAFANA_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["title", "uid", "schemaVersion", "panels", "templating", "time"],
    "properties": {
        "title": {"type": "string", "minLength": 1},
        "uid": {"type": "string", "pattern": "^[a-zA-Z0-9_-]{1,40}$"},
        "schemaVersion": {"type": "integer", "minimum": 36},
        "refresh": {"type": "string"},
        "time": {"type": "object", "required": ["from", "to"]},
        "templating": {
            "type": "object",
            "required": ["list"],
            "properties": {
                "list": {"type": "array", "items": {"type": "object", "required": ["name", "type"]}}
            },
        },
        "panels": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["id", "type", "title", "gridPos", "targets", "datasource"],
                "properties": {
                    "id": {"type": "integer"},
                    "type": {"enum": ["timeseries", "stat", "table", "bargauge", "gauge"]},
                    "gridPos": {
                        "type": "object",
                        "required": ["h", "w", "x", "y"],
                        "properties": {
                            k: {"type": "integer", "minimum": 0} for k in ("h", "w", "x", "y")
                        },
                    },
                    "datasource": {
                        "type": "object",
                        "required": ["type", "uid"],
                        "properties": {"type": {"const": "prometheus"}},
                    },
                    "targets": {
                        "type": "array",
                        "minItems": 1,
                        "items": {"type": "object", "required": ["expr", "refId"]},
                    },
                },
            },
        },
    },
}


def test_grafana_dashboard_loads_and_queries_what_the_node_exports(trio: Alliance) -> None:
    doc = json.loads(GRAFANA.read_text(encoding="utf-8"))
    jsonschema_rs.validate(GRAFANA_SCHEMA, doc)
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    exported = {
        fam.name
        for fam in text_string_to_metric_families(scrape(trio.node("core"), METRICS_TOKEN)[2])
    }
    used = {
        m
        for p in doc["panels"]
        for t in p["targets"]
        for m in re.findall(r"\b(hutong_[a-z_]+)", t["expr"])
    }
    assert used and used <= exported | {f"{n}_total" for n in exported}, used - exported
