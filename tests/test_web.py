"""The web pages on the local port, driven over plain HTTP against two real node processes."""

from __future__ import annotations

import http.cookiejar
import json
import re
import statistics
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from sqlalchemy import select

from bridge.referral.tables import REFERRAL
from bridge.store.db import Store
from bridge.web.stats import month_of
from tests.clinical_html import assert_readable
from tests.factory import bundle as factory_bundle
from tests.harness import Alliance, NodeProcess, wait_for
from tests.referrals import referral, return_bundle
from tests.test_referral_loop import (
    MEMBERS,
    RULES,
    both,
    new_thread,
    resource,
    state,
    step,
    submit,
)

pytestmark = pytest.mark.slow


class Browser:
    """One user's cookie jar against one node (cookie jars ignore ports, so one per node)."""

    def __init__(self, node: NodeProcess) -> None:
        self.node = node
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))

        self.csrf = ""  # the anti-forgery token of the last page seen (bridge.web.security)

    def open(
        self,
        path: str,
        form: dict[str, str] | None = None,
        *,
        csrf: bool = True,
        origin: str | None = "",
    ) -> tuple[int, str, str]:
        """(status, final url, body) after following redirects. A form is posted as a browser
        posts it from this node's own page: with the page's token and this node's Origin
        (``csrf=False`` leaves the token out; ``origin`` names another one, None sends none)."""
        data = None
        headers = {}
        if form is not None:
            if csrf and self.csrf and "csrf" not in form:
                form = {**form, "csrf": self.csrf}
            data = urlencode(form).encode()
            if origin is not None:
                headers["Origin"] = origin or self.node.local_url
        req = urllib.request.Request(self.node.local_url + path, data=data, headers=headers)
        try:
            with self.opener.open(req, timeout=60) as r:
                status, url, body = r.status, r.geturl(), r.read().decode()
        except urllib.error.HTTPError as exc:
            with exc:
                status, url, body = exc.code, exc.geturl(), exc.read().decode()
        found = re.search(r'<meta name="csrf-token" content="([^"]+)">', body)
        if found:
            self.csrf = found.group(1)
        return status, url, body

    def get(self, path: str) -> str:
        status, _url, body = self.open(path)
        assert status == 200, (path, status, body[:500])
        return body

    def login(self, role: str) -> Browser:
        self.open("/ui/login")  # the login form's token (and its nonce cookie)
        status, url, body = self.open("/ui/login", {"token": self.node.token(role)})
        assert status == 200 and not url.endswith("/ui/login"), body[:500]
        return self


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory):
    a = Alliance(tmp_path_factory.mktemp("web") / "alliance", MEMBERS, RULES)
    a.start("core", "chc")
    yield a
    a.stop_all()


def section(body: str, cls: str) -> str:
    """The HTML of the first table with that class."""
    m = re.search(rf'<table class="{cls}">.*?</table>', body, re.DOTALL)
    assert m, f"no table {cls}"
    return m.group(0)


def test_login_required_and_roles_separated(pair: Alliance) -> None:
    core = pair.node("core")
    anon = Browser(core)
    status, url, _ = anon.open("/ui/referrals")
    assert status == 200 and url.endswith("/ui/login")
    status, _url, body = anon.open("/ui/login", {"token": "not-a-token"})
    assert status == 401 and "令牌无效" in body
    session = [c for c in anon.jar if c.name == "hutong_session"]
    assert session == []
    clin = Browser(core).login("clinician")
    cookie = next(c for c in clin.jar if c.name == "hutong_session")
    assert cookie.has_nonstandard_attr("HttpOnly")
    assert cookie.value != core.token("clinician")  # a session id, never the token itself
    for path in ("/ui/audit", "/ui/it", "/ui/audit/export.csv"):
        status, _url, body = clin.open(path)
        assert status == 403, path
    auditor = Browser(core).login("auditor")
    assert auditor.open("/ui/referrals")[0] == 403
    assert auditor.open("/ui/it")[0] == 403
    it = Browser(core).login("it")
    assert it.open("/ui/audit")[0] == 403
    assert it.open("/ui/referrals")[0] == 403
    clin.get("/ui/logout")  # a GET only shows the logout button
    assert clin.open("/ui/referrals")[1].endswith("/ui/referrals")
    status, url, _ = clin.open("/ui/logout", {})
    assert status == 200 and url.endswith("/ui/login")
    status, url, _ = clin.open("/ui/referrals")
    assert url.endswith("/ui/login")


def test_accept_through_the_form_shows_on_the_other_node(pair: Alliance) -> None:
    chc, core = pair.node("chc"), pair.node("core")
    thread = new_thread(chc, referral("up-inpatient", "core", icd10="I10", priority="urgent"))
    both(pair, thread, "received", "received")
    doctor = Browser(core).login("clinician")
    inbox = section(doctor.get("/ui/referrals"), "inbox")
    assert f"/ui/referrals/{thread}" in inbox
    assert "上转·专科住院" in inbox and "评估中" in inbox and "绿色通道" in inbox
    page = doctor.get(f"/ui/referrals/{thread}")
    assert "王秀英" in page  # clinicians see the patient
    assert "I10" in page and "血压控制不佳，请专科评估" in page
    assert "YB-2026-0001" in page  # insurance referral slip number from the Coverage
    assert "病历摘要" in page and "头晕两周" in page
    assert 'action="/ui/referrals/' + thread + '/steps/accept"' in page
    assert "/steps/arrive" not in page  # only steps the state machine allows are offered
    doctor.open(
        f"/ui/referrals/{thread}/steps/accept",
        {
            "bed": "心内科 12床",
            "department": "心血管内科",
            "doctor": "张主任",
            "appointment": "2026-11-21T10:00",
        },
    )
    both(pair, thread, "accepted", "scheduled")
    # the referring GP sees the change on the other node's pages
    gp = Browser(chc).login("clinician")
    outbox = section(gp.get("/ui/referrals"), "outbox")
    assert f"/ui/referrals/{thread}" in outbox and "已预约" in outbox
    there = gp.get(f"/ui/referrals/{thread}")
    assert "已接收" in there and "已预约" in there
    slip = section(there, "acceptance")
    assert "心内科 12床" in slip and "张主任" in slip and "2026-11-21 10:00 (北京时间)" in slip
    assert_readable(there, "referral detail at the referrer")
    accept_slip = gp.get(f"/ui/referrals/{thread}/slip")
    assert "<h1>接诊单</h1>" in accept_slip
    assert_readable(accept_slip, "acceptance slip")
    # arrive via the form, return through the API, then the return slip at the referrer
    doctor.open(f"/ui/referrals/{thread}/steps/arrive", {})
    both(pair, thread, "in-progress", "arrived")
    here = state(core, thread)
    task = resource(core, "Task", here["task_id"])
    submit(core, return_bundle(here["sr_id"], task["for"]["reference"]))
    both(pair, thread, "completed", "return-received")
    there = gp.get(f"/ui/referrals/{thread}")
    assert "出院小结" in there and "氨氯地平" in there
    results = section(there, "results")
    assert '<span class="flag-H">8.9</span>' in results and "mmol/L" in results
    assert "3.9–6.1" in results
    printed = gp.get(f"/ui/referrals/{thread}/slip")
    assert "<h1>转回单</h1>" in printed and "YB-2026-0001" in printed
    assert_readable(there, "referral detail after the return")
    assert_readable(printed, "return slip")
    assert_readable(doctor.get(f"/ui/referrals/{thread}"), "referral detail at the receiver")


def test_reject_needs_reason_and_errors_render(pair: Alliance) -> None:
    chc, core = pair.node("chc"), pair.node("core")
    thread = new_thread(chc, referral("up-outpatient", "core", mrn="YT0002"))
    both(pair, thread, "received", "received")
    doctor = Browser(core).login("clinician")
    status, _url, body = doctor.open(f"/ui/referrals/{thread}/steps/arrive", {})
    assert status >= 400 and "HT-REF-TRANSITION" in body
    # a reason is required to decline: an empty one is refused on the server too
    status, _url, body = doctor.open(f"/ui/referrals/{thread}/steps/reject", {"reason": "  "})
    assert status >= 400 and "HT-FHIR-INVALID" in body and "reason" in body
    assert state(core, thread)["status"] == "received"
    doctor.open(f"/ui/referrals/{thread}/steps/reject", {"reason": "床位已满"})
    both(pair, thread, "rejected", "rejected")
    gp = Browser(chc).login("clinician")
    assert "已拒绝" in section(gp.get("/ui/referrals"), "outbox")


def test_auditor_sees_exchange_log_verified_and_exports(pair: Alliance) -> None:
    core = pair.node("core")
    chc = pair.node("chc")
    thread = new_thread(chc, referral("up-exam", "core", mrn="YT0003"))
    both(pair, thread, "received", "received")
    auditor = Browser(core).login("auditor")
    page = auditor.get("/ui/audit")
    assert 'class="chain ok"' in page and "已验证" in page
    log = section(page, "audit")
    assert thread in log and "referral" in log and "received" in log
    assert "王秀英" not in page  # auditors get hashes, not names
    only = section(
        auditor.get("/ui/audit?" + urlencode({"action": "referral", "peer": "chc"})), "audit"
    )
    rows = re.findall(r"<tr><td>(\d+)</td><td>[^<]*</td><td>([^<]*)</td>", only)
    assert rows and {a for _, a in rows} == {"referral"}
    assert section(auditor.get("/ui/audit?since=2999-01-01T00:00"), "audit").count("<tr>") == 2
    status, _url, csv_text = auditor.open("/ui/audit/export.csv?action=referral")
    assert status == 200 and csv_text.lstrip("\ufeff").startswith("seq,at,action")
    assert thread in csv_text
    status, _url, nd = auditor.open("/ui/audit/export.ndjson")
    assert status == 200
    assert {json.loads(x)["resourceType"] for x in nd.splitlines()} == {"AuditEvent"}
    en = auditor.get("/ui/audit?lang=en")
    assert "verified" in en and "Recompute the whole chain now" in en
    # the page's own hint (it was lost to the IT page's label of the same key)
    assert re.search(r"\d+ rows shown \(at most 500; export has all\)</small>", en)

    # between full runs the page checks only what was added since; ?verify=full recomputes all
    def chain_line(page: str) -> tuple[int, int, int]:
        m = re.search(r"verified: (\d+) records.*?\((\d+) records\).*?checked now: (\d+)", page)
        assert m, page
        return int(m[1]), int(m[2]), int(m[3])

    total, full, since = chain_line(auditor.get("/ui/audit?lang=en&verify=full"))
    assert (full, since) == (total, 0)
    both(pair, new_thread(chc, referral("up-exam", "core", mrn="YT0005")), "received", "received")
    total2, full2, since2 = chain_line(auditor.get("/ui/audit?lang=en"))
    assert full2 == full and since2 == total2 - full and total2 > total


def test_it_page_shows_queues_rules_and_quarantine(pair: Alliance) -> None:
    core, chc = pair.node("core"), pair.node("chc")
    # traffic of its own: the core node answers a referral with a status packet to chc
    thread = new_thread(chc, referral("up-outpatient", "core", mrn="YT0004"))
    both(pair, thread, "received", "received")
    it = Browser(core).login("it")
    page = it.get("/ui/it")
    assert "referral.request" in section(page, "rules")
    wait_for(lambda: "chc" in section(it.get("/ui/it"), "queues"), what="a queue row for chc")
    section(page, "reminders")
    # a packet the rules refuse (only referral kinds are allowed) is held in quarantine
    res = core.api(
        "POST",
        "/local/v1/packets",
        [{"to": "chc", "kind": "lab.result", "bundle": factory_bundle(1)}],
    )["results"]
    assert res[0]["code"] == "HT-PKT-ROUTE-DENIED"
    held = core.api("GET", "/local/v1/quarantine")
    item = held[0]["id"]
    quar = section(it.get("/ui/it"), "quarantine")
    assert "HT-PKT-ROUTE-DENIED" in quar and f"/ui/it/quarantine/{item}/replay" in quar
    # replay runs the existing replay logic: still refused, so it stays held and says why
    status, url, after = it.open(f"/ui/it/quarantine/{item}/replay", {})
    assert status == 200 and url.endswith("/ui/it")
    assert f"#{item}: FAILED" in after
    row = next(i for i in core.api("GET", "/local/v1/quarantine") if i["id"] == item)
    assert row["state"] == "held" and "HT-PKT-ROUTE-DENIED" in row["replay_result"]
    status, _url, body = it.open("/ui/it/quarantine/999999/replay", {})
    assert status == 404 and "HT-NOT-FOUND" in body
    # each list says how many there are; what is not shown is in the message browser
    counts = re.findall(
        r'<p class="count"><span class="total">(\d+)</span> · (\d+) ', it.get("/ui/it")
    )
    every = core.api("GET", "/local/v1/quarantine?state=&limit=1000")
    dead = core.api("GET", "/local/v1/outbox?state=dead&limit=1000")
    reminded = core.api("GET", "/local/v1/reminders?limit=1000")
    assert counts == [
        (str(len(every)), str(min(len(every), 100))),
        (str(len(dead)), str(min(len(dead), 100))),
        ("0", "0"),  # messages under a reused control id (no HL7 adapter here)
        (str(len(reminded)), str(min(len(reminded), 100))),
    ]


def test_language_switch_is_remembered(pair: Alliance) -> None:
    core = pair.node("core")
    clin = Browser(core).login("clinician")
    assert "收到的转诊" in clin.get("/ui/referrals")
    en = clin.get("/ui/referrals?lang=en")
    assert "Inbox (we receive)" in en and "Outbox (we refer)" in en and "Log out" in en
    assert "Inbox (we receive)" in clin.get("/ui/referrals")  # from the cookie
    assert "收到的转诊" in clin.get("/ui/referrals?lang=zh")


# -- clinical detail: imaging report and study ------------------------------------------------


def imaging_return(sr_id: str, patient_ref: str) -> dict[str, Any]:
    """A return carrying a CT report (DiagnosticReport -> ImagingStudy) and no lab results."""
    bundle = return_bundle(sr_id, patient_ref)
    entries = [
        x
        for x in bundle["entry"]
        if x["resource"]["resourceType"] not in ("DiagnosticReport", "Observation")
    ]
    study, report = "urn:uuid:" + str(uuid.uuid4()), "urn:uuid:" + str(uuid.uuid4())
    entries += [
        {
            "fullUrl": study,
            "request": {"method": "POST", "url": "ImagingStudy"},
            "resource": {
                "resourceType": "ImagingStudy",
                "status": "available",
                "identifier": [{"system": "urn:dicom:uid", "value": STUDY_UID}],
                "subject": {"reference": patient_ref},
                "started": "2026-11-22T14:05:00+08:00",
                "modality": [
                    {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "CT"}
                ],
                "numberOfSeries": 2,
                "numberOfInstances": 180,
                "description": "头颅CT平扫",
                "series": [
                    {
                        "uid": "1.2.840.99.1.1",
                        "number": 1,
                        "numberOfInstances": 120,
                        "modality": {
                            "system": "http://dicom.nema.org/resources/ontology/DCM",
                            "code": "CT",
                        },
                        "description": "轴位 5mm",
                        "bodySite": {
                            "system": "http://snomed.info/sct",
                            "code": "69536005",
                            "display": "头部",
                        },
                    },
                    {
                        "uid": "1.2.840.99.1.2",
                        "number": 2,
                        "numberOfInstances": 60,
                        "modality": {
                            "system": "http://dicom.nema.org/resources/ontology/DCM",
                            "code": "CT",
                        },
                        "description": "冠状位重建",
                    },
                ],
            },
        },
        {
            "fullUrl": report,
            "request": {"method": "POST", "url": "DiagnosticReport"},
            "resource": {
                "resourceType": "DiagnosticReport",
                "status": "final",
                "category": [
                    {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/v2-0074",
                                "code": "RAD",
                            }
                        ]
                    }
                ],
                "code": {
                    "coding": [{"system": "http://loinc.org", "code": "24725-4"}],
                    "text": "头颅CT报告",
                },
                "subject": {"reference": patient_ref},
                "effectiveDateTime": "2026-11-22T14:05:00+08:00",
                "imagingStudy": [{"reference": study}],
                "conclusion": "右侧基底节区腔隙性脑梗死",
            },
        },
    ]
    return {**bundle, "entry": entries}


STUDY_UID = "1.2.840.99.1"


def test_detail_shows_imaging_report_and_study(pair: Alliance) -> None:
    chc, core = pair.node("chc"), pair.node("core")
    thread = new_thread(chc, referral("up-exam", "core", mrn="YT0009", icd10="I63.9"))
    both(pair, thread, "received", "received")
    step(
        core, thread, "accept", outputs=[{"type": {"text": "department"}, "valueString": "放射科"}]
    )
    both(pair, thread, "accepted")
    step(core, thread, "arrive")
    both(pair, thread, "in-progress", "arrived")
    here = state(core, thread)
    task = resource(core, "Task", here["task_id"])
    submit(core, imaging_return(here["sr_id"], task["for"]["reference"]))
    both(pair, thread, "completed", "return-received")
    gp = Browser(chc).login("clinician")
    page = gp.get(f"/ui/referrals/{thread}")
    report = re.search(r'<div class="imaging-report">.*?</table></div></div>', page, re.DOTALL)
    assert report, "no imaging report block"
    block = report.group(0)
    assert "头颅CT报告" in block and "2026-11-22 14:05 (北京时间)" in block
    assert_readable(page, "referral detail with imaging")
    assert '<span class="conclusion">右侧基底节区腔隙性脑梗死</span>' in block
    assert f'<code class="study-uid">{STUDY_UID}</code>' in block
    assert "头颅CT平扫" in block and "180" in block
    series = re.findall(r"<tr>(.*?)</tr>", section(block, "series"), re.DOTALL)[1:]
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", s) for s in series]
    assert cells == [["1", "CT", "轴位 5mm", "头部", "120"], ["2", "CT", "冠状位重建", "", "60"]]
    assert section(page, "acceptance").count("放射科") == 1
    printed = gp.get(f"/ui/referrals/{thread}/slip/return")
    assert "<h1>转回单</h1>" in printed and "右侧基底节区腔隙性脑梗死" in printed
    assert gp.open(f"/ui/referrals/{thread}/slip/nonsense")[0] == 404


# -- statistics ---------------------------------------------------------------------------


@pytest.fixture
def fresh(tmp_path: Path):
    rules = [*RULES, {"from": "chc", "to": "core", "kinds": ["result.lab"]}]
    a = Alliance(tmp_path / "alliance", MEMBERS, rules)
    a.start("core", "chc")
    yield a
    a.stop_all()


def referral_rows(node: NodeProcess) -> list[dict[str, Any]]:
    s = Store(node.plan.storage_dsn)
    try:
        with s.read() as conn:
            return [dict(r._mapping) for r in conn.execute(select(REFERRAL))]
    finally:
        s.dispose()


def stats_cells(browser: Browser, cls: str = "monthly") -> dict[str, list[str]]:
    """{member cell text: the row's cells (raw HTML)} of a statistics table."""
    out = {}
    for tr in re.findall(r"<tr>(.*?)</tr>", section(browser.get("/ui/stats"), cls), re.DOTALL):
        cells = re.findall(r"<td[^>]*>(.*?)</td>", tr)
        if cells:
            out[cells[1]] = cells
    return out


def seconds(cell: str) -> float:
    m = re.search(r'data-seconds="([0-9.]+)"', cell)
    assert m, cell
    return float(m.group(1))


def test_statistics_count_known_referrals(fresh: Alliance) -> None:
    chc, core = fresh.node("chc"), fresh.node("core")
    up = [
        new_thread(chc, referral(k, "core", mrn=f"ST{i}", priority=p))
        for i, (k, p) in enumerate(
            [("up-inpatient", "urgent"), ("up-outpatient", "routine"), ("up-exam", "routine")]
        )
    ]
    for th in up:  # new_thread spots the new row, so nothing may arrive meanwhile
        both(fresh, th, "received")
    down = [
        new_thread(core, referral(k, "chc", mrn=f"SD{i}", icd10="I63.9"))
        for i, k in enumerate(["down-outpatient", "down-discharge"])
    ]
    for th in down:
        both(fresh, th, "received")
    step(core, up[0], "accept")
    step(core, up[1], "accept")
    step(core, up[2], "reject", reason="设备检修")
    step(chc, down[0], "accept")
    both(fresh, up[0], "accepted")
    both(fresh, up[1], "accepted")
    both(fresh, up[2], "rejected")
    both(fresh, down[0], "accepted")
    step(core, up[0], "arrive")
    both(fresh, up[0], "in-progress")
    here = state(core, up[0])
    task = resource(core, "Task", here["task_id"])
    submit(core, return_bundle(here["sr_id"], task["for"]["reference"]))
    both(fresh, up[0], "completed", "return-received")
    chc.send("core", "result.lab", [factory_bundle(1) for _ in range(4)])
    wait_for(
        lambda: (
            all(
                r["state"] == "acknowledged"
                for r in chc.api("GET", "/local/v1/outbox?state=acknowledged")
                if r["kind"] == "result.lab"
            )
            and len(
                [
                    r
                    for r in chc.api("GET", "/local/v1/outbox?state=acknowledged")
                    if r["kind"] == "result.lab"
                ]
            )
            == 4
        ),
        what="4 results acknowledged",
    )

    chc_name, core_name = "月坛社区卫生服务中心 (chc)", "复兴医院 (core)"
    for node in (core, chc):
        viewer = Browser(node).login("auditor")
        rows = stats_cells(viewer)
        raw = referral_rows(node)
        month = month_of(raw[0]["created_at"])
        assert set(rows) == {chc_name, core_name}
        # month, member, up, down, green, accepted, rejected, cancelled, returned, rate, ...
        assert rows[chc_name][:10] == [month, chc_name, "3", "0", "1", "2", "1", "0", "1", "66.7%"]
        assert rows[core_name][:10] == [
            month,
            core_name,
            "0",
            "2",
            "0",
            "1",
            "0",
            "0",
            "0",
            "100.0%",
        ]
        assert rows[chc_name][12] == "4" and rows[core_name][12] == "0"
        # medians against this node's own timestamps
        mine = {r["thread"]: r for r in raw}
        accept = [(mine[t]["accepted_at"] - mine[t]["created_at"]).total_seconds() for t in up[:2]]
        assert seconds(rows[chc_name][10]) == pytest.approx(statistics.median(accept), abs=0.06)
        ret = (mine[up[0]]["completed_at"] - mine[up[0]]["created_at"]).total_seconds()
        assert seconds(rows[chc_name][11]) == pytest.approx(ret, abs=0.06)
        assert rows[core_name][11] == "—"
        yearly = stats_cells(viewer, "yearly")
        assert yearly["合计"][2:9] == ["3", "2", "1", "3", "1", "0", "1"]
        page = viewer.get("/ui/stats")
        bars = dict(re.findall(r'data-series="上转" data-group="(\d\d)" data-value="(\d+)"', page))
        assert bars[month[5:]] == "3" and sum(map(int, bars.values())) == 3
    # another year is empty
    assert "<td colspan" in section(Browser(core).login("it").get("/ui/stats?year=2001"), "monthly")


def test_it_pages_reused_ids_say_how_many_and_link_to_all(tmp_path: Path) -> None:
    """The IT page's list of reused control ids shows the newest 50, says how many there are
    and links to the auditor's page filtered to them, which pages through all (no silent cap);
    with 50 or fewer, no link."""
    from datetime import UTC, datetime
    from types import SimpleNamespace

    from bridge.audit.events import AuditEntry
    from bridge.config.loader import load_node
    from bridge.local.intake import RECORD_ID_REUSED
    from bridge.node import Node
    from bridge.web.it import reused_ids_section

    node = Node(load_node(Alliance(tmp_path / "alliance", MEMBERS, RULES).files["core"]))
    try:
        web: Any = SimpleNamespace(ctx=node.ctx)

        def add(n: int) -> None:
            with node.ctx.store.write() as conn:
                node.ctx.audit.append(
                    conn,
                    [
                        AuditEntry(
                            action=RECORD_ID_REUSED,
                            actor="adapter:lis",
                            at=datetime.now(UTC),
                            message=f"MSH-10 R{i} reused with other content",
                        )
                        for i in range(n)
                    ],
                )

        add(50)
        page = reused_ids_section(web, "zh")
        assert '<span class="total">50</span> · 50 ' in page and 'class="all"' not in page
        add(7)
        page = reused_ids_section(web, "en")
        assert '<span class="total">57</span> · 50 shown here' in page
        assert '<a class="all" href="/ui/audit?action=hl7-control-id-reused">See all →</a>' in page
        assert page.count("reused with other content") == 50
    finally:
        node.close()


def test_it_pages_reminders_link_to_the_overdue_referrals_only(tmp_path: Path) -> None:
    """The IT page lists the newest 100 referrals not accepted in time, says how many there
    are and links to the referral list filtered to the same overdue ones, which pages through
    all of them (no silent cap); accepted, un-reminded or withdrawn ones are in neither."""
    from datetime import UTC, datetime, timedelta
    from types import SimpleNamespace

    from bridge.config.loader import load_node
    from bridge.node import Node
    from bridge.web import referral_list
    from bridge.web.it import OVERDUE_HREF, reminders_section

    node = Node(load_node(Alliance(tmp_path / "alliance", MEMBERS, RULES).files["core"]))
    try:
        web: Any = SimpleNamespace(ctx=node.ctx, member_name=lambda _lang, m: m)
        t0 = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)

        def row(
            thread: str, status: str, minute: int, reminded: bool, side: str = "receiver"
        ) -> dict[str, Any]:
            at = t0 + timedelta(minutes=minute)
            return {
                "thread": thread,
                "side": side,
                "kind": "up-outpatient",
                "referrer": "chc",
                "receiver": "core",
                "status": status,
                "step": status,
                "task_id": f"t-{thread}",
                "sr_id": f"sr-{thread}",
                "created_at": at,
                "updated_at": at,
                "reminded_at": at if reminded else None,
            }

        # 101 overdue (one of them this side's own, still requested); pairs share a time
        overdue = [row(f"od-{i:03d}", "received", i // 2, True) for i in range(100)]
        overdue.append(row("od-mine", "requested", 7, True, side="referrer"))
        others = [
            row("accepted", "accepted", 200, True),
            row("fresh", "received", 201, False),
            row("withdrawn", "cancelled", 202, True),
        ]
        with node.ctx.store.write() as conn:
            conn.execute(REFERRAL.insert(), overdue + others)
        # the referral list, filtered as the link says, pages through exactly the overdue ones
        want = sorted(overdue, key=lambda r: (r["updated_at"], r["thread"]), reverse=True)
        seen: list[str] = []
        after: str | None = None
        with node.ctx.store.read() as conn:
            while True:
                rows, total, after = referral_list.page(
                    conn, node.ctx.plan.patient_hash_key, overdue=True, after=after
                )
                assert total == 101
                seen += [r["thread"] for r in rows]
                if after is None:
                    break
                assert len(rows) == referral_list.PAGE
            assert referral_list.page(conn, node.ctx.plan.patient_hash_key)[1] == 104
            assert (
                referral_list.page(
                    conn, node.ctx.plan.patient_hash_key, overdue=True, side="referrer"
                )[0][0]["thread"]
                == "od-mine"
            )
        assert seen == [r["thread"] for r in want]
        # the IT page: the newest 100 in the same order, the count and the link
        page = reminders_section(web, "en")
        assert '<span class="total">101</span> · 100 shown here' in page
        assert f'<a class="all" href="{OVERDUE_HREF}">See all →</a>' in page
        assert OVERDUE_HREF == "/ui/referrals?overdue=1"
        assert re.findall(r"<tr><td>([^<]+)</td>", page) == seen[:100]
        for gone in ("accepted", "fresh", "withdrawn"):
            assert gone not in seen and f"<td>{gone}</td>" not in page
        assert 'class="all"' not in reminders_section(web, "zh", limit=101)
    finally:
        node.close()


def test_referral_list_overdue_filter_shows_what_the_reminder_job_flagged(tmp_path: Path) -> None:
    """With short accept timeouts the node's own reminder job flags unaccepted referrals; the
    clinician's list with the overdue box ticked (the IT page's "see all") shows those and
    keeps the filter through the search form, and an accepted one leaves it."""
    a = Alliance(tmp_path / "alliance", MEMBERS, RULES)
    core_file = a.files["core"]
    core_file.write_text(
        core_file.read_text()
        + (
            "\n[referral]\naccept_timeout_s = 1.0\ngreen_channel_timeout_s = 0.5\n"
            "reminder_every_s = 0.5\n"
        )
    )
    a.start("core", "chc")
    try:
        chc, core = a.node("chc"), a.node("core")
        threads = [
            new_thread(chc, referral("up-outpatient", "core", mrn=f"OD{i}")) for i in range(3)
        ]
        wait_for(
            lambda: {r["thread"] for r in core.api("GET", "/local/v1/reminders")} == set(threads),
            timeout=30,
            what="three reminders at core",
        )
        step(core, threads[0], "accept")
        doctor = Browser(core).login("clinician")

        def listed(path: str) -> tuple[set[str], str]:
            body = doctor.get(path)
            total = re.search(r'<p class="count"><span class="total">(\d+)</span>', body)
            assert total is not None
            return set(re.findall(r'href="/ui/referrals/([^"/]+)"', body)), total[1]

        assert listed("/ui/referrals?overdue=1") == (set(threads[1:]), "2")
        assert listed("/ui/referrals")[0] >= set(threads)
        page = doctor.get("/ui/referrals?overdue=1&lang=en")
        assert (
            '<input type="checkbox" name="overdue" value="1" checked> '
            "Overdue only (not accepted in time)"
        ) in page
        # the search form keeps the box: the redirect carries overdue=1
        status, url, body = doctor.open("/ui/referrals/search", {"overdue": "1", "q": ""})
        assert status == 200 and url.endswith("/ui/referrals?overdue=1"), url
        assert set(re.findall(r'href="/ui/referrals/([^"/]+)"', body)) == set(threads[1:])
        # the IT page counts the same two
        it = Browser(core).login("it").get("/ui/it")
        assert '<span class="total">2</span> · 2 ' in section_after(it, "reminders")
    finally:
        a.stop_all()


def section_after(body: str, cls: str) -> str:
    """The count line and table of the IT page's section whose table has that class."""
    end = body.index(f'<table class="{cls}">')
    return body[body.rindex("<h3>", 0, end) : body.index("</table>", end)]
