"""``import addiffusion`` keeps d3rlpy's ``import gym`` quiet, and only that."""

from __future__ import annotations

import subprocess
import sys


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )


def test_importing_d3rlpy_prints_nothing() -> None:
    # The old gym package (imported by d3rlpy) prints a "Gym has been unmaintained" banner.
    run = _run("import addiffusion, d3rlpy")
    assert run.stderr == ""
    assert run.stdout == ""


def test_other_warnings_still_get_through() -> None:
    run = _run("import warnings, addiffusion, d3rlpy; warnings.warn('still here')")
    assert "UserWarning: still here" in run.stderr
    assert "Gym" not in run.stderr
