"""Node key files: modes, passphrases, refusals, and the public JSON."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from bridge.crypto import keys
from bridge.errors import KeyFileError


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_key_id_is_k_and_16_hex_of_sha256() -> None:
    raw = bytes(range(32))
    assert keys.key_id(raw) == "k" + hashlib.sha256(raw).hexdigest()[:16]
    assert keys.key_id(raw) == "k630dcd2966c43366"


def test_generate_writes_0600_keys_and_matching_public_json(tmp_path: Path) -> None:
    old_umask = os.umask(0)  # even a permissive umask must not widen the key files
    try:
        public = keys.generate_node_keys(tmp_path / "keys", "hosp-a")
    finally:
        os.umask(old_umask)
    d = tmp_path / "keys"
    assert mode(d / "hosp-a.sign.key") == 0o600
    assert mode(d / "hosp-a.enc.key") == 0o600
    assert mode(d) == 0o700
    pem = (d / "hosp-a.sign.key").read_bytes()
    assert isinstance(serialization.load_pem_private_key(pem, password=None), Ed25519PrivateKey)
    with pytest.raises(TypeError):  # not encrypted: the library refuses a password for it
        serialization.load_pem_private_key(pem, password=b"x")

    sign = keys.load_signing_key(d / "hosp-a.sign.key")
    enc = keys.load_encryption_key(d / "hosp-a.enc.key")
    sign_raw = sign.public_key().public_bytes_raw()
    enc_raw = enc.public_key().public_bytes_raw()
    expected = {
        "node": "hosp-a",
        "signing": "ed25519:" + base64.b64encode(sign_raw).decode(),
        "encryption": "x25519:" + base64.b64encode(enc_raw).decode(),
        "signing_id": "k" + hashlib.sha256(sign_raw).hexdigest()[:16],
        "encryption_id": "k" + hashlib.sha256(enc_raw).hexdigest()[:16],
    }
    assert public == expected
    assert json.loads((d / "hosp-a.pub.json").read_text()) == expected
    assert keys.public_text(sign) == keys.public_text(sign.public_key()) == expected["signing"]
    assert keys.public_text(enc) == expected["encryption"]


def test_key_files_are_created_exclusively_with_mode_0600(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, int, int]] = []
    real_open = os.open

    def spy(path: Any, flags: int, mode: int = 0o777, *a: Any, **kw: Any) -> int:
        calls.append((str(path), flags, mode))
        return real_open(path, flags, mode, *a, **kw)

    monkeypatch.setattr(os, "open", spy)
    keys.generate_node_keys(tmp_path, "n1")
    key_calls = [c for c in calls if c[0].endswith(".key")]
    assert len(key_calls) == 2
    for _, flags, mode_ in key_calls:
        assert flags & os.O_CREAT and flags & os.O_EXCL
        assert mode_ == 0o600


def test_passphrase_encrypts_and_wrong_passphrase_is_refused(tmp_path: Path) -> None:
    keys.generate_node_keys(tmp_path, "hosp-b", passphrase=b"correct horse")
    sign_path = tmp_path / "hosp-b.sign.key"
    with pytest.raises(TypeError):  # encrypted at rest: unreadable without the passphrase
        serialization.load_pem_private_key(sign_path.read_bytes(), password=None)
    assert isinstance(keys.load_signing_key(sign_path, b"correct horse"), Ed25519PrivateKey)
    assert isinstance(
        keys.load_encryption_key(tmp_path / "hosp-b.enc.key", b"correct horse"), X25519PrivateKey
    )
    with pytest.raises(KeyFileError, match=r"wrong passphrase for key file .*hosp-b.sign.key"):
        keys.load_signing_key(sign_path, b"battery staple")
    with pytest.raises(KeyFileError, match="encrypted and no passphrase was given"):
        keys.load_signing_key(sign_path)


def test_passphrase_for_unencrypted_key_is_refused(tmp_path: Path) -> None:
    keys.generate_node_keys(tmp_path, "n")
    with pytest.raises(KeyFileError, match="not encrypted, but a passphrase was given"):
        keys.load_signing_key(tmp_path / "n.sign.key", b"pw")


def test_empty_passphrase_is_refused(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="passphrase is empty"):
        keys.generate_node_keys(tmp_path, "n", passphrase=b"")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("file_mode", [0o644, 0o640, 0o604, 0o660])
def test_group_or_world_readable_key_is_refused(tmp_path: Path, file_mode: int) -> None:
    keys.generate_node_keys(tmp_path, "n")
    path = tmp_path / "n.sign.key"
    path.chmod(file_mode)
    with pytest.raises(KeyFileError, match=f"{path} is readable by group or others") as caught:
        keys.load_signing_key(path)
    assert f"{file_mode:04o}" in str(caught.value) and "chmod 600" in str(caught.value)


def test_0400_key_is_accepted(tmp_path: Path) -> None:
    keys.generate_node_keys(tmp_path, "n")
    path = tmp_path / "n.sign.key"
    path.chmod(0o400)
    assert isinstance(keys.load_signing_key(path), Ed25519PrivateKey)


def test_missing_key_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match=r"nope.sign.key does not exist"):
        keys.load_signing_key(tmp_path / "nope.sign.key")


def test_wrong_key_type_is_refused(tmp_path: Path) -> None:
    keys.generate_node_keys(tmp_path, "n")
    with pytest.raises(KeyFileError, match=r"n.enc.key holds an X25519 key, expected an Ed25519"):
        keys.load_signing_key(tmp_path / "n.enc.key")
    with pytest.raises(KeyFileError, match=r"n.sign.key holds an Ed25519 key, expected an X25519"):
        keys.load_encryption_key(tmp_path / "n.sign.key")


def test_garbage_key_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.key"
    path.write_bytes(b"not a key")
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match=r"bad.key is not a PEM PKCS8 private key"):
        keys.load_signing_key(path)


def test_existing_keys_are_not_overwritten(tmp_path: Path) -> None:
    first = keys.generate_node_keys(tmp_path, "n")
    before = (tmp_path / "n.sign.key").read_bytes()
    with pytest.raises(KeyFileError, match="already exist, not overwriting"):
        keys.generate_node_keys(tmp_path, "n")
    assert (tmp_path / "n.sign.key").read_bytes() == before
    second = keys.generate_node_keys(tmp_path, "n", overwrite=True)
    assert second["signing"] != first["signing"]
    assert mode(tmp_path / "n.sign.key") == 0o600
    assert json.loads((tmp_path / "n.pub.json").read_text()) == second
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n.enc.key", "n.pub.json", "n.sign.key"]


def test_one_existing_file_blocks_all(tmp_path: Path) -> None:
    (tmp_path / "n.enc.key").write_bytes(b"keep me")
    with pytest.raises(KeyFileError, match=r"n.enc.key"):
        keys.generate_node_keys(tmp_path, "n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n.enc.key"]


@pytest.mark.parametrize("node_id", ["", "../x", "a/b", ".hidden", "x" * 200])
def test_unsafe_node_id_is_refused(tmp_path: Path, node_id: str) -> None:
    with pytest.raises(KeyFileError, match="not usable as a file name"):
        keys.generate_node_keys(tmp_path, node_id)


def test_parse_public_key_round_trip() -> None:
    sign, enc = Ed25519PrivateKey.generate(), X25519PrivateKey.generate()
    parsed_sign = keys.parse_public_key(keys.public_text(sign))
    parsed_enc = keys.parse_public_key(keys.public_text(enc))
    assert isinstance(parsed_sign, Ed25519PublicKey) and isinstance(parsed_enc, X25519PublicKey)
    assert parsed_sign.public_bytes_raw() == sign.public_key().public_bytes_raw()
    assert parsed_enc.public_bytes_raw() == enc.public_key().public_bytes_raw()


@pytest.mark.parametrize(
    "text, message",
    [
        ("rsa:AAAA", "must start with 'ed25519:' or 'x25519:'"),
        ("AAAA", "must start with 'ed25519:' or 'x25519:'"),
        ("ed25519:not base64!", "must be 32 bytes of standard base64"),
        ("x25519:" + base64.b64encode(bytes(31)).decode(), "must be 32 bytes"),
        ("ed25519:" + base64.urlsafe_b64encode(b"\xff" * 32).decode(), "standard base64"),
    ],
)
def test_parse_public_key_refuses_bad_text(text: str, message: str) -> None:
    with pytest.raises(KeyFileError, match=message):
        keys.parse_public_key(text)


def test_b64_helpers_are_strict() -> None:
    assert keys.unb64(keys.b64(b"\x00\x01")) == b"\x00\x01"
    assert keys.unb64("AAE") == b""  # missing padding
    assert keys.unb64("AAF=") == b""  # same bytes as AAE=, non-canonical spelling
    assert keys.unb64(12) == b""
