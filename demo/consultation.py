"""The demo's consultation loop (远程会诊, issue 16): Yuetan asks Fuxing's consultation centre for
a respiratory MDT and for a reading of a CT its own PACS holds, and every step is checked on
both nodes and where it lands.

Yuetan's doctor works in Yuetan's intermediate-database HIS: a 会诊申请 row (``ZZ_HZSQ``), the
records the centre asked for (``ZZ_HZBC``); the centre's steps and reports come back as
``ZZ_JS_HZZT`` / ``ZZ_JS_HZBG`` rows (an imaging reading also in ``ZZ_JS_JCBG``). The centre's
staff act over Fuxing's hospital-facing FHIR API (``POST /fhir/Task/{id}/$<step>``), as its
consultation pages do; Yuetan's follow-up, close and the one-click referral go over Yuetan's
(no HIS style carries them). The CT comes from Yuetan's scanner (DICOM C-STORE into its PACS
adapter) and the centre fetches it on demand (``imaging.fetch-request``). The steps and
resources: docs/contributors/consultation.md.
"""

from __future__ import annotations

import base64
import hashlib
import io
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapters.consult_slips import ConsultSlip, ResubmitSlip
from bridge.consult.codes import EXPERT_ROLE, INVITER_ROLE, STEP_SYSTEM
from bridge.errors import HutongError
from demo import records
from demo.vendors import modality_push

if TYPE_CHECKING:
    from demo.scenario import Scenario
    from demo.world import Member
    from simulators.his_db import HisDb

CENTRE, INVITER = "fuxing", "yuetan-chc"
#: the consultation's patient at Yuetan (the CT's DICOM header names her)
PATIENT = ("刘桂珍", "F", "19560606", "110102195606066789", "YT0016")
#: the diagnosis Yuetan writes (its own code; R91 in ICD-10); the report's C34.1 is not in
#: Yuetan's catalogue and arrives as the ICD-10 code
LOCAL_DIAGNOSIS = ("YTZ-14", "肺结节")
QUESTION_MDT = "右肺上叶结节 18mm，性质？手术还是随访？请呼吸、胸外、放射科多学科会诊"
QUESTION_CT = "请阅胸部CT：右肺上叶结节性质及分级"
MISSING = "缺肺功能报告，请补充后重新提交"
LUNG_FUNCTION = "肺功能：FEV1 78%，FEV1/FVC 72%，弥散功能轻度下降"
DIAGNOSIS = ("C34.1", "右肺上叶恶性肿瘤（待病理证实）")
ADVICE = "建议胸腔镜下右肺上叶楔形切除术，术中冰冻病理"
REFER = "建议上转复兴医院胸外科住院手术（已与家属沟通同意）"
CONCLUSION = "右肺上叶混杂磨玻璃结节 18mm，Lung-RADS 4B，建议多学科会诊"


def fhir(member: Member, method: str, path: str, body: Any = None) -> dict[str, Any]:
    """One call of the member's /fhir API as its clinicians' systems make it."""
    return dict(member.api(method, "/fhir" + path, body))


def row(member: Member, thread: str) -> dict[str, Any] | None:
    """The consultation's state on one node (``/local/v1/consultations``)."""
    rows = [r for r in member.api("GET", "/local/v1/consultations") if r["thread"] == thread]
    return rows[0] if rows else None


@dataclass
class Consultations:
    scenario: Scenario
    files: list[Path] = field(default_factory=list)  # Yuetan's CT as its scanner wrote it

    @property
    def yt(self) -> Member:
        return self.scenario.node(INVITER)

    @property
    def fx(self) -> Member:
        return self.scenario.node(CENTRE)

    def act(self, name: str, fn: Callable[[], Any]) -> Any:
        """An action (a clinician's or the centre's step); its error is a failed step."""
        try:
            return fn()
        except HutongError as exc:
            self.scenario.fail(name, str(exc))
            return None

    def both(self, thread: str, status: str, step: str) -> bool:
        """Both nodes at (Task.status, step), and their Tasks agree on status, step and
        reason."""
        rows = [row(m, thread) for m in (self.yt, self.fx)]
        if not all(r and (r["status"], r["step"]) == (status, step) for r in rows):
            return False
        tasks = [fhir(m, "GET", f"/Task/{thread}") for m in (self.yt, self.fx)]
        for t in tasks:
            coding = t["businessStatus"]["coding"][0]
            if t["status"] != status or (coding["system"], coding["code"]) != (STEP_SYSTEM, step):
                raise HutongError(f"Task/{thread} says {t['status']}/{coding['code']}")
        if tasks[0].get("statusReason") != tasks[1].get("statusReason"):
            raise HutongError("the two Tasks' statusReason differ")
        return True

    def at(self, thread: str, status: str, step: str, what: str) -> bool:
        return bool(
            self.scenario.check(
                f"{what}: Task {status} ({step}) on both nodes",
                lambda: self.both(thread, status, step),
            )
        )

    # -- the loop -----------------------------------------------------------------------------

    def play(self) -> None:
        c = self.scenario.console
        c.print(
            "[bold]6. 远程会诊 月坛社区 asks 复兴医院's consultation centre for a respiratory "
            "MDT and a CT reading[/]"
        )
        study = self.ct_at_yuetan()
        if study is None:
            return
        uid, study_ref, _ = study
        n = self.scenario.run_id
        mdt = self.request(
            self.slip(
                f"YTHZ{n}1",
                "mdt",
                QUESTION_MDT,
                urgent=True,
                summary="咳嗽两月，胸部CT示右肺上叶结节 18mm；吸烟三十年",
            ),
            "respiratory MDT (多学科会诊)",
        )
        ct = self.request(
            self.slip(
                f"YTHZ{n}2",
                "imaging-reading",
                QUESTION_CT,
                study=uid,
                summary="社区胸部CT平扫，请上级医院阅片",
            ),
            "CT reading (远程影像诊断)",
        )
        if mdt:
            self.mdt(*mdt)
        if ct:
            self.reading(*ct, uid, study_ref)

    @property
    def his(self) -> HisDb:
        return self.scenario.vendors.his[INVITER]  # type: ignore[no-any-return]

    def slip(
        self,
        slip_no: str,
        kind: str,
        question: str,
        *,
        summary: str,
        urgent: bool = False,
        study: str = "",
    ) -> ConsultSlip:
        name, sex, birth, nid, mrn = PATIENT
        return ConsultSlip(
            slip_no=slip_no,
            kind=kind,
            to_member=CENTRE,
            patient_name=name,
            gender={"F": "female", "M": "male"}[sex],
            birth_date=f"{birth[:4]}-{birth[4:6]}-{birth[6:]}",
            id_number=nid,
            phone="13901230016",
            mrn=mrn,
            diagnosis_code=LOCAL_DIAGNOSIS[0],
            diagnosis_name=LOCAL_DIAGNOSIS[1],
            reason="明确结节性质，制定诊疗方案",
            question=question,
            summary=summary,
            specialties="KS05",
            urgent=urgent,
            consent_by="患者本人",
            consent_doc=f"ZQTY-{slip_no}",
            study_uid=study,
            shared_results="",
            doctor="李医生",
            written_at=records.now(),
        )

    def ct_at_yuetan(self) -> tuple[str, str, str] | None:
        """Yuetan's CT scanner stores a chest CT in Yuetan's PACS adapter (an ImagingStudy
        there, its patient registered from the DICOM header)."""
        from adapters.pacs.study import study_resource_id

        name, sex, birth, nid, mrn = PATIENT
        pacs = self.yt.adapter("pacs-dicom")
        uid, files = records.ct_study(
            self.scenario.world.folder / "modality-yuetan",
            nid,
            mrn,
            name,
            site="2",
            station="YTCT",
            birth=birth,
            sex=sex,
        )
        pushed = modality_push(
            files[0].parent,
            pacs.options["bind"],
            pacs.options.get("ae_title", "HUTONG"),
            "YT-CT-01",
        )
        rid = study_resource_id(uid)

        def stored() -> str | None:
            if pushed.get("sent") != len(files) or pushed.get("failed"):
                raise HutongError(f"C-STORE to Yuetan's PACS adapter: {pushed}")
            s = fhir(self.yt, "GET", f"/ImagingStudy/{rid}")
            if s.get("numberOfInstances") != len(files):
                return None
            return str(s["subject"]["reference"])

        patient = self.scenario.check(
            "Yuetan's CT (DICOM C-STORE from its scanner) is an "
            "ImagingStudy at Yuetan's PACS adapter",
            stored,
        )
        self.files = files
        return (uid, f"ImagingStudy/{rid}", patient) if patient else None

    def request(self, slip: ConsultSlip, what: str) -> tuple[str, str] | None:
        """Yuetan's doctor writes the application (ZZ_HZSQ, consent signer and document); the
        centre has it with the question and the consent, and Yuetan's HIS the 'received'."""
        before = {r["thread"] for r in self.fx.api("GET", "/local/v1/consultations")}
        if (
            self.act(
                f"{what}: 会诊申请 written in Yuetan's HIS (ZZ_HZSQ)",
                lambda: self.his.write_consult(slip),
            )
            is None
        ):
            return None

        def at_centre() -> str | None:
            new = [
                r
                for r in self.fx.api("GET", "/local/v1/consultations")
                if r["thread"] not in before and r["inviter"] == INVITER
            ]
            if not new:
                return None
            sr = fhir(self.fx, "GET", f"/ServiceRequest/{new[0]['sr_id']}")
            consent = next(
                fhir(self.fx, "GET", "/" + x["reference"])
                for x in sr["supportingInfo"]
                if x["reference"].startswith("Consent/")
            )
            got = (
                new[0]["kind"],
                sr["note"][0]["text"],
                sr["reasonCode"][0]["coding"][0]["code"],
                consent["performer"][0]["display"],
            )
            if got != (slip.kind, slip.question, "R91", "患者本人"):
                raise HutongError(f"the request at the centre: {got}")
            return str(new[0]["thread"])

        thread = self.scenario.check(
            f"{what} from Yuetan's HIS (ZZ_HZSQ) at the centre: kind, "
            "question, R91 (Yuetan's YTZ-14), the consent's signer",
            at_centre,
        )
        if thread is None:
            return None
        if not self.at(thread, "received", "received", f"{what} received by the centre"):
            return None
        ok = self.scenario.check(
            f"{what}: 'received' in Yuetan's HIS (ZZ_JS_HZZT)",
            lambda: self.his_step(slip.slip_no, "received", thread),
        )
        return (thread, slip.slip_no) if ok else None

    def his_step(self, slip_no: str, event: str, thread: str) -> dict[str, Any] | None:
        """The centre's step as Yuetan's HIS has it (a ZZ_JS_HZZT row on the thread)."""
        rows = [r for r in self.his.consult_states(slip_no) if r["SJLX"] == event]
        if rows and rows[-1]["LSH"] != thread:
            raise HutongError(f"ZZ_JS_HZZT {event} row on thread {rows[-1]['LSH']}")
        return rows[-1] if rows else None

    def mdt(self, thread: str, slip_no: str) -> None:
        yt, fx = self.yt, self.fx
        # pre-review: returned for completion, with what is missing
        if (
            self.act(
                "the centre returns the MDT for completion",
                lambda: fhir(
                    fx,
                    "POST",
                    f"/Task/{thread}/$return",
                    {
                        "resourceType": "Parameters",
                        "parameter": [{"name": "reason", "valueString": MISSING}],
                    },
                ),
            )
            is None
        ):
            return
        if not self.at(
            thread, "on-hold", "returned", "MDT returned for completion (the reason at Yuetan)"
        ):
            return
        self.scenario.check(
            "what is missing in Yuetan's HIS (ZZ_JS_HZZT: returned, on-hold, ZTSM) and on its node",
            lambda: (
                (st := self.his_step(slip_no, "return", thread)) is not None
                and (st["HZZT"], st["RWZT"], st["ZTSM"]) == ("returned", "on-hold", MISSING)
                and (row(yt, thread) or {}).get("reason") == MISSING
            ),
        )
        patient = fhir(yt, "GET", f"/Task/{thread}")["for"]["reference"]
        if (
            self.act(
                "Yuetan's doctor adds the lung function report (ZZ_HZBC)",
                lambda: self.his.resubmit_consult(
                    ResubmitSlip(
                        slip_no=slip_no,
                        title="肺功能报告",
                        text=LUNG_FUNCTION,
                        doctor="李医生",
                        written_at=records.now(),
                    )
                ),
            )
            is None
        ):
            return
        if not self.at(thread, "received", "resubmitted", "MDT resubmitted"):
            return

        def record_at_centre() -> bool:
            sr = fhir(fx, "GET", f"/ServiceRequest/{row(fx, thread)['sr_id']}")  # type: ignore[index]
            docs = [
                s["reference"]
                for s in sr.get("supportingInfo") or []
                if s["reference"].startswith("DocumentReference/")
            ]
            if not docs:
                return False
            doc = fhir(fx, "GET", "/" + docs[-1])
            text = base64.b64decode(doc["content"][0]["attachment"]["data"]).decode()
            return doc["description"] == "肺功能报告" and text == LUNG_FUNCTION

        self.scenario.check(
            "the resubmitted record is at the centre with the application", record_at_centre
        )
        room = f"hz-{thread[:8]}"
        if (
            self.act(
                "the centre schedules the MDT",
                lambda: fhir(
                    fx,
                    "POST",
                    f"/Task/{thread}/$schedule",
                    records.consult_schedule(records.MDT_EXPERTS, room),
                ),
            )
            is None
        ):
            return
        if not self.at(thread, "accepted", "scheduled", "MDT scheduled"):
            return
        self.scenario.check(
            "the Appointment at Yuetan: 3 experts (呼吸内科, 胸外科, 放射科), the "
            "video link, the inviting doctor",
            lambda: self.appointment(thread, ["呼吸内科", "胸外科", "放射科"], room),
        )
        self.scenario.check(
            "the schedule in Yuetan's HIS (ZZ_JS_HZZT): the three experts, the video link",
            lambda: (
                (st := self.his_step(slip_no, "schedule", thread)) is not None
                and (st["HZZT"], st["HZZJ"], st["SPLJ"])
                == (
                    "scheduled",
                    "张主任(呼吸内科);王主任(胸外科);孙主任(放射科)",
                    records.MEETING + room,
                )
            ),
        )
        centre_patient = fhir(fx, "GET", f"/Task/{thread}")["for"]["reference"]
        if not self.meeting(
            thread, "MDT", records.consult_report(centre_patient, DIAGNOSIS, ADVICE, REFER)
        ):
            return

        def report_at_yuetan() -> bool:
            refs = ((row(yt, thread) or {}).get("report_refs") or "").split()
            comp = fhir(yt, "GET", "/" + next(r for r in refs if r.startswith("Composition/")))
            cond = fhir(yt, "GET", "/" + next(r for r in refs if r.startswith("Condition/")))
            if comp["status"] != "final" or comp["subject"] != {"reference": patient}:
                raise HutongError(f"the report at Yuetan: {comp['status']}, {comp['subject']}")
            return (
                comp["section"][1]["text"]["div"].endswith(f"{ADVICE}</div>")
                and cond["code"]["coding"][0]["code"] == DIAGNOSIS[0]
                and bool((row(yt, thread) or {}).get("recommends_referral"))
            )

        self.scenario.check(
            "the MDT report at Yuetan: final, its patient, the advice, "
            f"diagnosis {DIAGNOSIS[0]}, referral recommended",
            report_at_yuetan,
        )

        def report_in_his() -> bool:
            got = self.his.consult_reports(slip_no)
            if not got:
                return False
            r = got[-1]
            want = ("2", "F", DIAGNOSIS[0], ADVICE, "1", CENTRE, REFER, thread)
            have = (
                r["HZLX"],
                r["BGZT"],
                r["ZDDM"],
                r["ZLJY"],
                r["JYZZ"],
                r["ZZJG"],
                r["ZZSM"],
                r["LSH"],
            )
            if have != want:
                raise HutongError(f"ZZ_JS_HZBG differs: {have}")
            return True

        self.scenario.check(
            f"the MDT report in Yuetan's HIS (ZZ_JS_HZBG): {DIAGNOSIS[0]} (ICD-10, "
            "not in Yuetan's catalogue), the advice, referral recommended to "
            "fuxing",
            report_in_his,
        )
        self.referral(thread)

    def appointment(self, thread: str, departments: list[str], room: str) -> bool:
        appt_id = (row(self.yt, thread) or {})["appointment_id"]
        appt = fhir(self.yt, "GET", f"/Appointment/{appt_id}")
        experts = [p["actor"]["reference"] for p in appt["participant"] if _role(p) == EXPERT_ROLE]
        got = [fhir(self.yt, "GET", "/" + e)["specialty"][0]["text"] for e in experts]
        link = appt["extension"][0]["valueUrl"]
        inviting = [p for p in appt["participant"] if _role(p) == INVITER_ROLE]
        if got != departments or link != records.MEETING + room or not inviting:
            raise HutongError(f"Appointment at Yuetan: experts {got}, link {link}")
        return appt["status"] == "booked"

    def meeting(self, thread: str, what: str, report: dict[str, Any]) -> bool:
        """The centre starts the meeting, writes the report, passes QC and releases it."""
        fx = self.fx
        if (
            self.act(f"the {what} begins", lambda: fhir(fx, "POST", f"/Task/{thread}/$start"))
            is None
        ):
            return False
        if not self.at(thread, "in-progress", "in-consultation", f"{what} in consultation"):
            return False
        if (
            self.act(
                f"the centre writes the {what} report",
                lambda: fhir(fx, "POST", f"/Task/{thread}/$report", report),
            )
            is None
        ):
            return False
        self.scenario.check(
            f"{what} report drafted at the centre; nothing sent to Yuetan yet",
            lambda: (
                self.both(thread, "in-progress", "reported")
                and not (row(self.yt, thread) or {}).get("report_refs")
            ),
        )
        if (
            self.act(
                f"the centre releases the {what} report",
                lambda: fhir(fx, "POST", f"/Task/{thread}/$release"),
            )
            is None
        ):
            return False
        return self.at(
            thread, "completed", "report-received", f"{what} report released, received at Yuetan"
        )

    def referral(self, thread: str) -> None:
        """The recommended referral, pre-filled from the report, sent to Fuxing."""
        yt = self.yt
        consult_sr = f"ServiceRequest/{(row(yt, thread) or {})['sr_id']}"

        def send() -> str:
            draft = fhir(
                yt,
                "POST",
                f"/Task/{thread}/$referral-draft",
                {
                    "resourceType": "Parameters",
                    "parameter": [{"name": "kind", "valueCode": "up-inpatient"}],
                },
            )
            sr = draft["entry"][0]["resource"]
            if sr.get("basedOn") != [{"reference": consult_sr}]:
                raise HutongError(f"the referral draft is basedOn {sr.get('basedOn')}")
            draft["entry"].append(records.referral_consent(sr["subject"]["reference"]))
            answer = fhir(yt, "POST", "", draft)
            return next(
                e["response"]["location"].split("/")[1]
                for e in answer["entry"]
                if e["response"]["location"].startswith("ServiceRequest/")
            )

        sent = self.act("Yuetan turns the MDT report into a referral", send)
        if sent is None:
            return

        def arrived() -> bool:
            rows = [
                r
                for r in self.fx.api("GET", "/local/v1/referrals", role="it")
                if r["sr_id"] == sent
            ]
            if not rows or rows[0]["status"] != "received":
                return False
            sr = fhir(self.fx, "GET", f"/ServiceRequest/{sent}")
            if sr.get("basedOn") != [{"reference": consult_sr}]:
                raise HutongError(f"the referral at Fuxing is basedOn {sr.get('basedOn')}")
            if sr["reasonCode"][0]["coding"][0]["code"] != DIAGNOSIS[0]:
                raise HutongError("the referral's reason is not the report's diagnosis")
            # and in Fuxing's HIS, as a REF^I12 on the referral's thread
            return any(
                r.thread == rows[0]["thread"] for r in self.scenario.fx_his().received("referral")
            )

        self.scenario.check(
            "the referral (basedOn the consultation, reason C34.1) arrives at "
            "Fuxing and in its HIS (REF^I12)",
            arrived,
        )

    def reading(self, thread: str, slip_no: str, uid: str, study_ref: str) -> None:
        yt, fx = self.yt, self.fx
        fetch = self.act(
            "the centre fetches Yuetan's CT on demand",
            lambda: fx.api(
                "POST", "/local/v1/adapters/pacs/fetches", {"from": INVITER, "study_uid": uid}
            ),
        )
        if fetch is None:
            return

        def fetched() -> bool:
            state = fx.api("GET", f"/local/v1/adapters/pacs/fetches/{fetch['task_id']}")
            if state["status"] == "failed":
                raise HutongError(f"fetch failed: {state}")
            if state["status"] != "completed":
                return False
            raw = fx.api("GET", f"/local/v1/adapters/pacs/fetches/{fetch['task_id']}/study.zip")
            with zipfile.ZipFile(io.BytesIO(raw)) as zf:
                got = {
                    n.rsplit("/", 1)[-1].removesuffix(".dcm"): _digest(zf.read(n))
                    for n in zf.namelist()
                }
            return got == {p.stem: _digest(p.read_bytes()) for p in self.files}

        self.scenario.check(
            "the centre fetches the CT from Yuetan's PACS on demand: same "
            "instances, same pixel data",
            fetched,
            timeout=60,
        )
        room = f"yx-{thread[:8]}"
        if (
            self.act(
                "the centre schedules the CT reading",
                lambda: fhir(
                    fx,
                    "POST",
                    f"/Task/{thread}/$schedule",
                    records.consult_schedule(records.RADIOLOGIST, room),
                ),
            )
            is None
        ):
            return
        if not self.at(thread, "accepted", "scheduled", "CT reading scheduled (1 radiologist)"):
            return
        centre_patient = fhir(fx, "GET", f"/Task/{thread}")["for"]["reference"]
        if not self.meeting(
            thread, "CT reading", records.imaging_reading(centre_patient, study_ref, CONCLUSION)
        ):
            return

        def report_at_yuetan() -> bool:
            refs = ((row(yt, thread) or {}).get("report_refs") or "").split()
            dr = fhir(yt, "GET", "/" + refs[0])
            want = (study_ref, "final", CONCLUSION, "影像诊断报告.pdf")
            got = (
                dr["imagingStudy"][0]["reference"],
                dr["status"],
                dr["conclusion"],
                dr["presentedForm"][0]["title"],
            )
            if got != want:
                raise HutongError(f"the reading at Yuetan: {got}")
            return True

        self.scenario.check(
            "the CT reading at Yuetan: final DiagnosticReport on its study, "
            "conclusion and PDF as written",
            report_at_yuetan,
        )

        def at_pacs() -> bool:
            got = yt.api("GET", f"/local/v1/adapters/pacs/studies/{uid}/reports")
            return [(r["conclusion"], r["from"]) for r in got["reports"]] == [(CONCLUSION, CENTRE)]

        def in_his() -> bool:
            got, exams = (
                self.his.consult_reports(slip_no),
                [r for r in self.his.received_imaging() if r["LSH"] == thread],
            )
            if not got or not exams:
                return False
            # the study's UID in both tables: the consultation report and the exam report
            have = (
                got[-1]["HZLX"],
                got[-1]["BGZT"],
                got[-1]["YXJL"],
                got[-1]["BGWJ"],
                got[-1]["JCUID"],
                exams[-1]["ZZDH"],
                exams[-1]["JCUID"],
                exams[-1]["ZDYJ"],
                exams[-1]["FSJG"],
            )
            want = (
                "3",
                "F",
                CONCLUSION,
                records.READING_PDF,
                uid,
                slip_no,
                uid,
                CONCLUSION,
                CENTRE,
            )
            if have != want:
                raise HutongError(f"the reading in Yuetan's HIS differs: {have[:3]}, {have[4:]}")
            return True

        self.scenario.check(
            "the CT reading in Yuetan's HIS: ZZ_JS_HZBG with its PDF, and as an "
            "exam report (ZZ_JS_JCBG) on the study",
            in_his,
        )
        self.scenario.check(
            "the CT reading attached to the study at Yuetan's PACS adapter (from fuxing)", at_pacs
        )
        patient = fhir(yt, "GET", f"/Task/{thread}")["for"]["reference"]
        if (
            self.act(
                "Yuetan plans the follow-up",
                lambda: fhir(yt, "POST", f"/Task/{thread}/$follow-up", records.follow_up(patient)),
            )
            is None
        ):
            return
        if not self.at(thread, "completed", "follow-up-planned", "follow-up planned"):
            return
        if (
            self.act(
                "Yuetan closes the CT reading", lambda: fhir(yt, "POST", f"/Task/{thread}/$close")
            )
            is None
        ):
            return
        self.at(thread, "completed", "closed", "CT reading closed")


def _role(participant: dict[str, Any]) -> str | None:
    """An Appointment participant's v3 ParticipationType code (CON expert, REF inviter)."""
    for t in participant.get("type") or []:
        for c in t.get("coding") or []:
            return str(c.get("code"))
    return None


def _digest(raw: bytes) -> str:
    from pydicom import dcmread

    ds = dcmread(io.BytesIO(raw))
    return f"{ds.SOPInstanceUID}:{hashlib.sha256(ds.PixelData).hexdigest()}"
