"""The page labels: every key is defined once.

``bridge/web/i18n.py`` holds ``LABELS`` as one dict literal and several ``LABELS.update({...})``
blocks, and two modules (``words.py``, ``console_labels.py``) merge theirs in at import. A key
written twice is not an error in Python: the later definition silently wins, and a page loses its
wording (the auditor's "at most 500; export has all" hint was lost that way to the IT page's
"shown here"). The modules' source is parsed with ``ast``, so a duplicate is caught before any
import has merged it away.
"""

from __future__ import annotations

import ast
import importlib
from collections import defaultdict
from pathlib import Path

import pytest

from bridge.web import i18n

ROOT = Path(__file__).resolve().parent.parent
WEB = ROOT / "bridge" / "web"


def label_keys(source: str, filename: str) -> list[tuple[str, int]]:
    """(key, line) of every label a module defines: ``LABELS = {...}`` (annotated or not),
    ``LABELS.update({...})`` and ``LABELS[key] = ...``. A definition this cannot read (a
    computed key, an update from a variable) fails the test rather than escape it."""
    out: list[tuple[str, int]] = []

    def literal(d: ast.expr, where: int) -> None:
        if not isinstance(d, ast.Dict):
            raise AssertionError(f"{filename}:{where}: LABELS set from a non-literal")
        for k in d.keys:
            if not (isinstance(k, ast.Constant) and isinstance(k.value, str)):
                raise AssertionError(f"{filename}:{where}: a label key that is not a string")
            out.append((k.value, k.lineno))

    def is_labels(node: ast.expr) -> bool:
        return isinstance(node, ast.Name) and node.id == "LABELS"

    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.AnnAssign) and is_labels(node.target) and node.value:
            literal(node.value, node.lineno)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if is_labels(target):
                    literal(node.value, node.lineno)
                elif isinstance(target, ast.Subscript) and is_labels(target.value):
                    key = target.slice
                    if not (isinstance(key, ast.Constant) and isinstance(key.value, str)):
                        raise AssertionError(f"{filename}:{node.lineno}: a computed label key")
                    out.append((key.value, node.lineno))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "update"
            and is_labels(node.func.value)
        ):
            if len(node.args) != 1 or node.keywords:
                raise AssertionError(f"{filename}:{node.lineno}: LABELS.update of a non-literal")
            literal(node.args[0], node.lineno)
    return out


def label_modules() -> list[Path]:
    """i18n.py and every module of the web package that writes into its LABELS."""
    return sorted(
        p
        for p in WEB.glob("*.py")
        if p.name == "i18n.py"
        or "LABELS.update(" in p.read_text(encoding="utf-8")
        or "LABELS[" in p.read_text(encoding="utf-8")
    )


def duplicates(modules: list[Path]) -> dict[str, list[str]]:
    where: defaultdict[str, list[str]] = defaultdict(list)
    for path in modules:
        for key, line in label_keys(path.read_text(encoding="utf-8"), path.name):
            where[key].append(f"{path.name}:{line}")
    return {k: v for k, v in where.items() if len(v) > 1}


def test_every_label_key_is_defined_once() -> None:
    modules = label_modules()
    assert {p.name for p in modules} >= {"i18n.py", "words.py", "console_labels.py"}
    assert duplicates(modules) == {}
    # what was parsed is what the pages use: each key found is in LABELS, with both languages
    keys = {k for p in modules for k, _ in label_keys(p.read_text(encoding="utf-8"), p.name)}
    for p in modules:  # merge the modules' labels as the app does
        importlib.import_module(f"bridge.web.{p.stem}")
    assert keys == set(i18n.LABELS)
    assert all(zh and en for zh, en in i18n.LABELS.values())


def test_the_auditor_and_the_it_page_keep_their_own_wording() -> None:
    """The two "shown" labels that clashed, each under its own key now."""
    assert i18n.t("en", "audit_shown") == "rows shown (at most 500; export has all)"
    assert i18n.t("zh", "audit_shown") == "条（最多显示 500 条，导出不受限）"
    assert i18n.t("en", "shown") == "shown here" and i18n.t("zh", "shown") == "条显示于此"


def test_a_key_written_twice_is_found(tmp_path: Path) -> None:
    """The check itself: a duplicate within one dict, across an update and across modules."""
    a = tmp_path / "a.py"
    a.write_text(
        'LABELS: dict[str, tuple[str, str]] = {"x": ("甲", "a"), "y": ("乙", "b"),\n'
        '    "x": ("丙", "c")}\nLABELS.update({"z": ("丁", "d")})\n',
        encoding="utf-8",
    )
    b = tmp_path / "b.py"
    b.write_text(
        'LABELS.update({\n    "z": ("戊", "e"),\n})\nLABELS["y"] = ("己", "f")\n', encoding="utf-8"
    )
    assert duplicates([a, b]) == {
        "x": ["a.py:1", "a.py:2"],
        "z": ["a.py:3", "b.py:2"],
        "y": ["a.py:1", "b.py:4"],
    }
    with pytest.raises(AssertionError, match="non-literal"):
        label_keys("LABELS.update(MORE)\n", "c.py")
