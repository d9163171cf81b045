"""Shared pytest fixtures, one clearly marked section per concern; keep sections independent."""

from __future__ import annotations

import glob
import os
import pwd
import re
import secrets
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from typing import Any, NoReturn
from urllib.parse import quote

import pytest

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
# The throwaway cluster: superuser ``hutong`` with a random password (scram-sha-256), UTF8, C
# locale, fsync off. Names private to this section start with ``_pg``; it defines no pytest hooks.
# =============================================================================================

_PG_USER = "hutong"  # superuser of the throwaway cluster
_PG_OS_USER = "postgres"  # OS account initdb/postgres run as when we are root


def _pg_unavailable(reason: str) -> NoReturn:
    """Skip, or fail when HUTONG_REQUIRE_PG=1."""
    if os.environ.get("HUTONG_REQUIRE_PG") == "1":
        pytest.fail(f"PostgreSQL required (HUTONG_REQUIRE_PG=1) but: {reason}", pytrace=False)
    pytest.skip(f"PostgreSQL unavailable: {reason}")


def _pg_bindir() -> str | None:
    """Directory with pg_ctl, initdb and postgres: PATH first, then the newest Debian version."""
    found = shutil.which("pg_ctl")
    if found:
        bindir = os.path.dirname(os.path.realpath(found))  # /usr/local/bin -> real dir
        if os.access(os.path.join(bindir, "initdb"), os.X_OK):
            return bindir

    def version(path: str) -> tuple[int, ...]:
        return tuple(int(n) for n in re.findall(r"\d+", path))

    for bindir in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True):
        tools = (os.path.join(bindir, b) for b in ("pg_ctl", "initdb"))
        if all(os.access(t, os.X_OK) for t in tools):
            return bindir
    return None


def _pg_free_port() -> int:
    from simulators.ports import free_port_block

    return free_port_block(1)


def _pg_psycopg_url(dsn: str) -> str:
    """libpq URI from a SQLAlchemy DSN (postgresql+psycopg://... -> postgresql://...)."""
    return re.sub(r"^postgresql\+\w+://", "postgresql://", dsn)


def _pg_with_database(dsn: str, dbname: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(dsn).set(database=dbname).render_as_string(hide_password=False)


class _PgCluster:
    """A throwaway cluster in a temp dir, run as ``postgres`` when we are root."""

    def __init__(self, bindir: str) -> None:
        self.bindir = bindir
        self.as_user: str | None = None
        if os.geteuid() == 0:
            try:
                pwd.getpwnam(_PG_OS_USER)
            except KeyError:
                _pg_unavailable(
                    f"running as root and there is no {_PG_OS_USER!r} user to run initdb as"
                )
            self.as_user = _PG_OS_USER
        self.tmp = tempfile.mkdtemp(prefix="hutong-pg-")
        self.data = os.path.join(self.tmp, "data")
        self.sockets = os.path.join(self.tmp, "sock")
        self.log = os.path.join(self.tmp, "server.log")
        self.password = secrets.token_hex(16)
        self.port = 0

    def run(self, *args: str, timeout: float = 120) -> None:
        cmd = [os.path.join(self.bindir, args[0]), *args[1:]]
        if self.as_user:
            if shutil.which("runuser"):
                cmd = ["runuser", "-u", self.as_user, "--", *cmd]
            else:
                cmd = ["su", self.as_user, "-s", "/bin/sh", "-c", shlex.join(cmd)]
        try:
            proc = subprocess.run(
                cmd, check=False, cwd=self.tmp, capture_output=True, text=True, timeout=timeout
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise RuntimeError(f"{args[0]} failed: {exc}") from None
        if proc.returncode != 0:
            out = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            raise RuntimeError(f"{args[0]} exited {proc.returncode}: {' | '.join(out)}")

    def start(self) -> str:
        """initdb + start; returns the superuser's DSN for database ``postgres``.

        Auth is scram-sha-256 with a random password (also on the unix socket), so other local
        users cannot get in while the tests run.
        """
        os.mkdir(self.sockets)
        pwfile = os.path.join(self.tmp, "pwfile")
        with open(pwfile, "w") as f:
            f.write(self.password + "\n")
        if self.as_user:
            pw = pwd.getpwnam(self.as_user)
            for path in (self.tmp, self.sockets, pwfile):
                os.chown(path, pw.pw_uid, pw.pw_gid)
        self.run(
            "initdb", "-D", self.data, "-U", _PG_USER, "--pwfile", pwfile,
            "--auth", "scram-sha-256", "--encoding", "UTF8", "--no-locale", "--no-sync",
        )  # fmt: skip
        os.unlink(pwfile)
        error = ""
        for _attempt in range(3):  # a free port can be taken between probe and bind
            self.port = _pg_free_port()
            options = shlex.join([
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
            f"postgresql+psycopg://{_PG_USER}:{quote(self.password)}@127.0.0.1:{self.port}/postgres"
        )

    def log_tail(self) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return " | ".join(f.read().strip().splitlines()[-3:]) or "(empty)"
        except OSError:
            return "(none)"

    def stop(self) -> None:
        try:
            if os.path.exists(os.path.join(self.data, "postmaster.pid")):
                try:
                    self.run("pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop", timeout=60)
                except RuntimeError:
                    self.run("pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _pg_create_database(admin_dsn: str, name: str) -> str:
    import psycopg

    with psycopg.connect(_pg_psycopg_url(admin_dsn), autocommit=True, connect_timeout=10) as conn:
        conn.execute(f"CREATE DATABASE \"{name}\" ENCODING 'UTF8' TEMPLATE template0")
    return _pg_with_database(admin_dsn, name)


def _pg_drop_database(admin_dsn: str, name: str) -> None:
    import psycopg

    with psycopg.connect(_pg_psycopg_url(admin_dsn), autocommit=True, connect_timeout=10) as conn:
        if conn.info.server_version >= 130000:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        else:  # no FORCE before PostgreSQL 13: end leftover sessions first
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
            )
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')


@pytest.fixture(scope="session")
def _pg_admin_dsn() -> Iterator[str]:
    """DSN allowed to CREATE/DROP DATABASE: HUTONG_PG_DSN, or a throwaway cluster's superuser."""
    env = os.environ.get("HUTONG_PG_DSN")
    if env:
        dsn = re.sub(r"^postgres(ql)?(\+\w+)?://", "postgresql+psycopg://", env)
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
    if os.environ.get("HUTONG_PG_DSN"):
        return _pg_admin_dsn
    try:
        return _pg_create_database(_pg_admin_dsn, "hutong")
    except Exception as exc:  # noqa: BLE001
        _pg_unavailable(f"CREATE DATABASE hutong failed: {type(exc).__name__}: {exc}")


@pytest.fixture
def pg_db(_pg_admin_dsn: str) -> Iterator[str]:
    """SQLAlchemy DSN of a fresh, empty database for this test only; dropped afterwards."""
    name = f"hutong_{secrets.token_hex(6)}"
    try:
        dsn = _pg_create_database(_pg_admin_dsn, name)
    except Exception as exc:  # noqa: BLE001
        _pg_unavailable(f"CREATE DATABASE {name} failed: {type(exc).__name__}: {exc}")
    yield dsn
    _pg_drop_database(_pg_admin_dsn, name)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def dsn(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    """A fresh store's DSN, once on each backend: a SQLite file in the test's folder, or a new
    PostgreSQL database (``pg_db``). Tests that run the same assertions on both stores take it."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'node.db'}"
    return str(request.getfixturevalue("pg_db"))


@pytest.fixture(scope="module")
def pg_module_db(_pg_admin_dsn: str) -> Iterator[str]:
    """As ``pg_db``, shared by one module's tests (for stores they only read); dropped after."""
    name = f"hutong_{secrets.token_hex(6)}"
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


@pytest.fixture
def pg_node_dbs(_pg_admin_dsn: str) -> Iterator[Any]:
    """A function node id -> DSN of a fresh database for that node; all dropped afterwards."""
    made: list[str] = []

    def dsn_for(node_id: str) -> str:
        name = f"hutong_{node_id.replace('-', '_')}_{secrets.token_hex(4)}"
        made.append(name)
        return _pg_create_database(_pg_admin_dsn, name)

    yield dsn_for
    for name in made:
        _pg_drop_database(_pg_admin_dsn, name)
