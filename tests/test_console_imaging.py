"""Imaging done for a referral's patient is listed on the referral, in words, with a viewer link
and an on-demand fetch (issue 15: "影像检查: 无" while a CT existed).

The referring centre (chc) holds a CT study of the patient that never travelled in the referral
thread. Its clinician's referral page lists it (found by the keyed patient hash), with the
site's viewer link (the PACS adapter's ``viewer_url``) and a button that asks the core for the
images it holds (``imaging.fetch-request`` through the real PACS adapter, audited).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from bridge.fhirstore import store as fstore
from bridge.store.db import Store
from simulators.ports import free_port_block
from tests.clinical_html import assert_readable
from tests.harness import Alliance, db_rows, wait_for
from tests.referrals import referral
from tests.test_referral_loop import REFERRAL_KINDS, both, new_thread, state
from tests.test_web import Browser

pytestmark = pytest.mark.slow

STUDY_UID = "1.2.826.0.1.3680043.8.498.1234567890"
VIEWER = "http://viewer.yuetan.example/ohif/viewer?StudyInstanceUIDs={study_uid}"


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Alliance]:
    ports = free_port_block(2)
    members = [
        {
            "id": "core",
            "zh": "复兴医院",
            "en": "Fuxing Hospital",
            "role": "core",
            "adapters": [
                {
                    "name": "pacs",
                    "type": "pacs-dicom",
                    "receives": ["imaging.*"],
                    "options": {"bind": f"127.0.0.1:{ports}", "ae_title": "HUTONG"},
                }
            ],
        },
        {
            "id": "chc",
            "zh": "月坛社区卫生服务中心",
            "en": "Yuetan CHC",
            "role": "community",
            "adapters": [
                {
                    "name": "pacs",
                    "type": "pacs-dicom",
                    "receives": ["imaging.*"],
                    "options": {
                        "bind": f"127.0.0.1:{ports + 1}",
                        "ae_title": "YUETAN",
                        "viewer_url": VIEWER,
                    },
                }
            ],
        },
    ]
    rules = [
        {"from": "chc", "to": "core", "kinds": ["imaging.fetch-request", *REFERRAL_KINDS]},
        {"from": "core", "to": "chc", "kinds": ["imaging.fetch-response", *REFERRAL_KINDS]},
    ]
    a = Alliance(tmp_path_factory.mktemp("imaging") / "alliance", members, rules)
    a.start("core", "chc")
    yield a
    a.stop_all()


def study(patient_ref: str) -> dict[str, Any]:
    return {
        "resourceType": "ImagingStudy",
        "id": "ct-before-referral",
        "status": "available",
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{STUDY_UID}"}],
        "subject": {"reference": patient_ref},
        "started": "2026-11-19T09:12:00+08:00",
        "description": "头颅CT平扫",
        "numberOfInstances": 120,
        "modality": [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "CT"}],
        "series": [
            {
                "uid": f"{STUDY_UID}.1",
                "number": 1,
                "numberOfInstances": 120,
                "modality": {
                    "system": "http://dicom.nema.org/resources/ontology/DCM",
                    "code": "CT",
                },
                "description": "轴位 5mm",
            }
        ],
    }


def test_patient_imaging_on_the_referral_with_viewer_and_fetch(pair: Alliance) -> None:
    chc = pair.node("chc")
    thread = new_thread(chc, referral("up-exam", "core", mrn="IM0001", icd10="I63.9"))
    both(pair, thread, "received", "received")
    phash = state(chc, thread)["patient_hash"]
    assert phash
    # the centre holds a CT of this patient made by the core before (no thread of its own)
    s = Store(chc.plan.storage_dsn)
    try:
        with s.write() as conn:
            fstore.put(
                conn, study("Patient/x"), at=datetime.now(UTC), origin="core", patient_hash=phash
            )
    finally:
        s.dispose()
    gp = Browser(chc).login("clinician")
    page = gp.get(f"/ui/referrals/{thread}")
    assert f'<code class="study-uid">{STUDY_UID}</code>' in page
    assert "头颅CT平扫" in page and "2026-11-19 09:12 (北京时间)" in page
    assert f'href="http://viewer.yuetan.example/ohif/viewer?StudyInstanceUIDs={STUDY_UID}"' in page
    assert f'action="/ui/referrals/{thread}/imaging/fetch?peer=core&amp;study={STUDY_UID}"' in page
    assert_readable(page, "referral with the patient's imaging")
    # another patient's referral does not show this study
    other = new_thread(
        chc, referral("up-exam", "core", mrn="IM0002", national_id="110102196001011234")
    )
    assert STUDY_UID not in gp.get(f"/ui/referrals/{other}")

    status, url, after = gp.open(
        f"/ui/referrals/{thread}/imaging/fetch?peer=core&study={STUDY_UID}", {}
    )
    assert status == 200 and url.endswith(f"/ui/referrals/{thread}") and "已请求调阅" in after
    wait_for(
        lambda: (
            db_rows(
                chc,
                "SELECT count(*) FROM outbox WHERE kind = "
                "'imaging.fetch-request' AND recipient = 'core'",
            )
            == [(1,)]
        ),
        what="the fetch request queued for core",
    )
    assert db_rows(chc, "SELECT count(*) FROM audit WHERE action = 'imaging-fetch-requested'") == [
        (1,)
    ]
    # a made-up member is refused, nothing queued
    status, _u, body = gp.open(f"/ui/referrals/{thread}/imaging/fetch?peer=nobody&study=1.2", {})
    assert status == 404 and "HT-NOT-FOUND" in body


def test_a_patients_many_studies_are_counted_and_paged_on_the_referral(pair: Alliance) -> None:
    """23 studies of one patient: the referral page says how many there are, shows the
    newest 20, and its next-page link shows the other 3 (and a link back); no silent cap."""
    import html
    import re

    chc = pair.node("chc")
    thread = new_thread(
        chc, referral("up-exam", "core", mrn="IM0003", national_id="110102197203031233")
    )
    phash = state(chc, thread)["patient_hash"]
    uids = [f"1.2.826.0.1.3680043.8.498.77{i:02d}" for i in range(23)]
    s = Store(chc.plan.storage_dsn)
    try:
        with s.write() as conn:
            for i, uid in enumerate(uids):  # uids[22] the newest
                st = study("Patient/x")
                st["id"], st["description"] = f"ct-many-{i:02d}", f"随访CT {i:02d}"
                st["identifier"] = [{"system": "urn:dicom:uid", "value": f"urn:oid:{uid}"}]
                fstore.put(
                    conn,
                    st,
                    at=datetime(2026, 11, 1, 8, i, tzinfo=UTC),
                    origin="core",
                    patient_hash=phash,
                )
    finally:
        s.dispose()
    gp = Browser(chc).login("clinician")

    def listed(page: str) -> list[str]:
        return re.findall(r'<code class="study-uid">([\d.]+)</code>', page)

    def count_line(page: str) -> re.Match[str]:
        m = re.search(
            r'<p class="count imaging-count" data-type="ImagingStudy">[^<]*: '
            r'<span class="total">(\d+)</span>, (\d+) 条在本页 ?(.*?)</p>',
            page,
        )
        assert m is not None, page
        return m

    first = gp.get(f"/ui/referrals/{thread}")
    m = count_line(first)
    assert (m[1], m[2]) == ("23", "20") and "本院存有该患者的影像检查" in first
    assert listed(first) == uids[::-1][:20]  # newest first
    nxt = re.search(r'<a class="next-page" href="([^"]+)">下一页 →</a>', m[3])
    assert nxt is not None and "first-page" not in m[3]
    second = gp.get(html.unescape(nxt[1]))
    m = count_line(second)
    assert (m[1], m[2]) == ("23", "3") and "next-page" not in m[3]
    assert listed(second) == uids[::-1][20:]  # the last three: every study reached once
    back = re.search(r'<a class="first-page" href="([^"]+)">第一页</a>', m[3])
    assert back is not None and html.unescape(back[1]) == f"/ui/referrals/{thread}#imaging"
    assert_readable(second, "the second page of the patient's imaging")
    # a cursor the page did not give: an error page naming the parameter, nothing listed
    status, _u, bad = gp.open(f"/ui/referrals/{thread}?imaging_after_ImagingStudy=bm90", None)
    assert status == 422 and "HT-REQUEST-INVALID" in bad and not listed(bad)
