"""The stop-only callback on the stock shapes-world pipeline decides and ends exactly as the
drop-in sampler does with a jump-1/stop-only package; what it cannot follow fails clearly."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, UniPCMultistepScheduler
from policy_packages import SHAPES_CLIP, SHAPES_PIPE, table_of
from tiny_backbones import SD3_DROP, save_sd3, save_sdxl

from addiffusion.diffusion import backbone
from addiffusion.diffusion.mdp import ObservationLayout
from addiffusion.diffusion.sampler import SamplerSettings
from addiffusion.online_finetune.actor import ActorSpec, MlpActor
from addiffusion.policy import AdaptiveDiffusionPipeline, AdaptivePolicy, PolicyPackageError
from addiffusion.policy.callback import AdaptiveStopCallback
from addiffusion.policy.package import PolicyConfig, build_policy
from addiffusion.rewards.clip import ClipScorer

PROMPTS = ["a red circle", "two blue squares", "a green triangle", "a yellow circle"]
SEEDS = [0, 1, 2, 3]
STOP_ONLY = SamplerSettings(
    n_max=16, strides=(1,), refine_budget=0, guidance_scale=4.0, height=32, width=32
)
"""Shapes-world settings whose table offers only jump-1 and stop (refine has no budget)."""


@pytest.fixture(scope="module")
def scorer() -> ClipScorer:
    return ClipScorer(str(SHAPES_CLIP))


def shapes_pipe(solver: str = "ddim") -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(SHAPES_PIPE)
    pipe.set_progress_bar_config(disable=True)
    cls, kwargs = backbone.SCHEDULERS[solver]
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **kwargs)
    return pipe


def stop_policy(
    solver: str,
    *,
    settings: SamplerSettings = STOP_ONLY,
    family: str = "sd",
    feature_weight: float = 3.0,
    stop_bias: float = -6.0,
    **config: Any,
) -> AdaptivePolicy:
    """A linear package whose stop logit grows with the NFE used and moves with a random
    direction of the image features, so that images stop at different points. ``config``: more
    :class:`PolicyConfig` fields (``allowed_actions``, ``observation_drop``)."""
    table = table_of(settings)
    dim = 64
    layout = ObservationLayout(dim, dim)
    spec = ActorSpec(layout.dim, (), table.n)
    net = MlpActor(spec)
    g = torch.Generator().manual_seed(0)
    nfe_frac = 2 * dim + layout.time_dim + 3
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.zero_()
        net.head.weight[table.stop, :dim] = feature_weight * torch.randn(dim, generator=g)
        net.head.weight[table.stop, nfe_frac] = 10.0
        net.head.bias[table.stop] = stop_bias
    cfg = PolicyConfig(
        "iql",
        (spec,),
        table,
        layout,
        str(SHAPES_CLIP),
        str(SHAPES_PIPE),
        family,
        solver,
        dataclasses.asdict(settings),
        **config,
    )
    return build_policy(cfg, [net])


def record_observations(policy: AdaptivePolicy) -> list[tuple[np.ndarray, np.ndarray]]:
    """Make ``policy.act`` keep every (observations, mask) it is given."""
    seen: list[tuple[np.ndarray, np.ndarray]] = []
    act: Callable = policy.act

    def recording(obs: np.ndarray, mask: np.ndarray) -> np.ndarray:
        seen.append((np.array(obs), np.array(mask)))
        return act(obs, mask)

    policy.act = recording
    return seen


def run_callback(pipe: StableDiffusionPipeline, cb: AdaptiveStopCallback, **kwargs) -> object:
    call = dict(cb.schedule, guidance_scale=4.0, height=32, width=32, output_type="np")
    call.update(kwargs)
    return pipe(
        PROMPTS,
        latents=cb.noise(SEEDS, PROMPTS),
        callback_on_step_end=cb,
        callback_on_step_end_tensor_inputs=["latents"],
        **call,
    )


def assert_same_run(
    pipe: DiffusionPipeline,
    policy: AdaptivePolicy,
    scorer: ClipScorer,
    n: int = len(PROMPTS),
    guidance_scale: float = 4.0,
) -> list[int]:
    """The callback on the stock ``pipe`` and the drop-in sampler on the same ``pipe`` make the
    same decisions on the same observations and end with the same images; the stop points."""
    prompts, seeds = PROMPTS[:n], SEEDS[:n]
    seen = record_observations(policy)
    cb = AdaptiveStopCallback(policy, pipe, scorer)
    out = pipe(
        prompts,
        **cb.schedule,
        guidance_scale=guidance_scale,
        height=32,
        width=32,
        latents=cb.noise(seeds, prompts),
        callback_on_step_end=cb,
        callback_on_step_end_tensor_inputs=["latents"],
        output_type="np",
    )
    ours = list(seen)
    seen.clear()
    ref = AdaptiveDiffusionPipeline(pipe, policy, scorer)(
        prompts, generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="np"
    )
    for got, want in zip(cb.traces, ref.traces, strict=True):
        assert (got.prompt, got.seed) == (want.prompt, want.seed)
        assert (got.actions, got.points, got.timesteps) == (
            want.actions,
            want.points,
            want.timesteps,
        )
        assert (got.nfe, got.stop_step) == (want.nfe, want.stop_step)
        assert got.nfe == got.stop_step + 1
    # The policy saw the same observations and masks, decision by decision.
    assert len(ours) == len(seen)
    for (obs, mask), (obs_ref, mask_ref) in zip(ours, seen, strict=True):
        np.testing.assert_array_equal(mask, mask_ref)
        np.testing.assert_allclose(obs, obs_ref, atol=1e-4)
    np.testing.assert_allclose(out.images * 255, ref.images * 255, atol=1.0)
    return [t.stop_step for t in cb.traces]


@pytest.mark.parametrize("solver", ["ddim", "euler", "dpmsolver++"])
def test_callback_matches_the_adaptive_pipeline(solver: str, scorer: ClipScorer) -> None:
    # DDIM: the shapes world's trailing 16-point grid is not evenly spaced (1000 / 16), so the
    # stock step lands off the grid and the callback's re-aiming is exercised.
    stops = assert_same_run(shapes_pipe(solver), stop_policy(solver), scorer)
    assert min(stops) < STOP_ONLY.n_max - 1 and len(set(stops)) > 1, stops


def test_callback_runs_an_ablation_package(scorer: ClipScorer) -> None:
    """A package restricted to jump-1 / stop and trained without the text features decides in
    the callback as in the drop-in sampler (the callback's own jump-1 / stop subset and the
    package's restriction combine)."""
    policy = stop_policy(
        "ddim", allowed_actions=("jump-1", "stop"), observation_drop=("text_features",)
    )
    stops = assert_same_run(shapes_pipe("ddim"), policy, scorer)
    assert min(stops) < STOP_ONLY.n_max - 1, stops


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_callback_on_tiny_sdxl_and_sd3(family: str, tmp_path: Path, scorer: ClipScorer) -> None:
    if family == "sdxl":
        path, solver, drop = save_sdxl(tmp_path), "euler", ()
    else:
        path, solver, drop = save_sd3(tmp_path), "flowmatch-euler", SD3_DROP
    pipe = DiffusionPipeline.from_pretrained(path, **dict.fromkeys(drop, None))
    pipe.set_progress_bar_config(disable=True)
    cls, kwargs = backbone.SCHEDULERS[solver]
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **kwargs)
    settings = dataclasses.replace(STOP_ONLY, n_max=4, guidance_scale=3.0)
    policy = stop_policy(solver, settings=settings, family=family, stop_bias=-11.0)
    assert_same_run(pipe, policy, scorer, n=2, guidance_scale=3.0)


def test_early_stop_interrupts_and_a_reused_callback_needs_fresh_noise(
    scorer: ClipScorer,
) -> None:
    pipe = shapes_pipe("ddim")
    cb = AdaptiveStopCallback(
        stop_policy("ddim", feature_weight=0.0, stop_bias=100.0), pipe, scorer
    )
    calls = []
    pipe.unet.register_forward_hook(lambda *_: calls.append(1))
    run_callback(pipe, cb)
    # warm-up is 1: every image stops at point 1, after 2 denoiser evaluations, not 16.
    assert [(t.actions, t.nfe, t.stop_step) for t in cb.traces] == [
        (("jump-1", "stop"), 2, 1)
    ] * len(PROMPTS)
    assert len(calls) == 2
    with pytest.raises(RuntimeError, match=r"call cb\.noise\(seeds, prompts\) before every"):
        pipe(PROMPTS, num_inference_steps=16, guidance_scale=4.0, callback_on_step_end=cb)
    out = pipe(
        "a red circle",
        num_inference_steps=16,
        guidance_scale=4.0,
        latents=cb.noise([5], "a red circle"),
        callback_on_step_end=cb,
        output_type="latent",
    )
    assert [(t.prompt, t.seed) for t in cb.traces] == [("a red circle", 5)]
    assert out.images.shape == (1, 4, 8, 8)


def test_off_grid_calls_fail_clearly(scorer: ClipScorer) -> None:
    pipe = shapes_pipe("ddim")
    cb = AdaptiveStopCallback(stop_policy("ddim"), pipe, scorer)
    with pytest.raises(ValueError, match=r"grid of 16 points.*num_inference_steps=16"):
        run_callback(pipe, cb, num_inference_steps=8)
    with pytest.raises(ValueError, match="guidance_scale is 1.0"):
        run_callback(pipe, cb, guidance_scale=1.0)
    with pytest.raises(ValueError, match=r"latents have shape \(4, 4, 8, 8\), cb.noise"):
        pipe(
            PROMPTS,
            num_inference_steps=16,
            guidance_scale=4.0,
            latents=torch.cat([cb.noise(SEEDS[:2], PROMPTS[:2])] * 2),
            callback_on_step_end=cb,
        )


def test_unsupported_schedulers_fail_clearly(scorer: ClipScorer) -> None:
    pipe = shapes_pipe("ddim")
    with pytest.raises(PolicyPackageError, match="'unipc' solver.*AdaptiveDiffusionPipeline"):
        AdaptiveStopCallback(stop_policy("unipc"), pipe, scorer)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(PolicyPackageError, match="UniPCMultistepScheduler but the policy steers"):
        AdaptiveStopCallback(stop_policy("ddim"), pipe, scorer)
    pipe = shapes_pipe("ddim")
    cb = AdaptiveStopCallback(stop_policy("ddim"), pipe, scorer)
    pipe.scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config, clip_sample=True)
    with pytest.raises(PolicyPackageError, match="clip_sample"):
        run_callback(pipe, cb)
