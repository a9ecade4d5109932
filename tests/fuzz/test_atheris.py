"""The optional atheris harness runs (a hundred inputs a target); skipped, saying
so, where atheris is not installed (it is not a test dependency: `pip install atheris`)."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("atheris", reason="atheris is not installed (pip install atheris)")


@pytest.mark.parametrize("target", ["nbd", "codec"])
def test_atheris_harness_runs_clean(target):
    p = subprocess.run([sys.executable, "-m", "tests.fuzz.atheris_harness", target,
                        "-atheris_runs=100"], capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Done 100" in p.stderr
