"""Shared pytest fixtures. Each concern has its own clearly marked section; keep them independent."""

from __future__ import annotations

# =============================================================================================
# PostgreSQL
#
#   pg_dsn  (session)   SQLAlchemy DSN ``postgresql+psycopg://...`` of a database that exists.
#                       HUTONG_PG_DSN if set; otherwise a throwaway cluster: pg_ctl/initdb found on
#                       PATH or in /usr/lib/postgresql/*/bin, initdb'd in a temp dir (as the
#                       ``postgres`` user when we are root), started on a free 127.0.0.1 port with
#                       its unix socket in the temp dir, stopped and deleted at session end.
#   pg_db   (function)  DSN of a fresh database ``hutong_<random>`` for one test, dropped after.
#
# Mark tests ``@pytest.mark.postgres``; a marked test is skipped (with the reason) when no server
# can be had, even if it uses neither fixture. With HUTONG_REQUIRE_PG=1 (CI) that skip is a
# failure instead, so CI cannot silently skip PostgreSQL.
#
# Names private to this section start with ``_pg``. It defines no pytest hooks.
# =============================================================================================

import glob as _pg_glob
import os as _pg_os
import pwd as _pg_pwd
import re as _pg_re
import secrets as _pg_secrets
import shlex as _pg_shlex
import shutil as _pg_shutil
import socket as _pg_socket
import subprocess as _pg_subprocess
import tempfile as _pg_tempfile
from collections.abc import Iterator as _PgIterator
from urllib.parse import quote as _pg_quote

import pytest

_PG_USER = "hutong"  # superuser of the throwaway cluster
_PG_OS_USER = "postgres"  # OS account initdb/postgres run as when we are root


def _pg_unavailable(reason: str) -> None:
    """Skip, or fail when HUTONG_REQUIRE_PG=1."""
    if _pg_os.environ.get("HUTONG_REQUIRE_PG") == "1":
        pytest.fail(f"PostgreSQL required (HUTONG_REQUIRE_PG=1) but: {reason}", pytrace=False)
    pytest.skip(f"PostgreSQL unavailable: {reason}")


def _pg_bindir() -> str | None:
    """Directory with pg_ctl, initdb and postgres: PATH first, then the newest Debian version."""
    found = _pg_shutil.which("pg_ctl")
    if found:
        bindir = _pg_os.path.dirname(_pg_os.path.realpath(found))  # /usr/local/bin -> real dir
        if _pg_os.access(_pg_os.path.join(bindir, "initdb"), _pg_os.X_OK):
            return bindir

    def version(path: str) -> tuple[int, ...]:
        return tuple(int(n) for n in _pg_re.findall(r"\d+", path))

    for bindir in sorted(_pg_glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True):
        if all(_pg_os.access(_pg_os.path.join(bindir, b), _pg_os.X_OK) for b in ("pg_ctl", "initdb")):
            return bindir
    return None


def _pg_free_port() -> int:
    with _pg_socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_psycopg_url(dsn: str) -> str:
    """libpq URI from a SQLAlchemy DSN (postgresql+psycopg://... -> postgresql://...)."""
    return _pg_re.sub(r"^postgresql\+\w+://", "postgresql://", dsn)


def _pg_with_database(dsn: str, dbname: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(dsn).set(database=dbname).render_as_string(hide_password=False)


class _PgCluster:
    """A throwaway cluster in a temp dir, run as ``postgres`` when we are root."""

    def __init__(self, bindir: str) -> None:
        self.bindir = bindir
        self.as_user: str | None = None
        if _pg_os.geteuid() == 0:
            try:
                _pg_pwd.getpwnam(_PG_OS_USER)
            except KeyError:
                _pg_unavailable(
                    f"running as root and there is no {_PG_OS_USER!r} user to run initdb as"
                )
            self.as_user = _PG_OS_USER
        self.tmp = _pg_tempfile.mkdtemp(prefix="hutong-pg-")
        self.data = _pg_os.path.join(self.tmp, "data")
        self.sockets = _pg_os.path.join(self.tmp, "sock")
        self.log = _pg_os.path.join(self.tmp, "server.log")
        self.password = _pg_secrets.token_hex(16)
        self.port = 0

    def run(self, *args: str, timeout: float = 120) -> None:
        cmd = [_pg_os.path.join(self.bindir, args[0]), *args[1:]]
        if self.as_user:
            if _pg_shutil.which("runuser"):
                cmd = ["runuser", "-u", self.as_user, "--", *cmd]
            else:
                cmd = ["su", self.as_user, "-s", "/bin/sh", "-c", _pg_shlex.join(cmd)]
        try:
            proc = _pg_subprocess.run(
                cmd, cwd=self.tmp, capture_output=True, text=True, timeout=timeout
            )
        except (OSError, _pg_subprocess.TimeoutExpired) as exc:
            raise RuntimeError(f"{args[0]} failed: {exc}") from None
        if proc.returncode != 0:
            out = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            raise RuntimeError(f"{args[0]} exited {proc.returncode}: {' | '.join(out)}")

    def start(self) -> str:
        """initdb + start; returns the DSN of database ``hutong``."""
        _pg_os.mkdir(self.sockets)
        pwfile = _pg_os.path.join(self.tmp, "pwfile")
        with open(pwfile, "w") as f:
            f.write(self.password + "\n")
        if self.as_user:
            pw = _pg_pwd.getpwnam(self.as_user)
            for path in (self.tmp, self.sockets, pwfile):
                _pg_os.chown(path, pw.pw_uid, pw.pw_gid)
        self.run(
            "initdb", "-D", self.data, "-U", _PG_USER, "--pwfile", pwfile,
            "--auth", "scram-sha-256", "--encoding", "UTF8", "--no-locale", "--no-sync",
        )  # fmt: skip
        _pg_os.unlink(pwfile)
        error = ""
        for _attempt in range(3):  # a free port can be taken between probe and bind
            self.port = _pg_free_port()
            options = _pg_shlex.join([
                "-p", str(self.port), "-k", self.sockets, "-c", "listen_addresses=127.0.0.1",
                "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
            ])  # fmt: skip
            try:
                self.run("pg_ctl", "-D", self.data, "-l", self.log, "-w", "-t", "60",
                         "-o", options, "start")  # fmt: skip
            except RuntimeError as exc:
                error = f"{exc}; server log: {self.log_tail()}"
                continue
            break
        else:
            raise RuntimeError(error)
        return (
            f"postgresql+psycopg://{_PG_USER}:{_pg_quote(self.password)}"
            f"@127.0.0.1:{self.port}/postgres"
        )

    def log_tail(self) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return " | ".join(f.read().strip().splitlines()[-3:]) or "(empty)"
        except OSError:
            return "(none)"

    def stop(self) -> None:
        try:
            if _pg_os.path.exists(_pg_os.path.join(self.data, "postmaster.pid")):
                try:
                    self.run("pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop", timeout=60)
                except RuntimeError:
                    self.run("pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")
        finally:
            _pg_shutil.rmtree(self.tmp, ignore_errors=True)


def _pg_create_database(admin_dsn: str, name: str) -> str:
    import psycopg

    with psycopg.connect(_pg_psycopg_url(admin_dsn), autocommit=True, connect_timeout=10) as conn:
        conn.execute(f'CREATE DATABASE "{name}" ENCODING \'UTF8\' TEMPLATE template0')
    return _pg_with_database(admin_dsn, name)


def _pg_drop_database(admin_dsn: str, name: str) -> None:
    import psycopg

    with psycopg.connect(_pg_psycopg_url(admin_dsn), autocommit=True, connect_timeout=10) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def _pg_admin_dsn() -> _PgIterator[str]:
    """DSN allowed to CREATE/DROP DATABASE: HUTONG_PG_DSN, or a throwaway cluster's superuser."""
    env = _pg_os.environ.get("HUTONG_PG_DSN")
    if env:
        dsn = _pg_re.sub(r"^postgres(ql)?(\+\w+)?://", "postgresql+psycopg://", env)
        try:
            import psycopg

            psycopg.connect(_pg_psycopg_url(dsn), connect_timeout=10).close()
        except Exception as exc:  # noqa: BLE001 - any failure means "no server"
            _pg_unavailable(f"cannot connect to HUTONG_PG_DSN: {type(exc).__name__}: {exc}")
        yield dsn
        return
    bindir = _pg_bindir()
    if bindir is None:
        _pg_unavailable(
            "HUTONG_PG_DSN is not set and no pg_ctl/initdb on PATH or in /usr/lib/postgresql/*/bin"
            " (Debian: apt-get install postgresql)"
        )
    cluster = _PgCluster(bindir)
    try:
        try:
            dsn = cluster.start()
        except RuntimeError as exc:
            _pg_unavailable(f"throwaway cluster from {bindir} did not start: {exc}")
        yield dsn
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def pg_dsn(_pg_admin_dsn: str) -> str:
    """SQLAlchemy DSN (postgresql+psycopg://) of a database shared by the whole session.

    With HUTONG_PG_DSN this is that DSN unchanged (apart from the driver name); otherwise the
    database ``hutong`` in the throwaway cluster.
    """
    if _pg_os.environ.get("HUTONG_PG_DSN"):
        return _pg_admin_dsn
    try:
        return _pg_create_database(_pg_admin_dsn, "hutong")
    except Exception as exc:  # noqa: BLE001
        _pg_unavailable(f"CREATE DATABASE hutong failed: {type(exc).__name__}: {exc}")
        raise  # unreachable


@pytest.fixture
def pg_db(_pg_admin_dsn: str) -> _PgIterator[str]:
    """SQLAlchemy DSN of a fresh, empty database for this test only; dropped afterwards."""
    name = f"hutong_{_pg_secrets.token_hex(6)}"
    try:
        dsn = _pg_create_database(_pg_admin_dsn, name)
    except Exception as exc:  # noqa: BLE001
        _pg_unavailable(f"CREATE DATABASE {name} failed: {type(exc).__name__}: {exc}")
    yield dsn
    _pg_drop_database(_pg_admin_dsn, name)


@pytest.fixture(autouse=True)
def _pg_marker(request: pytest.FixtureRequest) -> None:
    """A test marked ``postgres`` needs a server even if it asks for neither fixture."""
    if request.node.get_closest_marker("postgres") is not None:
        request.getfixturevalue("_pg_admin_dsn")


# ============================================================================ end PostgreSQL
