"""``shapes`` section of params.yaml: training and benchmark settings of the shapes world."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from addiffusion.config import StageConfig, check


@dataclass(frozen=True)
class ShapesConfig(StageConfig):
    """Training of the shapes pipeline (VAE, then CLIP, then UNet + text encoder, then the preview
    decoder) and its bench.

    Step counts make a run reproducible; ``max_minutes`` (CLI) can cut the UNet phase short.
    """

    section: ClassVar[str] = "shapes"

    seed: int = 0
    n_train_scenes: int = 40000  # cached latents the UNet trains on (train split only)
    vae_steps: int = 800
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    decoder_steps: int = 600  # decoder-only fine-tune after the VAE phase (encoder frozen)
    decoder_lr: float = 5e-4
    clip_steps: int = 4000
    clip_batch: int = 128
    clip_lr: float = 1e-3
    unet_steps: int = 20000
    unet_batch: int = 32
    unet_lr: float = 4e-4
    unet_decay_steps: int = (
        8000  # linear learning-rate decay to 0 over the last steps (0: constant)
    )
    ema_decay: float = 0.999
    cond_dropout: float = 0.1  # caption dropped to "" for classifier-free guidance
    checkpoint_minutes: float = 4.0
    guidance_scale: float = 4.0
    preview_steps: int = 2000  # the preview decoder (AutoencoderTiny) distilled from the VAE
    preview_batch: int = 32
    preview_lr: float = 1e-3
    bench_prompts: int = 192
    bench_steps: tuple[int, ...] = (2, 4, 8, 16, 32, 50)
    device: str = "auto"

    def __post_init__(self) -> None:
        check(self.seed >= 0, "shapes.seed", ">= 0", self.seed)
        for key in (
            "n_train_scenes",
            "vae_batch",
            "clip_batch",
            "unet_batch",
            "preview_batch",
            "bench_prompts",
        ):
            check(getattr(self, key) >= 1, f"shapes.{key}", ">= 1", getattr(self, key))
        for key in (
            "vae_steps",
            "decoder_steps",
            "clip_steps",
            "unet_steps",
            "unet_decay_steps",
            "preview_steps",
        ):
            check(getattr(self, key) >= 0, f"shapes.{key}", ">= 0", getattr(self, key))
        for key in (
            "vae_lr",
            "decoder_lr",
            "clip_lr",
            "unet_lr",
            "preview_lr",
            "checkpoint_minutes",
        ):
            check(getattr(self, key) > 0, f"shapes.{key}", "> 0", getattr(self, key))
        check(
            self.unet_decay_steps <= self.unet_steps,
            "shapes.unet_decay_steps",
            f"<= shapes.unet_steps ({self.unet_steps})",
            self.unet_decay_steps,
        )
        check(0 <= self.ema_decay < 1, "shapes.ema_decay", "in [0, 1)", self.ema_decay)
        check(0 <= self.cond_dropout < 1, "shapes.cond_dropout", "in [0, 1)", self.cond_dropout)
        check(self.guidance_scale >= 1, "shapes.guidance_scale", ">= 1", self.guidance_scale)
        check(
            len(self.bench_steps) > 0 and all(s >= 1 for s in self.bench_steps),
            "shapes.bench_steps",
            "a non-empty list of step counts >= 1",
            self.bench_steps,
        )
        check(
            self.device in ("auto", "cpu", "cuda"),
            "shapes.device",
            "auto, cpu or cuda",
            self.device,
        )
