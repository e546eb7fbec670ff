"""Teacher and student: two diffusers pipelines on one scheduler and one set of timesteps, and the
on-policy rollout that lines them up.

* :func:`load_pair` loads the teacher with ``from_pretrained`` (any SD-family or SD3 pipeline; the
  shapes world's by default) and the student either with ``from_pretrained`` too
  (``student_init: pretrained``: e.g. SD3.5 Large -> Medium) or as a smaller
  ``UNet2DConditionModel`` built from params (:func:`build_student`) inside a copy of the
  teacher's pipeline (same VAE, text encoder, tokenizer and scheduler).
* :func:`make_pair` checks that the two share a noise schedule and that their ``n_steps``
  timesteps are the same (:func:`align_timesteps`): a mismatch raises :class:`AlignmentError`;
  nothing is broadcast or resampled.
* :func:`rollout` runs the *student's* sampler (the project's solver step, deterministic) and, at
  every state ``x_t`` it visits, asks the teacher for its prediction at that same ``x_t`` and
  ``t``: aligned ``(x_t^student, teacher(x_t^student), student(x_t^student))`` for every timestep.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel

from addiffusion.config import UserError
from addiffusion.diffusion import backbone
from addiffusion.diffusion.backbone import NoiseSpace, TextConditioning
from addiffusion.diffusion.solvers import SolverHistory, solver_step
from addiffusion.distill.config import DistillConfig


class AlignmentError(UserError, ValueError):
    """Teacher and student do not share a schedule (length, timesteps, noise levels)."""


def align_timesteps(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """The shared timesteps ``(n,)`` of two schedules, or :class:`AlignmentError` when their
    lengths or any timestep differ (naming the first difference)."""
    t, s = teacher.detach().cpu().flatten(), student.detach().cpu().flatten()
    if len(t) != len(s):
        raise AlignmentError(
            f"teacher schedule has {len(t)} timesteps, student {len(s)}: the student is graded at "
            "its own timesteps, so both must run the same n_steps on the same scheduler"
        )
    diff = (t.double() - s.double()).abs() > 1e-6
    if diff.any():
        k = int(diff.nonzero()[0])
        raise AlignmentError(
            f"teacher and student timesteps differ at step {k}: {float(t[k])} vs {float(s[k])} "
            f"(teacher {t.tolist()}, student {s.tolist()})"
        )
    return t


@dataclass
class Pair:
    """Teacher and student pipelines and the scheduler they share, set to ``n_steps``.

    ``scheduler.timesteps``: (n_steps,) the shared timesteps; ``latent_hw``: latent (h, w)."""

    teacher: DiffusionPipeline
    student: DiffusionPipeline
    scheduler: object
    n_steps: int
    guidance_scale: float
    latent_hw: tuple[int, int]
    space: NoiseSpace

    @property
    def timesteps(self) -> torch.Tensor:
        return self.scheduler.timesteps

    @property
    def device(self) -> torch.device:
        return backbone.denoiser_of(self.teacher).device

    @property
    def latent_channels(self) -> int:
        return int(backbone.denoiser_of(self.teacher).config.in_channels)


def _schedule(pipe: DiffusionPipeline, n_steps: int, latent_hw: tuple[int, int]) -> object:
    sched = copy.deepcopy(pipe.scheduler)
    backbone.set_schedule(pipe, sched, n_steps, latent_hw, torch.device("cpu"))
    return sched


def make_pair(
    teacher: DiffusionPipeline,
    student: DiffusionPipeline,
    n_steps: int,
    guidance_scale: float,
    height: int,
    width: int,
) -> Pair:
    """Check that ``teacher`` and ``student`` share a scheduler and timesteps; return the pair.

    Raises :class:`AlignmentError` on another scheduler class, prediction type, latent space or
    noise schedule, or timesteps of another length or value."""
    ts, ss = teacher.scheduler, student.scheduler
    if type(ts) is not type(ss):
        raise AlignmentError(
            f"teacher scheduler {type(ts).__name__} != student scheduler {type(ss).__name__}"
        )
    for key in ("num_train_timesteps", "prediction_type", "shift", "use_dynamic_shifting"):
        a, b = ts.config.get(key), ss.config.get(key)
        if a != b:
            raise AlignmentError(f"scheduler {key}: teacher {a!r}, student {b!r}")
    t_den, s_den = backbone.denoiser_of(teacher), backbone.denoiser_of(student)
    if t_den.config.in_channels != s_den.config.in_channels:
        raise AlignmentError(
            f"latent channels: teacher {t_den.config.in_channels}, student "
            f"{s_den.config.in_channels} (teacher and student must share a VAE latent space)"
        )
    scale = 2 ** (len(teacher.vae.config.block_out_channels) - 1)
    latent_hw = (height // scale, width // scale)
    t_sched, s_sched = (
        _schedule(teacher, n_steps, latent_hw),
        _schedule(student, n_steps, latent_hw),
    )
    align_timesteps(t_sched.timesteps, s_sched.timesteps)
    for name in ("alphas_cumprod", "sigmas"):
        a, b = getattr(t_sched, name, None), getattr(s_sched, name, None)
        if a is not None and b is not None and not torch.allclose(a.float(), b.float()):
            raise AlignmentError(f"teacher and student schedulers differ in {name}")
    return Pair(
        teacher,
        student,
        t_sched,
        n_steps,
        guidance_scale,
        latent_hw,
        backbone.noise_space(t_sched),
    )


def build_student(
    teacher: DiffusionPipeline,
    init: str,
    channels: Sequence[int],
    layers_per_block: int,
    cross_attention: Sequence[bool],
    mid_block: bool,
    seed: int,
) -> tuple[DiffusionPipeline, dict[str, int]]:
    """A student pipeline: the teacher's components with a smaller ``UNet2DConditionModel``.

    The UNet config is the teacher's with ``block_out_channels=channels``, ``layers_per_block``,
    plain ``DownBlock2D`` / ``UpBlock2D`` on the levels whose ``cross_attention`` flag is False and
    no mid block unless ``mid_block``. ``init="copy"`` copies every teacher tensor with the same
    name and shape (so the student is the teacher with fewer blocks); ``"random"`` keeps the fresh
    initialisation (seeded). Returns the pipeline and ``{"copied": k, "tensors": n}``."""
    if backbone.model_family(teacher) != "sd":
        raise UserError(
            f"student_init {init!r} builds a UNet2DConditionModel student of an SD-format teacher; "
            f"the teacher is {type(teacher).__name__}: use student_init: pretrained with a "
            "student pipeline (e.g. SD3.5 Medium for SD3.5 Large)"
        )
    unet = teacher.unet
    tc = dict(unet.config)
    if init == "copy" and tuple(channels) != tuple(tc["block_out_channels"]):
        raise UserError(
            f"distill.student_channels {list(channels)} must equal the teacher's "
            f"block_out_channels {list(tc['block_out_channels'])} for student_init: copy "
            "(or use student_init: random)"
        )
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cross_attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cross_attention))
    cfg = {k: v for k, v in tc.items() if not k.startswith("_")}
    cfg.update(
        block_out_channels=tuple(channels),
        layers_per_block=layers_per_block,
        down_block_types=down,
        up_block_types=up,
        mid_block_type="UNetMidBlock2DCrossAttn" if mid_block else None,
    )
    torch.manual_seed(seed)
    student_unet = UNet2DConditionModel.from_config(cfg).to(unet.device)
    state = student_unet.state_dict()
    copied = 0
    if init == "copy":
        source = unet.state_dict()
        for name, tensor in state.items():
            if name in source and source[name].shape == tensor.shape:
                state[name] = source[name].detach().clone()
                copied += 1
        student_unet.load_state_dict(state)
    components = {**teacher.components, "unet": student_unet}
    components["scheduler"] = copy.deepcopy(teacher.scheduler)
    if "requires_safety_checker" in inspect.signature(type(teacher)).parameters:
        components["requires_safety_checker"] = False  # the teacher has none either
    student = type(teacher)(**components)
    student.set_progress_bar_config(disable=True)
    return student, {"copied": copied, "tensors": len(state)}


@dataclass(frozen=True)
class Conditioning:
    """Text conditioning of B prompts for both pipelines (one object when they share encoders)."""

    teacher: TextConditioning
    student: TextConditioning


@torch.no_grad()
def encode(pair: Pair, prompts: list[str]) -> Conditioning:
    h, w = (s * 2 ** (len(pair.teacher.vae.config.block_out_channels) - 1) for s in pair.latent_hw)
    t = backbone.encode_text(pair.teacher, prompts, pair.device, h, w)
    shared = all(
        getattr(pair.teacher, n, None) is getattr(pair.student, n, None)
        for n in ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer")
    )
    s = t if shared else backbone.encode_text(pair.student, prompts, pair.device, h, w)
    return Conditioning(t, s)


def guided(
    model: torch.nn.Module,
    pipe: DiffusionPipeline,
    scheduler: object,
    space: NoiseSpace,
    x: torch.Tensor,
    i: int,
    text: TextConditioning,
    guidance_scale: float,
) -> torch.Tensor:
    """Classifier-free-guided output of ``model`` (``pipe``'s denoiser, or an accelerate-wrapped
    copy of it) at latents ``x`` (B, C, h, w) and grid index ``i``: (B, C, h, w), in the
    scheduler's prediction type, one batched call of 2B rows."""
    t = scheduler.timesteps[i]
    model_in = x if space == "flow" else scheduler.scale_model_input(x, t)
    # Inputs in the model's own dtype (a bf16 teacher beside a float32 student; under
    # accelerate's autocast the student's compute is cast again).
    dtype = next(model.parameters()).dtype
    rows = torch.cat([model_in, model_in]).to(dtype)
    ts = t.to(x.device).expand(rows.shape[0])
    ctx = torch.cat([text.uncond, text.cond]).to(dtype)
    extra = {
        k: torch.cat([text.uncond_extra[k], text.cond_extra[k]]).to(dtype) for k in text.cond_extra
    }
    if backbone.model_family(pipe) == "sd3":
        out = model(
            hidden_states=rows,
            timestep=ts,
            encoder_hidden_states=ctx,
            pooled_projections=extra["pooled_projections"],
            return_dict=False,
        )[0]
    else:
        out = model(
            rows, ts, encoder_hidden_states=ctx, added_cond_kwargs=extra or None, return_dict=False
        )[0]
    uncond, cond = out.float().chunk(2)
    return uncond + guidance_scale * (cond - uncond)


@dataclass(frozen=True)
class Rollout:
    """One on-policy rollout of B episodes: per timestep k (``len == n_steps``, aligned)
    ``states[k]`` the student's latent x_t (B, C, h, w) float32, detached; ``teacher[k]`` the
    teacher's guided prediction at that x_t and t (no grad); ``student[k]`` the student's (with a
    graph when asked). ``final``: the student's last latent (B, C, h, w), detached."""

    timesteps: torch.Tensor
    states: list[torch.Tensor]
    teacher: list[torch.Tensor]
    student: list[torch.Tensor]
    final: torch.Tensor


def initial_latents(pair: Pair, noise: torch.Tensor) -> torch.Tensor:
    """``noise`` (B, C, h, w) unit Gaussian -> the sampler's first latent (float32, on device)."""
    shape = (pair.latent_channels, *pair.latent_hw)
    if tuple(noise.shape[1:]) != shape:
        raise ValueError(f"noise must be (B, {', '.join(map(str, shape))}), got {noise.shape}")
    sigma = 1.0 if pair.space == "flow" else float(pair.scheduler.init_noise_sigma)
    return noise.to(pair.device, torch.float32) * sigma


def rollout(
    pair: Pair,
    cond: Conditioning,
    noise: torch.Tensor,
    grad: bool = False,
    student_model: torch.nn.Module | None = None,
) -> Rollout:
    """Sample with the student from ``noise`` (B, C, h, w) and grade every visited state with
    the teacher at the same timestep (see :class:`Rollout`). The trajectory itself carries no
    gradient (states are detached, as in on-policy distillation: they are samples, not a path
    to differentiate through); ``grad=True`` keeps the graph of each student prediction.
    ``student_model``: the student's denoiser as prepared by accelerate (default: the
    pipeline's own)."""
    s_model = student_model or backbone.denoiser_of(pair.student)
    t_model = backbone.denoiser_of(pair.teacher)
    sched, g = pair.scheduler, pair.guidance_scale
    x = initial_latents(pair, noise)
    history = SolverHistory()
    states, teacher, student = [], [], []
    for i in range(pair.n_steps):
        with torch.set_grad_enabled(grad):
            s_out = guided(s_model, pair.student, sched, pair.space, x, i, cond.student, g)
        with torch.no_grad():
            t_out = guided(t_model, pair.teacher, sched, pair.space, x, i, cond.teacher, g)
        states.append(x)
        teacher.append(t_out.float())
        student.append(s_out)
        x = solver_step(sched, history, x, s_out.detach().float(), i, i + 1)
    align_timesteps(sched.timesteps[: len(states)], pair.timesteps)
    return Rollout(sched.timesteps.detach().cpu(), states, teacher, student, x.detach())


@torch.no_grad()
def sample(
    pair: Pair,
    which: str,
    cond: Conditioning,
    noise: torch.Tensor,
    model: torch.nn.Module | None = None,
) -> torch.Tensor:
    """The final latents (B, C, h, w) float32 of ``which`` ("teacher" or "student") sampling on
    its own from ``noise`` at the pair's timesteps."""
    pipe = pair.teacher if which == "teacher" else pair.student
    text = cond.teacher if which == "teacher" else cond.student
    model = model or backbone.denoiser_of(pipe)
    x = initial_latents(pair, noise)
    history = SolverHistory()
    for i in range(pair.n_steps):
        out = guided(model, pipe, pair.scheduler, pair.space, x, i, text, pair.guidance_scale)
        x = solver_step(pair.scheduler, history, x, out.float(), i, i + 1)
    return x


@torch.no_grad()
def decode(pair: Pair, latents: torch.Tensor) -> torch.Tensor:
    """Final latents -> (B, 3, H, W) float32 images in [0, 1] (the teacher's VAE: shared)."""
    return backbone.decode_latents(pair.teacher, latents)


def draw_noise(pair: Pair, seeds: Sequence[int]) -> torch.Tensor:
    """(B, C, h, w) unit noise, row b drawn on the CPU from ``seeds[b]`` (as the stepwise sampler
    draws its starting noise: same seed, same bytes, on any device)."""
    shape = (1, pair.latent_channels, *pair.latent_hw)
    return torch.cat(
        [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds]
    )


def load_pair(cfg: DistillConfig, device: str, teacher_dtype: torch.dtype = torch.float32) -> Pair:
    """Teacher (``cfg.teacher``) and student (built per ``cfg.student_init`` or loaded from
    ``cfg.student``) on ``device``, aligned at ``cfg.n_steps`` (:func:`make_pair`). The student's
    weights stay float32 (accelerate's mixed precision autocasts its compute); the frozen
    teacher may load in ``teacher_dtype`` (bf16 halves an SD3.5 Large teacher's memory)."""
    teacher = backbone.load_pipeline(
        cfg.teacher, cfg.scheduler, device, teacher_dtype, cfg.drop_components
    )
    backbone.denoiser_of(teacher).requires_grad_(False)
    if cfg.student_init == "pretrained":
        student = backbone.load_pipeline(
            cfg.student, cfg.scheduler, device, torch.float32, cfg.drop_components
        )
        # Only the student's denoiser learns; its text encoders and VAE stay frozen.
        for part in student.components.values():
            if isinstance(part, torch.nn.Module) and part is not backbone.denoiser_of(student):
                part.requires_grad_(False)
    else:
        student, _ = build_student(
            teacher,
            cfg.student_init,
            cfg.student_channels,
            cfg.student_layers_per_block,
            cfg.student_cross_attention,
            cfg.student_mid_block,
            cfg.seed,
        )
    return make_pair(teacher, student, cfg.n_steps, cfg.guidance_scale, cfg.height, cfg.width)
