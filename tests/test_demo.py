"""`hutong demo --once`: the seven Fuxing nodes as processes, the scenario self-checked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import ROOT

pytestmark = pytest.mark.slow


def test_demo_once_plays_the_scenario_and_exits_zero(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "bridge.cli", "demo", "--once", "--folder",
                        str(tmp_path / "fuxing")], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    out = " ".join(r.stdout.split())
    assert "13/13 steps landed where they should" in out
    for step in ("acceptance slip (接诊单) with bed back at Yuetan",
                 "return slip (转回单) with discharge summary and prescriptions received",
                 "rejection with reason seen by Guangwai Hospital",
                 "cancellation confirmed by Fuxing (both sides: cancelled)",
                 "audit chain of platform verifies"):
        assert f"✓ {step}" in out
    assert "✗" not in out
