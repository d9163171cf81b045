"""Directory logins against a real OpenLDAP server (Debian's slapd, started by the test on a
free port with its own throwaway database), and accounts on a real PostgreSQL store.

The bind is the node's own code (``Accounts.login`` -> ldap3 simple bind as the person's DN);
the node's account row still decides roles and whether the person may log in at all.
"""

from __future__ import annotations

import dataclasses
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge.accounts.service import Accounts, Principal
from bridge.config.loader import load_node
from bridge.context import NodeContext
from bridge.errors import Unauthorized
from simulators.ports import free_port_block
from tests.harness import Alliance, wait_for
from tests.test_referral_loop import MEMBERS, RULES

SLAPD = Path("/usr/sbin/slapd")
SLAPADD = Path("/usr/sbin/slapadd")
SUFFIX = "dc=hospital,dc=local"
CONF = """include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/inetorgperson.schema
pidfile {dir}/slapd.pid
modulepath /usr/lib/ldap
moduleload back_mdb
database mdb
maxsize 10485760
suffix "{suffix}"
rootdn "cn=admin,{suffix}"
rootpw not-used-by-the-test
directory {dir}/db
"""
LDIF = """dn: {suffix}
objectClass: dcObject
objectClass: organization
o: Hospital
dc: hospital

dn: ou=people,{suffix}
objectClass: organizationalUnit
ou: people

dn: uid=dr.ldap,ou=people,{suffix}
objectClass: inetOrgPerson
uid: dr.ldap
cn: Dr LDAP
sn: LDAP
userPassword: directory password 1

dn: uid=dr.nolocal,ou=people,{suffix}
objectClass: inetOrgPerson
uid: dr.nolocal
cn: Dr No Local
sn: Local
userPassword: directory password 2
"""


@pytest.fixture(scope="module")
def slapd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if not (SLAPD.exists() and SLAPADD.exists()):
        pytest.skip("Debian slapd is not installed (apt-get install -y slapd ldap-utils)")
    d = tmp_path_factory.mktemp("slapd")
    (d / "db").mkdir()
    (d / "slapd.conf").write_text(CONF.format(dir=d, suffix=SUFFIX))
    (d / "people.ldif").write_text(LDIF.format(suffix=SUFFIX))
    subprocess.run(
        [str(SLAPADD), "-f", str(d / "slapd.conf"), "-l", str(d / "people.ldif")],
        check=True,
        capture_output=True,
        timeout=60,
    )
    port = free_port_block(1)
    url = f"ldap://127.0.0.1:{port}"
    log = d / "slapd.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [str(SLAPD), "-f", str(d / "slapd.conf"), "-h", f"{url}/", "-d", "0"],
            stdout=subprocess.DEVNULL,
            stderr=fh,
        )

    def listening() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"slapd exited: {log.read_text()[-1000:]}")
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    try:
        wait_for(listening, timeout=30, what="slapd to listen")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(d / "db", ignore_errors=True)


def open_ctx(folder: Path, **web: object) -> NodeContext:
    a = Alliance(folder / "alliance", MEMBERS, RULES)
    plan = load_node(a.files["core"])
    plan = dataclasses.replace(plan, web=plan.web.model_copy(update=web))
    return NodeContext.open(plan)


def test_directory_bind_logs_in_only_people_the_node_knows(slapd: str, tmp_path: Path) -> None:
    ctx = open_ctx(tmp_path, ldap_url=slapd, ldap_user_dn=f"uid={{user}},ou=people,{SUFFIX}")
    try:
        accounts = Accounts(ctx)
        assert accounts.add("dr.ldap", ["clinician"], password=None, by="test") is None
        who = accounts.login("dr.ldap", "directory password 1", address="10.0.0.7")
        assert who == Principal("dr.ldap", "user", ("clinician",))
        with pytest.raises(Unauthorized):
            accounts.login("dr.ldap", "directory password 2")  # another person's password
        with pytest.raises(Unauthorized):  # in the directory, but no account on this node
            accounts.login("dr.nolocal", "directory password 2")
        accounts.disable("dr.ldap", by="test")
        with pytest.raises(Unauthorized):  # the node's row still decides
            accounts.login("dr.ldap", "directory password 1")
        with pytest.raises(Unauthorized):  # an injection attempt in the name is not a DN
            accounts.login("*)(uid=*", "directory password 1")
    finally:
        ctx.store.dispose()


def test_without_a_directory_a_password_is_required(tmp_path: Path) -> None:
    ctx = open_ctx(tmp_path)
    try:
        with pytest.raises(ValueError, match="a password is required"):
            Accounts(ctx).add("dr.x", ["clinician"], password=None, by="test")
        with pytest.raises(ValueError, match="at least 10"):
            Accounts(ctx).add("dr.x", ["clinician"], password="short", by="test")
        with pytest.raises(ValueError, match="roles are one or more"):
            Accounts(ctx).add("dr.x", ["surgeon"], password="long enough pw", by="test")
    finally:
        ctx.store.dispose()


@pytest.mark.postgres
def test_accounts_and_tokens_on_postgresql(pg_db: str, tmp_path: Path) -> None:
    from sqlalchemy import select

    from bridge.accounts.service import principal_for_token
    from bridge.audit.tables import AuditRecord

    a = Alliance(tmp_path / "alliance", MEMBERS, RULES, dsn_for=lambda n: pg_db)
    ctx = NodeContext.open(load_node(a.files["core"]))
    try:
        assert not ctx.store.is_sqlite
        accounts = Accounts(ctx)
        accounts.add("dr.pg", "clinician,auditor", password="a long pg password", by="test")
        assert accounts.login("dr.pg", "a long pg password") == Principal(
            "dr.pg", "user", ("clinician", "auditor")
        )
        for _ in range(ctx.plan.web.lockout_after):
            with pytest.raises(Unauthorized):
                accounts.login("dr.pg", "wrong")
        assert next(u for u in accounts.list() if u["name"] == "dr.pg")["locked"] is True
        tid, secret = accounts.issue_token("dr.pg", roles="auditor", by="test")
        with ctx.store.read() as conn:
            assert principal_for_token(conn, secret) == Principal("dr.pg", "user", ("auditor",))
            assert principal_for_token(conn, secret + "x") is None
        accounts.revoke_token(tid, by="test")
        with ctx.store.read() as conn:
            assert principal_for_token(conn, secret) is None
            actions = [
                r.action
                for r in conn.execute(
                    select(AuditRecord.__table__.c.action).order_by(AuditRecord.__table__.c.seq)
                )
            ]
        assert actions[-9:] == ["account", "login", *["login-failed"] * 5, "token", "token"]
        assert ctx.audit  # the chain verifies with the new agent fields
        with ctx.store.read() as conn:
            assert ctx.audit.verify(conn).ok
    finally:
        ctx.store.dispose()


def test_shared_role_tokens_off_refuses_them_everywhere(tmp_path: Path) -> None:
    """``[web] shared_role_tokens = false``: the config's role tokens neither log in nor call
    the API; a client's own token still does, and the login page offers no token form."""
    import urllib.error
    import urllib.request

    a = Alliance(tmp_path / "alliance", MEMBERS, RULES)
    with open(a.files["core"], "a", encoding="utf-8") as f:
        f.write("\n[web]\nshared_role_tokens = false\n")
    core = a.node("core")
    assert core.plan.web.shared_role_tokens is False
    ctx = NodeContext.open(core.plan)
    try:
        _tid, secret = Accounts(ctx).issue_token(
            "his-main", kind="client", roles="clinician", by="test"
        )
    finally:
        ctx.store.dispose()

    def status(path: str, token: str | None = None) -> tuple[int, str]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        req = urllib.request.Request(core.local_url + path, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, exc.read().decode()

    a.start("core")
    try:
        shared_token = core.token("clinician")
        assert status("/fhir/Patient", shared_token)[0] == 401
        assert status("/local/v1/referrals", shared_token)[0] == 401
        assert status("/fhir/Patient", secret)[0] == 200
        assert status("/local/v1/referrals", secret)[0] == 200
        code, page = status("/ui/login")
        assert code == 200 and 'name="password"' in page and 'name="token"' not in page
    finally:
        a.stop_all()
