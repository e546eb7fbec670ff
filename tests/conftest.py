"""Test-wide settings. The tests use tiny models, which run fastest on one thread; more threads
only contend with each other (and with anything else) on a small shared CI machine. The policy
trust store (addiffusion/offline_rl/trust.py) lives in a session folder, never the user's own."""

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def trust_store() -> Iterator[Path]:
    """Policies the tests train are recorded here (subprocesses inherit the variable)."""
    with tempfile.TemporaryDirectory(prefix="addiffusion-trust-") as tmp:
        old = os.environ.get("ADDIFFUSION_TRUST_STORE")
        os.environ["ADDIFFUSION_TRUST_STORE"] = str(Path(tmp) / "trusted.json")
        yield Path(tmp) / "trusted.json"
        if old is None:
            os.environ.pop("ADDIFFUSION_TRUST_STORE", None)
        else:
            os.environ["ADDIFFUSION_TRUST_STORE"] = old
