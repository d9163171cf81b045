"""Batch-signed receipts (HTR2) at the intake: one signature over the Merkle root of a batch's
answers for a requester that asked for them, each receipt verifying alone and stored as given;
``HTR1`` for one that did not ask, for a resend of a packet first answered in v2 by a requester
that no longer asks, and for a packet that came through a relay (its receipt goes back to its
sender through the platform). A commit that changes an answer (a packet id taken in the same
group) signs the batch's root again, so a root never covers a receipt that was not given.

The real ``Intake`` in process with real keys and a real store, as ``test_intake_groups.py``
(whose fixtures it shares); the node-to-node rollover is in ``test_rollover.py``.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select

from bridge.crypto import envelope as env
from bridge.errors import PacketTooLarge
from bridge.gateway.stream import FramePeek
from bridge.store.tables import INBOX
from tests.factory import bundle_bytes
from tests.test_intake_groups import Node, ids_of, nodes, one_group, sealed

__all__ = ["nodes"]  # the fixture, shared


def position(frame: bytes) -> tuple[int, int]:
    """(index, count) of an HTR2 receipt."""
    (n,) = struct.unpack_from(">I", frame, 4)
    index, count = struct.unpack_from(">II", frame, 8 + n)
    return index, count


def test_a_v2_batch_is_answered_under_one_signature_each_receipt_alone(
    nodes: dict[str, Any],
) -> None:
    """Accepted and signed refusals share one root; the unsigned error stays unsigned and
    outside it; the inbox keeps each receipt exactly as given (a resend gets those bytes)."""
    core: Node = nodes["core"]
    good = [sealed(nodes, "chc", "t-v2", s) for s in (1, 2, 3)]
    denied = env.seal(
        bundle_bytes(n_obs=1),
        sender="chc",
        recipient="core",
        kind="note.free",  # no rule allows it: a signed refusal
        thread="t-v2-denied",
        seq=1,
        signing_key=nodes["keys"]["chc"],
        recipient_key=core.plan.directory["core"].encryption_keys[0],
    )
    garbage = b"HTP1" + bytes(12)
    answers = core.intake.receive([*good, denied, garbage], receipts_v2=True)
    signed, unsigned = answers[:4], answers[4]
    assert [a[:4] for a in signed] == [b"HTR2"] * 4
    assert unsigned[:1] == b"{" and b"HT-PKT-MALFORMED" in unsigned
    assert len({a[-64:] for a in signed}) == 1  # one signature for the batch
    assert [position(a) for a in signed] == [(i, 4) for i in range(4)]  # the root: these four
    fields = [env.verify_receipt(a, core.keys) for a in signed]  # each alone, no roots set
    assert [(f["packet"], f["status"], f["receiver"]) for f in fields[:3]] == [
        (p, "accepted", "core") for p in ids_of(good)
    ]
    assert (fields[3]["packet"], fields[3]["status"], fields[3]["code"]) == (
        ids_of([denied])[0],
        "refused",
        "HT-PKT-ROUTE-DENIED",
    )
    stored = dict(core.rows(select(INBOX.c.packet_id, INBOX.c.receipt)))
    assert [stored[p] for p in ids_of(good)] == signed[:3]
    again = core.intake.receive(good, receipts_v2=True)
    assert again == signed[:3]  # a duplicate: the stored receipts, byte for byte


def test_a_requester_that_does_not_ask_gets_v1_receipts(nodes: dict[str, Any]) -> None:
    """No v2 asked (an old sender, or one set to ``batch_receipts = false``): one HTR1 each,
    as before."""
    core: Node = nodes["core"]
    v1 = [sealed(nodes, "chc", "t-v1", s) for s in (1, 2)]
    answers = core.intake.receive(v1)
    assert [a[:4] for a in answers] == [b"HTR1"] * 2
    assert len({a[-64:] for a in answers}) == 2
    stored = dict(core.rows(select(INBOX.c.packet_id, INBOX.c.receipt)))
    assert [stored[p] for p in ids_of(v1)] == answers


def test_a_resend_without_v2_gets_the_same_fields_as_htr1(nodes: dict[str, Any]) -> None:
    """A packet first answered in v2, sent again by a sender that no longer asks (rolled
    back): its stored receipt's fields signed again as HTR1; asked again, the stored bytes."""
    core: Node = nodes["core"]
    frame = sealed(nodes, "chc", "t-roll", 1)
    [v2] = core.intake.receive([frame], receipts_v2=True)
    [v1] = core.intake.receive([frame])
    assert (v2[:4], v1[:4]) == (b"HTR2", b"HTR1")
    assert env.verify_receipt(v1, core.keys) == env.verify_receipt(v2, core.keys)
    [v2_again] = core.intake.receive([frame], receipts_v2=True)
    assert v2_again == v2


def test_a_relayed_packet_gets_a_v1_receipt_its_sender_may_read(nodes: dict[str, Any]) -> None:
    """At the platform, a member's own packets (straight from it) are answered in v2; at the
    recipient, a packet that came through the platform is answered in HTR1 even though the
    platform asked: that receipt goes back, unchanged, to a sender that may know only HTR1."""
    hub: Node = nodes["hub"]
    core: Node = nodes["core"]
    frames = [sealed(nodes, "m-1", "t-relay", s) for s in (1, 2)]
    relayed = hub.intake.receive(frames, receipts_v2=True)
    assert [a[:4] for a in relayed] == [b"HTR2"] * 2
    assert [env.verify_receipt(a, hub.keys)["status"] for a in relayed] == ["relayed"] * 2
    stamped = [
        env.stamp_relay(
            env.decode(f, max_body=1 << 20), relay_id="hub", signing_key=hub.ctx.signing_key
        )
        for f in frames
    ]
    answers = core.intake.receive(stamped, receipts_v2=True)
    assert [a[:4] for a in answers] == [b"HTR1"] * 2
    assert [env.verify_receipt(a, core.keys)["status"] for a in answers] == ["accepted"] * 2
    # the platform's answer to a resend is signed afresh from the relay row: still v2 for it
    again = hub.intake.receive(frames[:1], receipts_v2=True)
    assert again[0][:4] == b"HTR2" and position(again[0]) == (0, 1)
    assert env.verify_receipt(again[0], hub.keys)["packet"] == ids_of(frames)[0]


def test_a_commit_that_changes_an_answer_signs_the_root_again(nodes: dict[str, Any]) -> None:
    """Two requests of one group carry one packet id with other content: the one taken second
    learns it only inside the commit and is refused as a replay there. Its batch's root is
    signed again over its final answers: every HTR2 root covers exactly the receipts given."""
    hub: Node = nodes["hub"]
    pid = "4f7c2d1e-0000-4000-8000-00000000b22e"
    requests = [
        [sealed(nodes, "m-1", "t-a", 1, packet_id=pid), sealed(nodes, "m-1", "t-a2", 1)],
        [sealed(nodes, "m-2", "t-b", 1, packet_id=pid), sealed(nodes, "m-2", "t-b2", 1)],
    ]
    got = one_group(hub, requests, receipts_v2=True)
    statuses = []
    for answers in got:
        assert isinstance(answers, list), answers
        assert [a[:4] for a in answers] == [b"HTR2"] * 2
        assert len({a[-64:] for a in answers}) == 1
        assert sorted(position(a) for a in answers) == [(0, 2), (1, 2)]
        statuses.append([env.verify_receipt(a, hub.keys)["status"] for a in answers])
    assert sorted(statuses) == [["refused", "relayed"], ["relayed", "relayed"]]
    assert got[0][0][-64:] != got[1][0][-64:]  # each request its own root


def test_the_peer_port_framing_takes_htr2_items_within_their_bound() -> None:
    """A platform forwards receipts as batch items: the early framing check passes an HTR2
    item (position, count, path and signature beyond the JSON) and refuses one over its bound
    from the length alone, like an HTR1 one over 64 KiB."""
    fields = {
        "packet": None,
        "sender": "chc",
        "recipient": "core",
        "receiver": "core",
        "status": "accepted",
        "code": None,
        "message": None,
        "at": "2025-03-14T01:59:28.250Z",
        "digest": None,
    }
    frames = env.sign_receipts([fields] * 3, Ed25519PrivateKey.generate())
    body = env.encode_batch(frames)
    peek = FramePeek(len(body), known=lambda _n: True, max_body=1 << 20, max_items=10)
    peek.finish(body, len(body))
    assert [body[a:b] for a, b in peek.items] == frames
    limits = {b"HTR1": 8 + env.MAX_RECEIPT + 64, b"HTR2": 8 + env.MAX_RECEIPT + 64 + 9 + 32 * 32}
    for magic, limit in limits.items():
        ok = env.encode_batch([magic + bytes(limit - 4)])
        FramePeek(len(ok), known=lambda _n: True, max_body=1 << 20, max_items=10).finish(
            ok, len(ok)
        )
        over = env.encode_batch([magic + bytes(limit - 3)])
        peek = FramePeek(len(over), known=lambda _n: True, max_body=1 << 20, max_items=10)
        with pytest.raises(PacketTooLarge, match=f"limit {limit}"):
            peek.finish(over, len(over))
