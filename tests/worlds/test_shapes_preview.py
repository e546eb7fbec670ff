"""The preview decoder phase: seeded, resumable, and the shipped decoder tracks the VAE."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderTiny, StableDiffusionPipeline

from addiffusion.diffusion.backbone import decode_latents
from addiffusion.worlds.shapes import preview as preview_mod
from addiffusion.worlds.shapes import train as train_mod
from addiffusion.worlds.shapes.config import ShapesConfig
from addiffusion.worlds.shapes.preview import build_preview, train_preview
from addiffusion.worlds.shapes.train import scene_batch, to_pixels

SHIPPED = Path(__file__).resolve().parents[2] / "assets" / "shapes"


@pytest.fixture(scope="module")
def pipe() -> StableDiffusionPipeline:
    torch.set_num_threads(1)
    return StableDiffusionPipeline.from_pretrained(SHIPPED / "pipeline")


def _cfg(**kw: object) -> ShapesConfig:
    return ShapesConfig.from_dict(
        {"preview_steps": 3, "preview_batch": 4, "device": "cpu", "seed": 3, **kw}
    )


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_same_seed_same_weights_other_seed_other_weights(
    pipe: StableDiffusionPipeline, tmp_path: Path
) -> None:
    dev = torch.device("cpu")
    a = _weights(train_preview(pipe, _cfg(), tmp_path / "a", dev, progress=False))
    b = _weights(train_preview(pipe, _cfg(), tmp_path / "b", dev, progress=False))
    c = _weights(train_preview(pipe, _cfg(seed=4), tmp_path / "c", dev, progress=False))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    # It learned something: three steps move the decoder away from its seeded init.
    init = _weights(build_preview(3))
    assert any(not torch.equal(a[k], init[k]) for k in a if k.startswith("decoder"))


def test_a_killed_run_resumes_to_the_uninterrupted_weights(
    pipe: StableDiffusionPipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dev = torch.device("cpu")
    whole = _weights(train_preview(pipe, _cfg(), tmp_path / "whole", dev, progress=False))
    # Checkpoint after every step, and die while drawing the batch of step 2.
    monkeypatch.setattr(train_mod._Checkpoint, "due", lambda self: True)
    real = preview_mod._x0_batch

    def dying(p: object, cfg: ShapesConfig, step: int, device: torch.device) -> object:
        if step == 2:
            raise KeyboardInterrupt
        return real(p, cfg, step, device)

    monkeypatch.setattr(preview_mod, "_x0_batch", dying)
    with pytest.raises(KeyboardInterrupt):
        train_preview(pipe, _cfg(), tmp_path / "cut", dev, progress=False)
    assert torch.load(tmp_path / "cut" / "preview.pt", weights_only=True)["step"] == 2
    monkeypatch.setattr(preview_mod, "_x0_batch", real)
    resumed = _weights(train_preview(pipe, _cfg(), tmp_path / "cut", dev, progress=False))
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_shipped_preview_shows_what_the_vae_shows(pipe: StableDiffusionPipeline) -> None:
    """On scene latents, the shipped preview's images are far closer to the VAE's than an
    untrained decoder's are, and it takes the sampler's (scaled) latents as they are."""
    shipped = AutoencoderTiny.from_pretrained(SHIPPED / "preview")
    assert shipped.config.scaling_factor == 1.0
    images, _ = scene_batch(0, "data", 123, 16)
    with torch.no_grad():
        z = pipe.vae.encode(to_pixels(images, torch.device("cpu"))).latent_dist.mean
        z = z * pipe.vae.config.scaling_factor
        ref = decode_latents(pipe, z)
        err = (decode_latents(pipe, z, shipped) - ref).abs().mean().item()
        untrained = (decode_latents(pipe, z, build_preview(0)) - ref).abs().mean().item()
    assert err < 0.05 and err < untrained / 4, (err, untrained)


def test_preview_config_errors_name_the_key() -> None:
    with pytest.raises(ValueError, match="shapes.preview_batch must be >= 1, got 0"):
        _cfg(preview_batch=0)
    with pytest.raises(ValueError, match="shapes.preview_lr must be > 0"):
        _cfg(preview_lr=0.0)
