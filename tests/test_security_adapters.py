"""Issue 13, items 5-6: bounded adapters, with real peers.

* Web-service HIS (a real simulator process, a real node): an 8 MB document among the pending
  ones is refused while it arrives (HT-WS-TOO-LARGE), quarantined naming the document, audited,
  acked, and shown as the adapter's last error on the IT page; the referral written after it
  still arrives (before, the whole answer failed to parse on every poll: nothing after it ever
  came, and the IT page said healthy).
* DICOM Store SCP (a real pynetdicom C-STORE SCU): a data set with a sequence nested 200 deep
  and one over ``max_dataset_bytes`` are answered with a failure status, quarantined (the
  oversize one's first MiB), audited, and nothing is stored; one far over it is cut off while
  arriving (association aborted, recorded, nothing kept); a sound instance on the next
  association is stored; a TCP peer that connects and says nothing is cut off by the idle
  timeout.
"""

from __future__ import annotations

import csv
import io
import re
import socket
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from simulators.his_ws import HisWsProcess
from tests.harness import ROOT, Alliance, NodeProcess, db_rows, free_port_block, wait_for
from tests.test_web import Browser

pytestmark = pytest.mark.slow

XML = ROOT / "tests" / "fixtures" / "xml"


def it_page(node: NodeProcess) -> str:
    return Browser(node).login("it").get("/ui/it?lang=en")


def section(body: str, cls: str) -> str:
    m = re.search(rf'<table class="{cls}">.*?</table>', body, re.DOTALL)
    assert m, cls
    return m.group(0)


# -- web-service HIS ------------------------------------------------------------------------------


@pytest.fixture
def ws_site(tmp_path: Path):
    sim = HisWsProcess(tmp_path / "his-chc.sqlite", "yuetan-chc", site_name="月坛")
    sim.start()
    members = [
        {"id": "fuxing", "zh": "复兴医院", "en": "Fuxing Hospital", "role": "core"},
        {
            "id": "yuetan-chc",
            "zh": "月坛社区卫生服务中心",
            "en": "Yuetan CHC",
            "role": "community",
            "adapters": [
                {
                    "name": "his",
                    "type": "his-xml-ws",
                    "mappings": str(ROOT / "mappings" / "yuetan-chc"),
                    "receives": ["referral.*"],
                    "options": {
                        "url": sim.url,
                        "poll_s": 0.2,
                        "timeout_s": 5.0,
                        "site_name": "月坛",
                    },
                }
            ],
        },
    ]
    kinds = ["referral.request", "referral.status", "referral.cancel", "referral.return"]
    rules = [
        {"from": "fuxing", "to": "yuetan-chc", "kinds": kinds},
        {"from": "yuetan-chc", "to": "fuxing", "kinds": kinds},
    ]
    a = Alliance(tmp_path / "alliance", members, rules)
    try:
        a.start("fuxing", "yuetan-chc")
        yield a, sim
    finally:
        a.stop_all()
        sim.stop()


def test_ws_oversize_document_refused_while_arriving_and_the_next_one_served(ws_site) -> None:
    from tests.test_his_ws import referral_slip

    a, sim = ws_site
    chc, core = a.node("yuetan-chc"), a.node("fuxing")
    his = sim.his
    base = (XML / "referral.xml").read_bytes()
    pad = b"<!--" + b"x" * (8 * 1024 * 1024) + b"-->"
    big = base.replace(b'extension="YT-ZZD-000001"', b'extension="BIG-1"').replace(
        b"<ClinicalDocument", pad + b"<ClinicalDocument", 1
    )
    assert len(big) > 8 * 1024 * 1024
    big_seq = his.write_raw("BIG-1", "referral", big)
    after = referral_slip(
        slip_no="YTZZ-AFTER-BIG", patient_name="周敏", id_number="110102198003034444"
    )
    after_id = his.write_referral(after)

    wait_for(lambda: his.pending() == [], timeout=120, what="both documents acked")
    held = [h for h in chc.api("GET", "/local/v1/quarantine") if h["code"] == "HT-WS-TOO-LARGE"]
    assert len(held) == 1, held
    item = held[0]
    assert item["source"] == "adapter:his" and item["kind"] == "his-ws.referral"
    limit = 4 * 1024 * 1024
    assert item["message"].startswith(
        "record BIG-1 field /Envelope/Body/GetPendingDocumentsResponse/PendingDocument: "
        f"document BIG-1 (referral, seq {big_seq}) is over the {limit}-byte limit "
        "(options.max_document_bytes): refused after "
    )
    stored = db_rows(chc, "SELECT length(raw) FROM quarantine WHERE id = :i", i=item["id"])
    assert stored == [(0,)]  # the rest was never read, nothing of it kept
    # the document after it was taken: a referral at chc (and on its way to core)
    refs = wait_for(
        lambda: [
            r
            for r in chc.api("GET", "/local/v1/referrals")
            if chc.api("GET", f"/fhir/ServiceRequest/{r['sr_id']}", role="clinician")
            .get("requisition", {})
            .get("value")
            == after.slip_no
        ],
        timeout=60,
        what="the next referral at chc",
    )
    assert len(refs) == 1
    assert after_id != "BIG-1"
    rows = list(csv.DictReader(io.StringIO(chc.cli("audit", "export", "--format", "csv").stdout)))
    audited = [r for r in rows if r["action"] == "quarantined" and r["code"] == "HT-WS-TOO-LARGE"]
    assert len(audited) == 1 and "BIG-1" in audited[0]["message"]
    adapters = section(it_page(chc), "adapters")
    assert f"document BIG-1 (referral, seq {big_seq}) is over the {limit}-byte limit" in adapters
    assert "too_large=1" in adapters
    assert core.api("GET", "/local/v1/queues") is not None


# -- DICOM Store SCP ------------------------------------------------------------------------------

STUDY = "1.2.826.0.1.3680043.8.498.7001"
LIMIT = 1_000_000


@pytest.fixture
def pacs_site(tmp_path: Path):
    port = free_port_block(1)
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
                    "options": {
                        "bind": f"127.0.0.1:{port}",
                        "ae_title": "HUTONG",
                        "complete_after_s": 120,
                        "max_dataset_bytes": LIMIT,
                        "max_sequence_depth": 32,
                        "acse_timeout_s": 2,
                        "idle_timeout_s": 2,
                    },
                }
            ],
        },
        {"id": "chc", "zh": "月坛社区卫生服务中心", "en": "Yuetan CHC", "role": "community"},
    ]
    a = Alliance(
        tmp_path / "alliance",
        members,
        [{"from": "chc", "to": "core", "kinds": ["imaging.fetch-request"]}],
    )
    try:
        a.start("core")
        yield a.node("core"), port
    finally:
        a.stop_all()


def ct(sop: str, series: str = STUDY + ".1") -> Dataset:
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = STUDY, series, sop
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.PatientID = "FX0099"
    return ds


def c_store(port: int, ds: Dataset) -> int | None:
    """One C-STORE on its own association: the status, or None if the SCP aborted."""
    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="HUTONG")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(ds)
        if "Status" not in status:
            wait_for(lambda: not assoc.is_established, what="the aborted association ended")
            return None
        return int(status.Status)
    finally:
        if assoc.is_established:
            assoc.release()


def test_dicom_deep_and_oversize_datasets_refused_quarantined_nothing_stored(pacs_site) -> None:
    core, port = pacs_site
    studies = core.plan.data_dir / "adapters" / "pacs" / "studies"
    deep = ct(STUDY + ".1.1")
    inner = Dataset()
    inner.CodeValue = "X"
    for _ in range(200):
        outer = Dataset()
        outer.ContentSequence = Sequence([inner])
        inner = outer
    deep.ContentSequence = Sequence([inner])
    big = ct(STUDY + ".1.2")
    big.PixelData = b"\x00" * (2 * LIMIT)

    huge = ct(STUDY + ".1.4")
    huge.PixelData = b"\x00" * (4 * LIMIT)

    assert c_store(port, deep) == 0xC000
    assert c_store(port, big) == 0xC000
    assert c_store(port, huge) is None  # cut off while arriving: the association is aborted
    held = {h["message"].split(":")[0]: h for h in core.api("GET", "/local/v1/quarantine")}
    assert set(held) == {f"instance {STUDY}.1.1", f"instance {STUDY}.1.2", f"instance {STUDY}.1.4"}
    assert re.fullmatch(
        rf"instance {re.escape(STUDY)}\.1\.4: data set over twice the {LIMIT}-byte limit "
        r"\(options\.max_dataset_bytes\): cut off after (\d+) bytes, association aborted, "
        r"nothing kept",
        held[f"instance {STUDY}.1.4"]["message"],
    )
    assert held[f"instance {STUDY}.1.1"]["message"] == (
        f"instance {STUDY}.1.1: sequences nested deeper than 32 (options.max_sequence_depth)"
    )
    assert re.fullmatch(
        rf"instance {re.escape(STUDY)}\.1\.2: data set of (\d+) bytes is over the {LIMIT}-byte "
        r"limit \(options\.max_dataset_bytes\); the first 1048576 bytes are kept",
        held[f"instance {STUDY}.1.2"]["message"],
    )
    for h in held.values():
        assert (h["code"], h["source"], h["kind"]) == (
            "HT-DICOM-REJECTED",
            "adapter:pacs",
            "imaging.instance",
        )
    sizes = dict(db_rows(core, "SELECT id, length(raw) FROM quarantine"))
    assert sizes[held[f"instance {STUDY}.1.2"]["id"]] == 1 << 20
    assert sizes[held[f"instance {STUDY}.1.4"]["id"]] == 0
    assert sizes[held[f"instance {STUDY}.1.1"]["id"]] > 4000  # the whole deep one
    assert not (studies / STUDY).exists()  # nothing stored
    rows = list(csv.DictReader(io.StringIO(core.cli("audit", "export", "--format", "csv").stdout)))
    assert (
        sorted(r["code"] for r in rows if r["action"] == "quarantined") == ["HT-DICOM-REJECTED"] * 3
    )
    log = core.log.read_text(encoding="utf-8", errors="replace")
    assert "sequences nested deeper than 32" in log and "FX0099" not in log

    # the listener serves on: a sound instance is stored, byte for byte
    sound = ct(STUDY + ".1.3")
    assert c_store(port, sound) == 0x0000
    assert (studies / STUDY / (STUDY + ".1") / (STUDY + ".1.3.dcm")).is_file()

    # a peer that connects and never speaks is cut off (idle timeout 2 s, not held forever)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        assert (
            wait_for(
                lambda: s.recv(1024) == b"" or None, timeout=30, what="the idle connection closed"
            )
            is True
        )


def test_ws_options_refuse_a_limit_out_of_range() -> None:
    from adapters.his_ws.adapter import Options

    assert Options.model_validate({"url": "http://x/"}).max_document_bytes == 4 * 1024 * 1024
    with pytest.raises(ValueError, match="max_document_bytes"):
        Options.model_validate({"url": "http://x/", "max_document_bytes": 0})


# -- the WS client on its own, against a real HTTP server ------------------------------------------


class _Server:
    """A loopback HTTP server answering every POST with ``answer(body)`` written by ``send``."""

    def __init__(self, respond) -> None:  # type: ignore[no-untyped-def]
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                respond(self, body)

            def log_message(self, *args) -> None:  # type: ignore[no-untyped-def]
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/his-ws"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_ws_client_cuts_off_an_oversize_document_and_keeps_the_ones_before_it() -> None:
    from adapters.his_ws import soap
    from adapters.his_ws.client import HisClient

    docs = [
        soap.Pending(1, "A-1", "referral", b"<a/>" * 10),
        soap.Pending(2, "BIG-2", "referral", b"x" * 300_000),
        soap.Pending(3, "C-3", "acceptance", b"<c/>"),
    ]

    def respond(h, body) -> None:  # type: ignore[no-untyped-def]
        since = int(re.search(rb"<hws:Since>(\d+)<", body).group(1))
        answer = soap.pending_response([d for d in docs if d.seq > since])
        h.send_response(200)
        h.send_header("Content-Length", str(len(answer)))
        h.end_headers()
        try:
            for i in range(0, len(answer), 4096):
                h.wfile.write(answer[i : i + 4096])
        except OSError:
            pass  # the client closed: the rest is never read

    server = _Server(respond)
    try:
        client = HisClient(server.url, 5.0, max_document_bytes=100_000)
        got = client.pending(0, 50)
        assert [(d.seq, d.doc_id, d.type, d.raw, bool(d.too_large)) for d in got] == [
            (1, "A-1", "referral", b"<a/>" * 10, False),
            (2, "BIG-2", "referral", b"", True),
        ]
        assert got[1].too_large > 100_000 * 4 // 3
        later = client.pending(2, 50)
        assert [(d.seq, d.doc_id, d.raw, d.too_large) for d in later] == [(3, "C-3", b"<c/>", 0)]
        # within the limit, the same document comes whole
        whole = HisClient(server.url, 5.0, max_document_bytes=400_000).pending(1, 50)
        assert [(d.seq, len(d.raw), d.too_large) for d in whole] == [(2, 300_000, 0), (3, 4, 0)]
    finally:
        server.close()


def test_ws_client_gives_up_on_a_service_that_trickles_past_the_call_deadline() -> None:
    import threading

    from adapters.his_ws.client import HisClient
    from adapters.his_ws.errors import HisUnavailable

    stop = threading.Event()

    def respond(h, body) -> None:  # type: ignore[no-untyped-def]
        h.send_response(200)
        h.send_header("Content-Length", "1000000")
        h.end_headers()
        try:
            while not stop.wait(0.2):  # a byte now and then: never idle long enough to time out
                h.wfile.write(b" ")
                h.wfile.flush()
        except OSError:
            pass

    server = _Server(respond)
    try:
        client = HisClient(server.url, 5.0, call_deadline_s=1.0)
        with pytest.raises(
            HisUnavailable,
            match=r"GetPendingDocuments: answer not complete "
            r"within 1 s",
        ):
            client.pending(0, 50)
        with pytest.raises(HisUnavailable, match=r"AckDocuments: answer not complete within"):
            client.ack([1])
    finally:
        stop.set()
        server.close()
