"""Signing-key rollover between two running nodes: the receiver learns the sender's next key
first, the sender then switches to it, and once the old key is dropped from the directory a
packet signed with it is refused with HT-PKT-BAD-SIGNATURE (an unsigned error: the receiver
signs nothing about a frame it could not authenticate).

Receipt version rollover (batch-signed receipts, HTR2): new nodes exchange them; a sender that
does not ask (an old one: no ``Hutong-Receipts`` header; or ``[delivery] batch_receipts =
false``) never gets one, also not for a packet first answered in v2; a new sender takes the
HTR1 receipts of a receiver that does not give them; a member behind the platform gets its
recipient's receipt as HTR1 (the platform forwards it unchanged to a sender that may be old)."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bridge.config.loader import load_node
from bridge.crypto import envelope as env
from bridge.crypto.keys import key_id, load_signing_key, public_raw, public_text
from tests.factory import bundle_bytes
from tests.harness import ROOT, Alliance, NodeProcess, db_rows, spooled, wait_for

pytestmark = pytest.mark.slow

MEMBERS = [
    {"id": "core", "zh": "复兴医院", "en": "Fuxing Hospital", "role": "core"},
    {"id": "chc", "zh": "月坛社区卫生服务中心", "en": "Yuetan CHC", "role": "community"},
]
RULES = [{"from": "chc", "to": "core", "kinds": ["result.lab"]}]
CHC_BLOCK = 'id = "chc"\n'


def post(
    core: NodeProcess, frames: list[bytes], headers: dict[str, str] | None = None
) -> list[dict]:
    """POST frames to core's peer port as chc would; core's signed receipts, verified. A frame
    core could not authenticate gets an unsigned error (status 'unsigned' here): in its slot
    of the answer batch, or as the HTTP 403 answer when nothing in the request authenticated."""
    return [x for x, _ in post_raw(core, frames, headers)]


def post_raw(
    core: NodeProcess, frames: list[bytes], headers: dict[str, str] | None = None
) -> list[tuple[dict, bytes]]:
    """``post``, each answer with its bytes. Without ``headers`` the request is exactly what a
    sender made before batch-signed receipts (no ``Hutong-Receipts`` header)."""
    conn = http.client.HTTPConnection(core.plan.peer_host, core.plan.peer_port, timeout=60)
    try:
        conn.request(
            "POST", "/exchange/v1/packets", body=env.encode_batch(frames), headers=headers or {}
        )
        resp = conn.getresponse()
        status, body = resp.status, resp.read()
    finally:
        conn.close()
    if status == 403:
        return [({"status": "unsigned", **json.loads(body)}, body)] * len(frames)
    assert status == 200, (status, body[:300])
    keys = {m: p.signing_keys for m, p in core.plan.directory.items()}
    return [
        (
            {"status": "unsigned", **json.loads(x)}
            if x[:1] == b"{"
            else env.verify_receipt(x, lambda n: keys[n]),
            x,
        )
        for x in env.decode_batch(body, max_total=1 << 30)
    ]


def craft(core: NodeProcess, key: Ed25519PrivateKey, thread: str) -> tuple[str, bytes]:
    packet_id = str(uuid.uuid4())
    frame = env.seal(
        bundle_bytes(n_obs=1),
        sender="chc",
        recipient="core",
        kind="result.lab",
        thread=thread,
        seq=1,
        signing_key=key,
        recipient_key=core.plan.directory["core"].encryption_keys[0],
        packet_id=packet_id,
    )
    return packet_id, frame


def spooled_ids(node: NodeProcess) -> set[str]:
    return {f.stem.split("-", 1)[1] for f in spooled(node)}


def write_private_key(path: Path, key: Ed25519PrivateKey) -> None:
    """Replace a node's signing key file, 0600 from its first byte."""
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    tmp = path.with_name(path.name + ".new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, pem)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def keys_show(node: NodeProcess) -> dict:
    r = subprocess.run(
        [sys.executable, "-m", "bridge.cli", "keys", "show", "--config", str(node.config)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_signing_key_rollover(tmp_path: Path) -> None:
    a = Alliance(tmp_path / "alliance", MEMBERS, RULES)
    alliance_toml = a.folder / "alliance.toml"
    a.start("core", "chc")
    try:
        chc, core = a.node("chc"), a.node("core")
        old_key = load_signing_key(chc.plan.keys.signing)
        new_key = Ed25519PrivateKey.generate()
        old_id, new_id = key_id(public_raw(old_key)), key_id(public_raw(new_key))
        delivered: set[str] = set()

        # before: packets signed with the current key go through
        delivered |= set(chc.send("core", "result.lab", [bundle_bytes_dict()], thread="t-before"))
        wait_for(lambda: spooled_ids(core) == delivered, what="first packet")
        # a key the directory does not list yet is refused, unsigned (nobody authenticated it)
        early_id, early = craft(core, new_key, "t-early")
        [receipt] = post(core, [early])
        assert (receipt["status"], receipt["code"]) == ("unsigned", "HT-PKT-BAD-SIGNATURE")
        assert receipt["message"] == (
            f"packet {early_id} signature does not verify with any of "
            f"the 1 key(s) of 'chc' (signed with {new_id})"
        )

        # 1. the directory announces chc's next key; the receiver restarts and trusts both
        text = alliance_toml.read_text()
        assert text.count(CHC_BLOCK) == 1
        alliance_toml.write_text(
            text.replace(CHC_BLOCK, f'{CHC_BLOCK}next_signing_key = "{public_text(new_key)}"\n')
        )
        directory = load_node(core.config).directory["chc"]
        assert [public_text(k) for k in directory.signing_keys] == [
            public_text(old_key),
            public_text(new_key),
        ]
        core.restart()
        new_id_pkt, new_frame = craft(core, new_key, "t-overlap-new")
        old_id_pkt, old_frame = craft(core, old_key, "t-overlap-old")
        receipts = post(core, [new_frame, old_frame])
        assert [(r["status"], r["code"], r["packet"]) for r in receipts] == [
            ("accepted", None, new_id_pkt),
            ("accepted", None, old_id_pkt),
        ]
        delivered |= {new_id_pkt, old_id_pkt}
        wait_for(lambda: spooled_ids(core) == delivered, what="both keys accepted in overlap")

        # 2. the sender stops cleanly (its last audit checkpoint is signed with the old key),
        # switches to the new key file and starts again; its packets still arrive
        chc.stop()
        write_private_key(chc.plan.keys.signing, new_key)
        chc.start()
        chc.wait_ready()
        shown = keys_show(chc)
        assert (shown["signing"], shown["signing_id"]) == (public_text(new_key), new_id)
        delivered |= set(chc.send("core", "result.lab", [bundle_bytes_dict()], thread="t-new-key"))
        wait_for(lambda: spooled_ids(core) == delivered, what="packet signed with the new key")
        wait_for(
            lambda: chc.api("GET", "/local/v1/queues")["outbox"][0].get("acknowledged") == 2,
            what="receipts at chc",
        )

        # 3. the old key leaves the directory: next becomes current
        text = alliance_toml.read_text()
        chc_start = text.index(CHC_BLOCK)
        head, block = text[:chc_start], text[chc_start:]
        block = block.replace(f'next_signing_key = "{public_text(new_key)}"\n', "", 1)
        block = block.replace(
            'signing_key = "keys/chc.pub.json"', f'signing_key = "{public_text(new_key)}"', 1
        )
        alliance_toml.write_text(head + block)
        directory = load_node(core.config).directory["chc"]
        assert [public_text(k) for k in directory.signing_keys] == [public_text(new_key)]
        core.restart()
        chc.restart()  # the sender starts on the finished rollover too

        stale_id, stale = craft(core, old_key, "t-stale")
        fresh_id, fresh = craft(core, new_key, "t-fresh")
        receipts = post(core, [stale, fresh])
        assert [(r["status"], r["code"], r.get("packet"), r.get("receiver")) for r in receipts] == [
            ("unsigned", "HT-PKT-BAD-SIGNATURE", None, None),
            ("accepted", None, fresh_id, "core"),
        ]
        assert receipts[0]["message"] == (
            f"packet {stale_id} signature does not verify with any of the 1 key(s) of 'chc' "
            f"(signed with {old_id})"
        )
        delivered.add(fresh_id)
        delivered |= set(chc.send("core", "result.lab", [bundle_bytes_dict()], thread="t-after"))
        wait_for(lambda: spooled_ids(core) == delivered, what="packets after the rollover")
        assert stale_id not in spooled_ids(core) and early_id not in spooled_ids(core)

        held = core.api("GET", "/local/v1/quarantine")
        assert sorted((h["packet_id"], h["code"], h["sender"]) for h in held) == sorted(
            [(early_id, "HT-PKT-BAD-SIGNATURE", "chc"), (stale_id, "HT-PKT-BAD-SIGNATURE", "chc")]
        )
        r = core.cli("audit", "verify")
        assert r.returncode == 0, r.stderr
        # the rolled-over node's own chain: checkpoints signed with its old key still verify
        chc.stop()
        r = chc.cli("audit", "verify")
        assert r.returncode == 0, r.stderr
        assert "signed checkpoints" in r.stdout
    finally:
        a.stop_all()


def bundle_bytes_dict() -> dict:
    return json.loads(bundle_bytes(n_obs=1))


# -- receipt version rollover: batch-signed receipts (HTR2) -----------------------------------

V2 = {"Hutong-Receipts": "v2"}
PLATFORM_MEMBERS = [
    *MEMBERS,
    {"id": "hub", "zh": "医联体信息平台", "en": "Alliance platform", "role": "platform"},
    {"id": "m-1", "zh": "社区 1", "en": "CHC 1", "role": "community", "via": "hub"},
]
PLATFORM_RULES = [*RULES, {"from": "m-1", "to": "core", "kinds": ["result.lab"]}]


def set_batch_receipts(node: NodeProcess, on: bool | None) -> None:
    """``[delivery] batch_receipts`` in the node file: False pins v1 (an old peer), None drops
    the setting (the default: v2). Read at the next start."""
    text = node.config.read_text()
    text = text.split("\n[delivery]\n", 1)[0]
    if on is not None:
        text += f"\n[delivery]\nbatch_receipts = {str(on).lower()}\n"
    node.config.write_text(text)


def acked_receipt(node: NodeProcess, packet_id: str) -> bytes:
    """The receipt the sender kept on its outbox row, once the row is acknowledged."""

    def kept() -> bytes | None:
        got = db_rows(node, "SELECT state, receipt FROM outbox WHERE packet_id = :p", p=packet_id)
        return bytes(got[0][1]) if got and got[0][0] == "acknowledged" else None

    return wait_for(kept, what=f"{packet_id} acknowledged at {node.node_id}")  # type: ignore[no-any-return]


def inbox_receipt(node: NodeProcess, packet_id: str) -> bytes:
    [(receipt,)] = db_rows(node, "SELECT receipt FROM inbox WHERE packet_id = :p", p=packet_id)
    return bytes(receipt)


def test_receipt_version_rollover_between_old_and_new_peers(tmp_path: Path) -> None:
    a = Alliance(tmp_path / "alliance", PLATFORM_MEMBERS, PLATFORM_RULES)
    a.start("core", "chc", "hub", "m-1")
    try:
        chc, core, m1 = a.node("chc"), a.node("core"), a.node("m-1")
        keys = {m: p.signing_keys for m, p in core.plan.directory.items()}

        def fields(receipt: bytes) -> dict:
            return env.verify_receipt(receipt, lambda n: keys[n])

        chc_key = load_signing_key(chc.plan.keys.signing)
        delivered: set[str] = set()

        # new and new: one signature over each answer batch, kept by both sides as given
        [pid] = chc.send("core", "result.lab", [bundle_bytes_dict()], thread="v2-new")
        delivered.add(pid)
        kept = acked_receipt(chc, pid)
        assert kept[:4] == b"HTR2" and kept == inbox_receipt(core, pid)
        assert (fields(kept)["packet"], fields(kept)["status"]) == (pid, "accepted")

        # an old sender's request (no header) gets HTR1 only; the same request asking, HTR2
        old_ids, old = zip(*(craft(core, chc_key, f"v2-raw-{i}") for i in range(2)), strict=True)
        answered = post_raw(core, list(old))
        assert [(f["packet"], f["status"], x[:4]) for f, x in answered] == [
            (p, "accepted", b"HTR1") for p in old_ids
        ]
        new_ids, new = zip(*(craft(core, chc_key, f"v2-ask-{i}") for i in range(2)), strict=True)
        asked = post_raw(core, list(new), V2)
        assert [(f["packet"], f["status"], x[:4]) for f, x in asked] == [
            (p, "accepted", b"HTR2") for p in new_ids
        ]
        assert asked[0][1][-64:] == asked[1][1][-64:]  # one signature for the two
        # an old sender resending a packet first answered in v2: the same fields, as HTR1
        resent = post_raw(core, [new[0]])
        assert resent[0][1][:4] == b"HTR1" and resent[0][0] == asked[0][0]
        delivered |= {*old_ids, *new_ids}

        # a member behind the platform: the platform's own 'relayed' receipt is v2 (straight
        # from m-1, which asked), core's 'accepted' one comes back through it as HTR1
        [via] = m1.send("core", "result.lab", [bundle_bytes_dict()], thread="v2-via")
        delivered.add(via)
        back = acked_receipt(m1, via)
        assert back[:4] == b"HTR1" and back == inbox_receipt(core, via)
        assert (fields(back)["receiver"], fields(back)["status"]) == ("core", "accepted")

        # an old sender as a node (batch_receipts = false): it never asks, never gets HTR2
        set_batch_receipts(chc, False)
        chc.restart()
        [pid] = chc.send("core", "result.lab", [bundle_bytes_dict()], thread="v1-sender")
        delivered.add(pid)
        kept = acked_receipt(chc, pid)
        assert kept[:4] == b"HTR1" and kept == inbox_receipt(core, pid)

        # a new sender and an old receiver: it asks, gets HTR1, and takes them
        set_batch_receipts(chc, None)
        set_batch_receipts(core, False)
        chc.restart()
        core.restart()
        [pid] = chc.send("core", "result.lab", [bundle_bytes_dict()], thread="v1-receiver")
        delivered.add(pid)
        kept = acked_receipt(chc, pid)
        assert kept[:4] == b"HTR1" and kept == inbox_receipt(core, pid)
        assert fields(kept)["status"] == "accepted"
        assert post_raw(core, [craft(core, chc_key, "v1-asked")[1]], V2)[0][1][:4] == b"HTR1"
        wait_for(lambda: delivered <= spooled_ids(core), what="every packet delivered at core")
        r = core.cli("audit", "verify")
        assert r.returncode == 0, r.stderr
    finally:
        a.stop_all()
