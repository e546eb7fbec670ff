"""Shared tiny fixtures: the tiny SD pipeline + tiny CLIP (built once per session), a sampler over
them (DDIM, strides 1/2/4, so its action table has jumps of several strides), a minimal
built-dataset folder (meta/info.json with that action table + episodes table) pointing at them
(``tiny_dataset``; ``verified_dataset`` adds the shapes verifier component)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import polars as pl
import pytest
import torch
from online_finetune_consts import N_MAX, PROMPTS, STATS, STRIDES, WARMUP

from addiffusion.diffusion.actions import ActionTable
from addiffusion.diffusion.backbone import load_pipeline, save_tiny_pipeline
from addiffusion.diffusion.sampler import SamplerSettings, StepwiseSampler
from addiffusion.rewards.clip import ClipScorer, save_tiny_clip

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("models")
    return save_tiny_pipeline(root / "tiny", seed=0), save_tiny_clip(root / "clip", seed=0)


@pytest.fixture(scope="session")
def sampler(tiny_models: tuple[Path, Path]) -> StepwiseSampler:
    pipe_dir, clip_dir = tiny_models
    pipe = load_pipeline(str(pipe_dir), "ddim", "cpu")
    return StepwiseSampler(
        pipe,
        ClipScorer(str(clip_dir)),
        SamplerSettings(n_max=N_MAX, warmup=WARMUP, strides=STRIDES),
    )


def _write_dataset(root: Path, tiny_models: tuple[Path, Path], components: Sequence[str]) -> Path:
    pipe_dir, clip_dir = tiny_models
    (root / "meta").mkdir()
    settings = SamplerSettings(n_max=N_MAX, warmup=WARMUP, strides=STRIDES, height=32)
    table = ActionTable.build(
        settings.strides, N_MAX, WARMUP, settings.refine_budget, settings.refine_k
    )
    info = {
        "backbone": str(pipe_dir),
        "scheduler": "ddim",
        "scorer": str(clip_dir),
        "components": list(components),
        "sampler": {
            "n_max": N_MAX,
            "warmup": WARMUP,
            "strides": list(STRIDES),
            "refine_budget": 0,
            "height": 32,
        },
        "actions": table.to_dict(),
        "component_stats": STATS,
        "observation": {
            "image_dim": 32,
            "text_dim": 32,
            "time_dim": 16,
            "quality_dim": 5,
            "dim": 85,
        },
    }
    (root / "meta" / "info.json").write_text(json.dumps(info))
    (root / "data" / "episodes").mkdir(parents=True)
    pl.DataFrame(
        {
            "episode_id": [f"{i:06d}-0" for i in range(5)],
            "prompt_id": [3, 0, 1, 2, 4],
            "prompt": [PROMPTS[2], PROMPTS[0], PROMPTS[1], PROMPTS[0], "held out prompt"],
            "category": ["simple"] * 5,
            "split": ["train", "train", "train", "train", "heldout"],
            "seed": [0] * 5,
            "parent_episode_id": [None] * 5,
        }
    ).write_parquet(root / "data" / "episodes" / "train-00000.parquet")
    return root


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory, tiny_models: tuple[Path, Path]) -> Path:
    """The parts of a built dataset that online fine-tuning reads."""
    root = tmp_path_factory.mktemp("dataset")
    return _write_dataset(root, tiny_models, ["clip_score", "stability"])


@pytest.fixture(scope="session")
def verified_dataset(
    tmp_path_factory: pytest.TempPathFactory, tiny_models: tuple[Path, Path]
) -> Path:
    """``tiny_dataset`` whose components include the shapes world's exact ``verifier``."""
    root = tmp_path_factory.mktemp("verified_dataset")
    return _write_dataset(root, tiny_models, ["clip_score", "stability", "verifier"])
