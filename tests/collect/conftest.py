from __future__ import annotations

from pathlib import Path

import pytest
import torch

from addiffusion.diffusion.backbone import save_tiny_pipeline
from addiffusion.rewards.clip import save_tiny_clip

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(pipeline folder, open_clip folder) of the built-in random tiny models."""
    root = tmp_path_factory.mktemp("models")
    return save_tiny_pipeline(root / "tiny", 0), save_tiny_clip(root / "tiny-clip", 0)
