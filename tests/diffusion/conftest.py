from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from addiffusion.diffusion.backbone import build_tiny_pipeline
from addiffusion.rewards.clip import ClipScorer, save_tiny_clip

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> ClipScorer:
    return ClipScorer(str(save_tiny_clip(tmp_path_factory.mktemp("clip"), seed=0)))


@pytest.fixture(scope="session")
def tiny_pipe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    build_tiny_pipeline(0, out / "src").save_pretrained(out / "pipe")
    return out / "pipe"


@pytest.fixture(scope="session")
def stock_run() -> Callable[..., tuple[list[torch.Tensor], torch.Tensor]]:
    """``stock_run(pipe, seed, **call_kwargs) -> (latents after each step, final latents)``: the
    stock pipeline on "a red circle" (32×32, guidance 4) from the sampler's noise for ``seed``,
    with ``callback_on_step_end`` keeping every step's latents (``call_kwargs``: the schedule,
    e.g. ``num_inference_steps=`` or ``timesteps=``)."""

    def run(
        pipe: object, seed: int, **call_kwargs: object
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        noise = torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(seed))
        seen: list[torch.Tensor] = []

        def keep(p: object, i: int, t: object, kw: dict) -> dict:
            seen.append(kw["latents"].clone())
            return kw

        final = pipe(
            "a red circle",
            guidance_scale=4.0,
            height=32,
            width=32,
            latents=noise,
            output_type="latent",
            callback_on_step_end=keep,
            **call_kwargs,
        ).images
        return seen, final

    return run
