"""A consultation in a real browser (Debian Chromium via Playwright), three real nodes.

The community centre's HIS asks the core hospital's consultation centre for an MDT (the FHIR
API, as the HIS slips do). At the centre, the expert 张主任 logs in with their own account,
finds it in the queue, assigns the experts and the video meeting, starts it, writes the report
in the editor beside the shared records and releases it. At the community centre 孙医生 sees
the released report in Chinese, prints it (A4, the centre's letterhead; the page header and
links hidden on paper) and turns the recommendation into a referral with one click.
Screenshots go to ``test-artifacts/screenshots/consult-*.png`` (the docs use copies in
``docs/img/``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests import consults
from tests.clinical_html import assert_readable
from tests.harness import Alliance, NodeProcess, wait_for
from tests.test_consult_loop import MEMBERS, RULES, Fhir, both, request, row
from tests.test_people import PASSWORD, add_user
from tests.test_web_browser import ARGS, CHROMIUM, SHOTS, rows

pytestmark = pytest.mark.slow

if not CHROMIUM.exists():
    pytest.skip("Debian chromium is not installed at /usr/bin/chromium", allow_module_level=True)

sync_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def al(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Alliance]:
    a = Alliance(tmp_path_factory.mktemp("consult-browser") / "alliance", MEMBERS, RULES)
    add_user(a.node("core"), "dr.zhang", "clinician", "张主任")
    add_user(a.node("chc"), "dr.sun", "clinician", "孙医生")
    a.start("core", "chc", "gw")
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


class Person:
    """One named person at one node, logged in with their own account."""

    shots = 0

    def __init__(self, browser: Any, node: NodeProcess, name: str) -> None:
        self.node = node
        self.context = browser.new_context(viewport={"width": 1280, "height": 900}, locale="zh-CN")
        self.page = self.context.new_page()
        self.go("/ui/login")
        self.page.fill("form.login-personal input[name=name]", name)
        self.page.fill("form.login-personal input[name=password]", PASSWORD)
        self.page.click("form.login-personal button[type=submit]")
        self.page.wait_for_load_state()
        assert "/ui/login" not in self.page.url

    def go(self, path: str) -> Any:
        return self.page.goto(self.node.local_url + path)

    def text(self, selector: str) -> str:
        return str(self.page.inner_text(selector)).strip()

    def submit(self, form: str) -> None:
        """Click the form's button and wait for the page the redirect lands on."""
        with self.page.expect_navigation():
            self.page.click(f"{form} button[type=submit]")

    def shot(self, name: str) -> None:
        if (
            "/ui/consultations" in self.page.url
            and self.page.evaluate("document.documentElement.lang") == "zh-CN"
        ):  # no raw codes or ISO times
            assert_readable(self.page.content(), name)
        Person.shots += 1
        out = SHOTS / f"consult-{Person.shots:02d}-{name}.png"
        self.page.screenshot(path=str(out), full_page=True)
        assert out.stat().st_size > 1000

    def close(self) -> None:
        self.context.close()


def test_an_expert_writes_and_releases_the_report_and_the_inviter_reads_and_prints_it(
    al: Alliance, browser: Any
) -> None:
    chc, core = al.node("chc"), al.node("core")
    with httpx.Client(timeout=60) as client:
        thread = request(Fhir(client, chc), consults.consultation("mdt", "core", mrn="YT9001"))
        both(al, client, thread, "received", "received")
    expert = Person(browser, core, "dr.zhang")
    gp = Person(browser, chc, "dr.sun")
    try:
        # the centre's queue, from the navigation
        with expert.page.expect_navigation():
            expert.page.click('header a[href="/ui/consultations"]')
        queue = [r for r in rows(expert.page, "queue") if "王秀英" in r[0]]
        assert len(queue) == 1 and queue[0][2] == "多学科会诊" and queue[0][5] == "预审中"
        assert queue[0][3] == "月坛社区卫生服务中心 (chc)"
        expert.shot("queue")
        with expert.page.expect_navigation():
            expert.page.click(f'table.queue a[href="/ui/consultations/{thread}"]')
        assert expert.text("span.step") == "预审中"
        assert expert.text("span.question") == "右肺上叶结节性质？是否需要手术？"
        assert "咳嗽两月" in expert.text(".doc")
        expert.shot("pre-review")

        # experts, time and the video meeting
        form = "form.schedule"
        expert.page.fill(
            f"{form} textarea[name=experts]", "张主任 呼吸内科\n王主任 胸外科\n赵主任 病理科"
        )
        expert.page.fill(f"{form} input[name=start]", "2026-12-05T14:00")
        expert.page.fill(f"{form} input[name=end]", "2026-12-05T15:00")
        expert.page.fill(f"{form} input[name=link]", consults.MEETING)
        expert.submit(form)
        assert expert.text("span.step") == "已排期"
        assert expert.text("span.experts") == "张主任 呼吸内科；王主任 胸外科；赵主任 病理科"
        assert expert.text("a.video") == consults.MEETING
        expert.shot("scheduled")
        expert.submit("form.start")
        assert expert.text("span.step") == "会诊中"

        # the report editor, the shared records beside it
        assert expert.page.locator(".beside form.report").is_visible()
        assert "咳嗽两月" in expert.text(".beside > div:nth-child(2)")
        ed = "form.report"
        expert.page.fill(f"{ed} input[name=icd10]", "C34.1")
        expert.page.fill(f"{ed} input[name=diagnosis]", "右肺上叶恶性肿瘤（待病理证实）")
        expert.page.fill(f"{ed} textarea[name=advice]", "建议行胸腔镜下右肺上叶楔形切除术")
        expert.page.check(f"{ed} input[name=refer]")
        expert.page.select_option(f"{ed} select[name=refer_to]", "core")
        expert.page.fill(
            f"{ed} input[name=referral_note]", "建议上转胸外科住院手术（已与家属沟通同意）"
        )
        expert.page.fill(f"{ed} input[name=author]", "张主任（呼吸内科）")
        expert.shot("report-editor")
        expert.submit(ed)
        assert expert.text("span.step") == "报告质控中"
        assert expert.text(".consult-note span.report-status") == "初步"
        expert.shot("report-draft")
        # quality check passed: release
        expert.submit("form.release")
        assert expert.text("span.step") == "报告已发布"
        assert expert.text(".consult-note span.report-status") == "最终"
        expert.shot("released")

        # the inviting doctor: the list, then the report, in Chinese
        gp.go("/ui/consultations")

        def received() -> bool:
            gp.page.reload()
            return any(r[5] == "报告已接收" for r in rows(gp.page, "mine") if "王秀英" in r[0])

        wait_for(received, timeout=40, every=0.3, what="the report at the inviting side")
        gp.shot("inviter-list")
        with gp.page.expect_navigation():
            gp.page.click(f'table.mine a[href="/ui/consultations/{thread}"]')
        assert gp.page.evaluate("document.documentElement.lang") == "zh-CN"
        assert gp.text("span.diagnosis") == "右肺上叶恶性肿瘤（待病理证实）"
        assert gp.text("span.advice") == "建议行胸腔镜下右肺上叶楔形切除术"
        assert gp.text(".consult-note span.report-status") == "最终"
        assert gp.text(".consult-note span.author") == "张主任（呼吸内科）"
        gp.shot("inviter-report")

        # print it: A4, the centre's letterhead, no page header or links on paper
        with gp.page.expect_navigation():
            gp.page.click("a.print-report")
        assert gp.text(".slip h1") == "远程会诊报告"
        assert gp.text(".letterhead .org") == "复兴医院"
        assert gp.text(".slip span.diagnosis") == "右肺上叶恶性肿瘤（待病理证实）"
        gp.page.emulate_media(media="print")
        assert not gp.page.locator("header").is_visible()
        assert not gp.page.locator("p.noprint").is_visible()
        assert gp.page.locator(".letterhead").is_visible()
        gp.shot("report-print")
        pdf = gp.page.pdf(format="A4", print_background=True)
        assert pdf[:5] == b"%PDF-"
        (SHOTS.parent / "consult-report.pdf").write_bytes(pdf)
        gp.page.emulate_media(media="screen")

        # one click from the report to a referral, basedOn the consultation
        gp.go(f"/ui/consultations/{thread}")
        gp.page.select_option("form.referral select[name=kind]", "up-inpatient")
        gp.page.check("form.referral input[name=consent]")
        gp.shot("referral-offer")
        gp.submit("form.referral")
        referral = row(chc, thread)["referral_thread"]
        assert referral and gp.page.url.endswith(f"/ui/referrals/{referral}")
        assert re.search(r"上转", gp.text("main"))
        gp.shot("referral-made")

        # English is one click away, and the report reads the same
        gp.go(f"/ui/consultations/{thread}")
        with gp.page.expect_navigation():
            gp.page.click("header a.lang")
        assert gp.page.evaluate("document.documentElement.lang") == "en"
        assert gp.text("h2") == "Consultation"
        assert gp.text("span.step") == "Report received by the inviting side"
        assert gp.text("span.diagnosis") == "右肺上叶恶性肿瘤（待病理证实）"
        assert "Referral made from this report" in gp.text("p.referral-made")
        gp.shot("inviter-report-en")
    finally:
        expert.close()
        gp.close()
