"""Order within a thread survives an outage: a packet queued while the peer was down and the
first attempt backed off must not overtake the older packet when the peer returns."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from bridge.store.db import Store
from bridge.store.tables import INBOX
from tests.factory import bundle
from tests.harness import Alliance, wait_for

pytestmark = pytest.mark.slow

MEMBERS = [
    {"id": "core", "zh": "复兴医院", "en": "Fuxing Hospital", "role": "core"},
    {"id": "chc", "zh": "月坛社区卫生服务中心", "en": "Yuetan CHC", "role": "community"},
]
RULES = [{"from": "chc", "to": "core", "kinds": ["result.lab"]}]


def test_backed_off_packet_is_not_overtaken(tmp_path: Path) -> None:
    a = Alliance(tmp_path / "alliance", MEMBERS, RULES)
    chc_file = a.files["chc"]
    text = chc_file.read_text()
    assert "[delivery]" not in text
    chc_file.write_text(
        text + "\n[delivery]\nbackoff_base_s = 6.0\nbackoff_max_s = 6.0\npoll_interval_s = 0.2\n"
    )
    a.start("chc")  # core is down
    try:
        chc, core = a.node("chc"), a.node("core")
        first = chc.send("core", "result.lab", [bundle(1, marker="first")], thread="t")[0]
        wait_for(
            lambda: chc.api("GET", "/local/v1/outbox")[0]["attempts"] >= 1,
            what="a failed first attempt",
        )
        core.start()
        core.wait_ready()
        second = chc.send("core", "result.lab", [bundle(1, marker="second")], thread="t")[0]
        store = Store(core.plan.storage_dsn)
        try:

            def arrived() -> list[str]:
                with store.read() as conn:
                    return [
                        r.packet_id
                        for r in conn.execute(select(INBOX.c.packet_id).order_by(INBOX.c.id))
                    ]

            got = wait_for(
                lambda: len(arrived()) == 2 and arrived(), timeout=30, what="both packets"
            )
        finally:
            store.dispose()
        assert got == [first, second]
    finally:
        a.stop_all()
