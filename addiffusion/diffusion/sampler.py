"""The stepwise adaptive sampler: a frozen diffusers pipeline driven one denoising step at a time,
so that a policy can continue, stop or refine after every step.

Every episode (one prompt, one seed) keeps its own scheduler copy, latents and step index, so
episodes in one batch may sit at different steps (the online vector env needs that) without
mixing multistep solver state; denoiser calls are still batched, with per-sample timesteps.

Per step the sampler produces the one-step clean prediction x̂0, decodes it with the VAE, and
scores it: CLIP image features, CLIP score against the prompt, stability (cosine to the previous
step's x̂0 features; 0 at step 0) and any extra scorer (e.g. the shapes-world verifier).
See :mod:`addiffusion.diffusion.mdp` for the NFE convention.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import psutil
import torch
from diffusers import DiffusionPipeline

from addiffusion.diffusion import mdp
from addiffusion.rewards.clip import ClipScorer

ExtraScorer = Callable[[np.ndarray, Sequence[str]], np.ndarray]
"""``(images (B, H, W, 3) uint8, prompts) -> (B,) float32`` raw reward component."""


@dataclass(frozen=True)
class SamplerSettings:
    """The MDP's sampler settings (mirrors the ``collect`` section of params.yaml)."""

    n_max: int = 12
    warmup: int = 1
    refine_budget: int = 0
    refine_k: int = 2
    guidance_scale: float = 5.0
    height: int = 32
    width: int = 32


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
    images: np.ndarray  # (B, H, W, 3) uint8, decoded x̂0
    x0_latents: np.ndarray  # (B, C, h, w) float16
    wall_time_s: float  # wall time of the whole batched step
    peak_mem_bytes: int  # peak CUDA memory during the step, else process RSS


class StepwiseSampler:
    """Drive ``pipe`` step by step. ``pipe``: an SD-family pipeline (``encode_prompt``, ``unet``,
    ``vae``, ``scheduler``); ``scorer``: CLIP features; ``extra_scorers``: more raw components."""

    def __init__(
        self,
        pipe: DiffusionPipeline,
        scorer: ClipScorer,
        settings: SamplerSettings,
        extra_scorers: dict[str, ExtraScorer] | None = None,
    ) -> None:
        self.pipe = pipe
        self.scorer = scorer
        self.settings = settings
        self.extra_scorers = dict(extra_scorers or {})
        self.device = pipe.unet.device
        self.dtype = pipe.unet.dtype
        self.num_train_timesteps = int(pipe.scheduler.config.num_train_timesteps)
        self.vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        # Sigma-space schedulers (Euler, ...) scale their samples; VP ones (DDIM, DPM++, UniPC) don't.
        probe = copy.deepcopy(pipe.scheduler)
        probe.set_timesteps(settings.n_max)
        self.sigma_space = float(probe.init_noise_sigma) != 1.0

    @property
    def component_names(self) -> list[str]:
        return ["clip_score", "stability", *self.extra_scorers]

    # 1. start: encode prompts, draw the initial noise, evaluate step 0
    @torch.no_grad()
    def start(
        self, prompts: Sequence[str], seeds: Sequence[int]
    ) -> tuple[list[Episode], StepRecord]:
        if len(prompts) != len(seeds):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
        s = self.settings
        cond, uncond = self.pipe.encode_prompt(
            list(prompts), self.device, 1, do_classifier_free_guidance=True
        )
        text_features = self.scorer.encode_text(list(prompts))
        shape = (
            1,
            self.pipe.unet.config.in_channels,
            s.height // self.vae_scale,
            s.width // self.vae_scale,
        )
        episodes = []
        for b, (prompt, seed) in enumerate(zip(prompts, seeds, strict=True)):
            scheduler = copy.deepcopy(self.pipe.scheduler)
            scheduler.set_timesteps(s.n_max, device=self.device)
            # Noise drawn on the CPU from the episode's own seed: same seed, same bytes, any device.
            noise = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(seed)))
            latents = noise.to(self.device, self.dtype) * scheduler.init_noise_sigma
            episodes.append(
                Episode(
                    prompt,
                    int(seed),
                    scheduler,
                    latents,
                    cond[b : b + 1],
                    uncond[b : b + 1],
                    text_features[b],
                )
            )
        return episodes, self.evaluate(episodes)

    # 2. continue: one solver step to the next schedule point, then evaluate there
    @torch.no_grad()
    def advance(self, episodes: Sequence[Episode]) -> StepRecord:
        for ep in episodes:
            if ep.done or ep.step >= self.settings.n_max - 1:
                raise ValueError(f"episode (seed {ep.seed}) cannot continue from step {ep.step}")
            t = ep.scheduler.timesteps[ep.step]
            ep.latents = ep.scheduler.step(ep.model_output, t, ep.latents).prev_sample
            ep.step += 1
        return self.evaluate(episodes)

    def refine(self, episodes: Sequence[Episode]) -> StepRecord:
        raise NotImplementedError(
            "refine is not implemented yet: keep collect.refine_budget = 0 (the action is masked off)"
        )

    def stop(self, episodes: Sequence[Episode]) -> np.ndarray:
        """End the episodes; the final images are the decoded x̂0 of their current step."""
        for ep in episodes:
            ep.done = True
        return np.stack([ep.image for ep in episodes])

    def action_masks(self, episodes: Sequence[Episode]) -> np.ndarray:
        """``(B, 3)`` bool legal actions of each episode at its current step."""
        s = self.settings
        return mdp.action_mask(
            np.array([ep.step for ep in episodes]),
            s.n_max,
            s.warmup,
            np.array([ep.refines_used for ep in episodes]),
            s.refine_budget,
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

    def _alpha_bar(self, ep: Episode) -> torch.Tensor:
        t = int(ep.scheduler.timesteps[ep.step])
        return ep.scheduler.alphas_cumprod[t].to(self.device, torch.float32)

    def _sigma(self, ep: Episode) -> torch.Tensor:
        if self.sigma_space:
            return ep.scheduler.sigmas[ep.step].to(self.device, torch.float32)
        ab = self._alpha_bar(ep)
        return ((1 - ab) / ab).sqrt()

    def _predict_x0(self, ep: Episode, out: torch.Tensor) -> torch.Tensor:
        """One-step clean prediction from the (guided) denoiser output, for eps/v/sample models."""
        x = ep.latents.float()
        out = out.float()
        kind = ep.scheduler.config.prediction_type
        if kind == "sample":
            return out
        if self.sigma_space:
            sigma = self._sigma(ep)
            if kind == "epsilon":
                return x - sigma * out
            return out * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
        ab = self._alpha_bar(ep)
        if kind == "epsilon":
            return (x - (1 - ab).sqrt() * out) / ab.sqrt()
        return ab.sqrt() * x - (1 - ab).sqrt() * out

    # 3. evaluate: denoiser at each episode's current step (1 NFE), x̂0, decode, score
    @torch.no_grad()
    def evaluate(self, episodes: Sequence[Episode]) -> StepRecord:
        tic = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        g = self.settings.guidance_scale
        timesteps = torch.stack([ep.scheduler.timesteps[ep.step] for ep in episodes]).to(
            self.device
        )
        model_in = torch.cat(
            [
                ep.scheduler.scale_model_input(ep.latents, ep.scheduler.timesteps[ep.step])
                for ep in episodes
            ]
        )
        cond = torch.cat([ep.cond for ep in episodes])
        uncond = torch.cat([ep.uncond for ep in episodes])
        out = self.pipe.unet(
            torch.cat([model_in, model_in]),
            torch.cat([timesteps, timesteps]),
            encoder_hidden_states=torch.cat([uncond, cond]),
            return_dict=False,
        )[0]
        out_uncond, out_cond = out.chunk(2)
        guided = out_uncond + g * (out_cond - out_uncond)
        x0 = torch.cat([self._predict_x0(ep, guided[b : b + 1]) for b, ep in enumerate(episodes)])
        vae = self.pipe.vae
        decoded = vae.decode(x0.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        images = (decoded.float() / 2 + 0.5).clamp(0, 1)
        features = self.scorer.encode_images(images)
        images_u8 = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
        scores = (
            (features * torch.stack([ep.text_features for ep in episodes])).sum(-1).cpu().numpy()
        )
        extra = {
            name: np.asarray(fn(images_u8, [ep.prompt for ep in episodes]), np.float32)
            for name, fn in self.extra_scorers.items()
        }
        stability = np.zeros(len(episodes), np.float32)
        for b, ep in enumerate(episodes):
            if ep.image_features is not None:
                stability[b] = float((features[b] * ep.image_features).sum())
            ep.model_output = guided[b : b + 1].to(ep.latents.dtype)
            ep.image_features = features[b]
            ep.prev_clip_score = ep.clip_score if ep.step > 0 else float(scores[b])
            ep.clip_score = float(scores[b])
            ep.image = images_u8[b]
            ep.nfe += 1
            ep.components = {"clip_score": float(scores[b]), "stability": float(stability[b])}
            ep.components.update({k: float(v[b]) for k, v in extra.items()})
        if self.device.type == "cuda":
            peak = int(torch.cuda.max_memory_allocated(self.device))
        else:
            peak = int(psutil.Process().memory_info().rss)
        return StepRecord(
            step=np.array([ep.step for ep in episodes], np.int32),
            timestep=timesteps.float().cpu().numpy(),
            t_frac=(timesteps.float() / self.num_train_timesteps).cpu().numpy(),
            sigma=np.array([float(self._sigma(ep)) for ep in episodes], np.float32),
            nfe=np.array([ep.nfe for ep in episodes], np.int32),
            refines_used=np.array([ep.refines_used for ep in episodes], np.int32),
            image_features=features.cpu().numpy().astype(np.float32),
            components={"clip_score": scores.astype(np.float32), "stability": stability, **extra},
            images=images_u8,
            x0_latents=x0.to(torch.float16).cpu().numpy(),
            wall_time_s=time.perf_counter() - tic,
            peak_mem_bytes=peak,
        )
