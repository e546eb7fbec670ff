"""The sampler's continue path reproduces the stock pipeline for every scheduler."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from addiffusion.diffusion.backbone import load_pipeline
from addiffusion.diffusion.sampler import SamplerSettings, StepRecord, StepwiseSampler
from addiffusion.rewards.clip import ClipScorer

StockRun = Callable[..., tuple[list[torch.Tensor], torch.Tensor]]


def act(sampler: StepwiseSampler, eps: list, name: str) -> StepRecord | None:
    """Every episode of ``eps`` takes action ``name`` (one :meth:`StepwiseSampler.apply`)."""
    return sampler.apply(eps, [sampler.table.id(name)] * len(eps)).record


N = 4
SETTINGS = SamplerSettings(n_max=N, warmup=1, guidance_scale=4.0, height=32, width=32)


@pytest.mark.parametrize("scheduler", ["ddim", "dpmsolver++", "euler", "unipc"])
def test_continue_matches_pipeline_call(
    scheduler: str, tiny_pipe_dir: Path, tiny_clip: ClipScorer, stock_run: StockRun
) -> None:
    pipe = load_pipeline(str(tiny_pipe_dir), scheduler, "cpu")
    # The stock pipeline, before the sampler swaps in its capture processors.
    seen, final = stock_run(pipe, 7, num_inference_steps=N)
    sampler = StepwiseSampler(pipe, tiny_clip, SETTINGS)
    eps, rec = sampler.start(["a red circle"], [7])
    for k in range(N - 1):
        act(sampler, eps, "jump-1")
        torch.testing.assert_close(eps[0].latents, seen[k], atol=1e-4, rtol=1e-4)
    # x̂0 at the last schedule point is (close to) what the final solver step lands on.
    err = (eps[0].x0 - final).abs().max() / final.abs().max()
    assert err < 0.05, f"{scheduler}: x̂0 at the last step is {err:.3f} (relative) off the output"


@pytest.mark.parametrize("scheduler", ["dpmsolver++", "unipc"])
def test_batched_episodes_at_different_steps_match_solo_runs(
    scheduler: str, tiny_pipe_dir: Path, tiny_clip: ClipScorer
) -> None:
    sampler = StepwiseSampler(
        load_pipeline(str(tiny_pipe_dir), scheduler, "cpu"), tiny_clip, SETTINGS
    )
    solo = []
    for seed in (1, 2):
        eps, _ = sampler.start(["two green squares"], [seed])
        for _ in range(N - 1):
            act(sampler, eps, "jump-1")
        solo.append(eps[0].latents)
    # Episode 1 starts two steps later; subsets advance; multistep histories must not mix.
    a, _ = sampler.start(["two green squares"], [1])
    act(sampler, a, "jump-1")
    act(sampler, a, "jump-1")
    b, _ = sampler.start(["two green squares"], [2])
    act(sampler, [a[0], b[0]], "jump-1")  # a at step 3 (last), b at step 1
    act(sampler, b, "jump-1")
    act(sampler, b, "jump-1")
    torch.testing.assert_close(a[0].latents, solo[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b[0].latents, solo[1], atol=1e-5, rtol=1e-5)


def test_reduced_x0_decode_keeps_final_image_full_size(
    tiny_pipe_dir: Path, tiny_clip: ClipScorer
) -> None:

    settings = SamplerSettings(n_max=2, warmup=1, height=32, width=32, x0_decode_scale=0.5)
    sampler = StepwiseSampler(load_pipeline(str(tiny_pipe_dir), "ddim", "cpu"), tiny_clip, settings)
    eps, rec = sampler.start(["a red circle"], [1])
    assert rec.images.shape == (1, 16, 16, 3)
    assert sampler.stop(eps).shape == (1, 32, 32, 3)


@pytest.mark.parametrize("scheduler", ["ddim", "dpmsolver++"])
@pytest.mark.parametrize("stride", [2, 4])
def test_constant_stride_through_apply_matches_the_shorter_pipeline(
    scheduler: str, stride: int, tiny_pipe_dir: Path, tiny_clip: ClipScorer, stock_run: StockRun
) -> None:
    """jump-s from point 0 on an 8-point trailing grid visits the stock 8/s-step schedule's
    timesteps and latents (the policy's path to a fixed schedule)."""
    n = 8
    pipe = load_pipeline(str(tiny_pipe_dir), scheduler, "cpu")
    pipe.scheduler = type(pipe.scheduler).from_config(
        pipe.scheduler.config, timestep_spacing="trailing"
    )
    seen, _ = stock_run(pipe, 3, num_inference_steps=n // stride)
    settings = SamplerSettings(
        n_max=n, strides=(1, 2, 4), warmup=1, guidance_scale=4.0, height=32, width=32
    )
    sampler = StepwiseSampler(pipe, tiny_clip, settings)
    eps, rec = sampler.start(["a red circle"], [3])
    for k in range(n // stride - 1):
        act(sampler, eps, f"jump-{stride}")
        assert eps[0].step == (k + 1) * stride and eps[0].nfe == k + 2
        torch.testing.assert_close(eps[0].latents, seen[k], atol=1e-4, rtol=1e-4)
