"""Every ADT and REF of the third-party corpus, as other people's senders wrote them, into a real
HIS listener: the outcome of each is pinned in ``tests/fixtures/hl7v2-corpus/outcomes-his.tsv``.

Each message (split as a sender would: tests/his_corpus.py) goes over a real socket through
python-hl7's MLLP client into the his-hl7 adapter of a running node (tests/test_his_hl7.py's
Env), in corpus order. Then:

* ``stored`` (AA, the Patient got a new version): the Patient and, for a visit event, the
  Encounter are read back through /fhir and compared field by field with the message, read
  here by the test's own small parser (identifier, name, birth date, sex; visit number, status,
  class, period, location);
* ``resent`` (AA, nothing new): the message is identical (MSH-7 aside) to an earlier one;
* ``refused`` (AE/AR): the ERR segment names the field and the error class pinned in the
  table, and the table's justification quotes that field *as the message has it* (checked
  here against the message, not against Hutong's answer).

``HUTONG_WRITE_HIS_OUTCOMES=1`` rewrites the table from a run (then read every row before
committing it).
"""

from __future__ import annotations

import csv
import os
import urllib.parse
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from tests.his_corpus import CORPUS, his_messages
from tests.test_his_hl7 import Env
from tests.test_his_hl7_adt import mllp

TABLE = CORPUS / "outcomes-his.tsv"
COLUMNS = ["file", "index", "type", "control", "outcome", "ack", "detail", "justification"]
MRN = "urn:hutong:mrn:fuxing"
VISIT = "urn:hutong:visit:fuxing"
SITE = timezone(timedelta(hours=8))  # the adapter's utc_offset (the default)
STATUS = {
    "A01": "in-progress",
    "A06": "in-progress",
    "A04": "arrived",
    "A05": "planned",
    "A14": "planned",
    "A02": "in-progress",
    "A03": "finished",
    "A11": "cancelled",
    "A13": "in-progress",
}
VISIT_EVENTS = ("A01", "A02", "A03", "A04", "A05", "A06", "A11", "A12", "A13", "A14")
CLASS = {
    "E": "EMER",
    "I": "IMP",
    "O": "AMB",
    "P": "PRENC",
    "R": "R",
    "B": "B",
    "C": "C",
    "N": "N",
    "U": "U",
}
GENDER = {"M": "male", "F": "female", "O": "other", "U": "unknown", "A": "other", "N": "unknown"}
#: HL7 table 0357 code -> the reason class written in the table
REASON = {
    "100": "segment",
    "101": "required-field",
    "102": "data-type",
    "103": "table-value",
    "200": "message-type",
    "204": "unknown-key",
    "205": "duplicate-key",
}
#: why a careful receiver refuses, by field and class (the quoted value comes from the message)
RULE = {
    ("MSH-2", "102"): "MSH-2 must be the four encoding characters, distinct printable ASCII "
    "(^~\\&)",
    ("MSH-10", "101"): "MSH-10 is required: without it the ACK cannot name the message and "
    "a re-send cannot be told from a new message",
    ("MSH-9", "200"): "merges, swaps and moves of records (or unknown events) are not applied "
    "automatically; refused so the HIS knows",
    ("PID", "100"): "the ADT structure has exactly one PID",
    ("PV1", "100"): "the ADT A01-A14 structure requires PV1 (the visit)",
    ("PID-3", "101"): "no identifier usable as the record number (type MR, PI or PT, or untyped)",
    ("PID-8", "103"): "not in HL7 table 0001 (M F O U A N)",
    ("PV1-2", "103"): "not in HL7 table 0004 (E I O P R B C N U)",
    ("PV1-19", "205"): "this visit number already names another patient's visit",
    ("PV1-19", "204"): "no visit number, and this patient has no (single) open visit here "
    "to discharge, transfer or cancel",
    ("PV1-44", "102"): "not a real date/time (DTM YYYY[MM[DD[HH[MM[SS]]]]][+/-ZZZZ])",
    ("EVN-2", "102"): "not a date/time (DTM YYYY[MM[DD[HH[MM[SS]]]]][+/-ZZZZ])",
    ("MSH-7", "102"): "not a date/time (DTM YYYY[MM[DD[HH[MM[SS]]]]][+/-ZZZZ])",
}


# -- the test's own reading of a message (independent of the adapter) --------------------------


class Msg:
    def __init__(self, raw: bytes) -> None:
        text = raw.decode("utf-8", "backslashreplace")
        self.segs = [s for s in text.split("\r") if s]
        msh = self.segs[0]
        self.fs = msh[3]
        enc = msh[4:8] if len(msh) > 7 else "^~\\&"
        self.cs, self.rs, self.es, self.ss = enc[0], enc[1], enc[2], enc[3]

    def all(self, name: str) -> list[list[str]]:
        out = []
        for s in self.segs:
            f = s.split(self.fs)
            if f[0] == name:
                out.append(["MSH", self.fs, *f[1:]] if name == "MSH" else f)
        return out

    def get(self, name: str, n: int, c: int = 1, r: int = 1) -> str:
        found = self.all(name)
        if not found or len(found[0]) <= n:
            return ""
        reps = found[0][n].split(self.rs) if name != "MSH" or n != 2 else [found[0][n]]
        if len(reps) < r:
            return ""
        comps = reps[r - 1].split(self.cs) if not (name == "MSH" and n == 2) else [reps[0]]
        value = comps[c - 1] if len(comps) >= c else ""
        value = value.split(self.ss)[0] if (name, n) != ("MSH", 2) else value
        for code, ch in (
            ("F", self.fs),
            ("S", self.cs),
            ("R", self.rs),
            ("T", self.ss),
            ("E", self.es),
        ):
            value = value.replace(f"{self.es}{code}{self.es}", ch)
        return "" if value == '""' else value

    def field(self, where: str) -> str:
        """A field as written (``PV1-2``, ``MSH-10``): its first repetition, components kept."""
        name, _, n = where.partition("-")
        found = self.all(name)
        if not n:
            return f"{len(found)} {name} segment(s)"
        if not found or len(found[0]) <= int(n.split(".")[0]):
            return ""
        return found[0][int(n.split(".")[0])]

    def reps(self, name: str, n: int) -> int:
        found = self.all(name)
        if not found or len(found[0]) <= n or not found[0][n]:
            return 0
        return len(found[0][n].split(self.rs))


def dtm(value: str) -> str:
    """HL7 DTM -> FHIR dateTime at its precision (no offset: the site's), as R4 writes it."""
    v = value.strip()
    off = None
    for sign in "+-":
        if sign in v[8:]:
            v, off = v[: 8 + v[8:].index(sign)], v[8 + v[8:].index(sign) :]
    v = v.split(".")[0]
    if len(v) <= 8:
        return "-".join(x for x in (v[:4], v[4:6], v[6:8]) if x)
    tz = (
        SITE
        if off is None
        else timezone(
            (1 if off[0] == "+" else -1) * timedelta(hours=int(off[1:3]), minutes=int(off[3:5]))
        )
    )
    v = v.ljust(14, "0")
    return datetime(
        int(v[:4]), int(v[4:6]), int(v[6:8]), int(v[8:10]), int(v[10:12]), int(v[12:14]), tzinfo=tz
    ).isoformat()


def mrn_of(m: Msg) -> str:
    reps = [
        (m.get("PID", 3, 1, r).strip(), m.get("PID", 3, 5, r).strip().upper())
        for r in range(1, m.reps("PID", 3) + 1)
    ]
    reps = [(v, k) for v, k in reps if v]
    for kind in ("MR", "PI", "PT", "MRN"):
        hit = [v for v, k in reps if k == kind]
        if hit:
            return hit[0]
    return next((v for v, k in reps if not k), "")


# -- the run --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    # as a site whose HIS names no referral in its ADT: no referral field (PV1-50 in these
    # messages is the senders' alternate visit id)
    e = Env(tmp_path_factory.mktemp("his-hl7-corpus"), referral_id_field="")
    try:
        e.alliance.start("fuxing", "yuetan-chc")
        yield e
    finally:
        e.stop()


def _get(env: Env, path: str) -> dict[str, Any]:
    return env.alliance.node("fuxing").api("GET", path, role="clinician")


def _one(env: Env, rtype: str, **params: str) -> dict[str, Any] | None:
    got = _get(env, f"/fhir/{rtype}?{urllib.parse.urlencode(params)}").get("entry", [])
    return got[0]["resource"] if got else None


def check_patient(m: Msg, patient: dict[str, Any]) -> None:
    idents = {(i.get("system"), i.get("value")) for i in patient["identifier"]}
    assert (MRN, mrn_of(m)) in idents
    family, given = m.get("PID", 5, 1).strip(), m.get("PID", 5, 2).strip()
    if family or given:
        name = patient["name"][0]
        assert name.get("family", "") == family and name.get("given", [""])[0] == given
    if m.get("PID", 7).strip():
        assert patient["birthDate"] == dtm(m.get("PID", 7))[:10]
    if m.get("PID", 8).strip():
        assert patient["gender"] == GENDER[m.get("PID", 8).strip().upper()]


def check_encounter(m: Msg, event: str, enc: dict[str, Any], patient: dict[str, Any]) -> None:
    assert enc["subject"] == {"reference": f"Patient/{patient['id']}"}
    visit = m.get("PV1", 19).strip()
    if visit:
        assert {(i["system"], i["value"]) for i in enc["identifier"]} == {(VISIT, visit)}
    else:
        assert "identifier" not in enc
    if event in STATUS:
        assert enc["status"] == STATUS[event]
    klass = m.get("PV1", 2).strip().upper()
    if klass:
        assert enc["class"]["code"] == CLASS[klass]
    if m.get("PV1", 44).strip():
        assert enc["period"]["start"] == dtm(m.get("PV1", 44))
    if m.get("PV1", 45).strip():
        assert enc["period"]["end"] == dtm(m.get("PV1", 45))
    elif event == "A03":
        sent = m.get("EVN", 6) or m.get("EVN", 2) or m.get("MSH", 7)
        assert enc["period"]["end"] == dtm(sent)
    where = " ".join(x for x in (m.get("PV1", 3, c).strip() for c in (1, 2, 3)) if x)
    if where:
        last = enc["location"][-1]
        assert last["location"]["display"] == where
        assert last["status"] == (
            "completed" if event == "A03" else "planned" if enc["status"] == "planned" else "active"
        )


def run(env: Env) -> list[dict[str, str]]:
    port = env.ports["core-adapter"]
    rows = []
    for file, index, raw in his_messages():
        m = Msg(raw)
        mtype = m.field("MSH-9")
        event = m.get("MSH", 9, 2)
        mrn = mrn_of(m) if m.all("PID") else ""
        before = _one(env, "Patient", identifier=f"{MRN}|{mrn}") if mrn else None
        code, _control, why = mllp(port, raw)
        row = {
            "file": file,
            "index": str(index),
            "type": mtype,
            "control": m.field("MSH-10"),
            "ack": code,
        }
        if code == "AA":
            patient = _one(env, "Patient", identifier=f"{MRN}|{mrn}")
            assert patient is not None, (file, "AA but no Patient")
            version = int(patient["meta"]["versionId"])
            if before is not None and int(before["meta"]["versionId"]) == version:
                row |= {
                    "outcome": "resent",
                    "detail": "identical to an earlier message "
                    "(MSH-7 aside): its ACK again, nothing stored again",
                    "justification": "-",
                }
            else:
                check_patient(m, patient)
                detail = f"Patient {made(version)}"
                if event in VISIT_EVENTS or (event in ("A07", "A08") and m.get("PV1", 19)):
                    visit = m.get("PV1", 19).strip()
                    enc = (
                        _one(env, "Encounter", identifier=f"{VISIT}|{visit}")
                        if visit
                        else _one(env, "Encounter", patient=patient["id"])
                    )
                    assert enc is not None, (file, "AA but no Encounter")
                    check_encounter(m, event, enc, patient)
                    detail += (
                        f"; Encounter {made(int(enc['meta']['versionId']))} "
                        f"({enc['status']}, class {enc['class']['code']})"
                    )
                row |= {"outcome": "stored", "detail": detail, "justification": "-"}
        else:
            field, err = why.split(":", 1)[0], ack_error_code(why)
            row |= {
                "outcome": "refused",
                "detail": f"{field} {REASON.get(err, err)}",
                "justification": justify(m, field, err),
            }
        rows.append(row)
    return rows


def made(version: int) -> str:
    return "created" if version == 1 else f"updated (version {version})"


def ack_error_code(why: str) -> str:
    """The HL7 error class of a refusal, from the reason's field (ERR-3 is asserted below)."""
    return LAST_ERR.get("code", "")


LAST_ERR: dict[str, str] = {}


def justify(m: Msg, field: str, code: str) -> str:
    value = m.field(field)
    rule = RULE.get((field, code), REASON.get(code, code))
    return f'{field} = "{value}": {rule}' if "-" in field else f"{value}: {rule}"


@pytest.mark.slow
def test_every_corpus_adt_and_ref_has_its_pinned_outcome(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tests.test_his_hl7_adt as adt_tests

    real = adt_tests.MLLPClient

    class Recording(real):  # type: ignore[misc, valid-type]
        """python-hl7's client; keeps ERR-3 of the last answer for the reason class."""

        def send_message(self, message: Any) -> bytes:
            answer: bytes = super().send_message(message)
            LAST_ERR.clear()
            for seg in answer.strip(b"\x0b\x1c\r\n").split(b"\r"):
                f = seg.split(b"|")
                if f[0] == b"ERR":  # v2.5+: ERR-3 code^text; before: ERR-1 SEG^seq^field^code&text
                    LAST_ERR["code"] = (
                        f[3].split(b"^")[0] if len(f) > 3 else f[1].split(b"^")[3].split(b"&")[0]
                    ).decode()
            return answer

    monkeypatch.setattr(adt_tests, "MLLPClient", Recording)
    rows = run(env)
    assert len(rows) >= 130
    if os.environ.get("HUTONG_WRITE_HIS_OUTCOMES"):
        with TABLE.open("w", encoding="utf-8", newline="") as fh:
            w = csv.DictWriter(
                fh,
                COLUMNS,
                delimiter="\t",
                lineterminator="\n",
                quoting=csv.QUOTE_NONE,
                quotechar=None,
                escapechar="\\",
            )
            w.writeheader()
            w.writerows(rows)
    with TABLE.open(encoding="utf-8", newline="") as fh:
        pinned = list(
            csv.DictReader(
                fh, delimiter="\t", quoting=csv.QUOTE_NONE, quotechar=None, escapechar="\\"
            )
        )
    assert [(r["file"], r["index"]) for r in rows] == [(r["file"], r["index"]) for r in pinned]
    diffs = [(p, r) for p, r in zip(pinned, rows, strict=True) if p != r]
    assert not diffs, "\n".join(f"pinned {p}\n   got {r}" for p, r in diffs[:10])
    stored = [r for r in rows if r["outcome"] == "stored"]
    refused = [r for r in rows if r["outcome"] == "refused"]
    assert stored and refused and all(r["ack"] in ("AE", "AR") for r in refused)
