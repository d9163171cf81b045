"""Shared pieces of the bad-input suite (tests/test_fuzz_*.py and fuzz/): an in-process node
with real keys and a real SQLite store, valid inputs to mutate, and byte mutations."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from bridge.config.loader import load_node
from bridge.context import NodeContext
from bridge.crypto import envelope as env
from bridge.crypto.keys import load_signing_key
from bridge.gateway.intake import Intake
from tests.harness import Alliance

MEMBERS = [
    {"id": "core", "zh": "复兴医院", "en": "Fuxing Hospital", "role": "core"},
    {"id": "chc", "zh": "月坛社区卫生服务中心", "en": "Yuetan CHC", "role": "community"},
]
RULES = [{"from": "chc", "to": "core", "kinds": ["result.lab"]}]


@dataclass
class Receiver:
    """core's intake, in process, and chc's keys to seal valid frames for it."""

    ctx: NodeContext
    intake: Intake
    chc_key: Any
    core_pub: Any

    def seal(self, body: bytes, **kw: Any) -> bytes:
        args: dict[str, Any] = {
            "sender": "chc",
            "recipient": "core",
            "kind": "result.lab",
            "thread": "t1",
            "seq": 1,
            "signing_key": self.chc_key,
            "recipient_key": self.core_pub,
        }
        args.update(kw)
        return env.seal(body, **args)

    def close(self) -> None:
        self.ctx.store.dispose()


def receiver(folder: Path) -> Receiver:
    a = Alliance(folder, MEMBERS, RULES)
    ctx = NodeContext.open(load_node(a.files["core"]))
    chc = load_node(a.files["chc"])
    return Receiver(
        ctx,
        Intake(ctx),
        load_signing_key(chc.keys.signing, chc.keys.passphrase),
        ctx.plan.directory["core"].encryption_keys[0],
    )


@st.composite
def mutated(draw: st.DrawFn, original: bytes) -> bytes:
    """``original`` with one to three edits (flip, overwrite, insert, delete, truncate,
    append), never equal to it."""
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "append"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and data:
            del data[pos : pos + draw(st.integers(1, 16))]
        elif op == "truncate":
            del data[pos:]
        else:
            data += draw(st.binary(min_size=1, max_size=16))
    out = bytes(data)
    if out == original:
        out = original + b"\x00"
    return out
