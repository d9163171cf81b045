"""A vendor HIS that speaks HL7 v2 over MLLP, for tests and the demo.

It is a separate process (``python -m simulators.his_hl7 serve --db his.sqlite --listen
127.0.0.1:2576``) with its own SQLite file: its MLLP listener ACKs REF^I12 / RRI^I12 from the
node's adapter and keeps each message once (by MSH-10) as a slip (a REF^I14 cancellation as
its :class:`~adapters.his_hl7.messages.CancelNote`); ORU^R01 (lab results from
another member) is kept once by MSH-10 as its fields read back (:func:`read_results`; an
imaging report, an ORU whose OBR is followed by a ZDS naming the study, is kept as ``imaging``
and listed by :meth:`VendorHis.imaging_reports`, the PDF's bytes decoded from its OBX ED), and
every message offered is counted per MSH-10 (``attempts``). Doctors' actions are the
Python API (:class:`VendorHis`), which sends REF^I12 / REF^I14 / RRI^I12 / ADT to the adapter's
listener over real MLLP and records what it sent. Faults for retry tests: ``set_mode(nak=N)``
answers the next N messages with AE, ``set_mode(drop=N)`` closes the connection without an answer.

The HL7 layout is the one in :mod:`adapters.his_hl7.messages` (the vendor's interface sheet);
the tests check the slips this HIS stores against the slips the other HIS wrote, field by field,
and the fixtures in ``tests/fixtures/hl7/his/`` pin the bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sqlite3
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from hl7.mllp import start_hl7_server

from adapters.consult_slips import ConsultSlip, ResubmitSlip
from adapters.his_hl7 import consult as hz
from adapters.his_hl7 import messages, v2
from adapters.his_hl7.errors import Hl7DataError
from adapters.hl7v2 import charset, fields
from adapters.hl7v2.ack import Answering, build_ack, encode, read_ack
from adapters.hl7v2.errors import V2Error
from adapters.hl7v2.mllp import Timeouts, send_once, split_addr
from adapters.slips import (
    AcceptanceSlip,
    LabResult,
    Prescription,
    ReferralSlip,
    ReturnSlip,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS received (
    control_id TEXT PRIMARY KEY, what TEXT NOT NULL, thread TEXT, slip_no TEXT,
    slip TEXT NOT NULL, raw BLOB NOT NULL, at TEXT NOT NULL, n INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS sent (
    control_id TEXT PRIMARY KEY, what TEXT NOT NULL, slip_no TEXT, raw BLOB NOT NULL,
    ack_code TEXT, at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS attempts (
    control_id TEXT PRIMARY KEY, n INTEGER NOT NULL, last_code TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS mode (k TEXT PRIMARY KEY, v INTEGER NOT NULL);
INSERT OR IGNORE INTO mode VALUES ('nak', 0), ('drop', 0), ('answered', 0);
"""
OFFSET = timedelta(hours=8)


def _db(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(SCHEMA)
    return conn


@dataclass
class Ack:
    code: str
    control_id: str
    text: str


@dataclass
class Received:
    control_id: str
    what: str  # referral | acceptance | return | cancel | results | imaging
    thread: str
    slip_no: str
    slip: Any


def _slip(what: str, data: dict[str, Any]) -> Any:
    if what in ("results", "imaging", "consult_status", "consult_report"):
        return data
    if what == "cancel":
        return messages.CancelNote(**data)
    if what == "referral":
        return ReferralSlip(**data)
    if what == "acceptance":
        return AcceptanceSlip(**data)
    rx = [Prescription(**p) for p in data.pop("prescriptions")]
    labs = [LabResult(**r) for r in data.pop("results")]
    return ReturnSlip(**data, prescriptions=rx, results=labs)


# -- the listener process -------------------------------------------------------------------


def _attempt(conn: sqlite3.Connection, control_id: str, code: str) -> None:
    conn.execute(
        "INSERT INTO attempts VALUES (?, 1, ?) ON CONFLICT (control_id) DO UPDATE "
        "SET n = n + 1, last_code = excluded.last_code",
        (control_id, code),
    )


def _parts(msg: Any, seg: Any, n: int) -> list[list[str]]:
    """One field as [repetition][component], unescaped ([] when empty)."""
    if not seg[n]:
        return []
    return [
        [fields.unescape(c, seg.d, seg.charset) for c in rep.split(seg.d.component)]
        for rep in seg[n].split(seg.d.repetition)
    ]


def _answer(
    code: str, control: str, at: datetime, cs: charset.Charset | None, error: V2Error | None = None
) -> bytes:
    """This HIS's ACK (the kit's builder: MSA, and ERR naming the field)."""
    return encode(
        build_ack(
            Answering(control_id=control, version="2.5"),
            code,
            at=at,
            error=error,
            app="HIS",
            facility="HIS",
        ),
        cs,
    )


def _first(msg: Any, seg: Any, n: int, component: int = 1) -> str:
    parts = _parts(msg, seg, n)
    return parts[0][component - 1] if parts and len(parts[0]) >= component else ""


def read_results(msg: Any) -> dict[str, Any]:
    """An ORU^R01 as this HIS files it: patient id, referral id, and per OBR its fields, notes,
    OBX lines and specimen (coded fields and values as their components, unescaped)."""
    pid, pv1 = v2.one(msg, "PID"), v2.one(msg, "PV1", required=False)
    out: dict[str, Any] = {
        "mrn": _first(msg, pid, 3),
        "mrn_authority": _first(msg, pid, 3, 4),
        "mrn_type": _first(msg, pid, 3, 5),
        "pid": str(pid),
        "thread": _first(msg, pv1, 5) if pv1 is not None else "",
        "reports": [],
    }
    last: dict[str, Any] = {}
    for seg in msg:
        name = str(seg[0])
        if name == "OBR":
            last = {
                "placer": _first(msg, seg, 2),
                "filler": _first(msg, seg, 3),
                "code": _parts(msg, seg, 4)[0],
                "collected": _first(msg, seg, 7),
                "lab_no": _first(msg, seg, 20),
                "issued": _first(msg, seg, 22),
                "status": _first(msg, seg, 25),
                "notes": [],
                "items": [],
                "specimen": None,
                "accession": _first(msg, seg, 18),
                "modality": _first(msg, seg, 24),
                "study_uid": "",
                "interpreter": _first(msg, seg, 32).partition(seg.d.subcomponent)[2],
            }
            out["reports"].append(last)
        elif name == "ZDS":
            out["reports"][-1]["study_uid"] = _first(msg, seg, 1)
        elif name == "OBX":
            last = {
                "vtype": _first(msg, seg, 2),
                "code": _parts(msg, seg, 3)[0],
                "value": _parts(msg, seg, 5),
                "unit": _parts(msg, seg, 6),
                "range": _first(msg, seg, 7),
                "flags": [r[0] for r in _parts(msg, seg, 8)],
                "status": _first(msg, seg, 11),
                "observed": _first(msg, seg, 14),
                "result_id": _first(msg, seg, 21),
                "lab": _first(msg, seg, 23),
                "notes": [],
            }
            out["reports"][-1]["items"].append(last)
        elif name == "NTE" and last:
            last["notes"].append("\n".join(r[0] for r in _parts(msg, seg, 3)))
        elif name == "SPM":
            out["reports"][-1]["specimen"] = {
                "id": _first(msg, seg, 2),
                "type": _parts(msg, seg, 4)[0],
                "collected": _first(msg, seg, 17),
                "received": _first(msg, seg, 18),
            }
    return out


def take(conn: sqlite3.Connection, raw: bytes) -> bytes | None:
    """One message from the adapter: the ACK bytes, or None to drop the connection."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        modes = dict(conn.execute("SELECT k, v FROM mode").fetchall())
        if modes["drop"] > 0:
            conn.execute("UPDATE mode SET v = v - 1 WHERE k = 'drop'")
            conn.execute("COMMIT")
            return None
        text, codec = charset.decode(raw)
        msg = v2.parse(text, codec)
        oru = v2.get(msg, msg.segment("MSH"), 9, 1) == "ORU"
        inbound = None if oru else messages.read(text, codec)
        control = inbound.control_id if inbound is not None else v2.get(msg, msg.segment("MSH"), 10)
        now = datetime.now(UTC)
        answer = _answer
        if modes["nak"] > 0:
            conn.execute("UPDATE mode SET v = v - 1 WHERE k = 'nak'")
            _attempt(conn, control, "AE")
            conn.execute("COMMIT")
            return answer("AE", control, now, codec, Hl7DataError("simulated NAK", hl7_error="207"))
        _attempt(conn, control, "AA")
        if inbound is None:
            data = read_results(msg)
            imaging = bool(msg.segments("ZDS"))
            what = (
                "imaging"
                if imaging
                else "consult_report"
                if data["reports"] and data["reports"][0]["code"][0] == hz.CONSULT_NOTE
                else "results"
            )
            n = conn.execute("SELECT COUNT(*) FROM received").fetchone()[0]
            conn.execute(
                "INSERT OR IGNORE INTO received VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    control,
                    what,
                    data["thread"],
                    data["reports"][0]["placer"] if data["reports"] else "",
                    json.dumps(data, ensure_ascii=False),
                    raw,
                    now.isoformat(),
                    n,
                ),
            )
            conn.execute("UPDATE mode SET v = v + 1 WHERE k = 'answered'")
            conn.execute("COMMIT")
            return answer("AA", control, now, codec)
        if inbound.what == "referral":
            slip: Any = messages.referral_slip(inbound.msg, {}, OFFSET, from_alliance=True)
        elif inbound.what == "acceptance":
            slip = messages.acceptance_slip(inbound.msg, OFFSET)
        elif inbound.what == "return":
            slip = messages.return_slip(inbound.msg, OFFSET)
        elif inbound.what == "cancel":
            slip = messages.cancel_note(inbound.msg, OFFSET)
        elif inbound.what == "consult_status":
            slip = hz.read_status(inbound.msg)
        else:
            raise Hl7DataError(
                "this HIS takes REF^I12, REF^I14, RRI^I12 and ORU^R01 only",
                field="MSH-9",
                hl7_error="200",
            )
        n = conn.execute("SELECT COUNT(*) FROM received").fetchone()[0]
        conn.execute(
            "INSERT OR IGNORE INTO received VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                inbound.control_id,
                inbound.what,
                inbound.thread,
                inbound.slip_no,
                json.dumps(slip if isinstance(slip, dict) else asdict(slip), ensure_ascii=False),
                raw,
                now.isoformat(),
                n,
            ),
        )
        conn.execute("UPDATE mode SET v = v + 1 WHERE k = 'answered'")
        conn.execute("COMMIT")
        return answer("AA", inbound.control_id, now, codec)
    except V2Error as exc:
        conn.execute("ROLLBACK")
        return _answer(exc.ack_code, "?", datetime.now(UTC), None, exc)


async def serve(db: Path, listen: str) -> None:
    conn = _db(db)
    host, port = split_addr(listen)

    async def client(reader: Any, writer: Any) -> None:
        try:
            while True:
                try:
                    raw = await reader.readblock()
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                answer = take(conn, bytes(raw))
                if answer is None:
                    return  # simulated drop: close without an ACK
                writer.writeblock(answer)
                await writer.drain()
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    server = await start_hl7_server(client, host, port, limit=16 * 1024 * 1024)
    async with server:
        await server.serve_forever()


# -- the doctors' side (tests call this) ------------------------------------------------------


class VendorHis:
    """The HIS's own file plus its outbound MLLP to the adapter's listener."""

    def __init__(
        self,
        db: Path,
        adapter: str,
        *,
        application: str = "YTHIS",
        facility: str = "yuetan-his",
        charset_name: str = "UNICODE UTF-8",
    ) -> None:
        self.db = db
        self.adapter = split_addr(adapter)
        self.header = messages.Header(application, facility, "HUTONG", "", charset_name)
        self.codec = charset.lookup(charset_name)
        _db(db).close()

    def _conn(self) -> sqlite3.Connection:
        return _db(self.db)

    def send_raw(self, raw: bytes, what: str = "raw", slip_no: str = "") -> Ack:
        answer = send_once(*self.adapter, raw, Timeouts(ack_s=60))
        code, control, text = read_ack(answer)
        try:
            msg_control = messages.read(*charset.decode(raw)).control_id
        except V2Error:  # a bad message sent on purpose
            msg_control = control
        with contextlib.closing(self._conn()) as conn:
            conn.execute(
                "INSERT OR REPLACE INTO sent VALUES (?, ?, ?, ?, ?, ?)",
                (msg_control, what, slip_no, raw, code, datetime.now(UTC).isoformat()),
            )
        return Ack(code, control, text)

    def _send(self, text: str, what: str, slip_no: str) -> Ack:
        return self.send_raw(charset.encode(text, self.codec), what, slip_no)

    def refer(self, slip: ReferralSlip, control_id: str | None = None) -> Ack:
        text = messages.referral_message(
            self.header, slip, control_id or v2.control_id(), datetime.now(UTC)
        )
        return self._send(text, "referral", slip.slip_no)

    def accept(self, slip: AcceptanceSlip, thread: str, control_id: str | None = None) -> Ack:
        text = messages.acceptance_message(
            self.header, slip, control_id or v2.control_id(), datetime.now(UTC), thread=thread
        )
        return self._send(text, "acceptance", slip.slip_no)

    def write_return(self, slip: ReturnSlip, thread: str, control_id: str | None = None) -> Ack:
        text = messages.return_message(
            self.header, slip, control_id or v2.control_id(), datetime.now(UTC), thread=thread
        )
        return self._send(text, "return", slip.slip_no)

    def cancel(
        self,
        slip_no: str,
        reason: str,
        *,
        thread: str = "",
        mrn: str = "",
        cancelled_at: str = "",
        control_id: str | None = None,
    ) -> Ack:
        """The referring doctor withdraws a referral this HIS sent (REF^I14)."""
        note = messages.CancelNote(
            slip_no=slip_no, reason=reason, cancelled_at=cancelled_at, thread=thread
        )
        text = messages.cancel_message(
            self.header, note, control_id or v2.control_id(), datetime.now(UTC), mrn=mrn
        )
        return self._send(text, "cancel", slip_no)

    def consult(self, slip: ConsultSlip, control_id: str | None = None) -> Ack:
        """The inviting doctor asks for a consultation (REF^I12, RF1-3 HTCONSULT)."""
        text = hz.request_message(
            self.header, slip, control_id or v2.control_id(), datetime.now(UTC)
        )
        return self._send(text, "consult", slip.slip_no)

    def resubmit(self, slip: ResubmitSlip, thread: str = "", control_id: str | None = None) -> Ack:
        """The records the centre asked for (REF^I13)."""
        text = hz.resubmit_message(
            self.header, slip, control_id or v2.control_id(), datetime.now(UTC), thread=thread
        )
        return self._send(text, "consult_resubmit", slip.slip_no)

    def adt(
        self,
        event: str,
        mrn: str,
        *,
        name: str = "",
        gender: str = "",
        birth_date: str = "",
        phone: str = "",
        id_number: str = "",
        referral_id: str = "",
        patient_class: str = "O",
        control_id: str | None = None,
    ) -> Ack:
        patient = {
            "name": name,
            "gender": gender,
            "birth_date": birth_date,
            "phone": phone,
            "id_number": id_number,
        }
        text = v2.message(
            [
                messages._msh(
                    self.header, "ADT", event, control_id or v2.control_id(), datetime.now(UTC)
                ),
                v2.segment("EVN", event, v2.ts(datetime.now(UTC))),
                messages._pid(mrn, patient, self.header.sending_app),
                # the alliance referral id in PV1-50 (alternate visit id): the adapter's
                # referral_id_field option names it; PV1-5 is the HIS's own preadmit number
                v2.segment("PV1", "1", patient_class, *[""] * 47, v2.esc(referral_id)),
            ]
        )
        return self._send(text, f"adt-{event}", "")

    def received(self, what: str | None = None) -> list[Received]:
        with contextlib.closing(self._conn()) as conn:
            rows = conn.execute(
                "SELECT control_id, what, thread, slip_no, slip FROM received ORDER BY n"
            ).fetchall()
        return [
            Received(c, w, t or "", s or "", _slip(w, json.loads(j)))
            for c, w, t, s, j in rows
            if what is None or w == what
        ]

    def set_mode(self, *, nak: int = 0, drop: int = 0) -> None:
        with contextlib.closing(self._conn()) as conn:
            conn.execute("UPDATE mode SET v = ? WHERE k = 'nak'", (nak,))
            conn.execute("UPDATE mode SET v = ? WHERE k = 'drop'", (drop,))

    def results(self) -> list[tuple[str, dict[str, Any], bytes]]:
        """(MSH-10, the ORU as filed, its bytes) for every ORU^R01 kept, in arrival order."""
        with contextlib.closing(self._conn()) as conn:
            rows = conn.execute(
                "SELECT control_id, slip, raw FROM received WHERE what = 'results' ORDER BY n"
            ).fetchall()
        return [(c, json.loads(j), bytes(raw)) for c, j, raw in rows]

    def imaging_reports(self) -> list[tuple[str, dict[str, Any], bytes]]:
        """(MSH-10, the imaging ORU as filed, its bytes) for every one kept, in arrival order."""
        with contextlib.closing(self._conn()) as conn:
            rows = conn.execute(
                "SELECT control_id, slip, raw FROM received WHERE what = 'imaging' ORDER BY n"
            ).fetchall()
        return [(c, json.loads(j), bytes(raw)) for c, j, raw in rows]

    def attempts(self) -> dict[str, tuple[int, str]]:
        """MSH-10 -> (how often it was offered, the last answer)."""
        with contextlib.closing(self._conn()) as conn:
            return {c: (n, code) for c, n, code in conn.execute("SELECT * FROM attempts")}

    def mode(self) -> dict[str, int]:
        with contextlib.closing(self._conn()) as conn:
            return dict(conn.execute("SELECT k, v FROM mode").fetchall())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m simulators.his_hl7", description="A vendor HIS speaking HL7 v2 over MLLP"
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run the HIS's MLLP listener")
    s.add_argument("--db", required=True, type=Path)
    s.add_argument("--listen", required=True)
    ls = sub.add_parser("list", help="print what the HIS received (JSON lines)")
    ls.add_argument("--db", required=True, type=Path)
    args = p.parse_args(argv)
    if args.cmd == "serve":
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve(args.db, args.listen))
        return 0
    his = VendorHis(args.db, "127.0.0.1:1")
    for r in his.received():
        print(
            json.dumps(
                {
                    "control_id": r.control_id,
                    "what": r.what,
                    "thread": r.thread,
                    "slip": r.slip if isinstance(r.slip, dict) else asdict(r.slip),
                },
                ensure_ascii=False,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
