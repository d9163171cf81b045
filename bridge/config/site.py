"""``hutong site init``: one site's files in a copy of the alliance folder, touching no other
member's.

A real alliance is set up site by site: each hospital holds its own copy of ``alliance.toml``,
makes its own keys, tokens and node file, sends its public key file to the others and receives
the alliance's patient-hash key from the coordinator. This writes, for one member only:

- ``keys/<id>.sign.key``, ``keys/<id>.enc.key`` (private, 0600) and ``keys/<id>.pub.json``;
- ``secrets/<id>.<role>.token`` for each local-API role (0600, random);
- the alliance's patient-hash key file: random with ``new_hash_key`` (the coordinator, once),
  else a placeholder the node refuses to start with until the real key is copied in;
- ``nodes/<id>.toml`` (binds from the member's ``exchange_url`` and ``local_bind``).

Files already present are kept (never a silent new key a peer already trusts).
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from bridge.config.models import TOKEN_ROLES
from bridge.config.scaffold import _node_toml, _write_private
from bridge.errors import ConfigError

PLACEHOLDER = (
    "REPLACE-ME: copy the alliance's patient-hash key here (the same file on every "
    "site; the coordinator made it with --new-patient-hash-key)\n"
)


@dataclass
class SiteReport:
    made: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)
    node_file: Path | None = None
    public_keys: Path | None = None
    hash_key_placeholder: bool = False


def init_site(
    alliance_dir: Path,
    node_id: str,
    *,
    local_bind: str | None = None,
    peer_bind: str | None = None,
    new_hash_key: bool = False,
    passphrase: bytes | None = None,
) -> SiteReport:
    from bridge.crypto.keys import generate_node_keys

    root = alliance_dir
    path = root / "alliance.toml"
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"{path} not found: copy the alliance's alliance.toml there first"
        ) from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {type(exc).__name__}") from None
    members = data.get("members") or []
    ids = [m.get("id") for m in members if isinstance(m, dict)]
    if node_id not in ids:
        raise ConfigError(
            f"{node_id!r} is not a member of {path} (members: "
            f"{', '.join(str(i) for i in ids) or 'none'})"
        )
    member = members[ids.index(node_id)]
    url = urlsplit(str(member.get("exchange_url", "")))
    if not url.hostname or not url.port:
        raise ConfigError(f"{path}: member {node_id} needs an exchange_url with a port")
    if peer_bind is None:
        try:
            ipaddress.ip_address(url.hostname)
            host = url.hostname
        except ValueError:
            host = "0.0.0.0"  # a name: listen on every interface, the firewall decides
        peer_bind = f"{host}:{url.port}"
    if local_bind is None:
        port = url.port - 1000 if url.port > 2024 else url.port + 1
        local_bind = f"127.0.0.1:{port}"
    if local_bind == peer_bind:
        raise ConfigError(f"local bind {local_bind} must differ from the peer bind")
    report = SiteReport()

    keys = root / "keys"
    files = [
        keys / f"{node_id}.sign.key",
        keys / f"{node_id}.enc.key",
        keys / f"{node_id}.pub.json",
    ]
    present = [f for f in files if f.exists()]
    if present and len(present) < len(files):
        raise ConfigError(
            f"{node_id}: key set in {keys} is incomplete (missing "
            f"{', '.join(f.name for f in files if f not in present)}); restore it"
        )
    if present:
        report.kept += files
    else:
        keys.mkdir(mode=0o700, parents=True, exist_ok=True)
        generate_node_keys(keys, node_id, passphrase)
        report.made += files
    report.public_keys = files[2]

    for role in TOKEN_ROLES:
        token = root / "secrets" / f"{node_id}.{role}.token"
        if token.exists():
            report.kept.append(token)
        else:
            _write_private(token, os.urandom(32).hex() + "\n")
            report.made.append(token)

    ref = (data.get("alliance") or {}).get("patient_hash_key")
    if isinstance(ref, str) and ref.startswith("file:"):
        hash_key = root / ref[5:]
        if hash_key.exists():
            report.kept.append(hash_key)
            report.hash_key_placeholder = hash_key.read_text(encoding="utf-8").startswith(
                "REPLACE-ME"
            )
        else:
            _write_private(hash_key, os.urandom(32).hex() + "\n" if new_hash_key else PLACEHOLDER)
            report.made.append(hash_key)
            report.hash_key_placeholder = not new_hash_key

    node_file = root / "nodes" / f"{node_id}.toml"
    report.node_file = node_file
    if node_file.exists():
        report.kept.append(node_file)
    else:
        node_file.parent.mkdir(parents=True, exist_ok=True)
        node_file.write_text(_node_toml(node_id, local_bind, peer_bind, None), encoding="utf-8")
        report.made.append(node_file)
    return report
