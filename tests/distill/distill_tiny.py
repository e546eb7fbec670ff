"""Tiny distillation settings on the shipped shapes world (8x8 latents: fast on a CPU); shared by
the distill tests."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from addiffusion.distill.config import DistillConfig

REPO = Path(__file__).resolve().parents[2]
SHAPES = REPO / "assets" / "shapes"


def tiny_config(**overrides: object) -> DistillConfig:
    base = DistillConfig(
        teacher=str(SHAPES / "pipeline"),
        scorer=str(SHAPES / "clip"),
        n_prompts=40,
        train_steps=4,
        batch_size=2,
        grad_accum_steps=2,
        lr_warmup_steps=1,
        kl_start=1,
        kl_ramp=2,
        monitor_every=2,
        checkpoint_every=2,
        eval_prompts=2,
        eval_seeds=2,
        eval_batch_size=8,
        bootstrap_samples=200,
        survey_pairs=3,
        survey_image_size=16,
        device="cpu",
    )
    return dataclasses.replace(base, **overrides)
