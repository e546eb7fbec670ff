"""The stepwise adaptive sampler: a frozen diffusers pipeline driven one decision point at a time,
so that a policy can jump along the schedule, stop or refine after every denoiser evaluation.

Every episode (one prompt, one seed) keeps its own scheduler copy, latents and step index, so
episodes in one batch may sit at different steps (the online vector env needs that) without
mixing multistep solver state; denoiser calls are still batched, with per-sample timesteps.

Per step the sampler produces the one-step clean prediction x̂0, decodes it with the VAE (or,
with ``observe_with: preview``, a TAESD-style preview decoder), and scores it: CLIP image
features, CLIP score against the prompt, stability (cosine to the previous step's x̂0 features;
0 at step 0) and any extra scorer (e.g. the shapes-world verifier). It also
captures the attention of image positions to text tokens (UNet cross-attention, SD3 joint
attention; :mod:`addiffusion.diffusion.attention`) and keeps the episode's under-generation mask, which *refine* re-denoises and every policy may look at.
Backbones: SD 1.x/2.x, SDXL and SD3 (:func:`addiffusion.diffusion.backbone.model_family`).
The actions and their legality are :mod:`addiffusion.diffusion.actions`' table; :meth:`apply`
carries out one batch of them (collection, the online env and evaluation all use it); variable-
stride solver steps are :mod:`addiffusion.diffusion.solvers`. See :mod:`addiffusion.diffusion.mdp`
for the NFE convention.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import psutil
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline

from addiffusion.diffusion import backbone, mdp
from addiffusion.diffusion.actions import ActionTable
from addiffusion.diffusion.attention import (
    AttentionStore,
    content_token_mask,
    install_attention_capture,
    undergeneration_mask,
)
from addiffusion.diffusion.solvers import SolverHistory, solver_step, variable_stride


class FeatureScorer(Protocol):
    """What the sampler needs of a CLIP-like scorer (``addiffusion.rewards.clip.ClipScorer``
    is one); a protocol, so that ``diffusion`` never imports ``rewards``."""

    dim: int

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` float in [0, 1] -> ``(B, D)`` float32, unit norm."""
        ...

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """``prompts`` -> ``(B, D)`` float32, unit norm."""
        ...


OBSERVERS = ("vae", "preview")
"""Decoders of the per-step observations (``SamplerSettings.observe_with``)."""

ExtraScorer = Callable[[np.ndarray, Sequence[str]], np.ndarray]
"""``(images (B, H, W, 3) uint8, prompts) -> (B,) float32`` raw reward component."""


@dataclass(frozen=True)
class SamplerSettings:
    """The MDP's sampler settings (mirrors the ``collect`` section of params.yaml)."""

    n_max: int = 12
    """Points of the fine grid (``grid`` uniform: the scheduler's ``set_timesteps(n_max)``)."""
    grid: str = "uniform"
    """Base grid: ``uniform``, ``ays`` or ``custom`` (see
    :func:`addiffusion.diffusion.backbone.grid_timesteps`)."""
    timesteps: tuple[int, ...] = ()
    """The ``custom`` grid's ``n_max`` strictly decreasing training timesteps (else empty)."""
    strides: tuple[int, ...] = (1,)
    """Jump strides the policy may take (must include 1); a solver without variable-stride steps
    (:func:`addiffusion.diffusion.solvers.variable_stride`) offers only stride 1."""
    warmup: int = 1
    refine_budget: int = 0
    refine_k: int = 2
    guidance_scale: float = 5.0
    height: int = 32
    width: int = 32
    mask_blur_sigma: float = 1.0
    """Gaussian blur of the under-generation mask, in latent pixels."""
    reuse: bool = False
    """Offer the ``reuse`` action (0 NFE: step on with the last denoiser output, no evaluation;
    AdaptiveDiffusion's skip). Eval's AdaptiveDiffusion baseline turns it on."""
    x0_decode_scale: float = 1.0
    """Per-step x̂0 is decoded from latents resized by this factor (1: exact). Below 1 the
    per-step images, features and scores are approximations that cost ~scale² of a decode;
    :meth:`StepwiseSampler.stop` always decodes the final image at full resolution."""
    observe_with: str = "vae"
    """Decoder of the per-step x̂0 observations: ``vae`` (the pipeline's, exact) or ``preview``
    (a TAESD-style ``AutoencoderTiny`` handed to the sampler: a fraction of the cost, an
    approximation). Either way :meth:`StepwiseSampler.stop` decodes and scores the final image
    with the full VAE."""

    def __post_init__(self) -> None:
        from addiffusion.diffusion.backbone import GRIDS

        if self.observe_with not in OBSERVERS:
            raise ValueError(
                f"sampler observe_with must be one of {', '.join(OBSERVERS)}, got "
                f"{self.observe_with!r}"
            )

        if self.grid not in GRIDS:
            raise ValueError(f"sampler grid must be one of {', '.join(GRIDS)}, got {self.grid!r}")
        if (self.grid == "custom") != bool(self.timesteps):
            raise ValueError(
                "sampler timesteps must be given exactly when grid is 'custom' "
                f"(grid {self.grid!r}, timesteps {list(self.timesteps)})"
            )
        if self.timesteps and len(self.timesteps) != self.n_max:
            raise ValueError(
                f"the custom grid has {len(self.timesteps)} timesteps but n_max is {self.n_max}"
            )


@dataclass
class Episode:
    """Mutable state of one denoising episode."""

    prompt: str
    seed: int
    scheduler: object
    latents: torch.Tensor  # (1, C, h, w)
    cond: torch.Tensor  # (1, L, D) prompt embeddings
    uncond: torch.Tensor  # (1, L, D) negative-prompt embeddings
    text_features: torch.Tensor  # (D_txt,) CLIP text features, unit norm
    step: int = 0
    nfe: int = 0
    refines_used: int = 0
    done: bool = False
    model_output: torch.Tensor | None = None  # denoiser output at the current step
    image_features: torch.Tensor | None = None  # CLIP features of the current x̂0
    clip_score: float = 0.0
    prev_clip_score: float = 0.0
    image: np.ndarray | None = None  # (H, W, 3) uint8: decoded x̂0 of the current step
    components: dict[str, float] = field(default_factory=dict)
    cond_extra: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (1, ...)
    uncond_extra: dict[str, torch.Tensor] = field(default_factory=dict)
    content_tokens: torch.Tensor | None = None  # (L,) bool, tokens that can be neglected
    x0: torch.Tensor | None = None  # (1, C, h, w) float32 one-step clean prediction
    mask: torch.Tensor | None = None  # (h, w) float32 in [0, 1], under-generation mask
    history: SolverHistory = field(default_factory=SolverHistory)  # multistep solver memory


@dataclass(frozen=True)
class StepRecord:
    """What one denoising step of B episodes produced (all arrays have leading dim B)."""

    step: np.ndarray  # (B,) int32, schedule index i
    timestep: np.ndarray  # (B,) float32, t_i
    t_frac: np.ndarray  # (B,) float32, t_i / num_train_timesteps
    sigma: np.ndarray  # (B,) float32, sqrt((1 - ᾱ) / ᾱ) at t_i
    nfe: np.ndarray  # (B,) int32, cumulative
    refines_used: np.ndarray  # (B,) int32
    image_features: np.ndarray  # (B, D_img) float32
    components: dict[str, np.ndarray]  # name -> (B,) float32 raw reward components
    images: np.ndarray  # (B, H, W, 3) uint8, decoded x̂0 (H, W scaled by x0_decode_scale)
    x0_latents: np.ndarray  # (B, C, h, w) float16
    wall_time_s: float  # wall time of the whole batched step
    peak_mem_bytes: int  # peak CUDA memory during the step, else process RSS
    masks: np.ndarray | None = None  # (B, h, w) float32 in [0, 1]; None without cross-attention
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase of this step


@dataclass(frozen=True)
class Applied:
    """What :meth:`StepwiseSampler.apply` did to a batch of B episodes."""

    moved: list[int]  # batch positions that jumped or refined, in order
    stopped: list[int]  # batch positions that stopped, in order
    record: StepRecord | None  # the new points of ``moved`` (rows in ``moved`` order)
    images: np.ndarray  # (len(stopped), H, W, 3) uint8 final images of ``stopped``


class StepwiseSampler:
    """Drive ``pipe`` step by step. ``pipe``: an SD, SDXL or SD3 pipeline; ``scorer``: CLIP
    features; ``extra_scorers``: more raw components."""

    def __init__(
        self,
        pipe: DiffusionPipeline,
        scorer: FeatureScorer,
        settings: SamplerSettings,
        extra_scorers: dict[str, ExtraScorer] | None = None,
        observe: bool = True,
        scheduler: object | None = None,
        preview: torch.nn.Module | None = None,
    ) -> None:
        """``observe=False`` (fixed schedules, which need no observations) skips the per-point
        decode and scoring: :meth:`stop` then decodes and scores only the final images.
        ``scheduler`` replaces ``pipe.scheduler`` (samplers of several solvers share one pipe).
        ``preview``: the per-step decoder when ``settings.observe_with`` is ``preview`` (see
        :func:`addiffusion.diffusion.backbone.load_preview`)."""
        if settings.observe_with == "preview" and preview is None and observe:
            raise ValueError(
                "sampler settings observe with the preview decoder, but none was given "
                "(load one with addiffusion.diffusion.backbone.load_preview)"
            )
        self.preview = preview if settings.observe_with == "preview" else None
        self.observe = observe
        self.scheduler = pipe.scheduler if scheduler is None else scheduler
        self.pipe = pipe
        self.scorer = scorer
        self.settings = settings
        self.extra_scorers = dict(extra_scorers or {})
        self.family = backbone.model_family(pipe)
        self.denoiser = backbone.denoiser_of(pipe)
        self.device = self.denoiser.device
        self.dtype = self.denoiser.dtype
        self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)
        self.vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        self.latent_hw = (settings.height // self.vae_scale, settings.width // self.vae_scale)
        self.space = backbone.noise_space(self.scheduler)
        self.flow = self.space == "flow"
        self.attention: AttentionStore | None = install_attention_capture(self.denoiser)
        self.timings: dict[str, float] = {}
        strides = settings.strides if variable_stride(self.scheduler) else (1,)
        self.table = ActionTable.build(
            strides,
            settings.n_max,
            settings.warmup,
            settings.refine_budget,
            settings.refine_k,
            reuse=settings.reuse,
        )
        """The MDP's actions on this backbone (the dataset records it)."""

    @property
    def component_names(self) -> list[str]:
        return ["clip_score", "stability", *self.extra_scorers]

    # 1. start: encode prompts, draw the initial noise, evaluate step 0
    @torch.no_grad()
    def start(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        negative_prompts: Sequence[str] | None = None,
        noise: torch.Tensor | None = None,
    ) -> tuple[list[Episode], StepRecord]:
        """Start one episode per (prompt, seed) and evaluate the first grid point.

        The starting noise of episode b is drawn on the CPU from ``seeds[b]`` unless ``noise``
        ``(B, C, h, w)`` gives it (the drop-in pipeline draws it from the caller's generators;
        the seeds then only seed refine's re-noising). ``negative_prompts``: None = empty.
        """
        if len(prompts) != len(seeds):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
        if negative_prompts is not None and len(negative_prompts) != len(prompts):
            raise ValueError(
                f"got {len(prompts)} prompts but {len(negative_prompts)} negative prompts"
            )
        s = self.settings
        shape = (1, self.denoiser.config.in_channels, *self.latent_hw)
        if noise is not None and tuple(noise.shape) != (len(prompts), *shape[1:]):
            raise ValueError(
                f"noise must have shape {(len(prompts), *shape[1:])}, got {tuple(noise.shape)}"
            )
        negatives = None if negative_prompts is None else list(negative_prompts)
        text = backbone.encode_text(
            self.pipe, list(prompts), self.device, s.height, s.width, negatives
        )
        content = content_token_mask(text.token_texts, text.special)
        text_features = self.scorer.encode_text(list(prompts))
        episodes = []
        for b, (prompt, seed) in enumerate(zip(prompts, seeds, strict=True)):
            scheduler = copy.deepcopy(self.scheduler)
            backbone.set_schedule(
                self.pipe, scheduler, s.n_max, self.latent_hw, self.device, s.grid, s.timesteps
            )
            # Noise drawn on the CPU from the episode's own seed: same seed, same bytes, any device.
            if noise is None:
                start = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(seed)))
            else:
                start = noise[b : b + 1]
            init_sigma = 1.0 if self.flow else scheduler.init_noise_sigma  # flow: pure noise
            latents = start.to(self.device, self.dtype) * init_sigma
            episodes.append(
                Episode(
                    prompt,
                    int(seed),
                    scheduler,
                    latents,
                    text.cond[b : b + 1],
                    text.uncond[b : b + 1],
                    text_features[b],
                    cond_extra={k: v[b : b + 1] for k, v in text.cond_extra.items()},
                    uncond_extra={k: v[b : b + 1] for k, v in text.uncond_extra.items()},
                    content_tokens=content[b],
                )
            )
        return episodes, self.evaluate(episodes)

    # 2. apply: carry out one action per episode (jump / stop / refine), one batched evaluation
    @torch.no_grad()
    def apply(self, episodes: Sequence[Episode], actions: Sequence[int] | np.ndarray) -> Applied:
        """Carry out ``actions[b]`` (ids of :attr:`table`) on ``episodes[b]``.

        Stops decode their x̂0 and end; refines run their k re-denoise iterations; then every
        moving episode (jumps, refines, reuses) takes its solver step to its target point and
        all of them but the reuses are evaluated there in one batched denoiser call (per-sample
        timesteps); a reuse keeps its last denoiser output and predicts x̂0 from it (0 NFE).
        Raises on an illegal action, naming the episode, the action and the legal ones.
        """
        tic = time.perf_counter()
        actions = np.asarray(actions, dtype=np.int64).reshape(-1)
        if actions.shape[0] != len(episodes):
            raise ValueError(f"got {actions.shape[0]} actions for {len(episodes)} episodes")
        legal = self.action_masks(episodes)
        t = self.table
        for b, (ep, a) in enumerate(zip(episodes, actions, strict=True)):
            if ep.done or not (0 <= a < t.n) or not legal[b, a]:
                ok = [t.names[j] for j in np.flatnonzero(legal[b])]
                name = t.names[a] if 0 <= a < t.n else f"id {a}"
                raise ValueError(
                    f"episode (seed {ep.seed}) cannot take {name} at grid point {ep.step} "
                    f"(done={ep.done}; legal: {ok}; refines used {ep.refines_used} of "
                    f"{self.settings.refine_budget}, warmup {t.warmup}, n_max {t.n_max})"
                )
        kinds = [t.kinds[a] for a in actions]
        stopped = [b for b, k in enumerate(kinds) if k == "stop"]
        refining = [b for b, k in enumerate(kinds) if k == "refine"]
        moved = [b for b, k in enumerate(kinds) if k != "stop"]
        images = (
            self.stop([episodes[b] for b in stopped])
            if stopped
            else np.zeros((0, self.settings.height, self.settings.width, 3), np.uint8)
        )
        if refining:
            self._refine([episodes[b] for b in refining])
        for b in moved:
            if kinds[b] in ("jump", "reuse"):
                ep = episodes[b]
                j = int(t.target(ep.step, actions[b]))
                ep.latents = solver_step(
                    ep.scheduler, ep.history, ep.latents, ep.model_output, ep.step, j
                )
                ep.step = j
        record = (
            self.evaluate([episodes[b] for b in moved], [kinds[b] == "reuse" for b in moved])
            if moved
            else None
        )
        if record is not None:
            # The record's cost covers the refine iterations and the stops' decodes too.
            record = dataclasses.replace(record, wall_time_s=time.perf_counter() - tic)
        return Applied(moved, stopped, record, images)

    def _refine(self, episodes: Sequence[Episode]) -> None:
        """Re-denoise B episodes at their current point ``i`` and step them to ``i + 1`` (k NFE;
        the evaluation at ``i + 1`` is :meth:`apply`'s, like inpainting).

        Each of the ``k`` iterations re-noises the current x̂0 to ``t_i`` with fresh seeded noise
        inside the soft mask M (outside, the original latent is kept), and evaluates the
        denoiser there (1 NFE) for a new x̂0. The solver then steps from the blended state (model
        output blended with the same M) to ``t_{i+1}``. For one-step solvers the result outside
        the mask equals a plain ``jump-1`` exactly; multistep solvers keep the refined x̂0 in
        their history.
        """
        for ep in episodes:
            if ep.mask is None:
                raise ValueError(
                    f"refine needs cross-attention masks, which {type(self.denoiser).__name__} "
                    "does not provide"
                )
        m = torch.stack([ep.mask for ep in episodes])[:, None].to(self.device, torch.float32)
        x_orig = torch.cat([ep.latents for ep in episodes]).float()
        out_orig = torch.cat([ep.model_output for ep in episodes]).float()
        x0 = torch.cat([ep.x0 for ep in episodes])
        x, out = x_orig, out_orig
        for j in range(self.settings.refine_k):
            noise = torch.cat([self._refine_noise(ep, j) for ep in episodes]).to(self.device)
            renoised = torch.cat(
                [
                    self._renoise(ep, x0[b : b + 1], noise[b : b + 1])
                    for b, ep in enumerate(episodes)
                ]
            )
            x = m * renoised + (1 - m) * x_orig
            out, _ = self._guided(episodes, x.to(self.dtype), capture=False)
            out = out.float()
            x0 = torch.cat(
                [
                    self._predict_x0(ep, x[b : b + 1], out[b : b + 1])
                    for b, ep in enumerate(episodes)
                ]
            )
        blended_out = m * out + (1 - m) * out_orig
        for b, ep in enumerate(episodes):
            ep.latents = solver_step(
                ep.scheduler,
                ep.history,
                x[b : b + 1].to(self.dtype),
                blended_out[b : b + 1].to(self.dtype),
                ep.step,
                ep.step + 1,
            )
            ep.step += 1
            ep.nfe += self.settings.refine_k
            ep.refines_used += 1

    @torch.no_grad()
    def stop(self, episodes: Sequence[Episode]) -> np.ndarray:
        """End the episodes; the final images ``(B, H, W, 3)`` uint8 are the decoded x̂0 of their
        current step, by the full VAE at full resolution whatever ``x0_decode_scale`` and
        ``observe_with``; approximate observations are then scored again on that image, so the
        episodes' final components are always the final image's."""
        for ep in episodes:
            ep.done = True
        if self.observe and self.exact_observations:
            return np.stack([ep.image for ep in episodes])
        images = backbone.decode_latents(self.pipe, torch.cat([ep.x0 for ep in episodes]))
        # The final image's scores are always the full VAE decode's.
        self._score(episodes, images)
        return (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)

    @property
    def exact_observations(self) -> bool:
        """Whether the per-step observations are the full VAE's decode at full size (then a
        stop's final image and scores are the last observation's)."""
        s = self.settings
        return s.observe_with == "vae" and s.x0_decode_scale == 1.0

    def fork(self, episodes: Sequence[Episode]) -> list[Episode]:
        """Independent copies of the episodes at their current state (for refine branches).
        Tensors are never modified in place, so only the scheduler's state is deep-copied."""
        out = []
        for ep in episodes:
            twin = copy.copy(ep)
            twin.scheduler = copy.deepcopy(ep.scheduler)
            twin.history = copy.copy(ep.history)
            twin.components = dict(ep.components)
            out.append(twin)
        return out

    def action_masks(self, episodes: Sequence[Episode]) -> np.ndarray:
        """``(B, table.n)`` bool legal actions of each episode at its current point (refine
        needs cross-attention masks; done episodes have none)."""
        budget = self.settings.refine_budget if self.attention is not None else 0
        mask = self.table.mask(
            np.array([ep.step for ep in episodes], np.int64),
            np.array([ep.refines_used for ep in episodes], np.int64),
            budget,
        )
        mask[[ep.done for ep in episodes]] = False
        return mask

    def masks(self, episodes: Sequence[Episode]) -> np.ndarray:
        """``(B, h, w)`` float32 under-generation masks in [0, 1] at the current step."""
        return np.stack(
            [
                ep.mask.cpu().numpy()
                if ep.mask is not None
                else np.zeros(self.latent_hw, np.float32)
                for ep in episodes
            ]
        )

    def observations(self, episodes: Sequence[Episode]) -> np.ndarray:
        """``(B, obs_dim)`` float32 observations of the episodes at their current step."""
        return mdp.build_observations(
            image_features=torch.stack([ep.image_features for ep in episodes]).cpu().numpy(),
            text_features=torch.stack([ep.text_features for ep in episodes]).cpu().numpy(),
            t_frac=np.array([self._t_frac(ep) for ep in episodes]),
            step=np.array([ep.step for ep in episodes]),
            n_max=self.settings.n_max,
            clip_score=np.array([ep.clip_score for ep in episodes]),
            clip_score_delta=np.array([ep.clip_score - ep.prev_clip_score for ep in episodes]),
            stability=np.array([ep.components["stability"] for ep in episodes]),
            nfe=np.array([ep.nfe for ep in episodes]),
            refines_used=np.array([ep.refines_used for ep in episodes]),
        )

    def _t_frac(self, ep: Episode) -> float:
        return float(ep.scheduler.timesteps[ep.step]) / self.num_train_timesteps

    def _sigma(self, ep: Episode) -> float:
        return backbone.vp_sigma(ep.scheduler, ep.step, self.space)

    def _predict_x0(self, ep: Episode, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return backbone.predict_x0(ep.scheduler, ep.step, self.space, x, out)

    def _renoise(self, ep: Episode, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return backbone.renoise(ep.scheduler, ep.step, self.space, x0, noise)

    def _refine_noise(self, ep: Episode, j: int) -> torch.Tensor:
        # Seeded by (episode seed, step, refine, iteration): a branch replays bit for bit.
        g = torch.Generator("cpu").manual_seed(
            (ep.seed * 1_000_003 + ep.step * 1_009 + ep.refines_used * 101 + j) % 2**63
        )
        return torch.randn(ep.latents.shape, generator=g)

    def _guided(
        self, episodes: Sequence[Episode], latents: torch.Tensor, capture: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Classifier-free-guided denoiser output for (B, C, h, w) latents at each episode's
        current timestep (one batched call of 2B rows), and the (B, L, h, w) attention maps."""
        timesteps = torch.stack([ep.scheduler.timesteps[ep.step] for ep in episodes]).to(
            self.device
        )
        model_in = torch.cat(
            [
                ep.scheduler.scale_model_input(latents[b : b + 1], ep.scheduler.timesteps[ep.step])
                if not self.flow
                else latents[b : b + 1]
                for b, ep in enumerate(episodes)
            ]
        )
        extra = {
            k: torch.cat(
                [ep.uncond_extra[k] for ep in episodes] + [ep.cond_extra[k] for ep in episodes]
            )
            for k in episodes[0].cond_extra
        }
        if self.attention is not None and capture:
            self.attention.begin(self.latent_hw)
        out = backbone.denoise(
            self.pipe,
            torch.cat([model_in, model_in]),
            torch.cat([timesteps, timesteps]),
            torch.cat([ep.uncond for ep in episodes] + [ep.cond for ep in episodes]),
            extra,
        )
        maps = self.attention.result() if self.attention is not None and capture else None
        out_uncond, out_cond = out.chunk(2)
        g = self.settings.guidance_scale
        return out_uncond + g * (out_cond - out_uncond), maps

    def observe_x0(
        self, episodes: Sequence[Episode], x0: torch.Tensor, since: float | None = None
    ) -> tuple[np.ndarray, torch.Tensor, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """Decode the episodes' clean predictions ``x0`` (B, C, h, w) (resized by
        ``x0_decode_scale``; with the preview decoder when ``observe_with`` says so) and score
        them as their current point: what :meth:`observations` then reads (the stop-only callback observes a stock pipeline's x̂0 through this)."""
        since = time.perf_counter() if since is None else since
        scale = self.settings.x0_decode_scale
        small = x0 if scale == 1.0 else F.interpolate(x0, scale_factor=scale, mode="area")
        images = backbone.decode_latents(self.pipe, small, self.preview)
        self._tick("decode", since)
        return self._score(episodes, images)

    def _score(
        self, episodes: Sequence[Episode], images: torch.Tensor
    ) -> tuple[np.ndarray, torch.Tensor, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """Score decoded x̂0 ``images`` (B, 3, H, W) in [0, 1] and store the episodes' per-point
        state (features, CLIP score, stability, components, image)."""
        text = torch.stack([ep.text_features for ep in episodes])
        images_u8, features, scores, extra = self.score_images(
            images, text, [ep.prompt for ep in episodes]
        )
        stability = np.zeros(len(episodes), np.float32)
        for b, ep in enumerate(episodes):
            if ep.image_features is not None:
                stability[b] = float((features[b] * ep.image_features).sum())
            ep.image_features = features[b]
            ep.prev_clip_score = ep.clip_score if ep.nfe > 1 else float(scores[b])
            ep.clip_score = float(scores[b])
            ep.image = images_u8[b]
            ep.components = {"clip_score": float(scores[b]), "stability": float(stability[b])}
            ep.components.update({k: float(v[b]) for k, v in extra.items()})
        return images_u8, features, scores, stability, extra

    def score_images(
        self, images: torch.Tensor, text_features: torch.Tensor, prompts: Sequence[str]
    ) -> tuple[np.ndarray, torch.Tensor, np.ndarray, dict[str, np.ndarray]]:
        """Score decoded images ``(B, 3, H, W)`` in [0, 1] as an observation does, without touching
        any episode: ``(images (B, H, W, 3) uint8, CLIP features (B, D), CLIP scores against
        text_features (B,), {extra scorer: (B,) float32})``."""
        now = time.perf_counter()
        features = self.scorer.encode_images(images)
        images_u8 = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
        scores = (features * text_features).sum(-1).cpu().numpy()
        now = self._tick("clip", now)
        extra = {
            name: np.asarray(fn(images_u8, list(prompts)), np.float32)
            for name, fn in self.extra_scorers.items()
        }
        self._tick("scorers", now)
        return images_u8, features, scores, extra

    def _tick(self, name: str, since: float) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.timings[name] = self.timings.get(name, 0.0) + now - since
        return now

    # 4. evaluate: denoiser at each episode's current step (1 NFE), x̂0, mask, decode, score
    @torch.no_grad()
    def evaluate(
        self, episodes: Sequence[Episode], reuse: Sequence[bool] | None = None
    ) -> StepRecord:
        """Observe the episodes at their current points. ``reuse[b]``: episode b keeps its last
        denoiser output (and mask) instead of evaluating the denoiser (0 NFE)."""
        tic = time.perf_counter()
        before = dict(self.timings)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        reuse = [False] * len(episodes) if reuse is None else list(reuse)
        fresh = [b for b, r in enumerate(reuse) if not r]
        outputs = [ep.model_output for ep in episodes]
        new_masks: list[torch.Tensor | None] = [ep.mask for ep in episodes]
        if fresh:
            latents = torch.cat([episodes[b].latents for b in fresh])
            guided, maps = self._guided([episodes[b] for b in fresh], latents, capture=True)
            masks_fresh = None
            if maps is not None:
                content = torch.stack([episodes[b].content_tokens for b in fresh])
                masks_fresh = undergeneration_mask(maps, content, self.settings.mask_blur_sigma)
            for k, b in enumerate(fresh):
                outputs[b] = guided[k : k + 1]
                new_masks[b] = masks_fresh[k] if masks_fresh is not None else None
        x0 = torch.cat(
            [self._predict_x0(ep, ep.latents, outputs[b]) for b, ep in enumerate(episodes)]
        )
        masks = torch.stack(new_masks) if all(m is not None for m in new_masks) else None
        now = self._tick("denoiser", tic)
        for b, ep in enumerate(episodes):
            ep.model_output = outputs[b].to(ep.latents.dtype)
            ep.x0 = x0[b : b + 1]
            ep.mask = new_masks[b]
            ep.nfe += 0 if reuse[b] else 1
        if self.observe:
            images_u8, features, scores, stability, extra = self.observe_x0(episodes, x0, now)
        else:
            n = len(episodes)
            images_u8 = np.zeros((n, 0, 0, 3), np.uint8)
            features = torch.zeros(n, self.scorer.dim)
            scores = stability = np.zeros(n, np.float32)
            extra = {k: np.zeros(n, np.float32) for k in self.extra_scorers}
        if self.device.type == "cuda":
            peak = int(torch.cuda.max_memory_allocated(self.device))
        else:
            peak = int(psutil.Process().memory_info().rss)
        timesteps = torch.stack([ep.scheduler.timesteps[ep.step] for ep in episodes]).float().cpu()
        return StepRecord(
            step=np.array([ep.step for ep in episodes], np.int32),
            timestep=timesteps.numpy(),
            t_frac=(timesteps / self.num_train_timesteps).numpy(),
            sigma=np.array([self._sigma(ep) for ep in episodes], np.float32),
            nfe=np.array([ep.nfe for ep in episodes], np.int32),
            refines_used=np.array([ep.refines_used for ep in episodes], np.int32),
            image_features=features.cpu().numpy().astype(np.float32),
            components={"clip_score": scores.astype(np.float32), "stability": stability, **extra},
            images=images_u8,
            x0_latents=x0.to(torch.float16).cpu().numpy(),
            wall_time_s=time.perf_counter() - tic,
            peak_mem_bytes=peak,
            masks=masks.cpu().numpy().astype(np.float32) if masks is not None else None,
            timings={k: v - before.get(k, 0.0) for k, v in self.timings.items()},
        )
