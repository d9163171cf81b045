"""The adapter's own memory of documents: which thread each belongs to and what it held.

Kept in the node's database (``host.state``, :mod:`bridge.local.state`), under the node's
backups: a restored node still knows which HIS document belongs to which referral. It links the
HIS's document ids to referral threads both ways (a referral document pulled from the HIS, or
one the node wrote into it under the packet id), and keeps the SHA-256 of every document taken,
so a second document under a taken id is told apart from a harmless re-pull. Exactly-once intake
itself is the node's (``host.submit_referral`` with the source key); this only answers "which
thread?" and "same content?". Namespaces: ``documents`` (doc id -> direction, type, thread,
digest), ``report_versions`` (report id + packet id -> version), ``report_latest`` (report id
-> highest version), ``results_written`` (packet ids whose every report the HIS answered OK).

An earlier version kept these in ``<data>/adapters/<name>/documents.sqlite``:
:meth:`Ledger.take_file` moves such a file's rows in once and deletes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bridge.local.state import AdapterState, Rows


class Ledger:
    def __init__(self, kv: AdapterState) -> None:
        self.kv = kv  # host.state

    def digest(self, doc_id: str) -> str | None:
        row = self.kv.get("documents", doc_id)
        return None if row is None else str(row["digest"])

    def remember(
        self, doc_id: str, direction: str, doc_type: str, thread: str | None, digest: str
    ) -> None:
        with self.kv.tx() as kv:
            prior = kv.get("documents", doc_id)
            if prior is not None:  # the first direction and type stay; a known thread stays
                direction, doc_type = prior["direction"], prior["type"]
                thread = thread or prior["thread"]
            kv.put(
                "documents",
                doc_id,
                {"direction": direction, "type": doc_type, "thread": thread, "digest": digest},
                thread=thread,
            )

    def thread_of(self, doc_id: str) -> str | None:
        row = self.kv.get("documents", doc_id)
        return None if row is None else row["thread"]

    def referral_doc(self, thread: str, doc_type: str = "referral") -> str | None:
        """The referral document of a thread as the HIS knows it (its own id or ours); with
        ``doc_type="consult"`` the consultation request (远程会诊申请单) of a consultation
        thread."""
        for key, row in self.kv.by_thread_keys("documents", thread):
            if row["type"] == doc_type:
                return str(key)
        return None

    def report_version(self, report_id: str, packet_id: str) -> int:
        """The version of a report as ``packet_id`` carries it: the next free number the first
        time, the same number on every redelivery of that packet."""
        with self.kv.tx() as kv:
            known = kv.get("report_versions", f"{report_id}\n{packet_id}")
            if known is not None:
                return int(known["version"])
            latest = kv.get("report_latest", report_id)
            version = (int(latest["version"]) if latest else 0) + 1
            kv.put("report_versions", f"{report_id}\n{packet_id}", {"version": version})
            kv.put("report_latest", report_id, {"version": version})
        return version

    def results_written(self, packet_id: str) -> bool:
        return self.kv.get("results_written", packet_id) is not None

    def mark_results_written(self, packet_id: str) -> bool:
        """True the first time (the caller then counts the packet's mapping gaps)."""
        return bool(self.kv.add("results_written", packet_id, {}))

    def close(self) -> None:
        pass

    def take_file(self, path: Path) -> int:
        """Move an earlier version's ``documents.sqlite`` into the node's database (one
        transaction), then delete the file; the number of rows moved."""
        return self.kv.take_file(path, _move)


def _move(kv: AdapterState, rows: Rows) -> None:
    """``documents.sqlite``'s tables into their namespaces; ``report_latest`` is derived."""
    for r in rows("documents"):
        kv.put(
            "documents",
            r["doc_id"],
            {
                "direction": r["direction"],
                "type": r["type"],
                "thread": r["thread"],
                "digest": r["digest"],
            },
            thread=r["thread"],
        )
    latest: dict[str, int] = {}
    for r in rows("report_versions"):
        kv.put("report_versions", f"{r['report_id']}\n{r['packet_id']}", {"version": r["version"]})
        latest[r["report_id"]] = max(latest.get(r["report_id"], 0), r["version"])
    for report_id, version in latest.items():
        kv.put("report_latest", report_id, {"version": version})
    for r in rows("results_written"):
        kv.put("results_written", r["packet_id"], {})
