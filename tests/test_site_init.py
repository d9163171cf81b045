"""First steps: ``hutong site init`` for one site, the two-site script run as it is written in
docs/it/two-sites.sh (two folders, two processes, one packet each way), and every CLI command
given bad input answers with one line and a code, never a traceback.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from simulators.ports import free_port_block
from tests.harness import ROOT

SCRIPT = ROOT / "docs" / "it" / "two-sites.sh"
HUTONG = str(Path(sys.executable).parent / "hutong")
ALLIANCE = """[alliance]
id = "trio"
names = { zh = "试验医联体", en = "Trial alliance" }
patient_hash_key = "file:secrets/patient-hash.key"
national_id_system = "urn:oid:2.16.156.10011.1.3"

[[members]]
id = "hosp-a"
names = { zh = "复兴医院", en = "Fuxing Hospital" }
role = "core"
exchange_url = "http://127.0.0.1:19411"
signing_key = "keys/hosp-a.pub.json"
encryption_key = "keys/hosp-a.pub.json"

[[members]]
id = "chc-b"
names = { zh = "月坛社区卫生服务中心", en = "Yuetan CHC" }
role = "community"
exchange_url = "http://hutong.yuetan.example:9412"
signing_key = "keys/chc-b.pub.json"
encryption_key = "keys/chc-b.pub.json"
"""


def hutong(
    *args: str, cwd: Path = ROOT, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [HUTONG, *args],
        check=False,
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.slow  # runs the CLI as a process
def test_site_init_makes_one_sites_files_and_touches_no_other(tmp_path: Path) -> None:
    site = tmp_path / "site-b"
    site.mkdir()
    (site / "alliance.toml").write_text(ALLIANCE, encoding="utf-8")
    # the other member's public keys, already received: must stay as they are
    other = hutong("site", "init", "--alliance-dir", str(tmp_path / "a"), "--node", "hosp-a")
    assert other.returncode == 2 and other.stderr.startswith("error: HT-CONFIG: ")
    (site / "keys").mkdir(mode=0o700)
    (site / "keys" / "hosp-a.pub.json").write_text('{"node": "hosp-a"}\n')
    before = digest(site)

    r = hutong("site", "init", "--alliance-dir", str(site), "--node", "chc-b")
    assert r.returncode == 0, r.stderr
    after = digest(site)
    assert {k: v for k, v in after.items() if k in before} == before
    assert sorted(set(after) - set(before)) == [
        "keys/chc-b.enc.key",
        "keys/chc-b.pub.json",
        "keys/chc-b.sign.key",
        "nodes/chc-b.toml",
        "secrets/chc-b.auditor.token",
        "secrets/chc-b.clinician.token",
        "secrets/chc-b.it.token",
        "secrets/patient-hash.key",
    ]
    for secret in (
        "keys/chc-b.sign.key",
        "keys/chc-b.enc.key",
        "secrets/chc-b.it.token",
        "secrets/patient-hash.key",
    ):
        assert (site / secret).stat().st_mode & 0o077 == 0, secret
    node = (site / "nodes" / "chc-b.toml").read_text(encoding="utf-8")
    assert 'node_id = "chc-b"' in node
    assert 'peer_bind = "0.0.0.0:9412"' in node  # a host name: every interface
    assert 'local_bind = "127.0.0.1:8412"' in node
    pub = json.loads((site / "keys" / "chc-b.pub.json").read_text())
    assert pub["node"] == "chc-b" and pub["signing"].startswith("ed25519:")
    assert (site / "secrets" / "patient-hash.key").read_text().startswith("REPLACE-ME")
    assert "copy the alliance's patient-hash key over the placeholder" in r.stdout
    # keys show works before the alliance is complete; the public keys are the file's
    shown = hutong("keys", "show", "--config", str(site / "nodes" / "chc-b.toml"))
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["signing"] == pub["signing"]
    # the placeholder (and the missing peer keys) stop config check, in lines with a code
    check = hutong("config", "check", str(site))
    assert check.returncode != 0 and "Traceback" not in check.stderr + check.stdout
    # a second run keeps everything
    again = hutong("site", "init", "--alliance-dir", str(site), "--node", "chc-b")
    assert again.returncode == 0 and digest(site) == after
    assert "made" not in again.stdout
    wrong = hutong("site", "init", "--alliance-dir", str(site), "--node", "nobody")
    assert wrong.returncode == 2
    assert wrong.stderr.strip() == (
        f"error: HT-CONFIG: 'nobody' is not a member of "
        f"{site / 'alliance.toml'} (members: hosp-a, chc-b)"
    )


@pytest.mark.slow
def test_two_site_script_runs_as_written(tmp_path: Path) -> None:
    base = free_port_block(12) - 1  # the script uses PORT_BASE+1 .. PORT_BASE+12
    r = subprocess.run(
        ["sh", str(SCRIPT)],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=400,
        env={**os.environ, "HUTONG": HUTONG, "WORK": str(tmp_path), "PORT_BASE": str(base)},
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == (
        f"both packets acknowledged: hosp-a -> chc-b and chc-b -> hosp-a (folders in {tmp_path})"
    )
    # each site made only its own private files; the other's public key was copied in
    assert sorted(p.name for p in (tmp_path / "site-a" / "keys").iterdir()) == [
        "chc-b.pub.json",
        "hosp-a.enc.key",
        "hosp-a.pub.json",
        "hosp-a.sign.key",
    ]
    assert sorted(p.name for p in (tmp_path / "site-b" / "keys").iterdir()) == [
        "chc-b.enc.key",
        "chc-b.pub.json",
        "chc-b.sign.key",
        "hosp-a.pub.json",
    ]
    # the packet each site sent arrived at the other (the default spool handler's files)
    for site, node in (("site-a", "hosp-a"), ("site-b", "chc-b")):
        spooled = list((tmp_path / site / "data" / node / "spool").rglob("*.json"))
        assert len(spooled) == 1, (site, spooled)
        body = json.loads(spooled[0].read_text(encoding="utf-8"))
        assert json.dumps(body, ensure_ascii=False).count("SAMPLE-0001") >= 1


@pytest.mark.slow  # runs the CLI as a process
def test_every_command_with_bad_input_answers_one_line(tmp_path: Path) -> None:
    """Each subcommand given something it cannot use: exit != 0, no traceback, one error line
    that carries a code."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "alliance.toml").write_text(ALLIANCE, encoding="utf-8")
    assert (
        hutong(
            "site",
            "init",
            "--alliance-dir",
            str(site),
            "--node",
            "hosp-a",
            "--new-patient-hash-key",
        ).returncode
        == 0
    )
    from bridge.crypto.keys import generate_node_keys

    generate_node_keys(tmp_path / "other-site", "chc-b")  # the other member's public keys
    shutil.copy(tmp_path / "other-site" / "chc-b.pub.json", site / "keys" / "chc-b.pub.json")
    node = str(site / "nodes" / "hosp-a.toml")
    missing = str(tmp_path / "no-such.toml")
    taken = free_port_block(1)
    bad_inputs: list[tuple[list[str], dict[str, str]]] = [
        (["run", "--config", missing], {}),
        (["worker", "--config", missing], {}),
        (
            [
                "send",
                "--config",
                node,
                "--to",
                "chc-b",
                "--kind",
                "result.lab",
                str(tmp_path / "no-bundle.json"),
            ],
            {},
        ),
        (["outbox", "list", "--config", missing], {}),
        (["outbox", "retry", "--config", missing], {}),
        (["quarantine", "list", "--config", missing], {}),
        (["quarantine", "show", "--config", node, "99999"], {}),
        (["quarantine", "replay", "--config", missing, "1"], {}),
        (["audit", "verify", "--config", missing], {}),
        (["audit", "export", "--config", node, "--since", "next tuesday-ish"], {}),
        (["audit", "anchor-export", "--config", missing, "--peer", "chc-b"], {}),
        (["audit", "verify", "--config", node, "--anchor", str(tmp_path / "no-anchor")], {}),
        (
            [
                "keys",
                "init",
                "--node",
                "x",
                "--out",
                str(tmp_path / "k"),
                "--passphrase-env",
                "HUTONG_TEST_UNSET_PASSPHRASE",
            ],
            {},
        ),
        (["keys", "init"], {}),
        (["keys", "show", "--config", missing], {}),
        (["config", "check", str(tmp_path / "nowhere")], {}),
        (["site", "init", "--alliance-dir", str(tmp_path / "nowhere"), "--node", "x"], {}),
        (
            [
                "site",
                "init",
                "--alliance-dir",
                str(site),
                "--node",
                "chc-b",
                "--passphrase-env",
                "HUTONG_TEST_UNSET_PASSPHRASE",
            ],
            {},
        ),
        (
            ["demo", "--once", "--folder", str(tmp_path / "demo"), "--port-base", str(taken - 101)],
            {},
        ),
    ]
    import socket

    with socket.socket() as holder:  # the demo's first local port is taken
        holder.bind(("127.0.0.1", taken))
        holder.listen()
        for args, env in bad_inputs:
            r = hutong(*args, env=env)
            where = " ".join(args)
            assert r.returncode != 0, where
            assert "Traceback" not in r.stderr + r.stdout, (where, r.stderr[-1500:])
            if args[:2] == ["config", "check"]:  # every problem, one line each, then a count
                assert r.stderr.splitlines()[-1] == "1 problem(s)", (where, r.stderr)
                continue
            lines = [x for x in r.stderr.splitlines() if x.startswith("error: ")]
            assert len(lines) == 1, (where, r.stderr, r.stdout)
            assert lines[0].split(": ")[1].startswith("HT-"), (where, lines)
    # a node whose port is taken: one line naming the port, nothing started
    plan_port = int(
        next(line for line in Path(node).read_text().splitlines() if line.startswith("local_bind"))
        .split(":")[-1]
        .strip('"')
    )
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", plan_port))
        holder.listen()
        r = hutong("run", "--config", node)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert (
        f"error: HT-PORT-IN-USE: port {plan_port} on 127.0.0.1 is already in use by pid "
        f"{os.getpid()}" in r.stderr
    )
