"""Accounts of named people and system clients: add, disable, roles, passwords, login, tokens.

Every change and every login attempt is appended to the audit chain in the same transaction
as the change (actions ``login``, ``login-failed``, ``logout``, ``password``, ``account``,
``token``). Typed secrets (passwords, TOTP codes, tokens) never enter the audit or a log; a
login name that matches no account is recorded as ``user:?`` (people type passwords into the
name field).
"""

from __future__ import annotations

import builtins
import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, insert, select, update

from bridge.accounts.tables import TOKENS, USERS
from bridge.audit.events import AuditEntry
from bridge.errors import Forbidden, NotFound, Unauthorized

if TYPE_CHECKING:
    from bridge.context import NodeContext

ROLES = ("clinician", "it", "auditor", "admin")
NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
MIN_PASSWORD = 10


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is asking: a person (``user``), a system client (``client``) or, for one release,
    whoever holds a shared role token (``shared``)."""

    name: str
    kind: str  # user | client | shared
    roles: tuple[str, ...]

    @property
    def actor(self) -> str:
        """The audit actor: ``user:alice``, ``client:his-main`` or ``role:clinician``."""
        return f"role:{self.name}" if self.kind == "shared" else f"{self.kind}:{self.name}"

    def acting(self, allowed: tuple[str, ...] | list[str]) -> str | None:
        """The first of this principal's roles that ``allowed`` lets in, or None."""
        return next((r for r in self.roles if r in allowed), None)


def shared(role: str) -> Principal:
    return Principal(role, "shared", (role,))


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ValueError("names are 1-64 of a-z 0-9 . _ - starting with a letter or digit")
    return name


def check_roles(roles: list[str] | tuple[str, ...] | str) -> tuple[str, ...]:
    items = [r.strip() for r in (roles.split(",") if isinstance(roles, str) else roles)]
    items = [r for r in items if r]
    bad = [r for r in items if r not in ROLES]
    if bad or not items:
        raise ValueError(f"roles are one or more of {', '.join(ROLES)}")
    return tuple(dict.fromkeys(items))


def check_password(password: str) -> str:
    if not isinstance(password, str) or len(password) < MIN_PASSWORD:
        raise ValueError(f"a password has at least {MIN_PASSWORD} characters")
    return password


def token_digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "replace")).hexdigest()


class Accounts:
    """The node's account book over its store; ``by`` is always the actor making a change."""

    def __init__(self, ctx: NodeContext) -> None:
        from argon2 import PasswordHasher

        self.ctx = ctx
        web = ctx.plan.web
        self.lockout_after = web.lockout_after
        self.lockout_s = web.lockout_s
        self.ldap_url = web.ldap_url
        self.ldap_user_dn = web.ldap_user_dn
        self.hasher = PasswordHasher()  # argon2id, the library's memory-hard defaults
        self._dummy: str | None = None

    def dummy_hash(self) -> str:
        """Verified against when the name is unknown, so both paths cost one argon2 run.
        Made on first use, not at start-up: one argon2 run touches 64 MiB (the defaults'
        memory cost), which would set every node's peak RSS even where nobody logs in."""
        if self._dummy is None:
            self._dummy = self.hasher.hash(secrets.token_urlsafe(16))
        return self._dummy

    # -- audit -------------------------------------------------------------------------------

    def _audit(
        self,
        conn: Connection,
        action: str,
        by: str,
        *,
        outcome: str = "0",
        message: str | None = None,
        role: str | None = None,
        address: str | None = None,
        **extra: Any,
    ) -> None:
        self.ctx.audit.append(
            conn,
            [
                AuditEntry(
                    action=action,
                    outcome=outcome,
                    actor=by,
                    actor_role=role,
                    address=address,
                    message=message,
                    at=self.ctx.now(),
                    extra=extra or None,
                )
            ],
        )

    # -- accounts ----------------------------------------------------------------------------

    def add(
        self,
        name: str,
        roles: list[str] | str,
        *,
        password: str | None = None,
        display: str | None = None,
        totp: bool = False,
        by: str = "cli",
    ) -> str | None:
        """A new account; returns its TOTP secret when asked for one (shown once)."""
        check_name(name)
        role_list = check_roles(roles)
        if password is None and not self.ldap_url:
            raise ValueError("a password is required (no directory is configured)")
        pw_hash = self.hasher.hash(check_password(password)) if password is not None else None
        secret = None
        if totp:
            import pyotp

            secret = pyotp.random_base32()
        now = self.ctx.now()
        with self.ctx.store.write() as conn:
            if conn.execute(select(USERS.c.name).where(USERS.c.name == name)).first():
                raise ValueError("an account with that name exists")
            conn.execute(
                insert(USERS).values(
                    name=name,
                    display=display,
                    roles=",".join(role_list),
                    password_hash=pw_hash,
                    totp_secret=secret,
                    disabled=False,
                    failed=0,
                    created_at=now,
                    password_changed_at=now if pw_hash else None,
                )
            )
            self._audit(
                conn,
                "account",
                by,
                message="account added",
                account=name,
                roles=",".join(role_list),
                totp=bool(secret),
            )
        return secret

    def list(self) -> list[dict[str, Any]]:
        with self.ctx.store.read() as conn:
            rows = conn.execute(select(USERS).order_by(USERS.c.name)).all()
        out = []
        for r in rows:
            d = dict(r._mapping)
            d["totp"] = d.pop("totp_secret") is not None
            d["password"] = d.pop("password_hash") is not None
            d["locked"] = bool(d["locked_until"] and d["locked_until"] > self.ctx.now())
            out.append(d)
        return out

    def get(self, name: str) -> dict[str, Any] | None:
        with self.ctx.store.read() as conn:
            row = conn.execute(select(USERS).where(USERS.c.name == name)).first()
        return dict(row._mapping) if row else None

    def _change(
        self,
        name: str,
        values: dict[str, Any],
        by: str,
        message: str,
        action: str = "account",
        **extra: Any,
    ) -> None:
        with self.ctx.store.write() as conn:
            n = conn.execute(update(USERS).where(USERS.c.name == name).values(**values)).rowcount
            if not n:
                raise NotFound("no account with that name")
            self._audit(conn, action, by, message=message, account=name, **extra)

    def disable(self, name: str, *, by: str = "cli") -> None:
        self._change(name, {"disabled": True}, by, "account disabled")
        with self.ctx.store.write() as conn:  # a disabled person's tokens stop with them
            conn.execute(
                update(TOKENS)
                .where(
                    TOKENS.c.owner == name,
                    TOKENS.c.owner_kind == "user",
                    TOKENS.c.revoked_at.is_(None),
                )
                .values(revoked_at=self.ctx.now())
            )

    def enable(self, name: str, *, by: str = "cli") -> None:
        self._change(
            name, {"disabled": False, "failed": 0, "locked_until": None}, by, "account enabled"
        )

    def set_roles(self, name: str, roles: builtins.list[str] | str, *, by: str = "cli") -> None:
        role_list = ",".join(check_roles(roles))
        self._change(name, {"roles": role_list}, by, "roles changed", roles=role_list)

    def reset_password(self, name: str, password: str, *, by: str = "cli") -> None:
        """A new password set by an administrator (or by the person: ``by`` is then them);
        also lifts a lockout."""
        pw_hash = self.hasher.hash(check_password(password))
        self._change(
            name,
            {
                "password_hash": pw_hash,
                "failed": 0,
                "locked_until": None,
                "password_changed_at": self.ctx.now(),
            },
            by,
            "password set",
            action="password",
        )

    # -- login -------------------------------------------------------------------------------

    def login(
        self, name: str, password: str, totp_code: str | None = None, address: str | None = None
    ) -> Principal:
        """The person, if the password (and second factor) is right and the account is usable;
        Unauthorized otherwise, with one message for every cause (no account probing)."""
        from argon2.exceptions import InvalidHashError, VerificationError

        refused = Unauthorized("wrong name or password, or the account is locked or disabled")
        known = isinstance(name, str) and NAME_RE.fullmatch(name) is not None
        row = self.get(name) if known else None
        now = self.ctx.now()
        ok = False
        why = "unknown account"
        if row is None:
            try:
                self.hasher.verify(self.dummy_hash(), password or "-")
            except (VerificationError, InvalidHashError):
                pass
        else:
            ok = self._check_secret(row, password)
            why = "wrong password"
            if ok and row["totp_secret"]:
                import pyotp

                ok = bool(
                    totp_code
                    and pyotp.TOTP(row["totp_secret"]).verify(totp_code.strip(), valid_window=1)
                )
                why = "wrong second factor"
            if row["disabled"]:
                ok, why = False, "account disabled"
            elif row["locked_until"] is not None and row["locked_until"] > now:
                ok, why = False, "account locked"
        roles = tuple(row["roles"].split(",")) if row else ()
        # a refusal is committed (counter, lock, audit) before it is raised
        with self.ctx.store.write() as conn:
            if row is None:
                self._audit(
                    conn, "login-failed", "user:?", outcome="4", message=why, address=address
                )
            elif not ok:
                failed = row["failed"] + 1
                values: dict[str, Any] = {"failed": failed}
                if failed >= self.lockout_after and why == "wrong password":
                    values["locked_until"] = now + timedelta(seconds=self.lockout_s)
                    why = f"wrong password; locked after {failed} failures"
                conn.execute(update(USERS).where(USERS.c.name == name).values(**values))
                self._audit(
                    conn, "login-failed", f"user:{name}", outcome="4", message=why, address=address
                )
        if row is None or not ok:
            raise refused
        with self.ctx.store.write() as conn:
            conn.execute(
                update(USERS)
                .where(USERS.c.name == name)
                .values(failed=0, locked_until=None, last_login_at=now)
            )
            self._audit(
                conn,
                "login",
                f"user:{name}",
                message="logged in",
                role=",".join(roles),
                address=address,
            )
        return Principal(name, "user", roles)

    def _check_secret(self, row: dict[str, Any], password: str) -> bool:
        from argon2.exceptions import InvalidHashError, VerificationError

        if row["password_hash"]:
            try:
                return bool(self.hasher.verify(row["password_hash"], password))
            except (VerificationError, InvalidHashError):
                return False
        return self._ldap_bind(row["name"], password)

    def _ldap_bind(self, name: str, password: str) -> bool:
        """A simple bind as the person against the configured directory (ldap3); the node's
        account still decides roles and whether the person may log in at all."""
        if not (self.ldap_url and self.ldap_user_dn and password):
            return False
        import warnings

        # ldap3 2.9 still calls pyasn1 names that newer pyasn1 marks deprecated
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import ldap3  # optional dependency: only nodes with a directory need it
            from ldap3.core.exceptions import LDAPException
            from ldap3.utils.dn import escape_rdn

            dn = self.ldap_user_dn.replace("{user}", escape_rdn(name))
            try:
                conn = ldap3.Connection(
                    ldap3.Server(self.ldap_url, connect_timeout=5),
                    user=dn,
                    password=password,
                    receive_timeout=5,
                )
                ok = bool(conn.bind())
                conn.unbind()
            except LDAPException:
                return False
        return ok

    def logout(self, principal: Principal, address: str | None = None) -> None:
        with self.ctx.store.write() as conn:
            self._audit(conn, "logout", principal.actor, message="logged out", address=address)

    def change_own_password(self, name: str, old: str, new: str) -> None:
        row = self.get(name)
        if row is None or not self._check_secret(row, old):
            raise Forbidden("the current password is not right")
        self.reset_password(name, new, by=f"user:{name}")

    # -- API tokens --------------------------------------------------------------------------

    def issue_token(
        self,
        owner: str,
        *,
        kind: str = "user",
        roles: builtins.list[str] | str | None = None,
        by: str = "cli",
    ) -> tuple[str, str]:
        """(token id, secret): the secret is shown once and kept only as its sha256. A user's
        token carries the user's roles unless fewer are asked for; a client names its roles."""
        check_name(owner)
        if kind not in ("user", "client"):
            raise ValueError("a token is for a user or a client")
        if kind == "user":
            row = self.get(owner)
            if row is None or row["disabled"]:
                raise NotFound("no usable account with that name")
            have = tuple(row["roles"].split(","))
            role_list = check_roles(roles) if roles else have
            if set(role_list) - set(have):
                raise ValueError("a user's token cannot carry roles the user does not have")
        else:
            role_list = check_roles(roles or "")
        secret = "ht_" + secrets.token_urlsafe(32)
        tid = secrets.token_hex(6)
        with self.ctx.store.write() as conn:
            conn.execute(
                insert(TOKENS).values(
                    id=tid,
                    digest=token_digest(secret),
                    owner=owner,
                    owner_kind=kind,
                    roles=",".join(role_list),
                    created_at=self.ctx.now(),
                )
            )
            self._audit(
                conn,
                "token",
                by,
                message="token issued",
                token=tid,
                owner=f"{kind}:{owner}",
                roles=",".join(role_list),
            )
        return tid, secret

    def revoke_token(self, tid: str, *, by: str = "cli") -> None:
        with self.ctx.store.write() as conn:
            n = conn.execute(
                update(TOKENS)
                .where(TOKENS.c.id == tid, TOKENS.c.revoked_at.is_(None))
                .values(revoked_at=self.ctx.now())
            ).rowcount
            if not n:
                raise NotFound("no live token with that id")
            self._audit(conn, "token", by, message="token revoked", token=tid)

    def tokens(self) -> builtins.list[dict[str, Any]]:
        with self.ctx.store.read() as conn:
            rows = conn.execute(select(TOKENS).order_by(TOKENS.c.created_at)).all()
        return [{k: v for k, v in r._mapping.items() if k != "digest"} for r in rows]


def principal_for_token(conn: Connection, secret: str) -> Principal | None:
    """The live token's owner, looked up by the secret's digest (an index hit)."""
    row = conn.execute(
        select(TOKENS.c.owner, TOKENS.c.owner_kind, TOKENS.c.roles, TOKENS.c.revoked_at).where(
            TOKENS.c.digest == token_digest(secret)
        )
    ).first()
    if row is None or row.revoked_at is not None:
        return None
    if row.owner_kind == "user":
        user = conn.execute(select(USERS.c.disabled).where(USERS.c.name == row.owner)).first()
        if user is None or user.disabled:
            return None
    return Principal(row.owner, row.owner_kind, tuple(row.roles.split(",")))
