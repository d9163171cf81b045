"""Our DICOM network side: the Store SCP (listener) and the SCU operations (find, get).

The AE (titles, contexts, timeouts) is configuration; what one association did (the studies it
touched) is kept per association, apart from it. pynetdicom signals failure by values, so every
status is passed through :func:`adapters.pacs.errors.status_error` here and nowhere else.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, build_role, evt
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    Verification,
)

from adapters.pacs.errors import PacsUnavailable, status_error
from adapters.pacs.options import PacsOptions, PeerAE

log = logging.getLogger("hutong.adapters.pacs")
logging.getLogger("pynetdicom").setLevel(logging.WARNING)

#: transfer syntaxes offered for retrieval, one presentation context each, so a compressed
#: instance is sent as stored (never transcoded: the bytes must arrive unchanged)
RETRIEVE_SYNTAXES = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)

StoreCallback = Callable[[Any], int]  # the C-STORE event -> DIMSE status


def _ae(title: str, timeout: float) -> AE:
    ae = AE(ae_title=title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    return ae


class StoreListener:
    """Store SCP: each instance is handed to ``on_instance`` (which commits it, then returns
    the status we answer); when an association ends (released or aborted), ``on_closed`` gets
    the Study Instance UIDs it touched."""

    def __init__(
        self,
        opts: PacsOptions,
        on_instance: Callable[[Any], tuple[int, str | None]],
        on_closed: Callable[[set[str]], None],
        on_cut: Callable[[str, int], None] | None = None,
    ) -> None:
        self.opts = opts
        self.on_instance = on_instance
        self.on_closed = on_closed
        self.on_cut = on_cut  # (SOP instance UID or "unknown", bytes received) of a cut C-STORE
        self._touched: dict[int, set[str]] = {}
        self._lock = threading.Lock()
        self._server: Any = None

    def start(self) -> None:
        o = self.opts
        ae = _ae(o.ae_title, o.timeout_s)
        # a peer that connects and says nothing, or stalls mid-association, is cut off
        ae.acse_timeout = o.acse_timeout_s or o.timeout_s
        ae.dimse_timeout = o.dimse_timeout_s or o.timeout_s
        ae.network_timeout = o.idle_timeout_s or o.timeout_s
        for cx in StoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        ae.maximum_associations = o.max_associations
        self._server = ae.start_server(
            (self.opts.bind_host, self.opts.bind_port),
            block=False,
            evt_handlers=[
                (evt.EVT_C_STORE, self._store),
                (evt.EVT_RELEASED, self._closed),
                (evt.EVT_ABORTED, self._closed),
                (evt.EVT_ESTABLISHED, self._cap),
            ],
        )

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()

    def _cap(self, event: Any) -> None:
        """Bound what one message may gather while it arrives: past twice
        ``max_dataset_bytes`` (plus 1 MiB) the gathered bytes are dropped and the association
        aborted (pynetdicom would otherwise hold the whole data set in memory before the
        C-STORE handler can refuse it); between the limit and that ceiling the data set is
        received and refused with a failure status by the handler."""
        dimse = event.assoc.dimse
        receive = dimse.receive_primitive
        ceiling = 2 * self.opts.max_dataset_bytes + (1 << 20)
        state = {"n": 0, "cut": False}

        def capped(primitive: Any) -> None:
            if state["cut"]:
                return
            if dimse.message is None:  # a new message starts
                state["n"] = 0
            state["n"] += sum(len(v) for _, v in primitive.presentation_data_value_list)
            if state["n"] <= ceiling:
                receive(primitive)
                return
            state["cut"] = True
            try:
                sop = str(dimse.message.command_set.AffectedSOPInstanceUID)
            except AttributeError:
                sop = "unknown"
            dimse.message = None  # what was gathered goes now
            dimse.dul.event_queue.put("Evt19")  # A-ABORT, as for an invalid PDU
            if self.on_cut is not None:
                try:
                    self.on_cut(sop, state["n"])
                except Exception:
                    log.exception("recording a cut C-STORE failed")

        dimse.receive_primitive = capped

    def _store(self, event: Any) -> int:
        status, study = self.on_instance(event)
        if study is not None:
            with self._lock:
                self._touched.setdefault(id(event.assoc), set()).add(study)
        return status

    def _closed(self, event: Any) -> None:
        with self._lock:
            studies = self._touched.pop(id(event.assoc), set())
        if studies:
            try:
                self.on_closed(studies)
            except Exception:
                log.exception("publishing studies after an association failed")


def _associate(ae: AE, peer: PeerAE, operation: str, **kwargs: Any) -> Any:
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, **kwargs)
    if not assoc.is_established:
        raise PacsUnavailable(
            f"{operation}: association with {peer.ae_title} at "
            f"{peer.host}:{peer.port} was not established"
        )
    return assoc


def _find(peer: PeerAE, calling: str, timeout: float, query: Dataset) -> list[Dataset]:
    ae = _ae(calling, timeout)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = _associate(ae, peer, "C-FIND")
    found: list[Dataset] = []
    try:
        for status, identifier in assoc.send_c_find(
            query, StudyRootQueryRetrieveInformationModelFind
        ):
            code = int(status.Status) if status and "Status" in status else None
            error = status_error(code, "C-FIND")
            if error is not None:
                raise error
            if code in (0xFF00, 0xFF01) and identifier is not None:
                found.append(identifier)
    finally:
        assoc.release()
    return found


def find_studies(
    peer: PeerAE,
    calling: str,
    timeout: float,
    *,
    patient_id: str | None = None,
    study_date: str | None = None,
    study_uid: str | None = None,
) -> list[Dataset]:
    """Study-level C-FIND (Study Root) by patient ID, date or date range, or study UID."""
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.PatientID = patient_id or ""
    q.StudyDate = study_date or ""
    q.StudyInstanceUID = study_uid or ""
    for keyword in (
        "PatientName",
        "PatientBirthDate",
        "PatientSex",
        "StudyTime",
        "AccessionNumber",
        "ReferringPhysicianName",
        "StudyDescription",
        "ModalitiesInStudy",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
        "OtherPatientIDsSequence",
    ):
        setattr(q, keyword, [] if keyword.endswith("Sequence") else "")
    return _find(peer, calling, timeout, q)


def find_series(peer: PeerAE, calling: str, timeout: float, study_uid: str) -> list[Dataset]:
    q = Dataset()
    q.QueryRetrieveLevel = "SERIES"
    q.StudyInstanceUID = study_uid
    for keyword in (
        "SeriesInstanceUID",
        "Modality",
        "SeriesNumber",
        "SeriesDescription",
        "BodyPartExamined",
        "NumberOfSeriesRelatedInstances",
    ):
        setattr(q, keyword, "")
    return _find(peer, calling, timeout, q)


def find_sop_classes(peer: PeerAE, calling: str, timeout: float, study_uid: str) -> set[str]:
    """The SOP classes of a study's instances (to propose storage contexts for a C-GET)."""
    q = Dataset()
    q.QueryRetrieveLevel = "IMAGE"
    q.StudyInstanceUID = study_uid
    q.SeriesInstanceUID = ""
    q.SOPInstanceUID = ""
    q.SOPClassUID = ""
    return {str(d.SOPClassUID) for d in _find(peer, calling, timeout, q) if d.get("SOPClassUID")}


def get_study(
    peer: PeerAE,
    calling: str,
    timeout: float,
    study_uid: str,
    sop_classes: Iterable[str],
    on_store: StoreCallback,
) -> int:
    """C-GET a whole study; each instance goes to ``on_store`` on this association.

    Returns the number of instances the peer reports sent; any failed sub-operation is an error
    (a partial study must not look complete).
    """
    classes = sorted(set(sop_classes))
    syntaxes = (
        RETRIEVE_SYNTAXES if len(classes) * len(RETRIEVE_SYNTAXES) < 127 else RETRIEVE_SYNTAXES[:2]
    )
    if len(classes) * len(syntaxes) >= 127:
        raise PacsUnavailable(
            f"C-GET: study has {len(classes)} SOP classes, more than one association can propose"
        )
    ae = _ae(calling, timeout)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    for cls in classes:
        for ts in syntaxes:
            ae.add_requested_context(cls, ts)
    roles = [build_role(cls, scp_role=True) for cls in classes]
    assoc = _associate(ae, peer, "C-GET", ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = study_uid
    completed = failed = 0
    try:
        for status, _identifier in assoc.send_c_get(q, StudyRootQueryRetrieveInformationModelGet):
            code = int(status.Status) if status and "Status" in status else None
            error = status_error(code, "C-GET")
            if error is not None:
                raise error
            completed = int(status.get("NumberOfCompletedSuboperations") or completed)
            failed = int(status.get("NumberOfFailedSuboperations") or 0)
    finally:
        assoc.release()
    if failed:
        raise PacsUnavailable(f"C-GET: {failed} instance(s) of the study failed to arrive")
    return completed
