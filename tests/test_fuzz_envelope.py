"""Bad-input suite, envelope: the frame and batch decoders and the whole receive pipeline take
arbitrary and mutated bytes without crashing, and never accept a changed frame.

Properties (hypothesis, bounded examples, no deadline): decoding raises only the refusal tree
(``PacketRefused``); a valid frame with any edit is refused (an unsigned error if the edit
broke its authentication, else a signed refusal), quarantined, and never reaches the inbox; the
untouched frame is accepted once.
"""

from __future__ import annotations

from collections.abc import Iterator

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from bridge.crypto import envelope as env
from bridge.errors import PacketRefused, UnknownSender
from bridge.store.tables import INBOX, QUARANTINE
from tests.factory import bundle_bytes
from tests.fuzzkit import Receiver, mutated, receiver

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
MAGICS = [b"HTP1", b"HTR1", b"HTR2", b"HTB1", b"HTS1", b""]


@pytest.fixture(scope="module")
def core(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Receiver]:
    r = receiver(tmp_path_factory.mktemp("fuzz-envelope") / "alliance")
    yield r
    r.close()


@FUZZ
@given(magic=st.sampled_from(MAGICS), rest=st.binary(max_size=600))
def test_decoders_raise_only_refusals(magic: bytes, rest: bytes) -> None:
    data = magic + rest
    for call in (
        lambda: env.decode(data, max_body=1 << 20),
        lambda: env.decode_batch(data, max_items=50, max_total=1 << 20),
        lambda: env.frame_kind(data),
        lambda: env.verify_receipt(data, lambda _n: ()),
        lambda: env.receipt_fields(data),
    ):
        try:
            call()
        except PacketRefused:
            pass


#: one answer batch's batch-signed receipts (HTR2), signed by core's key (the fixture's node)
def _v2_receipts(r: Receiver) -> list[bytes]:
    fields = {
        "packet": None,
        "sender": "chc",
        "recipient": "core",
        "receiver": "core",
        "status": "accepted",
        "code": None,
        "message": None,
        "at": "2025-03-14T01:59:28.250Z",
        "digest": "ab" * 32,
    }
    return env.sign_receipts(
        [{**fields, "packet": f"00000000-0000-4000-8000-{i:012x}"} for i in range(5)],
        r.ctx.signing_key,
    )


@FUZZ
@given(data=st.data())
def test_a_changed_batch_receipt_never_verifies_to_other_fields(
    core: Receiver, data: st.DataObject
) -> None:
    """Any edit of an HTR2 receipt (its JSON, position, count, path or signature) is refused
    with a refusal of the tree; nothing in the frame is unsigned, so were an edit ever to
    verify, it would have to give back exactly the fields the receiver signed."""
    frames = _v2_receipts(core)
    i = data.draw(st.integers(0, len(frames) - 1))
    original = answer_fields(core, frames[i])
    changed = data.draw(mutated(frames[i]))
    try:
        got = answer_fields(core, changed)
    except PacketRefused:
        return
    assert got == original


def inbox_count(r: Receiver, table: object = INBOX) -> int:
    with r.ctx.store.read() as conn:
        return conn.execute(select(func.count()).select_from(table)).scalar_one()


def answer_fields(r: Receiver, answer: bytes) -> dict:
    """A signed receipt's fields, or an unsigned error's as status 'refused'."""
    if answer[:1] == b"{":
        return {"status": "refused", **orjson.loads(answer)}

    def keys_for(node: str) -> tuple:
        if node != "core":
            raise UnknownSender(node)
        return r.ctx.plan.directory["core"].signing_keys

    return env.verify_receipt(answer, keys_for)


@FUZZ
@given(data=st.data())
def test_a_changed_frame_is_refused_never_taken(core: Receiver, data: st.DataObject) -> None:
    original = core.seal(bundle_bytes(n_obs=1))
    frame = data.draw(mutated(original))
    before, held = inbox_count(core), inbox_count(core, QUARANTINE)
    [answer] = core.intake.receive([frame])
    fields = answer_fields(core, answer)
    assert fields["status"] == "refused"
    assert fields["code"].startswith("HT-PKT")
    assert inbox_count(core) == before
    assert inbox_count(core, QUARANTINE) == held + 1  # kept, with its raw bytes, for IT


@FUZZ
@given(batch=st.binary(max_size=400))
def test_gateway_batch_decoder_on_junk_after_magic(batch: bytes) -> None:
    try:
        items = env.decode_batch(b"HTB1" + batch, max_items=20, max_total=1 << 16)
    except PacketRefused:
        return
    assert len(b"".join(items)) <= len(batch)


def test_the_untouched_frame_is_accepted_once(core: Receiver) -> None:
    """The control: the same pipeline does accept a valid frame, once."""
    frame = core.seal(bundle_bytes(n_obs=1), thread="control")
    before = inbox_count(core)
    first = answer_fields(core, core.intake.receive([frame])[0])
    again = core.intake.receive([frame])[0]
    assert first["status"] == "accepted" and inbox_count(core) == before + 1
    assert answer_fields(core, again) == first  # an identical re-send: the original receipt
    assert inbox_count(core) == before + 1
