"""``hutong site init``: set up one site of an alliance (bridge/config/site.py)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

site_app = typer.Typer(no_args_is_help=True, help="Set up one site of an alliance")
out = Console(soft_wrap=True, highlight=False)


@site_app.command("init")
def site_init(
    alliance_dir: Annotated[
        Path,
        typer.Option(
            "--alliance-dir", help="this site's copy of the alliance folder (with alliance.toml)"
        ),
    ],
    node: Annotated[str, typer.Option("--node", help="this site's member id")],
    local_bind: Annotated[
        str | None,
        typer.Option(
            help="host:port for the hospital-facing local API (default 127.0.0.1 and the peer "
            "port - 1000)"
        ),
    ] = None,
    peer_bind: Annotated[
        str | None,
        typer.Option(help="host:port for the gateway (default: from the member's exchange_url)"),
    ] = None,
    new_patient_hash_key: Annotated[
        bool,
        typer.Option(
            "--new-patient-hash-key",
            help="make the alliance's patient-hash key (the coordinator "
            "does this once; every other site copies that file)",
        ),
    ] = False,
    passphrase_env: Annotated[
        str | None, typer.Option(help="env var holding a passphrase to encrypt the private keys")
    ] = None,
) -> None:
    """Keys, tokens, patient-hash key (or its placeholder) and node file of ONE site; files of
    other members are not touched, files already present are kept."""
    from bridge.cli import _env_passphrase
    from bridge.config.site import init_site

    passphrase = _env_passphrase(passphrase_env)
    report = init_site(
        alliance_dir,
        node,
        local_bind=local_bind,
        peer_bind=peer_bind,
        new_hash_key=new_patient_hash_key,
        passphrase=passphrase,
    )
    if passphrase_env and report.node_file in report.made:
        text = report.node_file.read_text(encoding="utf-8")
        report.node_file.write_text(
            text.replace(
                f'encryption = "../keys/{node}.enc.key"\n',
                f'encryption = "../keys/{node}.enc.key"\npassphrase = "env:{passphrase_env}"\n',
            ),
            encoding="utf-8",
        )
    here = Path.cwd()

    def show(p: Path) -> str:
        rel = os.path.relpath(p, here)
        return rel if not rel.startswith("..") else str(p)

    for p in report.made:
        out.print(f"made  {show(p)}")
    for p in report.kept:
        out.print(f"kept  {show(p)}")

    cmd = hutong_command()
    public = show(report.public_keys)  # type: ignore[arg-type]
    steps = [
        (
            f"send {public} to every other member (they put it in their keys/ folder); "
            f"put theirs in {show(alliance_dir / 'keys')}"
        )
    ]
    if report.hash_key_placeholder:
        steps.append(
            f"copy the alliance's patient-hash key over the placeholder in "
            f"{show(alliance_dir / 'secrets')} (the node refuses to start until then)"
        )
    steps.append(
        f"{cmd} config check {show(alliance_dir)}, then {cmd} run --config {show(report.node_file)}"  # type: ignore[arg-type]
    )
    out.print("next:")
    for i, step in enumerate(steps, start=1):
        out.print(f"  {i}. {step}")


def hutong_command() -> str:
    """The ``hutong`` command as this shell can run it: the bare name when PATH finds this
    very installation, else the venv's script by a path relative to here (``.venv/bin/hutong``
    after ``make demo``), else absolute."""
    import os
    import shutil
    import sys

    script = Path(sys.executable).parent / "hutong"
    found = shutil.which("hutong")
    if found and Path(found).resolve() == script.resolve():
        return "hutong"
    try:
        rel = os.path.relpath(script, Path.cwd())
    except ValueError:
        return str(script)
    return rel if not rel.startswith("..") else str(script)
