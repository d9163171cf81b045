"""`hutong demo [--once]`: start everything, play the scenario, print the summary and where to look,
then (without --once) keep running until Ctrl-C. Every process started is stopped on the way out,
whatever happened."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from bridge.cli_site import hutong_command
from bridge.errors import HutongError
from demo.guard import SHIPPED_BASE, check_free, lock_folder, release
from demo.scenario import Scenario
from demo.vendors import Vendors
from demo.world import PROGRESS, Member, World

#: pages under /ui by role (bridge/web); the statistics page is the clinicians'
PAGES = {
    "clinician": ("/ui/referrals", "转诊 referrals"),
    "it": ("/ui/it", "运维 IT"),
    "auditor": ("/ui/audit", "审计 audit"),
}
EXTRA_PAGES = {
    "clinician": [("/ui/consultations", "远程会诊 consultations"), ("/ui/stats", "统计 statistics")]
}


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run_demo(folder: Path, once: bool, port_base: int = SHIPPED_BASE) -> int:
    console = Console(soft_wrap=True)
    world = World(folder.resolve())
    # before anything is touched: one demo per folder, every port free (HutongError: one line)
    lock = lock_folder(world.folder)
    try:
        check_free(world.ports(port_base))
    except HutongError:
        release(lock)
        raise
    vendors = Vendors(world)
    PROGRESS.append(lambda line: console.print(line, style="dim"))
    # Ctrl-C and SIGTERM both end the demo through the finally below (even when the shell
    # started it with SIGINT ignored, as background jobs are)
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    console.print("[bold]Hutong demo: the Fuxing medical alliance (复兴医院医联体)[/]")
    started = time.monotonic()
    try:
        world.prepare(port_base)
        console.print(f"  demo folder {world.folder} (keys and secrets generated)")
        vendors.start()
        world.start_nodes()
        vendors.wait()
        world.wait_nodes(
            lambda m: console.print(
                f"  [green]started[/] {m.zh} ({m.node_id}) {m.url}"
                + (f"  HIS: {vendors.style[m.node_id]}" if m.node_id in vendors.style else "")
            )
        )
        scenario = Scenario(world, vendors, console)
        scenario.play()
        ok = summary(scenario, console, time.monotonic() - started)
        where_to_look(world, console)
        if once:
            return 0 if ok else 1
        console.print("\nRunning until Ctrl-C.")
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        console.print("\nstopping")
        return 0 if not once else 130
    except HutongError as exc:
        console.print(f"[red]demo failed:[/] {exc}")
        return 1
    finally:
        world.stop_nodes()
        vendors.stop()
        PROGRESS.clear()
        release(lock)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def summary(scenario: Scenario, console: Console, seconds: float) -> bool:
    console.print("\n[bold]Summary[/]")
    for s in scenario.steps:
        mark = "[green]OK    [/]" if s.ok else "[red]FAILED[/]"
        console.print(f"  {mark} {s.name}" + (f"  ({s.detail})" if s.detail else ""))
    good = sum(s.ok for s in scenario.steps)
    console.print(
        f"[bold]{good}/{len(scenario.steps)} steps landed where they should[/] ({seconds:.0f} s)"
    )
    return bool(scenario.steps) and good == len(scenario.steps)


def where_to_look(world: World, console: Console) -> None:
    secrets = world.folder / "secrets"
    console.print(
        f"\n[bold]Where to look[/] (log in at <url>/ui/login with the role's token: "
        f"cat {secrets}/<member>.<role>.token)"
    )
    for m in world.members.values():
        console.print(f"  {m.zh} ({m.node_id})  {m.url}/ui")
        for role, (path, label) in PAGES.items():
            if role == "clinician" and m.plan.role == "platform":
                continue  # the platform relays; it has no clinicians and no referrals
            console.print(
                f"      {role:<9} {m.url}{path}  {label}   token: {_token_file(m, role, secrets)}"
            )
            for extra, extra_label in EXTRA_PAGES.get(role, []):
                console.print(f"      {'':<9} {m.url}{extra}  {extra_label}")
    console.print(
        f"  quarantine at the command line: {hutong_command()} quarantine list "
        f"--config {world.members['fuxing'].config}"
    )
    console.print(
        f'  metrics for Prometheus: curl -H "Authorization: Bearer $(cat '
        f'{_token_file(world.members["fuxing"], "it", secrets)})" '
        f"{world.members['fuxing'].url}/metrics"
    )


def _token_file(m: Member, role: str, secrets: Path) -> str:
    return str(secrets / f"{m.node_id}.{role}.token")
