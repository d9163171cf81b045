"""Nothing acknowledged that was not stored: the LIS adapter in a real node process, fed by
python-hl7's MLLP client. A different message under an already used MSH-3/MSH-4/MSH-10 is a
new message (stored, AA, the reuse audited and shown to IT); a true re-send (same content,
MSH-7 restamped) gets the original ACK and is stored once; a node killed between the ACK (the
results journal's commit) and the message's expansion into the FHIR store stores it exactly
once after its restart."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hl7
import orjson
import pytest
from hl7.client import MLLPClient
from sqlalchemy import func, select

from bridge.audit.events import event_fields
from bridge.audit.tables import AuditRecord
from bridge.fhirstore.tables import FHIR_RESOURCE
from bridge.local.intake import RECORD_ID_REUSED
from bridge.results.tables import RESULT_JOURNAL, RESULT_MESSAGE
from bridge.store.db import Store
from tests.harness import Alliance, NodeProcess, free_port_block, results_stored
from tests.lis_site import write_site
from tests.test_web import Browser, section

pytestmark = pytest.mark.slow

FIX = Path(__file__).parent / "fixtures" / "hl7" / "lis"
BASE = (
    (FIX / "oru_r01_v251_utf8.hl7")
    .read_bytes()
    .replace(b"|LIS-DH|FXLAB|", b"|LIS-RE|FXLAB|")
    .replace(b"|LIS20261120-0001|", b"|REUSED-0001|")
)
AUDIT = AuditRecord.__table__  # type: ignore[attr-defined]
FIXTURE_OBSERVATIONS = 9  # the fixture's OBX segments, one Observation each


@pytest.fixture(scope="module")
def core(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("lis-once")
    site = write_site(root / "mappings" / "fxlab")
    port = free_port_block(1)
    members = [
        {
            "id": "core",
            "zh": "复兴医院",
            "en": "Fuxing Hospital",
            "role": "core",
            "adapters": [
                {"type": "lis-hl7", "name": "lis", "mappings": str(site), "options": {"port": port}}
            ],
        }
    ]
    a = Alliance(root / "alliance", members, [])
    a.start("core")
    node = a.node("core")
    store = Store(node.plan.storage_dsn)
    try:
        yield {"node": node, "port": port, "store": store}
    finally:
        store.dispose()
        a.stop_all()


def send(port: int, *messages: bytes) -> list[bytes]:
    """The ACKs (raw, unframed), one connection."""
    out = []
    with MLLPClient("127.0.0.1", port) as client:
        client.socket.settimeout(30)
        for m in messages:
            raw = client.send_message(m)
            while not raw.endswith(b"\x1c\r"):
                more = client.socket.recv(4096)
                if not more:  # the node closed the connection (died) before its ACK
                    raise ConnectionError(f"connection closed before the ACK: {raw!r}")
                raw += more
            out.append(raw.strip(b"\x0b\x1c\r"))
    return out


def metrics_text(node: NodeProcess) -> str:
    req = urllib.request.Request(
        node.local_url + "/metrics", headers={"Authorization": f"Bearer {node.token('it')}"}
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return str(r.read().decode())


def msa(ack: bytes) -> tuple[str, str]:
    seg = hl7.parse(ack.decode()).segment("MSA")
    return str(seg(1)), str(seg(2))


def kept(store: Store, raw: bytes) -> int:
    with store.read() as conn:
        return conn.execute(
            select(func.count()).select_from(RESULT_MESSAGE).where(RESULT_MESSAGE.c.raw == raw)
        ).scalar()


def reports_by_filler(store: Store) -> dict[str, dict[str, Any]]:
    with store.read() as conn:
        rows = conn.execute(
            select(FHIR_RESOURCE.c.body).where(FHIR_RESOURCE.c.rtype == "DiagnosticReport")
        ).all()
    out = {}
    for r in rows:
        dr = orjson.loads(r.body)
        out[dr["identifier"][0]["value"]] = dr
    return out


def reuse_audits(store: Store) -> list[dict[str, Any]]:
    with store.read() as conn:
        rows = conn.execute(
            select(AUDIT.c.resource).where(AUDIT.c.action == RECORD_ID_REUSED).order_by(AUDIT.c.seq)
        ).all()
    return [event_fields(orjson.loads(r.resource)) for r in rows]


def test_different_message_under_a_used_control_id_is_stored(core: dict[str, Any]) -> None:
    store: Store = core["store"]
    first = BASE
    # a different message (other reports, another value) under the same MSH-3/MSH-4/MSH-10
    second = (
        BASE.replace(b"LAB-2026-0001", b"LAB-2026-9001")
        .replace(b"LAB-2026-0002", b"LAB-2026-9002")
        .replace(b"||11.2|", b"||12.4|")
    )
    acks = send(core["port"], first, second)
    assert [msa(a) for a in acks] == [("AA", "REUSED-0001"), ("AA", "REUSED-0001")]
    results_stored(store)
    assert kept(store, first) == 1 and kept(store, second) == 1  # both stored, raw kept
    drs = reports_by_filler(store)
    assert {"LAB-2026-0001", "LAB-2026-0002", "LAB-2026-9001", "LAB-2026-9002"} <= set(drs)
    with store.read() as conn:
        wbc = [
            orjson.loads(r.body)
            for r in conn.execute(
                select(FHIR_RESOURCE.c.body).where(FHIR_RESOURCE.c.rtype == "Observation")
            )
        ]
    values = sorted(
        o["valueQuantity"]["value"]
        for o in wbc
        if any(c["code"] == "WBC" for c in o["code"]["coding"])
    )
    assert values == [11.2, 12.4]
    # the reuse is audited once (for the second message), naming the sender and the id
    [audit] = reuse_audits(store)
    assert audit["actor"] == "adapter:lis" and audit["outcome"] == "4"
    assert "REUSED-0001" in audit["message"] and "LIS-RE/FXLAB" in audit["message"]
    assert "110102195003151234" not in audit["message"]
    # and IT sees it on its page
    page = Browser(core["node"]).login("it").get("/ui/it")
    table = section(page, "reused-ids")
    assert "REUSED-0001" in table and "adapter:lis" in table


def test_true_resend_gets_the_original_ack_and_is_stored_once(core: dict[str, Any]) -> None:
    store: Store = core["store"]
    original = BASE.replace(b"|REUSED-0001|", b"|RESEND-0001|").replace(
        b"LAB-2026-000", b"LAB-2026-700"
    )
    restamped = original.replace(b"|20261120093000|", b"|20261120094512|")  # MSH-7 only
    assert restamped != original
    [ack1] = send(core["port"], original)
    results_stored(store)
    with store.read() as conn:
        before = dict(conn.execute(select(FHIR_RESOURCE.c.id, FHIR_RESOURCE.c.version)).all())
    audits = len(reuse_audits(store))
    [ack2, ack3] = send(core["port"], restamped, original)
    assert msa(ack1) == ("AA", "RESEND-0001")
    assert ack2 == ack1 and ack3 == ack1  # the stored ACK, byte for byte (same ACK MSH-10)
    results_stored(store)
    assert kept(store, original) == 1 and kept(store, restamped) == 0
    with store.read() as conn:
        after = dict(conn.execute(select(FHIR_RESOURCE.c.id, FHIR_RESOURCE.c.version)).all())
    assert after == before  # nothing written again
    assert len(reuse_audits(store)) == audits  # a re-send is no reuse


@pytest.mark.parametrize(
    "point", ["journal.before_expand", "journal.before_commit", "journal.after_commit"]
)
def test_a_crash_between_the_ack_and_the_fhir_store_loses_nothing_and_stores_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, point: str
) -> None:
    """The ACK follows the results journal's commit; the node is killed as its job expands
    the message (before, inside, just after the expansion's transaction). After a restart the
    message is in the FHIR store exactly once, and the LIS's re-send gets the original ACK."""
    site = write_site(tmp_path / "mappings" / "fxlab")
    port = free_port_block(1)
    members = [
        {
            "id": "core",
            "zh": "复兴医院",
            "en": "Fuxing Hospital",
            "role": "core",
            "adapters": [
                {"type": "lis-hl7", "name": "lis", "mappings": str(site), "options": {"port": port}}
            ],
        }
    ]
    message = BASE.replace(b"|REUSED-0001|", b"|CRASH-0001|").replace(
        b"LAB-2026-000", b"LAB-2026-800"
    )
    a = Alliance(tmp_path / "alliance", members, [])
    monkeypatch.setenv("HUTONG_FAULT", point)
    a.start("core")
    node = a.node("core")
    store = Store(node.plan.storage_dsn)
    try:
        [ack] = send(port, message)
        assert msa(ack) == ("AA", "CRASH-0001")
        assert node.proc is not None
        assert node.proc.wait(timeout=30) == -9  # killed at the point, by itself
        monkeypatch.delenv("HUTONG_FAULT")
        node.start()
        node.wait_ready()
        results_stored(store)
        assert kept(store, message) == 1
        with store.read() as conn:
            reports = [
                orjson.loads(r.body)["identifier"][0]["value"]
                for r in conn.execute(
                    select(FHIR_RESOURCE.c.body).where(FHIR_RESOURCE.c.rtype == "DiagnosticReport")
                )
            ]
            observations = conn.execute(
                select(func.count(), func.max(FHIR_RESOURCE.c.version)).where(
                    FHIR_RESOURCE.c.rtype == "Observation"
                )
            ).one()
            journal = conn.execute(select(func.count()).select_from(RESULT_JOURNAL)).scalar()
        assert sorted(reports) == ["LAB-2026-8001", "LAB-2026-8002"]  # once each
        assert observations[0] == FIXTURE_OBSERVATIONS and observations[1] == 1
        assert journal == 0
        # IT's view: nothing waiting, nothing failed, the bound (/metrics)
        metrics = metrics_text(node)
        assert 'hutong_results_journal{node="core",state="waiting"} 0.0' in metrics
        assert 'hutong_results_journal{node="core",state="failed"} 0.0' in metrics
        assert 'hutong_results_journal_oldest_seconds{node="core"} 0.0' in metrics
        assert 'hutong_results_journal_limit{node="core"} 2000.0' in metrics
        [again] = send(port, message)  # the LIS did not trust the first ACK: the stored one
        assert again == ack
        assert kept(store, message) == 1
    finally:
        store.dispose()
        a.stop_all()
