"""Signing-key rollover between two running nodes: the receiver learns the sender's next key
first, the sender then switches to it, and once the old key is dropped from the directory a
packet signed with it is refused with HT-PKT-BAD-SIGNATURE (an unsigned error: the receiver
signs nothing about a frame it could not authenticate)."""

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
from tests.harness import ROOT, Alliance, NodeProcess, spooled, wait_for

pytestmark = pytest.mark.slow

MEMBERS = [
    {"id": "core", "zh": "复兴医院", "en": "Fuxing Hospital", "role": "core"},
    {"id": "chc", "zh": "月坛社区卫生服务中心", "en": "Yuetan CHC", "role": "community"},
]
RULES = [{"from": "chc", "to": "core", "kinds": ["result.lab"]}]
CHC_BLOCK = 'id = "chc"\n'


def post(core: NodeProcess, frames: list[bytes]) -> list[dict]:
    """POST frames to core's peer port as chc would; core's signed receipts, verified. A frame
    core could not authenticate gets an unsigned error (status 'unsigned' here): in its slot
    of the answer batch, or as the HTTP 403 answer when nothing in the request authenticated."""
    conn = http.client.HTTPConnection(core.plan.peer_host, core.plan.peer_port, timeout=60)
    try:
        conn.request("POST", "/exchange/v1/packets", body=env.encode_batch(frames))
        resp = conn.getresponse()
        status, body = resp.status, resp.read()
    finally:
        conn.close()
    if status == 403:
        return [{"status": "unsigned", **json.loads(body)}] * len(frames)
    assert status == 200, (status, body[:300])
    keys = {m: p.signing_keys for m, p in core.plan.directory.items()}
    return [
        {"status": "unsigned", **json.loads(x)}
        if x[:1] == b"{"
        else env.verify_receipt(x, lambda n: keys[n])
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
