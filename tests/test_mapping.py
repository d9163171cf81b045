"""Code and field mapping (issue 4): ConceptMaps from the shipped CSVs, both directions for all
105 alliance drugs, gaps recorded in a real node store and reported by ``hutong mapping check``,
the unmapped mark, field maps, and ConceptMap/$translate on a running node.

Expected values are read from the CSVs with the csv module here, independently of the loader.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.conceptmap import ConceptMap
from fhir.resources.R4B.medicationrequest import MedicationRequest
from fhir.resources.R4B.parameters import Parameters

from adapters.slips import (
    AcceptanceSlip,
    LabResult,
    Prescription,
    ReferralSlip,
    ReturnSlip,
    as_dict,
)
from bridge.config.loader import load_node
from bridge.errors import ConfigError
from bridge.fhir.validate import validate_bundle, validate_resource
from bridge.mapping import (
    FLAGS_SYSTEM,
    UNMAPPED_CODE,
    FieldMapError,
    apply,
    find_gaps,
    is_marked,
    load_field_map,
    load_site,
    map_coding,
    map_concept,
    mark_unmapped,
    marked_resources,
    observed_gaps,
    record_gap,
    to_local,
    translate,
    unapply,
)
from bridge.mapping.sites import site_folders
from bridge.store.db import Store
from tests.harness import ROOT, Alliance

MAPPINGS = ROOT / "mappings"
SITES = ("fuxing", "guangwai-hosp", "zhanlanlu-hosp", "yuetan-chc", "guangwai-chc", "zhanlanlu-chc")
ALLIANCE_DRUG = "http://hutong.dev/CodeSystem/xicheng-alliance/drug"
FX_DRUG = "http://hutong.dev/CodeSystem/fuxing/drug"
YT_DRUG = "http://hutong.dev/CodeSystem/yuetan-chc/drug"
DEPT = "http://hutong.dev/CodeSystem/xicheng-alliance/department"


def rows(site: str, name: str) -> list[dict[str, str]]:
    with (MAPPINGS / site / "codes" / f"{name}.csv").open(encoding="utf-8") as f:
        return list(csv.DictReader(f))


def hutong(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bridge.cli", *args],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


# -- loading: real R4 ConceptMaps ------------------------------------------------------------


@pytest.mark.parametrize("site", SITES)
def test_every_shipped_site_loads_into_valid_r4_conceptmaps(site: str) -> None:
    maps = load_site(MAPPINGS / site)
    with (MAPPINGS / site / "codes" / "maps.csv").open(encoding="utf-8") as f:
        index = list(csv.DictReader(f))
    assert list(maps.conceptmaps) == [r["map"] for r in index]
    assert {"drug", "diagnosis", "department"} <= set(maps.conceptmaps)
    for entry in index:
        cm = maps.conceptmaps[entry["map"]]
        validate_resource(cm)
        model = ConceptMap.model_validate(cm)
        assert model.id == f"{site}-{entry['map']}"
        assert model.url == f"http://hutong.dev/fhir/ConceptMap/{site}-{entry['map']}"
        assert model.sourceUri == entry["source_system"]
        assert model.targetUri == entry["target_system"]
        (group,) = model.group
        assert (group.source, group.target) == (entry["source_system"], entry["target_system"])
        expected = rows(site, entry["map"])
        assert len(group.element) == len(expected)
        for el, row in zip(group.element, expected, strict=True):
            assert el.code == row["source_code"]
            assert el.display == row["source_display"]
            (target,) = el.target
            assert target.code == row["target_code"]
            assert target.display == row["target_display"]
            assert target.equivalence == row["equivalence"]
            assert (target.comment or "") == row["comment"]


def test_the_alliance_drug_catalogue_has_105_drugs_at_every_site() -> None:
    catalogue = {r["target_code"]: r["target_display"] for r in rows("fuxing", "drug")}
    assert sorted(catalogue) == [f"XC-YP-{i:03d}" for i in range(1, 106)]
    for site in SITES:
        drugs = rows(site, "drug")
        assert len(drugs) == 105, site
        assert {r["target_code"]: r["target_display"] for r in drugs} == catalogue, site
        assert len({r["source_code"] for r in drugs}) == 105, site


def test_every_alliance_member_has_a_mapping_folder() -> None:
    import tomllib

    alliance = tomllib.loads((ROOT / "config/alliances/fuxing/alliance.toml").read_text("utf-8"))
    members = {m["id"] for m in alliance["members"] if m["role"] != "platform"}
    assert members == set(SITES)


# -- bad CSVs: file, line and column ---------------------------------------------------------


def make_site(tmp_path: Path, name: str = "fuxing") -> Path:
    site = tmp_path / name
    shutil.copytree(MAPPINGS / "fuxing", site)
    return site


def problems_of(site: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_site(site)
    return caught.value.problems


def test_bad_rows_are_named_by_file_line_and_column(tmp_path: Path) -> None:
    site = make_site(tmp_path)
    drug = site / "codes" / "drug.csv"
    lines = drug.read_text("utf-8").splitlines()
    lines[4] = "FX-0104,硝苯地平缓释片(Ⅱ) 20mg,XC-YP-004,硝苯地平缓释片(Ⅱ) 20mg,same,"
    lines[8] = lines[2]  # line 9 repeats line 3's source code FX-0102
    lines[10] = "FX-0110,氯沙坦钾片 50mg,XC-YP-010,氯沙坦钾片 50mg,narrower,"
    drug.write_text("\n".join(lines) + "\n", "utf-8")
    lab = site / "codes" / "lab.csv"
    lines = lab.read_text("utf-8").splitlines()
    lines[1] = lines[1].replace("2345-7", "2345-8")  # wrong LOINC check digit
    lab.write_text("\n".join(lines) + "\n", "utf-8")
    dept = site / "codes" / "department.csv"
    lines = dept.read_text("utf-8").splitlines()
    lines[0] = "source_code,source_display,target_code,target_display,comment"
    lines = [
        ",".join(line.split(",")[:4] + line.split(",")[5:]) if i else line
        for i, line in enumerate(lines)
    ]
    dept.write_text("\n".join(lines) + "\n", "utf-8")
    assert problems_of(site) == [
        (
            f"{drug}:5:5 (equivalence): unknown equivalence 'same' (one of: relatedto, equivalent, "
            "equal, wider, subsumes, narrower, specializes, inexact, unmatched, disjoint)"
        ),
        f"{drug}:9:1 (source_code): duplicate source_code 'FX-0102' (first on line 3)",
        (
            f"{drug}:11:5 (equivalence): equivalence narrower needs a comment saying how the "
            "concepts differ (FHIR cmd-1)"
        ),
        (
            f"{lab}:2:3 (target_code): target_code '2345-8' is not a LOINC code (NNNNN-C with a "
            "valid check digit)"
        ),
        (
            f"{dept}:1: missing column 'equivalence' (the header has: source_code, source_display, "
            "target_code, target_display, comment)"
        ),
    ]


def test_bad_index_and_a_shifted_row(tmp_path: Path) -> None:
    site = make_site(tmp_path)
    index = site / "codes" / "maps.csv"
    text = index.read_text("utf-8").replace("http://loinc.org", "loinc")
    index.write_text(text, "utf-8")
    diag = site / "codes" / "diagnosis.csv"
    lines = diag.read_text("utf-8").splitlines()
    lines[3] = "FXZD0103,2型糖尿病,E11.9,非胰岛素依赖型糖尿病,不伴有并发症,equivalent,见说明"
    diag.write_text("\n".join(lines) + "\n", "utf-8")
    with pytest.raises(ConfigError) as caught:
        load_site(site)
    assert caught.value.problems == [
        (
            f"{index}:3:5 (target_system): 'loinc' is not an absolute URI (http(s)://... or "
            "urn:oid:...)"
        )
    ]
    index.write_text(text.replace(",loinc,", ",http://loinc.org,"), "utf-8")
    assert problems_of(site) == [
        f"{diag}:4:7: 7 fields, the header has 6 (a comma inside a value needs quotes)"
    ]


def test_comments_blank_lines_bom_and_empty_targets_are_accepted(tmp_path: Path) -> None:
    site = make_site(tmp_path)
    drug = site / "codes" / "drug.csv"
    body = drug.read_text("utf-8")
    drug.write_text(
        "\ufeff# 复兴医院药品目录 2017 版\n" + body + "\n# 待映射\nFX-0999,某院内制剂,,,,\n",
        "utf-8",
    )
    maps = load_site(site)
    el = maps.conceptmaps["drug"]["group"][0]["element"][-1]
    assert el == {
        "code": "FX-0999",
        "display": "某院内制剂",
        "target": [{"equivalence": "unmatched"}],
    }
    assert maps.rows["drug"][-1].line == 110
    ConceptMap.model_validate(maps.conceptmaps["drug"])


# -- map_coding / to_local: all 105 drugs, both ways -------------------------------------------


def test_every_drug_travels_fuxing_to_yuetan_and_back_as_the_receivers_own_code() -> None:
    fx, yt = load_site(MAPPINGS / "fuxing"), load_site(MAPPINGS / "yuetan-chc")
    fx_rows = {r["target_code"]: r for r in rows("fuxing", "drug")}
    yt_rows = {r["target_code"]: r for r in rows("yuetan-chc", "drug")}
    assert len(fx_rows) == len(yt_rows) == 105
    for shared, f in fx_rows.items():
        y = yt_rows[shared]
        # Fuxing prescribes: the wire carries the alliance code AND Fuxing's own code
        wire, unmapped = map_coding(
            fx, "drug", {"code": f["source_code"], "display": f["source_display"]}
        )
        assert unmapped is False
        assert wire == [
            {"system": ALLIANCE_DRUG, "code": shared, "display": f["target_display"]},
            {"system": FX_DRUG, "code": f["source_code"], "display": f["source_display"]},
        ]
        # Yuetan's HIS gets Yuetan's code
        local, unmapped = to_local(yt, "drug", wire)
        assert unmapped is False
        assert local == {
            "system": YT_DRUG,
            "code": y["source_code"],
            "display": y["source_display"],
        }
        # and the way back: Yuetan sends, Fuxing writes its own code
        back, unmapped = map_coding(yt, "drug", {"system": YT_DRUG, "code": y["source_code"]})
        assert unmapped is False
        assert back[0] == {"system": ALLIANCE_DRUG, "code": shared, "display": y["target_display"]}
        assert back[1] == {"system": YT_DRUG, "code": y["source_code"]}
        local, unmapped = to_local(fx, "drug", back)
        assert (local, unmapped) == (
            {"system": FX_DRUG, "code": f["source_code"], "display": f["source_display"]},
            False,
        )


def test_an_unmapped_code_is_never_dropped() -> None:
    fx = load_site(MAPPINGS / "fuxing")
    wire, unmapped = map_coding(fx, "drug", {"code": "FX-9001", "display": "复方丹参滴丸"})
    assert (wire, unmapped) == (
        [{"system": FX_DRUG, "code": "FX-9001", "display": "复方丹参滴丸"}],
        True,
    )
    other = {"system": "http://example.org/other", "code": "FX-0101"}
    assert map_coding(fx, "drug", other) == ([other], True)
    shared = {"system": ALLIANCE_DRUG, "code": "XC-YP-001"}
    assert map_coding(fx, "drug", shared) == ([shared], False)
    # a concept: the mapped coding joins, other systems and the text stay
    concept, unmapped = map_concept(
        fx,
        "diagnosis",
        {
            "coding": [
                {"code": "FXZD0101"},
                {"system": "http://snomed.info/sct", "code": "38341003"},
            ],
            "text": "高血压病",
        },
    )
    assert unmapped is False
    assert concept == {
        "text": "高血压病",
        "coding": [
            {
                "system": "http://hl7.org/fhir/sid/icd-10",
                "code": "I10",
                "display": "特发性(原发性)高血压",
            },
            {"system": "http://hutong.dev/CodeSystem/fuxing/diagnosis", "code": "FXZD0101"},
            {"system": "http://snomed.info/sct", "code": "38341003"},
        ],
    }
    # arriving: a shared code this site has no local code for
    assert to_local(fx, "drug", [{"system": ALLIANCE_DRUG, "code": "XC-YP-999"}]) == (None, True)


def test_reverse_prefers_the_equivalent_row_and_translate_reads_it_the_other_way() -> None:
    yt = load_site(MAPPINGS / "yuetan-chc")
    # 02 全科医疗科 <- KS01 全科诊室 (equivalent) and KS02 慢病管理门诊 (wider)
    assert to_local(yt, "department", [{"system": DEPT, "code": "02"}]) == (
        {
            "system": "http://hutong.dev/CodeSystem/yuetan-chc/department",
            "code": "KS01",
            "display": "全科诊室",
        },
        False,
    )
    out = translate(yt.conceptmaps["department"], DEPT, "02", reverse=True)
    validate_resource(out)
    Parameters.model_validate(out)
    matches = [
        {p["name"]: p.get("valueCode") or p.get("valueCoding") for p in m["part"]}
        for m in out["parameter"]
        if m["name"] == "match"
    ]
    assert out["parameter"][0] == {"name": "result", "valueBoolean": True}
    assert [(m["equivalence"], m["concept"]["code"]) for m in matches] == [
        ("equivalent", "KS01"),
        ("narrower", "KS02"),
    ]
    miss = translate(yt.conceptmaps["drug"], YT_DRUG, "YT0000")
    assert miss["parameter"] == [
        {"name": "result", "valueBoolean": False},
        {
            "name": "message",
            "valueString": "code 'YT0000' of system "
            f"{YT_DRUG} is in no map (http://hutong.dev/fhir/ConceptMap/yuetan-chc-drug)",
        },
    ]


# -- the mark ----------------------------------------------------------------------------------


def test_mark_unmapped_tags_resource_and_bundle_once() -> None:
    fx = load_site(MAPPINGS / "fuxing")
    codings, unmapped = map_coding(fx, "drug", {"code": "FX-9001", "display": "复方丹参滴丸"})
    mr = {
        "resourceType": "MedicationRequest",
        "id": "mr1",
        "status": "active",
        "intent": "order",
        "medicationCodeableConcept": {"coding": codings},
        "subject": {"reference": "Patient/p1"},
    }
    assert unmapped and not is_marked(mr)
    mark_unmapped(mr)
    mark_unmapped(mr)
    assert mr["meta"]["tag"] == [
        {
            "system": FLAGS_SYSTEM,
            "code": UNMAPPED_CODE,
            "display": "含未映射的本地编码 / contains a local code without a standard mapping",
        }
    ]
    bundle = mark_unmapped(
        {
            "resourceType": "Bundle",
            "type": "collection",
            "entry": [{"fullUrl": "urn:uuid:6c1b3c3e-52a4-4d38-9d0c-3c6a7b9e0a11", "resource": mr}],
        }
    )
    validate_bundle(bundle)
    Bundle.model_validate(bundle)
    MedicationRequest.model_validate(mr)
    assert is_marked(bundle) and marked_resources(bundle) == ["MedicationRequest/mr1"]


# -- gaps --------------------------------------------------------------------------------------


T1 = datetime(2026, 11, 20, 8, 0, tzinfo=UTC)
T2 = datetime(2026, 11, 21, 9, 30, tzinfo=UTC)


def plant_unmapped_rows(site: Path) -> None:
    """Two known-but-unmapped drugs and one department, as IT would list them."""
    with (site / "codes" / "drug.csv").open("a", encoding="utf-8") as f:
        f.write("FX-0998,院内制剂 复方薄荷脑软膏,,,,\nFX-0999,院内制剂 止咳合剂,,,unmatched,\n")
    with (site / "codes" / "department.csv").open("a", encoding="utf-8") as f:
        f.write("6100,体检中心,,,,\n")


def check_record_gap_counts(store: Store) -> None:
    try:
        store.create_all()
        for _ in range(3):
            record_gap(
                store,
                "fuxing",
                "drug",
                {"system": FX_DRUG, "code": "FX-9001", "display": "复方丹参滴丸"},
                at=T1,
            )
        record_gap(store, "fuxing", "drug", {"system": FX_DRUG, "code": "FX-9001"}, at=T2)
        with store.write() as conn:  # inside an adapter's own transaction
            record_gap(
                conn,
                "fuxing",
                "drug",
                {"system": ALLIANCE_DRUG, "code": "XC-YP-200"},
                at=T2,
                count=2,
            )
        got = observed_gaps(store)
    finally:
        store.dispose()
    assert [
        (o.site, o.map, o.system, o.code, o.display, o.count, o.first_seen, o.last_seen)
        for o in got
    ] == [
        ("fuxing", "drug", FX_DRUG, "FX-9001", "复方丹参滴丸", 4, T1, T2),
        ("fuxing", "drug", ALLIANCE_DRUG, "XC-YP-200", "", 2, T2, T2),
    ]
    gaps = find_gaps(load_site(MAPPINGS / "fuxing"), got)
    assert [(g.map, g.kind, g.code, g.count) for g in gaps] == [
        ("drug", "unmapped", "FX-9001", 4),
        ("drug", "no-local", "XC-YP-200", 2),
    ]


def test_record_gap_counts_in_the_node_store(tmp_path: Path) -> None:
    check_record_gap_counts(Store(f"sqlite:///{tmp_path / 'node.db'}"))


def test_note_unmapped_counts_and_marks(tmp_path: Path) -> None:
    """What an adapter calls with its host: the host counts the gap (``host.record_gap``, the
    node's store under the site of its maps, at its clock)."""
    from types import SimpleNamespace

    from bridge.mapping import note_unmapped, record_gap

    store = Store(f"sqlite:///{tmp_path / 'node.db'}")
    try:
        store.create_all()
        maps = load_site(MAPPINGS / "fuxing")
        host = SimpleNamespace(
            maps=maps,
            record_gap=lambda map_id, coding: record_gap(store, maps.site, map_id, coding, at=T2),
        )
        codings, unmapped = map_coding(host.maps, "drug", {"code": "FX-9001"})
        assert unmapped
        mr: dict[str, Any] = {"resourceType": "MedicationRequest", "id": "m"}
        bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "transaction"}
        note_unmapped(host, "drug", codings[-1], mr, bundle)
        note_unmapped(host, "drug", codings[-1], mr, bundle)
        assert is_marked(mr) and is_marked(bundle) and len(mr["meta"]["tag"]) == 1
        (seen,) = observed_gaps(store)
        assert (seen.site, seen.map, seen.system, seen.code, seen.count) == (
            "fuxing",
            "drug",
            FX_DRUG,
            "FX-9001",
            2,
        )
    finally:
        store.dispose()


@pytest.mark.postgres
def test_record_gap_counts_on_postgresql(pg_db: str) -> None:
    check_record_gap_counts(Store(pg_db))


@pytest.mark.slow  # runs the CLI as a child process
def test_check_site_lists_planted_rows_and_exits_1(tmp_path: Path) -> None:
    site = make_site(tmp_path)
    clean = hutong("mapping", "check", "--site", str(site))
    assert (clean.returncode, clean.stdout.splitlines()) == (
        0,
        [
            "fuxing/drug: ok (105 codes)",
            "fuxing/lab: ok (12 codes)",
            "fuxing/diagnosis: ok (13 codes)",
            "fuxing/department: ok (12 codes)",
            "total: 0 gaps in 0 of 4 maps (1 site)",
        ],
    ), clean.stderr
    plant_unmapped_rows(site)
    res = hutong("mapping", "check", "--site", str(site))
    assert res.returncode == 1, res.stderr
    assert res.stdout.splitlines() == [
        "fuxing/drug: 2 gaps, seen 0 times",
        "  no-target   FX-0998  seen 0  院内制剂 复方薄荷脑软膏",
        "  no-target   FX-0999  seen 0  院内制剂 止咳合剂",
        "fuxing/lab: ok (12 codes)",
        "fuxing/diagnosis: ok (13 codes)",
        "fuxing/department: 1 gap, seen 0 times",
        "  no-target   6100  seen 0  体检中心",
        "total: 3 gaps in 2 of 4 maps (1 site)",
    ]


MEMBERS = [
    {"id": "core", "zh": "复兴医院", "en": "Fuxing Hospital", "role": "core"},
    {"id": "chc", "zh": "月坛社区卫生服务中心", "en": "Yuetan CHC", "role": "community"},
]
KINDS = ["referral.request", "referral.status", "referral.cancel", "referral.return"]
RULES = [
    {"from": "chc", "to": "core", "kinds": KINDS},
    {"from": "core", "to": "chc", "kinds": KINDS},
]


@pytest.mark.slow  # runs the CLI as a child process
def test_check_node_adds_the_gaps_the_store_has_seen_with_counts(tmp_path: Path) -> None:
    alliance = Alliance(tmp_path / "alliance", MEMBERS, RULES)
    node_file = alliance.files["core"]
    site = make_site(tmp_path / "alliance" / "mappings", "core")
    plant_unmapped_rows(site)
    plan = load_node(node_file)
    assert site_folders(plan) == [site.resolve()]
    store = Store(plan.storage_dsn)
    try:
        store.create_all()
        core_drug = "http://hutong.dev/CodeSystem/fuxing/drug"  # the copied maps.csv's system
        for _ in range(5):
            record_gap(
                store,
                "core",
                "drug",
                {"system": core_drug, "code": "FX-9001", "display": "复方丹参滴丸"},
                at=T1,
            )
        for _ in range(2):
            record_gap(store, "core", "drug", {"system": core_drug, "code": "FX-0999"}, at=T1)
        record_gap(
            store,
            "core",
            "department",
            {"system": DEPT, "code": "03.11", "display": "呼吸内科专业"},
            at=T2,
        )
        record_gap(store, "core", "drug", {"system": core_drug, "code": "FX-0101"}, at=T2)
        record_gap(
            store, "core", "", {"system": "urn:oid:1.2.156.999", "code": "Z1"}, at=T2, count=3
        )
    finally:
        store.dispose()
    res = hutong("mapping", "check", "--node", str(node_file))
    assert res.returncode == 1, res.stderr
    assert res.stdout.splitlines() == [
        "core/drug: 3 gaps, seen 7 times",
        "  unmapped    FX-9001  seen 5  复方丹参滴丸",
        "  no-target   FX-0999  seen 2  院内制剂 止咳合剂",
        "  no-target   FX-0998  seen 0  院内制剂 复方薄荷脑软膏",
        "core/lab: ok (12 codes)",
        "core/diagnosis: ok (13 codes)",
        "core/department: 2 gaps, seen 1 time",
        "  no-local    03.11  seen 1  呼吸内科专业",
        "  no-target   6100   seen 0  体检中心",
        "core/?: 1 gap, seen 3 times",
        "  unknown-map Z1  seen 3  [urn:oid:1.2.156.999]",
        "total: 6 gaps in 3 of 5 maps (1 site)",
    ]
    as_json = hutong("mapping", "check", "--node", str(node_file), "--json")
    assert as_json.returncode == 1
    body = json.loads(as_json.stdout)
    assert body["total"] == 6 and body["sites"]["core"]["gaps"] == 6
    assert [(g["kind"], g["code"], g["count"]) for g in body["sites"]["core"]["maps"]["drug"]] == [
        ("unmapped", "FX-9001", 5),
        ("no-target", "FX-0999", 2),
        ("no-target", "FX-0998", 0),
    ]
    assert body["sites"]["core"]["maps"]["lab"] == []


@pytest.mark.slow  # runs the CLI as a child process
def test_check_needs_one_source() -> None:
    res = hutong("mapping", "check")
    assert res.returncode == 2
    assert res.stderr.strip() == "error: HT-CONFIG: give either --node NODE_FILE or --site FOLDER"


# -- field maps --------------------------------------------------------------------------------


FUXING_ROW = {
    "ZZDH": "FX2026110001",
    "ZZLX": "4",
    "JSJGDM": "JG101",
    "HZXM": "王秀英",
    "XB": "2",
    "CSRQ": "19500315",
    "SFZH": "110102195003151234",
    "LXDH": "13800001111",
    "BLH": "0012345",
    "ZDDM": "FXZD0103",
    "ZDMC": "2型糖尿病",
    "ZZYY": "血糖平稳, 转社区随访",
    "BQZY": "住院 10 天",
    "KSDM": "0200",
    "LSTD": "0",
    "ZQTYR": "患者本人",
    "ZZYS": "李医生",
    "TXSJ": "20261120093000",
    "EXTRA": "ignored",
}


def test_fuxing_referral_row_becomes_a_slip_and_back() -> None:
    fm = load_field_map(MAPPINGS / "fuxing", "referral", fields=ReferralSlip)
    values = apply(fm, FUXING_ROW)
    slip = ReferralSlip(**values)
    assert as_dict(slip) == {
        "slip_no": "FX2026110001",
        "kind": "down-outpatient",
        "to_member": "yuetan-chc",
        "patient_name": "王秀英",
        "gender": "female",
        "birth_date": "1950-03-15",
        "id_number": "110102195003151234",
        "phone": "13800001111",
        "mrn": "0012345",
        "diagnosis_code": "FXZD0103",
        "diagnosis_name": "2型糖尿病",
        "reason": "血糖平稳, 转社区随访",
        "summary": "住院 10 天",
        "department_code": "0200",
        "urgent": False,
        "consent_by": "患者本人",
        "doctor": "李医生",
        "written_at": "2026-11-20T09:30:00+08:00",
    }
    back = unapply(fm, as_dict(slip))
    assert back == {k: v for k, v in FUXING_ROW.items() if k != "EXTRA"}


def test_yuetan_vendor_conventions_and_the_other_records() -> None:
    row = {
        "ZZD_ID": "YT-000321",
        "ZZ_LB": "ZY",
        "JS_YY": "复兴医院",
        "XM": "张建国",
        "XB": "男",
        "CSRQ": "1948-07-02",
        "ZJHM": "110102194807021235",
        "DH": "",
        "JKDA_H": "JK0088",
        "ZD_BM": "YTZ-10",
        "ZD_MC": "脑梗死",
        "ZZ_YY": "肢体无力加重",
        "BS_ZY": "",
        "KS_BM": "KS01",
        "SF_JZ": "是",
        "TYR": "家属",
        "YS": "赵医生",
        "TX_SJ": "2026-11-21 14:05:09",
    }
    fm = load_field_map(MAPPINGS / "yuetan-chc", "referral", fields=ReferralSlip)
    values = apply(fm, row)
    assert "phone" not in values and "summary" not in values  # empty, optional, no default
    slip = ReferralSlip(**{"phone": "", "summary": "", **values})
    assert (
        slip.kind,
        slip.to_member,
        slip.gender,
        slip.birth_date,
        slip.urgent,
        slip.written_at,
    ) == ("up-inpatient", "fuxing", "male", "1948-07-02", True, "2026-11-21T14:05:09+08:00")
    assert unapply(fm, as_dict(slip)) == row
    acc = load_field_map(MAPPINGS / "yuetan-chc", "acceptance", fields=AcceptanceSlip)
    assert AcceptanceSlip(
        **apply(acc, {"ZZD_ID": "YT-000321", "JZ_ZT": "拒绝", "JJ_YY": "床位已满"})
    ) == AcceptanceSlip(slip_no="YT-000321", accepted=False, reason="床位已满")
    fx_acc = load_field_map(MAPPINGS / "fuxing", "acceptance", fields=AcceptanceSlip)
    assert apply(
        fx_acc,
        {
            "ZZDH": "YT-000321",
            "JZJG": "1",
            "YYSJ": "202611230800",
            "KSDM": "0303",
            "CWH": "12-03",
            "JZYS": "周医生",
        },
    ) == {
        "slip_no": "YT-000321",
        "accepted": True,
        "appointment_at": "2026-11-23T08:00:00+08:00",
        "department_code": "0303",
        "bed_no": "12-03",
        "doctor": "周医生",
    }
    for site in ("fuxing", "yuetan-chc"):
        for record, cls in (
            ("return", ReturnSlip),
            ("prescription", Prescription),
            ("lab_result", LabResult),
        ):
            assert load_field_map(MAPPINGS / site, record, fields=cls).rules
    rx = load_field_map(MAPPINGS / "fuxing", "prescription", fields=Prescription)
    assert Prescription(
        **apply(
            rx,
            {"YPDM": "FX-0101", "YPMC": "苯磺酸氨氯地平片 5mg", "JL": "5 mg", "PC": "qd", "TS": 28},
        )
    ) == Prescription("FX-0101", "苯磺酸氨氯地平片 5mg", "5 mg", "qd", 28)


def test_bad_vendor_values_name_record_column_and_field_never_the_value() -> None:
    fm = load_field_map(MAPPINGS / "fuxing", "referral", fields=ReferralSlip)
    cases = [
        (
            {"XB": "3"},
            "XB",
            "gender",
            "referral: column XB (gender): value not in the value map (known: 1, 2, 9, 0)",
        ),
        (
            {"CSRQ": "1950-03-15"},
            "CSRQ",
            "birth_date",
            (
                "referral: column CSRQ (birth_date): not a date in format yyyyMMdd "
                "(10 characters, expected 8)"
            ),
        ),
        (
            {"CSRQ": "19501315"},
            "CSRQ",
            "birth_date",
            "referral: column CSRQ (birth_date): not a date in format yyyyMMdd",
        ),
        ({"HZXM": " "}, "HZXM", "patient_name", "referral: column HZXM (patient_name): is empty"),
    ]
    for change, column, field, message in cases:
        with pytest.raises(FieldMapError) as caught:
            apply(fm, {**FUXING_ROW, **change})
        err = caught.value
        assert (err.code, err.record, err.column, err.field, err.message) == (
            "HT-MAP-FIELD",
            "referral",
            column,
            field,
            message,
        )
        for value in change.values():
            if value.strip():
                assert value not in err.message


def test_bad_field_map_files_are_named_by_line_and_column(tmp_path: Path) -> None:
    folder = tmp_path / "site"
    (folder / "fields").mkdir(parents=True)
    path = folder / "fields" / "referral.csv"
    path.write_text(
        "field,column,label,type,format,values,required,default\n"
        "patient_name,HZXM,患者姓名,,,,yes,\n"
        "gendr,XB,性别,,,1=male;2=female,yes,\n"
        "birth_date,CSRQ,出生日期,date,yyyy/MM/dd,,yes,\n"
        "urgent,LSTD,绿色通道,boolean,,,,\n"
        "patient_name,XM,姓名,,,,,\n"
        "doctor,HZXM,医生,,,,maybe,\n"
        "kind,,转诊类型,,,,,\n",
        "utf-8",
    )
    with pytest.raises(ConfigError) as caught:
        load_field_map(folder, "referral", fields=ReferralSlip)
    known = ", ".join(sorted(f for f in ReferralSlip.__dataclass_fields__))
    assert caught.value.problems == [
        f"{path}:3:1 (field): unknown field 'gendr' for referral (known: {known})",
        f"{path}:5:4 (type): unknown type 'boolean' (one of: str, int, bool, date, datetime)",
        f"{path}:6:1 (field): field 'patient_name' is mapped twice (first on line 2)",
        f"{path}:7:2 (column): column 'HZXM' is used twice (first on line 2)",
        f"{path}:7:7 (required): 'maybe' is not yes or no",
        f"{path}:8:2 (column): no column and no default for 'kind'",
    ]


# -- ConceptMap and $translate on a running node -----------------------------------------------


@pytest.mark.slow
def test_conceptmap_api_on_a_running_node(tmp_path: Path) -> None:
    alliance = Alliance(tmp_path / "alliance", MEMBERS, RULES)
    shutil.copytree(MAPPINGS / "yuetan-chc", tmp_path / "alliance" / "mappings" / "chc")
    node = alliance.node("chc")
    alliance.start("chc")
    try:
        with httpx.Client(
            base_url=node.local_url + "/fhir",
            timeout=30,
            headers={"Authorization": f"Bearer {node.token('clinician')}"},
        ) as http:
            found = http.get("/ConceptMap")
            assert found.status_code == 200
            assert found.headers["content-type"].startswith("application/fhir+json")
            bundle = found.json()
            Bundle.model_validate(bundle)
            assert bundle["total"] == 4
            assert [e["resource"]["id"] for e in bundle["entry"]] == [
                "chc-drug",
                "chc-lab",
                "chc-diagnosis",
                "chc-department",
            ]
            one = http.get(
                "/ConceptMap", params={"url": "http://hutong.dev/fhir/ConceptMap/chc-lab"}
            ).json()
            assert [e["resource"]["id"] for e in one["entry"]] == ["chc-lab"]
            drug = http.get("/ConceptMap/chc-drug").json()
            ConceptMap.model_validate(drug)
            assert len(drug["group"][0]["element"]) == 105
            assert drug == load_site(tmp_path / "alliance" / "mappings" / "chc").conceptmaps["drug"]

            # GET $translate, forward
            res = http.get(
                "/ConceptMap/$translate", params={"system": YT_DRUG, "code": "YT4701"}
            ).json()
            Parameters.model_validate(res)
            assert res["parameter"] == [
                {"name": "result", "valueBoolean": True},
                {
                    "name": "match",
                    "part": [
                        {"name": "equivalence", "valueCode": "narrower"},
                        {
                            "name": "concept",
                            "valueCoding": {
                                "system": ALLIANCE_DRUG,
                                "code": "XC-YP-073",
                                "display": "单硝酸异山梨酯缓释片 40mg",
                            },
                        },
                        {
                            "name": "source",
                            "valueUri": "http://hutong.dev/fhir/ConceptMap/chc-drug",
                        },
                    ],
                },
            ]

            # POST $translate with a Parameters body: the alliance code -> Yuetan's code
            res = http.post(
                "/ConceptMap/$translate",
                json={
                    "resourceType": "Parameters",
                    "parameter": [
                        {"name": "url", "valueUri": "http://hutong.dev/fhir/ConceptMap/chc-drug"},
                        {
                            "name": "coding",
                            "valueCoding": {"system": ALLIANCE_DRUG, "code": "XC-YP-001"},
                        },
                        {"name": "reverse", "valueBoolean": True},
                    ],
                },
            ).json()
            Parameters.model_validate(res)
            assert res["parameter"][0] == {"name": "result", "valueBoolean": True}
            assert res["parameter"][1]["part"][1]["valueCoding"] == {
                "system": YT_DRUG,
                "code": "YT2037",
                "display": "苯磺酸氨氯地平片(5mg)",
            }

            # not mapped: result false with a message, still 200
            miss = http.get(
                "/ConceptMap/chc-lab/$translate",
                params={"system": "http://hutong.dev/CodeSystem/yuetan-chc/lab", "code": "9999"},
            ).json()
            assert miss["parameter"][0] == {"name": "result", "valueBoolean": False}
            assert miss["parameter"][1]["name"] == "message"

            # errors are OperationOutcomes
            bad = http.get("/ConceptMap/$translate", params={"code": "YT2037"})
            assert bad.status_code == 400
            assert bad.json()["issue"][0]["diagnostics"] == "code needs system"
            assert http.get("/ConceptMap/nope").status_code == 404
            assert http.get("/ConceptMap", params={"status": "active"}).status_code == 400
            # /fhir/metadata lists what is served: each search parameter it names is taken
            # and finds the map it describes; the one operation is $translate
            meta = httpx.get(node.local_url + "/fhir/metadata", timeout=30).json()
            (cm,) = [r for r in meta["rest"][0]["resource"] if r["type"] == "ConceptMap"]
            assert [i["code"] for i in cm["interaction"]] == ["read", "search-type"]
            listed = {p["name"]: p["type"] for p in cm["searchParam"]}
            assert listed == {
                "url": "uri",
                "_id": "token",
                "name": "string",
                "source-system": "uri",
                "target-system": "uri",
            }
            lab = http.get("/ConceptMap/chc-lab").json()
            probe = {
                "url": lab["url"],
                "_id": "chc-lab",
                "name": lab["name"],
                "source-system": lab["group"][0]["source"],
                "target-system": lab["group"][0]["target"],
            }
            for name in listed:
                hit = http.get("/ConceptMap", params={name: probe[name]})
                assert hit.status_code == 200, name
                assert "chc-lab" in [e["resource"]["id"] for e in hit.json()["entry"]], name
                if name in ("url", "_id"):
                    assert hit.json()["total"] == 1, name
            assert [(o["name"], o["definition"]) for o in cm["operation"]] == [
                ("translate", "http://hl7.org/fhir/OperationDefinition/ConceptMap-translate")
            ]
        assert httpx.get(node.local_url + "/fhir/ConceptMap", timeout=30).status_code == 401
        # any role may read the maps (no patient data)
        auditor = httpx.get(
            node.local_url + "/fhir/ConceptMap/chc-department",
            timeout=30,
            headers={"Authorization": f"Bearer {node.token('auditor')}"},
        )
        assert auditor.status_code == 200 and auditor.json()["id"] == "chc-department"
    finally:
        alliance.stop_all()


def _json_lines(res: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(res.stdout)


@pytest.mark.slow  # runs the CLI as a child process
def test_translate_and_export_commands(tmp_path: Path) -> None:
    res = hutong(
        "mapping",
        "translate",
        "drug",
        "XC-YP-053",
        "--site",
        str(MAPPINGS / "yuetan-chc"),
        "--reverse",
    )
    assert res.returncode == 0, res.stderr
    out = _json_lines(res)
    assert out["parameter"][1]["part"][:2] == [
        {"name": "equivalence", "valueCode": "narrower"},
        {
            "name": "concept",
            "valueCoding": {
                "system": YT_DRUG,
                "code": "YT3961",
                "display": "甘精胰岛素注射液(3ml:300单位)",
            },
        },
    ]
    miss = hutong("mapping", "translate", "drug", "FX-0000", "--site", str(MAPPINGS / "fuxing"))
    assert miss.returncode == 1 and _json_lines(miss)["parameter"][0]["valueBoolean"] is False
    res = hutong(
        "mapping", "export", "--site", str(MAPPINGS / "fuxing"), "--out", str(tmp_path / "out")
    )
    assert res.returncode == 0, res.stderr
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == [
        "ConceptMap-fuxing-department.json",
        "ConceptMap-fuxing-diagnosis.json",
        "ConceptMap-fuxing-drug.json",
        "ConceptMap-fuxing-lab.json",
    ]
    for p in (tmp_path / "out").iterdir():
        ConceptMap.model_validate(json.loads(p.read_text("utf-8")))
