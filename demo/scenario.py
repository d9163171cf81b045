"""The demo's scenario, played through the members' vendor systems and checked step by step.

What a clinician, the lab or the CT scanner does happens in the vendor system (HIS database
rows, HL7 messages, SOAP documents, ORU^R01 over MLLP, DICOM C-STORE); the nodes' local API is
used to look (statuses, results, quarantine, audit) and for the two actions no HIS style carries:
the family withdrawing a referral and a centre fetching a CT study on demand.
"""

from __future__ import annotations

import hashlib
import io
import operator
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

from rich.console import Console

from adapters.slips import AcceptanceSlip, ReferralSlip
from bridge.errors import HutongError
from bridge.privacy import patient_hash
from demo import records
from demo.consultation import Consultations
from demo.vendors import Vendors, lis_send, modality_push
from demo.world import ROOT, World, wait
from simulators.his_db import HisDb
from simulators.his_hl7 import VendorHis
from simulators.his_ws import HisWs

CORE = "fuxing"
STYLE_ZH = {"his-middle-db": "中间库", "his-hl7": "HL7 v2", "his-xml-ws": "XML Web Service"}
#: the receiving HIS's own codes for what each sender wrote (mappings/<site>/codes)
FX_DIAGNOSIS = {"I10": "FXZD0101", "E11.9": "FXZD0103"}


@dataclass
class Step:
    name: str
    ok: bool
    detail: str = ""


@dataclass
class Scenario:
    world: World
    vendors: Vendors
    console: Console
    steps: list[Step] = field(default_factory=list)
    run_id: str = field(default_factory=lambda: time.strftime("%H%M%S"))

    # -- plumbing -----------------------------------------------------------------------------

    def check(self, name: str, cond: Callable[[], Any], timeout: float = 45) -> Any:
        try:
            got = wait(cond, name, timeout)
        except HutongError as exc:
            self.steps.append(Step(name, False, str(exc)))
            self.console.print(f"  [red]✗ {name}[/]: {exc}")
            return None
        self.steps.append(Step(name, True))
        self.console.print(f"  [green]✓[/] {name}")
        return got

    def fail(self, name: str, detail: str) -> None:
        self.steps.append(Step(name, False, detail))
        self.console.print(f"  [red]✗ {name}[/]: {detail}")

    def node(self, node_id: str) -> Any:
        return self.world.members[node_id]

    def both(self, a: str, thread: str, status: str, step: str | None = None) -> bool:
        sa, sb = self.node(a).referral(thread), self.node(CORE).referral(thread)
        if not (sa and sb and sa["status"] == sb["status"] == status):
            return False
        return step is None or sa.get("step") == step

    def fx_his(self) -> VendorHis:
        his = self.vendors.his[CORE]
        assert isinstance(his, VendorHis)
        return his

    def write_referral(self, node_id: str, slip: ReferralSlip) -> None:
        his = self.vendors.his[node_id]
        if isinstance(his, VendorHis):
            ack = his.refer(slip)
            if ack.code != "AA":
                raise HutongError(f"{node_id}'s HIS got {ack.code} for its REF^I12: {ack.text}")
        else:
            his.write_referral(slip)

    def inbox(self, node_id: str, what: str) -> list[Any]:
        """Slips of one kind (referral | acceptance | return) the node wrote into its HIS."""
        his = self.vendors.his[node_id]
        if isinstance(his, VendorHis):
            return [r.slip for r in his.received(what)]
        if isinstance(his, HisWs):
            return [d.slip for d in his.received(what)]
        assert isinstance(his, HisDb)
        readers: dict[str, Callable[[], list[Any]]] = {
            "referral": his.received_referrals,
            "acceptance": his.received_acceptances,
            "return": his.received_returns,
        }
        return readers[what]()

    def one(self, node_id: str, what: str, slip_no: str) -> Any:
        got = [s for s in self.inbox(node_id, what) if s.slip_no == slip_no]
        return got[0] if got else None

    def at_core(self, slip: ReferralSlip) -> Any:
        """The referral as Fuxing's HIS received it (with the thread), once it is there."""
        rows = [r for r in self.fx_his().received("referral") if r.slip_no == slip.slip_no]
        return rows[0] if rows else None

    # -- the scenario ---------------------------------------------------------------------------

    def play(self) -> None:
        c = self.console
        n = self.run_id
        yt = records.referral(
            f"YT{n}01",
            "up-inpatient",
            "王秀英",
            "female",
            "1950-03-15",
            "110102195003151234",
            ("YTZ-01", "原发性高血压"),
            "KS01",
            "血压控制不佳，头晕加重，请专科住院调整方案",
            "高血压十年，近两周头晕。\n院外血压 180/105 mmHg",
            mrn="YT0001",
            doctor="李医生",
            urgent=True,
        )
        thread = self.up_referral(1, "yuetan-chc", yt, "I10", "专科住院")
        if thread:
            self.admission(yt, thread)
        c.print(
            "[bold]2. 上转·特殊检查 广外医院 (XML Web Service HIS) asks for a coronary CT; "
            "Fuxing declines[/]"
        )
        gw = records.referral(
            f"GW{n}02",
            "up-exam",
            "李建国",
            "male",
            "1962-07-08",
            "110102196207082345",
            ("I10.x00", "原发性高血压"),
            "NK01",
            "胸闷一月，请行冠脉CTA检查",
            "高血压病史八年",
            mrn="GW0002",
            doctor="刘医生",
        )
        t2 = self.referral_arrives("guangwai-hosp", gw, "I10")
        if t2:
            reason = "本院冠脉CTA本周已约满，请改约下周"
            self.fx_his().accept(AcceptanceSlip(gw.slip_no, False, reason), t2)
            self.check(
                "rejection with its reason in 广外医院's HIS (XML Web Service)",
                lambda: (
                    (a := self.one("guangwai-hosp", "acceptance", gw.slip_no))
                    and not a.accepted
                    and a.reason == reason
                ),
            )
            self.check("rejected on both nodes", lambda: self.both("guangwai-hosp", t2, "rejected"))
        c.print(
            "[bold]3. 上转·专科门诊 展览路社区 (HL7 v2 HIS, GB 18030) refers; the family "
            "withdraws[/]"
        )
        zl = records.referral(
            f"ZL{n}03",
            "up-outpatient",
            "赵淑芬",
            "female",
            "1958-11-11",
            "110102195811113456",
            ("ZLS003", "2型糖尿病"),
            "01",
            "血糖控制不佳，请内分泌专科门诊",
            "糖尿病史十二年",
            mrn="ZL0003",
            doctor="陈医生",
        )
        t3 = self.referral_arrives("zhanlanlu-chc", zl, "E11.9")
        if t3:
            self.node("zhanlanlu-chc").api(
                "POST", f"/local/v1/referrals/{t3}/steps/cancel", {"reason": "家属决定暂不转诊"}
            )
            self.check(
                "cancellation confirmed by Fuxing (both nodes: cancelled)",
                lambda: self.both("zhanlanlu-chc", t3, "cancelled"),
            )
        self.up_referral(
            4,
            "guangwai-chc",
            records.referral(
                f"GS{n}04",
                "up-outpatient",
                "孙桂兰",
                "female",
                "1955-02-02",
                "110102195502024567",
                ("GWSQ03", "2型糖尿病"),
                "QK",
                "糖尿病肾病筛查，请专科门诊",
                "糖尿病史十年",
                mrn="GS0004",
                doctor="周医生",
            ),
            "E11.9",
            "专科门诊",
        )
        self.up_referral(
            5,
            "zhanlanlu-hosp",
            records.referral(
                f"ZH{n}05",
                "up-exam",
                "周国强",
                "male",
                "1960-05-05",
                "110102196005055678",
                ("ZL-D0001", "原发性高血压"),
                "101",
                "请行动态血压及心脏超声检查",
                "高血压五年",
                mrn="ZH0005",
                doctor="吴医生",
            ),
            "I10",
            "特殊检查",
            department="101",
        )
        Consultations(self).play()
        self.malformed_lab()
        self.audit_chains()

    def referral_arrives(self, node_id: str, slip: ReferralSlip, icd10: str) -> str | None:
        """The slip written in the member's HIS reaches Fuxing's HIS in Fuxing's own codes."""
        style = STYLE_ZH[self.vendors.style[node_id]]
        try:
            self.write_referral(node_id, slip)
        except HutongError as exc:
            self.fail(f"{node_id}: referral written in its HIS ({style})", str(exc))
            return None
        zh = self.node(node_id).zh

        def arrived() -> Any:
            got = self.at_core(slip)
            if got is None:
                return None
            want = asdict(slip) | {
                "id_number": "",
                "diagnosis_code": FX_DIAGNOSIS[icd10],
                "department_code": _fx_department(slip.department_code, node_id),
            }
            wrong = [
                k
                for k in (
                    "slip_no",
                    "kind",
                    "patient_name",
                    "gender",
                    "birth_date",
                    "id_number",
                    "diagnosis_code",
                    "department_code",
                    "reason",
                    "urgent",
                    "doctor",
                )
                if asdict(got.slip)[k] != want[k]
            ]
            if wrong:
                raise HutongError(f"fields differ in Fuxing's HIS: {', '.join(wrong)}")
            return got.thread

        return self.check(
            f"{slip.kind} from {zh} ({style} HIS) in Fuxing's HIS (HL7 REF^I12), "
            "Fuxing's codes, no ID number",
            arrived,
        )

    def up_referral(
        self,
        no: int,
        node_id: str,
        slip: ReferralSlip,
        icd10: str,
        kind_zh: str,
        department: str | None = None,
    ) -> str | None:
        zh = self.node(node_id).zh
        style = STYLE_ZH[self.vendors.style[node_id]]
        self.console.print(f"[bold]{no}. 上转·{kind_zh} {zh} ({style} HIS) → 复兴医院[/]")
        thread = self.referral_arrives(node_id, slip, icd10)
        if not thread:
            return None
        self.check(f"{zh}: received on both nodes", lambda: self.both(node_id, thread, "received"))
        acc = records.acceptance(slip.slip_no)
        if slip.kind == "up-outpatient":
            acc.bed_no, acc.doctor = "", "李主任"
        self.fx_his().accept(acc, thread)

        def accepted() -> bool:
            got = self.one(node_id, "acceptance", slip.slip_no)
            if got is None:
                return False
            wrong = [
                k
                for k in ("accepted", "appointment_at", "bed_no", "doctor")
                if getattr(got, k) != getattr(acc, k)
            ]
            if department is not None and got.department_code != department:
                wrong.append("department_code")
            if wrong:
                raise HutongError(f"acceptance fields differ: {', '.join(wrong)}")
            return True

        self.check(f"acceptance (接诊单) written in Fuxing's HIS arrives in {zh}'s HIS", accepted)
        self.check(f"{zh}: accepted on both nodes", lambda: self.both(node_id, thread, "accepted"))
        return thread

    def admission(self, slip: ReferralSlip, thread: str) -> None:
        fx, yt = self.fx_his(), "yuetan-chc"
        nid, mrn = slip.id_number, "FX778"
        ack = fx.adt(
            "A01",
            mrn,
            name=slip.patient_name,
            gender=slip.gender,
            birth_date=slip.birth_date,
            id_number=nid,
            referral_id=thread,
            patient_class="I",
        )
        self.check(
            f"admission (ADT^A01, {ack.code}) in Fuxing's HIS: in-progress on both nodes",
            lambda: self.both(yt, thread, "in-progress"),
        )
        # labs: Fuxing's LIS reports over MLLP; the results follow the referral to Yuetan
        acks = lis_send(
            self.lis_port(),
            [records.oru(int(self.run_id), nid, mrn, ("王", "秀英"))],
            self.world.folder / "lis",
        )
        phash = patient_hash(self.node(yt).plan.patient_hash_key, nid)

        def results() -> bool:
            if acks != ["AA"]:
                raise HutongError(f"the LIS got {acks}")
            view = self.node(yt).api("GET", f"/local/v1/patients/{phash}/results")
            rows = [
                r
                for r in view["results"]
                if r.get("thread") == thread and r.get("produced_by") == CORE
            ]
            if not rows:
                return False
            obs = {o["local_code"]: o["value"] for o in rows[0]["observations"]}
            if not (obs.get("FXL-GLU") == 8.9 and obs.get("FXL-CREA") == 72):
                return False
            # and in Yuetan's HIS (ZZ_JS_JYBG/_MX), Yuetan's own item codes (3001 葡萄糖 ...)
            his = self.vendors.his[yt]
            assert isinstance(his, HisDb)
            reports = [r for r in his.received_results() if r["LSH"] == thread]
            if not reports:
                return False
            lines = {x["XMDM"]: (x["JG"], x["DW"], x["BZ"]) for x in reports[0]["items"]}
            want = {
                "3001": ("8.9", "mmol/L", "H"),
                "3003": ("72", "μmol/L", "N"),
                "3010": ("4.1", "mmol/L", "N"),
            }
            if lines != want or reports[0]["ZZDH"] != slip.slip_no:
                raise HutongError(f"lab lines in Yuetan's HIS differ: {sorted(lines)}")
            return True

        self.check(
            "lab results (ORU^R01 from Fuxing's LIS) routed to Yuetan and into its HIS "
            "(ZZ_JS_JYBG, Yuetan's item codes), values as sent",
            results,
        )
        self.imaging(nid, mrn, slip.patient_name)
        # discharge: the return slip written in Fuxing's HIS, prescriptions in Fuxing's catalogue
        back = records.discharge(slip.slip_no)
        fx.write_return(back, thread)

        def returned() -> bool:
            got = self.one(yt, "return", slip.slip_no)
            if got is None:
                return False
            drugs = [
                (p.drug_code, p.drug_name, p.dose, p.frequency, p.days) for p in got.prescriptions
            ]
            want = [
                ("YT2037", "苯磺酸氨氯地平片 5mg", "5 mg", "qd", 14),
                ("YT2111", "硝苯地平控释片 30mg", "30 mg", "qd", 28),
            ]
            if drugs != want or got.diagnosis_code != "YTZ-01" or got.advice != back.advice:
                raise HutongError(
                    "return slip in Yuetan's HIS differs (drugs, diagnosis or advice)"
                )
            return True

        self.check(
            "return slip (转回单) in Yuetan's HIS: FX-0101/FX-0103 arrive as Yuetan's "
            "YT2037/YT2111",
            returned,
        )
        self.check(
            "completed on both nodes, return received at Yuetan",
            lambda: self.both(yt, thread, "completed", "return-received"),
        )

    def imaging(self, nid: str, mrn: str, name: str) -> None:
        from adapters.pacs.study import study_resource_id

        pacs = self.node(CORE).adapter("pacs-dicom")
        bind, ae = pacs.options["bind"], pacs.options.get("ae_title", "HUTONG")
        study, files = records.ct_study(self.world.folder / "modality", nid, mrn, name)
        pushed = modality_push(files[0].parent, bind, ae)

        def stored() -> bool:
            if pushed.get("sent") != len(files) or pushed.get("failed"):
                raise HutongError(f"C-STORE to Fuxing's PACS adapter: {pushed}")
            s = self.node(CORE).api("GET", f"/fhir/ImagingStudy/{study_resource_id(study)}")
            return s.get("numberOfInstances") == len(files) and [
                m["code"] for m in s.get("modality", [])
            ] == ["CT"]

        if not self.check(
            "CT study (DICOM C-STORE from the scanner) is an ImagingStudy at Fuxing", stored
        ):
            return
        yt = self.node("yuetan-chc")
        asked = yt.api(
            "POST", "/local/v1/adapters/pacs/fetches", {"from": CORE, "study_uid": study}
        )

        def fetched() -> bool:
            state = yt.api("GET", f"/local/v1/adapters/pacs/fetches/{asked['task_id']}")
            if state["status"] == "failed":
                raise HutongError(f"fetch failed: {state}")
            if state["status"] != "completed":
                return False
            raw = yt.api("GET", f"/local/v1/adapters/pacs/fetches/{asked['task_id']}/study.zip")
            with zipfile.ZipFile(io.BytesIO(raw)) as zf:
                got = {
                    n.rsplit("/", 1)[-1].removesuffix(".dcm"): _pixels(zf.read(n))
                    for n in zf.namelist()
                }
            return got == {p.stem: _pixels(p.read_bytes()) for p in files}

        self.check(
            "Yuetan fetches the CT on demand: same instances, same pixel data", fetched, timeout=60
        )

    def lis_port(self) -> int:
        return int(self.node(CORE).adapter("lis-hl7").options["port"])

    def malformed_lab(self) -> None:
        self.console.print("[bold]7. A malformed lab message from Fuxing's LIS[/]")
        before = self.quarantined(CORE, "adapter:lis")
        acks = lis_send(
            self.lis_port(),
            [records.malformed_oru(int(self.run_id) + 1, "110102195003151234", "FX778")],
            self.world.folder / "lis",
        )
        self.check(
            f"malformed ORU^R01 NAKed ({'/'.join(acks)}) and quarantined at Fuxing "
            "(IT page, hutong quarantine list)",
            lambda: acks[0] in ("AE", "AR") and self.quarantined(CORE, "adapter:lis") == before + 1,
        )

    def quarantined(self, node_id: str, source: str) -> int:
        from bridge.store import quarantine
        from bridge.store.db import Store

        store = Store(self.node(node_id).plan.storage_dsn)
        try:
            with store.read() as conn:
                return sum(
                    1 for r in quarantine.list_items(conn, state=None) if r["source"] == source
                )
        finally:
            store.dispose()

    def audit_chains(self) -> None:
        self.console.print("[bold]8. Every member's audit chain verifies[/]")
        procs = {
            m.node_id: subprocess.Popen(
                [sys.executable, "-m", "bridge.cli", "audit", "verify", "--config", str(m.config)],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for m in self.world.members.values()
        }
        for node_id, p in procs.items():
            try:
                rc = p.wait(timeout=120)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
                rc = -1
            self.check(f"audit chain of {node_id} verifies", partial(operator.eq, rc, 0), timeout=1)


def _fx_department(local: str, node_id: str) -> str:
    """Fuxing's department for what the sender asked: general practice (02) -> 0200, cardiology
    (03.04) -> 0301 (mappings/*/codes/department.csv)."""
    return (
        "0301"
        if (node_id, local) in (("guangwai-hosp", "NK01"), ("zhanlanlu-hosp", "101"))
        else "0200"
    )


def _pixels(raw: bytes) -> str:
    from pydicom import dcmread

    ds = dcmread(io.BytesIO(raw))
    return f"{ds.SOPInstanceUID}:{hashlib.sha256(ds.PixelData).hexdigest()}"
