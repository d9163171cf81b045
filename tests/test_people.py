"""People, not roles: personal accounts, tokens per person or system, every look at a patient
audited by name (a table of every route of the local app), patient lookup, the message
browser, and one time-zone rule. Two real node processes over HTTP; accounts are made with the
``hutong users`` CLI before the nodes start.
"""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import orjson
import pyotp
import pytest
from sqlalchemy import func, select

from bridge.audit.events import event_fields, who_fields
from bridge.audit.tables import AuditRecord
from bridge.privacy import patient_hash
from bridge.store.db import Store
from bridge.store.tables import OUTBOX
from bridge.timeinput import parse_when, show, zone
from tests import consults
from tests.harness import ROOT, Alliance, NodeProcess, wait_for
from tests.referrals import referral
from tests.test_referral_loop import MEMBERS, RULES, both, new_thread
from tests.test_web import Browser, section

pytestmark = pytest.mark.slow

AUDIT = AuditRecord.__table__
PASSWORD = "correct horse battery"
WANG_ID = "110102195003151234"
ZHAO_ID = "11010219620101002X"
QIAN_ID = "110102197308080088"  # the consultation's patient (issue 16's pages)
CONSULT_KINDS = ["consult.request", "consult.status", "consult.report"]
PEOPLE_RULES = [{**r, "kinds": [*r["kinds"], *CONSULT_KINDS]} for r in RULES]


def cli(node: NodeProcess, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bridge.cli", *args, "--config", str(node.config)],
        check=False,
        input=stdin,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


def add_user(node: NodeProcess, name: str, roles: str, display: str) -> None:
    r = cli(
        node,
        "users",
        "add",
        name,
        "--roles",
        roles,
        "--display",
        display,
        "--password",
        "-",
        stdin=PASSWORD + "\n",
    )
    assert r.returncode == 0, r.stderr
    assert f"added {name} ({roles})" in r.stdout


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory):
    a = Alliance(tmp_path_factory.mktemp("people") / "alliance", MEMBERS, PEOPLE_RULES)
    core, chc = a.node("core"), a.node("chc")
    for name, roles, display in (
        ("dr.li", "clinician", "李医生"),
        ("dr.chen", "clinician", "陈医生"),
        ("aud.wu", "auditor", "吴审计"),
        ("it.zhou", "it", "周工"),
        ("adm.he", "admin,it", "何管理"),
    ):
        add_user(core, name, roles, display)
    add_user(chc, "dr.sun", "clinician", "孙医生")
    a.start("core", "chc")
    yield a
    a.stop_all()


def login(
    node: NodeProcess, name: str, password: str = PASSWORD, totp: str | None = None
) -> tuple[Browser, int, str]:
    b = Browser(node)
    b.open("/ui/login")
    form = {"name": name, "password": password, **({"totp": totp} if totp else {})}
    status, url, _body = b.open("/ui/login", form)
    return b, status, url


def person(node: NodeProcess, name: str) -> Browser:
    b, status, url = login(node, name)
    assert status == 200 and not url.endswith("/ui/login"), (name, status, url)
    return b


def store(node: NodeProcess) -> Store:
    return Store(node.plan.storage_dsn)


def head(node: NodeProcess) -> int:
    s = store(node)
    try:
        with s.read() as conn:
            return conn.execute(select(func.max(AUDIT.c.seq))).scalar() or 0
    finally:
        s.dispose()


def rows_after(node: NodeProcess, seq: int) -> list[dict[str, Any]]:
    """Audit rows after ``seq``, with the person fields read back from the AuditEvent."""
    s = store(node)
    try:
        with s.read() as conn:
            got = conn.execute(
                select(AUDIT.c.seq, AUDIT.c.resource).where(AUDIT.c.seq > seq).order_by(AUDIT.c.seq)
            ).all()
    finally:
        s.dispose()
    out = []
    for r in got:
        event = orjson.loads(r.resource)
        out.append({**event_fields(event), **who_fields(event), "event": event})
    return out


def bearer(
    node: NodeProcess, path: str, token: str, form: dict[str, str] | None = None
) -> tuple[int, Any]:
    """GET ``path`` (or POST ``form`` to it, form-encoded) with a bearer token."""
    data = urlencode(form).encode() if form is not None else None
    req = urllib.request.Request(
        node.local_url + path, data=data, headers={"Authorization": f"Bearer {token}"}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read() or b"null")


# -- accounts ---------------------------------------------------------------------------------


def test_users_cli_lists_accounts_with_roles_and_no_secrets(pair: Alliance) -> None:
    core = pair.node("core")
    r = cli(core, "users", "list", "--json")
    assert r.returncode == 0, r.stderr
    users = {u["name"]: u for u in json.loads(r.stdout)}
    assert {n: (u["roles"], u["display"], u["disabled"]) for n, u in users.items()} == {
        "dr.li": ("clinician", "李医生", False),
        "dr.chen": ("clinician", "陈医生", False),
        "aud.wu": ("auditor", "吴审计", False),
        "it.zhou": ("it", "周工", False),
        "adm.he": ("admin,it", "何管理", False),
    }
    assert PASSWORD not in r.stdout and "argon2" not in r.stdout
    s = store(core)
    with s.read() as conn:
        from bridge.accounts.tables import USERS

        stored = conn.execute(select(USERS.c.password_hash).where(USERS.c.name == "dr.li")).scalar()
    s.dispose()
    assert stored.startswith("$argon2id$") and PASSWORD not in stored


def test_failed_logins_lock_the_account_and_are_audited_by_name(pair: Alliance) -> None:
    core = pair.node("core")
    add_user(core, "dr.lock", "clinician", "锁医生")
    before = head(core)
    for _ in range(core.plan.web.lockout_after):
        _b, status, url = login(core, "dr.lock", "wrong password!!")
        assert status == 401 and url.endswith("/ui/login")
    _b, status, _url = login(core, "dr.lock")  # right password, but locked now
    assert status == 401
    _b, status, _url = login(core, "no.such.person", "whatever-typed")
    assert status == 401
    failed = [r for r in rows_after(core, before) if r["action"] == "login-failed"]
    assert [(r["actor"], r["outcome"]) for r in failed] == [("user:dr.lock", "4")] * (
        core.plan.web.lockout_after + 1
    ) + [("user:?", "4")]
    assert failed[core.plan.web.lockout_after - 1]["message"].endswith(
        f"locked after {core.plan.web.lockout_after} failures"
    )
    assert failed[-2]["message"] == "account locked"
    assert {r["address"] for r in failed} == {"127.0.0.1"}
    text = json.dumps([r["event"] for r in failed])
    assert "whatever-typed" not in text and "no.such.person" not in text  # typed text not kept
    r = cli(
        core,
        "users",
        "reset-password",
        "dr.lock",
        "--password",
        "-",
        stdin="another long password\n",
    )
    assert r.returncode == 0, r.stderr
    _b, status, url = login(core, "dr.lock", "another long password")
    assert status == 200 and url.endswith("/ui/referrals")
    r = cli(core, "users", "disable", "dr.lock")
    assert r.returncode == 0, r.stderr
    _b, status, _url = login(core, "dr.lock", "another long password")
    assert status == 401
    changes = [
        (r["action"], r["actor"], r["message"])
        for r in rows_after(core, before)
        if r["action"] in ("password", "account", "login")
    ]
    assert changes[0][0] == "password" and changes[0][1].startswith("cli:")
    assert changes[1] == ("login", "user:dr.lock", "logged in")
    assert changes[2][0] == "account" and changes[2][2] == "account disabled"


def test_totp_second_factor(pair: Alliance) -> None:
    from bridge.accounts.service import Accounts
    from bridge.context import NodeContext

    core = pair.node("core")
    ctx = NodeContext.open(core.plan, create=False)
    try:
        secret = Accounts(ctx).add("dr.otp", ["clinician"], password=PASSWORD, totp=True, by="test")
    finally:
        ctx.store.dispose()
    assert secret and len(secret) >= 16
    _b, status, _url = login(core, "dr.otp")  # no code
    assert status == 401
    _b, status, _url = login(
        core, "dr.otp", totp="000000" if pyotp.TOTP(secret).now() != "000000" else "111111"
    )
    assert status == 401
    _b, status, url = login(core, "dr.otp", totp=pyotp.TOTP(secret).now())
    assert status == 200 and url.endswith("/ui/referrals")


def test_personal_and_client_tokens_name_the_caller_and_can_be_revoked(pair: Alliance) -> None:
    core = pair.node("core")
    r = cli(core, "tokens", "issue", "--user", "dr.li")
    assert r.returncode == 0, r.stderr
    secret = r.stdout.strip()
    assert secret.startswith("ht_") and "shown once" in r.stderr
    tid = re.search(r"token (\w+) for user dr.li", r.stderr).group(1)
    r = cli(core, "tokens", "issue", "--client", "his-main", "--roles", "clinician")
    client_secret = r.stdout.strip()
    before = head(core)
    status, bundle = bearer(core, "/fhir/Patient?_count=5", secret)
    assert status == 200 and bundle["resourceType"] == "Bundle"
    status, _ = bearer(core, "/fhir/Patient?_count=5", client_secret)
    assert status == 200
    status, _ = bearer(core, "/fhir/AuditEvent", secret)  # a clinician's token: no audit log
    assert status == 403
    reads = [r for r in rows_after(core, before) if r["action"] == "read"]
    assert {(r["actor"], r["actor_role"], r["interaction"]) for r in reads} == {
        ("user:dr.li", "clinician", "search-type"),
        ("client:his-main", "clinician", "search-type"),
    }
    assert all(r["event"]["type"]["code"] == "rest" for r in reads)
    r = cli(core, "tokens", "revoke", tid)
    assert r.returncode == 0, r.stderr
    assert bearer(core, "/fhir/Patient", secret)[0] == 401
    listed = cli(core, "tokens", "list").stdout
    assert tid in listed and secret not in listed and "+08:00" in listed
    # the shared role token keeps working this release (flagged on the accounts page)
    assert bearer(core, "/fhir/Patient?_count=1", core.token("clinician"))[0] == 200
    admin = person(core, "adm.he")
    page = admin.get("/ui/accounts")
    assert 'class="alert shared-tokens"' in page and "dr.li" in page and tid in page
    assert 'class="alert shared-tokens"' in admin.get("/ui/it")  # adm.he is IT too


def test_accounts_page_adds_a_person_who_can_then_log_in(pair: Alliance) -> None:
    core = pair.node("core")
    admin = person(core, "adm.he")
    admin.get("/ui/accounts")
    status, url, body = admin.open(
        "/ui/accounts/add",
        {
            "name": "dr.new",
            "display": "新医生",
            "password": "a fresh long password",
            "role_clinician": "1",
        },
    )
    assert status == 200 and url.endswith("/ui/accounts")
    assert "dr.new" in section(body, "accounts")
    _b, status, url = login(core, "dr.new", "a fresh long password")
    assert status == 200 and url.endswith("/ui/referrals")
    assert person(core, "dr.li").open("/ui/accounts")[0] == 403  # clinicians manage nobody


# -- every look audited by name ---------------------------------------------------------------


@pytest.fixture(scope="module")
def thread(pair: Alliance) -> str:
    chc = pair.node("chc")
    t = new_thread(chc, referral("up-inpatient", "core", icd10="I10", mrn="YT7788"))
    both(pair, t, "received", "received")
    return t


@pytest.fixture(scope="module")
def consultation(pair: Alliance) -> str:
    """A consultation chc asked core for, in core's queue (core is the centre)."""
    chc, core = pair.node("chc"), pair.node("core")
    answer = chc.api(
        "POST",
        "/fhir",
        consults.consultation("general", "core", national_id=QIAN_ID, name="钱七", mrn="YT7799"),
        role="clinician",
    )
    sr_id = next(
        e["response"]["location"].split("/")[1]
        for e in answer["entry"]
        if e["response"]["location"].startswith("ServiceRequest/")
    )
    found = wait_for(
        lambda: [r for r in core.api("GET", "/local/v1/consultations") if r["step"] == "received"],
        timeout=40,
        what="the consultation at the centre",
    )
    assert len(found) == 1 and sr_id
    return str(found[0]["thread"])


def test_two_clinicians_open_the_same_referral_and_the_auditor_sees_both(
    pair: Alliance, thread: str
) -> None:
    core = pair.node("core")
    before = head(core)
    li, chen = person(core, "dr.li"), person(core, "dr.chen")
    for b in (li, chen):
        page = b.get(f"/ui/referrals/{thread}")
        assert "王秀英" in page
    phash = patient_hash(core.plan.patient_hash_key, WANG_ID)
    reads = [
        r
        for r in rows_after(core, before)  # (logging in lands on the list: a query)
        if r["action"] == "read" and r["patient_hash"] == phash and r["interaction"] == "read"
    ]
    assert [(r["actor"], r["actor_role"], r["address"], r["interaction"]) for r in reads] == [
        ("user:dr.li", "clinician", "127.0.0.1", "read"),
        ("user:dr.chen", "clinician", "127.0.0.1", "read"),
    ]
    assert reads[0]["shown"] == f"/ui/referrals/{thread}"
    # the auditor: who looked at this patient, by typing the ID number (never kept)
    aud = person(core, "aud.wu")
    aud.get("/ui/audit")
    status, url, page = aud.open("/ui/audit/lookup", {"national_id": WANG_ID})
    assert status == 200 and f"patient_hash={phash}" in url and "action=read" in url
    log = section(page, "audit")
    assert "user:dr.li" in log and "user:dr.chen" in log
    assert WANG_ID not in page
    total = int(re.search(r'<span class="total">(\d+)</span>', page).group(1))
    assert total == len(re.findall(r"<tr><td>\d+</td>", log))
    # the CSV export names both, and is itself audited
    before_export = head(core)
    status, _url, data = aud.open(
        "/ui/audit/export.csv?" + urlencode({"patient_hash": phash, "action": "read"})
    )
    assert status == 200
    exported = list(csv.DictReader(io.StringIO(data.lstrip("\ufeff"))))
    assert {"user:dr.li", "user:dr.chen"} <= {r["actor"] for r in exported}
    opened = [r for r in exported if r["shown"] == f"/ui/referrals/{thread}"]
    assert [(r["actor"], r["actor_role"], r["address"], r["interaction"]) for r in opened] == [
        ("user:dr.li", "clinician", "127.0.0.1", "read"),
        ("user:dr.chen", "clinician", "127.0.0.1", "read"),
    ]
    assert all("Task/" in r["resources"] for r in opened)
    export_rows = [r for r in rows_after(core, before_export) if r["action"] == "export"]
    assert [(r["actor"], r["actor_role"]) for r in export_rows] == [("user:aud.wu", "auditor")]
    # the command line answers the same questions (hash computed locally, typed on stdin)
    r = cli(core, "audit", "patient-hash", "--national-id", WANG_ID)
    assert r.returncode == 0 and r.stdout.strip() == phash
    r = cli(core, "audit", "who", "--patient", phash, "--since", "-1h", "--format", "csv")
    assert r.returncode == 0, r.stderr
    who = {row["actor"] for row in csv.DictReader(io.StringIO(r.stdout))}
    assert {"user:dr.li", "user:dr.chen"} <= who
    # what did this person look at
    page = aud.get("/ui/audit?" + urlencode({"actor": "user:dr.chen", "action": "read"}))
    assert thread in section(page, "audit")
    assert "user:dr.li" not in section(page, "audit")
    # nothing in the audit holds the ID number typed into the lookup
    s = store(core)
    with s.read() as conn:
        hits = conn.execute(
            select(func.count()).select_from(AUDIT).where(AUDIT.c.resource.contains(WANG_ID))
        ).scalar()
    s.dispose()
    assert hits == 0
    assert WANG_ID not in core.log.read_text()


def node_routes(node: NodeProcess) -> set[tuple[str, str]]:
    """Every (method, path) the node's local app answers, from the app itself."""
    from bridge.node import Node

    def walk(routes: list[Any], prefix: str = "") -> Any:
        for r in routes:
            sub = getattr(r, "original_router", None)  # an included router (FastAPI >= 0.16x)
            if sub is not None:
                yield from walk(sub.routes, prefix + r.include_context.prefix)
            elif getattr(r, "methods", None):
                yield from ((m, prefix + r.path) for m in r.methods if m != "HEAD")

    n = Node(node.plan)  # builds the app in this process; starts no job and no listener
    try:
        _gateway, local = n.apps()
        return set(walk(local.routes))
    finally:
        n.ctx.store.dispose()


#: every route of the local app: PHI = it shows patient data (one audit row per patient shown,
#: naming the caller); otherwise why it shows none. A new route that is not here fails.
PHI = "phi"
ROUTES: dict[tuple[str, str], str] = {
    ("GET", "/ui/referrals"): PHI,
    ("GET", "/ui/referrals/{thread}"): PHI,
    ("GET", "/ui/referrals/{thread}/slip"): PHI,
    ("GET", "/ui/referrals/{thread}/slip/{which}"): PHI,
    ("GET", "/ui/consultations"): PHI,
    ("GET", "/ui/consultations/{thread}"): PHI,
    ("GET", "/ui/consultations/{thread}/print/{which}"): PHI,
    ("GET", "/ui/messages/{box}/{rid}"): PHI,  # the body only on ?body=1 (headers: none)
    ("GET", "/ui/audit"): PHI,  # hashes only, but the auditor's searches are recorded
    ("GET", "/fhir/{rtype}"): PHI,
    ("GET", "/fhir/{rtype}/{rid}"): PHI,
    ("POST", "/fhir/{rtype}/_search"): PHI,  # the same answer as GET /fhir/{rtype}
    ("GET", "/fhir/{rtype}/{rid}/_history"): PHI,
    ("GET", "/fhir/{rtype}/{rid}/_history/{vid}"): PHI,
    ("GET", "/fhir/{rtype}/_history"): PHI,  # checked below: its patients depend on the store
    ("GET", "/local/v1/patients/{patient_hash}/results"): PHI,
    ("GET", "/ui/audit/export.{fmt}"): "audited as an export (hashes only)",
    ("GET", "/ui"): "redirect",
    ("GET", "/ui/"): "redirect",
    ("GET", "/ui/static/print.js"): "static file",
    ("GET", "/ui/login"): "form",
    ("POST", "/ui/login"): "login (audited)",
    ("GET", "/ui/logout"): "form",
    ("POST", "/ui/logout"): "logout (audited)",
    ("GET", "/ui/password"): "form",
    ("POST", "/ui/password"): "password change (audited)",
    ("POST", "/ui/referrals/{thread}/steps/{event}"): "a step (audited by the workflow)",
    ("POST", "/ui/referrals/{thread}/return"): "a return (audited by the workflow)",
    ("POST", "/ui/audit/lookup"): "computes a hash; redirects",
    ("POST", "/ui/referrals/search"): "the list's filter: an ID number becomes a hash; redirects",
    ("POST", "/ui/consultations/search"): "the list's filter: an ID number becomes a hash; "
    "redirects",
    ("POST", "/ui/consultations/{thread}/steps/{event}"): "a consultation step (audited by the "
    "workflow)",
    ("POST", "/ui/consultations/{thread}/referral"): "a referral from the report (audited by "
    "the workflow)",
    ("GET", "/ui/stats/consultations.csv"): "aggregates",
    ("GET", "/ui/it"): "queues and counts, no patient data",
    ("GET", "/ui/it/live"): "the dashboard's counts, no patient data",
    ("POST", "/ui/it/pause"): "pause or resume a peer or adapter (audited)",
    ("GET", "/ui/static/dashboard.js"): "static file",
    ("GET", "/metrics"): "Prometheus counts, no patient data",
    ("POST", "/ui/referrals/{thread}/imaging/fetch"): "queues a fetch request (audited); redirects",
    ("POST", "/ui/it/quarantine/{item_id}/replay"): "replay (audited)",
    ("POST", "/ui/it/outbox/retry"): "retry (audited)",
    ("GET", "/ui/stats"): "aggregates",
    ("GET", "/ui/accounts"): "accounts, no patient data",
    ("POST", "/ui/accounts/{action}"): "account change (audited)",
    ("GET", "/ui/messages"): "packet headers: ids, kinds, peers, states",
    ("POST", "/ui/messages/{box}/{rid}/resend"): "resend (audited)",
    ("GET", "/fhir/metadata"): "CapabilityStatement",
    ("POST", "/fhir"): "a transaction (audited by the workflow)",
    ("POST", "/fhir/"): "a transaction (audited by the workflow)",
    ("PUT", "/fhir/Task/{rid}"): "a Task update (audited by the workflow)",
    ("POST", "/fhir/Task/{rid}/{operation}"): "a consultation step (audited by the workflow); "
    "$referral-draft is audited as a read by person",
    ("GET", "/fhir"): "an error",
    ("PUT", "/fhir"): "an error",
    ("PATCH", "/fhir"): "an error",
    ("DELETE", "/fhir"): "an error",
    ("GET", "/fhir/{path:path}"): "an error",
    ("POST", "/fhir/{path:path}"): "an error",
    ("PUT", "/fhir/{path:path}"): "an error",
    ("PATCH", "/fhir/{path:path}"): "an error",
    ("DELETE", "/fhir/{path:path}"): "an error",
    ("GET", "/fhir/ConceptMap"): "code maps",
    ("GET", "/fhir/ConceptMap/{cid}"): "code maps",
    ("GET", "/fhir/ConceptMap/$translate"): "code maps",
    ("GET", "/fhir/ConceptMap/{cid}/$translate"): "code maps",
    ("POST", "/fhir/ConceptMap/$translate"): "code maps",
    ("POST", "/fhir/ConceptMap/{cid}/$translate"): "code maps",
    ("GET", "/health"): "liveness",
    ("GET", "/docs"): "API docs",
    ("GET", "/docs/static/{name}"): "API docs files",
    ("GET", "/openapi.json"): "API description",
    ("POST", "/local/v1/packets"): "queues (audited)",
    ("GET", "/local/v1/outbox"): "packet headers",
    ("GET", "/local/v1/queues"): "counts",
    ("POST", "/local/v1/outbox/retry"): "retry (audited)",
    ("GET", "/local/v1/quarantine"): "refusal codes and headers",
    ("POST", "/local/v1/quarantine/{item_id}/replay"): "replay (audited)",
    ("GET", "/local/v1/packets/{packet_id}"): "packet headers",
    ("GET", "/local/v1/referrals"): "referral states, patient hashes only",
    ("POST", "/local/v1/referrals"): "a referral (audited by the workflow)",
    ("POST", "/local/v1/referrals/{thread}/steps/{event}"): "a step (audited by the workflow)",
    ("GET", "/local/v1/reminders"): "referral states, patient hashes only",
    ("GET", "/local/v1/consultations"): "consultation states, patient hashes only",
}


def test_every_route_is_classified_and_every_look_at_a_patient_is_audited_by_name(
    pair: Alliance, thread: str, consultation: str
) -> None:
    core, chc = pair.node("core"), pair.node("chc")
    routes = node_routes(core)
    unclassified = sorted(routes - set(ROUTES))
    assert not unclassified, (
        f"classify these routes in ROUTES (do they show patients?): {unclassified}"
    )
    assert not set(ROUTES) - routes, "ROUTES names routes the app no longer has"
    phash = patient_hash(core.plan.patient_hash_key, WANG_ID)
    qhash = patient_hash(core.plan.patient_hash_key, QIAN_ID)
    r = cli(core, "tokens", "issue", "--user", "dr.chen")
    chen_token = r.stdout.strip()
    r = cli(core, "tokens", "issue", "--user", "aud.wu")
    aud_token = r.stdout.strip()
    li, aud, it = person(core, "dr.li"), person(core, "aud.wu"), person(core, "it.zhou")
    from bridge.fhirstore import store as fhirstore
    from bridge.referral.tables import REFERRAL

    s = store(core)
    with s.read() as conn:
        box_id = conn.execute(select(OUTBOX.c.id).order_by(OUTBOX.c.id.desc())).scalar()
        task_id = conn.execute(
            select(REFERRAL.c.task_id).where(REFERRAL.c.thread == thread)
        ).scalar()
        pid = fhirstore.get(conn, "Task", task_id)["for"]["reference"].split("/")[1]
    s.dispose()
    # (route, how it is called, the actor named, the patient hashes the rows must carry)
    calls: list[tuple[tuple[str, str], Any, str, list[str | None]]] = [
        (
            ("GET", "/ui/referrals"),
            lambda: li.get("/ui/referrals?side=receiver&q=YT7788"),
            "user:dr.li",
            [phash],
        ),
        (
            ("GET", "/ui/referrals/{thread}"),
            lambda: li.get(f"/ui/referrals/{thread}"),
            "user:dr.li",
            [phash],
        ),
        (
            ("GET", "/ui/referrals/{thread}/slip"),
            lambda: li.get(f"/ui/referrals/{thread}/slip"),
            "user:dr.li",
            [phash],
        ),
        (
            ("GET", "/ui/referrals/{thread}/slip/{which}"),
            lambda: li.get(f"/ui/referrals/{thread}/slip/referral"),
            "user:dr.li",
            [phash],
        ),
        (
            ("GET", "/ui/consultations"),
            lambda: li.get("/ui/consultations?side=centre"),
            "user:dr.li",
            [qhash],
        ),
        (
            ("GET", "/ui/consultations/{thread}"),
            lambda: li.get(f"/ui/consultations/{consultation}"),
            "user:dr.li",
            [qhash],
        ),
        (
            ("GET", "/ui/consultations/{thread}/print/{which}"),
            lambda: li.get(f"/ui/consultations/{consultation}/print/application"),
            "user:dr.li",
            [qhash],
        ),
        (
            ("GET", "/ui/messages/{box}/{rid}"),
            lambda: it.get(f"/ui/messages/outbox/{box_id}?body=1"),
            "user:it.zhou",
            [None],
        ),
        (("GET", "/ui/audit"), lambda: aud.get("/ui/audit"), "user:aud.wu", [None]),
        (
            ("GET", "/fhir/{rtype}"),
            lambda: bearer(core, f"/fhir/ServiceRequest?patient={pid}", chen_token),
            "user:dr.chen",
            [phash],
        ),
        (
            ("GET", "/fhir/{rtype}/{rid}"),
            lambda: bearer(core, f"/fhir/Patient/{pid}", chen_token),
            "user:dr.chen",
            [phash],
        ),
        (
            ("POST", "/fhir/{rtype}/_search"),
            lambda: bearer(core, "/fhir/ServiceRequest/_search", chen_token, {"patient": pid}),
            "user:dr.chen",
            [phash],
        ),
        (
            ("GET", "/fhir/{rtype}/{rid}/_history"),
            lambda: bearer(core, f"/fhir/Patient/{pid}/_history", chen_token),
            "user:dr.chen",
            [phash],
        ),
        (
            ("GET", "/fhir/{rtype}/{rid}/_history/{vid}"),
            lambda: bearer(core, f"/fhir/Patient/{pid}/_history/1", chen_token),
            "user:dr.chen",
            [phash],
        ),
        (
            ("GET", "/local/v1/patients/{patient_hash}/results"),
            lambda: bearer(core, f"/local/v1/patients/{phash}/results", chen_token),
            "user:dr.chen",
            [phash],
        ),
    ]
    assert {c[0] for c in calls} | {("GET", "/fhir/{rtype}/_history")} == {
        k for k, v in ROUTES.items() if v == PHI
    }
    for route, call, actor, hashes in calls:
        before = head(core)
        answer = call()
        if isinstance(answer, tuple):  # a bearer call: (status, body)
            assert answer[0] == 200, (route, answer)
        reads = [r for r in rows_after(core, before) if r["action"] == "read"]
        if route[1].startswith("/ui/messages"):  # the outbox row's own hash, whatever it is
            hashes = [reads[0]["patient_hash"]] if reads else hashes
        assert [r["patient_hash"] for r in reads] == hashes, route
        assert {(r["actor"], r["address"]) for r in reads} == {(actor, "127.0.0.1")}, route
        assert all(
            r["actor_role"] and r["interaction"] in ("read", "search-type") for r in reads
        ), route
    # a type's history shows the patients of the versions on its page: one read row each
    before = head(core)
    status, page = bearer(core, "/fhir/Patient/_history?_count=5", chen_token)
    assert status == 200 and page["type"] == "history"
    shown = {e["resource"]["id"] for e in page.get("entry", [])}
    assert pid in shown or len(shown) == 5
    s = store(core)
    with s.read() as conn:
        expected = {fhirstore.get_row(conn, "Patient", i).patient_hash for i in shown}
    s.dispose()
    reads = [r for r in rows_after(core, before) if r["action"] == "read"]
    assert {r["patient_hash"] for r in reads} == expected and len(reads) == len(expected)
    assert {r["actor"] for r in reads} == {"user:dr.chen"}
    before = head(core)  # the audit log read through the API names the auditor
    assert bearer(core, "/fhir/AuditEvent/1", aud_token)[0] == 200
    assert [(r["actor"], r["actor_role"]) for r in rows_after(core, before)] == [
        ("user:aud.wu", "auditor")
    ]
    # headers alone are no patient data: opening a message without its body adds no read
    before = head(core)
    it.get(f"/ui/messages/outbox/{box_id}")
    assert [r for r in rows_after(core, before) if r["action"] == "read"] == []
    del chc


# -- lists, lookup, messages, time ------------------------------------------------------------


def test_referral_list_shows_names_and_record_numbers_with_search_and_paging(
    pair: Alliance, thread: str
) -> None:
    chc, core = pair.node("chc"), pair.node("core")
    extra = [
        new_thread(
            chc, referral("up-exam", "core", national_id=ZHAO_ID, name="赵建国", mrn=f"YT9{i:03d}")
        )
        for i in range(3)
    ]
    for t in extra:
        both(pair, t, "received", "received")
    li = person(core, "dr.li")
    page = li.get("/ui/referrals?side=receiver")
    total = int(re.search(r'<span class="total">(\d+)</span>', page).group(1))
    assert total >= 4
    inbox = section(page, "inbox")
    # the receiver matched one patient for the three (same ID number): its record number
    assert "王秀英" in inbox and "YT7788" in inbox and "赵建国" in inbox and "YT9000" in inbox, (
        re.sub(r"<[^>]+>", " ", inbox)[:3000]
    )
    status, url, found = li.open("/ui/referrals/search", {"q": "赵建国"})
    assert status == 200 and "q=" in url
    assert re.search(r'<span class="total">(\d+)</span>', found).group(1) == "3"
    assert "王秀英" not in section(found, "inbox")
    status, url, by_id = li.open("/ui/referrals/search", {"q": ZHAO_ID, "side": "receiver"})
    assert status == 200 and ZHAO_ID not in url  # the ID number became the keyed hash
    assert f"patient_hash={patient_hash(core.plan.patient_hash_key, ZHAO_ID)}" in url
    assert re.search(r'<span class="total">(\d+)</span>', by_id).group(1) == "3"
    assert ZHAO_ID not in by_id
    by_mrn = li.get("/ui/referrals?" + urlencode({"q": "YT7788"}))
    assert re.search(r'<span class="total">(\d+)</span>', by_mrn).group(1) == "1"
    # keyset paging: two per page, every referral exactly once
    from bridge.web import referral_list

    s = store(core)
    seen: list[str] = []
    after = None
    with s.read() as conn:
        while True:
            rows, n, after = referral_list.page(
                conn, core.plan.patient_hash_key, side="receiver", after=after, size=2
            )
            seen += [r["thread"] for r in rows]
            if after is None:
                break
    s.dispose()
    assert len(seen) == len(set(seen)) == n == total
    assert set(extra) | {thread} <= set(seen)


def test_message_browser_finds_a_patients_packets_and_resends_once(
    pair: Alliance, thread: str
) -> None:
    chc = pair.node("chc")
    add_user(chc, "it.ma", "it", "马工")
    it = person(chc, "it.ma")
    it.get("/ui/messages")
    # two refused packets land in quarantine: one names the patient in its bundle (for a
    # recipient no rule allows), one names nobody but is on the patient's thread
    refused = chc.api(
        "POST",
        "/local/v1/packets",
        [
            {
                "to": "nowhere",
                "kind": "referral.request",
                "thread": None,
                "bundle": referral("up-exam", "nowhere", national_id=WANG_ID),
            },
            {
                "to": "nowhere",
                "kind": "referral.status",
                "thread": thread,
                "bundle": {"resourceType": "Bundle", "type": "collection"},
            },
            {
                "to": "nowhere",
                "kind": "referral.request",
                "thread": None,
                "bundle": referral("up-exam", "nowhere", national_id=ZHAO_ID),
            },
        ],
        role="clinician",
    )["results"]
    assert [x["code"] for x in refused] == ["HT-PKT-ROUTE-DENIED"] * 3, refused
    status, url, page = it.open("/ui/audit/lookup", {"national_id": WANG_ID, "back": "messages"})
    assert status == 200 and "/ui/messages?patient_hash=" in url
    listing = section(page, "messages")
    assert thread in listing and WANG_ID not in page
    boxes = re.findall(r"<tr><td><time>[^<]*</time></td><td>(\w+)</td>", listing)
    assert {"outbox", "inbox", "quarantine"} <= set(boxes), boxes
    assert boxes.count("quarantine") == 2  # not the other patient's
    assert re.search(r'<span class="total">([\d,]+)</span>', page).group(1) == str(len(boxes))
    r = cli(
        chc,
        "messages",
        "search",
        "--patient",
        patient_hash(chc.plan.patient_hash_key, WANG_ID),
        "--json",
    )
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)["rows"]
    assert got and {g["thread"] for g in got} >= {thread}
    assert {g["box"] for g in got} >= {"outbox", "inbox", "quarantine"}
    q = [g for g in got if g["box"] == "quarantine"]
    assert sorted(g["kind"] for g in q) == ["referral.request", "referral.status"]
    assert all(g["patient_hash"] == patient_hash(chc.plan.patient_hash_key, WANG_ID) for g in q)
    s = store(chc)  # the typed ID number is stored nowhere new
    with s.read() as conn:
        from bridge.store.tables import QUARANTINE

        held = conn.execute(select(QUARANTINE.c.message, QUARANTINE.c.patient_hash)).all()
    s.dispose()
    assert all(WANG_ID not in (m or "") and (h or "") != WANG_ID for m, h in held)
    out = next(
        g
        for g in got
        if g["box"] in ("outbox", "dead")
        and g["thread"] == thread
        and g["kind"] == "referral.request"
    )
    one = it.get(f"/ui/messages/outbox/{out['id']}")
    path = section(one, "path")
    assert "queued" in path and "sent" in path and "+08:00" in path
    status, url, body = it.open(f"/ui/messages/outbox/{out['id']}/resend", {"reason": ""})
    assert status == 422 and "reason: a resend needs a reason" in body
    core = pair.node("core")
    from bridge.referral.tables import REFERRAL_STEP

    def core_steps() -> int:
        s = store(core)
        with s.read() as conn:
            n = conn.execute(
                select(func.count())
                .select_from(REFERRAL_STEP)
                .where(REFERRAL_STEP.c.thread == thread)
            ).scalar()
        s.dispose()
        return n

    steps_before = core_steps()
    before = head(chc)
    status, url, page = it.open(
        f"/ui/messages/outbox/{out['id']}/resend", {"reason": "HIS lost the request"}
    )
    assert status == 200
    resent = [r for r in rows_after(chc, before) if r["action"] == "replayed"]
    assert [(r["actor"], r["packet_id"]) for r in resent] == [("user:it.ma", out["packet_id"])]
    assert "HIS lost the request" in resent[0]["message"]

    def delivered_once() -> bool:
        s = store(chc)
        with s.read() as conn:
            st = conn.execute(select(OUTBOX.c.state).where(OUTBOX.c.id == out["id"])).scalar()
        s.dispose()
        return st == "acknowledged"

    wait_for(delivered_once, timeout=30, what="the resent packet acknowledged")
    from bridge.store.tables import INBOX

    s = store(core)
    with s.read() as conn:
        n = conn.execute(
            select(func.count()).select_from(INBOX).where(INBOX.c.packet_id == out["packet_id"])
        ).scalar()
    s.dispose()
    assert n == 1  # the receiver keeps it once
    assert core_steps() == steps_before  # and its referral workflow applied it once
    # the same from the command line: opening the body is a read naming the OS user
    before = head(chc)
    r = cli(chc, "messages", "show", "outbox", str(out["id"]), "--body")
    assert r.returncode == 0, r.stderr
    assert '"resourceType": "Bundle"' in r.stdout and "+08:00" in r.stdout
    reads = [x for x in rows_after(chc, before) if x["action"] == "read"]
    assert len(reads) == 1 and reads[0]["actor"].startswith("cli:")
    assert reads[0]["packet_id"] == out["packet_id"]
    r = cli(chc, "messages", "resend", "outbox", str(out["id"]))
    assert r.returncode != 0  # a reason is required
    r = cli(chc, "messages", "resend", "outbox", str(out["id"]), "--reason", "test again")
    assert r.returncode == 0 and "queued" in r.stdout, r.stderr


def test_the_same_typed_time_gives_the_same_rows_on_the_page_and_in_the_cli(
    pair: Alliance, thread: str
) -> None:
    core = pair.node("core")
    tz = zone(core.plan.web.display_zone)
    # a wall-clock time a minute ago in the display zone, typed without an offset
    typed = (datetime.now(UTC) - timedelta(minutes=1)).astimezone(tz).strftime("%Y-%m-%dT%H:%M")
    aud = person(core, "aud.wu")
    page = aud.get("/ui/audit?" + urlencode({"since": typed, "action": "read"}))
    web_seqs = [int(s) for s in re.findall(r"<tr><td>(\d+)</td>", section(page, "audit"))]
    r = cli(core, "audit", "export", "--since", typed, "--action", "read", "--format", "csv")
    assert r.returncode == 0, r.stderr
    cli_seqs = [int(row["seq"]) for row in csv.DictReader(io.StringIO(r.stdout))]
    web_set = set(web_seqs)
    assert web_set and web_set <= set(cli_seqs)  # the CLI runs later: it may see more
    assert set(cli_seqs) - web_set == {s for s in cli_seqs if s > max(web_seqs)}
    # the message browser: the same typed time on the page and in `hutong messages search`
    add_user(core, "it.lu", "it", "卢工")
    it = person(core, "it.lu")
    early = (datetime.now(UTC) - timedelta(hours=1)).astimezone(tz).strftime("%Y-%m-%d %H:%M")
    # to the second, a moment ago: the thread's packets are before it, anything sent while
    # the test runs is after it on both sides
    late = (datetime.now(UTC) - timedelta(seconds=1)).astimezone(tz).strftime("%Y-%m-%dT%H:%M:%S")
    page = it.get("/ui/messages?" + urlencode({"since": early, "until": late}))
    web_rows = re.findall(r'href="/ui/messages/(\w+)/(\d+)"', section(page, "messages"))
    total = int(re.search(r'<span class="total">([\d,]+)</span>', page).group(1).replace(",", ""))
    r = cli(
        core, "messages", "search", "--since", early, "--until", late, "--json", "--limit", "500"
    )
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert web_rows and web_rows == [(g["box_table"], str(g["id"])) for g in got["rows"]][:50]
    assert got["total"] == total and got["exact"]
    # and the same instant with an explicit offset, a date alone, a relative form
    since = parse_when(typed, tz)
    assert parse_when(typed + show(since, tz)[-6:], tz) == since
    assert parse_when(typed[:10], tz) == datetime.fromisoformat(typed[:10]).replace(
        tzinfo=tz
    ).astimezone(UTC)
    now = datetime(2026, 12, 7, 1, 0, tzinfo=UTC)
    assert parse_when("-2h", tz, lambda: now) == now - timedelta(hours=2)
    assert parse_when("yesterday", tz, lambda: now) == datetime(2026, 12, 5, 16, 0, tzinfo=UTC)
    with pytest.raises(ValueError, match="times are ISO 8601") as bad:
        parse_when("next tuesday-ish", tz)
    assert "tuesday" not in str(bad.value)
    assert "+08:00" in page
