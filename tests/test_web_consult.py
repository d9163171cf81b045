"""The consultation pages (/ui/consultations) driven over plain HTTP against three real node
processes: the centre (core) works the queue through its forms (pre-review, return for
completion, experts and schedule, report editor, release), the inviting community centre (chc)
resubmits, reads the released report, prints it and turns it into a referral; cancellation,
refused steps, an imaging reading, list filters and paging, the printable papers, the
statistics and their CSV, and the audit of every look by person."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from bridge.store.db import Store
from bridge.web import consult_list
from tests import consults
from tests.clinical_html import assert_readable, page_text
from tests.harness import Alliance, NodeProcess, wait_for
from tests.test_consult_loop import MEMBERS, RULES, Fhir, both, request, row, sql
from tests.test_web import Browser, section

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def al(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Alliance]:
    a = Alliance(tmp_path_factory.mktemp("webconsult") / "alliance", MEMBERS, RULES)
    a.start("core", "chc", "gw")
    yield a
    a.stop_all()


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=60) as c:
        yield c


def cells(body: str, cls: str) -> dict[str, str]:
    """A two-column table (item, value) as {item: value text}."""
    out = {}
    for tr in re.findall(r"<tr>(.*?)</tr>", section(body, cls), re.DOTALL):
        tds = re.findall(r"<td[^>]*>(.*?)</td>", tr, re.DOTALL)
        if len(tds) == 2:
            out[page_text(tds[0]).strip()] = " ".join(page_text(tds[1]).split())
    return out


def span(body: str, cls: str) -> str:
    m = re.search(rf'<span class="{cls}">(.*?)</span>', body, re.DOTALL)
    assert m, f"no span {cls}"
    return " ".join(page_text(m.group(1)).split())


def at_step(node: NodeProcess, thread: str, step: str) -> None:
    wait_for(
        lambda: (row(node, thread) or {}).get("step") == step,
        timeout=40,
        what=f"the consultation at {step}",
    )


def test_the_centre_works_an_mdt_through_the_pages_and_the_inviter_refers_from_the_report(
    al: Alliance, client: httpx.Client
) -> None:
    chc, core = al.node("chc"), al.node("core")
    thread = request(
        Fhir(client, chc), consults.consultation("mdt", "core", priority="urgent", mrn="YT7001")
    )
    both(al, client, thread, "received", "received")
    staff = Browser(core).login("clinician")
    gp = Browser(chc).login("clinician")

    # the centre's queue: the request in pre-review, with the patient's name and record number
    queue = section(staff.get("/ui/consultations"), "queue")
    assert f"/ui/consultations/{thread}" in queue
    assert "王秀英" in queue and "多学科会诊" in queue and "预审中" in queue and "紧急" in queue
    page = staff.get(f"/ui/consultations/{thread}")
    assert_readable(page, "centre pre-review")
    summary = cells(page, "consult-summary")
    assert summary["类型"] == "多学科会诊"
    assert summary["申请机构"] == "月坛社区卫生服务中心 (chc)"
    assert summary["申请医生"] == "李医生"
    assert summary["会诊中心"] == "复兴医院 (core)"
    assert summary["环节"] == "预审中" and summary["优先级"] == "紧急"
    assert summary["会诊目的（需解答的问题）"] == "右肺上叶结节性质？是否需要手术？"
    assert summary["申请原因"] == "ICD-10 R91 肺部影像学异常"
    assert re.fullmatch(r"HZ\d{8}-[0-9A-F]{8}", summary["会诊申请单号"])
    assert "咳嗽两月，CT 示右肺上叶结节 18mm" in page  # the shared record summary
    assert 'class="consent-line"' in page  # the signed consent travelled with it
    assert 'form method="post" action="/ui/consultations/' + thread + '/steps/return"' in page

    # return for completion: what is missing, seen on both sides
    status, _url, page = staff.open(
        f"/ui/consultations/{thread}/steps/return", {"reason": "请补充肺功能报告"}
    )
    assert status == 200 and span(page, "step") == "退回补充"
    both(al, client, thread, "on-hold", "returned")
    mine = gp.get(f"/ui/consultations/{thread}")
    assert cells(mine, "consult-summary")["需补充的资料"] == "请补充肺功能报告"
    assert 'steps/resubmit"' in mine and 'steps/schedule"' not in mine
    status, _url, mine = gp.open(
        f"/ui/consultations/{thread}/steps/resubmit",
        {"records": "肺功能：FEV1 78%，弥散功能轻度下降"},
    )
    assert status == 200
    both(al, client, thread, "received", "resubmitted")
    page = staff.get(f"/ui/consultations/{thread}")
    assert "肺功能：FEV1 78%，弥散功能轻度下降" in page

    # an MDT needs 3-5 experts: two are refused with the rule's code, nothing changes
    status, _url, page = staff.open(
        f"/ui/consultations/{thread}/steps/schedule",
        {
            "experts": "张主任 呼吸内科\n王主任 胸外科",
            "start": "2026-12-05T14:00",
            "end": "2026-12-05T15:00",
            "link": consults.MEETING,
        },
    )
    assert status == 422 and "HT-FHIR-INVALID" in page
    assert row(core, thread)["step"] == "resubmitted"
    status, _url, page = staff.open(
        f"/ui/consultations/{thread}/steps/schedule",
        {
            "experts": "张主任 呼吸内科\n王主任 胸外科\n赵主任 病理科",
            "start": "2026-12-05T14:00",
            "end": "2026-12-05T15:00",
            "link": consults.MEETING,
        },
    )
    assert status == 200, page[:2000]
    both(al, client, thread, "accepted", "scheduled")
    mine = gp.get(f"/ui/consultations/{thread}")
    meeting = cells(mine, "meeting")
    assert meeting["会诊专家"] == "张主任 呼吸内科；王主任 胸外科；赵主任 病理科"
    assert meeting["会诊时间"] == "2026-12-05 14:00 (北京时间) – 2026-12-05 15:00 (北京时间)"
    assert meeting["视频会议链接"] == consults.MEETING
    assert 'steps/cancel"' in mine  # before the meeting the inviter may still ask to cancel

    # the meeting, the report editor beside the shared records, quality check and release
    staff.open(f"/ui/consultations/{thread}/steps/start", {})
    both(al, client, thread, "in-progress", "in-consultation")
    page = staff.get(f"/ui/consultations/{thread}")
    assert '<div class="beside">' in page and 'class="step report"' in page
    editor_side = page.split('<div class="beside">', 1)[1]
    assert "咳嗽两月" in editor_side  # the records are beside the editor
    # a first draft, printed marked as a draft, then rewritten: only the last one is shown
    status, _url, page = staff.open(
        f"/ui/consultations/{thread}/steps/report",
        {"diagnosis": "肺结节待查", "advice": "初稿：建议随访", "author": "张主任"},
    )
    assert status == 200 and span(page, "advice") == "初稿：建议随访"
    paper = staff.get(f"/ui/consultations/{thread}/print/report")
    assert '<p class="draft-mark">草稿，未经质控</p>' in paper
    status, _url, page = staff.open(
        f"/ui/consultations/{thread}/steps/report",
        {
            "icd10": "C34.1",
            "diagnosis": "右肺上叶恶性肿瘤（待病理证实）",
            "advice": "建议行胸腔镜下右肺上叶楔形切除术",
            "refer": "1",
            "refer_to": "core",
            "referral_note": "建议上转胸外科住院手术（已与家属沟通同意）",
            "author": "张主任（呼吸内科）",
        },
    )
    assert status == 200 and span(page, "step") == "报告质控中"
    assert span(page, "diagnosis") == "右肺上叶恶性肿瘤（待病理证实）"
    assert span(page, "report-status") == "初步"
    assert 'value="C34.1"' in page  # the editor keeps the draft for the next edit
    assert "初稿" not in page  # the earlier draft is neither the report nor a record
    mine = gp.get(f"/ui/consultations/{thread}")
    assert 'class="report-box' not in mine  # a draft stays at the centre
    status, _url, page = staff.open(f"/ui/consultations/{thread}/steps/release", {})
    assert status == 200 and span(page, "step") == "报告已发布"
    both(al, client, thread, "completed", "report-received")

    # the inviting doctor reads the released report
    mine = gp.get(f"/ui/consultations/{thread}")
    assert_readable(mine, "inviter report")
    assert span(mine, "step") == "报告已接收"
    assert span(mine, "diagnosis") == "右肺上叶恶性肿瘤（待病理证实）"
    assert span(mine, "advice") == "建议行胸腔镜下右肺上叶楔形切除术"
    assert span(mine, "referral") == "建议上转胸外科住院手术（已与家属沟通同意） → 复兴医院 (core)"
    assert span(mine, "report-status") == "最终" and span(mine, "author") == "张主任（呼吸内科）"
    assert "(ICD-10 C34.1)" in mine
    # the printed report under the centre's letterhead; application and consent under chc's
    paper = gp.get(f"/ui/consultations/{thread}/print/report")
    assert re.search(
        r'<div class="letterhead"><div class="org">复兴医院</div>'
        r'<div class="org-en">Fuxing Hospital</div></div><h1>远程会诊报告</h1>',
        paper,
    )
    assert 'class="draft-mark"' not in paper
    assert span(paper, "diagnosis") == "右肺上叶恶性肿瘤（待病理证实）"
    assert (
        cells(paper, "slip-fields")["会诊专家"] == "张主任 呼吸内科；王主任 胸外科；赵主任 病理科"
    )
    assert_readable(paper, "printed report")
    paper = gp.get(f"/ui/consultations/{thread}/print/application")
    assert '<div class="org">月坛社区卫生服务中心</div>' in paper
    assert (
        cells(paper, "slip-fields")["会诊目的（需解答的问题）"]
        == "右肺上叶结节性质？是否需要手术？"
    )
    paper = gp.get(f"/ui/consultations/{thread}/print/consent")
    assert "远程会诊知情同意书" in paper and "患者（或家属）签名" in paper
    assert cells(paper, "slip-fields")["签署记录"] == "远程会诊知情同意书：患者本人签署 执行中"
    assert gp.open(f"/ui/consultations/{thread}/print/nothing")[0] == 404

    # one click: the referral pre-filled from the report, basedOn the consultation
    status, _url, _page = gp.open(f"/ui/consultations/{thread}/referral", {"kind": "up-inpatient"})
    assert status == 422  # the consent box was not ticked: nothing is sent
    assert row(chc, thread)["referral_thread"] is None
    status, url, page = gp.open(
        f"/ui/consultations/{thread}/referral", {"kind": "up-inpatient", "consent": "1"}
    )
    assert status == 200, page[:2000]
    referral = row(chc, thread)["referral_thread"]
    assert referral and url.endswith(f"/ui/referrals/{referral}")
    arrived = wait_for(
        lambda: [r for r in core.api("GET", "/local/v1/referrals") if r["thread"] == referral],
        timeout=40,
        what="the referral at the core",
    )[0]
    sr = Fhir(client, core).read(f"ServiceRequest/{arrived['sr_id']}")
    assert sr["basedOn"] == [{"reference": f"ServiceRequest/{row(core, thread)['sr_id']}"}]
    assert sr["reasonCode"][0]["coding"][0]["code"] == "C34.1"
    mine = gp.get(f"/ui/consultations/{thread}")
    assert 'class="referral-made"' in mine and f"/ui/referrals/{referral}" in mine
    assert 'action="/ui/consultations/' + thread + '/referral"' not in mine  # once only

    # follow-up and close on the inviting side
    gp.open(
        f"/ui/consultations/{thread}/steps/follow-up",
        {"plan": "术后两周社区随访，复查血常规", "from": "2026-12-20"},
    )
    both(al, client, thread, "completed", "follow-up-planned")
    gp.open(f"/ui/consultations/{thread}/steps/close", {})
    both(al, client, thread, "completed", "closed")

    # the statistics: requested, completed, referred, on the page and in the CSV
    wait_for(
        lambda: row(core, thread)["referral_thread"] == referral,
        timeout=40,
        what="the centre's row naming the referral",
    )
    stats = staff.get("/ui/stats")
    table = section(stats, "consult-stats")
    assert "月坛社区卫生服务中心 (chc)" in table
    link = re.search(r'href="(/ui/stats/consultations\.csv\?year=\d{4})"', stats)
    assert link
    status, _url, body = staff.open(link.group(1))
    assert status == 200
    got = list(csv.reader(io.StringIO(body)))
    assert got[0] == [
        "month",
        "member",
        "requested",
        "completed",
        "cancelled",
        "referred",
        "referral_share",
        "median_hours_to_report",
    ]
    mine_row = [r for r in got[1:] if r[1] == "chc"]
    assert len(mine_row) == 1
    requested, completed, _cancelled, referred = (int(x) for x in mine_row[0][2:6])
    assert requested >= 1 and completed >= 1 and referred >= 1
    assert float(mine_row[0][7]) >= 0

    # every look at this patient is audited by the node, with the page's path
    reads = sql(
        core,
        "SELECT actor, patient_hash FROM audit WHERE action = 'read' AND resource LIKE :p",
        p=f"%/ui/consultations/{thread}%",
    )
    assert reads and {r["patient_hash"] for r in reads} == {row(core, thread)["patient_hash"]}


def test_cancel_before_the_meeting_and_refused_steps(al: Alliance, client: httpx.Client) -> None:
    chc, core = al.node("chc"), al.node("core")
    thread = request(
        Fhir(client, chc),
        consults.consultation(
            "general", "core", national_id="110102196505050055", name="钱七", mrn="YT7002"
        ),
    )
    both(al, client, thread, "received", "received")
    gp = Browser(chc).login("clinician")
    staff = Browser(core).login("clinician")
    # a step that is not this side's is not offered, and refused when posted anyway
    mine = gp.get(f"/ui/consultations/{thread}")
    assert 'steps/return"' not in mine and 'steps/cancel"' in mine
    status, _url, page = gp.open(f"/ui/consultations/{thread}/steps/return", {"reason": "x"})
    assert status == 404
    status, _url, page = staff.open(f"/ui/consultations/{thread}/steps/release", {})
    assert status == 409 and "HT-REF-TRANSITION" in page
    status, _url, page = gp.open(f"/ui/consultations/{thread}/steps/cancel", {"reason": " "})
    assert status == 422 and row(chc, thread)["pending"] is None
    # a video link that is not a web address: refused on the form; from the other side (the
    # centre's API) it is shown as text, never made a link
    status, _url, page = staff.open(
        f"/ui/consultations/{thread}/steps/schedule",
        {
            "experts": "张主任 呼吸内科",
            "start": "2026-12-05T14:00",
            "end": "2026-12-05T15:00",
            "link": "javascript:alert(1)",
        },
    )
    assert status == 422 and row(core, thread)["step"] == "received"
    hostile = consults.schedule("core", 1)
    hostile["entry"][0]["resource"]["extension"][0]["valueUrl"] = "javascript:alert(1)"
    Fhir(client, core).op(thread, "schedule", hostile)
    both(al, client, thread, "accepted", "scheduled")
    mine = gp.get(f"/ui/consultations/{thread}")
    assert cells(mine, "meeting")["视频会议链接"] == "javascript:alert(1)"
    assert 'class="video"' not in mine and 'href="javascript' not in mine
    # the schedule form offers the booked time again, in Beijing time
    page = staff.get(f"/ui/consultations/{thread}")
    assert 'name="start" value="2026-12-05T14:00"' in page
    # a form posted without the page's token changes nothing
    status, _url, _page = gp.open(
        f"/ui/consultations/{thread}/steps/cancel", {"reason": "患者已转往他院"}, csrf=False
    )
    assert status == 403 and row(chc, thread)["pending"] is None
    status, _url, mine = gp.open(
        f"/ui/consultations/{thread}/steps/cancel", {"reason": "患者已转往他院"}
    )
    assert status == 200
    both(al, client, thread, "cancelled", "cancelled")
    mine = gp.get(f"/ui/consultations/{thread}")
    assert span(mine, "step") == "已取消" and span(mine, "why") == "患者已转往他院"
    assert "<form" not in mine.split("</header>", 1)[1].replace(
        '<form method="post" action="/ui/logout"', ""
    )  # nothing left to do
    history = section(mine, "history")
    assert "申请取消" in history and "已取消" in history


def test_imaging_reading_report_editor(al: Alliance, client: httpx.Client) -> None:
    chc, core = al.node("chc"), al.node("core")
    thread = request(
        Fhir(client, chc),
        consults.consultation(
            "imaging-reading", "core", national_id="110102197707070077", name="孙八", mrn="YT7003"
        ),
    )
    both(al, client, thread, "received", "received")
    staff = Browser(core).login("clinician")
    staff.open(
        f"/ui/consultations/{thread}/steps/schedule",
        {
            "experts": "孙主任 放射科",
            "start": "2026-12-06T09:00",
            "end": "2026-12-06T09:30",
            "link": "",
        },
    )
    staff.open(f"/ui/consultations/{thread}/steps/start", {})
    page = staff.get(f"/ui/consultations/{thread}")
    assert 'name="conclusion"' in page and 'name="diagnosis"' not in page
    assert "胸部CT平扫" in page  # the study to read, beside the editor
    status, _url, page = staff.open(
        f"/ui/consultations/{thread}/steps/report",
        {
            "findings": "右肺上叶见磨玻璃结节，直径约 8mm",
            "author": "孙主任",
            "conclusion": "右肺上叶磨玻璃结节，Lung-RADS 4A，建议3个月复查",
        },
    )
    assert status == 200, page[:2000]
    staff.open(f"/ui/consultations/{thread}/steps/release", {})
    both(al, client, thread, "completed", "report-received")
    gp = Browser(chc).login("clinician")
    mine = gp.get(f"/ui/consultations/{thread}")
    assert span(mine, "conclusion") == "右肺上叶磨玻璃结节，Lung-RADS 4A，建议3个月复查"
    assert "右肺上叶见磨玻璃结节，直径约 8mm" in mine
    assert 'class="referral"' not in mine  # no recommendation, no referral button
    dr = Fhir(client, chc).read(row(chc, thread)["report_refs"].split()[0])
    assert dr["status"] == "final" and dr["imagingStudy"][0]["reference"].startswith(
        "ImagingStudy/"
    )
    en = gp.get(f"/ui/consultations/{thread}?lang=en")
    assert span(en, "step") == "Report received by the inviting side"
    assert "Conclusion of the study" in en


def test_list_filters_search_and_paging_without_a_cap(al: Alliance, client: httpx.Client) -> None:
    chc, core = al.node("chc"), al.node("core")
    fhir = Fhir(client, chc)
    threads = [
        request(
            fhir,
            consults.consultation(
                "general",
                "core",
                national_id=f"1101021980010100{i}X",
                name=f"周{i}",
                mrn=f"YT80{i}",
            ),
        )
        for i in range(3)
    ]
    for t in threads:
        at_step(core, t, "received")
    staff = Browser(core).login("clinician")
    page = staff.get("/ui/consultations?side=centre&step=received&kind=general")
    shown = set(re.findall(r'href="/ui/consultations/([0-9a-f-]{36})"', page))
    assert set(threads) <= shown
    total = int(span(page, "total"))
    assert total == len(shown)  # every match on one page (fewer than a page)
    # search by record number and by national ID (a POST: the number never enters a URL)
    page = staff.get("/ui/consultations?q=YT801")
    assert set(re.findall(r'href="/ui/consultations/([0-9a-f-]{36})"', page)) == {threads[1]}
    status, url, page = staff.open("/ui/consultations/search", {"q": "11010219800101002X"})
    assert status == 200 and "11010219800101002X" not in url and "patient_hash=" in url
    assert "11010219800101002X" not in page.split("</form>", 1)[1]
    assert set(re.findall(r'href="/ui/consultations/([0-9a-f-]{36})"', page)) == {threads[2]}
    # keyset paging: pages of one walk through every row exactly once, the total stays
    s = Store(core.plan.storage_dsn)
    try:
        seen: list[str] = []
        after = None
        with s.read() as conn:
            while True:
                rows, count, after = consult_list.page(
                    conn, core.plan.patient_hash_key, side="centre", size=1, after=after
                )
                assert count == total_all(conn)
                seen += [r["thread"] for r in rows]
                if after is None:
                    break
    finally:
        s.dispose()
    assert len(seen) == len(set(seen)) and set(threads) <= set(seen)
    # an unreadable time is answered with the rule, not an error trace
    status, _url, page = staff.open("/ui/consultations?since=yesterday-ish")
    assert status == 400 and "2026-11-20T08:00+08:00" in page


def total_all(conn: Any) -> int:
    from sqlalchemy import func, select

    from bridge.consult.tables import CONSULTATION

    return int(
        conn.execute(
            select(func.count()).select_from(CONSULTATION).where(CONSULTATION.c.side == "centre")
        ).scalar()
        or 0
    )


def test_a_patient_and_an_expert_the_centre_knew_are_named_on_the_pages(
    al: Alliance, client: httpx.Client
) -> None:
    chc, core = al.node("chc"), al.node("core")
    fhir = Fhir(client, chc)
    first, second = (
        request(
            fhir,
            consults.consultation(
                "general", "core", national_id="110102198808080088", name="吴九", mrn=f"YT701{i}"
            ),
        )
        for i in range(2)
    )
    both(al, client, second, "received", "received")
    centre = Fhir(client, core)
    patient = centre.read(f"Task/{second}")["for"]["reference"]
    assert centre.read(f"Task/{first}")["for"]["reference"] == patient  # matched, not copied
    staff = Browser(core).login("clinician")
    for thread in (first, second):
        page = staff.get(f"/ui/consultations/{thread}")
        assert span(page, "name") == "吴九"
        reads = sql(
            core,
            "SELECT resource FROM audit WHERE action = 'read' AND resource LIKE :p"
            " ORDER BY seq DESC LIMIT 1",
            p=f"%/ui/consultations/{thread}%",
        )
        assert patient in reads[0]["resource"]
    # the second one booked with the expert the first one brought (known here, not in its
    # bundle): both sides name the expert
    centre.op(first, "schedule", consults.schedule("core", 1))
    appt = centre.read(f"Appointment/{row(core, first)['appointment_id']}")
    role = next(
        p["actor"]["reference"]
        for p in appt["participant"]
        if p["actor"]["reference"].startswith("PractitionerRole/")
    )
    again = consults.schedule("core", 1)
    again["entry"] = again["entry"][:1]
    again["entry"][0]["resource"]["participant"] = [
        {
            "type": [{"coding": [{"system": consults.PARTICIPATION, "code": "CON"}]}],
            "actor": {"reference": role},
            "required": "required",
            "status": "accepted",
        }
    ]
    centre.op(second, "schedule", again)
    both(al, client, second, "accepted", "scheduled")
    for node in (core, chc):
        page = Browser(node).login("clinician").get(f"/ui/consultations/{second}")
        assert span(page, "experts") == "张主任 呼吸内科", node.local_url
