"""Secret references: a config file says where a secret lives (``env:NAME``, ``file:path``), never
the secret itself, so config files can be committed, diffed and hashed into the audit trail.

Placeholders are refused: a node must not go live with ``changeme`` as its clinician token.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from bridge.errors import ConfigError

MIN_SECRET_CHARS = 16
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PLACEHOLDER = re.compile(
    r"change[-_ ]?me|placeholder|secret|passw(or)?d|example|todo|fixme|replace[-_ ]?me|x{3,}",
    re.IGNORECASE,
)


def is_secret_ref(value: str) -> bool:
    return value.startswith(("env:", "file:"))


def check_secret_ref(value: str) -> str:
    """Validate the form of a reference (not its target); used by the file models."""
    if value.startswith("env:"):
        if not _ENV_NAME.fullmatch(value[4:]):
            raise ValueError(f"{value!r}: env: needs a variable name, e.g. env:HUTONG_IT_TOKEN")
        return value
    if value.startswith("file:"):
        if not value[5:]:
            raise ValueError("file: needs a path, e.g. file:../secrets/node.it.token")
        return value
    raise ValueError(
        "must be a secret reference 'env:NAME' or 'file:path' (no inline secrets in config files)"
    )


def placeholder_problem(value: str) -> str | None:
    """Why ``value`` looks like a placeholder rather than a real secret, or None."""
    if not value.strip():
        return "is empty"
    found = _PLACEHOLDER.search(value)
    if found:
        return f"looks like a placeholder ({found.group(0)!r})"
    if len(value) < MIN_SECRET_CHARS:
        return f"is shorter than {MIN_SECRET_CHARS} characters"
    return None


def resolve_secret(ref: str, base_dir: str | Path, *, allow_placeholder: bool = False) -> str:
    """Read the secret ``ref`` points to; ``file:`` paths are relative to ``base_dir``.

    Raises ConfigError with one problem (without file/key prefix: the caller knows where the
    reference was written). A trailing newline in a secret file is not part of the secret.
    """
    try:
        check_secret_ref(ref)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if ref.startswith("env:"):
        name = ref[4:]
        value = os.environ.get(name)
        if value is None:
            raise ConfigError(f"environment variable {name} is not set")
        where = f"environment variable {name}"
    else:
        path = Path(base_dir) / ref[5:]
        try:
            value = path.read_text(encoding="utf-8").rstrip("\r\n")
        except FileNotFoundError:
            raise ConfigError(f"secret file {ref[5:]} not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ConfigError(f"cannot read secret file {ref[5:]}: {reason}") from None
        where = f"secret file {ref[5:]}"
    if not allow_placeholder:
        problem = placeholder_problem(value)
        if problem:
            raise ConfigError(
                f"{where} {problem}; a node refuses to start with a placeholder secret"
            )
    return value
