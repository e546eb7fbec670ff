"""Backbone loading: any SD-family pipeline through ``DiffusionPipeline.from_pretrained``, plus the
built-in random ``tiny`` pipeline (built from config, saved with ``save_pretrained``, read back
through the same ``from_pretrained`` path) used by unit tests and the first default.
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

SCHEDULERS = {
    "ddim": (DDIMScheduler, {}),
    "dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "euler": (EulerDiscreteScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
}


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
) -> DiffusionPipeline:
    """Load a diffusers pipeline (local folder or Hub id) and swap in the named scheduler.

    The scheduler keeps the pipeline's own training schedule (betas, prediction type) via
    ``from_config``. Raises with the model id when loading fails.
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
    pipe = DiffusionPipeline.from_pretrained(model, dtype=dtype)
    cls, kwargs = SCHEDULERS[scheduler]
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(resolve_device(device))


def _write_char_tokenizer(out_dir: Path) -> CLIPTokenizer:
    """A character-level CLIP BPE tokenizer (hand-written vocab.json + merges.txt, no merges)."""
    chars = string.ascii_lowercase + string.digits + string.punctuation
    tokens = ["<|startoftext|>", "<|endoftext|>"] + list(chars) + [c + "</w>" for c in chars]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (out_dir / "merges.txt").write_text("#version: 0.2\n")
    # transformers 5: without model_max_length, padding to max length overflows.
    return CLIPTokenizer(
        str(out_dir / "vocab.json"), str(out_dir / "merges.txt"), model_max_length=32
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
