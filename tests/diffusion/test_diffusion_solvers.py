"""Variable-stride solver steps reproduce the stock diffusers pipelines on coarser schedules."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    UniPCMultistepScheduler,
)
from tiny_backbones import SD3_DROP, save_sd3

from addiffusion.diffusion.backbone import build_tiny_pipeline
from addiffusion.diffusion.solvers import SolverHistory, solver_step, variable_stride

N_MAX = 8
STRIDES = (1, 2, 4)
PROMPT = "a red circle"
GUIDANCE = 4.0

# name -> (scheduler class, config overrides); all with "trailing" spacing (nested sub-grids).
VP_CASES = {
    "ddim-eps": (DDIMScheduler, {"prediction_type": "epsilon"}),
    "ddim-v": (DDIMScheduler, {"prediction_type": "v_prediction"}),
    "ddim-v-clip": (DDIMScheduler, {"prediction_type": "v_prediction", "clip_sample": True}),
    "dpm++2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "dpm++2m-heun": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_type": "heun"},
    ),
    "dpm++2m-v-sigma-min": (
        DPMSolverMultistepScheduler,
        {
            "algorithm_type": "dpmsolver++",
            "prediction_type": "v_prediction",
            "final_sigmas_type": "sigma_min",
        },
    ),
    "dpm++1": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 1}),
}


@pytest.fixture(scope="module")
def sd_pipe(tmp_path_factory: pytest.TempPathFactory) -> StableDiffusionPipeline:
    pipe = build_tiny_pipeline(0, tmp_path_factory.mktemp("tiny_sd"))
    pipe.set_progress_bar_config(disable=True)
    pipe.training_scheduler_config = copy.deepcopy(pipe.scheduler.config)
    return pipe


def _scheduler(
    pipe: StableDiffusionPipeline, cls: type, spacing: str = "trailing", **kwargs: object
) -> object:
    """``cls`` on the tiny pipeline's training schedule, from its original (DDIM) config: the
    tests swap ``pipe.scheduler``, and ``from_config`` of a swapped one would carry its
    overrides (e.g. ``solver_type``) into the next case."""
    return cls.from_config(pipe.training_scheduler_config, timestep_spacing=spacing, **kwargs)


@pytest.fixture(scope="module")
def sd3_pipe(tmp_path_factory: pytest.TempPathFactory) -> StableDiffusion3Pipeline:
    # shift 1, no dynamic shifting: custom sigmas passed to the stock call are not re-shifted.
    sched = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    out = save_sd3(tmp_path_factory.mktemp("tiny_sd3"), sched)
    pipe = StableDiffusion3Pipeline.from_pretrained(out, **dict.fromkeys(SD3_DROP, None))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _noise(seed: int = 3) -> torch.Tensor:
    return torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(seed))


def _fine(scheduler: object, n: int = N_MAX) -> object:
    sched = copy.deepcopy(scheduler)
    sched.set_timesteps(n)
    return sched


def _sd_guided(
    pipe: StableDiffusionPipeline, sched: object, x: torch.Tensor, i: int
) -> torch.Tensor:
    """The stock SD pipeline's CFG denoiser output at grid point i."""
    cond, uncond = pipe.encode_prompt(PROMPT, torch.device("cpu"), 1, True)
    t = sched.timesteps[i]
    model_in = sched.scale_model_input(torch.cat([x, x]), t)
    out = pipe.unet(model_in, t, encoder_hidden_states=torch.cat([uncond, cond])).sample
    out_u, out_c = out.chunk(2)
    return out_u + GUIDANCE * (out_c - out_u)


def _sd3_guided(
    pipe: StableDiffusion3Pipeline, sched: object, x: torch.Tensor, i: int
) -> torch.Tensor:
    cond, uncond, pooled, neg_pooled = pipe.encode_prompt(
        PROMPT, PROMPT, PROMPT, device=torch.device("cpu"), do_classifier_free_guidance=True
    )
    t = sched.timesteps[i].expand(2)
    out = pipe.transformer(
        hidden_states=torch.cat([x, x]),
        timestep=t,
        encoder_hidden_states=torch.cat([uncond, cond]),
        pooled_projections=torch.cat([neg_pooled, pooled]),
        return_dict=False,
    )[0]
    out_u, out_c = out.chunk(2)
    return out_u + GUIDANCE * (out_c - out_u)


@torch.no_grad()
def _run_path(pipe: object, guided: object, path: list[int], n: int = N_MAX) -> torch.Tensor:
    """Denoise along grid points ``path`` (ascending, ending at ``n`` = the end) of the n-point
    grid of ``pipe.scheduler``, one denoiser call per visited point."""
    sched = _fine(pipe.scheduler, n)
    x = _noise() * getattr(sched, "init_noise_sigma", 1.0)
    history = SolverHistory()
    for i, j in zip(path[:-1], path[1:], strict=True):
        x = solver_step(sched, history, x, guided(pipe, sched, x, i), i, j)
    return x


def _assert_close(mine: torch.Tensor, stock: torch.Tensor, what: str) -> float:
    err = float((mine - stock).abs().max())
    scale = float(stock.abs().max())
    assert torch.isfinite(mine).all(), what
    assert err <= 1e-4 * max(scale, 1.0), f"{what}: max abs error {err:.3g} (scale {scale:.3g})"
    return err


@pytest.mark.parametrize("case", list(VP_CASES))
def test_trailing_sub_grids_are_nested(case: str, sd_pipe: StableDiffusionPipeline) -> None:
    cls, kwargs = VP_CASES[case]
    base = _scheduler(sd_pipe, cls, **kwargs)
    fine = _fine(base)
    for s in STRIDES:
        coarse = _fine(base, N_MAX // s)
        assert torch.equal(fine.timesteps[::s], coarse.timesteps), (case, s)
        if hasattr(coarse, "sigmas"):  # DPM++: the terminal sigma is appended to both
            torch.testing.assert_close(fine.sigmas[::s], coarse.sigmas, rtol=0, atol=0)
    # Not so with the default spacings: "leading" sub-grids are shifted off the fine grid.
    leading = _scheduler(sd_pipe, cls, "leading", **kwargs)
    assert not torch.equal(_fine(leading).timesteps[::2], _fine(leading, N_MAX // 2).timesteps)


@pytest.mark.parametrize("stride", STRIDES)
@pytest.mark.parametrize("case", list(VP_CASES))
def test_constant_stride_matches_stock_pipeline(
    case: str, stride: int, sd_pipe: StableDiffusionPipeline
) -> None:
    cls, kwargs = VP_CASES[case]
    sd_pipe.scheduler = _scheduler(sd_pipe, cls, **kwargs)
    assert variable_stride(sd_pipe.scheduler)
    mine = _run_path(sd_pipe, _sd_guided, list(range(0, N_MAX + 1, stride)))
    stock = sd_pipe(
        PROMPT,
        num_inference_steps=N_MAX // stride,
        guidance_scale=GUIDANCE,
        generator=torch.Generator().manual_seed(0),
        latents=_noise(),
        output_type="latent",
    ).images
    _assert_close(mine, stock, f"{case} stride {stride}")


@pytest.mark.parametrize("stride", STRIDES)
def test_flow_euler_matches_stock_sd3_with_path_sigmas(
    stride: int, sd3_pipe: StableDiffusion3Pipeline
) -> None:
    assert variable_stride(sd3_pipe.scheduler)
    path = list(range(0, N_MAX + 1, stride))
    fine = _fine(sd3_pipe.scheduler)
    assert float(fine.sigmas[-1]) == 0.0
    mine = _run_path(sd3_pipe, _sd3_guided, path)
    stock = sd3_pipe(
        PROMPT,
        guidance_scale=GUIDANCE,
        sigmas=fine.sigmas[path[:-1]].tolist(),  # the path's sigmas, without the terminal 0
        generator=torch.Generator().manual_seed(0),
        latents=_noise(),
        output_type="latent",
    ).images
    _assert_close(mine, stock, f"flow euler stride {stride}")


@pytest.mark.parametrize("cls", [EulerDiscreteScheduler, UniPCMultistepScheduler])
def test_fixed_stride_solvers_step_one_only(cls: type, sd_pipe: StableDiffusionPipeline) -> None:
    sd_pipe.scheduler = _scheduler(sd_pipe, cls)
    assert not variable_stride(sd_pipe.scheduler)
    mine = _run_path(sd_pipe, _sd_guided, list(range(N_MAX + 1)))
    stock = sd_pipe(
        PROMPT,
        num_inference_steps=N_MAX,
        guidance_scale=GUIDANCE,
        latents=_noise(),
        output_type="latent",
    ).images
    _assert_close(mine, stock, f"{cls.__name__} stride 1")
    sched = _fine(sd_pipe.scheduler)
    x = _noise()
    with pytest.raises(ValueError, match=rf"{cls.__name__} offers only stride 1"):
        solver_step(sched, SolverHistory(), x, torch.zeros_like(x), 0, 2)


def test_variable_stride_rejects_other_dpm_variants() -> None:
    assert not variable_stride(DPMSolverMultistepScheduler(solver_order=3))
    assert not variable_stride(DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"))
    assert not variable_stride(FlowMatchEulerDiscreteScheduler(stochastic_sampling=True))
    assert variable_stride(DPMSolverMultistepScheduler(algorithm_type="dpmsolver++"))


def test_dpm_non_constant_strides_and_history(sd_pipe: StableDiffusionPipeline) -> None:
    sd_pipe.scheduler = _scheduler(
        sd_pipe, DPMSolverMultistepScheduler, algorithm_type="dpmsolver++"
    )
    out = _run_path(sd_pipe, _sd_guided, [0, 1, 3, 7, N_MAX])
    assert out.shape == (1, 4, 8, 8) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # The second-order correction uses the path's own step sizes: a different path differs.
    other = _run_path(sd_pipe, _sd_guided, [0, 2, 3, 7, N_MAX])
    assert not torch.allclose(out, other)
    # A history left at (or after) the current point is refused.
    sched = _fine(sd_pipe.scheduler)
    x = _noise()
    history = SolverHistory()
    solver_step(sched, history, x, torch.zeros_like(x), 2, 3)
    assert history.index == 2 and history.x0 is not None and history.lam is not None
    with pytest.raises(ValueError, match="history"):
        solver_step(sched, history, x, torch.zeros_like(x), 2, 4)
    with pytest.raises(ValueError, match="0 <= i < j"):
        solver_step(sched, SolverHistory(), x, torch.zeros_like(x), 3, 3)


@pytest.mark.parametrize("case", ["ddim-eps", "dpm++2m"])
def test_half_precision_input_keeps_dtype(case: str, sd_pipe: StableDiffusionPipeline) -> None:
    cls, kwargs = VP_CASES[case]
    sched = _fine(_scheduler(sd_pipe, cls, **kwargs))
    x = _noise().half()
    out = solver_step(sched, SolverHistory(), x, torch.zeros_like(x), 0, 4)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


@pytest.mark.parametrize("stride", [3, 4])
@pytest.mark.parametrize("case", ["dpm++2m", "dpm++2m-heun"])
def test_dpm_second_order_at_stride_above_one(
    case: str, stride: int, sd_pipe: StableDiffusionPipeline
) -> None:
    """On a 12-point grid, strides 3 and 4 take second-order steps of size > 1 before the final
    (first-order) one; the trailing 4- and 3-step schedules are sub-grids of it."""
    cls, kwargs = VP_CASES[case]
    sd_pipe.scheduler = _scheduler(sd_pipe, cls, **kwargs)
    fine, coarse = _fine(sd_pipe.scheduler, 12), _fine(sd_pipe.scheduler, 12 // stride)
    assert torch.equal(fine.timesteps[::stride], coarse.timesteps)
    mine = _run_path(sd_pipe, _sd_guided, list(range(0, 13, stride)), n=12)
    stock = sd_pipe(
        PROMPT,
        num_inference_steps=12 // stride,
        guidance_scale=GUIDANCE,
        latents=_noise(),
        output_type="latent",
    ).images
    _assert_close(mine, stock, f"{case} n_max 12 stride {stride}")
