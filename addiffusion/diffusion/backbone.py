"""Backbone loading: any SD-family pipeline through ``DiffusionPipeline.from_pretrained``, plus the
built-in random ``tiny`` pipeline (built from config, saved with ``save_pretrained``, read back
through the same ``from_pretrained`` path) used by unit tests and the first default.
"""

from __future__ import annotations

import copy
import json
import string
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift
from diffusers.schedulers import AysSchedules
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

SCHEDULERS = {
    "ddim": (DDIMScheduler, {}),
    "dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "euler": (EulerDiscreteScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
    # Rectified-flow backbones (SD3) train with flow matching; only this solver fits them.
    "flowmatch-euler": (FlowMatchEulerDiscreteScheduler, {}),
}
FLOW_SCHEDULERS = frozenset({"flowmatch-euler"})

Family = Literal["sd", "sdxl", "sd3"]
NoiseSpace = Literal["vp", "sigma", "flow"]
FLOW_SIGMA_CAP = 1e4
"""Flow-matching noise level s/(1-s) is infinite at s = 1; the ``sigma`` column caps it here."""


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_pipeline(
    model: str,
    scheduler: str = "ddim",
    device: str = "auto",
    dtype: torch.dtype = torch.float32,
    drop_components: Sequence[str] = (),
) -> DiffusionPipeline:
    """Load a diffusers pipeline (local folder or Hub id) and swap in the named scheduler.

    The scheduler keeps the pipeline's own training schedule (betas, prediction type) via
    ``from_config``. ``drop_components`` load as None (e.g. SD3's T5 ``text_encoder_3`` and
    ``tokenizer_3``, which SD3 replaces by zeros). Raises with the model id when loading fails.
    """
    if scheduler not in SCHEDULERS:
        raise ValueError(
            f"unknown scheduler {scheduler!r}; expected one of {', '.join(SCHEDULERS)}"
        )
    local = Path(model)
    if local.exists() and not (local / "model_index.json").exists():
        raise FileNotFoundError(
            f"{model} exists but has no model_index.json: not a diffusers pipeline folder "
            "(build the built-in one with `addiffusion backbone build-tiny`)"
        )
    pipe = DiffusionPipeline.from_pretrained(
        model, dtype=dtype, **dict.fromkeys(drop_components, None)
    )
    flow_model = isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    if flow_model != (scheduler in FLOW_SCHEDULERS):
        raise ValueError(
            f"{model} was trained with {type(pipe.scheduler).__name__}; scheduler {scheduler!r} "
            f"does not fit it (use {'flowmatch-euler' if flow_model else 'ddim, dpmsolver++, euler or unipc'})"
        )
    cls, kwargs = SCHEDULERS[scheduler]
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(resolve_device(device))
    if dtype == torch.float16 and pipe.vae.config.get("force_upcast", False):
        # SDXL's VAE overflows in float16 (its config says so); every x̂0 decode runs in float32.
        pipe.vae.to(torch.float32)
    return pipe


def load_preview(name: str, device: torch.device, dtype: torch.dtype) -> AutoencoderTiny:
    """The preview decoder ``name`` (an ``AutoencoderTiny`` folder or Hub id, e.g.
    ``madebyollin/taesd`` for SD 1.x/2.x, ``taesdxl``, ``taesd3``; the shapes world ships
    ``assets/shapes/preview``) on ``device``."""
    if not name:
        raise ValueError(
            "observe_with is 'preview' but no preview decoder is named (collect.preview: an "
            "AutoencoderTiny folder or Hub id such as madebyollin/taesd)"
        )
    local = Path(name)
    if local.exists() and not (local / "config.json").is_file():
        raise FileNotFoundError(
            f"{name} exists but has no config.json: not an AutoencoderTiny folder (train the shapes "
            "world's with `addiffusion shapes train --phase preview`)"
        )
    if not local.exists() and (local.is_absolute() or name.startswith(".") or name.count("/") != 1):
        raise FileNotFoundError(
            f"preview decoder {name} not found (a local AutoencoderTiny folder, or a Hub id "
            "org/name)"
        )
    return AutoencoderTiny.from_pretrained(name, dtype=dtype).to(device).eval()


def _write_char_tokenizer(out_dir: Path) -> CLIPTokenizer:
    """A character-level CLIP BPE tokenizer (hand-written vocab.json + merges.txt, no merges)."""
    chars = string.ascii_lowercase + string.digits + string.punctuation
    tokens = ["<|startoftext|>", "<|endoftext|>"] + list(chars) + [c + "</w>" for c in chars]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (out_dir / "merges.txt").write_text("#version: 0.2\n")
    # transformers 5: without model_max_length, padding to max length overflows.
    return CLIPTokenizer(
        str(out_dir / "vocab.json"), str(out_dir / "merges.txt"), model_max_length=77
    )


def build_tiny_pipeline(seed: int, work_dir: Path) -> StableDiffusionPipeline:
    """A randomly initialised SD-format pipeline (32x32 images, 8x8x4 latents), fixed seed.

    Same classes and config keys as SD 1.5, tiny sizes (as diffusers' own fast tests do).
    ``work_dir`` receives the tokenizer's source files.
    """
    torch.manual_seed(seed)
    tokenizer = _write_char_tokenizer(work_dir / "tokenizer_src")
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_tiny_pipeline(out_dir: Path, seed: int) -> Path:
    """Build the tiny pipeline and write it with ``save_pretrained`` (loadable by ``load_pipeline``)."""
    with tempfile.TemporaryDirectory() as tmp:
        pipe = build_tiny_pipeline(seed, Path(tmp))
        pipe.save_pretrained(out_dir)
    return Path(out_dir)


def model_family(pipe: DiffusionPipeline) -> Family:
    """``sd`` (SD 1.x/2.x), ``sdxl`` (two text encoders, added time/text conditioning) or ``sd3``
    (MMDiT transformer, flow matching)."""
    if getattr(pipe, "transformer", None) is not None:
        if not hasattr(pipe, "text_encoder_3"):
            raise ValueError(f"{type(pipe).__name__}: only SD3 transformer pipelines are supported")
        return "sd3"
    if getattr(pipe, "unet", None) is None:
        raise ValueError(f"{type(pipe).__name__} has neither a unet nor a transformer")
    return "sdxl" if hasattr(pipe, "text_encoder_2") else "sd"


def denoiser_of(pipe: DiffusionPipeline) -> torch.nn.Module:
    return pipe.transformer if model_family(pipe) == "sd3" else pipe.unet


@dataclass(frozen=True)
class TextConditioning:
    """Everything the denoiser needs about B prompts, for both CFG branches.

    ``cond`` / ``uncond``: (B, L, D) token embeddings; ``cond_extra`` / ``uncond_extra``: name ->
    (B, ...) added conditioning (SDXL ``text_embeds`` / ``time_ids``, SD3 ``pooled_projections``);
    ``token_texts`` / ``special``: per prompt, the tokens behind the L positions of the first
    tokenizer and whether each is a start/end/padding token (for attention masks)."""

    cond: torch.Tensor
    uncond: torch.Tensor
    cond_extra: dict[str, torch.Tensor]
    uncond_extra: dict[str, torch.Tensor]
    token_texts: list[list[str]]
    special: list[list[bool]]


def encode_text(
    pipe: DiffusionPipeline,
    prompts: list[str],
    device: torch.device,
    height: int,
    width: int,
    negative_prompts: list[str] | None = None,
) -> TextConditioning:
    """Encode prompts and negative prompts (None: the empty one) the way the family's
    ``__call__`` does."""
    family = model_family(pipe)
    empty: dict[str, torch.Tensor] = {}
    neg = negative_prompts
    if family == "sd":
        cond, uncond = pipe.encode_prompt(
            prompts, device, 1, do_classifier_free_guidance=True, negative_prompt=neg
        )
        cx, ux = empty, empty
    elif family == "sdxl":
        cond, uncond, pooled, neg_pooled = pipe.encode_prompt(
            prompts,
            device=device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt=neg,
        )
        proj = (
            int(pooled.shape[-1])
            if pipe.text_encoder_2 is None
            else pipe.text_encoder_2.config.projection_dim
        )
        time_ids = (
            pipe._get_add_time_ids((height, width), (0, 0), (height, width), cond.dtype, proj)
            .to(device)
            .repeat(len(prompts), 1)
        )
        cx = {"text_embeds": pooled, "time_ids": time_ids}
        ux = {"text_embeds": neg_pooled, "time_ids": time_ids}
    else:
        cond, uncond, pooled, neg_pooled = pipe.encode_prompt(
            prompts,
            prompts,
            prompts,
            device=device,
            do_classifier_free_guidance=True,
            negative_prompt=neg,
        )
        cx, ux = {"pooled_projections": pooled}, {"pooled_projections": neg_pooled}
    tok = pipe.tokenizer
    ids = tok(
        prompts, padding="max_length", max_length=tok.model_max_length, truncation=True
    ).input_ids
    specials = set(tok.all_special_ids)
    return TextConditioning(
        cond,
        uncond,
        cx,
        ux,
        [tok.convert_ids_to_tokens(row) for row in ids],
        [[i in specials for i in row] for row in ids],
    )


def denoise(
    pipe: DiffusionPipeline,
    x: torch.Tensor,
    t: torch.Tensor,
    context: torch.Tensor,
    extra: dict[str, torch.Tensor],
) -> torch.Tensor:
    """One batched denoiser evaluation: ``x`` (N, C, h, w) scaled model input, ``t`` (N,),
    ``context`` (N, L, D), ``extra`` name -> (N, ...). Returns the raw model output (N, C, h, w)."""
    if model_family(pipe) == "sd3":
        return pipe.transformer(
            hidden_states=x,
            timestep=t,
            encoder_hidden_states=context,
            pooled_projections=extra["pooled_projections"],
            return_dict=False,
        )[0]
    return pipe.unet(
        x, t, encoder_hidden_states=context, added_cond_kwargs=extra or None, return_dict=False
    )[0]


GRIDS = ("uniform", "ays", "custom")
"""Base grids of the sampler: ``uniform`` (the scheduler's own ``set_timesteps(n)`` spacing),
``ays`` (:func:`ays_timesteps`) and ``custom`` (timesteps the user lists)."""
CUSTOM_GRID_SCHEDULERS = (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)
"""Schedulers that take a custom grid: DDIM (the project's exact DDIM step goes between any two
timesteps), DPM-Solver++ and Euler (``set_timesteps(timesteps=...)``), flow Euler
(``set_timesteps(sigmas=t / num_train_timesteps)``). UniPC in diffusers 0.42 takes only
``sigmas=`` in its own space and is left at ``uniform``."""


def ays_timesteps(scheduler: object, n: int) -> list[int]:
    """An Align-Your-Steps-style ``n``-point grid for ``scheduler``'s noise schedule.

    Sayak et al.'s AYS schedule for Stable Diffusion 1.5 (``diffusers.schedulers.AysSchedules
    ["StableDiffusionSigmas"]``, 10 steps) log-linearly interpolated to ``n`` points (the AYS
    paper's ``loglinear_interp``), each sigma mapped to the nearest training timestep of this
    model's ``alphas_cumprod`` (VP sigma ``sqrt((1 - ᾱ) / ᾱ)``). The AYS sigmas were optimised for
    SD 1.5, so on other VP backbones this is an AYS-*style* grid, not an optimised one.
    Flow-matching schedulers have no VP sigmas: ``ValueError``. Returns ``n`` strictly decreasing
    integer timesteps (``ValueError`` when ``n`` is too large for distinct timesteps).
    """
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler) or not hasattr(
        scheduler, "alphas_cumprod"
    ):
        raise ValueError(
            f"the ays grid needs a VP noise schedule (alphas_cumprod); "
            f"{type(scheduler).__name__} has none: use grid uniform or custom"
        )
    if n < 1:
        raise ValueError(f"an ays grid needs n >= 1 points, got {n}")
    ref = np.asarray(AysSchedules["StableDiffusionSigmas"][:-1], np.float64)  # drop the final 0
    if n == 1:
        sigmas = ref[:1]
    else:
        xs = np.linspace(0.0, 1.0, len(ref))
        sigmas = np.exp(np.interp(np.linspace(0.0, 1.0, n), xs, np.log(ref[::-1])))[::-1]
    ac = scheduler.alphas_cumprod.double().numpy()
    log_model = np.log(np.sqrt((1.0 - ac) / ac))  # increasing with t
    t = np.interp(np.log(sigmas), log_model, np.arange(len(ac), dtype=np.float64))
    ts = [int(x) for x in np.clip(np.round(t), 0, len(ac) - 1)]
    if any(a <= b for a, b in zip(ts, ts[1:], strict=False)):
        raise ValueError(f"an ays grid of {n} points has repeated timesteps ({ts}): use fewer")
    return ts


def grid_timesteps(
    scheduler: object, grid: str, n: int, timesteps: Sequence[float] = ()
) -> list[int] | None:
    """The ``n`` timesteps of the base ``grid`` (None for ``uniform``: ``set_timesteps(n)``).

    ``custom`` returns ``timesteps`` after checking them: ``n`` strictly decreasing values in
    ``[0, num_train_timesteps)``. Errors name the grid and what was wrong."""
    if grid not in GRIDS:
        raise ValueError(f"unknown grid {grid!r}; expected one of {', '.join(GRIDS)}")
    if grid == "uniform":
        if len(timesteps):
            raise ValueError(f"grid 'uniform' takes no timesteps, got {list(timesteps)}")
        return None
    if not isinstance(scheduler, CUSTOM_GRID_SCHEDULERS):
        names = ", ".join(c.__name__ for c in CUSTOM_GRID_SCHEDULERS)
        raise ValueError(
            f"grid {grid!r} needs a scheduler that takes custom timesteps ({names}); "
            f"got {type(scheduler).__name__}: use grid uniform"
        )
    if grid == "ays":
        if len(timesteps):
            raise ValueError(f"grid 'ays' computes its timesteps, got {list(timesteps)}")
        return ays_timesteps(scheduler, n)
    ts = [int(t) for t in timesteps]
    top = int(scheduler.config.num_train_timesteps)
    if len(ts) != n:
        raise ValueError(f"grid 'custom' needs {n} timesteps (n_max), got {len(ts)}: {ts}")
    if any(float(t) != int(t) for t in timesteps) or not all(0 <= t < top for t in ts):
        raise ValueError(f"custom timesteps must be integers in [0, {top}), got {list(timesteps)}")
    if any(a <= b for a, b in zip(ts, ts[1:], strict=False)):
        raise ValueError(f"custom timesteps must be strictly decreasing, got {ts}")
    return ts


def set_schedule(
    pipe: DiffusionPipeline,
    scheduler: object,
    n_steps: int,
    latent_hw: tuple[int, int],
    device: torch.device,
    grid: str = "uniform",
    timesteps: Sequence[float] = (),
) -> None:
    """``scheduler.set_timesteps`` as the family's ``__call__`` calls it (SD3: resolution shift),
    on the base ``grid`` (:func:`grid_timesteps`): what the stock pipeline does when called with
    ``num_inference_steps=n_steps`` (uniform) or with ``timesteps=`` the grid's timesteps
    (``sigmas=t / num_train_timesteps`` for flow matching)."""
    kwargs = {}
    if scheduler.config.get("use_dynamic_shifting", False):
        patch = pipe.transformer.config.patch_size
        kwargs["mu"] = calculate_shift(
            (latent_hw[0] // patch) * (latent_hw[1] // patch),
            scheduler.config.get("base_image_seq_len", 256),
            scheduler.config.get("max_image_seq_len", 4096),
            scheduler.config.get("base_shift", 0.5),
            scheduler.config.get("max_shift", 1.16),
        )
    custom = grid_timesteps(scheduler, grid, n_steps, timesteps)
    if custom is None:
        scheduler.set_timesteps(n_steps, device=device, **kwargs)
    elif isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        top = float(scheduler.config.num_train_timesteps)
        scheduler.set_timesteps(sigmas=[t / top for t in custom], device=device, **kwargs)
    elif isinstance(scheduler, DDIMScheduler):
        # DDIMScheduler.set_timesteps has no `timesteps=`; the solver's DDIM step reads the grid
        # and alphas_cumprod directly, so the grid is all it needs.
        scheduler.set_timesteps(n_steps, device=device)
        scheduler.timesteps = torch.tensor(custom, dtype=torch.long, device=device)
    else:
        scheduler.set_timesteps(timesteps=custom, device=device)


def decode_latents(
    pipe: DiffusionPipeline, latents: torch.Tensor, vae: torch.nn.Module | None = None
) -> torch.Tensor:
    """``(B, C, h, w)`` clean latents -> ``(B, 3, H, W)`` float32 images in [0, 1], by the
    pipeline's VAE or ``vae`` (a preview decoder: ``AutoencoderTiny`` takes the same latents,
    its config's ``scaling_factor`` / ``shift_factor`` say how, as in the stock pipelines)."""
    vae = pipe.vae if vae is None else vae
    shift = vae.config.get("shift_factor", None) or 0.0
    x = latents.to(vae.dtype) / vae.config.scaling_factor + shift
    return (vae.decode(x, return_dict=False)[0].float() / 2 + 0.5).clamp(0, 1)


# Noise-level bookkeeping of the three kinds of schedulers: "vp" (DDIM, DPM++, UniPC: x_t =
# sqrt(ᾱ) x0 + sqrt(1-ᾱ) n), "sigma" (Euler: x_t = x0 + σ n, model input scaled) and "flow"
# (flow matching: x_t = (1-s) x0 + s n, the model predicts v = n - x0). ``step`` is the schedule
# index i of a scheduler on which ``set_timesteps`` was called.


def noise_space(scheduler: object) -> NoiseSpace:
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        return "flow"
    # Sigma-space schedulers (Euler, Heun, LMS...) scale their samples (init_noise_sigma > 1);
    # VP ones (DDIM, DPM++, UniPC) don't.
    probe = copy.deepcopy(scheduler)
    probe.set_timesteps(2)
    return "sigma" if float(probe.init_noise_sigma) != 1.0 else "vp"


def _sched_sigma(scheduler: object, step: int, device: torch.device) -> torch.Tensor:
    return scheduler.sigmas[step].to(device, torch.float32)


def _alpha_bar(scheduler: object, step: int, device: torch.device) -> torch.Tensor:
    t = int(scheduler.timesteps[step])
    return scheduler.alphas_cumprod[t].to(device, torch.float32)


def vp_sigma(scheduler: object, step: int, space: NoiseSpace) -> float:
    """Noise level at step i in the VP convention sqrt((1 - ᾱ) / ᾱ) (the ``sigma`` column)."""
    cpu = torch.device("cpu")
    if space == "flow":
        s = float(_sched_sigma(scheduler, step, cpu))
        return FLOW_SIGMA_CAP if s >= 1.0 else min(s / (1.0 - s), FLOW_SIGMA_CAP)
    if space == "sigma":
        return float(_sched_sigma(scheduler, step, cpu))
    ab = _alpha_bar(scheduler, step, cpu)
    return float(((1 - ab) / ab).sqrt())


def predict_x0(
    scheduler: object, step: int, space: NoiseSpace, x: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """One-step clean prediction from latents ``x`` and the guided model output ``out`` (both
    (B, C, h, w)) at step i, for flow / eps / v / sample models. Returns float32."""
    x, out = x.float(), out.float()
    if space == "flow":
        return x - _sched_sigma(scheduler, step, x.device) * out
    kind = scheduler.config.prediction_type
    if kind == "sample":
        return out
    if space == "sigma":
        sigma = _sched_sigma(scheduler, step, x.device)
        if kind == "epsilon":
            return x - sigma * out
        return out * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
    ab = _alpha_bar(scheduler, step, x.device)
    if kind == "epsilon":
        return (x - (1 - ab).sqrt() * out) / ab.sqrt()
    return ab.sqrt() * x - (1 - ab).sqrt() * out


def renoise(
    scheduler: object, step: int, space: NoiseSpace, x0: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """The latent at step i's noise level for clean ``x0`` and unit ``noise`` (B, C, h, w)."""
    if space == "flow":
        s = _sched_sigma(scheduler, step, x0.device)
        return (1 - s) * x0 + s * noise
    if space == "sigma":
        return x0 + _sched_sigma(scheduler, step, x0.device) * noise
    ab = _alpha_bar(scheduler, step, x0.device)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise
