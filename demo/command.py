"""``hutong demo``: registered with the engine's CLI through the ``hutong.commands`` entry point
(pyproject.toml), so ``bridge`` never imports the demo; everything heavy is imported on use."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def demo(
    once: Annotated[bool, typer.Option(help="play, check, print a summary and exit")] = False,
    folder: Annotated[Path, typer.Option(help="demo data folder (wiped first)")] = Path(
        "demo-data/fuxing"
    ),
    port_base: Annotated[
        int,
        typer.Option(
            help="move every demo port: N+101..N+107 local, N+1101..N+1107 peer, N+200..N+299 "
            "vendor systems (default 8000: the shipped ports)",
            min=1024,
            max=64000,
        ),
    ] = 8000,
) -> None:
    """The Fuxing alliance on this machine: seven nodes, a referral scenario, self-checked."""
    from bridge.filemodes import private_umask
    from demo import run_demo

    private_umask()  # the demo's data, keys, logs and its nodes (children inherit it)
    raise typer.Exit(run_demo(folder, once, port_base))
