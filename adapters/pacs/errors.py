"""The PACS adapter's errors, in the one tree (``bridge/errors.py``).

    DicomRejected      HT-DICOM-REJECTED   (permanent) an object we cannot take: names the
                                           instance and the attribute; quarantined
    PacsUnavailable    HT-PACS-UNAVAILABLE (transient) association refused, aborted or timed out
    PacsFailed         HT-PACS-FAILED      (permanent) the peer answered a DIMSE failure status
    FetchFailed        HT-IMAGING-FETCH    (permanent) a fetch response we cannot use
    ReportRejected     HT-REPORT-REJECTED  (permanent) a radiology report we cannot read (HL7 ORU)

pynetdicom reports failure as values (an unestablished association, a status dataset) rather
than exceptions; :func:`status_error` translates a status at the edge, so nothing above this
module looks at DIMSE codes.
"""

from __future__ import annotations

from bridge.errors import HutongError, Retry, TransportError


class DicomRejected(HutongError):
    code = "HT-DICOM-REJECTED"
    retry = Retry.PERMANENT
    http_status = 422


class PacsUnavailable(TransportError):
    code = "HT-PACS-UNAVAILABLE"


class PacsFailed(HutongError):
    code = "HT-PACS-FAILED"
    retry = Retry.PERMANENT
    http_status = 502


class FetchFailed(HutongError):
    code = "HT-IMAGING-FETCH"
    retry = Retry.PERMANENT
    http_status = 422


class ReportRejected(HutongError):
    code = "HT-REPORT-REJECTED"
    retry = Retry.PERMANENT
    http_status = 422


#: DIMSE status classes (PS3.7 Annex C); out-of-resources is the one worth retrying
_TRANSIENT = range(0xA700, 0xA800)


def status_error(status: int | None, operation: str) -> HutongError | None:
    """None for success/pending/warning, else the error for a DIMSE status (None: no answer)."""
    if status is None:
        return PacsUnavailable(f"{operation}: no response from the peer (timeout or abort)")
    if (
        status == 0x0000
        or status in (0xFF00, 0xFF01)
        or status in (0x0001, 0x0107, 0x0116)
        or 0xB000 <= status <= 0xBFFF
    ):
        return None
    if status in _TRANSIENT:
        return PacsUnavailable(f"{operation}: peer out of resources (status 0x{status:04X})")
    if status == 0xFE00:
        return PacsFailed(f"{operation}: cancelled by the peer (status 0xFE00)")
    return PacsFailed(f"{operation}: peer answered failure status 0x{status:04X}")
