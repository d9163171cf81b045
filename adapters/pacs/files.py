"""DICOM Part-10 files on disk, one per SOP instance: ``<root>/<study>/<series>/<sop>.dcm``.

A file is written exactly as received (preamble, File Meta Information as pynetdicom builds it
from the presentation context, then the data set bytes as the peer encoded them), atomically
and synced before the C-STORE is answered: commit, then acknowledge.
"""

from __future__ import annotations

import os
import re
from io import BytesIO
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from adapters.pacs.errors import DicomRejected

_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


def check_uid(value: object, *, record: str, field: str) -> str:
    text = str(value or "").strip()
    if not text:
        raise DicomRejected(f"instance {record}: {field} is missing")
    if len(text) > 64 or not _UID.fullmatch(text):
        raise DicomRejected(f"instance {record}: {field} is not a DICOM UID")
    return text


def read_header(source: bytes | Path) -> Dataset:
    """The data set without pixel data; raises DicomRejected if the bytes are not DICOM."""
    try:
        if isinstance(source, bytes):
            return dcmread(BytesIO(source), stop_before_pixels=True)
        return dcmread(source, stop_before_pixels=True)
    except (InvalidDicomError, EOFError, ValueError, TypeError, KeyError) as exc:
        raise DicomRejected(f"not a readable DICOM file ({type(exc).__name__})") from None


class InstanceStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, study: str, series: str, sop: str) -> Path:
        return self.root / study / series / f"{sop}.dcm"

    def write(self, study: str, series: str, sop: str, data: bytes) -> Path:
        final = self.path(study, series, sop)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(fd)  # the rename itself reaches the disk before we acknowledge
        finally:
            os.close(fd)
        return final

    def study_files(self, study: str) -> list[Path]:
        folder = self.root / study
        return sorted(folder.glob("*/*.dcm")) if folder.is_dir() else []

    def studies(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _UID.fullmatch(p.name))
