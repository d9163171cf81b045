"""The engine owns the adapter contract: nothing under ``bridge/`` imports an adapter, a
simulator or the demo, not even for typing (adapters are found by entry point)."""

from __future__ import annotations

import ast
from pathlib import Path

ENGINE = Path(__file__).resolve().parent.parent / "bridge"
FORBIDDEN = ("adapters", "simulators", "demo", "bridge.demo")
#: TEMPORARY: bridge/demo/ moves to a top-level demo/ beside simulators/ (issue 18); until
#: then it is the one part of bridge/ allowed to import adapters and simulators
EXCEPTIONS = (ENGINE / "demo",)
#: TEMPORARY, the same move: the ``hutong demo`` command's import of bridge.demo in bridge/cli.py
#: (the command goes with the demo, e.g. to its own entry point)
DEMO_COMMAND = (ENGINE / "cli.py", "bridge.demo")


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
    modules = [p for p in ENGINE.rglob("*.py")
               if not any(p.is_relative_to(e) for e in EXCEPTIONS)]
    assert len(modules) > 100  # the walk really saw the engine
    bad = [f"{p.relative_to(ENGINE.parent)}:{line}: {m}" for p in modules
           for line, m in _imports(p) if _forbidden(m)
           and not (p == DEMO_COMMAND[0] and m.startswith(DEMO_COMMAND[1]))]
    assert bad == []


def test_the_rule_sees_an_import_in_a_typing_block(tmp_path: Path) -> None:
    """The walk reads every import, also under ``if TYPE_CHECKING`` and inside functions."""
    f = tmp_path / "m.py"
    f.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                 "    from adapters.base import BaseAdapter\n"
                 "def g():\n    import simulators.ports\n    from bridge import demo\n")
    assert [m for _, m in _imports(f) if _forbidden(m)] == [
        "adapters.base", "adapters.base.BaseAdapter", "simulators.ports", "bridge.demo"]
