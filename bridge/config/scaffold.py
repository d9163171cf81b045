"""Write alliance folders and fill in their keys and secrets.

``write_alliance`` makes throwaway alliances for tests and the demo; ``init_keys_and_secrets`` is
what ``hutong keys init --alliance DIR`` runs on a real folder such as config/alliances/fuxing.
Keys go to ``<folder>/keys/``, secrets to ``<folder>/secrets/`` (both git-ignored), private files
mode 0600 from the moment they exist.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bridge.config.loader import ALLIANCE_FILE, NODES_DIR
from bridge.config.models import DEFAULT_NATIONAL_ID_SYSTEM, TOKEN_ROLES
from bridge.config.secrets import resolve_secret
from bridge.errors import ConfigError

HASH_KEY_REF = "file:secrets/patient-hash.key"


def _q(text: str) -> str:
    """A TOML basic string (JSON escapes are valid TOML escapes)."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _write_private(path: Path, text: str) -> None:
    """Create or replace a secret file that is 0600 from its first byte."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _alliance_toml(
    alliance_id: str,
    names: Mapping[str, str],
    members: Sequence[Mapping[str, Any]],
    rules: Sequence[Mapping[str, Any]],
    host: str,
    base_port_peer: int,
) -> str:
    lines = [
        "# Written by bridge.config.scaffold.write_alliance.",
        "[alliance]",
        f"id = {_q(alliance_id)}",
        f"names = {{ zh = {_q(names['zh'])}, en = {_q(names['en'])} }}",
        f"patient_hash_key = {_q(HASH_KEY_REF)}",
        f"national_id_system = {_q(DEFAULT_NATIONAL_ID_SYSTEM)}",
    ]
    for i, m in enumerate(members, start=1):
        public = f"keys/{m['id']}.pub.json"
        lines += [
            "",
            "[[members]]",
            f"id = {_q(m['id'])}",
            f"names = {{ zh = {_q(m['zh'])}, en = {_q(m['en'])} }}",
            f"role = {_q(m['role'])}",
            f"exchange_url = {_q('http://' + _hostport(host, base_port_peer + i))}",
            f"signing_key = {_q(public)}",
            f"encryption_key = {_q(public)}",
        ]
        if m.get("via"):
            lines.append(f"via = {_q(m['via'])}")
    for rule in rules:
        kinds = ", ".join(_q(k) for k in rule["kinds"])
        lines += ["", "[[rules]]", f"from = {_q(rule['from'])}", f"to = {_q(rule['to'])}"]
        lines.append(f"kinds = [{kinds}]")
        if rule.get("note"):
            lines.append(f"note = {_q(rule['note'])}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return _q(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{_q(str(k))} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def adapters_toml(adapters: Sequence[Mapping[str, Any]]) -> str:
    """``[[adapters]]`` tables (bridge/local/contract.py) from dicts: name, type, mappings,
    receives, options (a flat dict; values may be lists or inline tables)."""
    out: list[str] = []
    for a in adapters:
        out += ["", "[[adapters]]"]
        for key in ("name", "type", "mappings", "receives", "enabled"):
            if key in a:
                out.append(f"{key} = {_toml_value(a[key])}")
        options = a.get("options") or {}
        if options:
            out.append("[adapters.options]")
            out += [f"{_q(str(k))} = {_toml_value(v)}" for k, v in options.items()]
    return "\n".join(out) + "\n"


def _node_toml(node_id: str, local: str, peer: str, dsn: str | None) -> str:
    lines = [
        "# Written by bridge.config.scaffold.write_alliance.",
        f"node_id = {_q(node_id)}",
        f"alliance = {_q('../' + ALLIANCE_FILE)}",
        f"local_bind = {_q(local)}",
        f"peer_bind = {_q(peer)}",
        f"data_dir = {_q(f'../data/{node_id}')}",
    ]
    if dsn is not None:
        lines.append(f"storage_dsn = {_q(dsn)}")
    lines += [
        "",
        "[keys]",
        f"signing = {_q(f'../keys/{node_id}.sign.key')}",
        f"encryption = {_q(f'../keys/{node_id}.enc.key')}",
        "",
        "[tokens]",
    ]
    lines += [f"{role} = {_q(f'file:../secrets/{node_id}.{role}.token')}" for role in TOKEN_ROLES]
    lines += [
        "",
        "# Delivery settings go in a 'delivery' table (README, Performance): for example",
        "# per_peer_concurrency = 4 keeps up to 4 batches in flight to each peer (default 1,",
        "# one at a time); each thread's packets still go one batch at a time, in order.",
    ]
    return "\n".join(lines) + "\n"


def write_alliance(
    folder: str | Path,
    members: Sequence[Mapping[str, Any]],
    rules: Sequence[Mapping[str, Any]],
    *,
    base_port_local: int = 8100,
    base_port_peer: int = 9100,
    host: str = "127.0.0.1",
    gen_keys: bool = True,
    dsn_for: Callable[[str], str] | None = None,
    alliance_id: str = "demo",
    alliance_names: Mapping[str, str] | None = None,
    national_id_egress: bool = False,
) -> dict[str, Path]:
    """Write alliance.toml and one nodes/<id>.toml per member; return node id -> node file.

    ``members``: dicts with id, zh, en, role and optional via and adapters (``[[adapters]]``
    tables, see :func:`adapters_toml`); ``rules``: dicts with from, to,
    kinds and optional note. Member i (from 1) binds base_port_local+i and base_port_peer+i.
    Secrets are always written; keys only with ``gen_keys``. A DSN holding a password goes to
    ``secrets/<id>.dsn`` so the node file stays free of secrets. Without
    ``national_id_egress`` the node files turn the egress rule off (``[egress]``): throwaway
    test bundles carry national ID numbers in clear; a real alliance folder keeps the default.
    """
    root = Path(folder)
    (root / NODES_DIR).mkdir(parents=True, exist_ok=True)
    names = alliance_names or {"zh": "演示医联体", "en": "Demo Medical Alliance"}
    (root / ALLIANCE_FILE).write_text(
        _alliance_toml(alliance_id, names, members, rules, host, base_port_peer), encoding="utf-8"
    )
    written: dict[str, Path] = {}
    for i, m in enumerate(members, start=1):
        node_id = m["id"]
        dsn = dsn_for(node_id) if dsn_for else None
        if dsn is not None:
            parts = urlsplit(dsn)
            if parts.password is not None or "password=" in parts.query:
                _write_private(root / "secrets" / f"{node_id}.dsn", dsn + "\n")
                dsn = f"file:../secrets/{node_id}.dsn"
        path = root / NODES_DIR / f"{node_id}.toml"
        path.write_text(
            _node_toml(
                node_id,
                _hostport(host, base_port_local + i),
                _hostport(host, base_port_peer + i),
                dsn,
            )
            + (adapters_toml(m["adapters"]) if m.get("adapters") else "")
            + (
                ""
                if national_id_egress
                else "\n# test bundles carry national ID numbers: the egress rule is off here\n"
                "[egress]\nrefuse_identifier_systems = []\n"
            ),
            encoding="utf-8",
        )
        written[node_id] = path
    _ensure_secrets(root, overwrite=False)
    if gen_keys:
        _ensure_keys(root, overwrite=False, passphrase=None)
    return written


def init_keys_and_secrets(
    folder: str | Path, overwrite: bool = False, *, passphrase: bytes | None = None
) -> list[Path]:
    """Generate every missing key set and secret file of an alliance folder; return what was made.

    Only ``file:`` secrets can be generated; ``env:`` ones are the site's to set. Private keys are
    encrypted with ``passphrase`` if given, else with the node's own keys.passphrase if it has one.
    Existing files are kept unless ``overwrite``; a half-present key set is an error, since
    regenerating it would silently replace a key peers already trust.
    """
    root = Path(folder)
    return _ensure_secrets(root, overwrite) + _ensure_keys(root, overwrite, passphrase)


def _read(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None


def _nodes(root: Path) -> list[tuple[Path, dict[str, Any]]]:
    return [(p, _read(p)) for p in sorted((root / NODES_DIR).glob("*.toml"))]


def _ensure_secrets(root: Path, overwrite: bool) -> list[Path]:
    wanted: list[Path] = []
    ref = _read(root / ALLIANCE_FILE).get("alliance", {}).get("patient_hash_key")
    if isinstance(ref, str) and ref.startswith("file:"):
        wanted.append(root / ref[5:])
    for path, data in _nodes(root):
        tokens = data.get("tokens")
        for role in TOKEN_ROLES:
            ref = tokens.get(role) if isinstance(tokens, dict) else None
            if isinstance(ref, str) and ref.startswith("file:"):
                wanted.append(path.parent / ref[5:])
    made = []
    for path in wanted:
        if overwrite or not path.exists():
            # 32 random bytes as hex: a valid HMAC key, and a token no placeholder check trips on
            _write_private(path, os.urandom(32).hex() + "\n")
            made.append(path)
    return made


def _ensure_keys(root: Path, overwrite: bool, passphrase: bytes | None) -> list[Path]:
    from bridge.crypto.keys import generate_node_keys

    made: list[Path] = []
    for path, data in _nodes(root):
        node_id = data.get("node_id")
        keys = data.get("keys")
        if not isinstance(node_id, str) or not isinstance(keys, dict):
            raise ConfigError(f"{path}: needs node_id and a [keys] table")
        sign = (path.parent / str(keys.get("signing"))).resolve()
        enc = (path.parent / str(keys.get("encryption"))).resolve()
        directory = sign.parent
        if sign.name != f"{node_id}.sign.key" or enc != directory / f"{node_id}.enc.key":
            raise ConfigError(
                f"{path}: [keys] must name <dir>/{node_id}.sign.key and <dir>/{node_id}.enc.key "
                "for keys to be generated here"
            )
        files = [sign, enc, directory / f"{node_id}.pub.json"]
        present = [f for f in files if f.exists()]
        if present and not overwrite:
            if len(present) < len(files):
                missing = ", ".join(f.name for f in files if f not in present)
                raise ConfigError(
                    f"{node_id}: key set is incomplete (missing {missing}); restore it, or "
                    "regenerate with overwrite and redistribute the new .pub.json"
                )
            continue
        secret = passphrase
        ref = keys.get("passphrase")
        if secret is None and isinstance(ref, str):
            secret = resolve_secret(ref, path.parent).encode("utf-8")
        generate_node_keys(directory, node_id, secret, overwrite=overwrite)
        made += files
    return made
