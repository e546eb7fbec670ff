"""SDXL and SD3 backbones through the same sampler, on tiny models built from config offline."""

from __future__ import annotations

from pathlib import Path

import pytest
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

from addiffusion.diffusion.backbone import _write_char_tokenizer, load_pipeline
from addiffusion.diffusion.sampler import SamplerSettings, StepRecord, StepwiseSampler
from addiffusion.rewards.clip import ClipScorer


def act(sampler: StepwiseSampler, eps: list, name: str) -> StepRecord | None:
    """Every episode of ``eps`` takes action ``name`` (one :meth:`StepwiseSampler.apply`)."""
    return sampler.apply(eps, [sampler.table.id(name)] * len(eps)).record


N = 3


def _clip_cfg(vocab: int) -> CLIPTextConfig:
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


def _save_sdxl(out: Path) -> Path:
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
        text_encoder=CLIPTextModel(_clip_cfg(len(tok))),
        text_encoder_2=CLIPTextModelWithProjection(_clip_cfg(len(tok))),
        tokenizer=tok,
        tokenizer_2=tok,
        unet=unet,
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    )
    pipe.save_pretrained(out / "pipe")
    return out / "pipe"


def _save_sd3(out: Path) -> Path:
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
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=CLIPTextModelWithProjection(_clip_cfg(len(tok))),
        tokenizer=tok,
        text_encoder_2=CLIPTextModelWithProjection(_clip_cfg(len(tok))),
        tokenizer_2=tok,
        text_encoder_3=None,  # T5 is optional in SD3: zeros stand in for its embeddings
        tokenizer_3=None,
    )
    pipe.save_pretrained(out / "pipe")
    return out / "pipe"


def _check_against_call(pipe: object, sampler: StepwiseSampler) -> None:
    seen: list[torch.Tensor] = []

    def keep(p: object, i: int, t: object, kw: dict) -> dict:
        seen.append(kw["latents"].clone())
        return kw

    s = sampler.settings
    noise = torch.randn((1, 4, *sampler.latent_hw), generator=torch.Generator().manual_seed(5))
    eps, rec = sampler.start(["a red circle"], [5])
    pipe(
        "a red circle",
        num_inference_steps=N,
        guidance_scale=s.guidance_scale,
        height=s.height,
        width=s.width,
        latents=noise,
        output_type="latent",
        callback_on_step_end=keep,
    )
    for k in range(N - 1):
        rec = act(sampler, eps, "jump-1")
        torch.testing.assert_close(eps[0].latents, seen[k], atol=1e-4, rtol=1e-4)
    assert rec.images.shape == (1, s.height, s.width, 3) and rec.nfe.tolist() == [N]


def test_sdxl_added_conditioning_and_refine(tmp_path: Path, tiny_clip: ClipScorer) -> None:
    pipe = load_pipeline(str(_save_sdxl(tmp_path)), "euler", "cpu")
    settings = SamplerSettings(n_max=N, refine_budget=1, guidance_scale=3.0, height=32, width=32)
    sampler = StepwiseSampler(pipe, tiny_clip, settings)
    assert sampler.family == "sdxl"
    _check_against_call(pipe, sampler)
    eps, _ = sampler.start(["a blue square"], [1])
    act(sampler, eps, "jump-1")
    rec = act(sampler, eps, "refine")
    assert rec.nfe.tolist() == [2 + settings.refine_k + 1] and rec.masks.shape == (1, 16, 16)


def test_sd3_flow_matching(tmp_path: Path, tiny_clip: ClipScorer) -> None:
    drop = ("text_encoder_3", "tokenizer_3")
    with pytest.raises(ValueError, match="flowmatch-euler"):
        load_pipeline(str(_save_sd3(tmp_path)), "ddim", "cpu", drop_components=drop)
    pipe = load_pipeline(str(tmp_path / "pipe"), "flowmatch-euler", "cpu", drop_components=drop)
    settings = SamplerSettings(n_max=N, refine_budget=1, guidance_scale=3.0)
    sampler = StepwiseSampler(pipe, tiny_clip, settings)
    assert sampler.family == "sd3"
    _check_against_call(pipe, sampler)  # the joint-attention capture wrapper changes nothing
    eps, rec = sampler.start(["a blue square"], [1])
    # Flow sigma s = 1 at the first step: the VP-style sigma column is capped, not infinite.
    assert rec.sigma[0] > 1.0
    act(sampler, eps, "jump-1")
    masks = sampler.masks(eps)
    assert masks.shape == (1, 16, 16) and 0 <= masks.min() and masks.max() <= 1
    rec = act(sampler, eps, "refine")
    assert rec.nfe.tolist() == [2 + settings.refine_k + 1] and rec.refines_used.tolist() == [1]
