"""The drop-in adaptive sampler: a stock diffusers pipeline driven by a trained policy.

``AdaptiveDiffusionPipeline(pipe, policy)`` wraps any supported stock pipeline (SD 1.x/2.x,
SDXL, SD3) and is called like it: prompt(s), negative prompt(s), ``num_images_per_prompt``,
``guidance_scale``, ``height`` / ``width``, ``generator`` (one or one per image), ``latents``,
``output_type`` (``pil``, ``np``, ``pt``, ``latent``), ``return_dict``. The policy picks the
schedule: there is no ``num_inference_steps``. It returns the diffusers-style output with a
per-image :class:`ImageTrace` (actions, grid points, NFE, stop point, wall time).

It runs exactly what evaluation runs: the project's :class:`~addiffusion.diffusion.sampler.
StepwiseSampler` over ``pipe``'s own modules, and the decision loop
:func:`addiffusion.eval.rollout.rollout`; every image of a batch stops on its own, jumps and
refine work. The solver is the policy's (built from ``pipe.scheduler``'s config, so the model's
noise schedule is kept); ``pipe`` itself is left as it was: its scheduler is not replaced, and
the attention processors that capture refine's masks are installed only during a call.
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

from addiffusion.diffusion import backbone
from addiffusion.diffusion.sampler import Episode, StepwiseSampler
from addiffusion.eval.rollout import rollout
from addiffusion.policy.package import AdaptivePolicy, PolicyPackageError

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass(frozen=True)
class ImageTrace:
    """What the policy did for one image."""

    prompt: str
    seed: int
    """Seed of the starting noise (``generator.initial_seed()``, or drawn when none was given)."""
    actions: tuple[str, ...]
    """Action taken at each decision point, the last one ``stop``."""
    points: tuple[int, ...]
    """Grid point (0-based, of ``n_max``) of each decision."""
    timesteps: tuple[int, ...]
    """The solver's timestep at each decision point."""
    nfe: int
    """Denoiser evaluations spent on this image (classifier-free guidance counted once)."""
    stop_step: int
    """Grid point whose x̂0 is the image."""
    refines: int
    seconds: float
    """Wall time from the start of the call until this image was ready."""
    frames: tuple[np.ndarray, ...] = field(default=(), repr=False, compare=False)
    """Decoded x̂0 ``(H, W, 3)`` uint8 at each decision (only with ``keep_frames=True``)."""

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("frames")
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


@dataclass
class AdaptivePipelineOutput(BaseOutput):
    """``images`` as the stock pipeline returns them, ``nsfw_content_detected`` where the
    pipeline has a safety checker (else None), and one :class:`ImageTrace` per image."""

    images: Any
    nsfw_content_detected: list[bool] | None
    traces: list[ImageTrace]


def missing_folder(name: str, what: str, option: str) -> None:
    """Raise when ``name`` (a package's recorded model) is a local path that does not exist
    here; a Hub id (``org/name``, ``hf-hub:org/name``) or an open_clip name passes."""
    looks_local = name.startswith((".", "/", "~")) or name.count("/") >= 2
    if looks_local and not name.startswith("hf-hub:") and not Path(name).expanduser().exists():
        raise PolicyPackageError(
            f"the {what} {name!r} of the policy package is a local folder that does not exist "
            f"here (relative paths are relative to where you run): run from the project that "
            f"trained the policy, or pass {option}<folder or Hub id>"
        )


def preview_decoder(
    policy: AdaptivePolicy, preview: torch.nn.Module | str | Path | None, pipe: DiffusionPipeline
) -> torch.nn.Module | None:
    """The decoder of the policy's observations on ``pipe``'s device: None when they are the
    VAE's, else ``preview`` (a module, or a folder / Hub id) or the package's preview decoder."""
    if policy.config.settings().observe_with != "preview":
        return None
    if preview is not None and not isinstance(preview, str | Path):
        return preview
    name = str(preview or policy.config.preview)
    missing_folder(name, "preview decoder", "preview= (addiffusion generate: --preview) ")
    return backbone.load_preview(name, backbone.denoiser_of(pipe).device, pipe.vae.dtype)


def default_steps(pipe: DiffusionPipeline) -> int:
    """The stock pipeline's default ``num_inference_steps``."""
    return int(inspect.signature(type(pipe).__call__).parameters["num_inference_steps"].default)


@contextmanager
def restore_attention_processors(denoiser: torch.nn.Module) -> Iterator[None]:
    """Restore the denoiser's attention processors on exit (the sampler installs capturing
    ones for refine's masks)."""
    saved = dict(denoiser.attn_processors)
    try:
        yield
    finally:
        denoiser.set_attn_processor(saved)


class AdaptiveDiffusionPipeline:
    """``pipe`` sampled by ``policy`` (see the module docstring).

    ``policy``: an :class:`AdaptivePolicy` or a package folder / Hub id. ``scorer``: the CLIP
    scorer of the observations: a loaded one, or its open_clip name / folder (default: the
    package's). ``preview``: the preview decoder of the observations when the policy was trained
    on preview-decoded ones (``AutoencoderTiny``, or its folder / Hub id; default: the
    package's); the final images are always decoded by ``pipe``'s own VAE. Raises
    :class:`PolicyPackageError` naming every mismatch between the package and the pipeline.
    """

    def __init__(
        self,
        pipe: DiffusionPipeline,
        policy: AdaptivePolicy | str | Path,
        scorer: Any | None = None,
        preview: torch.nn.Module | str | Path | None = None,
    ) -> None:
        if not isinstance(policy, AdaptivePolicy):
            policy = AdaptivePolicy.from_pretrained(str(policy))
        cfg = policy.config
        self.pipe = pipe
        self.policy = policy
        self.family = backbone.model_family(pipe)
        problems = []
        if self.family != cfg.family:
            problems.append(
                f"the pipeline is {self.family}, the policy was trained on {cfg.family} ({cfg.backbone})"
            )
        flow = isinstance(pipe.scheduler, backbone.FlowMatchEulerDiscreteScheduler)
        if flow != (cfg.solver in backbone.FLOW_SCHEDULERS):
            problems.append(
                f"the policy steers the {cfg.solver!r} solver, which does not fit this pipeline's "
                f"{type(pipe.scheduler).__name__} (a {'flow-matching' if flow else 'diffusion'} model)"
            )
        if problems:
            raise PolicyPackageError("the policy does not fit the pipeline: " + "; ".join(problems))
        cls, kwargs = backbone.SCHEDULERS[cfg.solver]
        self.scheduler = cls.from_config(pipe.scheduler.config, **kwargs)
        self.denoiser = backbone.denoiser_of(pipe)
        if scorer is None or isinstance(scorer, str | Path):
            from addiffusion.rewards.clip import ClipScorer

            name = str(scorer or cfg.scorer)
            missing_folder(name, "scorer", "scorer= (addiffusion generate: --scorer) ")
            scorer = ClipScorer(name, self.denoiser.device)
        self.scorer = scorer
        self.settings = cfg.settings()
        self.preview = preview_decoder(policy, preview, pipe)
        layout = cfg.observation
        if (scorer.dim, scorer.dim) != (layout.image_dim, layout.text_dim):
            problems.append(
                f"the scorer gives {scorer.dim}-dim features, the policy's observations hold "
                f"{layout.image_dim}-dim image and {layout.text_dim}-dim text features (scorer "
                f"{cfg.scorer!r})"
            )
        table = self._sampler(self.settings).table
        if table != policy.actions:
            problems.append(
                f"on this pipeline the {cfg.solver} sampler offers actions {list(table.names)} "
                f"({table.to_dict()}), the policy was trained on {list(policy.actions.names)} "
                f"({policy.actions.to_dict()})"
            )
        if problems:
            raise PolicyPackageError("the policy does not fit the pipeline: " + "; ".join(problems))

    def _make_sampler(self, settings: Any) -> StepwiseSampler:
        """The sampler of one call (it installs its attention-capturing processors)."""
        return StepwiseSampler(
            self.pipe, self.scorer, settings, scheduler=self.scheduler, preview=self.preview
        )

    def _sampler(self, settings: Any) -> StepwiseSampler:
        with restore_attention_processors(self.denoiser):
            return self._make_sampler(settings)

    @property
    def default_steps(self) -> int:
        return default_steps(self.pipe)

    def _noise(
        self,
        n: int,
        shape: tuple[int, ...],
        generator: torch.Generator | Sequence[torch.Generator] | None,
        latents: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, list[int]]:
        """Starting noise (None: drawn from the seeds) and the seed recorded per image."""
        gens = list(generator) if isinstance(generator, Sequence) else None
        if gens is not None and len(gens) != n:
            raise ValueError(
                f"got {len(gens)} generators for {n} images (pass one, or one per image)"
            )
        if gens is not None:
            seeds = [int(g.initial_seed()) for g in gens]
        elif generator is not None:
            seeds = [int(generator.initial_seed())] * n
        else:
            seeds = torch.randint(0, 2**31 - 1, (n,)).tolist()
        if latents is not None:
            if tuple(latents.shape) != (n, *shape):
                raise ValueError(
                    f"latents must have shape {(n, *shape)}, got {tuple(latents.shape)}"
                )
            return latents.float().cpu(), seeds
        if gens is not None:
            draws = [torch.randn((1, *shape), generator=g, device=g.device) for g in gens]
            return torch.cat([d.cpu() for d in draws]), seeds
        if generator is not None:
            return torch.randn(
                (n, *shape), generator=generator, device=generator.device
            ).cpu(), seeds
        return None, seeds

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        keep_frames: bool = False,
        **unsupported: Any,
    ) -> AdaptivePipelineOutput | tuple[Any, list[bool] | None, list[ImageTrace]]:
        """Generate; ``guidance_scale`` / ``height`` / ``width`` default to the policy's
        training settings (other values put the policy off its training distribution).
        ``keep_frames``: keep the decoded x̂0 of every decision in the traces (filmstrips)."""
        if unsupported:
            name = sorted(unsupported)[0]
            why = (
                "the policy picks the schedule"
                if name in ("num_inference_steps", "timesteps", "sigmas")
                else "not supported by the adaptive sampler"
            )
            raise TypeError(f"AdaptiveDiffusionPipeline got {name!r}: {why}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(
                f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}"
            )
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if negative_prompt is None or isinstance(negative_prompt, str):
            negatives = None if negative_prompt is None else [negative_prompt] * len(prompts)
        else:
            negatives = list(negative_prompt)
            if len(negatives) != len(prompts):
                raise ValueError(
                    f"got {len(prompts)} prompts but {len(negatives)} negative prompts"
                )
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        if negatives is not None:
            negatives = [p for p in negatives for _ in range(num_images_per_prompt)]
        s = self.settings
        settings = dataclasses.replace(
            s,
            guidance_scale=s.guidance_scale if guidance_scale is None else float(guidance_scale),
            height=s.height if height is None else int(height),
            width=s.width if width is None else int(width),
        )
        with restore_attention_processors(self.denoiser):
            sampler = self._make_sampler(settings)
            shape = (self.denoiser.config.in_channels, *sampler.latent_hw)
            noise, seeds = self._noise(len(prompts), shape, generator, latents)
            tic = time.perf_counter()
            episodes, _ = sampler.start(prompts, seeds, negatives, noise)
            seen: list[list[tuple[int, int, int, np.ndarray | None]]] = [[] for _ in prompts]

            def note(ids: list[int], actions: np.ndarray, eps: list[Episode]) -> None:
                for i, a, ep in zip(ids, actions.tolist(), eps, strict=True):
                    t = int(ep.scheduler.timesteps[ep.step])
                    seen[i].append((a, ep.step, t, ep.image if keep_frames else None))

            done = rollout(sampler, self.policy, episodes, "policy", note)
        names = self.policy.actions.names
        traces = [
            ImageTrace(
                prompt=ep.prompt,
                seed=ep.seed,
                actions=tuple(names[a] for a, _, _, _ in seen[b]),
                points=tuple(p for _, p, _, _ in seen[b]),
                timesteps=tuple(t for _, _, t, _ in seen[b]),
                nfe=ep.nfe,
                stop_step=ep.step,
                refines=ep.refines_used,
                seconds=done.finished[b] - tic,
                frames=tuple(f for *_, f in seen[b] if f is not None),
            )
            for b, ep in enumerate(episodes)
        ]
        images, nsfw = self._output(np.stack(done.images), episodes, output_type)
        if not return_dict:
            return images, nsfw, traces
        return AdaptivePipelineOutput(images=images, nsfw_content_detected=nsfw, traces=traces)

    def _output(
        self, images: np.ndarray, episodes: list[Episode], output_type: str
    ) -> tuple[Any, list[bool] | None]:
        """The final images (B, H, W, 3) uint8 as ``output_type``, through the pipeline's
        safety checker when it has one."""
        if output_type == "latent":
            return torch.cat([ep.x0 for ep in episodes]), None
        x = images.astype(np.float32) / 255.0
        nsfw = None
        if getattr(self.pipe, "safety_checker", None) is not None:
            x, nsfw = self.pipe.run_safety_checker(x, self.denoiser.device, self.denoiser.dtype)
            nsfw = [bool(v) for v in nsfw]
        if output_type == "np":
            return x, nsfw
        if output_type == "pt":
            return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2), nsfw
        return self.pipe.numpy_to_pil(x), nsfw


def adapt(
    pipe: DiffusionPipeline, policy: AdaptivePolicy | str | Path, **kwargs: Any
) -> AdaptiveDiffusionPipeline:
    """``AdaptiveDiffusionPipeline(pipe, policy, **kwargs)``."""
    return AdaptiveDiffusionPipeline(pipe, policy, **kwargs)
