"""Model sizes small enough for unit tests of the shapes world's models and training."""

from addiffusion.worlds.shapes.models import ModelSizes

TINY = ModelSizes(
    vae_channels=(16, 16, 16),
    unet_channels=(16, 32),
    text_width=32,
    text_layers=1,
    clip_embed_dim=16,
    clip_vision_width=32,
    clip_vision_layers=1,
    clip_text_width=32,
    clip_text_layers=1,
)
