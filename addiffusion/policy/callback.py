"""A trained policy's stop decisions as a ``callback_on_step_end`` for a stock diffusers pipeline.

``AdaptiveStopCallback(policy, pipe)`` runs the **stop-only subset** of a policy (``jump-1`` and
``stop``; every other action is masked out) inside an unmodified ``pipe(...)`` call: no wrapped
``scheduler.step``, no subclass. ::

    cb = AdaptiveStopCallback(policy, pipe)  # the scorer is loaded from the package's name
    out = pipe(
        prompts,
        **cb.schedule,  # num_inference_steps=n_max (uniform grid), else the grid's timesteps
        guidance_scale=4.0,
        height=32,
        width=32,
        latents=cb.noise(seeds, prompts),
        callback_on_step_end=cb,
        callback_on_step_end_tensor_inputs=["latents"],  # the default
    )
    cb.traces  # per image: actions, grid points, NFE, stop point

After step ``i`` the pipeline hands the callback x_{i+1}; the decision concerns grid point ``i``,
whose one-step clean prediction x̂0_i is recovered without touching the pipeline: from x_i and
x_{i+1} for first-order solvers (DDIM with eta 0, Euler, flow-matching Euler), from
``scheduler.model_outputs[-1]`` (DPM-Solver++'s data prediction) for DPM-Solver++. The
observation is then the one :class:`~addiffusion.diffusion.sampler.StepwiseSampler` builds
(x̂0 decoded by the VAE, scored by the CLIP scorer, stability, CLIP-score delta, NFE, time
embedding), so the policy sees what it was trained on. An image that stops at point ``i`` ends
as decode(x̂0_i), exactly as in :class:`~addiffusion.policy.pipeline.AdaptiveDiffusionPipeline`
with a jump-1/stop-only table.

Stock DDIM steps to ``t_i - num_train_timesteps // n``, which is not the next grid point when
the grid is not evenly spaced in integer timesteps (``trailing`` spacing with ``n`` not dividing
``num_train_timesteps``); there the callback re-aims the step onto ``t_{i+1}`` through the
returned latents, as the project's DDIM step does, so the pipeline follows the policy's path.

Limits:

* stop only: no larger jumps, no refine (use ``AdaptiveDiffusionPipeline`` for those);
* solvers: DDIM (eta 0, no ``clip_sample`` / thresholding), Euler, flow-matching Euler
  (deterministic) and DPM-Solver++ (``algorithm_type="dpmsolver++"``, no thresholding); the
  pipeline's scheduler must be the policy's solver and its timesteps the policy's grid;
* the starting latents must be ``cb.noise(seeds, prompts)``, called once before every pipeline
  call (x_0 is what the callback recovers x̂0_0 from), with the prompts in the pipeline's batch
  order (the callback cannot see the prompts, and the observations hold their CLIP features);
* in a batch every image stops on its own, but the pipeline keeps stepping all rows until the
  last one stops: a batch saves only the steps that all of its images save;
* classifier-free guidance must be on (``guidance_scale > 1``): the policy was trained with it
  (at the package's ``guidance_scale``; other values put it off its training distribution);
* x̂0 recovered from two latents carries their rounding, amplified by about 1 / step size: in
  float32 the observations equal the sampler's to ~1e-5, with float16 latents x̂0 is off by up
  to ~1% (relative; early points) and decisions near a tie may differ (DPM-Solver++ is exact);
* build the callback after moving the pipeline to its device (the scorer goes there).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline

from addiffusion.diffusion import backbone
from addiffusion.diffusion.sampler import Episode, StepwiseSampler
from addiffusion.policy.package import AdaptivePolicy, PolicyPackageError
from addiffusion.policy.pipeline import (
    ImageTrace,
    preview_decoder,
    restore_attention_processors,
)

RECOVERY = {
    "ddim": "two consecutive latents",
    "euler": "two consecutive latents",
    "flowmatch-euler": "two consecutive latents",
    "dpmsolver++": "scheduler.model_outputs[-1]",
}
"""Solvers whose x̂0 the callback can recover, and from what."""


@dataclass
class _Pending:
    """What :meth:`AdaptiveStopCallback.noise` prepared for the next pipeline call."""

    prompts: list[str]
    seeds: list[int]
    noise: torch.Tensor  # (B, C, h, w), the denoiser's dtype and device
    text_features: torch.Tensor  # (B, D) CLIP text features
    tic: float  # time.perf_counter() when noise() was called: the traces' start


@dataclass
class _Run:
    """State of one pipeline call."""

    episodes: list[Episode]
    x_prev: torch.Tensor  # (B, C, h, w) latents at the current grid point
    final: list[torch.Tensor | None]  # x̂0 (1, C, h, w) float32 of each stopped image
    decisions: list[list[tuple[int, int, int]]]  # per image: (action id, point, timestep)
    tic: float  # time.perf_counter() at noise()
    stopped_at: list[float]  # time.perf_counter() when each image stopped


class AdaptiveStopCallback:
    """``callback_on_step_end`` running ``policy``'s stop decisions on ``pipe`` (see the module
    docstring for the usage and the limits).

    ``policy``: an :class:`AdaptivePolicy` (any action table: all but ``jump-1`` and ``stop`` are
    masked out). ``scorer``: the CLIP scorer of the observations, or its open_clip name / folder
    (default: the package's); ``preview``: the preview decoder of the observations for a policy
    trained on preview-decoded ones (a module, folder or Hub id; default: the package's).
    Raises :class:`PolicyPackageError` when the policy does not fit ``pipe`` or its scheduler.
    """

    def __init__(
        self,
        policy: AdaptivePolicy,
        pipe: DiffusionPipeline,
        scorer: Any | str | Path | None = None,
        preview: Any | str | Path | None = None,
    ) -> None:
        cfg = policy.config
        self.policy = policy
        self.pipe = pipe
        self.settings = cfg.settings()
        family = backbone.model_family(pipe)
        if family != cfg.family:
            raise PolicyPackageError(
                f"the pipeline is {family}, the policy was trained on {cfg.family} ({cfg.backbone})"
            )
        if cfg.solver not in RECOVERY:
            raise PolicyPackageError(
                f"the policy steers the {cfg.solver!r} solver, whose one-step clean prediction a "
                f"callback cannot recover (supported: {', '.join(RECOVERY)}); use "
                "AdaptiveDiffusionPipeline instead"
            )
        if cfg.solver == "ddim" and self.settings.grid != "uniform":
            raise PolicyPackageError(
                f"the policy decides on a {self.settings.grid!r} DDIM grid, which the stock "
                "pipeline cannot run (DDIMScheduler takes no custom timesteps); use "
                "AdaptiveDiffusionPipeline instead"
            )
        self._check_scheduler(pipe.scheduler)
        denoiser = backbone.denoiser_of(pipe)
        if scorer is None or isinstance(scorer, str | Path):
            from addiffusion.rewards.clip import ClipScorer

            scorer = ClipScorer(str(scorer or cfg.scorer), denoiser.device)
        layout = cfg.observation
        if (scorer.dim, scorer.dim) != (layout.image_dim, layout.text_dim):
            raise PolicyPackageError(
                f"the scorer gives {scorer.dim}-dim features, the policy's observations hold "
                f"{layout.image_dim}-dim image and {layout.text_dim}-dim text features (scorer "
                f"{cfg.scorer!r})"
            )
        # The sampler owns the observation (scoring, stability, layout); it never runs the
        # denoiser here, so the capture processors it installs are taken off again at once.
        with restore_attention_processors(denoiser):
            self.sampler = StepwiseSampler(
                pipe,
                scorer,
                self.settings,
                scheduler=copy.deepcopy(pipe.scheduler),
                preview=preview_decoder(policy, preview, pipe),
            )
        table = policy.actions
        self.allowed = np.zeros(table.n, bool)
        self.allowed[[table.jump(1), table.stop]] = True
        self.traces: list[ImageTrace] = []
        """One record per image of the last finished pipeline call."""
        self._pending: _Pending | None = None
        self._run: _Run | None = None

    @property
    def schedule(self) -> dict[str, Any]:
        """The pipeline-call arguments that put the pipeline on the policy's grid:
        ``num_inference_steps=n_max`` (uniform grid), else ``timesteps=`` (``sigmas=`` for
        flow matching) the grid's points."""
        s = self.settings
        if s.grid == "uniform":
            return {"num_inference_steps": s.n_max}
        scheduler = self.pipe.scheduler
        ts = backbone.grid_timesteps(scheduler, s.grid, s.n_max, s.timesteps)
        if self.sampler.flow:
            top = float(scheduler.config.num_train_timesteps)
            return {"sigmas": [t / top for t in ts]}
        return {"timesteps": ts}

    def _check_scheduler(self, scheduler: object) -> None:
        """Raise unless ``scheduler`` is the policy's solver, in a form whose x̂0 the callback
        can recover."""
        solver = self.policy.config.solver
        cls, kwargs = backbone.SCHEDULERS[solver]
        cfg = scheduler.config
        problem = None
        if type(scheduler) is not cls or any(cfg.get(k) != v for k, v in kwargs.items()):
            fix = "".join(f", {k}={v!r}" for k, v in kwargs.items())
            problem = (
                f"pipe.scheduler is {type(scheduler).__name__}"
                + "".join(f" ({k}={cfg.get(k)!r})" for k in kwargs)
                + f" but the policy steers {solver!r}: set pipe.scheduler = "
                f"{cls.__name__}.from_config(pipe.scheduler.config{fix})"
            )
        elif solver in ("ddim", "dpmsolver++") and (
            cfg.thresholding or (solver == "ddim" and cfg.clip_sample)
        ):
            problem = (
                f"{cls.__name__} with clip_sample / thresholding clips x̂0 inside its step, so "
                "the unclipped x̂0 the policy observes cannot be recovered; turn them off"
            )
        elif solver == "flowmatch-euler" and (
            cfg.get("stochastic_sampling", False) or cfg.get("invert_sigmas", False)
        ):
            problem = f"{cls.__name__} must be deterministic (no stochastic_sampling)"
        if problem is not None:
            raise PolicyPackageError(f"the callback cannot follow this pipeline: {problem}")

    # 1. before the call: starting latents and the prompts' CLIP features
    @torch.no_grad()
    def noise(
        self,
        seeds: Sequence[int],
        prompts: str | Sequence[str],
        height: int | None = None,
        width: int | None = None,
    ) -> torch.Tensor:
        """Starting latents ``(B, C, H/s, W/s)`` (s: the VAE's scale; the denoiser's dtype and
        device) for the next pipeline call: image b's noise drawn on the CPU from ``seeds[b]``,
        as the project's sampler draws it. ``prompts``: one per image in the pipeline's batch
        order (or one for all); ``height`` / ``width`` default to the policy's. Pass the result
        as ``latents=``."""
        tic = time.perf_counter()
        seeds = [int(s) for s in seeds]
        prompts = [prompts] * len(seeds) if isinstance(prompts, str) else list(prompts)
        if len(prompts) != len(seeds):
            raise ValueError(f"got {len(seeds)} seeds but {len(prompts)} prompts")
        s, smp = self.settings, self.sampler
        h, w = (s.height if height is None else height), (s.width if width is None else width)
        shape = (1, smp.denoiser.config.in_channels, h // smp.vae_scale, w // smp.vae_scale)
        draws = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(x)) for x in seeds]
        noise = torch.cat(draws).to(smp.denoiser.device, smp.denoiser.dtype)
        features = smp.scorer.encode_text(prompts)
        self._pending = _Pending(prompts, seeds, noise, features, tic)
        return noise

    # 2. at step 0: take the prepared noise, check the pipeline runs the policy's grid
    def _begin(self, pipe: DiffusionPipeline, latents: torch.Tensor) -> None:
        self._run, self.traces = None, []
        pending, self._pending = self._pending, None
        if pending is None:
            raise RuntimeError(
                "AdaptiveStopCallback: call cb.noise(seeds, prompts) before every pipeline call "
                "and pass its result as latents= (the callback needs the starting latents and "
                "the prompts)"
            )
        if pipe is not self.pipe:
            raise ValueError("AdaptiveStopCallback was built for another pipeline")
        if tuple(latents.shape) != tuple(pending.noise.shape):
            raise ValueError(
                f"the pipeline's latents have shape {tuple(latents.shape)}, cb.noise() gave "
                f"{tuple(pending.noise.shape)}: pass latents=cb.noise(seeds, prompts) with one "
                "seed and prompt per image, and the same height / width"
            )
        scale = float(getattr(pipe, "guidance_scale", 0.0))
        if scale <= 1.0:
            raise ValueError(
                f"guidance_scale is {scale}: the policy was trained with classifier-free "
                f"guidance (guidance_scale {self.settings.guidance_scale}); pass "
                "guidance_scale > 1"
            )
        scheduler = pipe.scheduler
        self._check_scheduler(scheduler)
        s = self.settings
        want = copy.deepcopy(scheduler)
        backbone.set_schedule(
            pipe, want, s.n_max, tuple(latents.shape[-2:]), latents.device, s.grid, s.timesteps
        )
        got, ref = scheduler.timesteps.float().cpu(), want.timesteps.float().cpu()
        if got.shape != ref.shape or not torch.allclose(got, ref, atol=1e-3):
            raise ValueError(
                f"the pipeline runs {len(got)} timesteps {[round(float(t), 2) for t in got]}, "
                f"the policy decides on its {s.grid} grid of {s.n_max} points "
                f"{[round(float(t), 2) for t in ref]}: call the pipeline with "
                f"{', '.join(f'{k}={v}' for k, v in self.schedule.items())} (**cb.schedule)"
            )
        flow = self.sampler.flow
        x0 = pending.noise * (1.0 if flow else scheduler.init_noise_sigma)  # prepare_latents
        empty = torch.empty(0)  # the callback never runs the denoiser itself
        episodes = [
            Episode(p, seed, scheduler, x0[b : b + 1], empty, empty, pending.text_features[b])
            for b, (p, seed) in enumerate(zip(pending.prompts, pending.seeds, strict=True))
        ]
        n = len(episodes)
        self._run = _Run(episodes, x0, [None] * n, [[] for _ in range(n)], pending.tic, [0.0] * n)

    # 3. x̂0 of grid point i from what the pipeline left
    def _clean_prediction(
        self, scheduler: Any, i: int, x_i: torch.Tensor, x_next: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x̂0_i ``(B, C, h, w)`` float32 and the latents to hand back (x_{i+1}, re-aimed onto
        the grid for DDIM)."""
        solver = self.policy.config.solver
        if solver == "dpmsolver++":
            if scheduler.step_index != i + 1:
                raise RuntimeError(
                    f"DPMSolverMultistepScheduler is at step {scheduler.step_index} after grid "
                    f"point {i}: the callback must be called once after every step"
                )
            return scheduler.model_outputs[-1].float(), x_next
        xi, xn = x_i.float(), x_next.float()
        if solver in ("euler", "flowmatch-euler"):
            # x_{i+1} = x_i + (s_{i+1} - s_i) (x_i - x̂0) / s_i (Euler in sigma or flow space)
            s = scheduler.sigmas.float()
            s_i, s_n = s[i].to(xi.device), s[i + 1].to(xi.device)
            return xi - s_i * (xn - xi) / (s_n - s_i), x_next
        # DDIM (eta 0): x = a x̂0 + b eps at t_i and at the stock step's target; solve for x̂0.
        n, top = len(scheduler.timesteps), int(scheduler.config.num_train_timesteps)
        acp = scheduler.alphas_cumprod.float()
        final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32)
        t_i = int(scheduler.timesteps[i])
        stock = t_i - top // scheduler.num_inference_steps
        ab_i = acp[t_i]
        ab_p = acp[stock] if stock >= 0 else final
        ab_j = acp[int(scheduler.timesteps[i + 1])] if i + 1 < n else final
        a_i, b_i, a_p, b_p, a_j, b_j = (
            v.to(xi.device) for ab in (ab_i, ab_p, ab_j) for v in (ab.sqrt(), (1 - ab).sqrt())
        )
        x0 = (b_p * xi - b_i * xn) / (b_p * a_i - b_i * a_p)
        if float(ab_j) == float(ab_p):
            return x0, x_next
        eps = (xi - a_i * x0) / b_i
        return x0, (xn + (a_j - a_p) * x0 + (b_j - b_p) * eps).to(x_next.dtype)

    # 4. every step: observe the running images, decide, stop
    @torch.no_grad()
    def __call__(
        self, pipe: DiffusionPipeline, i: int, t: Any, callback_kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        if "latents" not in callback_kwargs:
            raise ValueError(
                "AdaptiveStopCallback needs the latents: pass "
                'callback_on_step_end_tensor_inputs=["latents"]'
            )
        latents = callback_kwargs["latents"]
        if i == 0:
            self._begin(pipe, latents)
        run = self._run
        if run is None:
            raise RuntimeError(
                f"AdaptiveStopCallback called at step {i} without a step 0 in this pipeline call"
            )
        x0, latents = self._clean_prediction(pipe.scheduler, i, run.x_prev, latents)
        run.x_prev = latents
        active = [b for b, ep in enumerate(run.episodes) if not ep.done]
        eps = [run.episodes[b] for b in active]
        for b, ep in zip(active, eps, strict=True):
            ep.step, ep.nfe, ep.x0 = i, i + 1, x0[b : b + 1]
        self.sampler.observe_x0(eps, x0[active])
        mask = self.policy.actions.mask(np.full(len(eps), i), 0, 0) & self.allowed
        actions = np.asarray(self.policy.act(self.sampler.observations(eps), mask))
        stop = self.policy.actions.stop
        timestep = int(pipe.scheduler.timesteps[i])
        names = self.policy.actions.names
        for k, (b, ep, a) in enumerate(zip(active, eps, actions.tolist(), strict=True)):
            if not mask[k, a]:
                legal = [names[j] for j in np.flatnonzero(mask[k])]
                raise ValueError(
                    f"the policy took {names[a]} at grid point {i}, outside its mask ({legal})"
                )
            run.decisions[b].append((a, i, timestep))
            if a == stop:
                ep.done = True
                run.stopped_at[b] = time.perf_counter()
                run.final[b] = x0[b : b + 1]
        if all(ep.done for ep in run.episodes):
            latents = torch.cat([f.to(latents.dtype) for f in run.final if f is not None])
            pipe._interrupt = True  # diffusers: skip the remaining steps, decode `latents`
            self._finish(run)
        callback_kwargs["latents"] = latents
        return callback_kwargs

    def _finish(self, run: _Run) -> None:
        names = self.policy.actions.names
        self.traces = [
            ImageTrace(
                prompt=ep.prompt,
                seed=ep.seed,
                actions=tuple(names[a] for a, _, _ in seen),
                points=tuple(p for _, p, _ in seen),
                timesteps=tuple(t for _, _, t in seen),
                nfe=ep.nfe,
                stop_step=ep.step,
                refines=0,
                seconds=done - run.tic,
            )
            for ep, seen, done in zip(run.episodes, run.decisions, run.stopped_at, strict=True)
        ]
        self._run = None
