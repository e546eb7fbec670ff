"""Base grids: uniform, Align-Your-Steps-style and custom timesteps, through the stock pipeline."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from diffusers.schedulers import AysSchedules

from addiffusion.diffusion.backbone import (
    ays_timesteps,
    grid_timesteps,
    load_pipeline,
    set_schedule,
)
from addiffusion.diffusion.sampler import SamplerSettings, StepwiseSampler
from addiffusion.rewards.clip import ClipScorer


def test_ays_grid_on_the_sd15_schedule_is_the_published_one(tiny_pipe_dir: Path) -> None:
    """The tiny pipeline has SD 1.5's noise schedule (scaled_linear 0.00085..0.012, 1000 steps):
    at 10 points the AYS-style grid must land on AYS's published SD 1.5 timesteps."""
    sched = load_pipeline(str(tiny_pipe_dir), "ddim", "cpu").scheduler
    ours = ays_timesteps(sched, 10)
    ref = AysSchedules["StableDiffusionTimesteps"]
    assert max(abs(a - b) for a, b in zip(ours, ref, strict=True)) <= 2, (ours, ref)
    # Interpolated grids are strictly decreasing from the top noise level.
    for n in (1, 2, 4, 16, 32):
        ts = ays_timesteps(sched, n)
        assert len(ts) == n and ts[0] == ours[0]
        assert all(a > b for a, b in zip(ts, ts[1:], strict=False))


@pytest.mark.parametrize(
    ("scheduler", "stride"), [("dpmsolver++", 1), ("dpmsolver++", 2), ("euler", 1)]
)
def test_constant_stride_on_the_ays_grid_matches_the_stock_pipeline(
    scheduler: str,
    stride: int,
    tiny_pipe_dir: Path,
    tiny_clip: ClipScorer,
    stock_run: Callable[..., tuple[list[torch.Tensor], torch.Tensor]],
) -> None:
    """jump-s on an 8-point ays grid visits the latents of the stock pipeline called with
    ``timesteps=`` every s-th point of that grid (the policy's path to the ays fixed schedule)."""
    n = 8
    pipe = load_pipeline(str(tiny_pipe_dir), scheduler, "cpu")
    grid = ays_timesteps(pipe.scheduler, n)
    seen, _ = stock_run(pipe, 3, timesteps=grid[::stride])
    settings = SamplerSettings(
        n_max=n, grid="ays", strides=(1, 2), warmup=1, guidance_scale=4.0, height=32, width=32
    )
    sampler = StepwiseSampler(pipe, tiny_clip, settings)
    eps, _ = sampler.start(["a red circle"], [3])
    assert [int(t) for t in eps[0].scheduler.timesteps] == grid
    for k in range(n // stride - 1):
        sampler.apply(eps, [sampler.table.jump(stride)])
        assert eps[0].step == (k + 1) * stride
        torch.testing.assert_close(eps[0].latents, seen[k], atol=1e-4, rtol=1e-4)


def test_custom_grid_reaches_every_solver_that_takes_one(tiny_pipe_dir: Path) -> None:
    custom = [999, 700, 400, 150, 20]
    for name in ("ddim", "dpmsolver++", "euler"):
        sched = load_pipeline(str(tiny_pipe_dir), name, "cpu").scheduler
        set_schedule(None, sched, 5, (8, 8), torch.device("cpu"), "custom", custom)
        assert [int(round(float(t))) for t in sched.timesteps] == custom, name


def test_grid_errors_name_what_was_wrong(tiny_pipe_dir: Path) -> None:
    sched = load_pipeline(str(tiny_pipe_dir), "ddim", "cpu").scheduler
    with pytest.raises(ValueError, match="needs 4 timesteps"):
        grid_timesteps(sched, "custom", 4, [999, 500, 1])
    with pytest.raises(ValueError, match="strictly decreasing"):
        grid_timesteps(sched, "custom", 3, [999, 999, 1])
    with pytest.raises(ValueError, match=r"integers in \[0, 1000\)"):
        grid_timesteps(sched, "custom", 2, [1000, 1])
    with pytest.raises(ValueError, match="'uniform' takes no timesteps"):
        grid_timesteps(sched, "uniform", 2, [999, 1])
    with pytest.raises(ValueError, match="unknown grid 'karras'"):
        grid_timesteps(sched, "karras", 2)
    unipc = load_pipeline(str(tiny_pipe_dir), "unipc", "cpu").scheduler
    with pytest.raises(ValueError, match="UniPCMultistepScheduler: use grid uniform"):
        grid_timesteps(unipc, "ays", 4)
    with pytest.raises(ValueError, match="exactly when grid is 'custom'"):
        SamplerSettings(n_max=2, grid="ays", timesteps=(999, 1))
    with pytest.raises(ValueError, match="2 timesteps but n_max is 3"):
        SamplerSettings(n_max=3, grid="custom", timesteps=(999, 1))
