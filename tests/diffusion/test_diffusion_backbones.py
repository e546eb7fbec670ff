"""SDXL and SD3 backbones through the same sampler, on tiny models built from config offline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_backbones import save_sd3, save_sdxl

from addiffusion.diffusion.backbone import load_pipeline
from addiffusion.diffusion.sampler import SamplerSettings, StepRecord, StepwiseSampler
from addiffusion.rewards.clip import ClipScorer


def act(sampler: StepwiseSampler, eps: list, name: str) -> StepRecord | None:
    """Every episode of ``eps`` takes action ``name`` (one :meth:`StepwiseSampler.apply`)."""
    return sampler.apply(eps, [sampler.table.id(name)] * len(eps)).record


N = 3


def _check_against_call(pipe: object, sampler: StepwiseSampler) -> None:
    seen: list[torch.Tensor] = []

    def keep(p: object, i: int, t: object, kw: dict) -> dict:
        seen.append(kw["latents"].clone())
        return kw

    s = sampler.settings
    noise = torch.randn((1, 4, *sampler.latent_hw), generator=torch.Generator().manual_seed(5))
    eps, rec = sampler.start(["a red circle"], [5])
    pipe(
        "a red circle",
        num_inference_steps=N,
        guidance_scale=s.guidance_scale,
        height=s.height,
        width=s.width,
        latents=noise,
        output_type="latent",
        callback_on_step_end=keep,
    )
    for k in range(N - 1):
        rec = act(sampler, eps, "jump-1")
        torch.testing.assert_close(eps[0].latents, seen[k], atol=1e-4, rtol=1e-4)
    assert rec.images.shape == (1, s.height, s.width, 3) and rec.nfe.tolist() == [N]


def test_sdxl_added_conditioning_and_refine(tmp_path: Path, tiny_clip: ClipScorer) -> None:
    pipe = load_pipeline(str(save_sdxl(tmp_path)), "euler", "cpu")
    settings = SamplerSettings(n_max=N, refine_budget=1, guidance_scale=3.0, height=32, width=32)
    sampler = StepwiseSampler(pipe, tiny_clip, settings)
    assert sampler.family == "sdxl"
    _check_against_call(pipe, sampler)
    eps, _ = sampler.start(["a blue square"], [1])
    act(sampler, eps, "jump-1")
    rec = act(sampler, eps, "refine")
    assert rec.nfe.tolist() == [2 + settings.refine_k + 1] and rec.masks.shape == (1, 16, 16)


def test_sd3_flow_matching(tmp_path: Path, tiny_clip: ClipScorer) -> None:
    drop = ("text_encoder_3", "tokenizer_3")
    with pytest.raises(ValueError, match="flowmatch-euler"):
        load_pipeline(str(save_sd3(tmp_path)), "ddim", "cpu", drop_components=drop)
    pipe = load_pipeline(str(tmp_path / "pipe"), "flowmatch-euler", "cpu", drop_components=drop)
    settings = SamplerSettings(n_max=N, refine_budget=1, guidance_scale=3.0)
    sampler = StepwiseSampler(pipe, tiny_clip, settings)
    assert sampler.family == "sd3"
    _check_against_call(pipe, sampler)  # the joint-attention capture wrapper changes nothing
    eps, rec = sampler.start(["a blue square"], [1])
    # Flow sigma s = 1 at the first step: the VP-style sigma column is capped, not infinite.
    assert rec.sigma[0] > 1.0
    act(sampler, eps, "jump-1")
    masks = sampler.masks(eps)
    assert masks.shape == (1, 16, 16) and 0 <= masks.min() and masks.max() <= 1
    rec = act(sampler, eps, "refine")
    assert rec.nfe.tolist() == [2 + settings.refine_k + 1] and rec.refines_used.tolist() == [1]
