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
    subprocess.run([str(SLAPADD), "-f", str(d / "slapd.conf"), "-l", str(d / "people.ldif")],
                   check=True, capture_output=True, timeout=60)
    port = free_port_block(1)
    url = f"ldap://127.0.0.1:{port}"
    log = d / "slapd.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([str(SLAPD), "-f", str(d / "slapd.conf"), "-h", f"{url}/",
                                 "-d", "0"], stdout=subprocess.DEVNULL, stderr=fh)

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
