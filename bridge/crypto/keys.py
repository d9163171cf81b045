"""Node key files: one Ed25519 signing key and one X25519 encryption key per node.

Private keys are PEM PKCS8 files that are never readable by group or others, not even for a
moment while they are written; the public half goes to ``<node>.pub.json`` for the directory.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import stat
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeAlias

import orjson
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from bridge.errors import KeyFileError

PublicKey: TypeAlias = Ed25519PublicKey | X25519PublicKey
AnyKey: TypeAlias = Ed25519PrivateKey | Ed25519PublicKey | X25519PrivateKey | X25519PublicKey

_NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_PRIVATE_MODE = 0o600


def b64(raw: bytes) -> str:
    """Standard padded base64 text: the one spelling of raw bytes in key texts and headers."""
    return base64.b64encode(raw).decode("ascii")


def unb64(value: Any) -> bytes:
    """Strict, canonical base64 or b'' (so every encoded value has exactly one spelling)."""
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, TypeError, ValueError):
        return b""
    return raw if isinstance(value, str) and b64(raw) == value else b""


@lru_cache(maxsize=1024)
def key_id(public_raw: bytes) -> str:
    """Short stable name of a public key, so headers and logs can say which key was used."""
    return "k" + hashlib.sha256(public_raw).hexdigest()[:16]


def public_raw(key: AnyKey) -> bytes:
    """The 32 raw public bytes of a private or public key (what key ids and HKDF salts use)."""
    if isinstance(key, (Ed25519PrivateKey, X25519PrivateKey)):
        return key.public_key().public_bytes_raw()
    if isinstance(key, (Ed25519PublicKey, X25519PublicKey)):
        return key.public_bytes_raw()
    raise KeyFileError(f"not an Ed25519 or X25519 key: {type(key).__name__}")


def public_text(key: AnyKey) -> str:
    """``ed25519:<b64>`` / ``x25519:<b64>``: the one text form used in directories and pub.json."""
    if isinstance(key, (Ed25519PrivateKey, Ed25519PublicKey)):
        prefix = "ed25519"
    elif isinstance(key, (X25519PrivateKey, X25519PublicKey)):
        prefix = "x25519"
    else:
        raise KeyFileError(f"not an Ed25519 or X25519 key: {type(key).__name__}")
    return f"{prefix}:{b64(public_raw(key))}"


def parse_public_key(text: str) -> PublicKey:
    """Read a public key from its text form; a typo in a directory must fail loudly, not later."""
    if not isinstance(text, str):
        raise KeyFileError(f"public key must be a string, got {type(text).__name__}")
    algo, sep, text_b64 = text.strip().partition(":")
    if not sep or algo not in ("ed25519", "x25519"):
        raise KeyFileError(f"public key must start with 'ed25519:' or 'x25519:', got '{algo[:16]}'")
    raw = unb64(text_b64)
    if len(raw) != 32:
        raise KeyFileError(f"{algo} public key must be 32 bytes of standard base64")
    if algo == "ed25519":
        return Ed25519PublicKey.from_public_bytes(raw)
    return X25519PublicKey.from_public_bytes(raw)


def generate_node_keys(
    directory: Path,
    node_id: str,
    passphrase: bytes | None = None,
    *,
    overwrite: bool = False,
) -> dict[str, str]:
    """Create a node's key files; refuses to replace existing keys so a typo cannot lose one."""
    if not isinstance(node_id, str) or not _NODE_ID.fullmatch(node_id):
        raise KeyFileError(
            f"node id {node_id!r} is not usable as a file name (letters, digits, '.', '_', '-')"
        )
    if passphrase is not None and not isinstance(passphrase, bytes):
        raise KeyFileError("passphrase must be bytes")
    if passphrase is not None and len(passphrase) == 0:
        raise KeyFileError("passphrase is empty; pass None for unencrypted key files")
    directory = Path(directory)
    sign_path = directory / f"{node_id}.sign.key"
    enc_path = directory / f"{node_id}.enc.key"
    pub_path = directory / f"{node_id}.pub.json"
    if not overwrite:
        existing = [str(p) for p in (sign_path, enc_path, pub_path) if os.path.lexists(p)]
        if existing:
            raise KeyFileError(f"key files already exist, not overwriting: {', '.join(existing)}")
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise KeyFileError(f"cannot create key directory {directory}: {exc.strerror}") from None

    enc: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    signing = Ed25519PrivateKey.generate()
    encryption = X25519PrivateKey.generate()
    for path, key in ((sign_path, signing), (enc_path, encryption)):
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)
        _write_file(path, pem, _PRIVATE_MODE, overwrite)

    public = {
        "node": node_id,
        "signing": public_text(signing),
        "encryption": public_text(encryption),
        "signing_id": key_id(public_raw(signing)),
        "encryption_id": key_id(public_raw(encryption)),
    }
    pub_json = orjson.dumps(public, option=orjson.OPT_INDENT_2) + b"\n"
    _write_file(pub_path, pub_json, 0o644, overwrite)
    return public


def load_signing_key(path: Path | str, passphrase: bytes | None = None) -> Ed25519PrivateKey:
    """Load this node's Ed25519 signing key, refusing files others could have read."""
    key = _load_private(Path(path), passphrase)
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(
            f"key file {path} holds an {_kind(key)} key, expected an Ed25519 signing key"
        )
    return key


def load_encryption_key(path: Path | str, passphrase: bytes | None = None) -> X25519PrivateKey:
    """Load this node's X25519 encryption key, refusing files others could have read."""
    key = _load_private(Path(path), passphrase)
    if not isinstance(key, X25519PrivateKey):
        raise KeyFileError(
            f"key file {path} holds an {_kind(key)} key, expected an X25519 encryption key"
        )
    return key


# -- internals ---------------------------------------------------------------------------------


def _write_file(path: Path, data: bytes, mode: int, overwrite: bool) -> None:
    """Create with the final mode from the first syscall (O_EXCL: never follow or reuse a file).

    With ``overwrite`` the data goes to a fresh temporary file that then replaces ``path``.
    """
    target = path.with_name(f".{path.name}.{os.getpid()}.tmp") if overwrite else path
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(target, flags, mode)
    except FileExistsError:
        raise KeyFileError(f"key file {target} already exists, not overwriting") from None
    except OSError as exc:
        raise KeyFileError(f"cannot create key file {target}: {exc.strerror}") from None
    try:
        try:
            if hasattr(os, "fchmod"):
                os.fchmod(fd, mode)  # a umask like 0o200 must not leave a different mode
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(target, path)
    except OSError as exc:
        if overwrite:
            _unlink_quietly(target)
        raise KeyFileError(f"cannot write key file {path}: {exc.strerror}") from None


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _load_private(path: Path, passphrase: bytes | None) -> Any:
    """Read and decrypt a PEM PKCS8 private key; every failure is one KeyFileError naming path."""
    if passphrase is not None and not isinstance(passphrase, bytes):
        raise KeyFileError("passphrase must be bytes")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise KeyFileError(f"key file {path} does not exist") from None
    except OSError as exc:
        raise KeyFileError(f"key file {path} cannot be opened: {exc.strerror}") from None
    try:
        st = os.fstat(fd)  # check the file we opened, not whatever the path names now
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"key file {path} is not a regular file")
        if os.name == "posix" and st.st_mode & 0o077:
            raise KeyFileError(
                f"key file {path} is readable by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}"
            )
        if st.st_size > 64 * 1024:
            raise KeyFileError(f"key file {path} is {st.st_size} bytes, too big for a key")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read()
    except OSError as exc:
        raise KeyFileError(f"key file {path} cannot be read: {exc.strerror}") from None
    finally:
        os.close(fd)

    try:
        return serialization.load_pem_private_key(data, password=passphrase or None)
    except TypeError:
        if passphrase:
            raise KeyFileError(
                f"key file {path} is not encrypted, but a passphrase was given"
            ) from None
        raise KeyFileError(f"key file {path} is encrypted and no passphrase was given") from None
    except ValueError:
        if passphrase and _is_encrypted(data):
            raise KeyFileError(f"wrong passphrase for key file {path}") from None
        raise KeyFileError(f"key file {path} is not a PEM PKCS8 private key") from None
    except UnsupportedAlgorithm:
        raise KeyFileError(f"key file {path} holds a key of an unsupported type") from None


def _is_encrypted(data: bytes) -> bool:
    """True if the PEM key needs a passphrase (the library says so when given none)."""
    try:
        serialization.load_pem_private_key(data, password=None)
    except TypeError:
        return True
    except (ValueError, UnsupportedAlgorithm):
        return False
    return False


def _kind(key: Any) -> str:
    name = type(key).__name__
    return name.removesuffix("PrivateKey").removeprefix("_") or name
