"""The HL7 v2 kit's listeners in a real node process, over real sockets (python-hl7's
MLLPClient): the LIS (``lis-hl7``) and the HL7 HIS (``his-hl7``) alike.

Frame limit (an 11 MiB frame against the 10 MiB default: AR naming the limit, a bounded
quarantine entry with the digest, and the same connection then serves the next message),
truncated and slow frames, idle connections closed, 70 KiB and 1.1 MB messages taken, every
MSH-18 name of the table decoded field by field, UTF-8 under ``8859/1`` refused naming the
field (and taken on a channel with ``charset_override``), MSH-2 with a space refused AR,
versions 2.2 and 2.6 taken, ``\\.br\\`` stored as a newline.
"""

from __future__ import annotations

import hashlib
import socket
import ssl
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from hl7.client import MLLPClient
from sqlalchemy import select

from adapters import slips_fhir
from adapters.his_hl7 import messages
from adapters.hl7v2 import ack, charset
from bridge.fhirstore.tables import FHIR_RESOURCE
from bridge.store.db import Store
from bridge.store.tables import QUARANTINE
from simulators.ports import free_port_block
from tests.harness import ROOT, Alliance, NodeProcess, results_stored, wait_for
from tests.lis_site import self_signed, write_site
from tests.test_his_hl7 import HEADER, MEMBERS, RULES, slip
from tests.test_hl7v2_kit import sample_for

pytestmark = pytest.mark.slow

MiB = 1024 * 1024
QUICK = {"idle_timeout_s": 1.5, "frame_timeout_s": 2}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("hl7v2")
    site = write_site(root / "mappings" / "fxlab")
    cert, key = self_signed(root / "tls")
    base = free_port_block(13)
    ports = {
        "lis": base,
        "lis-override": base + 1,
        "lis-quick": base + 2,
        "his": base + 3,
        "his-override": base + 4,
        "his-quick": base + 5,
        "his-tls": base + 9,
        "his-slow": base + 10,
    }
    lis = {"type": "lis-hl7", "mappings": str(site)}
    his = {"type": "his-hl7", "mappings": str(ROOT / "mappings" / "yuetan-chc")}

    def his_opts(name: str, n: int, **kw: Any) -> dict[str, Any]:
        return {"listen": f"127.0.0.1:{ports[name]}", "his": f"127.0.0.1:{base + n}", **kw}

    adapters = [
        {**lis, "name": "lis", "options": {"port": ports["lis"]}},
        {
            **lis,
            "name": "lis-override",
            "options": {"port": ports["lis-override"], "charset_override": "UNICODE UTF-8"},
        },
        {**lis, "name": "lis-quick", "options": {"port": ports["lis-quick"], **QUICK}},
        {**his, "name": "his", "receives": ["referral.*"], "options": his_opts("his", 6)},
        {
            **his,
            "name": "his-override",
            "options": his_opts("his-override", 7, charset_override="UNICODE UTF-8"),
        },
        {**his, "name": "his-quick", "options": his_opts("his-quick", 8, **QUICK)},
        {
            **his,
            "name": "his-tls",
            "options": his_opts("his-tls", 11, tls={"cert": str(cert), "key": str(key)}),
        },
        {
            **his,
            "name": "his-slow",
            "options": his_opts(
                "his-slow", 12, rate_limit={"per_second": 0.001, "burst": 1, "hold_s": 0}
            ),
        },
    ]
    members = [MEMBERS[0], {**MEMBERS[1], "adapters": adapters}]
    a = Alliance(root / "alliance", members, RULES)
    a.start("yuetan-chc")
    node = a.node("yuetan-chc")
    store = Store(node.plan.storage_dsn)
    yield {"node": node, "ports": ports, "store": store, "cert": cert}
    store.dispose()
    a.stop_all()


# -- helpers -------------------------------------------------------------------------------------


def read_frame(sock: socket.socket, data: bytes = b"") -> bytes:
    """Bytes until the end of one MLLP frame (or until the peer closes)."""
    while not data.endswith(b"\x1c\r"):
        more = sock.recv(65536)
        if not more:
            break
        data += more
    return data


def send(port: int, *msgs: bytes, tls: ssl.SSLContext | None = None) -> list[tuple[str, str, str]]:
    """Each message on one python-hl7 MLLPClient connection; (MSA-1, MSA-2, ERR-8/MSA-3).

    MLLPClient.send_message makes one ``socket.send`` call, which may send only part of a
    large frame; above 64 KiB the frame is written on the client's socket with ``sendall``."""
    out = []
    with MLLPClient("127.0.0.1", port) as client:
        client.socket.settimeout(120)
        if tls is not None:
            client.socket = tls.wrap_socket(client.socket, server_hostname="127.0.0.1")
        for m in msgs:
            if len(m) > 65536:
                client.socket.sendall(b"\x0b" + m + b"\x1c\r")
                framed = read_frame(client.socket)
            else:
                framed = read_frame(client.socket, client.send_message(m))
            assert framed.startswith(b"\x0b") and framed.endswith(b"\x1c\r")
            out.append(ack.read_ack(framed[1:-2]))
    return out


def oru(
    control: str,
    *,
    name: str = "王^秀英",
    cs: str = "UNICODE UTF-8",
    value: str = "阴性",
    note: str = "已审核",
    version: str = "2.5.1",
    msh2: str = "^~\\&",
    mrn: str = "",
) -> str:
    return (
        f"MSH|{msh2}|LIS|YTLAB|HUTONG|YT|20261120093000||ORU^R01^ORU_R01|{control}|P|"
        f"{version}|||AL|NE|CHN|{cs}\r"
        f"PID|1||{mrn or control}^^^YT^MR||{name}||19500315|F\r"
        f"OBR|1|O-{control}|F-{control}|CBC^血常规^L|||20261120081500|||||||||||||||"
        f"20261120092500|||F\r"
        f"NTE|1||{note}\r"
        f"OBX|1|ST|XYZ99^未映射项目^L||{value}||||||F|||20261120090000\r"
    )


def adt(
    control: str,
    name: str = "王",
    *,
    cs: str = "UNICODE UTF-8",
    msh2: str = "^~\\&",
    version: str = "2.5",
    mrn: str = "",
    extra: str = "",
) -> str:
    return (
        f"MSH|{msh2}|YTHIS|yuetan-his|HUTONG||20261120090000||ADT^A08^ADT_A01|{control}|P|"
        f"{version}||||||{cs}\r"
        f"EVN|A08|20261120090000\r"
        f"PID|1||{mrn or control}^^^YTHIS^MR||{name}||19500315|F\r"
        f"PV1|1|O\r{extra}"
    )


def resources(store: Store, rtype: str) -> list[dict[str, Any]]:
    with store.read() as conn:
        return [
            orjson.loads(r.body)
            for r in conn.execute(
                select(FHIR_RESOURCE.c.body).where(FHIR_RESOURCE.c.rtype == rtype)
            )
        ]


def lis_taken(store: Store, control: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(Patient, DiagnosticReport, Observation) stored for the ORU with this MSH-10 (once the
    node's results journal has stored what it acknowledged)."""
    results_stored(store)
    [patient] = [
        p
        for p in resources(store, "Patient")
        if any(i["value"] == control for i in p["identifier"])
    ]
    [report] = [
        d
        for d in resources(store, "DiagnosticReport")
        if d["identifier"][0]["value"] == f"F-{control}"
    ]
    obs_id = report["result"][0]["reference"].split("/")[1]
    [obs] = [o for o in resources(store, "Observation") if o["id"] == obs_id]
    return patient, report, obs


def his_patient(node: NodeProcess, adapter: str, mrn: str) -> dict[str, Any] | None:
    """The HL7 HIS adapter's patient index entry: its keyed state in the node's database (no
    file of its own beside the node)."""
    from bridge.local.tables import ADAPTER_STATE

    assert not (node.plan.data_dir / "adapters" / adapter / "his_hl7.sqlite").exists()
    store = Store(node.plan.storage_dsn)
    try:
        with store.read() as conn:
            row = conn.execute(
                select(ADAPTER_STATE.c.value).where(
                    ADAPTER_STATE.c.adapter == adapter,
                    ADAPTER_STATE.c.ns == "patients",
                    ADAPTER_STATE.c.key == mrn,
                )
            ).first()
    finally:
        store.dispose()
    return orjson.loads(row.value) if row is not None else None


def quarantined(store: Store, adapter: str) -> list[Any]:
    with store.read() as conn:
        return list(
            conn.execute(
                select(QUARANTINE)
                .where(QUARANTINE.c.source == f"adapter:{adapter}")
                .order_by(QUARANTINE.c.id)
            )
        )


# -- frame limit ---------------------------------------------------------------------------------


@pytest.mark.parametrize("adapter", ["lis", "his"])
def test_oversize_frame_gets_ar_naming_the_limit_and_a_bounded_quarantine(
    world: dict[str, Any], adapter: str
) -> None:
    """11 MiB against the 10 MiB default: AR naming the limit, the first 64 KiB and the
    SHA-256 of the whole frame quarantined; the connection stays open and takes the next."""
    store: Store = world["store"]
    before = len(quarantined(store, adapter))
    pad = "NTE|2||" + "A" * (11 * MiB) + "\r"
    if adapter == "lis":
        big, good = (oru("BIG-1") + pad).encode(), oru("BIG-2").encode()
    else:
        big, good = adt("BIG-1", "王大", extra=pad).encode(), adt("BIG-2", "王二").encode()
    answers = send(world["ports"][adapter], big, good)
    code, control, why = answers[0]
    assert (code, control) == ("AR", "BIG-1")
    assert f"of {len(big)} bytes" in why and "frame limit of 10485760 bytes" in why
    assert answers[1][:2] == ("AA", "BIG-2")  # the same connection, the next message
    [row] = quarantined(store, adapter)[before:]
    framed = b"\x0b" + big + b"\x1c\r"
    assert bytes(row.raw) == framed[:65536]  # bounded: never the whole frame
    assert hashlib.sha256(framed).hexdigest() in row.message
    assert "MSH-10 BIG-1" in row.message and "frame limit" in row.message


@pytest.mark.parametrize("adapter", ["lis", "his"])
def test_truncated_frame_is_quarantined(world: dict[str, Any], adapter: str) -> None:
    store: Store = world["store"]
    before = len(quarantined(store, adapter))
    msg = (oru("CUT-1") if adapter == "lis" else adt("CUT-1", "王")).encode()
    partial = b"\x0b" + msg[:150]
    with socket.create_connection(("127.0.0.1", world["ports"][adapter]), timeout=30) as s:
        s.sendall(partial)
    rows = wait_for(lambda: quarantined(store, adapter)[before:], what="truncated frame kept")
    assert len(rows) == 1 and bytes(rows[0].raw) == partial
    assert "truncated frame" in rows[0].message and "MSH-10 CUT-1" in rows[0].message


# -- large messages ------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [70 * 1024, 1_100_000])
def test_large_messages_are_taken_by_the_lis(world: dict[str, Any], size: int) -> None:
    note = ("标本已复核" * (size // 15 + 1))[: size // 3]
    control = f"LARGE-{size}"
    raw = oru(control, note=note).encode()
    assert len(raw) >= size
    assert send(world["ports"]["lis"], raw) == [("AA", control, "")]
    _, report, _ = lis_taken(world["store"], control)
    assert report["conclusion"] == note


@pytest.mark.parametrize("size", [70 * 1024, 1_100_000])
def test_large_referral_is_taken_by_the_his_listener(world: dict[str, Any], size: int) -> None:
    """A REF^I12 whose summary makes it 70 KiB (silence before the kit) or 1.1 MB."""
    summary = ("头晕两周，既往高血压十年。" * (size // 36 + 1))[: size // 3]
    s = slip(slip_no=f"YTBIG{size}", summary=summary)
    raw = charset.encode(
        messages.referral_message(
            replace(HEADER, charset="UNICODE UTF-8"),
            s,
            f"REF-{size}",
            datetime(2026, 11, 20, 1, 0, tzinfo=UTC),
        ),
        "UNICODE UTF-8",
    )
    assert len(raw) >= size
    assert send(world["ports"]["his"], raw) == [("AA", f"REF-{size}", "")]
    requests = [
        r
        for r in resources(world["store"], "ServiceRequest")
        if any(i.get("value") == s.slip_no for i in r.get("identifier", []))
    ]
    assert len(requests) == 1
    # the summary travels as the referral Composition's section, every character of it
    kept = [
        c
        for c in resources(world["store"], "Composition")
        if slips_fhir._undiv((c.get("section") or [{}])[0].get("text")) == summary
    ]
    assert len(kept) == 1


# -- timeouts ------------------------------------------------------------------------------------


@pytest.mark.parametrize("adapter", ["lis-quick", "his-quick"])
def test_idle_connection_is_closed(world: dict[str, Any], adapter: str) -> None:
    """``idle_timeout_s`` = 1.5: an open connection that sends nothing is closed by the node
    (recv returns end-of-stream), both before any frame and after an answered one."""
    port = world["ports"][adapter]
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        assert s.recv(1) == b""
    msg = (oru("IDLE-1") if adapter == "lis-quick" else adt("IDLE-1", "王")).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(b"\x0b" + msg + b"\x1c\r")
        answer = read_frame(s)
        assert ack.read_ack(answer[1:-2])[:2] == ("AA", "IDLE-1")
        assert s.recv(1) == b""


@pytest.mark.parametrize("adapter", ["lis-quick", "his-quick"])
def test_slow_frame_gets_ar_is_quarantined_and_closed(world: dict[str, Any], adapter: str) -> None:
    """``frame_timeout_s`` = 2: a frame begun and never finished gets AR naming the timeout,
    its bytes are quarantined and the connection is closed."""
    store: Store = world["store"]
    before = len(quarantined(store, adapter))
    msg = (oru("SLOW-1") if adapter == "lis-quick" else adt("SLOW-1", "王")).encode()
    partial = b"\x0b" + msg[:120]
    with socket.create_connection(("127.0.0.1", world["ports"][adapter]), timeout=60) as s:
        s.sendall(partial)
        answer = read_frame(s)
        code, control, why = ack.read_ack(answer[1:-2])
        assert (code, control) == ("AR", "SLOW-1") and "within 2 s" in why
        assert s.recv(1) == b""
    [row] = quarantined(store, adapter)[before:]
    assert bytes(row.raw) == partial and "not completed within 2 s" in row.message


# -- charsets ------------------------------------------------------------------------------------


def test_every_charset_name_through_the_lis(world: dict[str, Any]) -> None:
    """Each name of the table as MSH-18, a message in that charset: every field read back as
    written (PID-5 name, OBX-5 value); the one name without a decoder is refused AR."""
    msgs, want = [], {}
    for i, name in enumerate(charset.NAMES):
        cs = charset.lookup(name)
        control = f"CS-{i}"
        if cs.decoder is None:
            msgs.append(oru(control, cs=name, name="x").encode())
            want[control] = None
            continue
        text = sample_for(cs)
        body = oru(control, cs=name, name=text, value=text, note=text)
        msgs.append(charset.encode(body.replace("血常规", "CBC").replace("未映射项目", "X"), cs))
        want[control] = text
    answers = send(world["ports"]["lis"], *msgs)
    for (code, control, why), (wanted_control, text) in zip(answers, want.items(), strict=True):
        assert control == wanted_control
        if text is None:
            assert code == "AR" and "cannot be decoded" in why
            continue
        assert code == "AA", (control, why)
        patient, _, obs = lis_taken(world["store"], control)
        _, report, _ = lis_taken(world["store"], control)
        assert patient["name"][0]["family"] == text and obs["valueString"] == text
        assert report["conclusion"] == text


def test_every_charset_name_through_the_his(world: dict[str, Any]) -> None:
    node: NodeProcess = world["node"]
    msgs, want = [], {}
    for i, name in enumerate(charset.NAMES):
        cs = charset.lookup(name)
        control = f"HCS-{i}"
        if cs.decoder is None:
            msgs.append(adt(control, "x", cs=name).encode())
            want[control] = None
            continue
        text = sample_for(cs)
        msgs.append(charset.encode(adt(control, text, cs=name), cs))
        want[control] = text
    answers = send(world["ports"]["his"], *msgs)
    for (code, control, why), (wanted_control, text) in zip(answers, want.items(), strict=True):
        assert control == wanted_control
        if text is None:
            assert code == "AR" and "cannot be decoded" in why
            continue
        assert code == "AA", (control, why)
        row = his_patient(node, "his", control)
        assert row is not None and row["name"] == text and row["birth_date"] == "1950-03-15"


@pytest.mark.parametrize("adapter", ["lis", "his"])
def test_utf8_declared_latin1_refused_naming_the_field_or_overridden(
    world: dict[str, Any], adapter: str
) -> None:
    store: Store = world["store"]
    build = oru if adapter == "lis" else adt
    raw = build("MOJI-1", name="张无忌", cs="8859/1").encode("utf-8")
    before = len(quarantined(store, adapter))
    [(code, control, why)] = send(world["ports"][adapter], raw)
    assert (code, control) == ("AR", "MOJI-1")
    assert "PID-5" in why and "8859/1" in why and "张" not in why
    [row] = quarantined(store, adapter)[before:]
    assert bytes(row.raw) == raw and "MSH-18" in row.message
    # the channel whose config says this sender really sends UTF-8 takes it, unmangled
    assert send(world["ports"][f"{adapter}-override"], raw) == [("AA", "MOJI-1", "")]
    if adapter == "lis":
        patient, _, _ = lis_taken(store, "MOJI-1")
        assert patient["name"][0]["text"] == "张无忌"
    else:
        row = his_patient(world["node"], "his-override", "MOJI-1")
        assert row is not None and row["name"] == "张无忌"


# -- MSH-2, versions, escapes --------------------------------------------------------------------


@pytest.mark.parametrize("adapter", ["lis", "his"])
def test_msh2_with_a_space_is_refused(world: dict[str, Any], adapter: str) -> None:
    build = oru if adapter == "lis" else adt
    raw = build("SPACE-1", name="王^秀英", msh2="^~ &").encode()
    [(code, control, why)] = send(world["ports"][adapter], raw)
    assert (code, control) == ("AR", "SPACE-1") and "MSH-2" in why


@pytest.mark.parametrize("adapter", ["lis", "his"])
def test_version_29_and_an_empty_version_are_refused_alike(
    world: dict[str, Any], adapter: str
) -> None:
    build = oru if adapter == "lis" else adt
    answers = send(
        world["ports"][adapter],
        build("V29", version="2.9").encode(),
        build("V0", version="").encode(),
    )
    assert [a[:2] for a in answers] == [("AR", "V29"), ("AR", "V0")]
    assert all("MSH-12" in why for _, _, why in answers)


@pytest.mark.parametrize("version", ["2.1", "2.2", "2.6", "2.7.1", "2.8"])
def test_versions_outside_23_251_are_taken(world: dict[str, Any], version: str) -> None:
    control = f"V{version}"
    assert send(world["ports"]["lis"], oru(control, version=version).encode()) == [
        ("AA", control, "")
    ]
    assert lis_taken(world["store"], control)[0]["name"][0]["text"] == "王秀英"
    hc = f"HV{version}"
    assert send(world["ports"]["his"], adt(hc, "王", version=version).encode()) == [("AA", hc, "")]


def test_line_break_escape_is_a_newline(world: dict[str, Any]) -> None:
    control = "BR-1"
    raw = oru(control, note="第一行\\.br\\第二行 \\T\\ 随访").encode()
    assert send(world["ports"]["lis"], raw) == [("AA", control, "")]
    _, report, _ = lis_taken(world["store"], control)
    assert report["conclusion"] == "第一行\n第二行 & 随访"


# -- TLS, rate limit, the LIS export sender --------------------------------------------------


def test_his_listener_tls_and_rate_limit(world: dict[str, Any]) -> None:
    """The HIS listener has the LIS's TLS and per-channel rate limit (the kit's)."""
    ctx = ssl.create_default_context(cafile=str(world["cert"]))
    assert send(world["ports"]["his-tls"], adt("TLS-1", "王").encode(), tls=ctx) == [
        ("AA", "TLS-1", "")
    ]
    assert his_patient(world["node"], "his-tls", "TLS-1") is not None
    with MLLPClient("127.0.0.1", world["ports"]["his-tls"]) as client:  # plain text: no ACK
        client.socket.settimeout(30)
        try:
            answer = client.send_message(adt("TLS-2", "王").encode())
        except OSError:
            answer = b""
    assert b"MSA" not in answer
    store: Store = world["store"]
    before = len(quarantined(store, "his-slow"))
    answers = send(
        world["ports"]["his-slow"], adt("RATE-1", "王").encode(), adt("RATE-2", "王").encode()
    )
    assert answers[0] == ("AA", "RATE-1", "")
    assert answers[1][:2] == ("AE", "RATE-2") and "rate limit" in answers[1][2]
    assert his_patient(world["node"], "his-slow", "RATE-2") is None
    assert len(quarantined(store, "his-slow")) == before  # the HIS resends: not quarantined


def test_lis_export_sender_sends_large_files_whole(world: dict[str, Any], tmp_path: Path) -> None:
    """``simulators.lis send-dir`` (adapters.lis.sender): a 1.1 MB export file reaches the
    listener whole (sendall, not one socket.send) and moves to done/; a refused one to
    refused/ with its ACK beside it."""
    from adapters.lis.sender import send_folder

    note = "复核" * 200_000
    (tmp_path / "a.hl7").write_bytes(oru("EXPORT-1", note=note).encode())
    (tmp_path / "b.hl7").write_bytes(oru("EXPORT-2", msh2="^~ &").encode())
    assert send_folder(tmp_path, "127.0.0.1", world["ports"]["lis"]) == {
        "accepted": 1,
        "refused": 1,
    }
    assert (tmp_path / "done" / "a.hl7").exists() and (tmp_path / "refused" / "b.hl7").exists()
    assert ack.read_ack((tmp_path / "refused" / "b.hl7.ack").read_bytes())[0] == "AR"
    assert lis_taken(world["store"], "EXPORT-1")[1]["conclusion"] == note
