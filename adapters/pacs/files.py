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
from bridge.errors import UnsafePath

#: PS3.5 9.1: digits in dot-separated components, no leading zero unless the component is
#: "0", at most 64 characters. A UID becomes a file or folder name: nothing else passes.
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


def is_uid(value: object) -> bool:
    return isinstance(value, str) and len(value) <= 64 and _UID.fullmatch(value) is not None


def check_uid(value: object, *, record: str, field: str) -> str:
    text = str(value or "").strip()
    if not text:
        raise DicomRejected(f"instance {record}: {field} is missing")
    if not is_uid(text):
        raise DicomRejected(f"instance {record}: {field} is not a DICOM UID")
    return text


def path_uid(value: object, *, field: str) -> str:
    """A UID from a peer that will name a file or folder: UnsafePath unless it is one (the
    value itself is not echoed: it is the peer's, and may be anything)."""
    if not is_uid(value):
        raise UnsafePath(f"{field} is not a DICOM UID (PS3.5 9.1); it would name a path")
    return str(value)


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
        for field, uid in (("StudyInstanceUID", study), ("SeriesInstanceUID", series),
                           ("SOPInstanceUID", sop)):
            path_uid(uid, field=field)
        return self.root / study / series / f"{sop}.dcm"

    def _folder(self, study: str, series: str) -> Path:
        """``<root>/<study>/<series>``, made if missing, refused if any part of it is a symlink
        or resolves anywhere but inside the root."""
        root = self.root.resolve(strict=True)
        folder = root / study / series
        for part in (root / study, folder):
            if part.is_symlink():
                raise UnsafePath(f"{part.relative_to(root)} under {self.root.name}/ is a "
                                 "symbolic link")
        folder.mkdir(parents=True, exist_ok=True)
        if folder.resolve(strict=True) != folder or not folder.is_relative_to(root):
            raise UnsafePath(f"a folder for an instance leaves {self.root.name}/")
        return folder

    def write(self, study: str, series: str, sop: str, data: bytes) -> Path:
        self.path(study, series, sop)  # every UID checked before anything touches the disk
        folder = self._folder(study, series)
        final = folder / f"{sop}.dcm"
        if final.is_symlink():
            raise UnsafePath(f"the file for instance {sop} is a symbolic link")
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o666)
        with open(fd, "wb") as fh:
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
        if not is_uid(study):  # never a glob outside the root (a peer's fetch request)
            return []
        folder = self.root / study
        return sorted(folder.glob("*/*.dcm")) if folder.is_dir() else []

    def studies(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _UID.fullmatch(p.name))
