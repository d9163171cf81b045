"""What every registered adapter type promises the engine (bridge/local/contract.py).

Run over every entry point of ``hutong.adapters``, so a new adapter type is held to the same
rules the day it is registered: its options are checked before anything starts (an unknown key
refused by ``config check`` and node loading alike, naming file and key); its example options
build on a real node; ``stop`` is safe before ``start`` and twice after it; its status holds no
patient fields; an imaging-report sink (the PACS) ignores a study it does not hold. And the
dispatcher retries a sink's transient and ambiguous failures, keeps the thread's order while it
does, and dead-letters only the permanent ones.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from adapters.base import BaseAdapter
from bridge.audit.tables import AuditRecord
from bridge.config.loader import check_alliance, load_node
from bridge.errors import AmbiguousDelivery, ConfigError, HutongError, TransportError
from bridge.local.contract import (
    Adapter,
    AdapterType,
    Delivery,
    ImagingReportEvent,
    ImagingReportSink,
    PacketEvent,
    PacketSink,
    Replayable,
    Sink,
)
from bridge.local.registry import adapter_type, adapter_types
from bridge.store.tables import INBOX, QUARANTINE
from simulators.ports import free_port_block
from tests.harness import Alliance

ROOT = Path(__file__).resolve().parent.parent
AUDIT = AuditRecord.__table__  # type: ignore[attr-defined]
TYPES = sorted(adapter_types())
MEMBERS = [
    {"id": "core", "zh": "复兴医院", "en": "Fuxing Hospital", "role": "core"},
    {"id": "chc", "zh": "月坛社区卫生服务中心", "en": "Yuetan CHC", "role": "community"},
]
RULES = [{"from": "chc", "to": "core", "kinds": ["referral.request"]}]
#: what a site adds to a type's example options on this machine (a folder, a free port)
LISTEN_KEY = {"his-hl7": "listen", "pacs-dicom": "bind"}
#: status keys an adapter may add to the common ones: addresses and names of its peers
STATUS_EXTRA = {
    "listen",
    "his",
    "url",
    "bind",
    "port",
    "tls",
    "connections",
    "pending_studies",
    "cursor",
}
PATIENT_WORDS = ("patient", "name", "mrn", "id_number", "phone", "birth", "gender", "address")


def site_options(kind: str, tmp: Path, port: int) -> dict[str, Any]:
    opts = dict(adapter_type(kind).example)
    if kind == "his-middle-db":
        opts.update(
            dsn=f"sqlite:///{tmp / 'his.db'}", fields=str(ROOT / "simulators" / "his_db_site")
        )
    elif kind == "lis-hl7":
        opts["port"] = port
    elif kind in LISTEN_KEY:
        opts[LISTEN_KEY[kind]] = f"127.0.0.1:{port}"
    return opts


def alliance_with(tmp: Path, kind: str, options: dict[str, Any]) -> Alliance:
    members = [
        dict(MEMBERS[0], adapters=[{"name": "local", "type": kind, "options": options}]),
        MEMBERS[1],
    ]
    return Alliance(tmp / "alliance", members, RULES)


def test_every_entry_point_declares_an_adapter_type() -> None:
    assert set(TYPES) >= {"his-hl7", "his-middle-db", "his-xml-ws", "lis-hl7", "pacs-dicom"}
    for kind in TYPES:
        t = adapter_type(kind)
        assert isinstance(t, AdapterType)
        assert t.name == kind  # the declaration names the type it is registered as
        assert t.options.model_config.get("extra") == "forbid"


@pytest.mark.parametrize("kind", TYPES)
def test_an_unknown_option_is_refused_naming_file_and_key(tmp_path: Path, kind: str) -> None:
    opts = site_options(kind, tmp_path, free_port_block(1))
    alliance = alliance_with(tmp_path, kind, {**opts, "no_such_option": 1})
    line = "nodes/core.toml: adapters.local.options.no_such_option: Extra inputs are not permitted"
    assert check_alliance(alliance.folder) == [line]
    # node loading (what `hutong run` does first) refuses it the same way, before any store
    with pytest.raises(ConfigError) as caught:
        load_node(alliance.files["core"])
    assert caught.value.problems == [line]
    assert not (alliance.folder / "data").exists()


@pytest.mark.parametrize("kind", TYPES)
def test_example_options_check_build_stop_twice_and_status(tmp_path: Path, kind: str) -> None:
    from bridge.node import Node

    alliance = alliance_with(tmp_path, kind, site_options(kind, tmp_path, free_port_block(1)))
    assert check_alliance(alliance.folder) == []
    node = Node(load_node(alliance.files["core"]))
    try:
        adapter = node.adapters["local"]
        assert isinstance(adapter, Adapter)
        assert adapter.name == "local"
        adapter.stop()  # before start: nothing to close, no error
        adapter.start()
        status = adapter.status()
        json.dumps(status)  # plain data for the IT page and alerts
        assert status["name"] == "local"
        assert (
            set(status)
            <= {"name", "type", "last_ok_at", "last_error", "last_error_at", "counters"}
            | STATUS_EXTRA
        )
        assert all(isinstance(n, int) for n in status["counters"].values())  # counts only
        fields = [
            k for k in _keys({k: v for k, v in status.items() if k not in ("name", "counters")})
        ]
        assert not [k for k in fields if any(w in k.lower() for w in PATIENT_WORDS)]
        # the PACS keeps other members' imaging reports with the studies it holds; a study it
        # does not hold (or a UID that is none) is not its business: None, nothing stored
        assert isinstance(adapter, ImagingReportSink) == (kind == "pacs-dicom")
        if isinstance(adapter, ImagingReportSink):
            for uid in ("1.2.826.0.1.3680043.8.498.9", "../1.2"):
                ev = ImagingReportEvent(
                    key="P1:r1",
                    sender="chc",
                    thread=None,
                    study_uid=uid,
                    report={"resourceType": "DiagnosticReport", "id": "r1"},
                )
                assert adapter.on_imaging_report(ev) is None
            assert adapter.host.resource_info("DiagnosticReport", "r1") is None
        adapter.stop()
        adapter.stop()  # twice: safe
        if isinstance(adapter, Sink):
            adapter.flush()
        # packets reach an adapter as typed events only: none takes the raw ``deliver(item)``
        # (BaseAdapter's refusal stays), the engine's own spool handler does
        assert getattr(type(adapter), "deliver", BaseAdapter.deliver) is BaseAdapter.deliver
        if kind == "pacs-dicom":
            assert isinstance(adapter, PacketSink)
        if kind in ("his-hl7", "his-middle-db", "his-xml-ws", "lis-hl7"):
            assert isinstance(adapter, Replayable)
    finally:
        node.close()  # a third stop, as the node does at exit


def _keys(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield str(k)
            yield from _keys(v)


def test_listener_ports_may_not_clash(tmp_path: Path) -> None:
    """Two adapters on one port, or an adapter on the node's own port: refused by the check."""
    port = free_port_block(1)
    members = [
        dict(
            MEMBERS[0],
            adapters=[
                {"name": "lis", "type": "lis-hl7", "options": {"port": port}},
                {
                    "name": "his",
                    "type": "his-hl7",
                    "options": {"listen": f"0.0.0.0:{port}", "his": "127.0.0.1:9"},
                },
            ],
        ),
        MEMBERS[1],
    ]
    alliance = Alliance(tmp_path / "alliance", members, RULES)
    assert check_alliance(alliance.folder) == [
        (
            f"nodes/core.toml: adapters.his.options: listens on 0.0.0.0:{port}, which is also "
            f"adapters.lis's port"
        )
    ]
    # on the node's own local port
    core = alliance.files["core"]
    local = tomllib.loads(core.read_text())["local_bind"]
    text = core.read_text().replace(f'"listen" = "0.0.0.0:{port}"', f'"listen" = "{local}"')
    core.write_text(text)
    assert check_alliance(alliance.folder) == [
        (
            f"nodes/core.toml: adapters.his.options: listens on {local}, which is also "
            f"local_bind's port"
        )
    ]


def test_a_missing_type_and_mapping_folder_are_named(tmp_path: Path) -> None:
    members = [
        dict(
            MEMBERS[0],
            adapters=[{"name": "his", "type": "his-nowhere", "mappings": "../no-such-folder"}],
        ),
        MEMBERS[1],
    ]
    alliance = Alliance(tmp_path / "alliance", members, RULES)
    assert check_alliance(alliance.folder) == [
        "nodes/core.toml: adapters.his.mappings: no mapping folder ../no-such-folder",
        "nodes/core.toml: adapters.his.type: unknown adapter type 'his-nowhere' (installed: "
        + ", ".join(TYPES)
        + ")",
    ]


@pytest.mark.slow  # runs the CLI as a process
def test_config_check_command_names_file_and_key(tmp_path: Path) -> None:
    """`hutong config check` on the node file fails naming file and key; what it passes, the
    node loads (the same check runs in both)."""
    opts = site_options("lis-hl7", tmp_path, free_port_block(1))
    alliance = alliance_with(tmp_path, "lis-hl7", {**opts, "timezone": "Beijing", "prot": 1})
    r = subprocess.run(
        [sys.executable, "-m", "bridge.cli", "config", "check", str(alliance.files["core"])],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
        env={"COLUMNS": "400", "PATH": "/usr/bin:/bin"},
    )
    assert r.returncode != 0
    assert "adapters.local.options.timezone: String should match pattern" in r.stderr
    assert "adapters.local.options.prot: Extra inputs are not permitted" in r.stderr
    assert "core.toml" in r.stderr
    good = alliance_with(tmp_path / "good", "lis-hl7", opts)
    r = subprocess.run(
        [sys.executable, "-m", "bridge.cli", "config", "check", str(good.files["core"])],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
        env={"COLUMNS": "400", "PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 0, r.stderr
    load_node(good.files["core"])


# -- the dispatcher and a sink's failure classes ---------------------------------------------


class Scripted:
    """A sink that fails as told, packet by packet, and records what it was handed."""

    def __init__(self, fail: dict[str, list[BaseException]]) -> None:
        self.fail = fail
        self.taken: list[str] = []

    def deliver(self, item: Delivery) -> None:
        queue = self.fail.get(item.packet_id) or []
        if queue:
            raise queue.pop(0)
        if item.packet_id not in self.taken:  # idempotent by packet id
            self.taken.append(item.packet_id)

    def flush(self) -> None:
        pass


class Events:
    """A sink of its own kinds' events: records each decoded Bundle it was handed."""

    def __init__(self) -> None:
        self.events: list[PacketEvent] = []

    def on_packet(self, ev: PacketEvent) -> None:
        self.events.append(ev)

    def deliver(self, item: Delivery) -> None:
        raise AssertionError("an event sink is never handed the raw packet")

    def flush(self) -> None:
        pass


def _inbox(node: Any, packet_id: str, thread: str, seq: int, body: bytes = b"{}") -> None:
    now = datetime.now(UTC)
    with node.ctx.store.write() as conn:
        conn.execute(
            INBOX.insert().values(
                packet_id=packet_id,
                sender="chc",
                kind="test.ping",
                thread=thread,
                seq=seq,
                digest="0" * 64,
                size=len(body),
                state="received",
                attempts=0,
                created_at=now,
                received_at=now,
                next_try_at=now,
                body=body,
                receipt=b"",
            )
        )


def _rows(node: Any) -> dict[str, Any]:
    with node.ctx.store.read() as conn:
        return {r.packet_id: r for r in conn.execute(select(INBOX))}


def test_transient_and_ambiguous_failures_are_retried_permanent_ones_dead_lettered(
    tmp_path: Path,
) -> None:
    from bridge.node import Node

    alliance = Alliance(tmp_path / "alliance", MEMBERS, RULES)
    node = Node(load_node(alliance.files["core"]))
    try:
        sink = Scripted(
            {
                "p-transient": [TransportError("HIS refused the connection")],
                "p-oserror": [ConnectionResetError("reset")],
                "p-ambiguous": [AmbiguousDelivery("sent, no answer")],
                "p-bug": [KeyError("a bug")],
                "p-permanent": [HutongError("the HIS refused this content")],
            }
        )
        node.dispatcher.handlers = {"test.*": sink}
        for i, pid in enumerate(
            ["p-transient", "p-oserror", "p-ambiguous", "p-bug", "p-permanent"]
        ):
            _inbox(node, pid, f"t-{i}", 1)
        _inbox(node, "p-after", "t-0", 2)  # behind the transient failure on its thread
        node.dispatcher.run_once()
        rows = _rows(node)
        assert sink.taken == []
        for pid, error in (
            ("p-transient", "HT-TRANSPORT: HIS refused the connection"),
            ("p-oserror", ("HT-TRANSPORT: local handler failed: ConnectionResetError")),
            ("p-ambiguous", "HT-AMBIGUOUS: sent, no answer"),
            ("p-bug", "HT-AMBIGUOUS: local handler failed: KeyError"),
        ):
            assert (rows[pid].state, rows[pid].attempts, rows[pid].last_error) == (
                "received",
                1,
                error,
            )
        assert rows["p-after"].state in ("received", "held")  # waits behind its thread's head
        assert (rows["p-permanent"].state, rows["p-permanent"].attempts) == ("failed", 1)
        with node.ctx.store.read() as conn:
            dead = conn.execute(select(QUARANTINE.c.source, QUARANTINE.c.packet_id)).all()
        assert [(d.source, d.packet_id) for d in dead] == [("delivery", "p-permanent")]
        # the backoff is over: every retried packet is taken, and its thread's next one after it
        with node.ctx.store.write() as conn:
            conn.execute(INBOX.update().values(next_try_at=datetime.now(UTC)))
        for _ in range(3):
            node.dispatcher.run_once()
        assert sink.taken.index("p-transient") < sink.taken.index("p-after")
        assert sorted(sink.taken) == ["p-after", "p-ambiguous", "p-bug", "p-oserror", "p-transient"]
        assert {pid: r.state for pid, r in _rows(node).items()} == {
            "p-transient": "delivered",
            "p-oserror": "delivered",
            "p-ambiguous": "delivered",
            "p-bug": "delivered",
            "p-after": "delivered",
            "p-permanent": "failed",
        }
        # IT fixed the local side: the dead letter is replayed from quarantine and delivered,
        # past the thread gate (its turn was used), which is left as it was
        from bridge import ops
        from bridge.store.tables import THREAD_PARTY

        with node.ctx.store.read() as conn:
            qid = conn.execute(select(QUARANTINE.c.id)).scalar_one()
        _inbox(node, "p-next", "t-4", 2)  # the thread went on meanwhile
        node.dispatcher.run_once()
        assert ops.quarantine_replay(node.ctx, node.intake, qid, actor="it") == (
            True,
            "queued for delivery again",
        )
        assert ops.quarantine_replay(node.ctx, node.intake, qid, actor="it")[0] is False
        node.dispatcher.run_once()
        assert sink.taken[-2:] == ["p-next", "p-permanent"]
        assert _rows(node)["p-permanent"].state == "delivered"
        with node.ctx.store.read() as conn:
            due = conn.execute(
                select(THREAD_PARTY.c.next_seq).where(THREAD_PARTY.c.thread == "t-4")
            ).scalar_one()
            audit = [
                (r.action, r.outcome)
                for r in conn.execute(
                    select(AUDIT.c.action, AUDIT.c.outcome)
                    .where(AUDIT.c.packet_id == "p-permanent")
                    .order_by(AUDIT.c.seq)
                )
            ]
        assert due == 3  # not moved back by the redelivery of seq 1
        assert audit == [("dead-lettered", "8"), ("replayed", "0"), ("delivered", "0")]
    finally:
        node.close()


def test_an_adapters_own_kinds_arrive_as_a_decoded_bundle(tmp_path: Path) -> None:
    """A kind no engine step applies reaches a PacketSink as ``on_packet(PacketEvent)``: the
    Bundle decoded once by the dispatcher. A body that is no Bundle is never handed over: it is
    dead-lettered at once (it would not decode on a retry either)."""
    from bridge.node import Node

    alliance = Alliance(tmp_path / "alliance", MEMBERS, RULES)
    node = Node(load_node(alliance.files["core"]))
    try:
        sink = Events()
        node.dispatcher.handlers = {"test.*": sink}
        bundle = {
            "resourceType": "Bundle",
            "type": "collection",
            "entry": [
                {"resource": {"resourceType": "Basic", "id": "b-1", "code": {"text": "化验"}}}
            ],
        }
        _inbox(node, "p-bundle", "t-1", 1, json.dumps(bundle).encode())
        _inbox(node, "p-list", "t-2", 1, b"[1, 2]")
        _inbox(node, "p-garbage", "t-3", 1, b"\xff{not json")
        assert node.dispatcher.run_once() == 1
        (ev,) = sink.events
        assert (
            ev.packet.packet_id,
            ev.packet.kind,
            ev.packet.thread,
            ev.packet.seq,
            ev.packet.sender,
        ) == ("p-bundle", "test.ping", "t-1", 1, "chc")
        assert ev.bundle == bundle
        rows = _rows(node)
        assert {pid: (r.state, r.attempts) for pid, r in rows.items()} == {
            "p-bundle": ("delivered", 1),
            "p-list": ("failed", 1),
            "p-garbage": ("failed", 1),
        }
        assert (
            rows["p-list"].last_error
            == "HT-PKT-MALFORMED: packet p-list: body is not a FHIR Bundle"
        )
        assert (
            rows["p-garbage"].last_error == "HT-PKT-MALFORMED: packet p-garbage: body is not JSON"
        )
        with node.ctx.store.read() as conn:
            dead = conn.execute(
                select(QUARANTINE.c.source, QUARANTINE.c.packet_id).order_by(QUARANTINE.c.packet_id)
            ).all()
        assert [(d.source, d.packet_id) for d in dead] == [
            ("delivery", "p-garbage"),
            ("delivery", "p-list"),
        ]
    finally:
        node.close()
