"""Tiny SDXL and SD3 pipelines built from config (as diffusers' own fast tests build them) and
saved with ``save_pretrained``: shared by the backbone, solver and drop-in-sampler tests."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from addiffusion.diffusion.backbone import _write_char_tokenizer

SD3_DROP = ("text_encoder_3", "tokenizer_3")
"""SD3 without T5 (zeros stand in for its embeddings): load with these as None."""


def clip_cfg(vocab: int) -> CLIPTextConfig:
    # As diffusers' own fast tests (tests/pipelines/stable_diffusion_xl, stable_diffusion_3).
    return CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=vocab,
        max_position_embeddings=77,
        projection_dim=32,
    )


def save_sdxl(out: Path) -> Path:
    torch.manual_seed(0)
    tok = _write_char_tokenizer(out / "tok")
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + 32,
        cross_attention_dim=64,
        norm_num_groups=1,
    )
    vae = AutoencoderKL(
        block_out_channels=[8, 16],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(clip_cfg(len(tok))),
        text_encoder_2=CLIPTextModelWithProjection(clip_cfg(len(tok))),
        tokenizer=tok,
        tokenizer_2=tok,
        unet=unet,
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    )
    pipe.save_pretrained(out / "pipe")
    return out / "pipe"


def save_sd3(out: Path, scheduler: FlowMatchEulerDiscreteScheduler | None = None) -> Path:
    torch.manual_seed(0)
    tok = _write_char_tokenizer(out / "tok")
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
    )
    vae = AutoencoderKL(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4, 8),
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler or FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=CLIPTextModelWithProjection(clip_cfg(len(tok))),
        tokenizer=tok,
        text_encoder_2=CLIPTextModelWithProjection(clip_cfg(len(tok))),
        tokenizer_2=tok,
        text_encoder_3=None,  # T5 is optional in SD3: zeros stand in for its embeddings
        tokenizer_3=None,
    )
    pipe.save_pretrained(out / "pipe")
    return out / "pipe"
