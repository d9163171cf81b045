"""Personal accounts and API tokens, stored in the node's own database (SQLite or PostgreSQL).

Passwords are kept only as argon2id hashes; API tokens only as their sha256 (a token is a
random 256-bit secret, so a fast digest is enough and lets a request be matched by index).
"""

from __future__ import annotations

from datetime import datetime

from sqlmodel import Field, SQLModel

from bridge.store.types import UTCDateTime


class UserAccount(SQLModel, table=True):
    """One person who logs in to this node's pages."""

    __tablename__ = "user_account"

    name: str = Field(primary_key=True, max_length=64)  # login name, also the audit actor
    display: str | None = Field(default=None, max_length=128)
    roles: str = Field(max_length=128)  # comma-separated: clinician, it, auditor, admin
    password_hash: str | None = Field(default=None, max_length=256)  # argon2id; None: LDAP only
    totp_secret: str | None = Field(default=None, max_length=64)  # base32; None: no 2nd factor
    disabled: bool = False
    failed: int = 0  # failed logins in a row
    locked_until: datetime | None = Field(default=None, sa_type=UTCDateTime)
    created_at: datetime = Field(sa_type=UTCDateTime)
    password_changed_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    last_login_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class ApiToken(SQLModel, table=True):
    """A bearer token issued to a named user or a named system client (an HIS, a script)."""

    __tablename__ = "api_token"

    id: str = Field(primary_key=True, max_length=16)  # public handle: list, revoke
    digest: str = Field(max_length=64, unique=True, index=True)  # sha256 hex of the secret
    owner: str = Field(max_length=64, index=True)  # user name or client name
    owner_kind: str = Field(max_length=8)  # user | client
    roles: str = Field(max_length=128)
    created_at: datetime = Field(sa_type=UTCDateTime)
    revoked_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    last_used_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


USERS = UserAccount.__table__  # type: ignore[attr-defined]
TOKENS = ApiToken.__table__  # type: ignore[attr-defined]
