"""A tiny training run writes loadable models and resumes from its checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from shapes_tiny_sizes import TINY

from addiffusion.config import ConfigError
from addiffusion.worlds.shapes.config import ShapesConfig
from addiffusion.worlds.shapes.models import load_clip
from addiffusion.worlds.shapes.train import scene_batch, train, unet_lr_at


def _cfg(**kw) -> ShapesConfig:
    base = dict(
        n_train_scenes=40,
        vae_steps=2,
        decoder_steps=2,
        vae_batch=4,
        clip_steps=2,
        clip_batch=4,
        unet_steps=2,
        unet_decay_steps=1,
        unet_batch=4,
        preview_steps=2,
        preview_batch=4,
        device="cpu",
    )
    return ShapesConfig.from_dict({**base, **kw})


def test_tiny_run_exports_and_resumes(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    train(_cfg(), tmp_path, sizes=TINY)
    assert (tmp_path / "pipeline" / "model_index.json").exists()
    assert (tmp_path / "preview" / "config.json").exists()
    load_clip(tmp_path / "clip")
    ck = tmp_path / "checkpoints"
    assert torch.load(ck / "unet.pt", weights_only=True)["step"] == 2
    # More steps: the VAE/CLIP phases are done and skipped, the UNet resumes at step 2.
    train(_cfg(unet_steps=3), tmp_path, sizes=TINY)
    assert torch.load(ck / "unet.pt", weights_only=True)["step"] == 3
    assert torch.load(ck / "vae.pt", weights_only=True)["step"] == 2


def test_batches_are_a_function_of_seed_and_step() -> None:
    a, ca = scene_batch(0, "vae", 5, 3)
    b, cb = scene_batch(0, "vae", 5, 3)
    assert (a == b).all() and ca == cb
    assert scene_batch(0, "vae", 6, 3)[1] != ca


def test_unet_learning_rate_is_constant_then_decays_linearly() -> None:
    cfg = ShapesConfig.from_dict({"unet_steps": 100, "unet_decay_steps": 40, "unet_lr": 1e-3})
    assert unet_lr_at(cfg, 0) == unet_lr_at(cfg, 60) == 1e-3
    assert unet_lr_at(cfg, 80) == pytest.approx(5e-4)
    assert 0 < unet_lr_at(cfg, 99) < unet_lr_at(cfg, 98)
    # Lengthening unet_steps (a resumed run) leaves the learning rate of past steps unchanged.
    longer = ShapesConfig.from_dict({"unet_steps": 200, "unet_decay_steps": 40, "unet_lr": 1e-3})
    assert all(unet_lr_at(longer, s) == 1e-3 for s in range(60))
    constant = ShapesConfig.from_dict({"unet_steps": 10, "unet_decay_steps": 0})
    assert unet_lr_at(constant, 9) == constant.unet_lr


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match="shapes.unet_batch must be >= 1, got 0"):
        ShapesConfig.from_dict({"unet_batch": 0})
    with pytest.raises(ConfigError, match="unknown key shapes.steps"):
        ShapesConfig.from_dict({"steps": 3})
    with pytest.raises(ConfigError, match=r"shapes.unet_decay_steps must be <= shapes.unet_steps"):
        ShapesConfig.from_dict({"unet_steps": 10, "unet_decay_steps": 11})
