"""``distill`` section of ``params.yaml``: on-policy distillation of a teacher pipeline into a
student that shares its scheduler and timesteps (train: ``distill train``; evaluation and survey:
``distill eval``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from addiffusion.config import StageConfig, check

DISTILL_SCHEDULERS = ("ddim", "flowmatch-euler")
"""Schedulers whose transition kernel :mod:`addiffusion.distill.losses` defines (VP DDIM and
rectified-flow Euler); both are the deterministic (eta = 0) member of the DDIM family."""

EVAL_KEYS = (
    "eval_prompts",
    "eval_seeds",
    "eval_batch_size",
    "bootstrap_samples",
    "confidence",
    "survey_pairs",
    "survey_image_size",
)
"""Keys only ``distill eval`` reads (``distill train`` reads every other key; dvc.yaml lists them
stage by stage)."""


@dataclass(frozen=True)
class DistillConfig(StageConfig):
    """On-policy distillation: the student samples, the teacher grades it at the same timesteps."""

    section: ClassVar[str] = "distill"

    teacher: str = "assets/shapes/pipeline"
    """Teacher diffusers pipeline: a local folder or a Hub id (``from_pretrained``)."""
    student: str = ""
    """Student pipeline (folder or Hub id) for ``student_init: pretrained``, e.g.
    ``stabilityai/stable-diffusion-3.5-medium``; empty otherwise."""
    student_init: Literal["copy", "random", "pretrained"] = "copy"
    """``copy``: a UNet2DConditionModel built from the ``student_*`` keys, every teacher tensor of
    the same name and shape copied in (the teacher with fewer blocks); ``random``: the same UNet,
    freshly initialised; ``pretrained``: the pipeline ``student``."""
    student_channels: tuple[int, ...] = (48, 96)
    """Student UNet ``block_out_channels`` (copy: must equal the teacher's)."""
    student_layers_per_block: int = 1
    student_cross_attention: tuple[bool, ...] = (False, True)
    """Per level: whether it keeps its cross-attention transformer (CrossAttn*Block2D) or is a
    plain Down/UpBlock2D."""
    student_mid_block: bool = False
    """Keep the UNet's mid block (UNetMidBlock2DCrossAttn)."""
    scorer: str = "assets/shapes/clip"
    """open_clip scorer of the evaluation (CLIP similarity, diversity)."""
    scheduler: str = "ddim"
    """ddim (VP backbones) or flowmatch-euler (SD3); shared by teacher and student."""
    drop_components: tuple[str, ...] = ()
    """Pipeline parts loaded as None in both pipelines (SD3: text_encoder_3, tokenizer_3)."""
    guidance_scale: float = 4.0
    height: int = 32
    width: int = 32
    n_steps: int = 4
    """The student's step count: the shared timesteps of rollouts, grading and evaluation."""
    prompts: str = "shapes"
    """Prompt source (as ``collect.prompts``); training uses its train split, evaluation its
    held-out split."""
    n_prompts: int = 720
    heldout_fraction: float = 0.15
    train_steps: int = 100
    """Optimizer steps (offline warm-start steps included)."""
    batch_size: int = 8
    """Prompts (one seed each) per micro-batch."""
    grad_accum_steps: int = 1
    learning_rate: float = 0.0002
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    lr_warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    kl_weight: float = 1.0
    mse_weight: float = 1.0
    """Weight of the prediction (eps / v / flow) MSE auxiliary."""
    kl_start: int = 20
    """Optimizer steps trained on the MSE auxiliary alone before the KL term comes in."""
    kl_ramp: int = 20
    """Then the KL weight rises linearly from 0 to ``kl_weight`` over this many steps."""
    kl_eta: float = 1.0
    """DDIM eta of the Gaussian transition kernels the KL compares (1: the DDPM posterior)."""
    kl_var_floor: float = 0.001
    """Floor of the kernel variance (the last step to noise 0 is deterministic under any eta)."""
    monitor_every: int = 10
    """Every this many steps, also log the final-latent and image MSE to the teacher's own run."""
    checkpoint_every: int = 50
    offline_store: str = ""
    """A trajectory store of teacher runs (``distill record``) for an offline warm-start;
    empty: none."""
    offline_steps: int = 0
    """First optimizer steps trained offline on ``offline_store`` (prediction MSE at the teacher's
    own states) before on-policy training."""
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    """accelerate's mixed precision; auto: bf16 on a CUDA device that has it, else no."""
    eval_prompts: int = 0
    """Held-out prompts evaluated (0: all)."""
    eval_seeds: int = 2
    eval_batch_size: int = 64
    bootstrap_samples: int = 2000
    confidence: float = 0.95
    survey_pairs: int = 48
    """Side-by-side questions in the survey export (distilled vs not)."""
    survey_image_size: int = 256
    """Survey images are upscaled (nearest) to this many pixels a side."""
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def __post_init__(self) -> None:
        s = self.section
        check(
            self.scheduler in DISTILL_SCHEDULERS,
            f"{s}.scheduler",
            f"one of {', '.join(DISTILL_SCHEDULERS)}",
            self.scheduler,
        )
        check(
            (self.student_init == "pretrained") == bool(self.student),
            f"{s}.student",
            "a pipeline exactly when student_init is pretrained",
            self.student,
        )
        check(len(self.student_channels) >= 1, f"{s}.student_channels", "a non-empty list", [])
        check(
            all(c >= 1 for c in self.student_channels),
            f"{s}.student_channels",
            "positive integers",
            list(self.student_channels),
        )
        check(
            len(self.student_cross_attention) == len(self.student_channels),
            f"{s}.student_cross_attention",
            f"one flag per level ({len(self.student_channels)})",
            list(self.student_cross_attention),
        )
        for key in ("student_layers_per_block", "n_steps", "train_steps", "batch_size"):
            check(getattr(self, key) >= 1, f"{s}.{key}", ">= 1", getattr(self, key))
        for key in ("grad_accum_steps", "monitor_every", "checkpoint_every", "eval_seeds"):
            check(getattr(self, key) >= 1, f"{s}.{key}", ">= 1", getattr(self, key))
        check(self.eval_batch_size >= 1, f"{s}.eval_batch_size", ">= 1", self.eval_batch_size)
        check(self.height % 8 == 0, f"{s}.height", "a multiple of 8", self.height)
        check(self.width % 8 == 0, f"{s}.width", "a multiple of 8", self.width)
        check(self.learning_rate > 0, f"{s}.learning_rate", "> 0", self.learning_rate)
        for key in ("lr_warmup_steps", "kl_start", "kl_ramp", "offline_steps", "n_prompts"):
            check(getattr(self, key) >= 0, f"{s}.{key}", ">= 0", getattr(self, key))
        for key in ("weight_decay", "kl_weight", "mse_weight", "kl_eta", "guidance_scale"):
            check(getattr(self, key) >= 0, f"{s}.{key}", ">= 0", getattr(self, key))
        check(
            self.kl_weight + self.mse_weight > 0,
            f"{s}.kl_weight",
            "> 0 when mse_weight is 0",
            self.kl_weight,
        )
        check(self.max_grad_norm > 0, f"{s}.max_grad_norm", "> 0", self.max_grad_norm)
        check(self.kl_var_floor > 0, f"{s}.kl_var_floor", "> 0", self.kl_var_floor)
        check(
            0 < self.heldout_fraction < 1,
            f"{s}.heldout_fraction",
            "in (0, 1)",
            self.heldout_fraction,
        )
        check(
            self.offline_steps <= self.train_steps,
            f"{s}.offline_steps",
            f"<= train_steps ({self.train_steps})",
            self.offline_steps,
        )
        check(
            (self.offline_steps > 0) == bool(self.offline_store),
            f"{s}.offline_store",
            "a store exactly when offline_steps > 0",
            self.offline_store,
        )
        check(self.eval_prompts >= 0, f"{s}.eval_prompts", ">= 0", self.eval_prompts)
        check(
            self.bootstrap_samples >= 100,
            f"{s}.bootstrap_samples",
            ">= 100",
            self.bootstrap_samples,
        )
        check(0 < self.confidence < 1, f"{s}.confidence", "in (0, 1)", self.confidence)
        check(self.survey_pairs >= 0, f"{s}.survey_pairs", ">= 0", self.survey_pairs)
        check(
            self.survey_image_size >= 8,
            f"{s}.survey_image_size",
            ">= 8",
            self.survey_image_size,
        )
