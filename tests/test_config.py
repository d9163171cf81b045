"""Site configuration: scaffolded and shipped alliances load into exact plans; broken ones report
every problem at once, one line each with file and key path."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import tomllib
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from pydantic import BaseModel

from bridge.config.loader import check_alliance, load_node
from bridge.config.models import AdapterConfig, NodeFile, NodePlan
from bridge.config.rules import Rule, RuleSet
from bridge.config.scaffold import init_keys_and_secrets, write_alliance
from bridge.config.secrets import resolve_secret
from bridge.crypto.keys import generate_node_keys, parse_public_key
from bridge.errors import ConfigError, NotFound
from bridge.local.registry import adapter_type

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "config" / "alliances" / "fuxing"

MEMBERS = [
    {"id": "core", "zh": "复兴医院", "en": "Fuxing Hospital", "role": "core", "via": "hub"},
    {
        "id": "chc",
        "zh": "月坛社区卫生服务中心",
        "en": "Yuetan CHC",
        "role": "community",
        "via": "hub",
    },
    {"id": "hub", "zh": "医联体信息平台", "en": "Alliance Platform", "role": "platform"},
]
RULES = [
    {"from": "role:community", "to": "core", "kinds": ["referral.request", "referral.status"]},
    {"from": "core", "to": "role:community", "kinds": ["referral.return"], "note": "下转"},
    {"from": "*", "to": "*", "kinds": ["receipt"]},
]


def raw(key: Ed25519PublicKey | X25519PublicKey) -> bytes:
    return key.public_bytes_raw()


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


@pytest.fixture
def alliance(tmp_path: Path) -> Path:
    folder = tmp_path / "demo"
    write_alliance(folder, MEMBERS, RULES, alliance_id="demo")
    return folder


# --- a scaffolded alliance, field by field ---------------------------------------------------


def test_scaffold_writes_node_files_keys_and_private_secrets(tmp_path: Path) -> None:
    folder = tmp_path / "demo"
    nodes = write_alliance(folder, MEMBERS, RULES)
    assert nodes == {m["id"]: folder / "nodes" / f"{m['id']}.toml" for m in MEMBERS}
    for m in MEMBERS:
        for name in (f"{m['id']}.sign.key", f"{m['id']}.enc.key"):
            assert (folder / "keys" / name).stat().st_mode & 0o777 == 0o600
        for role in ("clinician", "it", "auditor"):
            token = folder / "secrets" / f"{m['id']}.{role}.token"
            assert token.stat().st_mode & 0o777 == 0o600
            assert len(token.read_text().strip()) == 64
    hash_key = (folder / "secrets" / "patient-hash.key").read_text().strip()
    assert len(bytes.fromhex(hash_key)) == 32
    assert check_alliance(folder) == []


def test_plan_fields(alliance: Path) -> None:
    plans = {m["id"]: load_node(alliance / "nodes" / f"{m['id']}.toml") for m in MEMBERS}
    root = alliance.resolve()
    for i, m in enumerate(MEMBERS, start=1):
        plan = plans[m["id"]]
        node_id = m["id"]
        assert plan.node_id == node_id
        assert (plan.names.zh, plan.names.en) == (m["zh"], m["en"])
        assert plan.role == m["role"]
        assert plan.alliance.id == "demo"
        assert plan.alliance.names.zh == "演示医联体"
        assert plan.alliance.national_id_system == "urn:oid:2.16.156.10011.1.3"
        assert (plan.local_host, plan.local_port) == ("127.0.0.1", 8100 + i)
        assert (plan.peer_host, plan.peer_port) == ("127.0.0.1", 9100 + i)
        assert plan.data_dir == root / "data" / node_id
        assert plan.storage_dsn == f"sqlite:///{root}/data/{node_id}/node.db"
        assert plan.keys.signing == root / "keys" / f"{node_id}.sign.key"
        assert plan.keys.encryption == root / "keys" / f"{node_id}.enc.key"
        assert plan.keys.passphrase is None
        assert dict(plan.tokens) == {
            role: (root / "secrets" / f"{node_id}.{role}.token").read_text().strip()
            for role in ("clinician", "it", "auditor")
        }
        assert len(set(plan.tokens.values())) == 3
        assert plan.patient_hash_key == bytes.fromhex(
            (root / "secrets" / "patient-hash.key").read_text()
        )
        assert (plan.limits.max_body_bytes, plan.limits.clock_window_s, plan.limits.max_batch) == (
            20971520,
            300,
            500,
        )
        d = plan.delivery
        assert (d.batch_size, d.max_attempts, d.dead_after_s) == (200, 50, 604800)
        assert (d.backoff_base_s, d.backoff_max_s, d.per_peer_concurrency) == (0.5, 300.0, 1)
        assert d.poll_interval_s == 0.5
        assert dict(d.handlers) == {"*": "spool"} and d.handler_for("result.lab") == "spool"
        assert d.spool_dir == root / "data" / node_id / "spool"
        assert dict(plan.retention.body_days) == {"*": 30.0}
        assert (plan.retention.audit_days, plan.retention.run_every_s) == (183, 3600.0)
        assert plan.retention.body_days_for("result.imaging") == 30.0
        assert plan.audit.checkpoint_every == 1000
        assert plan.source_files[:2] == (root / "alliance.toml", root / "nodes" / f"{node_id}.toml")
        public_files = {root / "keys" / f"{x['id']}.pub.json" for x in MEMBERS}
        assert set(plan.source_files[2:]) == public_files

        # the directory holds exactly the generated public keys, and the member entries
        assert list(plan.directory) == ["core", "chc", "hub"]
        for j, other in enumerate(MEMBERS, start=1):
            member = plan.directory[other["id"]]
            pub = json.loads((root / "keys" / f"{other['id']}.pub.json").read_text())
            assert [raw(k) for k in member.signing_keys] == [raw(parse_public_key(pub["signing"]))]
            assert [raw(k) for k in member.encryption_keys] == [
                raw(parse_public_key(pub["encryption"]))
            ]
            assert isinstance(member.signing_keys[0], Ed25519PublicKey)
            assert isinstance(member.encryption_keys[0], X25519PublicKey)
            assert member.role == other["role"]
            assert member.via == other.get("via")
            assert member.exchange_url == f"http://127.0.0.1:{9100 + j}"
            assert member.names.en == other["en"]

    chc, core, hub = plans["chc"], plans["core"], plans["hub"]
    assert chc.next_hop("core") == "hub"
    assert chc.next_hop("hub") == "hub"
    assert core.next_hop("chc") == "hub"
    assert hub.next_hop("core") == "core"
    assert hub.next_hop("chc") == "chc"
    with pytest.raises(NotFound):
        chc.next_hop("nobody")

    # one hash per node, each stable across reloads
    assert len({p.config_hash for p in plans.values()}) == 3
    for node_id, plan in plans.items():
        assert len(plan.config_hash) == 64
        assert load_node(alliance / "nodes" / f"{node_id}.toml").config_hash == plan.config_hash


def test_rules_allow_exactly_what_is_written(alliance: Path) -> None:
    rules = load_node(alliance / "nodes" / "chc.toml").rules
    allowed = {
        (s, r, k)
        for s in ("core", "chc", "hub", "stranger")
        for r in ("core", "chc", "hub", "stranger")
        for k in ("referral.request", "referral.status", "referral.return", "receipt", "x.y")
        if rules.allows(s, r, k)
    }
    members = ("core", "chc", "hub")
    assert allowed == {
        ("chc", "core", "referral.request"),
        ("chc", "core", "referral.status"),
        ("core", "chc", "referral.return"),
    } | {(s, r, "receipt") for s in members for r in members}
    rule = rules.matching_rule("core", "chc", "referral.return")
    assert rule == Rule(1, "core", "role:community", ("referral.return",), "下转")
    assert rules.matching_rule("chc", "core", "referral.return") is None
    assert rules.describe()[0] == {
        "index": 0,
        "from": "role:community",
        "to": "core",
        "kinds": ["referral.request", "referral.status"],
        "note": None,
        "senders": ["chc"],
        "recipients": ["core"],
    }
    assert rules.describe()[2]["senders"] == ["chc", "core", "hub"]


def test_config_hash_changes_with_an_edit_and_plan_is_immutable(alliance: Path) -> None:
    node = alliance / "nodes" / "chc.toml"
    before = load_node(node)
    edit(node, 'data_dir = "../data/chc"', 'data_dir = "../data/chc"\n[delivery]\nbatch_size = 50')
    after = load_node(node)
    assert after.delivery.batch_size == 50
    assert after.config_hash != before.config_hash
    edit(alliance / "alliance.toml", 'kinds = ["receipt"]', 'kinds = ["receipt", "result.lab"]')
    assert load_node(node).config_hash != after.config_hash

    with pytest.raises(dataclasses.FrozenInstanceError):
        after.node_id = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        after.directory["x"] = after.directory["chc"]  # type: ignore[index]
    with pytest.raises(TypeError):
        after.tokens["it"] = "y"  # type: ignore[index]
    assert "patient_hash_key" not in repr(after) and after.tokens["it"] not in repr(after)


def test_dsn_with_password_goes_to_a_secret_file(tmp_path: Path) -> None:
    dsns = {
        "core": "postgresql+psycopg://hutong:s3cr3t-pg-pass-2024@db.local:5432/core",
        "chc": "postgresql+psycopg://db.local/chc",
    }
    nodes = write_alliance(tmp_path / "pg", MEMBERS, RULES, dsn_for=lambda n: dsns.get(n, ""))
    assert "s3cr3t" not in nodes["core"].read_text()
    assert 'storage_dsn = "file:../secrets/core.dsn"' in nodes["core"].read_text()
    assert load_node(nodes["core"]).storage_dsn == dsns["core"]
    assert load_node(nodes["chc"]).storage_dsn == dsns["chc"]
    hub = load_node(nodes["hub"])
    assert hub.storage_dsn == f"sqlite:///{(tmp_path / 'pg').resolve()}/data/hub/node.db"

    edit(nodes["chc"], "postgresql+psycopg://db.local/chc", "postgresql+psycopg://u:pw@db/chc")
    with pytest.raises(ConfigError) as exc:
        load_node(nodes["chc"])
    assert len(exc.value.problems) == 1
    assert exc.value.problems[0].startswith(
        "nodes/chc.toml: storage_dsn: the DSN contains a password: put the whole DSN in a secret"
    )


def test_alert_webhook_url_may_be_a_secret_reference(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # chat-robot webhooks carry their access key in the URL: the node file names where it is
    nodes = write_alliance(tmp_path / "hook", MEMBERS, RULES)
    url = "https://robot.example.cn/send?key=3f9a1c55-kept-out-of-the-node-file"
    (tmp_path / "hook" / "secrets" / "alerts.url").write_text(url + "\n", encoding="utf-8")
    with open(nodes["core"], "a", encoding="utf-8") as f:
        f.write('\n[alerts]\nwebhook_url = "file:../secrets/alerts.url"\n')
    assert load_node(nodes["core"]).alerts.webhook_url == url
    assert url not in nodes["core"].read_text()
    monkeypatch.setenv("HUTONG_ALERT_HOOK", "http://127.0.0.1:9/hook")
    edit(nodes["core"], "file:../secrets/alerts.url", "env:HUTONG_ALERT_HOOK")
    assert load_node(nodes["core"]).alerts.webhook_url == "http://127.0.0.1:9/hook"
    assert load_node(nodes["chc"]).alerts.webhook_url is None
    # the target must be an http(s) URL; the error does not quote what the secret holds
    monkeypatch.setenv("HUTONG_ALERT_HOOK", "ftp://robot.example.cn/key=abc123")
    with pytest.raises(ConfigError) as exc:
        load_node(nodes["core"])
    assert exc.value.problems == [
        "nodes/core.toml: alerts.webhook_url: is not an http(s) URL for the alert webhook"
    ]
    monkeypatch.delenv("HUTONG_ALERT_HOOK")
    with pytest.raises(ConfigError) as exc:
        load_node(nodes["core"])
    assert exc.value.problems == [
        "nodes/core.toml: alerts.webhook_url: environment variable HUTONG_ALERT_HOOK is not set"
    ]
    edit(nodes["core"], "env:HUTONG_ALERT_HOOK", "ftp://inline.example.cn/hook")
    with pytest.raises(ConfigError) as exc:
        load_node(nodes["core"])
    assert exc.value.problems == [
        "nodes/core.toml: alerts.webhook_url: is not an http(s) URL for the alert webhook"
    ]


# --- a broken alliance: every problem at once -----------------------------------------------


def test_broken_alliance_reports_every_problem(alliance: Path) -> None:
    atoml = alliance / "alliance.toml"
    edit(atoml, 'role = "community"', 'role = "hospital"')  # bad role (chc, members[1])
    duplicate = (
        '[[members]]\nid = "core"\nnames = { zh = "重复", en = "Duplicate" }\nrole = "core"\n'
        'exchange_url = "http://127.0.0.1:9999"\nsigning_key = "keys/core.pub.json"\n'
        'encryption_key = "keys/core.pub.json"\n\n[[rules]]'
    )
    edit(atoml, "[[rules]]", duplicate)  # members[3] duplicates members[0]
    edit(atoml, 'from = "core"', 'from = "yuetan"')  # rules[1] names an unknown member
    edit(atoml, 'via = "hub"', 'via = "chc"')  # core reached via a non-platform member
    edit(atoml, 'to = "core"', 'to = "role:hospital"')  # rules[0] names an unknown role
    edit(atoml, 'role = "platform"', 'role = "platform"\nvia = "hub"')  # platform via itself
    chc = alliance / "nodes" / "chc.toml"
    edit(chc, 'peer_bind = "127.0.0.1:9102"', 'peer_bind = "127.0.0.1:8102"')
    edit(chc, 'data_dir = "../data/chc"', 'data_dir = "../data/chc"\n[delivery]\nbatch_size = 0')
    edit(chc, "[tokens]", '[tokens]\nnurse = "file:../secrets/chc.it.token"')
    (alliance / "secrets" / "core.clinician.token").write_text("changeme\n")
    (alliance / "secrets" / "hub.auditor.token").write_text("short-token\n")
    (alliance / "keys" / "hub.enc.key").unlink()
    (alliance / "nodes" / "extra.toml").write_text('node_id = "extra"\nlocal_bind = \n')

    problems = check_alliance(alliance)
    placeholder = "a node refuses to start with a placeholder secret"
    expected = [
        (
            "alliance.toml: members[1].role: Input should be 'core', 'secondary', 'community' or "
            "'platform'"
        ),
        "alliance.toml: members[3].id: duplicate member id 'core' (also members[0])",
        (
            "alliance.toml: members[0].via: 'chc' is a hospital member; via must name a platform "
            "member"
        ),
        (
            "alliance.toml: rules[0].to: unknown role 'hospital' (roles: core, secondary, community, "
            "platform)"
        ),
        "alliance.toml: rules[1].from: unknown member 'yuetan'",
        "alliance.toml: members[2].via: a member cannot be reached via itself",
        "nodes/chc.toml: delivery.batch_size: Input should be greater than 0",
        "nodes/chc.toml: tokens.nurse: Extra inputs are not permitted",
        "nodes/chc.toml: peer_bind: must differ from local_bind (127.0.0.1:8102)",
        (
            "nodes/core.toml: tokens.clinician: secret file ../secrets/core.clinician.token looks "
            f"like a placeholder ('changeme'); {placeholder}"
        ),
        "nodes/extra.toml: line 2, column 14: TOML syntax error: Invalid value",
        (
            "nodes/hub.toml: tokens.auditor: secret file ../secrets/hub.auditor.token is shorter "
            f"than 16 characters; {placeholder}"
        ),
        "nodes/hub.toml: keys.encryption: private key file ../keys/hub.enc.key not found",
    ]
    for line in expected:
        assert line in problems
    assert sorted(problems) == sorted(expected)

    with pytest.raises(ConfigError) as exc:
        load_node(chc)
    assert exc.value.code == "HT-CONFIG"
    assert "nodes/chc.toml: delivery.batch_size: Input should be greater than 0" in (
        exc.value.problems
    )
    assert "alliance.toml: rules[1].from: unknown member 'yuetan'" in exc.value.problems
    assert not any(p.startswith("nodes/hub.toml") for p in exc.value.problems)


def test_more_problems_each_on_its_own_line(alliance: Path) -> None:
    atoml = alliance / "alliance.toml"
    edit(atoml, 'exchange_url = "http://127.0.0.1:9102"', 'exchange_url = "ftp://chc"')
    edit(atoml, 'kinds = ["receipt"]', 'kinds = ["Receipt"]')
    (alliance / "secrets" / "patient-hash.key").write_text("ab" * 16)
    shutil.copy(alliance / "keys" / "core.pub.json", alliance / "keys" / "hub.pub.json")
    core = alliance / "nodes" / "core.toml"
    edit(core, "[tokens]", "[retention]\naudit_days = 90\n\n[tokens]")
    edit(core, 'it = "file:../secrets/core.it.token"', 'it = "s3cr3t-inline-token-value"')
    edit(core, 'auditor = "file:../secrets/core.auditor.token"', 'auditor = "env:HT_NO_SUCH_VAR"')
    chc = alliance / "nodes" / "chc.toml"
    edit(chc, 'node_id = "chc"', 'node_id = "core"')
    (alliance / "keys" / "chc.sign.key").chmod(0o644)

    problems = check_alliance(alliance)
    expected = [
        (
            "alliance.toml: members[1].exchange_url: 'ftp://chc' is not an http(s) URL such as "
            "http://127.0.0.1:9101"
        ),
        (
            "alliance.toml: rules[2].kinds[0]: 'Receipt' is not a message kind such as "
            "'referral.request' or '*'"
        ),
        (
            "alliance.toml: alliance.patient_hash_key: is 16 bytes; national ID numbers are few "
            "enough to enumerate, so the HMAC key needs at least 32 random bytes"
        ),
        (
            "alliance.toml: members[2].signing_key: keys/hub.pub.json holds the keys of 'core', "
            "not 'hub'"
        ),
        (
            "alliance.toml: members[2].encryption_key: keys/hub.pub.json holds the keys of 'core', "
            "not 'hub'"
        ),
        (
            "nodes/chc.toml: keys.signing: private key file ../keys/chc.sign.key is open to others "
            "(mode 644); chmod 600"
        ),
        (
            "nodes/chc.toml: keys.signing: private key file ../keys/chc.sign.key does not match the "
            "public key alliance.toml lists for this node"
        ),
        (
            "nodes/chc.toml: keys.encryption: private key file ../keys/chc.enc.key does not match "
            "the public key alliance.toml lists for this node"
        ),
        "nodes/core.toml: node_id: 'core' is also nodes/chc.toml",
        "nodes/chc.toml: node_id: 'core' does not match the file name",
        (
            "nodes/core.toml: tokens.it: must be a secret reference 'env:NAME' or 'file:path' "
            "(no inline secrets in config files)"
        ),
        (
            "nodes/core.toml: retention.audit_days: must be at least 183: MLPS 2.0 (等级保护 2.0) "
            "keeps audit logs for six months"
        ),
        "nodes/core.toml: tokens.auditor: environment variable HT_NO_SUCH_VAR is not set",
    ]
    assert sorted(problems) == sorted(expected)


# --- the shipped Fuxing alliance ------------------------------------------------------------


def test_shipped_fuxing_alliance(tmp_path: Path) -> None:
    # the node files name the mapping and vendor field-map folders relative to the repository
    folder = tmp_path / "config" / "alliances" / "fuxing"
    shutil.copytree(SHIPPED, folder, ignore=shutil.ignore_patterns("keys", "secrets", "data"))
    for linked in ("mappings", "simulators"):
        (tmp_path / linked).symlink_to(REPO / linked)
    ids = [
        "fuxing",
        "guangwai-hosp",
        "zhanlanlu-hosp",
        "yuetan-chc",
        "guangwai-chc",
        "zhanlanlu-chc",
        "platform",
    ]

    missing = check_alliance(folder)
    for i, node_id in enumerate(ids):
        for key in ("signing", "encryption"):
            assert (
                f"alliance.toml: members[{i}].{key}_key: public key file keys/{node_id}.pub.json "
                "not found"
            ) in missing
        assert (
            f"nodes/{node_id}.toml: keys.signing: private key file ../keys/{node_id}.sign.key "
            "not found"
        ) in missing
        assert (
            f"nodes/{node_id}.toml: keys.encryption: private key file ../keys/{node_id}.enc.key "
            "not found"
        ) in missing
    assert (
        "alliance.toml: alliance.patient_hash_key: secret file secrets/patient-hash.key not found"
        in missing
    )
    # the two intermediate-database HIS adapters read their database's DSN from a secret file
    # of the site (the demo writes it): checked before anything starts, like every option
    his_dsn = [
        f"nodes/{n}.toml: adapters.his.options.dsn: cannot read "
        f"{folder / 'secrets' / f'{n}-his.dsn'} (No such file or directory)"
        for n in ("yuetan-chc", "zhanlanlu-hosp")
    ]
    assert [p for p in missing if "adapters." in p] == his_dsn
    assert len(missing) == 1 + 7 * 2 + 7 * (2 + 3) + 2  # hash key, public keys, private keys,
    # tokens, HIS DSNs

    made = init_keys_and_secrets(folder)
    assert len(made) == 1 + 7 * 3 + 7 * 3
    assert check_alliance(folder) == his_dsn
    for n in ("yuetan-chc", "zhanlanlu-hosp"):
        (folder / "secrets" / f"{n}-his.dsn").write_text(f"sqlite:///{tmp_path}/{n}-his.db\n")
    assert check_alliance(folder) == []
    assert init_keys_and_secrets(folder) == []  # nothing missing: nothing touched

    plans = {node_id: load_node(folder / "nodes" / f"{node_id}.toml") for node_id in ids}
    for i, node_id in enumerate(ids, start=1):
        plan = plans[node_id]
        assert (plan.local_port, plan.peer_port) == (8100 + i, 9100 + i)
        assert plan.local_host == plan.peer_host == "127.0.0.1"
        assert plan.alliance.id == "fuxing"
        assert plan.alliance.names.zh == "复兴医院医联体"
        assert plan.directory[node_id].via == (None if node_id == "platform" else "platform")
    fuxing = plans["fuxing"]
    assert fuxing.names.zh == "首都医科大学附属复兴医院"
    assert fuxing.names.en == "Fuxing Hospital, Capital Medical University"
    assert {m.id: m.role for m in fuxing.directory.values()} == {
        "fuxing": "core",
        "guangwai-hosp": "secondary",
        "zhanlanlu-hosp": "secondary",
        "yuetan-chc": "community",
        "guangwai-chc": "community",
        "zhanlanlu-chc": "community",
        "platform": "platform",
    }
    assert fuxing.directory["yuetan-chc"].names.zh == "西城区月坛社区卫生服务中心"
    assert fuxing.directory["platform"].names.zh == "医联体信息平台"

    rules = fuxing.rules
    # both directions carry the whole referral loop: up-referrals start at the members,
    # down-referrals for continuing care start at the core hospital
    up = [
        "referral.request",
        "referral.status",
        "referral.cancel",
        "referral.return",
        "result.lab",
        "result.imaging",
        "receipt",
    ]
    down = list(up)
    kinds = sorted(set(up) | set(down))
    for other in ids[1:6]:
        assert [k for k in kinds if rules.allows(other, "fuxing", k)] == sorted(up)
        assert [k for k in kinds if rules.allows("fuxing", other, k)] == sorted(down)
        for third in ids[1:]:
            assert not any(rules.allows(other, third, k) for k in kinds)
        assert not any(rules.allows("platform", other, k) for k in kinds)

    assert plans["yuetan-chc"].next_hop("fuxing") == "platform"
    assert plans["fuxing"].next_hop("zhanlanlu-chc") == "platform"
    assert plans["platform"].next_hop("fuxing") == "fuxing"


# --- key rollover ---------------------------------------------------------------------------


def test_rollover_member_has_two_signing_keys(alliance: Path) -> None:
    chc_node = alliance / "nodes" / "chc.toml"
    before = load_node(chc_node)
    new = generate_node_keys(alliance / "keys" / "next", "chc")
    edit(
        alliance / "alliance.toml",
        'encryption_key = "keys/chc.pub.json"',
        'encryption_key = "keys/chc.pub.json"\n'
        f'next_signing_key = "{new["signing"]}"\n'
        'next_encryption_key = "keys/next/chc.pub.json"',
    )
    old = json.loads((alliance / "keys" / "chc.pub.json").read_text())
    plan = load_node(alliance / "nodes" / "core.toml")
    chc = plan.directory["chc"]
    assert [raw(k) for k in chc.signing_keys] == [
        raw(parse_public_key(old["signing"])),
        raw(parse_public_key(new["signing"])),
    ]
    assert [raw(k) for k in chc.encryption_keys] == [
        raw(parse_public_key(old["encryption"])),
        raw(parse_public_key(new["encryption"])),
    ]
    assert len(plan.directory["core"].signing_keys) == 1
    assert alliance.resolve() / "keys" / "next" / "chc.pub.json" in plan.source_files
    after = load_node(chc_node)
    assert after.config_hash != before.config_hash

    # the node may already run on its next keys during the overlap
    edit(chc_node, "../keys/chc.sign.key", "../keys/next/chc.sign.key")
    edit(chc_node, "../keys/chc.enc.key", "../keys/next/chc.enc.key")
    assert load_node(chc_node).keys.signing == alliance.resolve() / "keys/next/chc.sign.key"

    # a key of the wrong algorithm is refused
    edit(
        alliance / "alliance.toml",
        f'next_signing_key = "{new["signing"]}"',
        f'next_signing_key = "{new["encryption"]}"',
    )
    assert "alliance.toml: members[1].next_signing_key: must be an ed25519 key" in check_alliance(
        alliance
    )


# --- small parts ----------------------------------------------------------------------------


def test_resolve_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "t.token").write_text("f3a9c1d27be84e06a5d1\n")
    assert resolve_secret("file:t.token", tmp_path) == "f3a9c1d27be84e06a5d1"
    assert resolve_secret(f"file:{tmp_path / 't.token'}", "/") == "f3a9c1d27be84e06a5d1"
    monkeypatch.setenv("HT_TEST_TOKEN", "9c1d27be84e06a5d1f3a")
    assert resolve_secret("env:HT_TEST_TOKEN", tmp_path) == "9c1d27be84e06a5d1f3a"

    def problem(ref: str) -> str:
        with pytest.raises(ConfigError) as exc:
            resolve_secret(ref, tmp_path)
        return exc.value.problems[0]

    assert problem("9c1d27be84e06a5d1f3a") == (
        "must be a secret reference 'env:NAME' or 'file:path' (no inline secrets in config files)"
    )
    assert problem("file:nope") == "secret file nope not found"
    for value, why in [
        ("", "is empty"),
        ("CHANGE-ME-0123456789", "looks like a placeholder ('CHANGE-ME')"),
        ("my-Password-for-the-node", "looks like a placeholder ('Password')"),
        ("xxxxxxxxxxxxxxxxxxxx", "looks like a placeholder ('xxxxxxxxxxxxxxxxxxxx')"),
        ("TODO: real token here", "looks like a placeholder ('TODO')"),
        ("abc123", "is shorter than 16 characters"),
    ]:
        monkeypatch.setenv("HT_TEST_TOKEN", value)
        assert problem("env:HT_TEST_TOKEN") == (
            f"environment variable HT_TEST_TOKEN {why}; "
            "a node refuses to start with a placeholder secret"
        )


def test_ruleset_patterns() -> None:
    @dataclasses.dataclass
    class M:
        role: str

    directory = {"a": M("core"), "b": M("community"), "c": M("community")}
    rules = RuleSet(
        [Rule(0, "role:community", "a", ("*",)), Rule(1, "a", "b", ("result.lab",))], directory
    )
    assert rules.allows("b", "a", "anything.at-all") and rules.allows("c", "a", "receipt")
    assert rules.allows("a", "b", "result.lab")
    assert not rules.allows("a", "c", "result.lab")
    assert not rules.allows("a", "b", "result.imaging")
    assert not rules.allows("z", "a", "receipt")  # not a member: no pattern matches
    assert RuleSet([], directory).allows("a", "b", "receipt") is False  # default deny


def test_plan_type_is_the_loader_export() -> None:
    from bridge.config import loader

    assert loader.NodePlan is NodePlan


# --- what the shipped node files and the docs show IT ----------------------------------------

OPTIONAL = "# Optional sections, shown with their defaults."
SETTING = re.compile(r"^# (\[([a-z_]+)\](?:\s+#.*)?|[a-z_]+ = .*)$")


def _optional_block(path: Path) -> tuple[dict[str, Any], dict[tuple[str, str], str]]:
    """A shipped node file's commented settings block, uncommented and parsed; and each
    (section, key)'s line, for its comment."""
    lines = path.read_text(encoding="utf-8").splitlines()
    start = lines.index(next(ln for ln in lines if ln.startswith(OPTIONAL)))
    body: list[str] = []
    where: dict[tuple[str, str], str] = {}
    section = ""
    for line in lines[start + 1 :]:
        if not line.startswith("#"):
            break  # the block ends at the first line that is not a comment
        m = SETTING.match(line)
        if m is None:
            continue  # prose
        body.append(m.group(1))
        if m.group(2):
            section = m.group(2)
        else:
            where[(section, m.group(1).split(" = ")[0])] = line
    return tomllib.loads("\n".join(body)), where


def _sections() -> dict[str, type[BaseModel]]:
    """The node file's optional sections and their models (``[keys]`` and ``[tokens]`` are
    required and written out in every file)."""
    out: dict[str, type[BaseModel]] = {}
    for name, f in NodeFile.model_fields.items():
        model = f.annotation
        if isinstance(model, type) and issubclass(model, BaseModel) and not f.is_required():
            out[name] = model
    return out


@pytest.mark.parametrize("node", sorted(p.stem for p in (SHIPPED / "nodes").glob("*.toml")))
def test_a_shipped_node_file_shows_every_optional_key_with_its_default(node: str) -> None:
    """IT reads the shipped node files as the reference of what can be set: every key of every
    optional section is shown, by its real name, with its real default; a key that is off (or
    derived) until set says ``unset:`` and shows a valid example. A key added to a model and
    not here, or renamed, or a default changed, fails this test."""
    table, where = _optional_block(SHIPPED / "nodes" / f"{node}.toml")
    sections = _sections()
    assert set(table) == set(sections)
    for name, model in sections.items():
        assert set(table[name]) == set(model.model_fields), name
        given = model.model_validate(table[name])  # every value shown is a valid one
        for key, f in model.model_fields.items():
            line = where[(name, key)]
            if f.default is None:
                assert "# unset:" in line, line
            else:
                assert getattr(given, key) == f.default, line
                assert "unset:" not in line, line


def _toml_blocks(page: Path) -> list[str]:
    return re.findall(r"```toml\n(.*?)```", page.read_text(encoding="utf-8"), re.S)


def test_the_docs_node_file_examples_are_valid_settings() -> None:
    """Every ```toml example of a node file in the docs and READMEs validates against the
    section it names (an ``[[adapters]]`` table: against its type's options model too)."""
    pages = [*sorted((REPO / "docs").rglob("*.md")), *sorted(REPO.glob("README*.md"))]
    sections = {name: f.annotation for name, f in NodeFile.model_fields.items()}
    seen = 0
    for page in pages:
        for text in _toml_blocks(page):
            doc = tomllib.loads(text)
            if "project" in doc:  # pyproject.toml, not a node file
                continue
            seen += 1
            assert set(doc) <= set(sections), (page.name, sorted(doc))
            for name, value in doc.items():
                if name == "adapters":
                    for entry in value:
                        a = AdapterConfig.model_validate(entry)
                        assert adapter_type(a.type).validate(a.options)[1] == [], page.name
                elif isinstance(value, dict):
                    sections[name].model_validate(value)
    assert seen >= 5  # accounts, adapters, operations (3)
