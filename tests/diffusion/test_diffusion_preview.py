"""Observations from a preview decoder: per-step images, features and scores come from it;
a stop's final image and its scores come from the full VAE."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderTiny

from addiffusion.diffusion.backbone import decode_latents, load_pipeline, load_preview
from addiffusion.diffusion.sampler import SamplerSettings, StepwiseSampler
from addiffusion.rewards.clip import ClipScorer
from addiffusion.worlds.shapes.preview import build_preview

SETTINGS = SamplerSettings(n_max=4, warmup=0, guidance_scale=4.0, height=32, width=32)
PREVIEW = SamplerSettings(
    n_max=4, warmup=0, guidance_scale=4.0, height=32, width=32, observe_with="preview"
)


@pytest.fixture(scope="module")
def parts(tiny_pipe_dir: Path, tiny_clip: ClipScorer) -> tuple[object, ClipScorer, AutoencoderTiny]:
    pipe = load_pipeline(str(tiny_pipe_dir), "ddim", "cpu")
    return pipe, tiny_clip, build_preview(0).eval()


def _u8(images: torch.Tensor) -> np.ndarray:
    return (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def test_observations_come_from_the_preview_and_final_images_from_the_vae(
    parts: tuple[object, ClipScorer, AutoencoderTiny],
) -> None:
    pipe, clip, preview = parts
    sampler = StepwiseSampler(pipe, clip, PREVIEW, preview=preview)
    exact = StepwiseSampler(pipe, clip, SETTINGS)
    prompts = ["a red circle", "two blue squares"]
    eps, rec = sampler.start(prompts, [1, 2])
    ref, ref_rec = exact.start(prompts, [1, 2])
    # Same denoising; only the observation's decoder differs.
    torch.testing.assert_close(torch.cat([e.x0 for e in eps]), torch.cat([e.x0 for e in ref]))
    with torch.no_grad():
        x0 = torch.cat([e.x0 for e in eps])
        by_preview = decode_latents(pipe, x0, preview)
        by_vae = decode_latents(pipe, x0)
        feats = clip.encode_images(by_preview)
    assert (rec.images == _u8(by_preview)).all()
    assert not (rec.images == ref_rec.images).all()
    np.testing.assert_allclose(rec.image_features, feats.numpy(), rtol=1e-5, atol=1e-6)
    # The stop decodes with the VAE, and the episode's final components are that image's.
    t = sampler.table
    out = sampler.apply(eps, [t.stop, t.stop])
    assert (out.images == _u8(by_vae)).all()
    with torch.no_grad():
        text = torch.stack([e.text_features for e in eps])
        vae_scores = (clip.encode_images(by_vae) * text).sum(-1).numpy()
    got = np.array([e.components["clip_score"] for e in eps])
    np.testing.assert_allclose(got, vae_scores, rtol=1e-5, atol=1e-6)


def test_preview_observations_need_a_decoder(
    parts: tuple[object, ClipScorer, AutoencoderTiny],
) -> None:
    pipe, clip, _ = parts
    with pytest.raises(ValueError, match="observe with the preview decoder, but none was given"):
        StepwiseSampler(pipe, clip, PREVIEW)
    with pytest.raises(ValueError, match="observe_with must be one of vae, preview, got 'taesd'"):
        SamplerSettings(observe_with="taesd")


def test_load_preview_names_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no preview decoder is named"):
        load_preview("", torch.device("cpu"), torch.float32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json: not an AutoencoderTiny"):
        load_preview(str(tmp_path / "empty"), torch.device("cpu"), torch.float32)
    with pytest.raises(FileNotFoundError, match="preview decoder ./nowhere/taesd not found"):
        load_preview("./nowhere/taesd", torch.device("cpu"), torch.float32)
    build_preview(0).save_pretrained(tmp_path / "taesd")
    loaded = load_preview(str(tmp_path / "taesd"), torch.device("cpu"), torch.float32)
    assert isinstance(loaded, AutoencoderTiny) and not loaded.training
