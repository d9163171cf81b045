"""Two-phase config loading: read every file, check everything, report every problem at once.

Hospital IT fixes a config in one pass when all problems arrive together, each as one line
``<file>: <key.path>: <what is wrong>``. Checks after schema validation run on the raw TOML
wherever they can, so one bad value does not hide the next problem. Only a config without
problems becomes a NodePlan.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from pydantic import ValidationError

from bridge.config.models import (
    ROLES,
    TOKEN_ROLES,
    AdapterSettings,
    AllianceFile,
    AllianceIdentity,
    DeliverySettings,
    Member,
    NodeFile,
    NodeKeys,
    NodePlan,
    RetentionSettings,
    check_dsn,
    split_bind,
    webhook_url,
)
from bridge.config.rules import Rule, RuleSet
from bridge.config.secrets import check_secret_ref, is_secret_ref, resolve_secret
from bridge.errors import ConfigError, HutongError

ALLIANCE_FILE = "alliance.toml"
NODES_DIR = "nodes"
MIN_HASH_KEY_BYTES = 32

PublicKey = Ed25519PublicKey | X25519PublicKey
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TOML_AT = re.compile(
    r"^(?P<msg>.*) \(at (?:line (?P<line>\d+), column (?P<col>\d+)|end of document)\)$"
)
_KEY_FIELDS = (
    ("signing_key", Ed25519PublicKey),
    ("next_signing_key", Ed25519PublicKey),
    ("encryption_key", X25519PublicKey),
    ("next_encryption_key", X25519PublicKey),
)


class _Problems:
    """Problem lines, labelled relative to the alliance folder so they read like the README."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.lines: list[str] = []

    def label(self, path: Path) -> str:
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return str(path)

    def add(self, path: Path, where: str, what: str) -> None:
        line = f"{self.label(path)}: {where}: {what}"
        if line not in self.lines:
            self.lines.append(line)

    def add_validation(self, path: Path, exc: ValidationError) -> None:
        for error in exc.errors(include_url=False):
            if error["type"] == "too_short" and _long_enough(error):
                continue  # pydantic also counts items that failed; their own errors say more
            msg = error["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
            self.add(path, dotted(error["loc"]) or "(file)", msg)


def _long_enough(error: Any) -> bool:
    value, ctx = error.get("input"), error.get("ctx") or {}
    return isinstance(value, list | tuple | dict) and len(value) >= ctx.get("min_length", 0)


def dotted(loc: Sequence[int | str]) -> str:
    """Turn a pydantic loc tuple into a TOML-ish key path: ``members[3].exchange_url``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "[key]":
            continue
        elif _IDENT.fullmatch(part):
            out += f".{part}" if out else part
        else:
            out += f"[{json.dumps(part, ensure_ascii=False)}]"
    return out


def _get(data: Any, *keys: str | int) -> Any:
    """Lenient lookup in raw TOML data: None wherever the shape is not what the model expects."""
    for key in keys:
        if isinstance(key, int):
            data = data[key] if isinstance(data, list) and key < len(data) else None
        else:
            data = data.get(key) if isinstance(data, dict) else None
    return data


def _str(data: Any, *keys: str | int) -> str | None:
    value = _get(data, *keys)
    return value if isinstance(value, str) else None


def _ref(data: Any, *keys: str) -> str | None:
    """A well-formed secret reference at that key, else None (the schema reports bad forms)."""
    value = _str(data, *keys)
    try:
        return check_secret_ref(value) if value is not None else None
    except ValueError:
        return None


def _read_toml(path: Path, problems: _Problems) -> dict[str, Any] | None:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        problems.add(path, "(file)", "not found")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        problems.add(path, "(file)", f"cannot read: {reason}")
    except tomllib.TOMLDecodeError as exc:
        at = _TOML_AT.match(str(exc))
        where = "(file)"
        if at:
            where = f"line {at['line']}, column {at['col']}" if at["line"] else "end of file"
        problems.add(path, where, f"TOML syntax error: {at['msg'] if at else exc}")
    return None


def _raw_public(key: PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


# --- alliance.toml ---------------------------------------------------------------------------


@dataclass
class _Alliance:
    path: Path
    data: dict[str, Any] | None = None
    model: AllianceFile | None = None
    ids: dict[str, int] = field(default_factory=dict)  # lenient: every id written, first index
    roles: dict[str, str] = field(default_factory=dict)
    keys: dict[str, tuple[tuple[Ed25519PublicKey, ...], tuple[X25519PublicKey, ...]]] = field(
        default_factory=dict
    )
    key_files: list[Path] = field(default_factory=list)
    hash_key: bytes | None = None


def _check_alliance(path: Path, problems: _Problems) -> _Alliance:
    state = _Alliance(path=path, data=_read_toml(path, problems))
    data = state.data
    if data is None:
        return state
    try:
        state.model = AllianceFile.model_validate(data)
    except ValidationError as exc:
        problems.add_validation(path, exc)
    raw_members = data.get("members")
    members: list[Any] = raw_members if isinstance(raw_members, list) else []
    for i, member in enumerate(members):
        member_id = _str(member, "id")
        if member_id is None:
            continue
        if member_id in state.ids:
            problems.add(
                path,
                f"members[{i}].id",
                f"duplicate member id {member_id!r} (also members[{state.ids[member_id]}])",
            )
            continue
        state.ids[member_id] = i
        role = _str(member, "role")
        if role is not None:
            state.roles[member_id] = role
    _check_via(state, members, problems)
    _check_rule_targets(state, problems)
    _check_hash_key(state, problems)
    _check_public_keys(state, members, problems)
    return state


def _check_via(state: _Alliance, members: list[Any], problems: _Problems) -> None:
    for i, member in enumerate(members):
        via = _str(member, "via")
        if via is None:
            continue
        if via == _str(member, "id"):
            problems.add(state.path, f"members[{i}].via", "a member cannot be reached via itself")
        elif _str(member, "role") == "platform":
            problems.add(
                state.path, f"members[{i}].via", "a platform is reached directly; remove via"
            )
        elif via not in state.ids:
            problems.add(state.path, f"members[{i}].via", f"unknown member {via!r}")
        elif state.roles.get(via) != "platform":
            problems.add(
                state.path,
                f"members[{i}].via",
                f"{via!r} is a {state.roles.get(via)} member; via must name a platform member",
            )


def _check_rule_targets(state: _Alliance, problems: _Problems) -> None:
    rules = _get(state.data, "rules")
    for i, rule in enumerate(rules if isinstance(rules, list) else []):
        for key in ("from", "to"):
            pattern = _str(rule, key)
            if pattern is None or pattern == "*":
                continue
            if pattern.startswith("role:"):
                if pattern[5:] not in ROLES:
                    problems.add(
                        state.path,
                        f"rules[{i}].{key}",
                        f"unknown role {pattern[5:]!r} (roles: {', '.join(ROLES)})",
                    )
            elif pattern not in state.ids:
                problems.add(state.path, f"rules[{i}].{key}", f"unknown member {pattern!r}")


def _check_hash_key(state: _Alliance, problems: _Problems) -> None:
    ref = _ref(state.data, "alliance", "patient_hash_key")
    if ref is None:
        return
    where = "alliance.patient_hash_key"
    try:
        text = resolve_secret(ref, state.path.parent)
    except ConfigError as exc:
        problems.add(state.path, where, exc.problems[0])
        return
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        problems.add(state.path, where, "must be hex digits (64 hex digits = 32 bytes)")
        return
    if len(key) < MIN_HASH_KEY_BYTES:
        problems.add(
            state.path,
            where,
            f"is {len(key)} bytes; national ID numbers are few enough to enumerate, so the "
            f"HMAC key needs at least {MIN_HASH_KEY_BYTES} random bytes",
        )
        return
    state.hash_key = key


def _check_public_keys(state: _Alliance, members: list[Any], problems: _Problems) -> None:
    owners: dict[bytes, str] = {}
    for i, member in enumerate(members):
        member_id = _str(member, "id")
        if member_id is None or state.ids.get(member_id) != i:
            continue
        found: dict[str, PublicKey | None] = {}
        for key_field, want in _KEY_FIELDS:
            value = _str(member, key_field)
            if value is not None:
                where = f"members[{i}].{key_field}"
                key = _public_key(state, value, where, member_id, want, problems)
                found[key_field] = key
                if key is None:
                    continue
                raw = _raw_public(key)
                if raw in owners and owners[raw] != f"{member_id}.{key_field}":
                    problems.add(state.path, where, f"same key as {owners[raw]}")
                owners.setdefault(raw, f"{member_id}.{key_field}")
        if any(key is None for key in found.values()) or not found:
            continue
        signing = tuple(
            k
            for k in (found.get("signing_key"), found.get("next_signing_key"))
            if isinstance(k, Ed25519PublicKey)
        )
        encryption = tuple(
            k
            for k in (found.get("encryption_key"), found.get("next_encryption_key"))
            if isinstance(k, X25519PublicKey)
        )
        if signing and encryption:
            state.keys[member_id] = (signing, encryption)


def _public_key(
    state: _Alliance, value: str, where: str, member_id: str, want: type, problems: _Problems
) -> PublicKey | None:
    """An inline ``ed25519:``/``x25519:`` key, or the matching key from a ``.pub.json`` file."""
    from bridge.crypto.keys import parse_public_key

    algorithm = "ed25519" if want is Ed25519PublicKey else "x25519"
    if value.startswith(("ed25519:", "x25519:")):
        text = value
    else:
        json_field = "signing" if want is Ed25519PublicKey else "encryption"
        path = state.path.parent / value
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            problems.add(state.path, where, f"public key file {value} not found")
            return None
        except (OSError, ValueError) as exc:
            problems.add(state.path, where, f"cannot read public key file {value}: {exc}")
            return None
        if not isinstance(doc, dict) or not isinstance(doc.get(json_field), str):
            problems.add(state.path, where, f"{value} has no {json_field!r} key")
            return None
        if doc.get("node") != member_id:
            owner = doc.get("node")
            problems.add(
                state.path, where, f"{value} holds the keys of {owner!r}, not {member_id!r}"
            )
            return None
        if path.resolve() not in state.key_files:
            state.key_files.append(path.resolve())
        text = doc[json_field]
    try:
        key = parse_public_key(text)
    except (HutongError, ValueError, TypeError) as exc:
        problems.add(state.path, where, f"not a valid public key: {exc}")
        return None
    if not isinstance(key, want):
        problems.add(state.path, where, f"must be an {algorithm} key")
        return None
    return key


# --- nodes/<id>.toml -------------------------------------------------------------------------


@dataclass
class _Node:
    path: Path
    data: dict[str, Any] | None = None
    model: NodeFile | None = None
    binds: dict[str, tuple[str, int]] = field(default_factory=dict)
    tokens: dict[str, str] = field(default_factory=dict)
    passphrase: bytes | None = None
    dsn: str = ""
    webhook_url: str | None = None


def _check_node(
    path: Path, data: dict[str, Any], alliance: _Alliance, problems: _Problems
) -> _Node:
    node = _Node(path=path, data=data)
    base = path.parent
    try:
        node.model = NodeFile.model_validate(data)
    except ValidationError as exc:
        problems.add_validation(path, exc)
    node_id = _str(data, "node_id")
    if node_id is not None and alliance.data is not None and node_id not in alliance.ids:
        problems.add(
            path, "node_id", f"{node_id!r} is not a member of {problems.label(alliance.path)}"
        )
    for key in ("local_bind", "peer_bind"):
        try:
            node.binds[key] = split_bind(_str(data, key) or "")
        except ValueError:
            pass
    if len(node.binds) == 2 and _clash(node.binds["local_bind"], node.binds["peer_bind"]):
        problems.add(path, "peer_bind", f"must differ from local_bind ({_str(data, 'local_bind')})")
    from bridge.local.check import check_adapters  # the adapter types' own declarations

    for where, what in check_adapters(data.get("adapters"), base, node.binds):
        problems.add(path, where, what)

    for role in TOKEN_ROLES:
        ref = _ref(data, "tokens", role)
        if ref is None:
            continue
        try:
            token = resolve_secret(ref, base)
        except ConfigError as exc:
            problems.add(path, f"tokens.{role}", exc.problems[0])
            continue
        same = [r for r, t in node.tokens.items() if t == token]
        if same:
            problems.add(
                path, f"tokens.{role}", f"same token as tokens.{same[0]}; each role needs its own"
            )
        node.tokens[role] = token

    hook = _str(data, "alerts", "webhook_url")
    if hook is not None and is_secret_ref(hook):
        # a chat-robot webhook URL carries its own access key: keep it out of the node file
        try:
            node.webhook_url = webhook_url(
                resolve_secret(hook, base, allow_placeholder=True).strip()
            )
        except (ConfigError, ValueError) as exc:
            msg = exc.problems[0] if isinstance(exc, ConfigError) else str(exc)
            problems.add(path, "alerts.webhook_url", msg)
    else:
        node.webhook_url = hook

    dsn_ref = _ref(data, "storage_dsn")
    if dsn_ref is not None:
        try:
            dsn = resolve_secret(dsn_ref, base, allow_placeholder=True).strip()
            node.dsn = check_dsn(dsn, from_secret=True)
        except (ConfigError, ValueError) as exc:
            msg = exc.problems[0] if isinstance(exc, ConfigError) else str(exc)
            problems.add(path, "storage_dsn", msg)
    else:
        node.dsn = _str(data, "storage_dsn") or ""

    passphrase_ok = True
    pass_ref = _ref(data, "keys", "passphrase")
    if pass_ref is not None:
        try:
            node.passphrase = resolve_secret(pass_ref, base).encode("utf-8")
        except ConfigError as exc:
            problems.add(path, "keys.passphrase", exc.problems[0])
            passphrase_ok = False
    elif _get(data, "keys", "passphrase") is not None:
        passphrase_ok = False
    published = alliance.keys.get(node_id or "")
    for key_field, private_type, index in (
        ("signing", Ed25519PrivateKey, 0),
        ("encryption", X25519PrivateKey, 1),
    ):
        value = _str(data, "keys", key_field)
        if value is not None:
            _check_private_key(
                node,
                value,
                key_field,
                private_type,
                published[index] if published else None,
                passphrase_ok,
                problems,
            )
    return node


def _clash(a: tuple[str, int], b: tuple[str, int]) -> bool:
    """Two binds collide on the same port if the hosts match or either is a wildcard."""
    wildcard = ("0.0.0.0", "::", "")
    return a[1] == b[1] and (a[0] == b[0] or a[0] in wildcard or b[0] in wildcard)


def _check_private_key(
    node: _Node,
    value: str,
    key_field: str,
    private_type: type,
    published: tuple[PublicKey, ...] | None,
    passphrase_ok: bool,
    problems: _Problems,
) -> None:
    """The private key file exists, is private, opens, and matches what the alliance publishes."""
    where = f"keys.{key_field}"
    path = node.path.parent / value
    if not path.is_file():
        problems.add(node.path, where, f"private key file {value} not found")
        return
    mode = path.stat().st_mode & 0o777
    if os.name == "posix" and mode & 0o077:
        problems.add(
            node.path,
            where,
            f"private key file {value} is open to others (mode {mode:o}); chmod 600",
        )
    if not passphrase_ok:
        return
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=node.passphrase)
    except TypeError:
        what = (
            "is encrypted: set keys.passphrase"
            if node.passphrase is None
            else ("is not encrypted but keys.passphrase is set")
        )
        problems.add(node.path, where, f"private key file {value} {what}")
        return
    except (ValueError, OSError):
        problems.add(
            node.path, where, f"cannot open private key file {value} (wrong passphrase or not PEM)"
        )
        return
    if not isinstance(key, private_type):
        problems.add(node.path, where, f"private key file {value} holds the wrong kind of key")
        return
    if published is not None:
        assert isinstance(key, Ed25519PrivateKey | X25519PrivateKey)
        if _raw_public(key.public_key()) not in {_raw_public(k) for k in published}:
            problems.add(
                node.path,
                where,
                f"private key file {value} does not match the public key alliance.toml lists "
                "for this node",
            )


# --- plan ------------------------------------------------------------------------------------


def _absolute(base: Path, value: str) -> Path:
    return (base / value).resolve()


def _sqlite_absolute(dsn: str, base: Path) -> str:
    """Resolve a relative SQLite path against the node file, like every other path."""
    prefix = "sqlite:///"
    if not dsn.startswith(prefix):
        return dsn
    rest = dsn[len(prefix) :]
    if not rest or rest.startswith(("/", ":memory:")):
        return dsn
    return f"{prefix}{_absolute(base, rest)}"


def _config_hash(alliance: _Alliance, node: NodeFile) -> str:
    """SHA-256 over canonical JSON of the validated models plus the trusted public keys.

    Secrets appear only as their references, so the hash can be logged and audited; the keys
    are included because a swapped .pub.json changes whom the node trusts.
    """
    assert alliance.model is not None
    keys = {
        member_id: {
            "signing": [_raw_public(k).hex() for k in signing],
            "encryption": [_raw_public(k).hex() for k in encryption],
        }
        for member_id, (signing, encryption) in alliance.keys.items()
    }
    document = {
        "alliance": alliance.model.model_dump(mode="json", by_alias=True),
        "node": node.model_dump(mode="json", by_alias=True),
        "public_keys": keys,
    }
    canonical = json.dumps(document, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _build_plan(alliance: _Alliance, node: _Node) -> NodePlan:
    model, config = alliance.model, node.model
    assert model is not None and config is not None and alliance.hash_key is not None
    base = node.path.parent
    directory: Mapping[str, Member] = MappingProxyType(
        {
            m.id: Member(
                id=m.id,
                names=m.names,
                role=m.role,
                exchange_url=m.exchange_url,
                signing_keys=alliance.keys[m.id][0],
                encryption_keys=alliance.keys[m.id][1],
                via=m.via,
            )
            for m in model.members
        }
    )
    me = directory[config.node_id]
    data_dir = _absolute(base, config.data_dir or f"../data/{config.node_id}")
    local_host, local_port = split_bind(config.local_bind)
    peer_host, peer_port = split_bind(config.peer_bind)
    delivery = config.delivery
    retention = config.retention
    rules = RuleSet(
        [Rule(i, r.from_, r.to, r.kinds, r.note) for i, r in enumerate(model.rules)], directory
    )
    return NodePlan(
        node_id=config.node_id,
        names=me.names,
        role=me.role,
        alliance=AllianceIdentity(
            model.alliance.id, model.alliance.names, model.alliance.national_id_system
        ),
        directory=directory,
        local_host=local_host,
        local_port=local_port,
        peer_host=peer_host,
        peer_port=peer_port,
        data_dir=data_dir,
        storage_dsn=_sqlite_absolute(node.dsn, base) or f"sqlite:///{data_dir / 'node.db'}",
        keys=NodeKeys(
            signing=_absolute(base, config.keys.signing),
            encryption=_absolute(base, config.keys.encryption),
            passphrase=node.passphrase,
        ),
        tokens=MappingProxyType(dict(node.tokens)),
        patient_hash_key=alliance.hash_key,
        limits=config.limits,
        delivery=DeliverySettings(
            batch_size=delivery.batch_size,
            max_attempts=delivery.max_attempts,
            dead_after_s=delivery.dead_after_s,
            backoff_base_s=delivery.backoff_base_s,
            backoff_max_s=delivery.backoff_max_s,
            per_peer_concurrency=delivery.per_peer_concurrency,
            poll_interval_s=delivery.poll_interval_s,
            batch_receipts=delivery.batch_receipts,
            handlers=MappingProxyType(dict(delivery.handlers)),
            spool_dir=(
                _absolute(base, delivery.spool_dir) if delivery.spool_dir else data_dir / "spool"
            ),
        ),
        retention=RetentionSettings(
            body_days=MappingProxyType(dict(retention.body_days)),
            audit_days=retention.audit_days,
            run_every_s=retention.run_every_s,
            quarantine_days=retention.quarantine_days,
            quarantine_max_bytes=retention.quarantine_max_bytes,
            quarantine_prefix_bytes=retention.quarantine_prefix_bytes,
        ),
        audit=config.audit,
        referral=config.referral,
        consult=config.consult,
        rules=rules,
        adapters=tuple(
            AdapterSettings(
                name=a.name,
                type=a.type,
                mappings=_absolute(base, a.mappings) if a.mappings else None,
                receives=tuple(a.receives),
                options=MappingProxyType(dict(a.options)),
                base_dir=base,
            )
            for a in config.adapters
            if a.enabled
        ),
        config_hash=_config_hash(alliance, config),
        source_files=(alliance.path, node.path, *alliance.key_files),
        alerts=config.alerts.model_copy(update={"webhook_url": node.webhook_url}),
        web=config.web,
        metrics=config.metrics,
        egress_refused_systems=_egress_systems(config, model.alliance.national_id_system),
    )


def _egress_systems(config: NodeFile, national_id_system: str) -> tuple[str, ...]:
    """``[egress] refuse_identifier_systems`` as written, or the alliance's national ID system
    with the known resident ID systems."""
    from bridge.config.models import RESIDENT_ID_SYSTEMS

    chosen = config.egress.refuse_identifier_systems
    if chosen is not None:
        return tuple(chosen)
    return tuple(dict.fromkeys((national_id_system, *RESIDENT_ID_SYSTEMS)))


# --- entry points ----------------------------------------------------------------------------


def load_node(path: str | Path) -> NodePlan:
    """Load one node's config and its alliance; raise ConfigError listing every problem."""
    node_path = Path(path).resolve()
    ref = None
    try:
        ref = _str(tomllib.loads(node_path.read_text(encoding="utf-8")), "alliance")
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        pass  # reported below by _read_toml, with the right label
    alliance_path = (node_path.parent / ref).resolve() if ref else None
    problems = _Problems(alliance_path.parent if alliance_path else node_path.parent.parent)
    data = _read_toml(node_path, problems)
    if alliance_path is None or not alliance_path.is_file():
        if alliance_path is not None:
            problems.add(node_path, "alliance", f"alliance file {ref} not found")
        alliance = _Alliance(path=alliance_path or node_path)
    else:
        alliance = _check_alliance(alliance_path, problems)
    node = _check_node(node_path, data, alliance, problems) if data is not None else None
    if problems.lines or node is None:
        raise ConfigError(
            f"node config {node_path} has {len(problems.lines)} problem(s)",
            problems=problems.lines,
        )
    return _build_plan(alliance, node)


def check_alliance(folder: str | Path) -> list[str]:
    """Every problem in an alliance folder (alliance.toml and every nodes/*.toml); [] if none."""
    root = Path(folder).resolve()
    problems = _Problems(root)
    alliance = _check_alliance(root / ALLIANCE_FILE, problems)
    binds: dict[tuple[str, int], tuple[Path, str]] = {}
    node_ids: dict[str, Path] = {}
    for path in sorted((root / NODES_DIR).glob("*.toml")):
        data = _read_toml(path, problems)
        if data is None:
            continue
        node = _check_node(path, data, alliance, problems)
        ref = _str(data, "alliance")
        if ref is not None and (path.parent / ref).resolve() != alliance.path:
            problems.add(path, "alliance", f"{ref} is not this folder's {ALLIANCE_FILE}")
        node_id = _str(data, "node_id")
        if node_id is not None:
            if node_id in node_ids:
                problems.add(
                    path, "node_id", f"{node_id!r} is also {problems.label(node_ids[node_id])}"
                )
            node_ids.setdefault(node_id, path)
            if path.stem != node_id:
                problems.add(path, "node_id", f"{node_id!r} does not match the file name")
        for key, bind in node.binds.items():
            clash = next(
                (owner for addr, owner in binds.items() if owner[0] != path and _clash(bind, addr)),
                None,
            )
            if clash is not None:
                problems.add(
                    path, key, f"{_str(data, key)} is also {clash[1]} of {problems.label(clash[0])}"
                )
            binds.setdefault(bind, (path, key))
    return problems.lines


def files_hash(paths: Sequence[Path]) -> str:
    """SHA-256 over the names and bytes of config files, to notice edits made after start."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(str(path).encode("utf-8") + b"\0")
        try:
            content = Path(path).read_bytes()
        except OSError:
            digest.update(b"\0missing\0")
            continue
        digest.update(hashlib.sha256(content).digest())
    return digest.hexdigest()
