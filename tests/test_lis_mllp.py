"""The LIS adapter in a real node process, fed over real MLLP sockets by python-hl7's MLLPClient:
results field by field, stored ACK for a re-send, correction in place, NAK + quarantine for bad
input while the listener keeps serving, TLS, per-channel rate limit."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hl7
import orjson
import pytest
from fhir.resources.R4B import get_fhir_model_class
from hl7.client import MLLPClient
from sqlalchemy import func, select

from bridge.audit.tables import AuditRecord
from bridge.fhir.validate import validate_resource
from bridge.fhirstore.tables import FHIR_HISTORY, FHIR_RESOURCE
from bridge.mapping.tables import MAPPING_GAP
from bridge.privacy import patient_hash
from bridge.results.tables import RESULT_MESSAGE
from bridge.store.db import Store
from bridge.store.tables import QUARANTINE
from tests.harness import Alliance, NodeProcess, free_port_block, results_stored, wait_for
from tests.lis_site import LOCAL, self_signed, write_site
from tests.test_lis_oru import EXPECTED_251, check_observation

pytestmark = pytest.mark.slow

FIX = Path(__file__).parent / "fixtures" / "hl7" / "lis"
UTF8 = (FIX / "oru_r01_v251_utf8.hl7").read_bytes()
GBK = (FIX / "oru_r01_v23_gb18030.hl7").read_bytes()
CORRECTED = (FIX / "oru_r01_v251_corrected.hl7").read_bytes()
NATIONAL_ID = "110102195003151234"


@pytest.fixture(scope="module")
def core(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("lis")
    site = write_site(root / "mappings" / "fxlab")
    cert, key = self_signed(root / "tls")
    base = free_port_block(3)
    ports = {"plain": base, "tls": base + 1, "slow": base + 2}
    common = {"type": "lis-hl7", "mappings": str(site)}
    members = [
        {
            "id": "core",
            "zh": "复兴医院",
            "en": "Fuxing Hospital",
            "role": "core",
            "adapters": [
                {**common, "name": "lis", "options": {"port": ports["plain"]}},
                {
                    **common,
                    "name": "lis-tls",
                    "options": {"port": ports["tls"], "tls": {"cert": str(cert), "key": str(key)}},
                },
                {
                    **common,
                    "name": "lis-slow",
                    "options": {
                        "port": ports["slow"],
                        "rate_limit": {"per_second": 0.001, "burst": 2, "hold_s": 0},
                    },
                },
            ],
        },
        {"id": "chc", "zh": "月坛社区卫生服务中心", "en": "Yuetan CHC", "role": "community"},
    ]
    rules = [{"from": "core", "to": "chc", "kinds": ["result.lab"]}]
    a = Alliance(root / "alliance", members, rules)
    a.start("core")
    node = a.node("core")
    store = Store(node.plan.storage_dsn)
    yield {"node": node, "ports": ports, "cert": cert, "store": store}
    store.dispose()
    a.stop_all()


def send(port: int, *messages: bytes, tls: ssl.SSLContext | None = None) -> list[hl7.Message]:
    """python-hl7's MLLPClient, one connection; the ACKs parsed."""
    acks = []
    with MLLPClient("127.0.0.1", port) as client:
        client.socket.settimeout(30)
        if tls is not None:
            client.socket = tls.wrap_socket(client.socket, server_hostname="127.0.0.1")
        for m in messages:
            raw = client.send_message(m)
            assert raw.startswith(b"\x0b") and raw.endswith(b"\x1c\r")
            acks.append(raw)
    return [hl7.parse(a.strip(b"\x0b\x1c\r").decode("utf-8", "replace")) for a in acks]


def msa(ack: hl7.Message) -> tuple[str, str, str]:
    seg = ack.segment("MSA")
    return (
        seg.extract_field(1, 1),
        seg.extract_field(1, 2),
        seg.extract_field(1, 3) if len(seg) > 3 else "",
    )


def resources(store: Store, rtype: str, phash: str | None = None) -> list[dict[str, Any]]:
    stmt = select(FHIR_RESOURCE.c.body).where(FHIR_RESOURCE.c.rtype == rtype)
    if phash:
        stmt = stmt.where(FHIR_RESOURCE.c.patient_hash == phash)
    with store.read() as conn:
        return [orjson.loads(r.body) for r in conn.execute(stmt)]


def report(store: Store, filler: str) -> dict[str, Any]:
    found = [
        d for d in resources(store, "DiagnosticReport") if d["identifier"][0]["value"] == filler
    ]
    assert len(found) == 1
    return found[0]


def observations_of(store: Store, dr: dict[str, Any]) -> dict[str, dict[str, Any]]:
    ids = [r["reference"].split("/")[1] for r in dr["result"]]
    by_id = {o["id"]: o for o in resources(store, "Observation")}
    out = {}
    for i in ids:
        o = by_id[i]
        out[next(c["code"] for c in o["code"]["coding"] if c["system"] == LOCAL)] = o
    return out


def quarantined(store: Store) -> list[Any]:
    with store.read() as conn:
        return list(
            conn.execute(
                select(QUARANTINE)
                .where(QUARANTINE.c.source.like("adapter:lis%"))
                .order_by(QUARANTINE.c.id)
            )
        )


def test_results_over_mllp_field_by_field(core: dict[str, Any]) -> None:
    node: NodeProcess = core["node"]
    store: Store = core["store"]
    acks = send(core["ports"]["plain"], UTF8, GBK)
    assert [msa(a)[:2] for a in acks] == [("AA", "LIS20261120-0001"), ("AA", "YT-000042")]
    results_stored(store)
    assert str(acks[1].segment("MSH")(18)) == "GB18030"  # answered in the message's charset
    obs = {
        **observations_of(store, report(store, "LAB-2026-0001")),
        **observations_of(store, report(store, "LAB-2026-0002")),
    }
    assert sorted(obs) == sorted(EXPECTED_251)
    for code, exp in EXPECTED_251.items():
        check_observation(obs[code], exp)
    assert obs["PLT"]["note"] == [{"text": "已复查，请结合临床 & 随访"}]
    gb = observations_of(store, report(store, "YT-LAB-0042"))
    assert gb["GLU"]["valueQuantity"]["value"] == 7.9
    assert gb["GLU"]["note"] == [{"text": "患者诉近期饮食不规律；億元(测试字符)"}]
    assert gb["GLU"]["performer"][0]["display"] == "月坛社区检验室"
    # the same results through the hospital-facing FHIR API
    via_api = node.api("GET", f"/fhir/Observation/{obs['WBC']['id']}", role="clinician")
    assert via_api["valueQuantity"] == {
        "value": 11.2,
        "unit": "10^9/L",
        "system": "http://unitsofmeasure.org",
        "code": "10*9/L",
    }
    # one patient (matched by hash for both labs), every resource valid R4 (schema and R4B)
    phash = patient_hash(node.plan.patient_hash_key, NATIONAL_ID)
    assert len(resources(store, "Patient", phash)) == 1
    for rtype in ("Patient", "DiagnosticReport", "Observation", "Specimen", "Organization"):
        for r in resources(store, rtype):
            validate_resource(r)
            get_fhir_model_class(rtype).model_validate(r)
    assert len(resources(store, "Observation", phash)) == 11
    # unmapped local codes: reported in the mapping-gap table, not dropped
    with store.read() as conn:
        gaps = {r.code for r in conn.execute(select(MAPPING_GAP))}
        # ... and audited with the results, in their transaction (never without them)
        audit = AuditRecord.__table__  # type: ignore[attr-defined]
        noted = list(conn.execute(select(audit).where(audit.c.action == "unmapped-codes")))
    assert {"XYZ99", "TITER"} <= gaps
    codes = {
        c for r in noted for c in ("XYZ99", "TITER") if c in orjson.loads(r.resource)["outcomeDesc"]
    }
    assert codes == {"XYZ99", "TITER"}
    assert {(r.outcome, r.actor, r.kind) for r in noted} == {("4", "adapter:lis", "result.lab")}


def own_run(message: bytes, tag: str, national_id: str) -> bytes:
    """A fixture as another run of the lab for a test of its own: its own control ids, order,
    report and specimen numbers and patient, so no other test's messages touch its results."""
    return (
        message.replace(b"LIS20261120-00", f"LIS20261120-{tag}".encode())
        .replace(b"LAB-2026-00", f"LAB-2026-{tag}".encode())
        .replace(b"ORD-77", f"ORD-{tag}".encode())
        .replace(b"SP-00", f"SP-{tag}".encode())
        .replace(b"FX0012345", f"FX{tag}12345".encode())
        .replace(NATIONAL_ID.encode(), national_id.encode())
    )


def kept_messages(store: Store) -> int:
    with store.read() as conn:
        return int(conn.execute(select(func.count()).select_from(RESULT_MESSAGE)).scalar() or 0)


def test_resent_message_gets_the_stored_ack(core: dict[str, Any]) -> None:
    store: Store = core["store"]
    message = own_run(UTF8, "80", "110102195003153018")
    kept = kept_messages(store)
    [first] = send(core["ports"]["plain"], message)
    assert msa(first)[:2] == ("AA", "LIS20261120-8001")
    with MLLPClient("127.0.0.1", core["ports"]["plain"]) as client:
        client.socket.settimeout(30)
        again = client.send_message(message)
    results_stored(store)
    ids = [
        o["id"]
        for filler in ("LAB-2026-8001", "LAB-2026-8002")
        for o in observations_of(store, report(store, filler)).values()
    ]
    with store.read() as conn:
        versions = dict(
            conn.execute(
                select(FHIR_RESOURCE.c.id, FHIR_RESOURCE.c.version).where(
                    FHIR_RESOURCE.c.rtype == "Observation", FHIR_RESOURCE.c.id.in_(ids)
                )
            ).all()
        )
    assert msa(hl7.parse(again.strip(b"\x0b\x1c\r").decode()))[:2] == ("AA", "LIS20261120-8001")
    # identical to the first ACK (same ACK MSH-10 and time): it is the stored one
    assert str(hl7.parse(again.strip(b"\x0b\x1c\r").decode())) == str(first)
    assert set(versions.values()) == {1} and len(versions) == 9
    assert kept_messages(store) == kept + 1  # the re-send is not kept again


def test_correction_updates_in_place(core: dict[str, Any]) -> None:
    store: Store = core["store"]
    national_id = "110102195003154010"
    [ack] = send(core["ports"]["plain"], own_run(UTF8, "70", national_id))
    assert msa(ack)[:2] == ("AA", "LIS20261120-7001")
    results_stored(store)
    before = observations_of(store, report(store, "LAB-2026-7002"))
    count = len(resources(store, "Observation"))
    [ack] = send(core["ports"]["plain"], own_run(CORRECTED, "70", national_id))
    assert msa(ack)[:2] == ("AA", "LIS20261120-7007")
    results_stored(store)
    dr = report(store, "LAB-2026-7002")
    after = observations_of(store, dr)
    assert dr["status"] == "corrected" and dr["meta"]["versionId"] == "2"
    assert {c: o["id"] for c, o in after.items()} == {c: o["id"] for c, o in before.items()}
    glu = after["GLU"]
    assert glu["status"] == "corrected" and glu["meta"]["versionId"] == "2"
    assert glu["valueQuantity"]["value"] == 7.25
    assert glu["note"] == [{"text": "复测后更正"}]
    assert after["CRP"]["status"] == "final"  # preliminary -> final on the same id
    assert len(resources(store, "Observation")) == count  # updated, never duplicated
    with store.read() as conn:
        history = conn.execute(
            select(FHIR_HISTORY.c.body)
            .where(FHIR_HISTORY.c.id == glu["id"])
            .order_by(FHIR_HISTORY.c.version)
        ).all()
    assert [orjson.loads(h.body)["valueQuantity"]["value"] for h in history] == [6.85, 7.25]


def _bad_messages() -> list[tuple[str, bytes, str, str]]:
    cut = UTF8[: UTF8.index(b"|%|40-75|")]
    return [
        ("malformed", b"hello, this is not an HL7 message\r", "AR", ""),
        ("truncated-msh", UTF8[: UTF8.index(b"|P|2.5.1") + 2], "AR", "LIS20261120-0001"),
        ("truncated-obx", cut.replace(b"-0001|P|", b"-0101|P|"), "AE", "LIS20261120-0101"),
        ("wrong-encoding", GBK.replace(b"GB18030", b"UNICODE UTF-8"), "AR", "YT-000042"),
        (
            "unknown-version",
            UTF8.replace(b"|2.5.1|", b"|2.9|").replace(b"-0001|P|", b"-0102|P|"),
            "AR",
            "LIS20261120-0102",
        ),
    ]


def test_bad_messages_nak_quarantine_and_keep_serving(core: dict[str, Any]) -> None:
    store: Store = core["store"]
    bad = _bad_messages()
    before = len(quarantined(store))
    good = UTF8.replace(b"-0001|P|", b"-0103|P|")
    acks = send(core["ports"]["plain"], *[m for _, m, _, _ in bad], good)
    for (name, _, code, control), ack in zip(bad, acks, strict=False):
        assert msa(ack)[:2] == (code, control), name
        assert msa(ack)[2], f"{name}: MSA-3 carries the reason"
        assert len(ack.segments("ERR")) == 1, name
    assert msa(acks[-1])[0] == "AA"  # the same connection still serves
    rows = quarantined(store)[before:]
    assert [bytes(r.raw) for r in rows] == [m for _, m, _, _ in bad]
    assert [r.code for r in rows] == [
        "HT-LIS-STRUCTURE",
        "HT-LIS-STRUCTURE",
        "HT-LIS-REQUIRED",
        "HT-LIS-ENCODING",
        "HT-LIS-VERSION",
    ]
    assert "OBX[4]-11" in rows[2].message and "MSH-18" in rows[3].message
    assert all("110102195003151234" not in r.message for r in rows)
    # a message readable as far as its PID (the unknown version too) is kept under the
    # patient's keyed hash (found by an ID-number search in the message browser); unreadable
    # input names nobody
    from bridge.privacy import patient_hash

    key = core["node"].plan.patient_hash_key
    wang = patient_hash(key, "110102195003151234")
    assert [r.patient_hash for r in rows] == [None, None, wang, None, wang]


def test_framing_faults(core: dict[str, Any]) -> None:
    store: Store = core["store"]
    port = core["ports"]["plain"]
    before = len(quarantined(store))
    # a block without <VT>: AR, the connection goes on
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"MSH|^~\\&|junk\x1c\r")
        answer = _read_block(s)
        assert msa(hl7.parse(answer.decode()))[0] == "AR"
    # a frame cut by a closed connection: nobody to answer, the bytes are quarantined
    partial = b"\x0b" + UTF8[:200]
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(partial)
    wait_for(lambda: len(quarantined(store)) >= before + 2, what="truncated frame quarantined")
    rows = quarantined(store)[before:]
    assert bytes(rows[-1].raw) == partial and "truncated frame" in rows[-1].message
    # and the listener still serves
    [ack] = send(port, UTF8.replace(b"-0001|P|", b"-0104|P|"))
    assert msa(ack)[0] == "AA"


def _read_block(s: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\x1c\r"):
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.strip(b"\x0b\x1c\r")


def test_tls_port(core: dict[str, Any]) -> None:
    ctx = ssl.create_default_context(cafile=str(core["cert"]))
    [ack] = send(core["ports"]["tls"], UTF8.replace(b"-0001|P|", b"-0201|P|"), tls=ctx)
    assert msa(ack)[:2] == ("AA", "LIS20261120-0201")
    # a plain-text client gets no ACK from the TLS port
    with MLLPClient("127.0.0.1", core["ports"]["tls"]) as client:
        client.socket.settimeout(10)
        try:
            answer = client.send_message(UTF8.replace(b"-0001|P|", b"-0202|P|"))
        except OSError:
            answer = b""
    assert b"MSA" not in answer


def test_rate_limit_per_channel(core: dict[str, Any]) -> None:
    store: Store = core["store"]
    before = len(quarantined(store))
    msgs = [UTF8.replace(b"-0001|P|", f"-03{i:02d}|P|".encode()) for i in range(3)]
    acks = send(core["ports"]["slow"], *msgs)
    assert [msa(a)[0] for a in acks] == ["AA", "AA", "AE"]
    assert "rate limit" in msa(acks[2])[2]
    assert len(quarantined(store)) == before  # the LIS keeps it and resends: not quarantined
    # the other channel is not limited
    assert msa(send(core["ports"]["plain"], msgs[2])[0])[0] == "AA"
