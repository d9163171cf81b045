"""The engine owns the adapter contract: nothing under ``bridge/`` imports an adapter, a
simulator or the demo, not even for typing (adapters are found by entry point); and no adapter
reads a delivered packet's body (the dispatcher hands sinks the decoded event,
``bridge/local/contract.py``)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ENGINE = Path(__file__).resolve().parent.parent / "bridge"
ADAPTERS = ENGINE.parent / "adapters"
#: the demo is the top-level package ``demo`` (its ``hutong demo`` command comes in through the
#: ``hutong.commands`` entry point); ``bridge.demo`` is named so that it can never come back
FORBIDDEN = ("adapters", "simulators", "demo", "bridge.demo")


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            found.extend((node.lineno, f"{node.module}.{a.name}") for a in node.names)
    return found


def _forbidden(module: str) -> bool:
    return any(module == f or module.startswith(f + ".") for f in FORBIDDEN)


def test_the_engine_imports_no_adapter_simulator_or_demo() -> None:
    modules = list(ENGINE.rglob("*.py"))
    assert len(modules) > 100  # the walk really saw the engine
    assert not (ENGINE / "demo").exists()
    bad = [
        f"{p.relative_to(ENGINE.parent)}:{line}: {m}"
        for p in modules
        for line, m in _imports(p)
        if _forbidden(m)
    ]
    assert bad == []


def test_hutong_demo_comes_from_the_demo_package_by_entry_point() -> None:
    """``hutong demo`` is still there for IT, found through the entry point, not an import."""
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="hutong.commands") if e.name == "demo"]
    assert ep.value == "demo.command:demo"
    listed = subprocess.run(
        [sys.executable, "-m", "bridge.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert re.search(r"^│ demo\b", listed, re.M), listed


def test_a_node_process_does_not_load_the_demo() -> None:
    """``hutong run`` (and every engine command) registers plugin commands only when the
    command line names one: a node does not import the demo and its simulators (~20 MiB)."""
    probe = (
        "import sys; sys.argv = ['hutong', {argv}]; import bridge.cli; "
        "print(sorted({{m.split('.')[0] for m in sys.modules}} & {{'demo', 'simulators'}}))"
    )
    for argv, loaded in (("'run'", "[]"), ("'demo'", "['demo', 'simulators']")):
        out = subprocess.run(
            [sys.executable, "-c", probe.format(argv=argv)],
            capture_output=True,
            text=True,
            check=True,
            cwd=ENGINE.parent,
        ).stdout.strip()
        assert out == loaded, (argv, out)


def test_the_rule_sees_an_import_in_a_typing_block(tmp_path: Path) -> None:
    """The walk reads every import, also under ``if TYPE_CHECKING`` and inside functions."""
    f = tmp_path / "m.py"
    f.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
        "    from adapters.base import BaseAdapter\n"
        "def g():\n    import simulators.ports\n    from bridge import demo\n"
    )
    assert [m for _, m in _imports(f) if _forbidden(m)] == [
        "adapters.base",
        "adapters.base.BaseAdapter",
        "simulators.ports",
        "bridge.demo",
    ]


def _body_reads(path: Path) -> list[int]:
    """Lines that read an attribute ``body`` (``item.body``, ``ev.packet.body``,
    ``getattr(x, "body")``). Calling a method of that name is another thing: a web request's
    ``await request.body()`` in an adapter's own routes."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    called = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    found: list[int] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "body" and id(node) not in called:
            found.append(node.lineno)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "hasattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and node.args[1].value == "body"
        ):
            found.append(node.lineno)
    return sorted(found)


def test_no_adapter_reads_a_delivered_packets_body() -> None:
    """Referral, result and an adapter's own kinds reach it decoded (``on_referral``,
    ``on_result``, ``on_packet``): an adapter that parses ``item.body`` again is refused."""
    modules = list(ADAPTERS.rglob("*.py"))
    assert len(modules) > 30  # the walk really saw the adapters
    bad = [f"{p.relative_to(ENGINE.parent)}:{line}" for p in modules for line in _body_reads(p)]
    assert bad == []


def test_the_body_rule_sees_every_way_of_reading_it(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text(
        "import orjson\n"
        "def deliver(self, item):\n    return orjson.loads(item.body)\n"
        "def on_packet(self, ev):\n    raw = ev.packet.body\n"
        "    b = getattr(ev.packet, 'body')\n"
        "async def route(request):\n    return await request.body()\n"
    )
    assert _body_reads(f) == [3, 5, 6]
