"""What the config files may say (file models) and what a node runs from (the plan).

File models mirror ``alliance.toml`` and ``nodes/<id>.toml`` one to one and forbid unknown keys, so
a typo is reported instead of silently falling back to a default. They keep paths and secret
references exactly as written, which makes them the stable input of ``config_hash``.

The plan types (``Member``, ``NodePlan`` and the settings dataclasses) hold the resolved result:
absolute paths, parsed public keys, read secrets. Only the loader builds them, after every check
passed, and they are immutable so no part of a running node can drift from what was audited.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    StringConstraints,
    ValidationInfo,
    field_validator,
)

from bridge.config.rules import RuleSet
from bridge.config.secrets import check_secret_ref, is_secret_ref
from bridge.errors import NotFound

ROLES: tuple[str, ...] = ("core", "secondary", "community", "platform")
TOKEN_ROLES: tuple[str, ...] = ("clinician", "it", "auditor")
#: MLPS 2.0 (等级保护 2.0) requires security audit logs to be kept at least six months
MIN_AUDIT_DAYS = 183
DEFAULT_NATIONAL_ID_SYSTEM = "urn:oid:2.16.156.10011.1.3"

_MEMBER_ID = re.compile(r"[a-z0-9-]{2,32}")
_KIND = re.compile(r"[a-z][a-z0-9-]*(\.[a-z][a-z0-9-]*)*")
_BIND = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[^:\[\]\s]+):(?P<port>[0-9]{1,5})")

Role = Literal["core", "secondary", "community", "platform"]


def _member_id(value: str) -> str:
    if not _MEMBER_ID.fullmatch(value):
        raise ValueError(f"{value!r} is not a member id: use 2-32 characters of a-z, 0-9 and '-'")
    return value


def _kind(value: str) -> str:
    if value != "*" and not _KIND.fullmatch(value):
        raise ValueError(f"{value!r} is not a message kind such as 'referral.request' or '*'")
    return value


def split_bind(value: str) -> tuple[str, int]:
    """Split ``host:port`` (IPv6 as ``[::1]:port``); raise ValueError if it is not one."""
    match = _BIND.fullmatch(value)
    port = int(match["port"]) if match else 0
    if not match or not 0 < port < 65536:
        raise ValueError(f"{value!r} is not host:port (e.g. 127.0.0.1:8101)")
    return match["host"].strip("[]"), port


def _bind(value: str) -> str:
    split_bind(value)
    return value


def _exchange_url(value: str) -> str:
    parts = urlsplit(value)
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.query
        or parts.fragment
        or parts.username is not None
    ):
        raise ValueError(f"{value!r} is not an http(s) URL such as http://127.0.0.1:9101")
    try:
        _ = parts.port  # raises on a malformed port
    except ValueError as exc:
        raise ValueError(f"{value!r} has an invalid port") from exc
    return value.rstrip("/")


def _storage_dsn(value: str) -> str:
    if value == "" or is_secret_ref(value):
        return value
    return check_dsn(value)


def check_dsn(value: str, *, from_secret: bool = False) -> str:
    """Accept SQLite and psycopg 3 PostgreSQL DSNs; refuse passwords written into a config file."""
    if value.startswith("sqlite:///"):
        return value
    if value.startswith("postgresql+psycopg://"):
        if from_secret:
            return value
        parts = urlsplit(value)
        if parts.password is not None or "password=" in parts.query:
            raise ValueError(
                "the DSN contains a password: put the whole DSN in a secret instead, "
                'e.g. storage_dsn = "env:HUTONG_PG_DSN" or "file:../secrets/<node>.dsn"'
            )
        return value
    raise ValueError(
        "must be empty (SQLite in data_dir), sqlite:///<path>, postgresql+psycopg://... "
        "or a secret reference env:NAME / file:path"
    )


MemberId = Annotated[str, AfterValidator(_member_id)]
Kind = Annotated[str, AfterValidator(_kind)]
Bind = Annotated[str, AfterValidator(_bind)]
SecretRef = Annotated[str, AfterValidator(check_secret_ref)]
NonEmpty = Annotated[str, Field(min_length=1)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Names(_Model):
    """A member's official name in Chinese (shown to clinicians) and English (logs, partners)."""

    zh: NonEmpty
    en: NonEmpty


# --- alliance.toml ---------------------------------------------------------------------------


class AllianceInfo(_Model):
    id: MemberId
    names: Names
    patient_hash_key: SecretRef
    national_id_system: NonEmpty = DEFAULT_NATIONAL_ID_SYSTEM


class MemberConfig(_Model):
    id: MemberId
    names: Names
    role: Role
    exchange_url: Annotated[str, AfterValidator(_exchange_url)]
    signing_key: NonEmpty
    encryption_key: NonEmpty
    next_signing_key: NonEmpty | None = None
    next_encryption_key: NonEmpty | None = None
    via: MemberId | None = None


class RuleConfig(_Model):
    from_: NonEmpty = Field(alias="from")
    to: NonEmpty
    kinds: Annotated[tuple[Kind, ...], Field(min_length=1)]
    note: str | None = None


class AllianceFile(_Model):
    alliance: AllianceInfo
    members: Annotated[tuple[MemberConfig, ...], Field(min_length=1)]
    rules: tuple[RuleConfig, ...] = ()


# --- nodes/<id>.toml -------------------------------------------------------------------------


class KeysConfig(_Model):
    signing: NonEmpty
    encryption: NonEmpty
    passphrase: SecretRef | None = None


class TokensConfig(_Model):
    """One bearer token per local-API role; each is a secret reference."""

    clinician: SecretRef
    it: SecretRef
    auditor: SecretRef


class LimitsConfig(_Model):
    max_body_bytes: PositiveInt = 20 * 1024 * 1024
    clock_window_s: PositiveInt = 300
    max_batch: PositiveInt = 500
    #: per-peer token bucket at the peer port (packets/s and bucket size); off when unset
    peer_rate_per_s: PositiveFloat | None = None
    peer_burst: PositiveInt | None = None  # default: twice the rate, at least 1
    #: refusals of unauthenticated input, per source address (token bucket): over it, the
    #: address's requests are turned away before their body is read, and only counted
    refusal_rate_per_s: PositiveFloat = 1.0
    refusal_burst: PositiveInt = 20
    #: refusals kept per second from all addresses together (burst 5x); past it they are
    #: still answered, but not kept or audited one by one
    refusal_total_per_s: PositiveFloat = 20.0
    #: per port: requests handled at once, and request bytes in flight (declared lengths;
    #: never below one largest request); a request that cannot get its share waits
    #: ``admit_wait_s`` and is then answered 503
    max_requests: PositiveInt = 32
    max_inflight_bytes: PositiveInt = 64 * 1024 * 1024
    admit_wait_s: PositiveFloat = 10.0
    #: local (hospital-facing) port: largest request body; read only after the token is checked
    local_max_body_bytes: PositiveInt = 48 * 1024 * 1024
    #: both ports: idle keep-alive, request head (line + headers) and body deadlines, the
    #: largest request head, and open connections (over it: 503)
    keep_alive_s: PositiveFloat = 5.0
    header_timeout_s: PositiveFloat = 10.0
    body_timeout_s: PositiveFloat = 120.0
    max_header_bytes: PositiveInt = 16 * 1024
    max_connections: PositiveInt = 512
    #: received packets waiting for local delivery (the inbox backlog) at which the peer port
    #: refuses new batches unread (503 HT-PKT-BACKLOG, Retry-After) until it is back under
    #: 90 % of it; the senders keep them queued and back off. 0: no bound
    max_inbox_backlog: NonNegativeInt = 20_000
    #: lab messages acknowledged and not yet expanded into the FHIR store (the results
    #: journal, bridge/results/journal.py) at which a new message's ACK waits up to
    #: ``results_journal_wait_s`` for the expansion, then is answered AE (resend later),
    #: nothing stored. 0: no bound
    max_results_journal: NonNegativeInt = 2_000
    results_journal_wait_s: PositiveFloat = 5.0


def _needs_default(table: Mapping[str, object]) -> Mapping[str, object]:
    if "*" not in table:
        raise ValueError("needs a '*' entry: the default for kinds not listed")
    return table


class DeliveryConfig(_Model):
    batch_size: PositiveInt = 200
    max_attempts: PositiveInt = 50
    dead_after_s: PositiveInt = 7 * 24 * 3600
    backoff_base_s: PositiveFloat = 0.5
    backoff_max_s: PositiveFloat = 300.0
    per_peer_concurrency: PositiveInt = 1
    poll_interval_s: PositiveFloat = 0.5
    #: batch-signed receipts (docs/envelope.md, v2): ask peers for them, and give them to
    #: peers that ask; false pins this node to one signature a receipt (v1) both ways
    batch_receipts: bool = True
    handlers: Annotated[dict[Kind, NonEmpty], AfterValidator(_needs_default)] = {"*": "spool"}
    spool_dir: NonEmpty | None = None  # default <data_dir>/spool

    @field_validator("backoff_max_s")
    @classmethod
    def _max_not_below_base(cls, value: float, info: ValidationInfo) -> float:
        base = info.data.get("backoff_base_s")
        if base is not None and value < base:
            raise ValueError(f"must be at least backoff_base_s ({base})")
        return value


class RetentionConfig(_Model):
    body_days: Annotated[dict[Kind, NonNegativeFloat], AfterValidator(_needs_default)] = {"*": 30.0}
    audit_days: int = MIN_AUDIT_DAYS
    run_every_s: PositiveFloat = 3600.0
    #: quarantine: held items older than this lose their bytes (unauthenticated ones go
    #: whole); all kept bytes together stay under the quota (oldest unauthenticated dropped
    #: first); of input refused before its signature verified only a prefix is kept
    quarantine_days: NonNegativeFloat = 30.0
    quarantine_max_bytes: PositiveInt = 256 * 1024 * 1024
    quarantine_prefix_bytes: Annotated[int, Field(ge=0, le=1024 * 1024)] = 4096

    @field_validator("audit_days")
    @classmethod
    def _six_months(cls, value: int) -> int:
        if value < MIN_AUDIT_DAYS:
            raise ValueError(
                f"must be at least {MIN_AUDIT_DAYS}: MLPS 2.0 (等级保护 2.0) keeps audit logs "
                "for six months"
            )
        return value


class AuditConfig(_Model):
    checkpoint_every: PositiveInt = 1000


class ReferralConfig(_Model):
    """Referral timeouts: a referral not accepted in time raises a reminder for IT."""

    accept_timeout_s: PositiveFloat = 86400.0
    green_channel_timeout_s: PositiveFloat = 7200.0
    reminder_every_s: PositiveFloat = 60.0


class ConsultConfig(_Model):
    """Consultation timeouts: a consultation waiting at one step (requested, in pre-review,
    returned for completion, resubmitted, report in quality control) longer than this raises
    a reminder (audited, and the ``consult-overdue`` alert)."""

    wait_timeout_s: PositiveFloat = 86400.0
    urgent_timeout_s: PositiveFloat = 7200.0  # priority urgent, asap or stat
    reminder_every_s: PositiveFloat = 60.0


def webhook_url(value: str) -> str:
    """An http(s) URL; the error does not quote it (a webhook URL may carry an access key)."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("is not an http(s) URL for the alert webhook")
    return value


def _webhook_url(value: str) -> str:
    """The node file holds the URL or a secret reference to it (``env:NAME``/``file:path``)."""
    if is_secret_ref(value):
        return check_secret_ref(value)
    return webhook_url(value)


class AlertsConfig(_Model):
    """When the IT page raises an alert, and where it is POSTed (JSON) as well."""

    every_s: PositiveFloat = 30.0  # how often the rules are evaluated
    queue_depth: PositiveInt = 1000  # packets waiting for one peer
    queue_age_s: PositiveFloat = 3600.0  # oldest packet waiting (outbound per peer, inbound)
    peer_silent_s: PositiveFloat = 900.0  # no receipt, packet or health answer from a peer
    adapter_silent_s: PositiveFloat = 3600.0  # no successful round of a local adapter
    chain_every_s: PositiveFloat = 300.0  # how often the audit chain is fully verified
    probe_timeout_s: PositiveFloat = 3.0  # peer health probe
    webhook_url: Annotated[str, AfterValidator(_webhook_url)] | None = None
    webhook_timeout_s: PositiveFloat = 5.0
    # issue 15: rules that fire early, robot formats, e-mail (bridge/alerts.py)
    peer_unreachable_grace_s: float = Field(default=60.0, ge=0)  # after the first failed probe
    quarantine_held: int = Field(default=0, ge=0)  # held items per source above this: alert
    dead_letters: int = Field(default=0, ge=0)  # dead packets per peer above this: alert
    disk_free_pct: float = Field(default=10.0, ge=0, le=100)  # free space of the data folder
    keys_rotate_by: str | None = None  # YYYY-MM-DD the alliance's key policy renews this site
    key_expiry_warn_days: PositiveInt = 30
    off: tuple[str, ...] = ()  # rule names not evaluated at all (e.g. "adapter-silent")
    webhook_format: Literal["json", "wecom", "dingtalk"] = "json"
    smtp_host: str | None = None  # e-mail each raise/clear when set (with email_to)
    smtp_port: PositiveInt = 25
    smtp_starttls: bool = False
    smtp_user: str | None = None
    smtp_password: str | None = None  # a secret reference (env:NAME / file:path)
    email_from: str = "hutong@localhost"
    email_to: tuple[str, ...] = ()


class MetricsConfig(_Model):
    """``/metrics`` on the local port (Prometheus): the IT token, or this token of its own
    (a secret reference) so the Prometheus server holds no IT rights."""

    token: SecretRef | None = None


class WebConfig(_Model):
    """Browser sessions on the local port's /ui pages: an idle limit (reset by each request)
    and an absolute one (from login); past either the session is dropped and the user logs in
    again."""

    session_idle_s: PositiveFloat = 1800.0
    session_max_s: PositiveFloat = 12 * 3600.0
    #: personal accounts (bridge.accounts): the zone every page and CLI shows times in
    display_zone: NonEmpty = "Asia/Shanghai"
    #: the shared per-role tokens of [tokens] still log in and call the API (one release);
    #: flagged on the accounts page while on
    shared_role_tokens: bool = True
    #: failed logins in a row that lock an account, and for how long
    lockout_after: PositiveInt = 5
    lockout_s: PositiveFloat = 900.0
    #: optional directory bind (ldap3): ``ldap://host:389``; the user DN is the template with
    #: ``{user}`` replaced; roles still come from the node's own account row
    ldap_url: str | None = None
    ldap_user_dn: str | None = None


#: identifier systems of the Chinese resident ID number (居民身份证号) as the code meets them:
#: the FHIR form and the bare OID of HL7 v2 / DICOM / CDA headers
RESIDENT_ID_SYSTEMS: tuple[str, ...] = (DEFAULT_NATIONAL_ID_SYSTEM, "2.16.156.10011.1.3")


class EgressConfig(_Model):
    """What no packet may carry out of this node: identifiers of these systems (a national ID
    number crosses the gateway only as its keyed hash). Unset: the alliance's national_id_system
    and RESIDENT_ID_SYSTEMS; an explicit empty list turns the check off."""

    refuse_identifier_systems: tuple[NonEmpty, ...] | None = None


class AdapterConfig(_Model):
    """One ``[[adapters]]`` table: a local system plugged into this node
    (bridge/local/contract.py)."""

    name: Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9-]{0,31}$")]
    type: NonEmpty  # entry point name in group hutong.adapters
    mappings: NonEmpty | None = None  # the site's mapping folder, relative to the node file
    receives: list[NonEmpty] = []  # packet kinds delivered to this adapter ("referral.*")
    enabled: bool = True
    options: dict[str, object] = {}


class NodeFile(_Model):
    node_id: MemberId
    alliance: NonEmpty
    local_bind: Bind
    peer_bind: Bind
    data_dir: NonEmpty | None = None  # default ../data/<node_id>
    storage_dsn: Annotated[str, AfterValidator(_storage_dsn)] = ""
    keys: KeysConfig
    tokens: TokensConfig
    limits: LimitsConfig = LimitsConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    retention: RetentionConfig = RetentionConfig()
    audit: AuditConfig = AuditConfig()
    referral: ReferralConfig = ReferralConfig()
    consult: ConsultConfig = ConsultConfig()
    adapters: list[AdapterConfig] = []
    alerts: AlertsConfig = AlertsConfig()
    web: WebConfig = WebConfig()
    metrics: MetricsConfig = MetricsConfig()
    egress: EgressConfig = EgressConfig()

    @field_validator("adapters")
    @classmethod
    def _unique_names(cls, value: list[AdapterConfig]) -> list[AdapterConfig]:
        names = [a.name for a in value]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"adapter names must be unique, repeated: {', '.join(dupes)}")
        return value


# --- the plan --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AllianceIdentity:
    id: str
    names: Names
    national_id_system: str


@dataclass(frozen=True, slots=True)
class Member:
    """A directory entry: how to reach a member and which keys to trust for it.

    Two keys of a kind exist only during a rollover (current first, then next); both verify.
    """

    id: str
    names: Names
    role: str
    exchange_url: str
    signing_keys: tuple[Ed25519PublicKey, ...]
    encryption_keys: tuple[X25519PublicKey, ...]
    via: str | None = None


@dataclass(frozen=True, slots=True)
class NodeKeys:
    """Where this node's private keys are and the passphrase that opens them (None: unencrypted)."""

    signing: Path
    encryption: Path
    passphrase: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class AdapterSettings:
    name: str
    type: str
    mappings: Path | None
    receives: tuple[str, ...]
    options: Mapping[str, object]
    base_dir: Path  # the node file's folder: relative paths in options resolve from here


@dataclass(frozen=True, slots=True)
class DeliverySettings:
    batch_size: int
    max_attempts: int
    dead_after_s: int
    backoff_base_s: float
    backoff_max_s: float
    per_peer_concurrency: int
    poll_interval_s: float
    batch_receipts: bool
    handlers: Mapping[str, str]
    spool_dir: Path

    def handler_for(self, kind: str) -> str:
        """The local handler for a delivered kind; '*' is the default."""
        return self.handlers.get(kind, self.handlers["*"])


@dataclass(frozen=True, slots=True)
class RetentionSettings:
    body_days: Mapping[str, float]
    audit_days: int
    run_every_s: float
    quarantine_days: float = 30.0
    quarantine_max_bytes: int = 256 * 1024 * 1024
    quarantine_prefix_bytes: int = 4096

    def body_days_for(self, kind: str) -> float:
        """How long message bodies of a kind are kept; '*' is the default."""
        return self.body_days.get(kind, self.body_days["*"])


@dataclass(frozen=True, slots=True)
class NodePlan:
    """Everything one node needs to run, validated and resolved; built only by the loader."""

    node_id: str
    names: Names
    role: str
    alliance: AllianceIdentity
    directory: Mapping[str, Member]
    local_host: str
    local_port: int
    peer_host: str
    peer_port: int
    data_dir: Path
    storage_dsn: str = field(repr=False)
    keys: NodeKeys
    tokens: Mapping[str, str] = field(repr=False)
    patient_hash_key: bytes = field(repr=False)
    limits: LimitsConfig
    delivery: DeliverySettings
    retention: RetentionSettings
    audit: AuditConfig
    referral: ReferralConfig
    rules: RuleSet
    adapters: tuple[AdapterSettings, ...]
    config_hash: str
    source_files: tuple[Path, ...]
    alerts: AlertsConfig = field(default_factory=AlertsConfig)
    web: WebConfig = field(default_factory=WebConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    consult: ConsultConfig = field(default_factory=ConsultConfig)
    #: identifier systems no outgoing packet may carry (bridge.delivery.egress)
    egress_refused_systems: tuple[str, ...] = RESIDENT_ID_SYSTEMS

    @property
    def me(self) -> Member:
        return self.directory[self.node_id]

    def member(self, member_id: str) -> Member:
        try:
            return self.directory[member_id]
        except KeyError:
            raise NotFound(
                f"{member_id!r} is not a member of alliance {self.alliance.id}"
            ) from None

    def next_hop(self, recipient_id: str) -> str:
        """Which member to hand a packet for ``recipient_id`` to.

        A platform reaches every member directly; anyone else goes through the platform when
        either end sits behind one (partner → platform → firewall → core hospital).
        """
        recipient = self.member(recipient_id)
        if self.role == "platform":
            return recipient.id
        if recipient.via is not None:
            return recipient.via
        if self.me.via is not None:
            return self.me.via
        return recipient.id
