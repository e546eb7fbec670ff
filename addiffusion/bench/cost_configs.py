"""Public configs of the modules ``addiffusion bench cost`` builds (each repo's ``config.json``,
embedded: no machine here reaches a hub), and channel-scaled versions of them for tests."""

from __future__ import annotations

from typing import Any

# Public configs (config.json of each Hub repo), embedded: no machine here reaches a hub.
SD15_UNET: dict[str, Any] = dict(  # runwayml/stable-diffusion-v1-5, unet/config.json
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
    norm_eps=1e-5,
    act_fn="silu",
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
)
SD15_VAE: dict[str, Any] = dict(  # runwayml/stable-diffusion-v1-5, vae/config.json
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    norm_num_groups=32,
    act_fn="silu",
    sample_size=512,
    scaling_factor=0.18215,
)
SDXL_UNET: dict[str, Any] = dict(  # stabilityai/stable-diffusion-xl-base-1.0, unet/config.json
    sample_size=128,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_embed_type_num_heads=64,
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
    act_fn="silu",
    flip_sin_to_cos=True,
    freq_shift=0,
)
SDXL_VAE: dict[str, Any] = dict(  # stabilityai/stable-diffusion-xl-base-1.0, vae/config.json
    SD15_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True
)
SD3_TRANSFORMER: dict[str, Any] = dict(
    # stabilityai/stable-diffusion-3-medium-diffusers, transformer/config.json
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    pos_embed_max_size=192,
)
SD3_VAE: dict[str, Any] = dict(  # stabilityai/stable-diffusion-3-medium-diffusers, vae/config.json
    SD15_VAE,
    latent_channels=16,
    sample_size=1024,
    use_quant_conv=False,
    use_post_quant_conv=False,
    scaling_factor=1.5305,
    shift_factor=0.0609,
)
TAESD: dict[str, Any] = dict(  # madebyollin/taesd (and taesdxl: the same shape), config.json
    in_channels=3,
    out_channels=3,
    encoder_block_out_channels=(64, 64, 64, 64),
    decoder_block_out_channels=(64, 64, 64, 64),
    act_fn="relu",
    latent_channels=4,
    upsampling_scaling_factor=2,
    num_encoder_blocks=(1, 3, 3, 3),
    num_decoder_blocks=(3, 3, 3, 1),
)
TAESD3: dict[str, Any] = dict(TAESD, latent_channels=16)  # madebyollin/taesd3
CLIP_MODEL = "ViT-L-14"
CLIP_HUB = "openai/clip-vit-large-patch14 (open_clip ViT-L-14), image tower at 224²"

# Channel-scaled versions for tests (``--tiny``): the same module classes, seconds on a CPU.
TINY: dict[str, dict[str, Any]] = {
    "unet": dict(block_out_channels=(32, 32, 64, 64), norm_num_groups=8, cross_attention_dim=32),
    "sdxl_unet": dict(
        block_out_channels=(32, 32, 64),
        transformer_layers_per_block=(1, 1, 1),
        attention_head_dim=(2, 4, 4),
        norm_num_groups=8,
        cross_attention_dim=32,
        addition_embed_type_num_heads=4,
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
    ),
    "transformer": dict(
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=16,
    ),
    "vae": dict(block_out_channels=(8, 16, 16, 16), norm_num_groups=4),
    "taesd": dict(encoder_block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4),
}
TINY_CLIP = {  # an open_clip model config: ViT-L/14's layout, narrow and shallow
    "embed_dim": 16,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 16, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}
