from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from addiffusion.diffusion.attention import CaptureAttnProcessor, undergeneration_mask
from addiffusion.diffusion.backbone import load_pipeline
from addiffusion.diffusion.sampler import SamplerSettings, StepRecord, StepwiseSampler
from addiffusion.rewards.clip import ClipScorer


def act(sampler: StepwiseSampler, eps: list, name: str) -> StepRecord | None:
    """Every episode of ``eps`` takes action ``name`` (one :meth:`StepwiseSampler.apply`)."""
    return sampler.apply(eps, [sampler.table.id(name)] * len(eps)).record


PROMPTS = ["a red circle left of a blue square", "two green triangles"]


def _sampler(pipe_dir: Path, clip: ClipScorer, **kw: object) -> StepwiseSampler:
    settings = SamplerSettings(
        n_max=5, warmup=1, refine_budget=1, refine_k=2, height=64, width=64, **kw
    )
    return StepwiseSampler(load_pipeline(str(pipe_dir), "ddim", "cpu"), clip, settings)


def test_capture_processor_only_on_cross_attention(
    tiny_pipe_dir: Path, tiny_clip: ClipScorer
) -> None:
    sampler = _sampler(tiny_pipe_dir, tiny_clip)
    procs = sampler.denoiser.attn_processors
    cross = {k for k, v in procs.items() if isinstance(v, CaptureAttnProcessor)}
    assert cross and all(k.endswith("attn2.processor") for k in cross)
    assert all(not isinstance(v, CaptureAttnProcessor) for k, v in procs.items() if k not in cross)


def test_mask_shape_range_and_refine_keeps_background(
    tiny_pipe_dir: Path, tiny_clip: ClipScorer
) -> None:
    sampler = _sampler(tiny_pipe_dir, tiny_clip, mask_blur_sigma=0.5)
    eps, _ = sampler.start(PROMPTS, [1, 2])
    act(sampler, eps, "jump-1")
    masks = sampler.masks(eps)
    assert masks.shape == (2, 16, 16) and masks.dtype == np.float32
    assert masks.min() >= 0.0 and masks.max() <= 1.0 and masks.max() > 0.0
    # The random tiny model attends almost uniformly, so its mask covers everything; set a
    # half-plane mask (the field policies see) to test the blend.
    half = torch.zeros(16, 16)
    half[:, :8] = 1.0
    for ep in eps:
        ep.mask = half
    masks = np.stack([half.numpy()] * 2)
    twins = sampler.fork(eps)
    nfe = [ep.nfe for ep in eps]
    cont = act(sampler, twins, "jump-1")
    ref = act(sampler, eps, "refine")
    # NFE: k re-denoise evaluations plus the evaluation at the next schedule point.
    assert ref.nfe.tolist() == [n + 2 + 1 for n in nfe] and cont.nfe.tolist() == [
        n + 1 for n in nfe
    ]
    assert ref.refines_used.tolist() == [1, 1] and ref.step.tolist() == [2, 2]
    assert ref.masks is not None and ref.masks.shape == (2, 16, 16)
    outside = torch.from_numpy(masks == 0.0)[:, None].expand(-1, 4, -1, -1)
    inside = torch.from_numpy(masks > 0.5)[:, None].expand(-1, 4, -1, -1)
    assert outside.any() and inside.any(), "the test needs pixels on both sides of the mask"
    a = torch.cat([ep.latents for ep in eps])
    b = torch.cat([ep.latents for ep in twins])
    torch.testing.assert_close(a[outside], b[outside], atol=1e-5, rtol=0)
    assert (a[inside] - b[inside]).abs().max() > 1e-3  # the masked region was re-denoised
    # Budget spent: refine is masked off and refusing it is loud.
    assert not sampler.action_masks(eps)[:, sampler.table.refine].any()
    with pytest.raises(ValueError, match="cannot take refine"):
        act(sampler, eps, "refine")


def test_refine_is_illegal_during_warmup(tiny_pipe_dir: Path, tiny_clip: ClipScorer) -> None:
    sampler = _sampler(tiny_pipe_dir, tiny_clip)
    eps, _ = sampler.start(PROMPTS[:1], [3])
    with pytest.raises(ValueError, match="warmup 1"):
        act(sampler, eps, "refine")


def test_undergeneration_mask_marks_where_neglected_tokens_live() -> None:
    # Tokens [start, A, B, end]; A claims the top-left block strongly, B is neglected (diffuse).
    h = w = 12
    maps = torch.zeros(1, 4, h, w)
    maps[0, 0] = 0.5  # the start token absorbs half of every pixel's attention
    maps[0, 1], maps[0, 2] = 0.25, 0.25
    maps[0, 1, :4, :4], maps[0, 2, :4, :4] = 0.45, 0.05
    content = torch.tensor([[False, True, True, False]])
    hard = undergeneration_mask(maps, content, blur_sigma=0.0)
    assert hard.shape == (1, h, w)
    assert (hard[0, :4, :4] == 0).all()  # A's region is generated
    torch.testing.assert_close(hard[0, 6:, 6:], torch.full((6, 6), 0.5))  # 1 - B's peak (0.5)
    soft = undergeneration_mask(maps, content, blur_sigma=0.5)
    assert soft.min() >= 0 and soft.max() <= 0.5 + 1e-6 and soft[0, 0, 0] == 0
    assert 0 < soft[0, 3, 3] < 0.5  # soft edge
    # Without content tokens there is nothing to be under-generated.
    assert undergeneration_mask(maps, torch.zeros(1, 4, dtype=torch.bool)).max() == 0


def test_refine_batched_at_different_steps_equals_solo(
    tiny_pipe_dir: Path, tiny_clip: ClipScorer
) -> None:

    sampler = _sampler(tiny_pipe_dir, tiny_clip)

    def at_step(seed: int, steps: int) -> list:
        eps, _ = sampler.start(PROMPTS[:1], [seed])
        for _ in range(steps):
            act(sampler, eps, "jump-1")
        return eps

    solo = []
    for seed, steps in ((1, 1), (2, 2)):
        eps = at_step(seed, steps)
        act(sampler, eps, "refine")
        solo.append(eps[0].latents)
    a, b = at_step(1, 1), at_step(2, 2)
    rec = act(sampler, [a[0], b[0]], "refine")
    assert rec.step.tolist() == [2, 3]
    torch.testing.assert_close(a[0].latents, solo[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b[0].latents, solo[1], atol=1e-5, rtol=1e-5)
