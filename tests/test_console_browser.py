"""The live IT dashboard in a real browser (Debian's headless Chromium, Playwright).

IT opens /ui/it with a 2 s refresh; packets flow to the community centre and the dashboard's
numbers change in place (the static script swaps the live part in: the page is not reloaded,
the strict CSP runs no inline script). IT pauses and resumes the LIS adapter and the sending to
the centre with the buttons. Screenshots go to ``test-artifacts/screenshots/``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from simulators.ports import free_port_block
from tests.factory import bundle
from tests.harness import ROOT, Alliance

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = ROOT / "test-artifacts" / "screenshots"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

if not CHROMIUM.exists():
    pytest.skip("Debian chromium is not installed at /usr/bin/chromium", allow_module_level=True)

sync_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Alliance]:
    from tests.lis_site import write_site

    tmp = tmp_path_factory.mktemp("console-browser")
    members = [
        {
            "id": "core",
            "zh": "复兴医院",
            "en": "Fuxing Hospital",
            "role": "core",
            "adapters": [
                {
                    "name": "lis",
                    "type": "lis-hl7",
                    "mappings": str(write_site(tmp / "mappings")),
                    "options": {"port": free_port_block(1)},
                }
            ],
        },
        {"id": "chc", "zh": "月坛社区卫生服务中心", "en": "Yuetan CHC", "role": "community"},
    ]
    a = Alliance(
        tmp / "alliance", members, [{"from": "core", "to": "chc", "kinds": ["result.lab"]}]
    )
    a.start("core", "chc")
    yield a
    a.stop_all()


def test_dashboard_updates_in_place_and_pauses(pair: Alliance) -> None:
    core = pair.node("core")
    SHOTS.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            ctx = browser.new_context(viewport={"width": 1400, "height": 1000}, locale="zh-CN")
            page = ctx.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(core.local_url + "/ui/login")
            page.fill("input[name=token]", core.token("it"))
            page.click("form.login button[type=submit]")
            page.wait_for_load_state()
            page.goto(core.local_url + "/ui/it?refresh=2")
            page.evaluate("window.__marker = 'same page'")  # survives only without a reload
            chc_sent = "#live table.live-peers span[data-peer=chc]"
            assert page.locator(chc_sent).count() == 1
            first = page.get_attribute("#live p.updated", "data-updated")

            core.send("chc", "result.lab", [bundle(1 + i) for i in range(4)])
            # the live part refreshes by itself and shows the four packets acknowledged
            page.wait_for_function(
                """() => {
                  const row = document.querySelector('#live span[data-peer="chc"]')
                    .closest('tr');
                  return row.cells[3].textContent.trim().startsWith('4 /');
                }""",
                timeout=60_000,
            )
            assert page.get_attribute("#live p.updated", "data-updated") != first
            assert page.evaluate("window.__marker") == "same page"
            assert page.locator("#live svg.chart-rate rect.bar").count() == 48
            page.screenshot(path=str(SHOTS / "console-dashboard.png"), full_page=True)

            # pause and resume the LIS adapter and the sending to chc with the buttons
            for name, attr in (("lis", "data-adapter"), ("chc", "data-peer")):
                cell = f'#live tr:has(span[{attr}="{name}"])'
                page.click(f"{cell} form.pause button")
                page.wait_for_load_state()
                assert "⏸" in page.inner_text(cell)
                page.screenshot(path=str(SHOTS / f"console-paused-{name}.png"), full_page=True)
                page.click(f"{cell} form.pause button")
                page.wait_for_load_state()
                assert "▶" in page.inner_text(cell)
            assert not [e for e in errors if "Content Security Policy" in e], errors
        finally:
            browser.close()
    assert any(r == ("paused",) for r in _actions(core))


def _actions(node: Any) -> list[tuple[str]]:
    from tests.harness import db_rows

    return db_rows(node, "SELECT action FROM audit WHERE action IN ('paused', 'resumed')")
