"""A vendor HIS with an XML web service (SOAP 1.1, CDA-like documents), as its own process.

State lives in one SQLite file, so the server process and a test (or IT at the command line)
share it: the doctor-facing side writes documents (:meth:`HisWs.write_referral`, ``accept``,
``reject``, ``write_return``, ``cancel``, or raw bytes for bad-data cases) that the node pulls
with ``GetPendingDocuments``/``AckDocuments``; documents the node writes (``ReceiveReferral``
etc.) are checked against the XSD, stored and listed by :meth:`HisWs.received`; lab reports
(``ReceiveLabReport``, checked against ``cda-lab-report.xsd``) by :meth:`HisWs.lab_reports`;
exam (imaging) reports (``ReceiveExamReport``, ``cda-exam-report.xsd``) by
:meth:`HisWs.exam_reports`.
The admission office's visit events (:meth:`HisWs.write_visit`: 入院登记, 挂号, 转科, 出院, 修改 and
the cancels, :mod:`adapters.his_ws.visit_doc`) are offered as documents of type ``visit``.
``fail_next(n)`` makes the next n calls answer a SOAP Fault (soap:Server, HTTP 500), as a HIS
does while its database is locked for the nightly job.

    python -m simulators.his_ws serve --db his.sqlite --port 8600 --member chc
    python -m simulators.his_ws write-referral --db his.sqlite --json slip.json
    python -m simulators.his_ws received --db his.sqlite
    python -m simulators.his_ws accept --db his.sqlite --doc <referral doc id> --bed 12床
    python -m simulators.his_ws cancel --db his.sqlite --doc <referral doc id> --reason 家属要求
    python -m simulators.his_ws lab-reports --db his.sqlite
    python -m simulators.his_ws exam-reports --db his.sqlite
    python -m simulators.his_ws faults --db his.sqlite --count 3
"""

from __future__ import annotations

import argparse
import hashlib
import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import asdict
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from adapters.consult_slips import ConsultCancel, ConsultSlip, ResubmitSlip
from adapters.his_ws import cda, consult_doc, exam_report, lab_report, soap, visit_doc
from adapters.his_ws.errors import BadDocument
from adapters.slips import AcceptanceSlip, LabResult, Prescription, ReferralSlip, ReturnSlip
from adapters.visits import Visit
from simulators.ports import free_port_block

SCHEMA = """
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS outbound (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, doc_id TEXT NOT NULL, type TEXT NOT NULL,
    raw BLOB NOT NULL, acked INTEGER NOT NULL DEFAULT 0, written_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS inbound (
    doc_id TEXT PRIMARY KEY, type TEXT NOT NULL, raw BLOB NOT NULL, digest TEXT NOT NULL,
    received_at TEXT NOT NULL, times INTEGER NOT NULL DEFAULT 1, pos INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS calls (
    id INTEGER PRIMARY KEY AUTOINCREMENT, op TEXT NOT NULL, doc_id TEXT, outcome TEXT NOT NULL);
"""


class HisWs:
    """The HIS's database and both of its faces (doctors' side and the web service)."""

    def __init__(
        self,
        path: str | Path,
        member: str | None = None,
        *,
        site_name: str = "",
        encoding: str = "UTF-8",
    ) -> None:
        self.path = Path(path)
        with self._db() as db:
            db.executescript(SCHEMA)
            # the first opener sets the site; later ones (the server process, the CLI) keep it
            for key, value in (
                ("member", member),
                ("site_name", site_name or None),
                ("encoding", encoding),
            ):
                if value is not None:
                    db.execute("INSERT OR IGNORE INTO settings VALUES (?, ?)", (key, value))
        self.member = self._setting("member") or "his"
        self.site = cda.Site(member=self.member, name=self._setting("site_name") or "")

    def _db(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        return db

    def _setting(self, key: str) -> str | None:
        with self._db() as db:
            row = db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    # -- the doctors' side --------------------------------------------------------------------

    def _next_id(self, prefix: str) -> str:
        with self._db() as db:
            n = db.execute("SELECT COUNT(*) FROM outbound").fetchone()[0] + 1
        return f"{self.member.upper()}-{prefix}-{n:06d}"

    def write_raw(self, doc_id: str, doc_type: str, raw: bytes) -> int:
        """Offer any bytes as a document (bad-data cases); returns its seq."""
        with self._db() as db:
            cur = db.execute(
                "INSERT INTO outbound (doc_id, type, raw, written_at) VALUES (?, ?, ?, ?)",
                (doc_id, doc_type, raw, datetime.now().isoformat()),
            )
            return int(cur.lastrowid or 0)

    def write(self, doc: cda.Document, encoding: str | None = None) -> str:
        raw = cda.write(doc, self.site, encoding or self._setting("encoding") or "UTF-8")
        self.write_raw(doc.doc_id, doc.type, raw)
        return doc.doc_id

    def write_referral(
        self, slip: ReferralSlip, doc_id: str | None = None, encoding: str | None = None
    ) -> str:
        return self.write(
            cda.Document(
                doc_id or self._next_id("ZZD"), "referral", slip, slip.written_at, self.member
            ),
            encoding,
        )

    def write_acceptance(
        self, referral_doc: str, slip: AcceptanceSlip, doc_id: str | None = None
    ) -> str:
        return self.write(
            cda.Document(
                doc_id or self._next_id("JZD"),
                "acceptance",
                slip,
                datetime.now().astimezone().isoformat(timespec="seconds"),
                self.member,
                referral_doc,
            )
        )

    def accept(
        self,
        referral_doc: str,
        *,
        appointment_at: str = "",
        department_code: str = "",
        bed_no: str = "",
        doctor: str = "",
    ) -> str:
        """The receiving doctor accepts a referral this HIS received (接诊)."""
        slip_no = self.received_doc(referral_doc).slip.slip_no
        return self.write_acceptance(
            referral_doc,
            AcceptanceSlip(slip_no, True, "", appointment_at, department_code, bed_no, doctor),
        )

    def reject(self, referral_doc: str, reason: str) -> str:
        slip_no = self.received_doc(referral_doc).slip.slip_no
        return self.write_acceptance(referral_doc, AcceptanceSlip(slip_no, False, reason))

    def write_return(self, referral_doc: str, slip: ReturnSlip, doc_id: str | None = None) -> str:
        return self.write(
            cda.Document(
                doc_id or self._next_id("ZHD"),
                "return",
                slip,
                slip.written_at,
                self.member,
                referral_doc,
            )
        )

    def cancel(
        self, referral_doc: str, reason: str, *, doctor: str = "", doc_id: str | None = None
    ) -> str:
        """The referring doctor withdraws a referral this HIS wrote (撤销转诊), with a reason."""
        slip_no = self._own_slip_no(referral_doc)
        return self.write(
            cda.Document(
                doc_id or self._next_id("CXD"),
                "cancel",
                cda.CancelSlip(slip_no, reason, doctor=doctor),
                datetime.now().astimezone().isoformat(timespec="seconds"),
                self.member,
                referral_doc,
            )
        )

    def write_visit(
        self,
        v: Visit,
        *,
        referral_doc: str = "",
        doc_id: str | None = None,
        encoding: str | None = None,
    ) -> str:
        """The admission office records a visit event (入院/挂号/转科/出院/修改/取消): one visit
        document offered to the node. ``referral_doc``: the referral document this HIS received
        (a referred patient's admission names it, with its slip number)."""
        slip_no = self.received_doc(referral_doc).slip.slip_no if referral_doc else ""
        doc = visit_doc.VisitDoc(
            doc_id or self._next_id(visit_doc.CODE_OF[v.event]),
            v,
            self.member,
            referral_doc=referral_doc,
            slip_no=slip_no,
        )
        raw = visit_doc.write(doc, self.site, encoding or self._setting("encoding") or "UTF-8")
        self.write_raw(doc.doc_id, visit_doc.DOC_TYPE, raw)
        return doc.doc_id

    # -- consultations (远程会诊申请单, 补充资料; consult.xsd) ----------------------------------

    def write_consult(
        self, slip: ConsultSlip, doc_id: str | None = None, encoding: str | None = None
    ) -> str:
        """The inviting doctor asks for a consultation: a ConsultRequest offered to the node."""
        doc = consult_doc.Doc(doc_id or self._next_id("HZSQ"), "consult", slip)
        self.write_raw(
            doc.doc_id,
            "consult",
            consult_doc.write(doc, encoding or self._setting("encoding") or "UTF-8"),
        )
        return doc.doc_id

    def write_records(self, request_doc: str, slip: ResubmitSlip, doc_id: str | None = None) -> str:
        """The records the centre asked for (ConsultRecords naming the request document)."""
        doc = consult_doc.Doc(
            doc_id or self._next_id("HZBC"), "consult-records", slip, consult_doc=request_doc
        )
        self.write_raw(
            doc.doc_id,
            "consult-records",
            consult_doc.write(doc, self._setting("encoding") or "UTF-8"),
        )
        return doc.doc_id

    def cancel_consult(
        self, request_doc: str, slip_no: str, reason: str, doc_id: str | None = None
    ) -> str:
        """The inviting doctor withdraws a request (ConsultCancel naming the request)."""
        doc = consult_doc.Doc(
            doc_id or self._next_id("HZCH"),
            "consult-cancel",
            ConsultCancel(slip_no, reason),
            consult_doc=request_doc,
        )
        self.write_raw(
            doc.doc_id,
            "consult-cancel",
            consult_doc.write(doc, self._setting("encoding") or "UTF-8"),
        )
        return doc.doc_id

    def consult_documents(self, doc_type: str) -> list[consult_doc.Doc]:
        """ConsultStatus (``consult-status``) or ConsultReport (``consult-report``) documents
        the node delivered, in arrival order (each once)."""
        with self._db() as db:
            rows = db.execute(
                "SELECT doc_id, raw FROM inbound WHERE type = ? ORDER BY pos", (doc_type,)
            ).fetchall()
        return [consult_doc.read(bytes(raw), doc_id) for doc_id, raw in rows]

    def _own_slip_no(self, doc_id: str) -> str:
        with self._db() as db:
            row = db.execute(
                "SELECT raw FROM outbound WHERE doc_id = ? ORDER BY seq", (doc_id,)
            ).fetchone()
        if row is None:
            raise KeyError(f"no document {doc_id} written here")
        return cda.read(bytes(row[0]), self.site, record=doc_id).slip.slip_no

    def fail_next(self, n: int, op: str = "") -> None:
        """Answer the next ``n`` calls (of operation ``op`` only, if given) with a Fault."""
        with self._db() as db:
            for key, value in (("fail_next", str(n)), ("fail_op", op)):
                db.execute(
                    "INSERT INTO settings VALUES (?, ?) ON CONFLICT (key) DO "
                    "UPDATE SET value = excluded.value",
                    (key, value),
                )

    # -- what the node wrote in -------------------------------------------------------------

    def received(self, doc_type: str | None = None) -> list[cda.Document]:
        """Documents the node delivered, in arrival order (each once, however often sent)."""
        with self._db() as db:
            rows = db.execute(
                "SELECT doc_id, raw FROM inbound WHERE (? IS NULL AND type NOT IN "
                "('lab-report', 'exam-report', 'consult-status', "
                "'consult-report')) OR type = ? ORDER BY pos",
                (doc_type, doc_type),
            ).fetchall()
        return [
            cda.read(bytes(raw), self.site, record=doc_id, from_node=True) for doc_id, raw in rows
        ]

    def lab_reports(self) -> list[lab_report.LabReportDoc]:
        """Lab reports the node delivered, in arrival order (each version once)."""
        with self._db() as db:
            rows = db.execute(
                "SELECT doc_id, raw FROM inbound WHERE type = 'lab-report' ORDER BY pos"
            ).fetchall()
        return [lab_report.read(bytes(raw), self.site, record=doc_id) for doc_id, raw in rows]

    def exam_reports(self) -> list[exam_report.ExamReportDoc]:
        """Exam (imaging) reports the node delivered, in arrival order (each version once)."""
        with self._db() as db:
            rows = db.execute(
                "SELECT doc_id, raw FROM inbound WHERE type = 'exam-report' ORDER BY pos"
            ).fetchall()
        return [exam_report.read(bytes(raw), self.site, record=doc_id) for doc_id, raw in rows]

    def received_doc(self, doc_id: str) -> cda.Document:
        with self._db() as db:
            row = db.execute("SELECT raw FROM inbound WHERE doc_id = ?", (doc_id,)).fetchone()
        if row is None:
            raise KeyError(f"no received document {doc_id}")
        return cda.read(bytes(row[0]), self.site, record=doc_id, from_node=True)

    def deliveries(self, doc_id: str) -> int:
        """How often the node sent this document (a retry after a lost answer counts)."""
        with self._db() as db:
            row = db.execute("SELECT times FROM inbound WHERE doc_id = ?", (doc_id,)).fetchone()
        return 0 if row is None else int(row[0])

    def pending(self) -> list[tuple[int, str]]:
        with self._db() as db:
            return [
                (int(s), str(d))
                for s, d in db.execute(
                    "SELECT seq, doc_id FROM outbound WHERE acked = 0 ORDER BY seq"
                )
            ]

    def calls(self) -> list[tuple[str, str | None, str]]:
        with self._db() as db:
            return [
                (str(o), d, str(r))
                for o, d, r in db.execute("SELECT op, doc_id, outcome FROM calls ORDER BY id")
            ]

    # -- the web service ----------------------------------------------------------------------

    def handle(self, body: bytes) -> tuple[int, bytes]:
        """One SOAP call: (HTTP status, response envelope)."""
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                op = soap.operation(body, "request")
                name, doc_id = op.tag.split("}")[1], soap.text(op, "DocumentId") or None
                left = int(
                    (
                        db.execute("SELECT value FROM settings WHERE key = 'fail_next'").fetchone()
                        or ("0",)
                    )[0]
                )
                only = (
                    db.execute("SELECT value FROM settings WHERE key = 'fail_op'").fetchone()
                    or ("",)
                )[0]
                if left > 0 and only in ("", name):
                    db.execute(
                        "UPDATE settings SET value = ? WHERE key = 'fail_next'", (str(left - 1),)
                    )
                    db.execute(
                        "INSERT INTO calls (op, doc_id, outcome) VALUES (?, ?, 'fault')",
                        (name, doc_id),
                    )
                    db.execute("COMMIT")
                    return 500, soap.fault("Server", "HIS database busy (simulated)")
                status, answer, log = self._serve(db, op)
            except (BadDocument, KeyError, soap.Fault) as exc:
                db.execute("INSERT INTO calls (op, outcome) VALUES ('?', 'client-fault')")
                db.execute("COMMIT")
                return 500, soap.fault("Client", str(exc)[:300])
            db.execute("INSERT INTO calls (op, doc_id, outcome) VALUES (?, ?, ?)", log)
            db.execute("COMMIT")
            return status, answer

    def _serve(
        self, db: sqlite3.Connection, op: Any
    ) -> tuple[int, bytes, tuple[str, str | None, str]]:
        name = op.tag.split("}")[1]
        if name in soap.TYPE_OF_RECEIVE:
            doc_type, doc_id, raw = soap.read_receive(op)
            doc: Any = (
                lab_report.read(raw, self.site, record=doc_id)
                if doc_type == "lab-report"
                else consult_doc.read(raw, doc_id, expect=doc_type)
                if doc_type in consult_doc.ROOTS
                else exam_report.read(raw, self.site, record=doc_id)
                if doc_type == "exam-report"
                else cda.read(
                    raw,
                    self.site,
                    record=doc_id,
                    expect=doc_type,  # vendor checks
                    from_node=True,
                )
            )
            if doc.doc_id != doc_id:
                raise KeyError(f"DocumentId {doc_id} but the document says {doc.doc_id}")
            digest = hashlib.sha256(raw).hexdigest()
            row = db.execute("SELECT digest FROM inbound WHERE doc_id = ?", (doc_id,)).fetchone()
            if row is not None:
                if row[0] != digest:
                    raise KeyError(f"document {doc_id} received before with other content")
                db.execute("UPDATE inbound SET times = times + 1 WHERE doc_id = ?", (doc_id,))
                return 200, soap.receive_response(doc_id, "duplicate"), (name, doc_id, "duplicate")
            pos = db.execute("SELECT COUNT(*) FROM inbound").fetchone()[0] + 1
            db.execute(
                "INSERT INTO inbound (doc_id, type, raw, digest, received_at, pos) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (doc_id, doc_type, raw, digest, datetime.now().isoformat(), pos),
            )
            return 200, soap.receive_response(doc_id, "stored"), (name, doc_id, "stored")
        if name == "GetPendingDocuments":
            since, most = int(soap.text(op, "Since")), int(soap.text(op, "Max"))
            rows = db.execute(
                "SELECT seq, doc_id, type, raw FROM outbound WHERE acked = 0 AND "
                "seq > ? ORDER BY seq LIMIT ?",
                (since, most),
            ).fetchall()
            docs = [soap.Pending(int(s), str(d), str(t), bytes(r)) for s, d, t, r in rows]
            return 200, soap.pending_response(docs), (name, None, f"{len(docs)} documents")
        if name == "AckDocuments":
            seqs = [int(e.text) for e in op]
            n = 0
            for s in seqs:
                n += db.execute(
                    "UPDATE outbound SET acked = 1 WHERE seq = ? AND acked = 0", (s,)
                ).rowcount
            return 200, soap.ack_response(n), (name, None, f"{n} acked")
        raise KeyError(f"unknown operation {name}")


# -- the server process -------------------------------------------------------------------------


def serve(his: HisWs, host: str, port: int) -> None:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"ok" if self.path == "/health" else b"not found"
            self.send_response(200 if self.path == "/health" else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            status, answer = his.handle(self.rfile.read(length))
            self.send_response(status)
            self.send_header("Content-Type", "text/xml; charset=utf-8")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args: Any) -> None:  # no patient data in logs: keep quiet
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    signal.signal(
        signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start()
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


class HisWsProcess:
    """The simulator as a real process on a free loopback port (for tests and the demo)."""

    def __init__(
        self, db: Path, member: str, *, site_name: str = "", encoding: str = "UTF-8"
    ) -> None:
        self.db = Path(db)
        self.his = HisWs(self.db, member, site_name=site_name, encoding=encoding)
        self.port = free_port_block(1)  # the simulator process binds it
        self.url = f"http://127.0.0.1:{self.port}/his-ws"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> None:
        log = open(self.db.with_suffix(".log"), "ab")  # noqa: SIM115 - child owns it
        try:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "simulators.his_ws",
                    "serve",
                    "--db",
                    str(self.db),
                    "--port",
                    str(self.port),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=Path(__file__).resolve().parents[1],
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"HIS simulator exited ({self.proc.returncode})")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError("HIS simulator did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)


# -- command line -------------------------------------------------------------------------------


def _slip_json(path: str) -> dict[str, Any]:
    return dict(json.loads(Path(path).read_text(encoding="utf-8")))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m simulators.his_ws",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "command",
        choices=[
            "serve",
            "write-referral",
            "write-return",
            "accept",
            "reject",
            "cancel",
            "received",
            "lab-reports",
            "exam-reports",
            "pending",
            "faults",
        ],
    )
    ap.add_argument("--db", required=True)
    ap.add_argument("--member")
    ap.add_argument("--site-name", default="")
    ap.add_argument("--encoding", default="UTF-8")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8600)
    ap.add_argument("--json", help="slip fields as JSON (adapters/slips.py names)")
    ap.add_argument("--doc", help="the referral document an answer is for")
    ap.add_argument("--appointment", default="")
    ap.add_argument("--department", default="")
    ap.add_argument("--bed", default="")
    ap.add_argument("--doctor", default="")
    ap.add_argument("--reason", default="")
    ap.add_argument("--count", type=int, default=1)
    ap.add_argument("--op", default="", help="faults: only this operation (e.g. ReceiveLabReport)")
    a = ap.parse_args(argv)
    his = HisWs(a.db, a.member, site_name=a.site_name, encoding=a.encoding)
    if a.command == "serve":
        serve(his, a.host, a.port)
    elif a.command == "write-referral":
        print(his.write_referral(ReferralSlip(**_slip_json(a.json))))
    elif a.command == "write-return":
        data = _slip_json(a.json)
        data["prescriptions"] = [Prescription(**p) for p in data.get("prescriptions", [])]
        data["results"] = [LabResult(**r) for r in data.get("results", [])]
        print(his.write_return(a.doc, ReturnSlip(**data)))
    elif a.command == "accept":
        print(
            his.accept(
                a.doc,
                appointment_at=a.appointment,
                department_code=a.department,
                bed_no=a.bed,
                doctor=a.doctor,
            )
        )
    elif a.command == "reject":
        print(his.reject(a.doc, a.reason))
    elif a.command == "cancel":
        print(his.cancel(a.doc, a.reason, doctor=a.doctor))
    elif a.command == "lab-reports":
        for r in his.lab_reports():
            print(json.dumps(asdict(r), ensure_ascii=False))
    elif a.command == "exam-reports":
        for e in his.exam_reports():
            print(json.dumps({**asdict(e), "pdf": len(e.pdf)}, ensure_ascii=False))
    elif a.command == "received":
        for d in his.received():
            print(
                json.dumps(
                    {
                        "doc_id": d.doc_id,
                        "type": d.type,
                        "answers": d.referral_doc,
                        "slip": asdict(d.slip),
                    },
                    ensure_ascii=False,
                )
            )
    elif a.command == "pending":
        for seq, doc_id in his.pending():
            print(seq, doc_id)
    elif a.command == "faults":
        his.fail_next(a.count, a.op)
    return 0


if __name__ == "__main__":
    sys.exit(main())
