"""Shared tiny fixtures of the eval tests: the tiny SD pipeline + tiny CLIP, built once per
session (the helpers that use them are in ``eval_fixtures``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from addiffusion.diffusion.backbone import save_tiny_pipeline
from addiffusion.rewards.clip import save_tiny_clip


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("models")
    return save_tiny_pipeline(root / "tiny", seed=0), save_tiny_clip(root / "tiny-clip", seed=0)
