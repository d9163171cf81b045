"""DICOM Part-10 files on disk, one per SOP instance: ``<root>/<study>/<series>/<sop>.dcm``.

A file is written exactly as received (preamble, File Meta Information as pynetdicom builds it
from the presentation context, then the data set bytes as the peer encoded them), atomically
and synced before the C-STORE is answered: commit, then acknowledge.
"""

from __future__ import annotations

import os
import re
import struct
import zlib
from io import BytesIO
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from adapters.pacs.errors import DicomRejected
from bridge.errors import UnsafePath

#: PS3.5 9.1: digits in dot-separated components, at most 64 characters. A UID becomes a file
#: or folder name: nothing else passes. A component with a leading zero (not allowed by 9.1) is
#: taken: real PACS write them, and such a name is as safe as any.
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


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
    except (InvalidDicomError, EOFError, ValueError, TypeError, KeyError, RecursionError) as exc:
        raise DicomRejected(f"not a readable DICOM file ({type(exc).__name__})") from None


#: explicit-VR VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2)
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_UNDEFINED = 0xFFFFFFFF
_PIXEL_DATA = 0x7FE00010


def check_structure(
    raw: bytes,
    *,
    implicit: bool,
    little: bool,
    deflated: bool,
    max_depth: int,
    max_bytes: int,
    record: str,
) -> int:
    """Walk an encoded data set's elements without recursion and without decoding values:
    refuse (DicomRejected) sequences nested deeper than ``max_depth`` before pydicom (which
    recurses) reads it. Returns the deepest nesting seen. A structure that stops holding
    together ends the walk there: whether the bytes are readable DICOM is pydicom's call
    (``read_header``), as before; this only bounds the nesting.

    Deflated data sets are inflated with ``max_bytes`` as the ceiling. Implicit-VR sequences are
    told by the data dictionary or by an undefined length; an explicit ``UN`` of undefined length
    holds implicit-VR items (PS3.5 6.2.2), as pydicom reads it.
    """
    if deflated:
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        try:
            raw = inflater.decompress(raw, max_bytes + 1)
        except zlib.error:
            raise DicomRejected(f"instance {record}: deflated data set does not inflate") from None
        if len(raw) > max_bytes:
            raise DicomRejected(
                f"instance {record}: data set inflates to over {max_bytes} "
                "bytes (options.max_dataset_bytes)"
            )
    from pydicom.datadict import dictionary_VR

    end = len(raw)
    u16, u32 = ("<H", "<I") if little else (">H", ">I")
    # frames: [end offset or None (undefined), is_sequence, implicit]
    stack: list[tuple[int | None, bool, bool]] = []
    depth = deepest = 0
    pos = 0
    try:  # _Broken: stop walking, leave the verdict to pydicom
        while True:
            while stack and stack[-1][0] is not None and pos >= stack[-1][0]:
                if pos > stack[-1][0]:  # type: ignore[operator]
                    raise _Broken()
                if stack.pop()[1]:
                    depth -= 1
            if pos >= end:
                break
            cur_implicit = stack[-1][2] if stack else implicit
            group, elem = struct.unpack_from(u16 + u16[1:], raw, pos)
            if group == 0xFFFE:
                length = struct.unpack_from(u32, raw, pos + 4)[0]
                pos += 8
                if elem == 0xE000:  # an item: its own data set
                    if not stack or not stack[-1][1]:
                        raise _Broken()
                    stack.append(
                        (None if length == _UNDEFINED else pos + length, False, cur_implicit)
                    )
                elif elem == 0xE00D:  # item delimiter
                    if not stack or stack[-1][1] or stack[-1][0] is not None:
                        raise _Broken()
                    stack.pop()
                elif elem == 0xE0DD:  # sequence delimiter
                    if not stack or not stack[-1][1] or stack[-1][0] is not None:
                        raise _Broken()
                    stack.pop()
                    depth -= 1
                else:
                    raise _Broken()
                continue
            tag = (group << 16) | elem
            if cur_implicit:
                length = struct.unpack_from(u32, raw, pos + 4)[0]
                pos += 8
                try:
                    vr = dictionary_VR(tag)
                except KeyError:
                    vr = "UN"
                is_seq = vr == "SQ" or (length == _UNDEFINED and tag != _PIXEL_DATA)
                inner_implicit = True
            else:
                vr_b = raw[pos + 4 : pos + 6]
                if vr_b in _LONG_VRS:
                    length = struct.unpack_from(u32, raw, pos + 8)[0]
                    pos += 12
                else:
                    length = struct.unpack_from(u16, raw, pos + 6)[0]
                    pos += 8
                is_seq = vr_b == b"SQ" or (vr_b == b"UN" and length == _UNDEFINED)
                inner_implicit = vr_b == b"UN"
            if is_seq:
                depth += 1
                deepest = max(deepest, depth)
                if depth > max_depth:
                    raise DicomRejected(
                        f"instance {record}: sequences nested deeper than "
                        f"{max_depth} (options.max_sequence_depth)"
                    )
                stack.append((None if length == _UNDEFINED else pos + length, True, inner_implicit))
                continue
            if length == _UNDEFINED:  # encapsulated pixel data: fragments, then a delimiter
                while True:
                    g, e = struct.unpack_from(u16 + u16[1:], raw, pos)
                    flen = struct.unpack_from(u32, raw, pos + 4)[0]
                    pos += 8
                    if (g, e) == (0xFFFE, 0xE0DD):
                        break
                    if (g, e) != (0xFFFE, 0xE000) or flen == _UNDEFINED:
                        raise _Broken()
                    pos += flen
                    if pos > end:
                        raise _Broken()
                continue
            pos += length
            if pos > end:
                raise _Broken()
    except (struct.error, _Broken):
        pass
    return deepest


class _Broken(Exception):
    """The walk cannot go on (see ``check_structure``)."""


class InstanceStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, study: str, series: str, sop: str) -> Path:
        for field, uid in (
            ("StudyInstanceUID", study),
            ("SeriesInstanceUID", series),
            ("SOPInstanceUID", sop),
        ):
            path_uid(uid, field=field)
        return self.root / study / series / f"{sop}.dcm"

    def _folder(self, study: str, series: str) -> Path:
        """``<root>/<study>/<series>``, made if missing, refused if any part of it is a symlink
        or resolves anywhere but inside the root."""
        root = self.root.resolve(strict=True)
        folder = root / study / series
        for part in (root / study, folder):
            if part.is_symlink():
                raise UnsafePath(
                    f"{part.relative_to(root)} under {self.root.name}/ is a symbolic link"
                )
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
