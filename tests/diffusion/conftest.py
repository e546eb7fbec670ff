from __future__ import annotations

from pathlib import Path

import pytest
import torch

from addiffusion.diffusion.backbone import build_tiny_pipeline
from addiffusion.rewards.clip import ClipScorer, save_tiny_clip

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> ClipScorer:
    return ClipScorer(str(save_tiny_clip(tmp_path_factory.mktemp("clip"), seed=0)))


@pytest.fixture(scope="session")
def tiny_pipe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    build_tiny_pipeline(0, out / "src").save_pretrained(out / "pipe")
    return out / "pipe"
