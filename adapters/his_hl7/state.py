"""What the HL7 HIS adapter remembers, in the node's database (``host.state``, namespaces below).

What the node does not keep for us: the answers given to messages that did not become a
referral step (ADT, refused messages), so a resent MSH-10 gets the same ACK (``answers``); the
patients as the HIS's ADT feed describes them (``patients``: names, ID numbers and phone numbers,
hence in the node's database under its backups and rules, never in a file of the adapter's
own); which slip numbers were taken (duplicate detection) and the referral thread each slip
belongs to on this side (``slips``); the HIS's own patient id for a referral it received (an
ADT naming the referral in the field the ``referral_id_field`` option names,
``referral_visits``), for results sent into the HIS; the content digest last seen under each
control id (MSH-3/4/10, ``controls``), to tell IT when a different message reuses one; the
packets the HIS ACKed (``sent``).

An earlier version kept these in ``<data>/adapters/<name>/his_hl7.sqlite``: :meth:`State.take_file`
moves such a file's rows into the node's database once and deletes the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bridge.local.state import AdapterState, Rows

PATIENT_FIELDS = (
    "name",
    "gender",
    "birth_date",
    "id_number",
    "phone",
    "patient_class",
    "visit_number",
    "admitted_at",
    "discharged_at",
)


class State:
    def __init__(self, store: AdapterState) -> None:
        self.kv = store  # host.state

    # -- answers to messages that did not become a step ---------------------------------------

    def answer(self, source_key: str) -> dict[str, Any] | None:
        return self.kv.get("answers", source_key)

    def remember_answer(
        self,
        source_key: str,
        *,
        ack_code: str,
        field: str | None,
        error_code: str | None,
        message: str | None,
        quarantine_id: int | None,
        at: str,
    ) -> None:
        self.kv.put(
            "answers",
            source_key,
            {
                "source_key": source_key,
                "ack_code": ack_code,
                "field": field,
                "error_code": error_code,
                "message": message,
                "quarantine_id": quarantine_id,
                "at": at,
            },
        )

    def forget_refusal(self, source_key: str) -> None:
        """A replayed message was taken: its earlier refusal is no longer the answer."""
        with self.kv.tx() as kv:
            prior = kv.get("answers", source_key)
            if prior is not None and prior["ack_code"] != "AA":
                kv.delete("answers", source_key)

    # -- control ids ---------------------------------------------------------------------------

    def swap_control(self, control_key: str, digest: str, source_key: str, at: str) -> str | None:
        """Remember the digest seen under a control id; the one seen before (or None)."""
        with self.kv.tx() as kv:
            prior = kv.get("controls", control_key)
            kv.put("controls", control_key, {"digest": digest, "source_key": source_key, "at": at})
        return None if prior is None else str(prior["digest"])

    # -- the HIS's patient index ---------------------------------------------------------------

    def patient(self, mrn: str) -> dict[str, str]:
        row = self.kv.get("patients", mrn)
        if row is None:
            return {}
        return {
            k: row[k]
            for k in ("mrn", "name", "gender", "birth_date", "id_number", "phone")
            if row.get(k)
        }

    def patient_row(self, mrn: str) -> dict[str, Any] | None:
        return self.kv.get("patients", mrn)

    # -- slips and threads ---------------------------------------------------------------------

    def slip(self, slip_no: str, side: str) -> dict[str, Any] | None:
        return self.kv.get("slips", f"{side}:{slip_no}")

    def put_slip(
        self,
        slip_no: str,
        side: str,
        *,
        thread: str | None,
        source_key: str | None,
        mrn: str | None,
    ) -> None:
        self.kv.put(
            "slips",
            f"{side}:{slip_no}",
            {
                "slip_no": slip_no,
                "side": side,
                "thread": thread,
                "source_key": source_key,
                "mrn": mrn,
            },
            thread=thread,
        )

    def set_slip_thread(self, slip_no: str, side: str, thread: str | None) -> None:
        with self.kv.tx() as kv:
            row = kv.get("slips", f"{side}:{slip_no}")
            if row is not None:
                kv.put("slips", f"{side}:{slip_no}", {**row, "thread": thread}, thread=thread)

    def thread_slip(self, thread: str) -> dict[str, Any] | None:
        rows = self.kv.by_thread("slips", thread)
        return rows[0] if rows else None

    def referral_visit(self, thread: str) -> dict[str, Any] | None:
        return self.kv.get("referral_visits", thread)

    # -- what the HIS ACKed ----------------------------------------------------------------------

    def sent(self, packet_id: str) -> bool:
        return self.kv.get("sent", packet_id) is not None

    def mark_sent(self, packet_id: str, thread: str, what: str, at: str) -> bool:
        """True the first time."""
        return bool(
            self.kv.add(
                "sent", packet_id, {"thread": thread, "what": what, "at": at}, thread=thread
            )
        )

    # -- an earlier version's file -----------------------------------------------------------------

    def take_file(self, path: Path) -> int:
        """Move the rows of an earlier version's private SQLite file into the node's database
        (one transaction), then delete the file; the number of rows moved."""
        return self.kv.take_file(path, _move)


def _move(kv: AdapterState, rows: Rows) -> None:
    """``his_hl7.sqlite``'s tables into their namespaces (one row a record)."""
    for r in rows("answers"):
        kv.put("answers", r["source_key"], r)
    for r in rows("patients"):
        kv.put("patients", r["mrn"], r)
    for r in rows("slips"):
        kv.put("slips", f"{r['side']}:{r['slip_no']}", r, thread=r["thread"])
    for r in rows("sent"):
        kv.put(
            "sent",
            r["packet_id"],
            {"thread": r["thread"], "what": r["what"], "at": r["at"]},
            thread=r["thread"],
        )
    for r in rows("controls"):
        kv.put(
            "controls",
            r["control_key"],
            {"digest": r["digest"], "source_key": r["source_key"], "at": r["at"]},
        )
    for r in rows("referral_visits"):
        kv.put("referral_visits", r["thread"], r, thread=r["thread"])
