"""The ``[adapters.options]`` of a ``pacs-dicom`` adapter, checked before anything starts."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from adapters.hl7v2 import charset


class PeerAE(BaseModel):
    """Another DICOM application entity: where to reach it and what it is called."""

    model_config = ConfigDict(extra="forbid")
    host: str
    port: int = Field(ge=1, le=65535)
    ae_title: str = Field(min_length=1, max_length=16)


class PacsOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ae_title: str = Field("HUTONG", min_length=1, max_length=16)  # our AE title
    bind: str = "127.0.0.1:11112"  # where our Store SCP listens (hospital LAN only)
    pacs: PeerAE | None = None  # the vendor PACS: C-FIND to query, C-GET to retrieve
    complete_after_s: float = Field(30.0, gt=0)  # idle time that completes an open study
    national_id_issuer: str = "2.16.156.10011.1.3"  # IssuerOfPatientID of the national ID
    patient_id_is_national_id: bool = False  # some PACS keep the ID card number as PatientID
    patient_id_system: str | None = None  # default urn:hutong:<node>:pacs-patient-id
    accession_system: str | None = None  # default urn:hutong:<node>:accession
    timezone: str = Field("+08:00", pattern=r"^[+-]\d\d:\d\d$")  # DICOM times are local
    fetch_chunk_bytes: int | None = Field(None, gt=0)  # raw DICOM bytes per response packet
    timeout_s: float = Field(30.0, gt=0)  # ACSE, DIMSE and network timeouts
    # RIS ORU^R01 reports (POST .../reports): charset when MSH-18 is empty, and what the RIS
    # really sends when its MSH-18 is wrong (adapters.hl7v2.charset)
    default_charset: str = "UNICODE UTF-8"
    charset_override: str | None = None
    # the site's web viewer for a study, "{study_uid}" replaced (the referral page links it)
    viewer_url: str | None = Field(None, pattern=r"^https?://[^\s]*\{study_uid\}[^\s]*$")

    @field_validator("default_charset", "charset_override")
    @classmethod
    def _known_charset(cls, value: str | None) -> str | None:
        return charset.check_name(value) if value is not None else None

    # the Store SCP's own bounds (a hostile or broken peer on the LAN costs little):
    max_dataset_bytes: int = Field(1 << 30, gt=0)  # one C-STORE data set; larger: refused
    max_sequence_depth: int = Field(32, ge=1, le=1000)  # nested sequences; deeper: refused
    max_associations: int = Field(16, ge=1, le=256)  # open at once; more are rejected
    acse_timeout_s: float | None = Field(None, gt=0)  # association set-up (default timeout_s)
    dimse_timeout_s: float | None = Field(None, gt=0)  # waiting for the next DIMSE message
    idle_timeout_s: float | None = Field(None, gt=0)  # no bytes at all: the link is closed

    @field_validator("bind")
    @classmethod
    def _bind(cls, value: str) -> str:
        host, _, port = value.rpartition(":")
        if not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ValueError("use host:port")
        return value

    @property
    def bind_host(self) -> str:
        return self.bind.rsplit(":", 1)[0].strip("[]")

    @property
    def bind_port(self) -> int:
        return int(self.bind.rsplit(":", 1)[1])
