"""A vendor PACS: a pynetdicom AE serving its own folder of DICOM Part-10 files.

What it does, as a departmental PACS would:

* Storage SCP: every C-STORE is written to ``<folder>/<SOP Instance UID>.dcm`` exactly as
  received (``event.encoded_dataset()``), synced, then answered;
* Study Root C-FIND SCP at STUDY (by PatientID, StudyDate or a range ``A-B``, StudyInstanceUID),
  SERIES and IMAGE level, with the computed counts (NumberOfStudyRelated*, ModalitiesInStudy);
* Study Root C-GET SCP: the instances of a study (or series/instance) back over the same
  association; C-ECHO.

CLI (real processes in tests and the demo)::

    python -m simulators.pacs serve --dir pacs/ --port 11113 [--ae VENDORPACS]
    python -m simulators.pacs push --dir files/ [--study UID] --to 127.0.0.1:11112 \
        [--called-ae HUTONG] [--ae MODALITY]

``serve`` prints ``READY <port>`` once listening and runs until SIGTERM. ``push`` sends each
file's data set bytes unchanged (read in chunks from the file, on a presentation context with
the file's own transfer syntax), prints a JSON summary and exits 1 if any store failed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, _config, evt
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    Verification,
)

STUDY_KEYS = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyDescription",
    "StudyInstanceUID",
    "OtherPatientIDsSequence",
)
SERIES_KEYS = (
    "SeriesInstanceUID",
    "Modality",
    "SeriesNumber",
    "SeriesDescription",
    "BodyPartExamined",
)


class Archive:
    """The PACS's files and an index of their headers (kept in step with every store)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.index: dict[str, tuple[Path, Dataset]] = {}
        for p in sorted(folder.glob("*.dcm")):
            ds = dcmread(p, stop_before_pixels=True)
            self.index[str(ds.SOPInstanceUID)] = (p, ds)

    def add(self, sop: str, data: bytes) -> None:
        path = self.folder / f"{sop}.dcm"
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        with self.lock:
            self.index[sop] = (path, dcmread(path, stop_before_pixels=True))

    def headers(self) -> list[tuple[Path, Dataset]]:
        with self.lock:
            return list(self.index.values())


def _matches(ds: Dataset, query: Dataset, keyword: str) -> bool:
    wanted = str(query.get(keyword) or "").strip()
    if not wanted or wanted == "*":
        return True
    have = str(ds.get(keyword) or "").strip()
    if keyword.endswith("Date") and "-" in wanted:
        low, high = wanted.split("-", 1)
        return (not low or have >= low) and (not high or have <= high)
    if "\\" in wanted:
        return have in wanted.split("\\")
    if wanted.endswith("*"):
        return have.startswith(wanted[:-1])
    return have == wanted


def _copy(src: Dataset, dst: Dataset, keywords: tuple[str, ...], query: Dataset) -> None:
    for kw in keywords:
        if kw in query and kw in src:
            setattr(dst, kw, src.get(kw))
        elif kw in query:
            setattr(dst, kw, query.get(kw))


class VendorPacs:
    def __init__(self, folder: Path, ae_title: str = "VENDORPACS") -> None:
        self.archive = Archive(folder)
        self.ae = AE(ae_title=ae_title)
        for cx in StoragePresentationContexts:
            self.ae.add_supported_context(
                cx.abstract_syntax, ALL_TRANSFER_SYNTAXES, scp_role=True, scu_role=True
            )
        self.ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        self.ae.add_supported_context(StudyRootQueryRetrieveInformationModelGet)
        self.ae.add_supported_context(Verification)
        self.server: Any = None

    def start(self, host: str, port: int) -> int:
        self.server = self.ae.start_server(
            (host, port),
            block=False,
            evt_handlers=[
                (evt.EVT_C_STORE, self.on_store),
                (evt.EVT_C_FIND, self.on_find),
                (evt.EVT_C_GET, self.on_get),
            ],
        )
        return int(self.server.server_address[1])

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    def on_store(self, event: Any) -> int:
        try:
            self.archive.add(str(event.request.AffectedSOPInstanceUID), event.encoded_dataset())
        except OSError:
            return 0xA700
        return 0x0000

    def _select(self, query: Dataset) -> list[tuple[Path, Dataset]]:
        keys = (
            "PatientID",
            "StudyDate",
            "StudyInstanceUID",
            "SeriesInstanceUID",
            "SOPInstanceUID",
            "AccessionNumber",
        )
        return [
            (p, ds) for p, ds in self.archive.headers() if all(_matches(ds, query, k) for k in keys)
        ]

    def on_find(self, event: Any) -> Iterator[tuple[int, Dataset | None]]:
        query = event.identifier
        level = str(query.get("QueryRetrieveLevel") or "")
        found = self._select(query)
        groups: dict[str, list[Dataset]] = {}
        key = {"STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID"}.get(
            level, "SOPInstanceUID"
        )
        if level not in ("STUDY", "SERIES", "IMAGE"):
            yield 0xC000, None
            return
        for _, ds in found:
            groups.setdefault(str(ds.get(key)), []).append(ds)
        for members in groups.values():
            if event.is_cancelled:
                yield 0xFE00, None
                return
            first, out = members[0], Dataset()
            out.QueryRetrieveLevel = level
            if level == "STUDY":
                _copy(first, out, STUDY_KEYS, query)
                if "ModalitiesInStudy" in query:
                    out.ModalitiesInStudy = sorted({str(m.Modality) for m in members})
                if "NumberOfStudyRelatedSeries" in query:
                    out.NumberOfStudyRelatedSeries = len(
                        {str(m.SeriesInstanceUID) for m in members}
                    )
                if "NumberOfStudyRelatedInstances" in query:
                    out.NumberOfStudyRelatedInstances = len(members)
            elif level == "SERIES":
                out.StudyInstanceUID = first.StudyInstanceUID
                _copy(first, out, SERIES_KEYS, query)
                if "NumberOfSeriesRelatedInstances" in query:
                    out.NumberOfSeriesRelatedInstances = len(members)
            else:
                out.StudyInstanceUID = first.StudyInstanceUID
                out.SeriesInstanceUID = first.SeriesInstanceUID
                out.SOPInstanceUID = first.SOPInstanceUID
                out.SOPClassUID = first.SOPClassUID
            yield 0xFF00, out

    def on_get(self, event: Any) -> Iterator[Any]:
        found = self._select(event.identifier)
        yield len(found)
        for path, _ in found:
            if event.is_cancelled:
                yield 0xFE00, None
                return
            yield 0xFF00, dcmread(path)


def push(files: list[Path], host: str, port: int, called: str, calling: str) -> dict[str, Any]:
    """C-STORE files unchanged: one exact-syntax context per (SOP class, transfer syntax)."""
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes, never re-encode
    ae = AE(ae_title=calling)
    metas = {f: dcmread(f, stop_before_pixels=True).file_meta for f in files}
    for pair in sorted(
        {(str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID)) for m in metas.values()}
    ):
        ae.add_requested_context(pair[0], pair[1])
    assoc = ae.associate(host, port, ae_title=called)
    if not assoc.is_established:
        return {"sent": 0, "failed": len(files), "error": "association not established"}
    statuses = []
    try:
        for f in files:
            status = assoc.send_c_store(f)
            statuses.append(int(status.Status) if status and "Status" in status else None)
    finally:
        assoc.release()
    return {
        "sent": sum(1 for s in statuses if s == 0),
        "failed": sum(1 for s in statuses if s != 0),
        "statuses": statuses,
    }


def study_files(folder: Path, study: str | None) -> list[Path]:
    files = sorted(folder.glob("*.dcm"))
    if study is None:
        return files
    return [f for f in files if str(dcmread(f, stop_before_pixels=True).StudyInstanceUID) == study]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m simulators.pacs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--dir", type=Path, required=True)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=11113)
    s.add_argument("--ae", default="VENDORPACS")
    p = sub.add_parser("push")
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--study")
    p.add_argument("--to", required=True, help="host:port of the Store SCP")
    p.add_argument("--called-ae", default="HUTONG")
    p.add_argument("--ae", default="VENDORPACS")
    args = ap.parse_args(argv)
    if args.cmd == "serve":
        pacs = VendorPacs(args.dir, args.ae)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        port = pacs.start(args.host, args.port)
        print(f"READY {port}", flush=True)
        stop.wait()
        pacs.stop()
        return 0
    host, port = args.to.rsplit(":", 1)
    result = push(study_files(args.dir, args.study), host, int(port), args.called_ae, args.ae)
    print(json.dumps(result), flush=True)
    return 0 if result["failed"] == 0 and result["sent"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
