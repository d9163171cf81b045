"""The web pages in a real browser: Debian's headless Chromium driven by Playwright.

Two real node processes (core hospital, community centre). A clinician at the core logs in,
finds the arrived referral in the inbox, accepts it through the form; the referring GP's page on
the other node shows the change (polled with a bounded wait). The core then records arrival and
discharge-and-return through the forms and the GP sees the return slip. An auditor opens the
log, filters it and downloads the CSV export. Every page visited is saved as a screenshot in
``test-artifacts/screenshots/`` (CI keeps the folder as an artefact).

Chromium is Debian's (``/usr/bin/chromium``, installed by ``.ci/run``); Playwright never
downloads a browser here.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.clinical_html import assert_readable
from tests.harness import ROOT, Alliance, NodeProcess, wait_for
from tests.referrals import referral
from tests.test_referral_loop import MEMBERS, RULES, both, new_thread, state

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

if not CHROMIUM.exists():  # CI installs it (.ci/run); a developer without it is told why
    pytest.skip(
        "Debian chromium is not installed at /usr/bin/chromium (apt-get install "
        "chromium); .ci/run installs it",
        allow_module_level=True,
    )

sync_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Alliance]:
    a = Alliance(tmp_path_factory.mktemp("browser") / "alliance", MEMBERS, RULES)
    a.start("core", "chc")
    yield a
    a.stop_all()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            yield b
        finally:
            b.close()


class User:
    """One person at one node: a browser context (own cookies) and a page."""

    def __init__(self, browser: Any, node: NodeProcess, role: str, tag: str) -> None:
        self.node, self.tag, self.role = node, tag, role
        self.context = browser.new_context(
            viewport={"width": 1280, "height": 900}, accept_downloads=True, locale="zh-CN"
        )
        self.page = self.context.new_page()
        self.shots = 0
        self.go("/ui/login")
        self.page.fill("input[name=token]", node.token(role))
        self.page.click("form.login button[type=submit]")
        self.page.wait_for_load_state()
        assert "/ui/login" not in self.page.url, self.page.content()[:500]
        self.shot("home")

    def go(self, path: str) -> Any:
        return self.page.goto(self.node.local_url + path)

    def shot(self, name: str) -> Path:
        if self.role == "clinician" and re.search(
            r"/ui/referrals(/[^/?]+(/slip(/\w+)?)?)?([?#].*)?$", self.page.url
        ):
            # what the clinician reads: no raw codes, status words or ISO times (issue 15)
            assert_readable(self.page.content(), f"{self.tag} {name}")
        self.shots += 1
        out = SHOTS / f"{self.tag}-{self.shots:02d}-{name}.png"
        self.page.screenshot(path=str(out), full_page=True)
        assert out.stat().st_size > 1000
        return out

    def text(self, selector: str) -> str:
        return self.page.inner_text(selector).strip()

    def close(self) -> None:
        self.context.close()


def rows(page: Any, table_cls: str) -> list[list[str]]:
    """The body cells of a table, as text."""
    return page.eval_on_selector_all(
        f"table.{table_cls} tbody tr",
        "trs => trs.map(tr => Array.from(tr.cells).map(td => td.innerText.trim()))",
    )


def test_accept_in_browser_and_see_it_on_the_other_node(pair: Alliance, browser: Any) -> None:
    chc, core = pair.node("chc"), pair.node("core")
    thread = new_thread(
        chc, referral("up-inpatient", "core", icd10="I10", priority="urgent", mrn="BR0001")
    )
    both(pair, thread, "received", "received")

    doctor = User(browser, core, "clinician", "core-clinician")
    gp = User(browser, chc, "clinician", "chc-clinician")
    try:
        # the arrived referral is in the core's inbox; open it from there
        link = doctor.page.locator(f'table.inbox a[href="/ui/referrals/{thread}"]')
        assert link.count() == 1
        row = doctor.page.locator(
            "table.inbox tr", has=doctor.page.locator(f'a[href="/ui/referrals/{thread}"]')
        )
        assert "上转·专科住院" in row.inner_text() and "评估中" in row.inner_text()
        link.click()
        doctor.page.wait_for_url(f"**/ui/referrals/{thread}")
        assert doctor.text("span.status") == "已收到"
        assert doctor.text("p.patient span.name") == "王秀英"
        assert "I10" in doctor.text("span.reason")
        doctor.shot("detail-received")

        # accept through the form
        form = doctor.page.locator("form.accept")
        form.locator("input[name=bed]").fill("心内科 12床")
        form.locator("input[name=department]").fill("心血管内科")
        form.locator("input[name=doctor]").fill("张主任")
        form.locator("input[name=appointment]").fill("2026-11-21T10:00")
        form.locator("button[type=submit]").click()
        doctor.page.wait_for_url(f"**/ui/referrals/{thread}")
        assert doctor.text("span.status") == "已接收"
        assert doctor.page.locator("form.accept").count() == 0  # accepted once only
        doctor.shot("detail-accepted")

        # the referring GP's page on the other node shows the change (bounded poll)
        gp.go(f"/ui/referrals/{thread}")

        def gp_sees_scheduled() -> bool:
            gp.page.reload()
            return gp.text("span.step") == "已预约"

        wait_for(gp_sees_scheduled, timeout=30, every=0.3, what="the GP's page to show 已预约")
        assert gp.text("span.status") == "已接收"
        slip = {r[0]: r[1] for r in rows(gp.page, "acceptance")}
        assert slip == {
            "床位": "心内科 12床",
            "科室": "心血管内科",
            "接诊医生": "张主任",
            "预约时间": "2026-11-21 10:00 (北京时间)",
        }
        gp.shot("detail-scheduled")
        gp.go("/ui/referrals")
        out = [r for r in rows(gp.page, "outbox") if "已预约" in r]
        assert len(out) == 1 and "复兴医院 (core)" in out[0][3]
        gp.shot("list")

        # printable acceptance slip: the header and links are not printed
        gp.go(f"/ui/referrals/{thread}/slip/accept")
        assert gp.text(".slip h1") == "接诊单"
        assert "心内科 12床" in gp.text("table.acceptance")
        gp.page.emulate_media(media="print")
        assert not gp.page.locator("header").is_visible()
        assert not gp.page.locator("p.noprint").is_visible()
        gp.shot("slip-accept-print")
        gp.page.emulate_media(media="screen")

        # patient arrives, then discharge-and-return through the form
        doctor.page.locator("form.arrive button").click()
        doctor.page.wait_for_url(f"**/ui/referrals/{thread}")
        assert doctor.text("span.status") == "诊疗中"
        ret = doctor.page.locator("form.return")
        ret.locator("input[name=doctor]").fill("张主任")
        ret.locator("input[name=diagnosis]").fill("原发性高血压 3级")
        ret.locator("textarea[name=summary]").fill("住院调整降压方案，血压平稳")
        ret.locator("textarea[name=instructions]").fill("氨氯地平 5mg qd，两周后社区复查")
        doctor.shot("detail-return-form")
        ret.locator("button[type=submit]").click()
        doctor.page.wait_for_url(f"**/ui/referrals/{thread}")
        assert doctor.text("span.status") == "已完成"
        doctor.shot("detail-completed")

        def gp_has_return() -> bool:
            gp.go(f"/ui/referrals/{thread}")
            return gp.text("span.step") == "转回已接收"

        wait_for(gp_has_return, timeout=30, every=0.3, what="the return at the GP")
        gp.shot("detail-returned")
        gp.go(f"/ui/referrals/{thread}/slip/return")
        assert gp.text(".slip h1") == "转回单"
        fields = {r[0]: r[1] for r in rows(gp.page, "slip-fields")}
        assert fields["给社区医生的指导"] == "氨氯地平 5mg qd，两周后社区复查"
        assert fields["医保转诊备案号"] == "YB-2026-0001"
        docs = gp.text(".slip .doc")
        assert "出院小结" in docs and "住院调整降压方案，血压平稳" in docs
        assert "原发性高血压 3级" in docs
        gp.shot("slip-return")
        assert state(chc, thread)["status"] == "completed"
    finally:
        doctor.close()
        gp.close()


def test_auditor_filters_and_exports_in_browser(pair: Alliance, browser: Any) -> None:
    chc, core = pair.node("chc"), pair.node("core")
    thread = new_thread(chc, referral("up-exam", "core", mrn="BR0002"))
    both(pair, thread, "received", "received")

    # a clinician cannot open the auditor's pages, nor the auditor the clinician's
    doctor = User(browser, core, "clinician", "core-clinician-denied")
    auditor = User(browser, core, "auditor", "core-auditor")
    try:
        assert doctor.go("/ui/audit").status == 403
        assert "无权访问" in doctor.text("main")
        doctor.shot("audit-forbidden")
        assert auditor.go("/ui/referrals").status == 403
        auditor.shot("referrals-forbidden")

        auditor.go("/ui/audit")
        assert auditor.text("p.chain").startswith("✔ 已验证")
        assert "王秀英" not in auditor.page.content()  # hashes only, never names
        auditor.shot("log")

        # filter: member chc, action referral
        auditor.page.select_option("form.audit-filter select[name=peer]", "chc")
        auditor.page.select_option("form.audit-filter select[name=action]", "referral")
        auditor.page.click("form.audit-filter button[type=submit]")
        auditor.page.wait_for_url(re.compile(r".*/ui/audit\?.*peer=chc.*"))
        shown = rows(auditor.page, "audit")
        assert shown and {(r[2], r[5]) for r in shown} == {("referral", "chc")}
        assert any(r[6] == thread for r in shown)
        auditor.shot("log-filtered")

        # export what the filter selects, as CSV, through the browser's download
        with auditor.page.expect_download() as info:
            auditor.page.click("a.export-csv")
        download = info.value
        assert re.fullmatch(r"audit-core-\d{8}T\d{6}Z\.csv", download.suggested_filename)
        saved = SHOTS.parent / download.suggested_filename
        download.save_as(str(saved))
        text = saved.read_text(encoding="utf-8-sig")
        exported = list(csv.DictReader(io.StringIO(text)))
        assert exported and {(r["action"], r["peer"]) for r in exported} == {("referral", "chc")}
        assert sorted(int(r["seq"]) for r in exported) == sorted(int(r[0]) for r in shown)
        assert thread in {r["thread"] for r in exported}
        assert all(re.fullmatch(r"[0-9a-f]{64}", r["hash"]) for r in exported)
        assert "王秀英" not in text and "110102195003151234" not in text
    finally:
        doctor.close()
        auditor.close()


def test_it_and_statistics_pages_in_browser(pair: Alliance, browser: Any) -> None:
    core = pair.node("core")
    it = User(browser, core, "it", "core-it")
    try:
        peers = rows(it.page, "peers")
        assert len(peers) == 1 and peers[0][0] == "月坛社区卫生服务中心 (chc)"
        assert "referral.request" in it.text("table.rules")
        assert it.text("p.mapping-none").startswith("未配置编码映射")
        it.shot("it")
        it.go("/ui/stats")
        assert it.page.locator("svg.chart-month rect.bar").count() >= 24
        yearly = {r[1]: r for r in rows(it.page, "yearly")}
        # this module's referrals so far were made by chc: at least the two above, all up
        assert int(yearly["月坛社区卫生服务中心 (chc)"][2]) >= 2
        it.shot("stats")
        it.go("/ui/stats?lang=en")
        assert it.text("h2") == "Referral statistics"
        it.shot("stats-en")
    finally:
        it.close()


# -- issue 13: a page on another port, the headers' policy, the docs page ------------------------


def posting_page(target: str, fields: dict[str, str]) -> str:
    """A page that posts a form to ``target`` as soon as it loads."""
    import html

    inputs = "".join(
        f'<input name="{html.escape(k)}" value="{html.escape(v)}">' for k, v in fields.items()
    )
    return (
        f'<!DOCTYPE html><html><body><form method="post" action="{html.escape(target)}">'
        f"{inputs}</form><script>document.forms[0].submit()</script></body></html>"
    )


class ForeignSite:
    """One page on another loopback port of the same host (same-site for cookies: SameSite
    does not separate ports)."""

    def __init__(self, html_text: str) -> None:
        import http.server
        import threading

        from simulators.ports import free_port_block

        page = html_text.encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # http.server's name
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)

            def log_message(self, *args: Any) -> None:
                pass

        self.port = free_port_block(1)
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_page_on_another_port_cannot_post_as_the_logged_in_clinician(
    pair: Alliance, browser: Any
) -> None:
    chc, core = pair.node("chc"), pair.node("core")
    thread = new_thread(chc, referral("up-outpatient", "core", mrn="BR0003"))
    both(pair, thread, "received", "received")
    doctor = User(browser, core, "clinician", "core-clinician-csrf")
    foreign = ForeignSite(
        posting_page(f"{core.local_url}/ui/referrals/{thread}/steps/reject", {"reason": "跨站伪造"})
    )
    try:
        doctor.go(f"/ui/referrals/{thread}")
        assert doctor.text("span.status") == "已收到"
        # the clinician, still logged in, opens the other site's page in the same browser
        doctor.page.goto(foreign.url)
        doctor.page.wait_for_url(f"{core.local_url}/ui/referrals/{thread}/steps/reject")
        doctor.page.wait_for_load_state()
        assert "HT-WEB-ORIGIN" in doctor.page.content()
        doctor.shot("cross-origin-refused")
        assert state(core, thread)["status"] == "received"
        assert state(core, thread).get("reason") in (None, "")
        # the session itself is intact: the node's own form still works
        doctor.go(f"/ui/referrals/{thread}")
        form = doctor.page.locator("form.reject")
        form.locator("input[name=reason]").fill("床位已满")
        form.locator("button[type=submit]").click()
        doctor.page.wait_for_url(f"**/ui/referrals/{thread}")
        assert doctor.text("span.status") == "已拒绝"
        assert state(core, thread)["status"] == "rejected"
    finally:
        foreign.close()
        doctor.close()


def test_pages_and_docs_run_under_their_policy_in_the_browser(pair: Alliance, browser: Any) -> None:
    """The page policy blocks nothing the pages need (the stylesheet applies, the slip's print
    button is wired), a page cannot be framed, and Swagger UI renders from the node's own
    files with no request leaving for another host."""
    core = pair.node("core")
    doctor = User(browser, core, "clinician", "core-clinician-policy")
    violations: list[str] = []
    elsewhere: list[str] = []
    doctor.page.on(
        "console",
        lambda m: violations.append(m.text) if "Content Security Policy" in m.text else None,
    )
    doctor.page.on(
        "request",
        lambda r: elsewhere.append(r.url) if not r.url.startswith(core.local_url) else None,
    )
    try:
        doctor.go("/ui/referrals")
        bg = doctor.page.eval_on_selector("header", "h => getComputedStyle(h).backgroundColor")
        assert bg == "rgb(29, 78, 137)"  # the hashed inline stylesheet applies (#1d4e89)
        # a page elsewhere framing the node's page gets an empty frame (frame-ancestors)
        framing = ForeignSite(f'<iframe src="{core.local_url}/ui/referrals"></iframe>')
        try:
            doctor.page.goto(framing.url)
            doctor.page.wait_for_load_state("load")
            [frame] = [f for f in doctor.page.frames if f != doctor.page.main_frame]
            assert "收到的转诊" not in frame.content()
            assert any("frame-ancestors" in v for v in violations), violations
        finally:
            framing.close()
        elsewhere.clear()  # the framing page itself was on another port
        doctor.page.goto(f"{core.local_url}/docs")
        doctor.page.wait_for_selector(".swagger-ui .info .title", timeout=30000)
        assert "Hutong node core" in doctor.text(".swagger-ui .info .title")
        assert doctor.page.locator(".opblock-tag").count() >= 2  # fhir and default
        doctor.shot("docs")
        assert elsewhere == [], elsewhere
        assert [v for v in violations if "frame-ancestors" not in v] == [], violations
    finally:
        doctor.close()
