from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from addiffusion.collect.config import CollectConfig
from addiffusion.diffusion.backbone import save_tiny_pipeline
from addiffusion.rewards.clip import save_tiny_clip

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(pipeline folder, open_clip folder) of the built-in random tiny models."""
    root = tmp_path_factory.mktemp("models")
    return save_tiny_pipeline(root / "tiny", 0), save_tiny_clip(root / "tiny-clip", 0)


@pytest.fixture
def small_collect(tiny_models: tuple[Path, Path]) -> Callable[..., CollectConfig]:
    """``small_collect(**keys)``: a collect config on the tiny models, 4-point grid with strides
    {1, 2}, one seed per prompt, on the CPU; ``keys`` override or add settings."""

    def make(**kw: object) -> CollectConfig:
        base = dict(
            model=str(tiny_models[0]),
            scorer=str(tiny_models[1]),
            n_max=4,
            strides=[1, 2],
            seeds_per_prompt=1,
            device="cpu",
        )
        return CollectConfig.from_dict({**base, **kw})

    return make
