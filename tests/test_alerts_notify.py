"""Alerts that fire early and reach people: peer unreachable after one failed probe and a grace,
quarantine, dead letters, disk, key renewal; WeCom/DingTalk robot bodies and e-mail.

The node-process test runs a real core node with a real LIS channel, a webhook receiver that
answers as a WeCom robot does (``{"errcode": 0}``) and a real SMTP server (aiosmtpd) on a free
port. Stopping the peer raises ``peer-unreachable`` once on the page, at the robot and by
e-mail; starting it clears it once. A lab result the LIS sends in an undeclared charset is
quarantined and raises ``quarantine:adapter:lis``; fixed and replayed, it clears once.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email import message_from_bytes
from email.header import decode_header, make_header
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from bridge.alerts import (
    Facts,
    PeerFacts,
    _days_left,
    email_message,
    evaluate,
    webhook_body,
)
from bridge.config.models import AlertsConfig
from simulators.ports import free_port_block
from tests.harness import Alliance, wait_for
from tests.test_web import Browser, section

T0 = datetime(2026, 11, 20, 8, 0, tzinfo=UTC)
NOW = T0 + timedelta(hours=1)
QUIET = AlertsConfig(peer_silent_s=1e9, adapter_silent_s=1e9, queue_age_s=1e9)


def facts(**kw: Any) -> Facts:
    return Facts(**{"now": NOW, "started_at": T0, "peers": {}, "chain_ok": True, **kw})


def keys(f: Facts, cfg: AlertsConfig = QUIET) -> dict[str, Any]:
    return {a.key: a for a in evaluate(f, cfg)}


def test_defaults_fire_early() -> None:
    cfg = AlertsConfig()
    assert (cfg.peer_unreachable_grace_s, cfg.quarantine_held, cfg.dead_letters) == (60.0, 0, 0)
    assert (cfg.disk_free_pct, cfg.webhook_format, cfg.off) == (10.0, "json", ())


def test_peer_unreachable_after_the_grace_only() -> None:
    def peer(failing_for: float | None) -> PeerFacts:
        return PeerFacts(
            "chc",
            last_probe_ok=NOW - timedelta(seconds=70),
            last_probe_error="health probe failed: ConnectionRefusedError",
            failing_since=None if failing_for is None else NOW - timedelta(seconds=failing_for),
        )

    assert keys(facts(peers={"chc": peer(59.9)})) == {}
    assert keys(facts(peers={"chc": peer(None)})) == {}
    got = keys(facts(peers={"chc": peer(60)}))
    assert list(got) == ["peer-unreachable:chc"]
    a = got["peer-unreachable:chc"]
    assert (a.rule, a.subject, a.value, a.threshold) == ("peer-unreachable", "chc", 60.0, 60.0)
    assert a.message == (
        "chc unreachable for 60 s (grace 60 s): health probe failed: ConnectionRefusedError"
    )
    # the grace is configurable; rules can be turned off one by one
    assert list(
        keys(
            facts(peers={"chc": peer(5)}),
            QUIET.model_copy(update={"peer_unreachable_grace_s": 4.0}),
        )
    ) == ["peer-unreachable:chc"]
    assert (
        keys(
            facts(peers={"chc": peer(600)}), QUIET.model_copy(update={"off": ("peer-unreachable",)})
        )
        == {}
    )


def test_quarantine_dead_letters_disk_and_keys() -> None:
    got = keys(
        facts(
            peers={"chc": PeerFacts("chc", dead=2, last_probe_ok=NOW)},
            quarantined={"adapter:lis": 1, "gateway": 3},
            disk_free_pct=4.44,
            key_days_left=12.5,
        )
    )
    assert sorted(got) == [
        "dead-letters:chc",
        "disk",
        "key-expiry",
        "quarantine:adapter:lis",
        "quarantine:gateway",
    ]
    assert (got["dead-letters:chc"].value, got["dead-letters:chc"].threshold) == (2, 0)
    assert got["quarantine:adapter:lis"].message == (
        "1 items held in quarantine from adapter:lis (threshold 0)"
    )
    assert got["quarantine:gateway"].value == 3
    assert (got["disk"].value, got["disk"].threshold) == (4.4, 10.0)
    assert got["key-expiry"].value == 12.5 and got["key-expiry"].threshold == 30
    # thresholds are thresholds: at or under them, nothing
    calm = QUIET.model_copy(
        update={
            "quarantine_held": 3,
            "dead_letters": 2,
            "disk_free_pct": 4.0,
            "key_expiry_warn_days": 12,
        }
    )
    assert (
        keys(
            facts(
                peers={"chc": PeerFacts("chc", dead=2, last_probe_ok=NOW)},
                quarantined={"gateway": 3},
                disk_free_pct=4.44,
                key_days_left=12.5,
            ),
            calm,
        )
        == {}
    )
    certs = keys(facts(cert_days_left={"lis": 10.4, "pacs": 200.0, "his": -2.0}))
    assert sorted(certs) == ["cert-expiry:his", "cert-expiry:lis"]
    assert certs["cert-expiry:lis"].message == (
        "TLS certificate of adapter lis expires in 10 days (warn at 30)"
    )
    assert certs["cert-expiry:his"].message.startswith("TLS certificate of adapter his expired")
    assert _days_left("2026-12-20", T0) == pytest.approx(29 + 16 / 24)
    assert _days_left(None, T0) is None and _days_left("soon", T0) is None


DOC = {
    "source": "hutong",
    "node": "core",
    "node_name": "复兴医院",
    "alliance": "demo",
    "event": "raised",
    "at": "2026-11-20T08:00:00+00:00",
    "alert": {
        "key": "peer-unreachable:chc",
        "rule": "peer-unreachable",
        "subject": "chc",
        "value": 61.0,
        "threshold": 60.0,
        "message": "chc unreachable for 61 s",
    },
}


def test_robot_bodies_and_mail() -> None:
    assert webhook_body(DOC, "json") is DOC
    wecom = webhook_body(DOC, "wecom")
    assert wecom["msgtype"] == "text" and set(wecom) == {"msgtype", "text"}
    lines = wecom["text"]["content"].split("\n")
    assert lines[0] == "[互通告警] 对方机构不可达 · chc · 复兴医院"
    assert "说明 message: chc unreachable for 61 s" in lines
    ding = webhook_body({**DOC, "event": "cleared"}, "dingtalk")
    assert ding["msgtype"] == "text"
    assert ding["text"]["content"].startswith("[互通告警解除] 对方机构不可达 · chc")
    mail = email_message(DOC, "hutong@core.example", ("it@core.example", "duty@core.example"))
    assert mail["Subject"] == "[互通告警] 对方机构不可达 · chc · 复兴医院"
    assert mail["To"] == "it@core.example, duty@core.example"
    assert mail["X-Hutong-Alert"] == "raised peer-unreachable:chc"
    assert "规则 rule: peer-unreachable  对象 subject: chc" in mail.get_content()


# -- a real node, a robot and an SMTP server ----------------------------------------------------


class Robot:
    """A webhook receiver that answers as a WeCom / DingTalk robot: 200 ``{"errcode": 0}``."""

    def __init__(self) -> None:
        self.docs: list[dict[str, Any]] = []
        robot = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                robot.docs.append(json.loads(body))
                answer = b'{"errcode":0,"errmsg":"ok"}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/cgi-bin/webhook/send"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def firsts(self) -> list[str]:
        return [d["text"]["content"].split("\n")[0] for d in list(self.docs)]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


class Mailbox:
    """A real SMTP server (aiosmtpd) on a free port; keeps each message's subject."""

    def __init__(self) -> None:
        from aiosmtpd.controller import Controller

        self.subjects: list[str] = []
        self.rcpt: list[list[str]] = []
        box = self

        class Handler:
            async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
                msg = message_from_bytes(envelope.content)
                box.subjects.append(str(make_header(decode_header(msg["Subject"]))))
                box.rcpt.append(list(envelope.rcpt_tos))
                return "250 OK"

        self.port = free_port_block(1)
        self.controller = Controller(Handler(), hostname="127.0.0.1", port=self.port)
        self.controller.start()

    def close(self) -> None:
        self.controller.stop()


@pytest.fixture
def robot() -> Iterator[Robot]:
    r = Robot()
    yield r
    r.close()


@pytest.fixture
def mailbox() -> Iterator[Mailbox]:
    m = Mailbox()
    yield m
    m.close()


def count(items: list[str], prefix: str) -> int:
    """How many start with prefix (spaces ignored: a decoded Subject header may lose the space
    between an encoded word and plain text)."""
    bare = "".join(prefix.split())
    return sum(1 for s in items if "".join(s.split()).startswith(bare))


@pytest.mark.slow
def test_unreachable_peer_and_quarantine_raise_and_clear_once(
    tmp_path: Path, robot: Robot, mailbox: Mailbox
) -> None:
    from tests.lis_site import write_site
    from tests.test_lis_mllp import GBK, msa, send

    lis_port = free_port_block(1)
    members = [
        {
            "id": "core",
            "zh": "复兴医院",
            "en": "Fuxing Hospital",
            "role": "core",
            "adapters": [
                {
                    "name": "lis",
                    "type": "lis-hl7",
                    "mappings": str(write_site(tmp_path / "mappings" / "fxlab")),
                    "options": {"port": lis_port, "default_charset": "UTF-8"},
                }
            ],
        },
        {"id": "chc", "zh": "月坛社区卫生服务中心", "en": "Yuetan CHC", "role": "community"},
    ]
    a = Alliance(
        tmp_path / "alliance", members, [{"from": "core", "to": "chc", "kinds": ["result.lab"]}]
    )
    with open(a.files["core"], "a", encoding="utf-8") as f:
        f.write(
            f"\n[alerts]\nevery_s = 0.3\nprobe_timeout_s = 0.5\nchain_every_s = 5\n"
            f"peer_unreachable_grace_s = 1\npeer_silent_s = 3600\nadapter_silent_s = 3600\n"
            f'webhook_url = "{robot.url}"\nwebhook_format = "wecom"\n'
            f'smtp_host = "127.0.0.1"\nsmtp_port = {mailbox.port}\n'
            f'email_from = "hutong@core.example"\nemail_to = ["it@core.example"]\n'
        )
    core, chc = a.node("core"), a.node("chc")
    down = "[互通告警] 对方机构不可达 · chc"
    up = "[互通告警解除] 对方机构不可达 · chc"
    try:
        a.start("core", "chc")
        it = Browser(core).login("it")

        def quiet_and_answered() -> bool:
            page = it.get("/ui/it")
            return 'class="ok no-alerts"' in page and "✔" in section(page, "peers")

        wait_for(quiet_and_answered, timeout=60, what="a quiet start (chc answering)")
        # core may have probed chc before it listened: a raise then needs the grace to pass
        before = count(robot.firsts(), down)

        chc.stop()
        wait_for(
            lambda: (
                count(robot.firsts(), down) == before + 1
                and count(mailbox.subjects, down) == before + 1
            ),
            timeout=60,
            what="peer-unreachable at the robot and in the mailbox",
        )
        assert mailbox.rcpt[-1] == ["it@core.example"]
        page = it.get("/ui/it")
        assert 'data-key="peer-unreachable:chc"' in page and "对方机构不可达" in page
        chc.start()
        chc.wait_ready()
        wait_for(
            lambda: (
                count(robot.firsts(), up) == before + 1
                and count(mailbox.subjects, up) == before + 1
            ),
            timeout=60,
            what="the clear at the robot and in the mailbox",
        )
        assert 'data-key="peer-unreachable:chc"' not in it.get("/ui/it")

        # a lab result the LIS sends in an undeclared charset: NAKed, quarantined, alerted
        raw = GBK.replace(b"|CHN|GB18030\r", b"|CHN|\r")
        (ack,) = send(lis_port, raw)
        assert msa(ack)[0] == "AR"
        q_up = "[互通告警] 有数据被隔离 · adapter:lis · 复兴医院"
        wait_for(
            lambda: count(robot.firsts(), q_up) == 1 and count(mailbox.subjects, q_up) == 1,
            timeout=60,
            what="the quarantine alert",
        )
        assert 'data-key="quarantine:adapter:lis"' in it.get("/ui/it")
        (item,) = [
            q for q in core.api("GET", "/local/v1/quarantine") if q["source"] == "adapter:lis"
        ]
        toml = core.config.read_text(encoding="utf-8")
        core.config.write_text(
            toml.replace('"default_charset" = "UTF-8"', '"default_charset" = "GB18030"'),
            encoding="utf-8",
        )
        core.stop()
        core.start()
        core.wait_ready()
        assert core.api("POST", f"/local/v1/quarantine/{item['id']}/replay")["ok"] is True
        q_clear = "[互通告警解除] 有数据被隔离 · adapter:lis"
        wait_for(
            lambda: count(robot.firsts(), q_clear) == 1 and count(mailbox.subjects, q_clear) == 1,
            timeout=60,
            what="the quarantine alert to clear",
        )
        # once each, however many rounds ran
        assert count(robot.firsts(), q_up) == 1 and count(mailbox.subjects, q_up) == 1
        assert count(robot.firsts(), down) == before + 1
        assert len(robot.docs) == len(mailbox.subjects)
    finally:
        a.stop_all()


def test_adapter_tls_certificates_are_read_for_expiry(tmp_path: Path) -> None:
    """The days left come from the certificate file itself (here one valid for a day)."""
    from types import MappingProxyType, SimpleNamespace

    from bridge.alerts import Alerter
    from bridge.config.models import AdapterSettings
    from tests.lis_site import self_signed

    self_signed(tmp_path / "tls")  # writes tls/lis.crt and tls/lis.key, named below
    adapters = [
        AdapterSettings(
            name="lis",
            type="lis-hl7",
            mappings=None,
            receives=(),
            options=MappingProxyType({"tls": {"cert": "tls/lis.crt", "key": "tls/lis.key"}}),
            base_dir=tmp_path,
        ),
        AdapterSettings(
            name="his",
            type="his-hl7",
            mappings=None,
            receives=(),
            options=MappingProxyType({"tls": {"cert": str(tmp_path / "gone")}}),
            base_dir=tmp_path,
        ),
    ]
    holder = SimpleNamespace(node=SimpleNamespace(plan=SimpleNamespace(adapters=adapters)))
    now = datetime.now(UTC)
    days = Alerter._cert_days(holder, now)  # type: ignore[arg-type]
    assert set(days) == {"lis", "his"}
    assert 0.9 < days["lis"] <= 1.0 and days["his"] == -1.0
    assert sorted(keys(facts(cert_days_left=days))) == ["cert-expiry:his", "cert-expiry:lis"]
