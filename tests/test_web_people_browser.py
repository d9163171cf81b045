"""People in a real browser (Debian Chromium via Playwright): two clinicians with their own
accounts open the same referral; the auditor finds the patient by ID number and sees both by
name with times; the CSV export names them; a failed login and the export are in the audit.
IT opens the message browser and the accounts page. Screenshots go to
``test-artifacts/screenshots/people-*.png`` (the docs use copies in ``docs/img/``).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from sqlalchemy import select

from bridge.audit.events import event_fields, who_fields
from bridge.audit.tables import AuditRecord
from bridge.privacy import patient_hash
from bridge.store.db import Store
from tests.harness import Alliance, NodeProcess
from tests.referrals import referral
from tests.test_people import PASSWORD, WANG_ID, add_user
from tests.test_referral_loop import MEMBERS, RULES, both, new_thread
from tests.test_web_browser import ARGS, CHROMIUM, SHOTS, rows

pytestmark = pytest.mark.slow

if not CHROMIUM.exists():
    pytest.skip("Debian chromium is not installed at /usr/bin/chromium", allow_module_level=True)

sync_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Alliance]:
    a = Alliance(tmp_path_factory.mktemp("people-browser") / "alliance", MEMBERS, RULES)
    core = a.node("core")
    for name, roles, display in (
        ("dr.li", "clinician", "李医生"),
        ("dr.chen", "clinician", "陈医生"),
        ("aud.wu", "auditor", "吴审计"),
        ("it.zhou", "it,admin", "周工"),
    ):
        add_user(core, name, roles, display)
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


class Person:
    """One named person at one node: their own browser context, logged in by name."""

    def __init__(
        self, browser: Any, node: NodeProcess, name: str, password: str = PASSWORD
    ) -> None:
        self.node, self.name = node, name
        self.context = browser.new_context(
            viewport={"width": 1280, "height": 900}, accept_downloads=True, locale="zh-CN"
        )
        self.page = self.context.new_page()
        self.go("/ui/login")
        self.page.fill("form.login-personal input[name=name]", name)
        self.page.fill("form.login-personal input[name=password]", password)
        self.page.click("form.login-personal button[type=submit]")
        self.page.wait_for_load_state()

    @property
    def logged_in(self) -> bool:
        return "/ui/login" not in self.page.url

    def go(self, path: str) -> Any:
        return self.page.goto(self.node.local_url + path)

    def shot(self, name: str) -> None:
        out = SHOTS / f"people-{name}.png"
        self.page.screenshot(path=str(out), full_page=True)
        assert out.stat().st_size > 1000

    def close(self) -> None:
        self.context.close()


def audit_rows(node: NodeProcess) -> list[dict[str, Any]]:
    s = Store(node.plan.storage_dsn)
    try:
        with s.read() as conn:
            got = conn.execute(
                select(AuditRecord.__table__.c.resource).order_by(AuditRecord.__table__.c.seq)
            ).all()
    finally:
        s.dispose()
    out = []
    for (res,) in got:
        event = orjson.loads(res)
        out.append({**event_fields(event), **who_fields(event)})
    return out


def test_two_clinicians_then_the_auditor_sees_both_by_name(pair: Alliance, browser: Any) -> None:
    chc, core = pair.node("chc"), pair.node("core")
    thread = new_thread(chc, referral("up-inpatient", "core", icd10="I10", mrn="BR7001"))
    both(pair, thread, "received", "received")

    intruder = Person(browser, core, "dr.li", "not the password at all")
    assert not intruder.logged_in
    assert "用户名或密码错误" in intruder.page.inner_text("main")
    intruder.shot("01-failed-login")
    intruder.close()

    people = [Person(browser, core, n) for n in ("dr.li", "dr.chen")]
    try:
        for i, doc in enumerate(people):
            assert doc.logged_in and doc.page.url.endswith("/ui/referrals")
            listed = rows(doc.page, "inbox")
            assert any("王秀英" in r[0] and "BR7001" in r[1] for r in listed), listed
            if i == 0:
                doc.shot("02-referral-list")
            doc.page.click(f'table.inbox a[href="/ui/referrals/{thread}"]')
            doc.page.wait_for_url(f"**/ui/referrals/{thread}")
            assert doc.page.inner_text("p.patient span.name") == "王秀英"
            assert doc.page.inner_text("span.who") == doc.name
    finally:
        for doc in people:
            doc.close()

    aud = Person(browser, core, "aud.wu")
    try:
        assert aud.logged_in and aud.page.url.endswith("/ui/audit")
        aud.page.fill("form.lookup input[name=national_id]", WANG_ID)
        aud.page.click("form.lookup button[type=submit]")
        aud.page.wait_for_load_state()
        phash = patient_hash(core.plan.patient_hash_key, WANG_ID)
        assert f"patient_hash={phash}" in aud.page.url
        assert WANG_ID not in aud.page.content()
        log = rows(aud.page, "audit")
        opened = [
            r
            for r in log
            if r[9] in ("user:dr.li", "user:dr.chen") and f"/ui/referrals/{thread}" in r[12]
        ]
        assert {r[9] for r in opened} == {"user:dr.li", "user:dr.chen"}
        assert all(r[1].endswith("+08:00") and r[10] == "clinician" for r in opened)
        aud.shot("03-auditor-who-looked")
        with aud.page.expect_download() as dl:
            aud.page.click("a.export-csv")
        data = dl.value.path().read_bytes().decode("utf-8-sig")
        exported = list(csv.DictReader(io.StringIO(data)))
        assert {"user:dr.li", "user:dr.chen"} <= {r["actor"] for r in exported}
    finally:
        aud.close()

    audit = audit_rows(core)
    failed = [r for r in audit if r["action"] == "login-failed"]
    assert [(r["actor"], r["outcome"], r["address"]) for r in failed] == [
        ("user:dr.li", "4", "127.0.0.1")
    ]
    exports = [r for r in audit if r["action"] == "export"]
    assert [(r["actor"], r["actor_role"]) for r in exports] == [("user:aud.wu", "auditor")]
    logins = {r["actor"] for r in audit if r["action"] == "login"}
    assert logins == {"user:dr.li", "user:dr.chen", "user:aud.wu"}


def test_it_sees_the_message_browser_and_accounts(pair: Alliance, browser: Any) -> None:
    core = pair.node("core")
    it = Person(browser, core, "it.zhou")
    try:
        assert it.logged_in
        it.go("/ui/messages?box=inbox")
        listed = rows(it.page, "messages")
        assert listed and all(r[1] == "inbox" for r in listed)
        assert all(r[0].endswith("+08:00") for r in listed)
        it.shot("04-message-browser")
        it.page.click("table.messages a >> nth=0")
        it.page.wait_for_load_state()
        assert "received" in it.page.inner_text("table.path")
        it.page.click("a.open-body")
        it.page.wait_for_load_state()
        body = orjson.loads(it.page.inner_text("pre.fhir-body"))
        assert body["resourceType"] == "Bundle"
        it.shot("05-message-body")
        it.go("/ui/accounts")
        names = [r[0] for r in rows(it.page, "accounts")]
        assert names == ["aud.wu", "dr.chen", "dr.li", "it.zhou"]
        assert it.page.locator("p.shared-tokens").count() == 1
        it.shot("06-accounts")
    finally:
        it.close()
    reads = [r for r in audit_rows(core) if r["action"] == "read" and r["actor"] == "user:it.zhou"]
    assert len(reads) == 1 and reads[0]["shown"].startswith("/ui/messages inbox/")
